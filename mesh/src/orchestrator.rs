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
                    if eligible(node, live, service) && !per_node.contains_key(&node.id) {
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
    out
}

#[cfg(test)]
#[path = "orchestrator_test.rs"]
mod tests;
