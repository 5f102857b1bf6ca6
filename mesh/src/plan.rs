//! The planner, pure: from the store (what should exist), the live gossip
//! entries (what is up right now) and this node's identity, the complete
//! data-plane state this node should have. The data plane (`netdriver`)
//! renders it into kernel objects and reconciles.
//!
//! ```text
//!  (ClusterState, live endpoints per network, this node) ──► plan ──► NodePlan
//!      networks present here (VNI, subnet, gateway, MTU, VTEP)
//!      sandboxes of the tasks placed here, one endpoint per network
//!      remote endpoints (MAC → VTEP, IP → MAC) from gossip and the store
//!      VIP load-balancer entries: VIP → live backends
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::cidr::Ipv4Net;
use crate::ids::{NetworkId, NodeId, ServiceId, TaskId};
use crate::network::Driver;
use crate::observed::EndpointRecord;
use crate::service::{EndpointMode, Protocol, PublishMode};
use crate::state::ClusterState;
use crate::task::{DesiredState, TaskState};

/// VXLAN encapsulation overhead: the overlay MTU is the underlay's minus this.
pub const VXLAN_OVERHEAD: u32 = 50;

/// What the planner needs besides the store.
#[derive(Clone, Debug)]
pub struct PlanInput<'a> {
    /// The store.
    pub state: &'a ClusterState,
    /// This node.
    pub node: NodeId,
    /// This node's underlay (VTEP) address.
    pub vtep: Ipv4Addr,
    /// The underlay's MTU.
    pub underlay_mtu: u32,
    /// Live endpoints per network ID, as gossip shows them (dead nodes'
    /// entries already hidden), this node's own included.
    pub endpoints: &'a BTreeMap<String, Vec<EndpointRecord>>,
}

/// A remote endpoint: how to reach it through the tunnel.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Remote {
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its MAC.
    pub mac: [u8; 6],
    /// The VTEP of the node that hosts it.
    pub vtep: Ipv4Addr,
}

/// One load-balanced port of a service on a network.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LbPlan {
    /// The service's ID.
    pub service_id: ServiceId,
    /// Its name.
    pub service: String,
    /// Its VIP on this network.
    pub vip: Ipv4Addr,
    /// Live backends (task addresses on this network), sorted.
    pub backends: Vec<Ipv4Addr>,
}

/// A port published through the routing mesh.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PublishPlan {
    /// The service's name.
    pub service: String,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The port on every node's address.
    pub published: u16,
    /// The port inside the tasks.
    pub target: u16,
    /// Ingress (balanced over every task) or host (the local ones only).
    pub mode: PublishMode,
    /// Where it goes: the service's VIP on `ingress` (ingress mode) or its
    /// local tasks' addresses (host mode).
    pub backends: Vec<Ipv4Addr>,
    /// Host mode: the local tasks (by ID) it goes to.
    pub tasks: Vec<TaskId>,
}

/// A network as it should be on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPlan {
    /// The network's ID.
    pub id: NetworkId,
    /// Its name.
    pub name: String,
    /// Its driver.
    pub driver: Driver,
    /// VNI (overlay).
    pub vni: Option<u32>,
    /// Its subnet.
    pub subnet: Ipv4Net,
    /// Its gateway address.
    pub gateway: Ipv4Addr,
    /// Interface MTU on it.
    pub mtu: u32,
    /// No egress.
    pub internal: bool,
    /// This node's VTEP address.
    pub vtep: Ipv4Addr,
    /// The parent interface (macvlan).
    pub parent: Option<String>,
    /// Endpoints on other nodes.
    pub remotes: BTreeSet<Remote>,
    /// VIP load balancing for the services on it.
    pub lbs: Vec<LbPlan>,
}

/// A task's interface on one network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointPlan {
    /// The network's ID.
    pub network: NetworkId,
    /// Its address.
    pub ip: Ipv4Addr,
    /// The subnet's prefix length.
    pub prefix: u8,
    /// Its MAC.
    pub mac: [u8; 6],
    /// The network's gateway.
    pub gateway: Ipv4Addr,
}

/// A task's sandbox (network namespace) on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxPlan {
    /// The task's ID.
    pub task: TaskId,
    /// The task's name (`SERVICE.SLOT`).
    pub name: String,
    /// One interface per network, in the service's order.
    pub endpoints: Vec<EndpointPlan>,
    /// What its embedded DNS (127.0.0.11) answers, name → addresses
    /// (lowercase, no trailing dot), from the networks it is on.
    pub dns: BTreeMap<String, Vec<Ipv4Addr>>,
    /// Whether it reaches beyond its networks (through the node's gateway
    /// bridge): unless every network it is on is `--internal`.
    pub egress: bool,
}

/// One port published through the routing mesh, as the ingress namespace
/// balances it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IngressPort {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The port on every node.
    pub published: u16,
    /// The port inside the tasks.
    pub target: u16,
    /// The live tasks' addresses on `ingress`, sorted.
    pub backends: Vec<Ipv4Addr>,
}

/// This node's part in the routing mesh.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngressPlan {
    /// The `ingress` network's ID.
    pub network: NetworkId,
    /// This node's address on it.
    pub addr: Ipv4Addr,
    /// The published ports (with at least one live backend).
    pub ports: Vec<IngressPort>,
}

/// Everything this node's data plane should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePlan {
    /// Networks with a local endpoint, by ID.
    pub networks: BTreeMap<NetworkId, NetworkPlan>,
    /// Sandboxes of the tasks placed here, by task ID.
    pub sandboxes: BTreeMap<TaskId, SandboxPlan>,
    /// Ports published through the routing mesh or on this host.
    pub published: Vec<PublishPlan>,
    /// The routing mesh on this node, when some port is published through it.
    pub ingress: Option<IngressPlan>,
}

/// The MAC of the endpoint with address `ip`: `02:42:` and the address, as
/// Docker does, so that every node derives the same one.
pub fn mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x42, o[0], o[1], o[2], o[3]]
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    }
}

/// The endpoints the store places on other nodes on network `net`: the
/// addresses of tasks that should run there, and (on `ingress`) the other
/// nodes' routing-mesh addresses, each behind its node's VTEP (the node's
/// address in the store).
///
/// Reachability (FDB and neighbour entries) follows these as well as
/// gossip: a node whose daemon is down or restarting is dead to gossip,
/// but its tasks keep running and answering, and replies to them must
/// still find them. Load balancers and DNS answers follow gossip alone, so
/// no new connection goes to a node gossip calls dead; the entries go when
/// the store stops placing the task there (the orchestrator reschedules
/// it) or forgets the node.
fn placed_remotes(state: &ClusterState, node: NodeId, net: &str) -> Vec<Remote> {
    let vtep = |owner: NodeId| {
        let addr = &state.nodes.get(&owner)?.addr;
        v4(addr.parse::<std::net::SocketAddr>().ok()?.ip())
    };
    let remote = |owner: NodeId, ip: Ipv4Addr| {
        Some(Remote {
            ip,
            mac: mac_for(ip),
            vtep: vtep(owner)?,
        })
    };
    let tasks = state.tasks_in(&NetworkId::from(net)).filter_map(|t| {
        let owner = t.node.filter(|o| *o != node)?;
        let placed = t.desired == DesiredState::Running
            && matches!(
                t.state,
                TaskState::Assigned | TaskState::Starting | TaskState::Running
            );
        remote(owner, *t.addresses.get(net).filter(|_| placed)?)
    });
    let ingress = state
        .networks
        .get(net)
        .filter(|n| n.ingress)
        .into_iter()
        .flat_map(|_| state.ingress_addrs.iter())
        .filter(|(owner, _)| **owner != node)
        .filter_map(|(owner, ip)| remote(*owner, *ip));
    tasks.chain(ingress).collect()
}

/// The live endpoints on network `net` that this node can reach, so may
/// balance to and name in DNS: gossip's records, except another node's on
/// a single-host (bridge) network.
fn reachable<'a>(input: &PlanInput<'a>, net: &str) -> Vec<&'a EndpointRecord> {
    let single_host = input
        .state
        .networks
        .get(net)
        .is_some_and(|n| n.spec.driver.is_single_host());
    input
        .endpoints
        .get(net)
        .into_iter()
        .flatten()
        .filter(|e| !single_host || e.owner == input.node)
        .collect()
}

/// The addresses of service `service`'s tasks among `live`, sorted, once each.
fn backends_of(live: &[&EndpointRecord], service: &str) -> Vec<Ipv4Addr> {
    let mut backends: Vec<Ipv4Addr> = live
        .iter()
        .filter(|e| e.service_id.as_deref() == Some(service))
        .filter_map(|e| v4(e.ip))
        .collect();
    backends.sort();
    backends.dedup();
    backends
}

/// The names a task on `endpoints`' networks resolves: on each (non-ingress)
/// network, every service attached to it (its VIP, or its live tasks'
/// addresses in dnsrr mode), `tasks.SERVICE` (the live tasks' addresses),
/// the service's aliases there, and every live task's name.
fn dns_records(
    input: &PlanInput<'_>,
    endpoints: &[EndpointPlan],
) -> BTreeMap<String, Vec<Ipv4Addr>> {
    let state = input.state;
    let mut out: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
    for ep in endpoints {
        let Some(n) = state.networks.get(&ep.network) else {
            continue;
        };
        if n.ingress {
            continue;
        }
        let live = reachable(input, &ep.network);
        for e in &live {
            if let Some(ip) = v4(e.ip) {
                out.entry(e.name.to_lowercase()).or_default().push(ip);
            }
        }
        for s in state.services.values() {
            let Some(att) = s.spec.networks.iter().find(|a| a.network == ep.network) else {
                continue;
            };
            let tasks = backends_of(&live, &s.id);
            let answer: Vec<Ipv4Addr> = match (s.spec.endpoint_mode, s.vips.get(&ep.network)) {
                (EndpointMode::Vip, Some(vip)) => vec![*vip],
                _ => tasks.clone(),
            };
            let name = s.spec.name.to_lowercase();
            out.entry(format!("tasks.{name}"))
                .or_default()
                .extend(&tasks);
            for alias in std::iter::once(&name).chain(att.aliases.iter()) {
                out.entry(alias.to_lowercase()).or_default().extend(&answer);
            }
        }
    }
    for ips in out.values_mut() {
        ips.sort();
        ips.dedup();
    }
    out
}

/// The plan for `input.node`: its sandboxes, the networks they (and the
/// routing mesh) need here, its published ports and its part in the mesh.
pub fn plan(input: &PlanInput<'_>) -> NodePlan {
    let sandboxes = sandboxes(input);
    let networks = networks(input, &sandboxes);
    let published = published(input.state, &sandboxes);
    let ingress = ingress(input);
    NodePlan {
        networks,
        sandboxes,
        published,
        ingress,
    }
}

/// The `ingress` network and this node's address on it, while some port is
/// published through the routing mesh.
fn my_ingress<'a>(input: &PlanInput<'a>) -> Option<(&'a crate::network::Network, Ipv4Addr)> {
    let state = input.state;
    let mesh_ports = state
        .services
        .values()
        .any(|s| s.ports.iter().any(|p| p.mode == PublishMode::Ingress));
    let n = state.networks.values().find(|n| n.ingress)?;
    mesh_ports.then_some(())?;
    Some((n, *state.ingress_addrs.get(&input.node)?))
}

/// Sandboxes: the tasks placed here that should run, one endpoint per
/// network, with what their DNS answers.
fn sandboxes(input: &PlanInput<'_>) -> BTreeMap<TaskId, SandboxPlan> {
    let state = input.state;
    let mut out = BTreeMap::new();
    // Sandboxes: the tasks placed here that should run.
    for t in state.tasks_on(input.node) {
        let wanted = t.desired == DesiredState::Running
            && matches!(
                t.state,
                TaskState::Assigned | TaskState::Starting | TaskState::Running
            );
        if !wanted {
            continue;
        }
        let mut endpoints = Vec::new();
        for (net, ip) in &t.addresses {
            let Some(n) = state.networks.get(net) else {
                continue;
            };
            let Some(sub) = n.subnets.iter().find(|s| s.subnet.contains(*ip)) else {
                continue;
            };
            endpoints.push(EndpointPlan {
                network: net.clone(),
                ip: *ip,
                prefix: sub.subnet.prefix_len(),
                mac: mac_for(*ip),
                gateway: sub.gateway,
            });
        }
        let dns = dns_records(input, &endpoints);
        let egress = endpoints.is_empty()
            || endpoints.iter().any(|e| {
                state
                    .networks
                    .get(&e.network)
                    .is_some_and(|n| !n.spec.internal)
            });
        out.insert(
            t.id.clone(),
            SandboxPlan {
                task: t.id.clone(),
                name: state.task_name(t),
                endpoints,
                dns,
                egress,
            },
        );
    }
    out
}

/// Networks: those with a local endpoint, and `ingress` on every node while
/// a port is published through the mesh; each with its remote endpoints
/// and its VIP load balancers.
fn networks(
    input: &PlanInput<'_>,
    sandboxes: &BTreeMap<TaskId, SandboxPlan>,
) -> BTreeMap<NetworkId, NetworkPlan> {
    let state = input.state;
    let mut out = BTreeMap::new();
    let mut local_nets: BTreeSet<&str> = sandboxes
        .values()
        .flat_map(|s| s.endpoints.iter().map(|e| e.network.as_str()))
        .collect();
    if let Some((n, _)) = my_ingress(input) {
        local_nets.insert(n.id.as_str());
    }
    for net in local_nets {
        let Some(n) = state.networks.get(net) else {
            continue;
        };
        let Some(sub) = n.subnets.first() else {
            continue;
        };
        let reachable = reachable(input, net);
        let mut remotes: BTreeSet<Remote> = reachable
            .iter()
            .filter(|e| e.owner != input.node && n.spec.driver == Driver::Overlay)
            .filter_map(|e| {
                Some(Remote {
                    ip: v4(e.ip)?,
                    mac: mac_for(v4(e.ip)?),
                    vtep: v4(e.vtep)?,
                })
            })
            .filter(|r| sub.subnet.contains(r.ip))
            .collect();
        if n.spec.driver == Driver::Overlay {
            // Gossip's entry wins where both know an address.
            let known: BTreeSet<Ipv4Addr> = remotes.iter().map(|r| r.ip).collect();
            remotes.extend(
                placed_remotes(state, input.node, net)
                    .into_iter()
                    .filter(|r| sub.subnet.contains(r.ip) && !known.contains(&r.ip)),
            );
        }
        let lbs = state
            .services
            .values()
            .filter(|s| s.spec.endpoint_mode == EndpointMode::Vip)
            .filter_map(|s| {
                let vip = *s.vips.get(net)?;
                Some(LbPlan {
                    service_id: s.id.clone(),
                    service: s.spec.name.clone(),
                    vip,
                    backends: backends_of(&reachable, &s.id),
                })
            })
            .collect();
        let mtu = n
            .mtu
            .unwrap_or(input.underlay_mtu.saturating_sub(VXLAN_OVERHEAD));
        out.insert(
            n.id.clone(),
            NetworkPlan {
                id: n.id.clone(),
                name: n.spec.name.clone(),
                driver: n.spec.driver,
                vni: n.vni,
                subnet: sub.subnet,
                gateway: sub.gateway,
                mtu,
                internal: n.spec.internal,
                parent: n.spec.options.get("parent").cloned(),
                vtep: input.vtep,
                remotes,
                lbs,
            },
        );
    }
    out
}

/// Published ports: ingress ones on every node, host ones where a task of
/// the service runs here.
fn published(state: &ClusterState, sandboxes: &BTreeMap<TaskId, SandboxPlan>) -> Vec<PublishPlan> {
    let mut out = Vec::new();
    let ingress = state.networks.values().find(|n| n.ingress);
    for s in state.services.values() {
        // This node's sandboxes of the service, for host-mode ports.
        let local: Vec<&SandboxPlan> = if s.ports.iter().any(|p| p.mode == PublishMode::Host) {
            sandboxes
                .values()
                .filter(|sb| {
                    state
                        .tasks
                        .get(&sb.task)
                        .is_some_and(|t| t.service_id == s.id)
                })
                .collect()
        } else {
            Vec::new()
        };
        for p in &s.ports {
            let (backends, tasks): (Vec<Ipv4Addr>, Vec<TaskId>) = match p.mode {
                PublishMode::Ingress => (
                    ingress
                        .and_then(|i| s.vips.get(&i.id))
                        .copied()
                        .into_iter()
                        .collect(),
                    Vec::new(),
                ),
                PublishMode::Host => (
                    local
                        .iter()
                        .filter_map(|sb| sb.endpoints.first().map(|e| e.ip))
                        .collect(),
                    local.iter().map(|sb| sb.task.clone()).collect(),
                ),
            };
            if p.mode == PublishMode::Host && backends.is_empty() {
                continue;
            }
            out.push(PublishPlan {
                tasks,
                service: s.spec.name.clone(),
                protocol: p.protocol,
                published: p.published,
                target: p.target,
                mode: p.mode,
                backends,
            });
        }
    }
    out.sort();
    out
}

/// This node's part in the routing mesh: every published port, balanced
/// over the service's live tasks on `ingress`.
fn ingress(input: &PlanInput<'_>) -> Option<IngressPlan> {
    let (n, addr) = my_ingress(input)?;
    let live = reachable(input, &n.id);
    let mut ports = Vec::new();
    for s in input.state.services.values() {
        let backends = backends_of(&live, &s.id);
        if backends.is_empty() {
            continue;
        }
        for p in s.ports.iter().filter(|p| p.mode == PublishMode::Ingress) {
            ports.push(IngressPort {
                protocol: p.protocol,
                published: p.published,
                target: p.target,
                backends: backends.clone(),
            });
        }
    }
    ports.sort();
    Some(IngressPlan {
        network: n.id.clone(),
        addr,
        ports,
    })
}

/// The remote endpoints a node's plan would use on `networks` that gossip
/// has not shown yet: addresses of tasks the store has running on other
/// nodes that gossip does not consider dead (`dead`). A restarted daemon
/// waits for this to be empty before it compares its plan with the kernel
/// state the previous run left, so that it does not remove live remote
/// backends only because gossip has not caught up.
pub fn awaited_endpoints(
    state: &ClusterState,
    node: NodeId,
    networks: &BTreeSet<NetworkId>,
    endpoints: &BTreeMap<String, Vec<EndpointRecord>>,
    dead: &BTreeSet<NodeId>,
) -> Vec<(NetworkId, Ipv4Addr)> {
    let mut out = Vec::new();
    for t in state.tasks.values() {
        let Some(owner) = t.node else { continue };
        let running = t.desired == DesiredState::Running && t.state == TaskState::Running;
        if owner == node || !running || dead.contains(&owner) {
            continue;
        }
        for (net, ip) in &t.addresses {
            let seen = endpoints
                .get(net.as_str())
                .is_some_and(|list| list.iter().any(|e| e.ip == IpAddr::V4(*ip)));
            let single_host = state
                .networks
                .get(net)
                .is_some_and(|n| n.spec.driver.is_single_host());
            if networks.contains(net) && !seen && !single_host {
                out.push((net.clone(), *ip));
            }
        }
    }
    out
}

#[cfg(test)]
#[path = "plan_test.rs"]
mod tests;
