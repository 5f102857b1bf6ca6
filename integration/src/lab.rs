//! Labs that outlive the process that made them (`shoal-lab up`): hosts
//! as network namespaces on an underlay switch, their state under
//! `/run/shoal-lab/NAME`, every namespace named `shoal-lab-NAME-…`, so that
//! `down` can remove everything from the name alone — also after the lab
//! process crashed.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::spec::LabSpec;
use super::{Cluster, Host, ip, kill_processes_under};

/// The image every lab's registry holds from the start, as `NAME:TAG`
/// under the registry's address (see [`super::registry_on`]).
pub const LAB_IMAGE: &str = "lab/busybox:1";

/// Where labs keep their hosts' state.
pub const LAB_ROOT: &str = "/run/shoal-lab";

/// Checks a lab name: letters and digits, at most 12 (it is part of
/// namespace names).
pub fn check_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > 12
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    {
        bail!("invalid lab name `{name}`: use 1 to 12 lowercase letters and digits");
    }
    Ok(())
}

fn base(name: &str) -> PathBuf {
    Path::new(LAB_ROOT).join(name)
}

fn prefix(name: &str) -> String {
    format!("shoal-lab-{name}-")
}

impl Cluster {
    /// `shoal-lab up`: the spec's hosts and their daemons, the swarm formed.
    /// Refused if a lab of that name exists.
    pub fn lab_up(name: &str, spec: &LabSpec) -> anyhow::Result<Cluster> {
        let c = Cluster::lab_create(name, spec)?;
        let roles: Vec<bool> = spec.hosts.iter().map(|h| h.manager).collect();
        // Up means usable: every host sees every node ready (gossip's
        // view spreads within a second or two of the last join).
        let formed = c.form_roles(&roles).and_then(|()| {
            c.wait_until(
                "every host to see every node ready",
                std::time::Duration::from_secs(30),
                |c| {
                    for i in 0..c.hosts.len() {
                        let nodes = c.node_ls(i)?;
                        if nodes.len() != c.hosts.len()
                            || nodes.iter().any(|n| n["status"] != "ready")
                        {
                            return Ok(false);
                        }
                    }
                    Ok(true)
                },
            )
        });
        if let Err(e) = formed {
            let _ = Cluster::lab_down(name);
            return Err(e);
        }
        Ok(c)
    }

    /// The spec's hosts and their daemons, not yet in a swarm, kept under
    /// the lab's name (for `shoal-lab demo --keep`, which forms the swarm
    /// step by step). Refused if a lab of that name exists; on failure
    /// what was made is removed.
    pub fn lab_create(name: &str, spec: &LabSpec) -> anyhow::Result<Cluster> {
        check_name(name)?;
        let dir = base(name);
        if dir.exists() {
            bail!(
                "a lab named `{name}` exists: use it, or remove it with `shoal-lab down --name {name}`"
            );
        }
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let cluster = Cluster {
            hosts: Vec::new(),
            base: dir.clone(),
            _tmp: None,
            netns_prefix: Some(prefix(name)),
            keep: true,
        };
        let c = match cluster.build_isolated(spec).and_then(Cluster::equip) {
            Ok(c) => c,
            Err(e) => {
                let _ = Cluster::lab_down(name);
                return Err(e);
            }
        };
        let hosts: Vec<Value> = c
            .hosts
            .iter()
            .map(|h| {
                json!({"name": h.name, "ip": h.ip.to_string(), "netns": h.netns,
                       "state_dir": h.state_dir, "socket": h.socket, "log": h.log})
            })
            .collect();
        std::fs::write(
            dir.join("lab.json"),
            serde_json::to_vec_pretty(&json!({"name": name, "hosts": hosts}))?,
        )?;
        Ok(c)
    }

    /// What a lab's hosts run containers with: a containerd on every host,
    /// the lab's registry on the underlay, and in it [`LAB_IMAGE`], a
    /// busybox image built from Debian's `busybox-static`.
    pub fn equip(mut self) -> anyhow::Result<Cluster> {
        for i in 0..self.hosts.len() {
            self.start_containerd(i)?;
        }
        self.start_registry()?;
        let archive = self.base.join("busybox.tar");
        std::fs::write(&archive, super::images::busybox(LAB_IMAGE)?)?;
        self.push(&archive, LAB_IMAGE)?;
        Ok(self)
    }

    /// The lab `name`, as `up` left it.
    pub fn lab_attach(name: &str) -> anyhow::Result<Cluster> {
        check_name(name)?;
        let dir = base(name);
        let text = std::fs::read_to_string(dir.join("lab.json")).map_err(|_| {
            anyhow::anyhow!("no lab named `{name}` (start one with `shoal-lab up --name {name}`)")
        })?;
        let v: Value = serde_json::from_str(&text).context("lab.json")?;
        let s = |h: &Value, k: &str| h[k].as_str().unwrap_or_default().to_owned();
        let hosts = v["hosts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|h| Host {
                name: s(h, "name"),
                ip: s(h, "ip").parse().unwrap_or(Ipv4Addr::UNSPECIFIED),
                state_dir: s(h, "state_dir").into(),
                socket: s(h, "socket").into(),
                log: s(h, "log").into(),
                netns: h["netns"].as_str().map(str::to_owned),
                containerd_dir: dir.join(s(h, "name")).join("containerd"),
                daemon_args: Vec::new(),
                child: None,
                containerd: None,
            })
            .collect();
        Ok(Cluster {
            hosts,
            base: dir,
            _tmp: None,
            netns_prefix: Some(prefix(name)),
            keep: true,
        })
    }

    /// Host index by name.
    pub fn host_index(&self, host: &str) -> anyhow::Result<usize> {
        self.hosts
            .iter()
            .position(|h| h.name == host)
            .ok_or_else(|| {
                let names: Vec<&str> = self.hosts.iter().map(|h| h.name.as_str()).collect();
                anyhow::anyhow!("no host `{host}` in this lab (hosts: {})", names.join(", "))
            })
    }

    /// `partition A,B C,D`: hosts of different groups no longer reach each
    /// other over the underlay (hosts in no group are not affected).
    pub fn partition(&self, groups: &[Vec<usize>]) -> anyhow::Result<()> {
        let ul = format!("{}ul", self.netns_prefix.clone().unwrap_or_default());
        let mut script = String::from(
            "add table bridge shoal-lab\ndelete table bridge shoal-lab\nadd table bridge shoal-lab\n\
             add chain bridge shoal-lab cut { type filter hook forward priority 0; policy accept; }\n",
        );
        for (gi, a) in groups.iter().enumerate() {
            for (gj, b) in groups.iter().enumerate() {
                if gi == gj {
                    continue;
                }
                for i in a {
                    for j in b {
                        script.push_str(&format!(
                            "add rule bridge shoal-lab cut iifname \"ul{}\" oifname \"ul{}\" drop\n",
                            i + 1,
                            j + 1
                        ));
                    }
                }
            }
        }
        nft_in(&ul, &script)
    }

    /// `heal`: every host reaches every other again.
    pub fn heal(&self) -> anyhow::Result<()> {
        let ul = format!("{}ul", self.netns_prefix.clone().unwrap_or_default());
        nft_in(
            &ul,
            "add table bridge shoal-lab\ndelete table bridge shoal-lab\n",
        )
    }

    /// `shoal-lab down`: every process, namespace and state dir of lab
    /// `name` goes, whether or not `up` finished or the lab process lives.
    pub fn lab_down(name: &str) -> anyhow::Result<()> {
        check_name(name)?;
        let dir = base(name);
        if let Ok(c) = Cluster::lab_attach(name) {
            (0..c.hosts.len()).for_each(|i| c.kill_containers(i));
        }
        kill_processes_under(&dir);
        let p = prefix(name);
        if let Ok(entries) = std::fs::read_dir("/run/netns") {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(&p) {
                    let _ = ip(&["netns", "del", &n]);
                }
            }
        }
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot remove {}", dir.display()))?;
        }
        Ok(())
    }
}

fn nft_in(ns: &str, script: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .args(["nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
