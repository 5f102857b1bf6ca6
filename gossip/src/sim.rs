//! An in-memory network for many [`Gossip`] nodes in one process, in
//! simulated time: links with latency, datagram loss, partitions, crashes and
//! restarts. Deterministic for a given seed.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};

use rand10::rngs::SmallRng;
use rand10::{RngExt, SeedableRng};
use shoal_mesh::NodeId;

use crate::core::{Event, Gossip, GossipConfig};
use crate::peer::Peer;

/// A simulated node.
pub struct SimNode {
    /// Its gossip state machine.
    pub gossip: Gossip,
    /// Whether it runs (a crashed node neither sends nor receives).
    pub up: bool,
}

struct InFlight {
    from: NodeId,
    to: NodeId,
    bytes: Vec<u8>,
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
    /// One-way latency range, ms.
    pub latency_ms: (u64, u64),
    /// Probability that a datagram is lost.
    pub datagram_loss: f64,
    /// Nodes whose processing is delayed by this much (CPU-starved).
    pub slow: BTreeMap<NodeId, u64>,
    /// Bytes sent per node.
    pub bytes_sent: BTreeMap<NodeId, u64>,
    /// Messages sent per node.
    pub messages_sent: BTreeMap<NodeId, u64>,
    /// Every event, with the time and the node that saw it, if recording.
    pub events: Vec<(u64, NodeId, Event)>,
    /// Whether to record events.
    pub record_events: bool,
    /// Sizes of the certificates and signatures of nodes started from now
    /// on ([`crate::keys::SizedTestKeys`]): a real node's by default.
    pub key_sizes: (usize, usize),
    /// When the values shared among the nodes were last swept.
    swept_ms: u64,
}

/// How often (simulated ms) the values no node holds any longer leave the
/// thread's pool ([`crate::share`]).
const SWEEP_EVERY_MS: u64 = 10_000;

impl Sim {
    /// An empty network; time starts at `start_ms`. Its nodes share the
    /// equal values they hold ([`crate::share`], on for this thread).
    pub fn new(seed: u64, config: GossipConfig, start_ms: u64) -> Self {
        crate::share::enable();
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
            events: Vec::new(),
            record_events: false,
            key_sizes: (423, 71),
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
        self.nodes.insert(
            id,
            SimNode {
                gossip: g,
                up: true,
            },
        );
        self.after_step(id);
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

    fn after_step(&mut self, id: NodeId) {
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        let mut sends = Vec::new();
        while let Some(t) = n.gossip.poll_transmit() {
            sends.push(t);
        }
        while let Some(e) = n.gossip.poll_event() {
            if self.record_events {
                self.events.push((self.now_ms, id, e));
            }
        }
        let wake = n.gossip.poll_timeout();
        for t in sends {
            *self.bytes_sent.entry(id).or_default() += t.bytes.len() as u64;
            *self.messages_sent.entry(id).or_default() += 1;
            if t.datagram && self.datagram_loss > 0.0 && self.rng.random_bool(self.datagram_loss) {
                continue;
            }
            let (lo, hi) = self.latency_ms;
            let delay =
                self.rng.random_range(lo..=hi.max(lo)) + self.slow.get(&t.to).copied().unwrap_or(0);
            self.seq += 1;
            self.queue.push(Reverse((self.now_ms + delay, self.seq)));
            self.in_flight.insert(
                self.seq,
                InFlight {
                    from: id,
                    to: t.to,
                    bytes: t.bytes,
                },
            );
        }
        if self.scheduled.get(&id) != Some(&wake) {
            self.scheduled.insert(id, wake);
            self.wakeups.push(Reverse((wake, id)));
        }
    }

    /// Advances simulated time by `ms`, delivering messages and firing timers in order.
    pub fn run_for(&mut self, ms: u64) {
        let until = self.now_ms + ms;
        loop {
            let next_msg = self.queue.peek().map(|Reverse((t, _))| *t);
            let next_wake = self.wakeups.peek().map(|Reverse((t, _))| *t);
            let next = match (next_msg, next_wake) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) => a,
                (None, Some(b)) => b,
                (None, None) => break,
            };
            if next > until {
                break;
            }
            self.now_ms = self.now_ms.max(next);
            if self.now_ms >= self.swept_ms + SWEEP_EVERY_MS {
                self.swept_ms = self.now_ms;
                crate::share::sweep();
                // What a burst of messages grew the queues to.
                self.in_flight.shrink_to(self.in_flight.len() * 2);
                self.queue.shrink_to(self.queue.len() * 2);
            }
            if next_msg == Some(next) {
                let Some(Reverse((_, seq))) = self.queue.pop() else {
                    break;
                };
                let Some(m) = self.in_flight.remove(&seq) else {
                    continue;
                };
                let deliver = self.nodes.get(&m.to).is_some_and(|n| n.up)
                    && self.nodes.get(&m.from).is_some_and(|n| n.up)
                    && self.connected(m.from, m.to);
                if deliver {
                    let now = self.now_ms;
                    if let Some(n) = self.nodes.get_mut(&m.to) {
                        let _ = n.gossip.handle_message(now, m.from, &m.bytes);
                    }
                    self.after_step(m.to);
                }
            } else {
                let Some(Reverse((t, id))) = self.wakeups.pop() else {
                    break;
                };
                if self.scheduled.get(&id) != Some(&t) {
                    continue;
                }
                self.scheduled.remove(&id);
                let now = self.now_ms;
                if let Some(n) = self.nodes.get_mut(&id).filter(|n| n.up) {
                    n.gossip.handle_timeout(now);
                    self.after_step(id);
                }
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
        // What only this simulation's nodes held.
        self.nodes.clear();
        self.in_flight.clear();
        self.events.clear();
        crate::share::sweep();
    }
}
