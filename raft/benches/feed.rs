//! The feed's cost on the manager that serves it (issue 16): N fed
//! workers long-polling one manager while it commits a steady stream of
//! writes (a rollout's task reports), as a follower of a 5 000-node swarm
//! serves 2 500. Each worker asks after what it last got, as the daemon's
//! feed loop does, pausing [`feed::PACE`] after each answer that brought
//! something; the manager's side is `feed::serve` and the encoding of its
//! answer. In one process, without QUIC (whose encryption adds to each
//! answer) and without the workers applying what they get.
//!
//! ```text
//! cargo bench -p shoal-raft --bench feed -- [--workers 0,100,1000,2500] [--rate 100] [--seconds 5] [--pace-ms 50] [--uncached]
//! ```

#![allow(missing_docs, clippy::unwrap_used, clippy::print_stdout)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use shoal_mesh::{Command, NodeId};
use shoal_raft::Raft;
use shoal_raft::feed::{self, FeedReply, FeedRequest};

/// This process's CPU time (user + system).
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

#[derive(Default)]
struct Served {
    answers: AtomicU64,
    entries: AtomicU64,
    bytes: AtomicU64,
}

/// One fed worker: asks after what it holds, as the daemon's feed loop.
async fn worker(
    raft: Raft,
    source: feed::FeedSource,
    pace: Duration,
    served: Arc<Served>,
    stop: Arc<AtomicBool>,
) {
    let mut after = raft.metrics().borrow().last_applied;
    while !stop.load(Ordering::Relaxed) {
        let reply = feed::serve(
            &raft,
            &source,
            FeedRequest {
                after,
                wait_ms: 25_000,
            },
        )
        .await;
        let bytes = shoal_mesh::codec::encode(&reply).unwrap().len() as u64;
        served.bytes.fetch_add(bytes, Ordering::Relaxed);
        served.answers.fetch_add(1, Ordering::Relaxed);
        if let FeedReply::Entries { entries, .. } = reply
            && let Some(last) = entries.last()
        {
            served
                .entries
                .fetch_add(entries.len() as u64, Ordering::Relaxed);
            after = Some(last.log_id);
            tokio::time::sleep(pace).await;
        }
    }
}

#[tokio::main]
async fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: &str| -> String {
        argv.iter()
            .position(|a| a == name)
            .map_or(default.to_owned(), |i| argv[i + 1].clone())
    };
    let workers: Vec<usize> = arg("--workers", "0,100,1000,2500")
        .split(',')
        .map(|v| v.parse().expect("--workers: numbers, comma separated"))
        .collect();
    let rate: u64 = arg("--rate", "100")
        .parse()
        .expect("--rate: writes a second");
    let seconds: u64 = arg("--seconds", "5").parse().expect("--seconds");
    let pace = Duration::from_millis(
        arg("--pace-ms", &feed::PACE.as_millis().to_string())
            .parse()
            .expect("--pace-ms"),
    );
    // Without the kept entries: every answer read from the log, as before.
    let uncached = argv.iter().any(|a| a == "--uncached");
    println!(
        "| fed workers | writes/s | answers/s | entries per answer | sent | manager CPU (writes and feed) |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for n in workers {
        let dir = tempfile::tempdir().unwrap();
        let store = shoal_raft::fixtures::leader(
            dir.path(),
            shoal_raft::config(&Default::default()),
            "bench",
        )
        .await;
        let (raft, log) = (store.raft, store.log);
        let shared = feed::FeedSource::new(log.clone());
        let served = Arc::new(Served::default());
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let source = if uncached {
                    feed::FeedSource::new(log.clone())
                } else {
                    shared.clone()
                };
                tokio::spawn(worker(
                    raft.clone(),
                    source,
                    pace,
                    served.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (cpu0, t0) = (cpu(), Instant::now());
        let (a0, e0, b0) = (
            served.answers.load(Ordering::Relaxed),
            served.entries.load(Ordering::Relaxed),
            served.bytes.load(Ordering::Relaxed),
        );
        let mut tick = tokio::time::interval(Duration::from_secs(1) / rate as u32);
        let mut written = 0u64;
        while t0.elapsed() < Duration::from_secs(seconds) {
            tick.tick().await;
            raft.client_write(Command::UpdateNode {
                node: NodeId(1),
                availability: None,
                label_add: vec![("task".into(), format!("{written:025} running"))],
                label_rm: vec![],
            })
            .await
            .unwrap();
            written += 1;
        }
        let secs = t0.elapsed().as_secs_f64();
        let used = (cpu() - cpu0).as_secs_f64();
        let answers = served.answers.load(Ordering::Relaxed) - a0;
        let entries = served.entries.load(Ordering::Relaxed) - e0;
        let bytes = served.bytes.load(Ordering::Relaxed) - b0;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.abort();
        }
        println!(
            "| {n} | {:.0} | {:.0} | {:.1} | {:.1} MB/s | {:.0} % of a core |",
            written as f64 / secs,
            answers as f64 / secs,
            entries as f64 / answers.max(1) as f64,
            bytes as f64 / secs / 1e6,
            used / secs * 100.0,
        );
        raft.shutdown().await.unwrap();
    }
}
