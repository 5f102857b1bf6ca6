//! Who answers right now: every node pings every other node of the store
//! over the control protocol. This is the store-level view that `node ls`
//! shows until the gossip layer (SWIM) takes over failure detection.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shoal_mesh::NodeId;

/// How often peers are pinged.
pub const PING_INTERVAL: Duration = Duration::from_millis(500);
/// How long a ping may take.
pub const PING_TIMEOUT: Duration = Duration::from_secs(1);
/// A node not heard from for this long is down.
pub const DOWN_AFTER: Duration = Duration::from_secs(3);

/// A node's status as `node ls` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    /// Answered recently.
    Ready,
    /// Has not answered for [`DOWN_AFTER`].
    Down,
    /// Not known yet (this daemon just started).
    Unknown,
}

impl std::fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodeStatus::Ready => "ready",
            NodeStatus::Down => "down",
            NodeStatus::Unknown => "unknown",
        })
    }
}

/// Last successful contact per node.
pub struct Liveness {
    me: NodeId,
    started: Instant,
    last_ok: Mutex<HashMap<NodeId, Instant>>,
}

impl Liveness {
    /// Starts tracking, from now.
    pub fn new(me: NodeId) -> Self {
        Liveness {
            me,
            started: Instant::now(),
            last_ok: Mutex::new(HashMap::new()),
        }
    }

    /// Records an answer from `node` at `now`.
    pub fn heard(&self, node: NodeId, now: Instant) {
        self.last_ok
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node, now);
    }

    /// The status of `node` at `now`.
    pub fn status(&self, node: NodeId, now: Instant) -> NodeStatus {
        if node == self.me {
            return NodeStatus::Ready;
        }
        let last = self
            .last_ok
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .copied();
        match last {
            Some(t) if now.saturating_duration_since(t) < DOWN_AFTER => NodeStatus::Ready,
            _ if now.saturating_duration_since(self.started) < DOWN_AFTER => NodeStatus::Unknown,
            _ => NodeStatus::Down,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_follows_the_last_answer() {
        let me = NodeId(1);
        let l = Liveness::new(me);
        let t0 = l.started;
        assert_eq!(l.status(me, t0), NodeStatus::Ready);
        assert_eq!(l.status(NodeId(2), t0), NodeStatus::Unknown);
        l.heard(NodeId(2), t0 + Duration::from_secs(1));
        assert_eq!(
            l.status(NodeId(2), t0 + Duration::from_secs(2)),
            NodeStatus::Ready
        );
        assert_eq!(
            l.status(NodeId(2), t0 + Duration::from_secs(5)),
            NodeStatus::Down
        );
        assert_eq!(
            l.status(NodeId(3), t0 + Duration::from_secs(5)),
            NodeStatus::Down
        );
    }
}
