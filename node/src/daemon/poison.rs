//! Locks that outlive a panicking holder: the state behind the daemon's
//! mutexes stays usable (each holder leaves it whole before it can panic),
//! so a poisoned lock is taken as it is rather than spreading the panic.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, poisoned or not.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
