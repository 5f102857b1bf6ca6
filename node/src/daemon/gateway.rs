//! The subnet of the gateway bridge (`shoalgw0`): the host-local subnet
//! tasks reach the world through, masqueraded. It is chosen when the daemon
//! starts, clear of every route of the host: a bridge on a subnet the host
//! already reaches elsewhere (its LAN, a VPN, a cloud's VPC such as AWS's
//! default 172.31.0.0/16) would take that traffic from the host.
//!
//! Also the check, on every node, of the networks it has tasks on against
//! its own routes (`network create` checks the creating node's only).

use std::net::Ipv4Addr;

use shoal_mesh::cidr::Ipv4Net;
use shoal_netdriver::render::GATEWAY_BRIDGE;

/// The subnets tried in order when none is configured.
fn candidates() -> impl Iterator<Item = Ipv4Net> {
    let big = (16..=31u8)
        .rev()
        .filter_map(|b| Ipv4Net::new(Ipv4Addr::new(172, b, 0, 0), 16));
    let small = (0..16u8)
        .rev()
        .filter_map(|k| Ipv4Net::new(Ipv4Addr::new(192, 168, k * 16, 0), 20));
    big.chain(small)
}

/// The gateway subnet to use: the configured one, refused when it overlaps
/// one of the host's `routes` (destination, device; Shoal's own left out);
/// or else the one `in_use` on the bridge while it stays clear (running
/// tasks keep their addresses); or else the first clear candidate.
pub fn choose(
    configured: Option<Ipv4Net>,
    in_use: Option<Ipv4Net>,
    routes: &[(Ipv4Net, String)],
) -> Result<Ipv4Net, String> {
    let clash = |net: &Ipv4Net| routes.iter().find(|(r, _)| r.overlaps(net));
    if let Some(net) = configured {
        return match clash(&net) {
            Some((r, dev)) => Err(format!(
                "[dataplane] gateway_subnet {net} overlaps this host's route {r} dev {dev}: \
                 set it to a subnet no route of this host uses, or remove it to have one chosen"
            )),
            None => Ok(net),
        };
    }
    in_use
        .into_iter()
        .chain(candidates())
        .find(|net| clash(net).is_none())
        .ok_or_else(|| {
            "every gateway subnet Shoal tries (172.31.0.0/16 … 172.16.0.0/16, \
             192.168.240.0/20 … 192.168.0.0/20) overlaps a route of this host: \
             set [dataplane] gateway_subnet to a free one"
                .to_owned()
        })
}

/// This host's routes (destination, device), Shoal's own left out.
pub async fn host_routes() -> anyhow::Result<Vec<(Ipv4Net, String)>> {
    Ok(shoal_netdriver::linux::host_routes()
        .await
        .map_err(|e| anyhow::anyhow!("cannot read this host's routes: {e}"))?
        .into_iter()
        .filter_map(|(dst, len, dev)| Some((Ipv4Net::new(dst, len)?, dev)))
        .collect())
}

/// What the networks of this node must stay clear of: the host's routes
/// and, with `gateway`, the gateway bridge's subnet (a task on both would
/// have two routes to it). When the host's routes cannot be read, `Err`
/// carries the gateway's alone.
pub async fn node_routes(
    gateway: Option<Ipv4Net>,
) -> Result<Vec<(Ipv4Net, String)>, Vec<(Ipv4Net, String)>> {
    let bridge = gateway.map(|gw| (gw, GATEWAY_BRIDGE.to_owned()));
    match host_routes().await {
        Ok(mut routes) => {
            routes.extend(bridge);
            Ok(routes)
        }
        Err(_) => Err(bridge.into_iter().collect()),
    }
}

/// For each network (name, subnet) whose subnet overlaps one of `routes`
/// (the host's, and the gateway bridge's), what that means for its tasks
/// on this node.
pub fn route_clashes<'a>(
    networks: impl IntoIterator<Item = (&'a str, Ipv4Net)>,
    routes: &[(Ipv4Net, String)],
) -> Vec<String> {
    let mut out = Vec::new();
    for (name, subnet) in networks {
        for (route, dev) in routes.iter().filter(|(r, _)| r.overlaps(&subnet)) {
            out.push(format!(
                "network {name} ({subnet}) overlaps this node's route {route} dev {dev}: \
                 its tasks here cannot reach that route's addresses in {subnet}"
            ));
        }
    }
    out
}

/// Reads the host's routes and the bridge's current subnet, and chooses.
pub async fn resolve(configured: Option<&str>) -> anyhow::Result<Ipv4Net> {
    let configured = match configured {
        Some(s) => Some(
            s.parse::<Ipv4Net>()
                .map_err(|e| anyhow::anyhow!("[dataplane] gateway_subnet `{s}`: {e}"))?,
        ),
        None => None,
    };
    let routes = host_routes().await?;
    let in_use = shoal_netdriver::linux::routes_via(GATEWAY_BRIDGE)
        .await
        .unwrap_or_default()
        .into_iter()
        .find_map(|(dst, len)| Ipv4Net::new(dst, len));
    choose(configured, in_use, &routes).map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn routes(list: &[(&str, &str)]) -> Vec<(Ipv4Net, String)> {
        list.iter()
            .map(|(r, d)| (net(r), (*d).to_owned()))
            .collect()
    }

    #[test]
    fn the_first_candidate_clear_of_the_hosts_routes_is_taken() {
        assert_eq!(choose(None, None, &[]).unwrap(), net("172.31.0.0/16"));
        // A host in AWS's default VPC.
        let r = routes(&[("172.31.16.0/20", "eth0"), ("10.0.0.0/8", "wg0")]);
        assert_eq!(choose(None, None, &r).unwrap(), net("172.30.0.0/16"));
        // A route covering all of 172.16/12 pushes it to 192.168.
        let r = routes(&[("172.16.0.0/12", "tun0"), ("192.168.240.0/24", "eth1")]);
        assert_eq!(choose(None, None, &r).unwrap(), net("192.168.224.0/20"));
    }

    #[test]
    fn the_subnet_in_use_is_kept_while_it_stays_clear() {
        let r = routes(&[("192.168.1.0/24", "eth0")]);
        assert_eq!(
            choose(None, Some(net("172.29.0.0/16")), &r).unwrap(),
            net("172.29.0.0/16")
        );
        // A VPN came up over it since: another is chosen.
        let r = routes(&[("172.29.4.0/24", "tun0")]);
        assert_eq!(
            choose(None, Some(net("172.29.0.0/16")), &r).unwrap(),
            net("172.31.0.0/16")
        );
    }

    #[test]
    fn a_configured_subnet_is_used_as_is_or_refused_naming_the_route() {
        let r = routes(&[("10.1.0.0/16", "eth0")]);
        assert_eq!(
            choose(Some(net("10.2.0.0/16")), Some(net("172.31.0.0/16")), &r).unwrap(),
            net("10.2.0.0/16")
        );
        let e = choose(Some(net("10.0.0.0/8")), None, &r).unwrap_err();
        assert!(
            e.contains("10.0.0.0/8") && e.contains("10.1.0.0/16 dev eth0"),
            "{e}"
        );
    }

    #[test]
    fn a_network_on_a_route_of_this_node_is_named_with_the_route() {
        let r = routes(&[("10.0.0.0/16", "wg0"), ("172.31.0.0/16", "shoalgw0")]);
        let nets = [
            ("appnet", net("10.0.1.0/24")),
            ("clear", net("10.1.0.0/24")),
            ("odd", net("172.31.5.0/24")),
        ];
        let c = route_clashes(nets, &r);
        assert_eq!(c.len(), 2, "{c:?}");
        assert!(
            c[0].contains("network appnet (10.0.1.0/24)") && c[0].contains("10.0.0.0/16 dev wg0")
        );
        assert!(c[1].contains("network odd") && c[1].contains("dev shoalgw0"));
        assert!(route_clashes(nets, &[]).is_empty());
    }

    #[test]
    fn no_clear_candidate_is_an_error_that_says_what_to_set() {
        let r = routes(&[("172.16.0.0/12", "a"), ("192.168.0.0/16", "b")]);
        let e = choose(None, None, &r).unwrap_err();
        assert!(e.contains("gateway_subnet"), "{e}");
    }
}
