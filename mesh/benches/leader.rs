//! The leader's work as the swarm grows (issue 16): what a pass of the
//! orchestrator costs the leader over a settled store of N nodes with 30
//! tasks each (150 000 tasks at 5 000 nodes), and what else grows with
//! the store. The daemon's leader runs a pass on every change of the
//! store or of the members, and at least every 5 s (its audit), under the
//! store's read lock; the data plane and the executor of every node plan
//! on each change (they copied the whole store for it until 2026-12-07),
//! and every replica of the store applies each new task.
//!
//! ```text
//! cargo bench -p shoal-mesh --bench leader -- [--nodes 100,1000,5000]
//! ```
//!
//! Each service has 250 replicas on a network of its own (a /24 holds
//! 254 addresses), so N nodes run 0.12 N services. Times are the median
//! of several runs on a store built through `apply`, as Raft builds it.

#![allow(missing_docs, clippy::unwrap_used, clippy::print_stdout)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use shoal_mesh::network::{Driver, NetworkSpec};
use shoal_mesh::observed::EndpointRecord;
use shoal_mesh::orchestrator::orchestrate_due;
use shoal_mesh::plan::PlanInput;
use shoal_mesh::service::{Attachment, EndpointMode, ServiceMode, ServiceSpec};
use shoal_mesh::task::{TaskReport, TaskState};
use shoal_mesh::{Availability, ClusterState, Command, Node, NodeId, Role, apply};

const REPLICAS: u64 = 250;

fn node(id: u64) -> Node {
    Node {
        id: NodeId(id),
        hostname: format!("host-{id:05}"),
        role: if id <= 3 { Role::Manager } else { Role::Worker },
        availability: Availability::Active,
        labels: BTreeMap::new(),
        addr: format!("10.{}.{}.{}:2377", id >> 16, (id >> 8) & 255, id & 255),
        joined_at_ms: 0,
    }
}

fn service(k: u64) -> ServiceSpec {
    ServiceSpec {
        name: format!("svc{k:04}"),
        mode: ServiceMode::Replicated(REPLICAS),
        networks: vec![Attachment {
            network: format!("net{k:04}").into(),
            aliases: vec![],
        }],
        ports: vec![],
        endpoint_mode: EndpointMode::Vip,
        constraints: vec![],
        env: BTreeMap::new(),
        command: vec!["sleep".into(), "infinity".into()],
        labels: BTreeMap::new(),
        restart: Default::default(),
        update: Default::default(),
        container: None,
        ext: Default::default(),
    }
}

/// Runs the orchestrator to a fixed point, applying what it proposes.
fn converge(s: &mut ClusterState, next: &mut u64) {
    for _ in 0..20 {
        let mut new_id = || {
            *next += 1;
            format!("{:025}", *next)
        };
        let (cmds, _) = orchestrate_due(s, &|_| true, &mut new_id, 1_000);
        if cmds.is_empty() {
            return;
        }
        for c in cmds {
            apply(s, &c).unwrap();
        }
    }
    panic!("the orchestrator did not settle");
}

/// A settled swarm of `n` nodes (3 managers) running 30 n tasks.
fn swarm(n: u64) -> ClusterState {
    let mut s = ClusterState::default();
    let init = Command::Init {
        cluster: shoal_mesh::fixtures::cluster_info("c"),
        first: node(1),
        ingress_id: "ingress".into(),
    };
    apply(&mut s, &init).unwrap();
    for i in 2..=n {
        apply(&mut s, &Command::AddNode(node(i))).unwrap();
    }
    let services = n * 30 / REPLICAS;
    for k in 0..services {
        let net = Command::CreateNetwork {
            id: format!("net{k:04}").into(),
            spec: NetworkSpec::new(&format!("net{k:04}"), Driver::Overlay),
            created_at_ms: 0,
            avoid: vec![],
        };
        apply(&mut s, &net).unwrap();
        let create = Command::CreateService {
            id: format!("{k:025}").into(),
            spec: service(k),
            created_at_ms: 0,
        };
        apply(&mut s, &create).unwrap();
    }
    let mut next = 0;
    converge(&mut s, &mut next);
    // Every task reports running, as its executor would.
    let reports: Vec<Command> = s
        .tasks
        .values()
        .filter_map(|t| {
            Some(Command::ReportTask {
                node: t.node?,
                report: TaskReport {
                    id: t.id.clone(),
                    state: TaskState::Running,
                    message: String::new(),
                    exit_code: None,
                    now_ms: 2_000,
                },
            })
        })
        .collect();
    for r in reports {
        apply(&mut s, &r).unwrap();
    }
    converge(&mut s, &mut next);
    s
}

/// What gossip shows a node: every task's endpoint on each network of
/// node `me`'s tasks.
fn endpoints(s: &ClusterState, me: NodeId) -> BTreeMap<String, Vec<EndpointRecord>> {
    let mut out: BTreeMap<String, Vec<EndpointRecord>> = BTreeMap::new();
    for t in s.tasks_on(me) {
        for net in t.addresses.keys() {
            if out.contains_key(net.as_str()) {
                continue;
            }
            let records = s.tasks_in(net).filter_map(|o| {
                let ip = o.addresses[net];
                Some(EndpointRecord {
                    ip: ip.into(),
                    mac: String::new(),
                    name: s.task_name(o),
                    service_id: Some(o.service_id.to_string()),
                    service_name: None,
                    aliases: vec![],
                    owner: o.node?,
                    vtep: std::net::Ipv4Addr::new(10, 0, 0, 1).into(),
                })
            });
            out.insert(net.to_string(), records.collect());
        }
    }
    out
}

/// This process's resident memory, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The median of `runs` timings of `f`.
fn median(runs: usize, mut f: impl FnMut()) -> Duration {
    let mut t: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    t.sort();
    t[t.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let mut nodes = vec![100, 1000, 5000];
    let argv: Vec<String> = std::env::args().collect();
    if let Some(i) = argv.iter().position(|a| a == "--nodes") {
        nodes = argv[i + 1]
            .split(',')
            .map(|v| v.parse().expect("--nodes: numbers, comma separated"))
            .collect();
    }
    println!(
        "| nodes | tasks | orchestrator pass (leader: each change, each 5 s audit) | idle leader: one pass per 5 s | a task added and removed (apply, every replica) | a node's data-plane plan (each change, every node) | a node's executor view (each change, every node) | copy of the store (what both took before) | store encoded (a feed snapshot) |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for n in nodes {
        let built = Instant::now();
        let s = swarm(n);
        let running = s
            .tasks
            .values()
            .filter(|t| t.state == TaskState::Running)
            .count();
        eprintln!(
            "{n} nodes: {running} tasks running, built in {:.1} s",
            built.elapsed().as_secs_f64()
        );
        // What the store and its index take in memory (a copy starts
        // without the index; the first lookup builds it).
        let before = rss_kib();
        let t = s.clone();
        let copied = rss_kib();
        let _ = t.tasks_on(NodeId(4)).count();
        let indexed = rss_kib();
        eprintln!(
            "{n} nodes: the store takes {:.0} MB, its index {:.0} MB more (resident memory)",
            copied.saturating_sub(before) as f64 / 1024.0,
            indexed.saturating_sub(copied) as f64 / 1024.0,
        );
        drop(t);
        let runs = if n >= 5000 { 5 } else { 15 };
        let copy = median(runs, || {
            std::hint::black_box(s.clone());
        });
        let mut next = 0u64;
        let pass = median(runs, || {
            let mut new_id = || {
                next += 1;
                next.to_string()
            };
            let (cmds, _) = orchestrate_due(&s, &|_| true, &mut new_id, 3_000);
            assert!(cmds.is_empty(), "a settled store needs nothing");
        });
        let me = NodeId(4);
        let seen = endpoints(&s, me);
        let plan = median(runs, || {
            std::hint::black_box(shoal_mesh::plan::plan(&PlanInput {
                state: &s,
                node: me,
                vtep: std::net::Ipv4Addr::new(10, 0, 0, 4),
                underlay_mtu: 1500,
                endpoints: &seen,
            }));
        });
        let view = median(runs, || {
            std::hint::black_box(s.node_view(me));
        });
        let mut bytes = 0;
        let encode = median(runs, || {
            bytes = shoal_mesh::codec::encode(&s).unwrap().len();
        });
        // A task added and removed again: what every replica of the store
        // (managers and fed workers) applies for each new task.
        let mut t = s.clone();
        let add = median(runs, || {
            let add = Command::AddTask {
                id: "bench-task".into(),
                service_id: format!("{:025}", 0).into(),
                slot: Some(REPLICAS + 1),
                node: Some(NodeId(4)),
                message: String::new(),
                restarts: 0,
                now_ms: 3_000,
            };
            apply(&mut t, &add).unwrap();
            apply(
                &mut t,
                &Command::RemoveTask {
                    id: "bench-task".into(),
                },
            )
            .unwrap();
        });
        println!(
            "| {n} | {running} | {:.1} ms | {:.2} % of a core | {:.2} ms | {:.2} ms | {:.3} ms | {:.1} ms | {:.1} MB in {:.0} ms |",
            ms(pass),
            ms(pass) / 5_000.0 * 100.0,
            ms(add),
            ms(plan),
            ms(view),
            ms(copy),
            bytes as f64 / 1e6,
            ms(encode),
        );
    }
}
