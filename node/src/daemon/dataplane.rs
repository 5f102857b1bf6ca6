//! The data-plane loop on every node (as root): plans this node's kernel
//! state from the store and gossip (`shoal_mesh::plan`), reconciles it with
//! the Linux backend (`shoal_netdriver`), tells the executor which task
//! sandboxes are ready, and publishes the local endpoints into gossip (and
//! attaches to the networks that have them).
//!
//! It plans when the store, gossip or a task's health changes, and
//! reconciles when the plan changed; every 30 s it compares the kernel
//! anyway, so that what something else removed is put back (an idle node
//! does nothing in between). At start it adopts what a
//! previous run left (the reconciler diffs against the kernel, not memory).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_gossip::MemberState;
use shoal_mesh::ids::NodeId;
use shoal_mesh::observed::{EndpointKey, EndpointRecord, TableValue};
use shoal_mesh::plan::{NodePlan, PlanInput, awaited_endpoints, mac_text, plan};
use shoal_mesh::service::Protocol;
use shoal_mesh::{ClusterState, NetworkId, TaskId};
use shoal_netdriver::dns::{self, Records};
use shoal_netdriver::linux::{Linux, NETNS_DIR};
use shoal_netdriver::render::{Gateway, Names, gateway_addrs, held_gateway_addrs, render};
use shoal_netdriver::{Backend, reconcile};
use shoal_raft::StateHandle;

use super::config::DataplaneConfig;
use super::gossip::{GossipCmd, GossipHandle};
use super::sandboxes::Sandboxes;

/// The gossip table of endpoints.
pub const ENDPOINTS: &str = "endpoints";

/// How often the kernel is compared with the plan when nothing changed
/// (to put back what something else removed): an idle node does nothing
/// in between.
const AUDIT_EVERY: Duration = Duration::from_secs(30);
/// How long a restarted daemon at most lets gossip catch up before it
/// touches the kernel state it found (it goes on as soon as gossip shows
/// every running remote task's endpoint, or that task's node dead).
const WARM_UP_MAX: Duration = Duration::from_secs(10);

/// How long a new task with published ports is held out of gossip (so out
/// of every load balancer and DNS answer) while it does not listen on its
/// service's target ports; after that it is published anyway.
const LISTEN_WAIT_MAX: Duration = Duration::from_secs(10);

/// Which local tasks may be published: those that listen on every target
/// port their service publishes (TCP listening, UDP bound), those whose
/// service publishes none, and those that waited `LISTEN_WAIT_MAX`. Swarm
/// without a health check adds a task to its VIP once it starts, and the
/// first connections to a replacement are refused until its process
/// listens; this holds them back until then.
#[derive(Default)]
struct ListenGate {
    /// When each waiting task was first seen.
    waiting: BTreeMap<TaskId, Instant>,
    /// Tasks let through (they stay so).
    open: BTreeSet<TaskId>,
}

impl ListenGate {
    /// The tasks of `plan` still held, with the ports (protocol, target)
    /// their service publishes: whose namespaces the driver reads.
    fn held(
        &self,
        state: &ClusterState,
        plan: &NodePlan,
    ) -> BTreeMap<TaskId, Vec<(Protocol, u16)>> {
        plan.sandboxes
            .keys()
            .filter(|t| !self.open.contains(*t))
            .map(|id| {
                let ports = state
                    .tasks
                    .get(id)
                    .and_then(|t| state.services.get(&t.service_id))
                    .map(|s| s.ports.iter().map(|p| (p.protocol, p.target)).collect())
                    .unwrap_or_default();
                (id.clone(), ports)
            })
            .collect()
    }

    /// Lets through, of the `held` tasks (see [`Self::held`]), those whose
    /// service publishes no port, those that listen on every target port
    /// (`heard`: what each task's namespace listens on, where read), and
    /// those held for [`LISTEN_WAIT_MAX`] since first seen; forgets tasks
    /// no longer in `plan`. Pure: `now` comes in. Returns the tasks let
    /// through without listening.
    fn decide(
        &mut self,
        plan: &NodePlan,
        held: &BTreeMap<TaskId, Vec<(Protocol, u16)>>,
        heard: &BTreeMap<TaskId, shoal_netdriver::listeners::Listeners>,
        now: Instant,
    ) -> Vec<TaskId> {
        self.waiting.retain(|t, _| plan.sandboxes.contains_key(t));
        self.open.retain(|t| plan.sandboxes.contains_key(t));
        let mut late = Vec::new();
        for (id, ports) in held {
            let since = *self.waiting.entry(id.clone()).or_insert(now);
            let listens = heard.get(id).is_some_and(|l| {
                ports.iter().all(|(proto, port)| match proto {
                    Protocol::Tcp => l.tcp.contains(port),
                    Protocol::Udp => l.udp.contains(port),
                })
            });
            if ports.is_empty() || listens {
                self.open.insert(id.clone());
            } else if now.saturating_duration_since(since) > LISTEN_WAIT_MAX {
                late.push(id.clone());
                self.open.insert(id.clone());
            }
        }
        self.waiting.retain(|t, _| !self.open.contains(t));
        late
    }

    /// Reads the listeners of the `held` tasks (see [`Self::held`]) that
    /// publish ports, then decides.
    async fn update(
        &mut self,
        names: &Names,
        plan: &NodePlan,
        held: BTreeMap<TaskId, Vec<(Protocol, u16)>>,
    ) {
        let mut heard = BTreeMap::new();
        for (id, ports) in held.iter().filter(|(_, p)| !p.is_empty()) {
            let path = std::path::Path::new(NETNS_DIR).join(names.task_name(id));
            let read =
                tokio::task::spawn_blocking(move || shoal_netdriver::listeners::in_namespace(path));
            match read.await {
                Ok(Ok(l)) => drop(heard.insert(id.clone(), l)),
                _ => tracing::debug!(task = %id, ?ports, "listeners not read"),
            }
        }
        for id in self.decide(plan, &held, &heard, Instant::now()) {
            tracing::warn!(
                task = %id,
                ports = ?held.get(&id),
                "the task does not listen on its service's target ports; adding it to the load balancers anyway"
            );
        }
    }

    /// Whether the endpoint record under `key` may be published: a node's
    /// own routing-mesh address always, a task's once let through.
    fn lets_through(&self, key: &EndpointKey) -> bool {
        match key {
            EndpointKey::Node(_) => true,
            EndpointKey::Task(id) => self.open.contains(id),
        }
    }

    /// Whether a task still waits (the loop then looks again sooner).
    fn pending(&self) -> bool {
        !self.waiting.is_empty()
    }
}

fn vtep_of(state: &ClusterState, me: NodeId) -> Option<Ipv4Addr> {
    let addr = &state.nodes.get(&me)?.addr;
    match addr.parse::<std::net::SocketAddr>().ok()?.ip() {
        IpAddr::V4(v) => Some(v),
        IpAddr::V6(_) => None,
    }
}

/// The endpoint records this node publishes for `plan`, by (network, task).
fn local_records(
    state: &ClusterState,
    me: NodeId,
    plan: &NodePlan,
    vtep: Ipv4Addr,
) -> BTreeMap<(NetworkId, EndpointKey), EndpointRecord> {
    let mut out = BTreeMap::new();
    for sb in plan.sandboxes.values() {
        let task = state.tasks.get(&sb.task);
        let service = task.and_then(|t| state.services.get(&t.service_id));
        for ep in &sb.endpoints {
            let aliases = service
                .and_then(|s| s.spec.networks.iter().find(|a| a.network == ep.network))
                .map(|a| a.aliases.clone())
                .unwrap_or_default();
            out.insert(
                (ep.network.clone(), EndpointKey::Task(sb.task.clone())),
                EndpointRecord {
                    ip: IpAddr::V4(ep.ip),
                    mac: mac_text(&ep.mac),
                    name: sb.name.clone(),
                    service_id: service.map(|s| s.id.to_string()),
                    service_name: service.map(|s| s.spec.name.clone()),
                    aliases,
                    owner: me,
                    vtep: IpAddr::V4(vtep),
                },
            );
        }
    }
    // This node's own endpoint on the routing mesh, so that tasks elsewhere
    // can answer it.
    if let Some(ig) = &plan.ingress {
        let host = state
            .nodes
            .get(&me)
            .map(|n| n.hostname.clone())
            .unwrap_or_default();
        out.insert(
            (ig.network.clone(), EndpointKey::Node(me)),
            EndpointRecord {
                ip: IpAddr::V4(ig.addr),
                mac: mac_text(&shoal_mesh::plan::mac_for(ig.addr)),
                name: format!("ingress-{host}"),
                service_id: None,
                service_name: None,
                aliases: Vec::new(),
                owner: me,
                vtep: IpAddr::V4(vtep),
            },
        );
    }
    out
}

/// One sandbox's embedded DNS server.
struct DnsServer {
    records: tokio::sync::watch::Sender<Arc<Records>>,
    tasks: [tokio::task::JoinHandle<()>; 2],
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

/// Starts the DNS server inside `netns` (a `/run/netns` name).
fn start_dns(netns: &str, records: Records, relay: dns::Relay) -> std::io::Result<DnsServer> {
    let (udp, tcp) = dns::bind_in(&std::path::Path::new(NETNS_DIR).join(netns))?;
    let udp = tokio::net::UdpSocket::from_std(udp)?;
    let tcp = tokio::net::TcpListener::from_std(tcp)?;
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(records));
    Ok(DnsServer {
        records: tx,
        tasks: [
            tokio::spawn(dns::serve_udp(udp, rx.clone(), relay.clone())),
            tokio::spawn(dns::serve_tcp(tcp, rx, relay)),
        ],
    })
}

/// What the data-plane loop uses.
pub struct DataplaneCtx {
    /// This node.
    pub id: NodeId,
    /// The store.
    pub state: StateHandle,
    /// Live endpoints in, this node's endpoints out.
    pub gossip: GossipHandle,
    /// What it tells the executor and `shoal info`.
    pub sandboxes: Arc<Sandboxes>,
    /// The health of checked tasks: such a task is published only while
    /// healthy.
    pub health: Arc<super::health::Health>,
    /// Its configuration.
    pub cfg: DataplaneConfig,
}

/// The loop's state between passes.
struct Driver<B> {
    ctx: DataplaneCtx,
    backend: B,
    names: Names,
    /// The gateway bridge's subnet (chosen or checked when the daemon
    /// started) and the addresses handed out on it.
    gateway: Option<Gateway>,
    /// The plan last programmed, and when the kernel was last compared.
    last: Option<NodePlan>,
    last_full: Instant,
    /// This node's records in gossip, and the networks it is attached to.
    published: BTreeMap<(NetworkId, EndpointKey), EndpointRecord>,
    joined: BTreeSet<NetworkId>,
    mtu: Option<u32>,
    upstreams: Arc<Vec<SocketAddr>>,
    dns_servers: BTreeMap<TaskId, DnsServer>,
    gate: ListenGate,
}

/// Runs until the task is aborted (the daemon stopping): the kernel state
/// stays for the next run.
pub async fn run<B: Backend + Send>(ctx: DataplaneCtx, backend: B) {
    let mut changes = ctx.state.changes();
    let gossip_changed = ctx.gossip.changed.clone();
    let health = ctx.health.clone();
    let Some(mut d) = Driver::new(ctx, backend) else {
        return;
    };
    d.adopt_previous_run().await;
    let mut audit = true;
    loop {
        // Registered before the pass, so that a change during it is not
        // missed (`notify_waiters` wakes only registered waiters).
        let gossip = gossip_changed.notified();
        let healthy = health.changed.notified();
        tokio::pin!(gossip, healthy);
        gossip.as_mut().enable();
        healthy.as_mut().enable();
        changes.borrow_and_update();
        d.pass(audit).await;
        let wait = next_pass(d.gate.pending(), d.last.is_none(), d.last_full.elapsed());
        tokio::select! {
            _ = changes.changed() => {}
            () = gossip => {}
            () = healthy => {}
            () = tokio::time::sleep(wait) => {}
        }
        audit = d.last_full.elapsed() >= AUDIT_EVERY;
    }
}

/// How long the data plane waits for a change before it looks anyway:
/// soon while the listen gate holds tasks back (it polls their sockets)
/// or the last reconcile failed, else until the next audit, due
/// [`AUDIT_EVERY`] after the last reconcile (`since_full`). Pure.
fn next_pass(gate_pending: bool, failed: bool, since_full: Duration) -> Duration {
    if gate_pending {
        Duration::from_millis(200)
    } else if failed {
        Duration::from_secs(1)
    } else {
        AUDIT_EVERY.saturating_sub(since_full)
    }
}

impl<B: Backend + Send> Driver<B> {
    /// A driver over `backend`; none when this node has no data plane (not
    /// root, or turned off), which it logs.
    fn new(ctx: DataplaneCtx, backend: B) -> Option<Self> {
        let Some(names) = ctx.sandboxes.names.clone() else {
            if ctx.cfg.enabled {
                tracing::warn!("not root: no data plane; tasks run in bare network namespaces");
            }
            return None;
        };
        let gateway = ctx
            .cfg
            .gateway_subnet
            .as_deref()
            .and_then(|s| s.parse().ok())
            .map(Gateway::new);
        Some(Driver {
            ctx,
            backend,
            names,
            gateway,
            last: None,
            last_full: Instant::now(),
            published: BTreeMap::new(),
            joined: BTreeSet::new(),
            mtu: None,
            upstreams: Arc::new(dns::upstreams(
                &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
            )),
            dns_servers: BTreeMap::new(),
            gate: ListenGate::default(),
        })
    }

    /// Whether a local endpoint record is published: a task with a health
    /// check while it is healthy, any other once the listen gate lets it
    /// through.
    fn publishes(&self, key: &EndpointKey) -> bool {
        let checked = match key {
            EndpointKey::Task(id) => self.ctx.health.allows(id),
            EndpointKey::Node(_) => None,
        };
        checked.unwrap_or_else(|| self.gate.lets_through(key))
    }

    /// After a restart the kernel still holds the previous run's state:
    /// before comparing against it, attach to its networks' gossip and give
    /// anti-entropy time to bring the remote endpoints back, so that the
    /// first reconcile adopts rather than tears down and rebuilds.
    async fn adopt_previous_run(&mut self) {
        if shoal_netdriver::linux::list_netns(&self.names.prefix).is_empty() {
            return;
        }
        let state = self.ctx.state.state();
        let me = self.ctx.id;
        for (id, n) in &state.networks {
            let local = state.tasks.values().any(|t| {
                t.node == Some(me) && !t.state.is_terminal() && t.addresses.contains_key(id)
            });
            if local || n.ingress {
                self.ctx.gossip.send(GossipCmd::Join(id.to_string()));
                self.joined.insert(id.clone());
            }
        }
        self.warm_up().await;
        // Running tasks keep the gateway addresses they have.
        if let Some(gw) = self.gateway.as_mut()
            && let Ok(seen) = self.backend.observe(&self.names.prefix).await
        {
            gw.held = held_gateway_addrs(&seen, &self.names);
        }
        // What survived a restart was published by the warm-up already.
        self.gate.open = self
            .published
            .keys()
            .filter_map(|(_, key)| match key {
                EndpointKey::Task(id) => Some(id.clone()),
                EndpointKey::Node(_) => None,
            })
            .collect();
    }

    /// One pass: plan, program it when it changed (or on an `audit`, to
    /// put back what something else changed), then tell gossip. The store
    /// is read under its lock, a step at a time (not copied: a copy costs
    /// O(tasks) on every node for every change); a change between two
    /// steps wakes the next pass.
    async fn pass(&mut self, audit: bool) {
        let me = self.ctx.id;
        let Some(vtep) = self.ctx.state.read(|d| vtep_of(&d.state, me)) else {
            return;
        };
        if self.mtu.is_none() {
            self.mtu = Some(match self.ctx.cfg.underlay_mtu {
                Some(v) => v,
                None => self.backend.underlay_mtu(vtep).await.unwrap_or(1500),
            });
        }
        let p = self.plan(vtep).await;
        if self.last.as_ref() != Some(&p) || audit {
            if !self.program(&p).await {
                return;
            }
            self.after_programmed(&p).await;
        }
        self.announce(&p, vtep).await;
    }

    /// The plan, with this node's own endpoints counted from the start
    /// whether or not gossip has them yet (it has none right after a
    /// restart), once they listen (the gate holds them out of local
    /// balancers too).
    async fn plan(&mut self, vtep: Ipv4Addr) -> NodePlan {
        let mut endpoints = self
            .ctx
            .gossip
            .ask(GossipCmd::Endpoints)
            .await
            .unwrap_or_default();
        let (node, underlay_mtu) = (self.ctx.id, self.mtu.unwrap_or(1500));
        let (first, held) = self.ctx.state.read(|d| {
            let first = plan(&PlanInput {
                state: &d.state,
                node,
                vtep,
                underlay_mtu,
                endpoints: &endpoints,
            });
            let held = self.gate.held(&d.state, &first);
            (first, held)
        });
        self.gate.update(&self.names, &first, held).await;
        let records = self
            .ctx
            .state
            .read(|d| local_records(&d.state, node, &first, vtep));
        for ((net, key), rec) in records {
            if !self.publishes(&key) {
                continue;
            }
            let list = endpoints.entry(net.to_string()).or_default();
            if !list.contains(&rec) {
                list.retain(|e| e.ip != rec.ip);
                list.push(rec);
            }
        }
        self.ctx.state.read(|d| {
            plan(&PlanInput {
                state: &d.state,
                node,
                vtep,
                underlay_mtu,
                endpoints: &endpoints,
            })
        })
    }

    /// Brings the kernel to plan `p`; whether it got there.
    async fn program(&mut self, p: &NodePlan) -> bool {
        let port = self.ctx.cfg.data_path_port;
        let wanted = render(p, &self.names, port, self.gateway.as_ref());
        match reconcile(&mut self.backend, &wanted, &self.names.prefix).await {
            Ok(ops) => {
                // A few changes are named (what moved, and why a restart or
                // a failover did something); many only counted, their list
                // at debug level.
                if ops.len() > 4 {
                    tracing::info!(changes = ops.len(), "data plane programmed");
                    tracing::debug!(?ops, "data plane changes");
                } else if !ops.is_empty() {
                    tracing::info!(changes = ops.len(), ?ops, "data plane programmed");
                }
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "data plane not programmed; retrying");
                if let Ok(mut slot) = self.ctx.sandboxes.error.lock() {
                    *slot = Some(e.to_string());
                }
                self.last = None;
                false
            }
        }
    }

    /// What follows a programmed plan: DNS servers follow its sandboxes,
    /// the executor learns which are ready, routes are checked.
    async fn after_programmed(&mut self, p: &NodePlan) {
        self.serve_dns(p);
        let sb = &self.ctx.sandboxes;
        if let Ok(mut e) = sb.error.lock() {
            *e = None;
        }
        if let Ok(mut r) = sb.ready.lock() {
            let ready: std::collections::BTreeSet<_> = p.sandboxes.keys().cloned().collect();
            if *r != ready {
                *r = ready;
                sb.changed.notify_one();
            }
        }
        if let Ok(mut l) = sb.last.lock() {
            *l = Some(p.clone());
        }
        if let Some(gw) = self.gateway.as_mut() {
            gw.held = gateway_addrs(p, gw);
        }
        check_routes(sb, p, self.gateway.as_ref()).await;
        self.last = Some(p.clone());
        self.last_full = Instant::now();
    }

    /// One embedded DNS server per sandbox of `p`, answering its records.
    fn serve_dns(&mut self, p: &NodePlan) {
        self.dns_servers
            .retain(|id, _| p.sandboxes.contains_key(id));
        for (id, sb) in &p.sandboxes {
            if let Some(server) = self.dns_servers.get(id) {
                server.records.send_if_modified(|r| {
                    let changed = **r != sb.dns;
                    if changed {
                        *r = Arc::new(sb.dns.clone());
                    }
                    changed
                });
                continue;
            }
            // A sandbox with no way out resolves the swarm's names only.
            let relay = if sb.egress {
                dns::Relay::To(self.upstreams.clone())
            } else {
                dns::Relay::Refuse
            };
            match start_dns(&self.names.task_name(id), sb.dns.clone(), relay) {
                Ok(server) => {
                    self.dns_servers.insert(id.clone(), server);
                }
                Err(e) => tracing::warn!(task = %id, error = %e, "embedded DNS not started"),
            }
        }
    }

    /// Gossip: attach to the networks with local endpoints, publish them,
    /// detach from the others.
    async fn announce(&mut self, p: &NodePlan, vtep: Ipv4Addr) {
        let nets: BTreeSet<NetworkId> = p.networks.keys().cloned().collect();
        for n in nets.difference(&self.joined) {
            self.ctx.gossip.send(GossipCmd::Join(n.to_string()));
        }
        let me = self.ctx.id;
        let mut records = self
            .ctx
            .state
            .read(|d| local_records(&d.state, me, p, vtep));
        records.retain(|(_, key), _| self.publishes(key));
        publish(&self.ctx.gossip, records, &mut self.published).await;
        for n in self.joined.difference(&nets) {
            self.ctx.gossip.send(GossipCmd::Leave(n.to_string()));
        }
        self.joined = nets;
    }
}

/// Checks the networks of `plan` against this node's routes and gateway
/// subnet (the creating node checked its own only); a new clash is logged
/// once, all are kept for `shoal info` and `debug dataplane`.
async fn check_routes(sandboxes: &Sandboxes, plan: &NodePlan, gateway: Option<&Gateway>) {
    let Ok(routes) = super::gateway::node_routes(gateway.map(|g| g.subnet)).await else {
        return;
    };
    let nets = plan
        .networks
        .values()
        .filter(|n| !n.driver.shares_parent_lan())
        .map(|n| (n.name.as_str(), n.subnet));
    let clashes = super::gateway::route_clashes(nets, &routes);
    if let Ok(mut w) = sandboxes.warnings.lock() {
        for c in clashes.iter().filter(|c| !w.contains(c)) {
            tracing::warn!("{c}");
        }
        *w = clashes;
    }
}

/// `shoal debug dataplane`: this node's FDB and neighbour entries, VIP load
/// balancers and published ports, read back from the kernel.
pub async fn debug_dataplane(
    me: NodeId,
    sandboxes: &Sandboxes,
    network: Option<&str>,
) -> anyhow::Result<serde_json::Value> {
    use serde_json::json;
    let Some(names) = sandboxes.names.clone() else {
        anyhow::bail!("the data plane is off on this node (not root, or --no-dataplane)");
    };
    let mut backend = Linux::new(None);
    let seen = shoal_netdriver::Backend::observe(&mut backend, &names.prefix)
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the kernel: {e}"))?;
    let last = sandboxes.last_plan().unwrap_or_default();
    let mut networks = Vec::new();
    for net in last.networks.values() {
        if network.is_some_and(|n| n != net.name && n != net.id.as_str()) {
            continue;
        }
        let ns = seen.namespaces.get(&names.network(&net.id));
        let fdb: Vec<_> = ns
            .into_iter()
            .flat_map(|n| n.fdb.iter())
            .map(|f| json!({"mac": mac_text(&f.mac), "vtep": f.dst.to_string()}))
            .collect();
        let neigh: Vec<_> = ns
            .into_iter()
            .flat_map(|n| n.neigh.iter())
            .map(|x| json!({"ip": x.ip.to_string(), "mac": mac_text(&x.mac)}))
            .collect();
        let lbs: Vec<_> = net
            .lbs
            .iter()
            .map(
                |l| json!({"service": l.service, "vip": l.vip.to_string(), "backends": l.backends}),
            )
            .collect();
        networks.push(json!({
            "name": net.name, "id": net.id, "vni": net.vni, "mtu": net.mtu,
            "vtep": net.vtep.to_string(), "fdb": fdb, "neighbours": neigh,
            "load_balancers": lbs,
        }));
    }
    let boxes: Vec<_> = last
        .sandboxes
        .values()
        .map(|sb| {
            let lb = seen
                .namespaces
                .get(&names.task(&sb.task))
                .map(|n| n.lb.clone())
                .unwrap_or_default();
            json!({
                "task": sb.name,
                "netns": names.task(&sb.task),
                "addresses": sb.endpoints.iter().map(|e| e.ip.to_string()).collect::<Vec<_>>(),
                "vips": lb.iter().map(|(v, b)| (v.to_string(), b.clone())).collect::<BTreeMap<_, _>>(),
            })
        })
        .collect();
    // Published ports as the kernel forwards them: through the routing
    // mesh (the ingress namespace's DNAT to the tasks), and straight to a
    // local task (host mode: the host's own DNAT, which for mesh ports
    // points into the ingress namespace instead).
    let nat_of = |ns: shoal_netdriver::model::Ns| {
        let n = seen.namespaces.get(&ns).and_then(|n| n.nat.clone());
        n.unwrap_or_default().dnat
    };
    let mesh = last
        .ingress
        .iter()
        .flat_map(|ig| nat_of(names.network(&ig.network)))
        .map(|f| ("ingress", f));
    let host = nat_of(shoal_netdriver::model::HOST)
        .into_iter()
        .filter(|(_, (to, _))| to != &[shoal_netdriver::render::INGRESS_NS_ADDR])
        .map(|f| ("host", f));
    let published: Vec<_> = mesh
        .chain(host)
        .map(|(mode, ((protocol, port), (backends, target)))| {
            json!({"protocol": protocol, "published": port, "target": target, "mode": mode, "backends": backends})
        })
        .collect();
    Ok(json!({
        "node": me.to_string(),
        "networks": networks,
        "sandboxes": boxes,
        "published": published,
        "ingress_addr": last.ingress.as_ref().map(|i| i.addr.to_string()),
        "warnings": sandboxes.warnings(),
    }))
}

/// `shoal debug dns TASK NAME`: what that task's embedded DNS answers.
pub fn debug_dns(
    sandboxes: &Sandboxes,
    task: &str,
    name: &str,
) -> anyhow::Result<serde_json::Value> {
    use serde_json::json;
    let last = sandboxes.last_plan().unwrap_or_default();
    let sb = last
        .sandboxes
        .values()
        .find(|s| s.task == task || s.name == task || s.task.starts_with(task))
        .ok_or_else(|| anyhow::anyhow!("no sandbox for task `{task}` on this node"))?;
    let key = name.to_lowercase();
    let key = key.trim_end_matches('.');
    Ok(match sb.dns.get(key) {
        Some(ips) => json!({"task": sb.name, "name": key, "answer": ips, "ttl": dns::TTL}),
        None => json!({"task": sb.name, "name": key, "answer": null, "forwarded": true}),
    })
}

/// Makes this node's entries in the endpoints tables `wanted`, changing
/// only what differs from what it `published` before.
async fn publish(
    gossip: &GossipHandle,
    wanted: BTreeMap<(NetworkId, EndpointKey), EndpointRecord>,
    published: &mut BTreeMap<(NetworkId, EndpointKey), EndpointRecord>,
) {
    for ((net, key), _) in published.iter().filter(|(k, _)| !wanted.contains_key(*k)) {
        let _ = gossip
            .ask(|reply| GossipCmd::Delete {
                network: net.to_string(),
                table: ENDPOINTS.into(),
                key: key.to_string(),
                reply,
            })
            .await;
    }
    for ((net, key), rec) in &wanted {
        if published.get(&(net.clone(), key.clone())) == Some(rec) {
            continue;
        }
        let _ = gossip
            .ask(|reply| GossipCmd::Put {
                network: net.to_string(),
                table: ENDPOINTS.into(),
                key: key.to_string(),
                value: TableValue::Endpoint(rec.clone()),
                reply,
            })
            .await;
    }
    *published = wanted;
}

impl<B: Backend + Send> Driver<B> {
    /// Waits (at most `WARM_UP_MAX`) until gossip shows the endpoints of
    /// every task the store has running on another live node, on the
    /// networks joined.
    ///
    /// Meanwhile it publishes its own endpoints whose sandboxes survived
    /// the restart: every restarted node waits for the others' (after a
    /// restart of the whole cluster, all of them at once).
    async fn warm_up(&mut self) {
        let started = Instant::now();
        let (me, gossip) = (self.ctx.id, self.ctx.gossip.clone());
        loop {
            let state = self.ctx.state.state();
            let mut endpoints = gossip.ask(GossipCmd::Endpoints).await.unwrap_or_default();
            if let Some(vtep) = vtep_of(&state, me) {
                let existing: BTreeSet<String> =
                    shoal_netdriver::linux::list_netns(&self.names.prefix)
                        .into_iter()
                        .collect();
                let p = plan(&PlanInput {
                    state: &state,
                    node: me,
                    vtep,
                    underlay_mtu: 1500,
                    endpoints: &endpoints,
                });
                let mut own = local_records(&state, me, &p, vtep);
                own.retain(|(_, key), _| match key {
                    EndpointKey::Node(_) => true,
                    EndpointKey::Task(id) => existing.contains(&self.names.task_name(id)),
                });
                for ((net, _), rec) in &own {
                    endpoints
                        .entry(net.to_string())
                        .or_default()
                        .push(rec.clone());
                }
                publish(&gossip, own, &mut self.published).await;
            }
            let dead: BTreeSet<NodeId> = gossip
                .ask(GossipCmd::Members)
                .await
                .unwrap_or_default()
                .into_iter()
                .filter(|i| matches!(i.state, MemberState::Dead | MemberState::Left))
                .map(|i| i.node_id)
                .collect();
            let awaited = awaited_endpoints(&state, me, &self.joined, &endpoints, &dead);
            if awaited.is_empty() {
                tracing::info!(
                    after_ms = started.elapsed().as_millis() as u64,
                    "data plane warmed up"
                );
                return;
            }
            if started.elapsed() > WARM_UP_MAX {
                tracing::warn!(
                    missing = awaited.len(),
                    "gossip did not show every remote endpoint in time; programming what it has"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `swarm leave`: removes every kernel object this node's data plane made
/// (its namespaces, its host links, its forwarding rules).
pub async fn teardown(sandboxes: &Sandboxes) {
    let Some(names) = &sandboxes.names else {
        return;
    };
    let mut backend = Linux::new(None);
    if let Err(e) = reconcile(
        &mut backend,
        &shoal_netdriver::model::Kernel::default(),
        &names.prefix,
    )
    .await
    {
        tracing::warn!(error = %e, "data plane not fully removed");
    }
}

#[cfg(test)]
#[path = "dataplane_test.rs"]
mod tests;
