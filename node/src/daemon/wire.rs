//! Messages between nodes on the control and join protocols (Raft RPCs are
//! `shoal_raft::RaftRpc`). All are encoded with `shoal_mesh::codec`.

use serde::{Deserialize, Serialize};
use shoal_mesh::{Command, NodeId, Role};
use shoal_raft::ApplyResult;

/// A control call (`shoal-ctl/1`).
#[derive(Debug, Serialize, Deserialize)]
pub enum CtlRequest {
    /// Liveness probe.
    Ping,
    /// A write forwarded to the leader.
    Propose(Box<Command>),
    /// A manager (per the store) asks for the managers' key.
    ManagerKey,
    /// Output of a task that runs (or ran) on the answering node, from byte `offset`.
    TaskLog {
        /// The task.
        task: String,
        /// Where to start.
        offset: u64,
    },
}

/// The reply to a [`CtlRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum CtlReply {
    /// Reply to `Ping`.
    Pong,
    /// The leader applied the write; this is what `apply` returned.
    Applied(ApplyResult),
    /// This node is not the leader; here is the one it knows of.
    NotLeader(Option<NodeId>),
    /// The managers' key.
    ManagerKey([u8; 32]),
    /// Refused, with the reason for the user.
    Refused(String),
    /// Task output from the asked offset, and the offset after it.
    TaskLog {
        /// The bytes.
        text: Vec<u8>,
        /// Offset after `text`.
        next: u64,
    },
}

/// The join handshake's request (`shoal-join/1`).
#[derive(Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The token's secret part.
    pub secret: String,
    /// A CSR for the joiner's fresh key (DER).
    pub csr_der: Vec<u8>,
    /// The joiner's hostname.
    pub hostname: String,
    /// Where the joiner will listen for other nodes.
    pub advertise_addr: String,
}

/// What the joiner receives when admitted.
#[derive(Debug, Serialize, Deserialize)]
pub struct JoinAccepted {
    /// Its new node ID.
    pub node_id: NodeId,
    /// The cluster's ID.
    pub cluster_id: String,
    /// The role the token gave.
    pub role: Role,
    /// Its certificate (DER).
    pub cert_der: Vec<u8>,
    /// The cluster CA (DER).
    pub ca_der: Vec<u8>,
    /// The managers' key, for managers.
    pub manager_key: Option<[u8; 32]>,
}

/// The join handshake's reply.
#[derive(Debug, Serialize, Deserialize)]
pub enum JoinReply {
    /// Admitted.
    Accepted(JoinAccepted),
    /// Refused, with the reason for the user.
    Refused(String),
}
