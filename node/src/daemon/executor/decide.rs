//! The executor's decisions, pure: from the store, what this node's
//! supervisors report and which sandboxes the data plane has ready, what to
//! start, stop, kill and report. No processes, files or clock reads here;
//! the driver (`mod.rs`) observes, calls [`Decider::decide`] and carries
//! out the [`ExecAction`]s in order.
//!
//! ```text
//!  store tasks ─────────────┐
//!  supervised (ended? how?) ├─► Decider::decide(now) ─► [Report | Forget | Start | Stop | Kill]
//!  ready sandboxes ─────────┘
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use shoal_mesh::task::{DesiredState, TaskState};
use shoal_mesh::{ClusterState, NodeId, TaskId};

pub use super::super::sandboxes::SandboxView;

/// How long a task waits for its network sandbox before it fails.
pub const SANDBOX_WAIT: Duration = Duration::from_secs(30);

/// Time a task gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// A stop not done this long after SIGTERM is forced: the task's own
/// grace and a little for its supervisor.
pub const KILL_AFTER: Duration = Duration::from_secs(15);

/// How a task's process ended, from its supervisor's exit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// Complete or failed.
    pub state: TaskState,
    /// What to show.
    pub message: String,
    /// Its exit status, when it exited.
    pub code: Option<i32>,
}

/// What the driver sees of one supervised task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Supervision {
    /// How it ended, once it has.
    pub ended: Option<Exit>,
    /// When it was asked to stop.
    pub stopping: Option<Instant>,
}

/// One thing for the driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecAction {
    /// Record a task's state in the store.
    Report {
        /// The task.
        task: TaskId,
        /// Its state.
        state: TaskState,
        /// Why.
        message: String,
        /// Its exit status.
        exit_code: Option<i32>,
    },
    /// Stop watching a task whose process ended.
    Forget(TaskId),
    /// Start a task (its sandbox is ready); the driver reports how it went.
    Start(TaskId),
    /// Ask a running task to stop (SIGTERM).
    Stop(TaskId),
    /// Kill a task that did not stop in time (SIGKILL).
    Kill(TaskId),
}

/// How long after its stop signal task `id` is killed: a container's stop
/// grace period (`--stop-grace-period`, [`STOP_GRACE`] otherwise), or for
/// a host program its shim's grace and a little ([`KILL_AFTER`]).
pub fn kill_after(state: &ClusterState, id: &TaskId) -> Duration {
    let container = state
        .tasks
        .get(id)
        .and_then(|t| state.services.get(&t.service_id))
        .and_then(|s| s.spec.container.as_ref());
    match container {
        Some(c) => c.stop_grace_ms.map_or(STOP_GRACE, Duration::from_millis),
        None => KILL_AFTER,
    }
}

fn report(task: &TaskId, state: TaskState, message: impl Into<String>) -> ExecAction {
    ExecAction::Report {
        task: task.clone(),
        state,
        message: message.into(),
        exit_code: None,
    }
}

/// The first wait before a task that could not start tries again; each
/// try doubles it, up to [`RETRY_MAX`].
pub const RETRY_FIRST: Duration = Duration::from_secs(1);

/// The longest wait between two tries to start a task.
pub const RETRY_MAX: Duration = Duration::from_secs(60);

/// The executor's memory between passes: since when each task waits for
/// its sandbox, and when a task that could not start tries again.
#[derive(Debug, Default)]
pub struct Decider {
    waiting: BTreeMap<TaskId, Instant>,
    /// Task → (when it may try again, tries so far).
    retry: BTreeMap<TaskId, (Instant, u32)>,
}

impl Decider {
    /// Task `id` could not start for a reason that may pass (containerd or
    /// a registry away): it is not started again before the returned wait,
    /// which doubles with each try (1 s, 2 s, … 60 s).
    pub fn retry_later(&mut self, id: &TaskId, now: Instant) -> Duration {
        let tries = self.retry.get(id).map_or(0, |(_, n)| *n);
        let wait = RETRY_FIRST
            .saturating_mul(1 << tries.min(16))
            .min(RETRY_MAX);
        self.retry
            .insert(id.clone(), (now + wait, tries.saturating_add(1)));
        wait
    }

    /// When the next of its delays runs out, after which [`Self::decide`]
    /// acts without anything else changing: the grace of a task asked to
    /// stop at the time given (`stopping`), a task's wait for its sandbox,
    /// a retry.
    pub fn next_deadline<'a>(
        &self,
        state: &ClusterState,
        stopping: impl IntoIterator<Item = (&'a TaskId, Instant)>,
    ) -> Option<Instant> {
        let graces = stopping
            .into_iter()
            .map(|(id, t)| t + kill_after(state, id));
        let sandboxes = self.waiting.values().map(|t| *t + SANDBOX_WAIT);
        let retries = self.retry.values().map(|(at, _)| *at);
        graces.chain(sandboxes).chain(retries).min()
    }

    /// What to do now on node `me`.
    pub fn decide(
        &mut self,
        state: &ClusterState,
        me: NodeId,
        supervised: &BTreeMap<TaskId, Supervision>,
        sandboxes: &SandboxView,
        now: Instant,
    ) -> Vec<ExecAction> {
        let mut out = Vec::new();
        self.waiting.retain(|id, _| state.tasks.contains_key(id));
        self.retry
            .retain(|id, _| state.tasks.contains_key(id) && !supervised.contains_key(id));
        for (id, s) in supervised {
            let task = state.tasks.get(id);
            let wanted = task.is_some_and(|t| t.desired == DesiredState::Running);
            match &s.ended {
                // Ended: reported unless the store has it ended already.
                Some(exit) => {
                    out.push(ExecAction::Forget(id.clone()));
                    if task.is_some_and(|t| !t.state.is_terminal()) {
                        let (st, message) = if wanted && s.stopping.is_none() {
                            (exit.state, exit.message.clone())
                        } else {
                            (TaskState::Shutdown, "stopped".to_owned())
                        };
                        out.push(ExecAction::Report {
                            task: id.clone(),
                            state: st,
                            message,
                            exit_code: exit.code,
                        });
                    }
                }
                None => {
                    // A running process whose state did not reach the store
                    // (a write lost to a leader change) is reported again.
                    let unreported = task.is_some_and(|t| {
                        matches!(t.state, TaskState::Assigned | TaskState::Starting)
                    });
                    if s.stopping.is_none() && unreported {
                        out.push(report(id, TaskState::Running, ""));
                    }
                    match s.stopping {
                        None if !wanted => out.push(ExecAction::Stop(id.clone())),
                        Some(t) if now.saturating_duration_since(t) > kill_after(state, id) => {
                            out.push(ExecAction::Kill(id.clone()));
                        }
                        _ => {}
                    }
                }
            }
        }
        let mine = state.tasks_on(me).filter(|t| {
            t.desired == DesiredState::Running
                && matches!(
                    t.state,
                    TaskState::Assigned | TaskState::Starting | TaskState::Running
                )
                && !supervised.contains_key(&t.id)
        });
        for t in mine {
            if t.state != TaskState::Assigned {
                // Its process is gone (not re-adopted at start).
                let msg = "its process was gone when the node's daemon restarted";
                out.push(report(&t.id, TaskState::Failed, msg));
                continue;
            }
            if !sandboxes.enabled || sandboxes.ready.contains(&t.id) {
                self.waiting.remove(&t.id);
                if self.retry.get(&t.id).is_none_or(|(at, _)| now >= *at) {
                    out.push(ExecAction::Start(t.id.clone()));
                }
                continue;
            }
            let since = *self.waiting.entry(t.id.clone()).or_insert(now);
            if now.saturating_duration_since(since) > SANDBOX_WAIT {
                self.waiting.remove(&t.id);
                let why = sandboxes
                    .error
                    .clone()
                    .unwrap_or_else(|| "the data plane has not programmed it".into());
                let msg = format!("its network sandbox was not ready within 30 s: {why}");
                out.push(report(&t.id, TaskState::Failed, msg));
            }
        }
        out
    }
}

#[cfg(test)]
#[path = "decide_test.rs"]
mod tests;
