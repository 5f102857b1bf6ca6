//! What the daemon answers, typed: the daemon fills these, the CLI reads
//! them back, and `--format json` prints them. Field names are stable (they
//! are what scripts read: `docs/control-plane.md` lists them).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shoal_mesh::service::{EndpointMode, PublishedPort};
use shoal_mesh::task::{DesiredState, TaskState};

/// A service as `service ls` and `service inspect` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceView {
    /// Its ID.
    pub id: String,
    /// Its name.
    pub name: String,
    /// `replicated` or `global`.
    pub mode: String,
    /// Tasks it should run.
    pub replicas: u64,
    /// Tasks running.
    pub running: u64,
    /// Running tasks of the current spec version.
    pub up_to_date: u64,
    /// Its spec version.
    pub version: u64,
    /// How the last update goes, if there was one.
    pub update_status: Option<String>,
    /// What its tasks run.
    pub command: Vec<String>,
    /// The image and container settings (`null` for host programs,
    /// `--runtime process`).
    pub container: Option<shoal_mesh::service::ContainerSpec>,
    /// `vip` or `dnsrr`.
    pub endpoint_mode: EndpointMode,
    /// Its networks, by name, with aliases.
    pub networks: Vec<AttachmentView>,
    /// Its VIP on each network, by network name.
    pub vips: BTreeMap<String, String>,
    /// Its published ports.
    pub ports: Vec<PublishedPort>,
    /// Its routes through the L7 mesh (`--http-route`).
    pub http_routes: Vec<shoal_mesh::route::HttpRoute>,
    /// Placement constraints, as written.
    pub constraints: Vec<String>,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// `--restart-*`.
    pub restart_policy: RestartView,
    /// `--update-*`.
    pub update_config: UpdateView,
    /// When it was created (ms since the epoch).
    pub created_at_ms: u64,
    /// When its spec last changed.
    pub updated_at_ms: u64,
    /// `service inspect` on a node with a data plane: running tasks that
    /// new connections reach (gossip has them, this node balances to them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<u64>,
}

/// A network a service is on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttachmentView {
    /// The network's name.
    pub network: String,
    /// The service's extra names there.
    pub aliases: Vec<String>,
}

/// A service's restart policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestartView {
    /// `none`, `on-failure` or `any`.
    pub condition: String,
    /// Restarts per slot before giving up (0: no limit).
    pub max_attempts: u64,
    /// Wait before a restart.
    pub delay_ms: u64,
}

/// A service's rolling-update settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateView {
    /// Tasks replaced at once (0: all).
    pub parallelism: u64,
    /// Wait between batches.
    pub delay_ms: u64,
}

/// A task as `service ps` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    /// Its ID.
    pub id: String,
    /// `SERVICE.SLOT` (or `SERVICE.NODE`).
    pub name: String,
    /// Its node's hostname, once placed.
    pub node: Option<String>,
    /// Its node's ID, once placed.
    pub node_id: Option<String>,
    /// What the orchestrator wants of it.
    pub desired_state: DesiredState,
    /// What its executor last reported.
    pub state: TaskState,
    /// Why it is pending, or how it ended.
    pub message: String,
    /// The message when it failed or is pending, else empty.
    pub error: String,
    /// A running task's health, when it reported one (`healthy`,
    /// `unhealthy`); null otherwise.
    pub health: Option<String>,
    /// The service spec version it runs.
    pub spec_version: u64,
    /// Restarts of its slot before it.
    pub restarts: u64,
    /// Its exit status, once exited.
    pub exit_code: Option<i32>,
    /// Its address on each network, by network name.
    pub addresses: BTreeMap<String, String>,
    /// When its state last changed.
    pub updated_at_ms: u64,
}

/// Output of one task, from a byte offset (`service logs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskLogView {
    /// The task's ID.
    pub task: String,
    /// Its name.
    pub name: String,
    /// Its node's hostname.
    pub node: Option<String>,
    /// The offset to ask from next time.
    pub next: u64,
    /// The output read.
    pub text: String,
}

/// A network as `network ls` and `network inspect` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkView {
    /// Its ID.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its driver.
    pub driver: shoal_mesh::network::Driver,
    /// `swarm` (overlay) or `local`.
    pub scope: String,
    /// Its subnets.
    pub subnets: Vec<String>,
    /// Their gateways.
    pub gateways: Vec<String>,
    /// `--ip-range`.
    pub ip_range: Option<String>,
    /// Reserved addresses.
    pub aux_addresses: BTreeMap<String, std::net::Ipv4Addr>,
    /// Its VXLAN ID (overlay).
    pub vni: Option<u32>,
    /// Its MTU, when set.
    pub mtu: Option<u32>,
    /// Always false: refused at creation.
    pub attachable: bool,
    /// No egress.
    pub internal: bool,
    /// The routing mesh's network.
    pub ingress: bool,
    /// `-o` options.
    pub options: BTreeMap<String, String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// When it was created.
    pub created_at_ms: u64,
}

/// A node as `node ls` and `node inspect` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    /// Node ID.
    pub id: String,
    /// Hostname.
    pub hostname: String,
    /// `manager` or `worker`.
    pub role: shoal_mesh::Role,
    /// `ready`, `down` or `unknown`, as seen from the answering node.
    pub status: crate::daemon::liveness::NodeStatus,
    /// `active`, `pause` or `drain`.
    pub availability: shoal_mesh::Availability,
    /// `leader`, `reachable`, `unreachable`; null for workers.
    pub manager_status: Option<String>,
    /// The address other nodes dial.
    pub addr: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Gossip's liveness view (`alive`, `suspect`, `dead`, `left`; null if unknown).
    pub gossip: Option<shoal_gossip::MemberState>,
    /// How often the answering node saw it go down since that node's
    /// daemon started (a node that keeps restarting counts up).
    #[serde(default)]
    pub downs: u32,
    /// Whether this is the answering node.
    #[serde(rename = "self")]
    pub is_self: bool,
    /// When the node joined (ms since the epoch).
    pub joined_at_ms: u64,
    /// Its CPUs and memory as it reported them (`nano_cpus`,
    /// `memory_bytes`), and what its tasks reserve of them; null until
    /// reported.
    pub resources: Option<shoal_mesh::NodeResources>,
    /// What the active tasks placed on it reserve.
    pub reserved: shoal_mesh::NodeResources,
}

/// A node changed or removed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeChange {
    /// Its ID.
    pub id: String,
    /// What happened, in words (`node h2 promoted to a manager`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `swarm init`: the new swarm, and its join tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwarmInitView {
    /// This node's ID.
    pub node_id: String,
    /// The swarm's ID.
    pub cluster_id: String,
    /// What other nodes dial.
    pub advertise_addr: String,
    /// The token workers join with.
    pub worker_token: String,
    /// The token managers join with.
    pub manager_token: String,
    /// The unlock key, with `--autolock`.
    #[serde(default)]
    pub unlock_key: Option<String>,
}

/// `swarm unlock-key`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnlockKeyView {
    /// The key (`SWMKEY-1-…`).
    pub unlock_key: String,
    /// Whether it was just made (`--rotate`).
    pub rotated: bool,
}

/// `swarm update`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwarmUpdatedView {
    /// What changed, in words.
    pub message: String,
    /// The unlock key, when autolock is on after the update.
    pub unlock_key: Option<String>,
}

/// `swarm join`: this node in the swarm it joined.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinedView {
    /// This node's ID.
    pub node_id: String,
    /// The swarm's ID.
    pub cluster_id: String,
    /// The role the token gave.
    pub role: shoal_mesh::Role,
    /// What other nodes dial.
    pub advertise_addr: String,
}

/// `swarm join-token`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinTokenView {
    /// Whose token.
    pub role: shoal_mesh::Role,
    /// The token.
    pub token: String,
    /// This manager's address, to join through.
    pub manager_addr: String,
    /// Whether it was just rotated.
    pub rotated: bool,
}

/// `swarm ca`: the cluster CA, and a rotation's progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaView {
    /// The CA certificate, PEM.
    pub ca_cert_pem: String,
    /// Its SHA-256 fingerprint (what join tokens pin).
    pub ca_fingerprint: String,
    /// A rotation in progress.
    pub rotation: Option<CaRotationView>,
}

/// A CA rotation's progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaRotationView {
    /// The new CA's fingerprint.
    pub ca_fingerprint: String,
    /// When it started, ms since the epoch.
    pub started_at_ms: u64,
    /// Nodes in the swarm.
    pub nodes: usize,
    /// Nodes with a certificate under the new CA.
    pub adopted: usize,
    /// The nodes it waits for: `ID (hostname)`.
    pub pending: Vec<String>,
}

/// What was done, in words (`swarm init --force-new-cluster`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Done {
    /// This node's ID.
    pub node_id: String,
    /// What happened.
    pub message: String,
}

/// Something removed or changed, by ID and name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Named {
    /// Its ID.
    pub id: String,
    /// Its name.
    pub name: String,
}

/// A table cell for a value that serializes to a string or a number (an
/// enum's serde name, an ID).
pub fn text<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(serde_json::Value::Null) | Err(_) => String::new(),
        Ok(other) => other.to_string(),
    }
}

/// An image in this node's containerd (`image ls`, `image load`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageView {
    /// Its normalised name.
    pub name: String,
    /// Its manifest's digest.
    pub digest: String,
    /// Its manifest's media type.
    pub media_type: String,
}
