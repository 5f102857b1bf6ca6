//! A one-voter store on disk for this crate's tests and benches, and those
//! of the crates built on it: no network, the cluster initialized. Nothing
//! here runs a swarm.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use shoal_mesh::{Availability, Command, Node, NodeId, Role};

use crate::{
    LogStore, Network, Raft, RaftRpc, RaftRpcReply, RaftTransport, StateHandle, TransportError,
};

/// A transport that reaches no one: a node alone, or one that is only fed.
#[derive(Clone)]
pub struct Nowhere;

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
            reason: "no network here".into(),
        })
    }
}

/// A node's store in `dir`: its Raft (ID `id`, sealed at rest with a key
/// made of `id`), log and applied state.
pub struct Store {
    /// The Raft node.
    pub raft: Raft,
    /// Its log.
    pub log: LogStore,
    /// Its applied state.
    pub state: StateHandle,
}

/// Opens node `id`'s store in `dir`, with no network.
pub async fn open(id: u64, dir: &std::path::Path, config: openraft::Config) -> Store {
    let (log, sm) =
        crate::open(dir, crate::AtRest::with_key(&[id as u8; 32])).expect("open the store");
    let state = sm.handle();
    let config = Arc::new(config.validate().expect("a valid Raft config"));
    let raft = Raft::new(id, config, Network::new(Nowhere), log.clone(), sm)
        .await
        .expect("start Raft");
    Store { raft, log, state }
}

/// Node 1 in `dir`, the only voter and leader, with the swarm initialized
/// (cluster `cluster`).
pub async fn leader(dir: &std::path::Path, config: openraft::Config, cluster: &str) -> Store {
    let s = open(1, dir, config).await;
    s.raft
        .initialize(BTreeMap::from([(1, BasicNode::new("127.0.0.1:1"))]))
        .await
        .expect("initialize Raft");
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
            cluster: shoal_mesh::fixtures::cluster_info(cluster),
            first,
            ingress_id: "ingress".into(),
        })
        .await
        .expect("init the swarm");
    s
}
