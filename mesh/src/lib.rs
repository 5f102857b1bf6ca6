//! Shoal's pure domain core: identifiers, the replicated [`ClusterState`], the
//! [`Command`]s that change it and the deterministic [`apply`] that the Raft
//! state machine runs for every committed entry, join-token parsing, and the
//! bounded wire codec.
//!
//! This crate never does I/O: no sockets, no files, no clock reads, no random
//! numbers. Whatever varies (time, fresh IDs, secrets) arrives inside the
//! command, chosen by the caller before the command enters the log, so every
//! replica that applies the same log reaches the same state.
//!
//! ```text
//!   Command (from the log) ──► apply(&mut ClusterState) ──► Ok(Outcome) | Err(ApplyError)
//! ```

pub mod apply;
pub mod bounds;
pub mod ca;
pub mod cidr;
pub mod codec;
pub mod constraint;
pub mod fixtures;
pub mod ids;
pub mod index;
pub mod ipam;
pub mod legacy;
pub mod network;
pub mod observed;
pub mod orchestrator;
pub mod plan;
pub mod route;
pub mod service;
pub mod state;
pub mod syntax;
pub mod task;
pub mod token;
pub mod wire;

#[cfg(test)]
mod test_support;

pub use apply::{ApplyError, Command, Outcome, apply};
pub use ids::{NetworkId, NodeId, ServiceId, TaskId};
pub use state::{Availability, ClusterInfo, ClusterState, Node, NodeResources, ResolveError, Role};
pub use token::{JoinToken, TokenError};
