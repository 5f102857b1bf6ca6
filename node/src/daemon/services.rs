//! `service create|ls|ps|inspect|rm|scale`.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail};
use serde_json::{Value, json};
use shoal_mesh::service::{
    Attachment, EndpointMode, PortSpec, Protocol, PublishMode, RestartCondition, Service,
    ServiceMode, ServiceSpec,
};
use shoal_mesh::task::{DesiredState, Task};
use shoal_mesh::{ClusterState, Command};

use super::agent::Daemon;
use super::clock::now_ms;
use crate::api::{Policies, Reply, ServiceUpdate};

/// The raw `service create` arguments.
pub struct CreateArgs {
    /// Name.
    pub name: String,
    /// `--replicas`.
    pub replicas: Option<u64>,
    /// `--mode`.
    pub mode: String,
    /// `--network`.
    pub networks: Vec<String>,
    /// `--publish`.
    pub publish: Vec<String>,
    /// `--endpoint-mode`.
    pub endpoint_mode: String,
    /// `--constraint`.
    pub constraints: Vec<String>,
    /// `--env`.
    pub env: Vec<String>,
    /// `--label`.
    pub labels: Vec<String>,
    /// The command.
    pub command: Vec<String>,
    /// `--restart-*`, `--update-*`.
    pub policies: Policies,
}

fn port_number(text: &str, what: &str) -> anyhow::Result<u16> {
    text.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| anyhow!("invalid {what} port `{text}`: use 1 to 65535"))
}

/// `-p 8080:80`, `-p 80`, `-p 53:53/udp`, or
/// `mode=ingress|host,published=P,target=T,protocol=tcp|udp`.
pub fn parse_publish(text: &str) -> anyhow::Result<PortSpec> {
    let bad = || {
        anyhow!(
            "invalid --publish `{text}`: use PUBLISHED:TARGET[/udp] or mode=ingress|host,published=P,target=T[,protocol=tcp|udp]"
        )
    };
    if text.contains('=') {
        let mut spec = PortSpec {
            mode: PublishMode::Ingress,
            published: None,
            target: 0,
            protocol: Protocol::Tcp,
        };
        for kv in text.split(',') {
            let (k, v) = kv.split_once('=').ok_or_else(bad)?;
            match k {
                "mode" => {
                    spec.mode = match v {
                        "ingress" => PublishMode::Ingress,
                        "host" => PublishMode::Host,
                        _ => return Err(bad()),
                    }
                }
                "published" => spec.published = Some(port_number(v, "published")?),
                "target" => spec.target = port_number(v, "target")?,
                "protocol" => {
                    spec.protocol = match v {
                        "tcp" => Protocol::Tcp,
                        "udp" => Protocol::Udp,
                        _ => return Err(bad()),
                    }
                }
                _ => return Err(bad()),
            }
        }
        if spec.target == 0 {
            bail!("invalid --publish `{text}`: target= is required");
        }
        return Ok(spec);
    }
    let (ports, protocol) = match text.split_once('/') {
        Some((p, "udp")) => (p, Protocol::Udp),
        Some((p, "tcp")) => (p, Protocol::Tcp),
        Some(_) => return Err(bad()),
        None => (text, Protocol::Tcp),
    };
    let (published, target) = match ports.split_once(':') {
        Some((p, t)) => (
            Some(port_number(p, "published")?),
            port_number(t, "target")?,
        ),
        None => (None, port_number(ports, "target")?),
    };
    Ok(PortSpec {
        mode: PublishMode::Ingress,
        published,
        target,
        protocol,
    })
}

fn key_values(items: &[String], flag: &str) -> anyhow::Result<BTreeMap<String, String>> {
    items
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(anyhow!("invalid {flag} `{kv}`: use KEY=VALUE")),
        })
        .collect()
}

/// `--network NET` or `--network name=NET,alias=A`.
fn parse_network(state: &ClusterState, n: &str) -> anyhow::Result<Attachment> {
    let (name, aliases) = if n.contains('=') {
        let kv = key_values(
            &n.split(',').map(str::to_owned).collect::<Vec<_>>(),
            "--network",
        )?;
        let name = kv
            .get("name")
            .cloned()
            .ok_or_else(|| anyhow!("invalid --network `{n}`: name= is required"))?;
        (name, kv.get("alias").cloned().into_iter().collect())
    } else {
        (n.to_owned(), Vec::new())
    };
    let net = state.resolve_network(&name).ok_or_else(|| {
        anyhow!("network `{name}` not found (create it with `shoal network create {name}`)")
    })?;
    Ok(Attachment {
        network: net.id.clone(),
        aliases,
    })
}

fn parse_constraint(c: &str) -> anyhow::Result<shoal_mesh::constraint::Constraint> {
    c.parse()
        .map_err(|e: shoal_mesh::constraint::ConstraintError| anyhow!(e))
}

/// Applies the `--restart-*` / `--update-*` flags given to `spec`.
fn apply_policies(spec: &mut ServiceSpec, p: &Policies) -> anyhow::Result<()> {
    if let Some(c) = &p.restart_condition {
        spec.restart.condition = match c.as_str() {
            "none" => RestartCondition::None,
            "on-failure" => RestartCondition::OnFailure,
            "any" => RestartCondition::Any,
            other => bail!("invalid --restart-condition `{other}`: use none, on-failure or any"),
        };
    }
    if let Some(n) = p.restart_max_attempts {
        spec.restart.max_attempts = n;
    }
    if let Some(d) = p.restart_delay {
        spec.restart.delay_ms = d;
    }
    if let Some(n) = p.update_parallelism {
        spec.update.parallelism = n;
    }
    if let Some(d) = p.update_delay {
        spec.update.delay_ms = d;
    }
    Ok(())
}

fn parse_spec(state: &ClusterState, a: CreateArgs) -> anyhow::Result<ServiceSpec> {
    let mode = match (a.mode.as_str(), a.replicas) {
        ("replicated", r) => ServiceMode::Replicated(r.unwrap_or(1)),
        ("global", None) => ServiceMode::Global,
        ("global", Some(_)) => bail!("--replicas cannot be used with --mode global"),
        (other, _) => bail!("invalid --mode `{other}`: use replicated or global"),
    };
    let endpoint_mode = match a.endpoint_mode.as_str() {
        "vip" => EndpointMode::Vip,
        "dnsrr" => EndpointMode::Dnsrr,
        other => bail!("invalid --endpoint-mode `{other}`: use vip or dnsrr"),
    };
    let networks = a
        .networks
        .iter()
        .map(|n| parse_network(state, n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(ServiceSpec {
        name: a.name,
        mode,
        networks,
        ports: a
            .publish
            .iter()
            .map(|p| parse_publish(p))
            .collect::<anyhow::Result<_>>()?,
        endpoint_mode,
        constraints: a
            .constraints
            .iter()
            .map(|c| parse_constraint(c))
            .collect::<anyhow::Result<_>>()?,
        env: key_values(&a.env, "--env")?,
        command: a.command,
        labels: key_values(&a.labels, "--label")?,
        restart: Default::default(),
        update: Default::default(),
    })
    .and_then(|mut spec| {
        apply_policies(&mut spec, &a.policies)?;
        Ok(spec)
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
            bail!(
                "port {port}/{} is already in use on this node by another program: publish another port",
                p.protocol.as_str()
            );
        }
    }
    Ok(())
}

/// Whether a published port matches a `--publish-rm` argument: its target
/// (`80`, `80/udp`) or published and target (`8080:80`).
fn port_matches(p: &PortSpec, text: &str) -> anyhow::Result<bool> {
    let asked = parse_publish(text).map_err(|_| {
        anyhow!("invalid --publish-rm `{text}`: use TARGET[/udp] or PUBLISHED:TARGET[/udp]")
    })?;
    Ok(p.target == asked.target
        && p.protocol == asked.protocol
        && asked.published.is_none_or(|a| p.published == Some(a)))
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
            ServiceMode::Global => bail!(
                "service `{}` is global: it runs one task per node, --replicas does not apply",
                old.name
            ),
        }
    }
    for k in &u.env_rm {
        spec.env.remove(k);
    }
    spec.env.extend(key_values(&u.env_add, "--env-add")?);
    for k in &u.label_rm {
        spec.labels.remove(k);
    }
    spec.labels.extend(key_values(&u.label_add, "--label-add")?);
    for c in &u.constraint_rm {
        let c = parse_constraint(c)?;
        spec.constraints.retain(|x| *x != c);
    }
    for c in &u.constraint_add {
        let c = parse_constraint(c)?;
        if !spec.constraints.contains(&c) {
            spec.constraints.push(c);
        }
    }
    for text in &u.publish_rm {
        let before = spec.ports.len();
        let mut err = None;
        spec.ports.retain(|p| match port_matches(p, text) {
            Ok(m) => !m,
            Err(e) => {
                err = Some(e);
                true
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        if spec.ports.len() == before {
            bail!("--publish-rm `{text}`: the service publishes no such port");
        }
    }
    for text in &u.publish_add {
        spec.ports.push(parse_publish(text)?);
    }
    for n in &u.network_rm {
        let net = state
            .resolve_network(n)
            .ok_or_else(|| anyhow!("network `{n}` not found"))?;
        let before = spec.networks.len();
        spec.networks.retain(|a| a.network != net.id);
        if spec.networks.len() == before {
            bail!("--network-rm `{n}`: the service is not attached to it");
        }
    }
    for n in &u.network_add {
        spec.networks.push(parse_network(state, n)?);
    }
    if let Some(m) = &u.endpoint_mode {
        spec.endpoint_mode = match m.as_str() {
            "vip" => EndpointMode::Vip,
            "dnsrr" => EndpointMode::Dnsrr,
            other => bail!("invalid --endpoint-mode `{other}`: use vip or dnsrr"),
        };
    }
    if !u.command.is_empty() {
        spec.command.clone_from(&u.command);
    }
    apply_policies(&mut spec, &u.policies)?;
    Ok(spec)
}

fn resolve<'a>(state: &'a ClusterState, reference: &str) -> anyhow::Result<&'a Service> {
    state
        .resolve_service(reference)
        .ok_or_else(|| anyhow!("no such service: `{reference}` (use `shoal service ls`)"))
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
fn view(state: &ClusterState, s: &Service) -> Value {
    let running = state
        .tasks
        .values()
        .filter(|t| {
            t.service_id == s.id
                && t.desired == DesiredState::Running
                && t.state == shoal_mesh::task::TaskState::Running
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
        .tasks
        .values()
        .filter(|t| t.service_id == s.id && t.is_active() && t.spec_version < s.version)
        .count();
    let update_status = match shoal_mesh::orchestrator::update_paused(state, s) {
        Some(why) => Some(why),
        None if outdated > 0 => Some(format!("updating: {outdated} task(s) to replace")),
        None if s.version > 1 => Some("completed".to_owned()),
        None => None,
    };
    json!({
        "id": s.id,
        "name": s.spec.name,
        "mode": match s.spec.mode { ServiceMode::Replicated(_) => "replicated", ServiceMode::Global => "global" },
        "replicas": desired(state, s),
        "running": running,
        "up_to_date": up_to_date,
        "version": s.version,
        "update_status": update_status,
        "command": s.spec.command,
        "endpoint_mode": s.spec.endpoint_mode,
        "networks": s.spec.networks.iter().map(|a| json!({"network": net_name(&a.network), "aliases": a.aliases})).collect::<Vec<_>>(),
        "vips": s.vips.iter().map(|(n, ip)| (net_name(n), ip.to_string())).collect::<BTreeMap<_, _>>(),
        "ports": s.ports,
        "constraints": s.spec.constraints.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        "env": s.spec.env,
        "labels": s.spec.labels,
        "restart_policy": {
            "condition": s.spec.restart.condition.as_str(),
            "max_attempts": s.spec.restart.max_attempts,
            "delay_ms": s.spec.restart.delay_ms,
        },
        "update_config": {
            "parallelism": s.spec.update.parallelism,
            "delay_ms": s.spec.update.delay_ms,
        },
        "created_at_ms": s.created_at_ms,
        "updated_at_ms": s.updated_at_ms,
    })
}

fn task_view(state: &ClusterState, t: &Task) -> Value {
    let name = super::executor::task_name(state, t);
    json!({
        "id": t.id,
        "name": name,
        "node": t.node.and_then(|n| state.nodes.get(&n)).map(|n| n.hostname.clone()),
        "node_id": t.node.map(|n| n.to_string()),
        "desired_state": t.desired,
        "state": t.state,
        "message": t.message,
        "error": if matches!(t.state, shoal_mesh::task::TaskState::Failed | shoal_mesh::task::TaskState::Pending) { t.message.as_str() } else { "" },
        "spec_version": t.spec_version,
        "restarts": t.restarts,
        "exit_code": t.exit_code,
        "addresses": t.addresses.iter().map(|(n, ip)| (state.networks.get(n).map(|x| x.spec.name.clone()).unwrap_or_else(|| n.clone()), ip.to_string())).collect::<BTreeMap<_, _>>(),
        "updated_at_ms": t.updated_at_ms,
    })
}

/// A network created through another node a moment ago may not have
/// reached this node's copy yet: gives the `--network` arguments (NET or
/// name=NET,…) a moment to resolve before they are refused.
async fn wait_for_networks(m: &super::member::Member, networks: &[String]) {
    let names: Vec<&str> = networks
        .iter()
        .map(|n| {
            n.split(',')
                .find_map(|kv| kv.strip_prefix("name="))
                .unwrap_or(n)
        })
        .collect();
    m.wait_for(std::time::Duration::from_secs(2), |s| {
        names.iter().all(|n| s.resolve_network(n).is_some())
    })
    .await;
}

/// `service create`.
pub async fn create(d: &Daemon, args: CreateArgs) -> anyhow::Result<Reply> {
    let m = d.member().await?;
    if args.command.is_empty() {
        bail!("a service needs a command: shoal service create --name NAME -- COMMAND [ARG...]");
    }
    wait_for_networks(&m, &args.networks).await;
    let spec = parse_spec(&m.state.state(), args)?;
    check_ports_free(&spec.ports)?;
    let id = shoal_mesh::ids::to_hex(&rand::random::<[u8; 8]>());
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
    Ok(Reply::ok(view(&state, s)))
}

/// `service update`.
pub async fn update(d: &Daemon, u: ServiceUpdate) -> anyhow::Result<Reply> {
    let m = d.member().await?;
    wait_for_networks(&m, &u.network_add).await;
    let state = m.state.state();
    let s = resolve(&state, &u.service)?;
    let spec = updated_spec(&state, &s.spec, &u)?;
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
    Ok(Reply::ok(view(&state, s)))
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
            bail!("task ID prefix `{reference}` is ambiguous: give more of it");
        }
    }
    by_name
        .into_iter()
        .max_by_key(|t| (t.desired == DesiredState::Running, t.created_at_ms))
        .ok_or_else(|| anyhow!("no such task: `{reference}` (use `shoal service ps SERVICE`)"))
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
        bail!("task {name} is not placed on any node ({})", t.message);
    };
    if node != m.id {
        let host = state
            .nodes
            .get(&node)
            .map(|n| n.hostname.clone())
            .unwrap_or_default();
        bail!("task {name} runs on node {host} ({node}), not this one: run `shoal exec` there");
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
            bail!("task {name} is not running (it is {:?}{why})", t.state);
        }
        _ => bail!("task {name}'s process is not running on this node"),
    };
    let service = state.services.get(&t.service_id);
    let mut env: BTreeMap<String, String> = service.map(|s| s.spec.env.clone()).unwrap_or_default();
    env.insert("SHOAL_TASK_ID".into(), t.id.clone());
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

/// `service ls`.
pub async fn ls(d: &Daemon) -> anyhow::Result<Reply> {
    let m = d.member().await?;
    let state = m.state.state();
    let mut list: Vec<&Service> = state.services.values().collect();
    list.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    Ok(Reply::ok(Value::Array(
        list.into_iter().map(|s| view(&state, s)).collect(),
    )))
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
        v["ready"] = json!(ready(&state, s, &endpoints, &programmed));
    }
    Ok(Reply::ok(v))
}

/// The running tasks of `s` at its current version.
fn up_to_date<'a>(state: &'a ClusterState, s: &'a Service) -> impl Iterator<Item = &'a Task> {
    state.tasks.values().filter(|t| {
        t.service_id == s.id
            && t.is_active()
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
            endpoints.get(net).is_some_and(|list| {
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
    Ok(Reply::ok(Value::Array(
        tasks.into_iter().map(|t| task_view(&state, t)).collect(),
    )))
}

/// `service rm`.
pub async fn rm(d: &Daemon, reference: &str) -> anyhow::Result<Reply> {
    let m = d.member().await?;
    let state = m.state.state();
    let s = resolve(&state, reference)?;
    m.propose(Command::RemoveService { id: s.id.clone() })
        .await?;
    Ok(Reply::ok(json!({ "id": s.id, "name": s.spec.name })))
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
    Ok(Reply::ok(
        json!({ "id": s.id, "name": s.spec.name, "replicas": replicas }),
    ))
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
        let offset = offsets.get(&t.id).copied().unwrap_or(0);
        let read = if node == m.id {
            super::executor::read_log(&m.dir.0, &t.id, offset).map_err(|e| e.to_string())
        } else {
            let req = super::wire::CtlRequest::TaskLog {
                task: t.id.clone(),
                offset,
            };
            match m.ctl(node, &req, std::time::Duration::from_secs(3)).await {
                Ok(super::wire::CtlReply::TaskLog { text, next }) => Ok((text, next)),
                Ok(super::wire::CtlReply::Refused(msg)) => Err(msg),
                Ok(_) => Err("unexpected reply".into()),
                Err(e) => Err(e.to_string()),
            }
        };
        let view = task_view(&state, t);
        match read {
            Ok((text, next)) => out.push(json!({
                "task": t.id,
                "name": view["name"],
                "node": view["node"],
                "next": next,
                "text": String::from_utf8_lossy(&text),
            })),
            Err(e) if t.state == shoal_mesh::task::TaskState::Pending => drop(e),
            Err(e) => warnings.push(format!(
                "{}: {e}",
                view["name"].as_str().unwrap_or_default()
            )),
        }
    }
    let mut reply = Reply::ok(Value::Array(out));
    reply.warnings = warnings;
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_flags_parse_like_docker() {
        let p = parse_publish("8080:80").unwrap();
        assert_eq!(
            (p.published, p.target, p.protocol, p.mode),
            (Some(8080), 80, Protocol::Tcp, PublishMode::Ingress)
        );
        let p = parse_publish("53:53/udp").unwrap();
        assert_eq!(p.protocol, Protocol::Udp);
        assert_eq!(parse_publish("80").unwrap().published, None);
        let p = parse_publish("mode=host,published=9000,target=90,protocol=udp").unwrap();
        assert_eq!(
            (p.mode, p.published, p.target, p.protocol),
            (PublishMode::Host, Some(9000), 90, Protocol::Udp)
        );
        for bad in [
            "0:80",
            "8080:",
            "80/sctp",
            "mode=x,target=1",
            "published=1",
            "70000:80",
        ] {
            assert!(parse_publish(bad).is_err(), "{bad}");
        }
    }
}
