use std::collections::BTreeSet;

use super::*;
use shoal_mesh::TaskId;
use shoal_mesh::task::Task;

const ME: NodeId = NodeId(1);

fn task(id: &str, node: u64, desired: DesiredState, state: TaskState) -> Task {
    Task {
        id: id.into(),
        service_id: "svc".into(),
        slot: Some(1),
        node: Some(NodeId(node)),
        desired,
        state,
        addresses: BTreeMap::new(),
        message: String::new(),
        exit_code: None,
        spec_version: 1,
        restarts: 0,
        created_at_ms: 0,
        updated_at_ms: 0,
    }
}

fn store(tasks: Vec<Task>) -> ClusterState {
    let mut s = ClusterState::default();
    for t in tasks {
        s.tasks.insert(t.id.clone(), t);
    }
    s
}

fn running() -> Supervision {
    Supervision {
        ended: None,
        stopping: None,
    }
}

/// `acts` is one report: `task` failed, saying `why`.
fn assert_failed(acts: &[ExecAction], task: &str, why: &str) {
    match acts {
        [
            ExecAction::Report {
                task: t,
                state: TaskState::Failed,
                message,
                ..
            },
        ] if t == task => assert!(message.contains(why), "{message}"),
        other => panic!("expected {task} to fail ({why}): {other:?}"),
    }
}

fn no_dataplane() -> SandboxView {
    SandboxView::default()
}

#[test]
fn an_assigned_task_starts_and_one_placed_elsewhere_does_not() {
    let s = store(vec![
        task("a", 1, DesiredState::Running, TaskState::Assigned),
        task("b", 2, DesiredState::Running, TaskState::Assigned),
        task("c", 1, DesiredState::Shutdown, TaskState::Assigned),
    ]);
    let mut d = Decider::default();
    let acts = d.decide(&s, ME, &BTreeMap::new(), &no_dataplane(), Instant::now());
    assert_eq!(acts, vec![ExecAction::Start("a".into())]);
}

#[test]
fn a_task_waits_for_its_sandbox_then_fails_naming_why() {
    let s = store(vec![task(
        "a",
        1,
        DesiredState::Running,
        TaskState::Assigned,
    )]);
    let mut view = SandboxView {
        enabled: true,
        ready: BTreeSet::new(),
        error: Some("nft: permission denied".into()),
    };
    let mut d = Decider::default();
    let t0 = Instant::now();
    let none = BTreeMap::new();
    assert_eq!(d.next_deadline(&s, []), None);
    assert!(d.decide(&s, ME, &none, &view, t0).is_empty());
    // The executor sleeps until then, when nothing else wakes it.
    assert_eq!(d.next_deadline(&s, []), Some(t0 + SANDBOX_WAIT));
    assert!(d.decide(&s, ME, &none, &view, t0 + SANDBOX_WAIT).is_empty());
    let acts = d.decide(
        &s,
        ME,
        &none,
        &view,
        t0 + SANDBOX_WAIT + Duration::from_secs(1),
    );
    assert_failed(&acts, "a", "not ready within 30 s: nft: permission denied");
    // Ready before the deadline: it starts.
    let mut d = Decider::default();
    assert!(d.decide(&s, ME, &none, &view, t0).is_empty());
    view.ready.insert("a".into());
    let acts = d.decide(&s, ME, &none, &view, t0 + Duration::from_secs(1));
    assert_eq!(acts, vec![ExecAction::Start("a".into())]);
}

#[test]
fn an_ended_task_is_reported_with_its_exit_unless_it_was_stopped() {
    let s = store(vec![
        task("a", 1, DesiredState::Running, TaskState::Running),
        task("b", 1, DesiredState::Shutdown, TaskState::Running),
        task("c", 1, DesiredState::Running, TaskState::Failed),
    ]);
    let exit = Exit {
        state: TaskState::Failed,
        message: "exited with status 3".into(),
        code: Some(3),
    };
    let ended = |stopping| Supervision {
        ended: Some(exit.clone()),
        stopping,
    };
    let t0 = Instant::now();
    let sup = BTreeMap::from([
        (TaskId::from("a"), ended(None)),
        (TaskId::from("b"), ended(Some(t0))),
        (TaskId::from("c"), ended(None)),
    ]);
    let acts = Decider::default().decide(&s, ME, &sup, &no_dataplane(), t0);
    assert_eq!(
        acts,
        vec![
            ExecAction::Forget("a".into()),
            ExecAction::Report {
                task: "a".into(),
                state: TaskState::Failed,
                message: "exited with status 3".into(),
                exit_code: Some(3),
            },
            ExecAction::Forget("b".into()),
            ExecAction::Report {
                task: "b".into(),
                state: TaskState::Shutdown,
                message: "stopped".into(),
                exit_code: Some(3),
            },
            // c's end is in the store already: only forgotten.
            ExecAction::Forget("c".into()),
        ]
    );
}

#[test]
fn an_unwanted_task_is_stopped_once_then_killed_when_overdue() {
    let s = store(vec![task(
        "a",
        1,
        DesiredState::Shutdown,
        TaskState::Running,
    )]);
    let t0 = Instant::now();
    let mut d = Decider::default();
    let sup = BTreeMap::from([(TaskId::from("a"), running())]);
    assert_eq!(
        d.decide(&s, ME, &sup, &no_dataplane(), t0),
        vec![ExecAction::Stop("a".into())]
    );
    let stopping = BTreeMap::from([(
        TaskId::from("a"),
        Supervision {
            ended: None,
            stopping: Some(t0),
        },
    )]);
    assert!(
        d.decide(&s, ME, &stopping, &no_dataplane(), t0 + STOP_GRACE)
            .is_empty()
    );
    // The executor wakes when the grace runs out.
    let a = TaskId::from("a");
    assert_eq!(d.next_deadline(&s, [(&a, t0)]), Some(t0 + KILL_AFTER));
    assert_eq!(
        d.decide(
            &s,
            ME,
            &stopping,
            &no_dataplane(),
            t0 + KILL_AFTER + Duration::from_secs(1)
        ),
        vec![ExecAction::Kill("a".into())]
    );
    // A task the store forgot is stopped too.
    let gone = store(vec![]);
    assert_eq!(
        d.decide(&gone, ME, &sup, &no_dataplane(), t0),
        vec![ExecAction::Stop("a".into())]
    );
}

#[test]
fn a_running_process_the_store_does_not_show_running_is_reported_again() {
    let s = store(vec![task(
        "a",
        1,
        DesiredState::Running,
        TaskState::Starting,
    )]);
    let sup = BTreeMap::from([(TaskId::from("a"), running())]);
    let acts = Decider::default().decide(&s, ME, &sup, &no_dataplane(), Instant::now());
    assert_eq!(
        acts,
        vec![ExecAction::Report {
            task: "a".into(),
            state: TaskState::Running,
            message: String::new(),
            exit_code: None,
        }]
    );
}

#[test]
fn a_task_the_store_shows_running_without_a_process_here_failed() {
    // After a restart that did not re-adopt it.
    let s = store(vec![task(
        "a",
        1,
        DesiredState::Running,
        TaskState::Running,
    )]);
    let acts = Decider::default().decide(&s, ME, &BTreeMap::new(), &no_dataplane(), Instant::now());
    assert_failed(&acts, "a", "process was gone");
}

#[test]
fn a_task_that_could_not_start_tries_again_after_a_doubling_wait() {
    let s = store(vec![task(
        "a",
        1,
        DesiredState::Running,
        TaskState::Assigned,
    )]);
    let mut d = Decider::default();
    let t0 = Instant::now();
    let none = BTreeMap::new();
    let start = vec![ExecAction::Start("a".into())];
    assert_eq!(d.decide(&s, ME, &none, &no_dataplane(), t0), start);
    // containerd did not answer: 1 s, then 2 s, 4 s… up to a minute.
    assert_eq!(d.retry_later(&"a".into(), t0), Duration::from_secs(1));
    assert!(d.decide(&s, ME, &none, &no_dataplane(), t0).is_empty());
    let t1 = t0 + Duration::from_secs(1);
    assert_eq!(d.decide(&s, ME, &none, &no_dataplane(), t1), start);
    assert_eq!(d.retry_later(&"a".into(), t1), Duration::from_secs(2));
    let almost = t1 + Duration::from_millis(1999);
    assert!(d.decide(&s, ME, &none, &no_dataplane(), almost).is_empty());
    let mut t = t1;
    for _ in 0..10 {
        t += d.retry_later(&"a".into(), t);
    }
    assert_eq!(d.retry_later(&"a".into(), t), RETRY_MAX);
    // Once it runs, its next failure to start waits 1 s again.
    let sup = BTreeMap::from([(TaskId::from("a"), running())]);
    d.decide(&s, ME, &sup, &no_dataplane(), t);
    assert_eq!(d.retry_later(&"a".into(), t), Duration::from_secs(1));
}

#[test]
fn a_retry_is_a_deadline_too() {
    let s = store(vec![task(
        "a",
        1,
        DesiredState::Running,
        TaskState::Assigned,
    )]);
    let (mut d, t0) = (Decider::default(), Instant::now());
    let wait = d.retry_later(&"a".into(), t0);
    assert_eq!(wait, RETRY_FIRST);
    assert_eq!(d.next_deadline(&s, []), Some(t0 + RETRY_FIRST));
    // The earliest of several.
    let b = TaskId::from("b");
    assert_eq!(
        d.next_deadline(&s, [(&b, t0 - KILL_AFTER)]),
        Some(t0),
        "a grace already over comes first"
    );
}
