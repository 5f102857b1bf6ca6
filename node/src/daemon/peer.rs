//! Serving other nodes: Raft RPCs, control calls and the join handshake.

use std::path::PathBuf;
use std::sync::Arc;

use shoal_mesh::{Availability, ClusterState, Command, Node, NodeId, Role, codec};
use shoal_raft::{Raft, RaftRpc, StateHandle, serve_rpc};

use super::clock::now_ms;
use super::gossip::{GossipCmd, GossipHandle};
use super::identity::ManagerKey;
use super::pki;
use super::transport::{ALPN_CTL, ALPN_JOIN, ALPN_RAFT, Handler, Incoming, MAX_MESSAGE};
use super::wire::{CtlReply, CtlRequest, JoinAccepted, JoinReply, JoinRequest};
use super::writer::{Propose, WRITE_TIMEOUT, Writer};

/// Largest join request (a CSR, a hostname, an address).
const MAX_JOIN_REQUEST: usize = 16 << 10;

/// The handler for one member's QUIC endpoint: what serving peers uses.
pub struct PeerHandler {
    /// Raft, for Raft RPCs and writes on the leader.
    pub raft: Raft,
    /// The store: who is a member, with which role.
    pub state: StateHandle,
    /// Writes (admitting a node).
    pub writer: Writer,
    /// Where gossip messages go.
    pub gossip: GossipHandle,
    /// The managers' key (handed to managers, used to admit nodes).
    pub keys: Arc<ManagerKey>,
    /// The node's state dir (task logs).
    pub state_dir: PathBuf,
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    codec::encode(v).unwrap_or_default()
}

impl Handler for PeerHandler {
    fn gossip(&self, call: Incoming) {
        if let Some(from) = call.peer {
            self.gossip.send(GossipCmd::Incoming {
                from,
                bytes: call.request,
            });
        }
    }

    async fn handle(&self, call: Incoming) -> Vec<u8> {
        match call.alpn.as_slice() {
            ALPN_RAFT => raft_call(self, call).await,
            ALPN_CTL => encode(&ctl_call(self, call).await),
            ALPN_JOIN => encode(&join_call(self, call).await),
            _ => Vec::new(),
        }
    }
}

/// Whether `peer` (from its certificate; none without one) may talk to
/// us: a node of the store. A node whose store is still empty (it is
/// joining) accepts Raft traffic (`allow_while_empty`) from anyone the CA
/// signed, since that is how it receives the store. Pure.
fn admitted(state: &ClusterState, peer: Option<NodeId>, allow_while_empty: bool) -> bool {
    let Some(peer) = peer else { return false };
    (allow_while_empty && state.cluster.is_none()) || state.nodes.contains_key(&peer)
}

/// Whether `peer` is a manager in the store (it may have the managers' key).
fn is_manager(state: &ClusterState, peer: Option<NodeId>) -> bool {
    peer.and_then(|p| state.nodes.get(&p))
        .is_some_and(|n| n.role == Role::Manager)
}

async fn raft_call(m: &PeerHandler, call: Incoming) -> Vec<u8> {
    if !m.state.read(|d| admitted(&d.state, call.peer, true)) {
        tracing::warn!(peer = ?call.peer, remote = %call.remote, "raft call from a node not in the store refused");
        return Vec::new();
    }
    match codec::decode::<RaftRpc>(&call.request, MAX_MESSAGE) {
        Ok(rpc) => encode(&serve_rpc(&m.raft, rpc).await),
        Err(e) => {
            tracing::warn!(error = %e, remote = %call.remote, "undecodable raft call");
            Vec::new()
        }
    }
}

async fn ctl_call(m: &PeerHandler, call: Incoming) -> CtlReply {
    if !m.state.read(|d| admitted(&d.state, call.peer, false)) {
        return CtlReply::Refused("this node does not know you: not a member of its swarm".into());
    }
    let req = match codec::decode::<CtlRequest>(&call.request, MAX_MESSAGE) {
        Ok(r) => r,
        Err(e) => return CtlReply::Refused(format!("bad request: {e}")),
    };
    match req {
        CtlRequest::Ping => CtlReply::Pong,
        CtlRequest::Propose(cmd) => {
            if !m.writer.is_leader() {
                return CtlReply::NotLeader(m.writer.leader());
            }
            match tokio::time::timeout(WRITE_TIMEOUT, m.raft.client_write(*cmd)).await {
                Ok(Ok(resp)) => CtlReply::Applied(resp.data),
                Ok(Err(_)) => CtlReply::NotLeader(m.writer.leader()),
                Err(_) => CtlReply::Refused(m.writer.no_quorum().to_string()),
            }
        }
        CtlRequest::TaskLog { task, offset } => {
            match super::executor::read_log(&m.state_dir, &task, offset) {
                Ok((text, next)) => CtlReply::TaskLog { text, next },
                Err(e) => CtlReply::Refused(format!("no output for task {task} on this node: {e}")),
            }
        }
        CtlRequest::ManagerKey => {
            let manager = m.state.read(|d| is_manager(&d.state, call.peer));
            match (manager, m.keys.get()) {
                (true, Some(k)) => CtlReply::ManagerKey(k),
                (false, _) => CtlReply::Refused("only managers receive the managers' key".into()),
                (true, None) => {
                    CtlReply::Refused("this node does not hold the managers' key".into())
                }
            }
        }
    }
}

async fn join_call(m: &PeerHandler, call: Incoming) -> JoinReply {
    match admit(m, call).await {
        Ok(a) => JoinReply::Accepted(a),
        Err(msg) => JoinReply::Refused(msg),
    }
}

async fn admit(m: &PeerHandler, call: Incoming) -> Result<JoinAccepted, String> {
    let req: JoinRequest = codec::decode(&call.request, MAX_JOIN_REQUEST)
        .map_err(|e| format!("malformed join request: {e}"))?;
    let state = m.state.state();
    let cluster = state
        .cluster
        .as_ref()
        .ok_or("the node you contacted is not part of an initialized swarm")?;
    let role = cluster
        .tokens
        .role_for_hash(&pki::secret_hash(&req.secret))
        .ok_or(
            "invalid join token: its secret matches neither this swarm's worker nor its manager token (was it rotated? get the current one with `shoal swarm join-token worker` on a manager)",
        )?;
    let manager_key = m
        .keys
        .get()
        .ok_or("the node you contacted cannot admit nodes (it is not a manager); join through a manager's address")?;
    if req.hostname.is_empty()
        || req.hostname.len() > 253
        || req.hostname.chars().any(char::is_whitespace)
    {
        return Err(format!("invalid hostname `{}`", req.hostname));
    }
    let addr: std::net::SocketAddr = req
        .advertise_addr
        .parse()
        .map_err(|_| format!("invalid advertise address `{}`", req.advertise_addr))?;
    let ca_key = pki::unseal(&manager_key, &cluster.sealed_ca_key).map_err(|e| e.to_string())?;
    let id = loop {
        let candidate = NodeId(rand::random());
        if candidate.0 != 0 && !state.nodes.contains_key(&candidate) {
            break candidate;
        }
    };
    let cert_der = pki::sign_node_csr(&cluster.ca_cert_der, &ca_key, &req.csr_der, id, role)
        .map_err(|e| format!("cannot sign the join request's CSR: {e}"))?;
    let node = Node {
        id,
        hostname: req.hostname.clone(),
        role,
        availability: Availability::Active,
        labels: Default::default(),
        addr: addr.to_string(),
        joined_at_ms: now_ms(),
    };
    m.writer
        .propose(Command::AddNode(node))
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(node = %id, hostname = %req.hostname, %role, "admitted a node");
    Ok(JoinAccepted {
        node_id: id,
        cluster_id: cluster.id.clone(),
        role,
        cert_der,
        ca_der: cluster.ca_cert_der.clone(),
        manager_key: (role == Role::Manager).then_some(manager_key),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_mesh::fixtures::{cluster_info, node};

    #[test]
    fn only_nodes_of_the_store_are_heard_and_only_managers_get_the_key() {
        let mut state = ClusterState::default();
        // Joining (empty store): Raft from any signed peer, nothing else.
        assert!(admitted(&state, Some(NodeId(9)), true));
        assert!(!admitted(&state, Some(NodeId(9)), false));
        assert!(!admitted(&state, None, true), "no certificate, no entry");
        state.cluster = Some(cluster_info("c"));
        state.nodes.insert(NodeId(1), node(1));
        state.nodes.insert(NodeId(2), node(2));
        // In a swarm: members only, whatever the call.
        assert!(admitted(&state, Some(NodeId(2)), false));
        assert!(!admitted(&state, Some(NodeId(9)), true), "a removed node");
        assert!(is_manager(&state, Some(NodeId(1))));
        assert!(!is_manager(&state, Some(NodeId(2))), "a worker");
        assert!(!is_manager(&state, Some(NodeId(9))));
        assert!(!is_manager(&state, None));
    }
}
