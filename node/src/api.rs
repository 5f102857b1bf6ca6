//! The local API between the `shoal` CLI and its daemon: one JSON request
//! per line on the Unix socket, one JSON reply back.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use shoal_mesh::cidr::Ipv4Net;
use shoal_mesh::constraint::Constraint;
use shoal_mesh::network::NetworkSpec;
use shoal_mesh::service::{
    AttachmentRef, EndpointMode, PortSpec, RestartCondition, RestartPolicy, ServiceSpec,
    UpdateConfig,
};
use shoal_mesh::syntax::key_value;
use shoal_mesh::{Availability, Role};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Largest request the daemon reads from its socket.
pub const MAX_REQUEST: usize = 1 << 20;

/// `--restart-*` and `--update-*` of `service create` and `service update`
/// (durations in milliseconds).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
pub struct Policies {
    /// Restart tasks that exit: none, on-failure or any (default any).
    #[arg(long)]
    pub restart_condition: Option<RestartCondition>,
    /// Restarts per slot before giving up (default 0: no limit).
    #[arg(long)]
    pub restart_max_attempts: Option<u64>,
    /// Wait between an exit and its restart, e.g. 5s, 500ms (default 5s).
    #[arg(long, value_parser = parse_duration_ms)]
    pub restart_delay: Option<u64>,
    /// Tasks replaced at once by an update; 0 for all (default 1).
    #[arg(long)]
    pub update_parallelism: Option<u64>,
    /// Wait between update batches, e.g. 10s (default 0s).
    #[arg(long, value_parser = parse_duration_ms)]
    pub update_delay: Option<u64>,
}

impl Policies {
    /// The flags given, applied over a service's policies.
    pub fn apply(&self, restart: &mut RestartPolicy, update: &mut UpdateConfig) {
        if let Some(c) = self.restart_condition {
            restart.condition = c;
        }
        if let Some(n) = self.restart_max_attempts {
            restart.max_attempts = n;
        }
        if let Some(d) = self.restart_delay {
            restart.delay_ms = d;
        }
        if let Some(n) = self.update_parallelism {
            update.parallelism = n;
        }
        if let Some(d) = self.update_delay {
            update.delay_ms = d;
        }
    }
}

/// `IP` or `IP:PORT` (`--advertise-addr`, `--listen-addr`, a manager's
/// address): without a port, the daemon's (or 2377).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPort {
    /// The address.
    pub ip: std::net::IpAddr,
    /// The port, when given.
    pub port: Option<u16>,
}

impl HostPort {
    /// The socket address, with `port` where none was given.
    pub fn or_port(self, port: u16) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.ip, self.port.unwrap_or(port))
    }
}

impl std::str::FromStr for HostPort {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if let Ok(sa) = text.parse::<std::net::SocketAddr>() {
            return Ok(HostPort {
                ip: sa.ip(),
                port: Some(sa.port()),
            });
        }
        text.parse()
            .map(|ip| HostPort { ip, port: None })
            .map_err(|_| format!("`{text}` is not IP or IP:PORT, e.g. 192.168.1.10:2377"))
    }
}

/// `500ms`, `5s`, `2m`, `1h` or `0` → milliseconds.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let bad = || format!("invalid duration `{text}`: use a number with ms, s, m or h, e.g. 10s");
    if text == "0" {
        return Ok(0);
    }
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = text.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let scale = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(bad()),
    };
    n.checked_mul(scale).ok_or_else(bad)
}

/// The smallest memory limit taken (Docker's: below it a container cannot
/// start), and the largest: 1 TiB.
pub use shoal_mesh::bounds::{MAX_MEMORY, MIN_MEMORY};

/// `--limit-memory`: bytes, with an optional unit `b`, `k`, `m` or `g`
/// (powers of 1024, as Docker reads them), e.g. `32m`.
pub fn parse_memory(text: &str) -> Result<u64, String> {
    let bad = || format!("invalid memory size `{text}`: use a number with b, k, m or g, e.g. 32m");
    let lower = text.trim().to_ascii_lowercase();
    let split = lower
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(lower.len());
    let (n, unit) = lower.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let scale: u64 = match unit {
        "" | "b" => 1,
        "k" | "kb" => 1 << 10,
        "m" | "mb" => 1 << 20,
        "g" | "gb" => 1 << 30,
        _ => return Err(bad()),
    };
    let bytes = n.checked_mul(scale).ok_or_else(bad)?;
    if !(MIN_MEMORY..=MAX_MEMORY).contains(&bytes) {
        return Err(format!(
            "memory size `{text}` is out of bounds: at least 6m, at most 1024g"
        ));
    }
    Ok(bytes)
}

/// `--limit-cpu`: a number of CPUs (`0.5`, `2`), as billionths of a CPU.
pub fn parse_cpus(text: &str) -> Result<u64, String> {
    let bad = || format!("invalid CPU count `{text}`: use a number of CPUs, e.g. 0.5 or 2");
    let (whole, frac) = text.trim().split_once('.').unwrap_or((text.trim(), ""));
    if whole.is_empty() && frac.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > 9
    {
        return Err(bad());
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad())?
    };
    let frac: u64 = format!("{frac:0<9}").parse().map_err(|_| bad())?;
    let nano = whole
        .checked_mul(1_000_000_000)
        .and_then(|w| w.checked_add(frac))
        .ok_or_else(bad)?;
    if !(10_000_000..=1024 * 1_000_000_000).contains(&nano) {
        return Err(format!(
            "CPU count `{text}` is out of bounds: at least 0.01, at most 1024"
        ));
    }
    Ok(nano)
}

/// `--limit-pids`: at least 1, at most 4 194 304 (the kernel's most).
pub fn parse_pids(text: &str) -> Result<i64, String> {
    match text.trim().parse::<i64>() {
        Ok(n) if (1..=4_194_304).contains(&n) => Ok(n),
        _ => Err(format!(
            "invalid process limit `{text}`: use a whole number from 1 to 4194304"
        )),
    }
}

/// `service update`: only what is given changes (also the CLI's flags,
/// parsed into the domain's types as they are read).
#[derive(Debug, Clone, Default, Serialize, Deserialize, clap::Args)]
pub struct ServiceUpdate {
    /// New number of tasks.
    #[arg(long)]
    pub replicas: Option<u64>,
    /// Add or change an environment variable K=V (repeatable).
    #[arg(long, value_parser = key_value)]
    pub env_add: Vec<(String, String)>,
    /// Remove an environment variable (repeatable).
    #[arg(long)]
    pub env_rm: Vec<String>,
    /// Add or change a label k=v (repeatable).
    #[arg(long, value_parser = key_value)]
    pub label_add: Vec<(String, String)>,
    /// Remove a label (repeatable).
    #[arg(long)]
    pub label_rm: Vec<String>,
    /// Add a placement constraint (repeatable).
    #[arg(long)]
    pub constraint_add: Vec<Constraint>,
    /// Remove a placement constraint (repeatable).
    #[arg(long)]
    pub constraint_rm: Vec<Constraint>,
    /// Publish another port, as --publish (repeatable).
    #[arg(long)]
    pub publish_add: Vec<PortSpec>,
    /// Stop publishing a port: TARGET[/udp] or PUBLISHED:TARGET[/udp] (repeatable).
    #[arg(long)]
    pub publish_rm: Vec<PortSpec>,
    /// Add an HTTP route, or change the one of the same host and path, as
    /// `service create --http-route` (repeatable).
    #[arg(long = "http-route")]
    #[serde(default)]
    pub http_route: Vec<shoal_mesh::route::HttpRoute>,
    /// Remove the HTTP route of HOST[/PREFIX] (repeatable).
    #[arg(long = "http-route-rm")]
    #[serde(default)]
    pub http_route_rm: Vec<shoal_mesh::route::RouteKey>,
    /// Attach another network, as --network (repeatable).
    #[arg(long)]
    pub network_add: Vec<AttachmentRef>,
    /// Detach a network (repeatable).
    #[arg(long)]
    pub network_rm: Vec<String>,
    /// vip or dnsrr.
    #[arg(long)]
    pub endpoint_mode: Option<EndpointMode>,
    /// Replace the tasks even if nothing they run changed.
    #[arg(long)]
    pub force: bool,
    /// Restart and update settings.
    #[command(flatten)]
    pub policies: Policies,
    /// A new image for a container service (resolved to a digest again;
    /// the tasks roll over to it).
    #[arg(long)]
    pub image: Option<String>,
    /// Name, ID or ID prefix.
    pub service: String,
    /// A new command, after `--` (empty: unchanged).
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// The FIFOs `shoal exec -i|-t` made for a process's input and output:
/// `in`, `out` and `err` in `dir` (a directory of the client's, on this
/// node). The daemon uses only paths that are FIFOs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStdio {
    /// The directory.
    pub dir: PathBuf,
    /// `-i`: the process reads `in`.
    pub stdin: bool,
    /// `-t`: the process runs on a terminal of this size (columns, rows;
    /// 0 when unknown), its output and errors both in `out`.
    pub terminal: Option<(u16, u16)>,
}

/// `--runtime`: what runs a service's tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RuntimeArg {
    /// An image's container, through containerd (the default with IMAGE).
    Container,
    /// A host program, as root, in the task's network namespace (labs and
    /// diagnostics; the default with the `--` form).
    Process,
}

/// `service create`'s container settings (`docker service create`'s).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ContainerFlags {
    /// Override the image's ENTRYPOINT (a program; its arguments are the
    /// command).
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Run as UID[:GID].
    #[arg(short, long)]
    pub user: Option<String>,
    /// The working directory inside the container.
    #[arg(short, long)]
    pub workdir: Option<String>,
    /// The container's hostname (the task's name otherwise).
    #[arg(long)]
    pub hostname: Option<String>,
    /// Memory limit, e.g. 32m (the kernel kills the task above it).
    #[arg(long, value_parser = parse_memory)]
    pub limit_memory: Option<u64>,
    /// CPU limit, e.g. 0.5.
    #[arg(long, value_parser = parse_cpus)]
    pub limit_cpu: Option<u64>,
    /// Most processes the task may run.
    #[arg(long, value_parser = parse_pids)]
    pub limit_pids: Option<i64>,
    /// Memory the scheduler sets aside for each task, e.g. 64m.
    #[arg(long, value_parser = parse_memory)]
    pub reserve_memory: Option<u64>,
    /// CPU the scheduler sets aside for each task, e.g. 0.25.
    #[arg(long, value_parser = parse_cpus)]
    pub reserve_cpu: Option<u64>,
    /// The signal that asks a task to stop (default SIGTERM).
    #[arg(long, value_parser = parse_signal)]
    pub stop_signal: Option<String>,
    /// Time between the stop signal and SIGKILL, e.g. 30s (default 10s).
    #[arg(long, value_parser = parse_duration_ms)]
    pub stop_grace_period: Option<u64>,
    /// A health check: a shell command run inside the container; exit 0
    /// is healthy.
    #[arg(long)]
    pub health_cmd: Option<String>,
    /// Time between health checks, e.g. 5s (default 30s).
    #[arg(long, value_parser = parse_duration_ms)]
    pub health_interval: Option<u64>,
    /// How long one check may run (default 30s).
    #[arg(long, value_parser = parse_duration_ms)]
    pub health_timeout: Option<u64>,
    /// Failures in a row that make a task unhealthy (default 3).
    #[arg(long)]
    pub health_retries: Option<u64>,
    /// Time after the start during which failures do not count.
    #[arg(long, value_parser = parse_duration_ms)]
    pub health_start_period: Option<u64>,
    /// No health check, even if the image has one.
    #[arg(long)]
    pub no_healthcheck: bool,
}

impl ContainerFlags {
    /// Whether any flag was given (they need a container).
    pub fn any(&self) -> bool {
        self.entrypoint.is_some()
            || self.user.is_some()
            || self.workdir.is_some()
            || self.hostname.is_some()
            || self.limit_memory.is_some()
            || self.limit_cpu.is_some()
            || self.limit_pids.is_some()
            || self.reserve_memory.is_some()
            || self.reserve_cpu.is_some()
            || self.stop_signal.is_some()
            || self.stop_grace_period.is_some()
            || self.health_flags()
            || self.no_healthcheck
    }

    fn health_flags(&self) -> bool {
        self.health_cmd.is_some()
            || self.health_interval.is_some()
            || self.health_timeout.is_some()
            || self.health_retries.is_some()
            || self.health_start_period.is_some()
    }

    /// The container spec of `image` with these settings.
    pub fn spec(self, image: String) -> shoal_mesh::service::ContainerSpec {
        use shoal_mesh::service::{ContainerSpec, HealthCheck, Resources};
        let checked = self.health_flags();
        ContainerSpec {
            image,
            digest: None,
            entrypoint: self.entrypoint.map(|e| vec![e]),
            user: self.user,
            workdir: self.workdir,
            hostname: self.hostname,
            limits: Resources {
                memory_bytes: self.limit_memory,
                nano_cpus: self.limit_cpu,
                pids: self.limit_pids.map(|p| p.unsigned_abs()),
            },
            reservations: Resources {
                memory_bytes: self.reserve_memory,
                nano_cpus: self.reserve_cpu,
                pids: None,
            },
            healthcheck: checked.then(|| HealthCheck {
                test: self
                    .health_cmd
                    .clone()
                    .map(|cmd| vec!["CMD-SHELL".to_owned(), cmd]),
                interval_ms: self.health_interval,
                timeout_ms: self.health_timeout,
                retries: self.health_retries,
                start_period_ms: self.health_start_period,
            }),
            no_healthcheck: self.no_healthcheck,
            stop_signal: self.stop_signal,
            stop_grace_ms: self.stop_grace_period,
        }
    }
}

/// The signals a container may be asked to stop with, by name and number.
pub const SIGNALS: &[(&str, i32)] = &[
    ("SIGHUP", 1),
    ("SIGINT", 2),
    ("SIGQUIT", 3),
    ("SIGKILL", 9),
    ("SIGUSR1", 10),
    ("SIGUSR2", 12),
    ("SIGTERM", 15),
    ("SIGWINCH", 28),
];

/// `--stop-signal`: `SIGTERM`, `TERM` or `15` → `SIGTERM`.
pub fn parse_signal(text: &str) -> Result<String, String> {
    let upper = text.trim().to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    SIGNALS
        .iter()
        .find(|(n, num)| *n == name || text.trim().parse::<i32>() == Ok(*num))
        .map(|(n, _)| (*n).to_owned())
        .ok_or_else(|| {
            let names: Vec<&str> = SIGNALS.iter().map(|(n, _)| *n).collect();
            format!("unknown signal `{text}`: use one of {}", names.join(", "))
        })
}

/// A request to the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Daemon and cluster status (for scripts and tests).
    Info,
    /// `swarm init`.
    SwarmInit {
        /// What other nodes dial.
        advertise_addr: Option<HostPort>,
        /// Where to listen (QUIC/UDP).
        listen_addr: Option<HostPort>,
        /// Rebuild a one-manager cluster from this manager's local state.
        force_new_cluster: bool,
        /// `--default-addr-pool`.
        #[serde(default)]
        default_addr_pool: Vec<Ipv4Net>,
        /// `--default-addr-pool-mask-length`.
        #[serde(default)]
        default_addr_pool_mask_length: Option<u8>,
        /// `--cert-expiry`, in milliseconds.
        #[serde(default)]
        cert_expiry_ms: Option<u64>,
        /// `--autolock`.
        #[serde(default)]
        autolock: bool,
    },
    /// `swarm update`: the swarm's settings.
    SwarmUpdate {
        /// `--cert-expiry`, in milliseconds.
        cert_expiry_ms: Option<u64>,
        /// `--autolock=true|false`.
        #[serde(default)]
        autolock: Option<bool>,
    },
    /// `image load FILE`: the images of an OCI archive, into this node's
    /// containerd.
    ImageLoad {
        /// The archive, an absolute path on this node.
        path: std::path::PathBuf,
    },
    /// `image ls`: the images in this node's containerd.
    ImageLs,
    /// `image pull NAME`: an image from its registry, into this node's
    /// containerd.
    ImagePull {
        /// The image's name (`NAME[:TAG]` or `NAME@sha256:…`).
        image: String,
    },
    /// `image rm`: an image of this node's containerd.
    ImageRm {
        /// Its name.
        image: String,
    },
    /// `swarm unlock`: opens a locked manager's keys.
    SwarmUnlock {
        /// The unlock key (`SWMKEY-1-…`).
        key: String,
    },
    /// `swarm unlock-key`: the unlock key; with `rotate`, a new one first.
    UnlockKey {
        /// `--rotate`.
        rotate: bool,
    },
    /// `swarm join`.
    SwarmJoin {
        /// The join token.
        token: shoal_mesh::JoinToken,
        /// A manager's address.
        remote: HostPort,
        /// What other nodes dial.
        advertise_addr: Option<HostPort>,
        /// Where to listen.
        listen_addr: Option<HostPort>,
    },
    /// `swarm ca`: the CA; with `rotate`, start replacing it.
    SwarmCa {
        /// `--rotate`.
        rotate: bool,
    },
    /// `swarm join-token`.
    JoinToken {
        /// Which token.
        role: Role,
        /// Make a new one first.
        rotate: bool,
    },
    /// `swarm leave`.
    SwarmLeave {
        /// Leave even if it breaks quorum or erases the last manager's state.
        force: bool,
    },
    /// `node ls`.
    NodeLs,
    /// `node inspect`.
    NodeInspect {
        /// ID, ID prefix or hostname.
        node: String,
    },
    /// `node promote`.
    NodePromote {
        /// ID, ID prefix or hostname.
        node: String,
    },
    /// `node demote`.
    NodeDemote {
        /// ID, ID prefix or hostname.
        node: String,
    },
    /// `node update`.
    NodeUpdate {
        /// ID, ID prefix or hostname.
        node: String,
        /// New availability.
        availability: Option<Availability>,
        /// Labels to set.
        label_add: Vec<(String, String)>,
        /// Labels to remove.
        label_rm: Vec<String>,
    },
    /// `debug dataplane`: this node's programmed kernel state.
    DebugDataplane {
        /// Only this network.
        network: Option<String>,
    },
    /// `debug run`: a one-off container of an image on this node, run to
    /// its end and removed.
    DebugRun {
        /// The image's name.
        image: String,
        /// The network namespace to join (a new one when absent).
        netns: Option<std::path::PathBuf>,
        /// The command, replacing the image's.
        args: Vec<String>,
        /// Resource limits.
        #[serde(default)]
        limits: crate::daemon::oci::Limits,
    },
    /// `debug dns`: what a task's embedded DNS answers for a name.
    DebugDns {
        /// Task ID, ID prefix or `SERVICE.SLOT`.
        task: String,
        /// The name asked.
        name: String,
    },
    /// `debug gossip`: this node's members and tables.
    DebugGossip {
        /// Only this network (`(global)` for the cluster-wide table).
        network: Option<String>,
    },
    /// `debug gossip-join`: attach this node to a network's gossip.
    DebugGossipJoin {
        /// The network.
        network: String,
    },
    /// `debug gossip-leave`: detach this node from a network's gossip.
    DebugGossipLeave {
        /// The network.
        network: String,
    },
    /// `debug gossip-put`: write an entry owned by this node.
    DebugGossipPut {
        /// The network.
        network: String,
        /// The table (`endpoints` or `vteps`).
        table: String,
        /// The key.
        key: String,
        /// The value.
        value: shoal_mesh::observed::TableValue,
    },
    /// `debug gossip-delete`: delete an entry owned by this node.
    DebugGossipDelete {
        /// The network.
        network: String,
        /// The table.
        table: String,
        /// The key.
        key: String,
    },
    /// `network create`: the spec as the CLI parsed it; the store's
    /// `apply` validates and allocates.
    NetworkCreate(Box<NetworkSpec>),
    /// `network ls`.
    NetworkLs,
    /// `network inspect`.
    NetworkInspect {
        /// Name, ID or ID prefix.
        network: String,
    },
    /// `network rm`.
    NetworkRm {
        /// Name, ID or ID prefix.
        network: String,
    },
    /// `service create`: the spec as the CLI parsed it (its `networks`
    /// empty), and the networks as the user named them, which the daemon
    /// resolves to IDs.
    ServiceCreate {
        /// The spec.
        spec: Box<ServiceSpec>,
        /// `--network`.
        networks: Vec<AttachmentRef>,
    },
    /// `service update`: changes to an existing service.
    ServiceUpdate(Box<ServiceUpdate>),
    /// `shoal exec`: where to enter a task's sandbox on this node.
    TaskExec {
        /// Task ID, unique ID prefix, or `SERVICE.SLOT`.
        task: String,
    },
    /// `shoal exec` into a container task on this node: runs the command
    /// through containerd as the container's own process runs.
    TaskExecIn {
        /// Task ID, unique ID prefix, or `SERVICE.SLOT`.
        task: String,
        /// The command.
        command: Vec<String>,
        /// `-i`/`-t`: the client's FIFOs to stream through (else the
        /// output comes back in the answer).
        #[serde(default)]
        stdio: Option<ExecStdio>,
    },
    /// `service ls`.
    ServiceLs,
    /// `service ps`.
    ServicePs {
        /// Name, ID or ID prefix.
        service: String,
    },
    /// `service inspect`.
    ServiceInspect {
        /// Name, ID or ID prefix.
        service: String,
    },
    /// `service rm`.
    ServiceRm {
        /// Name, ID or ID prefix.
        service: String,
    },
    /// `service logs`: output of the service's tasks from the given offsets.
    ServiceLogs {
        /// Name, ID or ID prefix.
        service: String,
        /// Byte offset already read, per task ID.
        #[serde(default)]
        offsets: std::collections::BTreeMap<String, u64>,
    },
    /// `service scale`.
    ServiceScale {
        /// Name, ID or ID prefix.
        service: String,
        /// Replicas.
        replicas: u64,
    },
    /// `node rm`.
    NodeRm {
        /// ID, ID prefix or hostname.
        node: String,
        /// Remove even if it is up.
        force: bool,
    },
}

/// What a worker answers to a request only a manager serves.
pub const NOT_A_MANAGER: &str = "this node is not a swarm manager: run this command on a manager (`shoal node ls` shows which nodes are). Reads of this node's copy of the swarm (ls, ps, inspect) work here";

impl Request {
    /// Whether only a manager serves it: every change to the swarm, and
    /// what only managers may see (join tokens, other nodes' task output).
    /// Reads of the local copy and this node's own business (leaving,
    /// exec, debug) are not.
    pub fn needs_manager(&self) -> bool {
        match self {
            Request::SwarmInit {
                force_new_cluster, ..
            } => *force_new_cluster,
            Request::JoinToken { .. }
            | Request::UnlockKey { .. }
            | Request::SwarmCa { .. }
            | Request::SwarmUpdate { .. }
            | Request::NodePromote { .. }
            | Request::NodeDemote { .. }
            | Request::NodeUpdate { .. }
            | Request::NodeRm { .. }
            | Request::NetworkCreate(_)
            | Request::NetworkRm { .. }
            | Request::ServiceCreate { .. }
            | Request::ServiceUpdate(_)
            | Request::ServiceRm { .. }
            | Request::ServiceScale { .. }
            | Request::ServiceLogs { .. } => true,
            Request::Info
            | Request::ImageLoad { .. }
            | Request::ImageLs
            | Request::ImageRm { .. }
            | Request::ImagePull { .. }
            | Request::SwarmUnlock { .. }
            | Request::SwarmJoin { .. }
            | Request::SwarmLeave { .. }
            | Request::NodeLs
            | Request::NodeInspect { .. }
            | Request::DebugDataplane { .. }
            | Request::DebugDns { .. }
            | Request::DebugRun { .. }
            | Request::DebugGossip { .. }
            | Request::DebugGossipJoin { .. }
            | Request::DebugGossipLeave { .. }
            | Request::DebugGossipPut { .. }
            | Request::DebugGossipDelete { .. }
            | Request::NetworkLs
            | Request::NetworkInspect { .. }
            | Request::TaskExec { .. }
            | Request::TaskExecIn { .. }
            | Request::ServiceLs
            | Request::ServicePs { .. }
            | Request::ServiceInspect { .. } => false,
        }
    }

    /// Whether a locked node (autolock, before `swarm unlock`) serves it.
    pub fn served_when_locked(&self) -> bool {
        matches!(
            self,
            Request::Info | Request::SwarmUnlock { .. } | Request::SwarmLeave { force: true }
        )
    }
}

/// What kind of failure a refused request is. The CLI exits with its code,
/// so that scripts can tell a typo from a missing object from a swarm that
/// cannot answer now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is malformed or asks for what is not allowed: fix it.
    Invalid,
    /// It names a node, network, service or task that does not exist.
    NotFound,
    /// The swarm's state refuses it (taken, in use, the last manager…).
    Conflict,
    /// This node is not in a swarm (or not a manager where one is needed).
    NotInSwarm,
    /// The swarm cannot answer now (no quorum, a peer unreachable): retry.
    Unavailable,
    /// This manager is locked (autolock): run `swarm unlock`.
    Locked,
    /// Anything else (see the daemon's log).
    Internal,
}

impl ErrorKind {
    /// The CLI's exit code (2 is also clap's for a malformed command line).
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Internal => 1,
            ErrorKind::Invalid => 2,
            ErrorKind::NotFound => 3,
            ErrorKind::Conflict => 4,
            ErrorKind::NotInSwarm => 5,
            ErrorKind::Unavailable => 6,
            ErrorKind::Locked => 7,
        }
    }
}

/// A refused request: its kind and what to tell the user.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// What went wrong and how to fix it.
    pub message: String,
}

impl ApiError {
    fn of(kind: ErrorKind, message: impl Into<String>) -> anyhow::Error {
        ApiError {
            kind,
            message: message.into(),
        }
        .into()
    }

    /// A malformed request.
    pub fn invalid(message: impl Into<String>) -> anyhow::Error {
        Self::of(ErrorKind::Invalid, message)
    }

    /// Something named that does not exist.
    pub fn not_found(message: impl Into<String>) -> anyhow::Error {
        Self::of(ErrorKind::NotFound, message)
    }

    /// Refused by the swarm's state.
    pub fn conflict(message: impl Into<String>) -> anyhow::Error {
        Self::of(ErrorKind::Conflict, message)
    }

    /// Not in a swarm (or not where the request needs to be).
    pub fn not_in_swarm(message: impl Into<String>) -> anyhow::Error {
        Self::of(ErrorKind::NotInSwarm, message)
    }

    /// A locked manager (autolock).
    pub fn locked(message: impl Into<String>) -> anyhow::Error {
        Self::of(ErrorKind::Locked, message)
    }

    /// Cannot be answered now.
    pub fn unavailable(message: impl Into<String>) -> anyhow::Error {
        Self::of(ErrorKind::Unavailable, message)
    }
}

/// The daemon's answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Reply {
    /// The result, when the request succeeded.
    pub data: Option<Value>,
    /// What went wrong, when it failed.
    pub error: Option<String>,
    /// What kind of failure, when it failed.
    #[serde(default)]
    pub kind: Option<ErrorKind>,
    /// Things the user should know even on success (e.g. stale reads).
    #[serde(default)]
    pub warnings: Vec<String>,
}

impl Reply {
    /// A successful reply.
    pub fn ok(data: Value) -> Self {
        Reply {
            data: Some(data),
            ..Default::default()
        }
    }

    /// A successful reply carrying `view` (one of `crate::views`).
    pub fn of<T: Serialize>(view: &T) -> anyhow::Result<Self> {
        Ok(Reply::ok(serde_json::to_value(view)?))
    }

    /// A failed reply.
    pub fn err(kind: ErrorKind, message: impl Into<String>) -> Self {
        Reply {
            error: Some(message.into()),
            kind: Some(kind),
            ..Default::default()
        }
    }
}

/// Sends `req` to the daemon at `socket` and returns its reply.
pub async fn call(socket: &Path, req: &Request) -> anyhow::Result<Reply> {
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        ApiError::unavailable(format!(
            "cannot connect to the shoal daemon at {}: {e}. Is `shoal daemon` running? (set --socket or SHOAL_SOCKET)",
            socket.display()
        ))
    })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    write.shutdown().await?;
    let mut reader = BufReader::new(read);
    let mut answer = String::new();
    reader.read_line(&mut answer).await?;
    if answer.is_empty() {
        anyhow::bail!(
            "the daemon closed the connection without answering (did it crash? see its log)"
        );
    }
    Ok(serde_json::from_str(&answer)?)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever a local client writes on the API socket reads as a
        /// request or an error, never a panic.
        #[test]
        fn hostile_json_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = serde_json::from_slice::<Request>(&bytes);
        }

        /// Well-formed JSON of the wrong shape, and valid requests with
        /// characters changed, too.
        #[test]
        fn mutated_requests_never_panic(at in any::<usize>(), with in any::<char>()) {
            let good = r#"{"ServiceScale":{"service":"web","replicas":3}}"#;
            let mut chars: Vec<char> = good.chars().collect();
            let i = at % chars.len();
            chars[i] = with;
            let text: String = chars.into_iter().collect();
            let _ = serde_json::from_str::<Request>(&text);
        }
    }

    #[test]
    fn only_managers_serve_changes_and_token_reads() {
        let scale = Request::ServiceScale {
            service: "web".into(),
            replicas: 3,
        };
        assert!(scale.needs_manager());
        assert!(
            Request::JoinToken {
                role: shoal_mesh::Role::Worker,
                rotate: false
            }
            .needs_manager()
        );
        assert!(!Request::ServiceLs.needs_manager());
        assert!(!Request::NodeLs.needs_manager());
        assert!(!Request::SwarmLeave { force: false }.needs_manager());
    }

    #[test]
    fn resource_values_read_as_docker_reads_them_and_bad_ones_say_what_to_fix() {
        assert_eq!(parse_memory("32m"), Ok(32 << 20));
        assert_eq!(parse_memory("1G"), Ok(1 << 30));
        assert_eq!(parse_memory("6291456"), Ok(6 << 20));
        assert_eq!(parse_memory("8192k"), Ok(8 << 20));
        for bad in [
            "",
            "0",
            "5m",
            "32x",
            "m",
            "-1m",
            "2000g",
            "99999999999999999999g",
        ] {
            let e = parse_memory(bad).unwrap_err();
            assert!(e.contains("memory size"), "{bad}: {e}");
        }
        assert_eq!(parse_cpus("0.5"), Ok(500_000_000));
        assert_eq!(parse_cpus("2"), Ok(2_000_000_000));
        assert_eq!(parse_cpus(".25"), Ok(250_000_000));
        assert_eq!(parse_cpus("1.000000001"), Ok(1_000_000_001));
        for bad in [
            "",
            ".",
            "0",
            "0.001",
            "abc",
            "1.2.3",
            "-1",
            "2000",
            "1.0000000001",
        ] {
            assert!(parse_cpus(bad).unwrap_err().contains("CPU count"), "{bad}");
        }
        assert_eq!(parse_pids("100"), Ok(100));
        for bad in ["0", "-5", "x", "5000000"] {
            assert!(parse_pids(bad).is_err(), "{bad}");
        }
    }
}
