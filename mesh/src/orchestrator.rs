//! The orchestrator's decisions, pure: given the store and which nodes are
//! alive, the commands that move the tasks towards the services' specs. The
//! leader runs it in a loop and proposes what it returns; running it again
//! on the new state returns nothing once converged.
//!
//! ```text
//!  (ClusterState, live(node), new_id) ──► orchestrate ──► [AddTask | AssignTask | ShutdownTask]
//! ```
//!
//! Each replica slot (each eligible node, for a global service) holds at
//! most one active task. An empty group is refilled according to the
//! restart policy; a task being stopped on a live node holds its group
//! until it has stopped (stop first), at most [`STOP_TIMEOUT_MS`]. Tasks of
//! an older spec version are replaced `update.parallelism` at a time, the
//! next batch starting once the previous one runs and `update.delay_ms`
//! has passed; a failed task of the new version pauses the update.

use std::collections::BTreeMap;

use crate::apply::Command;
use crate::constraint::{place, unplaceable_reason};
use crate::ids::NodeId;
use crate::service::{RestartCondition, Service, ServiceMode};
use crate::state::{Availability, ClusterState, Node};
use crate::task::{DesiredState, Task, TaskState};

/// Ended tasks kept per slot (per node for global services), for `service ps`.
pub const TASK_HISTORY: usize = 5;
/// How long a replacement waits for the task it replaces to stop (on a live
/// node) before it starts anyway.
pub const STOP_TIMEOUT_MS: u64 = 10_000;

fn eligible(node: &Node, live: &dyn Fn(NodeId) -> bool, service: &Service) -> bool {
    node.availability == Availability::Active
        && live(node.id)
        && service.spec.constraints.iter().all(|c| c.matches(node))
}

/// Where a task belongs: its replica slot, or its node for global services.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Group {
    Slot(u64),
    Node(NodeId),
}

fn group_of(t: &Task) -> Option<Group> {
    match (t.slot, t.node) {
        (Some(s), _) => Some(Group::Slot(s)),
        (None, Some(n)) => Some(Group::Node(n)),
        (None, None) => None,
    }
}

/// Whether the task that ended last in a group is replaced now, and with
/// which restart count; `None` while it must not be (yet). A restart that
/// waits for its delay tells `due` when it is due.
fn restart_decision(
    service: &Service,
    latest: Option<&Task>,
    now_ms: u64,
    due: &dyn Fn(u64),
) -> Option<u64> {
    let Some(l) = latest else { return Some(0) };
    let same_version = l.spec_version == service.version;
    let exited = l.desired == DesiredState::Running
        && matches!(l.state, TaskState::Complete | TaskState::Failed);
    if !exited {
        // Stopped by the orchestrator (node lost, drained, updated): replaced
        // at once, not counted as a restart.
        return Some(if same_version { l.restarts } else { 0 });
    }
    if !same_version {
        return Some(0);
    }
    let policy = &service.spec.restart;
    let wanted = match policy.condition {
        RestartCondition::None => false,
        RestartCondition::OnFailure => l.state == TaskState::Failed,
        RestartCondition::Any => true,
    };
    let exhausted = policy.max_attempts > 0 && l.restarts >= policy.max_attempts;
    let at = l.updated_at_ms.saturating_add(policy.delay_ms);
    let waiting = now_ms < at;
    if wanted && !exhausted && waiting {
        due(at);
    }
    (wanted && !exhausted && !waiting).then_some(l.restarts + 1)
}

/// Why a rolling update does not go on, if it is held: a task of the new
/// version failed (like Swarm's default `--update-failure-action pause`).
pub fn update_paused(state: &ClusterState, service: &Service) -> Option<String> {
    let outdated = state
        .tasks_of(&service.id)
        .any(|t| t.is_active() && t.spec_version < service.version);
    if !outdated {
        return None;
    }
    state
        .tasks_of(&service.id)
        .filter(|t| {
            t.spec_version == service.version
                && t.state == TaskState::Failed
                && t.desired == DesiredState::Running
        })
        .max_by_key(|t| t.updated_at_ms)
        .map(|t| format!("update paused: task {} failed: {}", t.id, t.message))
}

/// What a task of `service` reserves: (nano-CPUs, bytes of memory).
fn reservation(service: &Service) -> (u64, u64) {
    let r = service
        .spec
        .container
        .as_ref()
        .map(|c| c.reservations)
        .unwrap_or_default();
    (r.nano_cpus.unwrap_or(0), r.memory_bytes.unwrap_or(0))
}

/// What the active tasks on `node` reserve: (nano-CPUs, bytes).
pub fn reserved_on(state: &ClusterState, node: NodeId) -> (u64, u64) {
    let mut out = (0u64, 0u64);
    for t in state.tasks_on(node) {
        if t.holds_reservation()
            && let Some(s) = state.services.get(&t.service_id)
        {
            let (cpu, mem) = reservation(s);
            out = (out.0.saturating_add(cpu), out.1.saturating_add(mem));
        }
    }
    out
}

/// What the active tasks on each node reserve: (nano-CPUs, bytes).
fn reserved(state: &ClusterState) -> BTreeMap<NodeId, (u64, u64)> {
    let mut out: BTreeMap<NodeId, (u64, u64)> = BTreeMap::new();
    for t in state.tasks.values().filter(|t| t.holds_reservation()) {
        let (Some(n), Some(s)) = (t.node, state.services.get(&t.service_id)) else {
            continue;
        };
        let (cpu, mem) = reservation(s);
        let r = out.entry(n).or_default();
        *r = (r.0.saturating_add(cpu), r.1.saturating_add(mem));
    }
    out
}

/// What node `node` lacks for a task reserving `want`, beside what is
/// reserved there already: `None` when it fits. A node that has not
/// reported its resources takes only tasks that reserve nothing.
fn short_of(
    state: &ClusterState,
    reserved: &BTreeMap<NodeId, (u64, u64)>,
    node: NodeId,
    want: (u64, u64),
) -> Option<&'static str> {
    if want == (0, 0) {
        return None;
    }
    let Some(has) = state.ext.node_resources.get(&node) else {
        return Some("resources (not reported yet)");
    };
    let (cpu, mem) = reserved.get(&node).copied().unwrap_or_default();
    let mem_short = mem.saturating_add(want.1) > has.memory_bytes;
    let cpu_short = cpu.saturating_add(want.0) > has.nano_cpus;
    match (cpu_short, mem_short) {
        (false, false) => None,
        (false, true) => Some("memory"),
        (true, false) => Some("CPU"),
        (true, true) => Some("CPU and memory"),
    }
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
    orchestrate_due(state, live, new_id, now_ms).0
}

/// [`orchestrate`], and when (ms) a later pass would do something with
/// nothing else changing: the first of the delays this pass waited on (a
/// restart delay, a stop's timeout, a rolling update's delay). `None` when
/// none: only a change (of the store, or of `live`) brings work.
pub fn orchestrate_due(
    state: &ClusterState,
    live: &dyn Fn(NodeId) -> bool,
    new_id: &mut dyn FnMut() -> String,
    now_ms: u64,
) -> (Vec<Command>, Option<u64>) {
    let nodes: Vec<&Node> = state.nodes.values().collect();
    let mut pass = Pass {
        state,
        live,
        now_ms,
        due: std::cell::Cell::new(None),
        live_nodes: nodes.iter().copied().filter(|n| live(n.id)).collect(),
        nodes,
        all_tasks: BTreeMap::new(),
        reserved: reserved(state),
        out: Vec::new(),
    };
    for t in state.tasks.values().filter(|t| t.holds_reservation()) {
        if let Some(n) = t.node {
            *pass.all_tasks.entry(n).or_default() += 1;
        }
    }
    // Each service's tasks, in the store's order, from one walk over all
    // of them (a walk per service made a pass O(services × tasks)).
    let mut by_service: BTreeMap<&str, Vec<&Task>> = BTreeMap::new();
    for t in state.tasks.values() {
        by_service.entry(t.service_id.as_str()).or_default().push(t);
    }
    for service in state.services.values() {
        let mine = by_service.remove(service.id.as_str()).unwrap_or_default();
        pass.service(service, mine, new_id);
    }
    let due = pass.due.get();
    let mut out = pass.out;
    out.extend(prune_history(state));
    out.extend(crate::ca::finish_when_adopted(state));
    (out, due)
}

/// One orchestration pass: what it knows across services, and what it has
/// decided so far.
struct Pass<'a> {
    state: &'a ClusterState,
    live: &'a dyn Fn(NodeId) -> bool,
    now_ms: u64,
    /// The first delay this pass waited on.
    due: std::cell::Cell<Option<u64>>,
    nodes: Vec<&'a Node>,
    live_nodes: Vec<&'a Node>,
    /// Active tasks per node, placements of this pass included (spread).
    all_tasks: BTreeMap<NodeId, usize>,
    /// What active tasks reserve per node, placements of this pass
    /// included.
    reserved: BTreeMap<NodeId, (u64, u64)>,
    out: Vec<Command>,
}

/// One service's tasks as a pass sees them.
struct ServiceTasks<'a> {
    /// All of them, ended ones included.
    mine: Vec<&'a Task>,
    /// The active ones that stay.
    kept: Vec<&'a Task>,
    /// Those shut down in this pass.
    stopping: BTreeMap<&'a str, &'a Task>,
    /// Kept tasks per node (spread within the service).
    per_node: BTreeMap<NodeId, usize>,
    /// The first kept task of each group.
    kept_in: BTreeMap<Group, &'a Task>,
    /// Each group's tasks, ended ones included, in the order of `mine`.
    mine_in: BTreeMap<Group, Vec<&'a Task>>,
}

impl<'a> Pass<'a> {
    fn shutdown(&mut self, t: &Task) {
        self.out.push(Command::ShutdownTask {
            id: t.id.clone(),
            now_ms: self.now_ms,
        });
    }

    /// A later pass has work at `at` (ms).
    fn due_at(&self, at: u64) {
        let first = self.due.get().map_or(at, |d| d.min(at));
        self.due.set(Some(first));
    }

    /// Whether task `t` still holds its group back (stop first: a live node
    /// is given time to stop it); `just_now` if shut down in this pass.
    fn holds(&self, t: &Task, just_now: bool) -> bool {
        let timeout = t.updated_at_ms.saturating_add(STOP_TIMEOUT_MS);
        let held = t.node.is_some_and(self.live)
            && !t.state.is_terminal()
            && (just_now || self.now_ms < timeout);
        if held {
            self.due_at(if just_now {
                self.now_ms.saturating_add(STOP_TIMEOUT_MS)
            } else {
                timeout
            });
        }
        held
    }

    fn service(
        &mut self,
        service: &'a Service,
        mine: Vec<&'a Task>,
        new_id: &mut dyn FnMut() -> String,
    ) {
        let tasks = self.stop_misplaced(service, mine);
        let busy = self.fill_groups(service, &tasks, new_id);
        self.roll(service, &tasks, busy);
    }

    /// Tasks on nodes that are gone, down, drained or no longer eligible
    /// stop, as do replicas beyond the count; the rest are kept.
    fn stop_misplaced(&mut self, service: &'a Service, mine: Vec<&'a Task>) -> ServiceTasks<'a> {
        let state = self.state;
        let mut stopping = BTreeMap::new();
        let mut kept: Vec<&Task> = Vec::new();
        for t in mine.iter().copied().filter(|t| t.is_active()) {
            let misplaced = match t.node {
                Some(n) => !state.nodes.get(&n).is_some_and(|node| {
                    (self.live)(n)
                        && node.availability != Availability::Drain
                        && service.spec.constraints.iter().all(|c| c.matches(node))
                }),
                None => false,
            };
            let surplus = match service.spec.mode {
                ServiceMode::Replicated(r) => t.slot.is_some_and(|s| s > r),
                ServiceMode::Global => false,
            };
            if misplaced || surplus {
                self.shutdown(t);
                stopping.insert(t.id.as_str(), t);
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
        let mut kept_in = BTreeMap::new();
        for t in &kept {
            if let Some(g) = group_of(t) {
                kept_in.entry(g).or_insert(*t);
            }
        }
        let mut mine_in: BTreeMap<Group, Vec<&Task>> = BTreeMap::new();
        for t in &mine {
            if let Some(g) = group_of(t) {
                mine_in.entry(g).or_default().push(*t);
            }
        }
        ServiceTasks {
            mine,
            kept,
            stopping,
            per_node,
            kept_in,
            mine_in,
        }
    }

    /// Places pending tasks and fills empty groups (slots, or eligible
    /// nodes of a global service), restart policy permitting. Returns how
    /// many groups are still changing: being refilled, waiting for a task
    /// to stop, or with a new task not yet running.
    fn fill_groups(
        &mut self,
        service: &Service,
        tasks: &ServiceTasks<'a>,
        new_id: &mut dyn FnMut() -> String,
    ) -> usize {
        let groups: Vec<Group> = match service.spec.mode {
            ServiceMode::Replicated(replicas) => (1..=replicas).map(Group::Slot).collect(),
            ServiceMode::Global => self
                .nodes
                .iter()
                .filter(|n| eligible(n, self.live, service))
                .map(|n| Group::Node(n.id))
                .collect(),
        };
        let mut per_node = tasks.per_node.clone();
        let mut busy = 0usize;
        for group in groups {
            let in_group: &[&Task] = tasks.mine_in.get(&group).map_or(&[], Vec::as_slice);
            if let Some(t) = tasks.kept_in.get(&group) {
                if t.state < TaskState::Running {
                    busy += 1;
                }
                if t.state == TaskState::Pending
                    && let Some(node) = (match group {
                        Group::Node(n) => self.fits(service, n).then_some(n),
                        Group::Slot(_) => self.place(service, &per_node),
                    })
                {
                    *per_node.entry(node).or_default() += 1;
                    self.count(service, node);
                    self.out.push(Command::AssignTask {
                        id: t.id.clone(),
                        node,
                        now_ms: self.now_ms,
                    });
                }
                continue;
            }
            let held = in_group.iter().any(|t| {
                if tasks.stopping.contains_key(t.id.as_str()) {
                    self.holds(t, true)
                } else {
                    t.desired == DesiredState::Shutdown && self.holds(t, false)
                }
            });
            if held {
                busy += 1;
                continue;
            }
            let latest = in_group
                .iter()
                .copied()
                .max_by_key(|t| (t.created_at_ms, t.id.clone()));
            let due = |at| self.due_at(at);
            let Some(restarts) = restart_decision(service, latest, self.now_ms, &due) else {
                continue;
            };
            busy += 1;
            let node = match group {
                Group::Node(n) if !self.fits(service, n) => {
                    // A global task waits on its node until it has room.
                    let short = short_of(self.state, &self.reserved, n, reservation(service));
                    self.out.push(Command::AddPendingTask {
                        id: new_id().into(),
                        service_id: service.id.clone(),
                        node: n,
                        message: format!(
                            "no suitable node (insufficient {} on 1 node)",
                            short.unwrap_or("resources")
                        ),
                        restarts,
                        now_ms: self.now_ms,
                    });
                    continue;
                }
                Group::Node(n) => Some(n),
                Group::Slot(_) => self.place(service, &per_node),
            };
            if let Some(n) = node {
                *per_node.entry(n).or_default() += 1;
                self.count(service, n);
            }
            self.out.push(Command::AddTask {
                id: new_id().into(),
                service_id: service.id.clone(),
                slot: match group {
                    Group::Slot(s) => Some(s),
                    Group::Node(_) => None,
                },
                node,
                message: if node.is_some() {
                    String::new()
                } else {
                    self.unplaceable(service)
                },
                restarts,
                now_ms: self.now_ms,
            });
        }
        busy
    }

    /// Whether node `n` has room for what a task of `service` reserves.
    fn fits(&self, service: &Service, n: NodeId) -> bool {
        short_of(self.state, &self.reserved, n, reservation(service)).is_none()
    }

    /// A task of `service` placed on `node` in this pass.
    fn count(&mut self, service: &Service, node: NodeId) {
        *self.all_tasks.entry(node).or_default() += 1;
        let (cpu, mem) = reservation(service);
        let r = self.reserved.entry(node).or_default();
        *r = (r.0.saturating_add(cpu), r.1.saturating_add(mem));
    }

    /// Why no node takes a task of `service`: the nodes that pass its
    /// constraints lack what it reserves, or the constraints' reason.
    fn unplaceable(&self, service: &Service) -> String {
        let want = reservation(service);
        let candidates: Vec<&&Node> = self
            .live_nodes
            .iter()
            .filter(|n| eligible(n, self.live, service))
            .collect();
        let short: Vec<&str> = candidates
            .iter()
            .filter_map(|n| short_of(self.state, &self.reserved, n.id, want))
            .collect();
        match short.first() {
            Some(first) if !candidates.is_empty() && short.len() == candidates.len() => {
                let what = if short.iter().all(|s| s == first) {
                    *first
                } else {
                    "resources"
                };
                let n = short.len();
                let nodes = if n == 1 { "node" } else { "nodes" };
                format!("no suitable node (insufficient {what} on {n} {nodes})")
            }
            _ => unplaceable_reason(&self.live_nodes, &service.spec.constraints),
        }
    }

    fn place(&self, service: &Service, per_node: &BTreeMap<NodeId, usize>) -> Option<NodeId> {
        let want = reservation(service);
        let fitting: Vec<&Node> = self
            .nodes
            .iter()
            .copied()
            .filter(|n| short_of(self.state, &self.reserved, n.id, want).is_none())
            .collect();
        place(
            &fitting,
            self.live,
            &service.spec.constraints,
            per_node,
            &self.all_tasks,
        )
    }

    /// Rolling update: once nothing is changing (`busy` is 0: the previous
    /// batch runs) and the delay has passed, the next `parallelism`
    /// outdated tasks stop; the next passes refill their groups with the
    /// new version.
    fn roll(&mut self, service: &Service, tasks: &ServiceTasks<'a>, busy: usize) {
        let outdated: Vec<&Task> = tasks
            .kept
            .iter()
            .copied()
            .filter(|t| t.spec_version < service.version)
            .collect();
        if outdated.is_empty() || busy != 0 || update_paused(self.state, service).is_some() {
            return;
        }
        let last_up = tasks
            .mine
            .iter()
            .filter(|t| t.spec_version == service.version && t.state == TaskState::Running)
            .map(|t| t.updated_at_ms)
            .max();
        if let Some(at) = last_up.map(|at| at.saturating_add(service.spec.update.delay_ms))
            && self.now_ms < at
        {
            self.due_at(at);
            return;
        }
        let batch = match service.spec.update.parallelism {
            0 => outdated.len(),
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        let mut order = outdated;
        order.sort_by_key(|t| (group_of(t), t.id.clone()));
        for t in order.into_iter().take(batch) {
            self.shutdown(t);
        }
    }
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
