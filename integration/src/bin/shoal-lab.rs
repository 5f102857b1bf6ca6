//! `shoal-lab`: local Shoal clusters on one machine.
//!
//! Today it has one command, `demo`: three `shoal daemon` processes on
//! loopback addresses form a swarm of three managers, the leader is killed,
//! another takes over, the killed node rejoins, and everything is torn down.
//! (The lab issue grows this into hosts in network namespaces with services
//! and traffic.)

use std::time::{Duration, Instant};

use shoal_integration::Cluster;

fn step(text: &str) {
    println!("\n==> {text}");
}

fn show(c: &Cluster, i: usize, args: &[&str]) -> anyhow::Result<()> {
    println!("$ shoal {}    # on {}", args.join(" "), c.hosts[i].name);
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

fn demo() -> anyhow::Result<()> {
    step("Starting three shoal daemons on loopback addresses (one per simulated host)");
    let mut c = Cluster::start(3)?;
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

    let leader = c.leader(0)?.ok_or_else(|| anyhow::anyhow!("no leader"))?;
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

    step(&format!("{dead} restarts and catches up as a follower"));
    c.start_daemon(leader)?;
    c.wait_until("all nodes ready again", Duration::from_secs(20), |c| {
        all_ready(c, &[0, 1, 2])
    })?;
    c.wait_until(
        "the write to reach the restarted node",
        Duration::from_secs(20),
        |c| {
            Ok(c.node_ls(leader)?
                .iter()
                .any(|n| n["labels"]["demo"] == "failover"))
        },
    )?;
    show(
        &c,
        leader,
        &["node", "inspect", "--format", "table", &target],
    )?;

    step("Tearing down: daemons stopped, state dirs removed");
    for i in 0..3 {
        c.stop(i);
    }
    drop(c);
    println!(
        "\nDemo complete: a 3-manager swarm formed over QUIC with mutual TLS, lost its leader,"
    );
    println!(
        "elected a new one, kept accepting writes, and took the old leader back with the full state."
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("demo") => demo(),
        _ => {
            eprintln!("usage: shoal-lab demo");
            return std::process::ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
