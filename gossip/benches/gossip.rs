//! Gossip benchmarks in simulated time (the same core as the daemon, on the
//! in-memory network; links 1–3 ms):
//!
//! - propagation: time for one update to be visible on every member of a
//!   network of 10, 100 and 1000 nodes;
//! - failure detection: time from a crash to every member marking it dead;
//! - false positives under 5% datagram loss with one CPU-starved node;
//! - bytes sent per node per second, idle and under churn;
//! - wall time to take a message of 1000 entries signed with ECDSA P-256
//!   (the daemon's node keys), against the unsigned test keys.
//!
//! `cargo bench -p shoal-gossip --bench gossip [-- quick] [no-1000] [signing]`

#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use shoal_gossip::sim::Sim;
use shoal_gossip::table::Change;
use shoal_gossip::{Event, GossipConfig, MemberState};
use shoal_mesh::NodeId;
use shoal_mesh::observed::{TableValue, VtepRecord};

fn stats(name: &str, mut v: Vec<u64>) {
    v.sort();
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{name}: n={} min={}ms p50={}ms p99={}ms max={}ms",
        v.len(),
        v[0],
        p(0.5),
        p(0.99),
        v[v.len() - 1]
    );
}

fn cluster(n: u64, seed: u64) -> Sim {
    let config = GossipConfig {
        cluster_size_hint: n as u32,
        ..Default::default()
    };
    let mut sim = Sim::new(seed, config, 10_000_000);
    for i in 1..=n {
        sim.start(NodeId(i), &[NodeId(1), NodeId(2), NodeId(3)]);
    }
    sim.run_for(5_000);
    for i in 1..=n {
        sim.with_node(NodeId(i), |g, now| g.join_network(now, "net"));
    }
    sim.run_for(5_000);
    sim
}

fn value(i: u64) -> TableValue {
    TableValue::Vtep(VtepRecord {
        node: NodeId(i),
        addr: IpAddr::V4(Ipv4Addr::from(i as u32)),
    })
}

fn propagation(n: u64, trials: u64) {
    let mut sim = cluster(n, n);
    let mut times = Vec::new();
    for t in 0..trials {
        let writer = NodeId(1 + (t * 7919) % n);
        let key = format!("k{t}");
        sim.events.clear();
        sim.record_events = true;
        let start = sim.now();
        sim.with_node(writer, |g, now| {
            g.put(now, "net", "vteps", &key, value(t)).unwrap()
        });
        let mut seen: BTreeSet<NodeId> = BTreeSet::from([writer]);
        let mut last = start;
        while seen.len() < n as usize && sim.now() - start < 30_000 {
            sim.run_for(5);
            for (at, node, e) in sim.events.drain(..) {
                if let Event::Entry(Change::Added(k, _)) = &e
                    && k.key == key
                    && seen.insert(node)
                {
                    last = at;
                }
            }
        }
        sim.record_events = false;
        assert_eq!(
            seen.len(),
            n as usize,
            "update {key} did not reach everyone"
        );
        times.push(last - start);
        sim.run_for(200);
    }
    stats(&format!("propagation to all of {n} nodes"), times);
}

fn detection(n: u64, trials: u64) {
    let mut times = Vec::new();
    for t in 0..trials {
        let mut sim = cluster(n, 1000 + t);
        let victim = NodeId(1 + (t * 31) % n);
        let took = sim.crash_and_detect(victim, 60_000);
        let took = took.expect("not every member marked the crash");
        times.push(took);
    }
    stats(
        &format!("failure detection, every one of {n} nodes marks the dead one"),
        times,
    );
}

fn false_positives(n: u64, secs: u64) {
    let mut sim = cluster(n, 77);
    sim.datagram_loss = 0.05;
    sim.slow.insert(NodeId(n), 150);
    sim.record_events = true;
    sim.events.clear();
    sim.run_for(secs * 1000);
    let mut wrongly: BTreeSet<NodeId> = BTreeSet::new();
    let mut declarations = 0;
    for (_, _, e) in &sim.events {
        if let Event::Member {
            node,
            state: MemberState::Dead,
        } = e
        {
            declarations += 1;
            wrongly.insert(*node);
        }
    }
    println!(
        "false positives, {n} nodes, 5% datagram loss, node {n} answers 150 ms late, {secs} s: {declarations} dead declarations of {} distinct live nodes ({:.1}% of nodes)",
        wrongly.len(),
        100.0 * wrongly.len() as f64 / n as f64
    );
}

fn bandwidth(n: u64, churn: bool) {
    let mut sim = cluster(n, 5);
    for v in sim.bytes_sent.values_mut() {
        *v = 0;
    }
    let secs = 30;
    for s in 0..secs {
        if churn {
            for i in 1..=n {
                let key = format!("c{i}-{s}");
                sim.with_node(NodeId(i), |g, now| {
                    g.put(now, "net", "vteps", &key, value(i)).unwrap()
                });
            }
        }
        sim.run_for(1_000);
    }
    let total: u64 = sim.bytes_sent.values().sum();
    println!(
        "bytes per node per second, {n} nodes, {}: {:.0}",
        if churn {
            "one update per node per second"
        } else {
            "idle"
        },
        total as f64 / n as f64 / secs as f64
    );
}

/// ECDSA P-256 keys as the daemon's (`node/src/daemon/entry_keys.rs`),
/// without the CA check (done once per owner and cached there): the
/// "certificate" is the public key.
struct Ecdsa {
    pair: ring::signature::EcdsaKeyPair,
    rng: ring::rand::SystemRandom,
}

impl Ecdsa {
    fn new() -> Self {
        use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        Ecdsa { pair, rng }
    }
}

impl Ecdsa {
    fn public_key(&self) -> Vec<u8> {
        use ring::signature::KeyPair;
        self.pair.public_key().as_ref().to_vec()
    }

    fn signature(&self, msg: &[u8]) -> Vec<u8> {
        self.pair.sign(&self.rng, msg).unwrap().as_ref().to_vec()
    }
}

/// One ECDSA pair shared by the bench's nodes (so the receiver checks the
/// owner's entries against the owner's real public key).
struct SharedEcdsa(std::sync::Arc<Ecdsa>);

impl shoal_gossip::Keys for SharedEcdsa {
    fn cert(&self) -> Vec<u8> {
        self.0.public_key()
    }

    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.0.signature(msg)
    }

    fn verify(&mut self, _owner: NodeId, cert: &[u8], msg: &[u8], sig: &[u8]) -> bool {
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, cert)
            .verify(msg, sig)
            .is_ok()
    }
}

/// Wall time for node 1 to take one message carrying `n` entries of
/// node 2's, with `keys` making both nodes' keys.
fn signed_sync(name: &str, n: u64, keys: &dyn Fn(NodeId) -> Box<dyn shoal_gossip::Keys>) {
    use shoal_gossip::message::{Message, TableMessage};
    use shoal_gossip::{Gossip, Peer};
    let peer = |i: u64| Peer {
        id: NodeId(i),
        addr: format!("sim:{i}").into(),
        generation: 1 << 16,
        bump: 0,
    };
    let mut owner = Gossip::new(peer(2), GossipConfig::default(), 2, 1, keys(NodeId(2)));
    owner.join_network(1, "net");
    for i in 0..n {
        owner
            .put(2, "net", "vteps", &i.to_string(), value(i))
            .unwrap();
    }
    let entries: Vec<_> = owner
        .tables()
        .all()
        .filter(|(k, _)| k.network == "net")
        .map(|(k, e)| (k.clone().into(), e.clone().into()))
        .collect();
    let sender = owner
        .tables()
        .get(&shoal_gossip::core::networks_key(NodeId(2)))
        .cloned();
    let msg = Message::Table {
        sender,
        body: TableMessage::Entries {
            network: "net".into(),
            entries,
        },
        certs: vec![(NodeId(2), keys(NodeId(2)).cert().into())],
    };
    let bytes = shoal_mesh::codec::encode(&msg).unwrap();
    let mut times = Vec::new();
    for _ in 0..5 {
        let mut g = Gossip::new(peer(1), GossipConfig::default(), 1, 1, keys(NodeId(1)));
        g.join_network(1, "net");
        let started = std::time::Instant::now();
        let _ = g.handle_message(3, NodeId(2), &bytes);
        times.push(started.elapsed().as_micros() as u64);
    }
    times.sort();
    println!(
        "{name}: one message of {n} entries ({} KiB) taken in {} µs (median of 5), {:.1} µs an entry",
        bytes.len() / 1024,
        times[2],
        times[2] as f64 / n as f64
    );
}

fn main() {
    if std::env::args().any(|a| a == "signing") {
        signed_sync("test keys", 1000, &|id| {
            Box::new(shoal_gossip::TestKeys(id))
        });
        let shared = std::sync::Arc::new(Ecdsa::new());
        signed_sync("ECDSA P-256", 1000, &|_| {
            Box::new(SharedEcdsa(shared.clone()))
        });
        return;
    }
    let quick = std::env::args().any(|a| a == "quick");
    let large = !std::env::args().any(|a| a == "no-1000");
    propagation(10, 50);
    propagation(100, 50);
    if large {
        propagation(1000, if quick { 5 } else { 20 });
    }
    detection(10, 20);
    detection(100, if quick { 5 } else { 20 });
    if large && !quick {
        detection(1000, 5);
    }
    false_positives(20, 300);
    bandwidth(10, false);
    bandwidth(100, false);
    bandwidth(10, true);
    bandwidth(100, true);
}
