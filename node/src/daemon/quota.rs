//! The store quota: past it, the leader refuses writes that would grow the
//! swarm's state, so that the state always fits what a node can read back
//! (a snapshot under the codec's 16 MiB) and the swarm stays readable and
//! healthy; removals, reports and shutdowns still go through. The state's
//! encoded size is measured on the leader when a growing write comes in, at
//! most once per [`REMEASURE`]; an idle swarm measures nothing.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use shoal_mesh::{Command, codec};
use shoal_raft::StateHandle;

use super::poison::lock;

/// How old a measurement may be before it is taken again.
pub const REMEASURE: Duration = Duration::from_secs(1);

/// Whether `cmd` may make the state larger (so is refused past the quota).
/// A scale only changes a number: the tasks it asks for are `AddTask`s.
/// Pure.
pub fn grows(cmd: &Command) -> bool {
    matches!(
        cmd,
        Command::CreateNetwork { .. }
            | Command::CreateService { .. }
            | Command::UpdateService { .. }
            | Command::AddTask { .. }
            | Command::AddPendingTask { .. }
            | Command::AddNode(_)
            | Command::UpdateNode { .. }
    )
}

/// The store quota of one node (it applies while the node leads).
pub struct Quota {
    limit: usize,
    measured: Mutex<Option<(Instant, usize)>>,
}

/// A write refused by the quota: the state's size and the quota, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded {
    /// The state's encoded size.
    pub size: usize,
    /// The quota.
    pub limit: usize,
}

impl Quota {
    /// A quota of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Quota {
            limit,
            measured: Mutex::new(None),
        }
    }

    /// Refuses `cmd` when it grows the state and the state is over the quota.
    pub fn check(&self, state: &StateHandle, cmd: &Command) -> Result<(), Exceeded> {
        if !grows(cmd) {
            return Ok(());
        }
        let now = Instant::now();
        let mut m = lock(&self.measured);
        let size = match *m {
            Some((at, size)) if now.duration_since(at) < REMEASURE => size,
            _ => {
                let size = state.read(|d| codec::encode(&d.state).map_or(usize::MAX, |b| b.len()));
                *m = Some((now, size));
                size
            }
        };
        if size > self.limit {
            return Err(Exceeded {
                size,
                limit: self.limit,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_mesh::NodeId;

    #[test]
    fn only_writes_that_grow_the_state_count_against_the_quota() {
        let add = Command::AddNode(shoal_mesh::fixtures::node(2));
        assert!(grows(&add));
        assert!(!grows(&Command::RemoveNode(NodeId(2))));
        assert!(!grows(&Command::RemoveService { id: "s".into() }));
        assert!(!grows(&Command::ShutdownTask {
            id: "t".into(),
            now_ms: 0
        }));
        assert!(!grows(&Command::RemoveTask { id: "t".into() }));
    }

    #[test]
    fn a_state_over_the_quota_refuses_growth_only() {
        let store = shoal_raft::MemoryStore::new(shoal_mesh::ClusterState {
            cluster: Some(shoal_mesh::fixtures::cluster_info("c")),
            ..Default::default()
        });
        let state = store.handle();
        let add = Command::AddNode(shoal_mesh::fixtures::node(2));
        assert!(Quota::new(1 << 20).check(&state, &add).is_ok());
        let tight = Quota::new(10);
        let e = tight.check(&state, &add).unwrap_err();
        assert!(e.size > 10 && e.limit == 10, "{e:?}");
        assert!(tight.check(&state, &Command::RemoveNode(NodeId(2))).is_ok());
    }
}
