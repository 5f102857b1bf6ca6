//! `shoal-lab` on real namespaces (issue 6): up, ls, exec, kill, start,
//! partition, heal, down — and nothing left behind.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use shoal_integration::is_root;

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

fn statuses(name: &str, host: &str) -> String {
    lab(&["exec", "--name", name, host, "--", "shoal", "node", "ls"]).1
}

#[test]
fn a_lab_comes_up_breaks_heals_and_leaves_nothing_behind() {
    if !is_root() {
        let (ok, _, err) = lab(&["ls"]);
        assert!(!ok && err.contains("needs root"), "{err}");
        eprintln!("skipped: the lab needs root");
        return;
    }
    let name = format!("t{}", std::process::id() % 100_000);
    struct Down(String);
    impl Drop for Down {
        fn drop(&mut self) {
            let _ = lab(&["down", "--name", &self.0]);
        }
    }
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
    assert!(!std::path::Path::new("/run/shoal-lab").join(&name).exists());
    let procs = Command::new("pgrep")
        .args(["-f", &format!("/run/shoal-lab/{name}/")])
        .output()
        .unwrap();
    assert!(
        procs.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&procs.stdout)
    );
}

#[test]
fn a_failover_scenario_reports_what_clients_felt() {
    if !is_root() {
        eprintln!("skipped: the lab needs root");
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
