//! `shoal-lab`: local Shoal clusters on one machine, as root: hosts made of
//! network namespaces on one underlay bridge, each with a shoal daemon and
//! a containerd, and a registry of the lab's own on the underlay (`up`,
//! `push`, `exec`, `kill`/`stop`/`start`, `partition`/`heal`, `down`);
//! `demo`, the main job shown step by step; `failover`, scenarios measured
//! from the clients' side. Without root, `demo` runs its swarm on loopback
//! addresses, without the data plane.

use std::time::{Duration, Instant};

use shoal_integration::failover;
use shoal_integration::lab::LAB_IMAGE;
use shoal_integration::spec::LabSpec;
use shoal_integration::{Cluster, is_root, web_service};

fn step(text: &str) {
    println!("\n==> {text}");
}

/// `arg` as a shell would need it typed.
fn quoted(arg: &str) -> String {
    let plain = |ch: char| ch.is_ascii_alphanumeric() || "-_./:=@,".contains(ch);
    if !arg.is_empty() && arg.chars().all(plain) {
        return arg.to_owned();
    }
    format!("'{}'", arg.replace('\'', r"'\''"))
}

fn show(c: &Cluster, i: usize, args: &[&str]) -> anyhow::Result<()> {
    let typed: Vec<String> = args.iter().map(|a| quoted(a)).collect();
    println!("$ shoal {}    # on {}", typed.join(" "), c.hosts[i].name);
    let r = c.shoal_ok(i, args)?;
    print!("{}", r.stdout);
    eprint!("{}", r.stderr);
    Ok(())
}

fn all_ready(c: &Cluster, up: &[usize]) -> anyhow::Result<bool> {
    for &i in up {
        let nodes = c.node_ls(i)?;
        if nodes.iter().any(|n| n["status"] != "ready")
            || nodes
                .iter()
                .filter(|n| n["manager_status"] == "leader")
                .count()
                != 1
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Visible VTEP entries of network `demo` on host `i`.
fn visible_vteps(c: &Cluster, i: usize) -> anyhow::Result<usize> {
    let d = c
        .shoal_ok(i, &["debug", "gossip", "--format", "json"])?
        .json()?;
    Ok(d["networks"]["demo"]["vteps"]
        .as_array()
        .map_or(0, |v| v.iter().filter(|e| e["visible"] == true).count()))
}

/// (task name, node hostname) of the running tasks of `web`, as host `i` sees them.
fn running_tasks(c: &Cluster, i: usize) -> anyhow::Result<Vec<(String, String)>> {
    Ok(c.running_tasks(i, "web")?
        .iter()
        .map(|t| {
            let s = |k: &str| t[k].as_str().unwrap_or_default().to_owned();
            (s("name"), s("node"))
        })
        .collect())
}

/// From inside each running task of `web`, a request to `http://web/`
/// (the embedded DNS gives the VIP, which balances over the replicas), then
/// a request to port 8080 of every live host's address (the routing mesh);
/// prints who answered, and how many replicas did (new connections pick a
/// replica at random, so several answer).
fn requests(c: &Cluster, bin: &str) -> anyhow::Result<()> {
    let mut answered = std::collections::BTreeSet::new();
    let mut note = |stdout: &str| {
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_default();
        if let Some(task) = v["task"].as_str() {
            answered.insert(task.to_owned());
        }
    };
    let live = |name: &str| c.hosts.iter().position(|h| h.name == name);
    for (task, node) in running_tasks(c, live_host(c))? {
        let Some(i) = live(&node) else { continue };
        let url = "http://web/";
        let r = c.shoal_ok(i, &["exec", &task, "--", "busybox", "wget", "-qO-", url])?;
        println!("$ shoal exec {task} -- busybox wget -qO- {url}    # on {node}");
        print!("{}", r.stdout);
        note(&r.stdout);
    }
    for (i, h) in c.hosts.iter().enumerate() {
        if !c.shoal(i, &["info"]).ok() {
            continue;
        }
        let url = format!("http://{}:8080/", h.ip);
        // From the next host whose daemon lives (a host whose daemon was
        // killed keeps the kernel state it had: not a client to trust).
        let n = c.hosts.len();
        let from = (1..n)
            .map(|k| (i + k) % n)
            .find(|j| c.shoal(*j, &["info"]).ok())
            .unwrap_or((i + 1) % n);
        let r = c
            .wait_until_value(Duration::from_secs(20), || {
                let r = c.in_host(from, bin, &["tool", "http-get", "--timeout", "2", &url]);
                anyhow::ensure!(r.ok(), "{url}: {}", r.stderr.trim());
                Ok(r)
            })
            .map_err(|e| anyhow::anyhow!("{e}\n{}", mesh_diagnostics(c, i)))?;
        println!(
            "$ shoal tool http-get {url}    # from {}'s network namespace",
            c.hosts[from].name
        );
        print!("{}", r.stdout);
        note(&r.stdout);
    }
    let names: Vec<&str> = answered.iter().map(String::as_str).collect();
    println!(
        "answered by {} replicas: {}",
        answered.len(),
        names.join(", ")
    );
    Ok(())
}

/// What host `i` has programmed, for a routing-mesh failure report.
fn mesh_diagnostics(c: &Cluster, i: usize) -> String {
    format!(
        "--- diagnostics of the routing mesh on {}\n{}",
        c.hosts[i].name,
        c.kernel_snapshot(i)
    )
}

/// A host whose daemon answers.
fn live_host(c: &Cluster) -> usize {
    (0..c.hosts.len())
        .find(|i| c.shoal(*i, &["info"]).ok())
        .unwrap_or(0)
}

/// Without the data plane: each node publishes a VTEP by hand through
/// gossip, to show the tables.
fn gossip_vteps(c: &Cluster) -> anyhow::Result<()> {
    step("Each node publishes its tunnel endpoint (VTEP) on network `demo` through gossip");
    for i in 0..3 {
        let id = c.info(i)?["node_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let value = format!(r#"{{"vtep":{{"node":"{id}","addr":"{}"}}}}"#, c.hosts[i].ip);
        c.shoal_ok(i, &["debug", "gossip-join", "demo"])?;
        c.wait_until("the gossip write", Duration::from_secs(20), |c| {
            Ok(
                c.shoal(i, &["debug", "gossip-put", "demo", "vteps", &id, &value])
                    .ok(),
            )
        })?;
    }
    c.wait_until("every VTEP on every node", Duration::from_secs(20), |c| {
        for i in 0..3 {
            if visible_vteps(c, i)? != 3 {
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    show(c, 2, &["debug", "gossip", "--network", "demo"])?;

    Ok(())
}

/// The demo; with `keep`, the lab of that name stays up after it.
fn demo(keep: Option<&str>) -> anyhow::Result<()> {
    let root = is_root();
    if keep.is_some() && !root {
        anyhow::bail!(
            "--keep needs root: the kept lab's hosts are network namespaces (run without --keep to see the demo on loopback)"
        );
    }
    let mut c = if root {
        step(
            "Three hosts as network namespaces on one underlay bridge (10.210.0.0/24), a shoal daemon in each",
        );
        println!(
            "    each host runs a containerd; the lab's registry on the underlay holds a busybox image built from Debian's busybox-static"
        );
        if let Some(name) = keep {
            Cluster::lab_create(name, &LabSpec::nodes(3, 3)?)?
        } else {
            Cluster::start_isolated(3)?.equip()?
        }
    } else {
        step("Not root: three shoal daemons on loopback addresses, without the data plane");
        Cluster::start(3)?
    };
    for h in &c.hosts {
        println!(
            "    {}: QUIC on {} (UDP), API socket {}",
            h.name,
            h.addr(),
            h.socket.display()
        );
    }

    step("node1 creates the swarm");
    show(&c, 0, &["swarm", "init"])?;
    let token = c.token(0, "manager")?;
    for i in 1..3 {
        step(&format!("{} joins as a manager", c.hosts[i].name));
        let addr = c.hosts[0].addr();
        show(&c, i, &["swarm", "join", "--token", &token, &addr])?;
    }
    c.wait_until("all nodes ready", Duration::from_secs(20), |c| {
        all_ready(c, &[0, 1, 2])
    })?;
    step("Every node holds the replicated store; any node can list the swarm");
    show(&c, 2, &["node", "ls"])?;

    if root {
        step(
            "An overlay network and a service of 3 containers of the registry's image (busybox httpd answering with its task name and addresses), published on port 8080 through the routing mesh",
        );
        show(&c, 0, &["network", "create", "web"])?;
        let bin = shoal_integration::shoal_bin()
            .to_string_lossy()
            .into_owned();
        let image = format!(
            "{}/{LAB_IMAGE}",
            shoal_integration::registry_on(c.hosts[0].ip)
        );
        let args = web_service(
            "web",
            3,
            &["--network", "web", "-p", "8080:80", "--limit-memory", "64m"],
            &image,
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        show(&c, 1, &args)?;
        // A host's copy of the store may trail the leader's for a moment
        // (longer across an election): each host execs into its own tasks
        // below, so each must see them run.
        c.wait_until(
            "every host to see 3 running tasks",
            Duration::from_secs(30),
            |c| {
                for i in 0..c.hosts.len() {
                    if running_tasks(c, i)?.len() != 3 {
                        return Ok(false);
                    }
                }
                Ok(true)
            },
        )?;
        show(&c, 0, &["service", "ps", "web"])?;
        step(
            "Traffic: by name from inside each task (DNS → VIP → a replica on any host), and port 8080 on every host",
        );
        requests(&c, &bin)?;
        step(
            "What node1 programmed: FDB entries to the other hosts' VTEPs (from gossip), the VIP's backends",
        );
        show(&c, 0, &["debug", "dataplane", "--network", "web"])?;
    } else {
        step("(not root: skipping the service part, which needs network namespaces)");
        gossip_vteps(&c)?;
    }

    let leader = c.wait_until_value(Duration::from_secs(20), || {
        c.leader(0)?
            .ok_or_else(|| anyhow::anyhow!("node1 knows no leader"))
    })?;
    let survivor = (0..3).find(|i| *i != leader).unwrap_or(0);
    step(&format!(
        "kill -9 the leader ({}) and write through {}",
        c.hosts[leader].name, c.hosts[survivor].name
    ));
    c.kill(leader);
    let killed = Instant::now();
    let target = c.hosts[survivor].name.clone();
    c.wait_until("a write to succeed", Duration::from_secs(20), |c| {
        Ok(c.shoal(
            survivor,
            &["node", "update", "--label-add", "demo=failover", &target],
        )
        .ok())
    })?;
    println!(
        "    a new leader committed the write {:.0} ms after the kill",
        killed.elapsed().as_secs_f64() * 1000.0
    );
    let dead = c.hosts[leader].name.clone();
    c.wait_until(
        "the dead node to be marked down",
        Duration::from_secs(20),
        |c| {
            Ok(c.node_ls(survivor)?
                .iter()
                .any(|n| n["hostname"] == dead.as_str() && n["status"] == "down"))
        },
    )?;
    println!(
        "    {dead} marked down {:.1} s after the kill",
        killed.elapsed().as_secs_f64()
    );
    show(&c, survivor, &["node", "ls"])?;
    if !root {
        c.wait_until(
            "the dead node's VTEP to leave gossip",
            Duration::from_secs(20),
            |c| Ok(visible_vteps(c, survivor)? == 2),
        )?;
        println!("    gossip declared {dead} dead and hid its VTEP on every node:");
        show(&c, survivor, &["debug", "gossip", "--network", "demo"])?;
    }

    if root {
        step(&format!(
            "{dead}'s task is rescheduled on a live node after the 5 s grace period"
        ));
        c.wait_until("the task to move", Duration::from_secs(30), |c| {
            Ok(running_tasks(c, survivor)?
                .iter()
                .all(|(_, node)| *node != dead)
                && running_tasks(c, survivor)?.len() == 3)
        })?;
        println!(
            "    all 3 tasks running on live nodes {:.1} s after the kill",
            killed.elapsed().as_secs_f64()
        );
        show(&c, survivor, &["service", "ps", "web"])?;
        let bin = shoal_integration::shoal_bin()
            .to_string_lossy()
            .into_owned();
        requests(&c, &bin)?;
    }

    step(&format!("{dead} restarts and catches up as a follower"));
    c.start_daemon(leader)?;
    c.wait_until("all nodes ready again", Duration::from_secs(20), |c| {
        all_ready(c, &[0, 1, 2])
    })?;
    c.wait_until(
        "the write to reach the restarted node",
        Duration::from_secs(20),
        |c| {
            let nodes = c.node_ls(leader)?;
            Ok(nodes.iter().any(|n| n["labels"]["demo"] == "failover")
                && nodes.iter().all(|n| n["gossip"] == "alive"))
        },
    )?;
    show(
        &c,
        leader,
        &["node", "inspect", "--format", "table", &target],
    )?;

    if let Some(name) = keep {
        step(&format!(
            "Keeping the lab `{name}` (--keep): the cluster and its service stay up"
        ));
        println!("    shoal-lab ls --name {name}");
        println!("    shoal-lab exec --name {name} node2 -- shoal service ps web");
        println!("    kill, stop, start, partition and heal work on it too; remove it with:");
        println!("    shoal-lab down --name {name}");
    } else {
        step("Tearing down: daemons and their tasks stopped, state dirs removed");
        for i in 0..3 {
            c.stop(i);
        }
    }
    drop(c);
    println!("\nDemo complete: a 3-manager swarm formed over QUIC with mutual TLS on three hosts,");
    println!(
        "ran 3 containers pulled from a registry on a VXLAN overlay, answered by name through the"
    );
    println!("embedded DNS and the VIP and on port 8080 of every host, lost its leader, elected a");
    println!("new one, kept accepting writes, moved the dead host's task to a live host with");
    println!("traffic flowing, and took the old host back with the full state.");
    Ok(())
}

const USAGE: &str = "usage: shoal-lab demo [--keep [--name LAB]]
       shoal-lab up [--nodes N] [--managers M | --config cluster-configs/FILE.toml] [--name LAB]
       shoal-lab ls [--name LAB]
       shoal-lab push [--name LAB] ARCHIVE NAME:TAG
       shoal-lab exec [--name LAB] HOST -- CMD [ARG...]
       shoal-lab kill|stop|start [--name LAB] HOST
       shoal-lab partition [--name LAB] HOST,HOST... HOST,HOST...
       shoal-lab heal [--name LAB]
       shoal-lab down [--name LAB]
       shoal-lab failover --scenario kill-leader|kill-worker|partition-minority|restart-all|rolling-restart [--runs N] [--format json]
       shoal-lab scale [--nodes N] [--managers M] [--seconds S] [--format json]";

/// `--flag VALUE` out of `args` (removed), or `default`; a flag given
/// without its value is an error rather than silently the default.
fn flag(args: &mut Vec<String>, name: &str, default: &str) -> anyhow::Result<String> {
    match args.iter().position(|a| a == name) {
        Some(i) if i + 1 < args.len() && !args[i + 1].starts_with("--") => {
            let v = args.remove(i + 1);
            args.remove(i);
            Ok(v)
        }
        Some(_) => anyhow::bail!("{name} needs a value\n{USAGE}"),
        None => Ok(default.to_owned()),
    }
}

/// Fails on anything left in `args` once a command has taken its flags, so
/// that a mistyped flag is named instead of ignored.
fn no_more(args: &[String]) -> anyhow::Result<()> {
    match args.first() {
        Some(a) => anyhow::bail!("unexpected argument `{a}`\n{USAGE}"),
        None => Ok(()),
    }
}

fn number(text: &str, what: &str) -> anyhow::Result<usize> {
    text.parse()
        .map_err(|_| anyhow::anyhow!("invalid {what} `{text}`: use a number"))
}

fn one_host(c: &Cluster, args: &[String]) -> anyhow::Result<usize> {
    match args {
        [h] => c.host_index(h),
        _ => anyhow::bail!("name one host\n{USAGE}"),
    }
}

fn print_report(r: &serde_json::Value) {
    let t = |v: &serde_json::Value| match v.as_f64() {
        Some(s) => format!("{s:.2} s"),
        None => "-".into(),
    };
    println!(
        "scenario {} (fault on {}, clients on {})",
        r["scenario"].as_str().unwrap_or_default(),
        r["victim"].as_str().unwrap_or_default(),
        r["observer"].as_str().unwrap_or_default()
    );
    println!("  new leader after:              {}", t(&r["new_leader_s"]));
    println!("  every data plane programmed:  {}", t(&r["converged_s"]));
    println!(
        "  dead endpoints out of every LB and DNS answer: {}",
        t(&r["endpoints_gone_s"])
    );
    println!(
        "  replacement served after:      {}",
        t(&r["replacement_served_s"])
    );
    for path in ["vip", "mesh"] {
        let p = &r[path];
        println!(
            "  {path:<4} requests: {} sent, {} failed, longest gap {:.2} s, failed after recovery: {}",
            p["sent"],
            p["failed"],
            p["longest_gap_s"].as_f64().unwrap_or(0.0),
            p["failed_after_recovery"]
        );
        for f in p["failures"].as_array().into_iter().flatten() {
            println!(
                "         failed at {:+.2} s: {}",
                f["at_s"].as_f64().unwrap_or(0.0),
                f["error"].as_str().unwrap_or_default()
            );
        }
    }
    if let Some(dir) = r["logs"].as_str() {
        println!("  daemon logs of this run (a request failed after recovery): {dir}");
    }
}

/// `shoal-lab scale`: N daemons on loopback addresses, measured (bytes on
/// the wire need root, the rest does not).
fn scale(mut args: Vec<String>) -> anyhow::Result<std::process::ExitCode> {
    let nodes = number(&flag(&mut args, "--nodes", "10")?, "--nodes")?;
    let managers = match flag(&mut args, "--managers", "")?.as_str() {
        "" => nodes.min(3),
        m => number(m, "--managers")?,
    };
    let seconds = number(&flag(&mut args, "--seconds", "15")?, "--seconds")?;
    let format = flag(&mut args, "--format", "table")?;
    no_more(&args)?;
    let s = shoal_integration::scale::Scale::new(nodes, managers, seconds as u64)?;
    let report = shoal_integration::scale::run(s)?;
    if format == "json" {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        shoal_integration::scale::print(&report);
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// The lab commands other than `demo`.
fn lab(cmd: &str, mut args: Vec<String>) -> anyhow::Result<std::process::ExitCode> {
    if !is_root() {
        anyhow::bail!(
            "shoal-lab needs root: it creates network namespaces, veths, bridges and nftables rules for its hosts"
        );
    }
    if cmd == "failover" {
        let scenario = flag(&mut args, "--scenario", "kill-leader")?;
        let format = flag(&mut args, "--format", "table")?;
        let runs = number(&flag(&mut args, "--runs", "1")?, "--runs")?;
        no_more(&args)?;
        if !(1..=100).contains(&runs) {
            anyhow::bail!("--runs must be 1 to 100");
        }
        if runs == 1 {
            let report = failover::run(&scenario)?;
            if format == "json" {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_report(&report);
            }
            return Ok(std::process::ExitCode::SUCCESS);
        }
        let mut reports = Vec::new();
        for n in 1..=runs {
            let report = failover::run(&scenario)?;
            if format != "json" {
                println!("--- run {n} of {runs}");
                print_report(&report);
            }
            reports.push(report);
        }
        let summary = failover::summarize(&reports);
        if format == "json" {
            let all =
                serde_json::json!({"scenario": scenario, "runs": reports, "summary": summary});
            println!("{}", serde_json::to_string_pretty(&all)?);
        } else {
            println!("--- {scenario}, {runs} runs: min / median / max");
            for (name, _) in failover::METRICS {
                if let Some(m) = summary.get(name) {
                    println!(
                        "  {name:<24} {} / {} / {}  ({} runs measured it)",
                        m["min"], m["median"], m["max"], m["runs"]
                    );
                }
            }
        }
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let config = flag(&mut args, "--config", "")?;
    let spec = if config.is_empty() {
        None
    } else {
        if args.iter().any(|a| a == "--nodes" || a == "--managers") {
            anyhow::bail!("--config names the hosts: leave out --nodes and --managers");
        }
        Some(LabSpec::load(std::path::Path::new(&config))?)
    };
    let default_name = spec
        .as_ref()
        .and_then(|s| s.name.clone())
        .unwrap_or_else(|| "lab".into());
    let name = flag(&mut args, "--name", &default_name)?;
    match cmd {
        "up" => {
            let spec = match spec {
                Some(s) => s,
                None => {
                    let nodes = number(&flag(&mut args, "--nodes", "3")?, "--nodes")?;
                    let managers = number(&flag(&mut args, "--managers", "1")?, "--managers")?;
                    LabSpec::nodes(nodes, managers)?
                }
            };
            no_more(&args)?;
            let c = Cluster::lab_up(&name, &spec)?;
            let managers = spec.hosts.iter().filter(|h| h.manager).count();
            println!(
                "lab `{name}`: {} hosts, {managers} manager(s)",
                spec.hosts.len()
            );
            let registry = shoal_integration::registry_on(c.hosts[0].ip);
            println!(
                "  registry: {registry}, holding {registry}/{LAB_IMAGE} (busybox); add images with: shoal-lab push --name {name} ARCHIVE NAME:TAG"
            );
            for h in &c.hosts {
                println!(
                    "  {}: {} (namespace {}), run commands with: shoal-lab exec --name {name} {} -- shoal node ls",
                    h.name,
                    h.ip,
                    h.netns.as_deref().unwrap_or_default(),
                    h.name
                );
            }
        }
        "push" => {
            let c = Cluster::lab_attach(&name)?;
            let [archive, name_tag] = args.as_slice() else {
                anyhow::bail!("push needs an image archive and a NAME:TAG\n{USAGE}");
            };
            if name_tag.starts_with('-') || name_tag.contains("://") || !name_tag.contains(':') {
                anyhow::bail!(
                    "invalid image name `{name_tag}`: give NAME:TAG, e.g. lab/web:1 (the lab's registry address is added)"
                );
            }
            c.push(std::path::Path::new(archive), name_tag)?;
            let registry = shoal_integration::registry_on(c.hosts[0].ip);
            println!("pushed: the lab's nodes pull it as {registry}/{name_tag}");
        }
        "ls" => {
            no_more(&args)?;
            let c = Cluster::lab_attach(&name)?;
            println!("HOST     ADDRESS        DAEMON    NAMESPACE");
            for (i, h) in c.hosts.iter().enumerate() {
                println!(
                    "{:<8} {:<14} {:<9} {}",
                    h.name,
                    h.ip.to_string(),
                    if c.running(i) { "running" } else { "stopped" },
                    h.netns.as_deref().unwrap_or_default()
                );
            }
        }
        "exec" => {
            let c = Cluster::lab_attach(&name)?;
            let sep = args.iter().position(|a| a == "--");
            let (host, command) = match sep {
                Some(i) => (args[..i].to_vec(), args[i + 1..].to_vec()),
                None => anyhow::bail!("exec needs `-- CMD`\n{USAGE}"),
            };
            let i = one_host(&c, &host)?;
            let Some((program, rest)) = command.split_first() else {
                anyhow::bail!("exec needs a command after `--`");
            };
            let bin_dir = shoal_integration::shoal_bin()
                .parent()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            let path = format!("{bin_dir}:{}", std::env::var("PATH").unwrap_or_default());
            let status = std::process::Command::new("nsenter")
                .arg(format!(
                    "--net=/run/netns/{}",
                    c.hosts[i].netns.as_deref().unwrap_or_default()
                ))
                .arg(program)
                .args(rest)
                .env("SHOAL_SOCKET", &c.hosts[i].socket)
                .env("PATH", path)
                .status()?;
            return Ok(std::process::ExitCode::from(
                u8::try_from(status.code().unwrap_or(1)).unwrap_or(1),
            ));
        }
        "kill" | "stop" | "start" => {
            let mut c = Cluster::lab_attach(&name)?;
            let i = one_host(&c, &args)?;
            match cmd {
                "kill" => {
                    c.kill(i);
                    shoal_integration::kill_processes_under(&c.hosts[i].state_dir);
                    println!("{}: daemon and tasks killed", c.hosts[i].name);
                }
                "stop" => {
                    c.stop(i);
                    println!(
                        "{}: daemon stopped (its tasks keep running)",
                        c.hosts[i].name
                    );
                }
                _ => {
                    if c.running(i) {
                        anyhow::bail!("{}'s daemon already runs", c.hosts[i].name);
                    }
                    c.start_daemon(i)?;
                    println!("{}: daemon started", c.hosts[i].name);
                }
            }
        }
        "partition" => {
            let c = Cluster::lab_attach(&name)?;
            if args.len() < 2 {
                anyhow::bail!("partition needs two or more groups, e.g. node1 node2,node3");
            }
            let groups = args
                .iter()
                .map(|g| {
                    g.split(',')
                        .map(|h| c.host_index(h))
                        .collect::<anyhow::Result<Vec<_>>>()
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            c.partition(&groups)?;
            println!("partitioned: {}", args.join(" | "));
        }
        "heal" => {
            no_more(&args)?;
            Cluster::lab_attach(&name)?.heal()?;
            println!("healed: every host reaches every other");
        }
        "down" => {
            no_more(&args)?;
            Cluster::lab_down(&name)?;
            println!("lab `{name}` removed");
        }
        _ => anyhow::bail!("{USAGE}"),
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn main() -> std::process::ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    // `--help` anywhere before an `exec`'s `--` asks for the usage; it
    // must never be taken as "go on with the defaults".
    let own = args.iter().position(|a| a == "--").unwrap_or(args.len());
    if args[..own].iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return std::process::ExitCode::SUCCESS;
    }
    let result = match args.first().map(String::as_str) {
        Some("demo") => {
            let mut rest = args[1..].to_vec();
            let keep = rest
                .iter()
                .position(|a| a == "--keep")
                .map(|i| rest.remove(i));
            match flag(&mut rest, "--name", "demo") {
                Err(e) => Err(e),
                Ok(name) => match (keep, rest.is_empty()) {
                    (None, true) if name == "demo" => demo(None),
                    (Some(_), true) => demo(Some(&name)),
                    _ => Err(anyhow::anyhow!(
                        "usage: shoal-lab demo [--keep [--name LAB]]"
                    )),
                },
            }
        }
        .map(|()| std::process::ExitCode::SUCCESS),
        Some("scale") => scale(args[1..].to_vec()),
        Some(cmd) if !cmd.starts_with('-') => {
            let cmd = args.remove(0);
            lab(&cmd, args)
        }
        _ => {
            eprintln!("{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
