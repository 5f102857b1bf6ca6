//! The deterministic state transition that every replica runs for every
//! committed log entry.
//!
//! `apply` validates before it changes anything: a command that fails leaves
//! the state exactly as it was, on every replica alike.

use serde::{Deserialize, Serialize};

use crate::bounds::{self, OutOfBounds};
use crate::cidr::Ipv4Net;
use crate::ids::{NetworkId, NodeId, ServiceId, TaskId};
use crate::legacy::{ServiceSpecV1, ServiceSpecV2};
use crate::network::{NetworkError, NetworkSpec, allocate, ingress_spec};
use crate::service::{
    ServiceError, ServiceSpec, allocate_service, reallocate_service, task_networks,
};
use crate::state::{
    Availability, ClusterInfo, ClusterState, JoinSecrets, Node, NodeResources, Role,
};
use crate::task::{DesiredState, Task, TaskReport, TaskState};

/// A change to the cluster state, as written to the Raft log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// `swarm init`: the cluster's facts and its first manager.
    Init {
        /// Cluster facts, CA and token secrets.
        cluster: ClusterInfo,
        /// The manager that ran `swarm init`.
        first: Node,
        /// The ID of the `ingress` network made with the swarm.
        ingress_id: NetworkId,
    },
    /// `network create`.
    CreateNetwork {
        /// Its new ID.
        id: NetworkId,
        /// What was asked.
        spec: NetworkSpec,
        /// Milliseconds since the epoch.
        created_at_ms: u64,
        /// Destinations a subnet from the default pool must not overlap:
        /// the routes of the node that took the request (so that an
        /// automatic subnet never shadows its underlay, a VPN…).
        avoid: Vec<Ipv4Net>,
    },
    /// `network rm`.
    RemoveNetwork {
        /// Its ID.
        id: NetworkId,
    },
    /// `service create` as logs before containers wrote it (read only).
    CreateServiceV1 {
        /// Its new ID.
        id: ServiceId,
        /// What was asked.
        spec: ServiceSpecV1,
        /// Milliseconds since the epoch.
        created_at_ms: u64,
    },
    /// `service rm`: frees its VIPs and ports, and removes its tasks.
    RemoveService {
        /// Its ID.
        id: ServiceId,
    },
    /// `service scale`: a new replica count.
    ScaleService {
        /// The service.
        id: ServiceId,
        /// Replicas.
        replicas: u64,
    },
    /// `service update` as logs before containers wrote it (read only).
    UpdateServiceV1 {
        /// The service.
        id: ServiceId,
        /// The whole new spec.
        spec: ServiceSpecV1,
        /// Replace the tasks even if nothing they run changed.
        force: bool,
        /// Milliseconds since the epoch.
        now_ms: u64,
    },
    /// The orchestrator adds a task (placed on `node`, or pending with `message`).
    AddTask {
        /// Its new ID.
        id: TaskId,
        /// The service.
        service_id: ServiceId,
        /// Replica slot.
        slot: Option<u64>,
        /// Where it runs, if anywhere fits.
        node: Option<NodeId>,
        /// Why it is pending.
        message: String,
        /// Restarts of its slot before it (see [`Task::restarts`]).
        restarts: u64,
        /// Milliseconds since the epoch.
        now_ms: u64,
    },
    /// The orchestrator places a pending task.
    AssignTask {
        /// The task.
        id: TaskId,
        /// The node.
        node: NodeId,
        /// Milliseconds since the epoch.
        now_ms: u64,
    },
    /// An executor reports a task's state.
    SetTaskState {
        /// The task.
        id: TaskId,
        /// The new state.
        state: TaskState,
        /// A message (error, reason).
        message: String,
        /// Exit code, when it exited.
        exit_code: Option<i32>,
        /// Milliseconds since the epoch.
        now_ms: u64,
    },
    /// The orchestrator wants a task stopped.
    ShutdownTask {
        /// The task.
        id: TaskId,
        /// Milliseconds since the epoch.
        now_ms: u64,
    },
    /// Forget a task (ended and no longer shown); frees its addresses.
    RemoveTask {
        /// The task.
        id: TaskId,
    },
    /// A joiner was admitted (its token checked, its certificate signed).
    AddNode(Node),
    /// `swarm join-token --rotate`: a new secret for one role.
    RotateToken {
        /// Whose token changes.
        role: Role,
        /// SHA-256 (hex) of the new secret.
        hash: String,
        /// The new token, sealed with the managers' key.
        sealed: Vec<u8>,
    },
    /// `node promote` / `node demote`.
    SetRole {
        /// The node.
        node: NodeId,
        /// Its new role.
        role: Role,
    },
    /// `node update`.
    UpdateNode {
        /// The node.
        node: NodeId,
        /// New availability, if given.
        availability: Option<Availability>,
        /// Labels to set.
        label_add: Vec<(String, String)>,
        /// Label keys to remove (each must exist).
        label_rm: Vec<String>,
    },
    /// `node rm`, `swarm leave`.
    RemoveNode(NodeId),
    /// `swarm init --force-new-cluster`: `keep` is now the only manager;
    /// every other manager becomes a worker (and must be promoted again).
    ForceNewCluster {
        /// The surviving manager.
        keep: NodeId,
    },
    /// A node restarted with a different advertise address.
    SetNodeAddr {
        /// The node.
        node: NodeId,
        /// Its new address.
        addr: String,
    },
    /// `swarm update --cert-expiry`: how long node certificates are valid.
    SetCertExpiry {
        /// Milliseconds.
        ms: u64,
    },
    /// Node `node` reports the state of a task assigned to it: the only
    /// task write a worker may make. `node` is the reporter as its
    /// certificate names it (set by the manager that takes the report,
    /// never by the reporter), and `apply` refuses a task assigned elsewhere.
    ReportTask {
        /// The reporting node.
        node: NodeId,
        /// What it reports.
        report: TaskReport,
    },
    /// `swarm ca --rotate`: a new CA, trusted beside the old one until
    /// every node has a certificate under it.
    StartCaRotation(crate::ca::CaRotation),
    /// Node `node` holds a certificate under the new CA (set from the
    /// reporter's certificate by the manager that takes the report).
    AdoptCa {
        /// The reporting node.
        node: NodeId,
        /// The new CA's fingerprint.
        fingerprint: String,
    },
    /// Every node has adopted the new CA: it replaces the old one.
    FinishCaRotation {
        /// The new CA's fingerprint.
        fingerprint: String,
    },
    /// `swarm update --autolock`: the unlock key sealed with the managers'
    /// key, or `None` to turn autolock off.
    SetAutolock {
        /// The sealed unlock key.
        sealed_unlock_key: Option<Vec<u8>>,
    },
    // New variants go last: a log entry names its variant by position.
    /// `service create` as logs before HTTP routes wrote it (read only).
    CreateServiceV2 {
        /// Its new ID.
        id: ServiceId,
        /// What was asked.
        spec: ServiceSpecV2,
        /// Milliseconds since the epoch.
        created_at_ms: u64,
    },
    /// `service update` as logs before HTTP routes wrote it (read only).
    UpdateServiceV2 {
        /// The service.
        id: ServiceId,
        /// The whole new spec.
        spec: ServiceSpecV2,
        /// Replace the tasks even if nothing they run changed.
        force: bool,
        /// Milliseconds since the epoch.
        now_ms: u64,
    },
    /// A node's CPU and memory, as it reports them (a worker may report
    /// its own; the leader writes the caller's ID).
    SetNodeResources {
        /// The node.
        node: NodeId,
        /// What it has.
        resources: NodeResources,
    },
    /// The orchestrator adds a global service's task for `node` that waits
    /// there, pending, until the node has room for what it reserves.
    AddPendingTask {
        /// Its new ID.
        id: TaskId,
        /// The service.
        service_id: ServiceId,
        /// The node it is for.
        node: NodeId,
        /// Why it waits.
        message: String,
        /// Restarts of its node's task before it.
        restarts: u64,
        /// Milliseconds since the epoch.
        now_ms: u64,
    },
    /// `service create`.
    CreateService {
        /// Its new ID.
        id: ServiceId,
        /// What was asked.
        spec: ServiceSpec,
        /// Milliseconds since the epoch.
        created_at_ms: u64,
    },
    /// `service update`: a new spec for an existing service.
    UpdateService {
        /// The service.
        id: ServiceId,
        /// The whole new spec.
        spec: ServiceSpec,
        /// Replace the tasks even if nothing they run changed.
        force: bool,
        /// Milliseconds since the epoch.
        now_ms: u64,
    },
}

/// What a successful command produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The change is applied.
    Done,
}

/// Why a command was refused. The state is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ApplyError {
    /// `Init` on a state that already has a cluster.
    #[error("this node is already part of a swarm (cluster {0})")]
    AlreadyInitialized(String),
    /// A command other than `Init` before `Init`.
    #[error("the swarm is not initialized")]
    NotInitialized,
    /// The node ID is not in the cluster.
    #[error("no such node: {0}")]
    UnknownNode(NodeId),
    /// `AddNode` with an ID already present, or of a removed node.
    #[error("node {0} is already a member, or was removed")]
    DuplicateNode(NodeId),
    /// Promoting a manager or demoting a worker.
    #[error("node {node} is already a {role}")]
    AlreadyRole {
        /// The node.
        node: NodeId,
        /// The role it already has.
        role: Role,
    },
    /// Demoting or removing the only manager.
    #[error("node {0} is the last manager of the swarm; promote another node first")]
    LastManager(NodeId),
    /// `label_rm` of a key the node does not have.
    #[error("node {node} has no label `{key}`")]
    NoSuchLabel {
        /// The node.
        node: NodeId,
        /// The missing key.
        key: String,
    },
    /// A label key that is empty.
    #[error("a label key must not be empty")]
    EmptyLabelKey,
    /// A network could not be created.
    #[error(transparent)]
    Network(#[from] NetworkError),
    /// No network with that ID.
    #[error("no such network: {0}")]
    NoSuchNetwork(String),
    /// A network still used by services.
    #[error("network `{network}` is in use by service `{service}`")]
    NetworkInUse {
        /// The network's name.
        network: String,
        /// A service using it.
        service: String,
    },
    /// A service could not be created.
    #[error(transparent)]
    Service(#[from] ServiceError),
    /// No service with that ID.
    #[error("no such service: {0}")]
    NoSuchService(String),
    /// No task with that ID.
    #[error("no such task: {0}")]
    NoSuchTask(String),
    /// `AddTask` for a slot that already has an active task.
    #[error("{slot} already has an active task ({task})")]
    SlotTaken {
        /// The service and slot (or node).
        slot: String,
        /// The task that holds it.
        task: String,
    },
    /// `AddTask` with an ID already present.
    #[error("task {0} already exists")]
    DuplicateTask(String),
    /// A state change that would go backwards or leave a terminal state.
    #[error("task {id} cannot go from {from:?} to {to:?}")]
    BadTransition {
        /// The task.
        id: String,
        /// Its state.
        from: TaskState,
        /// The asked state.
        to: TaskState,
    },
    /// A value over its bound (see [`crate::bounds`]).
    #[error(transparent)]
    OutOfBounds(#[from] OutOfBounds),
    /// A CA rotation command that does not fit the rotation running.
    #[error(transparent)]
    Ca(#[from] crate::ca::CaError),
    /// A node reported on a task that is not assigned to it.
    #[error("task {task} is not assigned to node {node}: a node reports only its own tasks")]
    NotAssigned {
        /// The task.
        task: String,
        /// The node that reported.
        node: NodeId,
    },
}

/// Gives node `node` its address on the `ingress` network (none if that
/// network is gone or full: the node then takes no part in the mesh).
fn give_ingress_addr(state: &mut ClusterState, node: NodeId) {
    let Some(ingress) = state.networks.values().find(|n| n.ingress) else {
        return;
    };
    if let Ok(ip) = state.free_address(ingress) {
        state.put_ingress_addr(node, ip);
    }
}

/// Applies `cmd` to `state`. Pure and deterministic: same state and command,
/// same result, on every replica. Each command has its handler; a handler
/// validates before it changes anything.
pub fn apply(state: &mut ClusterState, cmd: &Command) -> Result<Outcome, ApplyError> {
    if let Command::Init {
        cluster,
        first,
        ingress_id,
    } = cmd
    {
        return init(state, cluster, first, ingress_id);
    }
    if state.cluster.is_none() {
        return Err(ApplyError::NotInitialized);
    }
    match cmd {
        Command::Init { .. } => unreachable!("handled above"),
        Command::AddNode(node) => add_node(state, node),
        Command::RotateToken { role, hash, sealed } => rotate_token(state, role, hash, sealed),
        Command::SetRole { node, role } => set_role(state, node, role),
        Command::UpdateNode {
            node,
            availability,
            label_add,
            label_rm,
        } => update_node(state, node, availability, label_add, label_rm),
        Command::RemoveNode(node) => remove_node(state, node),
        Command::ForceNewCluster { keep } => force_new_cluster(state, keep),
        Command::CreateNetwork {
            id,
            spec,
            created_at_ms,
            avoid,
        } => create_network(state, id, spec, created_at_ms, avoid),
        Command::RemoveNetwork { id } => remove_network(state, id),
        Command::CreateService {
            id,
            spec,
            created_at_ms,
        } => create_service(state, id, spec, created_at_ms),
        Command::RemoveService { id } => remove_service(state, id),
        Command::ScaleService { id, replicas } => scale_service(state, id, replicas),
        Command::UpdateService {
            id,
            spec,
            force,
            now_ms,
        } => update_service(state, id, spec, force, now_ms),
        Command::SetNodeResources { node, resources } => set_node_resources(state, node, resources),
        Command::CreateServiceV1 {
            id,
            spec,
            created_at_ms,
        } => create_service(state, id, &spec.clone().into(), created_at_ms),
        Command::CreateServiceV2 {
            id,
            spec,
            created_at_ms,
        } => create_service(state, id, &spec.clone().into(), created_at_ms),
        Command::UpdateServiceV2 {
            id,
            spec,
            force,
            now_ms,
        } => update_service(state, id, &spec.clone().into(), force, now_ms),
        Command::UpdateServiceV1 {
            id,
            spec,
            force,
            now_ms,
        } => update_service(state, id, &spec.clone().into(), force, now_ms),
        Command::AddTask {
            id,
            service_id,
            slot,
            node,
            message,
            restarts,
            now_ms,
        } => add_task(
            state, id, service_id, slot, node, message, restarts, now_ms, false,
        ),
        Command::AddPendingTask {
            id,
            service_id,
            node,
            message,
            restarts,
            now_ms,
        } => add_task(
            state,
            id,
            service_id,
            &None,
            &Some(*node),
            message,
            restarts,
            now_ms,
            true,
        ),
        Command::AssignTask { id, node, now_ms } => assign_task(state, id, node, now_ms),
        Command::SetTaskState {
            id,
            state: to,
            message,
            exit_code,
            now_ms,
        } => set_task_state(state, id, to, message, exit_code, now_ms),
        Command::ShutdownTask { id, now_ms } => shutdown_task(state, id, now_ms),
        Command::RemoveTask { id } => remove_task(state, id),
        Command::SetNodeAddr { node, addr } => set_node_addr(state, node, addr),
        Command::ReportTask { node, report } => report_task(state, node, report),
        Command::SetCertExpiry { ms } => set_cert_expiry(state, *ms),
        Command::StartCaRotation(rotation) => crate::ca::start_rotation(state, rotation),
        Command::AdoptCa { node, fingerprint } => crate::ca::adopt(state, *node, fingerprint),
        Command::FinishCaRotation { fingerprint } => crate::ca::finish_rotation(state, fingerprint),
        Command::SetAutolock { sealed_unlock_key } => {
            crate::ca::set_autolock(state, sealed_unlock_key)
        }
    }
}

/// `swarm init`: the cluster's facts, its first manager and `ingress`.
fn init(
    state: &mut ClusterState,
    cluster: &ClusterInfo,
    first: &Node,
    ingress_id: &str,
) -> Result<Outcome, ApplyError> {
    if let Some(existing) = &state.cluster {
        return Err(ApplyError::AlreadyInitialized(existing.id.clone()));
    }
    let mut ingress = allocate(
        ingress_id,
        &ingress_spec(),
        &Default::default(),
        &cluster.default_addr_pool,
        cluster.default_pool_mask,
        &[],
        cluster.created_at_ms,
    )?;
    ingress.ingress = true;
    state.cluster = Some(cluster.clone());
    state.nodes.clear();
    state.nodes.insert(first.id, first.clone());
    state.networks.clear();
    state.networks.insert(ingress.id.clone(), ingress);
    state.ingress_addrs.clear();
    state.index = Default::default();
    state.revoked.clear();
    state.cert_expiry_ms = crate::state::DEFAULT_CERT_EXPIRY_MS;
    state.ca_rotation = None;
    state.autolock = None;
    give_ingress_addr(state, first.id);
    Ok(Outcome::Done)
}

/// Task `id`, to change.
fn task_mut<'a>(state: &'a mut ClusterState, id: &TaskId) -> Result<&'a mut Task, ApplyError> {
    state
        .tasks
        .get_mut(id)
        .ok_or_else(|| ApplyError::NoSuchTask(id.to_string()))
}

/// Service `id`.
fn service<'a>(
    state: &'a ClusterState,
    id: &ServiceId,
) -> Result<&'a crate::service::Service, ApplyError> {
    state
        .services
        .get(id)
        .ok_or_else(|| ApplyError::NoSuchService(id.to_string()))
}

/// A node joins.
fn add_node(state: &mut ClusterState, node: &Node) -> Result<Outcome, ApplyError> {
    bounds::check_hostname(&node.hostname)?;
    bounds::check_addr(&node.addr)?;
    bounds::check_node_labels(&node.labels)?;
    if state.nodes.contains_key(&node.id) || state.revoked.contains(&node.id) {
        return Err(ApplyError::DuplicateNode(node.id));
    }
    state.nodes.insert(node.id, node.clone());
    give_ingress_addr(state, node.id);
    Ok(Outcome::Done)
}

/// A join token's secret changes.
fn rotate_token(
    state: &mut ClusterState,
    role: &Role,
    hash: &str,
    sealed: &Vec<u8>,
) -> Result<Outcome, ApplyError> {
    let cluster = state.cluster.as_mut().ok_or(ApplyError::NotInitialized)?;

    let JoinSecrets {
        worker_hash,
        manager_hash,
        worker_sealed,
        manager_sealed,
    } = &mut cluster.tokens;
    let (h, s) = match role {
        Role::Manager => (manager_hash, manager_sealed),
        Role::Worker => (worker_hash, worker_sealed),
    };
    *h = hash.to_owned();
    s.clone_from(sealed);
    Ok(Outcome::Done)
}

/// `node promote` / `node demote`.
fn set_role(state: &mut ClusterState, node: &NodeId, role: &Role) -> Result<Outcome, ApplyError> {
    let current = state
        .nodes
        .get(node)
        .ok_or(ApplyError::UnknownNode(*node))?;
    if current.role == *role {
        return Err(ApplyError::AlreadyRole {
            node: *node,
            role: *role,
        });
    }
    if current.role == Role::Manager && state.managers().count() == 1 {
        return Err(ApplyError::LastManager(*node));
    }
    if let Some(n) = state.nodes.get_mut(node) {
        n.role = *role;
    }
    Ok(Outcome::Done)
}

/// `node update`: availability and labels.
fn update_node(
    state: &mut ClusterState,
    node: &NodeId,
    availability: &Option<Availability>,
    label_add: &Vec<(String, String)>,
    label_rm: &Vec<String>,
) -> Result<Outcome, ApplyError> {
    let current = state
        .nodes
        .get(node)
        .ok_or(ApplyError::UnknownNode(*node))?;
    if label_add.iter().any(|(k, _)| k.is_empty()) {
        return Err(ApplyError::EmptyLabelKey);
    }
    if let Some(key) = label_rm.iter().find(|k| !current.labels.contains_key(*k)) {
        return Err(ApplyError::NoSuchLabel {
            node: *node,
            key: key.clone(),
        });
    }
    let mut labels = current.labels.clone();
    for key in label_rm {
        labels.remove(key);
    }
    for (k, v) in label_add {
        labels.insert(k.clone(), v.clone());
    }
    bounds::check_node_labels(&labels)?;
    if let Some(n) = state.nodes.get_mut(node) {
        if let Some(a) = availability {
            n.availability = *a;
        }
        n.labels = labels;
    }
    Ok(Outcome::Done)
}

/// `node rm`.
fn remove_node(state: &mut ClusterState, node: &NodeId) -> Result<Outcome, ApplyError> {
    let current = state
        .nodes
        .get(node)
        .ok_or(ApplyError::UnknownNode(*node))?;
    if current.role == Role::Manager && state.managers().count() == 1 {
        return Err(ApplyError::LastManager(*node));
    }
    state.nodes.remove(node);
    state.take_ingress_addr(node);
    state.ext.node_resources.remove(node);
    state.revoked.insert(*node);
    Ok(Outcome::Done)
}

/// `swarm init --force-new-cluster`: only `keep` stays a manager.
fn force_new_cluster(state: &mut ClusterState, keep: &NodeId) -> Result<Outcome, ApplyError> {
    if !state.nodes.contains_key(keep) {
        return Err(ApplyError::UnknownNode(*keep));
    }
    for n in state.nodes.values_mut() {
        n.role = if n.id == *keep {
            Role::Manager
        } else {
            Role::Worker
        };
    }
    Ok(Outcome::Done)
}

/// `network create`.
fn create_network(
    state: &mut ClusterState,
    id: &NetworkId,
    spec: &NetworkSpec,
    created_at_ms: &u64,
    avoid: &[Ipv4Net],
) -> Result<Outcome, ApplyError> {
    let cluster = state.cluster.as_ref().ok_or(ApplyError::NotInitialized)?;
    bounds::check_id("network ID", id)?;
    bounds::check_network(spec)?;
    if let Some(n) = state.networks.get(id) {
        // The same command again (a write retried after its reply
        // was lost): already done.
        if n.spec == *spec && n.created_at_ms == *created_at_ms {
            return Ok(Outcome::Done);
        }
        return Err(NetworkError::Exists(id.to_string()).into());
    }
    let network = allocate(
        id,
        spec,
        &state.networks,
        &cluster.default_addr_pool,
        cluster.default_pool_mask,
        avoid,
        *created_at_ms,
    )?;
    state.networks.insert(id.to_owned(), network);
    Ok(Outcome::Done)
}

/// `network rm`, refused while a service or task uses it.
fn remove_network(state: &mut ClusterState, id: &NetworkId) -> Result<Outcome, ApplyError> {
    let network = state
        .networks
        .get(id)
        .ok_or_else(|| ApplyError::NoSuchNetwork(id.to_string()))?;
    // A service attached to it, or whose tasks (say, from before an
    // update detached it) still hold addresses on it.
    let user = state
        .services
        .values()
        .find(|s| s.spec.networks.iter().any(|a| a.network == *id) || s.vips.contains_key(id))
        .or_else(|| {
            state
                .holds_addresses(network)
                .then(|| state.tasks.values().find(|t| t.addresses.contains_key(id)))
                .flatten()
                .and_then(|t| state.services.get(&t.service_id))
        });
    if let Some(s) = user {
        return Err(ApplyError::NetworkInUse {
            network: network.spec.name.clone(),
            service: s.spec.name.clone(),
        });
    }
    state.networks.remove(id);
    Ok(Outcome::Done)
}

/// `service create`.
fn create_service(
    state: &mut ClusterState,
    id: &ServiceId,
    spec: &ServiceSpec,
    created_at_ms: &u64,
) -> Result<Outcome, ApplyError> {
    bounds::check_id("service ID", id)?;
    bounds::check_service(spec)?;
    if let Some(svc) = state.services.get(id) {
        if svc.spec == *spec && svc.created_at_ms == *created_at_ms {
            return Ok(Outcome::Done);
        }
        return Err(ServiceError::Exists(id.to_string()).into());
    }
    let service = allocate_service(id, spec, state, *created_at_ms)?;
    state.put_service(service);
    Ok(Outcome::Done)
}

/// `service rm`: the service and its tasks.
fn remove_service(state: &mut ClusterState, id: &ServiceId) -> Result<Outcome, ApplyError> {
    if state.take_service(id).is_none() {
        return Err(ApplyError::NoSuchService(id.to_string()));
    }
    Ok(Outcome::Done)
}

/// `service scale`.
fn scale_service(
    state: &mut ClusterState,
    id: &ServiceId,
    replicas: &u64,
) -> Result<Outcome, ApplyError> {
    let svc = state
        .services
        .get_mut(id)
        .ok_or_else(|| ApplyError::NoSuchService(id.to_string()))?;
    match svc.spec.mode {
        crate::service::ServiceMode::Replicated(_) => {
            crate::service::check_replicas(*replicas)?;
            svc.spec.mode = crate::service::ServiceMode::Replicated(*replicas);
        }
        crate::service::ServiceMode::Global => {
            return Err(ServiceError::Invalid(format!(
                "service `{}` is global: it runs one task per node and cannot be scaled",
                svc.spec.name
            ))
            .into());
        }
    }
    Ok(Outcome::Done)
}

/// `service update`.
fn update_service(
    state: &mut ClusterState,
    id: &ServiceId,
    spec: &ServiceSpec,
    force: &bool,
    now_ms: &u64,
) -> Result<Outcome, ApplyError> {
    bounds::check_service(spec)?;
    let previous = service(state, id)?;
    let service = reallocate_service(previous, spec, state, *force, *now_ms)?;
    state.put_service(service);
    Ok(Outcome::Done)
}

/// The orchestrator adds a task, with its addresses.
#[allow(clippy::too_many_arguments)] // the fields of `Command::AddTask`, one each, and pending
fn add_task(
    state: &mut ClusterState,
    id: &TaskId,
    service_id: &ServiceId,
    slot: &Option<u64>,
    node: &Option<NodeId>,
    message: &str,
    restarts: &u64,
    now_ms: &u64,
    pending: bool,
) -> Result<Outcome, ApplyError> {
    bounds::check_id("task ID", id)?;
    let service = service(state, service_id)?;
    if state.tasks.contains_key(id) {
        return Err(ApplyError::DuplicateTask(id.to_string()));
    }
    // One active task per slot (per node for global services), even
    // if two orchestrators (an old and a new leader) both fill it.
    let taken = state.tasks_of(service_id).find(|t| {
        t.is_active()
            && match slot {
                Some(s) => t.slot == Some(*s),
                None => t.slot.is_none() && node.is_some() && t.node == *node,
            }
    });
    if let Some(t) = taken {
        return Err(ApplyError::SlotTaken {
            slot: format!(
                "{} {}",
                service.spec.name,
                slot.map_or_else(
                    || format!("on {}", node.map(|n| n.to_string()).unwrap_or_default()),
                    |s| format!("slot {s}")
                )
            ),
            task: t.id.to_string(),
        });
    }
    if let Some(n) = node
        && !state.nodes.contains_key(n)
    {
        return Err(ApplyError::UnknownNode(*n));
    }
    let mut addresses = std::collections::BTreeMap::new();
    for net in task_networks(service) {
        let network = state
            .networks
            .get(&net)
            .ok_or_else(|| ApplyError::NoSuchNetwork(net.to_string()))?;
        let ip = state.free_address(network).map_err(ServiceError::from)?;
        addresses.insert(net, ip);
    }
    state.put_task(Task {
        id: id.clone(),
        service_id: service_id.clone(),
        slot: *slot,
        node: *node,
        desired: DesiredState::Running,
        state: if node.is_some() && !pending {
            TaskState::Assigned
        } else {
            TaskState::Pending
        },
        addresses,
        message: message.to_owned(),
        exit_code: None,
        spec_version: service.version,
        restarts: *restarts,
        created_at_ms: *now_ms,
        updated_at_ms: *now_ms,
    });
    Ok(Outcome::Done)
}

/// The orchestrator places a pending task.
fn assign_task(
    state: &mut ClusterState,
    id: &TaskId,
    node: &NodeId,
    now_ms: &u64,
) -> Result<Outcome, ApplyError> {
    if !state.nodes.contains_key(node) {
        return Err(ApplyError::UnknownNode(*node));
    }
    let t = task_mut(state, id)?;
    if t.state != TaskState::Pending {
        return Err(ApplyError::BadTransition {
            id: id.to_string(),
            from: t.state,
            to: TaskState::Assigned,
        });
    }
    state.update_task(id, |t| {
        t.node = Some(*node);
        t.state = TaskState::Assigned;
        t.message.clear();
        t.updated_at_ms = *now_ms;
    });
    Ok(Outcome::Done)
}

/// An executor reports a task's state; it only moves forward.
/// Node certificates' validity, within bounds.
fn set_cert_expiry(state: &mut ClusterState, ms: u64) -> Result<Outcome, ApplyError> {
    use crate::state::{MAX_CERT_EXPIRY_MS, MIN_CERT_EXPIRY_MS};
    if !(MIN_CERT_EXPIRY_MS..=MAX_CERT_EXPIRY_MS).contains(&ms) {
        return Err(OutOfBounds {
            what: "--cert-expiry".into(),
            problem: format!(
                "{ms} ms is out of bounds: use {} s to {} days",
                MIN_CERT_EXPIRY_MS / 1000,
                MAX_CERT_EXPIRY_MS / 86_400_000
            ),
        }
        .into());
    }
    state.cert_expiry_ms = ms;
    Ok(Outcome::Done)
}

/// A node's report on its own task: a state change, only from the node the
/// task is assigned to.
/// Most CPUs a node may report (4096).
pub const MAX_NODE_NANO_CPUS: u64 = 4096 * 1_000_000_000;
/// Most memory a node may report (64 TiB).
pub const MAX_NODE_MEMORY: u64 = 64 << 40;

fn set_node_resources(
    state: &mut ClusterState,
    node: &NodeId,
    r: &NodeResources,
) -> Result<Outcome, ApplyError> {
    if !state.nodes.contains_key(node) {
        return Err(ApplyError::UnknownNode(*node));
    }
    if r.nano_cpus > MAX_NODE_NANO_CPUS || r.memory_bytes > MAX_NODE_MEMORY {
        return Err(OutOfBounds {
            what: "a node's resources".into(),
            problem: format!(
                "{} nano-CPUs and {} bytes, at most {MAX_NODE_NANO_CPUS} and {MAX_NODE_MEMORY}",
                r.nano_cpus, r.memory_bytes
            ),
        }
        .into());
    }
    state.ext.node_resources.insert(*node, *r);
    Ok(Outcome::Done)
}

fn report_task(
    state: &mut ClusterState,
    node: &NodeId,
    r: &TaskReport,
) -> Result<Outcome, ApplyError> {
    if r.message.len() > TaskReport::MAX_MESSAGE {
        return Err(OutOfBounds {
            what: "a task report's message".into(),
            problem: format!(
                "{} bytes long, at most {} allowed",
                r.message.len(),
                TaskReport::MAX_MESSAGE
            ),
        }
        .into());
    }
    let t = task_mut(state, &r.id)?;
    if t.node != Some(*node) {
        return Err(ApplyError::NotAssigned {
            task: r.id.to_string(),
            node: *node,
        });
    }
    set_task_state(state, &r.id, &r.state, &r.message, &r.exit_code, &r.now_ms)
}

fn set_task_state(
    state: &mut ClusterState,
    id: &TaskId,
    to: &TaskState,
    message: &str,
    exit_code: &Option<i32>,
    now_ms: &u64,
) -> Result<Outcome, ApplyError> {
    let t = task_mut(state, id)?;
    if t.state.is_terminal() || *to < t.state {
        return Err(ApplyError::BadTransition {
            id: id.to_string(),
            from: t.state,
            to: *to,
        });
    }
    t.state = *to;
    message.clone_into(&mut t.message);
    t.exit_code = *exit_code;
    t.updated_at_ms = *now_ms;
    Ok(Outcome::Done)
}

/// The orchestrator asks a task to stop.
fn shutdown_task(
    state: &mut ClusterState,
    id: &TaskId,
    now_ms: &u64,
) -> Result<Outcome, ApplyError> {
    let t = task_mut(state, id)?;
    if t.desired == DesiredState::Shutdown {
        return Ok(Outcome::Done);
    }
    t.desired = DesiredState::Shutdown;
    t.updated_at_ms = *now_ms;
    if matches!(t.state, TaskState::New | TaskState::Pending) {
        t.state = TaskState::Shutdown;
    }
    Ok(Outcome::Done)
}

/// The orchestrator forgets an ended task.
fn remove_task(state: &mut ClusterState, id: &TaskId) -> Result<Outcome, ApplyError> {
    if state.take_task(id).is_none() {
        return Err(ApplyError::NoSuchTask(id.to_string()));
    }
    Ok(Outcome::Done)
}

/// A node's address changes.
fn set_node_addr(
    state: &mut ClusterState,
    node: &NodeId,
    addr: &str,
) -> Result<Outcome, ApplyError> {
    bounds::check_addr(addr)?;
    let n = state
        .nodes
        .get_mut(node)
        .ok_or(ApplyError::UnknownNode(*node))?;
    addr.clone_into(&mut n.addr);
    Ok(Outcome::Done)
}

#[cfg(test)]
#[path = "apply_test.rs"]
mod tests;
