//! From a node's plan to the kernel objects that carry it out.
//!
//! ```text
//!  namespace <prefix>n-<network>          namespace <prefix>t-<task>
//!   br0 (gateway address) ◄── v<task>  ══veth══  eth<k> (task address, MAC)
//!    ▲
//!   vxlan0 (VNI, local VTEP, learning off, ARP proxy)
//!     FDB:   MAC → remote VTEP     neighbours: IP → MAC   (from gossip)
//! ```

use std::collections::BTreeSet;

use shoal_mesh::network::Driver;
use shoal_mesh::plan::NodePlan;

use crate::model::{Fdb, Kernel, Link, LinkKind, Neigh, Netns};

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
    pub fn network(&self, id: &str) -> String {
        format!("{}n-{id}", self.prefix)
    }

    /// A task's sandbox.
    pub fn task(&self, id: &str) -> String {
        format!("{}t-{id}", self.prefix)
    }
}

/// The bridge-side name of task `task`'s veth (unique within a network
/// namespace; at most 15 characters).
pub fn bridge_port(task: &str) -> String {
    format!("v{}", &task[..task.len().min(11)])
}

/// The kernel objects for `plan`.
pub fn render(plan: &NodePlan, names: &Names, vxlan_port: u16) -> Kernel {
    let mut k = Kernel::default();
    for net in plan.networks.values() {
        if !matches!(net.driver, Driver::Overlay | Driver::Bridge) {
            continue;
        }
        let mut ns = Netns::default();
        ns.links.insert(
            "br0".into(),
            Link {
                kind: LinkKind::Bridge,
                mtu: net.mtu,
                mac: None,
                master: None,
                addrs: BTreeSet::from([(net.gateway, net.subnet.prefix_len())]),
                up: true,
            },
        );
        if let (Driver::Overlay, Some(vni)) = (net.driver, net.vni) {
            ns.links.insert(
                "vxlan0".into(),
                Link {
                    kind: LinkKind::Vxlan {
                        vni,
                        local: net.vtep,
                        port: vxlan_port,
                    },
                    mtu: net.mtu,
                    mac: None,
                    master: Some("br0".into()),
                    addrs: BTreeSet::new(),
                    up: true,
                },
            );
            for r in &net.remotes {
                ns.fdb.insert(Fdb {
                    link: "vxlan0".into(),
                    mac: r.mac,
                    dst: r.vtep,
                });
                ns.neigh.insert(Neigh {
                    link: "vxlan0".into(),
                    ip: r.ip,
                    mac: r.mac,
                });
            }
        }
        k.namespaces.insert(names.network(&net.id), ns);
    }
    for sb in plan.sandboxes.values() {
        let task_ns = names.task(&sb.task);
        let mut ns = Netns::default();
        for (i, ep) in sb.endpoints.iter().enumerate() {
            let Some(net) = plan.networks.get(&ep.network) else {
                continue;
            };
            if !matches!(net.driver, Driver::Overlay | Driver::Bridge) {
                continue;
            }
            let net_ns = names.network(&net.id);
            let eth = format!("eth{i}");
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
                    },
                );
            }
            ns.links.insert(
                eth,
                Link {
                    kind: LinkKind::Veth {
                        peer: port,
                        peer_ns: net_ns,
                    },
                    mtu: net.mtu,
                    mac: Some(ep.mac),
                    master: None,
                    addrs: BTreeSet::from([(ep.ip, ep.prefix)]),
                    up: true,
                },
            );
        }
        // East-west VIPs of the networks this task is on.
        for ep in &sb.endpoints {
            let Some(net) = plan.networks.get(&ep.network) else {
                continue;
            };
            for lb in net.lbs.iter().filter(|l| !l.backends.is_empty()) {
                ns.lb.insert(lb.vip, lb.backends.clone());
            }
        }
        k.namespaces.insert(task_ns, ns);
    }
    k
}
