//! `shoal daemon`.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::daemon::config::DaemonConfig;

/// Flags of `shoal daemon`; each overrides the same key of `--config`.
#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    /// A TOML file with the same keys as these flags (state_dir, socket, …).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where the node keeps its identity, keys and store [default: /var/lib/shoal].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// QUIC listen address (UDP) [default: 0.0.0.0:2377].
    #[arg(long)]
    listen_addr: Option<SocketAddr>,
    /// The address other nodes dial: IP or IP:PORT.
    #[arg(long)]
    advertise_addr: Option<String>,
    /// This node's name [default: the system's hostname].
    #[arg(long)]
    hostname: Option<String>,
    /// Log level or tracing filter [default: info].
    #[arg(long)]
    log_level: Option<String>,
    /// Do not program overlays and sandboxes (tasks get bare namespaces).
    #[arg(long)]
    no_dataplane: bool,
    /// Prefix of this node's network namespace names [default: shoal-<node ID>-].
    #[arg(long)]
    netns_prefix: Option<String>,
    /// VXLAN UDP port [default: 4789].
    #[arg(long)]
    data_path_port: Option<u16>,
    /// containerd's API socket [default: /run/containerd/containerd.sock].
    #[arg(long)]
    containerd_socket: Option<PathBuf>,
    /// A registry to pull from over plain HTTP, HOST[:PORT] (repeatable).
    #[arg(long)]
    insecure_registry: Vec<String>,
    /// Registry credentials: a docker-style config.json.
    #[arg(long)]
    registry_auth_file: Option<PathBuf>,
}

impl DaemonArgs {
    /// Merges flags over the file and runs the daemon.
    pub async fn exec(self, socket: PathBuf) -> anyhow::Result<()> {
        let mut cfg = match &self.config {
            Some(p) => DaemonConfig::load(p)?,
            None => DaemonConfig::default(),
        };
        // --socket is global; it overrides the file only when given.
        let socket_given = std::env::args().any(|a| a == "--socket" || a.starts_with("--socket="))
            || std::env::var_os("SHOAL_SOCKET").is_some();
        if socket_given || self.config.is_none() {
            cfg.socket = socket;
        }
        if let Some(v) = self.state_dir {
            cfg.state_dir = v;
        }
        if let Some(v) = self.listen_addr {
            cfg.listen_addr = v;
        }
        if let Some(v) = self.advertise_addr {
            cfg.advertise_addr = Some(v);
        }
        if let Some(v) = self.hostname {
            cfg.hostname = Some(v);
        }
        if let Some(v) = self.log_level {
            cfg.log_level = v;
        }
        if self.no_dataplane {
            cfg.dataplane.enabled = false;
        }
        if let Some(v) = self.netns_prefix {
            cfg.dataplane.netns_prefix = Some(v);
        }
        if let Some(v) = self.data_path_port {
            cfg.dataplane.data_path_port = v;
        }
        if let Some(v) = self.containerd_socket {
            cfg.containerd_socket = v;
        }
        cfg.insecure_registries.extend(self.insecure_registry);
        if let Some(v) = self.registry_auth_file {
            cfg.registry_auth_file = Some(v);
        }
        let filter = tracing_subscriber::EnvFilter::try_new(format!(
            "{},openraft=warn,quinn=warn,rustls=warn",
            cfg.log_level
        ))
        .map_err(|e| anyhow::anyhow!("invalid --log-level `{}`: {e}", cfg.log_level))?;
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
        crate::daemon::run(cfg).await
    }
}
