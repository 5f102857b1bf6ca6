//! Property test: random puts, deletes, network joins and leaves, crashes,
//! restarts, partitions and heals across 12 simulated nodes. After healing
//! and settling, for every seed:
//!
//! 1. all live members of a network hold identical visible tables;
//! 2. no entry of a crashed (not restarted) owner is visible anywhere;
//! 3. every entry a live owner holds is visible on every live member;
//! 4. no deleted entry is visible anywhere (nothing resurrected).
//!
//! `GOSSIP_SEEDS=N` runs N seeds (default 24); `GOSSIP_SEED=S` runs one.
//! A failure prints its seed.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use rand10::rngs::SmallRng;
use rand10::seq::IndexedRandom;
use rand10::{RngExt, SeedableRng};
use shoal_gossip::GossipConfig;
use shoal_gossip::sim::Sim;
use shoal_mesh::NodeId;
use shoal_mesh::observed::{TableValue, VtepRecord};

const NODES: u64 = 12;
const NETWORKS: [&str; 3] = ["a", "b", "c"];

fn value(n: u64, j: u64) -> TableValue {
    TableValue::Vtep(VtepRecord {
        node: NodeId(n),
        addr: IpAddr::V4(Ipv4Addr::new(10, (j >> 8) as u8, j as u8, n as u8)),
    })
}

fn run(seed: u64) -> Result<(), String> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut sim = Sim::new(seed, GossipConfig::default(), 5_000_000);
    sim.latency_ms = (1, 5);
    sim.datagram_loss = 0.02;
    for i in 1..=NODES {
        sim.start(NodeId(i), &[NodeId(1), NodeId(2)]);
    }
    sim.run_for(2_000);
    let ids: Vec<NodeId> = (1..=NODES).map(NodeId).collect();
    let mut crashed: BTreeSet<NodeId> = BTreeSet::new();
    let mut deleted: BTreeSet<(String, String)> = BTreeSet::new();
    let mut next_key = 0u64;
    for _ in 0..80 {
        let live: Vec<NodeId> = ids
            .iter()
            .copied()
            .filter(|i| !crashed.contains(i))
            .collect();
        let n = *live.choose(&mut rng).unwrap();
        match rng.random_range(0..100) {
            0..=39 => {
                let net = *NETWORKS.choose(&mut rng).unwrap();
                next_key += 1;
                let key = format!("{n}-{next_key}");
                sim.with_node(n, |g, now| {
                    g.join_network(now, net);
                    g.put(now, net, "vteps", &key, value(n.0, next_key))
                        .unwrap();
                });
            }
            40..=54 => {
                let owned: Vec<(String, String)> = sim.nodes[&n]
                    .gossip
                    .tables()
                    .all()
                    .filter(|(k, e)| e.owner == n && !e.is_tombstone() && k.table == "vteps")
                    .map(|(k, _)| (k.network.clone(), k.key.clone()))
                    .collect();
                if let Some((net, key)) = owned.choose(&mut rng).cloned() {
                    sim.with_node(n, |g, now| g.delete(now, &net, "vteps", &key).unwrap());
                    deleted.insert((net, key));
                }
            }
            55..=64 => {
                let net = *NETWORKS.choose(&mut rng).unwrap();
                sim.with_node(n, |g, now| g.join_network(now, net));
            }
            65..=72 => {
                let net = *NETWORKS.choose(&mut rng).unwrap();
                // Leaving deletes the node's entries there.
                for (k, e) in sim.nodes[&n].gossip.tables().all() {
                    if k.network == net && e.owner == n && k.table == "vteps" {
                        deleted.insert((k.network.clone(), k.key.clone()));
                    }
                }
                sim.with_node(n, |g, now| g.leave_network(now, net));
            }
            73..=78 if crashed.len() < 3 && live.len() > 4 => {
                sim.crash(n);
                crashed.insert(n);
            }
            79..=84 if !crashed.is_empty() => {
                let back = *crashed.iter().collect::<Vec<_>>().choose(&mut rng).unwrap();
                let back = *back;
                crashed.remove(&back);
                let seeds: Vec<NodeId> = live.clone();
                sim.start(back, &seeds);
            }
            85..=90 => {
                let mut shuffled = live.clone();
                let cut = rng.random_range(1..shuffled.len());
                shuffled.sort_by_key(|_| rng.random::<u32>());
                let (x, y) = shuffled.split_at(cut);
                sim.partition(vec![
                    x.iter().copied().collect(),
                    y.iter().copied().collect(),
                ]);
            }
            _ => sim.heal(),
        }
        sim.run_for(rng.random_range(20..600));
    }
    sim.heal();
    sim.datagram_loss = 0.0;
    sim.run_for(40_000);
    check(&sim, &crashed, &deleted)
}

fn check(
    sim: &Sim,
    crashed: &BTreeSet<NodeId>,
    deleted: &BTreeSet<(String, String)>,
) -> Result<(), String> {
    let live = sim.up();
    for net in NETWORKS {
        let members: Vec<NodeId> = live
            .iter()
            .copied()
            .filter(|n| sim.nodes[n].gossip.networks().contains(net))
            .collect();
        let views: BTreeMap<NodeId, Vec<_>> = members
            .iter()
            .map(|n| (*n, sim.nodes[n].gossip.snapshot(net)))
            .collect();
        if let Some((first, view)) = views.iter().next() {
            for (n, other) in &views {
                if other != view {
                    let members_of = |x: &NodeId| {
                        sim.nodes[x]
                            .gossip
                            .members()
                            .iter()
                            .map(|m| {
                                format!("{}:{:?}:{}", m.node_id.0, m.state, m.generation >> 16)
                            })
                            .collect::<Vec<_>>()
                            .join(" ")
                    };
                    return Err(format!(
                        "network {net}: node {n} and node {first} differ:\n{other:?}\nvs\n{view:?}\nmembers seen by {n}: {}\nmembers seen by {first}: {}",
                        members_of(n),
                        members_of(first)
                    ));
                }
            }
        }
        for owner in &members {
            for (k, e) in sim.nodes[owner].gossip.tables().all() {
                if k.network == net && e.owner == *owner && !e.is_tombstone() && k.table == "vteps"
                {
                    for m in &members {
                        if !sim.nodes[m]
                            .gossip
                            .snapshot(net)
                            .iter()
                            .any(|(mk, _)| mk == k)
                        {
                            return Err(format!(
                                "entry {k:?} of live owner {owner} missing on {m}"
                            ));
                        }
                    }
                }
            }
        }
    }
    for n in &live {
        let g = &sim.nodes[n].gossip;
        for net in NETWORKS {
            for (k, _) in g.snapshot(net) {
                let owner = g.tables().get(&k).unwrap().owner;
                if crashed.contains(&owner) {
                    return Err(format!(
                        "node {n} still shows {k:?} of crashed owner {owner}"
                    ));
                }
                if deleted.contains(&(k.network.clone(), k.key.clone())) {
                    return Err(format!("node {n} shows deleted entry {k:?}"));
                }
            }
        }
    }
    Ok(())
}

#[test]
fn tables_converge_under_random_faults() {
    let seeds: Vec<u64> = match std::env::var("GOSSIP_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => {
            let n: u64 = std::env::var("GOSSIP_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(24);
            (0..n).collect()
        }
    };
    for seed in seeds {
        if let Err(e) = run(seed) {
            panic!("seed {seed} failed (rerun with GOSSIP_SEED={seed}): {e}");
        }
    }
}
