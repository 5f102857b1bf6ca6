//! Sharing of equal immutable values among the gossip nodes of one
//! simulation.
//!
//! What a node stores of others (entries and their keys, certificates,
//! signed SWIM claims, peers' addresses) is immutable once decoded and
//! held behind an [`Arc`]. A daemon runs one node and shares nothing:
//! [`share`] returns its argument. The simulator ([`crate::sim`]) runs
//! thousands of nodes in one process, each of which holds a copy of the
//! same certificates and entries; it makes a [`Pool`] and enters it on the
//! threads that run its nodes ([`enter`]), and every node then keeps the
//! one copy of an equal value that the pool already holds. What a node
//! does is the same either way (the values are equal and never change);
//! only the simulator's memory differs.

use std::any::{Any, TypeId};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::sync::{Arc, Mutex};

/// One type's shared values, type-erased so that [`Pool::sweep`] can
/// reach every type's.
trait Set: Send {
    /// Forgets the values nobody but the pool holds; how many.
    fn sweep(&mut self) -> usize;
    fn len(&self) -> usize;
    fn as_any(&mut self) -> &mut dyn Any;
}

/// A fast, unkeyed hash (rustc's "Fx" mix, eight bytes at a time): the
/// pool hashes every certificate and entry each node takes, and the
/// values are the simulation's own, so they need no defence against
/// chosen collisions (a daemon has no pool).
#[derive(Default)]
pub struct FxHasher(u64);

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(last));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }

    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        // The multiply leaves the low bits weak; the table's buckets and
        // the shard come from them.
        self.0 ^ (self.0 >> 32)
    }
}

type FxBuild = BuildHasherDefault<FxHasher>;

/// One type's shared values.
type Values<T> = HashSet<Arc<T>, FxBuild>;

impl<T: ?Sized + Hash + Eq + Send + Sync + 'static> Set for Values<T> {
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

/// Shards of a pool: threads sharing one pool rarely wait for each other.
const SHARDS: usize = 16;

type Shard = Mutex<HashMap<TypeId, Box<dyn Set>>>;

/// Shared values by type, for the threads that entered the pool.
pub struct Pool {
    shards: Vec<Shard>,
    /// Picks a value's shard (unkeyed: the same shard on every thread).
    hasher: FxBuild,
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
        }
    }
}

impl Pool {
    fn share<T: ?Sized + Hash + Eq + Send + Sync + 'static>(&self, v: Arc<T>) -> Arc<T> {
        let shard = (self.hasher.hash_one(&*v) >> 60) as usize % SHARDS;
        let Ok(mut shard) = self.shards[shard].lock() else {
            return v;
        };
        let set = shard
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Box::new(Values::<T>::default()));
        let Some(set) = set.as_any().downcast_mut::<Values<T>>() else {
            return v;
        };
        if let Some(held) = set.get(&v) {
            return held.clone();
        }
        set.insert(v.clone());
        v
    }

    /// Forgets the shared values no node holds any longer; how many.
    pub fn sweep(&self) -> usize {
        self.shards
            .iter()
            .filter_map(|s| s.lock().ok())
            .map(|mut s| s.values_mut().map(|set| set.sweep()).sum::<usize>())
            .sum()
    }

    /// How many values the pool holds.
    pub fn held(&self) -> usize {
        self.shards
            .iter()
            .filter_map(|s| s.lock().ok())
            .map(|s| s.values().map(|set| set.len()).sum::<usize>())
            .sum()
    }
}

thread_local! {
    /// The pool this thread's nodes share, if any.
    static CURRENT: RefCell<Option<Arc<Pool>>> = const { RefCell::new(None) };
}

/// Makes `pool` (or none: no sharing) the one this thread's nodes share
/// from now on.
pub fn enter(pool: Option<Arc<Pool>>) {
    CURRENT.with(|c| *c.borrow_mut() = pool);
}

/// Whether this thread's current pool is `pool`.
pub fn is_current(pool: &Arc<Pool>) -> bool {
    CURRENT.with(|c| c.borrow().as_ref().is_some_and(|p| Arc::ptr_eq(p, pool)))
}

/// The current pool's copy of a value equal to `v` if it has one, else `v`
/// (kept as the pool's copy while there is a pool).
pub fn share<T: ?Sized + Hash + Eq + Send + Sync + 'static>(v: Arc<T>) -> Arc<T> {
    CURRENT.with(|c| match c.borrow().as_ref() {
        Some(pool) => pool.share(v),
        None => v,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_pool_a_value_is_its_own() {
        let a: Arc<str> = Arc::from("x");
        let b: Arc<str> = Arc::from("x");
        assert!(!Arc::ptr_eq(&share(a), &share(b)));
    }

    #[test]
    fn in_a_pool_equal_values_are_one_until_nobody_holds_them() {
        let pool = Arc::new(Pool::default());
        let p = pool.clone();
        std::thread::spawn(move || {
            enter(Some(p.clone()));
            let a = share::<[u8]>(Arc::from(&b"cert"[..]));
            let b = share::<[u8]>(Arc::from(&b"cert"[..]));
            let c = share::<[u8]>(Arc::from(&b"other"[..]));
            assert!(Arc::ptr_eq(&a, &b));
            assert!(!Arc::ptr_eq(&a, &c));
            // Another type with equal bytes is another value.
            let s = share::<Vec<u8>>(Arc::new(b"cert".to_vec()));
            assert_eq!(p.held(), 3);
            drop((b, c, s));
            assert_eq!(p.sweep(), 2, "`a` is still held");
            assert_eq!(p.held(), 1);
            (a, p)
        })
        .join()
        .map(|(a, p)| {
            // Another thread in the same pool gets the same copy.
            std::thread::spawn(move || {
                enter(Some(p));
                let b = share::<[u8]>(Arc::from(&b"cert"[..]));
                assert!(Arc::ptr_eq(&a, &b));
            })
            .join()
            .unwrap();
        })
        .unwrap();
        assert_eq!(pool.sweep(), 1);
        assert_eq!(pool.held(), 0);
    }
}
