//! One node's data plane driven without root: the recording backend for the
//! kernel, an in-memory store for Raft, a fake gossip task.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Mutex;

use shoal_mesh::Command;
use shoal_mesh::fixtures::{cluster_info, node};
use shoal_mesh::network::{Driver as NetDriver, NetworkSpec};
use shoal_mesh::service::{Attachment, EndpointMode, ServiceMode, ServiceSpec};
use shoal_mesh::task::TaskState;
use shoal_netdriver::model::Kernel;
use shoal_netdriver::recording::Recording;
use shoal_raft::MemoryStore;

use super::*;
use shoal_mesh::TaskId;

const ME: NodeId = NodeId(1);
const OTHER: NodeId = NodeId(2);

/// Two nodes, an overlay `web`, a service on it, task `t1` here and `t2`
/// on the other node, both running.
fn store() -> MemoryStore {
    let store = MemoryStore::new(ClusterState::default());
    let cluster = cluster_info("c");
    let spec = ServiceSpec {
        name: "api".into(),
        mode: ServiceMode::Replicated(2),
        networks: vec![Attachment {
            network: "web".into(),
            aliases: vec![],
        }],
        ports: vec![],
        endpoint_mode: EndpointMode::Vip,
        constraints: vec![],
        env: BTreeMap::new(),
        command: vec!["x".into()],
        labels: BTreeMap::new(),
        restart: Default::default(),
        update: Default::default(),
        container: None,
        ext: Default::default(),
    };
    let mut cmds = vec![
        Command::Init {
            cluster,
            first: node(ME.0),
            ingress_id: "ing".into(),
        },
        Command::AddNode(node(OTHER.0)),
        Command::CreateNetwork {
            id: "web".into(),
            spec: NetworkSpec::new("web", NetDriver::Overlay),
            created_at_ms: 0,
            avoid: vec![],
        },
        Command::CreateService {
            id: "svc".into(),
            spec,
            created_at_ms: 0,
        },
    ];
    for (id, slot, n) in [("t1", 1, ME), ("t2", 2, OTHER)] {
        cmds.push(Command::AddTask {
            id: id.into(),
            service_id: "svc".into(),
            slot: Some(slot),
            node: Some(n),
            message: String::new(),
            restarts: 0,
            now_ms: 0,
        });
        for state in [TaskState::Starting, TaskState::Running] {
            cmds.push(Command::SetTaskState {
                id: id.into(),
                state,
                message: String::new(),
                exit_code: None,
                now_ms: 1,
            });
        }
    }
    for c in &cmds {
        store.apply(c).unwrap();
    }
    store
}

/// What the fake gossip shows and what it was told.
#[derive(Default)]
struct Gossiped {
    endpoints: BTreeMap<String, Vec<EndpointRecord>>,
    told: Vec<String>,
}

/// A gossip handle served by a task that answers from `seen`.
fn fake_gossip(seen: Arc<Mutex<Gossiped>>) -> GossipHandle {
    let (handle, rx) = GossipHandle::channel();
    let mut rx = rx.cmds;
    tokio::spawn(async move {
        while let Some(cmd) = rx.recv().await {
            let mut g = seen.lock().unwrap();
            match cmd {
                GossipCmd::Endpoints(tx) => drop(tx.send(g.endpoints.clone())),
                GossipCmd::Members(tx) => drop(tx.send(Vec::new())),
                GossipCmd::Put {
                    network,
                    key,
                    reply,
                    ..
                } => {
                    g.told.push(format!("put {network} {key}"));
                    drop(reply.send(Ok(())));
                }
                GossipCmd::Delete {
                    network,
                    key,
                    reply,
                    ..
                } => {
                    g.told.push(format!("delete {network} {key}"));
                    drop(reply.send(Ok(())));
                }
                GossipCmd::Join(n) => g.told.push(format!("join {n}")),
                GossipCmd::Leave(n) => g.told.push(format!("leave {n}")),
                _ => {}
            }
        }
    });
    handle
}

fn driver(store: &MemoryStore, seen: &Arc<Mutex<Gossiped>>) -> Driver<Recording> {
    let cfg = DataplaneConfig::default();
    let ctx = DataplaneCtx {
        id: ME,
        state: store.handle(),
        gossip: fake_gossip(seen.clone()),
        sandboxes: Arc::new(Sandboxes::new(&cfg, "dptest", true)),
        health: Default::default(),
        cfg,
    };
    Driver::new(ctx, Recording::default()).expect("a data plane")
}

async fn kernel(d: &mut Driver<Recording>) -> Kernel {
    let prefix = d.names.prefix.clone();
    d.backend.observe(&prefix).await.unwrap()
}

fn ip_of(store: &MemoryStore, task: &str) -> Ipv4Addr {
    store.handle().state().tasks[task].addresses["web"]
}

#[tokio::test]
async fn a_node_programs_its_tasks_publishes_them_and_follows_gossip() {
    let store = store();
    let seen = Arc::new(Mutex::new(Gossiped::default()));
    let mut d = driver(&store, &seen);
    d.pass(false).await;
    // Its task's sandbox and the overlay are made; the executor may start it.
    let k = kernel(&mut d).await;
    let names = d.names.clone();
    assert!(k.namespaces.contains_key(&names.task("t1")), "{k:#?}");
    assert!(k.namespaces.contains_key(&names.network("web")));
    assert!(!k.namespaces.contains_key(&names.task("t2")));
    assert!(d.ctx.sandboxes.view().ready.contains("t1"));
    // The other node's task is reachable through its VTEP (the store places
    // it there), but not balanced to until gossip shows it live.
    let web = &k.namespaces[&names.network("web")];
    let t2 = ip_of(&store, "t2");
    assert!(
        web.fdb
            .iter()
            .any(|f| f.dst == Ipv4Addr::new(192, 168, 0, 2)
                && f.mac == shoal_mesh::plan::mac_for(t2))
    );
    let vip = store.handle().state().services["svc"].vips["web"];
    let lb = &k.namespaces[&names.task("t1")].lb;
    assert_eq!(
        lb[&vip].iter().copied().collect::<Vec<_>>(),
        vec![ip_of(&store, "t1")]
    );
    // Attached to the network's gossip, its endpoint published.
    let told = told_eventually(&seen, "join web").await;
    assert!(told.contains(&"put web t1".to_owned()), "{told:?}");

    // Gossip shows the other node's task: it joins the VIP.
    let record = EndpointRecord {
        ip: t2.into(),
        mac: mac_text(&shoal_mesh::plan::mac_for(t2)),
        name: "api.2".into(),
        service_id: Some("svc".into()),
        service_name: Some("api".into()),
        aliases: vec![],
        owner: OTHER,
        vtep: Ipv4Addr::new(192, 168, 0, 2).into(),
    };
    seen.lock()
        .unwrap()
        .endpoints
        .insert("web".into(), vec![record]);
    d.pass(false).await;
    let k = kernel(&mut d).await;
    assert_eq!(k.namespaces[&names.task("t1")].lb[&vip].len(), 2);

    // The store stops the local task: its sandbox goes, its record too, and
    // with no local endpoint left the node leaves the network.
    store
        .apply(&Command::ShutdownTask {
            id: "t1".into(),
            now_ms: 2,
        })
        .unwrap();
    d.pass(false).await;
    let k = kernel(&mut d).await;
    assert!(!k.namespaces.contains_key(&names.task("t1")), "{k:#?}");
    assert!(!k.namespaces.contains_key(&names.network("web")));
    assert!(d.ctx.sandboxes.view().ready.is_empty());
    // (Join and leave are sent without an answer: wait until it has them.)
    let told = told_eventually(&seen, "leave web").await;
    assert!(told.contains(&"delete web t1".to_owned()), "{told:?}");
}

/// What gossip was told, once it has been told `what` (at most 5 s).
async fn told_eventually(seen: &Arc<Mutex<Gossiped>>, what: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let told = seen.lock().unwrap().told.clone();
        if told.iter().any(|t| t == what) {
            return told;
        }
        assert!(
            Instant::now() < deadline,
            "gossip was never told `{what}`: {told:?}"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn an_unchanged_plan_is_not_programmed_again() {
    let store = store();
    let seen = Arc::new(Mutex::new(Gossiped::default()));
    let mut d = driver(&store, &seen);
    d.pass(false).await;
    let first = d.backend.applied.len();
    assert!(first > 0);
    d.pass(false).await;
    assert_eq!(
        d.backend.applied.len(),
        first,
        "nothing changed, nothing applied"
    );
    // Something else removes a namespace: a pass without an audit does not
    // look at the kernel; the audit puts it back.
    let gone = d
        .backend
        .kernel
        .namespaces
        .keys()
        .find(|ns| **ns != shoal_netdriver::model::HOST)
        .cloned()
        .expect("a task namespace");
    d.backend.kernel.namespaces.remove(&gone);
    d.pass(false).await;
    assert_eq!(d.backend.applied.len(), first, "no audit, no look");
    d.pass(true).await;
    assert!(
        kernel(&mut d).await.namespaces.contains_key(&gone),
        "put back"
    );
}

#[test]
fn an_idle_data_plane_waits_for_the_audit() {
    let s = Duration::from_secs;
    assert_eq!(next_pass(false, false, s(0)), AUDIT_EVERY);
    assert_eq!(next_pass(false, false, s(20)), s(10));
    assert_eq!(next_pass(false, false, s(40)), Duration::ZERO);
    // The listen gate polls; a failed reconcile is retried.
    assert_eq!(next_pass(true, false, s(0)), Duration::from_millis(200));
    assert_eq!(next_pass(false, true, s(0)), s(1));
}

fn plan_of(tasks: &[&str]) -> NodePlan {
    let mut p = NodePlan::default();
    for t in tasks {
        p.sandboxes.insert(
            TaskId::from(*t),
            shoal_mesh::plan::SandboxPlan {
                task: TaskId::from(*t),
                name: format!("{t}.1"),
                endpoints: vec![],
                dns: BTreeMap::new(),
                egress: true,
            },
        );
    }
    p
}

#[test]
fn the_listen_gate_lets_a_task_through_once_it_listens_or_has_waited_long_enough() {
    use shoal_netdriver::listeners::Listeners;
    let mut gate = ListenGate::default();
    let plan = plan_of(&["quiet", "web", "dns", "deaf"]);
    let held = BTreeMap::from([
        (TaskId::from("quiet"), vec![]),
        (TaskId::from("web"), vec![(Protocol::Tcp, 80)]),
        (
            TaskId::from("dns"),
            vec![(Protocol::Udp, 53), (Protocol::Tcp, 53)],
        ),
        (TaskId::from("deaf"), vec![(Protocol::Tcp, 80)]),
    ]);
    let listens = |tcp: &[u16], udp: &[u16]| Listeners {
        tcp: tcp.iter().copied().collect(),
        udp: udp.iter().copied().collect(),
    };
    let t0 = Instant::now();
    // web listens on a port of its own choosing, dns on UDP only.
    let heard = BTreeMap::from([
        (TaskId::from("web"), listens(&[8080], &[])),
        (TaskId::from("dns"), listens(&[], &[53])),
    ]);
    assert!(gate.decide(&plan, &held, &heard, t0).is_empty());
    let key = |t: &str| EndpointKey::Task(t.into());
    assert!(gate.lets_through(&key("quiet")), "no port: at once");
    assert!(!gate.lets_through(&key("web")) && !gate.lets_through(&key("dns")));
    assert!(
        gate.lets_through(&EndpointKey::Node(ME)),
        "a node's mesh address always"
    );
    assert!(gate.pending());
    // web now listens on 80, dns on both: through; deaf still not.
    let heard = BTreeMap::from([
        (TaskId::from("web"), listens(&[80], &[])),
        (TaskId::from("dns"), listens(&[53], &[53])),
    ]);
    let later = t0 + Duration::from_secs(1);
    assert!(gate.decide(&plan, &held, &heard, later).is_empty());
    assert!(gate.lets_through(&key("web")) && gate.lets_through(&key("dns")));
    assert!(!gate.lets_through(&key("deaf")));
    // deaf, held past the limit (counted from when first seen): through,
    // and named as let through without listening.
    let limit = t0 + LISTEN_WAIT_MAX + Duration::from_millis(1);
    let late = gate.decide(&plan, &held, &BTreeMap::new(), limit);
    assert_eq!(late, vec![TaskId::from("deaf")]);
    assert!(gate.lets_through(&key("deaf")) && !gate.pending());
    // A task that leaves the plan is forgotten: back, it waits again.
    gate.decide(
        &plan_of(&["quiet"]),
        &BTreeMap::new(),
        &BTreeMap::new(),
        limit,
    );
    assert!(!gate.lets_through(&key("web")));
}

#[tokio::test]
async fn a_task_with_a_health_check_is_balanced_to_only_while_healthy() {
    let store = store();
    let seen = Arc::new(Mutex::new(Gossiped::default()));
    let mut d = driver(&store, &seen);
    let t1 = TaskId::from("t1");
    d.ctx.health.checking(&t1);
    d.pass(false).await;
    let names = d.names.clone();
    let vip = store.handle().state().services["svc"].vips["web"];
    let backends = |k: &Kernel| {
        k.namespaces[&names.task("t1")]
            .lb
            .get(&vip)
            .map_or(0, |b| b.len())
    };
    // Starting: its sandbox is ready, but nothing balances to it.
    let k = kernel(&mut d).await;
    assert!(d.ctx.sandboxes.view().ready.contains("t1"));
    assert_eq!(backends(&k), 0, "{k:#?}");
    // Healthy: published and balanced to.
    d.ctx.health.set(&t1, true);
    d.pass(false).await;
    assert_eq!(backends(&kernel(&mut d).await), 1);
    let told = told_eventually(&seen, "put web t1").await;
    assert!(told.contains(&"join web".to_owned()), "{told:?}");
    // Unhealthy: withdrawn from gossip (so from every node) and from here.
    d.ctx.health.set(&t1, false);
    d.pass(false).await;
    assert_eq!(backends(&kernel(&mut d).await), 0);
    told_eventually(&seen, "delete web t1").await;
}
