//! The store's feed: how a node that is not a Raft member (a worker) keeps
//! its copy of the store, without the leader sending it anything.
//!
//! A worker asks any manager for what was committed after the last entry it
//! holds ([`FeedRequest`]); the manager answers from its own log once it has
//! applied something newer, or after a wait with nothing new (a long poll),
//! or with its snapshot when its log no longer reaches back that far
//! ([`serve`]). The worker hands the answer to its own Raft node as the
//! leader would have ([`take`]): the entries are written to its durable log
//! and applied by the same state machine, under the vote of the leader that
//! committed them. Only committed entries travel, so a worker's log never
//! holds anything that could be undone, and a manager that is not the
//! leader serves as well as the leader: the leader's work per entry does
//! not grow with the number of workers, and an idle swarm costs one request
//! per worker per [`MAX_WAIT`].
//!
//! ```text
//!  worker ── FeedRequest{after} ──► any manager (waits for applied > after)
//!  worker ◄── Entries{vote, prev = after, entries ≤ applied} | Snapshot{vote, meta, data}
//!  worker: raft.append_entries / raft.install_full_snapshot (durable, applied)
//! ```

use std::io::Cursor;
use std::time::Duration;

use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
use openraft::{BasicNode, LogId, RaftLogReader, Snapshot, SnapshotMeta, Vote};
use serde::{Deserialize, Serialize};

use crate::log_store::LogStore;
use crate::types::{Raft, TypeConfig};

/// The longest a manager holds a request with nothing new.
pub const MAX_WAIT: Duration = Duration::from_secs(30);
/// At most this many entries in one answer.
pub const MAX_ENTRIES: usize = 256;
/// Entries stop being added once an answer is this big (one entry may be
/// bigger: `shoal_mesh::bounds` keeps each under the message limit).
pub const MAX_BYTES: usize = 4 << 20;
/// The largest snapshot sent (the store's quota is below it).
pub const MAX_SNAPSHOT: usize = 15 << 20;
/// How long a fed node waits after an answer that brought entries before
/// it asks again: while the store changes fast (a rollout), a manager then
/// answers each of the workers it feeds at most 1 / `PACE` times a
/// second, each answer carrying what committed meanwhile, instead of once
/// per commit. It delays what a worker sees by at most this much.
pub const PACE: Duration = Duration::from_millis(50);
/// Committed entries a manager keeps decoded for the workers it feeds.
const RECENT: usize = 1024;

/// A manager's source of feed answers: its log, and the entries committed
/// most recently, decoded once for every worker that asks after them (each
/// read from the log is a transaction and a decryption; a manager of a
/// 5 000-node swarm answers some 2 500 workers for each change).
/// Committed entries never change, so what it holds stays true.
#[derive(Clone)]
pub struct FeedSource {
    log: LogStore,
    recent: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<Recent>>>,
}

/// A committed entry and the size of its encoding.
#[derive(Clone)]
struct Recent {
    entry: openraft::Entry<TypeConfig>,
    size: usize,
}

impl FeedSource {
    /// The feed of `log`.
    pub fn new(log: LogStore) -> Self {
        FeedSource {
            log,
            recent: Default::default(),
        }
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Recent>> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The kept entries `first..=last` following `prev`, if the first of
    /// them and `prev` (`None`: the log's start) are kept.
    fn kept(&self, prev: Option<LogId<u64>>, first: u64, last: u64) -> Option<Vec<Recent>> {
        let prev = prev?;
        let recent = self.recent();
        let start = recent.front()?.entry.log_id.index;
        if first < start.saturating_add(1) || first > recent.back()?.entry.log_id.index {
            return None;
        }
        let at = |i: u64| recent.get(usize::try_from(i - start).ok()?);
        if at(first - 1)?.entry.log_id != prev {
            return None;
        }
        let end = last.min(recent.back()?.entry.log_id.index);
        Some((first..=end).filter_map(|i| at(i).cloned()).collect())
    }

    /// Keeps `read` (committed entries, in order) when they follow the kept
    /// ones, or in their place when they are newer, at most [`RECENT`].
    fn keep(&self, read: &[Recent]) {
        let Some(first) = read.first() else { return };
        let mut recent = self.recent();
        let follows = recent
            .back()
            .is_some_and(|b| b.entry.log_id.index + 1 == first.entry.log_id.index);
        if !follows {
            let older = recent
                .back()
                .is_some_and(|b| first.entry.log_id.index <= b.entry.log_id.index);
            if older {
                // Kept already (another worker read them first), or older
                // than what is kept (a worker catching up): the newest
                // stay, which the workers in step ask for.
                return;
            }
            recent.clear();
        }
        recent.extend(read.iter().cloned());
        while recent.len() > RECENT {
            recent.pop_front();
        }
    }
}

/// A worker's request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FeedRequest {
    /// The last committed entry the worker holds (none: nothing yet).
    pub after: Option<LogId<u64>>,
    /// How long the manager may wait for something newer, in ms (capped at
    /// [`MAX_WAIT`]).
    pub wait_ms: u32,
}

/// A manager's answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum FeedReply {
    /// Committed entries following `prev` (none if nothing is new).
    Entries {
        /// The vote of the leader they were committed under (or a later one).
        vote: Vote<u64>,
        /// The entry they follow: the request's `after`.
        prev: Option<LogId<u64>>,
        /// The entries, in order.
        entries: Vec<openraft::Entry<TypeConfig>>,
    },
    /// The manager's snapshot: its log no longer reaches back to `after`.
    Snapshot {
        /// The leader's vote.
        vote: Vote<u64>,
        /// What the snapshot covers.
        meta: SnapshotMeta<u64, BasicNode>,
        /// The encoded state.
        data: Vec<u8>,
    },
    /// This manager cannot serve now (no leader, shutting down, a storage
    /// error); ask another.
    Unavailable(String),
}

/// Answers `req` on a manager: waits (at most `req.wait_ms`, capped) until
/// this node has applied an entry after `req.after`, then sends what follows
/// it, up to what it applied.
pub async fn serve(raft: &Raft, source: &FeedSource, req: FeedRequest) -> FeedReply {
    let wait = Duration::from_millis(req.wait_ms.into()).min(MAX_WAIT);
    let after = req.after.map(|l| l.index);
    let mut metrics = raft.metrics();
    // (`None` sorts before any index.)
    let newer = |m: &openraft::RaftMetrics<u64, BasicNode>| {
        m.vote.is_committed() && m.last_applied.map(|l| l.index) > after
    };
    let _ = tokio::time::timeout(wait, metrics.wait_for(newer)).await;
    let m = metrics.borrow().clone();
    if !m.vote.is_committed() {
        return FeedReply::Unavailable("no leader: an election is under way".into());
    }
    let vote = m.vote;
    let Some(applied) = m.last_applied else {
        return FeedReply::Unavailable("this manager has applied nothing yet".into());
    };
    if after.is_some_and(|a| a >= applied.index) {
        return FeedReply::Entries {
            vote,
            prev: req.after,
            entries: Vec::new(),
        };
    }
    let first = after.map_or(0, |a| a + 1);
    let reaches = m.purged.is_none_or(|p| first > p.index);
    if reaches {
        match entries(source, req.after, m.purged, first, applied.index).await {
            Ok(Some(entries)) => {
                return FeedReply::Entries {
                    vote,
                    prev: req.after,
                    entries,
                };
            }
            Ok(None) => {}
            Err(e) => return FeedReply::Unavailable(format!("cannot read the log: {e}")),
        }
    }
    snapshot(raft, vote).await
}

/// The entries `first..=last` (bounded), if the log holds `prev` (or
/// `prev` is the last entry purged from it) and `first` still (it may have
/// been purged meanwhile): the kept ones if they are, else from the log.
async fn entries(
    source: &FeedSource,
    prev: Option<LogId<u64>>,
    purged: Option<LogId<u64>>,
    first: u64,
    last: u64,
) -> Result<Option<Vec<openraft::Entry<TypeConfig>>>, openraft::StorageError<u64>> {
    let last = last.min(first.saturating_add(MAX_ENTRIES as u64 - 1));
    let read = match source.kept(prev, first, last) {
        Some(kept) => kept,
        None => match read_entries(source, prev, purged, first, last).await? {
            Some(read) => {
                source.keep(&read);
                read
            }
            None => return Ok(None),
        },
    };
    let mut bytes = 0;
    let mut out = Vec::new();
    for r in read {
        if !out.is_empty() && bytes + r.size > MAX_BYTES {
            break;
        }
        bytes += r.size;
        out.push(r.entry);
    }
    Ok(Some(out))
}

/// The entries `first..=last` from the log, as [`entries`] says.
async fn read_entries(
    source: &FeedSource,
    prev: Option<LogId<u64>>,
    purged: Option<LogId<u64>>,
    first: u64,
    last: u64,
) -> Result<Option<Vec<Recent>>, openraft::StorageError<u64>> {
    let mut reader = source.log.clone();
    if let Some(p) = prev
        && prev != purged
    {
        let at = reader.try_get_log_entries(p.index..=p.index).await?;
        if at.first().map(|e| e.log_id) != Some(p) {
            // Purged, or not this log's entry: the snapshot instead.
            return Ok(None);
        }
    }
    let all = reader.try_get_log_entries(first..=last).await?;
    if all.first().map(|e| e.log_id.index) != Some(first) {
        return Ok(None);
    }
    Ok(Some(
        all.into_iter()
            .map(|entry| Recent {
                size: shoal_mesh::codec::encode(&entry).map_or(0, |b| b.len()),
                entry,
            })
            .collect(),
    ))
}

async fn snapshot(raft: &Raft, vote: Vote<u64>) -> FeedReply {
    match raft.get_snapshot().await {
        Ok(Some(s)) => {
            let data = s.snapshot.into_inner();
            if data.len() > MAX_SNAPSHOT {
                return FeedReply::Unavailable(format!(
                    "the snapshot is {} bytes, over the {MAX_SNAPSHOT} a feed sends",
                    data.len()
                ));
            }
            FeedReply::Snapshot {
                vote,
                meta: s.meta,
                data,
            }
        }
        Ok(None) => FeedReply::Unavailable("this manager has no snapshot yet".into()),
        Err(e) => FeedReply::Unavailable(format!("cannot read the snapshot: {e}")),
    }
}

/// Why an answer was not taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TakeError {
    /// The entries do not follow what this node holds: ask again from
    /// nothing (the manager then sends its log from the start, or its
    /// snapshot).
    #[error("the entries do not follow this node's log")]
    Conflict,
    /// This node has seen a newer leader than the manager's: the manager
    /// is behind.
    #[error("the manager's leader ({0}) is older than this node's")]
    Stale(String),
    /// The answer carries this node's own vote: it leads (or led, in that
    /// term), and takes entries from no one. A leader handed its own vote
    /// would take the entries as a follower, which openraft forbids.
    #[error("the feed carries this node's own vote: it leads")]
    OwnVote,
    /// The manager could not serve.
    #[error("{0}")]
    Unavailable(String),
    /// This node's Raft could not take it (shutting down, storage).
    #[error("{0}")]
    Local(String),
}

/// Hands a manager's answer to this node's Raft (durably written and
/// applied, as if the leader had sent it); the last committed entry this
/// node now holds, to ask after next.
pub async fn take(
    raft: &Raft,
    asked: Option<LogId<u64>>,
    reply: FeedReply,
) -> Result<Option<LogId<u64>>, TakeError> {
    let me = raft.metrics().borrow().id;
    let own = |vote: &Vote<u64>| vote.leader_id().voted_for() == Some(me);
    match reply {
        FeedReply::Unavailable(why) => Err(TakeError::Unavailable(why)),
        FeedReply::Entries { vote, .. } | FeedReply::Snapshot { vote, .. } if own(&vote) => {
            Err(TakeError::OwnVote)
        }
        FeedReply::Entries { entries, .. } if entries.is_empty() => Ok(asked),
        FeedReply::Entries {
            vote,
            prev,
            entries,
        } => {
            if prev != asked {
                return Err(TakeError::Conflict);
            }
            let last = entries.last().map(|e| e.log_id);
            let rpc = AppendEntriesRequest {
                vote,
                prev_log_id: prev,
                entries,
                leader_commit: last,
            };
            match raft.append_entries(rpc).await {
                Ok(AppendEntriesResponse::Success) => Ok(last),
                Ok(AppendEntriesResponse::PartialSuccess(upto)) => Ok(upto),
                Ok(AppendEntriesResponse::Conflict) => Err(TakeError::Conflict),
                Ok(AppendEntriesResponse::HigherVote(v)) => Err(TakeError::Stale(v.to_string())),
                Err(e) => Err(TakeError::Local(e.to_string())),
            }
        }
        FeedReply::Snapshot { vote, meta, data } => {
            let last = meta.last_log_id;
            let snapshot = Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(data)),
            };
            match raft.install_full_snapshot(vote, snapshot).await {
                Ok(resp) if resp.vote > vote => Err(TakeError::Stale(vote.to_string())),
                Ok(_) => Ok(last),
                Err(e) => Err(TakeError::Local(e.to_string())),
            }
        }
    }
}
