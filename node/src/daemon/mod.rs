//! `shoal daemon`: the long-running node agent. It serves the local API on a
//! Unix socket and, once the node is part of a swarm, runs a [`member::Member`].

pub mod agent;
pub mod archive;
pub mod autolock;
pub mod ca;
pub mod clock;
pub mod commands;
pub mod config;
pub mod containers;
pub mod dataplane;
pub mod engine;
pub mod entry_keys;
pub mod executor;
pub mod feed;
pub mod gate;
pub mod gateway;
pub mod gossip;
pub mod health;
pub mod identity;
pub mod images;
pub mod kinds;
pub mod liveness;
pub mod member;
pub mod membership;
pub mod networks;
pub mod oci;
pub mod orchestrate;
pub mod peer;
pub mod ping;
pub mod pki;
pub mod poison;
pub mod quota;
pub mod recovery;
pub mod registry;
pub mod renewal;
pub mod sandboxes;
pub mod services;
pub mod shim;
pub mod transport;
pub mod trust;
pub mod unlock;
pub mod writer;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::api::{MAX_REQUEST, Reply, Request};
use agent::Daemon;
use config::DaemonConfig;
use identity::StateDir;

fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(mut cfg: DaemonConfig) -> anyhow::Result<()> {
    cfg.validate()?;
    if cfg.dataplane.enabled && executor::is_root() {
        let gw = gateway::resolve(cfg.dataplane.gateway_subnet.as_deref())
            .await
            .context("refusing to start")?;
        tracing::info!(subnet = %gw, "gateway subnet");
        cfg.dataplane.gateway_subnet = Some(gw.to_string());
    }
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("cannot create state dir {}", cfg.state_dir.display()))?;
    std::fs::set_permissions(&cfg.state_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot set permissions on {}", cfg.state_dir.display()))?;
    let dir = StateDir(cfg.state_dir.clone());
    let (identity, locked) = match dir.load() {
        Ok(identity) => (identity, false),
        Err(identity::IdentityError::Locked) => (None, true),
        Err(e) => return Err(anyhow::Error::from(e).context(
            "refusing to start: the state dir is damaged (restore it from a backup, or remove it to start afresh)",
        )),
    };
    let hostname = cfg.hostname.clone().unwrap_or_else(system_hostname);
    let registries =
        registry::Registries::new(&cfg.insecure_registries, cfg.registry_auth_file.as_deref())?;
    let daemon = Arc::new(Daemon {
        cfg: cfg.clone(),
        dir,
        hostname,
        member: tokio::sync::Mutex::new(None),
        locked: locked.into(),
        engine: Arc::new(engine::Engine::new(&cfg.containerd_socket).with_registries(registries)),
    });
    if locked {
        tracing::warn!(
            "this manager is locked (autolock): it serves nothing until `shoal swarm unlock` is given the unlock key"
        );
    }
    if let Some(identity) = identity {
        let id = identity.node.node_id;
        let member = daemon
            .start_member(identity)
            .await
            .context("refusing to start: cannot open this node's swarm state")?;
        tracing::info!(node = %id, "rejoined the swarm from saved state");
        *daemon.member.lock().await = Some(member);
    }
    let listener = bind_socket(&cfg.socket).await?;
    tracing::info!(socket = %cfg.socket.display(), state_dir = %cfg.state_dir.display(), "shoal daemon ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let d = daemon.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_client(d, stream).await {
                        tracing::debug!(error = %e, "api client");
                    }
                });
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    tracing::info!("shutting down");
    if let Some(m) = daemon.member.lock().await.take() {
        m.shutdown().await;
    }
    let _ = std::fs::remove_file(&cfg.socket);
    Ok(())
}

async fn bind_socket(path: &std::path::Path) -> anyhow::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            anyhow::bail!(
                "another shoal daemon is already serving {}; stop it or choose another --socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

async fn serve_client(daemon: Arc<Daemon>, stream: UnixStream) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_REQUEST as u64))
        .read_line(&mut line)
        .await?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(req) => commands::handle(&daemon, req).await,
        Err(e) => Reply::err(crate::api::ErrorKind::Invalid, format!("bad request: {e}")),
    };
    let mut out = serde_json::to_vec(&reply)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    Ok(())
}
