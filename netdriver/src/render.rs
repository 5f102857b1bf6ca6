//! From a node's plan to the kernel objects that carry it out.
//!
//! An overlay network:
//!
//! ```text
//!  namespace <prefix>n-<network>                namespace <prefix>t-<task>
//!   vxlan0 (VNI, local VTEP, learning off, ARP proxy)
//!     │ FDB: MAC → remote VTEP, neighbours: IP → MAC (from gossip)
//!     └──── macvlan (bridge mode), moved ────►  eth<k> (task address, MAC)
//! ```
//!
//! Tasks sit straight on the VXLAN device: no veth, no bridge, so a packet
//! crosses one device between the task and the tunnel; tasks on the same
//! node and network reach each other through the macvlan's own switch. A
//! `bridge` network (one host) is a bridge with a veth per task:
//!
//! ```text
//!   br0 (gateway address) ◄── v<task>  ══veth══  eth<k> (task address, MAC)
//! ```

use std::collections::{BTreeMap, BTreeSet};

use shoal_mesh::cidr::Ipv4Net;
use shoal_mesh::network::Driver;
use shoal_mesh::plan::{NetworkPlan, NodePlan, SandboxPlan};

use std::net::Ipv4Addr;

use crate::model::{Fdb, HOST, Kernel, Link, LinkKind, Nat, Neigh, Netns, Ns, Route};

/// The link between the host and its ingress namespace: host side.
pub const INGRESS_HOST_LINK: &str = "shoalig0";
/// Its address on the host side (a link-local /30, the same on every node).
pub const INGRESS_HOST_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 222, 1);
/// Its address on the ingress namespace's side.
pub const INGRESS_NS_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 222, 2);

/// An overlay network's VXLAN device, in the network's namespace.
pub const VXLAN: &str = "vxlan0";

/// The ingress namespace's address on the `ingress` overlay (a macvlan on
/// its VXLAN device, like a task's).
pub const INGRESS_LINK: &str = "ig0";

/// The default VXLAN UDP port (`--data-path-port`).
pub const VXLAN_PORT: u16 = 4789;

/// Names of this node's namespaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    /// Every namespace of this node starts with it (`shoal-<node>-`).
    pub prefix: String,
}

impl Names {
    /// For node `node` (its ID in hex).
    pub fn for_node(node: &str) -> Self {
        Names {
            prefix: format!("shoal-{node}-"),
        }
    }

    /// A network's namespace on this node.
    pub fn network(&self, id: &str) -> Ns {
        Ns::Named(format!("{}n-{id}", self.prefix))
    }

    /// A task's sandbox.
    pub fn task(&self, id: &str) -> Ns {
        Ns::Named(self.task_name(id))
    }

    /// The name of a task's sandbox under `/run/netns`.
    pub fn task_name(&self, id: &str) -> String {
        format!("{}t-{id}", self.prefix)
    }
}

/// The bridge-side name of task `task`'s veth (unique within a network
/// namespace; at most 15 characters).
pub fn bridge_port(task: &str) -> String {
    format!("v{}", &task[..task.len().min(11)])
}

/// The host's gateway bridge, for tasks' egress.
pub const GATEWAY_BRIDGE: &str = "shoalgw0";

/// The host-side name of task `task`'s gateway veth (≤ 15 characters).
pub fn gateway_port(task: &str) -> String {
    format!("shoalg{}", &task[..task.len().min(9)])
}

/// The host's gateway subnet for tasks' egress, and the addresses tasks
/// hold on it already (a running task keeps its address).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gateway {
    /// The subnet (the bridge has its first address).
    pub subnet: Ipv4Net,
    /// Task ID → the address it has now (from the last render, or read
    /// back from the kernel after a restart).
    pub held: BTreeMap<String, Ipv4Addr>,
}

impl Gateway {
    /// `subnet`, no address held yet.
    pub fn new(subnet: Ipv4Net) -> Self {
        Gateway {
            subnet,
            held: BTreeMap::new(),
        }
    }
}

/// Each egress sandbox's address on the gateway subnet. A task keeps the
/// address it holds (`gateway.held`) while it runs; a new one gets the
/// address a hash of its ID names, probing past those taken. (Without the
/// held ones, a task that had probed past a collision would move when the
/// task it collided with went away, and its egress connections with it.)
pub fn gateway_addrs(plan: &NodePlan, gateway: &Gateway) -> BTreeMap<String, Ipv4Addr> {
    let subnet = gateway.subnet;
    let size = subnet.size();
    let mut out = BTreeMap::new();
    if size < 8 {
        return out;
    }
    let base = u64::from(u32::from(subnet.network()));
    // Host numbers 2 … size-2 (1 is the bridge, the last is broadcast).
    let host_number = |ip: Ipv4Addr| {
        let n = u64::from(u32::from(ip)).checked_sub(base)?;
        (2..=size - 2).contains(&n).then_some(n)
    };
    let mut taken = BTreeSet::new();
    let egress: Vec<&str> = plan
        .sandboxes
        .values()
        .filter(|s| s.egress)
        .map(|s| s.task.as_str())
        .collect();
    for task in &egress {
        if let Some(ip) = gateway.held.get(*task)
            && let Some(n) = host_number(*ip)
            && taken.insert(n)
        {
            out.insert((*task).to_owned(), *ip);
        }
    }
    for task in egress {
        if out.contains_key(task) {
            continue;
        }
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in task.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let span = size - 3;
        for k in 0..span {
            let n = 2 + (h + k) % span;
            if taken.insert(n) {
                if let Some(ip) = subnet.nth(n) {
                    out.insert(task.to_owned(), ip);
                }
                break;
            }
        }
    }
    out
}

/// The gateway addresses the task namespaces of `kernel` hold (on `gw0`):
/// what a restarted daemon keeps.
pub fn held_gateway_addrs(kernel: &Kernel, names: &Names) -> BTreeMap<String, Ipv4Addr> {
    let prefix = names.task_name("");
    kernel
        .namespaces
        .iter()
        .filter_map(|(ns, n)| {
            let task = ns.name()?.strip_prefix(&prefix)?;
            let (ip, _) = n.links.get("gw0")?.addrs.iter().next()?;
            Some((task.to_owned(), *ip))
        })
        .collect()
}

/// The kernel objects for `plan`: with `gateway`, tasks that are not only
/// on internal networks also get a veth into the host's gateway bridge on
/// that subnet, a default route through it, and masquerade out of the host.
pub fn render(
    plan: &NodePlan,
    names: &Names,
    vxlan_port: u16,
    gateway: Option<&Gateway>,
) -> Kernel {
    let mut k = Kernel::default();
    for net in plan.networks.values() {
        if matches!(net.driver, Driver::Overlay | Driver::Bridge) {
            k.namespaces
                .insert(names.network(&net.id), network_ns(net, vxlan_port));
        }
    }
    for sb in plan.sandboxes.values() {
        render_sandbox(&mut k, plan, names, sb);
    }
    if let Some(gw) = gateway {
        render_gateway(&mut k, plan, names, gw);
        render_host_ports(&mut k, plan, gw);
    }
    if let Some(ig) = &plan.ingress {
        render_ingress(&mut k, plan, ig, names);
    }
    // Tunnel packets skip conntrack in the host namespace.
    if plan
        .networks
        .values()
        .any(|n| n.driver == Driver::Overlay && n.vni.is_some())
    {
        let host = k.namespaces.entry(HOST).or_default();
        host.nat.get_or_insert_with(Nat::default).untracked_udp = Some(vxlan_port);
    }
    k
}

/// A network's own namespace: its bridge (bridge networks) or its VXLAN
/// device with the remote endpoints as FDB and neighbour entries (overlays).
fn network_ns(net: &NetworkPlan, vxlan_port: u16) -> Netns {
    let mut ns = Netns::default();
    if net.driver == Driver::Bridge {
        ns.links.insert(
            "br0".into(),
            Link {
                kind: LinkKind::Bridge,
                mtu: net.mtu,
                mac: None,
                master: None,
                addrs: BTreeSet::from([(net.gateway, net.subnet.prefix_len())]),
                up: true,
                isolated: false,
            },
        );
    }
    if let (Driver::Overlay, Some(vni)) = (net.driver, net.vni) {
        ns.links.insert(
            VXLAN.into(),
            Link {
                kind: LinkKind::Vxlan {
                    vni,
                    local: net.vtep,
                    port: vxlan_port,
                },
                mtu: net.mtu,
                mac: None,
                master: None,
                addrs: BTreeSet::new(),
                up: true,
                isolated: false,
            },
        );
        for r in &net.remotes {
            ns.fdb.insert(Fdb {
                link: VXLAN.into(),
                mac: r.mac,
                dst: r.vtep,
            });
            ns.neigh.insert(Neigh {
                link: VXLAN.into(),
                ip: r.ip,
                mac: r.mac,
            });
        }
    }
    ns
}

/// A task's namespace (an interface per network: a macvlan of the overlay's
/// VXLAN device or of the parent, or a veth into the bridge, whose other
/// end goes into the network's namespace) and the VIPs it balances.
fn render_sandbox(k: &mut Kernel, plan: &NodePlan, names: &Names, sb: &SandboxPlan) {
    let task_ns = names.task(&sb.task);
    let mut ns = Netns::default();
    for (i, ep) in sb.endpoints.iter().enumerate() {
        let Some(net) = plan.networks.get(&ep.network) else {
            continue;
        };
        let eth = format!("eth{i}");
        let net_ns = names.network(&net.id);
        let parent = match (net.driver, &net.parent, net.vni) {
            (Driver::Macvlan, Some(parent), _) => Some((parent.clone(), HOST)),
            (Driver::Overlay, _, Some(_)) => Some((VXLAN.to_owned(), net_ns.clone())),
            _ => None,
        };
        // The task's end: its address and MAC, up.
        let task_end = |kind| Link {
            kind,
            mtu: net.mtu,
            mac: Some(ep.mac),
            master: None,
            addrs: BTreeSet::from([(ep.ip, ep.prefix)]),
            up: true,
            isolated: false,
        };
        if let Some((parent, parent_ns)) = parent {
            let link = task_end(LinkKind::Macvlan { parent, parent_ns });
            ns.links.insert(eth, link);
            continue;
        }
        if net.driver != Driver::Bridge {
            continue;
        }
        let port = bridge_port(&sb.task);
        if let Some(n) = k.namespaces.get_mut(&net_ns) {
            n.links.insert(
                port.clone(),
                Link {
                    kind: LinkKind::Veth {
                        peer: eth.clone(),
                        peer_ns: task_ns.clone(),
                    },
                    mtu: net.mtu,
                    mac: None,
                    master: Some("br0".into()),
                    addrs: BTreeSet::new(),
                    up: true,
                    isolated: false,
                },
            );
        }
        let link = task_end(LinkKind::Veth {
            peer: port,
            peer_ns: net_ns,
        });
        ns.links.insert(eth, link);
    }
    // East-west VIPs of the networks this task is on.
    for ep in &sb.endpoints {
        let Some(net) = plan.networks.get(&ep.network) else {
            continue;
        };
        for lb in net.lbs.iter().filter(|l| !l.backends.is_empty()) {
            ns.lb.insert(lb.vip, lb.backends.iter().copied().collect());
        }
    }
    k.namespaces.insert(task_ns, ns);
}

/// `--publish mode=host`: the port on this host goes straight to the local
/// tasks of the service, through their gateway legs.
fn render_host_ports(k: &mut Kernel, plan: &NodePlan, gateway: &Gateway) {
    let addrs = gateway_addrs(plan, gateway);
    for p in plan
        .published
        .iter()
        .filter(|p| p.mode == shoal_mesh::service::PublishMode::Host)
    {
        let to: Vec<Ipv4Addr> = p
            .tasks
            .iter()
            .filter_map(|t| addrs.get(t.as_str()).copied())
            .collect();
        if to.is_empty() {
            continue;
        }
        let host = k.namespaces.entry(HOST).or_default();
        let nat = host.nat.get_or_insert_with(Nat::default);
        nat.local = true;
        nat.dnat.insert(
            (p.protocol.as_str().to_owned(), p.published),
            (to, p.target),
        );
        host.forwarding = true;
    }
}

/// The gateway bridge on the host (isolated ports: tasks reach the host and
/// beyond through it, not each other) and each egress task's leg into it.
fn render_gateway(k: &mut Kernel, plan: &NodePlan, names: &Names, gateway: &Gateway) {
    let subnet = gateway.subnet;
    let addrs = gateway_addrs(plan, gateway);
    if addrs.is_empty() {
        return;
    }
    let Some(gw) = subnet.nth(1) else { return };
    let len = subnet.prefix_len();
    let host = k.namespaces.entry(HOST).or_default();
    host.links.insert(
        GATEWAY_BRIDGE.into(),
        Link {
            kind: LinkKind::Bridge,
            mtu: 1500,
            mac: None,
            master: None,
            addrs: BTreeSet::from([(gw, len)]),
            up: true,
            isolated: false,
        },
    );
    host.forwarding = true;
    host.nat.get_or_insert_with(Nat::default).masquerade =
        Some((subnet.network(), len, GATEWAY_BRIDGE.into()));
    for (task, ip) in &addrs {
        let task_ns = names.task(task);
        let port = gateway_port(task);
        k.namespaces.entry(HOST).or_default().links.insert(
            port.clone(),
            Link {
                kind: LinkKind::Veth {
                    peer: "gw0".into(),
                    peer_ns: task_ns.clone(),
                },
                mtu: 1500,
                mac: None,
                master: Some(GATEWAY_BRIDGE.into()),
                addrs: BTreeSet::new(),
                up: true,
                isolated: true,
            },
        );
        let ns = k.namespaces.entry(task_ns).or_default();
        ns.links.insert(
            "gw0".into(),
            Link {
                kind: LinkKind::Veth {
                    peer: port,
                    peer_ns: HOST,
                },
                mtu: 1500,
                mac: None,
                master: None,
                addrs: BTreeSet::from([(*ip, len)]),
                up: true,
                isolated: false,
            },
        );
        ns.routes.insert(Route {
            dst: (Ipv4Addr::UNSPECIFIED, 0),
            via: Some(gw),
            dev: "gw0".into(),
        });
    }
}

/// The routing mesh: the host DNATs published ports to its ingress
/// namespace (the `ingress` network's), which balances them over the
/// tasks' ingress addresses, wherever they run, with this node's ingress
/// address as source so that replies come back through it.
///
/// ```text
///  client ─► HOST:P ──dnat──► 169.254.222.2:P (gw0, ingress ns)
///            ──dnat──► task:T from ig0 (macvlan on vxlan0), snat to this node's ingress address
/// ```
fn render_ingress(
    k: &mut Kernel,
    plan: &NodePlan,
    ig: &shoal_mesh::plan::IngressPlan,
    names: &Names,
) {
    let ns_name = names.network(&ig.network);
    let Some(net) = plan.networks.get(&ig.network) else {
        return;
    };
    let Some(ns) = k.namespaces.get_mut(&ns_name) else {
        return;
    };
    if !ns.links.contains_key(VXLAN) {
        return;
    }
    ns.links.insert(
        INGRESS_LINK.into(),
        Link {
            kind: LinkKind::Macvlan {
                parent: VXLAN.into(),
                parent_ns: ns_name.clone(),
            },
            mtu: net.mtu,
            // The MAC other nodes derive for this node's ingress address.
            mac: Some(shoal_mesh::plan::mac_for(ig.addr)),
            master: None,
            addrs: BTreeSet::from([(ig.addr, net.subnet.prefix_len())]),
            up: true,
            isolated: false,
        },
    );
    let veth = |peer: &str, peer_ns: &Ns, addr: Ipv4Addr| Link {
        kind: LinkKind::Veth {
            peer: peer.into(),
            peer_ns: peer_ns.clone(),
        },
        mtu: 1500,
        mac: None,
        master: None,
        addrs: BTreeSet::from([(addr, 30)]),
        up: true,
        isolated: false,
    };
    ns.links.insert(
        "gw0".into(),
        veth(INGRESS_HOST_LINK, &HOST, INGRESS_NS_ADDR),
    );
    ns.routes.insert(Route {
        dst: (Ipv4Addr::UNSPECIFIED, 0),
        via: Some(INGRESS_HOST_ADDR),
        dev: "gw0".into(),
    });
    ns.forwarding = true;
    let proto = |p: shoal_mesh::service::Protocol| p.as_str().to_owned();
    ns.nat = Some(Nat {
        dnat: ig
            .ports
            .iter()
            .map(|p| {
                (
                    (proto(p.protocol), p.published),
                    (p.backends.clone(), p.target),
                )
            })
            .collect(),
        local: false,
        snat: Some((INGRESS_LINK.into(), ig.addr)),
        masquerade: None,
        untracked_udp: None,
    });
    let host = k.namespaces.entry(HOST).or_default();
    host.links.insert(
        INGRESS_HOST_LINK.into(),
        veth("gw0", &ns_name, INGRESS_HOST_ADDR),
    );
    host.forwarding = true;
    let nat = host.nat.get_or_insert_with(Nat::default);
    nat.local = true;
    nat.dnat.extend(ig.ports.iter().map(|p| {
        (
            (proto(p.protocol), p.published),
            (vec![INGRESS_NS_ADDR], p.published),
        )
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::sample_plan;

    fn gateway(cidr: &str, held: &BTreeMap<String, Ipv4Addr>) -> Gateway {
        Gateway {
            subnet: cidr.parse().unwrap(),
            held: held.clone(),
        }
    }

    #[test]
    fn a_running_task_keeps_its_gateway_address_when_others_go() {
        // A /29 has 5 task addresses: five tasks fill it, colliding hashes
        // probe past each other.
        let ids = ["t1", "t2", "t3", "t4", "t5"];
        let tasks: Vec<(&str, u8)> = ids.iter().zip(10u8..).map(|(t, l)| (*t, l)).collect();
        let all = gateway_addrs(
            &sample_plan(&tasks, &[]),
            &gateway("172.31.0.0/29", &BTreeMap::new()),
        );
        assert_eq!(all.len(), 5);
        let distinct: BTreeSet<&Ipv4Addr> = all.values().collect();
        assert_eq!(distinct.len(), 5, "{all:?}");
        // Whichever task goes, the others keep theirs.
        for gone in ids {
            let rest: Vec<(&str, u8)> = tasks.iter().copied().filter(|(t, _)| *t != gone).collect();
            let now = gateway_addrs(&sample_plan(&rest, &[]), &gateway("172.31.0.0/29", &all));
            for (t, ip) in &now {
                assert_eq!(all[t], *ip, "{t} moved when {gone} went");
            }
            // And a new task takes the free address, not anyone's.
            let mut more = rest.clone();
            more.push(("t6", 20));
            let next = gateway_addrs(&sample_plan(&more, &[]), &gateway("172.31.0.0/29", &now));
            assert_eq!(next["t6"], all[gone], "the one free address");
        }
    }

    #[test]
    fn a_held_address_that_is_not_usable_is_replaced() {
        let tasks = [("a", 10), ("b", 11)];
        let plan = sample_plan(&tasks, &[]);
        let bad = BTreeMap::from([
            // outside the subnet, the bridge's own address, and a duplicate
            ("a".to_owned(), Ipv4Addr::new(10, 0, 0, 9)),
            ("b".to_owned(), Ipv4Addr::new(172, 31, 0, 1)),
        ]);
        let addrs = gateway_addrs(&plan, &gateway("172.31.0.0/24", &bad));
        let fresh = gateway_addrs(&plan, &gateway("172.31.0.0/24", &BTreeMap::new()));
        assert_eq!(addrs, fresh);
        let dup = BTreeMap::from([("a".to_owned(), fresh["a"]), ("b".to_owned(), fresh["a"])]);
        let addrs = gateway_addrs(&plan, &gateway("172.31.0.0/24", &dup));
        assert_eq!(addrs["a"], fresh["a"]);
        assert_ne!(addrs["b"], fresh["a"]);
    }
}
