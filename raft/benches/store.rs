//! Writes committed directly on the store: a one-voter Raft node on our
//! redb log (fsync per append) and snapshotting state machine, without the
//! daemon, the API or the network. 1 and 64 concurrent writers.
//!
//! `cargo bench -p shoal-raft --bench store`

#![allow(missing_docs)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::BasicNode;
use shoal_mesh::{Availability, Command, Node, NodeId, Role};
use shoal_raft::{Network, Raft, RaftRpc, RaftRpcReply, RaftTransport, TransportError};

/// A node alone in its group never sends an RPC.
#[derive(Clone)]
struct Alone;

impl RaftTransport for Alone {
    async fn call(
        &self,
        _: u64,
        addr: &str,
        _: RaftRpc,
        _: Duration,
    ) -> Result<RaftRpcReply, TransportError> {
        Err(TransportError::Unreachable {
            addr: addr.to_owned(),
            reason: "benchmark node has no peers".into(),
        })
    }
}

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
    let (log, sm) = shoal_raft::open(dir.path(), shoal_raft::AtRest::with_key(&[7; 32]))?;
    let config = Arc::new(shoal_raft::config(&Default::default()).validate()?);
    let raft = Raft::new(1, config, Network::new(Alone), log, sm).await?;
    raft.initialize(BTreeMap::from([(1, BasicNode::new("127.0.0.1:1"))]))
        .await?;
    while raft.metrics().borrow().current_leader != Some(1) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first = Node {
        id: NodeId(1),
        hostname: "bench".into(),
        role: Role::Manager,
        availability: Availability::Active,
        labels: Default::default(),
        addr: "127.0.0.1:1".into(),
        joined_at_ms: 0,
    };
    let cluster = shoal_mesh::fixtures::cluster_info("bench");
    raft.client_write(Command::Init {
        cluster,
        first,
        ingress_id: "ingress".into(),
    })
    .await?;

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
