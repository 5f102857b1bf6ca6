//! `shoal node …`.

use clap::Subcommand;
use serde_json::Value;
use shoal_mesh::Availability;

use super::output::{Format, cell, print_table};
use super::{Client, check_failures, print_inspected};
use crate::api::Request;

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// List the swarm's nodes.
    Ls {
        /// Output format: `table` or `json`.
        #[arg(long, default_value = "table")]
        format: Format,
        /// Only print IDs.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Show one or more nodes in detail.
    Inspect {
        /// Output format: `table` or `json`.
        #[arg(long, default_value = "json")]
        format: Format,
        /// Node IDs, ID prefixes or hostnames.
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Make workers managers.
    Promote {
        /// Node IDs, ID prefixes or hostnames.
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Make managers workers.
    Demote {
        /// Node IDs, ID prefixes or hostnames.
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Change a node's availability or labels.
    Update {
        /// active, pause or drain.
        #[arg(long)]
        availability: Option<Availability>,
        /// Add or change a label (key=value).
        #[arg(long = "label-add", value_parser = parse_label)]
        label_add: Vec<(String, String)>,
        /// Remove a label by key.
        #[arg(long = "label-rm")]
        label_rm: Vec<String>,
        /// Node ID, ID prefix or hostname.
        node: String,
    },
    /// Remove nodes from the swarm.
    Rm {
        /// Remove even if the node is up.
        #[arg(short, long)]
        force: bool,
        /// Node IDs, ID prefixes or hostnames.
        #[arg(required = true)]
        nodes: Vec<String>,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').unwrap_or((s, ""));
    if k.is_empty() {
        return Err(format!("invalid label `{s}`: use key=value"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

fn field(v: &Value, key: &str) -> String {
    v.get(key).map(cell).unwrap_or_default()
}

impl NodeCmd {
    pub async fn exec(self, client: &Client) -> anyhow::Result<()> {
        match self {
            NodeCmd::Ls { format, quiet } => {
                let v = client.call(&Request::NodeLs).await?;
                let nodes = v.as_array().cloned().unwrap_or_default();
                if quiet {
                    nodes.iter().for_each(|n| println!("{}", field(n, "id")));
                } else if format == Format::Json {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    let rows: Vec<Vec<String>> = nodes
                        .iter()
                        .map(|n| {
                            let me = n.get("self").and_then(Value::as_bool) == Some(true);
                            vec![
                                format!("{}{}", field(n, "id"), if me { " *" } else { "" }),
                                field(n, "hostname"),
                                field(n, "status"),
                                field(n, "availability"),
                                field(n, "manager_status"),
                                field(n, "gossip"),
                                field(n, "addr"),
                            ]
                        })
                        .collect();
                    print_table(
                        &[
                            "ID",
                            "HOSTNAME",
                            "STATUS",
                            "AVAILABILITY",
                            "MANAGER STATUS",
                            "GOSSIP",
                            "ADDRESS",
                        ],
                        &rows,
                    );
                }
            }
            NodeCmd::Inspect { format, nodes } => {
                let (found, failed) = client
                    .call_each(nodes, |node| Request::NodeInspect { node })
                    .await;
                print_inspected(&found, format)?;
                check_failures(failed, "node(s) not found")?;
            }
            NodeCmd::Promote { nodes } => {
                let (done, failed) = client
                    .call_each(nodes, |node| Request::NodePromote { node })
                    .await;
                done.iter()
                    .for_each(|v| println!("{}", field(v, "message")));
                check_failures(failed, "node(s) not changed")?;
            }
            NodeCmd::Demote { nodes } => {
                let (done, failed) = client
                    .call_each(nodes, |node| Request::NodeDemote { node })
                    .await;
                done.iter()
                    .for_each(|v| println!("{}", field(v, "message")));
                check_failures(failed, "node(s) not changed")?;
            }
            NodeCmd::Update {
                availability,
                label_add,
                label_rm,
                node,
            } => {
                let v = client
                    .call(&Request::NodeUpdate {
                        node,
                        availability,
                        label_add,
                        label_rm,
                    })
                    .await?;
                println!("{}", field(&v, "id"));
            }
            NodeCmd::Rm { force, nodes } => {
                let (removed, failed) = client
                    .call_each(nodes, |node| Request::NodeRm { node, force })
                    .await;
                removed.iter().for_each(|v| println!("{}", field(v, "id")));
                check_failures(failed, "node(s) not removed")?;
            }
        }
        Ok(())
    }
}
