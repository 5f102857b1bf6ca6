//! Drives this node's [`shoal_gossip::Gossip`] core over the QUIC endpoint:
//! feeds it incoming messages, the clock, the store's node list (who may
//! take part, and whom to announce to) and local writes; sends what it
//! produces; publishes its events.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use shoal_gossip::table::{GLOBAL, NETWORKS_TABLE};
use shoal_gossip::{Event, Gossip, GossipConfig, GossipError, MemberInfo, Peer};
use shoal_mesh::observed::{EndpointRecord, TableValue, vouched};
use shoal_mesh::{ClusterState, NodeId};
use shoal_raft::StateHandle;
use tokio::sync::{mpsc, oneshot};

use super::clock::now_ms;
use super::transport::Quic;

/// Messages from peers waiting for the gossip task, at most: beyond, they
/// are dropped (and counted) rather than queued, so a peer that sends
/// faster than this node reads cannot make it hold more.
pub const INBOX_MESSAGES: usize = 4096;
/// Bytes of messages from peers waiting, at most (a stream message may be
/// up to 8 MiB).
pub const INBOX_BYTES: usize = 32 << 20;

/// Requests to the gossip task (from this node; messages from peers go
/// through the bounded inbox, [`GossipHandle::incoming`]).
pub enum GossipCmd {
    /// Write an entry owned by this node.
    Put {
        /// Network.
        network: String,
        /// Table.
        table: String,
        /// Key.
        key: String,
        /// Value.
        value: TableValue,
        /// Result.
        reply: oneshot::Sender<Result<(), GossipError>>,
    },
    /// Delete an entry owned by this node.
    Delete {
        /// Network.
        network: String,
        /// Table.
        table: String,
        /// Key.
        key: String,
        /// Result.
        reply: oneshot::Sender<Result<(), GossipError>>,
    },
    /// Attach to a network.
    Join(String),
    /// Detach from a network.
    Leave(String),
    /// The members as this node sees them.
    Members(oneshot::Sender<Vec<MemberInfo>>),
    /// A diagnostic dump (JSON), optionally of one network.
    Dump(Option<String>, oneshot::Sender<Value>),
    /// Leave the cluster on purpose (others mark this node `left`), then stop.
    LeaveCluster(oneshot::Sender<()>),
    /// This node's key changed (a renewed certificate): sign its entries again.
    Rekey,
    /// The visible endpoints of every network this node is attached to.
    Endpoints(oneshot::Sender<BTreeMap<String, Vec<EndpointRecord>>>),
}

/// What the gossip task reads: its commands and its inbox.
pub struct Receivers {
    /// Commands from this node.
    pub cmds: mpsc::UnboundedReceiver<GossipCmd>,
    /// Messages from peers: the sender (from its certificate) and the bytes.
    pub inbox: mpsc::Receiver<(NodeId, Vec<u8>)>,
}

/// A handle to the gossip task.
#[derive(Clone)]
pub struct GossipHandle {
    tx: mpsc::UnboundedSender<GossipCmd>,
    inbox: mpsc::Sender<(NodeId, Vec<u8>)>,
    /// Bytes waiting in the inbox.
    queued: Arc<std::sync::atomic::AtomicUsize>,
    /// Messages dropped because the inbox was full.
    pub dropped: Arc<std::sync::atomic::AtomicU64>,
    /// Woken when members or table entries change.
    pub changed: Arc<tokio::sync::Notify>,
    /// Woken when a member's state changes (not for entries: what only
    /// follows members, like the leader's orchestrator, is not woken by
    /// every endpoint that moves).
    pub members_changed: Arc<tokio::sync::Notify>,
}

impl GossipHandle {
    /// A handle and the receiving end its commands arrive at (the gossip
    /// task's, or a test's).
    pub fn channel() -> (Self, Receivers) {
        let (tx, cmds) = mpsc::unbounded_channel();
        let (inbox, inbox_rx) = mpsc::channel(INBOX_MESSAGES);
        let handle = GossipHandle {
            tx,
            inbox,
            queued: Default::default(),
            dropped: Default::default(),
            changed: Arc::new(tokio::sync::Notify::new()),
            members_changed: Arc::new(tokio::sync::Notify::new()),
        };
        (
            handle,
            Receivers {
                cmds,
                inbox: inbox_rx,
            },
        )
    }

    /// Queues a message from peer `from` (authenticated by the transport),
    /// or drops and counts it when the inbox is full.
    pub fn incoming(&self, from: NodeId, bytes: Vec<u8>) {
        use std::sync::atomic::Ordering::SeqCst;
        let n = bytes.len();
        let over = self.queued.fetch_add(n, SeqCst) + n > INBOX_BYTES;
        if over || self.inbox.try_send((from, bytes)).is_err() {
            self.queued.fetch_sub(n, SeqCst);
            self.dropped.fetch_add(1, SeqCst);
        }
    }

    /// A message left the inbox.
    fn taken(&self, n: usize) {
        self.queued
            .fetch_sub(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Sends a command (dropped if the task has ended).
    pub fn send(&self, cmd: GossipCmd) {
        let _ = self.tx.send(cmd);
    }

    /// Runs a request that answers on a oneshot channel.
    pub async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> GossipCmd) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx));
        tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .ok()?
            .ok()
    }
}

/// Starts the gossip task for node `id` at `addr`.
pub fn spawn(
    id: NodeId,
    addr: SocketAddr,
    quic: Arc<Quic>,
    state: StateHandle,
    config: GossipConfig,
    keys: Box<dyn shoal_gossip::Keys>,
    live: Arc<super::liveness::Liveness>,
) -> (GossipHandle, tokio::task::JoinHandle<()>) {
    let (handle, rx) = GossipHandle::channel();
    let changed = handle.changed.clone();
    let inbox = handle.clone();
    let me = Peer {
        id,
        addr: addr.to_string().into(),
        generation: now_ms() << 16,
        bump: 0,
    };
    let g = Gossip::new(me, config, rand::random(), now_ms(), keys);
    let task = tokio::spawn(run(g, quic, state, rx, inbox, changed, live));
    (handle, task)
}

/// The live endpoints of every network this node is in, as far as the
/// store vouches for them (`observed::vouched`): a node publishes only its
/// own tasks, under their own names and addresses.
fn vouched_endpoints(g: &Gossip, state: &ClusterState) -> BTreeMap<String, Vec<EndpointRecord>> {
    let mut out: BTreeMap<String, Vec<EndpointRecord>> = BTreeMap::new();
    for net in g.networks() {
        let eps = g
            .snapshot(net)
            .into_iter()
            .filter_map(|(k, v)| match v {
                TableValue::Endpoint(e) => {
                    let writer = g.tables().get(&k)?.owner;
                    vouched(state, net, &k.key, writer, &e).then_some(e)
                }
                _ => None,
            })
            .collect();
        out.insert(net.clone(), eps);
    }
    out
}

/// Lets the store decide who takes part, and introduces us to its managers
/// (all of them when this node knows no live member yet).
fn refresh_from_store(g: &mut Gossip, state: &StateHandle, announce: bool) {
    let me = g.me().id;
    // What it needs of the store, without copying the rest.
    let Some((nodes, managers)) = state.read(|d| {
        let st = &d.state;
        st.cluster.as_ref()?;
        let managers: Vec<(NodeId, String)> = st
            .managers()
            .filter(|n| n.id != me)
            .map(|n| (n.id, n.addr.clone()))
            .collect();
        Some((st.nodes.keys().copied().collect(), managers))
    }) else {
        return;
    };
    g.set_allowed(nodes);
    if !announce {
        return;
    }
    let now = now_ms();
    for (id, addr) in managers {
        g.announce(
            now,
            Peer {
                id,
                addr: addr.into(),
                generation: 0,
                bump: 0,
            },
        );
    }
}

/// How often the store's nodes are compared with gossip's members.
const DIRECTORY_EVERY: Duration = Duration::from_secs(10);

/// The store's nodes other than `me`, as gossip addresses them.
fn store_peers(state: &StateHandle, me: NodeId) -> Vec<Peer> {
    state.read(|d| {
        d.state
            .nodes
            .values()
            .filter(|n| n.id != me)
            .map(|n| Peer {
                id: n.id,
                addr: n.addr.as_str().into(),
                generation: 0,
                bump: 0,
            })
            .collect()
    })
}

/// Whether this node holds no other member live (alive or suspect).
fn is_alone(g: &Gossip) -> bool {
    g.live_count() == 0
}

/// Sends what gossip has to send; returns whether members or entries
/// changed, and whether members did.
fn flush(g: &mut Gossip, quic: &Arc<Quic>, live: &super::liveness::Liveness) -> (bool, bool) {
    while let Some(t) = g.poll_transmit() {
        let Ok(addr) = t.addr.parse::<SocketAddr>() else {
            continue;
        };
        let quic = quic.clone();
        tokio::spawn(async move {
            if let Err(e) = quic
                .gossip(addr, t.to, &t.bytes, t.datagram, Duration::from_secs(2))
                .await
            {
                tracing::trace!(error = %e, to = %t.to, "gossip send failed");
            }
        });
    }
    let (mut changed, mut members) = (false, false);
    while let Some(e) = g.poll_event() {
        changed = true;
        match e {
            Event::Member { node, state } => {
                members = true;
                tracing::info!(%node, ?state, "gossip member");
                live.member(node, state);
            }
            Event::Entry(change) => tracing::debug!(?change, "gossip entry"),
        }
    }
    (changed, members)
}

async fn run(
    mut g: Gossip,
    quic: Arc<Quic>,
    state: StateHandle,
    rx: Receivers,
    inbox: GossipHandle,
    changed: Arc<tokio::sync::Notify>,
    live: Arc<super::liveness::Liveness>,
) {
    let mut changes = state.changes();
    let Receivers {
        mut cmds,
        inbox: mut inbox_rx,
    } = rx;
    refresh_from_store(&mut g, &state, true);
    let mut lonely = tokio::time::interval(Duration::from_secs(2));
    let mut directory = tokio::time::interval(DIRECTORY_EVERY);
    loop {
        let (any, members) = flush(&mut g, &quic, &live);
        if any {
            changed.notify_waiters();
        }
        if members {
            inbox.members_changed.notify_waiters();
        }
        let wait = g.poll_timeout().saturating_sub(now_ms()).min(1_000);
        tokio::select! {
            Some((from, bytes)) = inbox_rx.recv() => {
                inbox.taken(bytes.len());
                if let Err(e) = g.handle_message(now_ms(), from, &bytes) {
                    tracing::debug!(error = %e, "gossip message dropped");
                }
            }
            cmd = cmds.recv() => {
                let Some(cmd) = cmd else { return };
                let now = now_ms();
                match cmd {
                    GossipCmd::Put { network, table, key, value, reply } => {
                        let _ = reply.send(g.put(now, &network, &table, &key, value));
                    }
                    GossipCmd::Delete { network, table, key, reply } => {
                        let _ = reply.send(g.delete(now, &network, &table, &key));
                    }
                    GossipCmd::Join(n) => g.join_network(now, &n),
                    GossipCmd::Leave(n) => g.leave_network(now, &n),
                    GossipCmd::Members(reply) => {
                        let _ = reply.send(g.members());
                    }
                    GossipCmd::Endpoints(reply) => {
                        let _ = reply.send(state.read(|d| vouched_endpoints(&g, &d.state)));
                    }
                    GossipCmd::Dump(network, reply) => {
                        let dropped = inbox.dropped.load(std::sync::atomic::Ordering::SeqCst);
                        let _ = reply.send(dump(&g, &state, network.as_deref(), now, dropped));
                    }
                    GossipCmd::Rekey => g.rekey(now),
                    GossipCmd::LeaveCluster(reply) => {
                        g.leave_cluster(now);
                        flush(&mut g, &quic, &live);
                        // Give the farewell a moment to leave the socket.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        let _ = reply.send(());
                        return;
                    }
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(wait)) => g.handle_timeout(now_ms()),
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                // The first store a joiner receives also names its seeds.
                let alone = is_alone(&g);
                refresh_from_store(&mut g, &state, alone);
            }
            // Nodes of the store gossip does not know are announced to, a
            // few at a time (nothing to look at when it knows them all: the
            // live members are nodes of the store).
            _ = directory.tick() => {
                let nodes = state.read(|d| d.state.nodes.len());
                if g.live_count() + 1 < nodes {
                    let peers = store_peers(&state, g.me().id);
                    g.directory(now_ms(), peers);
                }
            }
            // Alone (a partition healed, a restart), it asks the
            // managers again every 2 s.
            _ = lonely.tick() => {
                if is_alone(&g) {
                    refresh_from_store(&mut g, &state, true);
                }
            }
        }
    }
}

/// `shoal debug gossip`: members and tables, tombstones and hidden entries
/// included, as stable JSON.
fn dump(
    g: &Gossip,
    state: &StateHandle,
    network: Option<&str>,
    now: u64,
    inbox_full: u64,
) -> Value {
    let st = state.state();
    let hostname = |id: NodeId| st.nodes.get(&id).map(|n| n.hostname.clone());
    let members: Vec<Value> = g
        .members()
        .iter()
        .map(|m| {
            json!({
                "node_id": m.node_id.to_string(),
                "hostname": hostname(m.node_id),
                "addr": m.addr,
                "state": m.state,
                "incarnation": m.incarnation,
                "generation": m.generation,
                "last_sync_ms_ago": g.last_sync().get(&m.node_id).map(|t| now.saturating_sub(*t)),
            })
        })
        .collect();
    let mut networks: BTreeMap<String, BTreeMap<String, Vec<Value>>> = BTreeMap::new();
    for (k, e) in g.tables().all() {
        let scope = if k.network == GLOBAL {
            "(global)"
        } else {
            k.network.as_str()
        };
        if network.is_some_and(|n| n != scope) {
            continue;
        }
        networks
            .entry(scope.to_owned())
            .or_default()
            .entry(k.table.clone())
            .or_default()
            .push(json!({
                "key": k.key,
                "owner": e.owner.to_string(),
                "version": e.version,
                "tombstone": e.is_tombstone(),
                "visible": g.tables().visible(k).is_some(),
                "value": e.value,
            }));
    }
    let attached: BTreeSet<&String> = g.networks().iter().collect();
    let mut rejected = g.rejected.clone();
    if inbox_full > 0 {
        rejected.insert("inbox_full".to_owned(), inbox_full);
    }
    json!({
        "node_id": g.me().id.to_string(),
        "attached": attached,
        "members": members,
        "networks": networks,
        "rejected": rejected,
        "global_table": NETWORKS_TABLE,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::SeqCst;

    #[tokio::test]
    async fn a_peer_cannot_make_the_inbox_hold_more_than_its_bounds() {
        let (handle, mut rx) = GossipHandle::channel();
        let peer = NodeId(7);
        // By count: small messages beyond INBOX_MESSAGES are dropped.
        for _ in 0..INBOX_MESSAGES + 10 {
            handle.incoming(peer, vec![0; 8]);
        }
        assert_eq!(handle.dropped.load(SeqCst), 10);
        // Reading makes room again.
        let (from, bytes) = rx.inbox.recv().await.unwrap();
        handle.taken(bytes.len());
        assert_eq!(from, peer);
        handle.incoming(peer, vec![0; 8]);
        assert_eq!(handle.dropped.load(SeqCst), 10);
        while let Ok((_, b)) = rx.inbox.try_recv() {
            handle.taken(b.len());
        }
        assert_eq!(handle.queued.load(SeqCst), 0);
        // By bytes: four 8 MiB messages fill it; the fifth is dropped.
        for _ in 0..5 {
            handle.incoming(peer, vec![0; 8 << 20]);
        }
        assert_eq!(handle.dropped.load(SeqCst), 11);
        assert_eq!(handle.queued.load(SeqCst), INBOX_BYTES);
    }
}
