//! Networks in the store: their specification as the user gave it, and the
//! deterministic allocation (subnets from the default pool, gateways, VNIs)
//! that `apply` performs, so every replica allocates alike and nothing can
//! be handed out twice.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ids::NetworkId;

use crate::cidr::Ipv4Net;

/// The first VNI handed out automatically.
pub const FIRST_VNI: u32 = 4096;
/// The largest VXLAN network identifier.
pub const MAX_VNI: u32 = (1 << 24) - 1;
/// Name of the routing-mesh network made at `swarm init`.
pub const INGRESS: &str = "ingress";
/// The ingress network's subnet.
pub const INGRESS_SUBNET: &str = "10.255.0.0/16";

/// A network driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    /// Multi-host, VXLAN.
    Overlay,
    /// One host, a Linux bridge.
    Bridge,
    /// An existing L2 through a parent interface.
    Macvlan,
    /// Like macvlan, one MAC.
    Ipvlan,
}

impl Driver {
    /// Whether its networks sit on their parent interface's LAN (macvlan,
    /// ipvlan): their subnets are meant to be the LAN's, routes and all.
    pub fn shares_parent_lan(self) -> bool {
        matches!(self, Driver::Macvlan | Driver::Ipvlan)
    }

    /// Whether its endpoints reach only endpoints on the same node
    /// (bridge): another node's task on it is unreachable from here, so it
    /// is no load-balancer backend and no DNS answer here.
    pub fn is_single_host(self) -> bool {
        self == Driver::Bridge
    }
}

impl fmt::Display for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Driver::Overlay => "overlay",
            Driver::Bridge => "bridge",
            Driver::Macvlan => "macvlan",
            Driver::Ipvlan => "ipvlan",
        })
    }
}

impl FromStr for Driver {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "overlay" => Ok(Driver::Overlay),
            "bridge" => Ok(Driver::Bridge),
            "macvlan" => Ok(Driver::Macvlan),
            "ipvlan" => Ok(Driver::Ipvlan),
            other => Err(format!(
                "unknown driver `{other}`: use overlay, bridge or macvlan"
            )),
        }
    }
}

/// One `--subnet` (with its `--gateway`), as asked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubnetSpec {
    /// The subnet.
    pub subnet: Ipv4Net,
    /// Its gateway; the first host address if not given.
    pub gateway: Option<Ipv4Addr>,
}

/// `network create`, as the user asked it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    /// Unique name.
    pub name: String,
    /// Driver.
    pub driver: Driver,
    /// Subnets; empty = one from the default pool.
    pub subnets: Vec<SubnetSpec>,
    /// `--ip-range`: where task addresses come from (inside the first subnet).
    pub ip_range: Option<Ipv4Net>,
    /// `--aux-address name=IP`: addresses never handed out.
    pub aux_addresses: BTreeMap<String, Ipv4Addr>,
    /// Standalone containers may attach.
    pub attachable: bool,
    /// No egress.
    pub internal: bool,
    /// `-o` options: `parent`, `mtu`, `vxlan-id`.
    pub options: BTreeMap<String, String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

impl NetworkSpec {
    /// Refuses what Shoal would store but not carry out, so that nobody
    /// relies on it: the ipvlan driver (no task would get an interface),
    /// a second subnet (only the first is programmed) and `--attachable`
    /// (there are no standalone containers to attach).
    pub fn check_supported(&self) -> Result<(), NetworkError> {
        if self.driver == Driver::Ipvlan {
            return Err(NetworkError::Unsupported(
                "the ipvlan driver is not supported yet (its tasks would get no interface): use -d macvlan to share the parent's LAN, or -d overlay".into(),
            ));
        }
        if self.subnets.len() > 1 {
            return Err(NetworkError::Unsupported(format!(
                "a network takes one --subnet ({} given): Shoal programs only one subnet per network; create one network per subnet",
                self.subnets.len()
            )));
        }
        if self.attachable {
            return Err(NetworkError::Unsupported(
                "--attachable is not supported: Shoal runs services, not standalone containers that could attach; attach a service with `shoal service create --network NAME`".into(),
            ));
        }
        Ok(())
    }

    /// A network of `driver` named `name`, with every option at its default
    /// (a subnet from the pool, no range, no options, no labels).
    pub fn new(name: &str, driver: Driver) -> Self {
        NetworkSpec {
            name: name.to_owned(),
            driver,
            subnets: Vec::new(),
            ip_range: None,
            aux_addresses: BTreeMap::new(),
            attachable: false,
            internal: false,
            options: BTreeMap::new(),
            labels: BTreeMap::new(),
        }
    }
}

/// A subnet as allocated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet {
    /// The prefix.
    pub subnet: Ipv4Net,
    /// Its gateway.
    pub gateway: Ipv4Addr,
}

/// A network in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// ID (16 hex digits).
    pub id: NetworkId,
    /// What was asked.
    pub spec: NetworkSpec,
    /// What was allocated.
    pub subnets: Vec<Subnet>,
    /// VXLAN network identifier (overlay only).
    pub vni: Option<u32>,
    /// MTU (`-o mtu`), if set.
    pub mtu: Option<u32>,
    /// The routing-mesh network.
    pub ingress: bool,
    /// Milliseconds since the epoch at creation.
    pub created_at_ms: u64,
}

/// Why a network cannot be created.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum NetworkError {
    /// Bad name.
    #[error(
        "invalid network name `{0}`: use letters, digits, `_`, `.` and `-`, starting with a letter or digit, at most 64 characters"
    )]
    BadName(String),
    /// Name taken.
    #[error("network `{0}` already exists")]
    Exists(String),
    /// Subnet overlaps another network's.
    #[error("subnet {subnet} overlaps {other} of network `{network}`")]
    Overlap {
        /// The asked subnet.
        subnet: Ipv4Net,
        /// The existing one.
        other: Ipv4Net,
        /// Its network.
        network: String,
    },
    /// Gateway, range or aux address out of place.
    #[error("{0}")]
    BadAddress(String),
    /// An `-o` option that is unknown or malformed.
    #[error("{0}")]
    BadOption(String),
    /// The VNI asked for is used.
    #[error("VXLAN ID {vni} is already used by network `{network}`")]
    VniInUse {
        /// The VNI.
        vni: u32,
        /// Who has it.
        network: String,
    },
    /// No room left.
    #[error("{0}")]
    Exhausted(String),
    /// Asked for something Shoal does not do yet (and would otherwise
    /// accept, store and then ignore).
    #[error("{0}")]
    Unsupported(String),
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && name.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Allocates `spec` against the existing `networks` and the default pool;
/// a subnet taken from the pool overlaps none of `avoid` (the routes of the
/// node that took the request).
/// Pure: same inputs, same network, on every replica.
pub fn allocate(
    id: &str,
    spec: &NetworkSpec,
    networks: &BTreeMap<NetworkId, Network>,
    pool: &[Ipv4Net],
    pool_mask: u8,
    avoid: &[Ipv4Net],
    created_at_ms: u64,
) -> Result<Network, NetworkError> {
    if !valid_name(&spec.name) {
        return Err(NetworkError::BadName(spec.name.clone()));
    }
    if networks.values().any(|n| n.spec.name == spec.name) {
        return Err(NetworkError::Exists(spec.name.clone()));
    }
    let (mtu, vni_asked) = options(spec)?;
    let subnets = subnets(spec, networks, pool, pool_mask, avoid)?;
    check_addresses(spec, &subnets)?;
    let vni = vni(spec, networks, vni_asked)?;
    Ok(Network {
        id: id.into(),
        spec: spec.clone(),
        subnets,
        vni,
        mtu,
        ingress: false,
        created_at_ms,
    })
}

/// The `-o` options, checked for the driver: the MTU and the VNI asked for.
fn options(spec: &NetworkSpec) -> Result<(Option<u32>, Option<u32>), NetworkError> {
    let mut mtu = None;
    let mut vni_asked = None;
    for (k, v) in &spec.options {
        match k.as_str() {
            "mtu" => {
                let m: u32 = v
                    .parse()
                    .ok()
                    .filter(|m| (68..=65_535).contains(m))
                    .ok_or_else(|| {
                        NetworkError::BadOption(format!("invalid -o mtu={v}: use 68 to 65535"))
                    })?;
                mtu = Some(m);
            }
            "vxlan-id" if spec.driver == Driver::Overlay => {
                let n: u32 = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_VNI).contains(n))
                    .ok_or_else(|| {
                        NetworkError::BadOption(format!(
                            "invalid -o vxlan-id={v}: use 1 to {MAX_VNI}"
                        ))
                    })?;
                vni_asked = Some(n);
            }
            "parent" if spec.driver.shares_parent_lan() => {
                if v.is_empty() || v.len() > 15 || v.contains('/') {
                    return Err(NetworkError::BadOption(format!(
                        "invalid -o parent={v}: name a host interface"
                    )));
                }
            }
            other => {
                return Err(NetworkError::BadOption(format!(
                    "option `{other}` is not supported by the {} driver (supported: {})",
                    spec.driver,
                    match spec.driver {
                        Driver::Overlay => "mtu, vxlan-id",
                        Driver::Bridge => "mtu",
                        Driver::Macvlan | Driver::Ipvlan => "parent, mtu",
                    }
                )));
            }
        }
    }
    if spec.driver.shares_parent_lan() && !spec.options.contains_key("parent") {
        return Err(NetworkError::BadOption(format!(
            "{} networks need -o parent=IFACE (the host interface to share)",
            spec.driver
        )));
    }
    Ok((mtu, vni_asked))
}

/// The subnets: those asked for, each checked against the others' and the
/// existing networks', with its gateway; or one free one from the pool.
fn subnets(
    spec: &NetworkSpec,
    networks: &BTreeMap<NetworkId, Network>,
    pool: &[Ipv4Net],
    pool_mask: u8,
    avoid: &[Ipv4Net],
) -> Result<Vec<Subnet>, NetworkError> {
    let taken: Vec<(&Ipv4Net, &str)> = networks
        .values()
        .flat_map(|n| {
            n.subnets
                .iter()
                .map(move |s| (&s.subnet, n.spec.name.as_str()))
        })
        .collect();
    let mut subnets = Vec::new();
    if spec.subnets.is_empty() {
        let free = pool
            .iter()
            .flat_map(|p| p.subnets(pool_mask))
            .find(|cand| {
                !taken.iter().any(|(t, _)| t.overlaps(cand))
                    && !avoid.iter().any(|a| a.overlaps(cand))
            })
            .ok_or_else(|| {
                NetworkError::Exhausted(if avoid.is_empty() {
                    "the default address pool is exhausted: pass --subnet, or remove unused networks".into()
                } else {
                    "the default address pool has no subnet left that is free and clear of this node's routes: pass --subnet, or remove unused networks".into()
                })
            })?;
        subnets.push(Subnet {
            subnet: free,
            gateway: free.nth(1).unwrap_or(free.network()),
        });
    }
    for (i, s) in spec.subnets.iter().enumerate() {
        if let Some((other, network)) = taken.iter().find(|(t, _)| t.overlaps(&s.subnet)) {
            return Err(NetworkError::Overlap {
                subnet: s.subnet,
                other: **other,
                network: (*network).to_owned(),
            });
        }
        if let Some(prev) = spec.subnets[..i]
            .iter()
            .find(|p| p.subnet.overlaps(&s.subnet))
        {
            return Err(NetworkError::BadAddress(format!(
                "subnets {} and {} overlap",
                prev.subnet, s.subnet
            )));
        }
        if s.subnet.prefix_len() > 30 {
            return Err(NetworkError::BadAddress(format!(
                "subnet {} is too small: use /30 or larger",
                s.subnet
            )));
        }
        let gateway = match s.gateway {
            Some(g) => {
                if !s.subnet.contains(g) || g == s.subnet.network() || g == s.subnet.broadcast() {
                    return Err(NetworkError::BadAddress(format!(
                        "gateway {g} is not a host address of subnet {}",
                        s.subnet
                    )));
                }
                g
            }
            None => s.subnet.nth(1).unwrap_or(s.subnet.network()),
        };
        subnets.push(Subnet {
            subnet: s.subnet,
            gateway,
        });
    }
    Ok(subnets)
}

/// `--ip-range` inside the first subnet, `--aux-address`es inside one.
fn check_addresses(spec: &NetworkSpec, subnets: &[Subnet]) -> Result<(), NetworkError> {
    if let Some(r) = spec.ip_range
        && !subnets.first().is_some_and(|s| s.subnet.contains_net(&r))
    {
        return Err(NetworkError::BadAddress(format!(
            "--ip-range {r} is not inside the subnet {}",
            subnets
                .first()
                .map(|s| s.subnet.to_string())
                .unwrap_or_default()
        )));
    }
    for (name, ip) in &spec.aux_addresses {
        if !subnets.iter().any(|s| s.subnet.contains(*ip)) {
            return Err(NetworkError::BadAddress(format!(
                "--aux-address {name}={ip} is outside every subnet of the network"
            )));
        }
    }
    Ok(())
}

/// An overlay's VNI: the one asked for if free, else the first free one.
fn vni(
    spec: &NetworkSpec,
    networks: &BTreeMap<NetworkId, Network>,
    asked: Option<u32>,
) -> Result<Option<u32>, NetworkError> {
    let vni = if spec.driver == Driver::Overlay {
        let used = |v: u32| networks.values().find(|n| n.vni == Some(v));
        Some(match asked {
            Some(v) => {
                if let Some(n) = used(v) {
                    return Err(NetworkError::VniInUse {
                        vni: v,
                        network: n.spec.name.clone(),
                    });
                }
                v
            }
            None => (FIRST_VNI..=MAX_VNI)
                .find(|v| used(*v).is_none())
                .ok_or_else(|| NetworkError::Exhausted("no free VXLAN ID left".into()))?,
        })
    } else {
        None
    };
    Ok(vni)
}

/// The `ingress` network's specification.
pub fn ingress_spec() -> NetworkSpec {
    NetworkSpec {
        subnets: vec![SubnetSpec {
            subnet: INGRESS_SUBNET
                .parse()
                .unwrap_or_else(|_| unreachable!("constant CIDR")),
            gateway: None,
        }],
        ..NetworkSpec::new(INGRESS, Driver::Overlay)
    }
}

#[cfg(test)]
#[path = "network_test.rs"]
mod tests;
