//! A gossip member's identity.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use shoal_mesh::NodeId;

/// Who a gossip member is: its node ID and address, the generation of the
/// process (the hybrid clock at its start, so a restarted node is a newer
/// generation), and a bump that foca increases when it has to rejoin after
/// being wrongly declared down.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Peer {
    /// The node.
    pub id: NodeId,
    /// Where it listens (`IP:PORT`); shared by the copies of the peer a
    /// node keeps (foca's, the core's, the signed claims').
    pub addr: Arc<str>,
    /// Its process generation (`start_ms << 16`).
    pub generation: u64,
    /// Rejoin counter within a generation.
    pub bump: u16,
}

impl foca::Identity for Peer {
    type Addr = NodeId;

    fn renew(&self) -> Option<Self> {
        Some(Peer {
            bump: self.bump.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> NodeId {
        self.id
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        (self.generation, self.bump) > (adversary.generation, adversary.bump)
    }
}
