//! Sharing of equal immutable values among the gossip nodes of one thread.
//!
//! What a node stores of others (entries and their keys, certificates,
//! signed SWIM claims, peers' addresses) is immutable once decoded and
//! held behind an [`Arc`]. A daemon runs one node and shares nothing:
//! [`share`] returns its argument. The simulator ([`crate::sim`]) runs
//! thousands of nodes in one thread, each of which holds a copy of the same
//! certificates and entries; it turns sharing on for its thread
//! ([`enable`]), and every node then keeps the one copy of an equal value
//! that the thread already holds. What a node does is the same either way
//! (the values are equal and never change); only the simulator's memory
//! differs.

use std::any::{Any, TypeId};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::Arc;

/// One type's shared values, type-erased so that [`sweep`] can reach
/// every type's.
trait Set {
    /// Forgets the values nobody but the pool holds; how many.
    fn sweep(&mut self) -> usize;
    fn len(&self) -> usize;
    fn as_any(&mut self) -> &mut dyn Any;
}

impl<T: ?Sized + Hash + Eq + 'static> Set for HashSet<Arc<T>> {
    fn sweep(&mut self) -> usize {
        let before = self.len();
        self.retain(|v| Arc::strong_count(v) > 1);
        before - self.len()
    }

    fn len(&self) -> usize {
        HashSet::len(self)
    }

    fn as_any(&mut self) -> &mut dyn Any {
        self
    }
}

thread_local! {
    /// This thread's pool, by value type; `None` when sharing is off.
    static POOL: RefCell<Option<HashMap<TypeId, Box<dyn Set>>>> = const { RefCell::new(None) };
}

/// Turns sharing on for this thread (the simulator's).
pub fn enable() {
    POOL.with(|p| {
        p.borrow_mut().get_or_insert_with(HashMap::new);
    });
}

/// The thread's copy of a value equal to `v` if it has one, else `v`
/// (kept as the thread's copy while sharing is on).
pub fn share<T: ?Sized + Hash + Eq + 'static>(v: Arc<T>) -> Arc<T> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let Some(pool) = p.as_mut() else {
            return v;
        };
        let set = pool
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Box::new(HashSet::<Arc<T>>::new()));
        let Some(set) = set.as_any().downcast_mut::<HashSet<Arc<T>>>() else {
            return v;
        };
        if let Some(held) = set.get(&v) {
            return held.clone();
        }
        set.insert(v.clone());
        v
    })
}

/// Forgets the shared values no node holds any longer; how many.
pub fn sweep() -> usize {
    POOL.with(|p| {
        p.borrow_mut()
            .as_mut()
            .map_or(0, |pool| pool.values_mut().map(|s| s.sweep()).sum())
    })
}

/// How many values the thread's pool holds.
pub fn held() -> usize {
    POOL.with(|p| {
        p.borrow()
            .as_ref()
            .map_or(0, |pool| pool.values().map(|s| s.len()).sum())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_sharing_a_value_is_its_own() {
        let a: Arc<str> = Arc::from("x");
        let b: Arc<str> = Arc::from("x");
        assert!(!Arc::ptr_eq(&share(a), &share(b)));
    }

    #[test]
    fn with_sharing_equal_values_are_one_until_nobody_holds_them() {
        std::thread::spawn(|| {
            enable();
            let a = share::<[u8]>(Arc::from(&b"cert"[..]));
            let b = share::<[u8]>(Arc::from(&b"cert"[..]));
            let c = share::<[u8]>(Arc::from(&b"other"[..]));
            assert!(Arc::ptr_eq(&a, &b));
            assert!(!Arc::ptr_eq(&a, &c));
            // Another type with equal bytes is another value.
            let s = share::<Vec<u8>>(Arc::new(b"cert".to_vec()));
            assert_eq!(held(), 3);
            drop((b, c, s));
            assert_eq!(sweep(), 2, "`a` is still held");
            assert_eq!(held(), 1);
            drop(a);
            assert_eq!(sweep(), 1);
        })
        .join()
        .unwrap();
    }
}
