//! Container benchmarks on real daemons (release build), as root: 3
//! managers on namespace hosts, each with a containerd of its own, and the
//! lab's registry on the underlay holding a busybox image built from
//! Debian's `busybox-static`.
//!
//! - `service create` to all tasks running, image already on the nodes, for
//!   1, 10 and 100 replicas, containers beside `--runtime process` (host
//!   programs in namespaces: Shoal's own shim);
//! - the first pull of an image from the lab registry on 3 nodes at once;
//! - the memory each running task costs (shim included).
//!
//! `cargo bench -p shoal-integration --bench containers [-- TRIALS [running|pull|memory]]`

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use shoal_integration::bench::{call, proc_kib, summary};
use shoal_integration::{Cluster, images, lab::LAB_IMAGE, registry_on};

/// Waits until service `name` runs `replicas` tasks (by the leader's
/// `service inspect`, every 10 ms); the time since `started`.
fn until_running(
    socket: &Path,
    name: &str,
    replicas: usize,
    started: Instant,
) -> anyhow::Result<Duration> {
    let inspect = json!({"op": "service_inspect", "service": name});
    loop {
        let v = call(socket, &inspect)?;
        if v["running"] == replicas {
            return Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(180) {
            anyhow::bail!("{name} did not converge: {v}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Removes service `name` and waits until no task of it runs anywhere.
fn remove(c: &Cluster, name: &str) -> anyhow::Result<()> {
    c.shoal_ok(0, &["service", "rm", name])?;
    c.wait_until("the tasks to stop", Duration::from_secs(120), |c| {
        Ok((0..3).all(|i| {
            c.in_host(
                i,
                "ctr",
                &["--address", &sock(c, i), "-n", "shoal", "tasks", "ls", "-q"],
            )
            .stdout
            .trim()
            .is_empty()
        }) && process_tasks() == 0)
    })
}

fn sock(c: &Cluster, i: usize) -> String {
    c.containerd_socket(i).to_string_lossy().into_owned()
}

/// Host-program tasks running (their `sleep 600`).
fn process_tasks() -> usize {
    pids_of(|cmd| cmd == "sleep\u{0}600\u{0}").len()
}

fn pids_of(matches: impl Fn(&str) -> bool) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            matches(&String::from_utf8_lossy(&cmd)).then_some(pid)
        })
        .collect()
}

/// Memory charged to the `shoal` cgroups of container tasks (their
/// processes, page cache and kernel memory), in KiB.
fn container_cgroups_kib() -> u64 {
    std::fs::read_dir("/sys/fs/cgroup/memory/shoal")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|d| std::fs::read_to_string(d.path().join("memory.usage_in_bytes")).ok())
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .sum::<u64>()
        / 1024
}

fn lab() -> anyhow::Result<(Cluster, String)> {
    let c = Cluster::start_isolated(3)?.equip()?;
    c.form(3)?;
    c.wait_until("3 managers", Duration::from_secs(30), |c| {
        Ok(c.node_ls(0)?.iter().all(|n| n["status"] == "ready"))
    })?;
    let image = format!("{}/{LAB_IMAGE}", registry_on(c.hosts[0].ip));
    for i in 0..3 {
        c.shoal_ok(i, &["image", "pull", &image])?;
    }
    Ok((c, image))
}

/// The arguments of `service create` for `replicas` tasks of `sleep 600`.
fn create_args(name: &str, replicas: usize, image: Option<&str>) -> Vec<String> {
    let mut a: Vec<String> = [
        "service",
        "create",
        "--detach",
        "--name",
        name,
        "--replicas",
    ]
    .map(str::to_owned)
    .to_vec();
    a.push(replicas.to_string());
    match image {
        Some(image) => a.extend([image, "busybox", "sleep", "600"].map(str::to_owned)),
        None => a.extend(["--", "sleep", "600"].map(str::to_owned)),
    }
    a
}

fn create_to_running(c: &Cluster, image: &str, trials: usize) -> anyhow::Result<()> {
    let leader = c.leader(0)?.unwrap_or(0);
    let socket = c.hosts[leader].socket.clone();
    for replicas in [1usize, 10, 100] {
        for (runtime, img) in [("container", Some(image)), ("process", None)] {
            let mut times = Vec::new();
            for t in 0..trials {
                let name = format!("{runtime}{replicas}x{t}");
                let args = create_args(&name, replicas, img);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let started = Instant::now();
                c.shoal_ok(leader, &args)?;
                times.push(until_running(&socket, &name, replicas, started)?);
                remove(c, &name)?;
            }
            summary(
                &format!("service create → {replicas} {runtime} task(s) running on 3 nodes"),
                times,
            );
        }
    }
    Ok(())
}

/// A fresh image (busybox and `mib` MiB of random bytes) pushed to the
/// lab registry as `lab/fresh:TAG`, pulled by the 3 nodes at once.
fn first_pull(c: &Cluster, trials: usize, mib: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let archive = dir.path().join("fresh.tar");
    let mut times = Vec::new();
    let mut bytes = 0;
    for t in 0..trials {
        let mut layer = images::busybox_layer()?;
        let noise: Vec<u8> = (0..mib << 20).map(|_| rand_byte()).collect();
        layer.push(("data", images::Entry::File(noise, 0o644)));
        let tag = format!("lab/fresh:{mib}m{t}");
        std::fs::write(&archive, images::oci_archive(&tag, &layer, &["/bin/sh"])?)?;
        bytes = std::fs::metadata(&archive)?.len();
        c.push(&archive, &tag)?;
        let name = format!("{}/{tag}", registry_on(c.hosts[0].ip));
        let started = Instant::now();
        std::thread::scope(|s| -> anyhow::Result<()> {
            let pulls: Vec<_> = (0..3)
                .map(|i| {
                    let name = &name;
                    s.spawn(move || c.shoal_ok(i, &["image", "pull", name]).map(|_| ()))
                })
                .collect();
            for p in pulls {
                p.join().map_err(|_| anyhow::anyhow!("a pull panicked"))??;
            }
            Ok(())
        })?;
        times.push(started.elapsed());
    }
    summary(
        &format!(
            "first pull of a {:.1} MiB image on 3 nodes at once",
            bytes as f64 / 1048576.0
        ),
        times,
    );
    Ok(())
}

fn rand_byte() -> u8 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static X: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
    let mut x = X.load(Ordering::Relaxed);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    X.store(x, Ordering::Relaxed);
    (x >> 24) as u8
}

/// 30 tasks of each runtime: the PSS of the processes each task adds (its
/// shim and its own), and for containers what their cgroups are charged.
fn memory(c: &Cluster, image: &str) -> anyhow::Result<()> {
    const N: usize = 30;
    for (runtime, img) in [("container", Some(image)), ("process", None)] {
        let name = format!("mem{runtime}");
        let args = create_args(&name, N, img);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        c.shoal_ok(0, &args)?;
        until_running(&c.hosts[0].socket, &name, N, Instant::now())?;
        std::thread::sleep(Duration::from_secs(3));
        let (shims, tasks) = if img.is_some() {
            (
                pids_of(|cmd| cmd.contains("containerd-shim-runc-v2")),
                pids_of(|cmd| cmd == "busybox\u{0}sleep\u{0}600\u{0}"),
            )
        } else {
            (
                pids_of(|cmd| cmd.contains("task-shim")),
                pids_of(|cmd| cmd == "sleep\u{0}600\u{0}"),
            )
        };
        let per_task = |pids: &[u32]| {
            pids.iter()
                .map(|p| proc_kib(*p, "smaps_rollup", "Pss:"))
                .sum::<u64>()
                / N as u64
        };
        print!(
            "{N} {runtime} tasks, PSS per task: shim {} KiB ({} processes), task {} KiB",
            per_task(&shims),
            shims.len(),
            per_task(&tasks)
        );
        if img.is_some() {
            print!(
                "; cgroup memory charged per container {} KiB",
                container_cgroups_kib() / N as u64
            );
        }
        println!();
        remove(c, &name)?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    if !shoal_integration::is_root() {
        anyhow::bail!(
            "the container benchmarks need root (namespaces, containerd, the lab registry)"
        );
    }
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let trials: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(5);
    let only = args.get(1).map(String::as_str);
    let (c, image) = lab()?;
    if only.is_none_or(|o| o == "running") {
        create_to_running(&c, &image, trials)?;
    }
    if only.is_none_or(|o| o == "pull") {
        first_pull(&c, trials, 0)?;
        first_pull(&c, trials, 32)?;
    }
    if only.is_none_or(|o| o == "memory") {
        memory(&c, &image)?;
    }
    Ok(())
}
