//! `shoal swarm …`.

use clap::Subcommand;
use shoal_mesh::Role;

use shoal_mesh::JoinToken;
use shoal_mesh::cidr::Ipv4Net;

use super::Client;
use crate::api::{HostPort, Request};
use crate::views::{
    CaRotationView, CaView, Done, JoinTokenView, JoinedView, SwarmInitView, SwarmUpdatedView,
    UnlockKeyView,
};

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
        advertise_addr: Option<HostPort>,
        /// QUIC listen address (UDP), IP:PORT.
        #[arg(long)]
        listen_addr: Option<HostPort>,
        /// Rebuild a one-manager swarm from this manager's local state (after quorum is lost for good).
        #[arg(long)]
        force_new_cluster: bool,
        /// Where networks without --subnet get subnets from (CIDR; repeatable) [default: 10.0.0.0/8].
        #[arg(long)]
        default_addr_pool: Vec<Ipv4Net>,
        /// Prefix length of those subnets [default: 24].
        #[arg(long)]
        default_addr_pool_mask_length: Option<u8>,
        /// How long node certificates are valid, e.g. 2160h [default: 90 days]; nodes renew theirs at half that.
        #[arg(long, value_parser = crate::api::parse_duration_ms)]
        cert_expiry: Option<u64>,
        /// Seal managers' keys at rest under an unlock key: a restarted manager serves nothing until `shoal swarm unlock`.
        #[arg(long)]
        autolock: bool,
    },
    /// Change the swarm's settings.
    Update {
        /// How long node certificates are valid, e.g. 2160h; every node renews its certificate at half that.
        #[arg(long, value_parser = crate::api::parse_duration_ms)]
        cert_expiry: Option<u64>,
        /// Turn autolock on or off (--autolock=true|false).
        #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
        autolock: Option<bool>,
    },
    /// Unlock a locked manager: reads the unlock key from standard input.
    Unlock,
    /// Show (or rotate) the unlock key.
    UnlockKey {
        /// Print the key only.
        #[arg(short, long)]
        quiet: bool,
        /// Make a new key; managers restarted later need it (keep the old one until every manager has run with the new).
        #[arg(long)]
        rotate: bool,
    },
    /// Join a swarm as a worker or manager (the token decides).
    Join {
        /// The join token.
        #[arg(long)]
        token: JoinToken,
        /// The address other nodes dial: IP or IP:PORT.
        #[arg(long)]
        advertise_addr: Option<HostPort>,
        /// QUIC listen address (UDP), IP:PORT.
        #[arg(long)]
        listen_addr: Option<HostPort>,
        /// A manager's address, IP[:PORT] (port 2377 if none).
        remote: HostPort,
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
    /// Show the swarm's CA certificate, or replace the CA (--rotate).
    Ca {
        /// Replace the CA: every node gets a certificate under a new CA, then the old one is dropped (join tokens change).
        #[arg(long)]
        rotate: bool,
        /// Return once the rotation started, without waiting for every node.
        #[arg(short, long)]
        detach: bool,
        /// Print the certificate only, without progress.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Leave the swarm.
    Leave {
        /// Leave even if this breaks quorum or erases the last manager's state.
        #[arg(short, long)]
        force: bool,
    },
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
                cert_expiry,
                autolock,
            } => {
                let req = Request::SwarmInit {
                    advertise_addr,
                    listen_addr,
                    force_new_cluster,
                    default_addr_pool,
                    default_addr_pool_mask_length,
                    cert_expiry_ms: cert_expiry,
                    autolock,
                };
                if force_new_cluster {
                    let v: Done = client.call_as(&req).await?;
                    println!("{}", v.message);
                    return Ok(());
                }
                let v: SwarmInitView = client.call_as(&req).await?;
                let addr = v.advertise_addr;
                println!(
                    "Swarm initialized: current node ({}) is now a manager.\n",
                    v.node_id
                );
                println!("To add a worker to this swarm, run the following command:\n");
                println!("    shoal swarm join --token {} {addr}\n", v.worker_token);
                println!("To add a manager to this swarm, run the following command:\n");
                println!("    shoal swarm join --token {} {addr}", v.manager_token);
                if let Some(key) = v.unlock_key {
                    print_unlock_key(&key);
                }
            }
            SwarmCmd::Update {
                cert_expiry,
                autolock,
            } => {
                let v: SwarmUpdatedView = client
                    .call_as(&Request::SwarmUpdate {
                        cert_expiry_ms: cert_expiry,
                        autolock,
                    })
                    .await?;
                println!("{}", v.message);
                if let Some(key) = v.unlock_key.filter(|_| autolock == Some(true)) {
                    print_unlock_key(&key);
                }
            }
            SwarmCmd::Unlock => {
                let key = read_unlock_key()?;
                let v: Done = client.call_as(&Request::SwarmUnlock { key }).await?;
                println!("{}", v.message);
            }
            SwarmCmd::UnlockKey { quiet, rotate } => {
                let v: UnlockKeyView = client.call_as(&Request::UnlockKey { rotate }).await?;
                if quiet {
                    println!("{}", v.unlock_key);
                } else {
                    if v.rotated {
                        println!("Successfully rotated manager unlock key.");
                    }
                    print_unlock_key(&v.unlock_key);
                    if v.rotated {
                        println!(
                            "\nManagers that were down during the rotation still need the previous key."
                        );
                    }
                }
            }
            SwarmCmd::Join {
                token,
                advertise_addr,
                listen_addr,
                remote,
            } => {
                let v: JoinedView = client
                    .call_as(&Request::SwarmJoin {
                        token,
                        remote,
                        advertise_addr,
                        listen_addr,
                    })
                    .await?;
                println!(
                    "This node joined a swarm as a {} (node ID {}).",
                    v.role, v.node_id
                );
            }
            SwarmCmd::JoinToken {
                quiet,
                rotate,
                role,
            } => {
                let v: JoinTokenView = client
                    .call_as(&Request::JoinToken {
                        role: role.into(),
                        rotate,
                    })
                    .await?;
                let token = v.token;
                if quiet {
                    println!("{token}");
                } else {
                    if rotate {
                        println!("Successfully rotated {} join token.\n", v.role);
                    }
                    println!(
                        "To add a {} to this swarm, run the following command:\n",
                        v.role
                    );
                    println!("    shoal swarm join --token {token} {}", v.manager_addr);
                }
            }
            SwarmCmd::Ca {
                rotate,
                detach,
                quiet,
            } => swarm_ca(client, rotate, detach, quiet).await?,
            SwarmCmd::Leave { force } => {
                client.call(&Request::SwarmLeave { force }).await?;
                println!("Node left the swarm.");
            }
        }
        Ok(())
    }
}

/// Tells the user how to unlock a restarted manager.
fn print_unlock_key(key: &str) {
    println!(
        "\nTo unlock a swarm manager after it restarts, run `shoal swarm unlock` and provide the following key:\n"
    );
    println!("    {key}\n");
    println!("Keep it somewhere safe: without it, a restarted manager cannot rejoin the swarm.");
}

/// The unlock key from standard input (one line; prompted on a terminal).
fn read_unlock_key() -> anyhow::Result<String> {
    use std::io::{BufRead, IsTerminal, Read, Write};
    if std::io::stdin().is_terminal() {
        eprint!("Enter unlock key: ");
        std::io::stderr().flush()?;
    }
    let mut line = String::new();
    std::io::stdin().lock().take(4096).read_line(&mut line)?;
    let key = line.trim();
    anyhow::ensure!(
        !key.is_empty(),
        "no unlock key on standard input: give the key `shoal swarm unlock-key` prints on a manager"
    );
    Ok(key.to_owned())
}

/// How far a CA rotation is, in words.
fn progress(r: &CaRotationView) -> String {
    let waiting = if r.pending.is_empty() {
        String::new()
    } else {
        format!(" (waiting for {})", r.pending.join(", "))
    };
    format!(
        "{} of {} nodes have a certificate under the new CA {}{waiting}",
        r.adopted, r.nodes, r.ca_fingerprint
    )
}

/// `swarm ca`: with `--rotate`, starts a rotation and (unless `detach`)
/// follows it until every node has a certificate under the new CA.
async fn swarm_ca(client: &Client, rotate: bool, detach: bool, quiet: bool) -> anyhow::Result<()> {
    let mut v: CaView = client.call_as(&Request::SwarmCa { rotate }).await?;
    if rotate && !detach {
        let target = v.rotation.as_ref().map(|r| r.ca_fingerprint.clone());
        let mut last = None;
        while let Some(r) = v
            .rotation
            .as_ref()
            .filter(|r| Some(&r.ca_fingerprint) == target.as_ref())
        {
            if !quiet && last != Some(r.adopted) {
                eprintln!("rotating the CA: {}", progress(r));
                last = Some(r.adopted);
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            v = client.call_as(&Request::SwarmCa { rotate: false }).await?;
        }
        if !quiet {
            eprintln!(
                "CA rotation finished: join tokens now pin CA {}",
                v.ca_fingerprint
            );
        }
    } else if let Some(r) = v.rotation.as_ref().filter(|_| !quiet) {
        eprintln!("CA rotation in progress: {}", progress(r));
    }
    print!("{}", v.ca_cert_pem);
    Ok(())
}
