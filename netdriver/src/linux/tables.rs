//! nftables: listing and writing Shoal's tables (`nft`), VIP backend changes over netlink, sysctls.

use super::*;

impl Linux {
    /// Runs `nft ARGS` in namespace `ns`, with `input` on its standard input.
    pub(super) fn nft_run(&self, ns: &Ns, args: &[&str], input: &str) -> Result<String, DpError> {
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
                .map_err(|e| io("cannot run nft (install nftables)", e))?;
            if let Some(mut stdin) = child.stdin.take() {
                stdin
                    .write_all(input.as_bytes())
                    .map_err(|e| io("nft", e))?;
            }
            child.wait_with_output().map_err(|e| io("nft", e))
        })?;
        if !out.status.success() {
            return Err(DpError::Nft {
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Each VIP's backends in slot order, read back from the kernel's
    /// `table ip shoal` in namespace `ns` (none when unreadable).
    pub(super) fn read_lb_slots(&self, ns: &Ns) -> BTreeMap<Ipv4Addr, Vec<Ipv4Addr>> {
        self.nft_run(ns, &["-j", "list", "table", "ip", "shoal"], "")
            .ok()
            .and_then(|j| crate::nft::parse(&j))
            .unwrap_or_default()
    }

    /// Sends an nf_tables batch on namespace `ns`'s netfilter socket (opened
    /// there the first time); a socket that failed is not kept.
    pub(super) fn send_lb_batch(
        &mut self,
        ns: &Ns,
        batch: &crate::nfnl::Batch,
    ) -> Result<(), DpError> {
        self.with_nf_sock(ns, |fd| crate::nfnl::send_batch(fd, batch))
    }

    /// Runs `f` on namespace `ns`'s netfilter socket (opened there the
    /// first time); a socket that failed is not kept.
    pub(super) fn with_nf_sock<T>(
        &mut self,
        ns: &Ns,
        f: impl FnOnce(&std::os::fd::OwnedFd) -> Result<T, DpError>,
    ) -> Result<T, DpError> {
        let fd = match self.nf_socks.remove(ns) {
            Some(fd) => fd,
            None => in_netns(self.ns_path(ns), crate::nfnl::open)?,
        };
        let out = f(&fd)?;
        self.nf_socks.insert(ns.clone(), fd);
        Ok(out)
    }

    /// Namespace `ns`'s tables: from the last listing while the nf_tables
    /// generation there has not moved, else listed by `nft` again.
    pub(super) fn tables(
        &mut self,
        ns: &Ns,
    ) -> (Option<NatSeen>, BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>) {
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
        let slots = if *ns == HOST {
            BTreeMap::new()
        } else {
            self.read_lb_slots(ns)
        };
        // Read at generation `g` or later: a change in between shows as a
        // newer generation next time, and is listed then.
        if let Some(g) = generation {
            self.tables_seen
                .insert(ns.clone(), (g, nat.clone(), slots.clone()));
        }
        (nat, slots)
    }

    /// Reads a `/proc/sys` value as seen from namespace `ns`.
    pub(super) fn read_sysctl(&self, ns: &Ns, key: &str) -> Option<String> {
        let key = key.to_owned();
        in_netns(self.ns_path(ns), move || {
            std::fs::read_to_string(format!("/proc/sys/{key}")).map_err(|e| io(key.clone(), e))
        })
        .ok()
    }

    /// Writes a `/proc/sys` value in namespace `ns`.
    pub(super) fn write_sysctl(&self, ns: &Ns, key: &str, value: &str) -> Result<(), DpError> {
        let (key, value) = (key.to_owned(), value.to_owned());
        in_netns(self.ns_path(ns), move || {
            std::fs::write(format!("/proc/sys/{key}"), value).map_err(|e| io(key.clone(), e))
        })
    }

    /// Programs namespace `ns`'s VIPs as `lb` (see [`Op::SetLb`]): the
    /// backends of VIPs that stay over netlink, the rest with `nft`.
    pub(super) fn set_lb(
        &mut self,
        ns: &Ns,
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
                        self.lb_slots.insert(ns.clone(), slots);
                        self.netlink_changes += 1;
                        return Ok(());
                    }
                    Err(e) => {
                        // Not in the shape we thought: read it back
                        // and let `nft` put it right.
                        tracing::debug!(%ns, error = %e, "netlink change refused; using nft");
                        slots = self.read_lb_slots(ns);
                    }
                }
            }
        }
        let script = crate::nft::script(lb, changed, fresh, &mut slots);
        let done = self.nft(ns, &script);
        // On failure the kernel kept the old table: read it again next time.
        if done.is_ok() {
            self.lb_slots.insert(ns.clone(), slots);
        }
        done
    }

    /// After backends left load balancers in namespace `ns`: has the
    /// connections conntrack there still sends them that `pick` chooses
    /// forgotten, soon, by the [`ctnl::Janitor`] (best effort: the load
    /// balancer itself is right already).
    pub(super) fn forget_left(
        &mut self,
        ns: &Ns,
        pick: impl Fn(&ctnl::Entry) -> bool + Send + 'static,
    ) {
        let path = self.ns_path(ns);
        self.janitor
            .get_or_insert_with(ctnl::Janitor::spawn)
            .forget(&ns.to_string(), path, pick);
    }

    /// Applies an nft script in namespace `ns`, atomically.
    pub(super) fn nft(&self, ns: &Ns, script: &str) -> Result<(), DpError> {
        self.nft_run(ns, &["-f", "-"], script).map(drop)
    }

    /// `Op::SetLb`: the VIP maps, then the connections of backends that
    /// left are forgotten.
    pub(super) fn apply_lb(
        &mut self,
        ns: &Ns,
        lb: &BTreeMap<Ipv4Addr, BTreeSet<Ipv4Addr>>,
        changed: &BTreeSet<Ipv4Addr>,
        fresh: bool,
    ) -> Result<(), DpError> {
        let before = self
            .lb_slots
            .get(ns)
            .or_else(|| self.tables_seen.get(ns).map(|t| &t.2))
            .cloned()
            .unwrap_or_default();
        let done = self.set_lb(ns, lb, changed, fresh);
        let left = ctnl::left_vips(&before, lb);
        if done.is_ok() && !left.is_empty() {
            self.forget_left(ns, move |e| {
                e.movable() && left.contains(&(e.orig_dst.0, e.reply_src.0))
            });
        }
        done
    }

    /// `Op::SetNat`: port forwarding, then the connections of published
    /// ports' backends that left are forgotten.
    pub(super) fn apply_nat(
        &mut self,
        ns: &Ns,
        nat: Option<&crate::model::Nat>,
    ) -> Result<(), DpError> {
        let before = self
            .tables_seen
            .get(ns)
            .and_then(|t| t.1.as_ref())
            .map(|(n, _)| n.dnat.clone())
            .unwrap_or_default();
        let done = self.nft(ns, &crate::nft::nat_script(nat));
        let left = ctnl::left_ports(&before, nat.map(|n| &n.dnat));
        if done.is_ok() && !left.is_empty() {
            self.forget_left(ns, move |e| {
                e.movable() && left.contains(&(e.proto, e.reply_src.0, e.reply_src.1))
            });
        }
        done
    }
}
