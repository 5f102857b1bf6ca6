//! The scale simulation of issue 16: N nodes of the gossip core (the code
//! every daemon runs) on the in-memory network of `gossip::sim`, in
//! simulated time, deterministic for a seed. Each node runs 30 tasks: it is
//! on 3 networks of about `--network` members and publishes 10 endpoints on
//! each (so 150 000 endpoints at 5 000 nodes). Then, with 5 % of datagrams
//! lost:
//!
//! - once SWIM has passed on every arrival (a swarm that just formed keeps
//!   its packets full for a while; how long is printed), every node
//!   updates one of its endpoints every second for `--seconds`:
//!   the time for a sample of those updates to reach every member of the
//!   network (p50/p99/max), bytes sent per node per second, and the gossip
//!   core's CPU per node per simulated second (the CPU time of the run,
//!   on all its threads, divided by nodes and simulated seconds: every
//!   node's protocol work, and the simulator's);
//! - live nodes wrongly declared dead over the whole run (false positives);
//! - `--crashes` nodes crash, 5 s apart: the time until every live node has
//!   each dead (p50/p99/max over crashes).
//!
//! ```text
//! cargo bench -p shoal-gossip --bench scale -- [--nodes 100,1000,5000]
//!     [--seconds 300] [--network 100] [--crashes 10] [--seed 1]
//!     [--suspect-ms MS] [--indirect K] [--small-keys] [--threads 2] [--formed]
//! ```
//!
//! `--formed` starts the swarm formed (`Sim::start_formed`: every node
//! holds every other's certificate, claim and `networks` entry, with
//! nothing left for SWIM to pass on) instead of simulating nodes joining
//! 100 a second: forming a swarm costs O(n²) messages, hours at 5 000.
//!
//! The nodes run on `--threads` threads (1 or 2; default 2): the results
//! are the same on either, the wall time is not.
//!
//! Entries, certificates and signatures have a real swarm's sizes: endpoint
//! records with 25-character task and service IDs, 423-byte node
//! certificates, 71-byte ECDSA signatures (`--small-keys`: 8 bytes each,
//! for less memory, and bytes sent that are then too low).
//!
//! The dispatch of the store to workers (the feed) is not simulated here;
//! `shoal-lab scale` measures it with real daemons.

#![allow(missing_docs, clippy::unwrap_used, clippy::print_stdout)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use shoal_gossip::sim::Sim;
use shoal_gossip::table::Change;
use shoal_gossip::{Event, GossipConfig, MemberState};
use shoal_mesh::NodeId;
use shoal_mesh::observed::{EndpointRecord, TableValue};

struct Args {
    nodes: Vec<u64>,
    seconds: u64,
    network: u64,
    crashes: u64,
    seed: u64,
    /// SWIM's suspicion timeout (the core's default if not given).
    suspect_ms: Option<u64>,
    /// SWIM's indirect probes (the core's default if not given).
    indirect: Option<u64>,
    /// 8-byte certificates and signatures instead of a real node's sizes
    /// (less memory; the bytes sent are then too low).
    small_keys: bool,
    /// Threads that run the nodes.
    threads: usize,
    /// Start from a formed swarm (`Sim::start_formed`) instead of nodes
    /// joining 100 a second.
    formed: bool,
}

fn args() -> Args {
    let mut a = Args {
        nodes: vec![100, 1000, 5000],
        seconds: 300,
        network: 100,
        crashes: 10,
        seed: 1,
        suspect_ms: None,
        indirect: None,
        small_keys: false,
        threads: 2,
        formed: false,
    };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let value = argv.get(i + 1).cloned().unwrap_or_default();
        let num = || -> u64 {
            value
                .parse()
                .unwrap_or_else(|_| panic!("{}: not a number: {value:?}", argv[i]))
        };
        match argv[i].as_str() {
            "--nodes" => {
                a.nodes = value
                    .split(',')
                    .map(|v| v.parse().expect("--nodes: numbers, comma separated"))
                    .collect();
            }
            "--seconds" => a.seconds = num(),
            "--network" => a.network = num(),
            "--crashes" => a.crashes = num(),
            "--seed" => a.seed = num(),
            "--suspect-ms" => a.suspect_ms = Some(num()),
            "--indirect" => a.indirect = Some(num()),
            "--threads" => {
                a.threads = match num() {
                    t @ (1 | 2) => t as usize,
                    t => panic!("--threads: 1 or 2, not {t}"),
                }
            }
            "--small-keys" => {
                a.small_keys = true;
                i += 1;
                continue;
            }
            "--formed" => {
                a.formed = true;
                i += 1;
                continue;
            }
            // cargo bench passes `--bench`.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

/// CPU time this process has used (user and system), from
/// `/proc/self/stat`: what the simulation costs, whatever else runs.
fn cpu_time() -> std::time::Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) close with ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    // Clock ticks of 10 ms (USER_HZ is 100 on Linux).
    std::time::Duration::from_millis(fields.iter().sum::<u64>() * 10)
}

fn pct(v: &mut [u64], q: f64) -> u64 {
    v.sort_unstable();
    if v.is_empty() {
        return 0;
    }
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

/// A task's key in the `endpoints` table: 25 characters, like a task ID.
fn task_key(node: u64, net: usize, slot: u64) -> String {
    format!("t{node:011}{net}{slot:012}")
}

/// Task `slot` of `node`'s endpoint record, `n`-th version: the fields and
/// sizes a real one has (a task name `service.slot.id`, a service ID and
/// name, a MAC, the node's VTEP).
fn value(node: u64, slot: u64, n: u64) -> TableValue {
    let ip = |x: u64| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (x % 0x00ff_ffff) as u32));
    TableValue::Endpoint(EndpointRecord {
        ip: ip(node * 32 + slot),
        mac: format!(
            "02:42:0a:{:02x}:{:02x}:{:02x}",
            node % 256,
            slot % 256,
            n % 256
        ),
        name: format!(
            "svc{:05}.{}.{:025}",
            node % 1000,
            slot + 1,
            node * 100 + slot
        ),
        service_id: Some(format!("{:025}", node % 1000)),
        service_name: Some(format!("svc{:05}", node % 1000)),
        aliases: Vec::new(),
        owner: NodeId(node),
        vtep: ip(node),
    })
}

/// The 3 networks node `i` is on, of `count`: consecutive nodes share
/// networks, so each has about `3 n / count` members.
fn networks_of(i: u64, count: u64) -> Vec<String> {
    let mut nets: Vec<u64> = (0..3).map(|k| (i * 3 + k) % count).collect();
    nets.sort_unstable();
    nets.dedup();
    nets.into_iter().map(|n| format!("net{n}")).collect()
}

/// Alive members each up node sees (itself included), min over nodes.
fn min_alive(sim: &Sim) -> usize {
    sim.nodes
        .values()
        .filter(|n| n.up)
        .map(|n| n.gossip.alive_count())
        .min()
        .unwrap_or(0)
}

/// What the daemon does every 10 s with the store's list of nodes
/// (`Gossip::directory`): every node is given every node's address.
fn directory(sim: &mut Sim) {
    let peers: Vec<shoal_gossip::Peer> =
        sim.nodes.values().map(|x| x.gossip.me().clone()).collect();
    for id in sim.up() {
        sim.with_node(id, |g, now| g.directory(now, peers.iter().cloned()));
    }
}

/// Nodes join 100 a second (10 every 100 ms), through three seeds, as a
/// swarm grows, each already attached to its networks (as a daemon that
/// restarts with tasks is); then runs until every node sees every other
/// alive (at most 120 s).
fn join(sim: &mut Sim, n: u64, count: u64, t0: u64) {
    for i in 1..=n {
        let nets = networks_of(i, count);
        sim.start(NodeId(i), &[NodeId(1), NodeId(2), NodeId(3)]);
        sim.with_node(NodeId(i), |g, now| {
            for net in &nets {
                g.join_network(now, net);
            }
        });
        if i % 10 == 0 {
            sim.run_for(100);
        }
    }
    let mut converged = None;
    for s in 0..120 {
        if s % 10 == 0 {
            directory(sim);
        }
        sim.run_for(1_000);
        if min_alive(sim) == n as usize {
            converged = Some(sim.now() - t0);
            break;
        }
    }
    match converged {
        Some(ms) => println!(
            "{n} nodes: every node sees all {n} alive {} s after the first start",
            ms / 1000
        ),
        None => {
            println!(
                "{n} nodes: NOT converged after 120 s: the least informed node sees {} alive",
                min_alive(sim)
            );
            for (id, node) in sim.nodes.iter().filter(|(_, x)| x.up) {
                let ms = node.gossip.members();
                if ms.len() < n as usize || ms.iter().any(|m| m.state != MemberState::Alive) {
                    let odd: Vec<String> = ms
                        .iter()
                        .filter(|m| m.state != MemberState::Alive)
                        .map(|m| format!("{}={:?}", m.node_id, m.state))
                        .collect();
                    let known: BTreeSet<NodeId> = ms.iter().map(|m| m.node_id).collect();
                    let missing: Vec<NodeId> =
                        (1..=n).map(NodeId).filter(|m| !known.contains(m)).collect();
                    let global: Vec<bool> = missing
                        .iter()
                        .map(|m| {
                            node.gossip
                                .tables()
                                .get(&shoal_gossip::core::networks_key(*m))
                                .is_some()
                        })
                        .collect();
                    println!(
                        "  node {id}: knows {} members; not alive: {odd:?}; missing {missing:?} (global entry held: {global:?}, SWIM: {:?}); refused: {:?}",
                        ms.len(),
                        missing
                            .iter()
                            .map(|m| node.gossip.swim_view(*m))
                            .collect::<Vec<_>>(),
                        node.gossip.rejected
                    );
                }
            }
        }
    }
}

fn run(n: u64, a: &Args) {
    let wall = Instant::now();
    let mut config = GossipConfig {
        cluster_size_hint: n as u32,
        ..Default::default()
    };
    if let Some(ms) = a.suspect_ms {
        config.suspect_to_down_ms = ms;
    }
    if let Some(k) = a.indirect {
        config.indirect_probes = k as usize;
    }
    let mut sim = Sim::new(a.seed, config, 10_000_000);
    if a.small_keys {
        sim.key_sizes = (8, 8);
    }
    sim.threads = a.threads;
    println!(
        "{n} nodes: certificates of {} bytes, signatures of {}",
        sim.key_sizes.0, sim.key_sizes.1
    );
    let t0 = sim.now();
    let count = (n * 3 / a.network).max(1);
    let mut members: BTreeMap<String, BTreeSet<NodeId>> = BTreeMap::new();
    for i in 1..=n {
        for net in networks_of(i, count) {
            members.entry(net).or_default().insert(NodeId(i));
        }
    }
    if a.formed {
        let nodes: Vec<(NodeId, Vec<String>)> = (1..=n)
            .map(|i| (NodeId(i), networks_of(i, count)))
            .collect();
        let refused = sim.start_formed(&nodes, 300);
        sim.run_for(1_000);
        println!(
            "{n} nodes: started formed in {:.0} s of wall time ({refused} refused); the least informed node sees {} alive",
            wall.elapsed().as_secs_f64(),
            min_alive(&sim)
        );
    } else {
        join(&mut sim, n, count, t0);
    }
    // Endpoints: 30 tasks a node.
    for i in 1..=n {
        let nets = networks_of(i, count);
        sim.with_node(NodeId(i), |g, now| {
            for (k, net) in nets.iter().enumerate() {
                for e in 0..10 {
                    let key = task_key(i, k, e);
                    g.put(now, net, "endpoints", &key, value(i, e, 0)).unwrap();
                }
            }
        });
    }
    sim.run_for(10_000);
    // Every node passes each arrival on ln(n) + 7 times: a swarm that just
    // formed keeps its packets full for a while. The load is measured on
    // a swarm that has settled.
    let settle = sim.now();
    let backlog = |sim: &Sim| {
        sim.nodes
            .values()
            .filter(|x| x.up)
            .map(|x| x.gossip.swim_backlog())
            .max()
            .unwrap_or(0)
    };
    while backlog(&sim) > 0 && sim.now() - settle < 600_000 {
        sim.run_for(1_000);
    }
    println!(
        "{n} nodes: SWIM's backlog of the joins passed on {} s after the endpoints were written ({} updates left on the most behind node)",
        (sim.now() - settle) / 1000 + 10,
        backlog(&sim)
    );
    let sizes: Vec<usize> = members.values().map(BTreeSet::len).collect();
    println!(
        "{n} nodes: {count} networks of {}–{} members, {} endpoints, set up in {:.0} s of wall time",
        sizes.iter().min().unwrap_or(&0),
        sizes.iter().max().unwrap_or(&0),
        n * 30,
        wall.elapsed().as_secs_f64()
    );

    // Load: one update per node per second, 5 % loss.
    sim.datagram_loss = 0.05;
    for v in sim.bytes_sent.values_mut() {
        *v = 0;
    }
    sim.record_events = true;
    sim.events.clear();
    let sample_every = (n / 50).max(1);
    // Sampled update key → (network, written at, members still without it).
    let mut pending: BTreeMap<String, (u64, BTreeSet<NodeId>)> = BTreeMap::new();
    let mut times = Vec::new();
    let mut unfinished = 0;
    let mut false_dead: BTreeSet<NodeId> = BTreeSet::new();
    let mut declarations = 0u64;
    let load_cpu = cpu_time();
    let mut drain = |sim: &mut Sim,
                     pending: &mut BTreeMap<String, (u64, BTreeSet<NodeId>)>,
                     times: &mut Vec<u64>| {
        for (at, node, e) in sim.events.drain(..) {
            match e {
                Event::Entry(Change::Added(k, _) | Change::Updated(k, _)) => {
                    if let Some((start, left)) = pending.get_mut(&k.key) {
                        left.remove(&node);
                        if left.is_empty() {
                            times.push(at - *start);
                            pending.remove(&k.key);
                        }
                    }
                }
                Event::Member {
                    node: m,
                    state: MemberState::Dead,
                } => {
                    declarations += 1;
                    false_dead.insert(m);
                }
                _ => {}
            }
        }
    };
    for s in 0..a.seconds {
        if s % 10 == 0 {
            directory(&mut sim);
        }
        for i in 1..=n {
            let nets = networks_of(i, count);
            let k = ((i + s) % nets.len() as u64) as usize;
            let e = s % 10;
            let key = task_key(i, k, e);
            let net = nets[k].clone();
            if (i + s) % sample_every == 0 {
                let mut left = members[&net].clone();
                left.remove(&NodeId(i));
                // Updating the same key again restarts its clock.
                pending.insert(key.clone(), (sim.now(), left));
            }
            sim.with_node(NodeId(i), |g, now| {
                g.put(now, &net, "endpoints", &key, value(i, e, s + 1))
                    .unwrap();
            });
            // Spread the writes over the second.
            if i % (n / 10).max(1) == 0 {
                sim.run_for(100);
                drain(&mut sim, &mut pending, &mut times);
            }
        }
        // Updates older than 10 s that still have not arrived count as lost.
        let now = sim.now();
        pending.retain(|_, (start, _)| {
            let keep = now - *start < 10_000;
            if !keep {
                unfinished += 1;
            }
            keep
        });
    }
    sim.run_for(2_000);
    drain(&mut sim, &mut pending, &mut times);
    let load_cpu = cpu_time() - load_cpu;
    let bytes: u64 = sim.bytes_sent.values().sum();
    let per_node = bytes as f64 / n as f64 / (a.seconds as f64 + 2.0);
    let max_node =
        sim.bytes_sent.values().max().copied().unwrap_or(0) as f64 / (a.seconds as f64 + 2.0);
    let mut t = times.clone();
    println!(
        "{n} nodes: update to every member of its network: n={} p50={} ms p99={} ms max={} ms, {} not everywhere within 10 s",
        t.len(),
        pct(&mut t, 0.5),
        pct(&mut t, 0.99),
        t.last().copied().unwrap_or(0),
        unfinished + pending.len()
    );
    println!(
        "{n} nodes: bytes sent per node per second: mean {:.0} ({:.0} kbit/s), busiest node {:.0} ({:.0} kbit/s)",
        per_node,
        per_node * 8.0 / 1000.0,
        max_node,
        max_node * 8.0 / 1000.0
    );
    println!(
        "{n} nodes: gossip CPU per node: {:.0} µs per simulated second ({:.3} % of a core)",
        load_cpu.as_micros() as f64 / n as f64 / (a.seconds as f64 + 2.0),
        load_cpu.as_secs_f64() / n as f64 / (a.seconds as f64 + 2.0) * 100.0
    );
    println!(
        "{n} nodes: false positives over {} s at 5 % loss: {declarations} dead declarations of {} live nodes",
        a.seconds,
        false_dead.len()
    );

    // Failure detection: crashes 5 s apart, still 5 % loss.
    let mut detect = Vec::new();
    let mut undetected = 0;
    for c in 0..a.crashes {
        let victim = NodeId(1 + (c * 7919 + 17) % n);
        if victim.0 <= 3 {
            continue;
        }
        let start = sim.now();
        match sim.crash_and_detect(victim, 30_000) {
            Some(took) => detect.push(took),
            None => undetected += 1,
        }
        sim.run_for(5_000usize.saturating_sub((sim.now() - start) as usize) as u64);
    }
    let mut d = detect.clone();
    println!(
        "{n} nodes: crash to dead on every live node: n={} p50={} ms p99={} ms max={} ms, {undetected} not everywhere within 30 s",
        d.len(),
        pct(&mut d, 0.5),
        pct(&mut d, 0.99),
        d.last().copied().unwrap_or(0),
    );
    println!(
        "{n} nodes: done in {:.0} s of wall time",
        wall.elapsed().as_secs_f64()
    );
}

fn main() {
    let a = args();
    for &n in &a.nodes {
        run(n, &a);
    }
}
