//! The Linux backend: named network namespaces under `/run/netns` (created
//! the way iproute2 does: a thread unshares its network namespace and it
//! is bind-mounted there), and links, addresses, FDB and neighbour entries
//! through rtnetlink, with one netlink socket opened inside each namespace.
//!
//! VXLAN devices are created in the host namespace (so that their UDP
//! socket is on the underlay) and moved into the network's namespace under
//! their final name in the same request; a veth pair is created in one
//! namespace and its other end moved and renamed the same way.

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

use crate::model::{Fdb, HOST, Kernel, Link, LinkKind, Neigh, Netns, Op};
use crate::{Backend, DpError, ctnl};

/// Where named network namespaces live.
pub const NETNS_DIR: &str = "/run/netns";

fn other(what: &str, e: impl std::fmt::Display) -> DpError {
    DpError::Other(format!("{what}: {e}"))
}

fn kernel(op: &Op, e: impl std::fmt::Display) -> DpError {
    let what = match op {
        Op::AddNetns(n) => format!("create namespace {n}"),
        Op::DelNetns(n) => format!("delete namespace {n}"),
        Op::AddLink { ns, name, .. } => format!("create link {name} in {}", show_ns(ns)),
        Op::DelLink { ns, name } => format!("delete link {name} in {}", show_ns(ns)),
        Op::SetLink { ns, name, .. } => format!("configure link {name} in {}", show_ns(ns)),
        Op::AddFdb(ns, f) => format!("add FDB {:?} in {}", f, show_ns(ns)),
        Op::DelFdb(ns, f) => format!("delete FDB {:?} in {}", f, show_ns(ns)),
        Op::AddNeigh(ns, n) => format!("add neighbour {:?} in {}", n, show_ns(ns)),
        Op::DelNeigh(ns, n) => format!("delete neighbour {:?} in {}", n, show_ns(ns)),
        Op::AddRoute(ns, r) => format!("add route {:?} in {}", r, show_ns(ns)),
        Op::DelRoute(ns, r) => format!("delete route {:?} in {}", r, show_ns(ns)),
        Op::SetLb { ns, .. } => format!("program VIP load balancing in {}", show_ns(ns)),
        Op::SetNat { ns, .. } => format!("program port forwarding in {}", show_ns(ns)),
        Op::EnableForwarding(ns) => format!("enable IPv4 forwarding in {}", show_ns(ns)),
    };
    DpError::Kernel {
        op: what,
        reason: e.to_string(),
    }
}

fn show_ns(ns: &str) -> &str {
    if ns == HOST { "the host namespace" } else { ns }
}

/// Runs `f` on a thread of its own that first enters the network namespace
/// at `path` (stays in this one when `None`): sockets it opens and
/// processes it spawns live there.
pub fn in_netns<T: Send + 'static>(
    path: Option<PathBuf>,
    f: impl FnOnce() -> Result<T, DpError> + Send + 'static,
) -> Result<T, DpError> {
    std::thread::spawn(move || {
        if let Some(p) = path {
            let file = File::open(&p).map_err(|e| other(&p.display().to_string(), e))?;
            nix::sched::setns(file, CloneFlags::CLONE_NEWNET).map_err(|e| other("setns", e))?;
        }
        f()
    })
    .join()
    .map_err(|_| DpError::Other("namespace thread panicked".into()))?
}

/// Makes `/run/netns` exist and be a shared mount, as `ip netns add` does,
/// so that namespaces bound there are seen by every mount namespace.
fn prepare_netns_dir() -> Result<(), DpError> {
    std::fs::create_dir_all(NETNS_DIR).map_err(|e| other(NETNS_DIR, e))?;
    let shared = || {
        nix::mount::mount(
            None::<&str>,
            NETNS_DIR,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    if shared().is_err() {
        nix::mount::mount(
            Some(NETNS_DIR),
            NETNS_DIR,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| other("bind /run/netns", e))?;
        shared().map_err(|e| other("make /run/netns shared", e))?;
    }
    Ok(())
}

/// Creates the named network namespace `name` (fails if it exists).
pub fn create_netns(name: &str) -> Result<(), DpError> {
    prepare_netns_dir()?;
    let path = Path::new(NETNS_DIR).join(name);
    File::options()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| other(&path.display().to_string(), e))?;
    let target = path.clone();
    let made = std::thread::spawn(move || -> Result<(), DpError> {
        nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|e| other("unshare", e))?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| other("bind the new namespace", e))
    })
    .join()
    .map_err(|_| DpError::Other("namespace thread panicked".into()))?;
    if made.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    made
}

/// Deletes the named network namespace `name`.
pub fn delete_netns(name: &str) -> Result<(), DpError> {
    let path = Path::new(NETNS_DIR).join(name);
    // Not mounted (a failed creation): just the file.
    let _ = nix::mount::umount2(&path, MntFlags::MNT_DETACH);
    std::fs::remove_file(&path).map_err(|e| other(&path.display().to_string(), e))
}

/// The named namespaces starting with `prefix`.
pub fn list_netns(prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// Whether the kernel can make links of `driver` (`macvlan` or `ipvlan`):
/// tried for real in a throwaway namespace, so that `network create` can
/// refuse at once, naming what is missing.
pub async fn probe_driver(driver: &str) -> Result<(), DpError> {
    use rtnetlink::packet_route::link::{IpVlanMode, MacVlanMode};
    use rtnetlink::{LinkIpVlan, LinkMacVlan};
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let ns = format!(
        "shoal-probe{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    create_netns(&ns)?;
    let mut b = Linux::new(None);
    let tried = async {
        let h = b.handle(&ns).await?;
        h.link()
            .add(LinkVeth::new("probe0", "probe1").build())
            .execute()
            .await
            .map_err(|e| other("veth", e))?;
        let idx = b.index(&ns, "probe0").await?;
        let msg = match driver {
            "macvlan" => LinkMacVlan::new("probe2", idx, MacVlanMode::Bridge).build(),
            "ipvlan" => LinkIpVlan::new("probe2", idx, IpVlanMode::L2).build(),
            _ => return Ok(()),
        };
        h.link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| other(driver, e))
    }
    .await;
    b.handles.clear();
    let _ = delete_netns(&ns);
    tried
}

/// This namespace's IPv4 routes that are not Shoal's and not the default
/// one: (destination, prefix length, device).
pub async fn host_routes() -> Result<Vec<(Ipv4Addr, u8, String)>, DpError> {
    let mut all = main_routes().await?;
    all.retain(|(_, _, dev)| !dev.starts_with("shoal"));
    Ok(all)
}

/// The routes of this namespace's main table through link `dev`.
pub async fn routes_via(dev: &str) -> Result<Vec<(Ipv4Addr, u8)>, DpError> {
    Ok(main_routes()
        .await?
        .into_iter()
        .filter(|(_, _, d)| d == dev)
        .map(|(dst, len, _)| (dst, len))
        .collect())
}

/// This namespace's IPv4 routes in the main table, but the default one:
/// (destination, prefix length, device).
async fn main_routes() -> Result<Vec<(Ipv4Addr, u8, String)>, DpError> {
    let mut b = Linux::new(None);
    let links = b.links(HOST).await?;
    let names: HashMap<u32, String> = links.iter().map(|(n, s)| (s.index, n.clone())).collect();
    let h = b.handle(HOST).await?;
    let mut out = Vec::new();
    let mut s = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(r) = s.try_next().await.map_err(|e| other("dump routes", e))? {
        let len = r.header.destination_prefix_length;
        if len == 0 || r.header.table != 254 {
            continue;
        }
        let mut dst = None;
        let mut dev = String::new();
        for a in &r.attributes {
            match a {
                RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = Some(*d),
                RouteAttribute::Oif(i) => dev = names.get(i).cloned().unwrap_or_default(),
                _ => {}
            }
        }
        if let Some(d) = dst {
            out.push((d, len, dev));
        }
    }
    Ok(out)
}

/// Whether this namespace has a link named `name`.
pub async fn link_exists(name: &str) -> bool {
    Linux::new(None).index(HOST, name).await.is_ok()
}

/// The Linux backend.
pub struct Linux {
    /// The namespace standing for the host (the daemon's own if `None`;
    /// tests use a namespace of their own).
    host: Option<String>,
    handles: HashMap<String, Handle>,
    /// Each namespace's VIP backend slots as last read or written.
    lb_slots: HashMap<String, BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>>,
    /// Netlink sequence numbers of nf_tables batches.
    seq: u32,
    /// Backend changes applied over netlink (not `nft`).
    netlink_changes: u64,
    /// A netfilter netlink socket per namespace (opened there once).
    nf_socks: HashMap<String, std::os::fd::OwnedFd>,
    /// Each namespace's tables as `nft` last listed them, with the
    /// nf_tables generation they were read at: while the generation stays,
    /// nothing changed them, and they are not listed again.
    tables_seen: HashMap<String, TablesSeen>,
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
        let h = self.handle(HOST).await.ok()?;
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

    fn ns_path(&self, ns: &str) -> Option<PathBuf> {
        if ns == HOST {
            self.host.as_ref().map(|h| Path::new(NETNS_DIR).join(h))
        } else {
            Some(Path::new(NETNS_DIR).join(ns))
        }
    }

    /// A file naming namespace `ns`, for moving links there.
    fn ns_file(&self, ns: &str) -> Result<File, DpError> {
        let path = self
            .ns_path(ns)
            .unwrap_or_else(|| PathBuf::from("/proc/self/ns/net"));
        File::open(&path).map_err(|e| other(&path.display().to_string(), e))
    }

    /// A netlink handle whose socket lives in namespace `ns`.
    async fn handle(&mut self, ns: &str) -> Result<Handle, DpError> {
        if let Some(h) = self.handles.get(ns) {
            return Ok(h.clone());
        }
        let rt = tokio::runtime::Handle::current();
        let (conn, handle) = in_netns(self.ns_path(ns), move || {
            let _enter = rt.enter();
            let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| other("netlink", e))?;
            Ok((conn, handle))
        })?;
        tokio::spawn(conn);
        self.handles.insert(ns.to_owned(), handle.clone());
        Ok(handle)
    }

    async fn links(&mut self, ns: &str) -> Result<BTreeMap<String, Seen>, DpError> {
        let h = self.handle(ns).await?;
        let mut msgs = Vec::new();
        let mut s = h.link().get().execute();
        while let Some(m) = s.try_next().await.map_err(|e| other("dump links", e))? {
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
                                LinkInfo::Kind(k) => {
                                    link.kind = match k {
                                        InfoKind::Bridge => LinkKind::Bridge,
                                        InfoKind::Veth => LinkKind::Veth {
                                            peer: String::new(),
                                            peer_ns: String::new(),
                                        },
                                        InfoKind::MacVlan => LinkKind::Macvlan {
                                            parent: String::new(),
                                            parent_ns: String::new(),
                                        },
                                        InfoKind::Vxlan => LinkKind::Vxlan {
                                            vni: 0,
                                            local: Ipv4Addr::UNSPECIFIED,
                                            port: 0,
                                        },
                                        k => LinkKind::Other(format!("{k:?}")),
                                    }
                                }
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
        while let Some(a) = s.try_next().await.map_err(|e| other("dump addresses", e))? {
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

    /// Runs `nft ARGS` in namespace `ns`, with `input` on its standard input.
    fn nft_run(&self, ns: &str, args: &[&str], input: &str) -> Result<String, DpError> {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let input = input.to_owned();
        // Spawned from a thread that entered the namespace: the child is
        // born there (no `nsenter` in between).
        let out = in_netns(self.ns_path(ns), move || {
            let mut child = Command::new("nft")
                .args(&args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| other("cannot run nft (install nftables)", e))?;
            if let Some(mut stdin) = child.stdin.take() {
                stdin
                    .write_all(input.as_bytes())
                    .map_err(|e| other("nft", e))?;
            }
            child.wait_with_output().map_err(|e| other("nft", e))
        })?;
        if !out.status.success() {
            return Err(DpError::Other(format!(
                "nft: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Each VIP's backends in slot order, read back from the kernel's
    /// `table ip shoal` in namespace `ns` (none when unreadable).
    fn read_lb_slots(&self, ns: &str) -> BTreeMap<Ipv4Addr, Vec<Ipv4Addr>> {
        self.nft_run(ns, &["-j", "list", "table", "ip", "shoal"], "")
            .ok()
            .and_then(|j| crate::nft::parse(&j))
            .unwrap_or_default()
    }

    /// Sends an nf_tables batch on namespace `ns`'s netfilter socket (opened
    /// there the first time); a socket that failed is not kept.
    fn send_lb_batch(&mut self, ns: &str, batch: &crate::nfnl::Batch) -> Result<(), DpError> {
        self.with_nf_sock(ns, |fd| crate::nfnl::send_batch(fd, batch))
    }

    /// Runs `f` on namespace `ns`'s netfilter socket (opened there the
    /// first time); a socket that failed is not kept.
    fn with_nf_sock<T>(
        &mut self,
        ns: &str,
        f: impl FnOnce(&std::os::fd::OwnedFd) -> Result<T, DpError>,
    ) -> Result<T, DpError> {
        let fd = match self.nf_socks.remove(ns) {
            Some(fd) => fd,
            None => in_netns(self.ns_path(ns), crate::nfnl::open)?,
        };
        let out = f(&fd)?;
        self.nf_socks.insert(ns.to_owned(), fd);
        Ok(out)
    }

    /// Namespace `ns`'s tables: from the last listing while the nf_tables
    /// generation there has not moved, else listed by `nft` again.
    fn tables(&mut self, ns: &str) -> (Option<NatSeen>, BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>) {
        self.seq = self.seq.wrapping_add(1 << 16);
        let seq = self.seq;
        let generation = self
            .with_nf_sock(ns, |fd| crate::nfnl::generation(fd, seq))
            .ok();
        if let (Some(g), Some((seen, nat, slots))) = (generation, self.tables_seen.get(ns))
            && *seen == g
        {
            return (nat.clone(), slots.clone());
        }
        self.nft_listings += 1;
        let nat = self
            .nft_run(ns, &["-j", "list", "table", "ip", "shoal-nat"], "")
            .ok()
            .and_then(|j| crate::nft::nat_seen(&j));
        let slots = if ns == HOST {
            BTreeMap::new()
        } else {
            self.read_lb_slots(ns)
        };
        // Read at generation `g` or later: a change in between shows as a
        // newer generation next time, and is listed then.
        if let Some(g) = generation {
            self.tables_seen
                .insert(ns.to_owned(), (g, nat.clone(), slots.clone()));
        }
        (nat, slots)
    }

    /// Reads a `/proc/sys` value as seen from namespace `ns`.
    fn read_sysctl(&self, ns: &str, key: &str) -> Option<String> {
        let key = key.to_owned();
        in_netns(self.ns_path(ns), move || {
            std::fs::read_to_string(format!("/proc/sys/{key}")).map_err(|e| other(&key, e))
        })
        .ok()
    }

    /// Writes a `/proc/sys` value in namespace `ns`.
    fn write_sysctl(&self, ns: &str, key: &str, value: &str) -> Result<(), DpError> {
        let (key, value) = (key.to_owned(), value.to_owned());
        in_netns(self.ns_path(ns), move || {
            std::fs::write(format!("/proc/sys/{key}"), value).map_err(|e| other(&key, e))
        })
    }

    /// Programs namespace `ns`'s VIPs as `lb` (see [`Op::SetLb`]): the
    /// backends of VIPs that stay over netlink, the rest with `nft`.
    fn set_lb(
        &mut self,
        ns: &str,
        lb: &crate::model::Lb,
        changed: &BTreeSet<Ipv4Addr>,
        fresh: bool,
    ) -> Result<(), DpError> {
        let mut slots = match self.lb_slots.remove(ns) {
            Some(remembered) => remembered,
            None if !fresh => self.read_lb_slots(ns),
            None => BTreeMap::new(),
        };
        let mut changes = crate::nft::slot_changes(lb, changed, fresh, &slots);
        // Asked to change what the remembered layout says is done
        // already: the kernel was changed behind our back.
        if changes
            .as_ref()
            .is_some_and(|c| c.iter().all(|(c, _)| c.is_empty()))
        {
            slots = self.read_lb_slots(ns);
            changes = crate::nft::slot_changes(lb, changed, fresh, &slots);
        }
        // Backends of VIPs that stay: straight over netlink.
        if let Some(changes) = changes {
            let only: Vec<crate::nft::SlotChange> =
                changes.iter().map(|(c, _)| c.clone()).collect();
            self.seq = self.seq.wrapping_add(1 << 16);
            let batch = crate::nfnl::lb_batch(&only, self.seq);
            if batch.bytes().len() <= crate::nfnl::MAX_BATCH {
                match self.send_lb_batch(ns, &batch) {
                    Ok(()) => {
                        for (c, layout) in changes {
                            slots.insert(c.vip, layout);
                        }
                        self.lb_slots.insert(ns.to_owned(), slots);
                        self.netlink_changes += 1;
                        return Ok(());
                    }
                    Err(e) => {
                        // Not in the shape we thought: read it back
                        // and let `nft` put it right.
                        tracing::debug!(ns, error = %e, "netlink change refused; using nft");
                        slots = self.read_lb_slots(ns);
                    }
                }
            }
        }
        let script = crate::nft::script(lb, changed, fresh, &mut slots);
        let done = self.nft(ns, &script);
        // On failure the kernel kept the old table: read it again next time.
        if done.is_ok() {
            self.lb_slots.insert(ns.to_owned(), slots);
        }
        done
    }

    /// After backends left load balancers in namespace `ns`: has the
    /// connections conntrack there still sends them that `pick` chooses
    /// forgotten, soon, by the [`ctnl::Janitor`] (best effort: the load
    /// balancer itself is right already).
    fn forget_left(&mut self, ns: &str, pick: impl Fn(&ctnl::Entry) -> bool + Send + 'static) {
        let path = self.ns_path(ns);
        self.janitor
            .get_or_insert_with(ctnl::Janitor::spawn)
            .forget(show_ns(ns), path, pick);
    }

    /// Applies an nft script in namespace `ns`, atomically.
    fn nft(&self, ns: &str, script: &str) -> Result<(), DpError> {
        self.nft_run(ns, &["-f", "-"], script).map(drop)
    }

    async fn observe_ns(&mut self, ns: &str) -> Result<Netns, DpError> {
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
        while let Some(n) = s.try_next().await.map_err(|e| other("dump FDB", e))? {
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
            .map_err(|e| other("dump neighbours", e))?
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
        let mut s = h
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        while let Some(r) = s.try_next().await.map_err(|e| other("dump routes", e))? {
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
                out.routes.insert(crate::model::Route {
                    dst: (dst, r.header.destination_prefix_length),
                    via,
                    dev,
                });
            }
        }
        if ns != HOST {
            out.lb = slots
                .iter()
                .map(|(v, b)| (*v, b.iter().copied().collect()))
                .collect();
            self.lb_slots.insert(ns.to_owned(), slots);
        }
        out.links = links
            .into_iter()
            .filter(|(name, _)| ns != HOST || name.starts_with("shoal"))
            .map(|(n, s)| (n, s.link))
            .collect();
        if ns == HOST {
            let keep: BTreeSet<String> = out.links.keys().cloned().collect();
            out.fdb.retain(|f| keep.contains(&f.link));
            out.neigh.retain(|n| keep.contains(&n.link));
            out.routes.retain(|r| keep.contains(&r.dev));
        }
        Ok(out)
    }

    async fn index(&mut self, ns: &str, name: &str) -> Result<u32, DpError> {
        let h = self.handle(ns).await?;
        let mut s = h.link().get().match_name(name.to_owned()).execute();
        match s.try_next().await {
            Ok(Some(m)) => Ok(m.header.index),
            Ok(None) | Err(_) => Err(DpError::Other(format!("no link {name} in {}", show_ns(ns)))),
        }
    }

    /// Moves link `index` (in `from`) to namespace `to` as `name`.
    async fn move_link(
        &mut self,
        from: &str,
        index: u32,
        to: &str,
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
            .map_err(|e| other(&format!("move link to {}", show_ns(to)), e))
    }

    /// Creates the link `msg` describes in namespace `from` (its name from
    /// [`creation_name`]) and moves it into `ns` as `name`; nothing is left
    /// behind if the move fails.
    async fn add_in_and_move(
        &mut self,
        from: &str,
        ns: &str,
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
            .map_err(|e| other(&format!("create {what}"), e))?;
        if ns != from {
            let idx = self.index(from, &tmp).await?;
            if let Err(e) = self.move_link(from, idx, ns, name).await {
                let _ = h.link().del(idx).execute().await;
                return Err(e);
            }
        }
        Ok(())
    }

    async fn add_link(&mut self, ns: &str, name: &str, link: &Link) -> Result<(), DpError> {
        match &link.kind {
            LinkKind::Bridge => {
                let h = self.handle(ns).await?;
                h.link()
                    .add(LinkBridge::new(name).build())
                    .execute()
                    .await
                    .map_err(|e| other("create bridge", e))
            }
            LinkKind::Vxlan { vni, local, port } => {
                // Made in the host namespace, under a temporary `shoal…`
                // name, so that its socket is on the underlay.
                let msg = LinkVxlan::new(&creation_name(HOST, ns, name), *vni)
                    .local(*local)
                    .port(*port)
                    .learning(false)
                    .proxy(true)
                    .build();
                self.add_in_and_move(HOST, ns, name, msg, "vxlan").await
            }
            LinkKind::Veth { peer, peer_ns } => {
                let tmp = format!("shoalp{}", &name[..name.len().min(9)]);
                let h = self.handle(ns).await?;
                h.link()
                    .add(LinkVeth::new(name, &tmp).build())
                    .execute()
                    .await
                    .map_err(|e| other("create veth", e))?;
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
            LinkKind::Other(k) => Err(DpError::Other(format!("cannot create a {k} link"))),
        }
    }

    async fn set_link(&mut self, ns: &str, name: &str, link: &Link) -> Result<(), DpError> {
        let links = self.links(ns).await?;
        let seen = links
            .get(name)
            .ok_or_else(|| DpError::Other(format!("no link {name}")))?;
        let mut msg = LinkUnspec::new_with_index(seen.index).mtu(link.mtu);
        if let Some(mac) = link.mac {
            msg = msg.address(mac.to_vec());
        }
        msg = match &link.master {
            Some(m) => {
                let idx = links
                    .get(m)
                    .ok_or_else(|| DpError::Other(format!("no bridge {m}")))?
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
            .map_err(|e| other("set link", e))?;
        if link.master.is_some() {
            let port = rtnetlink::LinkBridgePort::new(seen.index)
                .isolated(link.isolated)
                .build();
            h.link()
                .set_port(port)
                .execute()
                .await
                .map_err(|e| other("set bridge port", e))?;
        }
        for (ip, len) in link.addrs.difference(&seen.link.addrs) {
            h.address()
                .add(seen.index, IpAddr::V4(*ip), *len)
                .execute()
                .await
                .map_err(|e| other(&format!("add address {ip}/{len}"), e))?;
        }
        let extra: Vec<(Ipv4Addr, u8)> = seen.link.addrs.difference(&link.addrs).copied().collect();
        if !extra.is_empty() {
            let mut s = h
                .address()
                .get()
                .set_link_index_filter(seen.index)
                .execute();
            while let Some(a) = s.try_next().await.map_err(|e| other("dump addresses", e))? {
                let ip = a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                });
                if ip.is_some_and(|ip| extra.contains(&(ip, a.header.prefix_len))) {
                    h.address()
                        .del(a)
                        .execute()
                        .await
                        .map_err(|e| other("delete address", e))?;
                }
            }
        }
        Ok(())
    }

    fn neighbour(
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

    async fn apply_op(&mut self, op: &Op) -> Result<(), DpError> {
        match op {
            Op::AddNetns(name) => {
                create_netns(name)?;
                let h = self.handle(name).await?;
                let lo = LinkUnspec::new_with_name("lo").up().build();
                h.link()
                    .set(lo)
                    .execute()
                    .await
                    .map_err(|e| other("loopback up", e))
            }
            Op::DelNetns(name) => {
                self.handles.remove(name);
                self.nf_socks.remove(name);
                self.lb_slots.remove(name);
                self.tables_seen.remove(name);
                delete_netns(name)
            }
            Op::AddLink { ns, name, link } => self.add_link(ns, name, link).await,
            Op::DelLink { ns, name } => {
                let idx = self.index(ns, name).await?;
                let h = self.handle(ns).await?;
                h.link()
                    .del(idx)
                    .execute()
                    .await
                    .map_err(|e| other("delete link", e))
            }
            Op::SetLink { ns, name, link } => self.set_link(ns, name, link).await,
            Op::AddFdb(ns, f) => {
                let idx = self.index(ns, &f.link).await?;
                let h = self.handle(ns).await?;
                let mut req = h.neighbours().add_bridge(idx, &f.mac);
                *req.message_mut() = Self::neighbour(idx, AddressFamily::Bridge, &f.mac, f.dst);
                req.execute().await.map_err(|e| other("add FDB entry", e))
            }
            Op::DelFdb(ns, f) => {
                let idx = self.index(ns, &f.link).await?;
                let h = self.handle(ns).await?;
                let msg = Self::neighbour(idx, AddressFamily::Bridge, &f.mac, f.dst);
                h.neighbours()
                    .del(msg)
                    .execute()
                    .await
                    .map_err(|e| other("delete FDB entry", e))
            }
            Op::AddNeigh(ns, n) => {
                let idx = self.index(ns, &n.link).await?;
                let h = self.handle(ns).await?;
                h.neighbours()
                    .add(idx, IpAddr::V4(n.ip))
                    .link_layer_address(&n.mac)
                    .execute()
                    .await
                    .map_err(|e| other("add neighbour", e))
            }
            Op::DelNeigh(ns, n) => {
                let idx = self.index(ns, &n.link).await?;
                let h = self.handle(ns).await?;
                let msg = Self::neighbour(idx, AddressFamily::Inet, &n.mac, n.ip);
                h.neighbours()
                    .del(msg)
                    .execute()
                    .await
                    .map_err(|e| other("delete neighbour", e))
            }
            Op::SetLb {
                ns,
                lb,
                changed,
                fresh,
            } => {
                let before = self
                    .lb_slots
                    .get(ns)
                    .or_else(|| self.tables_seen.get(ns).map(|t| &t.2))
                    .cloned()
                    .unwrap_or_default();
                let done = self.set_lb(ns, lb, changed, *fresh);
                let left = ctnl::left_vips(&before, lb);
                if done.is_ok() && !left.is_empty() {
                    self.forget_left(ns, move |e| {
                        e.movable() && left.contains(&(e.orig_dst.0, e.reply_src.0))
                    });
                }
                done
            }
            Op::SetNat { ns, nat } => {
                let before = self
                    .tables_seen
                    .get(ns)
                    .and_then(|t| t.1.as_ref())
                    .map(|(n, _)| n.dnat.clone())
                    .unwrap_or_default();
                let done = self.nft(ns, &crate::nft::nat_script(nat.as_ref()));
                let left = ctnl::left_ports(&before, nat.as_ref().map(|n| &n.dnat));
                if done.is_ok() && !left.is_empty() {
                    self.forget_left(ns, move |e| {
                        e.movable() && left.contains(&(e.proto, e.reply_src.0, e.reply_src.1))
                    });
                }
                done
            }
            Op::EnableForwarding(ns) => self.write_sysctl(ns, "net/ipv4/ip_forward", "1"),
            Op::AddRoute(ns, r) => {
                let idx = self.index(ns, &r.dev).await?;
                let h = self.handle(ns).await?;
                h.route()
                    .add(route_message(r, idx))
                    .execute()
                    .await
                    .map_err(|e| other("add route", e))
            }
            Op::DelRoute(ns, r) => {
                let idx = self.index(ns, &r.dev).await?;
                let h = self.handle(ns).await?;
                h.route()
                    .del(route_message(r, idx))
                    .execute()
                    .await
                    .map_err(|e| other("delete route", e))
            }
        }
    }
}

fn route_message(r: &crate::model::Route, dev: u32) -> RouteMessage {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(r.dst.0, r.dst.1)
        .output_interface(dev)
        .protocol(RouteProtocol::Static);
    if let Some(via) = r.via {
        b = b.gateway(via);
    }
    b.build()
}

/// The name a link bound for `ns` has while it is made in namespace
/// `from`: its own name if it stays there, else a `shoal…` one unique to
/// (namespace, name), at most 15 characters.
fn creation_name(from: &str, ns: &str, name: &str) -> String {
    if ns == from {
        return name.to_owned();
    }
    let mut h: u32 = 0x811c_9dc5;
    for b in ns.bytes().chain([0]).chain(name.bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("shoalt{h:08x}")
}

fn link_name(m: &LinkMessage) -> Option<String> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

fn lladdr(n: &NeighbourMessage) -> Option<[u8; 6]> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(m) => <[u8; 6]>::try_from(m.as_slice()).ok(),
        _ => None,
    })
}

fn destination(n: &NeighbourMessage) -> Option<IpAddr> {
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

impl Backend for Linux {
    async fn underlay_mtu(&mut self, ip: Ipv4Addr) -> Option<u32> {
        self.mtu_of(ip).await
    }

    async fn observe(&mut self, prefix: &str) -> Result<Kernel, DpError> {
        let mut k = Kernel::default();
        k.namespaces
            .insert(HOST.into(), self.observe_ns(HOST).await?);
        let listed = list_netns(prefix);
        // Sockets hold their namespace: none for one that went away.
        let keep = |ns: &String| ns == HOST || !ns.starts_with(prefix) || listed.contains(ns);
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
        self.apply_op(op).await.map_err(|e| match e {
            DpError::Other(reason) => kernel(op, reason),
            e => e,
        })
    }
}
