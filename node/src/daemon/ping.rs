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

/// Runs until the task is aborted. A manager pings every
/// [`PING_INTERVAL`]; a worker only looks again when the store changes (a
/// promotion or demotion is a change of the store), so an idle worker does
/// not wake for this loop at all.
pub async fn run(ctx: PingCtx) {
    let mut changes = ctx.state.changes();
    loop {
        changes.borrow_and_update();
        let manager = round(&ctx).await;
        if manager {
            tokio::time::sleep(PING_INTERVAL).await;
        } else if changes.changed().await.is_err() {
            return;
        }
    }
}

/// This node's role in the store and the other managers' IDs, read under
/// the store's lock (not a copy of the whole store: a few nodes out of
/// however many there are).
fn managers_seen_by(state: &ClusterState, me: NodeId) -> (Option<Role>, Vec<NodeId>) {
    let role = state.nodes.get(&me).map(|n| n.role);
    let others = state
        .managers()
        .filter(|n| n.id != me)
        .map(|n| n.id)
        .collect();
    (role, others)
}

/// One round; whether this node is a manager.
async fn round(ctx: &PingCtx) -> bool {
    let (role, managers) = ctx.state.read(|d| managers_seen_by(&d.state, ctx.id));
    let mut round = tokio::task::JoinSet::new();
    if role == Some(Role::Manager) {
        for id in managers.iter().copied() {
            let (writer, live) = (ctx.writer.clone(), ctx.live.clone());
            round.spawn(async move {
                if let Ok(CtlReply::Pong) = writer.ctl(id, &CtlRequest::Ping, PING_TIMEOUT).await {
                    live.heard(id, Instant::now());
                }
            });
        }
    }
    while round.join_next().await.is_some() {}
    match key_step(role, ctx.keys.get().is_some()) {
        Some(KeyStep::Fetch) => fetch_manager_key(ctx, &managers).await,
        Some(KeyStep::Drop) => {
            if let Err(e) = ctx.keys.set(None) {
                tracing::warn!(error = %e, "cannot drop the manager key after demotion");
            }
        }
        None => {}
    }
    role == Some(Role::Manager)
}

async fn fetch_manager_key(ctx: &PingCtx, managers: &[NodeId]) {
    for &m in managers {
        if let Ok(CtlReply::ManagerKey(k)) = ctx
            .writer
            .ctl(m, &CtlRequest::ManagerKey, PING_TIMEOUT)
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

    #[test]
    fn each_node_sees_its_role_and_the_other_managers() {
        let s = shoal_mesh::fixtures::swarm(&[
            (1, Role::Manager),
            (2, Role::Manager),
            (3, Role::Worker),
        ]);
        let ids = |v: &[u64]| v.iter().map(|i| NodeId(*i)).collect::<Vec<_>>();
        assert_eq!(
            managers_seen_by(&s, NodeId(1)),
            (Some(Role::Manager), ids(&[2]))
        );
        assert_eq!(
            managers_seen_by(&s, NodeId(3)),
            (Some(Role::Worker), ids(&[1, 2]))
        );
        assert_eq!(managers_seen_by(&s, NodeId(9)), (None, ids(&[1, 2])));
    }
}
