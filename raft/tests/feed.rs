//! The feed: a node outside Raft's membership keeps an exact, durable copy
//! of the store from a member's answers, from the log and from a snapshot.

#![allow(missing_docs)]
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use shoal_mesh::{Command, NodeId};
use shoal_raft::feed::{self, FeedReply, FeedRequest, TakeError};
use shoal_raft::{LogStore, Raft, StateHandle, fixtures};

struct Store {
    raft: Raft,
    log: LogStore,
    /// Its feed, keeping the entries it reads as a manager's does.
    feed: feed::FeedSource,
    state: StateHandle,
}

impl Store {
    /// Its feed's answer to a node that holds `after`, waiting at most
    /// `wait_ms` for something newer.
    async fn serve(&self, after: Option<openraft::LogId<u64>>, wait_ms: u32) -> FeedReply {
        feed::serve(&self.raft, &self.feed, FeedRequest { after, wait_ms }).await
    }
}

async fn open(id: u64, dir: &std::path::Path, config: openraft::Config) -> Store {
    wrap(fixtures::open(id, dir, config).await)
}

async fn leader(dir: &std::path::Path, config: openraft::Config) -> Store {
    wrap(fixtures::leader(dir, config, "feed").await)
}

fn wrap(s: fixtures::Store) -> Store {
    Store {
        feed: feed::FeedSource::new(s.log.clone()),
        raft: s.raft,
        log: s.log,
        state: s.state,
    }
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

/// What a manager answers from the entries it keeps is what it reads from
/// its log, for every place a worker may ask from, one that is not in the
/// log included.
#[tokio::test]
async fn kept_entries_answer_as_the_log_does() {
    let dir = tempfile::tempdir().unwrap();
    let config = shoal_raft::config(&Default::default());
    let m = leader(dir.path(), config).await;
    for i in 0..40 {
        label(&m.raft, i).await;
    }
    let last = m.raft.metrics().borrow().last_applied.unwrap();
    let encoded = |r: &FeedReply| shoal_mesh::codec::encode(r).unwrap();
    // Fill the kept entries as workers catching up do.
    let mut after = None;
    while after < Some(last) {
        match m.serve(after, 0).await {
            FeedReply::Entries { entries, .. } => after = entries.last().map(|e| e.log_id),
            other => panic!("{other:?}"),
        }
    }
    let mut places: Vec<Option<openraft::LogId<u64>>> = (1..=last.index)
        .map(|i| Some(openraft::LogId::new(last.leader_id, i)))
        .collect();
    // Not this log's: the kept entries must not answer it.
    places.push(Some(openraft::LogId::new(
        openraft::CommittedLeaderId::new(last.leader_id.term + 1, 1),
        last.index - 5,
    )));
    for after in places {
        let kept = m.serve(after, 0).await;
        let read = feed::serve(
            &m.raft,
            &feed::FeedSource::new(m.log.clone()),
            FeedRequest { after, wait_ms: 0 },
        )
        .await;
        assert_eq!(encoded(&kept), encoded(&read), "after {after:?}");
    }
}
