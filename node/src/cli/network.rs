//! `shoal network …`.

use clap::Subcommand;
use serde_json::Value;

use super::output::{Format, cell, print_table};
use super::{Client, check_failures, print_inspected};
use crate::api::Request;

#[derive(Debug, Subcommand)]
pub enum NetworkCmd {
    /// Create a network.
    Create {
        /// Driver: overlay, bridge or macvlan (ipvlan is not supported yet).
        #[arg(short, long, default_value = "overlay")]
        driver: String,
        /// Subnet in CIDR form (repeatable); one from the default pool if none.
        #[arg(long)]
        subnet: Vec<String>,
        /// Gateway of the subnet at the same position (repeatable).
        #[arg(long)]
        gateway: Vec<String>,
        /// Allocate task addresses from this sub-range of the first subnet.
        #[arg(long)]
        ip_range: Option<String>,
        /// Reserve an address: name=IP (repeatable).
        #[arg(long)]
        aux_address: Vec<String>,
        /// Let standalone containers attach.
        #[arg(long)]
        attachable: bool,
        /// No external access.
        #[arg(long)]
        internal: bool,
        /// Driver option key=value: parent, mtu, vxlan-id (repeatable).
        #[arg(short = 'o', long = "opt")]
        opt: Vec<String>,
        /// Label key=value (repeatable).
        #[arg(long)]
        label: Vec<String>,
        /// Network name.
        name: String,
    },
    /// List networks.
    Ls {
        /// Output format: `table` or `json`.
        #[arg(long, default_value = "table")]
        format: Format,
        /// Only print IDs.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Show networks in detail.
    Inspect {
        /// Output format: `table` or `json`.
        #[arg(long, default_value = "json")]
        format: Format,
        /// Names, IDs or ID prefixes.
        #[arg(required = true)]
        networks: Vec<String>,
    },
    /// Remove networks.
    Rm {
        /// Names, IDs or ID prefixes.
        #[arg(required = true)]
        networks: Vec<String>,
    },
}

fn field(v: &Value, key: &str) -> String {
    v.get(key).map(cell).unwrap_or_default()
}

impl NetworkCmd {
    pub async fn exec(self, client: &Client) -> anyhow::Result<()> {
        match self {
            NetworkCmd::Create {
                driver,
                subnet,
                gateway,
                ip_range,
                aux_address,
                attachable,
                internal,
                opt,
                label,
                name,
            } => {
                let v = client
                    .call(&Request::NetworkCreate {
                        name,
                        driver,
                        subnets: subnet,
                        gateways: gateway,
                        ip_range,
                        aux_addresses: aux_address,
                        attachable,
                        internal,
                        options: opt,
                        labels: label,
                    })
                    .await?;
                println!("{}", field(&v, "id"));
            }
            NetworkCmd::Ls { format, quiet } => {
                let v = client.call(&Request::NetworkLs).await?;
                let nets = v.as_array().cloned().unwrap_or_default();
                if quiet {
                    nets.iter().for_each(|n| println!("{}", field(n, "id")));
                } else if format == Format::Json {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    let rows: Vec<Vec<String>> = nets
                        .iter()
                        .map(|n| {
                            let subnets: Vec<String> = n["subnets"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .map(cell)
                                .collect();
                            vec![
                                field(n, "id"),
                                field(n, "name"),
                                field(n, "driver"),
                                field(n, "scope"),
                                subnets.join(","),
                                field(n, "vni"),
                            ]
                        })
                        .collect();
                    print_table(
                        &["NETWORK ID", "NAME", "DRIVER", "SCOPE", "SUBNETS", "VNI"],
                        &rows,
                    );
                }
            }
            NetworkCmd::Inspect { format, networks } => {
                let (found, failed) = client
                    .call_each(networks, |network| Request::NetworkInspect { network })
                    .await;
                print_inspected(&found, format)?;
                check_failures(failed, "network(s) not found")?;
            }
            NetworkCmd::Rm { networks } => {
                let (removed, failed) = client
                    .call_each(networks, |network| Request::NetworkRm { network })
                    .await;
                removed
                    .iter()
                    .for_each(|v| println!("{}", field(v, "name")));
                check_failures(failed, "network(s) not removed")?;
            }
        }
        Ok(())
    }
}
