//! Address and port allocation, pure and deterministic: the lowest free
//! address or port wins, so every replica that applies the same log hands
//! out the same ones. Used by `apply` for VIPs, task addresses and published
//! ports.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use crate::network::Network;

/// The range published ports are picked from when none is asked for.
pub const DYNAMIC_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;

/// Why an allocation failed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
pub enum AllocError {
    /// Every address of the network is taken.
    #[error("network `{0}` has no free address left")]
    NetworkFull(String),
    /// The port asked for is taken.
    #[error("port {port}/{protocol} is already published by {owner}")]
    PortInUse {
        /// The port.
        port: u16,
        /// `tcp` or `udp`.
        protocol: String,
        /// Who publishes it.
        owner: String,
    },
    /// Port 0 or otherwise invalid.
    #[error("invalid published port {0}: use 1 to 65535")]
    BadPort(u16),
    /// No dynamic port left.
    #[error("no free port left in 30000-32767")]
    PortsExhausted,
}

/// Addresses of `network` that are never handed out: network and broadcast
/// addresses, gateways, aux addresses.
pub(crate) fn reserved(network: &Network) -> BTreeSet<Ipv4Addr> {
    let mut r: BTreeSet<Ipv4Addr> = network.spec.aux_addresses.values().copied().collect();
    for s in &network.subnets {
        r.insert(s.subnet.network());
        r.insert(s.subnet.broadcast());
        r.insert(s.gateway);
    }
    r
}

/// The lowest free address of `network` (inside `--ip-range` if set, else
/// its subnets in order), given the addresses already `used`.
pub fn allocate_ip(network: &Network, used: &BTreeSet<Ipv4Addr>) -> Result<Ipv4Addr, AllocError> {
    let reserved = reserved(network);
    let ranges: Vec<crate::cidr::Ipv4Net> = match network.spec.ip_range {
        Some(r) => vec![r],
        None => network.subnets.iter().map(|s| s.subnet).collect(),
    };
    ranges
        .iter()
        .flat_map(|r| (0..r.size()).filter_map(move |i| r.nth(i)))
        .find(|ip| !reserved.contains(ip) && !used.contains(ip))
        .ok_or_else(|| AllocError::NetworkFull(network.spec.name.clone()))
}

/// A published port for `owner`: the one asked for if it is free, else the
/// lowest free one in [`DYNAMIC_PORTS`]. `used` holds (port, protocol, owner).
pub fn allocate_port(
    asked: Option<u16>,
    protocol: &str,
    used: &[(u16, String, String)],
) -> Result<u16, AllocError> {
    let taken = |p: u16| {
        used.iter()
            .find(|(q, proto, _)| *q == p && proto == protocol)
    };
    match asked {
        Some(0) => Err(AllocError::BadPort(0)),
        Some(p) => match taken(p) {
            Some((_, _, owner)) => Err(AllocError::PortInUse {
                port: p,
                protocol: protocol.to_owned(),
                owner: owner.clone(),
            }),
            None => Ok(p),
        },
        None => DYNAMIC_PORTS
            .clone()
            .find(|p| taken(*p).is_none())
            .ok_or(AllocError::PortsExhausted),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::network::{Driver, NetworkSpec, SubnetSpec, allocate};

    fn net(subnet: &str, ip_range: Option<&str>, aux: &[(&str, &str)]) -> Network {
        let spec = NetworkSpec {
            name: "n".into(),
            driver: Driver::Overlay,
            subnets: vec![SubnetSpec {
                subnet: subnet.parse().unwrap(),
                gateway: None,
            }],
            ip_range: ip_range.map(|r| r.parse().unwrap()),
            aux_addresses: aux
                .iter()
                .map(|(k, v)| ((*k).into(), v.parse().unwrap()))
                .collect(),
            attachable: false,
            internal: false,
            options: BTreeMap::new(),
            labels: BTreeMap::new(),
        };
        allocate("id", &spec, &BTreeMap::new(), &[], 24, &[], 0).unwrap()
    }

    #[test]
    fn addresses_skip_network_gateway_aux_and_broadcast() {
        let n = net("10.0.0.0/29", None, &[("r", "10.0.0.2")]);
        let mut used = BTreeSet::new();
        let mut got = Vec::new();
        while let Ok(ip) = allocate_ip(&n, &used) {
            used.insert(ip);
            got.push(ip.to_string());
        }
        assert_eq!(got, ["10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]);
        assert_eq!(
            allocate_ip(&n, &used),
            Err(AllocError::NetworkFull("n".into()))
        );
    }

    #[test]
    fn an_ip_range_bounds_the_addresses() {
        let n = net("10.0.0.0/24", Some("10.0.0.128/30"), &[]);
        assert_eq!(
            allocate_ip(&n, &BTreeSet::new()).unwrap().to_string(),
            "10.0.0.128"
        );
    }

    #[test]
    fn ports_are_the_asked_one_or_the_lowest_dynamic_one() {
        let used = vec![
            (8080, "tcp".to_owned(), "web".to_owned()),
            (30000, "tcp".to_owned(), "a".to_owned()),
        ];
        assert_eq!(allocate_port(Some(8080), "udp", &used), Ok(8080));
        assert_eq!(
            allocate_port(Some(8080), "tcp", &used)
                .unwrap_err()
                .to_string(),
            "port 8080/tcp is already published by web"
        );
        assert_eq!(allocate_port(None, "tcp", &used), Ok(30001));
        assert_eq!(
            allocate_port(Some(0), "tcp", &used),
            Err(AllocError::BadPort(0))
        );
    }

    proptest! {
        /// Allocating and freeing at random never hands out an address twice,
        /// nor a reserved one, nor one outside the network.
        #[test]
        fn addresses_are_never_handed_out_twice(ops in proptest::collection::vec(any::<bool>(), 1..200)) {
            let n = net("10.1.0.0/26", None, &[("x", "10.1.0.9")]);
            let reserved = reserved(&n);
            let mut used = BTreeSet::new();
            for alloc in ops {
                if alloc {
                    if let Ok(ip) = allocate_ip(&n, &used) {
                        prop_assert!(!used.contains(&ip));
                        prop_assert!(!reserved.contains(&ip));
                        prop_assert!(n.subnets[0].subnet.contains(ip));
                        used.insert(ip);
                    }
                } else if let Some(ip) = used.iter().next().copied() {
                    used.remove(&ip);
                }
            }
        }
    }
}
