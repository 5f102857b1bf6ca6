//! The leader's membership reconciler: makes Raft's membership follow the
//! store. Every node in the store is a Raft learner; every manager is a
//! voter; a node gone from the store leaves Raft; a changed address is
//! updated. Runs only on the leader, idempotently, so a new leader finishes
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

/// One step towards the desired membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipStep {
    /// Add a node as a learner.
    AddLearner(u64, String),
    /// Update nodes' addresses.
    SetAddrs(BTreeMap<u64, BasicNode>),
    /// Make exactly these nodes voters (demoted ones stay learners).
    SetVoters(BTreeSet<u64>),
    /// Remove nodes that left the store.
    Remove(BTreeSet<u64>),
}

/// The next steps, given the store, Raft's current voters and nodes, and
/// which nodes answer. Pure: learners first, then voters, then removals.
///
/// A manager becomes a voter only once it answers: making an unreachable
/// node a voter would stall the change (the joint configuration needs its
/// quorum) and weaken the group.
pub fn plan_membership(
    state: &ClusterState,
    voters: &BTreeSet<u64>,
    nodes: &BTreeMap<u64, BasicNode>,
    reachable: &BTreeSet<u64>,
) -> Vec<MembershipStep> {
    if state.cluster.is_none() {
        return Vec::new();
    }
    let mut steps = Vec::new();
    for n in state.nodes.values() {
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
    let gone: BTreeSet<u64> = nodes
        .keys()
        .filter(|id| !state.nodes.contains_key(&shoal_mesh::NodeId(**id)))
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
}

/// Runs until the task is aborted; acts only while this node leads.
pub async fn run(ctx: MembershipCtx) {
    loop {
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
        let state = ctx.state.state();
        let now = Instant::now();
        let reachable: BTreeSet<u64> = state
            .nodes
            .keys()
            .filter(|id| ctx.live.status(**id, now) == NodeStatus::Ready)
            .map(|id| id.0)
            .collect();
        for step in plan_membership(&state, &voters, &nodes, &reachable) {
            tracing::info!(?step, "membership change");
            if let Err(e) = take(&ctx.raft, step).await {
                tracing::warn!(error = %e, "membership change failed; will retry");
                break;
            }
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
    use shoal_mesh::{Availability, Node, NodeId, Role};

    fn state(nodes: &[(u64, Role)]) -> ClusterState {
        let mut s = ClusterState {
            cluster: Some(shoal_mesh::fixtures::cluster_info("c")),
            ..Default::default()
        };
        for (id, role) in nodes {
            s.nodes.insert(
                NodeId(*id),
                Node {
                    id: NodeId(*id),
                    hostname: format!("n{id}"),
                    role: *role,
                    availability: Availability::Active,
                    labels: Default::default(),
                    addr: format!("127.0.0.{id}:2377"),
                    joined_at_ms: 0,
                },
            );
        }
        s
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
        );
        assert_eq!(
            steps,
            vec![
                MembershipStep::AddLearner(2, "127.0.0.2:2377".into()),
                MembershipStep::AddLearner(3, "127.0.0.3:2377".into()),
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
        );
        assert_eq!(
            steps,
            vec![
                MembershipStep::SetVoters(BTreeSet::from([1])),
                MembershipStep::Remove(BTreeSet::from([3])),
            ]
        );
    }

    #[test]
    fn a_converged_membership_needs_nothing() {
        let s = state(&[(1, Role::Manager), (2, Role::Worker)]);
        assert!(
            plan_membership(
                &s,
                &BTreeSet::from([1]),
                &raft_nodes(&[1, 2]),
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
        );
        assert!(steps.is_empty(), "{steps:?}");
    }
}
