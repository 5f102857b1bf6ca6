use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::apply::apply;
use crate::service::{Attachment, EndpointMode, ServiceSpec};
use crate::test_support::swarm;

fn add_service(s: &mut ClusterState, id: &str, mode: ServiceMode, constraints: &[&str]) {
    let spec = ServiceSpec {
        name: id.into(),
        mode,
        networks: vec![Attachment {
            network: "web".into(),
            aliases: vec![],
        }],
        ports: vec![],
        endpoint_mode: EndpointMode::Vip,
        constraints: constraints.iter().map(|c| c.parse().unwrap()).collect(),
        env: BTreeMap::new(),
        command: vec!["sleep".into(), "1000".into()],
        labels: BTreeMap::new(),
    };
    apply(
        s,
        &Command::CreateService {
            id: id.into(),
            spec,
            created_at_ms: 0,
        },
    )
    .unwrap();
}

/// Runs the orchestrator to a fixed point, applying what it proposes.
fn converge(s: &mut ClusterState, live: &dyn Fn(NodeId) -> bool) {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    for _ in 0..10 {
        let cmds = orchestrate(
            s,
            live,
            &mut || {
                format!(
                    "t{}",
                    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                )
            },
            0,
        );
        if cmds.is_empty() {
            return;
        }
        for c in cmds {
            apply(s, &c).unwrap();
        }
    }
    panic!("the orchestrator did not converge");
}

fn active_nodes(s: &ClusterState, service: &str) -> Vec<Option<NodeId>> {
    let mut v: Vec<_> = s
        .tasks
        .values()
        .filter(|t| t.service_id == service && t.is_active())
        .map(|t| t.node)
        .collect();
    v.sort();
    v
}

#[test]
fn replicas_spread_over_nodes_with_unique_addresses() {
    let mut s = swarm(3);
    add_service(&mut s, "web", ServiceMode::Replicated(3), &[]);
    converge(&mut s, &|_| true);
    assert_eq!(
        active_nodes(&s, "web"),
        vec![Some(NodeId(1)), Some(NodeId(2)), Some(NodeId(3))]
    );
    let ips: BTreeSet<_> = s.tasks.values().map(|t| t.addresses["web"]).collect();
    assert_eq!(ips.len(), 3);
    assert!(
        !ips.contains(&s.services["web"].vips["web"]),
        "task IPs never take the VIP"
    );
}

#[test]
fn a_dead_or_drained_node_loses_its_tasks_to_the_others() {
    let mut s = swarm(3);
    add_service(&mut s, "web", ServiceMode::Replicated(3), &[]);
    converge(&mut s, &|_| true);
    converge(&mut s, &|n| n != NodeId(3));
    assert_eq!(active_nodes(&s, "web").len(), 3);
    assert!(!active_nodes(&s, "web").contains(&Some(NodeId(3))));
    apply(
        &mut s,
        &Command::UpdateNode {
            node: NodeId(2),
            availability: Some(Availability::Drain),
            label_add: vec![],
            label_rm: vec![],
        },
    )
    .unwrap();
    converge(&mut s, &|n| n != NodeId(3));
    assert_eq!(
        active_nodes(&s, "web"),
        vec![Some(NodeId(1)), Some(NodeId(1)), Some(NodeId(1))]
    );
}

#[test]
fn scaling_down_stops_the_highest_slots_and_global_follows_nodes() {
    let mut s = swarm(3);
    add_service(&mut s, "web", ServiceMode::Replicated(3), &[]);
    converge(&mut s, &|_| true);
    if let Some(svc) = s.services.get_mut("web") {
        svc.spec.mode = ServiceMode::Replicated(1);
    }
    converge(&mut s, &|_| true);
    let slots: Vec<_> = s
        .tasks
        .values()
        .filter(|t| t.is_active())
        .map(|t| t.slot)
        .collect();
    assert_eq!(slots, vec![Some(1)]);
    add_service(&mut s, "agent", ServiceMode::Global, &["node.role==worker"]);
    converge(&mut s, &|_| true);
    assert_eq!(
        active_nodes(&s, "agent"),
        vec![Some(NodeId(2)), Some(NodeId(3))]
    );
}

#[test]
fn a_task_that_fits_nowhere_stays_pending_and_says_why() {
    let mut s = swarm(2);
    add_service(
        &mut s,
        "gpu",
        ServiceMode::Replicated(1),
        &["node.labels.gpu==yes"],
    );
    converge(&mut s, &|_| true);
    let t = s.tasks.values().next().unwrap();
    assert_eq!(t.state, TaskState::Pending);
    assert!(t.message.contains("node.labels.gpu==yes"), "{}", t.message);
    apply(
        &mut s,
        &Command::UpdateNode {
            node: NodeId(2),
            availability: None,
            label_add: vec![("gpu".into(), "yes".into())],
            label_rm: vec![],
        },
    )
    .unwrap();
    converge(&mut s, &|_| true);
    let t = s.tasks.values().next().unwrap();
    assert_eq!((t.state, t.node), (TaskState::Assigned, Some(NodeId(2))));
}

#[test]
fn task_states_only_move_forward() {
    let mut s = swarm(1);
    add_service(&mut s, "web", ServiceMode::Replicated(1), &[]);
    converge(&mut s, &|_| true);
    let id = s.tasks.keys().next().unwrap().clone();
    let set = |st| Command::SetTaskState {
        id: id.clone(),
        state: st,
        message: String::new(),
        exit_code: None,
        now_ms: 1,
    };
    apply(&mut s, &set(TaskState::Running)).unwrap();
    assert!(apply(&mut s, &set(TaskState::Starting)).is_err());
    apply(&mut s, &set(TaskState::Failed)).unwrap();
    assert!(apply(&mut s, &set(TaskState::Running)).is_err());
    // The failed task is replaced in its slot, after the restart delay.
    let fresh = |s: &ClusterState, now| orchestrate(s, &|_| true, &mut || "x".into(), now);
    assert!(fresh(&s, 1 + RESTART_DELAY_MS - 1).is_empty());
    let cmds = fresh(&s, 1 + RESTART_DELAY_MS);
    assert!(
        matches!(cmds.as_slice(), [Command::AddTask { slot: Some(1), .. }]),
        "{cmds:?}"
    );
}

#[test]
fn a_crash_looping_task_keeps_a_bounded_history() {
    let mut s = swarm(1);
    add_service(&mut s, "web", ServiceMode::Replicated(1), &[]);
    let mut now = 0;
    for i in 0..20 {
        let cmds = orchestrate(&s, &|_| true, &mut || format!("r{i}"), now);
        for c in cmds {
            apply(&mut s, &c).unwrap();
        }
        let id = format!("r{i}");
        if s.tasks.contains_key(&id) {
            let fail = Command::SetTaskState {
                id,
                state: TaskState::Failed,
                message: "boom".into(),
                exit_code: Some(1),
                now_ms: now,
            };
            apply(&mut s, &fail).unwrap();
        }
        now += RESTART_DELAY_MS;
    }
    assert!(
        s.tasks.len() <= TASK_HISTORY + 1,
        "{} tasks kept",
        s.tasks.len()
    );
}
