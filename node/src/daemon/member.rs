//! A node that is part of a swarm: its QUIC endpoint, its Raft node over the
//! replicated store, and the loops around them (liveness pings, the leader's
//! membership reconciler, manager-key sync).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use openraft::BasicNode;
use openraft::error::{ClientWriteError, RaftError};
use shoal_mesh::{ApplyError, ClusterState, Command, NodeId, Outcome, Role, codec};
use shoal_raft::{
    Network, Raft, RaftRpc, RaftRpcReply, RaftTransport, StateHandle, TransportError,
};
use tokio::task::JoinHandle;

use super::identity::{Identity, StateDir};
use super::liveness::{Liveness, NodeStatus, PING_INTERVAL, PING_TIMEOUT};
use super::transport::{ALPN_CTL, ALPN_RAFT, MAX_MESSAGE, Quic};
use super::wire::{CtlReply, CtlRequest};

/// How long a write may take before it is reported as failed.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(4);

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The state machine refused it; nothing changed.
    #[error(transparent)]
    Refused(#[from] ApplyError),
    /// No leader could commit it in time.
    #[error(
        "no quorum: {reachable} of {total} managers reachable; the change was not confirmed. Restart the unreachable managers, or run `shoal swarm init --force-new-cluster` on a surviving manager"
    )]
    NoQuorum {
        /// Managers this node can reach (itself included).
        reachable: usize,
        /// Managers in the store.
        total: usize,
    },
    /// Any other failure (reported by a peer or by Raft).
    #[error("{0}")]
    Other(String),
}

/// A running swarm member.
pub struct Member {
    /// This node's ID.
    pub id: NodeId,
    /// The Raft node.
    pub raft: Raft,
    /// The applied store.
    pub state: StateHandle,
    /// The QUIC endpoint.
    pub quic: Arc<Quic>,
    /// The state dir.
    pub dir: StateDir,
    /// Identity (the manager key may come and go).
    pub identity: Mutex<Identity>,
    /// Ping results.
    pub live: Liveness,
    /// The gossip task.
    pub gossip: super::gossip::GossipHandle,
    /// Which task sandboxes the data plane has programmed.
    pub sandboxes: Arc<super::dataplane::Sandboxes>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// Raft RPCs over the node's QUIC endpoint.
#[derive(Clone)]
struct QuicRaft(Arc<Quic>);

impl RaftTransport for QuicRaft {
    async fn call(
        &self,
        target: u64,
        addr: &str,
        rpc: RaftRpc,
        timeout: Duration,
    ) -> Result<RaftRpcReply, TransportError> {
        let unreachable = |reason: String| TransportError::Unreachable {
            addr: addr.to_owned(),
            reason,
        };
        let sa: SocketAddr = addr
            .parse()
            .map_err(|_| unreachable("bad address".into()))?;
        let req = codec::encode(&rpc).map_err(|e| unreachable(e.to_string()))?;
        let reply = self
            .0
            .call(sa, NodeId(target), ALPN_RAFT, &req, timeout)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        codec::decode(&reply, MAX_MESSAGE).map_err(|e| TransportError::BadReply {
            addr: addr.to_owned(),
            reason: e.to_string(),
        })
    }
}

impl Member {
    /// Binds the endpoint, opens the store and starts Raft and the loops.
    /// The handler for incoming calls is attached by the caller.
    pub async fn start(
        identity: Identity,
        dir: StateDir,
        timing: &shoal_raft::RaftTiming,
        gossip_config: shoal_gossip::GossipConfig,
        reschedule_grace: Duration,
        dataplane: super::config::DataplaneConfig,
    ) -> anyhow::Result<Arc<Member>> {
        let id = identity.node.node_id;
        let quic = Quic::bind(&identity.tls, identity.node.listen_addr)?;
        let (log, sm) = shoal_raft::open(&dir.raft())?;
        let state = sm.handle();
        let config = Arc::new(shoal_raft::config(timing).validate()?);
        let raft = Raft::new(id.0, config, Network::new(QuicRaft(quic.clone())), log, sm).await?;
        let (gossip, gossip_task) = super::gossip::spawn(
            id,
            identity.node.advertise_addr,
            quic.clone(),
            state.clone(),
            gossip_config,
        );
        let member = Arc::new(Member {
            id,
            raft,
            state,
            quic,
            dir,
            identity: Mutex::new(identity),
            live: Liveness::new(id),
            gossip,
            sandboxes: Arc::new(super::dataplane::Sandboxes::new(
                &dataplane,
                &id.to_string(),
                super::executor::is_root(),
            )),
            tasks: Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&member);
        let tasks = vec![
            gossip_task,
            tokio::spawn(super::orchestrate::orchestrator_loop(
                weak.clone(),
                reschedule_grace,
            )),
            tokio::spawn(super::executor::executor_loop(weak.clone())),
            tokio::spawn(super::dataplane::dataplane_loop(weak.clone(), dataplane)),
            tokio::spawn(liveness_loop(weak.clone())),
            tokio::spawn(super::membership::reconcile_loop(weak)),
        ];
        member.lock_tasks().extend(tasks);
        Ok(member)
    }

    fn lock_tasks(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a task to abort at shutdown.
    pub fn adopt_task(&self, task: JoinHandle<()>) {
        self.lock_tasks().push(task);
    }

    /// Stops everything this member runs.
    pub async fn shutdown(&self) {
        for t in self.lock_tasks().drain(..) {
            t.abort();
        }
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        self.quic.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.quic.wait_idle()).await;
    }

    /// The managers' key, if this node holds it.
    pub fn manager_key(&self) -> Option<[u8; 32]> {
        self.identity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .manager_key
    }

    /// Stores or forgets the managers' key.
    pub fn set_manager_key(&self, key: Option<[u8; 32]>) -> anyhow::Result<()> {
        self.dir.save_manager_key(key.as_ref())?;
        self.identity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .manager_key = key;
        Ok(())
    }

    /// The node's status as seen from here.
    pub fn status(&self, node: NodeId) -> NodeStatus {
        self.live.status(node, Instant::now())
    }

    /// The leader this node knows of.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader.map(NodeId)
    }

    /// Managers reachable from here (this node included) and all managers.
    pub fn manager_reachability(&self, state: &ClusterState) -> (usize, usize) {
        let total = state.managers().count();
        let reachable = state
            .managers()
            .filter(|m| self.status(m.id) == NodeStatus::Ready)
            .count();
        (reachable, total)
    }

    fn no_quorum(&self) -> WriteError {
        let (reachable, total) = self.manager_reachability(&self.state.state());
        WriteError::NoQuorum { reachable, total }
    }

    /// Commits `cmd` through the leader, wherever it is; fails within
    /// [`WRITE_TIMEOUT`] when no leader can commit it.
    pub async fn propose(&self, cmd: Command) -> Result<Outcome, WriteError> {
        let deadline = Instant::now() + WRITE_TIMEOUT;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(self.no_quorum());
            }
            let remaining = deadline - now;
            tracing::debug!(leader = ?self.leader(), elapsed_ms = (WRITE_TIMEOUT - remaining).as_millis() as u64, "propose attempt");
            match self.leader() {
                Some(l) if l == self.id => {
                    match tokio::time::timeout(remaining, self.raft.client_write(cmd.clone())).await
                    {
                        Ok(Ok(resp)) => return resp.data.map_err(WriteError::Refused),
                        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {}
                        Ok(Err(e)) => return Err(WriteError::Other(e.to_string())),
                        Err(_) => return Err(self.no_quorum()),
                    }
                }
                Some(l) => {
                    // Give up on this leader as soon as Raft reports another
                    // one: a dead leader's connection would otherwise hold the
                    // write until the QUIC idle timeout.
                    let req = CtlRequest::Propose(Box::new(cmd.clone()));
                    let forward = self.ctl(l, &req, remaining);
                    tokio::select! {
                        reply = forward => match reply {
                            Ok(CtlReply::Applied(r)) => return r.map_err(WriteError::Refused),
                            Ok(CtlReply::Refused(msg)) => return Err(WriteError::Other(msg)),
                            Ok(_) | Err(_) => {}
                        },
                        () = self.leader_changed_from(l) => continue,
                    }
                }
                None => {}
            }
            // Retry as soon as Raft's view changes (a leader is elected), or
            // after a short pause.
            let mut metrics = self.raft.metrics();
            metrics.borrow_and_update();
            let _ = tokio::time::timeout(Duration::from_millis(50), metrics.changed()).await;
        }
    }

    /// Resolves when Raft reports a leader other than `l` (or none).
    async fn leader_changed_from(&self, l: NodeId) {
        let mut rx = self.raft.metrics();
        while rx.borrow().current_leader == Some(l.0) {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Waits (up to `timeout`) until the local copy of the store satisfies
    /// `ready` — e.g. until a write committed through the leader has been
    /// applied here too. Returns whether it did.
    pub async fn wait_for(&self, timeout: Duration, ready: impl Fn(&ClusterState) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut changes = self.state.changes();
        loop {
            if self.state.read(|d| ready(&d.state)) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let _ = tokio::time::timeout(left, changes.changed()).await;
        }
    }

    /// The address of node `id`: from the store, else from Raft's membership.
    pub fn addr_of(&self, id: NodeId) -> Option<SocketAddr> {
        let from_state = self
            .state
            .read(|d| d.state.nodes.get(&id).map(|n| n.addr.clone()));
        let addr = from_state.or_else(|| {
            self.raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .get_node(&id.0)
                .map(|n: &BasicNode| n.addr.clone())
        })?;
        addr.parse().ok()
    }

    /// One control call to node `id`.
    pub async fn ctl(
        &self,
        id: NodeId,
        req: &CtlRequest,
        timeout: Duration,
    ) -> anyhow::Result<CtlReply> {
        let addr = self
            .addr_of(id)
            .ok_or_else(|| anyhow::anyhow!("no address known for node {id}"))?;
        let bytes = codec::encode(req)?;
        let reply = self.quic.call(addr, id, ALPN_CTL, &bytes, timeout).await?;
        Ok(codec::decode(&reply, MAX_MESSAGE)?)
    }

    /// One liveness round: ping every other node, then fetch or drop the
    /// managers' key as this node's role in the store says.
    async fn ping_round(self: &Arc<Self>) {
        let state = self.state.state();
        let mut round = tokio::task::JoinSet::new();
        for node in state.nodes.values().filter(|n| n.id != self.id) {
            let me = self.clone();
            let id = node.id;
            round.spawn(async move {
                if let Ok(CtlReply::Pong) = me.ctl(id, &CtlRequest::Ping, PING_TIMEOUT).await {
                    me.live.heard(id, Instant::now());
                }
            });
        }
        while round.join_next().await.is_some() {}
        let role = state.nodes.get(&self.id).map(|n| n.role);
        match (role, self.manager_key()) {
            (Some(Role::Manager), None) => self.fetch_manager_key(&state).await,
            (Some(Role::Worker), Some(_)) => {
                if let Err(e) = self.set_manager_key(None) {
                    tracing::warn!(error = %e, "cannot drop the manager key after demotion");
                }
            }
            _ => {}
        }
    }

    async fn fetch_manager_key(&self, state: &ClusterState) {
        for m in state.managers().filter(|m| m.id != self.id) {
            if let Ok(CtlReply::ManagerKey(k)) =
                self.ctl(m.id, &CtlRequest::ManagerKey, PING_TIMEOUT).await
            {
                match self.set_manager_key(Some(k)) {
                    Ok(()) => tracing::info!("received the managers' key after promotion"),
                    Err(e) => tracing::warn!(error = %e, "cannot store the managers' key"),
                }
                return;
            }
        }
    }
}

async fn liveness_loop(member: Weak<Member>) {
    loop {
        let Some(m) = member.upgrade() else { return };
        m.ping_round().await;
        drop(m);
        tokio::time::sleep(PING_INTERVAL).await;
    }
}
