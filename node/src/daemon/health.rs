//! Health of this node's container tasks that have a health check, shared
//! between the executor (whose probes set it) and the data plane (which
//! publishes a task with a check only while it is healthy, so that every
//! node's VIPs, DNS answers and routing mesh follow). A task without a
//! check is not here: the data plane's listen gate decides for it.

use std::collections::BTreeMap;
use std::sync::Mutex;

use shoal_mesh::TaskId;
use tokio::sync::Notify;

/// Health of the checked tasks: `None` while starting (no check passed
/// yet), then healthy or not.
#[derive(Default)]
pub struct Health {
    tasks: Mutex<BTreeMap<TaskId, Option<bool>>>,
    /// Woken when a task's health changes.
    pub changed: Notify,
}

impl Health {
    /// Task `id` has a check and starts unproven.
    pub fn checking(&self, id: &TaskId) {
        if let Ok(mut t) = self.tasks.lock() {
            t.insert(id.clone(), None);
        }
        self.changed.notify_waiters();
    }

    /// Task `id`'s check passed (`true`) or failed too often; whether that
    /// changed anything.
    pub fn set(&self, id: &TaskId, healthy: bool) -> bool {
        let changed = self.tasks.lock().is_ok_and(|mut t| {
            let was = t.insert(id.clone(), Some(healthy));
            was != Some(Some(healthy))
        });
        if changed {
            self.changed.notify_waiters();
        }
        changed
    }

    /// Forgets task `id` (it ended).
    pub fn forget(&self, id: &TaskId) {
        let removed = self.tasks.lock().is_ok_and(|mut t| t.remove(id).is_some());
        if removed {
            self.changed.notify_waiters();
        }
    }

    /// Whether task `id` may take connections: `None` when it has no
    /// check (the listen gate decides), else whether it is healthy.
    pub fn allows(&self, id: &TaskId) -> Option<bool> {
        let t = self.tasks.lock().ok()?;
        t.get(id).map(|h| *h == Some(true))
    }

    /// Whether task `id` was found unhealthy.
    pub fn unhealthy(&self, id: &TaskId) -> bool {
        self.tasks
            .lock()
            .is_ok_and(|t| t.get(id) == Some(&Some(false)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checked_task_is_held_until_healthy_and_dropped_when_not() {
        let h = Health::default();
        let id = TaskId::from("t1");
        assert_eq!(h.allows(&id), None);
        h.checking(&id);
        assert_eq!(h.allows(&id), Some(false));
        assert!(h.set(&id, true));
        assert!(!h.set(&id, true));
        assert_eq!(h.allows(&id), Some(true));
        assert!(h.set(&id, false));
        assert!(h.unhealthy(&id));
        assert_eq!(h.allows(&id), Some(false));
        h.forget(&id);
        assert_eq!(h.allows(&id), None);
    }
}
