//! Serving other nodes: Raft RPCs, control calls and the join handshake.

use std::sync::{Arc, Weak};

use shoal_mesh::{Availability, Command, Node, NodeId, Role, codec};
use shoal_raft::{RaftRpc, serve_rpc};

use super::member::{Member, WRITE_TIMEOUT};
use super::pki;
use super::transport::{ALPN_CTL, ALPN_JOIN, ALPN_RAFT, Handler, Incoming, MAX_MESSAGE};
use super::wire::{CtlReply, CtlRequest, JoinAccepted, JoinReply, JoinRequest};

/// Largest join request (a CSR, a hostname, an address).
const MAX_JOIN_REQUEST: usize = 16 << 10;

/// The handler for one member's QUIC endpoint.
pub struct PeerHandler {
    /// The member (weak: the endpoint must not keep it alive).
    pub member: Weak<Member>,
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    codec::encode(v).unwrap_or_default()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Handler for PeerHandler {
    fn gossip(&self, call: Incoming) {
        if let (Some(m), Some(from)) = (self.member.upgrade(), call.peer) {
            m.gossip.send(super::gossip::GossipCmd::Incoming {
                from,
                bytes: call.request,
            });
        }
    }

    async fn handle(&self, call: Incoming) -> Vec<u8> {
        let Some(m) = self.member.upgrade() else {
            return Vec::new();
        };
        match call.alpn.as_slice() {
            ALPN_RAFT => raft_call(&m, call).await,
            ALPN_CTL => encode(&ctl_call(&m, call).await),
            ALPN_JOIN => encode(&join_call(&m, call).await),
            _ => Vec::new(),
        }
    }
}

/// Whether `peer` may talk to us: a node of the store. A node whose store
/// is still empty (it is joining) accepts Raft traffic from anyone the CA
/// signed, since that is how it receives the store.
fn admitted(m: &Member, peer: Option<NodeId>, allow_while_empty: bool) -> bool {
    let Some(peer) = peer else { return false };
    m.state.read(|d| {
        (allow_while_empty && d.state.cluster.is_none()) || d.state.nodes.contains_key(&peer)
    })
}

async fn raft_call(m: &Arc<Member>, call: Incoming) -> Vec<u8> {
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

async fn ctl_call(m: &Arc<Member>, call: Incoming) -> CtlReply {
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
            if m.leader() != Some(m.id) {
                return CtlReply::NotLeader(m.leader());
            }
            match tokio::time::timeout(WRITE_TIMEOUT, m.raft.client_write(*cmd)).await {
                Ok(Ok(resp)) => CtlReply::Applied(resp.data),
                Ok(Err(_)) => CtlReply::NotLeader(m.leader()),
                Err(_) => {
                    let (reachable, total) = m.manager_reachability(&m.state.state());
                    CtlReply::Refused(
                        super::member::WriteError::NoQuorum { reachable, total }.to_string(),
                    )
                }
            }
        }
        CtlRequest::TaskLog { task, offset } => {
            match super::executor::read_log(&m.dir.0, &task, offset) {
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
            match (is_manager, m.manager_key()) {
                (true, Some(k)) => CtlReply::ManagerKey(k),
                (false, _) => CtlReply::Refused("only managers receive the managers' key".into()),
                (true, None) => {
                    CtlReply::Refused("this node does not hold the managers' key".into())
                }
            }
        }
    }
}

async fn join_call(m: &Arc<Member>, call: Incoming) -> JoinReply {
    match admit(m, call).await {
        Ok(a) => JoinReply::Accepted(a),
        Err(msg) => JoinReply::Refused(msg),
    }
}

async fn admit(m: &Arc<Member>, call: Incoming) -> Result<JoinAccepted, String> {
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
        .manager_key()
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
    m.propose(Command::AddNode(node))
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
