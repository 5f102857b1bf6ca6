//! The assembly of one swarm member: binds its QUIC endpoint, opens its
//! store, starts Raft and gossip, builds the handles and hands each loop
//! only the ones it uses. It imports the loops; no loop imports it.
//!
//! ```text
//!  loop                  the handles it takes
//!  orchestrate::run      StateHandle, Writer (propose, who leads), GossipHandle, Liveness
//!  membership::run       Raft, StateHandle, Liveness
//!  feed::run             Raft, LogStore (where to start), StateHandle, Quic, Liveness, gossip's change signal
//!  ping::run             StateHandle, Writer (control calls), Liveness, Secrets
//!  executor::run         StateHandle, Writer, Sandboxes (read)
//!  dataplane::run        StateHandle, GossipHandle, Sandboxes (written), a Backend
//!  renewal::run          StateHandle, Writer (control calls), Quic, Trust, SigningHandle, GossipHandle, Secrets
//!  autolock::run         StateHandle, Secrets
//!  peer::PeerHandler     Raft, LogStore (the feed), StateHandle, Writer, GossipHandle, Secrets
//! ```

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal_mesh::{ClusterState, Command, NodeId, Outcome, codec};
use shoal_raft::{
    LogStore, Network, Raft, RaftRpc, RaftRpcReply, RaftTransport, StateHandle, TransportError,
};
use tokio::task::JoinHandle;

use super::autolock::AutolockCtx;
use super::dataplane::DataplaneCtx;
use super::entry_keys::{NodeKeys, SigningHandle};
use super::executor::ExecutorCtx;
use super::feed::FeedCtx;
use super::gossip::GossipHandle;
use super::identity::{Identity, Secrets, StateDir};
use super::liveness::{Liveness, NodeStatus};
use super::membership::MembershipCtx;
use super::orchestrate::OrchestratorCtx;
use super::peer::PeerHandler;
use super::ping::PingCtx;
use super::quota::Quota;
use super::renewal::RenewalCtx;
use super::sandboxes::Sandboxes;
use super::transport::{MAX_MESSAGE, Quic};
use super::trust::Trust;
use super::writer::{Propose, WriteError, Writer};
use shoal_mesh::wire::ALPN_RAFT;

/// A running swarm member: the handles, for the local API, and the tasks
/// of its loops.
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
    /// The node's secrets: its key, the managers' key when it holds it,
    /// the unlock key when autolocked.
    pub keys: Arc<Secrets>,
    /// Ping results.
    pub live: Arc<Liveness>,
    /// The gossip task.
    pub gossip: GossipHandle,
    /// Which task sandboxes the data plane has programmed.
    pub sandboxes: Arc<Sandboxes>,
    /// Writes through the leader.
    pub writer: Writer,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Why the member stopped on its own, if it did: its Raft core ended
    /// while it ran (see [`watch_core`]).
    failed: Mutex<Option<String>>,
    /// Set by [`Member::shutdown`]: the core's end is then expected.
    stopping: std::sync::atomic::AtomicBool,
}

/// What a member whose Raft core ended says, after why it ended.
const CORE_ENDED: &str = "this node's Raft core stopped, so it no longer follows the swarm: its copy of the store is frozen and its loops are stopped (its tasks keep running until it leaves). A former manager whose log holds a committed entry the swarm's does not (one that came back after `swarm init --force-new-cluster` on another manager) ends so, and cannot take the swarm's log without losing that entry. Run `shoal swarm leave --force` on this node, `shoal node rm --force` on a manager for it, then join it again with a token; the daemon's log has the cause";

/// Waits for `member`'s Raft core to end (its metrics channel closes with
/// it): unless the member is being shut down, records why and stops the
/// member's loops, so that it says what happened and what to do instead
/// of going on silently with a frozen store.
async fn watch_core(raft: Raft, member: std::sync::Weak<Member>) {
    let mut metrics = raft.metrics();
    while metrics.changed().await.is_ok() {}
    // Any call now returns how the core ended.
    let why = match raft.with_raft_state(|_| ()).await {
        Err(e) => e.to_string(),
        Ok(()) => "it stopped".to_owned(),
    };
    let Some(m) = member.upgrade() else { return };
    if m.stopping.load(std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let msg = format!("{CORE_ENDED} (the core: {why})");
    tracing::error!("{msg}");
    *m.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg);
    m.stop_loops();
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

/// Opens the store, binds the endpoint (which trusts the store's CAs and
/// refuses its revoked nodes) and starts Raft on it.
async fn open(
    identity: &Identity,
    dir: &StateDir,
    timing: &shoal_raft::RaftTiming,
) -> anyhow::Result<(StateHandle, Trust, Arc<Quic>, Raft, LogStore)> {
    let at_rest = shoal_raft::AtRest::with_key(&identity.raft_key);
    let (log, sm) = shoal_raft::open(&dir.raft(), at_rest)?;
    let state = sm.handle();
    let trust = Trust::of_store(state.clone(), identity.tls.ca_der.clone());
    // Stateless resets keyed by a secret that outlives restarts (the key
    // of the store at rest, through a one-way derivation).
    let quic = Quic::bind_with_reset(
        &identity.tls,
        identity.node.listen_addr,
        trust.clone(),
        &identity.raft_key,
    )?;
    let config = Arc::new(shoal_raft::config(timing).validate()?);
    let id = identity.node.node_id.0;
    let raft = Raft::new(
        id,
        config,
        Network::new(QuicRaft(quic.clone())),
        log.clone(),
        sm,
    )
    .await?;
    Ok((state, trust, quic, raft, log))
}

/// Starts gossip, signing with this node's key; its handle, its task, and
/// the signing pair a renewal replaces.
fn start_gossip(
    identity: &Identity,
    quic: &Arc<Quic>,
    state: &StateHandle,
    trust: Trust,
    config: shoal_gossip::GossipConfig,
    live: Arc<Liveness>,
) -> anyhow::Result<(GossipHandle, JoinHandle<()>, SigningHandle)> {
    let keys = NodeKeys::new(&identity.tls, trust)?;
    let signing = keys.signing();
    let (gossip, task) = super::gossip::spawn(
        identity.node.node_id,
        identity.node.advertise_addr,
        quic.clone(),
        state.clone(),
        config,
        Box::new(keys),
        live,
    );
    Ok((gossip, task, signing))
}

/// What starting a member needs besides its identity and state dir.
pub struct MemberConfig {
    /// Raft's timing.
    pub timing: shoal_raft::RaftTiming,
    /// Gossip's.
    pub gossip: shoal_gossip::GossipConfig,
    /// How long a node is gone before its tasks move.
    pub reschedule_grace: Duration,
    /// The data plane's.
    pub dataplane: super::config::DataplaneConfig,
    /// The store quota, in bytes of encoded state.
    pub quota_bytes: usize,
    /// containerd, for container tasks.
    pub engine: Arc<super::engine::Engine>,
}

impl Member {
    /// Binds the endpoint, opens the store, starts Raft, gossip and the
    /// loops, and serves peers.
    pub async fn start(
        identity: Identity,
        dir: StateDir,
        cfg: MemberConfig,
    ) -> anyhow::Result<Arc<Member>> {
        let id = identity.node.node_id;
        let (state, trust, quic, raft, log) = open(&identity, &dir, &cfg.timing).await?;
        let live = Arc::new(Liveness::new(id));
        let (gossip, gossip_task, signing) = start_gossip(
            &identity,
            &quic,
            &state,
            trust.clone(),
            cfg.gossip,
            live.clone(),
        )?;
        let keys = Arc::new(Secrets::new(dir.clone(), &identity));
        let quota = Arc::new(Quota::new(cfg.quota_bytes));
        let writer = Writer::new(
            id,
            raft.clone(),
            state.clone(),
            quic.clone(),
            live.clone(),
            quota,
        );
        let health = Arc::new(super::health::Health::default());
        let sandboxes = Arc::new(Sandboxes::new(
            &cfg.dataplane,
            &id.to_string(),
            super::executor::is_root(),
        ));
        let stale_voters = Arc::new(super::membership::StaleVoters::default());
        let peers = Arc::new(PeerHandler {
            raft: raft.clone(),
            feed: shoal_raft::feed::FeedSource::new(log.clone()),
            state: state.clone(),
            writer: writer.clone(),
            gossip: gossip.clone(),
            keys: keys.clone(),
            state_dir: dir.0.clone(),
            join_managers: identity.node.join_managers.clone(),
            join_failures: Default::default(),
            stale_voters: stale_voters.clone(),
        });
        let tasks = vec![
            gossip_task,
            tokio::spawn(super::orchestrate::run(OrchestratorCtx {
                id,
                state: state.clone(),
                writer: writer.clone(),
                gossip: gossip.clone(),
                live: live.clone(),
                grace: cfg.reschedule_grace,
            })),
            tokio::spawn(super::executor::run(ExecutorCtx {
                id,
                state: state.clone(),
                writer: writer.clone(),
                sandboxes: sandboxes.clone(),
                state_dir: dir.0.clone(),
                engine: cfg.engine.clone(),
                health: health.clone(),
                wake: Default::default(),
            })),
            tokio::spawn(super::dataplane::run(
                DataplaneCtx {
                    id,
                    state: state.clone(),
                    gossip: gossip.clone(),
                    sandboxes: sandboxes.clone(),
                    health: health.clone(),
                    cfg: cfg.dataplane,
                },
                shoal_netdriver::linux::Linux::new(None),
            )),
            tokio::spawn(super::ping::run(PingCtx {
                id,
                state: state.clone(),
                writer: writer.clone(),
                live: live.clone(),
                keys: keys.clone(),
            })),
            tokio::spawn(super::feed::run(FeedCtx {
                id,
                raft: raft.clone(),
                log,
                state: state.clone(),
                quic: quic.clone(),
                live: live.clone(),
                members_changed: gossip.members_changed.clone(),
                join_via: identity.node.join_via,
            })),
            tokio::spawn(super::membership::tick_as_voter(raft.clone(), id)),
            tokio::spawn(super::membership::run(MembershipCtx {
                id,
                raft: raft.clone(),
                state: state.clone(),
                live: live.clone(),
                stale: stale_voters,
            })),
            tokio::spawn(super::autolock::run(AutolockCtx {
                id,
                state: state.clone(),
                keys: keys.clone(),
            })),
            tokio::spawn(super::renewal::run(RenewalCtx {
                id,
                state: state.clone(),
                writer: writer.clone(),
                quic: quic.clone(),
                trust,
                signing,
                gossip: gossip.clone(),
                keys: keys.clone(),
            })),
            quic.serve(peers),
        ];
        let member = Arc::new(Member {
            id,
            raft,
            state,
            quic,
            dir,
            keys,
            live,
            gossip,
            sandboxes,
            writer,
            tasks: Mutex::new(tasks),
            failed: Mutex::new(None),
            stopping: false.into(),
        });
        let watcher = tokio::spawn(watch_core(member.raft.clone(), Arc::downgrade(&member)));
        member
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(watcher);
        Ok(member)
    }

    /// Why this member stopped on its own (its Raft core ended), if it did.
    pub fn failed(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Aborts the member's loops and closes its endpoint; its tasks keep
    /// running.
    fn stop_loops(&self) {
        self.abort_loops();
        self.quic.close();
    }

    fn abort_loops(&self) {
        let tasks: Vec<JoinHandle<()>> = self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        for t in tasks {
            t.abort();
        }
    }

    /// Stops everything this member runs.
    pub async fn shutdown(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.abort_loops();
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        self.quic.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.quic.wait_idle()).await;
        self.quic.release_port();
    }

    /// The managers' key, if this node holds it.
    pub fn manager_key(&self) -> Option<[u8; 32]> {
        self.keys.get()
    }

    /// The node's status as seen from here.
    pub fn status(&self, node: NodeId) -> NodeStatus {
        self.live.status(node, Instant::now())
    }

    /// The leader this node knows of.
    pub fn leader(&self) -> Option<NodeId> {
        self.writer.leader()
    }

    /// Managers reachable from here (this node included) and all managers.
    pub fn manager_reachability(&self, state: &ClusterState) -> (usize, usize) {
        self.writer.manager_reachability(state)
    }

    /// Commits `cmd` through the leader, wherever it is.
    pub async fn propose(&self, cmd: Command) -> Result<Outcome, WriteError> {
        self.writer.propose(cmd).await
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
}
