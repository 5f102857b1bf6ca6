//! Writes committed directly on the store: a one-voter Raft node on our
//! redb log (fsync per append) and snapshotting state machine, without the
//! daemon, the API or the network. 1 and 64 concurrent writers.
//!
//! `cargo bench -p shoal-raft --bench store`

#![allow(missing_docs)]

use std::time::{Duration, Instant};

use shoal_mesh::{Command, NodeId};

fn summary(name: &str, mut v: Vec<Duration>, secs: f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{name}: n={} min={:.2}ms p50={:.2}ms p99={:.2}ms max={:.2}ms throughput={:.0} writes/s",
        v.len(),
        ms(v[0]),
        ms(p(0.5)),
        ms(p(0.99)),
        ms(v[v.len() - 1]),
        v.len() as f64 / secs
    );
}

fn update(i: usize) -> Command {
    Command::UpdateNode {
        node: NodeId(1),
        availability: None,
        label_add: vec![("bench".into(), i.to_string())],
        label_rm: vec![],
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // Sealed at rest, as the node runs it.
    let store =
        shoal_raft::fixtures::leader(dir.path(), shoal_raft::config(&Default::default()), "bench")
            .await;
    let raft = store.raft;

    for (clients, per_client) in [(1usize, 2000usize), (64, 100)] {
        let started = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..clients {
            let raft = raft.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per_client);
                for i in 0..per_client {
                    let t = Instant::now();
                    raft.client_write(update(c * per_client + i))
                        .await
                        .expect("write");
                    lat.push(t.elapsed());
                }
                lat
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await?);
        }
        summary(
            &format!("store writes, {clients} writer(s)"),
            all,
            started.elapsed().as_secs_f64(),
        );
    }
    raft.shutdown().await?;
    Ok(())
}
