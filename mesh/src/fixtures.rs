//! Sample values for tests and benches, this crate's and those of the
//! crates built on it: a cluster's facts without keys or secrets, and
//! nodes. Nothing here is used to run a swarm.

use std::collections::BTreeMap;

use crate::ids::NodeId;
use crate::state::{Availability, ClusterInfo, JoinSecrets, Node, Role};

/// Cluster `id`'s facts: no CA, no token secrets, the default address pool
/// 10.0.0.0/8 carved in /24s.
pub fn cluster_info(id: &str) -> ClusterInfo {
    ClusterInfo {
        id: id.to_owned(),
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
        default_addr_pool: crate::cidr::Ipv4Net::new(std::net::Ipv4Addr::new(10, 0, 0, 0), 8)
            .into_iter()
            .collect(),
        default_pool_mask: 24,
    }
}

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

/// An initialized swarm (cluster `c`) of these nodes and roles, node `id`
/// named `n<id>` at `127.0.0.<id>:2377`.
pub fn swarm(nodes: &[(u64, Role)]) -> crate::ClusterState {
    let mut s = crate::ClusterState {
        cluster: Some(cluster_info("c")),
        ..Default::default()
    };
    for (id, role) in nodes {
        s.nodes.insert(
            NodeId(*id),
            Node {
                id: NodeId(*id),
                hostname: format!("n{id}"),
                role: *role,
                availability: Availability::Active,
                labels: BTreeMap::new(),
                addr: format!("127.0.0.{id}:2377"),
                joined_at_ms: 0,
            },
        );
    }
    s
}

/// Decodes `bytes` as `T`, as they are and behind a valid version byte
/// (so that the body is reached): for property tests of decoders, which
/// only ask that this returns.
pub fn decode_hostile<T: serde::de::DeserializeOwned>(bytes: &[u8], limit: usize) {
    let mut framed = vec![crate::codec::WIRE_VERSION];
    framed.extend_from_slice(bytes);
    let _ = crate::codec::decode::<T>(bytes, limit);
    let _ = crate::codec::decode::<T>(&framed, limit);
}
