//! The leader's orchestrator loop: on every store change, every change of
//! gossip's members, and when the next delay it waits on runs out (a
//! restart delay, a stop timeout, an update delay, a node's grace; at
//! least every 5 s), it runs `mesh::orchestrator::orchestrate_due` over the
//! local copy and proposes what it returns. A node counts as gone once
//! gossip has reported it dead (or, for a node gossip never saw, the
//! store-level pings have failed) for the reschedule grace period
//! ([`Downtime`], pure), unless the leader's own ping reaches it meanwhile:
//! the leader confirms gossip's verdict before tasks move, so a node that
//! only some peers cannot reach keeps its tasks.
//!
//! ```text
//!  gossip members, ping status ──► Downtime::observe ──► live(node)?
//!        gone, within the grace ──► the leader pings it ──► Liveness::heard
//!  store ──► orchestrate_due(state, live, ids, now) ──► [Command] ──► propose
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_gossip::MemberState;
use shoal_mesh::orchestrator::orchestrate_due;
use shoal_mesh::wire::{CtlReply, CtlRequest};
use shoal_mesh::{NodeId, Role};
use shoal_raft::StateHandle;

use super::clock::now_ms;
use super::gossip::{GossipCmd, GossipHandle};
use super::liveness::{Liveness, NodeStatus, PING_TIMEOUT};
use super::writer::{Propose, Writer};

/// How soon the leader's orchestrator looks again after a write failed.
const RETRY: Duration = Duration::from_millis(500);
/// How often the leader's orchestrator looks with nothing waking it.
const AUDIT: Duration = Duration::from_secs(5);
/// Confirmation pings the leader has in flight at most.
const CONFIRMS_MAX: usize = 64;
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
    /// gone when gossip says dead or left and it did not answer this
    /// node's ping lately (`answered`), or, for a node gossip does not
    /// know, when the pings say down (`pinged_down`). This node (`me`)
    /// never is.
    pub fn observe(
        &mut self,
        me: NodeId,
        nodes: impl IntoIterator<Item = NodeId>,
        gossip: &BTreeMap<NodeId, MemberState>,
        answered: impl Fn(NodeId) -> bool,
        pinged_down: impl Fn(NodeId) -> bool,
        now: Instant,
    ) {
        let mut seen = BTreeMap::new();
        for id in nodes {
            let down = match gossip.get(&id) {
                Some(state) => {
                    matches!(state, MemberState::Dead | MemberState::Left) && !answered(id)
                }
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

    /// The nodes that look gone but are still within their `grace` at
    /// `now` (the leader confirms these), and how long until the first of
    /// them is gone.
    pub fn in_grace(&self, now: Instant, grace: Duration) -> (Vec<NodeId>, Option<Duration>) {
        let mut first: Option<Duration> = None;
        let mut nodes = Vec::new();
        for (id, since) in &self.since {
            let left = grace.saturating_sub(now.saturating_duration_since(*since));
            if left > Duration::ZERO {
                nodes.push(*id);
                first = Some(first.map_or(left, |f| f.min(left)));
            }
        }
        (nodes, first)
    }
}

/// How long the leader's orchestrator sleeps when nothing wakes it: until
/// the orchestrator's next delay (`due_ms`, on the clock of `now_ms`) or a
/// node's grace (`gone_in`) runs out, at most [`AUDIT`]; [`RETRY`] after a
/// write failed. Pure.
pub fn leader_wait(
    now_ms: u64,
    due_ms: Option<u64>,
    gone_in: Option<Duration>,
    failed: bool,
) -> Duration {
    if failed {
        return RETRY;
    }
    // A little past a deadline: the orchestrator acts once it has passed.
    let due = due_ms.map(|d| Duration::from_millis(d.saturating_sub(now_ms) + 5));
    [due, gone_in.map(|g| g + Duration::from_millis(5))]
        .into_iter()
        .flatten()
        .fold(AUDIT, Duration::min)
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
    /// The store-level pings (the leader's confirmations are recorded
    /// there too).
    pub live: Arc<Liveness>,
    /// How long a node is gone before its tasks move.
    pub grace: Duration,
}

/// Runs until the task is aborted.
pub async fn run(ctx: OrchestratorCtx) {
    let mut downtime = Downtime::default();
    let mut changes = ctx.state.changes();
    let confirming = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let mut wait = Duration::ZERO;
    loop {
        // Registered first, so that a change of members meanwhile wakes it.
        let members = ctx.gossip.members_changed.notified();
        tokio::pin!(members);
        members.as_mut().enable();
        changes.borrow_and_update();
        let manager = ctx.state.read(|d| {
            d.state
                .nodes
                .get(&ctx.id)
                .is_some_and(|n| n.role == Role::Manager)
        });
        let pause = if ctx.writer.is_leader() {
            wait
        } else if manager {
            FOLLOWER_INTERVAL
        } else {
            // A worker never leads: nothing to keep until it is promoted.
            downtime = Downtime::default();
            let _ = changes.changed().await;
            continue;
        };
        tokio::select! {
            _ = changes.changed() => {}
            () = members => {}
            () = tokio::time::sleep(pause) => {}
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
        let answered = |id| ctx.live.answered(id, now);
        let pinged_down = |id| ctx.live.status(id, now) == NodeStatus::Down;
        downtime.observe(ctx.id, nodes, &gossip, answered, pinged_down, now);
        if !ctx.writer.is_leader() {
            wait = Duration::ZERO;
            continue;
        }
        let (gone_soon, gone_in) = downtime.in_grace(now, ctx.grace);
        confirm(&ctx, gone_soon, &confirming);
        let live = |n: NodeId| downtime.live(n, now, ctx.grace);
        let mut new_id = || shoal_mesh::ids::to_hex(&rand::random::<[u8; 8]>());
        let now_ms = now_ms();
        // Planned under the store's read lock rather than on a copy: a
        // copy of 150 000 tasks costs as much as the pass itself
        // (`cargo bench -p shoal-mesh --bench leader`), on every change.
        let (cmds, due) = ctx
            .state
            .read(|d| orchestrate_due(&d.state, &live, &mut new_id, now_ms));
        let mut failed = false;
        for cmd in cmds {
            if let Err(e) = ctx.writer.propose(cmd).await {
                tracing::debug!(error = %e, "orchestrator write refused; will retry");
                failed = true;
                break;
            }
        }
        wait = leader_wait(now_ms, due, gone_in, failed);
    }
}

/// The leader pings each node gossip has gone that is still within its
/// grace (one ping per node at a time, [`CONFIRMS_MAX`] at most): an
/// answer keeps it live ([`Liveness::heard`]), and `node ls` on the leader
/// shows it ready.
fn confirm(
    ctx: &OrchestratorCtx,
    nodes: Vec<NodeId>,
    confirming: &Arc<std::sync::Mutex<std::collections::BTreeSet<NodeId>>>,
) {
    let Ok(mut busy) = confirming.lock() else {
        return;
    };
    for node in nodes.into_iter().filter(|n| *n != ctx.id) {
        if busy.len() >= CONFIRMS_MAX || !busy.insert(node) {
            continue;
        }
        let (writer, live, busy) = (ctx.writer.clone(), ctx.live.clone(), confirming.clone());
        tokio::spawn(async move {
            let ping = writer.ctl(node, &CtlRequest::Ping, PING_TIMEOUT).await;
            if let Ok(CtlReply::Pong) = ping {
                tracing::info!(%node, "gossip has it dead, yet it answers the leader: kept");
                live.heard(node, Instant::now());
            }
            if let Ok(mut b) = busy.lock() {
                b.remove(&node);
            }
        });
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
        d.observe(me, [me, a, b], &gossip, |_| false, |_| true, t0);
        assert!(d.live(a, t0 + Duration::from_secs(4), grace));
        assert!(!d.live(a, t0 + grace, grace));
        assert!(!d.live(b, t0 + grace, grace));
        assert!(d.live(me, t0 + grace, grace));
        // Seen again later: still counted from t0.
        d.observe(
            me,
            [me, a, b],
            &gossip,
            |_| false,
            |_| true,
            t0 + Duration::from_secs(3),
        );
        assert!(!d.live(a, t0 + grace, grace));
        // a comes back (gossip alive) and b answers pings: live at once.
        let back = BTreeMap::from([(a, MemberState::Alive)]);
        d.observe(me, [me, a, b], &back, |_| false, |_| false, t0 + grace);
        assert!(d.live(a, t0 + grace, grace) && d.live(b, t0 + grace, grace));
        // Gossip wins over pings where it knows the node; left counts as gone.
        let left = BTreeMap::from([(a, MemberState::Left), (b, MemberState::Alive)]);
        d.observe(me, [me, a, b], &left, |_| false, |_| true, t0);
        assert!(!d.live(a, t0 + grace, grace));
        assert!(d.live(b, t0 + grace, grace));
        // Gossip has it dead but it answered the leader's ping: not gone.
        let mut c = Downtime::default();
        c.observe(me, [me, a], &gossip, |n| n == a, |_| true, t0);
        assert!(c.live(a, t0 + grace * 2, grace));
        // A node the store forgot is forgotten here too.
        d.observe(me, [me, b], &left, |_| false, |_| true, t0);
        assert!(d.live(a, t0 + grace, grace));
    }

    #[test]
    fn the_leader_confirms_nodes_in_their_grace_and_sleeps_until_the_first_deadline() {
        let (me, a, b) = (NodeId(1), NodeId(2), NodeId(3));
        let grace = Duration::from_secs(5);
        let t0 = Instant::now();
        let mut d = Downtime::default();
        let dead = BTreeMap::from([(a, MemberState::Dead), (b, MemberState::Alive)]);
        d.observe(me, [me, a, b], &dead, |_| false, |_| false, t0);
        let s = Duration::from_secs;
        assert_eq!(d.in_grace(t0 + s(1), grace), (vec![a], Some(s(4))));
        // Past its grace: gone, nothing left to confirm.
        assert_eq!(d.in_grace(t0 + grace, grace), (vec![], None));
        // Sleep until the first of the orchestrator's delay and a grace.
        let ms = Duration::from_millis;
        assert_eq!(
            leader_wait(1_000, Some(3_000), Some(s(4)), false),
            ms(2_005)
        );
        assert_eq!(
            leader_wait(1_000, Some(9_000), Some(s(1)), false),
            ms(1_005)
        );
        assert_eq!(leader_wait(1_000, None, None, false), AUDIT);
        assert_eq!(leader_wait(1_000, Some(60_000), None, false), AUDIT);
        assert_eq!(leader_wait(1_000, Some(500), None, false), ms(5));
        assert_eq!(leader_wait(1_000, None, None, true), RETRY);
    }
}
