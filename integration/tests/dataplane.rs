//! The data plane on hosts that are network namespaces of their own, joined
//! by an underlay bridge (issue 5): tasks on different hosts reach each
//! other over the VXLAN overlay, programmed from the store and gossip.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::Value;
use shoal_integration::{Cluster, echo_service, root_or_skip, shoal_bin, tools_service};

const CONVERGE: Duration = Duration::from_secs(40);

fn running(c: &Cluster, i: usize, service: &str) -> Vec<Value> {
    c.shoal_ok(i, &["service", "ps", "--format", "json", service])
        .unwrap()
        .json()
        .unwrap()
        .as_array()
        .cloned()
        .unwrap()
        .into_iter()
        .filter(|t| t["desired_state"] == "running" && t["state"] == "running")
        .collect()
}

/// The appnet address of `service`'s one task, once it runs.
fn running_ip(c: &Cluster, service: &str) -> String {
    c.wait_until_value(CONVERGE, || {
        let t = running(c, 0, service);
        let ip = t.first().and_then(|t| t["addresses"]["appnet"].as_str());
        ip.map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("{service} does not run"))
    })
    .unwrap()
}

fn host_of(c: &Cluster, t: &Value) -> usize {
    c.hosts
        .iter()
        .position(|h| h.name == t["node"].as_str().unwrap())
        .unwrap()
}

/// `GET http://IP/` from inside task `from` (on its host).
fn get_from(c: &Cluster, from: &Value, ip: &str) -> anyhow::Result<Value> {
    let url = format!("http://{ip}/");
    let name = from["name"].as_str().unwrap();
    let r = c.shoal(
        host_of(c, from),
        &[
            "exec",
            name,
            "--",
            "shoal",
            "tool",
            "http-get",
            "--timeout",
            "3",
            &url,
        ],
    );
    if !r.ok() {
        anyhow::bail!("{name} → {url}: {}", r.stderr.trim());
    }
    Ok(serde_json::from_str(&r.stdout)?)
}

/// The IPv4 addresses `name` resolves to inside task `from`.
fn resolve(c: &Cluster, from: &Value, name: &str) -> std::collections::BTreeSet<String> {
    let task = from["name"].as_str().unwrap();
    let r = c.shoal(
        host_of(c, from),
        &["exec", task, "--", "getent", "ahostsv4", name],
    );
    assert!(r.ok(), "{task}: getent {name}: {r:?}");
    r.stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// The lab of the overlay scenario: three hosts, network `appnet`, and
/// service `web` with one task on each host and its VIP there.
struct Overlay {
    c: Cluster,
    tasks: Vec<Value>,
    vip: String,
}

impl Overlay {
    fn start() -> Self {
        let mut c = Cluster::start_isolated(3).unwrap();
        c.load_tools().unwrap();
        c.form(1).unwrap();
        c.shoal_ok(0, &["network", "create", "appnet"]).unwrap();
        let args = echo_service("web", 3, &["--network", "appnet"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = c.shoal_ok(0, &args).unwrap();
        assert!(r.stdout.contains("converged"), "{r:?}");
        let tasks = running(&c, 0, "web");
        assert_eq!(tasks.len(), 3);
        let hosts: std::collections::BTreeSet<usize> =
            tasks.iter().map(|t| host_of(&c, t)).collect();
        assert_eq!(hosts.len(), 3, "one task per host");
        let svc = c.service_inspect(0, "web").unwrap();
        let vip = svc["vips"]["appnet"].as_str().unwrap().to_owned();
        Overlay { c, tasks, vip }
    }
}

/// Every step of the scenario, in order, on one lab: each builds on what
/// the steps before it left (services, networks, a dead host).
#[test]
fn tasks_on_different_hosts_reach_each_other_over_the_overlay() {
    if !root_or_skip("make network namespaces, veths and VXLAN devices") {
        return;
    }
    let mut o = Overlay::start();
    tasks_reach_each_other(&mut o);
    the_vip_balances_without_snat(&mut o);
    conntrack_follows_vip_connections_only(&mut o);
    names_resolve_through_the_embedded_dns(&mut o);
    diagnostics_show_vteps_backends_and_answers(&mut o);
    the_routing_mesh_answers_on_every_host(&mut o);
    udp_goes_through_the_mesh(&mut o);
    host_mode_answers_where_the_task_runs(&mut o);
    macvlan_tasks_are_on_the_hosts_lan(&mut o);
    a_bridge_network_joins_tasks_on_one_host(&mut o);
    subnets_steer_clear_of_the_hosts_routes(&mut o);
    egress_reaches_out_unless_internal(&mut o);
    a_task_joins_once_it_listens(&mut o);
    a_dead_hosts_task_leaves_and_is_replaced(&mut o);
    host_namespaces_hold_no_task_addresses(&mut o);
}

/// Every task reaches every other one, across hosts, and the server sees
/// the client task's own address.
fn tasks_reach_each_other(o: &mut Overlay) {
    let tasks = o.tasks.clone();
    let c = &mut o.c;
    for from in &tasks {
        for to in &tasks {
            let ip = to["addresses"]["appnet"].as_str().unwrap();
            let v = c
                .wait_until_value(CONVERGE, || get_from(c, from, ip))
                .unwrap();
            assert_eq!(v["task"], to["name"], "{v}");
            let client = v["client"].as_str().unwrap();
            let own = from["addresses"]["appnet"].as_str().unwrap();
            assert!(client.starts_with(&format!("{own}:")), "{client} vs {own}");
            assert!(
                v["addresses"].as_array().unwrap().iter().any(|a| a == ip),
                "{v}"
            );
        }
    }
}

/// The service's VIP balances over all three replicas, from every host,
/// and the servers still see the client's own address (no SNAT). (A task
/// is reachable as soon as the store places it; it joins the VIP once
/// gossip shows its endpoint, so this waits for that.)
fn the_vip_balances_without_snat(o: &mut Overlay) {
    let tasks = o.tasks.clone();
    let vip = o.vip.clone();
    let c = &mut o.c;
    for from in &tasks {
        let own = from["addresses"]["appnet"].as_str().unwrap();
        let mut served = std::collections::BTreeSet::new();
        let deadline = std::time::Instant::now() + CONVERGE;
        for _ in 0..9 {
            while served.len() < 3 && std::time::Instant::now() < deadline {
                if let Ok(v) = get_from(c, from, &vip) {
                    served.insert(v["task"].as_str().unwrap_or_default().to_owned());
                }
            }
            let v = c
                .wait_until_value(CONVERGE, || get_from(c, from, &vip))
                .unwrap();
            assert!(
                v["client"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("{own}:")),
                "{v}"
            );
            served.insert(v["task"].as_str().unwrap().to_owned());
        }
        assert_eq!(
            served.len(),
            3,
            "{} reached only {served:?} through {vip}",
            from["name"]
        );
    }
}

/// Conntrack follows the VIP connections only: in every task's
/// namespace the requests to the VIP just made are there, and not one
/// of the direct connections between tasks, either way.
fn conntrack_follows_vip_connections_only(o: &mut Overlay) {
    let tasks = o.tasks.clone();
    let vip = o.vip.clone();
    let c = &mut o.c;
    for t in &tasks {
        let name = t["name"].as_str().unwrap();
        let r = c.shoal(
            host_of(c, t),
            &["exec", name, "--", "cat", "/proc/net/nf_conntrack"],
        );
        assert!(r.ok(), "{r:?}");
        let others: Vec<String> = tasks
            .iter()
            .filter(|o| o["name"] != t["name"])
            .map(|o| o["addresses"]["appnet"].as_str().unwrap().to_owned())
            .collect();
        assert!(
            r.stdout.contains(&format!("dst={vip} ")),
            "{name}: no tracked VIP connection:\n{}",
            r.stdout
        );
        for line in r.stdout.lines() {
            // The original direction's addresses come first.
            let fields: Vec<&str> = line.split_whitespace().collect();
            let first = |key: &str| {
                fields
                    .iter()
                    .find_map(|f| f.strip_prefix(key))
                    .unwrap_or_default()
            };
            assert!(
                !others
                    .iter()
                    .any(|o| o == first("src=") || o == first("dst=")),
                "{name}: a direct connection between tasks was tracked: {line}"
            );
        }
    }
}

/// By name, through the embedded DNS at 127.0.0.11: `web` is the VIP,
/// `tasks.web` the three tasks.
fn names_resolve_through_the_embedded_dns(o: &mut Overlay) {
    let tasks = o.tasks.clone();
    let vip = o.vip.clone();
    let c = &mut o.c;
    for from in &tasks {
        let mut served = std::collections::BTreeSet::new();
        let deadline = std::time::Instant::now() + CONVERGE;
        for _ in 0..9 {
            while served.len() < 3 && std::time::Instant::now() < deadline {
                if let Ok(v) = get_from(c, from, &vip) {
                    served.insert(v["task"].as_str().unwrap_or_default().to_owned());
                }
            }
            let v = c
                .wait_until_value(CONVERGE, || get_from(c, from, "web"))
                .unwrap();
            served.insert(v["task"].as_str().unwrap().to_owned());
        }
        assert_eq!(
            served.len(),
            3,
            "{} reached only {served:?} through `web`",
            from["name"]
        );
        let all: std::collections::BTreeSet<String> = tasks
            .iter()
            .map(|t| t["addresses"]["appnet"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(resolve(c, from, "tasks.web"), all);
        assert_eq!(
            resolve(c, from, "web"),
            std::collections::BTreeSet::from([vip.clone()])
        );
        let name = tasks[0]["name"].as_str().unwrap();
        assert_eq!(
            resolve(c, from, name),
            std::collections::BTreeSet::from([tasks[0]["addresses"]["appnet"]
                .as_str()
                .unwrap()
                .to_owned()])
        );
    }
}

/// Diagnostics: node1's FDB names the other two hosts' VTEPs, the VIP's
/// backends are the three tasks, and its tasks' DNS answers as above.
fn diagnostics_show_vteps_backends_and_answers(o: &mut Overlay) {
    let tasks = o.tasks.clone();
    let c = &mut o.c;
    let dp = debug_dataplane(c, 0);
    let appnet = dp["networks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "appnet")
        .unwrap()
        .clone();
    let vteps: std::collections::BTreeSet<&str> = appnet["fdb"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["vtep"].as_str().unwrap())
        .collect();
    assert_eq!(
        vteps,
        std::collections::BTreeSet::from(["10.210.0.2", "10.210.0.3"]),
        "{appnet}"
    );
    assert_eq!(
        appnet["load_balancers"][0]["backends"]
            .as_array()
            .unwrap()
            .len(),
        3,
        "{appnet}"
    );
    let local = tasks.iter().find(|t| host_of(c, t) == 0).unwrap();
    let dns = c
        .shoal_ok(
            0,
            &["debug", "dns", local["name"].as_str().unwrap(), "tasks.web"],
        )
        .unwrap();
    assert_eq!(dns.stdout.lines().count(), 3, "{dns:?}");
    let table = c.shoal_ok(0, &["debug", "dataplane"]).unwrap();
    assert!(table.stdout.contains("NETWORK appnet"), "{table:?}");
}

/// The routing mesh: a port published by a one-task service answers on
/// every host's address, from every host, including those that run no
/// task of it.
fn the_routing_mesh_answers_on_every_host(o: &mut Overlay) {
    let c = &mut o.c;
    let args = echo_service("api", 1, &["--network", "appnet", "-p", "8081:80"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let created = c.shoal_ok(0, &args).unwrap();
    let bin = shoal_bin().to_string_lossy().into_owned();
    // When `service create` returns, the mesh of the node it asked already
    // forwards to the task: the first request answers.
    let url = format!("http://{}:8081/", c.hosts[0].ip);
    let first = c.in_host(0, &bin, &["tool", "http-get", "--timeout", "3", &url]);
    assert!(first.ok(), "{}\n{}", first.stderr, created.stdout);
    for on in 0..3 {
        for from in 0..3 {
            let url = format!("http://{}:8081/", c.hosts[on].ip);
            let v: Value = c
                .wait_until_value(CONVERGE, || {
                    let r = c.in_host(from, &bin, &["tool", "http-get", "--timeout", "3", &url]);
                    anyhow::ensure!(r.ok(), "node{} → {url}: {}", from + 1, r.stderr.trim());
                    Ok(serde_json::from_str(&r.stdout)?)
                })
                .unwrap();
            assert_eq!(v["task"], "api.1", "{v}");
        }
    }
    // Its backends change: every host's mesh follows, up to all three
    // replicas and back down to the one.
    let mesh_answers = |on: usize| {
        let url = format!("http://{}:8081/", c.hosts[on].ip);
        let r = c.in_host(on, &bin, &["tool", "http-get", "--timeout", "2", &url]);
        serde_json::from_str::<Value>(&r.stdout)
            .ok()
            .and_then(|v| v["task"].as_str().map(str::to_owned))
    };
    c.shoal_ok(0, &["service", "scale", "api=3"]).unwrap();
    for on in 0..3 {
        let mut seen = std::collections::BTreeSet::new();
        let since = std::time::Instant::now();
        while seen.len() < 3 {
            assert!(
                since.elapsed() < CONVERGE,
                "node{}'s mesh reached only {seen:?}",
                on + 1
            );
            seen.extend(mesh_answers(on));
        }
    }
    // ... and `debug dataplane` shows it as the kernel forwards it: the
    // mesh port on every host with the three tasks' ingress addresses.
    for on in 0..3 {
        let dp = debug_dataplane(c, on);
        let p = dp["published"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["published"] == 8081)
            .unwrap_or_else(|| panic!("node{}: no 8081: {dp}", on + 1))
            .clone();
        assert_eq!(p["mode"], "ingress", "{p}");
        assert_eq!(p["target"], 80, "{p}");
        assert_eq!(p["backends"].as_array().unwrap().len(), 3, "{p}");
    }
    c.shoal_ok(0, &["service", "scale", "api=1"]).unwrap();
    for on in 0..3 {
        let (mut only_one, since) = (0, std::time::Instant::now());
        while only_one < 6 {
            assert!(
                since.elapsed() < CONVERGE,
                "node{}'s mesh still sends elsewhere than api.1",
                on + 1
            );
            match mesh_answers(on) {
                Some(t) if t == "api.1" => only_one += 1,
                _ => only_one = 0,
            }
        }
    }
}

/// UDP through the mesh, to a task that answers datagrams.
fn udp_goes_through_the_mesh(o: &mut Overlay) {
    let c = &mut o.c;
    let bin = shoal_bin().to_string_lossy().into_owned();
    let bin_s = bin.as_str();
    let args = tools_service(
        "udp",
        1,
        &["--network", "appnet", "-p", "8082:80/udp"],
        &["shoal", "tool", "http-echo", "--port", "80", "--udp"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    c.shoal_ok(0, &args).unwrap();
    for on in 0..3 {
        let addr = format!("{}:8082", c.hosts[on].ip);
        let v: Value = c
            .wait_until_value(CONVERGE, || {
                let r = c.in_host(
                    2,
                    bin_s,
                    &["tool", "udp-send", "--timeout", "2", &addr, "ping"],
                );
                anyhow::ensure!(r.ok(), "{addr}/udp: {}", r.stderr.trim());
                Ok(serde_json::from_str(&r.stdout)?)
            })
            .unwrap();
        assert_eq!(
            (v["task"].as_str(), v["echo"].as_str()),
            (Some("udp.1"), Some("ping")),
            "{v}"
        );
    }
}

/// mode=host publishing: the port answers on the host that runs the task
/// (straight to it), and nowhere else.
fn host_mode_answers_where_the_task_runs(o: &mut Overlay) {
    let c = &mut o.c;
    let bin = shoal_bin().to_string_lossy().into_owned();
    let bin_s = bin.as_str();
    let args = echo_service(
        "pinned",
        1,
        &[
            "--network",
            "appnet",
            "--publish",
            "mode=host,published=8090,target=80",
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    c.shoal_ok(0, &args).unwrap();
    let pinned = running(c, 0, "pinned")[0].clone();
    let home = host_of(c, &pinned);
    let url = format!("http://{}:8090/", c.hosts[home].ip);
    let v: Value = c
        .wait_until_value(CONVERGE, || {
            let r = c.in_host(
                (home + 1) % 3,
                bin_s,
                &["tool", "http-get", "--timeout", "2", &url],
            );
            anyhow::ensure!(r.ok(), "{url}: {}", r.stderr.trim());
            Ok(serde_json::from_str(&r.stdout)?)
        })
        .unwrap();
    assert_eq!(v["task"], "pinned.1", "{v}");
    let elsewhere = format!("http://{}:8090/", c.hosts[(home + 1) % 3].ip);
    let r = c.in_host(
        home,
        bin_s,
        &["tool", "http-get", "--timeout", "2", &elsewhere],
    );
    assert!(
        !r.ok(),
        "mode=host answered on a host without the task: {r:?}"
    );
}

/// macvlan: tasks get an address on the hosts' own LAN (the underlay),
/// reachable from the other hosts directly.
fn macvlan_tasks_are_on_the_hosts_lan(o: &mut Overlay) {
    let c = &mut o.c;
    let bin = shoal_bin().to_string_lossy().into_owned();
    let bin_s = bin.as_str();
    c.shoal_ok(
        0,
        &[
            "network",
            "create",
            "-d",
            "macvlan",
            "-o",
            "parent=eth0",
            "--subnet",
            "10.210.0.0/24",
            "--ip-range",
            "10.210.0.128/25",
            "--gateway",
            "10.210.0.254",
            "lan",
        ],
    )
    .unwrap();
    let args = echo_service("lanweb", 2, &["--network", "lan"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    c.shoal_ok(0, &args).unwrap();
    for t in running(c, 0, "lanweb") {
        let ip = t["addresses"]["lan"].as_str().unwrap().to_owned();
        assert!(
            ip.starts_with("10.210.0.1") || ip.starts_with("10.210.0.2"),
            "{ip}"
        );
        let other = (host_of(c, &t) + 1) % 3;
        let url = format!("http://{ip}/");
        let v: Value = c
            .wait_until_value(CONVERGE, || {
                let r = c.in_host(other, bin_s, &["tool", "http-get", "--timeout", "2", &url]);
                anyhow::ensure!(r.ok(), "{url}: {}", r.stderr.trim());
                Ok(serde_json::from_str(&r.stdout)?)
            })
            .unwrap();
        assert_eq!(v["task"], t["name"], "{v}");
    }
}

/// bridge: a one-host network; two tasks on node1 reach each other.
fn a_bridge_network_joins_tasks_on_one_host(o: &mut Overlay) {
    let c = &mut o.c;
    c.shoal_ok(0, &["network", "create", "-d", "bridge", "local"])
        .unwrap();
    let args = echo_service(
        "pair",
        2,
        &["--network", "local", "--constraint", "node.hostname==node1"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    c.shoal_ok(0, &args).unwrap();
    let pair = running(c, 0, "pair");
    assert_eq!(pair.len(), 2);
    let ip = pair[1]["addresses"]["local"].as_str().unwrap().to_owned();
    let v = c
        .wait_until_value(CONVERGE, || get_from(c, &pair[0], &ip))
        .unwrap();
    assert_eq!(v["task"], pair[1]["name"], "{v}");
}

/// A subnet on the hosts' own underlay is refused, naming the route.
fn subnets_steer_clear_of_the_hosts_routes(o: &mut Overlay) {
    let c = &mut o.c;
    c.assert_refused(
        0,
        &["network", "create", "--subnet", "10.210.0.0/25", "clash"],
        "overlaps this node's route 10.210.0.0/24 dev eth0",
    );
    // So is one on the node's gateway subnet (tasks' egress legs).
    c.assert_refused(
        0,
        &["network", "create", "--subnet", "172.31.5.0/24", "clash"],
        "overlaps this node's route 172.31.0.0/16 dev shoalgw0",
    );
    // A subnet from the pool steers clear of the node's routes: with a
    // route to 10.0.0.0/16 on node1 (say, a VPN), node1 hands out none of it.
    let r = c.in_host(0, "ip", &["route", "add", "10.0.0.0/16", "dev", "eth0"]);
    assert!(r.ok(), "{}", r.stderr);
    let auto = c
        .shoal_ok(0, &["network", "create", "clear"])
        .and_then(|_| c.shoal_ok(0, &["network", "inspect", "clear"]))
        .and_then(|r| r.json());
    let _ = c.in_host(0, "ip", &["route", "del", "10.0.0.0/16", "dev", "eth0"]);
    let auto = auto.unwrap();
    let subnet = auto[0]["subnets"][0]
        .as_str()
        .unwrap_or_else(|| panic!("{auto}"));
    assert!(
        !subnet.starts_with("10.0."),
        "{subnet} is on the node's route"
    );
    c.shoal_ok(0, &["network", "rm", "clear"]).unwrap();
    // A route that appears on another node over a network it has tasks on
    // is reported there (`shoal info` warns, naming both), and the warning
    // goes with the route.
    let appnet = c
        .shoal_ok(0, &["network", "inspect", "appnet"])
        .and_then(|r| r.json())
        .unwrap();
    let subnet = appnet[0]["subnets"][0].as_str().unwrap().to_owned();
    let r = c.in_host(1, "ip", &["route", "add", &subnet, "dev", "eth0"]);
    assert!(r.ok(), "{}", r.stderr);
    let clash = format!("network appnet ({subnet}) overlaps this node's route {subnet} dev eth0");
    let warned = c.wait_until("node2 to report the clash", CONVERGE, |c| {
        Ok(c.shoal(1, &["info"]).stderr.contains(&clash))
    });
    let _ = c.in_host(1, "ip", &["route", "del", &subnet, "dev", "eth0"]);
    warned.unwrap();
    c.wait_until("the warning to go with the route", CONVERGE, |c| {
        let v = c.info(1)?;
        Ok(v["dataplane_warnings"]
            .as_array()
            .is_some_and(Vec::is_empty))
    })
    .unwrap();
}

/// Egress: a task reaches beyond its network (here another host's
/// address, through its own host's gateway bridge); one on an
/// `--internal` network does not.
fn egress_reaches_out_unless_internal(o: &mut Overlay) {
    let tasks = o.tasks.clone();
    let c = &mut o.c;
    c.shoal_ok(0, &["network", "create", "--internal", "sealed"])
        .unwrap();
    let args = echo_service("inside", 1, &["--network", "sealed"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    c.shoal_ok(0, &args).unwrap();
    let inside = running(c, 0, "inside")[0].clone();
    let outside = format!("{}:8081", c.hosts[1].ip);
    let v = c
        .wait_until_value(CONVERGE, || get_from(c, &tasks[0], &outside))
        .unwrap();
    assert_eq!(v["task"], "api.1", "{v}");
    assert!(
        get_from(c, &inside, &outside).is_err(),
        "an internal task got out"
    );
}

/// A task with a published port joins its VIP and DNS once it listens
/// on the target port, not when its process starts: `late` waits for a
/// file before it listens. (`--detach`: `service create` would wait for
/// that too.)
fn a_task_joins_once_it_listens(o: &mut Overlay) {
    let tasks = o.tasks.clone();
    let c = &mut o.c;
    let script = "while [ ! -e /listen ]; do sleep 0.1; done; exec shoal tool http-echo --port 80";
    let args = tools_service(
        "late",
        1,
        &["--detach", "--network", "appnet", "--publish", "8083:80"],
        &["sh", "-c", script],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    c.shoal_ok(0, &args).unwrap();
    // `deaf` never listens on its published port: it joins anyway after
    // the gate's limit (10 s), rather than never.
    let args = tools_service(
        "deaf",
        1,
        &["--detach", "--network", "appnet", "--publish", "8084:80"],
        &["sleep", "3600"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    c.shoal_ok(0, &args).unwrap();
    let deaf_created = std::time::Instant::now();
    let deaf_ip = running_ip(c, "deaf");
    let late_ip = running_ip(c, "late");
    let client = tasks[0]["name"].as_str().unwrap();
    let dns_late = |c: &Cluster| {
        c.shoal_ok(
            host_of(c, &tasks[0]),
            &["debug", "dns", client, "tasks.late"],
        )
        .unwrap()
        .stdout
    };
    // Every host has `late`'s load balancer, its sandbox programmed, and
    // no backend in it, nor a DNS answer, while it does not listen.
    let late_lb = |c: &Cluster, host: usize| {
        let dp = debug_dataplane(c, host);
        dp["networks"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|n| n["load_balancers"].as_array().into_iter().flatten())
            .find(|l| l["service"] == "late")
            .cloned()
    };
    let late_host = host_of(c, &running(c, 0, "late")[0]);
    c.wait_until("`late`'s sandbox and load balancers", CONVERGE, |c| {
        let dp = debug_dataplane(c, late_host);
        let sandboxes = dp["sandboxes"].as_array().cloned().unwrap_or_default();
        let programmed = sandboxes.iter().any(|sb| sb["task"] == "late.1");
        Ok(programmed && (0..3).all(|h| late_lb(c, h).is_some()))
    })
    .unwrap();
    let v = dns_late(c);
    assert!(
        v.contains("no address right now"),
        "a task that does not listen is in DNS: {v}"
    );
    let r = c
        .shoal_ok(
            host_of(c, &tasks[0]),
            &["debug", "dns", client, "tasks.deaf"],
        )
        .unwrap();
    assert!(!r.stdout.contains(&deaf_ip), "{}", r.stdout);
    // No host's load balancers have it, its own host's included.
    for host in 0..3 {
        let lb = late_lb(c, host).unwrap();
        assert_eq!(lb["backends"], serde_json::json!([]), "host {host}: {lb}");
    }
    c.shoal_ok(late_host, &["exec", "late.1", "--", "touch", "/listen"])
        .unwrap();
    c.wait_until(
        "`late` to join DNS once it listens",
        Duration::from_secs(8),
        |c| Ok(dns_late(c).contains(&late_ip)),
    )
    .unwrap();
    let v = c
        .wait_until_value(CONVERGE, || get_from(c, &tasks[0], "late"))
        .unwrap();
    assert_eq!(v["task"], "late.1", "{v}");
    c.wait_until(
        "`deaf` to join DNS after the gate's limit",
        Duration::from_secs(25),
        |c| {
            let r = c.shoal_ok(
                host_of(c, &tasks[0]),
                &["debug", "dns", client, "tasks.deaf"],
            )?;
            Ok(r.stdout.contains(&deaf_ip))
        },
    )
    .unwrap();
    assert!(
        deaf_created.elapsed() > Duration::from_secs(6),
        "`deaf` joined after {:?}, before the gate's limit",
        deaf_created.elapsed()
    );
}

/// A host dies (daemon, tasks, link): within the failure-detection time
/// the VIP stops sending anything to its task.
fn a_dead_hosts_task_leaves_and_is_replaced(o: &mut Overlay) {
    let tasks = o.tasks.clone();
    let vip = o.vip.clone();
    let c = &mut o.c;
    let bin = shoal_bin().to_string_lossy().into_owned();
    let victim = tasks.iter().position(|t| host_of(c, t) == 2).unwrap();
    let dead_task = tasks[victim]["name"].as_str().unwrap().to_owned();
    let from = tasks.iter().find(|t| host_of(c, t) == 0).unwrap().clone();
    // Beforehand: UDP flows that keep their source port, pinned by
    // conntrack to `udp`'s task on the host about to die, through the VIP
    // (from a task) and through the mesh (from host 2 to host 1's port).
    c.shoal_ok(0, &["service", "scale", "udp=3"]).unwrap();
    let udp_vip = c
        .shoal_ok(0, &["service", "inspect", "udp"])
        .unwrap()
        .json()
        .unwrap()[0]["vips"]["appnet"]
        .as_str()
        .unwrap()
        .to_owned();
    let doomed = running(c, 0, "udp")
        .into_iter()
        .find(|t| host_of(c, t) == 2)
        .unwrap()["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let flows = [
        (Some(&from), format!("{udp_vip}:80"), 40000),
        (None, format!("{}:8082", c.hosts[0].ip), 41000),
    ];
    let pinned: Vec<u16> = flows
        .iter()
        .map(|(task, to, base)| {
            (*base..base + 30)
                .find(|p| udp_answer(c, *task, *p, to).as_deref() == Some(doomed.as_str()))
                .unwrap_or_else(|| panic!("no flow to {to} reached {doomed}"))
        })
        .collect();
    let killed = std::time::Instant::now();
    c.kill_host(2);
    let mut clean = 0;
    while clean < 12 {
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "the dead task stayed a backend"
        );
        match get_from(c, &from, &vip) {
            Ok(v) if v["task"] != dead_task.as_str() => clean += 1,
            _ => clean = 0,
        }
    }
    eprintln!(
        "the VIP dropped the dead host's task within {:?}",
        killed.elapsed()
    );
    // DNS too: `tasks.web` no longer names it.
    let dead_ip = tasks[victim]["addresses"]["appnet"]
        .as_str()
        .unwrap()
        .to_owned();
    c.wait_until("DNS to drop the dead task", Duration::from_secs(10), |c| {
        let ips = resolve(c, &from, "tasks.web");
        Ok(ips.len() == 2 && !ips.contains(&dead_ip))
    })
    .unwrap();
    eprintln!("DNS dropped it within {:?}", killed.elapsed());
    // The pinned UDP flows, still sending from the same ports, are answered
    // again by live tasks: conntrack forgot them when their task left.
    for ((task, to, _), port) in flows.iter().zip(&pinned) {
        let who = c
            .wait_until_value(Duration::from_secs(20), || {
                let who = udp_answer(c, *task, *port, to);
                anyhow::ensure!(who.is_some(), "no answer from {to} to port {port}");
                Ok(who)
            })
            .unwrap();
        assert_ne!(who.as_deref(), Some(doomed.as_str()));
    }
    eprintln!("pinned UDP flows moved within {:?}", killed.elapsed());
    // The routing mesh keeps answering on the live hosts (once its task is
    // rescheduled, if it ran on the dead one).
    for on in 0..2 {
        let url = format!("http://{}:8081/", c.hosts[on].ip);
        c.wait_until_value(Duration::from_secs(30), || {
            let r = c.in_host(1, &bin, &["tool", "http-get", "--timeout", "2", &url]);
            anyhow::ensure!(r.ok(), "{url}: {}", r.stderr.trim());
            Ok(())
        })
        .unwrap();
    }
    // The dead host's task is replaced after the grace period, and the
    // replacement serves through the VIP.
    let mut served = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while served.len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "no replacement served: {served:?}"
        );
        if let Ok(v) = get_from(c, &from, &vip) {
            let who = v["addresses"][0].as_str().unwrap_or_default().to_owned();
            assert_ne!(who, dead_ip, "the dead task answered");
            served.insert(who);
        }
    }
    eprintln!("a replacement served {:?} after the kill", killed.elapsed());
}

/// The hosts' own namespaces hold no task addresses: only the overlay does.
fn host_namespaces_hold_no_task_addresses(o: &mut Overlay) {
    let tasks = o.tasks.clone();
    let c = &mut o.c;
    let r = c.in_host(0, "ip", &["-o", "-4", "addr"]);
    for t in &tasks {
        let ip = t["addresses"]["appnet"].as_str().unwrap();
        assert!(
            !r.stdout.contains(ip),
            "{ip} leaked into the host: {}",
            r.stdout
        );
    }
}

/// The task that answers a datagram to `to` sent from source port `port`,
/// by `task` (on its host) or else by host 2 itself (none within 1 s).
fn udp_answer(c: &Cluster, task: Option<&Value>, port: u16, to: &str) -> Option<String> {
    let bin = shoal_bin().to_string_lossy().into_owned();
    let port = port.to_string();
    let send = [
        "shoal",
        "tool",
        "udp-send",
        "--timeout",
        "1",
        "--from-port",
        &port,
        to,
        "ping",
    ];
    let r = match task {
        Some(t) => {
            let name = t["name"].as_str().unwrap();
            let args = [&["exec", name, "--"][..], &send[..]].concat();
            c.shoal(host_of(c, t), &args)
        }
        None => c.in_host(1, &bin, &send[1..]),
    };
    let v: Value = serde_json::from_str(&r.stdout).ok()?;
    v["task"].as_str().map(str::to_owned)
}

/// `shoal debug dataplane --format json` on host `i`.
fn debug_dataplane(c: &Cluster, i: usize) -> Value {
    c.shoal_ok(i, &["debug", "dataplane", "--format", "json"])
        .unwrap()
        .json()
        .unwrap()
}

/// Every namespace of host `i` (by name) with its links (with their
/// interface indexes, so that a link made again shows) and addresses, as
/// `ip` lists them.
fn kernel_objects(c: &Cluster, i: usize) -> std::collections::BTreeMap<String, String> {
    let prefix = format!("{}-", c.hosts[i].netns.as_ref().unwrap());
    let mut out = std::collections::BTreeMap::new();
    for e in std::fs::read_dir("/run/netns").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&prefix) {
            continue;
        }
        let addrs = std::process::Command::new("ip")
            .args(["-n", &name, "-o", "-br", "addr"])
            .output()
            .unwrap();
        let links = std::process::Command::new("ip")
            .args(["-n", &name, "-o", "link"])
            .output()
            .unwrap();
        // "7: eth0@if4: <…> …": the index and the name.
        let indexes: Vec<String> = String::from_utf8_lossy(&links.stdout)
            .lines()
            .map(|l| l.split(": ").take(2).collect::<Vec<_>>().join(": "))
            .collect();
        out.insert(
            name,
            format!(
                "{}{}",
                String::from_utf8_lossy(&addrs.stdout),
                indexes.join("\n")
            ),
        );
    }
    out
}

#[test]
fn a_daemon_restart_keeps_traffic_flowing_and_adopts_its_kernel_state() {
    if !root_or_skip("make network namespaces, veths and VXLAN devices") {
        return;
    }
    let mut c = Cluster::start_isolated(3).unwrap();
    c.load_tools().unwrap();
    c.form(1).unwrap();
    c.shoal_ok(0, &["network", "create", "appnet"]).unwrap();
    c.shoal_ok(0, &["network", "create", "other"]).unwrap();
    let args = echo_service("web", 3, &["--network", "appnet"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    c.shoal_ok(0, &args).unwrap();
    let args = echo_service("lone", 1, &["--network", "other"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    c.shoal_ok(0, &args).unwrap();
    let tasks = running(&c, 0, "web");
    let client = tasks.iter().find(|t| host_of(&c, t) == 0).unwrap().clone();
    let far = tasks.iter().find(|t| host_of(&c, t) == 2).unwrap().clone();
    let far_ip = far["addresses"]["appnet"].as_str().unwrap().to_owned();
    c.wait_until_value(CONVERGE, || get_from(&c, &client, &far_ip))
        .unwrap();

    // Networks are isolated: the task on `other` reaches none of web's.
    let lone = running(&c, 0, "lone")[0].clone();
    for t in &tasks {
        let ip = t["addresses"]["appnet"].as_str().unwrap();
        assert!(
            get_from(&c, &lone, ip).is_err(),
            "{} reached {ip}",
            lone["name"]
        );
    }

    // Restart host 2's daemon (SIGTERM, then start) while host 1's task
    // talks to host 3's: not one request fails.
    let before = kernel_objects(&c, 1);
    assert!(!before.is_empty());
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let made = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let load = {
        let done = done.clone();
        let made = made.clone();
        let socket = c.hosts[0].socket.clone();
        let name = client["name"].as_str().unwrap().to_owned();
        let url = format!("http://{far_ip}/");
        std::thread::spawn(move || {
            let bin = shoal_bin();
            let (mut sent, mut failed) = (0, Vec::new());
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let r = std::process::Command::new(bin)
                    .arg("--socket")
                    .arg(&socket)
                    .args(["exec", &name, "--", "shoal"])
                    .args(["tool", "http-get", "--timeout", "3", &url])
                    .output()
                    .unwrap();
                if !r.status.success() {
                    failed.push(String::from_utf8_lossy(&r.stderr).into_owned());
                }
                sent += 1;
                made.store(sent, std::sync::atomic::Ordering::Relaxed);
            }
            (sent, failed)
        })
    };
    let made_so_far = || made.load(std::sync::atomic::Ordering::Relaxed);
    c.wait_until("requests under way", CONVERGE, |_| Ok(made_so_far() >= 2))
        .unwrap();
    c.stop(1);
    c.start_daemon(1).unwrap();
    // Requests go on until the restarted daemon has warmed up and
    // programmed (adopted) its kernel state, and a few more after.
    c.wait_until("host 2's restarted data plane", CONVERGE, |c| {
        let info = c.shoal_ok(1, &["info", "--format", "json"])?.json()?;
        Ok(info["dataplane"] == "programmed")
    })
    .unwrap();
    let then = made_so_far();
    c.wait_until("requests after the restart", CONVERGE, |_| {
        Ok(made_so_far() >= then + 3)
    })
    .unwrap();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, failed) = load.join().unwrap();
    assert!(sent > 5, "only {sent} requests made");
    assert!(
        failed.is_empty(),
        "{} of {sent} requests failed: {failed:?}",
        failed.len()
    );
    // Host 2's kernel state is what it was, and stays so: adopted, not
    // rebuilt or duplicated (over a full reconcile, every 5 s).
    c.holds_for(
        "host 2's kernel state as before",
        Duration::from_secs(6),
        |c| Ok(kernel_objects(c, 1) == before),
    )
    .unwrap();
    let log = c.log(1);
    let after_restart = log.rsplit("shoal daemon ready").next().unwrap_or_default();
    assert!(
        !after_restart.contains("data plane programmed"),
        "the restarted daemon changed the kernel: {after_restart}"
    );

    // The gateway subnet steers clear of the host's routes: with a route
    // into 172.31.0.0/16 on host 3 (as in AWS's default VPC), its restarted
    // daemon moves the gateway bridge and its task's egress leg to
    // 172.30.0.0/16, and the task still gets out.
    let r = c.in_host(2, "ip", &["route", "add", "172.31.16.0/20", "dev", "eth0"]);
    assert!(r.ok(), "{}", r.stderr);
    c.stop(2);
    c.start_daemon(2).unwrap();
    let far_pid = c.task_pid(2, far["id"].as_str().unwrap()).unwrap();
    c.wait_until("host 3's task to move to 172.30.0.0/16", CONVERGE, |c| {
        let gw = c.in_host(2, "ip", &["-4", "-o", "addr", "show", "dev", "shoalgw0"]);
        let leg = c.in_host(
            2,
            "nsenter",
            &[
                "--target", &far_pid, "--net", "ip", "-4", "-o", "addr", "show", "dev", "gw0",
            ],
        );
        Ok(gw.stdout.contains("172.30.0.1/16") && leg.stdout.contains(" 172.30."))
    })
    .unwrap();
    let ns = c.hosts[0].netns.clone().unwrap();
    let mut outside = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .arg(shoal_bin())
        .args(["tool", "http-echo", "--port", "9099"])
        .spawn()
        .unwrap();
    let out = c.wait_until_value(CONVERGE, || get_from(&c, &far, "10.210.0.1:9099"));
    let _ = outside.kill();
    let _ = outside.wait();
    out.unwrap();
    // A configured gateway subnet on one of the host's routes is refused
    // at start, naming the route.
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("daemon.toml");
    std::fs::write(&conf, "[dataplane]\ngateway_subnet = \"10.210.0.0/16\"\n").unwrap();
    let state = dir.path().join("state");
    let socket = dir.path().join("s.sock");
    let bin = shoal_bin().to_string_lossy().into_owned();
    let r = c.in_host(
        2,
        "timeout",
        &[
            "10",
            &bin,
            "daemon",
            "--config",
            conf.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
            "--listen-addr",
            "10.210.0.3:2999",
        ],
    );
    assert!(
        !r.ok()
            && r.stderr
                .contains("overlaps this host's route 10.210.0.0/24 dev eth0"),
        "{r:?}"
    );

    // Leaving the swarm removes everything the node's data plane made.
    c.shoal_ok(1, &["swarm", "leave"]).unwrap();
    assert_eq!(kernel_objects(&c, 1), Default::default());
    let host_links = c.in_host(1, "ip", &["-o", "link"]);
    let ours: Vec<&str> = host_links
        .stdout
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .filter(|name| name.trim().starts_with("shoal"))
        .collect();
    assert!(ours.is_empty(), "{ours:?}");
}
