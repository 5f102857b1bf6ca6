//! Gossip messages on the wire. SWIM traffic is a foca datagram; table
//! traffic is one message per QUIC stream. Every message carries the
//! sender's own `networks` entry, so a receiver always knows which networks
//! the sender is in before it judges the rest.

use serde::{Deserialize, Serialize};
use shoal_mesh::NodeId;

use std::sync::Arc;

use crate::table::{Digest, SharedEntry, SharedKey};

/// Largest SWIM datagram.
pub const MAX_DATAGRAM: usize = 1200;
/// Largest table message (a full sync of a large network).
pub const MAX_STREAM_MESSAGE: usize = 8 << 20;

/// A gossip message.
// Decoded once and consumed at once; boxing would only add allocations.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Message {
    /// A foca (SWIM) packet.
    Swim(Vec<u8>),
    /// Table traffic, with the sender's `networks` entry.
    Table {
        /// The sender's entry in the global `networks` table.
        sender: Option<SharedEntry>,
        /// What it says.
        body: TableMessage,
        /// The certificates of the entries' owners (see [`crate::keys`]).
        certs: Vec<(NodeId, Arc<[u8]>)>,
    },
}

/// Table traffic about one network (or the global scope).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum TableMessage {
    /// New or changed entries (a push, or the last leg of a sync).
    Entries {
        /// The network.
        network: String,
        /// The entries.
        entries: Vec<(SharedKey, SharedEntry)>,
    },
    /// Anti-entropy, first leg: the sender's per-owner digest.
    Digest {
        /// The network.
        network: String,
        /// Per-owner summary.
        digest: Digest,
    },
    /// Anti-entropy, second leg: the entries of owners whose digests
    /// differ, and a request for the first sender's entries of those owners.
    DigestReply {
        /// The network.
        network: String,
        /// The replier's entries of the differing owners.
        entries: Vec<(SharedKey, SharedEntry)>,
        /// Owners whose entries the replier wants.
        want: Vec<NodeId>,
    },
    /// Anti-entropy's first leg: the sender's whole digest in one number
    /// (`table::root`). A receiver whose own differs answers with its
    /// [`TableMessage::Digest`]; an idle swarm sends only these.
    Root {
        /// The network.
        network: String,
        /// The root of the sender's digest.
        root: u64,
    },
}

impl TableMessage {
    /// The owners of the entries it carries.
    pub fn owners(&self) -> impl Iterator<Item = NodeId> + '_ {
        let entries = match self {
            TableMessage::Entries { entries, .. } | TableMessage::DigestReply { entries, .. } => {
                entries.as_slice()
            }
            TableMessage::Digest { .. } | TableMessage::Root { .. } => &[],
        };
        entries.iter().map(|(_, e)| e.owner)
    }

    /// The network the message is about.
    pub fn network(&self) -> &str {
        match self {
            TableMessage::Entries { network, .. }
            | TableMessage::Digest { network, .. }
            | TableMessage::DigestReply { network, .. }
            | TableMessage::Root { network, .. } => network,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use shoal_mesh::NodeId;

    use crate::core::{Gossip, GossipConfig};
    use crate::peer::Peer;

    fn node() -> Gossip {
        let me = Peer {
            id: NodeId(1),
            addr: "127.0.0.1:1".into(),
            generation: 1 << 16,
            bump: 0,
        };
        Gossip::new(
            me,
            GossipConfig::default(),
            1,
            1,
            Box::new(crate::TestKeys(NodeId(1))),
        )
    }

    /// The message as it was encoded before entries and certificates were
    /// shared (`Vec`s and values, not `Arc`s).
    #[derive(serde::Serialize)]
    enum Before {
        Table {
            sender: Option<crate::table::Entry>,
            body: BeforeBody,
            certs: Vec<(NodeId, Vec<u8>)>,
        },
    }

    /// Its `Entries` body (the first variant, as `Entries` is today's).
    #[derive(serde::Serialize)]
    enum BeforeBody {
        Entries {
            network: String,
            entries: Vec<(crate::table::EntryKey, crate::table::Entry)>,
        },
    }

    #[test]
    fn shared_values_encode_as_before_so_daemons_of_both_kinds_understand_each_other() {
        use crate::table::{Entry, EntryKey};
        use shoal_mesh::observed::TableValue;
        let key = EntryKey {
            network: "net".into(),
            table: "vteps".into(),
            key: "k".into(),
        };
        let entry = Entry {
            owner: NodeId(7),
            version: 9 << 16,
            value: Some(TableValue::Networks(vec!["net".into()])),
            sig: vec![1, 2, 3],
        };
        let now = super::Message::Table {
            sender: Some(entry.clone().into()),
            body: super::TableMessage::Entries {
                network: "net".into(),
                entries: vec![(key.clone().into(), entry.clone().into())],
            },
            certs: vec![(NodeId(7), vec![4u8; 5].into())],
        };
        let before = Before::Table {
            sender: Some(entry.clone()),
            body: BeforeBody::Entries {
                network: "net".into(),
                entries: vec![(key, entry)],
            },
            certs: vec![(NodeId(7), vec![4u8; 5])],
        };
        let mut bytes = shoal_mesh::codec::encode(&now).unwrap();
        let mut old = shoal_mesh::codec::encode(&before).unwrap();
        // `Table` is the second variant of `Message`, the first of `Before`.
        assert_eq!(bytes[1], 1);
        assert_eq!(old[1], 0);
        old[1] = 1;
        assert_eq!(bytes, old);
        let back: super::Message = shoal_mesh::codec::decode(&bytes, 1 << 20).unwrap();
        bytes = shoal_mesh::codec::encode(&back).unwrap();
        assert_eq!(bytes, old);
    }

    proptest! {
        /// Whatever a peer sends, the node neither panics nor changes what
        /// it shows.
        #[test]
        fn hostile_bytes_are_rejected_without_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut g = node();
            let before = g.snapshot("net");
            let _ = g.handle_message(2, NodeId(2), &bytes);
            let mut framed = vec![shoal_mesh::codec::WIRE_VERSION];
            framed.extend_from_slice(&bytes);
            let _ = g.handle_message(3, NodeId(2), &framed);
            prop_assert_eq!(g.snapshot("net"), before);
        }
    }
}
