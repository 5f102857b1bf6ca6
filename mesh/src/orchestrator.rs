//! The orchestrator's decisions, pure: given the store and which nodes are
//! alive, the commands that move the tasks towards the services' specs. The
//! leader runs it in a loop and proposes what it returns; running it again
//! on the new state returns nothing once converged.
//!
//! ```text
//!  (ClusterState, live(node), new_id) ──► orchestrate ──► [AddTask | AssignTask | ShutdownTask]
//! ```

use std::collections::BTreeMap;

use crate::apply::Command;
use crate::constraint::{place, unplaceable_reason};
use crate::ids::NodeId;
use crate::service::ServiceMode;
use crate::state::{Availability, ClusterState, Node};
use crate::task::{Task, TaskState};

/// How long a failed task's slot waits before it is restarted.
pub const RESTART_DELAY_MS: u64 = 5_000;
/// Ended tasks kept per slot (per node for global services), for `service ps`.
pub const TASK_HISTORY: usize = 5;

fn eligible(node: &Node, live: &dyn Fn(NodeId) -> bool, service: &crate::service::Service) -> bool {
    node.availability == Availability::Active
        && live(node.id)
        && service.spec.constraints.iter().all(|c| c.matches(node))
}

/// The commands that bring every service to its spec. `live` says whether
/// a node is up (past any grace period the caller applies); `new_id` makes
/// task IDs; `now_ms` stamps them.
pub fn orchestrate(
    state: &ClusterState,
    live: &dyn Fn(NodeId) -> bool,
    new_id: &mut dyn FnMut() -> String,
    now_ms: u64,
) -> Vec<Command> {
    let mut out = Vec::new();
    let nodes: Vec<&Node> = state.nodes.values().collect();
    let mut all_tasks: BTreeMap<NodeId, usize> = BTreeMap::new();
    for t in state.tasks.values().filter(|t| t.is_active()) {
        if let Some(n) = t.node {
            *all_tasks.entry(n).or_default() += 1;
        }
    }
    for service in state.services.values() {
        let active: Vec<&Task> = state
            .tasks
            .values()
            .filter(|t| t.service_id == service.id && t.is_active())
            .collect();
        // Tasks on nodes that are gone, down, drained or no longer eligible stop.
        let mut kept: Vec<&Task> = Vec::new();
        for t in active {
            let misplaced = match t.node {
                Some(n) => !state.nodes.get(&n).is_some_and(|node| {
                    live(n)
                        && node.availability != Availability::Drain
                        && service.spec.constraints.iter().all(|c| c.matches(node))
                }),
                None => false,
            };
            if misplaced {
                out.push(Command::ShutdownTask { id: t.id.clone() });
            } else {
                kept.push(t);
            }
        }
        let mut per_node: BTreeMap<NodeId, usize> = BTreeMap::new();
        for t in &kept {
            if let Some(n) = t.node {
                *per_node.entry(n).or_default() += 1;
            }
        }
        let constraints = &service.spec.constraints;
        let live_nodes: Vec<&Node> = nodes.iter().copied().filter(|n| live(n.id)).collect();
        match service.spec.mode {
            ServiceMode::Replicated(replicas) => {
                for t in &kept {
                    if t.slot.is_some_and(|s| s > replicas) {
                        out.push(Command::ShutdownTask { id: t.id.clone() });
                    }
                }
                for slot in 1..=replicas {
                    let existing = kept.iter().find(|t| t.slot == Some(slot));
                    let recently_failed = state.tasks.values().any(|t| {
                        t.service_id == service.id
                            && t.slot == Some(slot)
                            && t.state == TaskState::Failed
                            && now_ms < t.updated_at_ms + RESTART_DELAY_MS
                    });
                    if existing.is_none() && recently_failed {
                        continue;
                    }
                    match existing {
                        Some(t) if t.state == TaskState::Pending => {
                            if let Some(node) =
                                place(&nodes, live, constraints, &per_node, &all_tasks)
                            {
                                *per_node.entry(node).or_default() += 1;
                                *all_tasks.entry(node).or_default() += 1;
                                out.push(Command::AssignTask {
                                    id: t.id.clone(),
                                    node,
                                    now_ms,
                                });
                            }
                        }
                        Some(_) => {}
                        None => {
                            let node = place(&nodes, live, constraints, &per_node, &all_tasks);
                            if let Some(n) = node {
                                *per_node.entry(n).or_default() += 1;
                                *all_tasks.entry(n).or_default() += 1;
                            }
                            out.push(Command::AddTask {
                                id: new_id(),
                                service_id: service.id.clone(),
                                slot: Some(slot),
                                node,
                                message: if node.is_some() {
                                    String::new()
                                } else {
                                    unplaceable_reason(&live_nodes, constraints)
                                },
                                now_ms,
                            });
                        }
                    }
                }
            }
            ServiceMode::Global => {
                for node in &nodes {
                    let recently_failed = state.tasks.values().any(|t| {
                        t.service_id == service.id
                            && t.node == Some(node.id)
                            && t.state == TaskState::Failed
                            && now_ms < t.updated_at_ms + RESTART_DELAY_MS
                    });
                    if eligible(node, live, service)
                        && !per_node.contains_key(&node.id)
                        && !recently_failed
                    {
                        out.push(Command::AddTask {
                            id: new_id(),
                            service_id: service.id.clone(),
                            slot: None,
                            node: Some(node.id),
                            message: String::new(),
                            now_ms,
                        });
                    }
                }
            }
        }
    }
    out.extend(prune_history(state));
    out
}

/// Ended tasks beyond the newest [`TASK_HISTORY`] of each slot (or node, for
/// global services) are forgotten, so failing tasks cannot grow the store
/// without bound.
fn prune_history(state: &ClusterState) -> Vec<Command> {
    /// (service, slot, node for global services).
    type Group<'a> = (&'a str, Option<u64>, Option<NodeId>);
    let mut groups: BTreeMap<Group<'_>, Vec<&Task>> = BTreeMap::new();
    for t in state
        .tasks
        .values()
        .filter(|t| t.state.is_terminal() && !t.is_active())
    {
        let node = if t.slot.is_some() { None } else { t.node };
        groups
            .entry((t.service_id.as_str(), t.slot, node))
            .or_default()
            .push(t);
    }
    let mut out = Vec::new();
    for mut ended in groups.into_values() {
        if ended.len() > TASK_HISTORY {
            ended.sort_by_key(|t| std::cmp::Reverse((t.updated_at_ms, t.id.clone())));
            out.extend(
                ended[TASK_HISTORY..]
                    .iter()
                    .map(|t| Command::RemoveTask { id: t.id.clone() }),
            );
        }
    }
    out
}

#[cfg(test)]
#[path = "orchestrator_test.rs"]
mod tests;
