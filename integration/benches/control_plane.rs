//! Control-plane benchmarks on real daemons (release build):
//!
//! - leader failover: `kill -9` the leader of 3 managers, time until a write
//!   through a survivor has been committed by the new leader;
//! - write latency and throughput through the daemon's API (fsync on), with
//!   1 and 64 concurrent clients, on a 3-manager swarm.
//!
//! `cargo bench -p shoal-integration --bench control_plane [-- TRIALS [failover|writes]]`

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use shoal_integration::Cluster;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{name}: n={} min={:.1}ms p50={:.1}ms p99={:.1}ms max={:.1}ms",
        v.len(),
        ms(v[0]),
        ms(percentile(&v, 0.5)),
        ms(percentile(&v, 0.99)),
        ms(v[v.len() - 1])
    );
}

fn all_ready(c: &Cluster, up: &[usize]) -> anyhow::Result<bool> {
    for &i in up {
        let nodes = c.node_ls(i)?;
        let ready = nodes.iter().filter(|n| n["status"] == "ready").count();
        let leaders = nodes
            .iter()
            .filter(|n| n["manager_status"] == "leader")
            .count();
        if ready != nodes.len() || leaders != 1 {
            return Ok(false);
        }
    }
    Ok(true)
}

fn failover(trials: usize) -> anyhow::Result<()> {
    let mut c = Cluster::start(3)?;
    c.form(3)?;
    let all = [0, 1, 2];
    c.wait_until("3 managers", Duration::from_secs(30), |c| {
        all_ready(c, &all)
    })?;
    let mut times = Vec::new();
    for t in 0..trials {
        let leader = c.leader(0)?.or(c.leader(1)?).expect("a leader");
        let survivor = (0..3).find(|i| *i != leader).expect("a survivor");
        let label = format!("trial={t}");
        let name = c.hosts[survivor].name.clone();
        c.kill(leader);
        let killed = Instant::now();
        loop {
            if c.shoal(survivor, &["node", "update", "--label-add", &label, &name])
                .ok()
            {
                break;
            }
            if killed.elapsed() > Duration::from_secs(30) {
                anyhow::bail!("no write within 30 s of killing the leader");
            }
        }
        let took = killed.elapsed();
        println!("failover trial {t}: {:.1} ms", took.as_secs_f64() * 1000.0);
        times.push(took);
        c.start_daemon(leader)?;
        c.wait_until("the swarm to heal", Duration::from_secs(30), |c| {
            all_ready(c, &all)
        })?;
    }
    summary(
        "leader failover (kill -9 -> write committed by new leader)",
        times,
    );
    Ok(())
}

fn api_write(socket: &Path, node: &str, n: usize) -> anyhow::Result<Duration> {
    let req = format!(
        "{{\"op\":\"node_update\",\"node\":\"{node}\",\"availability\":null,\"label_add\":[[\"bench\",\"{n}\"]],\"label_rm\":[]}}\n"
    );
    let started = Instant::now();
    let mut s = UnixStream::connect(socket)?;
    s.write_all(req.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply)?;
    if reply.contains("\"error\":\"") {
        anyhow::bail!("write failed: {reply}");
    }
    Ok(started.elapsed())
}

fn writes(per_client: usize, clients: usize) -> anyhow::Result<()> {
    let c = Cluster::start(3)?;
    c.form(3)?;
    c.wait_until("3 managers", Duration::from_secs(30), |c| {
        all_ready(c, &[0, 1, 2])
    })?;
    for (via, what) in [
        (c.leader(0)?.expect("leader"), "leader"),
        (
            (c.leader(0)?.expect("leader") + 1) % 3,
            "follower (forwarded)",
        ),
    ] {
        let socket = c.hosts[via].socket.clone();
        let node = c.hosts[via].name.clone();
        let started = Instant::now();
        let lat: Vec<Duration> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..clients)
                .map(|k| {
                    let socket = &socket;
                    let node = &node;
                    s.spawn(move || {
                        (0..per_client)
                            .map(|i| api_write(socket, node, k * per_client + i).expect("write"))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("client"))
                .collect()
        });
        let secs = started.elapsed().as_secs_f64();
        let total = lat.len();
        summary(&format!("API writes via {what}, {clients} client(s)"), lat);
        println!("  throughput: {:.0} writes/s", total as f64 / secs);
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let trials: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(20);
    let only = args.get(1).map(String::as_str);
    if only != Some("failover") {
        writes(200, 1)?;
        writes(20, 64)?;
    }
    if only != Some("writes") {
        failover(trials)?;
    }
    Ok(())
}
