//! `shoal-lab scale`: N real daemons on loopback addresses of this
//! machine (no data plane), measured as issue 16 asks: how long joins
//! take, what an idle daemon costs (CPU, memory, bytes on the wire), live
//! nodes shown `down`, how long a service of 2·N replicas takes to run,
//! and how long a killed worker takes to be `down` on every manager and
//! have its tasks run elsewhere.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};

use crate::{Cluster, is_root};

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct Scale {
    /// Daemons.
    pub nodes: usize,
    /// Of which managers.
    pub managers: usize,
    /// The idle window measured, after a settling time of as long.
    pub seconds: u64,
}

impl Scale {
    /// Checked bounds: 2 to 250 nodes (loopback addresses of one /24),
    /// 1 to 7 managers, 5 to 3 600 seconds.
    pub fn new(nodes: usize, managers: usize, seconds: u64) -> anyhow::Result<Scale> {
        anyhow::ensure!(
            (2..=250).contains(&nodes),
            "--nodes must be 2 to 250 (loopback addresses of one /24)"
        );
        anyhow::ensure!(
            (1..=7).contains(&managers) && managers <= nodes,
            "--managers must be 1 to 7, and at most --nodes"
        );
        anyhow::ensure!((5..=3600).contains(&seconds), "--seconds must be 5 to 3600");
        Ok(Scale {
            nodes,
            managers,
            seconds,
        })
    }
}

/// CPU time (user + system) of process `pid` so far, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
fn ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Bytes each node sends, counted by nftables per source address (root
/// only): a table of this run's own, removed on drop.
struct Counters {
    table: String,
    nodes: Vec<String>,
}

impl Counters {
    fn start(c: &Cluster) -> anyhow::Result<Counters> {
        let table = format!("shoal-scale-{}", std::process::id());
        let nodes: Vec<String> = c.hosts.iter().map(|h| h.ip.to_string()).collect();
        let mut script = format!(
            "add table ip {table}\nadd chain ip {table} out {{ type filter hook output priority 0; policy accept; }}\n"
        );
        for ip in &nodes {
            script.push_str(&format!("add rule ip {table} out ip saddr {ip} counter\n"));
        }
        nft(&script)?;
        Ok(Counters { table, nodes })
    }

    /// Bytes sent so far, per node address.
    fn read(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        let out = Command::new("nft")
            .args(["-j", "list", "table", "ip", &self.table])
            .output()
            .context("cannot run nft")?;
        let v: Value = serde_json::from_slice(&out.stdout)?;
        let mut bytes = BTreeMap::new();
        for item in v["nftables"].as_array().into_iter().flatten() {
            let rule = &item["rule"];
            let exprs = rule["expr"].as_array().cloned().unwrap_or_default();
            let ip = exprs
                .iter()
                .find_map(|e| e["match"]["right"].as_str().map(str::to_owned));
            let counted = exprs.iter().find_map(|e| e["counter"]["bytes"].as_u64());
            if let (Some(ip), Some(b)) = (ip, counted)
                && self.nodes.contains(&ip)
            {
                bytes.insert(ip, b);
            }
        }
        Ok(bytes)
    }
}

impl Drop for Counters {
    fn drop(&mut self) {
        let _ = nft(&format!("delete table ip {}\n", self.table));
    }
}

fn nft(script: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("cannot run nft")?;
    child
        .stdin
        .take()
        .context("nft's input")?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Hostnames manager `m` shows other than `ready`.
fn not_ready(c: &Cluster, m: usize) -> anyhow::Result<Vec<String>> {
    Ok(unready_in(&c.node_ls(m)?))
}

/// Hostnames of `node ls`'s `nodes` other than `ready`.
fn unready_in(nodes: &[Value]) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| n["status"] != "ready")
        .map(|n| n["hostname"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// min, median, max of `v` (in its unit), `null` when empty.
fn spread(v: &mut [f64]) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_by(f64::total_cmp);
    json!({"min": v[0], "median": v[v.len() / 2], "max": v[v.len() - 1]})
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

/// Runs the measurement; its report.
pub fn run(s: Scale) -> anyhow::Result<Value> {
    let mut c = Cluster::start(s.nodes)?;
    let managers: Vec<usize> = (0..s.managers).collect();
    let mut report = json!({
        "nodes": s.nodes,
        "managers": s.managers,
        "seconds": s.seconds,
    });
    let formed = form(&c, s, &managers)?;
    let term = |c: &Cluster| -> anyhow::Result<u64> {
        c.info(0)?["raft"]["term"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("no raft term in info"))
    };
    let term_formed = term(&c)?;
    for part in [
        formed,
        idle(&c, s, &managers)?,
        kill_a_worker(&mut c, s, &managers)?,
    ] {
        if let (Some(r), Value::Object(p)) = (report.as_object_mut(), part) {
            r.extend(p);
        }
    }
    // Every election after the swarm formed was needless: no manager
    // stopped (the node killed is a worker).
    report["elections_after_forming"] = json!(term(&c)?.saturating_sub(term_formed));
    Ok(report)
}

/// Joins, one after another as a user's script would, until every
/// manager shows every node ready (measured anyway after 120 s, saying
/// which are not).
fn form(c: &Cluster, s: Scale, managers: &[usize]) -> anyhow::Result<Value> {
    let started = Instant::now();
    c.init(0)?;
    let mt = c.token(0, "manager")?;
    let wt = c.token(0, "worker")?;
    let mut joins = Vec::new();
    for i in 1..s.nodes {
        let token = if i < s.managers { &mt } else { &wt };
        let t = Instant::now();
        c.join(i, token, 0)
            .with_context(|| format!("join {} of {}", i + 1, s.nodes))?;
        joins.push(t.elapsed().as_secs_f64());
    }
    let formed = started.elapsed();
    // What a manager still shows not ready, for the report.
    let mut last = String::new();
    let ready = c.wait_until(
        "every node ready on every manager",
        Duration::from_secs(120),
        |c| {
            for &m in managers {
                let nodes = c.node_ls(m)?;
                let (listed, not) = (nodes.len(), unready_in(&nodes));
                if listed != s.nodes || !not.is_empty() {
                    last = format!("{}: {listed} nodes, not ready: {not:?}", c.hosts[m].name);
                    return Ok(false);
                }
            }
            Ok(true)
        },
    );
    Ok(json!({
        "swarm_formed_s": secs(formed),
        "all_ready_s": ready.is_ok().then(|| secs(started.elapsed())),
        "not_ready_after_120_s": ready.is_err().then_some(last),
        "join_s": spread(&mut joins),
    }))
}

/// Settles, then measures CPU, memory and bytes over the window, watching
/// for live nodes shown down.
fn idle(c: &Cluster, s: Scale, managers: &[usize]) -> anyhow::Result<Value> {
    std::thread::sleep(Duration::from_secs(s.seconds));
    let pids: Vec<u32> = c.hosts.iter().filter_map(|h| h.pid()).collect();
    let counters = if is_root() {
        Some(Counters::start(c)?)
    } else {
        None
    };
    let cpu0: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p).unwrap_or(0)).collect();
    let bytes0 = counters.as_ref().map(Counters::read).transpose()?;
    let window = Instant::now();
    let mut false_downs: BTreeMap<String, usize> = BTreeMap::new();
    while window.elapsed() < Duration::from_secs(s.seconds) {
        for &m in managers {
            for name in not_ready(c, m)? {
                *false_downs.entry(name).or_default() += 1;
            }
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let elapsed = window.elapsed().as_secs_f64();
    let cpu1: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p).unwrap_or(0)).collect();
    let bytes1 = counters.as_ref().map(Counters::read).transpose()?;
    let hz = ticks_per_second();
    let mut cpu: Vec<f64> = cpu0
        .iter()
        .zip(&cpu1)
        .map(|(a, b)| 100.0 * (b.saturating_sub(*a)) as f64 / hz / elapsed)
        .collect();
    let total: f64 = cpu.iter().sum();
    let mean = total / cpu.len().max(1) as f64;
    let mut rss: Vec<f64> = pids
        .iter()
        .filter_map(|p| rss_kib(*p))
        .map(|k| k as f64 / 1024.0)
        .collect();
    let bytes = match (bytes0, bytes1) {
        (Some(a), Some(b)) => {
            let mut rates: Vec<f64> = b
                .iter()
                .map(|(ip, n)| n.saturating_sub(*a.get(ip).unwrap_or(&0)) as f64 / elapsed)
                .collect();
            spread(&mut rates)
        }
        _ => Value::Null,
    };
    Ok(json!({
        "idle_cpu_percent_of_a_core": {
            "mean": (mean * 100.0).round() / 100.0,
            "all_daemons": (total * 100.0).round() / 100.0,
            "per_daemon": spread(&mut cpu),
        },
        "rss_mib": spread(&mut rss),
        "bytes_sent_per_s": bytes,
        "false_downs": false_downs,
    }))
}

/// How long a service of 2·N replicas may take to run before the harness
/// reports how many did and goes on.
const SERVICE_LIMIT: Duration = Duration::from_secs(180);

/// A service of 2·N replicas (host programs: no data plane here), then the
/// last worker killed: until every manager shows it down, and until its
/// tasks run elsewhere.
fn kill_a_worker(c: &mut Cluster, s: Scale, managers: &[usize]) -> anyhow::Result<Value> {
    let replicas = (2 * s.nodes).to_string();
    let t = Instant::now();
    c.shoal_ok(
        0,
        &[
            "service",
            "create",
            "--name",
            "scale",
            "--replicas",
            &replicas,
            "--runtime",
            "process",
            "--detach",
            "--",
            "sleep",
            "3600",
        ],
    )?;
    let all = 2 * s.nodes;
    // Until all run, or a bound (then how many did).
    let mut running = 0;
    while t.elapsed() < SERVICE_LIMIT {
        running = c.running_tasks(0, "scale")?.len();
        if running == all {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let service_running = (running == all).then(|| t.elapsed());
    let victim = s.nodes - 1;
    let victim_name = c.hosts[victim].name.clone();
    let killed = Instant::now();
    c.kill(victim);
    let mut down_on = BTreeMap::new();
    let limit = Duration::from_secs(60);
    while down_on.len() < managers.len() && killed.elapsed() < limit {
        for &m in managers {
            if !down_on.contains_key(&m) && not_ready(c, m)?.contains(&victim_name) {
                down_on.insert(m, killed.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let down_everywhere = (down_on.len() == managers.len())
        .then(|| down_on.values().max().copied())
        .flatten();
    let rescheduled = c
        .wait_until_value(limit, || {
            let running = c
                .running_tasks(0, "scale")?
                .iter()
                .filter(|t| t["node"] != victim_name.as_str())
                .count();
            anyhow::ensure!(running == all, "{running} of {all} running");
            Ok(killed.elapsed())
        })
        .ok();
    Ok(json!({
        "service_of_2n_running_s": service_running.map(secs),
        "service_tasks_running_at_limit": (running < all).then_some(running),
        "killed_worker_down_on_every_manager_s": down_everywhere.map(secs),
        "killed_workers_tasks_rescheduled_s": rescheduled.map(secs),
    }))
}

/// The report as a table.
pub fn print(r: &Value) {
    let f = |v: &Value| match v.as_f64() {
        Some(x) => format!("{x:.2}"),
        None => "-".into(),
    };
    let s3 = |v: &Value| {
        if v.is_null() {
            "-".into()
        } else {
            format!("{} / {} / {}", f(&v["min"]), f(&v["median"]), f(&v["max"]))
        }
    };
    println!(
        "{} nodes ({} managers), idle window {} s",
        r["nodes"], r["managers"], r["seconds"]
    );
    println!(
        "  swarm formed (joins one by one):   {} s",
        f(&r["swarm_formed_s"])
    );
    println!(
        "  every node ready on every manager: {} s",
        f(&r["all_ready_s"])
    );
    if let Some(not) = r["not_ready_after_120_s"].as_str() {
        println!("    not ready after 120 s: {not}");
    }
    println!(
        "  one join, min / median / max:      {} s",
        s3(&r["join_s"])
    );
    let cpu = &r["idle_cpu_percent_of_a_core"];
    println!(
        "  idle CPU, % of a core:             {} per daemon on average, {} all daemons; min / median / max {}",
        f(&cpu["mean"]),
        f(&cpu["all_daemons"]),
        s3(&cpu["per_daemon"])
    );
    println!("  RSS, MiB, min / median / max:      {}", s3(&r["rss_mib"]));
    println!(
        "  bytes sent/s per daemon:           {}",
        if r["bytes_sent_per_s"].is_null() {
            "- (needs root: counted by nftables)".into()
        } else {
            s3(&r["bytes_sent_per_s"])
        }
    );
    println!(
        "  live nodes shown down (node, times seen): {}",
        r["false_downs"]
    );
    match r["service_tasks_running_at_limit"].as_u64() {
        Some(n) => println!(
            "  service of 2·N replicas running:   only {n} after {} s",
            SERVICE_LIMIT.as_secs()
        ),
        None => println!(
            "  service of 2·N replicas running:   {} s",
            f(&r["service_of_2n_running_s"])
        ),
    }
    println!(
        "  killed worker down on every manager: {} s; its tasks rescheduled: {} s",
        f(&r["killed_worker_down_on_every_manager_s"]),
        f(&r["killed_workers_tasks_rescheduled_s"])
    );
    println!(
        "  leader elections after forming:    {}",
        r["elections_after_forming"]
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_checked_and_stats_read() {
        assert!(Scale::new(1, 1, 10).is_err());
        assert!(Scale::new(251, 3, 10).is_err());
        assert!(Scale::new(10, 0, 10).is_err());
        assert!(Scale::new(2, 3, 10).is_err());
        assert!(Scale::new(10, 3, 4).is_err());
        assert!(Scale::new(60, 3, 300).is_ok());
        let me = std::process::id();
        assert!(cpu_ticks(me).is_some());
        assert!(rss_kib(me).is_some_and(|k| k > 0));
        assert_eq!(spread(&mut []), Value::Null);
        assert_eq!(spread(&mut [3.0, 1.0, 2.0])["median"], 2.0);
    }
}
