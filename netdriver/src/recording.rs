//! An in-memory backend that models the kernel's rules closely enough to
//! catch ordering and idempotency mistakes: creating what exists fails with
//! "file exists", a port's bridge must exist, a veth is created and deleted
//! as a pair, deleting a namespace deletes its links and their veth peers,
//! a macvlan needs its parent and goes with it.
//! Tests use it as the kernel when not root, and to tamper with state.

use std::collections::BTreeSet;

use crate::model::{HOST, Kernel, Link, LinkKind, Netns, Ns, Op};
use crate::{Backend, DpError};

/// The recording backend.
#[derive(Clone, Debug, Default)]
pub struct Recording {
    /// The modelled kernel; tests may change it behind the reconciler's back.
    pub kernel: Kernel,
    /// Every operation applied, in order.
    pub applied: Vec<Op>,
}

fn fail(op: &Op, why: &str) -> DpError {
    DpError::Op {
        op: Box::new(op.clone()),
        cause: Box::new(DpError::Refused(why.into())),
    }
}

impl Recording {
    fn ns_mut(&mut self, ns: &Ns, op: &Op) -> Result<&mut Netns, DpError> {
        if *ns == HOST {
            return Ok(self.kernel.namespaces.entry(HOST).or_default());
        }
        self.kernel
            .namespaces
            .get_mut(ns)
            .ok_or_else(|| fail(op, "no such namespace"))
    }

    /// Deletes a link, and its veth peer.
    fn del_link(&mut self, ns: &Ns, name: &str) {
        let removed = self
            .kernel
            .namespaces
            .get_mut(ns)
            .and_then(|n| n.links.remove(name));
        if let Some(n) = self.kernel.namespaces.get_mut(ns) {
            n.fdb.retain(|f| f.link != name);
            n.neigh.retain(|x| x.link != name);
            n.routes.retain(|r| r.dev != name);
            for l in n.links.values_mut() {
                if l.master.as_deref() == Some(name) {
                    l.master = None;
                }
            }
        }
        if removed.is_none() {
            return;
        }
        // The macvlans on it, wherever they were moved.
        let stacked: Vec<(Ns, String)> = self
            .kernel
            .namespaces
            .iter()
            .flat_map(|(n, x)| x.links.iter().map(move |(l, link)| (n, l, link)))
            .filter(|(_, _, link)| {
                matches!(&link.kind, LinkKind::Macvlan { parent, parent_ns }
                    if parent == name && parent_ns == ns)
            })
            .map(|(n, l, _)| (n.clone(), l.clone()))
            .collect();
        for (n, l) in stacked {
            self.del_link(&n, &l);
        }
        if let Some(LinkKind::Veth { peer, peer_ns }) = removed.map(|l| l.kind) {
            let peer_there = self
                .kernel
                .namespaces
                .get(&peer_ns)
                .is_some_and(|n| n.links.contains_key(&peer));
            if peer_there {
                self.del_link(&peer_ns, &peer);
            }
        }
    }

    /// `Op::AddLink`, as the kernel would refuse it: a taken name, a
    /// missing veth peer namespace or macvlan parent, a master that is not
    /// a bridge. Created down, without addresses (`SetLink` follows).
    fn add_link(&mut self, op: &Op, ns: &Ns, name: &str, link: &Link) -> Result<(), DpError> {
        if let LinkKind::Veth { peer, peer_ns } = &link.kind {
            let taken = self
                .kernel
                .namespaces
                .get(peer_ns)
                .map(|n| n.links.contains_key(peer));
            match taken {
                None if *peer_ns != HOST => {
                    return Err(fail(op, "peer namespace missing"));
                }
                Some(true) => return Err(fail(op, "file exists (peer)")),
                _ => {}
            }
        }
        if let LinkKind::Macvlan { parent, parent_ns } = &link.kind
            && *parent_ns != HOST
            && !self
                .kernel
                .namespaces
                .get(parent_ns)
                .is_some_and(|n| n.links.contains_key(parent))
        {
            return Err(fail(op, "no such device (macvlan parent)"));
        }
        let n = self.ns_mut(ns, op)?;
        if n.links.contains_key(name) {
            return Err(fail(op, "file exists"));
        }
        if let Some(m) = &link.master
            && n.links.get(m).is_none_or(|b| b.kind != LinkKind::Bridge)
        {
            return Err(fail(op, "master is not a bridge here"));
        }
        let mut fresh = link.clone();
        fresh.addrs.clear();
        fresh.up = false;
        n.links.insert(name.to_owned(), fresh.clone());
        if let LinkKind::Veth { peer, peer_ns } = &link.kind {
            let mut other = fresh;
            other.master = None;
            other.mac = None;
            other.kind = LinkKind::Veth {
                peer: name.to_owned(),
                peer_ns: ns.clone(),
            };
            let p = self.ns_mut(peer_ns, op)?;
            p.links.insert(peer.clone(), other);
        }
        Ok(())
    }

    /// `Op::SetLink`: MTU, MAC, master, addresses, state.
    fn set_link(&mut self, op: &Op, ns: &Ns, name: &str, link: &Link) -> Result<(), DpError> {
        let n = self.ns_mut(ns, op)?;
        if let Some(m) = &link.master
            && n.links.get(m).is_none_or(|b| b.kind != LinkKind::Bridge)
        {
            return Err(fail(op, "master is not a bridge here"));
        }
        let l = n
            .links
            .get_mut(name)
            .ok_or_else(|| fail(op, "no such device"))?;
        l.mtu = link.mtu;
        if link.mac.is_some() {
            l.mac = link.mac;
        }
        l.master.clone_from(&link.master);
        l.addrs.clone_from(&link.addrs);
        l.up = link.up;
        l.isolated = link.isolated && link.master.is_some();
        Ok(())
    }

    fn apply_op(&mut self, op: &Op) -> Result<(), DpError> {
        match op {
            Op::AddNetns(name) => {
                let ns = Ns::named(name.clone());
                if self.kernel.namespaces.contains_key(&ns) {
                    return Err(fail(op, "file exists"));
                }
                self.kernel.namespaces.insert(ns, Netns::default());
            }
            Op::DelNetns(name) => {
                let ns = Ns::named(name.clone());
                let Some(gone) = self.kernel.namespaces.get(&ns).cloned() else {
                    return Err(fail(op, "no such namespace"));
                };
                for link in gone.links.keys() {
                    self.del_link(&ns, link);
                }
                self.kernel.namespaces.remove(&ns);
            }
            Op::AddLink { ns, name, link } => self.add_link(op, ns, name, link)?,
            Op::DelLink { ns, name } => {
                if !self
                    .kernel
                    .namespaces
                    .get(ns)
                    .is_some_and(|n| n.links.contains_key(name))
                {
                    return Err(fail(op, "no such device"));
                }
                self.del_link(ns, name);
            }
            Op::SetLink { ns, name, link } => self.set_link(op, ns, name, link)?,
            Op::AddFdb(ns, f) => {
                let n = self.ns_mut(ns, op)?;
                if !n
                    .links
                    .get(&f.link)
                    .is_some_and(|l| matches!(l.kind, LinkKind::Vxlan { .. }))
                {
                    return Err(fail(op, "no such vxlan device"));
                }
                if !n.fdb.insert(f.clone()) {
                    return Err(fail(op, "file exists"));
                }
            }
            Op::DelFdb(ns, f) => {
                if !self.ns_mut(ns, op)?.fdb.remove(f) {
                    return Err(fail(op, "no such entry"));
                }
            }
            Op::AddNeigh(ns, x) => {
                let n = self.ns_mut(ns, op)?;
                if !n.links.contains_key(&x.link) {
                    return Err(fail(op, "no such device"));
                }
                if !n.neigh.insert(x.clone()) {
                    return Err(fail(op, "file exists"));
                }
            }
            Op::DelNeigh(ns, x) => {
                if !self.ns_mut(ns, op)?.neigh.remove(x) {
                    return Err(fail(op, "no such entry"));
                }
            }
            Op::AddRoute(ns, r) => {
                let n = self.ns_mut(ns, op)?;
                if !n.links.contains_key(&r.dev) {
                    return Err(fail(op, "no such device"));
                }
                if !n.routes.insert(r.clone()) {
                    return Err(fail(op, "file exists"));
                }
            }
            Op::DelRoute(ns, r) => {
                if !self.ns_mut(ns, op)?.routes.remove(r) {
                    return Err(fail(op, "no such route"));
                }
            }
            Op::SetNat { ns, nat } => {
                let n = self.ns_mut(ns, op)?;
                n.nat = nat.clone().map(crate::model::Nat::canonical);
                n.nat_foreign.clear();
            }
            Op::EnableForwarding(ns) => self.ns_mut(ns, op)?.forwarding = true,
            Op::SetLb { ns, lb, .. } => {
                if lb.values().any(BTreeSet::is_empty) {
                    return Err(fail(op, "a VIP without backends"));
                }
                self.ns_mut(ns, op)?.lb.clone_from(lb);
            }
        }
        Ok(())
    }
}

impl Backend for Recording {
    async fn observe(&mut self, prefix: &str) -> Result<Kernel, DpError> {
        let mut k = self.kernel.clone();
        k.namespaces
            .retain(|ns, _| ns.name().is_none_or(|n| n.starts_with(prefix)));
        if let Some(host) = k.namespaces.get_mut(&HOST) {
            host.links.retain(|n, _| n.starts_with("shoal"));
        }
        Ok(k)
    }

    async fn apply(&mut self, op: &Op) -> Result<(), DpError> {
        self.apply_op(op)?;
        self.applied.push(op.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_operation_keeps_the_operation_and_why() {
        let mut b = Recording::default();
        let add = Op::AddNetns("shoal-x-n-a".into());
        b.apply(&add).await.unwrap();
        let e = b.apply(&add).await.unwrap_err();
        match &e {
            DpError::Op { op, cause } => {
                assert_eq!(**op, add);
                assert!(matches!(**cause, DpError::Refused(ref why) if why == "file exists"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(e.to_string(), "create namespace shoal-x-n-a: file exists");
        let missing = Op::DelLink {
            ns: Ns::named("shoal-x-n-b"),
            name: "eth0".into(),
        };
        let e = b.apply(&missing).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "delete link eth0 in shoal-x-n-b: no such device"
        );
    }
}
