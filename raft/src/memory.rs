//! The applied store without Raft, for tests of a node's loops: commands
//! are applied with [`shoal_mesh::apply`] as they are written, in memory,
//! and readers get the same [`StateHandle`] the daemon's loops read. Never
//! what a node runs: it has no log, no replication and no durability.

use std::sync::{Arc, RwLock};

use shoal_mesh::{ApplyError, ClusterState, Command, Outcome, apply};
use tokio::sync::watch;

use crate::state_machine::{SmData, StateHandle};

/// A store that applies each command at once.
#[derive(Clone)]
pub struct MemoryStore {
    data: Arc<RwLock<SmData>>,
    changed: Arc<watch::Sender<u64>>,
    changes: watch::Receiver<u64>,
}

impl MemoryStore {
    /// A store holding `state`.
    pub fn new(state: ClusterState) -> Self {
        let (tx, rx) = watch::channel(0);
        MemoryStore {
            data: Arc::new(RwLock::new(SmData {
                state,
                ..SmData::default()
            })),
            changed: Arc::new(tx),
            changes: rx,
        }
    }

    /// A read handle, as the state machine gives one.
    pub fn handle(&self) -> StateHandle {
        StateHandle::new(self.data.clone(), self.changes.clone())
    }

    /// Applies `cmd`; readers see it at once. A refused command changes
    /// nothing, as in the replicated store.
    pub fn apply(&self, cmd: &Command) -> Result<Outcome, ApplyError> {
        let result = {
            let mut data = self.data.write().unwrap_or_else(|p| p.into_inner());
            apply(&mut data.state, cmd)
        };
        if result.is_ok() {
            self.changed.send_modify(|v| *v = v.wrapping_add(1));
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use shoal_mesh::fixtures::{cluster_info, node};

    use super::*;

    #[test]
    fn readers_see_what_is_applied_and_are_told() {
        let store = MemoryStore::new(ClusterState::default());
        let h = store.handle();
        let mut changes = h.changes();
        // Not initialized: refused, nothing changes, nobody is told.
        let refused = store.apply(&Command::RemoveTask { id: "x".into() });
        assert_eq!(refused, Err(ApplyError::NotInitialized));
        assert!(!changes.has_changed().unwrap());
        let init = Command::Init {
            cluster: cluster_info("c"),
            first: node(1),
            ingress_id: "ing".into(),
        };
        assert_eq!(store.apply(&init), Ok(Outcome::Done));
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        assert_eq!(h.state().cluster.map(|c| c.id), Some("c".into()));
        assert!(h.state().networks.contains_key("ing"));
    }
}
