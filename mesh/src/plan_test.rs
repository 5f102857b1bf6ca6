use std::net::IpAddr;

use super::*;
use crate::apply::{Command, apply};
use crate::orchestrator::orchestrate;
use crate::service::{Attachment, PortSpec, ServiceMode, ServiceSpec};
use crate::test_support::swarm;

/// A swarm of 3 with service `web` (3 replicas on network `web`, port
/// 8080→80 through the mesh), one task per node, all running.
fn running_swarm() -> ClusterState {
    let mut s = swarm(3);
    let spec = ServiceSpec {
        name: "web".into(),
        mode: ServiceMode::Replicated(3),
        networks: vec![Attachment {
            network: "web".into(),
            aliases: vec![],
        }],
        ports: vec![PortSpec {
            mode: PublishMode::Ingress,
            published: Some(8080),
            target: 80,
            protocol: Protocol::Tcp,
        }],
        endpoint_mode: EndpointMode::Vip,
        constraints: vec![],
        env: Default::default(),
        command: vec!["x".into()],
        labels: Default::default(),
        restart: Default::default(),
        update: Default::default(),
        container: None,
        ext: Default::default(),
    };
    let c = Command::CreateService {
        id: "svc".into(),
        spec,
        created_at_ms: 0,
    };
    apply(&mut s, &c).unwrap();
    let mut n = 0;
    for c in orchestrate(
        &s,
        &|_| true,
        &mut || {
            n += 1;
            format!("t{n}")
        },
        0,
    ) {
        apply(&mut s, &c).unwrap();
    }
    s
}

fn vtep(n: NodeId) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 0, n.0 as u8)
}

/// What gossip would show: every task's endpoint on every network, except
/// those of `dead` nodes.
fn gossip(s: &ClusterState, dead: &[NodeId]) -> BTreeMap<String, Vec<EndpointRecord>> {
    let mut out: BTreeMap<String, Vec<EndpointRecord>> = BTreeMap::new();
    for t in s.tasks.values() {
        let node = t.node.unwrap();
        if dead.contains(&node) {
            continue;
        }
        for (net, ip) in &t.addresses {
            out.entry(net.to_string())
                .or_default()
                .push(EndpointRecord {
                    ip: IpAddr::V4(*ip),
                    mac: mac_text(&mac_for(*ip)),
                    name: s.task_name(t),
                    service_id: Some(t.service_id.to_string()),
                    service_name: Some("web".into()),
                    aliases: vec![],
                    owner: node,
                    vtep: IpAddr::V4(vtep(node)),
                });
        }
    }
    out
}

fn plan_for(s: &ClusterState, node: u64, dead: &[NodeId]) -> NodePlan {
    let endpoints = gossip(s, dead);
    plan(&PlanInput {
        state: s,
        node: NodeId(node),
        vtep: vtep(NodeId(node)),
        underlay_mtu: 1500,
        endpoints: &endpoints,
    })
}

#[test]
fn a_node_gets_its_sandboxes_the_networks_they_use_and_the_remote_endpoints() {
    let s = running_swarm();
    let p = plan_for(&s, 1, &[]);
    assert_eq!(p.sandboxes.len(), 1);
    let sb = p.sandboxes.values().next().unwrap();
    assert_eq!(sb.name, "web.1");
    // Its endpoints: on `web` and on `ingress` (ports published through the mesh).
    let nets: BTreeSet<&str> = sb.endpoints.iter().map(|e| e.network.as_str()).collect();
    assert_eq!(nets, BTreeSet::from(["ing", "web"]));
    let web = &p.networks["web"];
    assert_eq!(web.vni, s.networks["web"].vni);
    assert_eq!(web.mtu, 1450);
    assert_eq!(web.vtep, Ipv4Addr::new(192, 168, 0, 1));
    // The other two nodes' tasks, reached through their VTEPs.
    let vteps: BTreeSet<Ipv4Addr> = web.remotes.iter().map(|r| r.vtep).collect();
    assert_eq!(
        vteps,
        BTreeSet::from([Ipv4Addr::new(192, 168, 0, 2), Ipv4Addr::new(192, 168, 0, 3)])
    );
    assert!(web.remotes.iter().all(|r| r.mac == mac_for(r.ip)));
    // The VIP balances over all three tasks.
    assert_eq!(web.lbs.len(), 1);
    assert_eq!(web.lbs[0].vip, s.services["svc"].vips["web"]);
    assert_eq!(web.lbs[0].backends.len(), 3);
    // 8080 goes to the service's VIP on ingress, on every node.
    assert_eq!(p.published.len(), 1);
    assert_eq!(p.published[0].backends, vec![s.services["svc"].vips["ing"]]);
    assert_eq!(plan_for(&s, 2, &[]).published, p.published);
}

#[test]
fn a_dead_nodes_endpoints_leave_the_load_balancers_and_its_placed_tasks_stay_reachable() {
    let s = running_swarm();
    let p = plan_for(&s, 1, &[NodeId(3)]);
    let web = &p.networks["web"];
    // No new connection goes to node 3's task...
    assert_eq!(web.lbs[0].backends.len(), 2);
    let t3 = s
        .tasks
        .values()
        .find(|t| t.node == Some(NodeId(3)))
        .unwrap();
    assert!(!web.lbs[0].backends.contains(&t3.addresses["web"]));
    assert!(
        !p.sandboxes
            .values()
            .any(|sb| sb.dns["tasks.web"].contains(&t3.addresses["web"]))
    );
    // ...but while the store still runs it there (its daemon may only be
    // restarting), replies to it find it through node 3's VTEP, as do
    // replies to node 3's routing-mesh address.
    assert_eq!(web.remotes.len(), 2);
    assert!(web.remotes.contains(&Remote {
        ip: t3.addresses["web"],
        mac: mac_for(t3.addresses["web"]),
        vtep: vtep(NodeId(3)),
    }));
    let ing = &p.networks["ing"];
    assert!(
        ing.remotes
            .iter()
            .any(|r| r.ip == s.ingress_addrs[&NodeId(3)])
    );

    // Once the store no longer places the task there (rescheduled), the
    // tunnel forgets it.
    let mut s2 = s.clone();
    s2.tasks.get_mut(&t3.id).unwrap().desired = DesiredState::Shutdown;
    let web = &plan_for(&s2, 1, &[NodeId(3)]).networks["web"];
    assert_eq!(web.remotes.len(), 1);
    assert!(web.remotes.iter().all(|r| r.vtep != vtep(NodeId(3))));
}

#[test]
fn gossip_wins_over_the_store_where_they_disagree_on_an_address() {
    let s = running_swarm();
    let mut endpoints = gossip(&s, &[]);
    // Gossip has node 2's task behind another VTEP (fresher than the store).
    for e in endpoints.get_mut("web").unwrap() {
        if e.owner == NodeId(2) {
            e.vtep = IpAddr::V4(Ipv4Addr::new(192, 168, 9, 9));
        }
    }
    let p = plan(&PlanInput {
        state: &s,
        node: NodeId(1),
        vtep: vtep(NodeId(1)),
        underlay_mtu: 1500,
        endpoints: &endpoints,
    });
    let web = &p.networks["web"];
    assert_eq!(web.remotes.len(), 2, "{:?}", web.remotes);
    assert!(
        web.remotes
            .iter()
            .any(|r| r.vtep == Ipv4Addr::new(192, 168, 9, 9))
    );
    assert!(web.remotes.iter().all(|r| r.vtep != vtep(NodeId(2))));
}

#[test]
fn a_node_without_tasks_has_no_networks_and_stopped_tasks_no_sandboxes() {
    let mut s = running_swarm();
    let p = plan_for(&s, 4, &[]);
    assert!(p.networks.is_empty() && p.sandboxes.is_empty());
    // The ingress port is still published there (the routing mesh).
    assert_eq!(p.published.len(), 1);
    let id = s
        .tasks
        .values()
        .find(|t| t.node == Some(NodeId(1)))
        .unwrap()
        .id
        .clone();
    apply(&mut s, &Command::ShutdownTask { id, now_ms: 1 }).unwrap();
    let p = plan_for(&s, 1, &[]);
    assert!(p.sandboxes.is_empty());
    // Only the routing mesh's network stays (a port is published through it).
    assert_eq!(p.networks.keys().collect::<Vec<_>>(), ["ing"]);
}

#[test]
fn the_plan_is_deterministic() {
    let s = running_swarm();
    assert_eq!(plan_for(&s, 2, &[]), plan_for(&s, 2, &[]));
}

#[test]
fn a_sandbox_resolves_the_services_and_tasks_of_its_networks() {
    let s = running_swarm();
    let p = plan_for(&s, 1, &[NodeId(3)]);
    let dns = &p.sandboxes.values().next().unwrap().dns;
    assert_eq!(dns["web"], vec![s.services["svc"].vips["web"]]);
    // The live tasks only (node 3 is dead).
    assert_eq!(dns["tasks.web"].len(), 2);
    assert_eq!(dns["web.1"].len(), 1);
    // Nothing from the ingress network.
    let ingress_vip = s.services["svc"].vips["ing"];
    assert!(dns.values().all(|ips| !ips.contains(&ingress_vip)));
}

#[test]
fn every_node_takes_part_in_the_routing_mesh() {
    let s = running_swarm();
    // Node 4 runs nothing, yet balances port 8080 over the three tasks.
    let mut s4 = s.clone();
    apply(&mut s4, &Command::AddNode(crate::test_support::node(4))).unwrap();
    let p = plan_for(&s4, 4, &[]);
    let ing = p.ingress.expect("an ingress plan");
    assert_eq!(ing.addr, s4.ingress_addrs[&NodeId(4)]);
    assert_eq!(ing.ports.len(), 1);
    assert_eq!((ing.ports[0].published, ing.ports[0].target), (8080, 80));
    assert_eq!(ing.ports[0].backends.len(), 3);
    assert!(p.networks.contains_key("ing"));
    // A dead node's task is not a backend.
    let p = plan_for(&s, 1, &[NodeId(2)]);
    assert_eq!(p.ingress.unwrap().ports[0].backends.len(), 2);
}

#[test]
fn a_restarted_node_awaits_the_remote_endpoints_gossip_has_not_shown() {
    let mut s = running_swarm();
    // Tasks not running yet are not awaited (they may not have published).
    let nets = BTreeSet::from([NetworkId::from("web"), NetworkId::from("ing")]);
    assert!(awaited_endpoints(&s, NodeId(1), &nets, &BTreeMap::new(), &BTreeSet::new()).is_empty());
    let ids: Vec<TaskId> = s.tasks.keys().cloned().collect();
    for id in ids {
        for state in [TaskState::Starting, TaskState::Running] {
            let c = Command::SetTaskState {
                id: id.clone(),
                state,
                message: String::new(),
                exit_code: None,
                now_ms: 1,
            };
            apply(&mut s, &c).unwrap();
        }
    }
    let none = BTreeSet::new();
    // Gossip knows nobody yet: the two other nodes' tasks, on both networks.
    let empty = BTreeMap::new();
    let awaited = awaited_endpoints(&s, NodeId(1), &nets, &empty, &none);
    assert_eq!(awaited.len(), 4, "{awaited:?}");
    // Node 3's entries have not arrived: only its task is awaited.
    let partial = gossip(&s, &[NodeId(3)]);
    let awaited = awaited_endpoints(&s, NodeId(1), &nets, &partial, &none);
    let t3 = s
        .tasks
        .values()
        .find(|t| t.node == Some(NodeId(3)))
        .unwrap();
    let mut want: Vec<(NetworkId, Ipv4Addr)> = t3
        .addresses
        .iter()
        .map(|(n, ip)| (n.clone(), *ip))
        .collect();
    let mut got = awaited.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    // ...unless gossip declared node 3 dead, or the network is not used here.
    assert!(
        awaited_endpoints(&s, NodeId(1), &nets, &partial, &BTreeSet::from([NodeId(3)])).is_empty()
    );
    assert!(awaited_endpoints(&s, NodeId(1), &BTreeSet::new(), &empty, &none).is_empty());
    // Everything shown: nothing awaited.
    assert!(awaited_endpoints(&s, NodeId(1), &nets, &gossip(&s, &[]), &none).is_empty());
}

#[test]
fn a_bridge_networks_endpoints_stay_on_their_host() {
    // `web` as a single-host bridge network: each node has its own bridge,
    // and another node's task on it cannot be reached from here.
    let mut s = running_swarm();
    s.networks.get_mut("web").unwrap().spec.driver = Driver::Bridge;
    let p = plan_for(&s, 1, &[]);
    let own = p.sandboxes.values().next().unwrap();
    let own_ip = own
        .endpoints
        .iter()
        .find(|e| e.network == "web")
        .unwrap()
        .ip;
    let web = &p.networks["web"];
    assert_eq!(
        web.lbs[0].backends,
        vec![own_ip],
        "the VIP balances to this host's task only"
    );
    assert!(web.remotes.is_empty(), "{:?}", web.remotes);
    assert_eq!(own.dns["tasks.web"], vec![own_ip]);
    assert!(!own.dns.contains_key("web.2"), "{:?}", own.dns);
    // The overlay `ingress` still reaches every node's task.
    assert_eq!(p.ingress.unwrap().ports[0].backends.len(), 3);
    // A restarted node does not wait for other hosts' bridge endpoints.
    let nets = BTreeSet::from([NetworkId::from("web")]);
    let mut running = s.clone();
    for t in running.tasks.values_mut() {
        t.state = TaskState::Running;
    }
    assert!(
        awaited_endpoints(
            &running,
            NodeId(1),
            &nets,
            &BTreeMap::new(),
            &BTreeSet::new()
        )
        .is_empty()
    );
}

#[test]
fn aliases_and_dnsrr_answer_as_docker_does() {
    let mut s = running_swarm();
    let svc = s.services.get_mut("svc").unwrap();
    svc.spec.networks[0].aliases = vec!["Front".into()];
    let p = plan_for(&s, 1, &[]);
    let dns = &p.sandboxes.values().next().unwrap().dns;
    let vip = s.services["svc"].vips["web"];
    // An alias answers what the service's name answers: its VIP.
    assert_eq!(dns["front"], vec![vip]);
    assert_eq!(dns["web"], vec![vip]);
    // dnsrr: the name and its aliases answer the live tasks' addresses,
    // and the network has no load balancer for the service.
    s.services.get_mut("svc").unwrap().spec.endpoint_mode = EndpointMode::Dnsrr;
    let p = plan_for(&s, 1, &[NodeId(3)]);
    let dns = &p.sandboxes.values().next().unwrap().dns;
    assert_eq!(dns["web"].len(), 2, "{dns:?}");
    assert_eq!(dns["front"], dns["web"]);
    assert_eq!(dns["tasks.web"], dns["web"]);
    assert!(!dns["web"].contains(&vip));
    assert!(p.networks["web"].lbs.is_empty());
}
