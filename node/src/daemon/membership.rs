//! The leader's membership reconciler: makes Raft's membership follow the
//! store. Every manager is a voter (a learner first, while it catches up);
//! workers are not members (they are fed the store by the managers:
//! `feed`), so a demoted manager and a node gone from the store leave
//! Raft; a changed address is updated. Runs only on the leader, idempotently, so a new leader finishes
//! whatever its predecessor started.
//!
//! ```text
//!  store nodes/roles ─┐
//!                     ├─► plan_membership() ─► [AddLearner | SetVoters | Remove | SetAddrs] ─► raft
//!  raft membership ───┘
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::{BasicNode, ChangeMembers};
use shoal_mesh::{ClusterState, NodeId};
use shoal_raft::{Raft, StateHandle};

use super::liveness::{Liveness, NodeStatus};

/// How often the leader compares the store with Raft's membership.
pub const RECONCILE_INTERVAL: Duration = Duration::from_millis(200);
/// How long a node that asked for votes without being a voter stays a
/// learner after its last request.
pub const STALE_VOTER_HOLD: Duration = Duration::from_secs(10);

/// Nodes of the store that ask for votes, or send entries as the leader of
/// an old term, although they are not voters: a former manager back from a
/// `--force-new-cluster`, whose own copy of Raft's membership still makes it
/// a voter (and, if it led when it stopped, its leader: openraft restores a
/// leader of a committed vote at start, and it never hears of a newer term
/// while its calls are refused). Such a node runs elections nobody answers,
/// or leads nobody, and takes no feed; the leader makes it a learner for a
/// while, as it made every node before the feed, so that Raft's own rules
/// bring it the current term and membership.
#[derive(Default)]
pub struct StaleVoters(std::sync::Mutex<BTreeMap<NodeId, Instant>>);

impl StaleVoters {
    /// Node `node` asked for a vote, or sent entries as a leader, and was
    /// refused.
    pub fn note(&self, node: NodeId, now: Instant) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, at| now.duration_since(*at) < STALE_VOTER_HOLD);
        m.insert(node, now);
    }

    /// Those that asked within [`STALE_VOTER_HOLD`].
    pub fn current(&self, now: Instant) -> BTreeSet<u64> {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .filter(|(_, at)| now.duration_since(**at) < STALE_VOTER_HOLD)
            .map(|(n, _)| n.0)
            .collect()
    }
}

/// One step towards the desired membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipStep {
    /// Add a node as a learner.
    AddLearner(u64, String),
    /// Update nodes' addresses.
    SetAddrs(BTreeMap<u64, BasicNode>),
    /// Make exactly these nodes voters (demoted ones stay learners).
    SetVoters(BTreeSet<u64>),
    /// Remove learners that left the store or are not managers.
    Remove(BTreeSet<u64>),
}

/// The next steps, given the store, Raft's current voters and nodes,
/// which nodes answer and which ask for votes without being voters
/// (`stale`, see [`StaleVoters`]). Pure: learners first, then voters, then
/// removals.
///
/// A manager becomes a voter only once it answers: making an unreachable
/// node a voter would stall the change (the joint configuration needs its
/// quorum) and weaken the group.
pub fn plan_membership(
    state: &ClusterState,
    voters: &BTreeSet<u64>,
    nodes: &BTreeMap<u64, BasicNode>,
    reachable: &BTreeSet<u64>,
    stale: &BTreeSet<u64>,
) -> Vec<MembershipStep> {
    if state.cluster.is_none() {
        return Vec::new();
    }
    let mut steps = Vec::new();
    let learners = state
        .nodes
        .values()
        .filter(|n| n.role == shoal_mesh::Role::Manager || stale.contains(&n.id.0));
    for n in learners {
        if !nodes.contains_key(&n.id.0) {
            steps.push(MembershipStep::AddLearner(n.id.0, n.addr.clone()));
        }
    }
    let moved: BTreeMap<u64, BasicNode> = state
        .nodes
        .values()
        .filter(|n| nodes.get(&n.id.0).is_some_and(|b| b.addr != n.addr))
        .map(|n| (n.id.0, BasicNode::new(n.addr.clone())))
        .collect();
    if !moved.is_empty() {
        steps.push(MembershipStep::SetAddrs(moved));
    }
    let desired: BTreeSet<u64> = state
        .managers()
        .map(|m| m.id.0)
        .filter(|id| voters.contains(id) || reachable.contains(id))
        .collect();
    if !desired.is_empty() && &desired != voters {
        steps.push(MembershipStep::SetVoters(desired.clone()));
    }
    // Voters leave through `SetVoters` first (a later round removes them).
    let gone: BTreeSet<u64> = nodes
        .keys()
        .filter(|id| !voters.contains(id) && !stale.contains(id))
        .filter(|id| {
            state
                .nodes
                .get(&shoal_mesh::NodeId(**id))
                .is_none_or(|n| n.role != shoal_mesh::Role::Manager)
        })
        .copied()
        .collect();
    if !gone.is_empty() {
        steps.push(MembershipStep::Remove(gone));
    }
    steps
}

/// What the loop uses.
pub struct MembershipCtx {
    /// This node.
    pub id: NodeId,
    /// Raft, whose membership it changes.
    pub raft: Raft,
    /// The store.
    pub state: StateHandle,
    /// Which nodes answer.
    pub live: Arc<Liveness>,
    /// Nodes asking for votes without being voters.
    pub stale: Arc<StaleVoters>,
}

/// Runs until the task is aborted; acts only while this node leads (and
/// otherwise waits, without a timer, until it does).
pub async fn run(ctx: MembershipCtx) {
    let mut metrics = ctx.raft.metrics();
    loop {
        let me = Some(ctx.id.0);
        if metrics.wait_for(|m| m.current_leader == me).await.is_err() {
            return;
        }
        tokio::time::sleep(RECONCILE_INTERVAL).await;
        let (leader, voters, nodes) = {
            let metrics = ctx.raft.metrics();
            let mc = metrics.borrow();
            let membership = mc.membership_config.membership();
            let voters: BTreeSet<u64> = membership.voter_ids().collect();
            let nodes: BTreeMap<u64, BasicNode> =
                membership.nodes().map(|(id, n)| (*id, n.clone())).collect();
            (mc.current_leader, voters, nodes)
        };
        if leader != Some(ctx.id.0) {
            continue;
        }
        let now = Instant::now();
        let stale = ctx.stale.current(now);
        // Planned under the store's read lock, not on a copy of it.
        let steps = ctx.state.read(|d| {
            let reachable: BTreeSet<u64> = d
                .state
                .nodes
                .keys()
                .filter(|id| ctx.live.status(**id, now) == NodeStatus::Ready)
                .map(|id| id.0)
                .collect();
            plan_membership(&d.state, &voters, &nodes, &reachable, &stale)
        });
        for step in steps {
            tracing::info!(?step, "membership change");
            if let Err(e) = take(&ctx.raft, step).await {
                tracing::warn!(error = %e, "membership change failed; will retry");
                break;
            }
        }
    }
}

/// Whether node `id` needs openraft's tick (elections, heartbeats, the
/// leader's lease): only as one of `voters`, in Raft's membership as this
/// node knows it. A worker (not a member: fed by `feed`) and a learner
/// being caught up need none of it.
pub fn needs_tick(voters: impl IntoIterator<Item = u64>, id: NodeId) -> bool {
    voters.into_iter().any(|v| v == id.0)
}

/// Keeps openraft's tick (one wakeup every 1.5 heartbeats, on every node)
/// on while this node is a voter and off otherwise, following Raft's
/// membership as this node applies it: promoted, it ticks from the entry
/// that made it a voter; a former manager whose own membership still makes
/// it a voter ticks, and asks for votes ([`StaleVoters`]).
pub async fn tick_as_voter(raft: Raft, id: NodeId) {
    let mut metrics = raft.metrics();
    let mut ticking = None;
    loop {
        let voter = needs_tick(
            metrics
                .borrow_and_update()
                .membership_config
                .membership()
                .voter_ids(),
            id,
        );
        if ticking != Some(voter) {
            tracing::debug!(voter, "raft tick");
            raft.runtime_config().tick(voter);
            ticking = Some(voter);
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Carries out one step.
async fn take(raft: &Raft, step: MembershipStep) -> Result<(), String> {
    let result = match step {
        MembershipStep::AddLearner(id, addr) => raft
            .add_learner(id, BasicNode::new(addr), false)
            .await
            .map(drop),
        MembershipStep::SetAddrs(map) => raft
            .change_membership(ChangeMembers::SetNodes(map), true)
            .await
            .map(drop),
        MembershipStep::SetVoters(set) => raft
            .change_membership(ChangeMembers::ReplaceAllVoters(set), true)
            .await
            .map(drop),
        MembershipStep::Remove(set) => raft
            .change_membership(ChangeMembers::RemoveNodes(set), false)
            .await
            .map(drop),
    };
    result.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_mesh::{NodeId, Role};

    fn state(nodes: &[(u64, Role)]) -> ClusterState {
        shoal_mesh::fixtures::swarm(nodes)
    }

    fn raft_nodes(ids: &[u64]) -> BTreeMap<u64, BasicNode> {
        ids.iter()
            .map(|i| (*i, BasicNode::new(format!("127.0.0.{i}:2377"))))
            .collect()
    }

    #[test]
    fn a_joined_manager_becomes_learner_then_voter() {
        let s = state(&[(1, Role::Manager), (2, Role::Manager), (3, Role::Worker)]);
        let steps = plan_membership(
            &s,
            &BTreeSet::from([1]),
            &raft_nodes(&[1]),
            &BTreeSet::from([1, 2, 3]),
            &BTreeSet::new(),
        );
        assert_eq!(
            steps,
            vec![
                MembershipStep::AddLearner(2, "127.0.0.2:2377".into()),
                MembershipStep::SetVoters(BTreeSet::from([1, 2])),
            ]
        );
    }

    #[test]
    fn demoted_and_removed_nodes_leave_the_voters() {
        let s = state(&[(1, Role::Manager), (2, Role::Worker)]);
        let steps = plan_membership(
            &s,
            &BTreeSet::from([1, 2, 3]),
            &raft_nodes(&[1, 2, 3]),
            &BTreeSet::new(),
            &BTreeSet::new(),
        );
        assert_eq!(steps, vec![MembershipStep::SetVoters(BTreeSet::from([1]))]);
        // Next round: both are learners now, and leave.
        let steps = plan_membership(
            &s,
            &BTreeSet::from([1]),
            &raft_nodes(&[1, 2, 3]),
            &BTreeSet::new(),
            &BTreeSet::new(),
        );
        assert_eq!(steps, vec![MembershipStep::Remove(BTreeSet::from([2, 3]))]);
    }

    #[test]
    fn a_worker_asking_for_votes_is_a_learner_until_it_stops() {
        let s = state(&[(1, Role::Manager), (2, Role::Worker)]);
        let stale = BTreeSet::from([2]);
        let steps = plan_membership(
            &s,
            &BTreeSet::from([1]),
            &raft_nodes(&[1]),
            &BTreeSet::from([1, 2]),
            &stale,
        );
        assert_eq!(
            steps,
            vec![MembershipStep::AddLearner(2, "127.0.0.2:2377".into())]
        );
        let held = plan_membership(
            &s,
            &BTreeSet::from([1]),
            &raft_nodes(&[1, 2]),
            &BTreeSet::from([1, 2]),
            &stale,
        );
        assert!(held.is_empty(), "{held:?}");
        let voters = StaleVoters::default();
        let t = Instant::now();
        voters.note(NodeId(2), t);
        assert_eq!(voters.current(t), stale);
        assert!(voters.current(t + STALE_VOTER_HOLD).is_empty());
    }

    #[test]
    fn workers_learning_from_raft_leave_it() {
        // A swarm whose workers were learners (before the feed).
        let s = state(&[(1, Role::Manager), (2, Role::Worker)]);
        let steps = plan_membership(
            &s,
            &BTreeSet::from([1]),
            &raft_nodes(&[1, 2]),
            &BTreeSet::from([1, 2]),
            &BTreeSet::new(),
        );
        assert_eq!(steps, vec![MembershipStep::Remove(BTreeSet::from([2]))]);
    }

    #[test]
    fn a_converged_membership_needs_nothing() {
        let s = state(&[(1, Role::Manager), (2, Role::Worker)]);
        assert!(
            plan_membership(
                &s,
                &BTreeSet::from([1]),
                &raft_nodes(&[1]),
                &BTreeSet::new(),
                &BTreeSet::new()
            )
            .is_empty()
        );
    }

    #[test]
    fn an_unreachable_manager_is_not_made_a_voter() {
        let s = state(&[(1, Role::Manager), (2, Role::Manager)]);
        let steps = plan_membership(
            &s,
            &BTreeSet::from([1]),
            &raft_nodes(&[1, 2]),
            &BTreeSet::from([1]),
            &BTreeSet::new(),
        );
        assert!(steps.is_empty(), "{steps:?}");
    }
}
