//! `shoal-lab failover`: steady client traffic through a cluster of
//! namespace hosts while a fault happens, then a report of what clients
//! felt. Traffic goes by name through the embedded DNS and the VIP (from
//! inside a task on a host the fault spares) and through the routing mesh
//! (port 8080 of that host).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{Value, json};

use super::lab::LAB_IMAGE;
use super::{Cluster, registry_on, shoal_bin, web_service};

/// The scenarios.
pub const SCENARIOS: [&str; 5] = [
    "kill-leader",
    "kill-worker",
    "partition-minority",
    "restart-all",
    "rolling-restart",
];

/// One request's result: when (since the fault), whether it succeeded,
/// and which task answered.
#[derive(Clone, Debug)]
struct Sample {
    at: f64,
    ok: bool,
    task: String,
    /// The client's error, for a failed request.
    error: String,
}

fn client(
    argv: Vec<String>,
    stop: Arc<AtomicBool>,
    t0: Instant,
) -> std::thread::JoinHandle<Vec<Sample>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let r = std::process::Command::new(&argv[0])
                .args(&argv[1..])
                .output();
            let at = t0.elapsed().as_secs_f64();
            let (ok, task, error) = match r {
                Ok(o) if o.status.success() => {
                    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
                    // Which task answered, by its address (a replacement
                    // keeps the slot's name but not its address).
                    let all: Vec<&str> = v["addresses"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .collect();
                    (true, all.join(","), String::new())
                }
                Ok(o) => (
                    false,
                    String::new(),
                    String::from_utf8_lossy(&o.stderr).trim().to_owned(),
                ),
                Err(e) => (false, String::new(), e.to_string()),
            };
            out.push(Sample {
                at,
                ok,
                task,
                error,
            });
            std::thread::sleep(Duration::from_millis(50));
        }
        out
    })
}

/// What a client path saw, from `fault` (seconds since start) on.
fn summary(samples: &[Sample], fault: f64, recovered: Option<f64>) -> Value {
    let sent = samples.len();
    let failed = samples.iter().filter(|s| !s.ok).count();
    let mut gap: f64 = 0.0;
    let mut last_ok = samples.first().map_or(0.0, |s| s.at);
    for s in samples.iter().filter(|s| s.ok) {
        gap = gap.max(s.at - last_ok);
        last_ok = s.at;
    }
    let after = recovered.map(|r| samples.iter().filter(|s| s.at > fault + r && !s.ok).count());
    // The first failures, with when (seconds from the fault) and why.
    let failures: Vec<Value> = samples
        .iter()
        .filter(|s| !s.ok)
        .take(10)
        .map(|s| json!({"at_s": ((s.at - fault) * 100.0).round() / 100.0, "error": s.error}))
        .collect();
    json!({"sent": sent, "failed": failed, "longest_gap_s": (gap * 100.0).round() / 100.0,
           "failed_after_recovery": after, "failures": failures})
}

/// Runs `scenario` on a fresh 4-host cluster (3 managers, 1 worker) and
/// returns the report.
pub fn run(scenario: &str) -> anyhow::Result<Value> {
    if !SCENARIOS.contains(&scenario) {
        bail!(
            "unknown scenario `{scenario}`: use one of {}",
            SCENARIOS.join(", ")
        );
    }
    let mut c = Cluster::start_isolated(4)?.equip()?;
    c.form(3)?;
    c.shoal_ok(0, &["network", "create", "appnet"])?;
    let image = format!("{}/{}", registry_on(c.hosts[0].ip), LAB_IMAGE);
    let args = web_service("web", 4, &["--network", "appnet", "-p", "8080:80"], &image);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    c.shoal_ok(0, &args)?;
    let leader = c.leader(0)?.unwrap_or(0);
    let victim = match scenario {
        "kill-leader" => leader,
        "kill-worker" | "partition-minority" => 3,
        _ => (leader + 1) % 3,
    };
    // The observer: a manager the fault spares (for whole-cluster faults,
    // any host: its traffic is what it is).
    let observer = (0..3).find(|i| *i != victim && *i != leader).unwrap_or(0);
    let obs_name = c.hosts[observer].name.clone();
    // The observer's own view of the service: its store may trail the
    // leader's by a moment after `service create` returned.
    let (tasks, client_task) = c.wait_until_value(Duration::from_secs(30), || {
        let ps = c
            .shoal_ok(observer, &["service", "ps", "--format", "json", "web"])?
            .json()?;
        let tasks: Vec<Value> = ps.as_array().cloned().unwrap_or_default();
        let name = tasks
            .iter()
            .find(|t| t["node"] == obs_name.as_str() && t["state"] == "running")
            .and_then(|t| t["name"].as_str())
            .map(str::to_owned)
            .ok_or_else(|| {
                let seen: Vec<String> = tasks
                    .iter()
                    .map(|t| format!("{} on {} {}", t["name"], t["node"], t["state"]))
                    .collect();
                anyhow::anyhow!(
                    "no running task on the observer host {obs_name}: {}",
                    seen.join("; ")
                )
            })?;
        Ok((tasks, name))
    })?;
    let original: Vec<String> = tasks
        .iter()
        .filter_map(|t| t["addresses"]["appnet"].as_str().map(str::to_owned))
        .collect();
    let victim_tasks: Vec<String> = tasks
        .iter()
        .filter(|t| t["node"] == c.hosts[victim].name.as_str())
        .filter_map(|t| t["addresses"]["appnet"].as_str().map(str::to_owned))
        .collect();
    let bin = shoal_bin().to_string_lossy().into_owned();
    // The client (this machine's `shoal tool http-get`) runs in the task's
    // network namespace without going through its daemon (which some
    // scenarios restart), to the VIP's address.
    let client_id = tasks
        .iter()
        .find(|t| t["name"] == client_task.as_str() && t["node"] == obs_name.as_str())
        .and_then(|t| t["id"].as_str())
        .unwrap_or_default()
        .to_owned();
    let pid = c.task_pid(observer, &client_id)?;
    let svc = c
        .shoal_ok(observer, &["service", "inspect", "web"])?
        .json()?;
    let vip_addr = svc[0]["vips"]["appnet"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let vip = client(
        vec![
            "nsenter".into(),
            "--target".into(),
            pid,
            "--net".into(),
            "--".into(),
            bin.clone(),
            "tool".into(),
            "http-get".into(),
            "--timeout".into(),
            "2".into(),
            format!("http://{vip_addr}/"),
        ],
        stop.clone(),
        t0,
    );
    let mesh = client(
        vec![
            "nsenter".into(),
            format!(
                "--net=/run/netns/{}",
                c.hosts[observer].netns.clone().unwrap_or_default()
            ),
            bin.clone(),
            "tool".into(),
            "http-get".into(),
            "--timeout".into(),
            "2".into(),
            format!("http://{}:8080/", c.hosts[observer].ip),
        ],
        stop.clone(),
        t0,
    );
    std::thread::sleep(Duration::from_secs(3));
    let fault = t0.elapsed().as_secs_f64();
    let since = |t: Instant| (t.elapsed().as_secs_f64() * 100.0).round() / 100.0;
    let at_fault = Instant::now();
    let mut new_leader = None;
    let mut endpoints_gone = None;
    let mut converged = None;
    match scenario {
        "kill-leader" | "kill-worker" => c.kill_host(victim),
        "partition-minority" => {
            let ul = format!("{}ul", c.netns_prefix.clone().unwrap_or_default());
            super::ip(&[
                "-n",
                &ul,
                "link",
                "set",
                &format!("ul{}", victim + 1),
                "down",
            ])?;
        }
        "restart-all" => {
            for i in 0..4 {
                c.stop(i);
            }
            for i in 0..4 {
                c.start_daemon(i)?;
            }
        }
        _ => {
            for i in 0..4 {
                c.stop(i);
                c.start_daemon(i)?;
                std::thread::sleep(Duration::from_secs(2));
            }
        }
    }
    // Watch the cluster recover, for up to 30 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let leader_may_change =
            matches!(scenario, "kill-leader" | "restart-all" | "rolling-restart");
        if leader_may_change
            && new_leader.is_none()
            && let Ok(Some(l)) = c.leader(observer)
            && (scenario != "kill-leader" || l != victim)
        {
            new_leader = Some(since(at_fault));
        }
        if endpoints_gone.is_none()
            && !victim_tasks.is_empty()
            && scenario != "restart-all"
            && scenario != "rolling-restart"
        {
            // Out of every spared host's load balancers (VIPs, published
            // ports) and out of the DNS answer the client task gets. Its
            // tunnel (FDB, neighbour) entries stay until the store
            // reschedules the task: they carry no new connection.
            let mentions = |text: &str| {
                victim_tasks.iter().any(|ip| {
                    text.contains(&format!("\"{ip}\"")) || text.contains(&format!("\t{ip}\t"))
                })
            };
            let lbs_clean = (0..c.hosts.len()).filter(|i| *i != victim).all(|i| {
                let dp = c.shoal(i, &["debug", "dataplane", "--format", "json"]);
                let Ok(mut v) = serde_json::from_str::<Value>(&dp.stdout) else {
                    return false;
                };
                for n in v["networks"].as_array_mut().into_iter().flatten() {
                    if let Some(n) = n.as_object_mut() {
                        n.remove("fdb");
                        n.remove("neighbours");
                    }
                }
                dp.ok() && !mentions(&v.to_string())
            });
            let dns = c.shoal(observer, &["debug", "dns", &client_id, "tasks.web"]);
            let gone = lbs_clean && dns.ok() && !mentions(&dns.stdout);
            if gone {
                endpoints_gone = Some(since(at_fault));
            }
        }
        // After restarts: when every daemon says its data plane is
        // programmed again (a restarted daemon first waits for gossip).
        if converged.is_none() && matches!(scenario, "restart-all" | "rolling-restart") {
            let all = (0..c.hosts.len()).all(|i| {
                c.info(i)
                    .is_ok_and(|v| v["dataplane"] == "programmed" && v["leader"].is_string())
            });
            if all {
                converged = Some(since(at_fault));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let vip = vip.join().map_err(|_| anyhow::anyhow!("client thread"))?;
    let mesh = mesh.join().map_err(|_| anyhow::anyhow!("client thread"))?;
    let replaced = vip
        .iter()
        .find(|s| {
            s.ok && s.at > fault
                && !s.task.is_empty()
                && !s.task.split(',').any(|a| original.iter().any(|o| o == a))
        })
        .map(|s| ((s.at - fault) * 100.0).round() / 100.0);
    let recovered = [endpoints_gone, replaced]
        .into_iter()
        .flatten()
        .fold(None, |a: Option<f64>, b| Some(a.map_or(b, |a| a.max(b))));
    let recovered = recovered.or(converged).or(new_leader);
    let (vip, mesh) = (
        summary(&vip, fault, recovered),
        summary(&mesh, fault, recovered),
    );
    // A request that failed after recovery is what this is for: keep every
    // daemon's log of the run to find out why.
    let lost = |s: &Value| s["failed_after_recovery"].as_u64().unwrap_or(0) > 0;
    let logs = if lost(&vip) || lost(&mesh) {
        let dir = std::env::temp_dir().join(format!(
            "shoal-failover-{scenario}-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default()
        ));
        std::fs::create_dir_all(&dir)?;
        for (i, h) in c.hosts.iter().enumerate() {
            std::fs::write(dir.join(format!("{}.log", h.name)), c.log(i))?;
            if i != victim {
                std::fs::write(
                    dir.join(format!("{}.kernel.txt", h.name)),
                    c.kernel_snapshot(i),
                )?;
            }
        }
        Some(dir.display().to_string())
    } else {
        None
    };
    Ok(json!({
        "scenario": scenario,
        "victim": c.hosts[victim].name,
        "observer": obs_name,
        "new_leader_s": new_leader,
        "converged_s": converged,
        "endpoints_gone_s": endpoints_gone,
        "replacement_served_s": replaced,
        "vip": vip,
        "mesh": mesh,
        "logs": logs,
    }))
}

/// The numbers a report's reader compares across runs: `(name, JSON
/// pointer)`.
pub const METRICS: [(&str, &str); 9] = [
    ("new_leader_s", "/new_leader_s"),
    ("converged_s", "/converged_s"),
    ("endpoints_gone_s", "/endpoints_gone_s"),
    ("replacement_served_s", "/replacement_served_s"),
    ("vip_longest_gap_s", "/vip/longest_gap_s"),
    ("mesh_longest_gap_s", "/mesh/longest_gap_s"),
    ("vip_failed", "/vip/failed"),
    ("mesh_failed", "/mesh/failed"),
    ("failed_after_recovery", ""),
];

/// min, median and max of each metric over `reports` (runs of one
/// scenario); a metric no run measured is left out.
/// `failed_after_recovery` adds up both paths.
pub fn summarize(reports: &[Value]) -> Value {
    let mut out = serde_json::Map::new();
    for (name, pointer) in METRICS {
        let mut xs: Vec<f64> = reports
            .iter()
            .filter_map(|r| {
                if pointer.is_empty() {
                    let a = r["vip"]["failed_after_recovery"].as_f64()?;
                    let b = r["mesh"]["failed_after_recovery"].as_f64()?;
                    Some(a + b)
                } else {
                    r.pointer(pointer)?.as_f64()
                }
            })
            .collect();
        if xs.is_empty() {
            continue;
        }
        xs.sort_by(f64::total_cmp);
        let median = if xs.len() % 2 == 1 {
            xs[xs.len() / 2]
        } else {
            (xs[xs.len() / 2 - 1] + xs[xs.len() / 2]) / 2.0
        };
        let r2 = |x: f64| (x * 100.0).round() / 100.0;
        out.insert(
            name.to_owned(),
            json!({"min": r2(xs[0]), "median": r2(median), "max": r2(xs[xs.len() - 1]), "runs": xs.len()}),
        );
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn runs_are_summarized_per_metric() {
        let run = |leader: Option<f64>, gap: f64, after: u64| {
            json!({"new_leader_s": leader, "endpoints_gone_s": null,
                   "vip": {"longest_gap_s": gap, "failed": 1, "failed_after_recovery": after},
                   "mesh": {"longest_gap_s": 0.1, "failed": 0, "failed_after_recovery": 0}})
        };
        let s = summarize(&[
            run(Some(0.3), 2.0, 0),
            run(Some(0.5), 1.0, 2),
            run(None, 4.0, 0),
            run(Some(0.2), 3.0, 0),
        ]);
        assert_eq!(
            s["new_leader_s"],
            json!({"min": 0.2, "median": 0.3, "max": 0.5, "runs": 3})
        );
        assert_eq!(s["vip_longest_gap_s"]["median"], 2.5);
        assert_eq!(s["failed_after_recovery"]["max"], 2.0);
        assert!(s.get("endpoints_gone_s").is_none());
    }
}
