//! The daemon's own state, whether or not it is in a swarm: its
//! configuration, state dir and hostname, and the running member. The API
//! handlers receive it; the member's loops never do.

use std::sync::Arc;

use super::config::DaemonConfig;
use super::identity::{Identity, StateDir};
use super::member::{Member, MemberConfig};

/// The daemon: its configuration and, when in a swarm, its member.
pub struct Daemon {
    /// Configuration.
    pub cfg: DaemonConfig,
    /// State dir.
    pub dir: StateDir,
    /// This node's hostname.
    pub hostname: String,
    /// The running member, if in a swarm. The lock also serializes
    /// init/join/leave.
    pub member: tokio::sync::Mutex<Option<Arc<Member>>>,
    /// Whether the node's keys are sealed and `swarm unlock` has not been
    /// given the key yet (autolock): then no member runs.
    pub locked: std::sync::atomic::AtomicBool,
    /// The container engine (containerd).
    pub engine: Arc<super::engine::Engine>,
}

pub const NOT_IN_SWARM: &str =
    "this node is not part of a swarm: run `shoal swarm init` or `shoal swarm join` first";

impl Daemon {
    /// Starts a member from a saved identity.
    pub async fn start_member(&self, identity: Identity) -> anyhow::Result<Arc<Member>> {
        let cfg = MemberConfig {
            timing: self.cfg.raft.timing(),
            gossip: self.cfg.gossip.config(),
            reschedule_grace: std::time::Duration::from_millis(
                self.cfg.orchestrator.reschedule_grace_ms,
            ),
            dataplane: self.cfg.dataplane.clone(),
            quota_bytes: (self.cfg.store.quota_mib as usize) << 20,
            engine: self.engine.clone(),
        };
        Member::start(identity, self.dir.clone(), cfg).await
    }

    /// Whether this node waits for `swarm unlock`.
    pub fn is_locked(&self) -> bool {
        self.locked.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Marks this node locked or unlocked.
    pub fn set_locked(&self, locked: bool) {
        self.locked
            .store(locked, std::sync::atomic::Ordering::SeqCst);
    }

    /// The running member, or the "not in a swarm" error, or why the
    /// member stopped on its own (`swarm leave` and `info` still reach it).
    pub async fn member(&self) -> anyhow::Result<Arc<Member>> {
        let m = self
            .member
            .lock()
            .await
            .clone()
            .ok_or_else(|| crate::api::ApiError::not_in_swarm(NOT_IN_SWARM))?;
        match m.failed() {
            Some(why) => Err(crate::api::ApiError::unavailable(why)),
            None => Ok(m),
        }
    }
}
