//! Service benchmarks on real daemons (release build), 3 managers:
//!
//! - `service create` to all tasks running, for 1, 10 and 100 replicas
//!   (each task a real process, in its own namespaces when run as root);
//! - creating 1000 services (attached to a network, so each gets a VIP, no
//!   replicas) through the API: throughput, then the store's size on disk
//!   and the daemons' memory.
//!
//! `cargo bench -p shoal-integration --bench services [-- TRIALS [running|many]]`

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use shoal_integration::Cluster;
use shoal_integration::bench::{call, create_process_service, proc_kib, summary};

fn formed() -> anyhow::Result<Cluster> {
    let c = Cluster::start(3)?;
    c.form(3)?;
    c.wait_until("3 managers", Duration::from_secs(30), |c| {
        Ok(c.node_ls(0)?.iter().all(|n| n["status"] == "ready"))
    })?;
    Ok(c)
}

fn create_to_running(trials: usize) -> anyhow::Result<()> {
    let c = formed()?;
    let leader = c.leader(0)?.unwrap_or(0);
    let socket = c.hosts[leader].socket.clone();
    for replicas in [1u64, 10, 100] {
        let mut times = Vec::new();
        for t in 0..trials {
            let name = format!("s{replicas}-{t}");
            let started = Instant::now();
            call(
                &socket,
                &create_process_service(&name, replicas, &[], &["sleep", "600"]),
            )?;
            let inspect = json!({"op": "service_inspect", "service": name});
            loop {
                let v = call(&socket, &inspect)?;
                if v["running"] == replicas {
                    break;
                }
                if started.elapsed() > Duration::from_secs(120) {
                    anyhow::bail!("{name} did not converge: {v}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            times.push(started.elapsed());
            call(&socket, &json!({"op": "service_rm", "service": name}))?;
            // Let the processes stop before the next trial.
            std::thread::sleep(Duration::from_millis(500 + 20 * replicas));
        }
        summary(
            &format!("service create → {replicas} task(s) running on 3 nodes"),
            times,
        );
    }
    Ok(())
}

fn dir_size(p: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(p) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn many_services(count: usize, clients: usize) -> anyhow::Result<()> {
    let c = formed()?;
    let leader = c.leader(0)?.unwrap_or(0);
    let socket = c.hosts[leader].socket.clone();
    let rss_before: Vec<u64> = c
        .hosts
        .iter()
        .map(|h| proc_kib(h.pid().unwrap_or(0), "status", "VmRSS:"))
        .collect();
    call(
        &socket,
        &json!({"op": "network_create", "name": "bench", "driver": "overlay",
                "subnets": ["10.128.0.0/16"], "gateways": [], "ip_range": null,
                "aux_addresses": [], "attachable": false, "internal": false,
                "options": [], "labels": []}),
    )?;
    let started = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let handles: Vec<_> = (0..clients)
            .map(|k| {
                let socket = &socket;
                s.spawn(move || -> anyhow::Result<()> {
                    for i in (k..count).step_by(clients) {
                        call(
                            socket,
                            &create_process_service(&format!("m{i}"), 0, &["bench"], &["true"]),
                        )?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
        }
        Ok(())
    })?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{count} services (each with a VIP) via the leader, {clients} client(s): {secs:.1} s, {:.0} services/s",
        count as f64 / secs
    );
    c.wait_until("every node to hold them", Duration::from_secs(60), |c| {
        Ok((0..3).all(|i| {
            c.shoal_ok(i, &["service", "ls", "--format", "json"])
                .ok()
                .and_then(|r| r.json().ok())
                .and_then(|v| v.as_array().map(Vec::len))
                == Some(count)
        }))
    })?;
    for (i, h) in c.hosts.iter().enumerate() {
        println!(
            "  {}: state dir {:.1} MiB, daemon RSS {:.1} MiB (was {:.1} MiB)",
            h.name,
            dir_size(&h.state_dir) as f64 / 1048576.0,
            proc_kib(h.pid().unwrap_or(0), "status", "VmRSS:") as f64 / 1024.0,
            rss_before[i] as f64 / 1024.0,
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let trials: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(5);
    let only = args.get(1).map(String::as_str);
    if only != Some("many") {
        create_to_running(trials)?;
    }
    if only != Some("running") {
        many_services(1000, 1)?;
        many_services(1000, 16)?;
    }
    Ok(())
}
