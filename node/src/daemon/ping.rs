//! The managers' liveness loop: every [`PING_INTERVAL`] a manager pings
//! the other managers over the control protocol (a handful of nodes,
//! whatever the swarm's size: the workers are gossip's alone, see
//! [`super::liveness`]), then every node fetches or drops the managers'
//! key as its own role in the store says.
//!
//! ```text
//!  own role manager ──► ping the other managers ──► Liveness (heard)
//!  own role, key held ──► key_step() ──► Fetch from a manager | Drop | nothing
//! ```

use std::sync::Arc;
use std::time::Instant;

use shoal_mesh::{ClusterState, NodeId, Role};
use shoal_raft::StateHandle;

use super::identity::Secrets;
use super::liveness::{Liveness, PING_INTERVAL, PING_TIMEOUT};
use super::writer::Writer;
use shoal_mesh::wire::{CtlReply, CtlRequest};

/// What to do with the managers' key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStep {
    /// A manager without it: fetch it from another manager.
    Fetch,
    /// A worker (demoted) that still holds it: forget it.
    Drop,
}

/// The key step for a node whose role in the store is `role` (none while
/// the store does not name it) and that holds the key or not. Pure.
pub fn key_step(role: Option<Role>, holds_key: bool) -> Option<KeyStep> {
    match (role, holds_key) {
        (Some(Role::Manager), false) => Some(KeyStep::Fetch),
        (Some(Role::Worker), true) => Some(KeyStep::Drop),
        _ => None,
    }
}

/// What the loop uses.
pub struct PingCtx {
    /// This node.
    pub id: NodeId,
    /// The store.
    pub state: StateHandle,
    /// Control calls to other nodes.
    pub writer: Writer,
    /// Where answers are recorded.
    pub live: Arc<Liveness>,
    /// The managers' key.
    pub keys: Arc<Secrets>,
}

/// Runs until the task is aborted.
pub async fn run(ctx: PingCtx) {
    loop {
        round(&ctx).await;
        tokio::time::sleep(PING_INTERVAL).await;
    }
}

async fn round(ctx: &PingCtx) {
    let state = ctx.state.state();
    let mut round = tokio::task::JoinSet::new();
    let role = state.nodes.get(&ctx.id).map(|n| n.role);
    let peers = state
        .managers()
        .filter(|n| n.id != ctx.id && role == Some(Role::Manager));
    for node in peers {
        let (writer, live, id) = (ctx.writer.clone(), ctx.live.clone(), node.id);
        round.spawn(async move {
            if let Ok(CtlReply::Pong) = writer.ctl(id, &CtlRequest::Ping, PING_TIMEOUT).await {
                live.heard(id, Instant::now());
            }
        });
    }
    while round.join_next().await.is_some() {}
    match key_step(role, ctx.keys.get().is_some()) {
        Some(KeyStep::Fetch) => fetch_manager_key(ctx, &state).await,
        Some(KeyStep::Drop) => {
            if let Err(e) = ctx.keys.set(None) {
                tracing::warn!(error = %e, "cannot drop the manager key after demotion");
            }
        }
        None => {}
    }
}

async fn fetch_manager_key(ctx: &PingCtx, state: &ClusterState) {
    for m in state.managers().filter(|m| m.id != ctx.id) {
        if let Ok(CtlReply::ManagerKey(k)) = ctx
            .writer
            .ctl(m.id, &CtlRequest::ManagerKey, PING_TIMEOUT)
            .await
        {
            match ctx.keys.set(Some(k)) {
                Ok(()) => tracing::info!("received the managers' key after promotion"),
                Err(e) => tracing::warn!(error = %e, "cannot store the managers' key"),
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_promoted_node_fetches_the_key_and_a_demoted_one_drops_it() {
        assert_eq!(key_step(Some(Role::Manager), false), Some(KeyStep::Fetch));
        assert_eq!(key_step(Some(Role::Worker), true), Some(KeyStep::Drop));
        assert_eq!(key_step(Some(Role::Manager), true), None);
        assert_eq!(key_step(Some(Role::Worker), false), None);
        // Not in the store yet (joining): nothing either way.
        assert_eq!(key_step(None, true), None);
        assert_eq!(key_step(None, false), None);
    }
}
