//! Fixtures shared by this crate's tests.

use std::collections::BTreeMap;

use crate::apply::{Command, apply};
use crate::ids::NodeId;
use crate::network::{Driver, NetworkSpec};
use crate::state::{Availability, ClusterInfo, ClusterState, JoinSecrets, Node, Role};

/// Node `id` (`h<id>`, at `192.168.0.<id>:2377`); node 1 is a manager,
/// the others workers.
pub fn node(id: u64) -> Node {
    Node {
        id: NodeId(id),
        hostname: format!("h{id}"),
        role: if id == 1 { Role::Manager } else { Role::Worker },
        availability: Availability::Active,
        labels: BTreeMap::new(),
        addr: format!("192.168.0.{id}:2377"),
        joined_at_ms: 0,
    }
}

/// A swarm of `nodes` nodes (pool 10.0.0.0/8 in /24s, ingress ID `ing`)
/// with an overlay network `web` (ID `web`).
pub fn swarm(nodes: u64) -> ClusterState {
    let mut s = ClusterState::default();
    let cluster = ClusterInfo {
        id: "c".into(),
        created_at_ms: 0,
        ca_cert_der: vec![],
        ca_fingerprint: String::new(),
        tokens: JoinSecrets {
            worker_hash: String::new(),
            manager_hash: String::new(),
            worker_sealed: vec![],
            manager_sealed: vec![],
        },
        sealed_ca_key: vec![],
        default_addr_pool: vec!["10.0.0.0/8".parse().unwrap()],
        default_pool_mask: 24,
    };
    let init = Command::Init {
        cluster,
        first: node(1),
        ingress_id: "ing".into(),
    };
    apply(&mut s, &init).unwrap();
    for i in 2..=nodes {
        apply(&mut s, &Command::AddNode(node(i))).unwrap();
    }
    let web = Command::CreateNetwork {
        id: "web".into(),
        spec: NetworkSpec::new("web", Driver::Overlay),
        created_at_ms: 0,
        avoid: vec![],
    };
    apply(&mut s, &web).unwrap();
    s
}
