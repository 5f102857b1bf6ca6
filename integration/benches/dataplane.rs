//! Throughput over the VXLAN overlay between two hosts against the underlay
//! between the same hosts (hosts are network namespaces joined by veths to
//! a bridge, so the "wire" is the kernel's; the ratio shows the cost of
//! the overlay: encapsulation, the extra namespaces, the MTU).
//!
//! Beside them, a reference Shoal plays no part in: the same kind of
//! two-host underlay and a bare VXLAN device per host carrying the
//! endpoint's address itself, built by hand with `ip` in namespaces of the
//! bench's own (`shoalbench-PID-*`, removed at the end), with no netfilter
//! anywhere. Its ratio is taken against its own underlay (which, unlike
//! Shoal's hosts, has no conntrack): the kernel's own ceiling for VXLAN on
//! this machine, what Shoal's overlay could reach at best.
//!
//! `cargo bench -p shoal-integration --bench dataplane [-- SECONDS [RUNS]] [--wire RATE]`
//! (root; default 3 s, 7 runs). Runs alternate underlay and overlay, so
//! that the machine's drift from minute to minute hits both alike; the
//! ratio reported is the median of the runs' ratios.
//!
//! Without `--wire` the underlay is as fast as the CPU can copy (both
//! hosts share this machine's cores, so the overlay's extra work on either
//! host slows both). `--wire 5gbit` shapes every switch port of both
//! underlays to that rate, as a NIC would: then the wire is the limit, as
//! between real hosts, and the ratio shows what the overlay's headers cost.

use std::time::Duration;

use serde_json::Value;
use shoal_integration::{Cluster, is_root, shape, shoal_bin};

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

/// `ip ARGS`, failing with its message.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Two hosts `h1`, `h2` (10.252.0.1/2 on a bridged veth underlay, MTU
/// 1500) with a bare VXLAN device each (MTU 1450, learning off, static FDB
/// and neighbour entries, as Shoal programs them) carrying 10.253.0.1/2.
/// Its namespaces go when it is dropped.
struct BareVxlan(String);

impl BareVxlan {
    fn ns(&self, n: &str) -> String {
        format!("{}-{n}", self.0)
    }

    fn build() -> anyhow::Result<Self> {
        let b = BareVxlan(format!("shoalbench-{}", std::process::id()));
        for n in ["ul", "h1", "h2"] {
            ip(&["netns", "add", &b.ns(n)])?;
            ip(&["-n", &b.ns(n), "link", "set", "lo", "up"])?;
        }
        let ul = b.ns("ul");
        ip(&["-n", &ul, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &ul, "link", "set", "br0", "up"])?;
        let mac = |i: u8| format!("02:42:0a:fd:00:0{i}");
        for i in [1u8, 2] {
            let h = b.ns(&format!("h{i}"));
            let port = format!("p{i}");
            ip(&[
                "-n", &ul, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &h,
            ])?;
            ip(&["-n", &ul, "link", "set", &port, "master", "br0", "up"])?;
            ip(&[
                "-n",
                &h,
                "addr",
                "add",
                &format!("10.252.0.{i}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &h, "link", "set", "eth0", "up"])?;
            ip(&[
                "-n",
                &h,
                "link",
                "add",
                "vxlan0",
                "address",
                &mac(i),
                "mtu",
                "1450",
                "type",
                "vxlan",
                "id",
                "42",
                "local",
                &format!("10.252.0.{i}"),
                "dstport",
                "4789",
                "nolearning",
                "proxy",
            ])?;
            ip(&[
                "-n",
                &h,
                "addr",
                "add",
                &format!("10.253.0.{i}/24"),
                "dev",
                "vxlan0",
            ])?;
            ip(&["-n", &h, "link", "set", "vxlan0", "up"])?;
        }
        for (i, peer) in [(1u8, 2u8), (2, 1)] {
            let h = b.ns(&format!("h{i}"));
            let out = std::process::Command::new("bridge")
                .args(["-n", &h, "fdb", "add", &mac(peer), "dev", "vxlan0"])
                .args(["dst", &format!("10.252.0.{peer}"), "self", "permanent"])
                .status()?;
            anyhow::ensure!(out.success(), "bridge fdb add failed in {h}");
            ip(&[
                "-n",
                &h,
                "neigh",
                "add",
                &format!("10.253.0.{peer}"),
                "lladdr",
                &mac(peer),
                "dev",
                "vxlan0",
                "nud",
                "permanent",
            ])?;
        }
        Ok(b)
    }

    /// `program ARGS` in host `h`'s namespace.
    fn run(&self, h: &str, program: &str, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", &self.ns(h), program]).args(args);
        c
    }
}

impl Drop for BareVxlan {
    fn drop(&mut self) {
        for n in ["h1", "h2", "ul"] {
            let _ = ip(&["netns", "del", &self.ns(n)]);
        }
    }
}

/// The sink processes, killed when dropped (also when the bench fails
/// half-way: they would otherwise hold its output open).
struct Sinks(Vec<std::process::Child>);

impl Drop for Sinks {
    fn drop(&mut self) {
        for s in &mut self.0 {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

fn main() -> anyhow::Result<()> {
    if !is_root() {
        println!("skipped: needs root (network namespaces, VXLAN)");
        return Ok(());
    }
    let mut args = std::env::args().skip(1);
    let (mut wire, mut numbers) = (None, Vec::new());
    while let Some(a) = args.next() {
        if a == "--wire" {
            wire = args.next();
        } else if a.parse::<u64>().is_ok() {
            numbers.push(a);
        }
    }
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
    let mut sinks = Sinks(Vec::new());
    sinks.0.push(
        std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .args([&bin, "tool", "tcp-sink", "--port", "5002"])
            .spawn()?,
    );
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
    // The sending task's process.
    let from_pid = c.task_pid(0, from["id"].as_str().unwrap_or_default())?;
    let bare = BareVxlan::build()?;
    if let Some(rate) = &wire {
        c.shape_underlay(rate)?;
        for port in ["p1", "p2"] {
            shape(&bare.ns("ul"), port, rate)?;
        }
    }
    for port in ["5003", "5004"] {
        let args = ["tool", "tcp-sink", "--port", port];
        sinks.0.push(bare.run("h2", &bin, &args).spawn()?);
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut under = Vec::new();
    let mut over = Vec::new();
    let mut refs = Vec::new();
    let mut bare_under = Vec::new();
    let mut ratios = Vec::new();
    let mut ref_ratios = Vec::new();
    let mut over_bare = Vec::new();
    for run in 1..=runs {
        let target = format!("{}:5002", c.hosts[1].ip);
        let r = c.in_host(
            0,
            &bin,
            &["tool", "tcp-blast", "--seconds", &seconds, &target],
        );
        under.push(rate(&r.stdout));
        // Into the task's namespace directly (as the others), not through
        // `shoal exec`: what is measured is the kernel path Shoal programmed.
        let target = format!("{to_ip}:5001");
        let r = std::process::Command::new("nsenter")
            .args(["--target", &from_pid, "--net", "--"])
            .args([&bin, "tool", "tcp-blast", "--seconds", &seconds, &target])
            .output()?;
        over.push(rate(&String::from_utf8_lossy(&r.stdout)));
        // From the bare pair's host 1: over its VXLAN, then its underlay.
        let bare_blast = |target: &str| -> anyhow::Result<f64> {
            let args = ["tool", "tcp-blast", "--seconds", &seconds, target];
            let r = bare.run("h1", &bin, &args).output()?;
            Ok(rate(&String::from_utf8_lossy(&r.stdout)))
        };
        refs.push(bare_blast("10.253.0.2:5003")?);
        bare_under.push(bare_blast("10.252.0.2:5004")?);
        let (u, o) = (under[run - 1], over[run - 1]);
        let (bu, b) = (bare_under[run - 1], refs[run - 1]);
        println!(
            "  run {run}: underlay {u:.0} Mbit/s, Shoal overlay {o:.0} Mbit/s; bare underlay {bu:.0} Mbit/s, bare VXLAN {b:.0} Mbit/s"
        );
        ratios.push(o / u);
        ref_ratios.push(b / bu);
        over_bare.push(o / b);
    }
    drop(sinks);
    drop(bare);
    let (u, o) = (median(under), median(over));
    let (bu, b) = (median(bare_under), median(refs));
    let (lo, hi) = (
        ratios.iter().copied().fold(f64::INFINITY, f64::min),
        ratios.iter().copied().fold(0.0, f64::max),
    );
    let wire = match &wire {
        Some(rate) => format!("a wire of {rate}"),
        None => "an unshaped veth underlay".into(),
    };
    println!("TCP, one stream, {seconds} s, median of {runs}, on {wire}:");
    println!("  underlay (host → host):            {u:.0} Mbit/s");
    println!("  overlay (task → task over VXLAN):  {o:.0} Mbit/s");
    println!("  bare underlay (no netfilter):      {bu:.0} Mbit/s");
    println!("  bare VXLAN (no Shoal, reference):  {b:.0} Mbit/s");
    println!(
        "  overlay / underlay, run by run:    median {:.0}% (min {:.0}%, max {:.0}%)",
        median(ratios) * 100.0,
        lo * 100.0,
        hi * 100.0
    );
    println!(
        "  bare VXLAN / bare underlay:        median {:.0}%",
        median(ref_ratios) * 100.0
    );
    println!(
        "  overlay / bare VXLAN, run by run:  median {:.0}%",
        median(over_bare) * 100.0
    );
    Ok(())
}
