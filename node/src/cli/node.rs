//! `shoal node …`.

use clap::Subcommand;
use shoal_mesh::Availability;

use super::output::{Format, print_table};
use super::{Client, check_failures, print_inspected};
use crate::api::Request;
use crate::views::{NodeChange, NodeView, text};

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

impl NodeCmd {
    pub async fn exec(self, client: &Client) -> anyhow::Result<()> {
        match self {
            NodeCmd::Ls { format, quiet } => ls(client, format, quiet).await?,
            NodeCmd::Inspect { format, nodes } => {
                let (found, failed) = client
                    .call_each::<NodeView>(nodes, |node| Request::NodeInspect { node })
                    .await;
                print_inspected(&found, format)?;
                check_failures(failed, "node(s) not found")?;
            }
            NodeCmd::Promote { nodes } => {
                let (done, failed) = client
                    .call_each::<NodeChange>(nodes, |node| Request::NodePromote { node })
                    .await;
                done.into_iter()
                    .for_each(|v| println!("{}", v.message.unwrap_or(v.id)));
                check_failures(failed, "node(s) not changed")?;
            }
            NodeCmd::Demote { nodes } => {
                let (done, failed) = client
                    .call_each::<NodeChange>(nodes, |node| Request::NodeDemote { node })
                    .await;
                done.into_iter()
                    .for_each(|v| println!("{}", v.message.unwrap_or(v.id)));
                check_failures(failed, "node(s) not changed")?;
            }
            NodeCmd::Update {
                availability,
                label_add,
                label_rm,
                node,
            } => {
                let v: NodeChange = client
                    .call_as(&Request::NodeUpdate {
                        node,
                        availability,
                        label_add,
                        label_rm,
                    })
                    .await?;
                println!("{}", v.id);
            }
            NodeCmd::Rm { force, nodes } => {
                let (removed, failed) = client
                    .call_each::<NodeChange>(nodes, |node| Request::NodeRm { node, force })
                    .await;
                removed.iter().for_each(|v| println!("{}", v.id));
                check_failures(failed, "node(s) not removed")?;
            }
        }
        Ok(())
    }
}

/// `node ls`.
async fn ls(client: &Client, format: Format, quiet: bool) -> anyhow::Result<()> {
    let nodes: Vec<NodeView> = client.call_as(&Request::NodeLs).await?;
    if quiet {
        nodes.iter().for_each(|n| println!("{}", n.id));
        return Ok(());
    }
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&nodes)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                format!("{}{}", n.id, if n.is_self { " *" } else { "" }),
                n.hostname.clone(),
                // A node seen going down again and again says so.
                match n.downs {
                    0 => text(&n.status),
                    d => format!("{} (down {d}×)", text(&n.status)),
                },
                text(&n.availability),
                n.manager_status.clone().unwrap_or_default(),
                text(&n.gossip),
                n.addr.clone(),
            ]
        })
        .collect();
    let headers = [
        "ID",
        "HOSTNAME",
        "STATUS",
        "AVAILABILITY",
        "MANAGER STATUS",
        "GOSSIP",
        "ADDRESS",
    ];
    print_table(&headers, &rows);
    Ok(())
}
