//! Services in the store, and what `apply` allocates for them: a virtual IP
//! on each attached network (in `vip` mode), the `ingress` network when
//! ports are published through the routing mesh, and the published ports.
//! Everything allocated lives in the [`Service`] record, so removing the
//! service frees it.
//!
//! Tasks, the orchestrator and the executor build on this (issue 4).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::constraint::Constraint;
use crate::ids::{NetworkId, ServiceId};
use crate::ipam::{AllocError, allocate_port};
use crate::state::ClusterState;

/// How a port is published.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    /// On every node, through the routing mesh.
    Ingress,
    /// Only on nodes running a task, straight to it.
    Host,
}

/// `tcp` or `udp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// `tcp` or `udp`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// One `--publish`, as asked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    /// Ingress or host.
    pub mode: PublishMode,
    /// The published port; one from 30000–32767 if `None` (ingress only).
    pub published: Option<u16>,
    /// The port inside the task.
    pub target: u16,
    /// TCP or UDP.
    pub protocol: Protocol,
}

/// A published port as allocated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedPort {
    /// Ingress or host.
    pub mode: PublishMode,
    /// The published port.
    pub published: u16,
    /// The port inside the task.
    pub target: u16,
    /// TCP or UDP.
    pub protocol: Protocol,
}

/// Replicated or global.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceMode {
    /// This many tasks.
    Replicated(u64),
    /// One task per eligible node.
    Global,
}

/// VIP or DNS round robin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointMode {
    /// A virtual IP per network, load-balanced.
    Vip,
    /// DNS answers with the task addresses.
    Dnsrr,
}

/// A network a service attaches to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The network's ID.
    pub network: NetworkId,
    /// Extra DNS names on that network.
    pub aliases: Vec<String>,
}

/// A network as a request names it (a name, an ID or an ID prefix), with
/// the service's aliases there: what `--network` says, before the daemon
/// resolves it into an [`Attachment`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRef {
    /// The network, as typed.
    pub network: String,
    /// Extra DNS names on that network.
    pub aliases: Vec<String>,
}

/// When a task that ended by itself is replaced (`--restart-condition`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartCondition {
    /// Never: a task that exits stays ended.
    None,
    /// Only when it exits with a non-zero status (or cannot start).
    OnFailure,
    /// Whenever it exits.
    Any,
}

impl RestartCondition {
    /// `none`, `on-failure` or `any`.
    pub fn as_str(&self) -> &'static str {
        match self {
            RestartCondition::None => "none",
            RestartCondition::OnFailure => "on-failure",
            RestartCondition::Any => "any",
        }
    }
}

/// `--restart-condition`, `--restart-max-attempts`, `--restart-delay`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartPolicy {
    /// When to restart.
    pub condition: RestartCondition,
    /// Restarts per slot (per node for global services) before giving up;
    /// 0 means no limit. Counted per spec version: an update starts over.
    pub max_attempts: u64,
    /// Wait between an exit and the restart.
    pub delay_ms: u64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            condition: RestartCondition::Any,
            max_attempts: 0,
            delay_ms: 5_000,
        }
    }
}

/// `--update-parallelism`, `--update-delay`: how a changed spec rolls out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateConfig {
    /// Tasks replaced at once; 0 means all at once.
    pub parallelism: u64,
    /// Wait after a batch runs before the next one starts.
    pub delay_ms: u64,
}

impl Default for UpdateConfig {
    fn default() -> Self {
        UpdateConfig {
            parallelism: 1,
            delay_ms: 0,
        }
    }
}

/// `service create`, as asked (networks already resolved to IDs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// Unique name.
    pub name: String,
    /// Replicated or global.
    pub mode: ServiceMode,
    /// Networks.
    pub networks: Vec<Attachment>,
    /// Published ports.
    pub ports: Vec<PortSpec>,
    /// VIP or DNS round robin.
    pub endpoint_mode: EndpointMode,
    /// Placement constraints.
    pub constraints: Vec<Constraint>,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// The command and its arguments.
    pub command: Vec<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// When ended tasks are replaced.
    pub restart: RestartPolicy,
    /// How updates roll out.
    pub update: UpdateConfig,
    /// The image and container settings its tasks run with; `None` for
    /// host processes (`--runtime process`, or the `--` form).
    #[serde(with = "json_field")]
    pub container: Option<ContainerSpec>,
    /// What services gained since (HTTP routes…), stored as JSON.
    #[serde(with = "json_field")]
    pub ext: ServiceExt,
}

/// The settings of a service added after containers, kept as JSON inside
/// the store's binary encoding (see [`json_field`]): a field added here
/// with its default reads older records without a new format.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServiceExt {
    /// Routes through the L7 routing mesh (`--http-route`).
    pub http_routes: Vec<crate::route::HttpRoute>,
}

/// Resource amounts of a container (`--limit-*`, `--reserve-*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Resources {
    /// Memory, in bytes.
    pub memory_bytes: Option<u64>,
    /// CPU, in billionths of a CPU.
    pub nano_cpus: Option<u64>,
    /// Processes (limits only).
    pub pids: Option<u64>,
}

/// How a service's tasks run as containers (`service create IMAGE`).
///
/// Stored as JSON inside the store's binary encoding (see [`json_field`]):
/// a field added later, with its default, reads older records, so this
/// part of the store can grow without a new format.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ContainerSpec {
    /// The image, as normalised (`docker.io/library/busybox:latest`).
    pub image: String,
    /// The manifest digest the reference resolved to when the service was
    /// created or updated (`sha256:…`); every node runs that. `None` when
    /// no node or registry could say (each node then runs what the name
    /// names on it).
    pub digest: Option<String>,
    /// `--entrypoint` (replaces the image's, and drops its `CMD`).
    pub entrypoint: Option<Vec<String>>,
    /// `--user`.
    pub user: Option<String>,
    /// `--workdir`.
    pub workdir: Option<String>,
    /// `--hostname` (the task's name otherwise).
    pub hostname: Option<String>,
    /// `--limit-memory`, `--limit-cpu`, `--limit-pids`.
    pub limits: Resources,
    /// `--reserve-memory`, `--reserve-cpu`.
    pub reservations: Resources,
    /// `--stop-signal` (`SIGTERM` otherwise).
    pub stop_signal: Option<String>,
    /// `--stop-grace-period` in milliseconds (10 s otherwise).
    pub stop_grace_ms: Option<u64>,
    /// `--health-*`: overrides the image's `HEALTHCHECK`, field by field.
    pub healthcheck: Option<HealthCheck>,
    /// `--no-healthcheck`: no check, even if the image has one.
    pub no_healthcheck: bool,
}

/// A container's health check, as Docker writes it (`HEALTHCHECK`,
/// `--health-*`): a field left `None` takes the image's, then Docker's
/// default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HealthCheck {
    /// `["CMD", prog, args…]`, `["CMD-SHELL", script]` or `["NONE"]`.
    pub test: Option<Vec<String>>,
    /// Time between checks (30 s).
    pub interval_ms: Option<u64>,
    /// How long one check may run (30 s).
    pub timeout_ms: Option<u64>,
    /// Failures in a row that make the task unhealthy (3).
    pub retries: Option<u64>,
    /// Time after the start during which failures do not count (0).
    pub start_period_ms: Option<u64>,
}

impl HealthCheck {
    /// `self` over `image`'s check, field by field.
    pub fn over(&self, image: &HealthCheck) -> HealthCheck {
        HealthCheck {
            test: self.test.clone().or_else(|| image.test.clone()),
            interval_ms: self.interval_ms.or(image.interval_ms),
            timeout_ms: self.timeout_ms.or(image.timeout_ms),
            retries: self.retries.or(image.retries),
            start_period_ms: self.start_period_ms.or(image.start_period_ms),
        }
    }

    /// The command to exec, `None` for no check (`NONE`, or no test). A
    /// `CMD-SHELL` script runs under `/bin/sh -c`.
    pub fn command(&self) -> Option<Vec<String>> {
        let test = self.test.as_ref()?;
        let (kind, rest) = test.split_first()?;
        match kind.as_str() {
            "CMD" if !rest.is_empty() => Some(rest.to_vec()),
            "CMD-SHELL" if !rest.is_empty() => {
                Some(vec!["/bin/sh".into(), "-c".into(), rest.join(" ")])
            }
            _ => None,
        }
    }
}

/// Docker's defaults for a health check's timing.
pub const HEALTH_INTERVAL_MS: u64 = 30_000;
/// How long one check may run unless set.
pub const HEALTH_TIMEOUT_MS: u64 = 30_000;
/// Failures in a row unless set.
pub const HEALTH_RETRIES: u64 = 3;

/// A field kept as a JSON string inside the binary encoding.
pub mod json_field {
    use serde::de::{DeserializeOwned, Error as _};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// Writes `value` as a JSON string.
    pub fn serialize<T: Serialize, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
        let json = serde_json::to_string(value).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&json)
    }

    /// Reads a JSON string written by [`serialize`].
    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
        d: D,
    ) -> Result<T, D::Error> {
        let json = String::deserialize(d)?;
        serde_json::from_str(&json).map_err(D::Error::custom)
    }
}

impl ServiceSpec {
    /// Whether going from `self` to `new` changes what a task runs or where
    /// it is attached, so that running tasks must be replaced. Replicas,
    /// labels, constraints (enforced anyway), restart and update settings
    /// do not.
    pub fn tasks_differ(&self, new: &ServiceSpec) -> bool {
        self.command != new.command
            || self.env != new.env
            || self.networks != new.networks
            || self.ports != new.ports
            || self.endpoint_mode != new.endpoint_mode
            || self.container != new.container
    }
}

/// A service in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// ID.
    pub id: ServiceId,
    /// What was asked.
    pub spec: ServiceSpec,
    /// Virtual IP per network ID (vip mode; includes `ingress` when ports are
    /// published through the routing mesh).
    pub vips: BTreeMap<NetworkId, Ipv4Addr>,
    /// Published ports as allocated.
    pub ports: Vec<PublishedPort>,
    /// Milliseconds since the epoch at creation.
    pub created_at_ms: u64,
    /// The spec's version: 1 at creation, raised by each update that
    /// changes the tasks. Tasks of an older version are replaced.
    pub version: u64,
    /// Milliseconds since the epoch at the last update (creation before one).
    pub updated_at_ms: u64,
}

/// Why a service cannot be created.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ServiceError {
    /// Bad name.
    #[error(
        "invalid service name `{0}`: use letters, digits and `-`, starting with a letter or digit, at most 63 characters"
    )]
    BadName(String),
    /// Name taken.
    #[error("service `{0}` already exists")]
    Exists(String),
    /// A network that is not in the store.
    #[error("network {0} not found")]
    NoSuchNetwork(String),
    /// Something about the spec that cannot work.
    #[error("{0}")]
    Invalid(String),
    /// An address or port could not be allocated.
    #[error(transparent)]
    Alloc(#[from] AllocError),
}

/// Refuses a route of `spec` that another service has (a host and path
/// lead to one service), naming that service.
fn routes_free(id: &str, spec: &ServiceSpec, state: &ClusterState) -> Result<(), ServiceError> {
    for r in &spec.ext.http_routes {
        let owner = state.services.values().find(|s| {
            s.id != id
                && s.spec
                    .ext
                    .http_routes
                    .iter()
                    .any(|o| o.host == r.host && o.path == r.path)
        });
        if let Some(o) = owner {
            return Err(ServiceError::Invalid(format!(
                "HTTP route {} is already routed to service `{}`: remove it there first (`shoal service update --http-route-rm {} {}`)",
                r.key(),
                o.spec.name,
                r.key(),
                o.spec.name
            )));
        }
    }
    Ok(())
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && name.len() <= 63
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// Every address already taken on `network`: services' VIPs, tasks'
/// addresses and, on `ingress`, the nodes' mesh endpoints. A walk of the
/// whole store: `apply` asks the state's index instead
/// ([`ClusterState::free_address`]), which tests check against this.
pub fn used_addresses(state: &ClusterState, network: &str) -> BTreeSet<Ipv4Addr> {
    let vips = state
        .services
        .values()
        .filter_map(|s| s.vips.get(network).copied());
    let tasks = state
        .tasks
        .values()
        .filter_map(|t| t.addresses.get(network).copied());
    let is_ingress = state.networks.get(network).is_some_and(|n| n.ingress);
    let nodes = state
        .ingress_addrs
        .values()
        .copied()
        .filter(move |_| is_ingress);
    vips.chain(tasks).chain(nodes).collect()
}

/// The networks a task of `service` gets an address on: its attached
/// networks, and `ingress` when it publishes through the routing mesh.
pub fn task_networks(service: &Service) -> Vec<NetworkId> {
    let mut nets: Vec<NetworkId> = service
        .spec
        .networks
        .iter()
        .map(|a| a.network.clone())
        .collect();
    for n in service.vips.keys() {
        if !nets.contains(n) {
            nets.push(n.clone());
        }
    }
    nets
}

/// The most tasks one replicated service may ask for. Every replica of the
/// store holds every task: an unbounded count (a typo, or a hostile
/// request) would exhaust every manager's memory, one after the other.
pub const MAX_REPLICAS: u64 = 10_000;

/// Refuses a replica count over [`MAX_REPLICAS`], naming the limit.
pub fn check_replicas(replicas: u64) -> Result<(), ServiceError> {
    if replicas > MAX_REPLICAS {
        return Err(ServiceError::Invalid(format!(
            "--replicas {replicas} is over the limit of {MAX_REPLICAS} tasks per service"
        )));
    }
    Ok(())
}

/// Allocates `spec` against `state`. Pure.
pub fn allocate_service(
    id: &str,
    spec: &ServiceSpec,
    state: &ClusterState,
    created_at_ms: u64,
) -> Result<Service, ServiceError> {
    allocate(id, spec, state, created_at_ms, None)
}

/// Allocates the new spec of `previous` (`service update`): VIPs on
/// networks still attached and published ports still asked for are kept;
/// new ones are allocated, dropped ones freed. The version goes up when the
/// tasks must change (or `force`). Pure.
pub fn reallocate_service(
    previous: &Service,
    spec: &ServiceSpec,
    state: &ClusterState,
    force: bool,
    now_ms: u64,
) -> Result<Service, ServiceError> {
    if previous.spec.mode == ServiceMode::Global && spec.mode != ServiceMode::Global
        || previous.spec.mode != ServiceMode::Global && spec.mode == ServiceMode::Global
    {
        return Err(ServiceError::Invalid(
            "a service's mode (replicated or global) cannot change: remove and create it".into(),
        ));
    }
    let mut svc = allocate(
        &previous.id,
        spec,
        state,
        previous.created_at_ms,
        Some(previous),
    )?;
    svc.version = if force || previous.spec.tasks_differ(spec) {
        previous.version + 1
    } else {
        previous.version
    };
    svc.updated_at_ms = now_ms;
    Ok(svc)
}

fn allocate(
    id: &str,
    spec: &ServiceSpec,
    state: &ClusterState,
    created_at_ms: u64,
    previous: Option<&Service>,
) -> Result<Service, ServiceError> {
    if !valid_name(&spec.name) {
        return Err(ServiceError::BadName(spec.name.clone()));
    }
    if let ServiceMode::Replicated(n) = spec.mode {
        check_replicas(n)?;
    }
    if state
        .services
        .values()
        .any(|s| s.spec.name == spec.name && s.id != id)
    {
        return Err(ServiceError::Exists(spec.name.clone()));
    }
    if spec.command.is_empty() {
        return Err(ServiceError::Invalid(
            "a service needs a command to run".into(),
        ));
    }
    routes_free(id, spec, state)?;
    let attached = attachments(spec, state)?;
    let ports = publish(id, spec, state, previous)?;
    let through_mesh = ports.iter().any(|p| p.mode == PublishMode::Ingress);
    if through_mesh && spec.endpoint_mode == EndpointMode::Dnsrr {
        return Err(ServiceError::Invalid(
            "ports published through the routing mesh need --endpoint-mode vip (use mode=host with dnsrr)".into(),
        ));
    }
    let vips = vips_for(spec, state, attached, through_mesh, previous)?;
    Ok(Service {
        id: id.into(),
        spec: spec.clone(),
        vips,
        ports,
        created_at_ms,
        version: 1,
        updated_at_ms: created_at_ms,
    })
}

/// The networks `spec` attaches, each once, none of them `ingress`.
fn attachments<'a>(
    spec: &'a ServiceSpec,
    state: &ClusterState,
) -> Result<Vec<&'a str>, ServiceError> {
    let mut attached: Vec<&str> = Vec::new();
    for a in &spec.networks {
        let n = state
            .networks
            .get(&a.network)
            .ok_or_else(|| ServiceError::NoSuchNetwork(a.network.to_string()))?;
        if n.ingress {
            return Err(ServiceError::Invalid(
                "services cannot attach to the ingress network directly: publish a port instead"
                    .into(),
            ));
        }
        if attached.contains(&a.network.as_str()) {
            return Err(ServiceError::Invalid(format!(
                "network `{}` is attached twice",
                n.spec.name
            )));
        }
        attached.push(&a.network);
    }
    Ok(attached)
}

/// The published ports: ingress ones allocated cluster-wide (a port left to
/// allocate keeps what it had before an update), host ones as given.
fn publish(
    id: &str,
    spec: &ServiceSpec,
    state: &ClusterState,
    previous: Option<&Service>,
) -> Result<Vec<PublishedPort>, ServiceError> {
    let mut ports = Vec::new();
    let mut used_ports: Vec<(u16, String, String)> = state
        .services
        .values()
        .filter(|s| s.id != id)
        .flat_map(|s| {
            s.ports
                .iter()
                .filter(|p| p.mode == PublishMode::Ingress)
                .map(move |p| {
                    (
                        p.published,
                        p.protocol.as_str().to_owned(),
                        format!("service `{}`", s.spec.name),
                    )
                })
        })
        .collect();
    for p in &spec.ports {
        if p.target == 0 {
            return Err(ServiceError::Invalid(
                "a published port needs a target port (1-65535)".into(),
            ));
        }
        // A port left to allocate keeps what it had before the update.
        let kept = previous.and_then(|prev| {
            prev.spec
                .ports
                .iter()
                .zip(&prev.ports)
                .find(|(asked, _)| asked == &p && p.published.is_none())
                .map(|(_, got)| got.published)
        });
        let published = match p.mode {
            PublishMode::Ingress => {
                allocate_port(p.published.or(kept), p.protocol.as_str(), &used_ports)?
            }
            PublishMode::Host => p.published.filter(|p| *p != 0).ok_or_else(|| {
                ServiceError::Invalid(
                    "mode=host publishing needs an explicit published port".into(),
                )
            })?,
        };
        if p.mode == PublishMode::Ingress {
            used_ports.push((
                published,
                p.protocol.as_str().to_owned(),
                format!("service `{}`", spec.name),
            ));
        }
        ports.push(PublishedPort {
            mode: p.mode,
            published,
            target: p.target,
            protocol: p.protocol,
        });
    }
    Ok(ports)
}

/// A VIP on every attached network (and `ingress` when a port goes through
/// the mesh), keeping the ones an update had; none in dnsrr mode.
fn vips_for(
    spec: &ServiceSpec,
    state: &ClusterState,
    attached: Vec<&str>,
    through_mesh: bool,
    previous: Option<&Service>,
) -> Result<BTreeMap<NetworkId, Ipv4Addr>, ServiceError> {
    let mut vips = BTreeMap::new();
    if spec.endpoint_mode == EndpointMode::Vip {
        let mut networks: Vec<&str> = attached;
        if through_mesh {
            let ingress = state.networks.values().find(|n| n.ingress);
            let ing = ingress.ok_or_else(|| {
                ServiceError::Invalid("ports cannot be published through the routing mesh: the ingress network is gone".into())
            })?;
            networks.push(&ing.id);
        }
        for net in networks {
            if let Some(ip) = previous.and_then(|p| p.vips.get(net)) {
                vips.insert(NetworkId::from(net), *ip);
                continue;
            }
            let n = &state.networks[net];
            let ip = state.free_address(n)?;
            vips.insert(NetworkId::from(net), ip);
        }
    }
    Ok(vips)
}

#[cfg(test)]
#[path = "service_test.rs"]
mod tests;
