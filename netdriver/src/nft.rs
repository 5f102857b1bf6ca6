//! VIP load balancing with nftables (no IPVS), one table per task sandbox:
//!
//! ```text
//! table ip shoal {
//!   map vips { type ipv4_addr : verdict; elements = { VIP : goto svc_VIP, … } }
//!   set vipset { type ipv4_addr; elements = { VIP, … } }
//!   chain out { type nat hook output priority -100; ip daddr vmap @vips }
//!   chain svc_10_0_0_2 { dnat to numgen random mod N map @be_10_0_0_2 }
//!   chain post { type nat hook postrouting priority 100; ct status dnat
//!                oifname != "lo" meta l4proto { tcp, udp } masquerade to :61000-65535 }
//!   chain raw_out { type filter hook output priority -300;
//!                   oifname != "lo" ip daddr != @vipset notrack }
//!   chain raw_pre { type filter hook prerouting priority -300;
//!                   meta l4proto { tcp, udp } th dport < 61000 notrack }
//! }
//! ```
//!
//! Connections from the task to a VIP are DNATed to one live backend, round
//! robin, in the client's own namespace, so the server sees the client's
//! address (no address SNAT). A backend change rewrites the slots of one
//! service's map that change (and, when the count changes, its one rule).
//! Established connections keep their conntrack entry.
//!
//! Conntrack only follows connections to VIPs: the `nat` hooks turn it on
//! for the whole namespace, and tracking every packet of the task costs
//! throughput. What leaves for anything but a VIP is not tracked
//! (`raw_out`); a VIP connection's source port is moved into
//! [`VIP_PORTS`] (the kernel's default ephemeral range ends below it), so
//! that what comes in to any other TCP or UDP port is not tracked either
//! (`raw_pre`) while the replies of VIP connections are, and are
//! translated back. The server sees the client's address with a source
//! port from that range. Loopback is always tracked: a task that reaches
//! itself through its VIP sends the replies out of its own namespace, and
//! they must be translated back there.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use serde_json::Value;

use crate::model::Nat;

/// The source ports of connections to VIPs (see the module's notes).
pub const VIP_PORTS: (u16, u16) = (61_000, 65_535);

/// The chain of VIP `vip`.
pub fn chain(vip: Ipv4Addr) -> String {
    format!("svc_{}", vip.to_string().replace('.', "_"))
}

/// The backend map of VIP `vip` (slot → address).
pub fn backend_map(vip: Ipv4Addr) -> String {
    format!("be_{}", vip.to_string().replace('.', "_"))
}

fn elements(s: &mut String, map: &str, slots: &[(usize, Ipv4Addr)]) {
    for chunk in slots.chunks(1_000) {
        let elems: Vec<String> = chunk.iter().map(|(i, b)| format!("{i} : {b}")).collect();
        let _ = writeln!(s, "add element ip shoal {map} {{ {} }}", elems.join(", "));
    }
}

fn rule(s: &mut String, vip: Ipv4Addr, n: usize) {
    let _ = writeln!(
        s,
        "add rule ip shoal {} dnat to numgen random mod {n} map @{}",
        chain(vip),
        backend_map(vip)
    );
}

/// Adds VIP `vip` with `backends` in slots 0…N-1.
fn add_vip(s: &mut String, vip: Ipv4Addr, backends: &[Ipv4Addr]) {
    let (c, m) = (chain(vip), backend_map(vip));
    let _ = writeln!(
        s,
        "add map ip shoal {m} {{ typeof numgen inc mod 1 : ip daddr; }}"
    );
    let _ = writeln!(s, "add chain ip shoal {c}");
    rule(s, vip, backends.len());
    elements(
        s,
        &m,
        &backends.iter().copied().enumerate().collect::<Vec<_>>(),
    );
    let _ = writeln!(s, "add element ip shoal vips {{ {vip} : goto {c} }}");
    let _ = writeln!(s, "add element ip shoal vipset {{ {vip} }}");
}

/// The slot layout after going from `slots` to the set `wanted`: removed
/// backends' slots are filled from the end, new ones appended, so that only
/// the slots that change are written.
pub fn relayout(slots: &[Ipv4Addr], wanted: &BTreeSet<Ipv4Addr>) -> Vec<Ipv4Addr> {
    let mut out = slots.to_vec();
    let mut i = 0;
    while i < out.len() {
        if wanted.contains(&out[i]) {
            i += 1;
        } else {
            out.swap_remove(i);
        }
    }
    let kept: BTreeSet<Ipv4Addr> = out.iter().copied().collect();
    out.extend(wanted.difference(&kept));
    out
}

/// What changes in the backend map and rule of a VIP that stays: slots
/// deleted (a backend replaced or the map shrinking), then slots written,
/// then, when the backend count changes, the one rule rewritten.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotChange {
    /// The VIP.
    pub vip: Ipv4Addr,
    /// Slots deleted first.
    pub delete: Vec<u32>,
    /// Slots then written.
    pub add: Vec<(u32, Ipv4Addr)>,
    /// The new backend count, when it changed.
    pub count: Option<usize>,
}

impl SlotChange {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.delete.is_empty() && self.add.is_empty() && self.count.is_none()
    }
}

/// The change from slot layout `old` to the set `wanted`, and the layout
/// after it.
pub fn slot_change(
    vip: Ipv4Addr,
    old: &[Ipv4Addr],
    wanted: &BTreeSet<Ipv4Addr>,
) -> (SlotChange, Vec<Ipv4Addr>) {
    let new = relayout(old, wanted);
    let mut c = SlotChange {
        vip,
        delete: Vec::new(),
        add: Vec::new(),
        count: (new.len() != old.len()).then_some(new.len()),
    };
    for (i, b) in new.iter().enumerate() {
        match old.get(i) {
            Some(o) if o == b => {}
            Some(_) => {
                c.delete.push(i as u32);
                c.add.push((i as u32, *b));
            }
            None => c.add.push((i as u32, *b)),
        }
    }
    c.delete.extend((new.len()..old.len()).map(|i| i as u32));
    (c, new)
}

/// When every VIP in `changed` stays (none added or removed, no fresh
/// table), the slot changes that bring the table to `lb`, with the layouts
/// after them; else `None` (a job for [`script`]).
pub fn slot_changes(
    lb: &crate::model::Lb,
    changed: &BTreeSet<Ipv4Addr>,
    fresh: bool,
    slots: &BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>,
) -> Option<Vec<(SlotChange, Vec<Ipv4Addr>)>> {
    if fresh || lb.is_empty() {
        return None;
    }
    changed
        .iter()
        .map(|vip| Some(slot_change(*vip, slots.get(vip)?, lb.get(vip)?)))
        .collect()
}

/// The nft script that brings the table to `lb` (see
/// [`crate::model::Op::SetLb`]); `slots` is the slot layout of each VIP's
/// backend map now, and is updated to the new one.
pub fn script(
    lb: &crate::model::Lb,
    changed: &BTreeSet<Ipv4Addr>,
    fresh: bool,
    slots: &mut BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>,
) -> String {
    let mut s = String::new();
    if fresh || lb.is_empty() {
        // Delete whatever is there (adding first makes the delete safe).
        s.push_str("add table ip shoal\ndelete table ip shoal\n");
        slots.clear();
        if lb.is_empty() {
            return s;
        }
        let (lo, hi) = VIP_PORTS;
        let _ = write!(
            s,
            "add table ip shoal
add map ip shoal vips {{ type ipv4_addr : verdict; }}
add set ip shoal vipset {{ type ipv4_addr; }}
add chain ip shoal out {{ type nat hook output priority -100; policy accept; }}
add rule ip shoal out ip daddr vmap @vips
add chain ip shoal post {{ type nat hook postrouting priority 100; policy accept; }}
add rule ip shoal post ct status dnat oifname != \"lo\" meta l4proto {{ tcp, udp }} masquerade to :{lo}-{hi}
add chain ip shoal raw_out {{ type filter hook output priority -300; policy accept; }}
add rule ip shoal raw_out oifname != \"lo\" ip daddr != @vipset notrack
add chain ip shoal raw_pre {{ type filter hook prerouting priority -300; policy accept; }}
add rule ip shoal raw_pre meta l4proto {{ tcp, udp }} th dport < {lo} notrack
"
        );
        for (vip, backends) in lb {
            let b: Vec<Ipv4Addr> = backends.iter().copied().collect();
            add_vip(&mut s, *vip, &b);
            slots.insert(*vip, b);
        }
        return s;
    }
    for vip in changed {
        let (c, m) = (chain(*vip), backend_map(*vip));
        match (lb.get(vip), slots.get(vip)) {
            (Some(wanted), Some(old)) => {
                let (change, new) = slot_change(*vip, old, wanted);
                for i in &change.delete {
                    let _ = writeln!(s, "delete element ip shoal {m} {{ {i} }}");
                }
                for (i, b) in &change.add {
                    let _ = writeln!(s, "add element ip shoal {m} {{ {i} : {b} }}");
                }
                if let Some(n) = change.count {
                    let _ = writeln!(s, "flush chain ip shoal {c}");
                    rule(&mut s, *vip, n);
                }
                slots.insert(*vip, new);
            }
            (Some(wanted), None) => {
                // Whatever a partial earlier state left goes first (adding
                // first makes each delete safe).
                let _ = writeln!(s, "add chain ip shoal {c}");
                let _ = writeln!(s, "add element ip shoal vips {{ {vip} : goto {c} }}");
                let _ = writeln!(s, "delete element ip shoal vips {{ {vip} }}");
                let _ = writeln!(s, "flush chain ip shoal {c}");
                let _ = writeln!(s, "delete chain ip shoal {c}");
                let _ = writeln!(
                    s,
                    "add map ip shoal {m} {{ typeof numgen inc mod 1 : ip daddr; }}"
                );
                let _ = writeln!(s, "delete map ip shoal {m}");
                let b: Vec<Ipv4Addr> = wanted.iter().copied().collect();
                add_vip(&mut s, *vip, &b);
                slots.insert(*vip, b);
            }
            (None, _) => {
                let _ = writeln!(s, "delete element ip shoal vips {{ {vip} }}");
                let _ = writeln!(s, "add element ip shoal vipset {{ {vip} }}");
                let _ = writeln!(s, "delete element ip shoal vipset {{ {vip} }}");
                let _ = writeln!(s, "flush chain ip shoal {c}");
                let _ = writeln!(s, "delete chain ip shoal {c}");
                let _ = writeln!(s, "delete map ip shoal {m}");
                slots.remove(vip);
            }
        }
    }
    s
}

/// The chains with a hook in `table ip shoal`, each with its one rule.
const HOOKS: [&str; 4] = ["out", "post", "raw_out", "raw_pre"];

/// Reads `nft -j list table ip shoal` back: each VIP's backends in slot
/// order. VIPs whose chain or map is missing, empty or inconsistent, or that
/// conntrack would not follow (not in `vipset`), are left out (so they are
/// rewritten); `None` when the table is not in the
/// expected shape.
pub fn parse(json: &str) -> Option<BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>> {
    let v: Value = serde_json::from_str(json).ok()?;
    let items = v.get("nftables")?.as_array()?;
    let mut vips: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    let mut maps: BTreeMap<String, BTreeMap<u64, Ipv4Addr>> = BTreeMap::new();
    let mut modulus: BTreeMap<String, u64> = BTreeMap::new();
    let mut tracked: BTreeSet<Ipv4Addr> = BTreeSet::new();
    let mut hooks: BTreeSet<&str> = BTreeSet::new();
    for item in items {
        if let Some(set) = item.get("set")
            && set.get("name").and_then(Value::as_str) == Some("vipset")
        {
            tracked.extend(
                set.get("elem")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.as_str()?.parse::<Ipv4Addr>().ok()),
            );
        }
        if let Some(m) = item.get("map") {
            let name = m.get("name").and_then(Value::as_str).unwrap_or_default();
            let elems = m
                .get("elem")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if name == "vips" {
                for e in elems {
                    let vip = e
                        .get(0)
                        .and_then(Value::as_str)
                        .and_then(|s| s.parse().ok());
                    let target = e
                        .get(1)
                        .and_then(|g| g.get("goto"))
                        .and_then(|g| g.get("target"))
                        .and_then(Value::as_str);
                    if let (Some(vip), Some(t)) = (vip, target) {
                        vips.insert(vip, t.to_owned());
                    }
                }
            } else if name.starts_with("be_") {
                let slots = maps.entry(name.to_owned()).or_default();
                for e in elems {
                    let k = e.get(0).and_then(Value::as_u64);
                    let a = e
                        .get(1)
                        .and_then(Value::as_str)
                        .and_then(|s| s.parse().ok());
                    if let (Some(k), Some(a)) = (k, a) {
                        slots.insert(k, a);
                    }
                }
            }
        }
        if let Some(r) = item.get("rule") {
            let chain = r.get("chain").and_then(Value::as_str).unwrap_or_default();
            if HOOKS.contains(&chain) {
                hooks.insert(chain);
            } else if chain.starts_with("svc_") {
                // A chain that picks backends otherwise (an older
                // layout's `numgen inc`) counts as damaged: rewritten.
                let ng = r.pointer("/expr/0/dnat/addr/map/key/numgen");
                let m = ng
                    .filter(|n| n.get("mode").and_then(Value::as_str) == Some("random"))
                    .and_then(|n| n.get("mod"))
                    .and_then(Value::as_u64);
                if let Some(m) = m {
                    modulus.insert(chain.to_owned(), m);
                }
            }
        }
    }
    // A table without every hook (an older layout, or tampered with) is
    // rewritten whole.
    if hooks.len() != HOOKS.len() {
        return None;
    }
    Some(
        vips.into_iter()
            .filter_map(|(vip, c)| {
                let slots = maps.get(&backend_map(vip))?;
                let n = *modulus.get(&c)?;
                // Slots 0…n-1, all present, nothing beyond.
                let b: Vec<Ipv4Addr> = (0..n)
                    .map(|i| slots.get(&i).copied())
                    .collect::<Option<_>>()?;
                (c == chain(vip)
                    && !b.is_empty()
                    && slots.len() as u64 == n
                    && tracked.contains(&vip))
                .then_some((vip, b))
            })
            .collect(),
    )
}

/// The base chains table `ip shoal-nat` has for `nat`: (name, type, hook,
/// priority). Only the hooks that have rules: a `nat` hook turns conntrack
/// on for the whole namespace.
fn nat_chains(nat: &Nat) -> Vec<(&'static str, &'static str, &'static str, i64)> {
    let mut chains = Vec::new();
    if !nat.dnat.is_empty() {
        chains.push(("pre", "nat", "prerouting", -100));
        if nat.local {
            chains.push(("out", "nat", "output", -100));
        }
    }
    if nat.snat.is_some() || nat.masquerade.is_some() {
        chains.push(("post", "nat", "postrouting", 100));
    }
    if nat.untracked_udp.is_some() {
        chains.push(("raw_pre", "filter", "prerouting", -300));
        chains.push(("raw_out", "filter", "output", -300));
    }
    chains
}

/// The nft script that makes table `ip shoal-nat` exactly `nat` (or removes
/// it). VXLAN packets (`untracked_udp`) are marked untracked before
/// conntrack sees them: a tunnel needs no connection state (both ends send
/// to the port), and following each packet costs throughput wherever
/// conntrack is on.
pub fn nat_script(nat: Option<&Nat>) -> String {
    let mut s = String::from("add table ip shoal-nat\ndelete table ip shoal-nat\n");
    let Some(nat) = nat else { return s };
    s.push_str("add table ip shoal-nat\n");
    for (name, kind, hook, prio) in nat_chains(nat) {
        let _ = writeln!(
            s,
            "add chain ip shoal-nat {name} {{ type {kind} hook {hook} priority {prio}; policy accept; }}"
        );
    }
    if let Some(port) = nat.untracked_udp {
        for chain in ["raw_pre", "raw_out"] {
            let _ = writeln!(s, "add rule ip shoal-nat {chain} udp dport {port} notrack");
        }
    }
    for ((proto, port), (to, to_port)) in &nat.dnat {
        let elems: Vec<String> = to
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{i} : {a}"))
            .collect();
        let action = format!(
            "fib daddr type local {proto} dport {port} dnat to numgen random mod {} map {{ {} }} : {to_port}",
            to.len().max(1),
            elems.join(", ")
        );
        let _ = writeln!(s, "add rule ip shoal-nat pre {action}");
        if nat.local {
            let _ = writeln!(s, "add rule ip shoal-nat out {action}");
        }
    }
    if let Some((dev, addr)) = &nat.snat {
        let _ = writeln!(
            s,
            "add rule ip shoal-nat post oifname \"{dev}\" snat to {addr}"
        );
    }
    if let Some((net, len, dev)) = &nat.masquerade {
        let _ = writeln!(
            s,
            "add rule ip shoal-nat post ip saddr {net}/{len} oifname != \"{dev}\" masquerade"
        );
    }
    s
}

/// `{"match": {"op": OP, "left": L, "right": R}}` → (L, R).
fn matching<'a>(e: &'a Value, op: &str) -> Option<(&'a Value, &'a Value)> {
    let m = e.get("match")?;
    (m.get("op")?.as_str()? == op).then_some(())?;
    Some((m.get("left")?, m.get("right")?))
}

/// `PROTO FIELD == N` → (PROTO, N).
fn payload_is<'a>(e: &'a Value, field: &str) -> Option<(String, &'a Value)> {
    let (left, right) = matching(e, "==")?;
    let p = left.get("payload")?;
    (p.get("field")?.as_str()? == field).then_some(())?;
    Some((p.get("protocol")?.as_str()?.to_owned(), right))
}

/// `oifname OP "DEV"` → DEV.
fn oifname(e: &Value, op: &str) -> Option<String> {
    let (left, right) = matching(e, op)?;
    (left.get("meta")?.get("key")?.as_str()? == "oifname").then_some(())?;
    Some(right.as_str()?.to_owned())
}

/// `fib daddr type local PROTO dport P dnat to numgen random mod N map { 0 :
/// A, … } : T` → ((PROTO, P), (As, T)).
#[allow(clippy::type_complexity)]
fn dnat_rule(expr: &[Value]) -> Option<((String, u16), (Vec<Ipv4Addr>, u16))> {
    let [fib, port, dnat] = expr else { return None };
    let (left, right) = matching(fib, "==")?;
    let f = left.get("fib")?;
    let local = f.get("result")?.as_str()? == "type"
        && f.get("flags")? == &serde_json::json!(["daddr"])
        && right.as_str()? == "local";
    local.then_some(())?;
    let (proto, p) = payload_is(port, "dport")?;
    matches!(proto.as_str(), "tcp" | "udp").then_some(())?;
    let p = u16::try_from(p.as_u64()?).ok()?;
    let d = dnat.get("dnat")?;
    let target = u16::try_from(d.get("port")?.as_u64()?).ok()?;
    let map = d.get("addr")?.get("map")?;
    let ng = map.get("key")?.get("numgen")?;
    let ok = ng.get("mode")?.as_str()? == "random" && ng.get("offset")?.as_u64()? == 0;
    ok.then_some(())?;
    let n = usize::try_from(ng.get("mod")?.as_u64()?).ok()?;
    let mut slots: Vec<(u64, Ipv4Addr)> = Vec::new();
    for e in map.get("data")?.get("set")?.as_array()? {
        let [i, a] = e.as_array()?.as_slice() else {
            return None;
        };
        slots.push((i.as_u64()?, a.as_str()?.parse().ok()?));
    }
    slots.sort();
    // Every slot of the modulus, once: else some connections go nowhere.
    let whole = slots.len() == n && slots.iter().zip(0u64..).all(|((i, _), j)| *i == j);
    whole.then_some(())?;
    Some((
        (proto, p),
        (slots.into_iter().map(|(_, a)| a).collect(), target),
    ))
}

/// `oifname "DEV" snat to A` → (DEV, A).
fn snat_rule(expr: &[Value]) -> Option<(String, Ipv4Addr)> {
    let [dev, snat] = expr else { return None };
    let to = snat.get("snat")?;
    (to.as_object()?.len() == 1).then_some(())?;
    Some((oifname(dev, "==")?, to.get("addr")?.as_str()?.parse().ok()?))
}

/// `ip saddr NET/LEN oifname != "DEV" masquerade` → (NET, LEN, DEV).
fn masquerade_rule(expr: &[Value]) -> Option<(Ipv4Addr, u8, String)> {
    let [from, dev, masq] = expr else { return None };
    let (proto, net) = payload_is(from, "saddr")?;
    (proto == "ip" && masq.get("masquerade")?.is_null()).then_some(())?;
    let (addr, len) = match net.get("prefix") {
        Some(p) => (
            p.get("addr")?.as_str()?,
            u8::try_from(p.get("len")?.as_u64()?).ok()?,
        ),
        None => (net.as_str()?, 32),
    };
    Some((addr.parse().ok()?, len, oifname(dev, "!=")?))
}

/// `udp dport P notrack` → P.
fn notrack_rule(expr: &[Value]) -> Option<u16> {
    let [port, notrack] = expr else { return None };
    let (proto, p) = payload_is(port, "dport")?;
    (proto == "udp" && notrack.get("notrack")?.is_null()).then_some(())?;
    u16::try_from(p.as_u64()?).ok()
}

/// Port forwarding as table `ip shoal-nat` in `json` (`nft -j list table`)
/// holds it, and what else is there (rules and chains Shoal does not
/// write, described); `None` without the table.
pub fn nat_seen(json: &str) -> Option<(Nat, Vec<String>)> {
    let v: Value = serde_json::from_str(json).ok()?;
    let items = v.get("nftables")?.as_array()?;
    items.iter().find(|i| i.get("table").is_some())?;
    let mut foreign = Vec::new();
    let mut nat = Nat::default();
    let (mut pre, mut out) = (BTreeMap::new(), BTreeMap::new());
    let (mut raw_pre, mut raw_out) = (None, None);
    for r in items.iter().filter_map(|i| i.get("rule")) {
        let chain = r.get("chain").and_then(Value::as_str).unwrap_or_default();
        let expr = r
            .get("expr")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        let once = |slot: bool| slot.then_some(());
        let known = match chain {
            "pre" | "out" => dnat_rule(expr).and_then(|(k, to)| {
                let map = if chain == "pre" { &mut pre } else { &mut out };
                once(map.insert(k, to).is_none())
            }),
            "post" => match (snat_rule(expr), masquerade_rule(expr)) {
                (Some(s), _) => once(nat.snat.replace(s).is_none()),
                (_, Some(m)) => once(nat.masquerade.replace(m).is_none()),
                _ => None,
            },
            "raw_pre" => notrack_rule(expr).and_then(|p| once(raw_pre.replace(p).is_none())),
            "raw_out" => notrack_rule(expr).and_then(|p| once(raw_out.replace(p).is_none())),
            _ => None,
        };
        if known.is_none() {
            foreign.push(format!("rule in chain {chain}: {}", Value::from(expr)));
        }
    }
    nat.local = !out.is_empty();
    if nat.local && out != pre {
        foreign.push("chain out does not forward what chain pre does".into());
    }
    nat.dnat = pre;
    if raw_pre != raw_out {
        foreign.push("chains raw_pre and raw_out leave different ports untracked".into());
    }
    nat.untracked_udp = raw_pre;
    // The chains, hooks and policies are those Shoal makes for this.
    let want: BTreeSet<String> = nat_chains(&nat)
        .into_iter()
        .map(|(n, t, h, p)| format!("{n} {t} {h} {p} accept"))
        .collect();
    for c in items.iter().filter_map(|i| i.get("chain")) {
        let field = |k: &str| c.get(k).map(|v| v.to_string().trim_matches('"').to_owned());
        let have = [
            field("name"),
            field("type"),
            field("hook"),
            field("prio"),
            field("policy"),
        ]
        .map(Option::unwrap_or_default)
        .join(" ");
        if !want.contains(&have) {
            foreign.push(format!("chain {have}"));
        }
    }
    Some((nat, foreign))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, n)
    }

    #[test]
    fn a_change_writes_only_the_slots_that_change() {
        let vip = b(2);
        let mut slots = BTreeMap::new();
        let lb = BTreeMap::from([(vip, BTreeSet::from([b(3), b(4), b(5)]))]);
        let full = script(&lb, &BTreeSet::new(), true, &mut slots);
        assert!(full.contains("delete table ip shoal"));
        assert!(
            full.contains(
                "add element ip shoal be_10_0_0_2 { 0 : 10.0.0.3, 1 : 10.0.0.4, 2 : 10.0.0.5 }"
            ),
            "{full}"
        );
        assert_eq!(slots[&vip], vec![b(3), b(4), b(5)]);
        // 10.0.0.3 goes: the last slot moves into its place.
        let lb = BTreeMap::from([(vip, BTreeSet::from([b(4), b(5)]))]);
        let small = script(&lb, &BTreeSet::from([vip]), false, &mut slots);
        assert_eq!(slots[&vip], vec![b(5), b(4)]);
        assert!(
            small.contains("add element ip shoal be_10_0_0_2 { 0 : 10.0.0.5 }"),
            "{small}"
        );
        assert!(
            small.contains("delete element ip shoal be_10_0_0_2 { 2 }"),
            "{small}"
        );
        assert!(small.contains("numgen random mod 2"), "{small}");
        assert!(
            !small.contains("10.0.0.4"),
            "an unchanged slot is not written: {small}"
        );
        // A new VIP alongside.
        let other = b(9);
        let mut lb2 = lb.clone();
        lb2.insert(other, BTreeSet::from([b(6)]));
        let add = script(&lb2, &BTreeSet::from([other]), false, &mut slots);
        assert!(add.contains("add chain ip shoal svc_10_0_0_9") && !add.contains("delete table"));
        let gone = script(&lb, &BTreeSet::from([other]), false, &mut slots);
        assert!(gone.contains("delete map ip shoal be_10_0_0_9"), "{gone}");
    }

    #[test]
    fn tunnels_skip_conntrack_and_only_needed_nat_hooks_are_made() {
        let tunnel_only = Nat {
            untracked_udp: Some(4789),
            ..Default::default()
        };
        let s = nat_script(Some(&tunnel_only));
        assert!(
            s.contains("add rule ip shoal-nat raw_pre udp dport 4789 notrack"),
            "{s}"
        );
        assert!(
            s.contains("add rule ip shoal-nat raw_out udp dport 4789 notrack"),
            "{s}"
        );
        // No nat hook: it would turn conntrack on for the whole namespace.
        assert!(!s.contains("type nat"), "{s}");
        assert_eq!(s.matches("add rule").count(), 2);
        let mut mesh = tunnel_only.clone();
        mesh.dnat.insert(("tcp".into(), 8080), (vec![b(2)], 80));
        let s = nat_script(Some(&mesh));
        assert!(s.contains("hook prerouting priority -100") && !s.contains("hook postrouting"));
        assert_eq!(s.matches("add rule").count(), 3);
    }

    /// `nft -j list table ip shoal-nat` (nft 1.0.6) after [`nat_script`]
    /// of [`full_nat`], as the kernel gives it back.
    const NAT_LISTING: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
      {"table": {"family": "ip", "name": "shoal-nat", "handle": 1}},
      {"chain": {"family": "ip", "table": "shoal-nat", "name": "pre", "handle": 1, "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}},
      {"chain": {"family": "ip", "table": "shoal-nat", "name": "out", "handle": 2, "type": "nat", "hook": "output", "prio": -100, "policy": "accept"}},
      {"chain": {"family": "ip", "table": "shoal-nat", "name": "post", "handle": 3, "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}},
      {"chain": {"family": "ip", "table": "shoal-nat", "name": "raw_pre", "handle": 4, "type": "filter", "hook": "prerouting", "prio": -300, "policy": "accept"}},
      {"chain": {"family": "ip", "table": "shoal-nat", "name": "raw_out", "handle": 5, "type": "filter", "hook": "output", "prio": -300, "policy": "accept"}},
      {"rule": {"family": "ip", "table": "shoal-nat", "chain": "pre", "handle": 7, "expr": [{"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 8080}}, {"dnat": {"addr": {"map": {"key": {"numgen": {"mode": "random", "mod": 2, "offset": 0}}, "data": {"set": [[0, "10.0.0.3"], [1, "10.0.0.4"]]}}}, "port": 80}}]}},
      {"rule": {"family": "ip", "table": "shoal-nat", "chain": "out", "handle": 8, "expr": [{"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 8080}}, {"dnat": {"addr": {"map": {"key": {"numgen": {"mode": "random", "mod": 2, "offset": 0}}, "data": {"set": [[0, "10.0.0.3"], [1, "10.0.0.4"]]}}}, "port": 80}}]}},
      {"rule": {"family": "ip", "table": "shoal-nat", "chain": "pre", "handle": 9, "expr": [{"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 53}}, {"dnat": {"addr": {"map": {"key": {"numgen": {"mode": "random", "mod": 1, "offset": 0}}, "data": {"set": [[0, "10.0.0.3"]]}}}, "port": 5353}}]}},
      {"rule": {"family": "ip", "table": "shoal-nat", "chain": "out", "handle": 10, "expr": [{"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 53}}, {"dnat": {"addr": {"map": {"key": {"numgen": {"mode": "random", "mod": 1, "offset": 0}}, "data": {"set": [[0, "10.0.0.3"]]}}}, "port": 5353}}]}},
      {"rule": {"family": "ip", "table": "shoal-nat", "chain": "post", "handle": 11, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "ig0"}}, {"snat": {"addr": "10.255.0.2"}}]}},
      {"rule": {"family": "ip", "table": "shoal-nat", "chain": "post", "handle": 12, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr": "172.31.0.0", "len": 16}}}}, {"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "shoalgw0"}}, {"masquerade": null}]}},
      {"rule": {"family": "ip", "table": "shoal-nat", "chain": "raw_pre", "handle": 13, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 4789}}, {"notrack": null}]}},
      {"rule": {"family": "ip", "table": "shoal-nat", "chain": "raw_out", "handle": 14, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 4789}}, {"notrack": null}]}}]}"#;

    fn full_nat() -> Nat {
        Nat {
            dnat: BTreeMap::from([
                (("tcp".into(), 8080), (vec![b(3), b(4)], 80)),
                (("udp".into(), 53), (vec![b(3)], 5353)),
            ]),
            local: true,
            snat: Some(("ig0".into(), Ipv4Addr::new(10, 255, 0, 2))),
            masquerade: Some((Ipv4Addr::new(172, 31, 0, 0), 16, "shoalgw0".into())),
            untracked_udp: Some(4789),
        }
    }

    #[test]
    fn port_forwarding_reads_back_from_the_listing() {
        let (nat, foreign) = nat_seen(NAT_LISTING).unwrap();
        assert_eq!(nat, full_nat());
        assert!(foreign.is_empty(), "{foreign:?}");
        // Round robin from slot 0 (an older Shoal's `numgen inc`) is not
        // what Shoal writes: named, and rewritten.
        let (_, foreign) = nat_seen(&NAT_LISTING.replace("\"random\"", "\"inc\"")).unwrap();
        assert!(!foreign.is_empty());
        // No table: nothing.
        assert_eq!(nat_seen(r#"{"nftables": [{"metainfo": {}}]}"#), None);
    }

    #[test]
    fn port_forwarding_changed_behind_shoals_back_reads_back_different() {
        // A backend swapped, with as many rules as before.
        let swapped = NAT_LISTING.replace("\"10.0.0.4\"", "\"10.9.9.9\"");
        let (nat, foreign) = nat_seen(&swapped).unwrap();
        assert!(foreign.is_empty(), "{foreign:?}");
        let other = Ipv4Addr::new(10, 9, 9, 9);
        assert_eq!(nat.dnat[&("tcp".into(), 8080)].0, vec![b(3), other]);
        assert_ne!(nat, full_nat());
        // Swapped in `pre` only, `out` as before: that is named too.
        let (_, foreign) =
            nat_seen(&NAT_LISTING.replacen("\"10.0.0.4\"", "\"10.9.9.9\"", 1)).unwrap();
        assert_eq!(
            foreign,
            vec!["chain out does not forward what chain pre does"]
        );
        // A modulus larger than the map (connections to nowhere), a rule
        // of someone else's, a policy changed: each is named.
        for (from, to, what) in [
            ("\"mod\": 2", "\"mod\": 3", "rule in chain pre"),
            (
                "{\"snat\": {\"addr\": \"10.255.0.2\"}}",
                "{\"accept\": null}",
                "rule in chain post",
            ),
            (
                "\"prio\": 100, \"policy\": \"accept\"",
                "\"prio\": 100, \"policy\": \"drop\"",
                "chain post nat postrouting 100 drop",
            ),
        ] {
            let (_, foreign) = nat_seen(&NAT_LISTING.replacen(from, to, 1)).unwrap();
            assert!(
                foreign.iter().any(|f| f.starts_with(what)),
                "{what}: {foreign:?}"
            );
        }
        // The chains of an older Shoal (a fingerprint chain) are foreign.
        let old = NAT_LISTING.replacen(
            r#"{"table": {"family": "ip", "name": "shoal-nat", "handle": 1}},"#,
            r#"{"table": {"family": "ip", "name": "shoal-nat", "handle": 1}}, {"chain": {"family": "ip", "table": "shoal-nat", "name": "h_0123_9", "handle": 6}},"#,
            1,
        );
        let (_, foreign) = nat_seen(&old).unwrap();
        assert_eq!(foreign.len(), 1, "{foreign:?}");
    }

    #[test]
    fn what_is_written_is_what_reads_back() {
        // The script of the listing above, rule for rule.
        let s = nat_script(Some(&full_nat()));
        assert!(s.contains("add rule ip shoal-nat pre fib daddr type local tcp dport 8080 dnat to numgen random mod 2 map { 0 : 10.0.0.3, 1 : 10.0.0.4 } : 80"), "{s}");
        assert!(s.contains("add chain ip shoal-nat raw_out { type filter hook output priority -300; policy accept; }"), "{s}");
        assert_eq!(s.matches("add rule").count(), 8, "{s}");
        assert_eq!(s.matches("add chain").count(), 5, "{s}");
    }

    #[test]
    fn listings_parse_back_and_broken_ones_do_not() {
        let json = r#"{"nftables": [
          {"map": {"name": "vips", "elem": [["10.0.0.2", {"goto": {"target": "svc_10_0_0_2"}}]]}},
          {"map": {"name": "be_10_0_0_2", "elem": [[0, "10.0.0.3"], [1, "10.0.0.4"]]}},
          {"set": {"name": "vipset", "elem": ["10.0.0.2"]}},
          {"rule": {"chain": "out", "expr": []}},
          {"rule": {"chain": "post", "expr": []}},
          {"rule": {"chain": "raw_out", "expr": []}},
          {"rule": {"chain": "raw_pre", "expr": []}},
          {"rule": {"chain": "svc_10_0_0_2", "expr": [{"dnat": {"addr": {"map": {"key": {"numgen": {"mode": "random", "mod": 2, "offset": 0}}, "data": "@be_10_0_0_2"}}}}]}}]}"#;
        let lb = parse(json).unwrap();
        assert_eq!(lb[&b(2)], vec![b(3), b(4)]);
        // A modulus that does not match the map: left out, to be rewritten.
        let broken = json.replace("\"mod\": 2", "\"mod\": 3");
        assert!(parse(&broken).unwrap().is_empty());
        // A VIP conntrack would not follow: left out too.
        let untracked = json.replace(r#""elem": ["10.0.0.2"]"#, r#""elem": []"#);
        assert!(parse(&untracked).unwrap().is_empty());
        // A table of the older layout, without the notrack hooks: rewritten.
        let older = json.replace(r#""chain": "raw_pre""#, r#""chain": "x""#);
        assert_eq!(parse(&older), None);
        // A VIP that balances round robin from slot 0 (`numgen inc`, an
        // older Shoal): every client's first connection went to the same
        // backend, so it is left out and rewritten with `numgen random`.
        let round_robin = json.replace(r#""mode": "random""#, r#""mode": "inc""#);
        assert!(parse(&round_robin).unwrap().is_empty());
        assert_eq!(parse("{}"), None);
        assert_eq!(parse("not json"), None);
    }
}
