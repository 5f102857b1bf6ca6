//! Messages between nodes on the control and join protocols (Raft RPCs are
//! `shoal_raft::RaftRpc`), and the protocols' ALPN names. All are encoded
//! with [`crate::codec`]. They live here, beside the commands they carry,
//! so that every speaker of the protocol (the daemon, a test's attack
//! client) uses the same types.

use serde::{Deserialize, Serialize};

use crate::apply::{ApplyError, Command, Outcome};
use crate::ids::NodeId;
use crate::state::Role;
use crate::task::TaskReport;

/// ALPN of Raft RPCs.
pub const ALPN_RAFT: &[u8] = b"shoal-raft/1";
/// ALPN of control calls (forwarded writes, task reports, pings, secrets).
pub const ALPN_CTL: &[u8] = b"shoal-ctl/1";
/// ALPN of the join handshake.
pub const ALPN_JOIN: &[u8] = b"shoal-join/1";
/// ALPN of gossip: SWIM in datagrams, table messages in one-way streams.
pub const ALPN_GOSSIP: &[u8] = b"shoal-gossip/1";

/// The largest join request (a CSR, a hostname, an address, the secret):
/// what a node reads at most from a peer it does not know yet.
pub const MAX_JOIN_REQUEST: usize = 16 << 10;

/// A control call (`shoal-ctl/1`).
#[derive(Debug, Serialize, Deserialize)]
pub enum CtlRequest {
    /// Liveness probe.
    Ping,
    /// A write forwarded to the leader: from managers only.
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
    /// The caller reports on a task assigned to it (any member; the leader
    /// writes it as `Command::ReportTask` with the caller's node ID).
    ReportTask(TaskReport),
    /// The caller leaves the swarm (any member; the leader writes
    /// `Command::RemoveNode` of the caller).
    Leave,
    /// The caller renews its certificate (any member, to a manager): a CSR
    /// for its new key. The certificate names the caller and its role as
    /// the store has them.
    RenewCert {
        /// The CSR (DER).
        csr_der: Vec<u8>,
    },
    /// The caller holds a certificate under the new CA of the CA rotation
    /// running (any member; the leader writes `Command::AdoptCa` with the
    /// caller's node ID).
    AdoptCa {
        /// The new CA's fingerprint.
        fingerprint: String,
    },
    /// The caller's CPU and memory (any member; the leader writes
    /// `Command::SetNodeResources` with the caller's node ID).
    ReportResources(crate::state::NodeResources),
    /// The store's feed (any member, to a manager): an encoded
    /// `shoal_raft::feed::FeedRequest`, answered with [`CtlReply::Feed`].
    Feed(Vec<u8>),
}

/// The reply to a [`CtlRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum CtlReply {
    /// Reply to `Ping`.
    Pong,
    /// The leader applied the write; this is what `apply` returned.
    Applied(Result<Outcome, ApplyError>),
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
    /// A renewed certificate (DER).
    Cert(Vec<u8>),
    /// The store is over its quota and the write would grow it.
    QuotaExceeded {
        /// The state's encoded size, in bytes.
        size: u64,
        /// The quota, in bytes.
        limit: u64,
    },
    /// An encoded `shoal_raft::feed::FeedReply`.
    Feed(Vec<u8>),
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
    /// The swarm's managers when it was admitted: until its store arrives,
    /// the joiner takes Raft traffic from these nodes only.
    pub managers: Vec<NodeId>,
    /// The manager that answered (at the address the joiner dialled): the
    /// joiner's first source of the store.
    pub via: NodeId,
}

/// The join handshake's reply.
#[derive(Debug, Serialize, Deserialize)]
pub enum JoinReply {
    /// Admitted.
    Accepted(JoinAccepted),
    /// Refused, with the reason for the user.
    Refused(String),
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::codec::{self, DEFAULT_LIMIT};
    use crate::fixtures::decode_hostile;

    proptest! {
        /// Whatever a peer sends on the control or join protocol decodes
        /// to a value or an error, never a panic or an allocation past the
        /// limit.
        #[test]
        fn hostile_bytes_decode_to_errors_not_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            decode_hostile::<CtlRequest>(&bytes, DEFAULT_LIMIT);
            decode_hostile::<CtlReply>(&bytes, DEFAULT_LIMIT);
            decode_hostile::<JoinRequest>(&bytes, MAX_JOIN_REQUEST);
            decode_hostile::<JoinReply>(&bytes, DEFAULT_LIMIT);
        }

        /// A valid request with bytes flipped: still no panic.
        #[test]
        fn mutated_requests_never_panic(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let good = codec::encode(&JoinRequest {
                secret: "s".repeat(40),
                csr_der: vec![7; 300],
                hostname: "node-1".into(),
                advertise_addr: "10.0.0.1:2377".into(),
            }).unwrap();
            let mut b = good.clone();
            for (at, x) in flips {
                let at = at % b.len();
                b[at] ^= x;
            }
            let _ = codec::decode::<JoinRequest>(&b, MAX_JOIN_REQUEST);
            let _ = codec::decode::<CtlRequest>(&b, DEFAULT_LIMIT);
        }
    }
}
