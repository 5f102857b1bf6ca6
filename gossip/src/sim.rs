//! An in-memory network for many [`Gossip`] nodes in one process, in
//! simulated time: links with latency, datagram loss, partitions, crashes and
//! restarts. Deterministic for a given seed, on one thread or two
//! ([`Sim::threads`]): every link takes at least a millisecond, so the
//! nodes with something due in one millisecond can run side by side.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::{Arc, mpsc};

use rand10::rngs::SmallRng;
use rand10::{RngExt, SeedableRng};
use shoal_mesh::NodeId;

use crate::core::{Event, Gossip, GossipConfig};
use crate::peer::Peer;

/// A simulated node.
pub struct SimNode {
    /// Its gossip state machine (boxed: the simulator moves its nodes to
    /// the thread that runs them every busy millisecond, and a `Gossip`
    /// is large).
    pub gossip: Box<Gossip>,
    /// Whether it runs (a crashed node neither sends nor receives).
    pub up: bool,
    /// Draws the fate of what it sends (lost? how late?): each node its
    /// own, so that a run is the same on any number of threads.
    rng: SmallRng,
}

struct InFlight {
    from: NodeId,
    to: NodeId,
    bytes: Vec<u8>,
}

/// What the network does to what a node sends.
struct Links {
    latency_ms: (u64, u64),
    datagram_loss: f64,
    slow: BTreeMap<NodeId, u64>,
    record_events: bool,
    tap: Option<(NodeId, NodeId)>,
}

/// Messages for a node: sender, bytes.
type Inbox = Vec<(NodeId, Vec<u8>)>;

/// Nodes with what they are to take in one millisecond.
type Running = Vec<(NodeId, SimNode, Inbox)>;

/// A millisecond's work for the helper thread.
struct Job {
    now: u64,
    links: Arc<Links>,
    nodes: Running,
}

/// A second thread that runs part of each busy millisecond's nodes, in the
/// simulation's pool ([`crate::share`]).
struct Helper {
    jobs: mpsc::Sender<Job>,
    done: mpsc::Receiver<Vec<(NodeId, SimNode, Output)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Helper {
    fn spawn(pool: Arc<crate::share::Pool>) -> Helper {
        let (jobs, todo) = mpsc::channel::<Job>();
        let (finished, done) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("sim-helper".into())
            .spawn(move || {
                crate::share::enter(Some(pool));
                while let Ok(job) = todo.recv() {
                    let out: Vec<(NodeId, SimNode, Output)> = job
                        .nodes
                        .into_iter()
                        .map(|(id, mut n, m)| {
                            let o = n.step(job.now, m, &job.links);
                            (id, n, o)
                        })
                        .collect();
                    if finished.send(out).is_err() {
                        break;
                    }
                }
                crate::share::enter(None);
            })
            .ok();
        Helper { jobs, done, thread }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        // A closed channel ends the thread's loop.
        self.jobs = mpsc::channel().0;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What one step of a node produced: datagrams and streams on their way
/// (arrival time, to, bytes), bytes and messages sent, events, next wakeup.
#[derive(Default)]
struct Output {
    sends: Vec<(u64, NodeId, Vec<u8>)>,
    bytes: u64,
    messages: u64,
    events: Vec<Event>,
    wake: u64,
    tapped: Vec<Vec<u8>>,
}

impl SimNode {
    /// Delivers `messages` (sender, bytes) at `now`, then runs its timers
    /// if they are due: what a node does in one simulated millisecond.
    fn step(&mut self, now: u64, messages: Inbox, links: &Links) -> Output {
        for (from, bytes) in messages {
            let _ = self.gossip.handle_message(now, from, &bytes);
        }
        // A timer due now (or made due by a message) runs now.
        for _ in 0..4 {
            if self.gossip.poll_timeout() > now {
                break;
            }
            self.gossip.handle_timeout(now);
        }
        self.drain(now, links)
    }

    /// Takes what the node produced.
    fn drain(&mut self, now: u64, links: &Links) -> Output {
        let mut out = Output::default();
        while let Some(t) = self.gossip.poll_transmit() {
            out.bytes += t.bytes.len() as u64;
            out.messages += 1;
            if links.tap == Some((self.gossip.me().id, t.to)) {
                out.tapped.push(t.bytes.clone());
            }
            if t.datagram && links.datagram_loss > 0.0 && self.rng.random_bool(links.datagram_loss)
            {
                continue;
            }
            let (lo, hi) = links.latency_ms;
            let delay = self.rng.random_range(lo..=hi.max(lo))
                + links.slow.get(&t.to).copied().unwrap_or(0);
            out.sends.push((now + delay, t.to, t.bytes));
        }
        while let Some(e) = self.gossip.poll_event() {
            if links.record_events {
                out.events.push(e);
            }
        }
        out.wake = self.gossip.poll_timeout();
        out
    }
}

/// The simulated network.
pub struct Sim {
    /// The nodes.
    pub nodes: BTreeMap<NodeId, SimNode>,
    now_ms: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    in_flight: HashMap<u64, InFlight>,
    wakeups: BinaryHeap<Reverse<(u64, NodeId)>>,
    scheduled: HashMap<NodeId, u64>,
    rng: SmallRng,
    groups: Option<Vec<BTreeSet<NodeId>>>,
    config: GossipConfig,
    /// One-way latency range, ms (at least 1: what a node sends in a
    /// millisecond arrives in a later one, which lets nodes run a
    /// millisecond in parallel).
    pub latency_ms: (u64, u64),
    /// Probability that a datagram is lost.
    pub datagram_loss: f64,
    /// Nodes whose processing is delayed by this much (CPU-starved).
    pub slow: BTreeMap<NodeId, u64>,
    /// Bytes sent per node.
    pub bytes_sent: BTreeMap<NodeId, u64>,
    /// Messages sent per node.
    pub messages_sent: BTreeMap<NodeId, u64>,
    /// Times each node's timers woke it (what an idle daemon pays for).
    pub timer_wakeups: BTreeMap<NodeId, u64>,
    /// Every event, with the time and the node that saw it, if recording.
    pub events: Vec<(u64, NodeId, Event)>,
    /// Whether to record events.
    pub record_events: bool,
    /// A link (from, to) whose messages are kept, as sent (lost or not).
    pub tap: Option<(NodeId, NodeId)>,
    /// The messages sent over [`Sim::tap`].
    pub tapped: Vec<Vec<u8>>,
    /// Sizes of the certificates and signatures of nodes started from now
    /// on ([`crate::keys::SizedTestKeys`]): a real node's by default.
    pub key_sizes: (usize, usize),
    /// Threads that run the nodes (1 or 2). A run is the same on any
    /// number: each node draws from its own random numbers, and what the
    /// nodes of one millisecond produce is taken in the order of their IDs.
    pub threads: usize,
    /// Milliseconds whose nodes ran on two threads.
    pub split_steps: u64,
    /// The values the nodes share ([`crate::share`]).
    pool: Arc<crate::share::Pool>,
    /// The second thread, once a millisecond was busy enough for it.
    helper: Option<Helper>,
    /// When the values shared among the nodes were last swept.
    swept_ms: u64,
}

/// How often (simulated ms) the values no node holds any longer leave the
/// pool ([`crate::share`]).
const SWEEP_EVERY_MS: u64 = 10_000;

/// Fewer messages than this in a millisecond are not worth a second thread.
const PARALLEL_FROM: usize = 32;

impl Sim {
    /// An empty network; time starts at `start_ms`. Its nodes share the
    /// equal values they hold ([`crate::share`]; the pool is entered on
    /// this thread).
    pub fn new(seed: u64, config: GossipConfig, start_ms: u64) -> Self {
        let pool = Arc::new(crate::share::Pool::default());
        crate::share::enter(Some(pool.clone()));
        Sim {
            nodes: BTreeMap::new(),
            now_ms: start_ms,
            seq: 0,
            queue: BinaryHeap::new(),
            in_flight: HashMap::new(),
            wakeups: BinaryHeap::new(),
            scheduled: HashMap::new(),
            rng: SmallRng::seed_from_u64(seed),
            groups: None,
            config,
            latency_ms: (1, 3),
            datagram_loss: 0.0,
            slow: BTreeMap::new(),
            bytes_sent: BTreeMap::new(),
            messages_sent: BTreeMap::new(),
            timer_wakeups: BTreeMap::new(),
            events: Vec::new(),
            record_events: false,
            tap: None,
            tapped: Vec::new(),
            key_sizes: (423, 71),
            threads: 1,
            split_steps: 0,
            pool,
            helper: None,
            swept_ms: start_ms,
        }
    }

    /// Simulated time, ms.
    pub fn now(&self) -> u64 {
        self.now_ms
    }

    fn peer(id: NodeId, generation: u64) -> Peer {
        Peer {
            id,
            addr: format!("sim:{id}").into(),
            generation,
            bump: 0,
        }
    }

    /// Adds (or restarts, as a new generation) node `id`, introduced to
    /// `seeds` that are up.
    pub fn start(&mut self, id: NodeId, seeds: &[NodeId]) {
        let generation = self.now_ms << 16;
        let seed = self.rng.random::<u64>();
        let mut g = Gossip::new(
            Self::peer(id, generation),
            self.config.clone(),
            seed,
            self.now_ms,
            Box::new(crate::keys::SizedTestKeys {
                id,
                cert_len: self.key_sizes.0,
                sig_len: self.key_sizes.1,
            }),
        );
        for s in seeds {
            if let Some(n) = self.nodes.get(s).filter(|n| n.up && *s != id) {
                let p = n.gossip.me().clone();
                g.announce(self.now_ms, p);
            }
        }
        let rng = SmallRng::seed_from_u64(self.rng.random::<u64>());
        self.nodes.insert(
            id,
            SimNode {
                gossip: Box::new(g),
                up: true,
                rng,
            },
        );
        self.after_step(id);
    }

    /// Starts `nodes` (each attached to its networks) as a swarm that has
    /// formed: every node holds every other's certificate, signed claim
    /// and `networks` entry, and has each alive in SWIM with nothing left
    /// to pass on ([`Gossip::preload`]) — the state a swarm reaches once
    /// SWIM has passed on every arrival, without the O(n²) messages that
    /// take it there (hours at 5 000 nodes). The nodes start at once and
    /// take the others over the next `spread_ms` (less than a probe
    /// period, so that no node is probed by one it does not know yet),
    /// spread like the start of a daemon. Returns the claims and entries
    /// refused (none, unless a node's keys do not check out).
    pub fn start_formed(&mut self, nodes: &[(NodeId, Vec<String>)], spread_ms: u64) -> usize {
        for (id, networks) in nodes {
            self.start(*id, &[]);
            self.with_node(*id, |g, now| {
                for net in networks {
                    g.join_network(now, net);
                }
            });
        }
        let all: Vec<crate::core::Credentials> = nodes
            .iter()
            .filter_map(|(id, _)| self.nodes.get(id).map(|n| n.gossip.credentials()))
            .collect();
        let per_ms = nodes.len().div_ceil(spread_ms.max(1) as usize).max(1);
        let mut refused = 0;
        for group in nodes.chunks(per_ms) {
            // Each millisecond's nodes take the others on this thread and,
            // with two threads, the helper's pool.
            let mut taken: Vec<(NodeId, SimNode)> = group
                .iter()
                .filter_map(|(id, _)| self.nodes.remove(id).map(|n| (*id, n)))
                .collect();
            let now = self.now_ms;
            let preload = |part: &mut [(NodeId, SimNode)]| -> usize {
                part.iter_mut()
                    .filter(|(_, n)| n.up)
                    .map(|(_, n)| n.gossip.preload(now, &all))
                    .sum()
            };
            if self.threads > 1 {
                let half = taken.len() / 2;
                let (theirs, mine) = taken.split_at_mut(half);
                let pool = self.pool.clone();
                refused += std::thread::scope(|s| {
                    let other = s.spawn(|| {
                        crate::share::enter(Some(pool));
                        let r = preload(theirs);
                        crate::share::enter(None);
                        r
                    });
                    let r = preload(mine);
                    r + other
                        .join()
                        .unwrap_or_else(|p| std::panic::resume_unwind(p))
                });
            } else {
                refused += preload(&mut taken);
            }
            for (id, n) in taken {
                self.nodes.insert(id, n);
                self.after_step(id);
            }
            self.run_for(1);
        }
        refused
    }

    /// Crashes `id`: it stops at once; messages to it are lost.
    pub fn crash(&mut self, id: NodeId) {
        if let Some(n) = self.nodes.get_mut(&id) {
            n.up = false;
        }
    }

    /// Splits the network into groups; messages between groups are lost.
    pub fn partition(&mut self, groups: Vec<BTreeSet<NodeId>>) {
        self.groups = Some(groups);
    }

    /// Ends the partition.
    pub fn heal(&mut self) {
        self.groups = None;
    }

    fn connected(&self, a: NodeId, b: NodeId) -> bool {
        self.groups
            .as_ref()
            .is_none_or(|gs| gs.iter().any(|g| g.contains(&a) && g.contains(&b)))
    }

    /// Runs `f` on node `id` at the current time, then carries out what it produced.
    pub fn with_node<T>(&mut self, id: NodeId, f: impl FnOnce(&mut Gossip, u64) -> T) -> Option<T> {
        let now = self.now_ms;
        let n = self.nodes.get_mut(&id).filter(|n| n.up)?;
        let out = f(&mut n.gossip, now);
        self.after_step(id);
        Some(out)
    }

    fn links(&self) -> Links {
        Links {
            latency_ms: (self.latency_ms.0.max(1), self.latency_ms.1),
            datagram_loss: self.datagram_loss,
            slow: self.slow.clone(),
            record_events: self.record_events,
            tap: self.tap,
        }
    }

    fn after_step(&mut self, id: NodeId) {
        let now = self.now_ms;
        let links = self.links();
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        let out = n.drain(now, &links);
        self.carry_out(id, out);
    }

    /// Puts what node `id` produced on its way.
    fn carry_out(&mut self, id: NodeId, out: Output) {
        *self.bytes_sent.entry(id).or_default() += out.bytes;
        *self.messages_sent.entry(id).or_default() += out.messages;
        self.tapped.extend(out.tapped);
        for (at, to, bytes) in out.sends {
            self.seq += 1;
            self.queue.push(Reverse((at, self.seq)));
            self.in_flight.insert(
                self.seq,
                InFlight {
                    from: id,
                    to,
                    bytes,
                },
            );
        }
        let now = self.now_ms;
        self.events
            .extend(out.events.into_iter().map(|e| (now, id, e)));
        if self.scheduled.get(&id) != Some(&out.wake) {
            self.scheduled.insert(id, out.wake);
            self.wakeups.push(Reverse((out.wake, id)));
        }
    }

    /// What is due at the next moment up to `until` (messages to deliver,
    /// by node, in the order they were sent; nodes whose timers are due),
    /// with its time; `None` if nothing is.
    fn due(&mut self, until: u64) -> Option<(u64, BTreeMap<NodeId, Inbox>)> {
        let next_msg = self.queue.peek().map(|Reverse((t, _))| *t);
        let next_wake = self.wakeups.peek().map(|Reverse((t, _))| *t);
        let next = match (next_msg, next_wake) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) => a,
            (None, Some(b)) => b,
            (None, None) => return None,
        };
        if next > until {
            return None;
        }
        let now = self.now_ms.max(next);
        let mut work: BTreeMap<NodeId, Inbox> = BTreeMap::new();
        while let Some(Reverse((t, seq))) = self.queue.peek().copied()
            && t <= now
        {
            self.queue.pop();
            let Some(m) = self.in_flight.remove(&seq) else {
                continue;
            };
            let deliver = self.nodes.get(&m.to).is_some_and(|n| n.up)
                && self.nodes.get(&m.from).is_some_and(|n| n.up)
                && self.connected(m.from, m.to);
            if deliver {
                work.entry(m.to).or_default().push((m.from, m.bytes));
            }
        }
        while let Some(Reverse((t, id))) = self.wakeups.peek().copied()
            && t <= now
        {
            self.wakeups.pop();
            if self.scheduled.get(&id) != Some(&t) {
                continue;
            }
            self.scheduled.remove(&id);
            if self.nodes.get(&id).is_some_and(|n| n.up) {
                *self.timer_wakeups.entry(id).or_default() += 1;
                work.entry(id).or_default();
            }
        }
        Some((now, work))
    }

    /// Advances simulated time by `ms`, delivering messages and firing
    /// timers in order: each millisecond, every node with something due
    /// takes its messages (in the order they were sent), then its timers.
    pub fn run_for(&mut self, ms: u64) {
        let until = self.now_ms + ms;
        while let Some((now, work)) = self.due(until) {
            self.now_ms = now;
            if self.now_ms >= self.swept_ms + SWEEP_EVERY_MS {
                self.swept_ms = self.now_ms;
                self.pool.sweep();
                // What a burst of messages grew the queues to.
                self.in_flight.shrink_to(self.in_flight.len() * 2);
                self.queue.shrink_to(self.queue.len() * 2);
            }
            // The nodes leave the map while they run (each on one thread).
            // Sized up front: grown step by step, a busy millisecond's
            // vectors cost glibc a consolidation of its free lists each.
            let mut running: Running = Vec::with_capacity(work.len());
            running.extend(
                work.into_iter()
                    .filter_map(|(id, msgs)| self.nodes.remove(&id).map(|n| (id, n, msgs))),
            );
            let messages: usize = running.iter().map(|(_, _, m)| m.len()).sum();
            let links = Arc::new(self.links());
            let mut done: Vec<(NodeId, SimNode, Output)> = Vec::with_capacity(running.len());
            let step = |(id, mut n, m): (NodeId, SimNode, Inbox)| {
                let o = n.step(now, m, &links);
                (id, n, o)
            };
            if self.threads > 1 && messages >= PARALLEL_FROM {
                // The upper half of the nodes (by ID) to the helper thread:
                // about half the work (a node's cost follows its timers as
                // much as its messages; splitting by messages, or every
                // other node, measured no faster).
                let mut mine = running;
                let theirs = mine.split_off(mine.len() / 2);
                self.split_steps += 1;
                let pool = &self.pool;
                let helper = self
                    .helper
                    .get_or_insert_with(|| Helper::spawn(pool.clone()));
                let job = Job {
                    now,
                    links: links.clone(),
                    nodes: theirs,
                };
                // Without a helper (it could not start), this thread runs
                // both halves.
                let (sent, unsent) = match helper.jobs.send(job) {
                    Ok(()) => (true, Vec::new()),
                    Err(mpsc::SendError(job)) => (false, job.nodes),
                };
                done.extend(mine.into_iter().chain(unsent).map(step));
                if sent {
                    let Ok(back) = helper.done.recv() else {
                        panic!("the simulator's helper thread stopped in a step");
                    };
                    done.extend(back);
                }
                // What they produced is taken in the order of their IDs.
                done.sort_unstable_by_key(|(id, _, _)| *id);
            } else {
                done.extend(running.into_iter().map(step));
            }
            for (id, node, out) in done {
                self.nodes.insert(id, node);
                self.carry_out(id, out);
            }
        }
        self.now_ms = until;
    }

    /// Crashes `victim` and runs until every node that is up has it dead,
    /// at most `limit_ms`: how long that took, or `None` (some never did).
    /// Records events meanwhile (and clears them).
    pub fn crash_and_detect(&mut self, victim: NodeId, limit_ms: u64) -> Option<u64> {
        self.record_events = true;
        self.events.clear();
        let start = self.now_ms;
        self.crash(victim);
        let mut left: BTreeSet<NodeId> = self.up().into_iter().collect();
        let mut last = start;
        while !left.is_empty() && self.now_ms - start < limit_ms {
            self.run_for(20);
            for (at, node, e) in self.events.drain(..) {
                if let Event::Member {
                    node: m,
                    state: crate::MemberState::Dead,
                } = e
                    && m == victim
                    && left.remove(&node)
                {
                    last = at;
                }
            }
        }
        left.is_empty().then_some(last - start)
    }

    /// The nodes that are up.
    pub fn up(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.up)
            .map(|(id, _)| *id)
            .collect()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if crate::share::is_current(&self.pool) {
            crate::share::enter(None);
        }
    }
}
