//! Throughput over the VXLAN overlay between two hosts against the underlay
//! between the same hosts (hosts are network namespaces joined by veths to
//! a bridge, so the "wire" is the kernel's; the ratio shows the cost of
//! the overlay: encapsulation, the bridge, the extra namespaces, the MTU).
//!
//! `cargo bench -p shoal-integration --bench dataplane [-- SECONDS [RUNS]]`
//! (root; default 3 s, 7 runs). Runs alternate underlay and overlay, so
//! that the machine's drift from minute to minute hits both alike; the
//! ratio reported is the median of the runs' ratios.

use std::time::Duration;

use serde_json::Value;
use shoal_integration::{Cluster, is_root, shoal_bin};

fn rate(out: &str) -> f64 {
    serde_json::from_str::<Value>(out)
        .ok()
        .and_then(|v| v["mbit_s"].as_f64())
        .unwrap_or(0.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    if !is_root() {
        println!("skipped: needs root (network namespaces, VXLAN)");
        return Ok(());
    }
    let numbers: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a.parse::<u64>().is_ok())
        .collect();
    let seconds = numbers.first().cloned().unwrap_or_else(|| "3".into());
    let runs: usize = numbers.get(1).and_then(|n| n.parse().ok()).unwrap_or(7);
    let bin = shoal_bin().to_string_lossy().into_owned();
    let c = Cluster::start_isolated(2)?;
    c.form(1)?;
    c.shoal_ok(0, &["network", "create", "appnet"])?;
    c.shoal_ok(
        0,
        &[
            "service",
            "create",
            "--name",
            "sink",
            "--mode",
            "global",
            "--network",
            "appnet",
            "--",
            &bin,
            "tool",
            "tcp-sink",
            "--port",
            "5001",
        ],
    )?;
    // The underlay's sink: a process in host 2's namespace.
    let ns = c.hosts[1].netns.clone().unwrap_or_default();
    let mut sink = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .args([&bin, "tool", "tcp-sink", "--port", "5002"])
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    let tasks = c
        .shoal_ok(0, &["service", "ps", "--format", "json", "sink"])?
        .json()?;
    let tasks = tasks.as_array().cloned().unwrap_or_default();
    let on = |host: &str| {
        tasks
            .iter()
            .find(|t| t["node"] == host && t["state"] == "running")
            .cloned()
    };
    let (Some(from), Some(to)) = (on("node1"), on("node2")) else {
        anyhow::bail!("the sink tasks did not start: {tasks:?}");
    };
    let to_ip = to["addresses"]["appnet"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let from_name = from["name"].as_str().unwrap_or_default().to_owned();
    let mut under = Vec::new();
    let mut over = Vec::new();
    let mut ratios = Vec::new();
    for run in 1..=runs {
        let target = format!("{}:5002", c.hosts[1].ip);
        let r = c.in_host(
            0,
            &bin,
            &["tool", "tcp-blast", "--seconds", &seconds, &target],
        );
        under.push(rate(&r.stdout));
        let target = format!("{to_ip}:5001");
        let r = c.shoal(
            0,
            &[
                "exec",
                &from_name,
                "--",
                &bin,
                "tool",
                "tcp-blast",
                "--seconds",
                &seconds,
                &target,
            ],
        );
        over.push(rate(&r.stdout));
        let (u, o) = (under[run - 1], over[run - 1]);
        println!("  run {run}: underlay {u:.0} Mbit/s, overlay {o:.0} Mbit/s");
        ratios.push(o / u);
    }
    let _ = sink.kill();
    let _ = sink.wait();
    let (u, o) = (median(under), median(over));
    let (lo, hi) = (
        ratios.iter().copied().fold(f64::INFINITY, f64::min),
        ratios.iter().copied().fold(0.0, f64::max),
    );
    println!("TCP, one stream, {seconds} s, median of {runs}:");
    println!("  underlay (host → host):            {u:.0} Mbit/s");
    println!("  overlay (task → task over VXLAN):  {o:.0} Mbit/s");
    println!(
        "  overlay / underlay, run by run:    median {:.0}% (min {:.0}%, max {:.0}%)",
        median(ratios) * 100.0,
        lo * 100.0,
        hi * 100.0
    );
    Ok(())
}
