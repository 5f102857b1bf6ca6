//! Serving other nodes: Raft RPCs, control calls and the join handshake.
//!
//! Who may do what is decided here, on the serving side, from the node ID
//! in the caller's certificate and the store (docs/security.md):
//! - Raft RPCs only from voters and managers, each speaking for itself
//!   (the node in the RPC's vote is the caller); a joiner whose store has
//!   not arrived yet only from the managers that admitted it;
//! - proposals only from managers; any member may report on the tasks
//!   assigned to it, leave, ping and read its tasks' output; only
//!   managers receive the managers' key; any member may ask a manager for
//!   the store's feed (it holds the whole store, as every node always has).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use shoal_mesh::apply::ApplyError;
use shoal_mesh::task::TaskReport;
use shoal_mesh::{Availability, ClusterState, Command, Node, NodeId, Role, codec};
use shoal_raft::{Raft, RaftRpc, StateHandle, serve_rpc};

use shoal_raft::feed::{FeedReply, FeedRequest};

use super::clock::now_ms;
use super::gate::JoinFailures;
use super::gossip::GossipHandle;
use super::identity::Secrets;
use super::membership::StaleVoters;
use super::pki;
use super::poison::lock;
use super::transport::{Handler, Incoming, MAX_MESSAGE};
use super::writer::{Propose, WRITE_TIMEOUT, WriteError, Writer};
use shoal_mesh::wire::{
    ALPN_CTL, ALPN_JOIN, ALPN_RAFT, CtlReply, CtlRequest, JoinAccepted, JoinReply, JoinRequest,
    MAX_JOIN_REQUEST,
};

/// The handler for one member's QUIC endpoint: what serving peers uses.
pub struct PeerHandler {
    /// Raft, for Raft RPCs and writes on the leader.
    pub raft: Raft,
    /// What feeds the store to workers: the log, and its latest entries.
    pub feed: shoal_raft::feed::FeedSource,
    /// The store: who is a member, with which role.
    pub state: StateHandle,
    /// Writes (admitting a node).
    pub writer: Writer,
    /// Where gossip messages go.
    pub gossip: GossipHandle,
    /// The managers' key (handed to managers, used to admit nodes).
    pub keys: Arc<Secrets>,
    /// The node's state dir (task logs).
    pub state_dir: PathBuf,
    /// The managers that admitted this node (`NodeFile::join_managers`).
    pub join_managers: Vec<NodeId>,
    /// Failed join attempts per source address.
    pub join_failures: Mutex<JoinFailures>,
    /// Members of the store asking for votes without being voters.
    pub stale_voters: Arc<StaleVoters>,
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    codec::encode(v).unwrap_or_default()
}

impl Handler for PeerHandler {
    fn gossip(&self, call: Incoming) {
        if let Some(from) = call.peer {
            self.gossip.incoming(from, call.request);
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

/// Whether `peer` (from its certificate; none without one) may make
/// control calls: a node of the store. Pure.
fn admitted(state: &ClusterState, peer: Option<NodeId>) -> bool {
    peer.is_some_and(|p| state.nodes.contains_key(&p))
}

/// Whether `peer` is a manager in the store (it may have the managers' key).
fn is_manager(state: &ClusterState, peer: Option<NodeId>) -> bool {
    peer.and_then(|p| state.nodes.get(&p))
        .is_some_and(|n| n.role == Role::Manager)
}

/// Whether a Raft RPC from `peer` (from its certificate), which speaks for
/// node `claimed` (the node in the RPC's vote: the candidate, or the
/// leader), is served; the reason when not. `voters` are the voters of
/// Raft's membership as this node knows it. Pure.
fn raft_allowed(
    state: &ClusterState,
    voters: &BTreeSet<u64>,
    join_managers: &[NodeId],
    peer: Option<NodeId>,
    claimed: Option<u64>,
) -> Result<(), String> {
    let Some(peer) = peer else {
        return Err("no certificate".into());
    };
    if claimed != Some(peer.0) {
        return Err(format!(
            "node {peer} speaks for another node ({})",
            claimed.map_or("none".into(), |c| NodeId(c).to_string())
        ));
    }
    if state.cluster.is_none() {
        return if join_managers.contains(&peer) {
            Ok(())
        } else {
            Err(format!(
                "node {peer} is not one of the managers that admitted this node"
            ))
        };
    }
    if voters.contains(&peer.0) || is_manager(state, Some(peer)) {
        Ok(())
    } else {
        Err(format!("node {peer} is neither a voter nor a manager"))
    }
}

/// The node an RPC speaks for: the candidate of a vote, the leader of an
/// append or snapshot.
fn claimed_by(rpc: &RaftRpc) -> Option<u64> {
    let vote = match rpc {
        RaftRpc::Append(r) => &r.vote,
        RaftRpc::Vote(r) => &r.vote,
        RaftRpc::Snapshot(r) => &r.vote,
    };
    vote.leader_id().voted_for()
}

async fn raft_call(m: &PeerHandler, call: Incoming) -> Vec<u8> {
    let rpc = match codec::decode::<RaftRpc>(&call.request, MAX_MESSAGE) {
        Ok(rpc) => rpc,
        Err(e) => {
            tracing::warn!(error = %e, remote = %call.remote, "undecodable raft call");
            return Vec::new();
        }
    };
    let voters: BTreeSet<u64> = m
        .raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect();
    let allowed = m.state.read(|d| {
        raft_allowed(
            &d.state,
            &voters,
            &m.join_managers,
            call.peer,
            claimed_by(&rpc),
        )
    });
    if let Err(why) = allowed {
        tracing::warn!(peer = ?call.peer, remote = %call.remote, %why, "raft call refused");
        // A node of the store that asks for votes, or still leads an old
        // term (openraft restores a leader of a committed vote at start), as
        // a voter it no longer is: see `StaleVoters`.
        if let Some(peer) = call.peer
            && m.state.read(|d| admitted(&d.state, Some(peer)))
            && claimed_by(&rpc) == Some(peer.0)
        {
            m.stale_voters.note(peer, Instant::now());
        }
        return Vec::new();
    }
    encode(&serve_rpc(&m.raft, rpc).await)
}

async fn ctl_call(m: &PeerHandler, call: Incoming) -> CtlReply {
    if !m.state.read(|d| admitted(&d.state, call.peer)) {
        return CtlReply::Refused("this node does not know you: not a member of its swarm".into());
    }
    let req = match codec::decode::<CtlRequest>(&call.request, MAX_MESSAGE) {
        Ok(r) => r,
        Err(e) => return CtlReply::Refused(format!("bad request: {e}")),
    };
    let Some(peer) = call.peer else {
        return CtlReply::Refused("no certificate".into());
    };
    match req {
        CtlRequest::Ping => CtlReply::Pong,
        CtlRequest::Propose(cmd) => {
            if m.state.read(|d| is_manager(&d.state, Some(peer))) {
                return write(m, *cmd).await;
            }
            tracing::warn!(%peer, remote = %call.remote, command = ?cmd, "proposal from a node that is not a manager refused");
            CtlReply::Refused(format!(
                "node {peer} is not a swarm manager: only managers may change the swarm"
            ))
        }
        // The reporter is who the certificate says, whatever it claims.
        CtlRequest::ReportTask(report) => {
            let report = leader_stamped(report, super::clock::now_ms());
            write(m, Command::ReportTask { node: peer, report }).await
        }
        CtlRequest::Leave => write(m, Command::RemoveNode(peer)).await,
        CtlRequest::AdoptCa { fingerprint }
            if shoal_mesh::ca::check_fingerprint(&fingerprint).is_err() =>
        {
            CtlReply::Refused("a CA fingerprint is 64 lowercase hex digits".into())
        }
        CtlRequest::AdoptCa { fingerprint } => {
            write(
                m,
                Command::AdoptCa {
                    node: peer,
                    fingerprint,
                },
            )
            .await
        }
        // The reporter is who the certificate says.
        CtlRequest::ReportResources(resources) => {
            write(
                m,
                Command::SetNodeResources {
                    node: peer,
                    resources,
                },
            )
            .await
        }
        CtlRequest::RenewCert { csr_der } => match renew(m, peer, csr_der).await {
            Ok(cert) => {
                tracing::info!(node = %peer, "renewed a node's certificate");
                CtlReply::Cert(cert)
            }
            Err(msg) => CtlReply::Refused(msg),
        },
        CtlRequest::TaskLog { .. } if !m.state.read(|d| is_manager(&d.state, Some(peer))) => {
            tracing::warn!(%peer, remote = %call.remote, "a node that is not a manager asked for task output; refused");
            CtlReply::Refused("only managers read other nodes' task output".into())
        }
        CtlRequest::TaskLog { task, offset } => {
            match super::executor::read_log(&m.state_dir, &task, offset) {
                Ok((text, next)) => CtlReply::TaskLog { text, next },
                Err(e) => CtlReply::Refused(format!("no output for task {task} on this node: {e}")),
            }
        }
        CtlRequest::Feed(bytes) => {
            let reply = feed(m, &bytes).await;
            let now_ms = super::clock::now_ms();
            CtlReply::Feed(encode(&super::feed::Stamped { now_ms, reply }))
        }
        CtlRequest::ManagerKey => {
            let manager = m.state.read(|d| is_manager(&d.state, call.peer));
            match (manager, m.keys.get()) {
                (true, Some(k)) => CtlReply::ManagerKey(k),
                (false, _) => {
                    tracing::warn!(%peer, remote = %call.remote, "a node that is not a manager asked for the managers' key; refused");
                    CtlReply::Refused("only managers receive the managers' key".into())
                }
                (true, None) => {
                    CtlReply::Refused("this node does not hold the managers' key".into())
                }
            }
        }
    }
}

/// A peer's task report as the store keeps it: stamped with this node's
/// clock (the leader's, which writes it), not the reporter's, so that a
/// node whose clock runs ahead or behind does not stretch or skip the
/// restart delays and timeouts the orchestrator counts from it. Pure.
fn leader_stamped(mut report: TaskReport, now_ms: u64) -> TaskReport {
    report.now_ms = now_ms;
    report
}

/// Serves the store's feed from this node, if it is a voter (a manager
/// Raft replicates to).
async fn feed(m: &PeerHandler, request: &[u8]) -> FeedReply {
    let req = match codec::decode::<FeedRequest>(request, MAX_MESSAGE) {
        Ok(r) => r,
        Err(e) => return FeedReply::Unavailable(format!("bad feed request: {e}")),
    };
    let voter = {
        let metrics = m.raft.metrics();
        let mc = metrics.borrow();
        let me = mc.id;
        mc.membership_config
            .membership()
            .voter_ids()
            .any(|v| v == me)
    };
    if !voter {
        return FeedReply::Unavailable("this node is not a voting manager".into());
    }
    shoal_raft::feed::serve(&m.raft, &m.feed, req).await
}

/// A certificate for member `peer`'s new key (`csr_der`), with its role
/// from the store and the swarm's validity, signed with the CA key this
/// manager unseals: the new CA's during a rotation.
async fn renew(m: &PeerHandler, peer: NodeId, csr_der: Vec<u8>) -> Result<Vec<u8>, String> {
    let key = m
        .keys
        .get()
        .ok_or("this node does not hold the managers' key; renew through a manager")?;
    let (ca, role, expiry_ms) = m.state.read(|d| {
        let s = &d.state;
        let role = s.nodes.get(&peer).map(|n| n.role);
        let ca = match (&s.ca_rotation, &s.cluster) {
            (Some(r), _) => Some((r.ca_cert_der.clone(), r.sealed_ca_key.clone())),
            (None, Some(c)) => Some((c.ca_cert_der.clone(), c.sealed_ca_key.clone())),
            (None, None) => None,
        };
        (ca, role, s.cert_expiry_ms)
    });
    let (ca_der, sealed_ca_key) = ca.ok_or("this node is not part of an initialized swarm")?;
    let role = role.ok_or("this node does not know you: not a member of its swarm")?;
    let ca_key = pki::unseal(&key, &sealed_ca_key).map_err(|e| e.to_string())?;
    let validity = std::time::Duration::from_millis(expiry_ms);
    // Off the runtime's workers: Raft's heartbeats must not wait for it.
    tokio::task::spawn_blocking(move || {
        pki::sign_node_csr(&ca_der, &ca_key, &csr_der, peer, role, validity)
            .map_err(|e| format!("cannot sign the renewal's CSR: {e}"))
    })
    .await
    .map_err(|e| format!("cannot sign the renewal's CSR: {e}"))?
}

/// Writes `cmd` on this node, if it leads.
async fn write(m: &PeerHandler, cmd: Command) -> CtlReply {
    if !m.writer.is_leader() {
        return CtlReply::NotLeader(m.writer.leader());
    }
    if let Err(WriteError::QuotaExceeded { size, limit }) = m.writer.check_quota(&cmd) {
        return CtlReply::QuotaExceeded { size, limit };
    }
    match tokio::time::timeout(WRITE_TIMEOUT, m.raft.client_write(cmd)).await {
        Ok(Ok(resp)) => CtlReply::Applied(resp.data),
        Ok(Err(_)) => CtlReply::NotLeader(m.writer.leader()),
        Err(_) => CtlReply::Refused(m.writer.no_quorum().to_string()),
    }
}

async fn join_call(m: &PeerHandler, call: Incoming) -> JoinReply {
    match admit(m, call).await {
        Ok(a) => JoinReply::Accepted(a),
        Err(msg) => JoinReply::Refused(msg),
    }
}

/// What a join request asks, checked against the store before anything
/// is done for it: the secret first (in constant time), then the hostname
/// and address. Pure.
fn check_join(state: &ClusterState, req: &JoinRequest) -> Result<(Role, SocketAddr), String> {
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
    if req.hostname.is_empty()
        || req.hostname.len() > 253
        || req
            .hostname
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "invalid hostname `{}`",
            req.hostname.escape_debug()
        ));
    }
    let addr = req.advertise_addr.parse().map_err(|_| {
        format!(
            "invalid advertise address `{}`",
            req.advertise_addr.escape_debug()
        )
    })?;
    Ok((role, addr))
}

async fn admit(m: &PeerHandler, call: Incoming) -> Result<JoinAccepted, String> {
    let source = call.remote.ip();
    let now = Instant::now();
    if let Err(wait) = lock(&m.join_failures).check(source, now) {
        return Err(format!(
            "too many failed join attempts from {source}: wait {} s, and check the token and the address",
            wait.as_secs() + 1
        ));
    }
    let checked = codec::decode::<JoinRequest>(&call.request, MAX_JOIN_REQUEST)
        .map_err(|e| format!("malformed join request: {e}"))
        .and_then(|req| {
            let (role, addr) = m.state.read(|d| check_join(&d.state, &req))?;
            Ok((req, role, addr))
        });
    let (req, role, addr) = match checked {
        Ok(c) => c,
        Err(msg) => {
            lock(&m.join_failures).failed(source, now);
            tracing::info!(%source, reason = %msg, "join refused");
            return Err(msg);
        }
    };
    let state = m.state.state();
    let cluster = state
        .cluster
        .as_ref()
        .ok_or("the node you contacted is not part of an initialized swarm")?;
    let manager_key = m
        .keys
        .get()
        .ok_or("the node you contacted cannot admit nodes (it is not a manager); join through a manager's address")?;
    let ca_key = pki::unseal(&manager_key, &cluster.sealed_ca_key).map_err(|e| e.to_string())?;
    let id = loop {
        let candidate = NodeId(rand::random());
        if candidate.0 != 0 && !state.nodes.contains_key(&candidate) {
            break candidate;
        }
    };
    let validity = std::time::Duration::from_millis(state.cert_expiry_ms);
    let cert_der = pki::sign_node_csr(
        &cluster.ca_cert_der,
        &ca_key,
        &req.csr_der,
        id,
        role,
        validity,
    )
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
    let added = m.writer.propose(Command::AddNode(node)).await;
    match added {
        Ok(_) => {}
        // A retried proposal whose first attempt committed after all (a
        // leader change mid-write): `id` is fresh and random, absent from
        // the store when drawn, so only that attempt can have added it.
        Err(WriteError::Refused(ApplyError::DuplicateNode(dup))) if dup == id => {}
        Err(e) => return Err(e.to_string()),
    }
    tracing::info!(node = %id, hostname = %req.hostname, %role, "admitted a node");
    Ok(JoinAccepted {
        node_id: id,
        cluster_id: cluster.id.clone(),
        role,
        cert_der,
        ca_der: cluster.ca_cert_der.clone(),
        manager_key: (role == Role::Manager).then_some(manager_key),
        managers: state.managers().map(|n| n.id).collect(),
        via: m.writer.id(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_mesh::fixtures::{cluster_info, node};

    #[test]
    fn a_task_report_carries_the_leaders_clock_not_the_reporters() {
        use shoal_mesh::task::TaskState;
        // A worker an hour ahead.
        let r = TaskReport::new(
            "t".into(),
            TaskState::Failed,
            "x".into(),
            Some(1),
            5_000_000,
        );
        let stamped = leader_stamped(r, 1_400_000);
        assert_eq!(stamped.now_ms, 1_400_000);
        assert_eq!(
            (stamped.state, stamped.exit_code),
            (TaskState::Failed, Some(1))
        );
    }

    #[test]
    fn only_nodes_of_the_store_are_heard_and_only_managers_get_the_key() {
        let mut state = ClusterState::default();
        assert!(
            !admitted(&state, Some(NodeId(9))),
            "joining: no control calls"
        );
        state.cluster = Some(cluster_info("c"));
        state.nodes.insert(NodeId(1), node(1));
        state.nodes.insert(NodeId(2), node(2));
        assert!(admitted(&state, Some(NodeId(2))));
        assert!(!admitted(&state, Some(NodeId(9))), "a removed node");
        assert!(!admitted(&state, None), "no certificate, no entry");
        assert!(is_manager(&state, Some(NodeId(1))));
        assert!(!is_manager(&state, Some(NodeId(2))), "a worker");
        assert!(!is_manager(&state, Some(NodeId(9))));
        assert!(!is_manager(&state, None));
    }

    #[test]
    fn raft_is_heard_from_voters_and_managers_each_for_itself() {
        let voters: BTreeSet<u64> = [1, 3].into();
        // Joining: only the managers that admitted us.
        let empty = ClusterState::default();
        let via = [NodeId(1)];
        assert!(raft_allowed(&empty, &voters, &via, Some(NodeId(1)), Some(1)).is_ok());
        assert!(raft_allowed(&empty, &voters, &via, Some(NodeId(2)), Some(2)).is_err());
        assert!(raft_allowed(&empty, &voters, &[], Some(NodeId(1)), Some(1)).is_err());
        let mut state = ClusterState {
            cluster: Some(cluster_info("c")),
            ..Default::default()
        };
        state.nodes.insert(NodeId(1), node(1));
        state.nodes.insert(NodeId(2), node(2));
        let mut promoted = node(4);
        promoted.role = Role::Manager;
        state.nodes.insert(NodeId(4), promoted);
        assert!(raft_allowed(&state, &voters, &[], Some(NodeId(1)), Some(1)).is_ok());
        // A voter the store no longer lists as a manager (being demoted).
        assert!(raft_allowed(&state, &voters, &[], Some(NodeId(3)), Some(3)).is_ok());
        // A manager Raft has not made a voter yet (being promoted).
        assert!(raft_allowed(&state, &voters, &[], Some(NodeId(4)), Some(4)).is_ok());
        let worker = raft_allowed(&state, &voters, &[], Some(NodeId(2)), Some(2));
        assert!(
            worker
                .unwrap_err()
                .contains("neither a voter nor a manager")
        );
        let forged = raft_allowed(&state, &voters, &[], Some(NodeId(2)), Some(1));
        assert!(forged.unwrap_err().contains("speaks for another node"));
        assert!(raft_allowed(&state, &voters, &[], None, Some(1)).is_err());
    }

    #[test]
    fn a_join_request_is_checked_secret_first_then_its_values() {
        let mut state = ClusterState::default();
        let req = |secret: &str, hostname: &str, addr: &str| JoinRequest {
            secret: secret.into(),
            csr_der: vec![],
            hostname: hostname.into(),
            advertise_addr: addr.into(),
        };
        let good = req("s3cret", "h", "10.0.0.1:2377");
        assert!(
            check_join(&state, &good)
                .unwrap_err()
                .contains("not part of an initialized swarm")
        );
        let mut info = cluster_info("c");
        info.tokens.worker_hash = pki::secret_hash("s3cret");
        state.cluster = Some(info);
        assert_eq!(
            check_join(&state, &good).unwrap(),
            (Role::Worker, "10.0.0.1:2377".parse().unwrap())
        );
        // A wrong secret is refused before the hostile values are looked at.
        let wrong = check_join(&state, &req("guess", "a\nb", "x")).unwrap_err();
        assert!(wrong.contains("invalid join token"), "{wrong}");
        for bad_host in ["", "a b", "a\u{1b}[2J", &"h".repeat(254)] {
            let e = check_join(&state, &req("s3cret", bad_host, "10.0.0.1:1")).unwrap_err();
            assert!(
                e.contains("invalid hostname") && !e.contains('\u{1b}'),
                "{e}"
            );
        }
        let e = check_join(&state, &req("s3cret", "h", "nowhere")).unwrap_err();
        assert!(e.contains("invalid advertise address"), "{e}");
    }
}
