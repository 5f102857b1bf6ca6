//! VIP load balancing with nftables (no IPVS), one table per task sandbox:
//!
//! ```text
//! table ip shoal {
//!   map vips { type ipv4_addr : verdict; elements = { VIP : goto svc_VIP, … } }
//!   chain out { type nat hook output priority -100; ip daddr vmap @vips }
//!   chain svc_10_0_0_2 { dnat to numgen inc mod N map { 0 : B0, 1 : B1, … } }
//! }
//! ```
//!
//! Connections from the task to a VIP are DNATed to one live backend, round
//! robin, in the client's own namespace, so the server sees the client's
//! address (no SNAT). A backend change rewrites one service's chain (and
//! its map element) in one `nft -f` transaction, whatever the number of
//! services; established connections keep their conntrack entry.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use serde_json::Value;

/// The chain of VIP `vip`.
pub fn chain(vip: Ipv4Addr) -> String {
    format!("svc_{}", vip.to_string().replace('.', "_"))
}

fn dnat(vip: Ipv4Addr, backends: &[Ipv4Addr]) -> String {
    let elems: Vec<String> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("{i} : {b}"))
        .collect();
    format!(
        "add rule ip shoal {} dnat to numgen inc mod {} map {{ {} }}\n",
        chain(vip),
        backends.len(),
        elems.join(", ")
    )
}

/// The nft script that brings the table to `lb` (see [`crate::model::Op::SetLb`]).
pub fn script(
    lb: &BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>,
    changed: &BTreeSet<Ipv4Addr>,
    fresh: bool,
) -> String {
    let mut s = String::new();
    if fresh || lb.is_empty() {
        // Delete whatever is there (adding first makes the delete safe).
        s.push_str("add table ip shoal\ndelete table ip shoal\n");
        if lb.is_empty() {
            return s;
        }
        s.push_str("add table ip shoal\n");
        s.push_str("add map ip shoal vips { type ipv4_addr : verdict; }\n");
        s.push_str(
            "add chain ip shoal out { type nat hook output priority -100; policy accept; }\n",
        );
        s.push_str("add rule ip shoal out ip daddr vmap @vips\n");
        for (vip, backends) in lb {
            let _ = writeln!(s, "add chain ip shoal {}", chain(*vip));
            s.push_str(&dnat(*vip, backends));
            let _ = writeln!(
                s,
                "add element ip shoal vips {{ {vip} : goto {} }}",
                chain(*vip)
            );
        }
        return s;
    }
    for vip in changed {
        let c = chain(*vip);
        match lb.get(vip) {
            Some(backends) => {
                // `add chain` is a no-op for an existing chain.
                let _ = writeln!(s, "add chain ip shoal {c}");
                let _ = writeln!(s, "flush chain ip shoal {c}");
                s.push_str(&dnat(*vip, backends));
                let _ = writeln!(s, "add element ip shoal vips {{ {vip} : goto {c} }}");
            }
            None => {
                let _ = writeln!(s, "delete element ip shoal vips {{ {vip} }}");
                let _ = writeln!(s, "flush chain ip shoal {c}");
                let _ = writeln!(s, "delete chain ip shoal {c}");
            }
        }
    }
    s
}

fn ipv4s(v: &Value, out: &mut Vec<Ipv4Addr>) {
    match v {
        Value::String(s) => {
            if let Ok(ip) = s.parse() {
                out.push(ip);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| ipv4s(x, out)),
        Value::Object(o) => o.values().for_each(|x| ipv4s(x, out)),
        _ => {}
    }
}

/// Reads `nft -j list table ip shoal` back into VIP → backends. Entries
/// whose chain is missing or empty are left out (so they are rewritten);
/// `None` when the table is not in the expected shape.
pub fn parse(json: &str) -> Option<BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>> {
    let v: Value = serde_json::from_str(json).ok()?;
    let items = v.get("nftables")?.as_array()?;
    let mut vips: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    let mut chains: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
    let mut hooked = false;
    for item in items {
        if let Some(m) = item.get("map")
            && m.get("name").and_then(Value::as_str) == Some("vips")
        {
            for e in m
                .get("elem")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
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
        }
        if let Some(r) = item.get("rule") {
            let chain = r.get("chain").and_then(Value::as_str).unwrap_or_default();
            if chain == "out" {
                hooked = true;
            } else if chain.starts_with("svc_") {
                let mut ips = Vec::new();
                ipv4s(r.get("expr").unwrap_or(&Value::Null), &mut ips);
                chains.entry(chain.to_owned()).or_default().extend(ips);
            }
        }
    }
    if !hooked {
        return None;
    }
    Some(
        vips.into_iter()
            .filter_map(|(vip, c)| {
                let b = chains.get(&c)?.clone();
                (!b.is_empty() && c == chain(vip)).then_some((vip, b))
            })
            .collect(),
    )
}

/// The nft script that makes table `ip shoal-nat` exactly `nat` (or removes
/// it), with the fingerprint kept as the name of an empty chain.
pub fn nat_script(nat: Option<&crate::model::Nat>) -> String {
    let mut s = String::from("add table ip shoal-nat\ndelete table ip shoal-nat\n");
    let Some(nat) = nat else { return s };
    s.push_str("add table ip shoal-nat\n");
    let _ = writeln!(s, "add chain ip shoal-nat h_{}", nat.fingerprint());
    s.push_str(
        "add chain ip shoal-nat pre { type nat hook prerouting priority -100; policy accept; }\n",
    );
    if nat.local {
        s.push_str(
            "add chain ip shoal-nat out { type nat hook output priority -100; policy accept; }\n",
        );
    }
    s.push_str(
        "add chain ip shoal-nat post { type nat hook postrouting priority 100; policy accept; }\n",
    );
    for ((proto, port), (to, to_port)) in &nat.dnat {
        let elems: Vec<String> = to
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{i} : {a}"))
            .collect();
        let action = format!(
            "fib daddr type local {proto} dport {port} dnat to numgen inc mod {} map {{ {} }} : {to_port}",
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
    s
}

/// The fingerprint of the `ip shoal-nat` table listed in `json`, or
/// `tampered` when its rules are not all there.
pub fn nat_seen(json: &str) -> Option<String> {
    let v: Value = serde_json::from_str(json).ok()?;
    let items = v.get("nftables")?.as_array()?;
    let fp = items.iter().find_map(|i| {
        i.get("chain")?
            .get("name")?
            .as_str()?
            .strip_prefix("h_")
            .map(str::to_owned)
    })?;
    let rules = items.iter().filter(|i| i.get("rule").is_some()).count();
    let expected: usize = fp.rsplit('_').next()?.parse().ok()?;
    Some(if rules == expected {
        fp
    } else {
        "tampered".into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_rewrite_only_what_changed() {
        let vip = Ipv4Addr::new(10, 0, 0, 2);
        let b = |n: u8| Ipv4Addr::new(10, 0, 0, n);
        let lb = BTreeMap::from([(vip, vec![b(3), b(4)])]);
        let full = script(&lb, &BTreeSet::new(), true);
        assert!(full.contains("delete table ip shoal"));
        assert!(full.contains("numgen inc mod 2 map { 0 : 10.0.0.3, 1 : 10.0.0.4 }"));
        let other = Ipv4Addr::new(10, 0, 0, 9);
        let lb2 = BTreeMap::from([(vip, vec![b(3), b(4)]), (other, vec![b(5)])]);
        let small = script(&lb2, &BTreeSet::from([other]), false);
        assert!(
            !small.contains("10.0.0.3") && small.contains("svc_10_0_0_9"),
            "{small}"
        );
        assert!(!small.contains("delete table"));
        let gone = script(&lb, &BTreeSet::from([other]), false);
        assert!(
            gone.contains("delete chain ip shoal svc_10_0_0_9"),
            "{gone}"
        );
    }

    #[test]
    fn listings_parse_back_and_broken_ones_do_not() {
        let json = r#"{"nftables": [{"map": {"name": "vips", "elem": [["10.0.0.2", {"goto": {"target": "svc_10_0_0_2"}}]]}},
          {"rule": {"chain": "out", "expr": []}},
          {"rule": {"chain": "svc_10_0_0_2", "expr": [{"dnat": {"addr": {"map": {"key": {"numgen": {"mode": "inc", "mod": 2}}, "data": {"set": [[0, "10.0.0.3"], [1, "10.0.0.4"]]}}}}}]}}]}"#;
        let lb = parse(json).unwrap();
        assert_eq!(
            lb[&Ipv4Addr::new(10, 0, 0, 2)],
            vec![Ipv4Addr::new(10, 0, 0, 3), Ipv4Addr::new(10, 0, 0, 4)]
        );
        assert_eq!(parse("{}"), None);
        assert_eq!(parse("not json"), None);
    }
}
