//! `shoal-lab` on real namespaces (issue 6): up, ls, exec, kill, start,
//! partition, heal, down — and nothing left behind.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use shoal_integration::{is_root, root_or_skip};

fn lab_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_shoal-lab"))
}

fn lab(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(lab_bin()).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The lab tests run one at a time: each brings up 3–5 hosts, and on 2
/// vCPUs several clusters at once starve Raft's 100–150 ms elections.
static ONE_LAB: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_lab() -> std::sync::MutexGuard<'static, ()> {
    ONE_LAB.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `down` for the lab when dropped (also when a test fails).
struct Down(String);

impl Drop for Down {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The daemons' logs, before `down` removes them.
            let dir = std::path::Path::new("/run/shoal-lab").join(&self.0);
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let log = e.path().join("daemon.log");
                if let Ok(text) = std::fs::read_to_string(&log) {
                    let tail: Vec<&str> = text.lines().rev().take(60).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    eprintln!("----- {} -----\n{}", log.display(), tail.join("\n"));
                }
            }
        }
        let _ = lab(&["down", "--name", &self.0]);
    }
}

fn statuses(name: &str, host: &str) -> String {
    lab(&["exec", "--name", name, host, "--", "shoal", "node", "ls"]).1
}

/// No namespace, process or state dir of lab `name` remains.
fn assert_nothing_left(name: &str) {
    let prefix = format!("shoal-lab-{name}-");
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    assert!(!std::path::Path::new("/run/shoal-lab").join(name).exists());
    let procs = Command::new("pgrep")
        .args(["-f", &format!("/run/shoal-lab/{name}/")])
        .output()
        .unwrap();
    assert!(
        procs.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&procs.stdout)
    );
    // The containers' root filesystems are unmounted (their processes gone).
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let dir = format!("/run/shoal-lab/{name}/");
    assert!(!mounts.contains(&dir), "{mounts}");
}

#[test]
fn a_lab_comes_up_breaks_heals_and_leaves_nothing_behind() {
    let _one = one_lab();
    if !is_root() {
        let (ok, _, err) = lab(&["ls"]);
        assert!(!ok && err.contains("needs root"), "{err}");
        root_or_skip("run the lab");
        return;
    }
    let name = format!("t{}", std::process::id() % 100_000);
    let _down = Down(name.clone());
    let (ok, out, err) = lab(&["up", "--nodes", "3", "--name", &name]);
    assert!(ok, "{out}{err}");
    let (ok, _, err) = lab(&["up", "--name", &name]);
    assert!(!ok && err.contains("exists"), "{err}");
    let (_, ls, _) = lab(&["ls", "--name", &name]);
    assert_eq!(ls.matches("running").count(), 3, "{ls}");
    let nodes = statuses(&name, "node2");
    assert_eq!(nodes.matches("ready").count(), 3, "{nodes}");
    let (ok, _, err) = lab(&["exec", "--name", &name, "node9", "--", "true"]);
    assert!(!ok && err.contains("no host `node9`"), "{err}");

    // kill and start a host's daemon.
    assert!(lab(&["kill", "--name", &name, "node3"]).0);
    let (_, ls, _) = lab(&["ls", "--name", &name]);
    assert_eq!(ls.matches("stopped").count(), 1, "{ls}");
    assert!(lab(&["start", "--name", &name, "node3"]).0);

    // A partition cuts node1 off: the others see it down; heal brings it back.
    let (ok, _, err) = lab(&["partition", "--name", &name, "node1", "node2,nodeX"]);
    assert!(!ok && err.contains("no host `nodeX`"), "{err}");
    assert!(lab(&["partition", "--name", &name, "node1", "node2,node3"]).0);
    let started = Instant::now();
    while !statuses(&name, "node2").contains("down") {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "node1 never seen down"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(lab(&["heal", "--name", &name]).0);
    let started = Instant::now();
    while statuses(&name, "node2").matches("ready").count() != 3 {
        assert!(started.elapsed() < Duration::from_secs(30), "never healed");
        std::thread::sleep(Duration::from_millis(300));
    }

    // down: no namespace, process or state dir of the lab remains.
    assert!(lab(&["down", "--name", &name]).0);
    assert_nothing_left(&name);
}

#[test]
fn a_failover_scenario_reports_what_clients_felt() {
    let _one = one_lab();
    if !root_or_skip("run the lab") {
        return;
    }
    let (ok, out, err) = lab(&["failover", "--scenario", "kill-worker", "--format", "json"]);
    assert!(ok, "{out}{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    for path in ["vip", "mesh"] {
        assert!(r[path]["sent"].as_u64().unwrap() > 20, "{r}");
        assert_eq!(r[path]["failed_after_recovery"], 0, "{r}");
    }
    assert!(r["endpoints_gone_s"].as_f64().unwrap() < 10.0, "{r}");
    assert!(r["replacement_served_s"].as_f64().unwrap() < 30.0, "{r}");
    let (ok, _, err) = lab(&["failover", "--scenario", "meteor"]);
    assert!(!ok && err.contains("unknown scenario"), "{err}");
}

#[test]
fn a_lab_from_a_definition_has_its_hosts_roles_and_timing() {
    let _one = one_lab();
    if !root_or_skip("run the lab") {
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let five = root.join("cluster-configs/five-node.toml");
    let five = five.to_str().unwrap();
    let name = format!("f{}", std::process::id() % 100_000);
    let _down = Down(name.clone());
    let (ok, out, err) = lab(&["up", "--config", five, "--name", &name]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("worker2: 10.211.0.22"), "{out}");
    let (ok, _, err) = lab(&["up", "--config", five, "--nodes", "2"]);
    assert!(!ok && err.contains("leave out --nodes"), "{err}");

    // Three managers and two workers, as the file says.
    let (_, nodes, _) = lab(&[
        "exec", "--name", &name, "worker2", "--", "shoal", "node", "ls", "--format", "json",
    ]);
    let nodes: serde_json::Value = serde_json::from_str(&nodes).unwrap();
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 5);
    let managers: Vec<&str> = nodes
        .iter()
        .filter(|n| n["role"] == "manager")
        .map(|n| n["hostname"].as_str().unwrap())
        .collect();
    assert_eq!(managers.len(), 3, "{nodes:?}");
    assert!(
        managers.iter().all(|m| m.starts_with("node")),
        "{managers:?}"
    );

    // A service over all five hosts, reached on every host's published port.
    let shoal = |host: &str, args: &[&str]| {
        let mut a = vec!["exec", "--name", &name, host, "--", "shoal"];
        a.extend_from_slice(args);
        lab(&a)
    };
    let bin = shoal_integration::shoal_bin().to_str().unwrap().to_owned();
    assert!(shoal("node1", &["network", "create", "appnet"]).0);
    let (ok, out, err) = shoal(
        "node2",
        &[
            "service",
            "create",
            "--name",
            "web",
            "--replicas",
            "5",
            "--network",
            "appnet",
            "-p",
            "8080:80",
            "--",
            &bin,
            "tool",
            "http-echo",
            "--port",
            "80",
        ],
    );
    assert!(ok, "{out}{err}");
    let addrs = [
        "10.211.0.11",
        "10.211.0.12",
        "10.211.0.13",
        "10.211.0.21",
        "10.211.0.22",
    ];
    let get = |from: &str, addr: &str| {
        let url = format!("http://{addr}:8080/");
        let started = Instant::now();
        loop {
            let (ok, out, err) = shoal(from, &["tool", "http-get", "--timeout", "2", &url]);
            if ok {
                return out;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{url} from {from}: {err}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    for a in addrs {
        assert!(get("worker1", a).contains("\"task\""));
    }

    // worker1 dies: with this file's timing its node is marked down no
    // sooner than 1.5 s after (the defaults take ~1 s); its task moves and
    // every live host still answers on 8080.
    let killed = Instant::now();
    assert!(lab(&["kill", "--name", &name, "worker1"]).0);
    while !statuses(&name, "node1")
        .lines()
        .any(|l| l.contains("worker1") && l.contains("down"))
    {
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "worker1 never seen down"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let down_after = killed.elapsed();
    assert!(down_after >= Duration::from_millis(1500), "{down_after:?}");
    let started = Instant::now();
    loop {
        let (_, ps, _) = shoal("node1", &["service", "ps", "--format", "json", "web"]);
        let ps: serde_json::Value = serde_json::from_str(&ps).unwrap_or_default();
        let running: Vec<&serde_json::Value> = ps
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["state"] == "running" && t["desired_state"] == "running")
            .collect();
        if running.len() == 5 && running.iter().all(|t| t["node"] != "worker1") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "task never moved: {ps}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    for a in addrs.iter().filter(|a| **a != "10.211.0.21") {
        assert!(get("worker2", a).contains("\"task\""));
    }
    assert!(lab(&["down", "--name", &name]).0);
    assert_nothing_left(&name);
}

#[test]
fn a_bad_definition_or_a_killed_lab_process_leaves_nothing_behind() {
    let _one = one_lab();
    if !root_or_skip("run the lab") {
        return;
    }
    // A [daemon] key the daemon does not know: `up` fails with the
    // daemon's own message and removes what it made.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[hosts]]\nname = \"a\"\nrole = \"manager\"\n[daemon.gossip]\nprobe_speed = 3\n",
    )
    .unwrap();
    let name = format!("b{}", std::process::id() % 100_000);
    let _down = Down(name.clone());
    let (ok, _, err) = lab(&["up", "--config", bad.to_str().unwrap(), "--name", &name]);
    assert!(!ok && err.contains("probe_speed"), "{err}");
    assert_nothing_left(&name);
    let (ok, _, err) = lab(&["up", "--config", "/nonexistent.toml"]);
    assert!(!ok && err.contains("cannot read lab definition"), "{err}");
    // A mistyped flag or a flag without its value is named, and nothing
    // is brought up with defaults in its place.
    let (ok, _, err) = lab(&["up", "--node", "2", "--name", &name]);
    assert!(!ok && err.contains("unexpected argument `--node`"), "{err}");
    let (ok, _, err) = lab(&["up", "--name", &name, "--nodes"]);
    assert!(!ok && err.contains("--nodes needs a value"), "{err}");
    let (ok, out, _) = lab(&["up", "--help", "--name", &name]);
    assert!(ok && out.contains("usage: shoal-lab"), "{out}");
    assert_nothing_left(&name);

    // The lab process killed in the middle of `up`: `down` still finds
    // and removes everything.
    let mut up = Command::new(lab_bin())
        .args(["up", "--nodes", "3", "--name", &name])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !std::path::Path::new("/run/shoal-lab")
        .join(&name)
        .join("node2/daemon.pid")
        .exists()
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "up never got far"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    up.kill().unwrap();
    up.wait().unwrap();
    assert!(lab(&["down", "--name", &name]).0);
    assert_nothing_left(&name);
}

#[test]
fn the_demo_runs_to_completion_and_keep_leaves_its_lab_up() {
    let _one = one_lab();
    if !is_root() {
        let (ok, _, err) = lab(&["demo", "--keep"]);
        assert!(!ok && err.contains("--keep needs root"), "{err}");
        root_or_skip("run the demo's data plane");
        return;
    }
    let name = format!("d{}", std::process::id() % 100_000);
    let _down = Down(name.clone());
    let (ok, out, err) = lab(&["demo", "--keep", "--name", &name]);
    assert!(ok, "{out}{err}");
    // What the demo says it showed.
    for shown in [
        "Demo complete",
        "a new leader committed the write",
        "all 3 tasks running on live nodes",
        "shoal tool http-get http://10.210.0.3:8080/",
    ] {
        assert!(out.contains(shown), "{shown}: {out}");
    }
    // New connections spread over the replicas from the first one: the
    // demo's two rounds of requests (before and after the failover, four to
    // six each, three replicas) are not all answered by one replica (with a
    // random pick, both rounds all by one has odds below 1 in 700; with the
    // old round robin from slot 0 it was what every fresh demo showed).
    let rounds: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("answered by "))
        .collect();
    assert_eq!(rounds.len(), 2, "{out}");
    assert!(
        rounds.iter().any(|l| !l.starts_with("answered by 1 ")),
        "every request of the demo went to one replica: {rounds:?}"
    );
    // The service's tasks are containers of the image in the lab's registry.
    assert!(
        out.contains("10.210.0.254:5000/lab/busybox:1")
            && out.contains("busybox wget -qO- http://web/"),
        "{out}"
    );
    let (_, ls, _) = lab(&["ls", "--name", &name]);
    assert_eq!(ls.matches("running").count(), 3, "{ls}");
    // `push` puts an archive (here a docker-archive) into the lab's
    // registry, where the nodes pull it; what is not an archive is refused.
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("tools.tar");
    std::fs::write(
        &archive,
        shoal_integration::images::busybox_docker(&["tools:2"]).unwrap(),
    )
    .unwrap();
    let archive = archive.to_str().unwrap();
    let (ok, out, err) = lab(&["push", "--name", &name, archive, "lab/tools:2"]);
    assert!(
        ok && out.contains("10.210.0.254:5000/lab/tools:2"),
        "{out}{err}"
    );
    let (ok, out, err) = lab(&[
        "exec",
        "--name",
        &name,
        "node3",
        "--",
        "shoal",
        "image",
        "pull",
        "10.210.0.254:5000/lab/tools:2",
    ]);
    assert!(ok, "{out}{err}");
    std::fs::write(dir.path().join("bad.tar"), b"not a tar").unwrap();
    let bad = dir.path().join("bad.tar");
    let (ok, _, err) = lab(&["push", "--name", &name, bad.to_str().unwrap(), "lab/x:1"]);
    assert!(!ok && err.contains("not a"), "{err}");
    let (ok, _, err) = lab(&["push", "--name", &name, archive, "lab/notag"]);
    assert!(!ok && err.contains("NAME:TAG"), "{err}");
    let (ok, ps, _) = lab(&[
        "exec", "--name", &name, "node2", "--", "shoal", "service", "ps", "web",
    ]);
    assert!(ok && ps.matches(" running ").count() >= 3, "{ps}");
    let (ok, _, err) = lab(&["demo", "--keep", "--name", &name]);
    assert!(!ok && err.contains("exists"), "{err}");
    assert!(lab(&["down", "--name", &name]).0);
    assert_nothing_left(&name);
}

/// `shoal-lab scale` (issue 16's harness) on a few nodes: every figure is
/// there, no live node was shown down, and the killed worker was seen
/// down and its tasks run elsewhere. Bad arguments are named.
#[test]
fn the_scale_harness_measures_a_small_swarm() {
    let _one = one_lab();
    let (ok, out, err) = lab(&[
        "scale",
        "--nodes",
        "4",
        "--managers",
        "1",
        "--seconds",
        "5",
        "--format",
        "json",
    ]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["nodes"], 4);
    assert!(r["all_ready_s"].as_f64().is_some(), "{r}");
    let cpu = &r["idle_cpu_percent_of_a_core"];
    assert!(cpu["mean"].as_f64().is_some_and(|c| c > 0.0), "{r}");
    assert!(
        r["rss_mib"]["median"].as_f64().is_some_and(|m| m > 1.0),
        "{r}"
    );
    assert_eq!(r["bytes_sent_per_s"].is_null(), !is_root(), "{r}");
    assert_eq!(r["false_downs"], serde_json::json!({}), "{r}");
    assert!(r["service_of_2n_running_s"].as_f64().is_some(), "{r}");
    assert!(
        r["killed_worker_down_on_every_manager_s"]
            .as_f64()
            .is_some(),
        "{r}"
    );
    assert!(
        r["killed_workers_tasks_rescheduled_s"].as_f64().is_some(),
        "{r}"
    );
    for (args, says) in [
        (&["scale", "--nodes", "1"][..], "--nodes must be 2 to 250"),
        (
            &["scale", "--nodes", "3", "--managers", "4"][..],
            "--managers must be 1 to 7",
        ),
        (&["scale", "--seconds", "x"][..], "invalid --seconds `x`"),
        (&["scale", "--nodes"][..], "--nodes needs a value"),
        (
            &["scale", "--frobnicate"][..],
            "unexpected argument `--frobnicate`",
        ),
    ] {
        let (ok, _, err) = lab(args);
        assert!(!ok && err.contains(says), "{args:?}: {err}");
    }
}
