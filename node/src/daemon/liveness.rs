//! Who answers right now, as `node ls` shows it and the writer, the
//! membership loop and the orchestrator use it. One failure detector:
//! gossip's SWIM, whose cost per node does not grow with the swarm
//! (`Event::Member` feeds [`Liveness::member`]). Managers also ping each
//! other ([`crate::daemon::ping`]; a handful of nodes), so that a write's
//! quorum and the leader's view of its voters do not wait for gossip; a
//! recent answer to such a ping counts as alive too. Workers are pinged
//! only by the leader, to confirm a death during its grace
//! ([`crate::daemon::orchestrate`]); it records the answers here too.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shoal_gossip::MemberState;
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

/// Last successful ping per node, and gossip's state of each member.
pub struct Liveness {
    me: NodeId,
    started: Instant,
    last_ok: Mutex<HashMap<NodeId, Instant>>,
    members: Mutex<HashMap<NodeId, MemberState>>,
    /// When a node gossip has not heard of was first asked about.
    unheard_since: Mutex<HashMap<NodeId, Instant>>,
    /// How often gossip had each node go down since this daemon started.
    downs: Mutex<HashMap<NodeId, u32>>,
    /// This node's clock against the manager that fed it last: (manager,
    /// this clock minus its, ms).
    clock: Mutex<Option<(NodeId, i64)>>,
}

/// A clock this far from the managers' is warned about: orchestration
/// does not use it (the leader stamps task reports), but gossip refuses
/// entries more than 5 min ahead, and certificates may look not yet valid
/// or expired.
pub const CLOCK_WARN_MS: i64 = 1_000;

impl Liveness {
    /// Starts tracking, from now.
    pub fn new(me: NodeId) -> Self {
        Liveness {
            me,
            started: Instant::now(),
            last_ok: Mutex::new(HashMap::new()),
            members: Mutex::new(HashMap::new()),
            unheard_since: Mutex::new(HashMap::new()),
            downs: Mutex::new(HashMap::new()),
            clock: Mutex::new(None),
        }
    }

    /// Records gossip's state of member `node`.
    pub fn member(&self, node: NodeId, state: MemberState) {
        let was = self
            .members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node, state);
        let up =
            |s: Option<MemberState>| matches!(s, Some(MemberState::Alive | MemberState::Suspect));
        if up(was) && state == MemberState::Dead {
            let mut downs = self.downs.lock().unwrap_or_else(|p| p.into_inner());
            let n = downs.entry(node).or_default();
            *n = n.saturating_add(1);
        }
    }

    /// A manager's clock read `theirs` (ms since the epoch) when it sent
    /// what arrived here at `mine`.
    pub fn clock_sample(&self, manager: NodeId, theirs: u64, mine: u64) {
        let offset = i64::try_from(mine)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::try_from(theirs).unwrap_or(i64::MAX));
        *self.clock.lock().unwrap_or_else(|p| p.into_inner()) = Some((manager, offset));
    }

    /// For `shoal info`: this node's clock against the manager that fed it
    /// last, with a warning past [`CLOCK_WARN_MS`]; null on a node no
    /// manager feeds (the managers themselves).
    pub fn clock_view(&self) -> serde_json::Value {
        let Some((manager, offset)) = *self.clock.lock().unwrap_or_else(|p| p.into_inner()) else {
            return serde_json::Value::Null;
        };
        let warning = (offset.abs() > CLOCK_WARN_MS).then(|| {
            format!(
                "this node's clock is {} s {} manager {manager}'s: fix its time (NTP); gossip refuses entries more than 300 s ahead",
                offset.abs() as f64 / 1000.0,
                if offset > 0 { "ahead of" } else { "behind" }
            )
        });
        serde_json::json!({
            "manager": manager.to_string(),
            "offset_ms": offset,
            "warning": warning,
        })
    }

    /// How often gossip had `node` go down (alive, then dead) since this
    /// daemon started: a node that flaps counts up.
    pub fn downs(&self, node: NodeId) -> u32 {
        self.downs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .copied()
            .unwrap_or(0)
    }

    /// Records an answer from `node` at `now`.
    pub fn heard(&self, node: NodeId, now: Instant) {
        self.last_ok
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node, now);
    }

    /// Whether `node` answered a ping within [`DOWN_AFTER`] of `now`.
    pub fn answered(&self, node: NodeId, now: Instant) -> bool {
        self.last_ok
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .is_some_and(|t| now.saturating_duration_since(*t) < DOWN_AFTER)
    }

    /// The status of `node` at `now`: ready while gossip has it alive (or
    /// suspect: it may still refute) or it answered a ping lately; down
    /// once gossip has it dead or gone and no ping answers; unknown for a
    /// while when gossip has not heard of it (a node that just joined),
    /// from when this daemon started or was first asked about it.
    pub fn status(&self, node: NodeId, now: Instant) -> NodeStatus {
        if node == self.me {
            return NodeStatus::Ready;
        }
        let pinged = self.answered(node, now);
        let member = self
            .members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .copied();
        let since = match member {
            Some(_) => self.started,
            None => *self
                .unheard_since
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(node)
                .or_insert(now),
        };
        decide(pinged, member, now.saturating_duration_since(since))
    }
}

/// A node's status from a recent ping answer (`pinged`), gossip's state of
/// it, and for how long this daemon has known of it. Pure.
pub fn decide(pinged: bool, member: Option<MemberState>, age: Duration) -> NodeStatus {
    match member {
        _ if pinged => NodeStatus::Ready,
        Some(MemberState::Alive | MemberState::Suspect) => NodeStatus::Ready,
        Some(MemberState::Dead | MemberState::Left) => NodeStatus::Down,
        None if age < DOWN_AFTER => NodeStatus::Unknown,
        None => NodeStatus::Down,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gossip_decides_and_a_ping_answer_counts_as_alive() {
        let (young, old) = (Duration::ZERO, DOWN_AFTER * 2);
        use MemberState::*;
        assert_eq!(decide(false, Some(Alive), old), NodeStatus::Ready);
        assert_eq!(decide(false, Some(Suspect), old), NodeStatus::Ready);
        assert_eq!(decide(false, Some(Dead), old), NodeStatus::Down);
        assert_eq!(decide(false, Some(Left), old), NodeStatus::Down);
        // A manager gossip has dead that still answers pings: ready.
        assert_eq!(decide(true, Some(Dead), old), NodeStatus::Ready);
        assert_eq!(decide(false, None, young), NodeStatus::Unknown);
        assert_eq!(decide(false, None, old), NodeStatus::Down);
        let l = Liveness::new(NodeId(1));
        // Dead from the start (never seen up): not a down.
        l.member(NodeId(4), Dead);
        assert_eq!(l.downs(NodeId(4)), 0);
        l.member(NodeId(4), Alive);
        assert_eq!(l.status(NodeId(4), l.started), NodeStatus::Ready);
        l.member(NodeId(4), Dead);
        assert_eq!(l.status(NodeId(4), l.started), NodeStatus::Down);
        // Up, then dead: one down; again: two.
        assert_eq!(l.downs(NodeId(4)), 1);
        l.member(NodeId(4), Alive);
        l.member(NodeId(4), Suspect);
        l.member(NodeId(4), Dead);
        l.member(NodeId(4), Left);
        assert_eq!(l.downs(NodeId(4)), 2);
    }

    #[test]
    fn a_clock_ahead_of_the_managers_is_warned_about() {
        let l = Liveness::new(NodeId(1));
        assert!(l.clock_view().is_null());
        l.clock_sample(NodeId(2), 1_000_000, 1_000_020);
        assert_eq!(l.clock_view()["offset_ms"], 20);
        assert!(l.clock_view()["warning"].is_null());
        l.clock_sample(NodeId(2), 1_000_000, 1_090_000);
        let v = l.clock_view();
        assert_eq!(v["offset_ms"], 90_000);
        assert!(
            v["warning"]
                .as_str()
                .unwrap()
                .contains("90 s ahead of manager"),
            "{v}"
        );
        l.clock_sample(NodeId(2), 1_090_000, 1_000_000);
        assert!(
            l.clock_view()["warning"]
                .as_str()
                .unwrap()
                .contains("behind")
        );
    }

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
        // Gossip has not heard of node 3 (say, it just joined): unknown
        // for a while from when it was first asked about, then down.
        assert_eq!(
            l.status(NodeId(3), t0 + Duration::from_secs(5)),
            NodeStatus::Unknown
        );
        assert_eq!(
            l.status(NodeId(3), t0 + Duration::from_secs(9)),
            NodeStatus::Down
        );
    }
}
