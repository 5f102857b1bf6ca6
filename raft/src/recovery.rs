//! Disaster recovery: make this node the only voter of its Raft group,
//! keeping its log and state (`swarm init --force-new-cluster`).
//!
//! With Raft stopped, a membership entry `{this node}` (every other node kept
//! as a learner) is appended after the last log entry, under a term above any
//! this node has seen. When Raft starts again the node is the only voter of
//! its effective membership, elects itself, and commits that entry. Learners
//! that replicate from it accept the higher term; their entries past the
//! divergence point (never committed by this group) are replaced.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use openraft::{BasicNode, CommittedLeaderId, EntryPayload, LogId, Membership, Vote};

use crate::{AtRest, LogStore, StoreError};

/// Rewrites the log under `raft_dir` (sealed as `at_rest` says) so that
/// `me` is the only voter.
pub fn force_single_voter(
    raft_dir: &Path,
    at_rest: AtRest,
    me: u64,
    nodes: BTreeMap<u64, BasicNode>,
) -> Result<(), StoreError> {
    let path = raft_dir.join("raft-log.redb");
    let fail = |e: openraft::StorageError<u64>| StoreError::OpenLog {
        path: path.clone(),
        reason: e.to_string(),
    };
    let log = LogStore::open(&path, at_rest)?;
    let term = log
        .vote()
        .map_err(fail)?
        .map(|v| v.leader_id.term)
        .unwrap_or(0);
    let last = log.last_log_id().map_err(fail)?;
    let next_term = term.max(last.map(|l| l.leader_id.term).unwrap_or(0)) + 1;
    let index = last.map(|l| l.index + 1).unwrap_or(0);
    let membership = Membership::new(vec![BTreeSet::from([me])], nodes);
    let entry = openraft::Entry {
        log_id: LogId::new(CommittedLeaderId::new(next_term, me), index),
        payload: EntryPayload::Membership(membership),
    };
    log.write_entries([entry]).map_err(fail)?;
    log.set_vote(&Vote::new(next_term, me)).map_err(fail)?;
    Ok(())
}
