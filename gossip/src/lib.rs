//! Shoal's gossip layer: who is alive right now, and which endpoints and
//! tunnel endpoints are live on each network.
//!
//! - Membership is SWIM with suspicion and incarnations ([foca]), over the
//!   node's mutually authenticated QUIC endpoint.
//! - Tables are network-scoped, owner-scoped and last-writer-wins with
//!   tombstones ([`table`]); a write is pushed to the network's members at
//!   once, and periodic digest anti-entropy heals whatever a push missed.
//! - Entries of a node declared dead are hidden everywhere at once; a node
//!   that restarts is a new generation whose fresh state replaces the old.
//!
//! The core ([`Gossip`]) is sans-IO: it never opens a socket nor reads a
//! clock. The node crate drives it over QUIC; [`sim`] drives hundreds of
//! them in one process in simulated time, with lossy, slow or cut links.

pub mod core;
pub mod keys;
pub mod message;
pub mod peer;
pub mod share;
pub mod sim;
pub mod swim;
pub mod table;

pub use crate::core::{
    Event, Gossip, GossipConfig, GossipError, MemberInfo, MemberState, Rejected, Transmit,
};
pub use crate::keys::{Keys, TestKeys};
pub use crate::peer::Peer;
