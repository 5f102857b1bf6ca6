//! Lab definitions: which hosts, their underlay addresses, which are
//! managers, and timing overrides for their daemons. `shoal-lab up
//! --config cluster-configs/FILE.toml` reads one; `--nodes N --managers M`
//! makes the same thing in code.
//!
//! ```toml
//! name = "three"                 # the lab's default name
//! underlay = "10.210.0.0/24"     # the switch's subnet
//!
//! [[hosts]]
//! name = "node1"
//! address = "10.210.0.1"         # optional: the subnet's Nth address
//! role = "manager"               # or "worker" (the default)
//!
//! [daemon.gossip]                # any key of `shoal daemon --config`
//! suspect_to_down_ms = 1000
//! ```

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;

/// The default underlay: a /24 inside every lab's own switch namespace, so
/// labs never share addresses.
pub const DEFAULT_UNDERLAY: &str = "10.210.0.0/24";

/// A lab: hosts on one underlay, and daemon settings they all get.
#[derive(Clone, Debug, PartialEq)]
pub struct LabSpec {
    /// The lab's name when `--name` is not given.
    pub name: Option<String>,
    /// Underlay network address and prefix length.
    pub underlay: (Ipv4Addr, u8),
    /// The hosts, in order; the first manager creates the swarm.
    pub hosts: Vec<HostSpec>,
    /// The `[daemon]` table, written as every daemon's `--config` file.
    pub daemon: Option<toml::Table>,
}

/// One host of a lab.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostSpec {
    /// Its name (hostname of its daemon).
    pub name: String,
    /// Its underlay address.
    pub address: Ipv4Addr,
    /// Whether it joins as a manager.
    pub manager: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    name: Option<String>,
    underlay: Option<String>,
    #[serde(default)]
    hosts: Vec<FileHost>,
    daemon: Option<toml::Table>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHost {
    name: String,
    address: Option<String>,
    role: Option<String>,
}

fn parse_cidr(text: &str) -> anyhow::Result<(Ipv4Addr, u8)> {
    let bad =
        || anyhow::anyhow!("invalid underlay `{text}`: use an IPv4 subnet like {DEFAULT_UNDERLAY}");
    let (addr, len) = text.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    if !(8..=30).contains(&len) {
        bail!("underlay `{text}`: the prefix length must be 8 to 30");
    }
    let mask = u32::MAX << (32 - len);
    if u32::from(addr) & !mask != 0 {
        bail!(
            "underlay `{text}` has host bits set: did you mean {}/{len}?",
            Ipv4Addr::from(u32::from(addr) & mask)
        );
    }
    Ok((addr, len))
}

impl LabSpec {
    /// `nodes` hosts `node1…`, the first `managers` of them managers, on the
    /// default underlay.
    pub fn nodes(nodes: usize, managers: usize) -> anyhow::Result<LabSpec> {
        if !(1..=250).contains(&nodes) || managers == 0 || managers > nodes {
            bail!(
                "need 1 to 250 nodes and 1 to N managers (got {nodes} nodes, {managers} managers)"
            );
        }
        let underlay = parse_cidr(DEFAULT_UNDERLAY)?;
        let hosts = (0..nodes)
            .map(|i| HostSpec {
                name: format!("node{}", i + 1),
                address: nth(underlay, i + 1),
                manager: i < managers,
            })
            .collect();
        Ok(LabSpec {
            name: None,
            underlay,
            hosts,
            daemon: None,
        })
    }

    /// Reads and checks a lab definition.
    pub fn load(path: &Path) -> anyhow::Result<LabSpec> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read lab definition {}", path.display()))?;
        LabSpec::parse(&text).with_context(|| format!("lab definition {}", path.display()))
    }

    /// Parses and checks a lab definition's text.
    pub fn parse(text: &str) -> anyhow::Result<LabSpec> {
        let f: File = toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.message()))?;
        let underlay = parse_cidr(f.underlay.as_deref().unwrap_or(DEFAULT_UNDERLAY))?;
        if f.hosts.is_empty() {
            bail!("no hosts: add [[hosts]] tables with a name (and a role)");
        }
        let size = 1u32 << (32 - underlay.1);
        if f.hosts.len() as u32 > size - 2 {
            bail!(
                "{} hosts do not fit in the underlay /{}",
                f.hosts.len(),
                underlay.1
            );
        }
        let mut hosts = Vec::new();
        for (i, h) in f.hosts.iter().enumerate() {
            let valid = !h.name.is_empty()
                && h.name.len() <= 32
                && h.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-');
            if !valid {
                bail!(
                    "invalid host name `{}`: use 1 to 32 letters, digits and dashes",
                    h.name
                );
            }
            let address = match &h.address {
                None => nth(underlay, i + 1),
                Some(a) => {
                    let a: Ipv4Addr = a
                        .parse()
                        .map_err(|_| anyhow::anyhow!("host {}: invalid address `{a}`", h.name))?;
                    let off = u32::from(a).wrapping_sub(u32::from(underlay.0));
                    if off == 0 || off >= size - 1 {
                        bail!(
                            "host {}: address {a} is not a host address of the underlay {}/{}",
                            h.name,
                            underlay.0,
                            underlay.1
                        );
                    }
                    a
                }
            };
            let manager = match h.role.as_deref() {
                None | Some("worker") => false,
                Some("manager") => true,
                Some(r) => bail!("host {}: invalid role `{r}`: use manager or worker", h.name),
            };
            hosts.push(HostSpec {
                name: h.name.clone(),
                address,
                manager,
            });
        }
        let names: BTreeSet<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
        if names.len() != hosts.len() {
            bail!("two hosts have the same name");
        }
        let addrs: BTreeSet<Ipv4Addr> = hosts.iter().map(|h| h.address).collect();
        if addrs.len() != hosts.len() {
            bail!("two hosts have the same address");
        }
        if !hosts.iter().any(|h| h.manager) {
            bail!("no manager: give at least one host role = \"manager\"");
        }
        if let Some(d) = &f.daemon {
            for key in [
                "state_dir",
                "socket",
                "listen_addr",
                "advertise_addr",
                "hostname",
            ] {
                if d.contains_key(key) {
                    bail!("[daemon] must not set `{key}`: the lab sets it for each host");
                }
            }
        }
        Ok(LabSpec {
            name: f.name,
            underlay,
            hosts,
            daemon: f.daemon,
        })
    }

    /// The `[daemon]` table as a daemon config file's text, if any.
    pub fn daemon_toml(&self) -> anyhow::Result<Option<String>> {
        self.daemon
            .as_ref()
            .map(|t| toml::to_string(t).context("[daemon]"))
            .transpose()
    }
}

/// The `n`th address of a subnet.
fn nth((net, _): (Ipv4Addr, u8), n: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net) + n as u32)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_shipped_definitions_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cluster-configs");
        let mut seen = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let daemon_file = p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("daemon"));
            if p.extension().is_some_and(|x| x == "toml") && !daemon_file {
                let s = LabSpec::load(&p).unwrap();
                assert!(
                    s.hosts.iter().filter(|h| h.manager).count() % 2 == 1,
                    "{p:?}"
                );
                seen += 1;
            }
        }
        assert!(seen >= 2);
    }

    #[test]
    fn defaults_and_bad_definitions() {
        let s = LabSpec::parse(
            "[[hosts]]\nname = \"a\"\nrole = \"manager\"\n[[hosts]]\nname = \"b\"\n",
        )
        .unwrap();
        assert_eq!(s.hosts[1].address, Ipv4Addr::new(10, 210, 0, 2));
        assert!(s.hosts[0].manager && !s.hosts[1].manager);
        let bad = |t: &str, want: &str| {
            let e = format!("{:#}", LabSpec::parse(t).unwrap_err());
            assert!(e.contains(want), "{e}");
        };
        bad("", "no hosts");
        bad("[[hosts]]\nname = \"a\"\n", "no manager");
        bad(
            "[[hosts]]\nname = \"a b\"\nrole = \"manager\"\n",
            "invalid host name",
        );
        bad("[[hosts]]\nname = \"a\"\nrole = \"boss\"\n", "invalid role");
        bad(
            "[[hosts]]\nname = \"a\"\nrole = \"manager\"\n[[hosts]]\nname = \"a\"\n",
            "same name",
        );
        bad(
            "[[hosts]]\nname = \"a\"\nrole = \"manager\"\naddress = \"10.9.0.1\"\n",
            "not a host address",
        );
        bad(
            "underlay = \"10.1.2.3/24\"\n[[hosts]]\nname = \"a\"\n",
            "host bits",
        );
        bad("underlay = \"banana\"\n", "invalid underlay");
        bad("[[hosts]]\nname = \"a\"\ncolour = 1\n", "unknown field");
        bad(
            "[[hosts]]\nname = \"a\"\nrole = \"manager\"\n[daemon]\nsocket = \"/x\"\n",
            "must not set `socket`",
        );
    }
}
