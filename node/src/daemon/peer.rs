//! Serving other nodes: Raft RPCs, control calls and the join handshake.

use std::path::PathBuf;
use std::sync::Arc;

use shoal_mesh::{Availability, Command, Node, NodeId, Role, codec};
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

/// Whether `peer` may talk to us: a node of the store. A node whose store
/// is still empty (it is joining) accepts Raft traffic from anyone the CA
/// signed, since that is how it receives the store.
fn admitted(m: &PeerHandler, peer: Option<NodeId>, allow_while_empty: bool) -> bool {
    let Some(peer) = peer else { return false };
    m.state.read(|d| {
        (allow_while_empty && d.state.cluster.is_none()) || d.state.nodes.contains_key(&peer)
    })
}

async fn raft_call(m: &PeerHandler, call: Incoming) -> Vec<u8> {
    if !admitted(m, call.peer, true) {
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
    if !admitted(m, call.peer, false) {
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
            let is_manager = call.peer.is_some_and(|p| {
                m.state.read(|d| {
                    d.state
                        .nodes
                        .get(&p)
                        .is_some_and(|n| n.role == Role::Manager)
                })
            });
            match (is_manager, m.keys.get()) {
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
