//! The leader's orchestrator loop: every half second (and on every store
//! change) it runs `mesh::orchestrator::orchestrate` over the local copy and
//! proposes what it returns. A node counts as gone once gossip has reported
//! it dead (or, for a node gossip never saw, the store-level pings have
//! failed) for the reschedule grace period.

use std::collections::BTreeMap;
use std::sync::Weak;
use std::time::{Duration, Instant};

use shoal_gossip::MemberState;
use shoal_mesh::NodeId;
use shoal_mesh::orchestrator::orchestrate;

use super::gossip::GossipCmd;
use super::member::Member;
use super::peer::now_ms;

/// How often the orchestrator looks, at most.
const INTERVAL: Duration = Duration::from_millis(500);

pub(super) async fn orchestrator_loop(member: Weak<Member>, grace: Duration) {
    let mut dead_since: BTreeMap<NodeId, Instant> = BTreeMap::new();
    let mut changes = match member.upgrade() {
        Some(m) => m.state.changes(),
        None => return,
    };
    loop {
        let _ = tokio::time::timeout(INTERVAL, changes.changed()).await;
        let Some(m) = member.upgrade() else { return };
        let gossip: BTreeMap<NodeId, MemberState> = m
            .gossip
            .ask(GossipCmd::Members)
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|i| (i.node_id, i.state))
            .collect();
        let now = Instant::now();
        // Gone: gossip says dead or left; or gossip never saw the node and
        // the store-level pings fail.
        let node_ids: Vec<NodeId> = m.state.read(|d| d.state.nodes.keys().copied().collect());
        for id in node_ids {
            let down = match gossip.get(&id) {
                Some(state) => matches!(state, MemberState::Dead | MemberState::Left),
                None => id != m.id && m.status(id) == super::liveness::NodeStatus::Down,
            };
            if down {
                dead_since.entry(id).or_insert(now);
            } else {
                dead_since.remove(&id);
            }
        }
        if m.leader() != Some(m.id) {
            continue;
        }
        let state = m.state.state();
        let live = |n: NodeId| {
            dead_since
                .get(&n)
                .is_none_or(|t| now.duration_since(*t) < grace)
        };
        let mut new_id = || shoal_mesh::ids::to_hex(&rand::random::<[u8; 8]>());
        for cmd in orchestrate(&state, &live, &mut new_id, now_ms()) {
            if let Err(e) = m.propose(cmd).await {
                tracing::debug!(error = %e, "orchestrator write refused; will retry");
                break;
            }
        }
    }
}
