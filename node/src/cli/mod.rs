//! The command line: clap definitions, one file per command group.

mod daemon;
mod debug;
pub mod exec;
mod image;
mod network;
mod node;
mod output;
mod service;
mod swarm;
mod tool;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::api::{self, Reply, Request};

/// Shoal: a swarm mesh for container networking.
#[derive(Debug, Parser)]
#[command(name = "shoal", version, about)]
pub struct Cli {
    /// The local daemon's API socket.
    #[arg(
        long,
        global = true,
        env = "SHOAL_SOCKET",
        default_value = "/run/shoal/shoal.sock"
    )]
    socket: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

impl Cli {
    /// Parses the process's arguments (exits on bad ones, as clap does);
    /// notes whether `service create`'s positional part came after `--`,
    /// which clap does not keep.
    pub fn parse_args() -> Cli {
        let mut cli = <Cli as clap::Parser>::parse();
        if let Cmd::Service(service::ServiceCmd::Create(flags)) = &mut cli.command {
            let argv: Vec<String> = std::env::args_os()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            flags.dash_form = argv
                .iter()
                .position(|a| a == "--")
                .is_some_and(|i| !flags.image.is_empty() && argv[i + 1..] == flags.image[..]);
        }
        cli
    }
}

// Parsed once per run; boxing clap's variants would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the node agent.
    Daemon(daemon::DaemonArgs),
    /// Manage the swarm.
    #[command(subcommand)]
    Swarm(swarm::SwarmCmd),
    /// Manage the swarm's nodes.
    #[command(subcommand)]
    Node(node::NodeCmd),
    /// Manage networks.
    #[command(subcommand)]
    Network(network::NetworkCmd),
    /// Manage services.
    #[command(subcommand)]
    Service(service::ServiceCmd),
    /// Manage this node's images (in its containerd).
    #[command(subcommand)]
    Image(image::ImageCmd),
    /// Diagnostics.
    #[command(subcommand)]
    Debug(debug::DebugCmd),
    /// Run a command inside a running task's sandbox.
    Exec {
        /// Keep standard input open to the command (a container's).
        #[arg(short, long)]
        interactive: bool,
        /// Run the command on a terminal (a container's).
        #[arg(short, long)]
        tty: bool,
        /// Task ID, ID prefix, or SERVICE.SLOT.
        task: String,
        /// The command, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Built-in workloads and clients for demos and tests.
    #[command(subcommand)]
    Tool(tool::ToolCmd),
    /// Supervises one task's process (started by the daemon).
    #[command(hide = true)]
    TaskShim(crate::daemon::shim::ShimArgs),
    /// Show this node's swarm status.
    Info {
        /// Output format: `table` or `json`.
        #[arg(long, default_value = "table")]
        format: output::Format,
    },
}

impl Cli {
    /// Whether this run is a task shim.
    pub fn is_shim(&self) -> bool {
        matches!(self.command, Cmd::TaskShim(_))
    }

    /// Runs the command.
    pub async fn exec(self) -> anyhow::Result<()> {
        let socket = self.socket;
        match self.command {
            Cmd::Daemon(args) => args.exec(socket).await,
            Cmd::Exec {
                interactive,
                tty,
                task,
                command,
            } => {
                let how = exec::Streams { interactive, tty };
                exec::exec(&Client(socket), task, command, how).await
            }
            Cmd::Tool(cmd) => cmd.exec().await,
            Cmd::TaskShim(args) => crate::daemon::shim::run(args).await,
            Cmd::Swarm(cmd) => cmd.exec(&Client(socket)).await,
            Cmd::Node(cmd) => cmd.exec(&Client(socket)).await,
            Cmd::Debug(cmd) => cmd.exec(&Client(socket)).await,
            Cmd::Image(cmd) => cmd.exec(&Client(socket)).await,
            Cmd::Network(cmd) => cmd.exec(&Client(socket)).await,
            Cmd::Service(cmd) => cmd.exec(&Client(socket)).await,
            Cmd::Info { format } => {
                let data = Client(socket).call(&Request::Info).await?;
                output::print_object(&data, format);
                Ok(())
            }
        }
    }
}

/// Calls the daemon; prints warnings to stderr; turns a refusal into an error.
pub struct Client(pub PathBuf);

/// Fails with "N `what`" when some items failed: of their kind when they
/// all failed alike, else of none in particular.
/// The kind of a failed call (`Internal` for one the daemon did not classify).
fn kind_of(e: &anyhow::Error) -> api::ErrorKind {
    e.chain()
        .find_map(|c| c.downcast_ref::<api::ApiError>())
        .map_or(api::ErrorKind::Internal, |a| a.kind)
}

fn check_failures(failed: Vec<api::ErrorKind>, what: &str) -> anyhow::Result<()> {
    if let Some(first) = failed.first() {
        let same = failed.iter().all(|k| k == first);
        return Err(api::ApiError {
            kind: if same {
                *first
            } else {
                api::ErrorKind::Internal
            },
            message: format!("{} {what}", failed.len()),
        }
        .into());
    }
    Ok(())
}

/// Prints `inspect` results.
fn print_inspected<T: serde::Serialize>(found: &[T], format: output::Format) -> anyhow::Result<()> {
    match format {
        output::Format::Json => println!("{}", serde_json::to_string_pretty(found)?),
        output::Format::Table => {
            for v in found {
                output::print_object(&serde_json::to_value(v)?, format);
            }
        }
    }
    Ok(())
}

impl Client {
    /// One request per item, in order. Each failure is printed to stderr;
    /// returns the answers and the kinds of the failures.
    async fn call_each<T: serde::de::DeserializeOwned>(
        &self,
        items: Vec<String>,
        make: impl Fn(String) -> Request,
    ) -> (Vec<T>, Vec<api::ErrorKind>) {
        let mut answers = Vec::new();
        let mut failed = Vec::new();
        for item in items {
            match self.call_as(&make(item)).await {
                Ok(v) => answers.push(v),
                Err(e) => {
                    eprintln!("Error: {e:#}");
                    failed.push(kind_of(&e));
                }
            }
        }
        (answers, failed)
    }

    /// One request; its answer read as `T` (one of `crate::views`).
    async fn call_as<T: serde::de::DeserializeOwned>(&self, req: &Request) -> anyhow::Result<T> {
        let v = self.call(req).await?;
        serde_json::from_value(v).map_err(|e| {
            anyhow::anyhow!(
                "cannot read the daemon's answer ({e}): is the daemon the same version as this CLI?"
            )
        })
    }

    async fn call(&self, req: &Request) -> anyhow::Result<serde_json::Value> {
        let Reply {
            data,
            error,
            kind,
            warnings,
        } = api::call(&self.0, req).await?;
        for w in warnings {
            eprintln!("Warning: {w}");
        }
        match error {
            Some(message) => Err(api::ApiError {
                kind: kind.unwrap_or(api::ErrorKind::Internal),
                message,
            }
            .into()),
            None => Ok(data.unwrap_or(serde_json::Value::Null)),
        }
    }
}
