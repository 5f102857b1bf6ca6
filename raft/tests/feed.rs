//! The feed: a node outside Raft's membership keeps an exact, durable copy
//! of the store from a member's answers, from the log and from a snapshot.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::BasicNode;
use shoal_mesh::{Availability, Command, Node, NodeId, Role};
use shoal_raft::feed::{self, FeedReply, FeedRequest, TakeError};
use shoal_raft::{
    LogStore, Network, Raft, RaftRpc, RaftRpcReply, RaftTransport, StateHandle, TransportError,
};

/// Nothing is sent over a network here.
#[derive(Clone)]
struct Nowhere;

impl RaftTransport for Nowhere {
    async fn call(
        &self,
        _: u64,
        addr: &str,
        _: RaftRpc,
        _: Duration,
    ) -> Result<RaftRpcReply, TransportError> {
        Err(TransportError::Unreachable {
            addr: addr.to_owned(),
            reason: "no network in this test".into(),
        })
    }
}

struct Store {
    raft: Raft,
    log: LogStore,
    state: StateHandle,
}

impl Store {
    /// Its feed's answer to a node that holds `after`, waiting at most
    /// `wait_ms` for something newer.
    async fn serve(&self, after: Option<openraft::LogId<u64>>, wait_ms: u32) -> FeedReply {
        feed::serve(&self.raft, &self.log, FeedRequest { after, wait_ms }).await
    }
}

async fn open(id: u64, dir: &std::path::Path, config: openraft::Config) -> Store {
    let (log, sm) = shoal_raft::open(dir, shoal_raft::AtRest::with_key(&[id as u8; 32])).unwrap();
    let state = sm.handle();
    let config = Arc::new(config.validate().unwrap());
    let raft = Raft::new(id, config, Network::new(Nowhere), log.clone(), sm)
        .await
        .unwrap();
    Store { raft, log, state }
}

async fn leader(dir: &std::path::Path, config: openraft::Config) -> Store {
    let s = open(1, dir, config).await;
    s.raft
        .initialize(BTreeMap::from([(1, BasicNode::new("127.0.0.1:1"))]))
        .await
        .unwrap();
    while s.raft.metrics().borrow().current_leader != Some(1) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first = Node {
        id: NodeId(1),
        hostname: "one".into(),
        role: Role::Manager,
        availability: Availability::Active,
        labels: Default::default(),
        addr: "127.0.0.1:1".into(),
        joined_at_ms: 0,
    };
    s.raft
        .client_write(Command::Init {
            cluster: shoal_mesh::fixtures::cluster_info("feed"),
            first,
            ingress_id: "ingress".into(),
        })
        .await
        .unwrap();
    s
}

async fn label(raft: &Raft, i: usize) {
    raft.client_write(Command::UpdateNode {
        node: NodeId(1),
        availability: None,
        label_add: vec![(format!("k{i}"), i.to_string())],
        label_rm: vec![],
    })
    .await
    .unwrap();
}

/// Feeds `worker` from `manager` until it holds all `manager` applied.
async fn catch_up(
    manager: &Store,
    worker: &Store,
    mut after: Option<openraft::LogId<u64>>,
) -> Option<openraft::LogId<u64>> {
    let target = manager.raft.metrics().borrow().last_applied;
    for _ in 0..100 {
        if after >= target {
            return after;
        }
        let reply = manager.serve(after, 0).await;
        after = feed::take(&worker.raft, after, reply).await.unwrap();
    }
    panic!("not caught up: {after:?} < {target:?}");
}

async fn applied(s: &Store, upto: Option<openraft::LogId<u64>>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.raft.metrics().borrow().last_applied < upto {
        assert!(Instant::now() < deadline, "not applied up to {upto:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_fed_node_holds_the_store_across_restarts_and_never_votes() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let config = shoal_raft::config(&Default::default());
    let m = leader(dirs[0].path(), config.clone()).await;
    for i in 0..300 {
        label(&m.raft, i).await;
    }
    let w = open(2, dirs[1].path(), config.clone()).await;
    let after = catch_up(&m, &w, None).await;
    applied(&w, after).await;
    assert_eq!(w.state.state(), m.state.state());
    // It knows the leader, and is neither a voter nor a candidate.
    let metrics = w.raft.metrics().borrow().clone();
    assert_eq!(metrics.current_leader, Some(1));
    assert!(
        !metrics
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == 2)
    );

    // A long poll with nothing new waits, then answers nothing.
    let started = Instant::now();
    let reply = m.serve(after, 300).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(matches!(&reply, FeedReply::Entries { entries, .. } if entries.is_empty()));
    assert_eq!(feed::take(&w.raft, after, reply).await, Ok(after));

    // A write during a long poll answers it at once.
    let raft = m.raft.clone();
    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        label(&raft, 1000).await;
    });
    let started = Instant::now();
    let reply = m.serve(after, 20_000).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    writer.await.unwrap();
    let after = feed::take(&w.raft, after, reply).await.unwrap();
    applied(&w, after).await;
    assert_eq!(w.state.state(), m.state.state());

    // What it took is durable: reopened, it holds the same store.
    w.raft.shutdown().await.unwrap();
    drop(w);
    let w = open(2, dirs[1].path(), config).await;
    applied(&w, after).await;
    assert_eq!(w.state.state(), m.state.state());
}

#[tokio::test]
async fn a_node_behind_the_purged_log_gets_the_snapshot() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut config = shoal_raft::config(&Default::default());
    config.snapshot_policy = openraft::SnapshotPolicy::LogsSinceLast(50);
    config.max_in_snapshot_log_to_keep = 0;
    let m = leader(dirs[0].path(), config.clone()).await;
    for i in 0..120 {
        label(&m.raft, i).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while m.raft.metrics().borrow().purged.is_none() {
        assert!(Instant::now() < deadline, "the log was never purged");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let w = open(2, dirs[1].path(), config).await;
    let reply = m.serve(None, 0).await;
    assert!(matches!(reply, FeedReply::Snapshot { .. }), "{reply:?}");
    let after = feed::take(&w.raft, None, reply).await.unwrap();
    let after = catch_up(&m, &w, after).await;
    applied(&w, after).await;
    assert_eq!(w.state.state(), m.state.state());
}

#[tokio::test]
async fn entries_that_do_not_follow_are_refused() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let config = shoal_raft::config(&Default::default());
    let m = leader(dirs[0].path(), config.clone()).await;
    label(&m.raft, 1).await;
    let w = open(2, dirs[1].path(), config).await;
    // An answer to a question this node did not ask.
    let asked = m.raft.metrics().borrow().last_applied;
    let reply = m.serve(asked, 0).await;
    label(&m.raft, 2).await;
    let reply2 = m.serve(asked, 0).await;
    assert!(matches!(&reply2, FeedReply::Entries { entries, .. } if entries.len() == 1));
    assert_eq!(
        feed::take(&w.raft, None, reply2).await,
        Err(TakeError::Conflict)
    );
    // Entries after one this node does not hold: its Raft refuses them.
    let reply3 = m.serve(asked, 0).await;
    assert_eq!(
        feed::take(&w.raft, asked, reply3).await,
        Err(TakeError::Conflict)
    );
    // (`reply` had nothing new after `asked`.)
    assert_eq!(feed::take(&w.raft, asked, reply).await, Ok(asked));
    assert_eq!(w.state.state(), Default::default());
}

#[tokio::test]
async fn a_leader_never_takes_its_own_vote_from_the_feed() {
    let dir = tempfile::tempdir().unwrap();
    let m = leader(dir.path(), shoal_raft::config(&Default::default())).await;
    label(&m.raft, 1).await;
    // What a follower would relay to it: its own entries, under its vote.
    for after in [
        None,
        m.raft.metrics().borrow().last_applied.map(|mut l| {
            l.index -= 1;
            l
        }),
    ] {
        let reply = m.serve(after, 0).await;
        assert_eq!(
            feed::take(&m.raft, after, reply).await,
            Err(TakeError::OwnVote)
        );
    }
    // It still leads, and writes.
    label(&m.raft, 2).await;
    assert_eq!(m.raft.metrics().borrow().current_leader, Some(1));
}
