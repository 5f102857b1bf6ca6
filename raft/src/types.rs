//! The openraft type configuration.

use std::io::Cursor;

use shoal_mesh::{ApplyError, Command, Outcome};

/// What applying one entry returned (blank and membership entries return `Ok(Done)`).
pub type ApplyResult = Result<Outcome, ApplyError>;

openraft::declare_raft_types!(
    /// Shoal's Raft types: commands from `shoal_mesh`, `u64` node IDs,
    /// snapshots as in-memory byte buffers.
    pub TypeConfig:
        D = Command,
        R = ApplyResult,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A Raft node with Shoal's types.
pub type Raft = openraft::Raft<TypeConfig>;
