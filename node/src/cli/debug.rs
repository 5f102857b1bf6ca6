//! `shoal debug …`: diagnostics, and hooks to drive gossip by hand until
//! networks and tasks (issues 4 and 5) write its tables.

use clap::Subcommand;
use serde_json::Value;

use super::Client;
use super::output::{Format, cell, print_table};
use crate::api::Request;

#[derive(Debug, Subcommand)]
pub enum DebugCmd {
    /// Show this node's data plane: FDB and neighbour entries, VIP load
    /// balancers, sandboxes and published ports.
    Dataplane {
        /// Only this network.
        #[arg(long)]
        network: Option<String>,
        /// Output format: `table` or `json`.
        #[arg(long, default_value = "table")]
        format: Format,
    },
    /// Run a one-off container of an image on this node (as `docker run --rm`),
    /// print its output and exit with its status.
    Run {
        /// Join this network namespace (e.g. /run/netns/NAME) [default: a new one].
        #[arg(long)]
        netns: Option<std::path::PathBuf>,
        /// Memory limit, e.g. 32m (swap included).
        #[arg(long, value_parser = crate::api::parse_memory)]
        memory: Option<u64>,
        /// CPU limit, in CPUs, e.g. 0.5.
        #[arg(long, value_parser = crate::api::parse_cpus)]
        cpus: Option<u64>,
        /// Process limit.
        #[arg(long, value_parser = crate::api::parse_pids)]
        pids_limit: Option<i64>,
        /// The image.
        image: String,
        /// The command, replacing the image's.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Show what a task's embedded DNS (127.0.0.11) answers for a name.
    Dns {
        /// Task ID or SERVICE.SLOT (on this node).
        task: String,
        /// The name.
        name: String,
    },
    /// Dump this node's gossip members and tables.
    Gossip {
        /// Only this network (`(global)` for the cluster-wide table).
        #[arg(long)]
        network: Option<String>,
        /// Output format: `table` or `json`.
        #[arg(long, default_value = "table")]
        format: Format,
    },
    /// Attach this node to a network's gossip.
    GossipJoin {
        /// The network.
        network: String,
    },
    /// Detach this node from a network's gossip (its entries there are deleted).
    GossipLeave {
        /// The network.
        network: String,
    },
    /// Write an entry owned by this node, e.g.
    /// `gossip-put net1 vteps n1 '{"vtep":{"node":"…","addr":"10.0.0.1"}}'`.
    GossipPut {
        /// The network.
        network: String,
        /// The table: `endpoints` or `vteps`.
        table: String,
        /// The key.
        key: String,
        /// The value as JSON (`{"endpoint": {...}}` or `{"vtep": {...}}`).
        value: String,
    },
    /// Delete an entry owned by this node.
    GossipDelete {
        /// The network.
        network: String,
        /// The table.
        table: String,
        /// The key.
        key: String,
    },
}

impl DebugCmd {
    pub async fn exec(self, client: &Client) -> anyhow::Result<()> {
        match self {
            DebugCmd::Dataplane { network, format } => {
                let v = client.call(&Request::DebugDataplane { network }).await?;
                match format {
                    Format::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                    Format::Table => print_dataplane(&v),
                }
            }
            DebugCmd::Run {
                netns,
                memory,
                cpus,
                pids_limit,
                image,
                command,
            } => {
                let v: crate::daemon::containers::Ended = client
                    .call_as(&Request::DebugRun {
                        image,
                        netns: netns.map(std::path::absolute).transpose()?,
                        args: command,
                        limits: crate::daemon::oci::Limits {
                            memory,
                            nano_cpus: cpus,
                            pids: pids_limit,
                        },
                    })
                    .await?;
                print!("{}", v.stdout);
                eprint!("{}", v.stderr);
                if v.exit_status != 0 {
                    std::process::exit(v.exit_status.clamp(1, 255) as i32);
                }
            }
            DebugCmd::Dns { task, name } => {
                let v = client.call(&Request::DebugDns { task, name }).await?;
                match v["answer"].as_array() {
                    Some(ips) if ips.is_empty() => println!(
                        "{}: a swarm name with no address right now (no live task)",
                        v["name"].as_str().unwrap_or_default()
                    ),
                    Some(ips) => {
                        for ip in ips {
                            println!(
                                "{}\t{}\tTTL {}",
                                v["name"].as_str().unwrap_or_default(),
                                cell(ip),
                                cell(&v["ttl"])
                            );
                        }
                    }
                    None => println!(
                        "{}: not a swarm name; forwarded to the host's resolvers",
                        v["name"].as_str().unwrap_or_default()
                    ),
                }
            }
            DebugCmd::Gossip { network, format } => {
                let v = client.call(&Request::DebugGossip { network }).await?;
                match format {
                    Format::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                    Format::Table => print_dump(&v),
                }
            }
            DebugCmd::GossipJoin { network } => {
                client.call(&Request::DebugGossipJoin { network }).await?;
            }
            DebugCmd::GossipLeave { network } => {
                client.call(&Request::DebugGossipLeave { network }).await?;
            }
            DebugCmd::GossipPut {
                network,
                table,
                key,
                value,
            } => {
                let value = serde_json::from_str(&value).map_err(|e| {
                    anyhow::anyhow!(
                        "invalid value: {e}. Use {{\"vtep\":{{\"node\":\"<node id>\",\"addr\":\"IP\"}}}} or {{\"endpoint\":{{...}}}}"
                    )
                })?;
                client
                    .call(&Request::DebugGossipPut {
                        network,
                        table,
                        key,
                        value,
                    })
                    .await?;
            }
            DebugCmd::GossipDelete {
                network,
                table,
                key,
            } => {
                client
                    .call(&Request::DebugGossipDelete {
                        network,
                        table,
                        key,
                    })
                    .await?;
            }
        }
        Ok(())
    }
}

fn print_dump(v: &Value) {
    let get = |m: &Value, k: &str| m.get(k).map(cell).unwrap_or_default();
    println!("MEMBERS");
    let rows: Vec<Vec<String>> = v["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            vec![
                get(m, "node_id"),
                get(m, "hostname"),
                get(m, "state"),
                get(m, "incarnation"),
                get(m, "addr"),
                get(m, "last_sync_ms_ago"),
            ]
        })
        .collect();
    print_table(
        &[
            "NODE",
            "HOSTNAME",
            "STATE",
            "INCARNATION",
            "ADDRESS",
            "LAST SYNC (ms ago)",
        ],
        &rows,
    );
    let Some(networks) = v["networks"].as_object() else {
        return;
    };
    for (net, tables) in networks {
        let Some(tables) = tables.as_object() else {
            continue;
        };
        for (table, entries) in tables {
            println!("\nNETWORK {net} TABLE {table}");
            let rows: Vec<Vec<String>> = entries
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    vec![
                        get(e, "key"),
                        get(e, "owner"),
                        get(e, "version"),
                        get(e, "tombstone"),
                        get(e, "visible"),
                        e.get("value").map(|x| x.to_string()).unwrap_or_default(),
                    ]
                })
                .collect();
            print_table(
                &["KEY", "OWNER", "VERSION", "TOMBSTONE", "VISIBLE", "VALUE"],
                &rows,
            );
        }
    }
}

fn print_dataplane(v: &Value) {
    let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
    for n in list(&v["networks"]) {
        println!(
            "NETWORK {} (VNI {}, MTU {}, VTEP {})",
            cell(&n["name"]),
            cell(&n["vni"]),
            cell(&n["mtu"]),
            cell(&n["vtep"])
        );
        let rows: Vec<Vec<String>> = list(&n["fdb"])
            .iter()
            .map(|f| vec![cell(&f["mac"]), cell(&f["vtep"])])
            .collect();
        print_table(&["FDB MAC", "REMOTE VTEP"], &rows);
        let rows: Vec<Vec<String>> = list(&n["neighbours"])
            .iter()
            .map(|f| vec![cell(&f["ip"]), cell(&f["mac"])])
            .collect();
        print_table(&["NEIGHBOUR", "MAC"], &rows);
        let rows: Vec<Vec<String>> = list(&n["load_balancers"])
            .iter()
            .map(|l| vec![cell(&l["service"]), cell(&l["vip"]), cell(&l["backends"])])
            .collect();
        print_table(&["SERVICE", "VIP", "BACKENDS"], &rows);
        println!();
    }
    let rows: Vec<Vec<String>> = list(&v["published"])
        .iter()
        .map(|p| {
            vec![
                format!("{}/{}", cell(&p["published"]), cell(&p["protocol"])),
                cell(&p["mode"]),
                cell(&p["target"]),
                cell(&p["backends"]),
            ]
        })
        .collect();
    println!(
        "PUBLISHED (as the kernel forwards them; routing-mesh address {})",
        cell(&v["ingress_addr"])
    );
    print_table(&["PORT", "MODE", "TARGET", "BACKENDS"], &rows);
    for w in list(&v["warnings"]) {
        println!("WARNING: {}", w.as_str().unwrap_or_default());
    }
}
