//! The data-plane loop on every node (as root): plans this node's kernel
//! state from the store and gossip (`shoal_mesh::plan`), reconciles it with
//! the Linux backend (`shoal_netdriver`), tells the executor which task
//! sandboxes are ready, and publishes the local endpoints into gossip (and
//! attaches to the networks that have them).
//!
//! It reconciles whenever the plan changes, and every 5 s anyway, so that
//! what something else removed is put back. At start it adopts what a
//! previous run left (the reconciler diffs against the kernel, not memory).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use shoal_mesh::observed::{EndpointRecord, TableValue};
use shoal_mesh::plan::{NodePlan, PlanInput, mac_text, plan};
use shoal_netdriver::dns::{self, Records};
use shoal_netdriver::linux::{Linux, NETNS_DIR};
use shoal_netdriver::reconcile;
use shoal_netdriver::render::{Names, render};

use super::config::DataplaneConfig;
use super::gossip::GossipCmd;
use super::member::Member;

/// The gossip table of endpoints.
pub const ENDPOINTS: &str = "endpoints";

const FULL_EVERY: Duration = Duration::from_secs(5);

/// What the data plane tells the executor.
#[derive(Debug, Default)]
pub struct Sandboxes {
    /// Whether the data plane runs (else tasks get bare namespaces).
    pub enabled: bool,
    /// Namespace names of this node (`<prefix>t-<task>` for sandboxes).
    pub names: Option<Names>,
    /// Tasks whose sandbox is programmed.
    ready: Mutex<BTreeSet<String>>,
    /// The last reconcile error, for tasks that wait.
    error: Mutex<Option<String>>,
}

impl Sandboxes {
    /// For the given configuration and node.
    pub fn new(cfg: &DataplaneConfig, node: &str, root: bool) -> Self {
        let enabled = cfg.enabled && root;
        Sandboxes {
            enabled,
            names: enabled.then(|| match &cfg.netns_prefix {
                Some(p) => Names { prefix: p.clone() },
                None => Names::for_node(node),
            }),
            ready: Mutex::default(),
            error: Mutex::default(),
        }
    }

    /// The network namespace of task `task`, once programmed.
    pub fn ready(&self, task: &str) -> Option<String> {
        let names = self.names.as_ref()?;
        self.ready
            .lock()
            .ok()?
            .contains(task)
            .then(|| names.task(task))
    }

    /// Why the last reconcile failed, if it did.
    pub fn error(&self) -> Option<String> {
        self.error.lock().ok()?.clone()
    }
}

fn vtep_of(m: &Member) -> Option<Ipv4Addr> {
    let state = m.state.state();
    let addr = &state.nodes.get(&m.id)?.addr;
    match addr.parse::<std::net::SocketAddr>().ok()?.ip() {
        IpAddr::V4(v) => Some(v),
        IpAddr::V6(_) => None,
    }
}

/// The endpoint records this node publishes for `plan`, by (network, task).
fn local_records(
    m: &Member,
    plan: &NodePlan,
    vtep: Ipv4Addr,
) -> BTreeMap<(String, String), EndpointRecord> {
    let state = m.state.state();
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
                (ep.network.clone(), sb.task.clone()),
                EndpointRecord {
                    ip: IpAddr::V4(ep.ip),
                    mac: mac_text(&ep.mac),
                    name: sb.name.clone(),
                    service_id: service.map(|s| s.id.clone()),
                    service_name: service.map(|s| s.spec.name.clone()),
                    aliases,
                    owner: m.id,
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
            .get(&m.id)
            .map(|n| n.hostname.clone())
            .unwrap_or_default();
        out.insert(
            (ig.network.clone(), format!("node-{}", m.id)),
            EndpointRecord {
                ip: IpAddr::V4(ig.addr),
                mac: mac_text(&shoal_mesh::plan::mac_for(ig.addr)),
                name: format!("ingress-{host}"),
                service_id: None,
                service_name: None,
                aliases: Vec::new(),
                owner: m.id,
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
fn start_dns(
    netns: &str,
    records: Records,
    upstreams: &Arc<Vec<SocketAddr>>,
) -> std::io::Result<DnsServer> {
    let (udp, tcp) = dns::bind_in(&std::path::Path::new(NETNS_DIR).join(netns))?;
    let udp = tokio::net::UdpSocket::from_std(udp)?;
    let tcp = tokio::net::TcpListener::from_std(tcp)?;
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(records));
    Ok(DnsServer {
        records: tx,
        tasks: [
            tokio::spawn(dns::serve_udp(udp, rx.clone(), upstreams.clone())),
            tokio::spawn(dns::serve_tcp(tcp, rx, upstreams.clone())),
        ],
    })
}

pub(super) async fn dataplane_loop(member: Weak<Member>, cfg: DataplaneConfig) {
    let Some(m) = member.upgrade() else { return };
    let Some(names) = m.sandboxes.names.clone() else {
        if cfg.enabled {
            tracing::warn!("not root: no data plane; tasks run in bare network namespaces");
        }
        return;
    };
    let mut changes = m.state.changes();
    let gossip_changed = m.gossip.changed.clone();
    drop(m);
    let mut backend = Linux::new(None);
    let mut last: Option<NodePlan> = None;
    let mut last_full = Instant::now();
    let mut published: BTreeMap<(String, String), EndpointRecord> = BTreeMap::new();
    let mut joined: BTreeSet<String> = BTreeSet::new();
    let mut mtu = None;
    let upstreams = Arc::new(dns::upstreams(
        &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
    ));
    let mut dns_servers: BTreeMap<String, DnsServer> = BTreeMap::new();
    loop {
        tokio::select! {
            _ = changes.changed() => {}
            _ = gossip_changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        // The daemon is shutting down: the kernel state stays for the next run.
        let Some(m) = member.upgrade() else { return };
        let Some(vtep) = vtep_of(&m) else { continue };
        if mtu.is_none() {
            mtu = Some(match cfg.underlay_mtu {
                Some(v) => v,
                None => backend.mtu_of(vtep).await.unwrap_or(1500),
            });
        }
        let endpoints = m.gossip.ask(GossipCmd::Endpoints).await.unwrap_or_default();
        let state = m.state.state();
        let p = plan(&PlanInput {
            state: &state,
            node: m.id,
            vtep,
            underlay_mtu: mtu.unwrap_or(1500),
            endpoints: &endpoints,
        });
        if last.as_ref() != Some(&p) || last_full.elapsed() > FULL_EVERY {
            let wanted = render(&p, &names, cfg.data_path_port);
            match reconcile(&mut backend, &wanted, &names.prefix).await {
                Ok(ops) => {
                    if !ops.is_empty() {
                        tracing::info!(changes = ops.len(), "data plane programmed");
                        tracing::debug!(?ops, "data plane changes");
                    }
                    if let Ok(mut e) = m.sandboxes.error.lock() {
                        *e = None;
                    }
                    dns_servers.retain(|id, _| p.sandboxes.contains_key(id));
                    for (id, sb) in &p.sandboxes {
                        match dns_servers.get(id) {
                            Some(server) => {
                                server.records.send_if_modified(|r| {
                                    let changed = **r != sb.dns;
                                    if changed {
                                        *r = Arc::new(sb.dns.clone());
                                    }
                                    changed
                                });
                            }
                            None => match start_dns(&names.task(id), sb.dns.clone(), &upstreams) {
                                Ok(server) => {
                                    dns_servers.insert(id.clone(), server);
                                }
                                Err(e) => {
                                    tracing::warn!(task = %id, error = %e, "embedded DNS not started");
                                }
                            },
                        }
                    }
                    if let Ok(mut r) = m.sandboxes.ready.lock() {
                        *r = p.sandboxes.keys().cloned().collect();
                    }
                    last = Some(p.clone());
                    last_full = Instant::now();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "data plane not programmed; retrying");
                    if let Ok(mut slot) = m.sandboxes.error.lock() {
                        *slot = Some(e.to_string());
                    }
                    last = None;
                    continue;
                }
            }
        }
        // Gossip: attach to the networks with local endpoints, publish them.
        let nets: BTreeSet<String> = p.networks.keys().cloned().collect();
        for n in nets.difference(&joined) {
            m.gossip.send(GossipCmd::Join(n.clone()));
        }
        let wanted = local_records(&m, &p, vtep);
        for ((net, key), _) in published.iter().filter(|(k, _)| !wanted.contains_key(*k)) {
            let _ = m
                .gossip
                .ask(|reply| GossipCmd::Delete {
                    network: net.clone(),
                    table: ENDPOINTS.into(),
                    key: key.clone(),
                    reply,
                })
                .await;
        }
        for ((net, key), rec) in &wanted {
            if published.get(&(net.clone(), key.clone())) == Some(rec) {
                continue;
            }
            let _ = m
                .gossip
                .ask(|reply| GossipCmd::Put {
                    network: net.clone(),
                    table: ENDPOINTS.into(),
                    key: key.clone(),
                    value: TableValue::Endpoint(rec.clone()),
                    reply,
                })
                .await;
        }
        published = wanted;
        for n in joined.difference(&nets) {
            m.gossip.send(GossipCmd::Leave(n.clone()));
        }
        joined = nets;
    }
}
