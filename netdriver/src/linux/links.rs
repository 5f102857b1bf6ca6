//! Links: reading them back, creating, moving between namespaces and configuring them.

use super::*;

impl Linux {
    pub(super) async fn links(&mut self, ns: &Ns) -> Result<BTreeMap<String, Seen>, DpError> {
        let h = self.handle(ns).await?;
        let mut msgs = Vec::new();
        let mut s = h.link().get().execute();
        while let Some(m) = s.try_next().await.map_err(|e| netlink("dump links", e))? {
            msgs.push(m);
        }
        let names: HashMap<u32, String> = msgs
            .iter()
            .filter_map(|m| Some((m.header.index, link_name(m)?)))
            .collect();
        let mut out = BTreeMap::new();
        for m in &msgs {
            let Some(name) = link_name(m) else { continue };
            if name == "lo" {
                continue;
            }
            let link = link_from(m, &names);
            out.insert(
                name,
                Seen {
                    index: m.header.index,
                    link,
                },
            );
        }
        // Addresses.
        let mut s = h.address().get().execute();
        while let Some(a) = s
            .try_next()
            .await
            .map_err(|e| netlink("dump addresses", e))?
        {
            if a.header.family != AddressFamily::Inet {
                continue;
            }
            let ip = a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Local(IpAddr::V4(ip))
                | AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            if let (Some(ip), Some(seen)) =
                (ip, out.values_mut().find(|s| s.index == a.header.index))
            {
                seen.link.addrs.insert((ip, a.header.prefix_len));
            }
        }
        Ok(out)
    }

    pub(super) async fn index(&mut self, ns: &Ns, name: &str) -> Result<u32, DpError> {
        let h = self.handle(ns).await?;
        let mut s = h.link().get().match_name(name.to_owned()).execute();
        match s.try_next().await {
            Ok(Some(m)) => Ok(m.header.index),
            Ok(None) | Err(_) => Err(DpError::Missing(format!("no link {name} in {ns}"))),
        }
    }

    /// Moves link `index` (in `from`) to namespace `to` as `name`.
    pub(super) async fn move_link(
        &mut self,
        from: &Ns,
        index: u32,
        to: &Ns,
        name: &str,
    ) -> Result<(), DpError> {
        let h = self.handle(from).await?;
        let target = self.ns_file(to)?;
        let msg = LinkUnspec::new_with_index(index)
            .setns_by_fd(target.as_raw_fd())
            .name(name.to_owned())
            .build();
        h.link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| netlink(format!("move link to {to}"), e))
    }

    /// Creates the link `msg` describes in namespace `from` (its name from
    /// [`creation_name`]) and moves it into `ns` as `name`; nothing is left
    /// behind if the move fails.
    pub(super) async fn add_in_and_move(
        &mut self,
        from: &Ns,
        ns: &Ns,
        name: &str,
        msg: LinkMessage,
        what: &str,
    ) -> Result<(), DpError> {
        let tmp = creation_name(from, ns, name);
        let h = self.handle(from).await?;
        h.link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| netlink(format!("create {what}"), e))?;
        if ns != from {
            let idx = self.index(from, &tmp).await?;
            if let Err(e) = self.move_link(from, idx, ns, name).await {
                let _ = h.link().del(idx).execute().await;
                return Err(e);
            }
        }
        Ok(())
    }

    pub(super) async fn add_link(
        &mut self,
        ns: &Ns,
        name: &str,
        link: &Link,
    ) -> Result<(), DpError> {
        match &link.kind {
            LinkKind::Bridge => {
                let h = self.handle(ns).await?;
                h.link()
                    .add(LinkBridge::new(name).build())
                    .execute()
                    .await
                    .map_err(|e| netlink("create bridge", e))
            }
            LinkKind::Vxlan { vni, local, port } => {
                // Made in the host namespace, under a temporary `shoal…`
                // name, so that its socket is on the underlay.
                let msg = LinkVxlan::new(&creation_name(&HOST, ns, name), *vni)
                    .local(*local)
                    .port(*port)
                    .learning(false)
                    .proxy(true)
                    .build();
                self.add_in_and_move(&HOST, ns, name, msg, "vxlan").await
            }
            LinkKind::Veth { peer, peer_ns } => {
                let tmp = format!("shoalp{}", &name[..name.len().min(9)]);
                let h = self.handle(ns).await?;
                h.link()
                    .add(LinkVeth::new(name, &tmp).build())
                    .execute()
                    .await
                    .map_err(|e| netlink("create veth", e))?;
                let idx = self.index(ns, &tmp).await?;
                if let Err(e) = self.move_link(ns, idx, peer_ns, peer).await {
                    if let Ok(i) = self.index(ns, name).await {
                        let _ = h.link().del(i).execute().await;
                    }
                    return Err(e);
                }
                Ok(())
            }
            LinkKind::Macvlan { parent, parent_ns } => {
                let parent_idx = self.index(parent_ns, parent).await?;
                let msg = LinkMacVlan::new(
                    &creation_name(parent_ns, ns, name),
                    parent_idx,
                    MacVlanMode::Bridge,
                )
                .build();
                self.add_in_and_move(parent_ns, ns, name, msg, "macvlan")
                    .await
            }
            LinkKind::Other(k) => Err(DpError::Refused(format!("cannot create a {k} link"))),
        }
    }

    pub(super) async fn set_link(
        &mut self,
        ns: &Ns,
        name: &str,
        link: &Link,
    ) -> Result<(), DpError> {
        let links = self.links(ns).await?;
        let seen = links
            .get(name)
            .ok_or_else(|| DpError::Missing(format!("no link {name}")))?;
        let mut msg = LinkUnspec::new_with_index(seen.index).mtu(link.mtu);
        if let Some(mac) = link.mac {
            msg = msg.address(mac.to_vec());
        }
        msg = match &link.master {
            Some(m) => {
                let idx = links
                    .get(m)
                    .ok_or_else(|| DpError::Missing(format!("no bridge {m}")))?
                    .index;
                msg.controller(idx)
            }
            None => msg.nocontroller(),
        };
        msg = if link.up { msg.up() } else { msg.down() };
        let h = self.handle(ns).await?;
        h.link()
            .set(msg.build())
            .execute()
            .await
            .map_err(|e| netlink("set link", e))?;
        if link.master.is_some() {
            let port = rtnetlink::LinkBridgePort::new(seen.index)
                .isolated(link.isolated)
                .build();
            h.link()
                .set_port(port)
                .execute()
                .await
                .map_err(|e| netlink("set bridge port", e))?;
        }
        for (ip, len) in link.addrs.difference(&seen.link.addrs) {
            h.address()
                .add(seen.index, IpAddr::V4(*ip), *len)
                .execute()
                .await
                .map_err(|e| netlink(format!("add address {ip}/{len}"), e))?;
        }
        let extra: Vec<(Ipv4Addr, u8)> = seen.link.addrs.difference(&link.addrs).copied().collect();
        if !extra.is_empty() {
            let mut s = h
                .address()
                .get()
                .set_link_index_filter(seen.index)
                .execute();
            while let Some(a) = s
                .try_next()
                .await
                .map_err(|e| netlink("dump addresses", e))?
            {
                let ip = a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                });
                if ip.is_some_and(|ip| extra.contains(&(ip, a.header.prefix_len))) {
                    h.address()
                        .del(a)
                        .execute()
                        .await
                        .map_err(|e| netlink("delete address", e))?;
                }
            }
        }
        Ok(())
    }
}

/// The name a link bound for `ns` has while it is made in namespace
/// `from`: its own name if it stays there, else a `shoal…` one unique to
/// (namespace, name), at most 15 characters.
pub(super) fn creation_name(from: &Ns, ns: &Ns, name: &str) -> String {
    if ns == from {
        return name.to_owned();
    }
    let mut h: u32 = 0x811c_9dc5;
    let ns_name = ns.name().unwrap_or_default();
    for b in ns_name.bytes().chain([0]).chain(name.bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("shoalt{h:08x}")
}

pub(super) fn link_name(m: &LinkMessage) -> Option<String> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

/// A dumped link as the model has it (`names`: link names by index, for
/// its master). Its peer or parent is not in the dump: left empty.
fn link_from(m: &LinkMessage, names: &HashMap<u32, String>) -> Link {
    let mut link = Link {
        kind: LinkKind::Other("unknown".into()),
        mtu: 0,
        mac: None,
        master: None,
        addrs: BTreeSet::new(),
        up: m.header.flags.contains(LinkFlags::Up),
        isolated: false,
    };
    let mut vxlan = (0, Ipv4Addr::UNSPECIFIED, 0);
    for a in &m.attributes {
        match a {
            LinkAttribute::Mtu(v) => link.mtu = *v,
            LinkAttribute::Address(mac) if mac.len() == 6 => {
                link.mac = <[u8; 6]>::try_from(mac.as_slice()).ok();
            }
            LinkAttribute::Controller(i) => link.master = names.get(i).cloned(),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(k) => link.kind = link_kind(k),
                        LinkInfo::PortData(InfoPortData::BridgePort(v)) => {
                            link.isolated = v
                                .iter()
                                .any(|x| matches!(x, InfoBridgePort::Isolated(true)));
                        }
                        LinkInfo::Data(InfoData::Vxlan(v)) => {
                            for x in v {
                                match x {
                                    InfoVxlan::Id(id) => vxlan.0 = *id,
                                    InfoVxlan::Local(l) => vxlan.1 = *l,
                                    InfoVxlan::Port(p) => vxlan.2 = *p,
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if let LinkKind::Vxlan { .. } = link.kind {
        link.kind = LinkKind::Vxlan {
            vni: vxlan.0,
            local: vxlan.1,
            port: vxlan.2,
        };
    }
    link
}

/// The model's kind for a link kind the kernel reports.
fn link_kind(k: &InfoKind) -> LinkKind {
    match k {
        InfoKind::Bridge => LinkKind::Bridge,
        // A dump names neither a veth's peer nor a macvlan's parent's
        // namespace: left as the host's (`LinkKind::satisfies` ignores them).
        InfoKind::Veth => LinkKind::Veth {
            peer: String::new(),
            peer_ns: Ns::Host,
        },
        InfoKind::MacVlan => LinkKind::Macvlan {
            parent: String::new(),
            parent_ns: Ns::Host,
        },
        InfoKind::Vxlan => LinkKind::Vxlan {
            vni: 0,
            local: Ipv4Addr::UNSPECIFIED,
            port: 0,
        },
        k => LinkKind::Other(format!("{k:?}")),
    }
}
