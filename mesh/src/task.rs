//! Tasks: one replica of a service on one node, with an address on each of
//! the service's networks (allocated in `apply`, freed when the task is
//! removed).
//!
//! ```text
//!  new ─► pending ─► assigned ─► starting ─► running ─► complete | failed | shutdown
//!           (no node fits)  (executor)                   (terminal: never left)
//! ```

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::ids::{NetworkId, NodeId, ServiceId, TaskId};

/// Where a task is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Created, not yet placed.
    New,
    /// No node fits; the reason is in the message.
    Pending,
    /// Placed on a node.
    Assigned,
    /// The executor is starting it.
    Starting,
    /// Its process runs.
    Running,
    /// Exited with status 0.
    Complete,
    /// Exited otherwise, or could not start.
    Failed,
    /// Stopped on purpose.
    Shutdown,
}

impl TaskState {
    /// Whether the task has ended for good.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            TaskState::Complete | TaskState::Failed | TaskState::Shutdown
        )
    }
}

/// What an executor reports about one of its tasks (see
/// `Command::ReportTask`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskReport {
    /// The task.
    pub id: TaskId,
    /// Its new state.
    pub state: TaskState,
    /// A message (error, reason), at most [`TaskReport::MAX_MESSAGE`] bytes.
    pub message: String,
    /// Exit code, when it exited.
    pub exit_code: Option<i32>,
    /// Milliseconds since the epoch, on the reporter's clock.
    pub now_ms: u64,
}

impl TaskReport {
    /// The longest message a report may carry, in bytes: a reason, not a log.
    pub const MAX_MESSAGE: usize = 1024;

    /// A report whose message is cut (at a character boundary, with `…`)
    /// to [`TaskReport::MAX_MESSAGE`] bytes.
    pub fn new(
        id: TaskId,
        state: TaskState,
        mut message: String,
        exit_code: Option<i32>,
        now_ms: u64,
    ) -> Self {
        if message.len() > Self::MAX_MESSAGE {
            let mut cut = Self::MAX_MESSAGE - '…'.len_utf8();
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        TaskReport {
            id,
            state,
            message,
            exit_code,
            now_ms,
        }
    }
}

/// What the orchestrator wants of a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    /// Keep it running.
    Running,
    /// Stop it.
    Shutdown,
}

/// A task in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// ID.
    pub id: TaskId,
    /// Its service's ID.
    pub service_id: ServiceId,
    /// Replica slot (replicated services), from 1.
    pub slot: Option<u64>,
    /// The node it is placed on.
    pub node: Option<NodeId>,
    /// What the orchestrator wants.
    pub desired: DesiredState,
    /// What the executor last reported.
    pub state: TaskState,
    /// Address per network ID.
    pub addresses: BTreeMap<NetworkId, Ipv4Addr>,
    /// Why it is pending, or how it failed.
    pub message: String,
    /// Exit code, once exited.
    pub exit_code: Option<i32>,
    /// The service's spec version it was created for.
    pub spec_version: u64,
    /// How many times its slot (its node, for global services) was
    /// restarted before it, under the same spec version.
    pub restarts: u64,
    /// Milliseconds since the epoch at creation.
    pub created_at_ms: u64,
    /// Milliseconds since the epoch at the last state change (or shutdown
    /// request).
    pub updated_at_ms: u64,
}

impl Task {
    /// Whether it counts towards its service's replicas: wanted running and
    /// not ended.
    pub fn is_active(&self) -> bool {
        self.desired == DesiredState::Running && !self.state.is_terminal()
    }

    /// Whether it holds what its service reserves on its node: active and
    /// placed there (a global task pending for its node holds nothing).
    pub fn holds_reservation(&self) -> bool {
        self.is_active() && self.state != TaskState::Pending && self.node.is_some()
    }
}
