//! `service create|ls|ps|inspect|rm|scale`.

use std::collections::BTreeMap;

use anyhow::anyhow;
use serde_json::json;
use shoal_mesh::service::{
    Attachment, AttachmentRef, ContainerSpec, PortSpec, Protocol, PublishMode, Service,
    ServiceMode, ServiceSpec,
};
use shoal_mesh::task::{DesiredState, Task, TaskState};
use shoal_mesh::{ClusterState, Command, ServiceId};

use super::agent::Daemon;
use super::clock::now_ms;
use crate::api::{ApiError, Reply, ServiceUpdate};
use crate::views::{
    AttachmentView, Named, RestartView, ServiceView, TaskLogView, TaskView, UpdateView,
};

/// Resolves the network an attachment names (as the user typed it: a
/// name, an ID or an ID prefix) to its ID.
fn resolve_attachment(state: &ClusterState, a: &AttachmentRef) -> anyhow::Result<Attachment> {
    let name = &a.network;
    let net = state.resolve_network(name).ok_or_else(|| {
        ApiError::not_found(format!(
            "network `{name}` not found (create it with `shoal network create {name}`)"
        ))
    })?;
    Ok(Attachment {
        network: net.id.clone(),
        aliases: a.aliases.clone(),
    })
}

/// Refuses published ports another program already uses on this node
/// (the published ports of services are forwarded, not bound, so they do
/// not count).
fn check_ports_free(ports: &[PortSpec]) -> anyhow::Result<()> {
    for p in ports {
        let Some(port) = p.published else { continue };
        let taken = match p.protocol {
            Protocol::Tcp => std::net::TcpListener::bind(("0.0.0.0", port)).err(),
            Protocol::Udp => std::net::UdpSocket::bind(("0.0.0.0", port)).err(),
        };
        if taken.is_some_and(|e| e.kind() == std::io::ErrorKind::AddrInUse) {
            return Err(ApiError::conflict(format!(
                "port {port}/{} is already in use on this node by another program: publish another port",
                p.protocol.as_str()
            )));
        }
    }
    Ok(())
}

/// The spec `service update` asks for: `old` with the changes applied.
fn updated_spec(
    state: &ClusterState,
    old: &ServiceSpec,
    u: &ServiceUpdate,
) -> anyhow::Result<ServiceSpec> {
    let mut spec = old.clone();
    if let Some(r) = u.replicas {
        match spec.mode {
            ServiceMode::Replicated(_) => spec.mode = ServiceMode::Replicated(r),
            ServiceMode::Global => {
                return Err(ApiError::invalid(format!(
                    "service `{}` is global: it runs one task per node, --replicas does not apply",
                    old.name
                )));
            }
        }
    }
    for k in &u.env_rm {
        spec.env.remove(k);
    }
    spec.env.extend(u.env_add.iter().cloned());
    for k in &u.label_rm {
        spec.labels.remove(k);
    }
    spec.labels.extend(u.label_add.iter().cloned());
    spec.constraints.retain(|c| !u.constraint_rm.contains(c));
    for c in &u.constraint_add {
        if !spec.constraints.contains(c) {
            spec.constraints.push(c.clone());
        }
    }
    for asked in &u.publish_rm {
        let before = spec.ports.len();
        spec.ports.retain(|p| !p.is_named_by(asked));
        if spec.ports.len() == before {
            let published = asked.published.map(|p| format!("{p}:")).unwrap_or_default();
            return Err(ApiError::not_found(format!(
                "--publish-rm {published}{}/{}: the service publishes no such port",
                asked.target,
                asked.protocol.as_str()
            )));
        }
    }
    spec.ports.extend(u.publish_add.iter().cloned());
    let routes = &mut spec.ext.http_routes;
    for key in &u.http_route_rm {
        let before = routes.len();
        routes.retain(|r| r.key() != *key);
        if routes.len() == before {
            return Err(ApiError::not_found(format!(
                "--http-route-rm {key}: the service has no such route"
            )));
        }
    }
    for r in &u.http_route {
        routes.retain(|o| o.key() != r.key());
        routes.push(r.clone());
    }
    for n in &u.network_rm {
        let net = state
            .resolve_network(n)
            .ok_or_else(|| ApiError::not_found(format!("network `{n}` not found")))?;
        let before = spec.networks.len();
        spec.networks.retain(|a| a.network != net.id);
        if spec.networks.len() == before {
            return Err(ApiError::not_found(format!(
                "--network-rm `{n}`: the service is not attached to it"
            )));
        }
    }
    for a in &u.network_add {
        spec.networks.push(resolve_attachment(state, a)?);
    }
    if let Some(m) = u.endpoint_mode {
        spec.endpoint_mode = m;
    }
    if !u.command.is_empty() {
        spec.command.clone_from(&u.command);
    }
    u.policies.apply(&mut spec.restart, &mut spec.update);
    Ok(spec)
}

fn resolve<'a>(state: &'a ClusterState, reference: &str) -> anyhow::Result<&'a Service> {
    state.resolve_service(reference).ok_or_else(|| {
        ApiError::not_found(format!(
            "no such service: `{reference}` (use `shoal service ls`)"
        ))
    })
}

fn desired(state: &ClusterState, s: &Service) -> u64 {
    match s.spec.mode {
        ServiceMode::Replicated(n) => n,
        ServiceMode::Global => state
            .nodes
            .values()
            .filter(|n| s.spec.constraints.iter().all(|c| c.matches(n)))
            .count() as u64,
    }
}

/// A service as `ls`/`inspect` show it.
fn view(state: &ClusterState, s: &Service) -> ServiceView {
    let running = state
        .tasks_of(&s.id)
        .filter(|t| {
            t.desired == DesiredState::Running && t.state == shoal_mesh::task::TaskState::Running
        })
        .count();
    let net_name = |id: &str| {
        state
            .networks
            .get(id)
            .map(|n| n.spec.name.clone())
            .unwrap_or_else(|| id.to_owned())
    };
    let up_to_date = up_to_date(state, s).count();
    let outdated = state
        .tasks_of(&s.id)
        .filter(|t| t.is_active() && t.spec_version < s.version)
        .count();
    let update_status = match shoal_mesh::orchestrator::update_paused(state, s) {
        Some(why) => Some(why),
        None if outdated > 0 => Some(format!("updating: {outdated} task(s) to replace")),
        None if s.version > 1 => Some("completed".to_owned()),
        None => None,
    };
    ServiceView {
        id: s.id.to_string(),
        name: s.spec.name.clone(),
        mode: match s.spec.mode {
            ServiceMode::Replicated(_) => "replicated",
            ServiceMode::Global => "global",
        }
        .to_owned(),
        replicas: desired(state, s),
        running: running as u64,
        up_to_date: up_to_date as u64,
        version: s.version,
        update_status,
        command: s.spec.command.clone(),
        container: s.spec.container.clone(),
        endpoint_mode: s.spec.endpoint_mode,
        networks: s
            .spec
            .networks
            .iter()
            .map(|a| AttachmentView {
                network: net_name(&a.network),
                aliases: a.aliases.clone(),
            })
            .collect(),
        vips: s
            .vips
            .iter()
            .map(|(n, ip)| (net_name(n), ip.to_string()))
            .collect(),
        ports: s.ports.clone(),
        http_routes: s.spec.ext.http_routes.clone(),
        constraints: s.spec.constraints.iter().map(|c| c.to_string()).collect(),
        env: s.spec.env.clone(),
        labels: s.spec.labels.clone(),
        restart_policy: RestartView {
            condition: s.spec.restart.condition.as_str().to_owned(),
            max_attempts: s.spec.restart.max_attempts,
            delay_ms: s.spec.restart.delay_ms,
        },
        update_config: UpdateView {
            parallelism: s.spec.update.parallelism,
            delay_ms: s.spec.update.delay_ms,
        },
        created_at_ms: s.created_at_ms,
        updated_at_ms: s.updated_at_ms,
        ready: None,
    }
}

/// A running task's health, from what its executor reported (`healthy`,
/// `unhealthy: …`, in the task's message).
fn health_of(t: &Task) -> Option<String> {
    if t.state != TaskState::Running {
        return None;
    }
    match t.message.as_str() {
        "healthy" => Some("healthy".into()),
        m if m.starts_with("unhealthy") => Some("unhealthy".into()),
        _ => None,
    }
}

fn task_view(state: &ClusterState, t: &Task) -> TaskView {
    let net_name = |n: &str| {
        state
            .networks
            .get(n)
            .map(|x| x.spec.name.clone())
            .unwrap_or_else(|| n.to_owned())
    };
    let failed = matches!(t.state, TaskState::Failed | TaskState::Pending);
    TaskView {
        id: t.id.to_string(),
        name: super::executor::task_name(state, t),
        node: t
            .node
            .and_then(|n| state.nodes.get(&n))
            .map(|n| n.hostname.clone()),
        node_id: t.node.map(|n| n.to_string()),
        desired_state: t.desired,
        state: t.state,
        message: t.message.clone(),
        error: if failed {
            t.message.clone()
        } else {
            String::new()
        },
        health: health_of(t),
        spec_version: t.spec_version,
        restarts: t.restarts,
        exit_code: t.exit_code,
        addresses: t
            .addresses
            .iter()
            .map(|(n, ip)| (net_name(n), ip.to_string()))
            .collect(),
        updated_at_ms: t.updated_at_ms,
    }
}

/// A network created through another node a moment ago may not have
/// reached this node's copy yet: gives the `--network` arguments (NET or
/// name=NET,…) a moment to resolve before they are refused.
async fn wait_for_networks(m: &super::member::Member, networks: &[AttachmentRef]) {
    m.wait_for(std::time::Duration::from_secs(2), |s| {
        networks
            .iter()
            .all(|a| s.resolve_network(&a.network).is_some())
    })
    .await;
}

/// How long `service create` waits for a registry to name a digest.
const RESOLVE_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Completes `c` for `service create` and `service update --image` with the
/// digest it names: from the reference itself (`NAME@sha256:…`), else from
/// its registry, else (an image only loaded on the nodes) from this node's
/// images, with a warning that no registry recorded it. An image neither
/// its registry nor this node has is refused; a registry that does not
/// answer leaves the name unresolved, with a warning.
async fn resolve_image(d: &Daemon, c: &mut ContainerSpec) -> anyhow::Result<Option<String>> {
    use super::registry::PullError;
    let name = super::archive::normalize(&c.image).map_err(|e| ApiError::invalid(e.to_string()))?;
    c.image = name;
    if let Some((name, digest)) = c.image.split_once('@') {
        c.digest = Some(digest.to_owned());
        c.image = name.to_owned();
        return Ok(None);
    }
    // As Docker does, the registry decides what a name means now; an image
    // only loaded on the nodes (no registry has it) is taken from this
    // node's store, with a warning.
    let registry = tokio::time::timeout(RESOLVE_LIMIT, d.engine.registries.resolve(&c.image))
        .await
        .unwrap_or_else(|_| {
            Err(PullError::Unreachable {
                registry: c.image.split('/').next().unwrap_or_default().to_owned(),
                reason: format!("no answer within {} s", RESOLVE_LIMIT.as_secs()),
            })
        });
    let e = match registry {
        Ok(digest) => {
            c.digest = Some(digest);
            return Ok(None);
        }
        Err(e) => e,
    };
    if let Ok(Some(digest)) = d.engine.image_digest(&c.image).await {
        let warning = format!(
            "image {} resolved to {digest} from this node's images ({e}): every node must hold that image (shoal image load) or reach a registry that has it",
            c.image
        );
        c.digest = Some(digest);
        return Ok(Some(warning));
    }
    match e {
        e @ PullError::NotFound(_) => Err(ApiError::not_found(format!(
            "{e} (its registry has no such image or tag, and this node holds none by that name)"
        ))),
        e => {
            c.digest = None;
            Ok(Some(format!(
                "image {} could not be resolved to a digest ({e}): each node runs what the name names on it, possibly different versions",
                c.image
            )))
        }
    }
}

/// `service create`.
pub async fn create(
    d: &Daemon,
    mut spec: ServiceSpec,
    networks: &[AttachmentRef],
) -> anyhow::Result<Reply> {
    let m = d.member().await?;
    let warning = match &mut spec.container {
        Some(c) => resolve_image(d, c).await?,
        None if spec.command.is_empty() => {
            return Err(ApiError::invalid(
                "a service needs an image or a command: shoal service create --name NAME IMAGE [COMMAND], or -- COMMAND for a host program",
            ));
        }
        None => None,
    };
    wait_for_networks(&m, networks).await;
    let state = m.state.state();
    spec.networks = networks
        .iter()
        .map(|a| resolve_attachment(&state, a))
        .collect::<anyhow::Result<_>>()?;
    check_ports_free(&spec.ports)?;
    let id = ServiceId::new(shoal_mesh::ids::to_hex(&rand::random::<[u8; 8]>()));
    m.propose(Command::CreateService {
        id: id.clone(),
        spec,
        created_at_ms: now_ms(),
    })
    .await?;
    m.wait_for(std::time::Duration::from_secs(5), |s| {
        s.services.contains_key(&id)
    })
    .await;
    let state = m.state.state();
    let s = state
        .services
        .get(&id)
        .ok_or_else(|| anyhow!("service created but not yet in this node's copy"))?;
    let mut reply = Reply::of(&view(&state, s))?;
    reply.warnings.extend(warning);
    Ok(reply)
}

/// `service update`.
pub async fn update(d: &Daemon, u: ServiceUpdate) -> anyhow::Result<Reply> {
    let m = d.member().await?;
    wait_for_networks(&m, &u.network_add).await;
    let state = m.state.state();
    let s = resolve(&state, &u.service)?;
    let mut spec = updated_spec(&state, &s.spec, &u)?;
    let mut warning = None;
    if let Some(image) = &u.image {
        let Some(c) = &mut spec.container else {
            return Err(ApiError::invalid(format!(
                "service `{}` runs a host program (--runtime process): --image needs a container service",
                s.spec.name
            )));
        };
        c.image.clone_from(image);
        warning = resolve_image(d, c).await?;
    }
    let added: Vec<PortSpec> = spec
        .ports
        .iter()
        .filter(|p| !s.spec.ports.contains(p))
        .cloned()
        .collect();
    check_ports_free(&added)?;
    let id = s.id.clone();
    let before = s.updated_at_ms;
    let now = now_ms().max(before + 1);
    m.propose(Command::UpdateService {
        id: id.clone(),
        spec,
        force: u.force,
        now_ms: now,
    })
    .await?;
    m.wait_for(std::time::Duration::from_secs(5), |s| {
        s.services.get(&id).is_some_and(|s| s.updated_at_ms == now)
    })
    .await;
    let state = m.state.state();
    let s = resolve(&state, &id)?;
    let mut reply = Reply::of(&view(&state, s))?;
    reply.warnings.extend(warning);
    Ok(reply)
}

/// A task by ID, unique ID prefix, or name (`SERVICE.SLOT`): the one
/// wanted running if any, else the newest.
fn resolve_task<'a>(state: &'a ClusterState, reference: &str) -> anyhow::Result<&'a Task> {
    if let Some(t) = state.tasks.get(reference) {
        return Ok(t);
    }
    let mut by_name: Vec<&Task> = state
        .tasks
        .values()
        .filter(|t| super::executor::task_name(state, t) == reference)
        .collect();
    if by_name.is_empty() && !reference.is_empty() {
        by_name = state
            .tasks
            .values()
            .filter(|t| t.id.starts_with(reference))
            .collect();
        if by_name.len() > 1 {
            return Err(ApiError::invalid(format!(
                "task ID prefix `{reference}` is ambiguous: give more of it"
            )));
        }
    }
    by_name
        .into_iter()
        .max_by_key(|t| (t.desired == DesiredState::Running, t.created_at_ms))
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no such task: `{reference}` (use `shoal service ps SERVICE`)"
            ))
        })
}

/// `shoal exec`: the task's process on this node, for the CLI to enter its
/// namespaces.
pub async fn task_exec(d: &Daemon, reference: &str) -> anyhow::Result<Reply> {
    use shoal_mesh::task::TaskState;
    let m = d.member().await?;
    let state = m.state.state();
    let t = resolve_task(&state, reference)?;
    let name = super::executor::task_name(&state, t);
    let Some(node) = t.node else {
        return Err(ApiError::conflict(format!(
            "task {name} is not placed on any node ({})",
            t.message
        )));
    };
    if node != m.id {
        let host = state
            .nodes
            .get(&node)
            .map(|n| n.hostname.clone())
            .unwrap_or_default();
        return Err(ApiError::conflict(format!(
            "task {name} runs on node {host} ({node}), not this one: run `shoal exec` there"
        )));
    }
    if state
        .services
        .get(&t.service_id)
        .is_some_and(|s| s.spec.container.is_some())
    {
        // Entered through containerd (`TaskExecIn`).
        return Ok(Reply::ok(
            json!({ "task": t.id, "name": name, "container": true }),
        ));
    }
    // The process this node's executor started decides: the store can
    // trail it by a moment (a task just started shows `Assigned` here until
    // the leader's commit of `Running` reaches this node).
    let dir = m.dir.0.join("tasks");
    let live = super::shim::read_pids(&dir, &t.id)
        .filter(|p| super::shim::start_time(p.child).is_some())
        .map(|p| p.child);
    let pid = match live {
        Some(pid) => pid,
        _ if t.state != TaskState::Running => {
            let why = if t.message.is_empty() {
                String::new()
            } else {
                format!(": {}", t.message)
            };
            return Err(ApiError::conflict(format!(
                "task {name} is not running (it is {:?}{why})",
                t.state
            )));
        }
        _ => {
            return Err(ApiError::conflict(format!(
                "task {name}'s process is not running on this node"
            )));
        }
    };
    let service = state.services.get(&t.service_id);
    let mut env: BTreeMap<String, String> = service.map(|s| s.spec.env.clone()).unwrap_or_default();
    env.insert("SHOAL_TASK_ID".into(), t.id.to_string());
    env.insert("SHOAL_TASK_NAME".into(), name.clone());
    if let Some(s) = service {
        env.insert("SHOAL_SERVICE_NAME".into(), s.spec.name.clone());
    }
    Ok(Reply::ok(json!({
        "task": t.id,
        "name": name,
        "pid": pid,
        "namespaced": super::executor::is_root(),
        "env": env,
    })))
}

/// Most output `shoal exec` into a container returns, per stream.
const EXEC_OUTPUT: u64 = 4 << 20;

/// `shoal exec` into container task `reference` on this node: the
/// command's exit status and output.
pub async fn task_exec_in(
    d: &Daemon,
    reference: &str,
    command: Vec<String>,
    stdio: Option<crate::api::ExecStdio>,
) -> anyhow::Result<Reply> {
    use std::io::Read;
    let m = d.member().await?;
    let state = m.state.state();
    let t = resolve_task(&state, reference)?;
    let name = super::executor::task_name(&state, t);
    if t.node != Some(m.id) || t.state != shoal_mesh::task::TaskState::Running {
        return Err(ApiError::conflict(format!(
            "task {name} is not running on this node"
        )));
    }
    if command.is_empty() {
        return Err(ApiError::invalid(
            "no command: shoal exec TASK -- COMMAND [ARG...]",
        ));
    }
    if let Some(stdio) = stdio {
        // Streamed through the client's FIFOs.
        let fifos = ExecFifos::check(&stdio)?;
        let status = d
            .engine
            .exec(&t.id, &command, &[], fifos.io(stdio.terminal), None)
            .await
            .map_err(|e| ApiError::conflict(format!("cannot exec in task {name}: {e}")))?;
        return Reply::of(&super::containers::Ended {
            exit_status: status.unwrap_or(137),
            stdout: String::new(),
            stderr: String::new(),
        });
    }
    let dir = m.dir.0.join("tasks");
    let n = rand::random::<u32>();
    let (out, err) = (
        dir.join(format!("{}.exec-{n:08x}.out", t.id)),
        dir.join(format!("{}.exec-{n:08x}.err", t.id)),
    );
    let status = d
        .engine
        .exec(
            &t.id,
            &command,
            &[],
            super::containers::ExecIo::Files(&out, &err),
            None,
        )
        .await
        .map_err(|e| ApiError::conflict(format!("cannot exec in task {name}: {e}")));
    let read = |p: &std::path::Path| {
        let mut buf = Vec::new();
        if let Ok(f) = std::fs::File::open(p) {
            let _ = f.take(EXEC_OUTPUT).read_to_end(&mut buf);
        }
        let _ = std::fs::remove_file(p);
        String::from_utf8_lossy(&buf).into_owned()
    };
    let (stdout, stderr) = (read(&out), read(&err));
    let status = status?.unwrap_or(137);
    Reply::of(&super::containers::Ended {
        exit_status: status,
        stdout,
        stderr,
    })
}

/// The FIFOs a `shoal exec -i|-t` client made, checked to be FIFOs (a
/// path to a regular file would have containerd's shim write into it).
struct ExecFifos {
    stdin: Option<std::path::PathBuf>,
    stdout: std::path::PathBuf,
    stderr: Option<std::path::PathBuf>,
}

impl ExecFifos {
    fn check(stdio: &crate::api::ExecStdio) -> anyhow::Result<Self> {
        use std::os::unix::fs::FileTypeExt;
        let fifo = |name: &str| -> anyhow::Result<std::path::PathBuf> {
            let path = stdio.dir.join(name);
            let is_fifo = stdio.dir.is_absolute()
                && std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_fifo());
            if is_fifo {
                Ok(path)
            } else {
                Err(ApiError::invalid(format!(
                    "{} is not a FIFO: shoal exec -i/-t streams through FIFOs the CLI makes on this node",
                    path.display()
                )))
            }
        };
        Ok(ExecFifos {
            stdin: stdio.stdin.then(|| fifo("in")).transpose()?,
            stdout: fifo("out")?,
            stderr: stdio.terminal.is_none().then(|| fifo("err")).transpose()?,
        })
    }

    fn io(&self, terminal: Option<(u16, u16)>) -> super::containers::ExecIo<'_> {
        super::containers::ExecIo::Fifos {
            stdin: self.stdin.as_deref(),
            stdout: &self.stdout,
            stderr: self.stderr.as_deref(),
            terminal,
        }
    }
}

/// `service ls`.
pub async fn ls(d: &Daemon) -> anyhow::Result<Reply> {
    let m = d.member().await?;
    let state = m.state.state();
    let mut list: Vec<&Service> = state.services.values().collect();
    list.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    let views: Vec<ServiceView> = list.into_iter().map(|s| view(&state, s)).collect();
    Reply::of(&views)
}

/// `service inspect`.
pub async fn inspect(d: &Daemon, reference: &str) -> anyhow::Result<Reply> {
    let m = d.member().await?;
    let state = m.state.state();
    let s = resolve(&state, reference)?;
    let mut v = view(&state, s);
    // Where this node runs a data plane, gossip tells which tasks the load
    // balancers, the routing mesh and DNS have.
    if m.sandboxes.names.is_some() {
        let endpoints = m
            .gossip
            .ask(super::gossip::GossipCmd::Endpoints)
            .await
            .unwrap_or_default();
        let programmed = m.sandboxes.last_plan().unwrap_or_default();
        v.ready = Some(ready(&state, s, &endpoints, &programmed) as u64);
    }
    Reply::of(&v)
}

/// The running tasks of `s` at its current version.
fn up_to_date<'a>(state: &'a ClusterState, s: &'a Service) -> impl Iterator<Item = &'a Task> {
    state.tasks_of(&s.id).filter(|t| {
        t.is_active()
            && t.state == shoal_mesh::task::TaskState::Running
            && t.spec_version == s.version
    })
}

/// How many running tasks of `s`'s current version new connections
/// reach: gossip publishes them (on every one of their networks, from
/// their own node: each network's record travels on its own), and this
/// node's data plane, as last `programmed`, balances to them: the
/// service's VIP on each of their networks present here, and each of its
/// routing-mesh ports.
fn ready(
    state: &ClusterState,
    s: &Service,
    endpoints: &BTreeMap<String, Vec<shoal_mesh::observed::EndpointRecord>>,
    programmed: &shoal_mesh::plan::NodePlan,
) -> usize {
    let in_vips = |t: &Task| {
        t.addresses.iter().all(|(net, ip)| {
            let lb = programmed
                .networks
                .get(net)
                .and_then(|n| n.lbs.iter().find(|l| l.service_id == s.id));
            lb.is_none_or(|l| l.backends.contains(ip))
        })
    };
    let in_mesh = |t: &Task| {
        let Some(mesh) = &programmed.ingress else {
            return true;
        };
        let Some(addr) = t.addresses.get(&mesh.network) else {
            return true;
        };
        s.ports
            .iter()
            .filter(|p| p.mode == PublishMode::Ingress)
            .all(|p| {
                mesh.ports.iter().any(|m| {
                    m.protocol == p.protocol
                        && m.published == p.published
                        && m.backends.contains(addr)
                })
            })
    };
    let published = |t: &Task| {
        t.addresses.iter().all(|(net, ip)| {
            endpoints.get(net.as_str()).is_some_and(|list| {
                list.iter()
                    .any(|e| e.ip == std::net::IpAddr::V4(*ip) && Some(e.owner) == t.node)
            })
        })
    };
    up_to_date(state, s)
        .filter(|t| t.addresses.is_empty() || (published(t) && in_vips(t) && in_mesh(t)))
        .count()
}

/// `service ps`.
pub async fn ps(d: &Daemon, reference: &str) -> anyhow::Result<Reply> {
    let m = d.member().await?;
    let state = m.state.state();
    let s = resolve(&state, reference)?;
    let mut tasks: Vec<&Task> = state
        .tasks
        .values()
        .filter(|t| t.service_id == s.id)
        .collect();
    tasks.sort_by_key(|t| (t.slot, t.node, std::cmp::Reverse(t.created_at_ms)));
    let views: Vec<TaskView> = tasks.into_iter().map(|t| task_view(&state, t)).collect();
    Reply::of(&views)
}

/// `service rm`.
pub async fn rm(d: &Daemon, reference: &str) -> anyhow::Result<Reply> {
    let m = d.member().await?;
    let state = m.state.state();
    let s = resolve(&state, reference)?;
    m.propose(Command::RemoveService { id: s.id.clone() })
        .await?;
    Reply::of(&Named {
        id: s.id.to_string(),
        name: s.spec.name.clone(),
    })
}

/// `service scale`.
pub async fn scale(d: &Daemon, reference: &str, replicas: u64) -> anyhow::Result<Reply> {
    let m = d.member().await?;
    let state = m.state.state();
    let s = resolve(&state, reference)?;
    m.propose(Command::ScaleService {
        id: s.id.clone(),
        replicas,
    })
    .await?;
    Reply::of(&Named {
        id: s.id.to_string(),
        name: s.spec.name.clone(),
    })
}

/// `service logs`: each task's output from its offset, read on the node
/// that runs it.
pub async fn logs(
    d: &Daemon,
    reference: &str,
    offsets: &BTreeMap<String, u64>,
) -> anyhow::Result<Reply> {
    let m = d.member().await?;
    let state = m.state.state();
    let s = resolve(&state, reference)?;
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    let mut tasks: Vec<&Task> = state
        .tasks
        .values()
        .filter(|t| t.service_id == s.id && t.node.is_some())
        .collect();
    tasks.sort_by_key(|t| (t.slot, t.created_at_ms));
    for t in tasks {
        let Some(node) = t.node else { continue };
        let offset = offsets.get(t.id.as_str()).copied().unwrap_or(0);
        let read = if node == m.id {
            super::executor::read_log(&m.dir.0, &t.id, offset).map_err(|e| e.to_string())
        } else {
            let req = shoal_mesh::wire::CtlRequest::TaskLog {
                task: t.id.to_string(),
                offset,
            };
            match m
                .writer
                .ctl(node, &req, std::time::Duration::from_secs(3))
                .await
            {
                Ok(shoal_mesh::wire::CtlReply::TaskLog { text, next }) => Ok((text, next)),
                Ok(shoal_mesh::wire::CtlReply::Refused(msg)) => Err(msg),
                Ok(_) => Err("unexpected reply".into()),
                Err(e) => Err(e.to_string()),
            }
        };
        let view = task_view(&state, t);
        match read {
            Ok((text, next)) => out.push(TaskLogView {
                task: t.id.to_string(),
                name: view.name,
                node: view.node,
                next,
                text: String::from_utf8_lossy(&text).into_owned(),
            }),
            Err(e) if t.state == TaskState::Pending => drop(e),
            Err(e) => warnings.push(format!("{}: {e}", view.name)),
        }
    }
    let mut reply = Reply::of(&out)?;
    reply.warnings = warnings;
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::ExecFifos;
    use crate::api::ExecStdio;

    #[test]
    fn exec_streams_only_through_fifos() {
        use nix::sys::stat::Mode;
        let dir = tempfile::tempdir().unwrap();
        let stdio = |terminal| ExecStdio {
            dir: dir.path().to_owned(),
            stdin: true,
            terminal,
        };
        // Regular files (say, /etc/shadow named by a client): refused.
        for name in ["in", "out", "err"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let e = ExecFifos::check(&stdio(None)).err().unwrap();
        assert!(e.to_string().contains("is not a FIFO"), "{e}");
        for name in ["in", "out", "err"] {
            std::fs::remove_file(dir.path().join(name)).unwrap();
            nix::unistd::mkfifo(&dir.path().join(name), Mode::S_IRUSR | Mode::S_IWUSR).unwrap();
        }
        let ok = ExecFifos::check(&stdio(None)).unwrap();
        assert!(ok.stdin.is_some() && ok.stderr.is_some());
        // On a terminal, errors go with the output.
        assert!(
            ExecFifos::check(&stdio(Some((80, 24))))
                .unwrap()
                .stderr
                .is_none()
        );
        // A relative directory is refused.
        let relative = ExecStdio {
            dir: "fifos".into(),
            stdin: false,
            terminal: None,
        };
        assert!(ExecFifos::check(&relative).is_err());
    }
}
