//! The gossip node, sans-IO: SWIM membership (foca) plus the tables, their
//! push and anti-entropy. Time comes in as `now_ms`, bytes come in through
//! [`Gossip::handle_message`], and what to send, when to wake up and what
//! changed come out through `poll_*`.
//!
//! ```text
//!  handle_message(now, from, bytes) ─┐            ┌─► poll_transmit()  → bytes for a peer
//!  handle_timeout(now) ──────────────┼─► Gossip ──┼─► poll_timeout()   → next wake-up
//!  put / delete / join / leave ──────┘            └─► poll_event()     → entry and member changes
//! ```

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};
use std::num::{NonZeroU8, NonZeroUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foca::{Foca, NoCustomBroadcast, Notification, PostcardCodec, Runtime, Timer};

use crate::swim::{SignedCodec, SwimTrust};
use rand10::rngs::SmallRng;
use rand10::seq::IteratorRandom;
use rand10::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use shoal_mesh::NodeId;
use shoal_mesh::codec;
use shoal_mesh::observed::TableValue;

use crate::keys::Keys;
use crate::message::{MAX_DATAGRAM, MAX_STREAM_MESSAGE, Message, TableMessage};
use crate::peer::Peer;
use crate::table::{
    Change, Entry, EntryKey, GLOBAL, NETWORKS_TABLE, SharedEntry, SharedKey, Tables,
    differing_owners, signed_bytes,
};

/// How far ahead of this node's clock an entry's version may be (versions
/// are `ms << 16`): more is refused, so that nobody can pin an entry with a
/// version its owner could never win back.
pub const MAX_CLOCK_AHEAD_MS: u64 = 5 * 60 * 1000;

/// Networks of at most this many other members get a write pushed to
/// every member by its owner; larger ones spread it as an epidemic.
pub const DIRECT_PUSH_MAX: usize = 32;

/// How many members a node sends a new entry to in a network of `n` other
/// members, when it spreads as an epidemic: ln(n) + 3, so that every member
/// has it with high probability (each member misses it with a probability
/// of about e^-fanout) while a node's sends per entry stay logarithmic.
/// Pure.
pub fn push_fanout(n: usize) -> usize {
    let ln = (n.max(1) as f64).ln().ceil() as usize;
    (ln + 3).min(n)
}

/// Most networks one anti-entropy round syncs (besides the global scope):
/// a node on more takes them in turns, so that its idle work per second
/// does not grow with the networks it is on.
pub const SYNC_NETWORKS_PER_ROUND: usize = 4;

/// The networks an anti-entropy round syncs, from `networks` (in order),
/// starting at position `cursor`: all of them when there are at most
/// [`SYNC_NETWORKS_PER_ROUND`], else that many in turn; and where the next
/// round starts. Pure.
pub fn sync_round(networks: &BTreeSet<String>, cursor: usize) -> (Vec<String>, usize) {
    let n = networks.len();
    if n <= SYNC_NETWORKS_PER_ROUND {
        return (networks.iter().cloned().collect(), 0);
    }
    let start = cursor % n;
    let round = networks
        .iter()
        .cycle()
        .skip(start)
        .take(SYNC_NETWORKS_PER_ROUND)
        .cloned()
        .collect();
    (round, (start + SYNC_NETWORKS_PER_ROUND) % n)
}

/// Most nodes of the directory one [`Gossip::directory`] call announces to.
pub const DIRECTORY_ANNOUNCES: usize = 8;

/// How long before [`Gossip::directory`] announces to the same node again.
pub const DIRECTORY_RETRY_MS: u64 = 30_000;

/// How many members each node passes a write on to, along its owner's
/// broadcast tree ([`tree_children`]), in a network that spreads writes.
pub const TREE_FANOUT: usize = 6;

/// Where node `me` passes a write of `owner` on, in a network whose
/// members (as `me` sees them, both included) are `members`: `owner`'s
/// broadcast tree orders the members as a ring by ID starting at the
/// owner, and the member at position p passes to those at p·k+1 … p·k+k.
/// When members' views agree every member gets the write exactly once,
/// after about log_k(n) hops, and no node sends it more than `k` times;
/// where they disagree (a member just joined or died) some get it twice
/// and some by anti-entropy. Each owner's tree is the ring turned to start
/// at it, so every member stands at every position once over the owners'
/// trees: with owners writing alike, each member passes on as much as any
/// other (with a random place in each tree, the busiest passed on about
/// 1.5 times the mean). `None` when `me` or `owner` is not among
/// `members`. Pure.
pub fn tree_children(
    owner: NodeId,
    me: NodeId,
    members: &[NodeId],
    k: usize,
) -> Option<Vec<NodeId>> {
    let mut ring: Vec<NodeId> = members.to_vec();
    ring.sort_unstable();
    ring.dedup();
    let start = ring.binary_search(&owner).ok()?;
    let at = ring.binary_search(&me).ok()?;
    // `me`'s position in the owner's tree.
    let pos = (at + ring.len() - start) % ring.len();
    let first = pos.saturating_mul(k).saturating_add(1);
    let last = first.saturating_add(k).min(ring.len());
    Some(
        (first..last)
            .map(|p| ring[(start + p) % ring.len()])
            .collect(),
    )
}

/// The member that node `me` probes in probe period `round` (the time
/// over the probe period, the same on every node give or take clock skew),
/// in a swarm whose live members as `me` sees them, itself included, are
/// `ring`, sorted by ID: the one `1 + round mod (n − 1)` places after it.
/// Each period every member probes another and, while views agree, is
/// probed by exactly one; over n − 1 periods each probes every other once.
/// A member dies unprobed for at most one period, where with each choosing
/// at random it went unprobed for k periods with a chance of e^-k (1 % at
/// 4.6 periods: the tail of failure detection). `None` when `me` is alone
/// or not in `ring`. Pure.
pub fn probe_target(ring: &[NodeId], me: NodeId, round: u64) -> Option<NodeId> {
    let n = ring.len();
    if n < 2 {
        return None;
    }
    let at = ring.binary_search(&me).ok()?;
    let offset = 1 + (round % (n as u64 - 1)) as usize;
    Some(ring[(at + offset) % n])
}

/// How many times each member passes on a membership update (a death, an
/// arrival) that it learned: ln(n) + 7 in a swarm of n. A member gets about
/// that many copies from random others, and misses all of them with a
/// probability of about e^-t (a little more with lost datagrams); one that
/// misses a death learns it only when it probes the dead node itself, every
/// n probe periods. At 5 % loss the chance that any of n members misses an
/// update stays below about 1 in 500 up to 5 000 members. (foca's default,
/// 4·log10(n + 1), gives 8 at 100 members: one crash in 30 left a member
/// unaware for 26 s in the simulation.) Pure.
pub fn max_transmissions(cluster_size: u32) -> u8 {
    let t = (f64::from(cluster_size.max(2))).ln() + 7.0;
    t.ceil().min(f64::from(u8::MAX)) as u8
}

/// Timing and limits. The defaults aim at detecting a dead node on a LAN
/// within about 2 s with few false positives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GossipConfig {
    /// How often each member probes one other member.
    pub probe_period_ms: u64,
    /// How long a direct probe may take before indirect probes start.
    pub probe_rtt_ms: u64,
    /// How many members are asked to probe indirectly.
    pub indirect_probes: usize,
    /// How long a suspect has to refute before it is declared dead.
    pub suspect_to_down_ms: u64,
    /// How often membership updates are gossiped to `gossip_fanout` members.
    pub gossip_interval_ms: u64,
    /// Members per gossip round.
    pub gossip_fanout: usize,
    /// How often each network runs anti-entropy with one random member.
    pub sync_interval_ms: u64,
    /// How long tombstones are kept.
    pub tombstone_ttl_ms: u64,
    /// How long a dead owner's hidden entries are kept in case it returns.
    pub dead_owner_ttl_ms: u64,
    /// Expected cluster size (tunes retransmissions).
    pub cluster_size_hint: u32,
}

impl Default for GossipConfig {
    fn default() -> Self {
        GossipConfig {
            probe_period_ms: 400,
            probe_rtt_ms: 150,
            indirect_probes: 6,
            suspect_to_down_ms: 800,
            gossip_interval_ms: 150,
            gossip_fanout: 3,
            sync_interval_ms: 1000,
            tombstone_ttl_ms: 300_000,
            dead_owner_ttl_ms: 600_000,
            cluster_size_hint: 32,
        }
    }
}

impl GossipConfig {
    fn foca(&self) -> foca::Config {
        let n = std::num::NonZeroU32::new(self.cluster_size_hint.max(2))
            .unwrap_or(std::num::NonZeroU32::MIN);
        let mut c = foca::Config::new_lan(n);
        c.probe_period = Duration::from_millis(self.probe_period_ms);
        c.probe_rtt = Duration::from_millis(self.probe_rtt_ms);
        c.num_indirect_probes =
            NonZeroUsize::new(self.indirect_probes.max(1)).unwrap_or(NonZeroUsize::MIN);
        c.suspect_to_down_after = Duration::from_millis(self.suspect_to_down_ms);
        c.max_packet_size = NonZeroUsize::new(MAX_DATAGRAM - 16).unwrap_or(NonZeroUsize::MIN);
        c.max_transmissions =
            NonZeroU8::new(max_transmissions(self.cluster_size_hint)).unwrap_or(NonZeroU8::MIN);
        c.notify_down_members = true;
        c.remove_down_after = Some(Duration::from_millis(self.dead_owner_ttl_ms));
        c.periodic_gossip = Some(foca::PeriodicParams {
            frequency: Duration::from_millis(self.gossip_interval_ms),
            num_members: NonZeroUsize::new(self.gossip_fanout.max(1)).unwrap_or(NonZeroUsize::MIN),
        });
        c.periodic_announce = Some(foca::PeriodicParams {
            frequency: Duration::from_secs(10),
            num_members: NonZeroUsize::MIN,
        });
        c.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: Duration::from_secs(5),
            num_members: NonZeroUsize::new(2).unwrap_or(NonZeroUsize::MIN),
        });
        c
    }
}

/// A member's liveness.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Answers probes.
    Alive,
    /// Missed probes; may still refute.
    Suspect,
    /// Declared dead; its entries are hidden.
    Dead,
    /// Left on purpose.
    Left,
}

/// A member as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MemberInfo {
    /// Node ID.
    pub node_id: NodeId,
    /// Address.
    pub addr: String,
    /// Liveness.
    pub state: MemberState,
    /// SWIM incarnation.
    pub incarnation: u16,
    /// Process generation.
    pub generation: u64,
}

/// Something the rest of the node should know.
// Events are short-lived and mostly `Entry`; boxing would only add allocations.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A visible table change.
    Entry(Change),
    /// A member's liveness changed.
    Member {
        /// The node.
        node: NodeId,
        /// Its new state.
        state: MemberState,
    },
}

/// Bytes to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// The peer.
    pub to: NodeId,
    /// Its address.
    pub addr: Arc<str>,
    /// The encoded [`Message`].
    pub bytes: Vec<u8>,
    /// SWIM traffic (fits a datagram, may be lost); otherwise a stream.
    pub datagram: bool,
}

/// Why a local operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GossipError {
    /// Writing to a network this node is not attached to.
    #[error("this node is not attached to network `{0}`")]
    NotAttached(String),
    /// The table name is reserved or empty.
    #[error("invalid table `{0}`: use `endpoints` or `vteps`")]
    BadTable(String),
}

/// Why an incoming message was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// The sender is not a node of the store.
    #[error("node {0} is not a member of the swarm")]
    NotAllowed(NodeId),
    /// Undecodable bytes.
    #[error("malformed gossip message: {0}")]
    Malformed(String),
    /// The sender's `networks` entry is not its own.
    #[error("node {0} sent another node's network list")]
    ForgedSender(NodeId),
    /// An entry for a network the sender or this node is not in.
    #[error(
        "node {sender} sent entries for network `{network}`, which it or this node is not attached to"
    )]
    NotInNetwork {
        /// The sender.
        sender: NodeId,
        /// The network.
        network: String,
    },
}

/// What this node has sent a peer since the peer's process started (its
/// generation): the version of this node's `networks` entry, and the
/// owners whose certificates it sent. A table message carries only what
/// the peer lacks; anti-entropy replies carry all of it, so whatever a lost
/// message took with it is sent again when the peer's digest differs.
///
/// Kept for each peer this node sent a network's message to (a
/// global-scope message to any other peer leaves none): small, and
/// without a heap allocation for a peer sent only this node's own
/// certificate.
#[derive(Default)]
struct SentTo {
    generation: u64,
    networks_version: Option<u64>,
    /// Whether it was sent this node's own certificate.
    my_cert: bool,
    /// Other owners whose certificates it was sent, sorted.
    certs: Vec<NodeId>,
}

impl SentTo {
    fn has_cert(&self, owner: NodeId, me: NodeId) -> bool {
        if owner == me {
            self.my_cert
        } else {
            self.certs.binary_search(&owner).is_ok()
        }
    }

    fn add_cert(&mut self, owner: NodeId, me: NodeId) {
        if owner == me {
            self.my_cert = true;
        } else if let Err(i) = self.certs.binary_search(&owner) {
            self.certs.insert(i, owner);
        }
    }

    fn forget_cert(&mut self, owner: NodeId, me: NodeId) {
        if owner == me {
            self.my_cert = false;
        } else if let Ok(i) = self.certs.binary_search(&owner) {
            self.certs.remove(i);
        }
    }
}

#[derive(Clone, Debug)]
struct Tracked {
    peer: Peer,
    dead_since_ms: Option<u64>,
}

enum Note {
    Up(Peer),
    Down(Peer),
    Renamed(Peer),
}

#[derive(Default)]
struct Rt {
    sends: Vec<(Peer, Vec<u8>)>,
    timers: Vec<(Timer<Peer>, Duration)>,
    notes: Vec<Note>,
}

impl Runtime<Peer> for Rt {
    fn notify(&mut self, notification: Notification<'_, Peer>) {
        match notification {
            Notification::MemberUp(p) => self.notes.push(Note::Up(p.clone())),
            Notification::MemberDown(p) => self.notes.push(Note::Down(p.clone())),
            Notification::Rename(_, new) => self.notes.push(Note::Renamed(new.clone())),
            _ => {}
        }
    }

    fn send_to(&mut self, to: Peer, data: &[u8]) {
        self.sends.push((to, data.to_vec()));
    }

    fn submit_after(&mut self, event: Timer<Peer>, after: Duration) {
        self.timers.push((event, after));
    }
}

/// One node's gossip state machine.
pub struct Gossip {
    me: Peer,
    config: GossipConfig,
    foca: Foca<Peer, SignedCodec, SmallRng, NoCustomBroadcast>,
    rng: SmallRng,
    tables: Tables,
    networks: BTreeSet<String>,
    clock: u64,
    now_ms: u64,
    timers: BinaryHeap<Reverse<(u64, u64)>>,
    timer_events: HashMap<u64, Timer<Peer>>,
    timer_seq: u64,
    /// SWIM's periodic gossip timers that came due with nothing to pass on,
    /// with when they were due: foca would only set them again (an idle
    /// node would wake every `gossip_interval_ms` for nothing). Set again
    /// on the same grid once there is something ([`Self::unpark_gossip`]).
    parked_gossip: Vec<(u64, Timer<Peer>)>,
    members: BTreeMap<NodeId, Tracked>,
    /// The tracked members that are down, by when: what expires is found
    /// without a walk over every member, and how many are live is known.
    down: BTreeSet<(u64, NodeId)>,
    /// The tracked members' IDs in no particular order, to pick one at
    /// random without a walk over all of them.
    order: Vec<NodeId>,
    /// Counts changes to members' liveness.
    members_gen: u64,
    /// The live members and this node by ID, as of `members_gen` (the
    /// first): the ring of [`probe_target`].
    ring: (u64, Vec<NodeId>),
    /// Each network's live members as last listed, while neither
    /// `members_gen` nor the tables' index of attachments changed since
    /// (`listed_at`): a message does not list its network again.
    listed: HashMap<String, Vec<NodeId>>,
    listed_at: (u64, u64),
    /// This node's children in each owner's broadcast tree of each
    /// network ([`tree_children`]), kept as long as `listed`.
    trees: HashMap<String, HashMap<NodeId, Option<Vec<NodeId>>>>,
    /// This node's own `networks` entry, sent with table messages.
    my_networks: Option<SharedEntry>,
    /// What each peer was sent already.
    sent: HashMap<NodeId, SentTo>,

    /// Nodes of the directory announced to lately ([`Gossip::directory`]).
    directory_tried: BTreeMap<NodeId, u64>,
    allowed: Option<BTreeSet<NodeId>>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    next_sync_ms: u64,
    /// Where the next anti-entropy round starts among the networks.
    sync_cursor: usize,
    last_sync: BTreeMap<NodeId, u64>,
    /// Counts of dropped messages and entries, by reason (for diagnostics).
    pub rejected: BTreeMap<String, u64>,
    /// Keys, owners' certificates and members' signed claims, shared with
    /// the SWIM codec.
    trust: Arc<Mutex<SwimTrust>>,
}

/// What a node of a formed swarm holds of another ([`Gossip::preload`]).
#[derive(Clone)]
pub(crate) struct Credentials {
    peer: Peer,
    cert: Arc<[u8]>,
    claim: Vec<u8>,
    networks: Option<SharedEntry>,
}

/// Owners' certificates, as a table message carries them.
type Certs = Vec<(NodeId, Arc<[u8]>)>;

/// Gives back what a drained queue grew to in a burst (a swarm's worth of
/// members coming up at once), so that an idle node holds little.
fn shrink_idle<T>(q: &mut VecDeque<T>) {
    if q.is_empty() && q.capacity() > 64 {
        q.shrink_to(16);
    }
}

fn encode(m: &Message) -> Vec<u8> {
    codec::encode(m).unwrap_or_default()
}

impl Gossip {
    /// A node `me` that knows nobody yet, signing its entries and checking
    /// others' with `keys`. `seed` drives its random choices.
    pub fn new(
        me: Peer,
        config: GossipConfig,
        seed: u64,
        now_ms: u64,
        keys: Box<dyn Keys>,
    ) -> Self {
        let trust = Arc::new(Mutex::new(SwimTrust::new(me.id, keys)));
        let foca = Foca::new(
            me.clone(),
            config.foca(),
            SmallRng::seed_from_u64(seed),
            SignedCodec(trust.clone()),
        );
        let mut g = Gossip {
            clock: me.generation,
            tables: Tables::new(me.id),
            me,
            foca,
            rng: SmallRng::seed_from_u64(seed ^ 0x5eed),
            networks: BTreeSet::new(),
            now_ms,
            timers: BinaryHeap::new(),
            timer_events: HashMap::new(),
            parked_gossip: Vec::new(),
            timer_seq: 0,
            members: BTreeMap::new(),
            down: BTreeSet::new(),
            order: Vec::new(),
            members_gen: 0,
            ring: (u64::MAX, Vec::new()),
            listed: HashMap::new(),
            listed_at: (0, 0),
            trees: HashMap::new(),
            my_networks: None,
            sent: HashMap::new(),
            directory_tried: BTreeMap::new(),
            allowed: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            next_sync_ms: now_ms + config.sync_interval_ms,
            sync_cursor: 0,
            last_sync: BTreeMap::new(),
            rejected: BTreeMap::new(),
            trust,
            config,
        };
        g.write_networks_record();
        g
    }

    fn trust(&self) -> std::sync::MutexGuard<'_, SwimTrust> {
        self.trust.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies the SWIM claims that waited for their subjects'
    /// certificates, and counts the updates the codec refused.
    fn after_swim_trust(&mut self) {
        let (ready, refused) = {
            let mut t = self.trust();
            (t.ready(), std::mem::take(&mut t.refused))
        };
        for (why, n) in refused {
            *self.rejected.entry(why.to_owned()).or_default() += n;
        }
        if !ready.is_empty() {
            self.run(|f, rt| f.apply_many(ready.into_iter(), true, rt));
        }
    }

    /// This node's identity.
    pub fn me(&self) -> &Peer {
        &self.me
    }

    /// Networks this node is attached to.
    pub fn networks(&self) -> &BTreeSet<String> {
        &self.networks
    }

    /// The tables (all entries, for diagnostics).
    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    /// When this node last completed anti-entropy with each peer.
    pub fn last_sync(&self) -> &BTreeMap<NodeId, u64> {
        &self.last_sync
    }

    fn next_version(&mut self) -> u64 {
        self.clock = (self.clock + 1).max(self.now_ms << 16);
        self.clock
    }

    fn run(
        &mut self,
        f: impl FnOnce(
            &mut Foca<Peer, SignedCodec, SmallRng, NoCustomBroadcast>,
            &mut Rt,
        ) -> Result<(), foca::Error>,
    ) {
        let mut rt = Rt::default();
        if let Err(e) = f(&mut self.foca, &mut rt) {
            tracing::debug!(error = %e, "foca");
        }
        for (to, data) in rt.sends {
            self.transmits.push_back(Transmit {
                to: to.id,
                addr: to.addr.clone(),
                bytes: encode(&Message::Swim(data)),
                datagram: true,
            });
        }
        for (timer, after) in rt.timers {
            self.add_timer(self.now_ms + after.as_millis() as u64, timer);
        }
        self.unpark_gossip();
        for note in rt.notes {
            match note {
                Note::Up(p) => self.member_up(p),
                Note::Down(p) => self.member_down(p),
                Note::Renamed(new) => {
                    let alive = self.foca.iter_members().any(|m| m.id() == &new);
                    if alive {
                        self.member_up(new);
                    } else {
                        self.member_down(new);
                    }
                }
            }
        }
    }

    fn emit(&mut self, changes: Vec<Change>) {
        self.events.extend(changes.into_iter().map(Event::Entry));
    }

    fn member_up(&mut self, p: Peer) {
        if p.id == self.me.id || !self.is_allowed(p.id) {
            return;
        }
        let newer_generation = self
            .members
            .get(&p.id)
            .is_some_and(|t| t.peer.generation < p.generation);
        if newer_generation {
            let purged = self.tables.purge_owner_before(p.id, p.generation);
            self.emit(purged);
        }
        let before = self.members.get(&p.id).map(|t| t.dead_since_ms);
        let was_dead = before.is_none_or(|d| d.is_some());
        match before {
            Some(Some(since)) => {
                self.down.remove(&(since, p.id));
            }
            Some(None) => {}
            None => self.order.push(p.id),
        }
        self.members_gen += 1;
        self.members.insert(
            p.id,
            Tracked {
                peer: p.clone(),
                dead_since_ms: None,
            },
        );
        let shown = self.tables.set_live(p.id, true);
        self.emit(shown);
        if was_dead {
            self.events.push_back(Event::Member {
                node: p.id,
                state: MemberState::Alive,
            });
        }
        // Tell the newcomer at once which networks this node is in (every
        // table message carries that). A full digest here would cost every
        // node O(n) bytes per newcomer; anti-entropy brings the rest.
        self.send_table(
            p.id,
            TableMessage::Entries {
                network: GLOBAL.to_owned(),
                entries: Vec::new(),
            },
        );
    }

    fn member_down(&mut self, p: Peer) {
        let current = self.members.get(&p.id).is_some_and(|t| t.peer == p);
        if !current {
            return;
        }
        let now = self.now_ms;
        if let Some(t) = self.members.get_mut(&p.id)
            && t.dead_since_ms.is_none()
        {
            t.dead_since_ms = Some(now);
            self.members_gen += 1;
            self.down.insert((now, p.id));
            let hidden = self.tables.set_live(p.id, false);
            self.emit(hidden);
            let state = self.state_of(p.id);
            self.events.push_back(Event::Member { node: p.id, state });
        }
    }

    fn is_allowed(&self, id: NodeId) -> bool {
        self.allowed.as_ref().is_none_or(|a| a.contains(&id))
    }

    /// Restricts gossip to these nodes (the store's nodes). Others' messages
    /// are dropped, and a node no longer allowed is treated as dead. Their
    /// number sizes SWIM's retransmissions ([`max_transmissions`]).
    pub fn set_allowed(&mut self, allowed: BTreeSet<NodeId>) {
        let size = u32::try_from(allowed.len()).unwrap_or(u32::MAX);
        if max_transmissions(size) != max_transmissions(self.config.cluster_size_hint) {
            self.config.cluster_size_hint = size;
            if let Err(e) = self.foca.set_config(self.config.foca()) {
                tracing::warn!(error = %e, "SWIM's retransmissions not resized");
            }
        }
        let gone: Vec<Peer> = self
            .members
            .values()
            .filter(|t| !allowed.contains(&t.peer.id))
            .map(|t| t.peer.clone())
            .collect();
        // SWIM members learned while the store did not list them yet (their
        // `MemberUp` was dropped then): up now, or never, since SWIM will
        // not tell again.
        let known: Vec<Peer> = self
            .foca
            .iter_members()
            .map(|m| m.id().clone())
            .filter(|p| allowed.contains(&p.id) && !self.members.contains_key(&p.id))
            .collect();
        self.allowed = Some(allowed);
        for p in gone {
            self.member_down(p);
        }
        for p in known {
            self.member_up(p);
        }
    }

    /// The swarm's directory (the store's nodes and addresses): a node
    /// listed there that this node does not track, or tracks as dead while
    /// the directory still lists it, is announced to, at most
    /// [`DIRECTORY_ANNOUNCES`] per call and each at most once per
    /// [`DIRECTORY_RETRY_MS`]. SWIM spreads a member's arrival for a
    /// limited number of rounds; a node that joined after it, or whose
    /// copy of the claim waited for a certificate and was then outrun,
    /// would otherwise learn that member only when it happens to probe
    /// this node (every n probe periods in a swarm of n) or turns up in an
    /// announcement's sample. Returns how many it announced to.
    pub fn directory(&mut self, now_ms: u64, peers: impl IntoIterator<Item = Peer>) -> usize {
        self.now_ms = self.now_ms.max(now_ms);
        self.directory_tried
            .retain(|_, at| now_ms < at.saturating_add(DIRECTORY_RETRY_MS));
        let unknown: Vec<Peer> = peers
            .into_iter()
            .filter(|p| p.id != self.me.id && self.is_allowed(p.id))
            .filter(|p| {
                self.members
                    .get(&p.id)
                    .is_none_or(|t| t.dead_since_ms.is_some())
            })
            .filter(|p| !self.directory_tried.contains_key(&p.id))
            .take(DIRECTORY_ANNOUNCES)
            .collect();
        for p in &unknown {
            self.directory_tried.insert(p.id, now_ms);
            self.run(|f, rt| f.announce(p.clone(), rt));
        }
        unknown.len()
    }

    /// What the other nodes of a formed swarm hold of this one: its
    /// identity, certificate, signed claim to be alive at incarnation 0
    /// (a node that was never suspected) and `networks` entry.
    pub(crate) fn credentials(&self) -> Credentials {
        let mut t = self.trust();
        Credentials {
            cert: Arc::from(t.keys.cert()),
            claim: t.own_claim(&self.me, 0),
            peer: self.me.clone(),
            networks: self.my_networks.clone(),
        }
    }

    /// Takes `members` as a node of a formed swarm holds them, with
    /// nothing sent: their certificates and signed claims (checked), their
    /// `networks` entries (checked and merged as a table message's), and
    /// each alive in SWIM without passing it on — what SWIM's rounds of
    /// their arrivals and their welcome messages would have brought once
    /// the swarm settled. Returns how many were refused (a claim or entry
    /// that did not check out). For the simulator, which starts large
    /// swarms formed ([`crate::sim::Sim::start_formed`]): forming one by
    /// the protocol costs O(n²) messages, each arrival passed on ln(n) + 7
    /// times.
    pub(crate) fn preload(&mut self, now_ms: u64, members: &[Credentials]) -> usize {
        self.now_ms = self.now_ms.max(now_ms);
        let me = self.me.id;
        let members: Vec<&Credentials> = members.iter().filter(|c| c.peer.id != me).collect();
        let mut refused = 0;
        let mut alive = Vec::with_capacity(members.len());
        {
            let mut t = self.trust();
            for c in &members {
                if t.preload(&c.peer, 0, c.cert.clone(), &c.claim) {
                    alive.push(foca::Member::alive(c.peer.clone()));
                } else {
                    refused += 1;
                }
            }
        }
        let none = BTreeMap::new();
        for c in &members {
            if let Some(e) = &c.networks {
                let key = crate::share::share(Arc::new(networks_key(c.peer.id)));
                if e.owner != c.peer.id
                    || self
                        .merge_remote(c.peer.id, key, e.clone(), &none)
                        .is_none()
                {
                    refused += 1;
                }
            }
        }
        // Each `MemberUp` sends the newcomer a welcome (this node's
        // `networks` entry and certificate): in a formed swarm, sent long
        // ago. It leaves no record ([`SentTo`]), so dropping it is all.
        let queued = self.transmits.len();
        self.run(|f, rt| f.apply_many(alive.into_iter(), false, rt));
        self.transmits.truncate(queued);
        refused
    }

    /// Introduces this node to `peer` (a seed).
    pub fn announce(&mut self, now_ms: u64, peer: Peer) {
        self.now_ms = self.now_ms.max(now_ms);
        if peer.id == self.me.id {
            return;
        }
        self.run(|f, rt| f.announce(peer, rt));
    }

    /// The next time [`Gossip::handle_timeout`] wants to run.
    pub fn poll_timeout(&self) -> u64 {
        let timer = self.timers.peek().map(|Reverse((at, _))| *at);
        timer.map_or(self.next_sync_ms, |t| t.min(self.next_sync_ms))
    }

    /// Next bytes to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        let t = self.transmits.pop_front();
        if t.is_none() {
            shrink_idle(&mut self.transmits);
        }
        t
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        let e = self.events.pop_front();
        if e.is_none() {
            shrink_idle(&mut self.events);
        }
        e
    }

    fn add_timer(&mut self, at: u64, timer: Timer<Peer>) {
        self.timer_seq += 1;
        self.timers.push(Reverse((at, self.timer_seq)));
        self.timer_events.insert(self.timer_seq, timer);
    }

    /// Sets the parked periodic gossip timers again once SWIM has updates
    /// to pass on, at the next time they would have come due had they run
    /// all along (foca gossips on its timer only when it has updates, so
    /// the skipped ones did nothing: the same packets, at the same times).
    fn unpark_gossip(&mut self) {
        if self.parked_gossip.is_empty() || self.foca.updates_backlog() == 0 {
            return;
        }
        let every = self.config.gossip_interval_ms.max(1);
        for (due, timer) in std::mem::take(&mut self.parked_gossip) {
            let missed = self.now_ms.saturating_sub(due).div_ceil(every).max(1);
            self.add_timer(due + missed * every, timer);
        }
    }

    /// Runs what is due at `now_ms`: SWIM timers, anti-entropy, reaping.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        while let Some(Reverse((at, seq))) = self.timers.peek().copied() {
            if at > self.now_ms {
                break;
            }
            self.timers.pop();
            if let Some(t) = self.timer_events.remove(&seq) {
                if matches!(t, Timer::PeriodicGossip(_)) && self.foca.updates_backlog() == 0 {
                    self.parked_gossip.push((at, t));
                    continue;
                }
                if matches!(t, Timer::ProbeRandomMember(_))
                    && let Some(target) = self.scheduled_probe()
                {
                    self.foca.probe_next(target);
                }
                self.run(|f, rt| f.handle_timer(t, rt));
            }
        }
        if self.now_ms >= self.next_sync_ms {
            self.next_sync_ms = self.now_ms + self.config.sync_interval_ms;
            let (round, next) = sync_round(&self.networks, self.sync_cursor);
            self.sync_cursor = next;
            let scopes: Vec<String> = std::iter::once(GLOBAL.to_owned()).chain(round).collect();
            for net in scopes {
                let peer = if net == GLOBAL {
                    self.random_live_member()
                } else {
                    self.members_in(&net).into_iter().choose(&mut self.rng)
                };
                if let Some(peer) = peer {
                    self.send_digest(peer, &net);
                }
            }
            self.tables.reap(self.now_ms);
            let ttl = self.config.dead_owner_ttl_ms;
            while let Some(&(since, id)) = self.down.first()
                && self.now_ms >= since.saturating_add(ttl)
            {
                self.down.pop_first();
                self.members.remove(&id);
                self.sent.remove(&id);
                self.members_gen += 1;
                if let Some(i) = self.order.iter().position(|m| *m == id) {
                    self.order.swap_remove(i);
                }
                self.tables.purge_owner_before(id, u64::MAX);
            }
        }
    }

    /// The member this node probes now, on the schedule all members
    /// share ([`probe_target`]); `None` when alone.
    fn scheduled_probe(&mut self) -> Option<Peer> {
        if self.ring.0 != self.members_gen {
            let mut ring: Vec<NodeId> = self
                .members
                .iter()
                .filter(|(_, t)| t.dead_since_ms.is_none())
                .map(|(id, _)| *id)
                .collect();
            ring.push(self.me.id);
            ring.sort_unstable();
            self.ring = (self.members_gen, ring);
        }
        let round = self.now_ms / self.config.probe_period_ms.max(1);
        let id = probe_target(&self.ring.1, self.me.id, round)?;
        self.members.get(&id).map(|t| t.peer.clone())
    }

    /// How many members this node tracks as live (not itself).
    pub fn live_count(&self) -> usize {
        self.members.len().saturating_sub(self.down.len())
    }

    /// A live member chosen at random: a few draws from all tracked
    /// members (most are live), then a walk if those all hit dead ones.
    fn random_live_member(&mut self) -> Option<NodeId> {
        if self.live_count() == 0 {
            return None;
        }
        let live =
            |g: &Self, id: &NodeId| g.members.get(id).is_some_and(|t| t.dead_since_ms.is_none());
        for _ in 0..8 {
            let id = self.order[self.rng.random_range(0..self.order.len())];
            if live(self, &id) {
                return Some(id);
            }
        }
        let n = self.rng.random_range(0..self.live_count());
        self.members
            .keys()
            .filter(|id| live(self, id))
            .nth(n)
            .copied()
    }

    /// Live members (not this node) that are attached to `network` (all
    /// live members for the global scope). A network's are listed from the
    /// index of attachments (its size, not the swarm's) once per change of
    /// members or attachments.
    fn members_in(&mut self, network: &str) -> Vec<NodeId> {
        if network == GLOBAL {
            return self
                .members
                .iter()
                .filter(|(_, t)| t.dead_since_ms.is_none())
                .map(|(id, _)| *id)
                .collect();
        }
        self.listed_in(network).to_vec()
    }

    /// The live members of `network` (not the global scope), listed once
    /// per change of members or attachments.
    fn listed_in(&mut self, network: &str) -> &[NodeId] {
        let at = (self.members_gen, self.tables.attached_gen());
        if self.listed_at != at {
            self.listed.clear();
            self.trees.clear();
            self.listed_at = at;
        }
        if !self.listed.contains_key(network) {
            let live = |id: &NodeId| {
                self.members
                    .get(id)
                    .is_some_and(|t| t.dead_since_ms.is_none())
            };
            let list: Vec<NodeId> = self
                .tables
                .attached(network)
                .filter(|id| *id != self.me.id && live(id))
                .collect();
            self.listed.insert(network.to_owned(), list);
        }
        self.listed.get(network).map_or(&[], Vec::as_slice)
    }

    /// This node's children in `owner`'s broadcast tree of `network`
    /// ([`tree_children`] over the live members and this node), computed
    /// once per change of the members.
    fn children_in(&mut self, network: &str, owner: NodeId) -> Option<Vec<NodeId>> {
        let me = self.me.id;
        // Listing first drops trees computed over an older list.
        let _ = self.listed_in(network);
        if let Some(c) = self.trees.get(network).and_then(|t| t.get(&owner)) {
            return c.clone();
        }
        let mut all = self.listed_in(network).to_vec();
        all.push(me);
        let children = tree_children(owner, me, &all, TREE_FANOUT);
        self.trees
            .entry(network.to_owned())
            .or_default()
            .insert(owner, children.clone());
        children
    }

    fn node_in(&self, node: NodeId, network: &str) -> bool {
        self.tables.is_attached(node, network)
    }

    fn networks_entry(&self) -> Option<SharedEntry> {
        self.my_networks.clone()
    }

    fn send_table(&mut self, to: NodeId, body: TableMessage) {
        self.send_table_as(to, body, false);
    }

    /// Sends `body` to `to` with this node's `networks` entry and the
    /// certificates of the owners it names, each only if `to` was not sent
    /// it yet ([`SentTo`]), or always when `repair` (anti-entropy replies).
    /// A message of the global scope to a peer this node shares no network
    /// with (none was sent a network's message) is not remembered: every
    /// member is sent some (a newcomer's welcome, a changed `networks`
    /// entry, anti-entropy), and a record for each would make every node's
    /// memory grow with the swarm. Such a message carries them when it
    /// carries entries, and an anti-entropy probe never.
    fn send_table_as(&mut self, to: NodeId, body: TableMessage, repair: bool) {
        let Some((addr, generation)) = self
            .members
            .get(&to)
            .map(|t| (t.peer.addr.clone(), t.peer.generation))
        else {
            return;
        };
        let mine = self.networks_entry();
        let mut owners: BTreeSet<NodeId> = body.owners().collect();
        owners.extend(mine.iter().map(|e| e.owner));
        let (sender, certs) = if body.network() == GLOBAL && !self.sent.contains_key(&to) {
            match body {
                // An anti-entropy probe needs neither: a peer that lacks
                // this node's entry has another root, and the repair that
                // follows carries it.
                TableMessage::Root { .. } | TableMessage::Digest { .. } => (None, Vec::new()),
                _ => (mine, self.certs_for(owners.into_iter())),
            }
        } else {
            self.unsent(to, generation, mine, owners, repair)
        };
        let msg = Message::Table {
            sender,
            body,
            certs,
        };
        self.transmits.push_back(Transmit {
            to,
            addr,
            bytes: encode(&msg),
            datagram: false,
        });
    }

    /// Of this node's `networks` entry `mine` and the certificates of
    /// `owners`, what peer `to` (of process `generation`) was not sent yet
    /// (all when `repair`); noted as sent.
    fn unsent(
        &mut self,
        to: NodeId,
        generation: u64,
        mine: Option<SharedEntry>,
        mut owners: BTreeSet<NodeId>,
        repair: bool,
    ) -> (Option<SharedEntry>, Certs) {
        let sent = self.sent.entry(to).or_default();
        if sent.generation != generation {
            *sent = SentTo {
                generation,
                ..SentTo::default()
            };
        }
        let version = mine.as_ref().map(|e| e.version);
        let sender = if repair || sent.networks_version != version {
            sent.networks_version = version;
            mine
        } else {
            None
        };
        let me = self.me.id;
        owners.retain(|o| repair || !sent.has_cert(*o, me));
        let certs = self.certs_for(owners.into_iter());
        if let Some(sent) = self.sent.get_mut(&to) {
            for (o, _) in &certs {
                sent.add_cert(*o, me);
            }
        }
        (sender, certs)
    }

    fn send_digest(&mut self, to: NodeId, network: &str) {
        let root = self.tables.root(network);
        self.send_table(
            to,
            TableMessage::Root {
                network: network.to_owned(),
                root,
            },
        );
    }

    /// Sends `entries` (new to this node: its own write, or entries it has
    /// just taken) on towards the other members of `network`, except
    /// `skip`: every member when the network is small, else along each
    /// owner's broadcast tree ([`tree_children`]: at most [`TREE_FANOUT`]
    /// sends per node, each member reached once). An owner this node does
    /// not see as a member falls back to a few members chosen at random
    /// ([`push_fanout`]), each of which sends them on once in turn. A
    /// member that missed them gets them by anti-entropy.
    fn push(
        &mut self,
        network: &str,
        entries: Vec<(SharedKey, SharedEntry)>,
        skip: &BTreeSet<NodeId>,
    ) {
        if !self.spreads(network) {
            let targets: Vec<NodeId> = self
                .members_in(network)
                .into_iter()
                .filter(|m| !skip.contains(m))
                .collect();
            self.send_entries(network, &targets, entries);
            return;
        }
        let mut by_owner: BTreeMap<NodeId, Vec<(SharedKey, SharedEntry)>> = BTreeMap::new();
        for (k, e) in entries {
            by_owner.entry(e.owner).or_default().push((k, e));
        }
        for (owner, entries) in by_owner {
            let targets: Vec<NodeId> = match self.children_in(network, owner) {
                Some(children) => children,
                None => {
                    // The owner is not a member to this node: a few at
                    // random (the member list is copied only then).
                    let members = self.members_in(network);
                    let n = members.len();
                    members
                        .into_iter()
                        .filter(|m| !skip.contains(m))
                        .sample(&mut self.rng, push_fanout(n))
                }
            };
            let targets: Vec<NodeId> = targets.into_iter().filter(|m| !skip.contains(m)).collect();
            self.send_entries(network, &targets, entries);
        }
    }

    fn send_entries(
        &mut self,
        network: &str,
        to: &[NodeId],
        entries: Vec<(SharedKey, SharedEntry)>,
    ) {
        for t in to {
            self.send_table(
                *t,
                TableMessage::Entries {
                    network: network.to_owned(),
                    entries: entries.clone(),
                },
            );
        }
    }

    /// How many other members `network` has.
    fn members_in_count(&mut self, network: &str) -> usize {
        if network == GLOBAL {
            return self.live_count();
        }
        self.listed_in(network).len()
    }

    /// Whether writes in `network` spread along broadcast trees (more than
    /// [`DIRECT_PUSH_MAX`] other members) rather than straight from their
    /// owners. The global scope never does: its entries (which networks
    /// each node is on) change rarely and carry the certificates SWIM's
    /// claims wait for, so they go straight to every member, and one a
    /// node learns by anti-entropy is not sent on.
    fn spreads(&mut self, network: &str) -> bool {
        network != GLOBAL && self.members_in_count(network) > DIRECT_PUSH_MAX
    }

    /// The certificates of `owners`, as far as this node has them.
    fn certs_for(&self, owners: impl Iterator<Item = NodeId>) -> Certs {
        let owners: BTreeSet<NodeId> = owners.collect();
        owners
            .into_iter()
            .filter_map(|o| {
                if o == self.me.id {
                    Some((o, Arc::from(self.trust().keys.cert())))
                } else {
                    self.trust().certs.get(&o).map(|c| (o, c.clone()))
                }
            })
            .collect()
    }

    fn write_local(&mut self, key: impl Into<SharedKey>, value: Option<TableValue>) {
        let key: SharedKey = key.into();
        let version = self.next_version();
        let sig = self
            .trust()
            .keys
            .sign(&signed_bytes(&key, self.me.id, version, &value));
        let entry = Arc::new(Entry {
            owner: self.me.id,
            version,
            value,
            sig,
        });
        let change = self.tables.merge(
            key.clone(),
            entry.clone(),
            self.now_ms,
            self.config.tombstone_ttl_ms,
        );
        self.emit(change.into_iter().collect());
        if key.network == GLOBAL && key.table == NETWORKS_TABLE {
            self.my_networks = Some(entry.clone());
        }
        let network = key.network.clone();
        self.push(&network, vec![(key, entry)], &BTreeSet::new());
    }

    fn write_networks_record(&mut self) {
        let list: Vec<String> = self.networks.iter().cloned().collect();
        self.write_local(networks_key(self.me.id), Some(TableValue::Networks(list)));
    }

    fn check_table(table: &str) -> Result<(), GossipError> {
        if table.is_empty() || table == NETWORKS_TABLE {
            return Err(GossipError::BadTable(table.to_owned()));
        }
        Ok(())
    }

    /// Writes every live entry of this node's again, under a new version:
    /// after its key changed (a renewed certificate), so that what it
    /// relays carries signatures its new certificate checks.
    pub fn rekey(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        self.trust().rekey();
        let me = self.me.id;
        for sent in self.sent.values_mut() {
            sent.forget_cert(me, me);
        }
        let mine: Vec<(EntryKey, TableValue)> = self
            .tables
            .all()
            .filter(|(_, e)| e.owner == self.me.id)
            .filter_map(|(k, e)| e.value.clone().map(|v| (k.clone(), v)))
            .collect();
        for (key, value) in mine {
            self.write_local(key, Some(value));
        }
    }

    /// Writes an entry owned by this node.
    pub fn put(
        &mut self,
        now_ms: u64,
        network: &str,
        table: &str,
        key: &str,
        value: TableValue,
    ) -> Result<(), GossipError> {
        self.now_ms = self.now_ms.max(now_ms);
        Self::check_table(table)?;
        if !self.networks.contains(network) {
            return Err(GossipError::NotAttached(network.to_owned()));
        }
        self.write_local(entry_key(network, table, key), Some(value));
        Ok(())
    }

    /// Deletes an entry (a tombstone that wins over every older write).
    pub fn delete(
        &mut self,
        now_ms: u64,
        network: &str,
        table: &str,
        key: &str,
    ) -> Result<(), GossipError> {
        self.now_ms = self.now_ms.max(now_ms);
        Self::check_table(table)?;
        if !self.networks.contains(network) {
            return Err(GossipError::NotAttached(network.to_owned()));
        }
        self.write_local(entry_key(network, table, key), None);
        Ok(())
    }

    /// Attaches this node to `network` and pulls a full copy of its tables.
    pub fn join_network(&mut self, now_ms: u64, network: &str) {
        self.now_ms = self.now_ms.max(now_ms);
        if network == GLOBAL || !self.networks.insert(network.to_owned()) {
            return;
        }
        self.write_networks_record();
        let members = self.members_in(network);
        for to in members.into_iter().sample(&mut self.rng, 3) {
            self.send_digest(to, network);
        }
    }

    /// Detaches from `network`: deletes this node's entries there, tells the
    /// others, and forgets the network's tables.
    pub fn leave_network(&mut self, now_ms: u64, network: &str) {
        self.now_ms = self.now_ms.max(now_ms);
        if !self.networks.contains(network) {
            return;
        }
        let mine: Vec<EntryKey> = self
            .tables
            .all()
            .filter(|(k, e)| k.network == network && e.owner == self.me.id && !e.is_tombstone())
            .map(|(k, _)| k.clone())
            .collect();
        for k in mine {
            self.write_local(k, None);
        }
        self.networks.remove(network);
        self.write_networks_record();
        let dropped = self.tables.drop_network(network);
        self.emit(dropped);
    }

    /// Leaves the cluster on purpose: others mark this node `left`.
    pub fn leave_cluster(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        for net in self.networks.clone() {
            self.leave_network(now_ms, &net);
        }
        self.write_local(networks_key(self.me.id), None);
        self.run(|f, rt| f.leave_cluster(rt));
    }

    /// Handles bytes from `from` (authenticated by the transport).
    pub fn handle_message(
        &mut self,
        now_ms: u64,
        from: NodeId,
        bytes: &[u8],
    ) -> Result<(), Rejected> {
        self.now_ms = self.now_ms.max(now_ms);
        let result = self.handle_inner(from, bytes);
        if let Err(e) = &result {
            let reason = match e {
                Rejected::NotAllowed(_) => "not_allowed",
                Rejected::Malformed(_) => "malformed",
                Rejected::ForgedSender(_) => "forged_sender",
                Rejected::NotInNetwork { .. } => "not_in_network",
            };
            *self.rejected.entry(reason.to_owned()).or_default() += 1;
        }
        result
    }

    fn handle_inner(&mut self, from: NodeId, bytes: &[u8]) -> Result<(), Rejected> {
        if !self.is_allowed(from) {
            return Err(Rejected::NotAllowed(from));
        }
        let msg: Message = codec::decode(bytes, MAX_STREAM_MESSAGE)
            .map_err(|e| Rejected::Malformed(e.to_string()))?;
        match msg {
            Message::Swim(data) => {
                if data.len() > MAX_DATAGRAM {
                    return Err(Rejected::Malformed("oversized SWIM packet".into()));
                }
                // A packet speaks for its sender only: the identity in its
                // header is the certificate's.
                let header = foca::Codec::<Peer>::decode_header(&mut PostcardCodec, &data[..])
                    .map_err(|e| Rejected::Malformed(e.to_string()))?;
                if header.src.id != from {
                    return Err(Rejected::ForgedSender(from));
                }
                self.run(|f, rt| f.handle_data(&data, rt));
                self.after_swim_trust();
                Ok(())
            }
            Message::Table {
                sender,
                body,
                certs,
            } => {
                let offered: BTreeMap<NodeId, Arc<[u8]>> = certs.into_iter().collect();
                if let Some(e) = sender {
                    if e.owner != from {
                        return Err(Rejected::ForgedSender(from));
                    }
                    self.merge_remote(from, Arc::new(networks_key(from)), e, &offered);
                }
                let network = body.network().to_owned();
                let allowed = if network == GLOBAL {
                    true
                } else {
                    self.networks.contains(&network) && self.node_in(from, &network)
                };
                if !allowed {
                    return Err(Rejected::NotInNetwork {
                        sender: from,
                        network,
                    });
                }
                let result = self.handle_table(from, body, &offered);
                self.after_swim_trust();
                result
            }
        }
    }

    /// Whether `entry` for `key` is its owner's: its version not ahead of
    /// this node's clock by more than [`MAX_CLOCK_AHEAD_MS`], and signed
    /// under a valid certificate of the owner (offered with the message,
    /// or one this node already took). Callers ask only about entries this
    /// node does not hold. Counts what it refuses.
    fn authentic(
        &mut self,
        key: &EntryKey,
        entry: &Entry,
        offered: &BTreeMap<NodeId, Arc<[u8]>>,
    ) -> bool {
        let reject = |g: &mut Self, why: &str| {
            *g.rejected.entry(why.to_owned()).or_default() += 1;
            false
        };
        if entry.version >> 16 > self.now_ms.saturating_add(MAX_CLOCK_AHEAD_MS) {
            return reject(self, "version_ahead");
        }
        let owner = entry.owner;
        let mut trust = self.trust();
        let cert = if owner == self.me.id {
            Some(Arc::from(trust.keys.cert()))
        } else {
            offered.get(&owner).or(trust.certs.get(&owner)).cloned()
        };
        let Some(cert) = cert else {
            drop(trust);
            return reject(self, "no_certificate");
        };
        let msg = signed_bytes(key, owner, entry.version, &entry.value);
        if !trust.keys.verify(owner, &cert, &msg, &entry.sig) {
            drop(trust);
            return reject(self, "bad_signature");
        }
        if owner != self.me.id && trust.certs.get(&owner) != Some(&cert) {
            let renewed = trust
                .certs
                .insert(owner, crate::share::share(cert))
                .is_some();
            drop(trust);
            if renewed {
                // Peers were sent the old one.
                let me = self.me.id;
                for sent in self.sent.values_mut() {
                    sent.forget_cert(owner, me);
                }
            }
        }
        true
    }

    fn valid_entry(network: &str, key: &EntryKey, entry: &Entry) -> bool {
        if key.network != network {
            return false;
        }
        if network == GLOBAL {
            key.table == NETWORKS_TABLE && key.key == entry.owner.to_string()
        } else {
            key.table != NETWORKS_TABLE
        }
    }

    /// Takes `entry` for `key` from `from` if it is authentic and newer
    /// than what this node holds; the entry, if it was taken (to send on).
    fn merge_remote(
        &mut self,
        from: NodeId,
        key: SharedKey,
        entry: SharedEntry,
        offered: &BTreeMap<NodeId, Arc<[u8]>>,
    ) -> Option<(SharedKey, SharedEntry)> {
        if entry.owner == self.me.id {
            let mine = self.tables.get(&key).cloned();
            let held = |m: &SharedEntry| (m.owner, m.version) == (entry.owner, entry.version);
            if mine.as_ref().is_some_and(held) || !self.authentic(&key, &entry, offered) {
                return None;
            }
            // This node is the authority on its own entries: one it does not
            // hold (lost in a restart, or reaped) is deleted everywhere.
            let stale = mine
                .as_ref()
                .is_none_or(|m| (entry.version, entry.owner) > (m.version, m.owner));
            if stale && !entry.is_tombstone() {
                self.clock = self.clock.max(entry.version);
                self.write_local(key, None);
            } else if let Some(m) =
                mine.filter(|m| (m.version, m.owner) > (entry.version, entry.owner))
            {
                let network = key.network.clone();
                self.send_table(
                    from,
                    TableMessage::Entries {
                        network,
                        entries: vec![(key, m)],
                    },
                );
            }
            return None;
        }
        if key.network != GLOBAL && !self.node_in(entry.owner, &key.network) {
            // Only members of a network own entries in it.
            return None;
        }
        // What this node holds wins (or is this very entry): nothing to
        // check, nothing to take.
        if self.tables.get(&key).is_some_and(|c| !entry.wins_over(c)) {
            return None;
        }
        if !self.authentic(&key, &entry, offered) {
            return None;
        }
        let owner = entry.owner;
        let is_networks = key.table == NETWORKS_TABLE;
        let before = if is_networks {
            self.networks_of(owner)
        } else {
            BTreeSet::new()
        };
        let taken = (key.clone(), entry.clone());
        let change = self
            .tables
            .merge(key, entry, self.now_ms, self.config.tombstone_ttl_ms);
        self.emit(change.into_iter().collect());
        if is_networks {
            // An owner that left a network takes its entries there with it,
            // even if its tombstones never reached this node.
            let after = self.networks_of(owner);
            for net in before.difference(&after) {
                let gone = self.tables.purge_owner_in(owner, net);
                self.emit(gone);
            }
        }
        Some(taken)
    }

    fn networks_of(&self, node: NodeId) -> BTreeSet<String> {
        match self
            .tables
            .get(&networks_key(node))
            .and_then(|e| e.value.as_ref())
        {
            Some(TableValue::Networks(list)) => list.iter().cloned().collect(),
            _ => BTreeSet::new(),
        }
    }

    fn handle_table(
        &mut self,
        from: NodeId,
        body: TableMessage,
        offered: &BTreeMap<NodeId, Arc<[u8]>>,
    ) -> Result<(), Rejected> {
        match body {
            TableMessage::Entries { network, entries } => {
                let mut taken = Vec::new();
                for (k, e) in entries {
                    if Self::valid_entry(&network, &k, &e) {
                        taken.extend(self.merge_remote(from, k, e, offered));
                    }
                }
                self.last_sync.insert(from, self.now_ms);
                if !taken.is_empty() && self.spreads(&network) {
                    // On, once, past the sender and the entries' owners.
                    let mut skip: BTreeSet<NodeId> = taken.iter().map(|(_, e)| e.owner).collect();
                    skip.insert(from);
                    self.push(&network, taken, &skip);
                }
            }
            TableMessage::Root { network, root } => {
                self.last_sync.insert(from, self.now_ms);
                if self.tables.root(&network) != root {
                    let digest = self.tables.digest(&network).clone();
                    self.send_table(from, TableMessage::Digest { network, digest });
                }
            }
            TableMessage::Digest { network, digest } => {
                let owners = differing_owners(self.tables.digest(&network), &digest);
                self.last_sync.insert(from, self.now_ms);
                if !owners.is_empty() {
                    let entries = self.tables.entries_of(&network, &owners);
                    self.send_table_as(
                        from,
                        TableMessage::DigestReply {
                            network,
                            entries,
                            want: owners.into_iter().collect(),
                        },
                        true,
                    );
                }
            }
            TableMessage::DigestReply {
                network,
                entries,
                want,
            } => {
                for (k, e) in entries {
                    if Self::valid_entry(&network, &k, &e) {
                        self.merge_remote(from, k, e, offered);
                    }
                }
                let want: BTreeSet<NodeId> = want.into_iter().collect();
                let mine = self.tables.entries_of(&network, &want);
                if !mine.is_empty() {
                    self.send_table_as(
                        from,
                        TableMessage::Entries {
                            network,
                            entries: mine,
                        },
                        true,
                    );
                }
                self.last_sync.insert(from, self.now_ms);
            }
        }
        Ok(())
    }

    fn state_of(&self, id: NodeId) -> MemberState {
        let Some(t) = self.members.get(&id) else {
            return MemberState::Dead;
        };
        if let Some(dead) = self.state_of_dead(t) {
            return dead;
        }
        let suspect = self
            .foca
            .iter_membership_state()
            .any(|m| m.id() == &t.peer && m.state() == foca::State::Suspect);
        if suspect {
            MemberState::Suspect
        } else {
            MemberState::Alive
        }
    }

    /// Dead or left, for a tracked member that is down.
    fn state_of_dead(&self, t: &Tracked) -> Option<MemberState> {
        t.dead_since_ms?;
        let left = matches!(self.tables.get(&networks_key(t.peer.id)), Some(e) if e.is_tombstone());
        Some(if left {
            MemberState::Left
        } else {
            MemberState::Dead
        })
    }

    /// Membership updates SWIM still has to pass on (each one
    /// [`max_transmissions`] times): what a burst of joins or deaths left.
    pub fn swim_backlog(&self) -> usize {
        self.foca.updates_backlog()
    }

    /// SWIM's own view of `node` (state and incarnation), which
    /// [`Self::members`] follows; for diagnostics.
    pub fn swim_view(&self, node: NodeId) -> Vec<(String, u16)> {
        self.foca
            .iter_membership_state()
            .filter(|m| m.id().id == node)
            .map(|m| (format!("{:?}", m.state()), m.incarnation()))
            .collect()
    }

    /// How many of [`Self::members`] are alive (itself included), without
    /// listing them: what a large simulation polls.
    pub fn alive_count(&self) -> usize {
        let suspects: HashSet<&Peer> = self
            .foca
            .iter_membership_state()
            .filter(|m| m.state() == foca::State::Suspect)
            .map(foca::Member::id)
            .collect();
        1 + self
            .members
            .values()
            .filter(|t| t.dead_since_ms.is_none() && !suspects.contains(&t.peer))
            .count()
    }

    /// Every member this node knows, itself included.
    pub fn members(&self) -> Vec<MemberInfo> {
        // SWIM's view read once (not once per member: a large swarm's
        // listing stays O(n log n)).
        let swim: HashMap<&Peer, (u16, bool)> = self
            .foca
            .iter_membership_state()
            .map(|m| (m.id(), (m.incarnation(), m.state() == foca::State::Suspect)))
            .collect();
        let of = |p: &Peer| swim.get(p).copied();
        let mut out = vec![MemberInfo {
            node_id: self.me.id,
            addr: self.me.addr.to_string(),
            state: MemberState::Alive,
            incarnation: of(&self.me).map_or(0, |(i, _)| i),
            generation: self.me.generation,
        }];
        for t in self.members.values() {
            let state = match self.state_of_dead(t) {
                Some(dead) => dead,
                None if of(&t.peer).is_some_and(|(_, suspect)| suspect) => MemberState::Suspect,
                None => MemberState::Alive,
            };
            out.push(MemberInfo {
                node_id: t.peer.id,
                addr: t.peer.addr.to_string(),
                state,
                incarnation: of(&t.peer).map_or(0, |(i, _)| i),
                generation: t.peer.generation,
            });
        }
        out
    }

    /// A consistent read of the visible entries of `network`.
    pub fn snapshot(&self, network: &str) -> Vec<(EntryKey, TableValue)> {
        self.tables
            .visible_in(network)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// A random number from this node's generator (for drivers' jitter).
    pub fn jitter(&mut self, max_ms: u64) -> u64 {
        self.rng.random_range(0..=max_ms)
    }
}

/// The key of `node`'s entry in the global `networks` table.
pub fn networks_key(node: NodeId) -> EntryKey {
    crate::table::networks_key_of(node)
}

/// An entry key.
pub fn entry_key(network: &str, table: &str, key: &str) -> EntryKey {
    EntryKey {
        network: network.to_owned(),
        table: table.to_owned(),
        key: key.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u64) -> Peer {
        Peer {
            id: NodeId(n),
            addr: format!("sim:{n}").into(),
            generation: 1 << 16,
            bump: 0,
        }
    }

    /// Node `n`, attached to `network` if given.
    fn node(n: u64, network: Option<&str>) -> Gossip {
        let mut g = Gossip::new(
            peer(n),
            GossipConfig::default(),
            n,
            1_000,
            Box::new(crate::keys::SizedTestKeys {
                id: NodeId(n),
                cert_len: 8,
                sig_len: 8,
            }),
        );
        if let Some(net) = network {
            g.join_network(1_000, net);
        }
        g
    }

    /// Node 1 of `n` nodes all on `network`, knowing the others as a
    /// formed swarm does.
    fn formed(n: u64, network: &str) -> Gossip {
        let all: Vec<Credentials> = (1..=n)
            .map(|i| node(i, Some(network)).credentials())
            .collect();
        let mut g = node(1, Some(network));
        assert_eq!(g.preload(1_000, &all), 0);
        while g.poll_transmit().is_some() {}
        g
    }

    #[test]
    fn a_drained_burst_gives_its_queue_back() {
        let mut g = node(1, None);
        let others: Vec<foca::Member<Peer>> =
            (2..=500).map(|i| foca::Member::alive(peer(i))).collect();
        // Each newcomer is welcomed: 499 messages queued at once.
        g.run(|f, rt| f.apply_many(others.into_iter(), false, rt));
        assert!(g.transmits.len() >= 499, "{}", g.transmits.len());
        assert!(g.transmits.capacity() >= 499);
        while g.poll_transmit().is_some() {}
        assert!(g.transmits.capacity() <= 64, "{}", g.transmits.capacity());
        while g.poll_event().is_some() {}
        assert!(g.events.capacity() <= 64, "{}", g.events.capacity());
    }

    #[test]
    fn broadcast_trees_are_kept_until_the_members_change() {
        let mut g = formed(40, "net");
        let live: Vec<NodeId> = (1..=40).map(NodeId).collect();
        for owner in [2, 17, 40].map(NodeId) {
            let want = tree_children(owner, NodeId(1), &live, TREE_FANOUT);
            assert_eq!(g.children_in("net", owner), want);
        }
        assert_eq!(g.trees["net"].len(), 3, "kept, one per owner");
        assert_eq!(g.children_in("net", NodeId(2)), g.trees["net"][&NodeId(2)]);
        // A member dies: every tree is computed again without it.
        let dead = g.members[&NodeId(3)].peer.clone();
        g.member_down(dead);
        let live: Vec<NodeId> = live.into_iter().filter(|m| *m != NodeId(3)).collect();
        for owner in [2, 17, 40].map(NodeId) {
            let want = tree_children(owner, NodeId(1), &live, TREE_FANOUT);
            assert_eq!(g.children_in("net", owner), want, "owner {owner}");
        }
        assert!(!g.listed_in("net").contains(&NodeId(3)));
    }
}
