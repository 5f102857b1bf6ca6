//! The replicated desired state of the cluster (this issue: cluster info, CA,
//! join tokens and nodes; networks, services and tasks come later).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::NodeId;

/// A node's role. Managers vote in Raft; workers replicate as learners.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A Raft voter; can sign certificates and admit joiners.
    Manager,
    /// A non-voting Raft learner that runs tasks.
    Worker,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Manager => "manager",
            Role::Worker => "worker",
        })
    }
}

/// Whether the scheduler may place tasks on a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    /// Tasks may be placed here.
    #[default]
    Active,
    /// No new tasks; running ones stay.
    Pause,
    /// No tasks; running ones are moved away.
    Drain,
}

impl fmt::Display for Availability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Availability::Active => "active",
            Availability::Pause => "pause",
            Availability::Drain => "drain",
        })
    }
}

impl std::str::FromStr for Availability {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active" => Ok(Availability::Active),
            "pause" => Ok(Availability::Pause),
            "drain" => Ok(Availability::Drain),
            other => Err(format!(
                "unknown availability `{other}`: use active, pause or drain"
            )),
        }
    }
}

/// Cluster-wide facts fixed at `swarm init` (tokens change on rotation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// The cluster's ID (16 hex digits).
    pub id: String,
    /// Milliseconds since the Unix epoch when the cluster was created.
    pub created_at_ms: u64,
    /// The cluster CA certificate (DER). Public.
    pub ca_cert_der: Vec<u8>,
    /// SHA-256 of the CA certificate's DER, lowercase hex; part of every join token.
    pub ca_fingerprint: String,
    /// Join-token secrets, hashed and sealed.
    pub tokens: JoinSecrets,
    /// Manager-only secrets (the CA key), sealed with the managers' key.
    pub sealed_ca_key: Vec<u8>,
    /// Where networks without `--subnet` get their subnet from.
    pub default_addr_pool: Vec<crate::cidr::Ipv4Net>,
    /// The prefix length of those subnets.
    pub default_pool_mask: u8,
}

/// The join tokens as the store keeps them: a hash to check a joiner's
/// secret against, and the token sealed with the managers' key so that any
/// manager can show it again. Workers replicate this but cannot open it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinSecrets {
    /// SHA-256 (hex) of the worker token's secret.
    pub worker_hash: String,
    /// SHA-256 (hex) of the manager token's secret.
    pub manager_hash: String,
    /// The full worker token, sealed.
    pub worker_sealed: Vec<u8>,
    /// The full manager token, sealed.
    pub manager_sealed: Vec<u8>,
}

impl JoinSecrets {
    /// The hash of `role`'s secret.
    pub fn hash(&self, role: Role) -> &str {
        match role {
            Role::Manager => &self.manager_hash,
            Role::Worker => &self.worker_hash,
        }
    }

    /// The role whose secret hashes to `hash`, if any. Both hashes are
    /// compared in full whatever matches, in time that does not depend on
    /// where they differ.
    pub fn role_for_hash(&self, hash: &str) -> Option<Role> {
        let manager = constant_time_eq(hash.as_bytes(), self.manager_hash.as_bytes());
        let worker = constant_time_eq(hash.as_bytes(), self.worker_hash.as_bytes());
        match (manager, worker) {
            (true, _) => Some(Role::Manager),
            (false, true) => Some(Role::Worker),
            (false, false) => None,
        }
    }
}

/// Whether `a == b`, in time that depends on their lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A node of the cluster as the store knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// The node's ID (also its Raft ID).
    pub id: NodeId,
    /// The node's hostname (not necessarily unique).
    pub hostname: String,
    /// Manager or worker.
    pub role: Role,
    /// Scheduling availability.
    pub availability: Availability,
    /// User labels.
    pub labels: BTreeMap<String, String>,
    /// The address other nodes dial (`IP:PORT`, QUIC over UDP).
    pub addr: String,
    /// Milliseconds since the Unix epoch when the node joined.
    pub joined_at_ms: u64,
}

/// Why a node reference did not resolve to exactly one node.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// No node has that ID, ID prefix or hostname.
    #[error("no such node: `{0}` (use `shoal node ls` to see the nodes)")]
    NotFound(String),
    /// More than one node matches.
    #[error("`{reference}` is ambiguous: it matches nodes {matches}; use a longer ID prefix")]
    Ambiguous {
        /// What the user typed.
        reference: String,
        /// The IDs it matched, comma-separated.
        matches: String,
    },
}

/// The whole replicated state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Set by `swarm init`; `None` before.
    pub cluster: Option<ClusterInfo>,
    /// Every node of the cluster.
    pub nodes: BTreeMap<NodeId, Node>,
    /// Networks, by ID.
    pub networks: BTreeMap<crate::ids::NetworkId, crate::network::Network>,
    /// Services, by ID.
    pub services: BTreeMap<crate::ids::ServiceId, crate::service::Service>,
    /// Tasks, by ID.
    pub tasks: BTreeMap<crate::ids::TaskId, crate::task::Task>,
    /// Each node's address on the `ingress` network (its routing-mesh
    /// endpoint), allocated when it joins.
    pub ingress_addrs: BTreeMap<NodeId, std::net::Ipv4Addr>,
    /// Nodes removed from the swarm (`node rm`, `swarm leave`): their
    /// certificates are refused at the TLS handshake by every node, and
    /// their IDs are never admitted again.
    pub revoked: std::collections::BTreeSet<NodeId>,
    /// How long node certificates are valid, in milliseconds (`swarm
    /// update --cert-expiry`); nodes renew theirs at half that.
    pub cert_expiry_ms: u64,
    /// A CA rotation in progress (`swarm ca --rotate`).
    pub ca_rotation: Option<crate::ca::CaRotation>,
    /// Autolock (`swarm init --autolock`, `swarm update --autolock`): the
    /// unlock key, sealed with the managers' key; `None` when off.
    pub autolock: Option<Vec<u8>>,
    /// Everything added since: JSON inside the binary encoding, so that a
    /// field added to [`StateExt`] (with its default) reads older
    /// snapshots without a new format.
    #[serde(with = "crate::service::json_field")]
    pub ext: StateExt,
    /// Lookups derived from the fields above, never stored (see
    /// [`crate::index`]): change tasks, services and ingress addresses
    /// through `put_task`, `take_task`, `put_service`, `take_service`,
    /// `put_ingress_addr` and `take_ingress_addr`, which keep it true.
    #[serde(skip)]
    pub index: crate::index::StateIndex,
}

/// The part of the state stored as JSON (see [`ClusterState::ext`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StateExt {
    /// The CPU and memory each node reported (what the scheduler sets
    /// reservations against).
    pub node_resources: BTreeMap<NodeId, NodeResources>,
}

/// What a node has to run tasks with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeResources {
    /// CPUs, in billionths.
    pub nano_cpus: u64,
    /// Memory, in bytes.
    pub memory_bytes: u64,
}

/// Node certificates' validity unless set: 90 days, as in Docker Swarm.
pub const DEFAULT_CERT_EXPIRY_MS: u64 = 90 * 24 * 3_600_000;
/// The shortest validity the store takes (the daemon asks for at least an
/// hour unless configured for tests).
pub const MIN_CERT_EXPIRY_MS: u64 = 10_000;
/// The longest: ten years.
pub const MAX_CERT_EXPIRY_MS: u64 = 3_650 * 24 * 3_600_000;

/// [`ClusterState`] as snapshots before the deny list (`revoked`) and the
/// certificate validity stored them; read when a current decode fails, so
/// that old state dirs open.
#[derive(Deserialize)]
pub struct ClusterStateV1 {
    cluster: Option<ClusterInfo>,
    nodes: BTreeMap<NodeId, Node>,
    networks: BTreeMap<crate::ids::NetworkId, crate::network::Network>,
    services: BTreeMap<crate::ids::ServiceId, crate::legacy::ServiceV1>,
    tasks: BTreeMap<crate::ids::TaskId, crate::task::Task>,
    ingress_addrs: BTreeMap<NodeId, std::net::Ipv4Addr>,
}

impl From<ClusterStateV1> for ClusterState {
    fn from(v1: ClusterStateV1) -> Self {
        ClusterState {
            cluster: v1.cluster,
            nodes: v1.nodes,
            networks: v1.networks,
            services: crate::legacy::services(v1.services),
            tasks: v1.tasks,
            ingress_addrs: v1.ingress_addrs,
            revoked: Default::default(),
            cert_expiry_ms: DEFAULT_CERT_EXPIRY_MS,
            ca_rotation: None,
            autolock: None,
            ext: StateExt::default(),
            index: Default::default(),
        }
    }
}

/// [`ClusterState`] as snapshots before CA rotation and autolock stored
/// it; read when a current decode fails.
#[derive(Deserialize)]
pub struct ClusterStateV2 {
    cluster: Option<ClusterInfo>,
    nodes: BTreeMap<NodeId, Node>,
    networks: BTreeMap<crate::ids::NetworkId, crate::network::Network>,
    services: BTreeMap<crate::ids::ServiceId, crate::legacy::ServiceV1>,
    tasks: BTreeMap<crate::ids::TaskId, crate::task::Task>,
    ingress_addrs: BTreeMap<NodeId, std::net::Ipv4Addr>,
    revoked: std::collections::BTreeSet<NodeId>,
    cert_expiry_ms: u64,
}

impl From<ClusterStateV2> for ClusterState {
    fn from(v2: ClusterStateV2) -> Self {
        ClusterState {
            cluster: v2.cluster,
            nodes: v2.nodes,
            networks: v2.networks,
            services: crate::legacy::services(v2.services),
            tasks: v2.tasks,
            ingress_addrs: v2.ingress_addrs,
            revoked: v2.revoked,
            cert_expiry_ms: v2.cert_expiry_ms,
            ca_rotation: None,
            autolock: None,
            ext: StateExt::default(),
            index: Default::default(),
        }
    }
}

/// [`ClusterState`] as snapshots stored it before [`StateExt`], with
/// services of shape `S`; read when a current decode fails.
#[derive(Deserialize)]
pub struct BeforeExt<S> {
    cluster: Option<ClusterInfo>,
    nodes: BTreeMap<NodeId, Node>,
    networks: BTreeMap<crate::ids::NetworkId, crate::network::Network>,
    services: BTreeMap<crate::ids::ServiceId, S>,
    tasks: BTreeMap<crate::ids::TaskId, crate::task::Task>,
    ingress_addrs: BTreeMap<NodeId, std::net::Ipv4Addr>,
    revoked: std::collections::BTreeSet<NodeId>,
    cert_expiry_ms: u64,
    ca_rotation: Option<crate::ca::CaRotation>,
    autolock: Option<Vec<u8>>,
}

/// Snapshots before containers (services without container settings).
pub type ClusterStateV3 = BeforeExt<crate::legacy::ServiceV1>;
/// Snapshots before [`StateExt`].
pub type ClusterStateV4 = BeforeExt<crate::service::Service>;

/// [`ClusterState`] as snapshots stored it before services had
/// [`crate::service::ServiceExt`]; read when a current decode fails.
#[derive(Deserialize)]
pub struct ClusterStateV5 {
    cluster: Option<ClusterInfo>,
    nodes: BTreeMap<NodeId, Node>,
    networks: BTreeMap<crate::ids::NetworkId, crate::network::Network>,
    services: BTreeMap<crate::ids::ServiceId, crate::legacy::ServiceV2>,
    tasks: BTreeMap<crate::ids::TaskId, crate::task::Task>,
    ingress_addrs: BTreeMap<NodeId, std::net::Ipv4Addr>,
    revoked: std::collections::BTreeSet<NodeId>,
    cert_expiry_ms: u64,
    ca_rotation: Option<crate::ca::CaRotation>,
    autolock: Option<Vec<u8>>,
    #[serde(with = "crate::service::json_field")]
    ext: StateExt,
}

impl From<ClusterStateV5> for ClusterState {
    fn from(old: ClusterStateV5) -> Self {
        ClusterState {
            cluster: old.cluster,
            nodes: old.nodes,
            networks: old.networks,
            services: old
                .services
                .into_iter()
                .map(|(id, s)| (id, s.into()))
                .collect(),
            tasks: old.tasks,
            ingress_addrs: old.ingress_addrs,
            revoked: old.revoked,
            cert_expiry_ms: old.cert_expiry_ms,
            ca_rotation: old.ca_rotation,
            autolock: old.autolock,
            ext: old.ext,
            index: Default::default(),
        }
    }
}

impl<S: Into<crate::service::Service>> From<BeforeExt<S>> for ClusterState {
    fn from(old: BeforeExt<S>) -> Self {
        ClusterState {
            cluster: old.cluster,
            nodes: old.nodes,
            networks: old.networks,
            services: old
                .services
                .into_iter()
                .map(|(id, s)| (id, s.into()))
                .collect(),
            tasks: old.tasks,
            ingress_addrs: old.ingress_addrs,
            revoked: old.revoked,
            cert_expiry_ms: old.cert_expiry_ms,
            ca_rotation: old.ca_rotation,
            autolock: old.autolock,
            ext: StateExt::default(),
            index: Default::default(),
        }
    }
}

impl ClusterState {
    /// The managers, in ID order.
    pub fn managers(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values().filter(|n| n.role == Role::Manager)
    }

    /// Resolves a network reference: exact name, exact ID, or unique ID prefix.
    pub fn resolve_network(&self, reference: &str) -> Option<&crate::network::Network> {
        if let Some(n) = self.networks.values().find(|n| n.spec.name == reference) {
            return Some(n);
        }
        if let Some(n) = self.networks.get(reference) {
            return Some(n);
        }
        let mut prefixed = self
            .networks
            .values()
            .filter(|n| !reference.is_empty() && n.id.starts_with(reference));
        match (prefixed.next(), prefixed.next()) {
            (Some(n), None) => Some(n),
            _ => None,
        }
    }

    /// A task's name: `SERVICE.SLOT`, or `SERVICE.NODE` for global services.
    pub fn task_name(&self, t: &crate::task::Task) -> String {
        let service = self
            .services
            .get(&t.service_id)
            .map(|s| s.spec.name.as_str())
            .unwrap_or("?");
        match (t.slot, t.node) {
            (Some(slot), _) => format!("{service}.{slot}"),
            (None, Some(n)) => format!("{service}.{n}"),
            (None, None) => format!("{service}.{}", t.id),
        }
    }

    /// Resolves a service reference: exact name, exact ID, or unique ID prefix.
    pub fn resolve_service(&self, reference: &str) -> Option<&crate::service::Service> {
        if let Some(s) = self.services.values().find(|s| s.spec.name == reference) {
            return Some(s);
        }
        if let Some(s) = self.services.get(reference) {
            return Some(s);
        }
        let mut prefixed = self
            .services
            .values()
            .filter(|s| !reference.is_empty() && s.id.starts_with(reference));
        match (prefixed.next(), prefixed.next()) {
            (Some(s), None) => Some(s),
            _ => None,
        }
    }

    /// Resolves a node reference: a full ID, a unique ID prefix, or a unique
    /// hostname. An exact ID wins over everything, then an exact hostname,
    /// then a prefix.
    pub fn resolve_node(&self, reference: &str) -> Result<&Node, ResolveError> {
        if let Ok(id) = reference.parse::<NodeId>()
            && let Some(node) = self.nodes.get(&id)
        {
            return Ok(node);
        }
        let by_name: Vec<&Node> = self
            .nodes
            .values()
            .filter(|n| n.hostname == reference)
            .collect();
        let candidates = if by_name.is_empty() && !reference.is_empty() {
            let lower = reference.to_ascii_lowercase();
            self.nodes
                .values()
                .filter(|n| n.id.to_string().starts_with(&lower))
                .collect()
        } else {
            by_name
        };
        match candidates.as_slice() {
            [one] => Ok(one),
            [] => Err(ResolveError::NotFound(reference.to_owned())),
            many => Err(ResolveError::Ambiguous {
                reference: reference.to_owned(),
                matches: many
                    .iter()
                    .map(|n| n.id.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }
}
