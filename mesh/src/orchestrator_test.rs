use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::apply::ApplyError;
use crate::apply::apply;
use crate::ids::TaskId;
use crate::service::RestartCondition;
use crate::service::{Attachment, EndpointMode, ServiceSpec};
use crate::task::{DesiredState, TaskReport};
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
        restart: Default::default(),
        update: Default::default(),
        container: None,
        ext: Default::default(),
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
    // The drained node's task is replaced once it has stopped (stop first).
    execute(&mut s, 0);
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
    assert!(
        fresh(
            &s,
            1 + crate::service::RestartPolicy::default().delay_ms - 1
        )
        .is_empty()
    );
    let cmds = fresh(&s, 1 + crate::service::RestartPolicy::default().delay_ms);
    assert!(
        matches!(cmds.as_slice(), [Command::AddTask { slot: Some(1), .. }]),
        "{cmds:?}"
    );
    // The waiting pass says when it has work, so the leader need not look
    // before then.
    let delay = crate::service::RestartPolicy::default().delay_ms;
    let (cmds, due) = orchestrate_due(&s, &|_| true, &mut || "x".into(), 2);
    assert!(cmds.is_empty());
    assert_eq!(due, Some(1 + delay));
}

#[test]
fn a_node_reports_only_its_own_tasks_with_a_bounded_message() {
    let mut s = swarm(2);
    add_service(&mut s, "web", ServiceMode::Replicated(1), &[]);
    converge(&mut s, &|_| true);
    let t = s.tasks.values().next().unwrap().clone();
    let owner = t.node.unwrap();
    let other = *s.nodes.keys().find(|n| **n != owner).unwrap();
    let report = |node, message: &str| Command::ReportTask {
        node,
        report: TaskReport {
            id: t.id.clone(),
            state: TaskState::Running,
            message: message.into(),
            exit_code: None,
            now_ms: 5,
        },
    };
    let before = s.clone();
    assert_eq!(
        apply(&mut s, &report(other, "")),
        Err(ApplyError::NotAssigned {
            task: t.id.to_string(),
            node: other
        })
    );
    let long = "x".repeat(TaskReport::MAX_MESSAGE + 1);
    assert!(matches!(
        apply(&mut s, &report(owner, &long)),
        Err(ApplyError::OutOfBounds(_))
    ));
    assert_eq!(s, before, "a refused report changes nothing");
    apply(&mut s, &report(owner, "up")).unwrap();
    assert_eq!(s.tasks[&t.id].state, TaskState::Running);
    // The executor's constructor cuts a long message to what apply takes.
    let cut = TaskReport::new(t.id.clone(), TaskState::Failed, "é".repeat(2000), None, 6);
    assert!(cut.message.len() <= TaskReport::MAX_MESSAGE && cut.message.ends_with('…'));
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
                id: id.into(),
                state: TaskState::Failed,
                message: "boom".into(),
                exit_code: Some(1),
                now_ms: now,
            };
            apply(&mut s, &fail).unwrap();
        }
        now += crate::service::RestartPolicy::default().delay_ms;
    }
    assert!(
        s.tasks.len() <= TASK_HISTORY + 1,
        "{} tasks kept",
        s.tasks.len()
    );
}

/// One orchestrator pass at `now`, applied; returns the commands.
fn step(s: &mut ClusterState, now: u64, live: &dyn Fn(NodeId) -> bool) -> Vec<Command> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let cmds = orchestrate(
        s,
        live,
        &mut || {
            format!(
                "s{}",
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            )
        },
        now,
    );
    for c in &cmds {
        apply(s, c).unwrap();
    }
    cmds
}

/// What an executor does: assigned tasks run, tasks wanted down stop.
fn execute(s: &mut ClusterState, now: u64) {
    let cmds: Vec<Command> = s
        .tasks
        .values()
        .filter_map(|t| {
            let to = match (t.desired, t.state) {
                (DesiredState::Running, TaskState::Assigned) => TaskState::Running,
                (DesiredState::Shutdown, st) if !st.is_terminal() => TaskState::Shutdown,
                _ => return None,
            };
            Some(Command::SetTaskState {
                id: t.id.clone(),
                state: to,
                message: String::new(),
                exit_code: None,
                now_ms: now,
            })
        })
        .collect();
    for c in cmds {
        apply(s, &c).unwrap();
    }
}

fn exit_all(s: &mut ClusterState, state: TaskState, now: u64) {
    let ids: Vec<TaskId> = s
        .tasks
        .values()
        .filter(|t| t.state == TaskState::Running)
        .map(|t| t.id.clone())
        .collect();
    for id in ids {
        let c = Command::SetTaskState {
            id,
            state,
            message: "exited".into(),
            exit_code: Some(i32::from(state == TaskState::Failed)),
            now_ms: now,
        };
        apply(s, &c).unwrap();
    }
}

fn running(s: &ClusterState) -> usize {
    s.tasks
        .values()
        .filter(|t| t.state == TaskState::Running && t.is_active())
        .count()
}

fn set_restart(s: &mut ClusterState, condition: RestartCondition, max_attempts: u64) {
    let svc = s.services.get_mut("web").unwrap();
    svc.spec.restart.condition = condition;
    svc.spec.restart.max_attempts = max_attempts;
}

#[test]
fn restart_condition_none_leaves_ended_tasks_ended() {
    let mut s = swarm(2);
    add_service(&mut s, "web", ServiceMode::Replicated(2), &[]);
    set_restart(&mut s, RestartCondition::None, 0);
    step(&mut s, 0, &|_| true);
    execute(&mut s, 0);
    exit_all(&mut s, TaskState::Failed, 10);
    assert!(step(&mut s, 100_000, &|_| true).is_empty());
    assert_eq!(running(&s), 0);
}

#[test]
fn restart_on_failure_restarts_failures_only_and_stops_after_max_attempts() {
    let mut s = swarm(1);
    add_service(&mut s, "web", ServiceMode::Replicated(1), &[]);
    set_restart(&mut s, RestartCondition::OnFailure, 2);
    let mut now = 0;
    step(&mut s, now, &|_| true);
    execute(&mut s, now);
    // Exits 0: not restarted.
    exit_all(&mut s, TaskState::Complete, now);
    now += 10_000;
    assert!(step(&mut s, now, &|_| true).is_empty());
    // A failure is restarted, twice, then the slot stays empty.
    set_restart(&mut s, RestartCondition::Any, 2);
    let mut restarts = Vec::new();
    for _ in 0..4 {
        now += 10_000;
        for c in step(&mut s, now, &|_| true) {
            if let Command::AddTask { restarts: r, .. } = c {
                restarts.push(r);
            }
        }
        execute(&mut s, now);
        exit_all(&mut s, TaskState::Failed, now);
    }
    assert_eq!(restarts, vec![1, 2]);
    // Not restarted before the delay, either.
    let mut s = swarm(1);
    add_service(&mut s, "web", ServiceMode::Replicated(1), &[]);
    step(&mut s, 0, &|_| true);
    execute(&mut s, 0);
    exit_all(&mut s, TaskState::Failed, 1);
    assert!(step(&mut s, 4_000, &|_| true).is_empty());
    assert_eq!(step(&mut s, 5_001, &|_| true).len(), 1);
}

fn update(s: &mut ClusterState, f: impl FnOnce(&mut ServiceSpec), force: bool, now: u64) {
    let mut spec = s.services["web"].spec.clone();
    f(&mut spec);
    let c = Command::UpdateService {
        id: "web".into(),
        spec,
        force,
        now_ms: now,
    };
    apply(s, &c).unwrap();
}

fn versions(s: &ClusterState) -> Vec<u64> {
    let mut v: Vec<u64> = s
        .tasks
        .values()
        .filter(|t| t.is_active())
        .map(|t| t.spec_version)
        .collect();
    v.sort();
    v
}

#[test]
fn an_update_rolls_out_in_batches_after_each_batch_runs_and_the_delay() {
    let mut s = swarm(3);
    add_service(&mut s, "web", ServiceMode::Replicated(4), &[]);
    step(&mut s, 0, &|_| true);
    execute(&mut s, 0);
    let vip = s.services["web"].vips.clone();
    // Labels only: no new version, nothing replaced.
    update(
        &mut s,
        |sp| {
            sp.labels.insert("a".into(), "b".into());
        },
        false,
        1,
    );
    assert_eq!(s.services["web"].version, 1);
    assert!(step(&mut s, 2, &|_| true).is_empty());
    update(
        &mut s,
        |sp| {
            sp.env.insert("V".into(), "2".into());
            sp.update.parallelism = 2;
            sp.update.delay_ms = 1_000;
        },
        false,
        10,
    );
    assert_eq!(s.services["web"].version, 2);
    assert_eq!(s.services["web"].vips, vip, "an update keeps the VIPs");
    // First batch: two stop, and are not replaced until they have stopped.
    let cmds = step(&mut s, 20, &|_| true);
    assert_eq!(cmds.len(), 2, "{cmds:?}");
    assert!(
        cmds.iter()
            .all(|c| matches!(c, Command::ShutdownTask { .. }))
    );
    assert!(step(&mut s, 21, &|_| true).is_empty());
    execute(&mut s, 30);
    let cmds = step(&mut s, 40, &|_| true);
    assert_eq!(cmds.len(), 2, "{cmds:?}");
    assert!(cmds.iter().all(|c| matches!(c, Command::AddTask { .. })));
    // Not running yet: no next batch.
    assert!(step(&mut s, 50, &|_| true).is_empty());
    execute(&mut s, 60);
    assert_eq!(versions(&s), vec![1, 1, 2, 2]);
    // Running since 60: the next batch waits for the delay, which the
    // pass names.
    let (cmds, due) = orchestrate_due(&s, &|_| true, &mut || "x".into(), 1_059);
    assert!(cmds.is_empty());
    assert_eq!(due, Some(1_060));
    assert!(step(&mut s, 1_059, &|_| true).is_empty());
    assert_eq!(step(&mut s, 1_060, &|_| true).len(), 2);
    execute(&mut s, 1_070);
    step(&mut s, 1_080, &|_| true);
    execute(&mut s, 1_090);
    assert_eq!(versions(&s), vec![2, 2, 2, 2]);
    assert!(step(&mut s, 100_000, &|_| true).is_empty());
    // Converged: nothing is due, only a change brings work.
    assert_eq!(
        orchestrate_due(&s, &|_| true, &mut || "x".into(), 100_000).1,
        None
    );
    // --force replaces everything again, all at once with parallelism 0.
    update(&mut s, |sp| sp.update.parallelism = 0, true, 200_000);
    assert_eq!(step(&mut s, 200_001, &|_| true).len(), 4);
}

#[test]
fn a_failing_new_version_pauses_the_update() {
    let mut s = swarm(2);
    add_service(&mut s, "web", ServiceMode::Replicated(3), &[]);
    step(&mut s, 0, &|_| true);
    execute(&mut s, 0);
    update(&mut s, |sp| sp.command = vec!["false".into()], false, 10);
    step(&mut s, 20, &|_| true);
    execute(&mut s, 30);
    step(&mut s, 40, &|_| true);
    execute(&mut s, 50);
    // The new task fails.
    let new: Vec<TaskId> = s
        .tasks
        .values()
        .filter(|t| t.spec_version == 2)
        .map(|t| t.id.clone())
        .collect();
    assert_eq!(new.len(), 1);
    let c = Command::SetTaskState {
        id: new[0].clone(),
        state: TaskState::Failed,
        message: "exited with status 1".into(),
        exit_code: Some(1),
        now_ms: 60,
    };
    apply(&mut s, &c).unwrap();
    let why = update_paused(&s, &s.services["web"]).unwrap();
    assert!(
        why.contains("update paused") && why.contains("status 1"),
        "{why}"
    );
    // Nothing more of the old version is stopped, even much later.
    for now in [100, 10_000, 100_000] {
        for c in step(&mut s, now, &|_| true) {
            assert!(!matches!(c, Command::ShutdownTask { .. }), "{c:?}");
        }
        execute(&mut s, now);
    }
    assert_eq!(
        s.tasks
            .values()
            .filter(|t| t.is_active() && t.spec_version == 1)
            .count(),
        2
    );
}

#[test]
fn a_task_stopping_on_a_live_node_holds_its_slot_but_one_on_a_dead_node_does_not() {
    let mut s = swarm(2);
    add_service(&mut s, "web", ServiceMode::Replicated(2), &[]);
    step(&mut s, 0, &|_| true);
    execute(&mut s, 0);
    // Node 2 is drained: its task stops first, then is replaced.
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
    let cmds = step(&mut s, 10, &|_| true);
    assert!(
        matches!(cmds.as_slice(), [Command::ShutdownTask { .. }]),
        "{cmds:?}"
    );
    assert!(step(&mut s, 20, &|_| true).is_empty());
    // If it never stops, the replacement starts after the stop timeout.
    assert_eq!(step(&mut s, 10 + STOP_TIMEOUT_MS, &|_| true).len(), 1);
    // Node 1 dies: its tasks are replaced at once (on node 2, undrained).
    let mut s = swarm(2);
    add_service(&mut s, "web", ServiceMode::Replicated(2), &[]);
    step(&mut s, 0, &|_| true);
    execute(&mut s, 0);
    let cmds = step(&mut s, 10, &|n| n != NodeId(1));
    assert_eq!(
        cmds.len(),
        2,
        "shutdown and replacement in one pass: {cmds:?}"
    );
}

#[test]
fn an_update_cannot_change_the_mode_or_take_a_used_port() {
    let mut s = swarm(1);
    add_service(&mut s, "web", ServiceMode::Replicated(1), &[]);
    let mut spec = s.services["web"].spec.clone();
    spec.mode = ServiceMode::Global;
    let c = Command::UpdateService {
        id: "web".into(),
        spec,
        force: false,
        now_ms: 0,
    };
    let e = apply(&mut s, &c).unwrap_err().to_string();
    assert!(e.contains("mode"), "{e}");
    let before = s.clone();
    let mut spec = s.services["web"].spec.clone();
    spec.name = "other".into();
    spec.ports = vec![crate::service::PortSpec {
        mode: crate::service::PublishMode::Ingress,
        published: Some(8080),
        target: 80,
        protocol: crate::service::Protocol::Tcp,
    }];
    apply(
        &mut s,
        &Command::CreateService {
            id: "other".into(),
            spec,
            created_at_ms: 0,
        },
    )
    .unwrap();
    let taken = s.clone();
    let mut spec = s.services["web"].spec.clone();
    spec.ports = s.services["other"].spec.ports.clone();
    let c = Command::UpdateService {
        id: "web".into(),
        spec,
        force: false,
        now_ms: 0,
    };
    let e = apply(&mut s, &c).unwrap_err().to_string();
    assert!(e.contains("8080"), "{e}");
    assert_eq!(s, taken, "a refused update changes nothing");
    assert_ne!(s, before);
}

#[test]
fn a_second_orchestrator_cannot_fill_a_slot_twice() {
    let mut s = swarm(2);
    add_service(&mut s, "web", ServiceMode::Replicated(1), &[]);
    // Two leaders compute from the same state: both propose a task for slot 1.
    let a = orchestrate(&s, &|_| true, &mut || "a".into(), 0);
    let b = orchestrate(&s, &|_| true, &mut || "b".into(), 0);
    for c in &a {
        apply(&mut s, c).unwrap();
    }
    let before = s.clone();
    for c in &b {
        let e = apply(&mut s, c).unwrap_err().to_string();
        assert!(e.contains("slot 1 already has an active task"), "{e}");
    }
    assert_eq!(s, before);
    assert_eq!(s.tasks.values().filter(|t| t.is_active()).count(), 1);
}

#[test]
fn the_store_vouches_only_for_a_nodes_own_tasks_under_their_own_names() {
    use crate::observed::{EndpointRecord, vouched};
    use std::net::IpAddr;

    let mut s = swarm(2);
    add_service(
        &mut s,
        "web",
        ServiceMode::Replicated(1),
        &["node.hostname==h2"],
    );
    add_service(
        &mut s,
        "db",
        ServiceMode::Replicated(1),
        &["node.hostname==h1"],
    );
    converge(&mut s, &|_| true);
    let task = |svc: &str| {
        s.tasks
            .values()
            .find(|t| t.service_id == svc)
            .unwrap()
            .clone()
    };
    let web = task("web");
    let owner = web.node.unwrap();
    let record = EndpointRecord {
        ip: IpAddr::V4(web.addresses["web"]),
        mac: "02:00:00:00:00:01".into(),
        name: s.task_name(&web),
        service_id: Some("web".into()),
        service_name: Some("web".into()),
        aliases: vec![],
        owner,
        vtep: "192.168.0.2".parse().unwrap(),
    };
    assert!(vouched(&s, "web", &web.id, owner, &record));
    // Written by another node, or claiming another node.
    let other = crate::ids::NodeId(1);
    assert!(!vouched(&s, "web", &web.id, other, &record));
    let mut moved = record.clone();
    moved.owner = other;
    assert!(!vouched(&s, "web", &web.id, other, &moved));
    // Its own task, but another service's name or ID, or another address.
    let mut renamed = record.clone();
    renamed.name = "db.1".into();
    assert!(!vouched(&s, "web", &web.id, owner, &renamed));
    let mut hijack = record.clone();
    hijack.service_id = Some("db".into());
    assert!(!vouched(&s, "web", &web.id, owner, &hijack));
    let mut elsewhere = record.clone();
    elsewhere.ip = IpAddr::V4(task("db").addresses["web"]);
    assert!(!vouched(&s, "web", &web.id, owner, &elsewhere));
    // A task of the store that runs on another node, or none at all.
    let db = task("db");
    assert!(!vouched(&s, "web", &db.id, owner, &record));
    assert!(!vouched(&s, "web", "nosuch", owner, &record));
    // A node's routing-mesh address is its own only.
    let mesh = EndpointRecord {
        ip: IpAddr::V4(s.ingress_addrs[&owner]),
        name: "h2".into(),
        service_id: None,
        service_name: None,
        ..record.clone()
    };
    assert!(vouched(&s, "ing", &format!("node-{owner}"), owner, &mesh));
    assert!(!vouched(&s, "ing", &format!("node-{other}"), owner, &mesh));
}

/// Service `id` becomes a container service reserving `bytes` of memory.
fn reserve_memory(s: &mut ClusterState, id: &str, bytes: u64) {
    use crate::service::{ContainerSpec, Resources};
    let mut spec = s.services[id].spec.clone();
    spec.container = Some(ContainerSpec {
        image: "busybox".into(),
        reservations: Resources {
            memory_bytes: Some(bytes),
            ..Default::default()
        },
        ..Default::default()
    });
    let update = Command::UpdateService {
        id: id.into(),
        spec,
        force: false,
        now_ms: 1,
    };
    apply(s, &update).unwrap();
}

#[test]
fn reservations_never_exceed_a_node_and_the_rest_wait_saying_why() {
    use crate::state::NodeResources;
    let mut s = swarm(3);
    let gib = 1u64 << 30;
    for n in 1..=3 {
        apply(
            &mut s,
            &Command::SetNodeResources {
                node: NodeId(n),
                resources: NodeResources {
                    nano_cpus: 2_000_000_000,
                    memory_bytes: 4 * gib,
                },
            },
        )
        .unwrap();
    }
    add_service(&mut s, "big", ServiceMode::Replicated(7), &[]);
    reserve_memory(&mut s, "big", 2 * gib);
    converge(&mut s, &|_| true);
    // Two of 2 GiB fit on each 4 GiB node: six placed, one pending.
    let placed = active_nodes(&s, "big");
    for n in 1..=3 {
        let on = placed.iter().filter(|p| **p == Some(NodeId(n))).count();
        assert_eq!(on, 2, "{placed:?}");
    }
    let pending: Vec<&Task> = s
        .tasks
        .values()
        .filter(|t| t.service_id == "big" && t.is_active() && t.node.is_none())
        .collect();
    assert_eq!(pending.len(), 1, "{placed:?}");
    assert_eq!(
        pending[0].message,
        "no suitable node (insufficient memory on 3 nodes)"
    );
    // A node that has not reported takes no task that reserves something.
    s.ext.node_resources.clear();
    add_service(&mut s, "plain", ServiceMode::Replicated(2), &[]);
    converge(&mut s, &|_| true);
    assert!(active_nodes(&s, "plain").iter().all(Option::is_some));
}

#[test]
fn a_global_task_waits_on_a_node_without_room_and_runs_once_it_has_some() {
    use crate::state::NodeResources;
    let mut s = swarm(3);
    let gib = 1u64 << 30;
    let report = |s: &mut ClusterState, n: u64, memory: u64| {
        apply(
            s,
            &Command::SetNodeResources {
                node: NodeId(n),
                resources: NodeResources {
                    nano_cpus: 2_000_000_000,
                    memory_bytes: memory * gib,
                },
            },
        )
        .unwrap();
    };
    report(&mut s, 1, 4);
    report(&mut s, 2, 4);
    report(&mut s, 3, 1);
    add_service(&mut s, "agent", ServiceMode::Global, &[]);
    reserve_memory(&mut s, "agent", 2 * gib);
    converge(&mut s, &|_| true);
    let active = |s: &ClusterState| -> Vec<Task> {
        s.tasks
            .values()
            .filter(|t| t.service_id == "agent" && t.is_active())
            .cloned()
            .collect()
    };
    // One task per node; the 1 GiB node's waits there, pending, saying
    // why, and holds nothing.
    let tasks = active(&s);
    assert_eq!(tasks.len(), 3, "{tasks:?}");
    let small = tasks.iter().find(|t| t.node == Some(NodeId(3))).unwrap();
    assert_eq!(small.state, TaskState::Pending);
    assert_eq!(
        small.message,
        "no suitable node (insufficient memory on 1 node)"
    );
    assert_eq!(reserved_on(&s, NodeId(3)), (0, 0));
    assert_eq!(reserved_on(&s, NodeId(1)), (0, 2 * gib));
    let waiting = small.id.clone();
    // Further passes change nothing: no second task for that node.
    assert!(
        orchestrate(&s, &|_| true, &mut || "x".into(), 5)
            .iter()
            .all(|c| !matches!(c, Command::AddTask { .. } | Command::AddPendingTask { .. })),
    );
    // The node grows: the same task is placed there.
    report(&mut s, 3, 8);
    converge(&mut s, &|_| true);
    let t = &s.tasks[&waiting];
    assert_eq!((t.node, t.state), (Some(NodeId(3)), TaskState::Assigned));
    assert_eq!(active(&s).len(), 3);
}
