//! Observed state: what the gossip tables carry about live endpoints and
//! tunnel endpoints. The data plane programs what these say, intersected
//! with the store's desired state.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::ids::NodeId;

/// A live endpoint on some node (`endpoints` table; key: endpoint ID).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EndpointRecord {
    /// Its address on the network.
    pub ip: IpAddr,
    /// Its MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Its name (the task's name).
    pub name: String,
    /// The service it belongs to, if any.
    pub service_id: Option<String>,
    /// That service's name.
    pub service_name: Option<String>,
    /// DNS aliases on this network.
    pub aliases: Vec<String>,
    /// The node that hosts it.
    pub owner: NodeId,
    /// The hosting node's underlay (VTEP) address.
    pub vtep: IpAddr,
}

/// What a record of the `endpoints` table stands for, which names its key:
/// a task's endpoint (key: the task ID) or a node's own address on the
/// routing mesh (key: `node-<node ID>`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EndpointKey {
    /// A task's endpoint.
    Task(crate::ids::TaskId),
    /// A node's routing-mesh address.
    Node(NodeId),
}

impl EndpointKey {
    /// The key as the `endpoints` table writes it.
    pub fn parse(text: &str) -> Self {
        match text.strip_prefix("node-").and_then(|n| n.parse().ok()) {
            Some(n) => EndpointKey::Node(n),
            None => EndpointKey::Task(text.into()),
        }
    }
}

/// Whether the store vouches for endpoint record `rec`, stored under `key`
/// on network `net` by node `writer` (the gossip entry's signed owner): a
/// task of the store on `writer`, with that address, service and name; or
/// `writer`'s own address on the routing mesh. Whatever else a node
/// publishes (another service's name, another task's address) is not
/// taken. Pure.
pub fn vouched(
    state: &crate::state::ClusterState,
    net: &str,
    key: &str,
    writer: NodeId,
    rec: &EndpointRecord,
) -> bool {
    if rec.owner != writer {
        return false;
    }
    match EndpointKey::parse(key) {
        EndpointKey::Node(n) => {
            n == writer
                && rec.service_id.is_none()
                && state.ingress_addrs.get(&n).map(|ip| IpAddr::V4(*ip)) == Some(rec.ip)
        }
        EndpointKey::Task(id) => state.tasks.get(&id).is_some_and(|t| {
            t.node == Some(writer)
                && rec.service_id.as_deref() == Some(t.service_id.as_str())
                && t.addresses.get(net).map(|ip| IpAddr::V4(*ip)) == Some(rec.ip)
                && rec.name == state.task_name(t)
        }),
    }
}

impl std::fmt::Display for EndpointKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndpointKey::Task(id) => f.write_str(id),
            EndpointKey::Node(n) => write!(f, "node-{n}"),
        }
    }
}

/// A node's tunnel endpoint on a network (`vteps` table; key: node ID).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VtepRecord {
    /// The node.
    pub node: NodeId,
    /// Its underlay address.
    pub addr: IpAddr,
}

/// A value in a gossip table.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TableValue {
    /// An `endpoints` entry.
    Endpoint(EndpointRecord),
    /// A `vteps` entry.
    Vtep(VtepRecord),
    /// The networks a node is attached to (the cluster-wide `networks` table).
    Networks(Vec<String>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_keys_name_tasks_by_id_and_nodes_apart() {
        assert_eq!(EndpointKey::Task("t1".into()).to_string(), "t1");
        let node = EndpointKey::Node(NodeId(0xab)).to_string();
        assert_eq!(node, format!("node-{}", NodeId(0xab)));
        assert_ne!(node, NodeId(0xab).to_string(), "never a task ID's form");
    }
}
