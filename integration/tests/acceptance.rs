//! Issue 4's acceptance scenario on a real 3-manager swarm: a service of
//! `http-echo` tasks is created, scaled, drained, loses a node, survives a
//! leader kill and a full restart, is removed; a global service follows the
//! nodes, including one that joins later. After every step: no duplicate
//! IP, VIP, VNI or port, every address inside its network, and every
//! running task wanted by a service.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde_json::Value;
use shoal_integration::{Cluster, echo_service, root_or_skip, tools_image};

const CONVERGE: Duration = Duration::from_secs(40);

fn json(c: &Cluster, i: usize, args: &[&str]) -> Vec<Value> {
    c.shoal_ok(i, args)
        .unwrap()
        .json()
        .unwrap()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn in_subnet(ip: Ipv4Addr, cidr: &str) -> bool {
    let (net, len) = cidr.split_once('/').unwrap();
    let net: Ipv4Addr = net.parse().unwrap();
    let len: u32 = len.parse().unwrap();
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(ip) & mask == u32::from(net) & mask
}

/// Every allocation as seen from host `i`: VIPs and published ports per
/// service, addresses per task, subnet and VNI per network.
#[derive(Debug, PartialEq, Eq)]
struct Allocations {
    networks: BTreeMap<String, (Value, Value)>,
    services: BTreeMap<String, (Value, Value)>,
    tasks: BTreeMap<String, Value>,
}

/// Checks the invariants on host `i`'s copy and returns its allocations.
fn check(c: &Cluster, i: usize) -> Allocations {
    let networks = json(c, i, &["network", "ls", "--format", "json"]);
    let services = json(c, i, &["service", "ls", "--format", "json"]);
    let mut vnis = BTreeSet::new();
    let mut subnets = BTreeMap::new();
    let mut alloc = Allocations {
        networks: BTreeMap::new(),
        services: BTreeMap::new(),
        tasks: BTreeMap::new(),
    };
    for n in &networks {
        let name = n["name"].as_str().unwrap().to_owned();
        if let Some(v) = n["vni"].as_u64() {
            assert!(vnis.insert(v), "duplicate VNI {v}: {networks:?}");
        }
        subnets.insert(name.clone(), n["subnets"][0].as_str().unwrap().to_owned());
        alloc
            .networks
            .insert(name, (n["subnets"].clone(), n["vni"].clone()));
    }
    // Per network: every VIP and task address, each once.
    let mut used: BTreeMap<String, BTreeSet<Ipv4Addr>> = BTreeMap::new();
    let mut take = |net: &str, ip: &str, who: &str| {
        let ip: Ipv4Addr = ip.parse().unwrap();
        assert!(
            in_subnet(ip, &subnets[net]),
            "{who}: {ip} outside {net} {}",
            subnets[net]
        );
        assert!(
            used.entry(net.to_owned()).or_default().insert(ip),
            "{who}: duplicate address {ip} on {net}"
        );
    };
    let mut ports = BTreeSet::new();
    for s in &services {
        let name = s["name"].as_str().unwrap();
        for (net, ip) in s["vips"].as_object().unwrap() {
            take(net, ip.as_str().unwrap(), &format!("VIP of {name}"));
        }
        for p in s["ports"].as_array().unwrap() {
            if p["mode"] == "ingress" {
                let key = (p["published"].as_u64().unwrap(), p["protocol"].to_string());
                assert!(ports.insert(key), "duplicate published port: {p}");
            }
        }
        alloc
            .services
            .insert(name.to_owned(), (s["vips"].clone(), s["ports"].clone()));
        for t in json(c, i, &["service", "ps", "--format", "json", name]) {
            let tname = t["name"].as_str().unwrap();
            for (net, ip) in t["addresses"].as_object().unwrap() {
                take(net, ip.as_str().unwrap(), &format!("task {tname}"));
            }
            if t["state"] == "running" || t["state"] == "assigned" {
                // A running task that is not wanted is being stopped, which
                // only lasts a moment; see `converged`.
                alloc
                    .tasks
                    .insert(t["id"].as_str().unwrap().to_owned(), t["addresses"].clone());
            }
        }
    }
    alloc
}

/// Whether every service runs exactly what it wants, everywhere in `hosts`.
fn converged(c: &Cluster, hosts: &[usize]) -> anyhow::Result<bool> {
    for &i in hosts {
        for s in json(c, i, &["service", "ls", "--format", "json"]) {
            let name = s["name"].as_str().unwrap();
            let tasks = json(c, i, &["service", "ps", "--format", "json", name]);
            let running: Vec<&Value> = tasks.iter().filter(|t| t["state"] == "running").collect();
            if running.iter().any(|t| t["desired_state"] != "running") {
                return Ok(false);
            }
            if s["running"] != s["replicas"] || running.len() as u64 != s["replicas"] {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// Running tasks per node, as the first host whose daemon runs sees them
/// (node1 may be the one a step killed).
fn placement(c: &Cluster, service: &str) -> BTreeMap<String, usize> {
    let mut per_node = BTreeMap::new();
    let asked = (0..c.hosts.len()).find(|i| c.running(*i)).unwrap();
    for t in json(c, asked, &["service", "ps", "--format", "json", service]) {
        if t["state"] == "running" && t["desired_state"] == "running" {
            *per_node
                .entry(t["node"].as_str().unwrap().to_owned())
                .or_insert(0) += 1;
        }
    }
    per_node
}

#[test]
fn services_survive_scaling_draining_node_loss_leader_loss_and_restarts() {
    if !root_or_skip("give tasks network namespaces (http-echo on port 80 each)") {
        return;
    }
    let mut c = Cluster::start(4).unwrap();
    c.load_tools().unwrap();
    c.init(0).unwrap();
    let mt = c.token(0, "manager").unwrap();
    c.join(1, &mt, 0).unwrap();
    c.join(2, &mt, 0).unwrap();
    let three = [0, 1, 2];
    c.shoal_ok(0, &["network", "create", "web"]).unwrap();
    let args = echo_service("web", 3, &["--network", "web", "-p", "8080:80"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = c.shoal_ok(0, &args).unwrap();
    assert!(r.stdout.contains("converged"), "{r:?}");

    // 3 tasks, one per node, distinct addresses in the subnet, and a VIP.
    c.wait_until("3 tasks everywhere", CONVERGE, |c| converged(c, &three))
        .unwrap();
    assert_eq!(
        placement(&c, "web"),
        BTreeMap::from([
            ("node1".into(), 1),
            ("node2".into(), 1),
            ("node3".into(), 1)
        ])
    );
    let a = check(&c, 0);
    assert_eq!(a.tasks.len(), 3);
    let svc = &json(&c, 0, &["service", "inspect", "web"])[0];
    assert!(
        svc["vips"]["web"].is_string() && svc["vips"]["ingress"].is_string(),
        "{svc}"
    );
    for i in three {
        assert_eq!(check(&c, i), a, "host {i} agrees");
    }

    // Scale to 6 (two per node), then to 2.
    c.shoal_ok(1, &["service", "scale", "web=6"]).unwrap();
    c.wait_until("6 tasks", CONVERGE, |c| converged(c, &three))
        .unwrap();
    assert!(placement(&c, "web").values().all(|n| *n == 2));
    assert_eq!(check(&c, 0).tasks.len(), 6);
    c.shoal_ok(2, &["service", "scale", "web=2"]).unwrap();
    c.wait_until("2 tasks", CONVERGE, |c| converged(c, &three))
        .unwrap();
    assert_eq!(check(&c, 0).tasks.len(), 2);

    // Drain a node that runs a task: it moves.
    let busy = placement(&c, "web").keys().next().unwrap().clone();
    c.shoal_ok(0, &["node", "update", "--availability", "drain", &busy])
        .unwrap();
    c.wait_until("the drained node's task to move", CONVERGE, |c| {
        Ok(converged(c, &three)? && !placement(c, "web").contains_key(&busy))
    })
    .unwrap();
    check(&c, 0);
    c.shoal_ok(0, &["node", "update", "--availability", "active", &busy])
        .unwrap();
    c.shoal_ok(0, &["service", "scale", "web=3"]).unwrap();
    c.wait_until("3 tasks again", CONVERGE, |c| {
        Ok(converged(c, &three)? && placement(c, "web").len() == 3)
    })
    .unwrap();

    // kill -9 a manager that is not the leader: its task is recreated on
    // the others within the 5 s grace period and a few seconds.
    let leader = c.leader(0).unwrap().unwrap();
    let victim = (0..3).find(|i| *i != leader).unwrap();
    let victim_name = c.hosts[victim].name.clone();
    let killed = Instant::now();
    c.kill(victim);
    let survivors: Vec<usize> = (0..3).filter(|i| *i != victim).collect();
    c.wait_until("the dead node's task to be replaced", CONVERGE, |c| {
        let p = placement(c, "web");
        Ok(!p.contains_key(&victim_name) && p.values().sum::<usize>() == 3)
    })
    .unwrap();
    let moved_in = killed.elapsed();
    assert!(moved_in < Duration::from_secs(15), "took {moved_in:?}");
    eprintln!("a dead node's task ran elsewhere {moved_in:?} after kill -9");
    check(&c, survivors[0]);
    c.start_daemon(victim).unwrap();
    c.wait_until("the node to come back", CONVERGE, |c| converged(c, &three))
        .unwrap();

    // A leader kill changes no allocation.
    let before = check(&c, 0);
    let leader = c.leader(0).unwrap().unwrap();
    c.kill(leader);
    let other = (0..3).find(|i| *i != leader).unwrap();
    c.wait_until("a new leader", CONVERGE, |c| {
        Ok(c.leader(other)?.is_some_and(|l| l != leader))
    })
    .unwrap();
    let after = check(&c, other);
    assert_eq!(after.networks, before.networks);
    assert_eq!(after.services, before.services);
    // Its task may have moved meanwhile (nothing rebalances, like Swarm);
    // if so, the returning node stops the copy it still ran.
    c.start_daemon(leader).unwrap();
    c.wait_until("all three back", CONVERGE, |c| converged(c, &three))
        .unwrap();

    // A full restart changes nothing: same allocations, same tasks (they
    // outlive their daemons and are re-adopted).
    let before = check(&c, 0);
    for i in three {
        c.stop(i);
    }
    for i in three {
        c.start_daemon(i).unwrap();
    }
    c.wait_until("the swarm back after a full restart", CONVERGE, |c| {
        Ok(c.leader(0)?.is_some() && converged(c, &three)?)
    })
    .unwrap();
    // The same tasks, addresses and VIPs as before the restart.
    c.wait_until("the swarm's state as before the restart", CONVERGE, |c| {
        Ok(check(c, 0) == before)
    })
    .unwrap();

    // A global service: one task per node, and one on a node that joins later.
    let tools = tools_image().reference.as_str();
    c.shoal_ok(
        0,
        &[
            "service",
            "create",
            "--name",
            "agent",
            "--mode",
            "global",
            "--stop-grace-period",
            "1s",
            tools,
            "sleep",
            "600",
        ],
    )
    .unwrap();
    c.wait_until("a global task on each node", CONVERGE, |c| {
        Ok(placement(c, "agent").len() == 3)
    })
    .unwrap();
    let wt = c.token(0, "worker").unwrap();
    c.join(3, &wt, 0).unwrap();
    c.wait_until("a global task on the new node", CONVERGE, |c| {
        let p = placement(c, "agent");
        Ok(p.len() == 4 && p.get("node4") == Some(&1))
    })
    .unwrap();
    check(&c, 3);

    // service rm stops every task and frees every address: a new service
    // gets the lowest ones again.
    let vip = json(&c, 0, &["service", "inspect", "web"])[0]["vips"]["web"].clone();
    c.shoal_ok(0, &["service", "rm", "web", "agent"]).unwrap();
    c.wait_until("no service tasks left", CONVERGE, |c| {
        Ok(check(c, 0).tasks.is_empty())
    })
    .unwrap();
    c.shoal_ok(
        0,
        &[
            "service",
            "create",
            "--name",
            "again",
            "--network",
            "web",
            tools,
            "sleep",
            "600",
        ],
    )
    .unwrap();
    let again = &json(&c, 0, &["service", "inspect", "again"])[0];
    assert_eq!(
        again["vips"]["web"], vip,
        "the freed VIP is handed out again"
    );
    check(&c, 0);
}
