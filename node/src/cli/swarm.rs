//! `shoal swarm …`.

use clap::Subcommand;
use shoal_mesh::Role;

use super::Client;
use crate::api::Request;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum RoleArg {
    Worker,
    Manager,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Worker => Role::Worker,
            RoleArg::Manager => Role::Manager,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum SwarmCmd {
    /// Create a swarm with this node as its first manager.
    Init {
        /// The address other nodes dial: IP or IP:PORT.
        #[arg(long)]
        advertise_addr: Option<String>,
        /// QUIC listen address (UDP), IP:PORT.
        #[arg(long)]
        listen_addr: Option<String>,
        /// Rebuild a one-manager swarm from this manager's local state (after quorum is lost for good).
        #[arg(long)]
        force_new_cluster: bool,
        /// Where networks without --subnet get subnets from (CIDR; repeatable) [default: 10.0.0.0/8].
        #[arg(long)]
        default_addr_pool: Vec<String>,
        /// Prefix length of those subnets [default: 24].
        #[arg(long)]
        default_addr_pool_mask_length: Option<u8>,
    },
    /// Join a swarm as a worker or manager (the token decides).
    Join {
        /// The join token.
        #[arg(long)]
        token: String,
        /// The address other nodes dial: IP or IP:PORT.
        #[arg(long)]
        advertise_addr: Option<String>,
        /// QUIC listen address (UDP), IP:PORT.
        #[arg(long)]
        listen_addr: Option<String>,
        /// A manager's address, IP:PORT.
        remote: String,
    },
    /// Show (or rotate) a join token.
    JoinToken {
        /// Print the token only.
        #[arg(short, long)]
        quiet: bool,
        /// Make a new token; the old one stops working.
        #[arg(long)]
        rotate: bool,
        /// Whose token.
        role: RoleArg,
    },
    /// Leave the swarm.
    Leave {
        /// Leave even if this breaks quorum or erases the last manager's state.
        #[arg(short, long)]
        force: bool,
    },
}

fn s(v: &serde_json::Value, key: &str) -> String {
    v.get(key)
        .and_then(|x| x.as_str())
        .unwrap_or_default()
        .to_owned()
}

impl SwarmCmd {
    pub async fn exec(self, client: &Client) -> anyhow::Result<()> {
        match self {
            SwarmCmd::Init {
                advertise_addr,
                listen_addr,
                force_new_cluster,
                default_addr_pool,
                default_addr_pool_mask_length,
            } => {
                let v = client
                    .call(&Request::SwarmInit {
                        advertise_addr,
                        listen_addr,
                        force_new_cluster,
                        default_addr_pool,
                        default_addr_pool_mask_length,
                    })
                    .await?;
                if force_new_cluster {
                    println!("{}", s(&v, "message"));
                    return Ok(());
                }
                let addr = s(&v, "advertise_addr");
                println!(
                    "Swarm initialized: current node ({}) is now a manager.\n",
                    s(&v, "node_id")
                );
                println!("To add a worker to this swarm, run the following command:\n");
                println!(
                    "    shoal swarm join --token {} {addr}\n",
                    s(&v, "worker_token")
                );
                println!("To add a manager to this swarm, run the following command:\n");
                println!(
                    "    shoal swarm join --token {} {addr}",
                    s(&v, "manager_token")
                );
            }
            SwarmCmd::Join {
                token,
                advertise_addr,
                listen_addr,
                remote,
            } => {
                let v = client
                    .call(&Request::SwarmJoin {
                        token,
                        remote,
                        advertise_addr,
                        listen_addr,
                    })
                    .await?;
                println!(
                    "This node joined a swarm as a {} (node ID {}).",
                    s(&v, "role"),
                    s(&v, "node_id")
                );
            }
            SwarmCmd::JoinToken {
                quiet,
                rotate,
                role,
            } => {
                let v = client
                    .call(&Request::JoinToken {
                        role: role.into(),
                        rotate,
                    })
                    .await?;
                let token = s(&v, "token");
                if quiet {
                    println!("{token}");
                } else {
                    if rotate {
                        println!("Successfully rotated {} join token.\n", s(&v, "role"));
                    }
                    println!(
                        "To add a {} to this swarm, run the following command:\n",
                        s(&v, "role")
                    );
                    println!(
                        "    shoal swarm join --token {token} {}",
                        s(&v, "manager_addr")
                    );
                }
            }
            SwarmCmd::Leave { force } => {
                client.call(&Request::SwarmLeave { force }).await?;
                println!("Node left the swarm.");
            }
        }
        Ok(())
    }
}
