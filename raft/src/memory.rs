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
    use shoal_mesh::state::JoinSecrets;
    use shoal_mesh::{Availability, ClusterInfo, Node, NodeId, Role};

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
            cluster: ClusterInfo {
                id: "c".into(),
                created_at_ms: 0,
                ca_cert_der: vec![],
                ca_fingerprint: String::new(),
                tokens: JoinSecrets {
                    worker_hash: String::new(),
                    manager_hash: String::new(),
                    worker_sealed: vec![],
                    manager_sealed: vec![],
                },
                sealed_ca_key: vec![],
                default_addr_pool: vec!["10.0.0.0/8".parse().unwrap()],
                default_pool_mask: 24,
            },
            first: Node {
                id: NodeId(1),
                hostname: "h1".into(),
                role: Role::Manager,
                availability: Availability::Active,
                labels: Default::default(),
                addr: "192.0.2.1:2377".into(),
                joined_at_ms: 0,
            },
            ingress_id: "ing".into(),
        };
        assert_eq!(store.apply(&init), Ok(Outcome::Done));
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        assert_eq!(h.state().cluster.map(|c| c.id), Some("c".into()));
        assert!(h.state().networks.contains_key("ing"));
    }
}
