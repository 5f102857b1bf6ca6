//! A worker's copy of the store, fed by a manager (`shoal_raft::feed`):
//! workers are not Raft members, so the leader sends them nothing; each
//! asks one manager — a follower when there is one, chosen by a hash of
//! its ID so workers spread over the managers — for what was committed
//! after what it holds, and waits there (a long poll) for the next change.
//! Idle, a worker sends one request per [`POLL`].
//!
//! ```text
//!  store (managers, roles) ─┐
//!  Liveness (not down)     ─┼─► sources() ─► ask one ─► shoal_raft::feed::take ─► Raft (local log, state machine)
//!  Raft (leader)           ─┘      ▲ another when it fails, or SWIM says it is down
//! ```

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_mesh::wire::{ALPN_CTL, CtlReply, CtlRequest};
use shoal_mesh::{ClusterState, NodeId, Role, codec};
use shoal_raft::feed::{FeedReply, FeedRequest, TakeError};
use shoal_raft::{LogStore, Raft, StateHandle};

use super::liveness::{Liveness, NodeStatus};
use super::transport::{MAX_MESSAGE, Quic};

/// How long a manager holds a request with nothing new.
pub const POLL: Duration = Duration::from_secs(25);
/// The pause before asking again after a failure.
const RETRY: Duration = Duration::from_millis(500);

/// Whether node `me` keeps its store from the feed: every node but a
/// manager that Raft's membership (`in_raft`, as this node knows it)
/// lists, which the leader replicates to. A node the store does not list
/// yet (it has just joined), and a new manager until it sees itself
/// added to Raft, are fed: no gap between the two. Pure.
pub fn fed(state: &ClusterState, me: NodeId, in_raft: bool) -> bool {
    !(in_raft
        && state
            .nodes
            .get(&me)
            .is_some_and(|n| n.role == Role::Manager))
}

/// The managers node `me` may ask, in the order to try them: those
/// `usable` (not down) but the leader, ordered by a hash of (`me`, manager) so that
/// workers spread evenly over them, then the leader; with none in the
/// store (it has not arrived yet), the one that admitted `me`. Pure.
pub fn sources(
    state: &ClusterState,
    me: NodeId,
    leader: Option<NodeId>,
    usable: impl Fn(NodeId) -> bool,
    join_via: Option<(NodeId, SocketAddr)>,
) -> Vec<(NodeId, SocketAddr)> {
    let rank = |m: NodeId| {
        let mut h = std::hash::DefaultHasher::new();
        (me, m).hash(&mut h);
        h.finish()
    };
    let mut managers: Vec<(bool, u64, NodeId, SocketAddr)> = state
        .managers()
        .filter(|n| n.id != me && usable(n.id))
        .filter_map(|n| {
            let addr = n.addr.parse().ok()?;
            Some((Some(n.id) == leader, rank(n.id), n.id, addr))
        })
        .collect();
    managers.sort();
    let out: Vec<(NodeId, SocketAddr)> =
        managers.into_iter().map(|(_, _, id, a)| (id, a)).collect();
    if out.is_empty() && state.managers().next().is_none() {
        return join_via.into_iter().collect();
    }
    out
}

/// What the loop uses.
pub struct FeedCtx {
    /// This node.
    pub id: NodeId,
    /// Its Raft node, which takes what the feed brings.
    pub raft: Raft,
    /// Its log (where the first request starts: what it committed before).
    pub log: LogStore,
    /// The store (who the managers are; whether this node is one).
    pub state: StateHandle,
    /// For the requests.
    pub quic: Arc<Quic>,
    /// Which managers are up.
    pub live: Arc<Liveness>,
    /// Woken when gossip's view of the members changes.
    pub members_changed: Arc<tokio::sync::Notify>,
    /// The manager that admitted this node, and where.
    pub join_via: Option<(NodeId, SocketAddr)>,
}

/// A manager's feed reply with its clock when it sent it (ms since the
/// epoch), so that a worker sees how far its own clock is.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Stamped {
    /// The manager's clock.
    pub now_ms: u64,
    /// The reply.
    pub reply: FeedReply,
}

/// Runs until the task is aborted.
pub async fn run(ctx: FeedCtx) {
    let mut after = first_after(&ctx).await;
    let mut attempt = 0usize;
    let mut serving: Option<NodeId> = None;
    let mut changes = ctx.state.changes();
    loop {
        changes.borrow_and_update();
        let in_raft = {
            let metrics = ctx.raft.metrics();
            let m = metrics.borrow();
            m.membership_config
                .membership()
                .get_node(&ctx.id.0)
                .is_some()
        };
        if !ctx.state.read(|d| fed(&d.state, ctx.id, in_raft)) {
            // A manager Raft replicates to. Look again when the store
            // changes (a demotion; a membership entry applied).
            serving = None;
            if changes.changed().await.is_err() {
                return;
            }
            after = ctx.raft.metrics().borrow().last_applied;
            continue;
        }
        let leader = ctx.raft.metrics().borrow().current_leader.map(NodeId);
        let now = Instant::now();
        let list = ctx.state.read(|d| {
            sources(
                &d.state,
                ctx.id,
                leader,
                |m| ctx.live.status(m, now) != NodeStatus::Down,
                ctx.join_via,
            )
        });
        let Some(&(source, addr)) = list.get(attempt % list.len().max(1)) else {
            tokio::time::sleep(RETRY).await;
            continue;
        };
        if serving != Some(source) {
            tracing::info!(manager = %source, "the store's feed comes from a manager");
            serving = Some(source);
        }
        match ask(&ctx, source, addr, after).await {
            Ok(reply) => match shoal_raft::feed::take(&ctx.raft, after, reply).await {
                Ok(a) => {
                    // Caught up with something new: let more commit before
                    // asking again (`PACE`); still catching up: at once.
                    let brought = a
                        .map_or(0, |l| l.index + 1)
                        .saturating_sub(after.map_or(0, |l| l.index + 1));
                    after = a;
                    if brought > 0 && brought < shoal_raft::feed::MAX_ENTRIES as u64 {
                        tokio::time::sleep(shoal_raft::feed::PACE).await;
                    }
                }
                Err(TakeError::Conflict) => {
                    tracing::warn!(manager = %source, "the feed does not follow this node's log; asking for it whole");
                    after = None;
                }
                Err(TakeError::OwnVote) => {
                    // This node leads (its Raft's view of its membership
                    // had not loaded yet): Raft is its source.
                    let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
                }
                Err(e) => {
                    tracing::debug!(manager = %source, error = %e, "feed not taken; asking another manager");
                    attempt += 1;
                    serving = None;
                    tokio::time::sleep(RETRY).await;
                }
            },
            Err(e) => {
                tracing::debug!(manager = %source, error = %e, "feed request failed; asking another manager");
                attempt += 1;
                serving = None;
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// Where a (re)started node asks from: the last entry it knew committed
/// (durable in its log), or what it applied if that is later. Not from its
/// snapshot, which would have a manager send again what the log holds.
async fn first_after(ctx: &FeedCtx) -> Option<openraft::LogId<u64>> {
    use openraft::storage::RaftLogStorage;
    let applied = ctx.raft.metrics().borrow().last_applied;
    let committed = ctx.log.clone().read_committed().await.ok().flatten();
    applied.max(committed)
}

/// One long poll to manager `source`, abandoned as soon as SWIM says it is
/// down.
async fn ask(
    ctx: &FeedCtx,
    source: NodeId,
    addr: SocketAddr,
    after: Option<openraft::LogId<u64>>,
) -> Result<FeedReply, String> {
    let req = FeedRequest {
        after,
        wait_ms: POLL.as_millis() as u32,
    };
    let bytes = codec::encode(&CtlRequest::Feed(
        codec::encode(&req).map_err(|e| e.to_string())?,
    ))
    .map_err(|e| e.to_string())?;
    let call = ctx.quic.call(
        addr,
        source,
        ALPN_CTL,
        &bytes,
        POLL + Duration::from_secs(5),
    );
    let reply = tokio::select! {
        r = call => r.map_err(|e| e.to_string())?,
        () = down(ctx, source) => return Err(format!("manager {source} is down")),
    };
    match codec::decode::<CtlReply>(&reply, MAX_MESSAGE).map_err(|e| e.to_string())? {
        CtlReply::Feed(bytes) => {
            let s: Stamped = codec::decode(&bytes, MAX_MESSAGE).map_err(|e| e.to_string())?;
            ctx.live
                .clock_sample(source, s.now_ms, super::clock::now_ms());
            Ok(s.reply)
        }
        CtlReply::Refused(why) => Err(why),
        other => Err(format!("unexpected reply {other:?}")),
    }
}

/// Resolves once SWIM no longer has `node` ready.
async fn down(ctx: &FeedCtx, node: NodeId) {
    loop {
        let changed = ctx.members_changed.notified();
        if ctx.live.status(node, Instant::now()) == NodeStatus::Down {
            return;
        }
        changed.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(nodes: &[(u64, Role)]) -> ClusterState {
        shoal_mesh::fixtures::swarm(nodes)
    }

    #[test]
    fn managers_are_replicated_to_and_every_other_node_is_fed() {
        let s = state(&[(1, Role::Manager), (2, Role::Worker)]);
        assert!(!fed(&s, NodeId(1), true));
        // A manager Raft has not added yet.
        assert!(fed(&s, NodeId(1), false));
        assert!(fed(&s, NodeId(2), false));
        // A demoted manager still in Raft's membership, for a moment.
        assert!(fed(&s, NodeId(2), true));
        // Just joined: not in its store yet.
        assert!(fed(&ClusterState::default(), NodeId(3), false));
    }

    #[test]
    fn workers_ask_followers_spread_by_hash_and_the_leader_last() {
        let s = state(&[
            (1, Role::Manager),
            (2, Role::Manager),
            (3, Role::Manager),
            (4, Role::Worker),
        ]);
        let all = |_| true;
        let list = sources(&s, NodeId(4), Some(NodeId(1)), all, None);
        assert_eq!(list.len(), 3);
        assert_eq!(list[2].0, NodeId(1), "{list:?}");
        assert_eq!(list[2].1, "127.0.0.1:2377".parse().unwrap());
        // A manager that is down is not asked.
        let list = sources(&s, NodeId(4), Some(NodeId(1)), |m| m != NodeId(2), None);
        assert_eq!(
            list.iter().map(|l| l.0).collect::<Vec<_>>(),
            vec![NodeId(3), NodeId(1)]
        );
        // Over many workers, the first choices spread over both followers.
        let mut first = std::collections::BTreeMap::new();
        for w in 100..400 {
            let list = sources(&s, NodeId(w), Some(NodeId(1)), all, None);
            *first.entry(list[0].0).or_insert(0) += 1;
        }
        assert_eq!(first.len(), 2, "{first:?}");
        assert!(first.values().all(|n| *n > 100), "{first:?}");
    }

    #[test]
    fn a_node_without_its_store_asks_the_manager_that_admitted_it() {
        let via = (NodeId(9), "10.0.0.9:2377".parse().unwrap());
        assert_eq!(
            sources(
                &ClusterState::default(),
                NodeId(4),
                None,
                |_| true,
                Some(via)
            ),
            vec![via]
        );
        // Managers known but all down: nobody (wait for one).
        let s = state(&[(1, Role::Manager), (4, Role::Worker)]);
        assert!(sources(&s, NodeId(4), None, |_| false, Some(via)).is_empty());
    }
}
