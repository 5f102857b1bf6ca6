//! A model of the kernel objects Shoal owns: named network namespaces and,
//! in each, links (bridge, VXLAN, veth), addresses, FDB and neighbour
//! entries and routes. The reconciler renders a plan into a [`Kernel`],
//! asks a backend what is there, and applies the difference.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// A network namespace as Shoal sees it: the one the daemon itself runs in
/// (the host's, as far as Shoal is concerned; only links named `shoal…`
/// are Shoal's there), or a named one under `/run/netns`, which Shoal
/// creates and deletes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Ns {
    /// The daemon's own namespace.
    Host,
    /// A named namespace.
    Named(String),
}

/// The daemon's own namespace.
pub const HOST: Ns = Ns::Host;

impl Ns {
    /// The named namespace `name`.
    pub fn named(name: impl Into<String>) -> Self {
        Ns::Named(name.into())
    }

    /// Its name under `/run/netns`; none for the host's.
    pub fn name(&self) -> Option<&str> {
        match self {
            Ns::Host => None,
            Ns::Named(n) => Some(n),
        }
    }
}

impl std::fmt::Display for Ns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ns::Host => f.write_str("the host namespace"),
            Ns::Named(n) => f.write_str(n),
        }
    }
}

/// In serialized forms (logs, dumps) a namespace is its name; the host's
/// is the empty string.
impl Serialize for Ns {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name().unwrap_or_default())
    }
}

impl<'de> Deserialize<'de> for Ns {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Ok(if name.is_empty() {
            Ns::Host
        } else {
            Ns::Named(name)
        })
    }
}

/// What kind of link.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LinkKind {
    /// A Linux bridge.
    Bridge,
    /// A VXLAN device: learning off, ARP proxy on, created in the host
    /// namespace (so its socket is on the underlay) and moved.
    Vxlan {
        /// VNI.
        vni: u32,
        /// Local (VTEP) address.
        local: Ipv4Addr,
        /// UDP port.
        port: u16,
    },
    /// One end of a veth pair; the other is `peer` in namespace `peer_ns`.
    Veth {
        /// The other end's name.
        peer: String,
        /// The other end's namespace.
        peer_ns: Ns,
    },
    /// A macvlan (bridge mode) on interface `parent` of namespace
    /// `parent_ns`: created there and moved. On a host interface for the
    /// macvlan driver; on an overlay network's VXLAN device for the tasks
    /// (and the ingress address) on that network.
    Macvlan {
        /// The parent interface.
        parent: String,
        /// The parent's namespace ([`HOST`] for a host interface).
        parent_ns: Ns,
    },
    /// Something else (seen, never created).
    Other(String),
}

impl LinkKind {
    /// Whether an observed link of kind `self` can stand for a wanted one of
    /// kind `wanted` (a kernel dump does not name a veth's peer).
    pub fn satisfies(&self, wanted: &LinkKind) -> bool {
        match (self, wanted) {
            (LinkKind::Veth { .. }, LinkKind::Veth { .. })
            | (LinkKind::Macvlan { .. }, LinkKind::Macvlan { .. }) => true,
            (a, b) => a == b,
        }
    }
}

/// A link and its settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    /// Kind.
    pub kind: LinkKind,
    /// MTU.
    pub mtu: u32,
    /// MAC address, if it must be a given one.
    pub mac: Option<[u8; 6]>,
    /// The bridge it is a port of.
    pub master: Option<String>,
    /// IPv4 addresses with prefix lengths.
    pub addrs: BTreeSet<(Ipv4Addr, u8)>,
    /// Administratively up.
    pub up: bool,
    /// As a bridge port: isolated from the bridge's other isolated ports.
    pub isolated: bool,
}

impl Link {
    /// Whether `self` (observed) differs from `wanted` in what can be
    /// changed in place.
    pub fn settings_differ(&self, wanted: &Link) -> bool {
        self.mtu != wanted.mtu
            || (wanted.mac.is_some() && self.mac != wanted.mac)
            || self.master != wanted.master
            || self.addrs != wanted.addrs
            || self.up != wanted.up
            || (wanted.master.is_some() && self.isolated != wanted.isolated)
    }
}

/// A bridge forwarding entry on a VXLAN device: MAC → remote VTEP.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Fdb {
    /// The VXLAN device.
    pub link: String,
    /// The remote endpoint's MAC.
    pub mac: [u8; 6],
    /// The remote node's VTEP.
    pub dst: Ipv4Addr,
}

/// A permanent neighbour entry: IP → MAC on a link.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Neigh {
    /// The link.
    pub link: String,
    /// The address.
    pub ip: Ipv4Addr,
    /// Its MAC.
    pub mac: [u8; 6],
}

/// A route: `dst/len` via a gateway or straight out of a link.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Route {
    /// Destination and prefix length (0.0.0.0/0 for the default route).
    pub dst: (Ipv4Addr, u8),
    /// Gateway.
    pub via: Option<Ipv4Addr>,
    /// Output link.
    pub dev: String,
}

/// Port forwarding (nftables table `ip shoal-nat`): the routing mesh,
/// egress masquerade, and the tunnels left out of conntrack.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nat {
    /// (`tcp`|`udp`, port) → (addresses, port): DNAT of connections to this
    /// namespace's own addresses on that port, round robin.
    pub dnat: BTreeMap<(String, u16), (Vec<Ipv4Addr>, u16)>,
    /// Also for connections made from this namespace itself.
    pub local: bool,
    /// SNAT of what leaves through link `.0` to address `.1`.
    pub snat: Option<(String, Ipv4Addr)>,
    /// Masquerade what comes from subnet `.0/.1` and leaves other than
    /// through link `.2` (egress of the gateway bridge).
    pub masquerade: Option<(Ipv4Addr, u8, String)>,
    /// The VXLAN UDP port: tunnel packets to it are not tracked by
    /// conntrack (in the host namespace, where the tunnels' socket is).
    pub untracked_udp: Option<u16>,
}

impl Nat {
    /// The same forwarding as the kernel holds it: without published
    /// ports, whether they apply to local connections means nothing.
    #[must_use]
    pub fn canonical(mut self) -> Self {
        if self.dnat.is_empty() {
            self.local = false;
        }
        self
    }
}

/// VIP → its backends.
pub type Lb = BTreeMap<Ipv4Addr, BTreeSet<Ipv4Addr>>;

/// One network namespace's Shoal-owned objects.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Netns {
    /// Links by name (`lo` is not listed; it is brought up in every
    /// namespace Shoal creates).
    pub links: BTreeMap<String, Link>,
    /// FDB entries.
    pub fdb: BTreeSet<Fdb>,
    /// Neighbour entries.
    pub neigh: BTreeSet<Neigh>,
    /// Routes (besides the ones the kernel adds for addresses).
    pub routes: BTreeSet<Route>,
    /// VIP load balancing (nftables table `ip shoal`): VIP → backends.
    pub lb: Lb,
    /// Port forwarding: wanted (in a rendered kernel), or read back from
    /// table `ip shoal-nat` (in an observed one).
    pub nat: Option<Nat>,
    /// What that table holds besides (in an observed kernel): rules and
    /// chains Shoal does not write, each described. Any makes the table
    /// be written again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nat_foreign: Vec<String>,
    /// IPv4 forwarding on (Shoal turns it on where it needs it, never off).
    pub forwarding: bool,
}

/// Every Shoal-owned object on a node, by namespace name ([`HOST`] for the
/// daemon's own).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kernel {
    /// Namespaces.
    pub namespaces: BTreeMap<Ns, Netns>,
}

/// One change to the kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Create a named network namespace (with `lo` up).
    AddNetns(String),
    /// Delete one, and everything in it.
    DelNetns(String),
    /// Create a link (both ends, for a veth).
    AddLink {
        /// Namespace.
        ns: Ns,
        /// Name.
        name: String,
        /// What it should be.
        link: Link,
    },
    /// Delete a link (both ends, for a veth).
    DelLink {
        /// Namespace.
        ns: Ns,
        /// Name.
        name: String,
    },
    /// Change a link's settings in place.
    SetLink {
        /// Namespace.
        ns: Ns,
        /// Name.
        name: String,
        /// What it should be.
        link: Link,
    },
    /// Add an FDB entry.
    AddFdb(Ns, Fdb),
    /// Remove one.
    DelFdb(Ns, Fdb),
    /// Add a neighbour entry.
    AddNeigh(Ns, Neigh),
    /// Remove one.
    DelNeigh(Ns, Neigh),
    /// Add a route.
    AddRoute(Ns, Route),
    /// Remove one.
    DelRoute(Ns, Route),
    /// Bring a namespace's VIP load balancing to `lb`, in one nftables
    /// transaction: the whole table when `fresh` (or removed when `lb` is
    /// empty), else only the VIPs in `changed`.
    SetLb {
        /// Namespace.
        ns: Ns,
        /// Every VIP → backends wanted there.
        lb: Lb,
        /// The VIPs whose backends differ from what is there.
        changed: BTreeSet<Ipv4Addr>,
        /// Nothing usable is there: write the whole table.
        fresh: bool,
    },
    /// Replace a namespace's port forwarding (removed when `None`), in one
    /// nftables transaction.
    SetNat {
        /// Namespace.
        ns: Ns,
        /// What it should be.
        nat: Option<Nat>,
    },
    /// Turn IPv4 forwarding on in a namespace.
    EnableForwarding(Ns),
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::AddNetns(n) => write!(f, "create namespace {n}"),
            Op::DelNetns(n) => write!(f, "delete namespace {n}"),
            Op::AddLink { ns, name, .. } => write!(f, "create link {name} in {ns}"),
            Op::DelLink { ns, name } => write!(f, "delete link {name} in {ns}"),
            Op::SetLink { ns, name, .. } => write!(f, "configure link {name} in {ns}"),
            Op::AddFdb(ns, e) => write!(f, "add FDB {e:?} in {ns}"),
            Op::DelFdb(ns, e) => write!(f, "delete FDB {e:?} in {ns}"),
            Op::AddNeigh(ns, n) => write!(f, "add neighbour {n:?} in {ns}"),
            Op::DelNeigh(ns, n) => write!(f, "delete neighbour {n:?} in {ns}"),
            Op::AddRoute(ns, r) => write!(f, "add route {r:?} in {ns}"),
            Op::DelRoute(ns, r) => write!(f, "delete route {r:?} in {ns}"),
            Op::SetLb { ns, .. } => write!(f, "program VIP load balancing in {ns}"),
            Op::SetNat { ns, .. } => write!(f, "program port forwarding in {ns}"),
            Op::EnableForwarding(ns) => write!(f, "enable IPv4 forwarding in {ns}"),
        }
    }
}

/// The VIPs whose entries differ between `have` and `want`.
pub fn lb_changes(have: &Lb, want: &Lb) -> BTreeSet<Ipv4Addr> {
    have.keys()
        .chain(want.keys())
        .filter(|v| have.get(*v) != want.get(*v))
        .copied()
        .collect()
}

/// The name of namespace `ns` if it is one Shoal made, under `prefix`.
fn ours<'a>(ns: &'a Ns, prefix: &str) -> Option<&'a str> {
    ns.name().filter(|n| n.starts_with(prefix))
}

/// Whether a link in namespace `ns` is Shoal's to manage: any link in a
/// namespace Shoal created, only `shoal…` ones in the host's.
pub fn owned_link(ns: &Ns, name: &str) -> bool {
    *ns != HOST || name.starts_with("shoal")
}

/// The changes that turn `actual` into `wanted`, in an order the kernel
/// accepts: namespaces first, removals, then links (bridges before their
/// ports, VXLAN devices before the macvlans on them), settings, tables;
/// namespaces removed last. Only namespaces under `prefix` (and the host's
/// `shoal…` links) are touched.
pub fn diff(actual: &Kernel, wanted: &Kernel, prefix: &str) -> Vec<Op> {
    let empty = Netns::default();
    let mut d = Diff::default();
    for ns in wanted.namespaces.keys() {
        if let Some(name) = ns.name()
            && !actual.namespaces.contains_key(ns)
        {
            d.add_ns.push(Op::AddNetns(name.to_owned()));
        }
    }
    for ns in actual.namespaces.keys() {
        if let Some(name) = ours(ns, prefix)
            && !wanted.namespaces.contains_key(ns)
        {
            d.del_ns.push(Op::DelNetns(name.to_owned()));
        }
    }
    for (ns, want) in &wanted.namespaces {
        let have = actual.namespaces.get(ns).unwrap_or(&empty);
        d.links(ns, have, want);
        d.entries(ns, have, want);
        d.tables(ns, have, want);
    }
    d.host_leftovers(actual, wanted);
    d.into_ops()
}

/// The operations of a diff, by phase; [`Diff::into_ops`] orders them.
#[derive(Default)]
struct Diff {
    add_ns: Vec<Op>,
    /// Load balancers that only lose backends: before the tunnels change.
    early: Vec<Op>,
    removals: Vec<Op>,
    bridges: Vec<Op>,
    others: Vec<Op>,
    /// Macvlans on another Shoal namespace's link: after it exists.
    stacked: Vec<Op>,
    settings: Vec<Op>,
    tables: Vec<Op>,
    del_ns: Vec<Op>,
}

impl Diff {
    /// Links of namespace `ns`: Shoal's that are not wanted (or not as
    /// wanted) go, wanted ones are made, and settings follow.
    fn links(&mut self, ns: &Ns, have: &Netns, want: &Netns) {
        for (name, link) in &have.links {
            if !owned_link(ns, name) {
                continue;
            }
            match want.links.get(name) {
                Some(w) if link.kind.satisfies(&w.kind) => {}
                _ => self.removals.push(Op::DelLink {
                    ns: ns.clone(),
                    name: name.clone(),
                }),
            }
        }
        for (name, w) in &want.links {
            match have.links.get(name) {
                Some(l) if l.kind.satisfies(&w.kind) => {
                    if l.settings_differ(w) {
                        self.settings.push(Op::SetLink {
                            ns: ns.clone(),
                            name: name.clone(),
                            link: w.clone(),
                        });
                    }
                }
                _ => {
                    // Created links get their settings applied after.
                    self.settings.push(Op::SetLink {
                        ns: ns.clone(),
                        name: name.clone(),
                        link: w.clone(),
                    });
                    // A veth pair is created once, from its first end.
                    if let LinkKind::Veth { peer, peer_ns } = &w.kind
                        && (peer_ns, peer.as_str()) < (ns, name.as_str())
                    {
                        continue;
                    }
                    let op = Op::AddLink {
                        ns: ns.clone(),
                        name: name.clone(),
                        link: w.clone(),
                    };
                    if w.kind == LinkKind::Bridge {
                        self.bridges.push(op);
                    } else if matches!(&w.kind, LinkKind::Macvlan { parent_ns, .. } if *parent_ns != HOST)
                    {
                        // On a link of another of Shoal's namespaces (an
                        // overlay's VXLAN device), made with the others.
                        self.stacked.push(op);
                    } else {
                        self.others.push(op);
                    }
                }
            }
        }
    }

    /// FDB, neighbour and route entries of namespace `ns`.
    fn entries(&mut self, ns: &Ns, have: &Netns, want: &Netns) {
        for f in have.fdb.difference(&want.fdb) {
            self.removals.push(Op::DelFdb(ns.clone(), f.clone()));
        }
        for n in have.neigh.difference(&want.neigh) {
            self.removals.push(Op::DelNeigh(ns.clone(), n.clone()));
        }
        for r in have.routes.difference(&want.routes) {
            self.removals.push(Op::DelRoute(ns.clone(), r.clone()));
        }
        self.tables.extend(
            want.fdb
                .difference(&have.fdb)
                .map(|f| Op::AddFdb(ns.clone(), f.clone())),
        );
        self.tables.extend(
            want.neigh
                .difference(&have.neigh)
                .map(|n| Op::AddNeigh(ns.clone(), n.clone())),
        );
        self.tables.extend(
            want.routes
                .difference(&have.routes)
                .map(|r| Op::AddRoute(ns.clone(), r.clone())),
        );
    }

    /// Port forwarding, forwarding and load balancers of namespace `ns`.
    fn tables(&mut self, ns: &Ns, have: &Netns, want: &Netns) {
        let canonical = |n: &Option<Nat>| n.clone().map(Nat::canonical);
        if canonical(&have.nat) != canonical(&want.nat) || !have.nat_foreign.is_empty() {
            self.tables.push(Op::SetNat {
                ns: ns.clone(),
                nat: want.nat.clone(),
            });
        }
        if want.forwarding && !have.forwarding {
            self.tables.push(Op::EnableForwarding(ns.clone()));
        }
        if *ns != HOST && have.lb != want.lb {
            let op = Op::SetLb {
                ns: ns.clone(),
                lb: want.lb.clone(),
                changed: lb_changes(&have.lb, &want.lb),
                fresh: have.lb.is_empty() || want.lb.is_empty(),
            };
            // Backends only leaving: out of the load balancer before their
            // tunnel entries go, so that no new connection is sent into a
            // hole; otherwise after the new entries are in.
            let shrinking = !want.lb.is_empty()
                && want
                    .lb
                    .iter()
                    .all(|(v, b)| have.lb.get(v).is_some_and(|h| b.is_subset(h)));
            if shrinking {
                self.early.push(op);
            } else {
                self.tables.push(op);
            }
        }
    }

    /// The host's `shoal…` links and port forwarding, when the host
    /// namespace is not wanted at all.
    fn host_leftovers(&mut self, actual: &Kernel, wanted: &Kernel) {
        // The host's `shoal…` links that are no longer wanted.
        if let Some(host) = actual.namespaces.get(&HOST)
            && !wanted.namespaces.contains_key(&HOST)
        {
            for name in host.links.keys() {
                if owned_link(&HOST, name) {
                    self.removals.push(Op::DelLink {
                        ns: HOST,
                        name: name.clone(),
                    });
                }
            }
            if host.nat.is_some() || !host.nat_foreign.is_empty() {
                self.removals.push(Op::SetNat {
                    ns: HOST,
                    nat: None,
                });
            }
        }
    }

    fn into_ops(self) -> Vec<Op> {
        let mut out = self.add_ns;
        out.extend(self.early);
        out.extend(self.removals);
        out.extend(self.bridges);
        out.extend(self.others);
        out.extend(self.stacked);
        out.extend(self.settings);
        out.extend(self.tables);
        out.extend(self.del_ns);
        out
    }
}
