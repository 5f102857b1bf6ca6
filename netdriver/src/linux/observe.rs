//! Reading a namespace back into the model: links, addresses, FDB, neighbours, routes, tables.

use super::*;

impl Linux {
    pub(super) async fn observe_ns(&mut self, ns: &Ns) -> Result<Netns, DpError> {
        let links = self.links(ns).await?;
        let by_index: HashMap<u32, &str> =
            links.iter().map(|(n, s)| (s.index, n.as_str())).collect();
        let h = self.handle(ns).await?;
        let mut out = Netns::default();
        let mut s = h
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute();
        while let Some(n) = s.try_next().await.map_err(|e| netlink("dump FDB", e))? {
            let Some(link) = by_index.get(&n.header.ifindex) else {
                continue;
            };
            if !matches!(links[*link].link.kind, LinkKind::Vxlan { .. }) {
                continue;
            }
            if let (Some(mac), Some(IpAddr::V4(dst))) = (lladdr(&n), destination(&n)) {
                out.fdb.insert(Fdb {
                    link: (*link).to_owned(),
                    mac,
                    dst,
                });
            }
        }
        let mut s = h
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute();
        while let Some(n) = s
            .try_next()
            .await
            .map_err(|e| netlink("dump neighbours", e))?
        {
            if n.header.state != NeighbourState::Permanent {
                continue;
            }
            let Some(link) = by_index.get(&n.header.ifindex) else {
                continue;
            };
            if let (Some(mac), Some(IpAddr::V4(ip))) = (lladdr(&n), destination(&n)) {
                out.neigh.insert(Neigh {
                    link: (*link).to_owned(),
                    ip,
                    mac,
                });
            }
        }
        let (nat, slots) = self.tables(ns);
        if let Some((nat, foreign)) = nat {
            out.nat = Some(nat);
            out.nat_foreign = foreign;
        }
        out.forwarding = self
            .read_sysctl(ns, "net/ipv4/ip_forward")
            .is_some_and(|v| v.trim() == "1");
        out.routes = static_routes(&h, &by_index).await?;
        if *ns != HOST {
            out.lb = slots
                .iter()
                .map(|(v, b)| (*v, b.iter().copied().collect()))
                .collect();
            self.lb_slots.insert(ns.clone(), slots);
        }
        out.links = links
            .into_iter()
            .filter(|(name, _)| *ns != HOST || name.starts_with("shoal"))
            .map(|(n, s)| (n, s.link))
            .collect();
        if *ns == HOST {
            let keep: BTreeSet<String> = out.links.keys().cloned().collect();
            out.fdb.retain(|f| keep.contains(&f.link));
            out.neigh.retain(|n| keep.contains(&n.link));
            out.routes.retain(|r| keep.contains(&r.dev));
        }
        Ok(out)
    }

    pub(super) fn neighbour(
        index: u32,
        family: AddressFamily,
        mac: &[u8; 6],
        dst: Ipv4Addr,
    ) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = family;
        m.header.ifindex = index;
        m.header.state = NeighbourState::Permanent;
        if family == AddressFamily::Bridge {
            m.header.flags = NeighbourFlags::Own;
        }
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
        m
    }
}

pub(super) fn lladdr(n: &NeighbourMessage) -> Option<[u8; 6]> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(m) => <[u8; 6]>::try_from(m.as_slice()).ok(),
        _ => None,
    })
}

pub(super) fn destination(n: &NeighbourMessage) -> Option<IpAddr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
        // Bridge-family entries carry their destination as raw bytes.
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
            <[u8; 4]>::try_from(b.as_slice())
                .ok()
                .map(|o| IpAddr::V4(o.into()))
        }
        _ => None,
    })
}

/// The static routes of the namespace behind `h`, on links of `by_index`.
async fn static_routes(
    h: &Handle,
    by_index: &HashMap<u32, &str>,
) -> Result<BTreeSet<crate::model::Route>, DpError> {
    let mut routes = BTreeSet::new();
    let mut s = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(r) = s.try_next().await.map_err(|e| netlink("dump routes", e))? {
        if r.header.protocol != RouteProtocol::Static {
            continue;
        }
        let mut dst = Ipv4Addr::UNSPECIFIED;
        let mut via = None;
        let mut dev = None;
        for a in &r.attributes {
            match a {
                RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => via = Some(*g),
                RouteAttribute::Oif(i) => dev = by_index.get(i).map(|n| (*n).to_owned()),
                _ => {}
            }
        }
        if let Some(dev) = dev {
            routes.insert(crate::model::Route {
                dst: (dst, r.header.destination_prefix_length),
                via,
                dev,
            });
        }
    }
    Ok(routes)
}
