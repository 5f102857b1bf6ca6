//! The Linux backend: named network namespaces under `/run/netns` (created
//! the way iproute2 does: a thread unshares its network namespace and it
//! is bind-mounted there), and links, addresses, FDB and neighbour entries
//! through rtnetlink, with one netlink socket opened inside each namespace.
//!
//! VXLAN devices are created in the host namespace (so that their UDP
//! socket is on the underlay) and moved into the network's namespace under
//! their final name in the same request; a veth pair is created in one
//! namespace and its other end moved and renamed the same way.

mod entries;
mod links;
mod netns;
mod observe;
mod tables;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::MacVlanMode;
use rtnetlink::packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoVxlan, LinkAttribute, LinkFlags,
    LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol};
use rtnetlink::{
    Handle, LinkBridge, LinkMacVlan, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder,
};

use crate::model::{Fdb, HOST, Kernel, Link, LinkKind, Neigh, Netns, Ns, Op};
use crate::{Backend, DpError, ctnl};

pub use netns::{
    create_netns, delete_netns, host_routes, in_netns, link_exists, list_netns, probe_driver,
    routes_via,
};

/// Where named network namespaces live.
pub const NETNS_DIR: &str = "/run/netns";

fn netlink(what: impl Into<String>, source: rtnetlink::Error) -> DpError {
    DpError::Netlink {
        what: what.into(),
        source,
    }
}

fn io(what: impl Into<String>, source: std::io::Error) -> DpError {
    DpError::Io {
        what: what.into(),
        source,
    }
}

fn sys(what: impl Into<String>, source: nix::Error) -> DpError {
    DpError::Sys {
        what: what.into(),
        source,
    }
}

/// The Linux backend.
pub struct Linux {
    /// The namespace standing for the host (the daemon's own if `None`;
    /// tests use a namespace of their own).
    host: Option<String>,
    handles: HashMap<Ns, Handle>,
    /// Each namespace's VIP backend slots as last read or written.
    lb_slots: HashMap<Ns, BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>>,
    /// Netlink sequence numbers of nf_tables batches.
    seq: u32,
    /// Backend changes applied over netlink (not `nft`).
    netlink_changes: u64,
    /// A netfilter netlink socket per namespace (opened there once).
    nf_socks: HashMap<Ns, std::os::fd::OwnedFd>,
    /// Each namespace's tables as `nft` last listed them, with the
    /// nf_tables generation they were read at: while the generation stays,
    /// nothing changed them, and they are not listed again.
    tables_seen: HashMap<Ns, TablesSeen>,
    /// `nft` listings made by observations.
    nft_listings: u64,
    /// Forgets the connections of backends that left (started when first
    /// needed).
    janitor: Option<ctnl::Janitor>,
}

/// A namespace's tables as listed: the generation, the port forwarding
/// (and what else its table holds), the VIP slots.
type TablesSeen = (u32, Option<NatSeen>, BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>);

/// Port forwarding read back, and the rest of its table, described.
type NatSeen = (crate::model::Nat, Vec<String>);

/// A link as dumped: index and model.
struct Seen {
    index: u32,
    link: Link,
}

impl Linux {
    /// How many VIP backend changes went over nf_tables netlink (the rest
    /// of the load-balancing table is written by `nft`).
    pub fn netlink_changes(&self) -> u64 {
        self.netlink_changes
    }

    /// How many times an observation ran `nft` to list a namespace's
    /// tables (it does not while their nf_tables generation stays).
    pub fn nft_listings(&self) -> u64 {
        self.nft_listings
    }

    /// A backend whose host namespace is `host` (a name under `/run/netns`)
    /// or, if `None`, the one this process runs in.
    pub fn new(host: Option<String>) -> Self {
        Linux {
            host,
            handles: HashMap::new(),
            lb_slots: HashMap::new(),
            seq: std::process::id() << 16,
            netlink_changes: 0,
            nf_socks: HashMap::new(),
            tables_seen: HashMap::new(),
            nft_listings: 0,
            janitor: None,
        }
    }

    /// The MTU of the host-namespace interface that holds `ip`.
    pub async fn mtu_of(&mut self, ip: Ipv4Addr) -> Option<u32> {
        let h = self.handle(&HOST).await.ok()?;
        let mut s = h.address().get().execute();
        let mut index = None;
        while let Ok(Some(a)) = s.try_next().await {
            let holds = a.attributes.iter().any(|x| {
                matches!(x, AddressAttribute::Local(IpAddr::V4(v)) | AddressAttribute::Address(IpAddr::V4(v)) if *v == ip)
            });
            if holds {
                index = Some(a.header.index);
                break;
            }
        }
        let index = index?;
        let mut s = h.link().get().match_index(index).execute();
        let m = s.try_next().await.ok()??;
        m.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(v) => Some(*v),
            _ => None,
        })
    }

    fn ns_path(&self, ns: &Ns) -> Option<PathBuf> {
        match ns {
            Ns::Host => self.host.as_ref().map(|h| Path::new(NETNS_DIR).join(h)),
            Ns::Named(name) => Some(Path::new(NETNS_DIR).join(name)),
        }
    }

    /// A file naming namespace `ns`, for moving links there.
    fn ns_file(&self, ns: &Ns) -> Result<File, DpError> {
        let path = self
            .ns_path(ns)
            .unwrap_or_else(|| PathBuf::from("/proc/self/ns/net"));
        File::open(&path).map_err(|e| io(path.display().to_string(), e))
    }

    /// A netlink handle whose socket lives in namespace `ns`.
    async fn handle(&mut self, ns: &Ns) -> Result<Handle, DpError> {
        if let Some(h) = self.handles.get(ns) {
            return Ok(h.clone());
        }
        let rt = tokio::runtime::Handle::current();
        let (conn, handle) = in_netns(self.ns_path(ns), move || {
            let _enter = rt.enter();
            let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| io("netlink", e))?;
            Ok((conn, handle))
        })?;
        tokio::spawn(conn);
        self.handles.insert(ns.clone(), handle.clone());
        Ok(handle)
    }

    async fn apply_op(&mut self, op: &Op) -> Result<(), DpError> {
        match op {
            Op::AddNetns(name) => {
                create_netns(name)?;
                let h = self.handle(&Ns::named(name.clone())).await?;
                let lo = LinkUnspec::new_with_name("lo").up().build();
                h.link()
                    .set(lo)
                    .execute()
                    .await
                    .map_err(|e| netlink("loopback up", e))
            }
            Op::DelNetns(name) => {
                let ns = Ns::named(name.clone());
                self.handles.remove(&ns);
                self.nf_socks.remove(&ns);
                self.lb_slots.remove(&ns);
                self.tables_seen.remove(&ns);
                delete_netns(name)
            }
            Op::AddLink { ns, name, link } => self.add_link(ns, name, link).await,
            Op::DelLink { ns, name } => self.del_link(ns, name).await,
            Op::SetLink { ns, name, link } => self.set_link(ns, name, link).await,
            Op::AddFdb(ns, f) => self.fdb(ns, f, true).await,
            Op::DelFdb(ns, f) => self.fdb(ns, f, false).await,
            Op::AddNeigh(ns, n) => self.neigh(ns, n, true).await,
            Op::DelNeigh(ns, n) => self.neigh(ns, n, false).await,
            Op::AddRoute(ns, r) => self.route(ns, r, true).await,
            Op::DelRoute(ns, r) => self.route(ns, r, false).await,
            Op::SetLb {
                ns,
                lb,
                changed,
                fresh,
            } => self.apply_lb(ns, lb, changed, *fresh),
            Op::SetNat { ns, nat } => self.apply_nat(ns, nat.as_ref()),
            Op::EnableForwarding(ns) => self.write_sysctl(ns, "net/ipv4/ip_forward", "1"),
        }
    }
}

impl Backend for Linux {
    async fn underlay_mtu(&mut self, ip: Ipv4Addr) -> Option<u32> {
        self.mtu_of(ip).await
    }

    async fn observe(&mut self, prefix: &str) -> Result<Kernel, DpError> {
        let mut k = Kernel::default();
        k.namespaces.insert(HOST, self.observe_ns(&HOST).await?);
        let listed: Vec<Ns> = list_netns(prefix).into_iter().map(Ns::Named).collect();
        // Sockets hold their namespace: none for one that went away.
        let keep =
            |ns: &Ns| ns.name().is_none_or(|n| !n.starts_with(prefix)) || listed.contains(ns);
        self.nf_socks.retain(|ns, _| keep(ns));
        self.tables_seen.retain(|ns, _| keep(ns));
        for ns in listed {
            // One that cannot be read (a file left by a crash before it
            // was bound) is reported empty, so that it is removed.
            match self.observe_ns(&ns).await {
                Ok(n) => {
                    k.namespaces.insert(ns, n);
                }
                Err(_) => {
                    self.handles.remove(&ns);
                    self.nf_socks.remove(&ns);
                    self.tables_seen.remove(&ns);
                    k.namespaces.insert(ns, Netns::default());
                }
            }
        }
        Ok(k)
    }

    async fn apply(&mut self, op: &Op) -> Result<(), DpError> {
        self.apply_op(op).await.map_err(|cause| DpError::Op {
            op: Box::new(op.clone()),
            cause: Box::new(cause),
        })
    }
}
