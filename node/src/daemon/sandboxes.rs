//! What the data plane tells the rest of the node: which task sandboxes
//! are programmed (the executor starts tasks in them), the plan last
//! programmed, its last error and warnings (`shoal info`, `debug`). The
//! data-plane loop writes it; everyone else reads.

use std::collections::BTreeSet;
use std::sync::Mutex;

use shoal_mesh::TaskId;
use shoal_mesh::plan::NodePlan;
use shoal_netdriver::render::Names;

use super::config::DataplaneConfig;

/// Which task sandboxes the data plane has programmed, as the executor's
/// decisions see it.
#[derive(Debug, Clone, Default)]
pub struct SandboxView {
    /// Whether the data plane runs here (else tasks need no sandbox).
    pub enabled: bool,
    /// Tasks whose sandbox is ready.
    pub ready: BTreeSet<TaskId>,
    /// Why the data plane last failed, if it did.
    pub error: Option<String>,
}

/// What the data plane tells the executor.
#[derive(Debug, Default)]
pub struct Sandboxes {
    /// Whether the data plane runs (else tasks get bare namespaces).
    pub enabled: bool,
    /// Namespace names of this node (`<prefix>t-<task>` for sandboxes).
    pub names: Option<Names>,
    /// Tasks whose sandbox is programmed.
    pub(super) ready: Mutex<BTreeSet<TaskId>>,
    /// The last reconcile error, for tasks that wait.
    pub(super) error: Mutex<Option<String>>,
    /// The plan last programmed.
    pub(super) last: Mutex<Option<NodePlan>>,
    /// Networks here whose subnet overlaps one of this node's routes.
    pub(super) warnings: Mutex<Vec<String>>,
    /// Woken when the set of ready sandboxes changes, so the executor
    /// starts a task as soon as its sandbox is programmed.
    pub changed: tokio::sync::Notify,
}

impl Sandboxes {
    /// For the given configuration and node.
    pub fn new(cfg: &DataplaneConfig, node: &str, root: bool) -> Self {
        let enabled = cfg.enabled && root;
        Sandboxes {
            enabled,
            names: enabled.then(|| match &cfg.netns_prefix {
                Some(p) => Names { prefix: p.clone() },
                None => Names::for_node(node),
            }),
            ready: Mutex::default(),
            error: Mutex::default(),
            last: Mutex::default(),
            warnings: Mutex::default(),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// What is wrong on this node but not an error: networks whose subnet
    /// overlaps one of its routes.
    pub fn warnings(&self) -> Vec<String> {
        self.warnings.lock().map(|w| w.clone()).unwrap_or_default()
    }

    /// The network namespace of task `task`, once programmed.
    pub fn ready(&self, task: &str) -> Option<String> {
        let names = self.names.as_ref()?;
        self.ready
            .lock()
            .ok()?
            .contains(task)
            .then(|| names.task_name(task))
    }

    /// What the executor needs: whether sandboxes are made here, which
    /// are ready, and why the last reconcile failed.
    pub fn view(&self) -> SandboxView {
        SandboxView {
            enabled: self.enabled,
            ready: self.ready.lock().map(|r| r.clone()).unwrap_or_default(),
            error: self.error(),
        }
    }

    /// Why the last reconcile failed, if it did.
    pub fn error(&self) -> Option<String> {
        self.error.lock().ok()?.clone()
    }

    /// The plan last programmed, if any.
    pub fn last_plan(&self) -> Option<NodePlan> {
        self.last.lock().ok()?.clone()
    }

    /// For `shoal info`: `off`, `starting` (a restarted daemon waits for
    /// gossip before it programs anything), `programmed` or `error`.
    pub fn status(&self) -> &'static str {
        if !self.enabled {
            "off"
        } else if self.error().is_some() {
            "error"
        } else if self.last.lock().is_ok_and(|l| l.is_some()) {
            "programmed"
        } else {
            "starting"
        }
    }
}
