//! The leader's orchestrator loop: every half second (and on every store
//! change) it runs `mesh::orchestrator::orchestrate` over the local copy and
//! proposes what it returns. A node counts as gone once gossip has reported
//! it dead (or, for a node gossip never saw, the store-level pings have
//! failed) for the reschedule grace period ([`Downtime`], pure).
//!
//! ```text
//!  gossip members, ping status ──► Downtime::observe ──► live(node)?
//!  store ──► orchestrate(state, live, ids, now) ──► [Command] ──► propose
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_gossip::MemberState;
use shoal_mesh::orchestrator::orchestrate;
use shoal_mesh::{NodeId, Role};
use shoal_raft::StateHandle;

use super::clock::now_ms;
use super::gossip::{GossipCmd, GossipHandle};
use super::liveness::{Liveness, NodeStatus};
use super::writer::{Propose, Writer};

/// How often the leader's orchestrator looks, at most.
const INTERVAL: Duration = Duration::from_millis(500);
/// How often another manager's looks, besides on changes (it only keeps
/// how long nodes have been gone, for when it leads).
const FOLLOWER_INTERVAL: Duration = Duration::from_secs(5);

/// Since when each node has looked gone. Pure: fed observations and times.
#[derive(Debug, Default)]
pub struct Downtime {
    since: BTreeMap<NodeId, Instant>,
}

impl Downtime {
    /// Records what is seen at `now` of every node of the store (`nodes`):
    /// gone when gossip says dead or left, or, for a node gossip does not
    /// know, when the pings say down (`pinged_down`). This node (`me`)
    /// never is.
    pub fn observe(
        &mut self,
        me: NodeId,
        nodes: impl IntoIterator<Item = NodeId>,
        gossip: &BTreeMap<NodeId, MemberState>,
        pinged_down: impl Fn(NodeId) -> bool,
        now: Instant,
    ) {
        let mut seen = BTreeMap::new();
        for id in nodes {
            let down = match gossip.get(&id) {
                Some(state) => matches!(state, MemberState::Dead | MemberState::Left),
                None => id != me && pinged_down(id),
            };
            if down {
                seen.insert(id, self.since.get(&id).copied().unwrap_or(now));
            }
        }
        self.since = seen;
    }

    /// Whether `node` still counts as live at `now`: not gone, or gone for
    /// less than `grace`.
    pub fn live(&self, node: NodeId, now: Instant, grace: Duration) -> bool {
        self.since
            .get(&node)
            .is_none_or(|t| now.duration_since(*t) < grace)
    }
}

/// What the loop uses.
pub struct OrchestratorCtx {
    /// This node.
    pub id: NodeId,
    /// The store.
    pub state: StateHandle,
    /// Writes, and who leads.
    pub writer: Writer,
    /// Gossip's view of the members.
    pub gossip: GossipHandle,
    /// The store-level pings.
    pub live: Arc<Liveness>,
    /// How long a node is gone before its tasks move.
    pub grace: Duration,
}

/// Runs until the task is aborted.
pub async fn run(ctx: OrchestratorCtx) {
    let mut downtime = Downtime::default();
    let mut changes = ctx.state.changes();
    loop {
        changes.borrow_and_update();
        let manager = ctx.state.read(|d| {
            d.state
                .nodes
                .get(&ctx.id)
                .is_some_and(|n| n.role == Role::Manager)
        });
        if ctx.writer.is_leader() {
            let _ = tokio::time::timeout(INTERVAL, changes.changed()).await;
        } else if manager {
            tokio::select! {
                _ = changes.changed() => {}
                () = ctx.gossip.changed.notified() => {}
                () = tokio::time::sleep(FOLLOWER_INTERVAL) => {}
            }
        } else {
            // A worker never leads: nothing to keep until it is promoted.
            downtime = Downtime::default();
            let _ = changes.changed().await;
            continue;
        }
        let gossip: BTreeMap<NodeId, MemberState> = ctx
            .gossip
            .ask(GossipCmd::Members)
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|i| (i.node_id, i.state))
            .collect();
        let now = Instant::now();
        let nodes: Vec<NodeId> = ctx.state.read(|d| d.state.nodes.keys().copied().collect());
        let pinged_down = |id| ctx.live.status(id, now) == NodeStatus::Down;
        downtime.observe(ctx.id, nodes, &gossip, pinged_down, now);
        if !ctx.writer.is_leader() {
            continue;
        }
        let state = ctx.state.state();
        let live = |n: NodeId| downtime.live(n, now, ctx.grace);
        let mut new_id = || shoal_mesh::ids::to_hex(&rand::random::<[u8; 8]>());
        for cmd in orchestrate(&state, &live, &mut new_id, now_ms()) {
            if let Err(e) = ctx.writer.propose(cmd).await {
                tracing::debug!(error = %e, "orchestrator write refused; will retry");
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_gone_after_the_grace_from_when_it_first_looked_gone() {
        let (me, a, b) = (NodeId(1), NodeId(2), NodeId(3));
        let grace = Duration::from_secs(5);
        let t0 = Instant::now();
        let mut d = Downtime::default();
        let gossip = BTreeMap::from([(a, MemberState::Dead), (me, MemberState::Alive)]);
        // b is unknown to gossip: the pings decide; they say down.
        d.observe(me, [me, a, b], &gossip, |_| true, t0);
        assert!(d.live(a, t0 + Duration::from_secs(4), grace));
        assert!(!d.live(a, t0 + grace, grace));
        assert!(!d.live(b, t0 + grace, grace));
        assert!(d.live(me, t0 + grace, grace));
        // Seen again later: still counted from t0.
        d.observe(
            me,
            [me, a, b],
            &gossip,
            |_| true,
            t0 + Duration::from_secs(3),
        );
        assert!(!d.live(a, t0 + grace, grace));
        // a comes back (gossip alive) and b answers pings: live at once.
        let back = BTreeMap::from([(a, MemberState::Alive)]);
        d.observe(me, [me, a, b], &back, |_| false, t0 + grace);
        assert!(d.live(a, t0 + grace, grace) && d.live(b, t0 + grace, grace));
        // Gossip wins over pings where it knows the node; left counts as gone.
        let left = BTreeMap::from([(a, MemberState::Left), (b, MemberState::Alive)]);
        d.observe(me, [me, a, b], &left, |_| true, t0);
        assert!(!d.live(a, t0 + grace, grace));
        assert!(d.live(b, t0 + grace, grace));
        // A node the store forgot is forgotten here too.
        d.observe(me, [me, b], &left, |_| true, t0);
        assert!(d.live(a, t0 + grace, grace));
    }
}
