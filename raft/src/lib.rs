//! Shoal's Raft glue: the openraft type configuration, a durable log store on
//! redb (every append is fsynced before openraft is told it is written), the
//! state-machine adapter that feeds committed entries to
//! [`shoal_mesh::apply`] and keeps crash-safe snapshots, and the network seam
//! ([`RaftTransport`]) over which Raft RPCs travel.
//!
//! This crate never opens sockets: the node crate supplies a QUIC transport,
//! tests can supply an in-memory one. It never decides anything about the
//! cluster either; that is `shoal_mesh::apply`'s job.

// openraft's `StorageError` is large and its traits return it; boxing it here would
// only add conversions at every call.
#![allow(clippy::result_large_err)]

pub mod at_rest;
pub mod feed;
pub mod fixtures;
pub mod log_store;
pub mod memory;
pub mod network;
pub mod recovery;
pub mod state_machine;
pub mod types;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use at_rest::AtRest;
pub use log_store::LogStore;
pub use memory::MemoryStore;
pub use network::{Network, RaftRpc, RaftRpcReply, RaftTransport, TransportError, serve_rpc};
pub use state_machine::{StateHandle, StateMachineStore};
pub use types::{ApplyResult, Raft, TypeConfig};

/// Why the store could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The log database cannot be opened (corrupt, locked, unreadable).
    #[error("cannot open the Raft log {path}: {reason}")]
    OpenLog {
        /// The redb file.
        path: PathBuf,
        /// What redb said.
        reason: String,
    },
    /// The snapshot file is unreadable or corrupt.
    #[error("cannot read the snapshot {path}: {reason}")]
    Snapshot {
        /// The snapshot file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// Raft timing. The defaults aim at sub-second leader failover on a LAN.
///
/// openraft 0.9 lets a follower that has seen a committed leader start an
/// election only after `election_max` (its leader lease) plus a random
/// timeout in `election_min..election_max`, plus `2 × election_max` if one
/// of its earlier vote requests met a longer log (a flag that lingers until
/// the node next runs an election), checked on a tick of 1.5 × `heartbeat`.
/// With the defaults a dead leader is replaced after 200–340 ms, or
/// 500–640 ms when both survivors carry that flag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaftTiming {
    /// Leader heartbeat interval.
    pub heartbeat: Duration,
    /// Lower bound of the randomized election timeout.
    pub election_min: Duration,
    /// Upper bound of the randomized election timeout.
    pub election_max: Duration,
}

impl Default for RaftTiming {
    fn default() -> Self {
        RaftTiming {
            heartbeat: Duration::from_millis(25),
            election_min: Duration::from_millis(100),
            election_max: Duration::from_millis(150),
        }
    }
}

/// The openraft configuration Shoal runs with.
pub fn config(timing: &RaftTiming) -> openraft::Config {
    openraft::Config {
        cluster_name: "shoal".into(),
        heartbeat_interval: timing.heartbeat.as_millis() as u64,
        election_timeout_min: timing.election_min.as_millis() as u64,
        election_timeout_max: timing.election_max.as_millis() as u64,
        install_snapshot_timeout: 2_000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(2_000),
        max_in_snapshot_log_to_keep: 500,
        // An entry is at most a few hundred KiB (mesh::bounds): 48 of them
        // stay under the 16 MiB a peer reads in one message.
        max_payload_entries: 48,
        ..Default::default()
    }
}

/// Opens (or creates) the log store and the state machine under `dir`,
/// their data sealed as `at_rest` says.
pub fn open(dir: &Path, at_rest: AtRest) -> Result<(LogStore, StateMachineStore), StoreError> {
    std::fs::create_dir_all(dir).map_err(|e| StoreError::OpenLog {
        path: dir.to_owned(),
        reason: e.to_string(),
    })?;
    let log = LogStore::open(&dir.join("raft-log.redb"), at_rest.clone())?;
    let sm = StateMachineStore::open(dir, at_rest)?;
    Ok((log, sm))
}

#[cfg(test)]
mod storage_suite;
