//! `shoal network …`.

use std::net::Ipv4Addr;

use clap::Subcommand;
use shoal_mesh::cidr::Ipv4Net;
use shoal_mesh::network::{Driver, NetworkSpec, SubnetSpec};
use shoal_mesh::syntax::key_value;

use super::output::{Format, print_table};
use super::{Client, check_failures, print_inspected};
use crate::api::Request;
use crate::views::{Named, NetworkView};

/// `network create`'s flags, parsed into the domain's types as they are read.
#[derive(Debug, clap::Args)]
pub struct CreateFlags {
    /// Driver: overlay, bridge or macvlan (ipvlan is not supported yet).
    #[arg(short, long, default_value = "overlay")]
    pub driver: Driver,
    /// Subnet in CIDR form; one from the default pool if none.
    #[arg(long)]
    pub subnet: Vec<Ipv4Net>,
    /// Gateway of the subnet.
    #[arg(long, value_parser = ipv4)]
    pub gateway: Vec<Ipv4Addr>,
    /// Allocate task addresses from this sub-range of the subnet.
    #[arg(long)]
    pub ip_range: Option<Ipv4Net>,
    /// Reserve an address: name=IP (repeatable).
    #[arg(long, value_parser = aux_address)]
    pub aux_address: Vec<(String, Ipv4Addr)>,
    /// Refused: Shoal runs services, no standalone containers to attach.
    #[arg(long)]
    pub attachable: bool,
    /// No external access.
    #[arg(long)]
    pub internal: bool,
    /// Driver option key=value: parent, mtu, vxlan-id (repeatable).
    #[arg(short = 'o', long = "opt", value_parser = key_value)]
    pub opt: Vec<(String, String)>,
    /// Label key=value (repeatable).
    #[arg(long, value_parser = key_value)]
    pub label: Vec<(String, String)>,
    /// Network name.
    pub name: String,
}

impl CreateFlags {
    /// The spec the flags ask for; what depends on the store (overlaps,
    /// the pool, names taken) is the store's `apply`'s to check.
    fn spec(self) -> anyhow::Result<NetworkSpec> {
        if self.gateway.len() > self.subnet.len() {
            anyhow::bail!(
                "each --gateway needs a --subnet before it ({} gateways, {} subnets)",
                self.gateway.len(),
                self.subnet.len()
            );
        }
        if self.ip_range.is_some() && self.subnet.is_empty() {
            anyhow::bail!("--ip-range needs a --subnet");
        }
        let gateway = self.gateway;
        let subnets = self
            .subnet
            .into_iter()
            .enumerate()
            .map(|(i, subnet)| SubnetSpec {
                subnet,
                gateway: gateway.get(i).copied(),
            })
            .collect();
        Ok(NetworkSpec {
            name: self.name,
            driver: self.driver,
            subnets,
            ip_range: self.ip_range,
            aux_addresses: self.aux_address.into_iter().collect(),
            attachable: self.attachable,
            internal: self.internal,
            options: self.opt.into_iter().collect(),
            labels: self.label.into_iter().collect(),
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum NetworkCmd {
    /// Create a network.
    Create(CreateFlags),
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

/// An IPv4 address, or what to write instead.
fn ipv4(text: &str) -> Result<Ipv4Addr, String> {
    text.parse()
        .map_err(|_| format!("`{text}` is not an IPv4 address such as 10.1.0.1"))
}

/// `--aux-address NAME=IP`.
fn aux_address(text: &str) -> Result<(String, Ipv4Addr), String> {
    let (name, ip) = key_value(text).map_err(|_| format!("`{text}` is not NAME=IP"))?;
    Ok((name, ipv4(&ip)?))
}

impl NetworkCmd {
    pub async fn exec(self, client: &Client) -> anyhow::Result<()> {
        match self {
            NetworkCmd::Create(flags) => {
                let spec = flags.spec()?;
                let v: NetworkView = client
                    .call_as(&Request::NetworkCreate(Box::new(spec)))
                    .await?;
                println!("{}", v.id);
            }
            NetworkCmd::Ls { format, quiet } => ls(client, format, quiet).await?,
            NetworkCmd::Inspect { format, networks } => {
                let (found, failed) = client
                    .call_each::<NetworkView>(networks, |network| Request::NetworkInspect {
                        network,
                    })
                    .await;
                print_inspected(&found, format)?;
                check_failures(failed, "network(s) not found")?;
            }
            NetworkCmd::Rm { networks } => {
                let (removed, failed) = client
                    .call_each::<Named>(networks, |network| Request::NetworkRm { network })
                    .await;
                removed.iter().for_each(|v| println!("{}", v.name));
                check_failures(failed, "network(s) not removed")?;
            }
        }
        Ok(())
    }
}

/// `network ls`.
async fn ls(client: &Client, format: Format, quiet: bool) -> anyhow::Result<()> {
    let nets: Vec<NetworkView> = client.call_as(&Request::NetworkLs).await?;
    if quiet {
        nets.iter().for_each(|n| println!("{}", n.id));
        return Ok(());
    }
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&nets)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = nets
        .iter()
        .map(|n| {
            vec![
                n.id.clone(),
                n.name.clone(),
                n.driver.to_string(),
                n.scope.clone(),
                n.subnets.join(","),
                n.vni.map(|v| v.to_string()).unwrap_or_default(),
            ]
        })
        .collect();
    print_table(
        &["NETWORK ID", "NAME", "DRIVER", "SCOPE", "SUBNETS", "VNI"],
        &rows,
    );
    Ok(())
}
