//! Network-scoped, owner-scoped, last-writer-wins tables.
//!
//! Every entry has an owner (the node that wrote it) and a version (a hybrid
//! logical clock of the owner: `max(last + 1, now_ms << 16)`, so that a
//! restarted owner's new writes beat everything it wrote before). Of two
//! entries for one key the one with the greater `(version, owner)` wins, on
//! every node alike. A delete is a tombstone that wins like a write and is
//! reaped after a while. Entries of owners that gossip declared dead are
//! kept but hidden: they leave every read and event at once, and come back
//! if the owner turns out to be alive.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use shoal_mesh::NodeId;
use shoal_mesh::observed::TableValue;

/// The scope of cluster-wide tables (the `networks` table).
pub const GLOBAL: &str = "";
/// Table of node → attached networks (global scope).
pub const NETWORKS_TABLE: &str = "networks";

/// Where an entry lives: network (or [`GLOBAL`]), table, key. Ordered by
/// network, then table, then key, each as `str` orders.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EntryKey {
    /// The network, or [`GLOBAL`].
    pub network: String,
    /// The table (`endpoints`, `vteps`, `networks`).
    pub table: String,
    /// The key within the table.
    pub key: String,
}

impl Ord for EntryKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        str_order(&self.network, &other.network)
            .then_with(|| str_order(&self.table, &other.table))
            .then_with(|| str_order(&self.key, &other.key))
    }
}

impl PartialOrd for EntryKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// `a.cmp(b)` for `str`s, eight bytes at a time without a call to
/// `memcmp`: keys are short and compared many times in every lookup of
/// the tables' map (a call per field was a sixth of all the work of a
/// node taking entries). Pure.
#[inline]
fn str_order(a: &str, b: &str) -> std::cmp::Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let n = a.len().min(b.len());
    let (mut ca, mut cb) = (a[..n].chunks_exact(8), b[..n].chunks_exact(8));
    for (x, y) in (&mut ca).zip(&mut cb) {
        let word = |c: &[u8]| u64::from_be_bytes(c.try_into().unwrap_or([0; 8]));
        let (x, y) = (word(x), word(y));
        if x != y {
            return x.cmp(&y);
        }
    }
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        if x != y {
            return x.cmp(y);
        }
    }
    a.len().cmp(&b.len())
}

/// One versioned entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Entry {
    /// The node that wrote it.
    pub owner: NodeId,
    /// The owner's clock when it wrote it.
    pub version: u64,
    /// `None` for a tombstone.
    pub value: Option<TableValue>,
    /// The owner's signature of [`signed_bytes`] (see [`crate::keys`]).
    pub sig: Vec<u8>,
}

/// A stored key: immutable, shared by whoever holds it ([`crate::share`]).
pub type SharedKey = Arc<EntryKey>;
/// A stored entry: immutable (a newer version replaces it), shared by
/// whoever holds it ([`crate::share`]).
pub type SharedEntry = Arc<Entry>;

/// What an entry's owner signs: its key, owner, version and value.
pub fn signed_bytes(
    key: &EntryKey,
    owner: NodeId,
    version: u64,
    value: &Option<TableValue>,
) -> Vec<u8> {
    shoal_mesh::codec::encode(&(key, owner, version, value)).unwrap_or_default()
}

impl Entry {
    /// Whether this is a delete.
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    /// Whether this entry replaces `other` (a newer version, ties broken
    /// by owner).
    pub fn wins_over(&self, other: &Entry) -> bool {
        (self.version, self.owner) > (other.version, other.owner)
    }
}

/// A visible change, for the event stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A key became visible.
    Added(EntryKey, TableValue),
    /// A visible key's value changed.
    Updated(EntryKey, TableValue),
    /// A visible key went away (deleted, or its owner is dead).
    Removed(EntryKey),
}

/// A per-owner summary of one network's entries: (hash, count), the hash
/// the XOR of [`entry_hash`] over the owner's entries (so it follows each
/// change without a walk). Two nodes with the same digest for an owner hold
/// the same entries of that owner (but for a 64-bit collision).
pub type Digest = BTreeMap<NodeId, (u64, u32)>;

/// The digest of a network without entries.
static EMPTY_DIGEST: Digest = BTreeMap::new();

/// One entry's share of its owner's digest hash: its table, key, version
/// and whether it is a tombstone, hashed and mixed. Pure.
fn entry_hash(key: &EntryKey, e: &Entry) -> u64 {
    let mut h = fnv(0xcbf2_9ce4_8422_2325, key.table.as_bytes());
    h = fnv(h, &[0]);
    h = fnv(h, key.key.as_bytes());
    h = fnv(h, &e.version.to_le_bytes());
    h = fnv(h, &[u8::from(e.is_tombstone())]);
    // splitmix64's finalizer: every input bit moves every output bit, so
    // that XOR-ing the hashes of a set does not cancel structure.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The whole of a [`Digest`] in one number: equal roots, equal digests
/// (but for a 64-bit collision). Pure.
pub fn root(digest: &Digest) -> u64 {
    digest.iter().fold(0xcbf2_9ce4_8422_2325, |h, (o, (d, n))| {
        let h = fnv(h, &o.0.to_le_bytes());
        let h = fnv(h, &d.to_le_bytes());
        fnv(h, &n.to_le_bytes())
    })
}

/// The key of `node`'s entry in the global `networks` table.
pub fn networks_key_of(node: NodeId) -> EntryKey {
    EntryKey {
        network: GLOBAL.to_owned(),
        table: NETWORKS_TABLE.to_owned(),
        key: node.to_string(),
    }
}

/// All tables this node holds.
#[derive(Clone, Debug)]
pub struct Tables {
    entries: BTreeMap<SharedKey, SharedEntry>,
    live: BTreeSet<NodeId>,
    /// Each network's digest, kept as entries change.
    digests: BTreeMap<String, Digest>,
    /// Roots computed since the network's digest last changed: an idle
    /// node's anti-entropy neither walks nor copies its entries.
    roots: BTreeMap<String, u64>,
    /// Tombstones by reap time (an element whose entry was replaced since
    /// is skipped): reaping looks at what is due, not at every entry.
    reaps: BTreeSet<(u64, SharedKey)>,
    /// Each stored tombstone's reap time (this node's clock).
    reap_at: BTreeMap<SharedKey, u64>,
    /// Which nodes each network's stored `networks` entries list (kept as
    /// those entries change, so that a network's members are found without
    /// a walk over the swarm's).
    attached: BTreeMap<String, BTreeSet<NodeId>>,
    /// Counts the changes to `attached` (for callers that cache what they
    /// derive from it).
    attached_gen: u64,
}

fn visible_value<'a>(e: &'a Entry, live: &BTreeSet<NodeId>) -> Option<&'a TableValue> {
    if live.contains(&e.owner) {
        e.value.as_ref()
    } else {
        None
    }
}

fn change(
    key: &EntryKey,
    before: Option<&TableValue>,
    after: Option<&TableValue>,
) -> Option<Change> {
    match (before, after) {
        (None, Some(v)) => Some(Change::Added(key.clone(), v.clone())),
        (Some(a), Some(b)) if a != b => Some(Change::Updated(key.clone(), b.clone())),
        (Some(_), None) => Some(Change::Removed(key.clone())),
        _ => None,
    }
}

/// FNV-1a over bytes, folded into `h`.
fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

impl Tables {
    /// Empty tables of node `me` (whose own entries are always visible).
    pub fn new(me: NodeId) -> Self {
        Tables {
            entries: BTreeMap::new(),
            live: BTreeSet::from([me]),
            digests: BTreeMap::new(),
            roots: BTreeMap::new(),
            reaps: BTreeSet::new(),
            reap_at: BTreeMap::new(),
            attached: BTreeMap::new(),
            attached_gen: 0,
        }
    }

    /// The nodes whose stored `networks` entry lists `network`.
    pub fn attached(&self, network: &str) -> impl Iterator<Item = NodeId> + '_ {
        self.attached.get(network).into_iter().flatten().copied()
    }

    /// Whether the stored `networks` entry of `node` lists `network`.
    pub fn is_attached(&self, node: NodeId, network: &str) -> bool {
        self.attached
            .get(network)
            .is_some_and(|set| set.contains(&node))
    }

    /// A number that changes whenever [`Self::attached`] may have.
    pub fn attached_gen(&self) -> u64 {
        self.attached_gen
    }

    /// Keeps [`Self::attached`] as the entry under `key` goes from
    /// `before` to `after` (a `networks` entry of the global scope; others
    /// are ignored).
    fn reindex(&mut self, key: &EntryKey, before: Option<&Entry>, after: Option<&Entry>) {
        if key.network != GLOBAL || key.table != NETWORKS_TABLE {
            return;
        }
        let Ok(node) = key.key.parse::<NodeId>() else {
            return;
        };
        self.attached_gen += 1;
        let lists = |e: Option<&Entry>| match e.and_then(|e| e.value.as_ref()) {
            Some(TableValue::Networks(l)) => l.clone(),
            _ => Vec::new(),
        };
        for n in lists(before) {
            if let Some(set) = self.attached.get_mut(&n) {
                set.remove(&node);
                if set.is_empty() {
                    self.attached.remove(&n);
                }
            }
        }
        for n in lists(after) {
            self.attached.entry(n).or_default().insert(node);
        }
    }

    /// Adds (`add`) or takes out the entry of `owner` in `network` whose
    /// [`entry_hash`] is `h` to or from the network's digest.
    fn account(&mut self, network: &str, owner: NodeId, h: u64, add: bool) {
        self.roots.remove(network);
        let digest = match self.digests.get_mut(network) {
            Some(d) => d,
            None => self.digests.entry(network.to_owned()).or_default(),
        };
        let slot = digest.entry(owner).or_insert((0, 0));
        slot.0 ^= h;
        if add {
            slot.1 += 1;
        } else {
            slot.1 = slot.1.saturating_sub(1);
            if slot.1 == 0 {
                digest.remove(&owner);
                if digest.is_empty() {
                    self.digests.remove(network);
                }
            }
        }
    }

    /// Merges `incoming` for `key`; returns the visible change, if any.
    /// A losing entry is simply ignored. One search of the map. What is
    /// stored is shared with the thread's other nodes ([`crate::share`]).
    pub fn merge(
        &mut self,
        key: impl Into<SharedKey>,
        incoming: impl Into<SharedEntry>,
        now_ms: u64,
        reap_after_ms: u64,
    ) -> Option<Change> {
        use std::collections::btree_map::Entry as Slot;
        let (key, incoming) = (crate::share::share(key.into()), incoming.into());
        let (owner, h) = (incoming.owner, entry_hash(&key, &incoming));
        let reap_at = incoming.is_tombstone().then_some(now_ms + reap_after_ms);
        let (key, old, new) = match self.entries.entry(key) {
            Slot::Occupied(mut o) => {
                if !incoming.wins_over(o.get()) {
                    return None;
                }
                let new = crate::share::share(incoming);
                let old = o.insert(new.clone());
                (o.key().clone(), Some(old), new)
            }
            Slot::Vacant(v) => {
                let key = v.key().clone();
                let new = crate::share::share(incoming);
                v.insert(new.clone());
                (key, None, new)
            }
        };
        match reap_at {
            Some(at) => {
                self.reaps.insert((at, key.clone()));
                self.reap_at.insert(key.clone(), at);
            }
            None => {
                self.reap_at.remove(&key);
            }
        }
        // The values are compared where they are held: only the change
        // copies one.
        let change = change(
            &key,
            old.as_ref().and_then(|e| visible_value(e, &self.live)),
            visible_value(&new, &self.live),
        );
        if let Some(o) = &old {
            self.account(&key.network, o.owner, entry_hash(&key, o), false);
        }
        self.account(&key.network, owner, h, true);
        if key.network == GLOBAL && key.table == NETWORKS_TABLE {
            self.reindex(&key, old.as_deref(), Some(&new));
        }
        change
    }

    /// The stored entry (visible or not) for `key`.
    pub fn get(&self, key: &EntryKey) -> Option<&SharedEntry> {
        self.entries.get(key)
    }

    /// The visible value for `key`.
    pub fn visible(&self, key: &EntryKey) -> Option<&TableValue> {
        self.entries
            .get(key)
            .and_then(|e| visible_value(e, &self.live))
    }

    /// Every stored entry of one network, in key order: a range of the
    /// map (keys sort by network first), not a walk over every network's.
    fn in_network<'a>(
        &'a self,
        network: &'a str,
    ) -> impl Iterator<Item = (&'a SharedKey, &'a SharedEntry)> + 'a {
        let from = EntryKey {
            network: network.to_owned(),
            table: String::new(),
            key: String::new(),
        };
        self.entries
            .range::<EntryKey, _>(from..)
            .take_while(move |(k, _)| k.network == network)
    }

    /// Visible entries of one network, in key order.
    pub fn visible_in<'a>(
        &'a self,
        network: &'a str,
    ) -> impl Iterator<Item = (&'a EntryKey, &'a TableValue)> + 'a {
        self.in_network(network)
            .filter_map(|(k, e)| visible_value(e, &self.live).map(|v| (&**k, v)))
    }

    /// Every stored entry (tombstones and hidden ones too), in key order.
    pub fn all(&self) -> impl Iterator<Item = (&EntryKey, &Entry)> {
        self.entries.iter().map(|(k, e)| (&**k, &**e))
    }

    /// Whether `owner`'s entries are visible.
    pub fn is_live(&self, owner: NodeId) -> bool {
        self.live.contains(&owner)
    }

    /// The stored entries of `owner`, in key order, without a walk over
    /// the swarm's (a swarm of n nodes sees n owners come up): its one
    /// entry of the global scope (keyed by its ID), and the entries of the
    /// networks whose digest counts some of its.
    fn of_owner(&self, owner: NodeId) -> impl Iterator<Item = (&SharedKey, &SharedEntry)> {
        let global = self
            .entries
            .get_key_value(&networks_key_of(owner))
            .filter(move |(_, e)| e.owner == owner);
        let networks = self
            .digests
            .iter()
            .filter(move |(net, d)| net.as_str() != GLOBAL && d.contains_key(&owner))
            .flat_map(move |(net, _)| self.in_network(net))
            .filter(move |(_, e)| e.owner == owner);
        global.into_iter().chain(networks)
    }

    /// Shows (owner alive) or hides (owner dead) every entry of `owner`.
    pub fn set_live(&mut self, owner: NodeId, live: bool) -> Vec<Change> {
        if live == self.live.contains(&owner) {
            return Vec::new();
        }
        let mut changes = Vec::new();
        for (k, e) in self.of_owner(owner) {
            if let Some(v) = &e.value {
                changes.push(if live {
                    Change::Added((**k).clone(), v.clone())
                } else {
                    Change::Removed((**k).clone())
                });
            }
        }
        if live {
            self.live.insert(owner);
        } else {
            self.live.remove(&owner);
        }
        changes
    }

    /// Forgets `owner`'s entries older than `version` (an owner that
    /// restarted: its fresh state replaces the old).
    pub fn purge_owner_before(&mut self, owner: NodeId, version: u64) -> Vec<Change> {
        let stale: Vec<SharedKey> = self
            .of_owner(owner)
            .filter(|(_, e)| e.version < version)
            .map(|(k, _)| k.clone())
            .collect();
        self.remove_keys(stale)
    }

    /// Forgets `owner`'s entries in `network` (it left that network).
    pub fn purge_owner_in(&mut self, owner: NodeId, network: &str) -> Vec<Change> {
        let keys: Vec<SharedKey> = self
            .of_owner(owner)
            .filter(|(k, _)| k.network == network)
            .map(|(k, _)| k.clone())
            .collect();
        self.remove_keys(keys)
    }

    fn remove_keys(&mut self, keys: Vec<SharedKey>) -> Vec<Change> {
        let mut changes = Vec::new();
        for k in keys {
            let Some(e) = self.entries.remove(&k) else {
                continue;
            };
            self.reap_at.remove(&k);
            self.account(&k.network, e.owner, entry_hash(&k, &e), false);
            self.reindex(&k, Some(&e), None);
            if visible_value(&e, &self.live).is_some() {
                changes.push(Change::Removed((*k).clone()));
            }
        }
        changes
    }

    /// Forgets every entry of `network` (this node left it).
    pub fn drop_network(&mut self, network: &str) -> Vec<Change> {
        let keys: Vec<SharedKey> = self.in_network(network).map(|(k, _)| k.clone()).collect();
        self.remove_keys(keys)
    }

    /// Drops tombstones whose reap time has passed.
    pub fn reap(&mut self, now_ms: u64) {
        let mut due: Vec<SharedKey> = Vec::new();
        while let Some((at, _)) = self.reaps.first()
            && *at <= now_ms
        {
            let Some((at, key)) = self.reaps.pop_first() else {
                break;
            };
            // Still that tombstone (not replaced by a write, or by a later
            // tombstone with its own time).
            if self.reap_at.get(&key) == Some(&at) {
                due.push(key);
            }
        }
        // Tombstones hold no value: nothing visible goes.
        let _ = self.remove_keys(due);
    }

    /// The per-owner digest of one network (kept as entries change).
    pub fn digest(&self, network: &str) -> &Digest {
        self.digests.get(network).unwrap_or(&EMPTY_DIGEST)
    }

    /// The [`root`] of [`Self::digest`] (computed once per change).
    pub fn root(&mut self, network: &str) -> u64 {
        if let Some(r) = self.roots.get(network) {
            return *r;
        }
        let r = root(self.digest(network));
        self.roots.insert(network.to_owned(), r);
        r
    }

    /// The digest of `network` from its entries (what [`Self::digest`]
    /// keeps; for tests).
    #[cfg(test)]
    fn compute_digest(&self, network: &str) -> Digest {
        let mut d: Digest = BTreeMap::new();
        for (k, e) in self.in_network(network) {
            let slot = d.entry(e.owner).or_insert((0, 0));
            *slot = (slot.0 ^ entry_hash(k, e), slot.1 + 1);
        }
        d
    }

    /// The entries of `network` owned by any of `owners`.
    pub fn entries_of(
        &self,
        network: &str,
        owners: &BTreeSet<NodeId>,
    ) -> Vec<(SharedKey, SharedEntry)> {
        self.in_network(network)
            .filter(|(_, e)| owners.contains(&e.owner))
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect()
    }
}

/// Owners whose digests differ (present on one side only, or different).
pub fn differing_owners(mine: &Digest, theirs: &Digest) -> BTreeSet<NodeId> {
    let mut out = BTreeSet::new();
    for (o, d) in mine {
        if theirs.get(o) != Some(d) {
            out.insert(*o);
        }
    }
    for o in theirs.keys() {
        if !mine.contains_key(o) {
            out.insert(*o);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn keys_order_as_their_strings_do(
            a in proptest::collection::vec("[a-c\\x00\u{e9}]{0,12}", 3),
            b in proptest::collection::vec("[a-c\\x00\u{e9}]{0,12}", 3),
            long in "[a-b]{0,20}",
        ) {
            let k = |v: &[String], tail: &str| EntryKey {
                network: v[0].clone(),
                table: v[1].clone(),
                key: format!("{}{tail}", v[2]),
            };
            for (x, y) in [(k(&a, ""), k(&b, "")), (k(&a, &long), k(&b, "")), (k(&a, &long), k(&a, "x"))] {
                let by_fields = (&x.network, &x.table, &x.key).cmp(&(&y.network, &y.table, &y.key));
                proptest::prop_assert_eq!(x.cmp(&y), by_fields);
                proptest::prop_assert_eq!(str_order(&x.key, &y.key), x.key.cmp(&y.key));
            }
        }
    }

    fn key(k: &str) -> EntryKey {
        EntryKey {
            network: "net".into(),
            table: "vteps".into(),
            key: k.into(),
        }
    }

    fn put(owner: u64, version: u64, v: &str) -> Entry {
        Entry {
            owner: NodeId(owner),
            version,
            value: Some(TableValue::Networks(vec![v.into()])),
            sig: vec![],
        }
    }

    fn del(owner: u64, version: u64) -> Entry {
        Entry {
            owner: NodeId(owner),
            version,
            value: None,
            sig: vec![],
        }
    }

    fn tables() -> Tables {
        let mut t = Tables::new(NodeId(1));
        t.set_live(NodeId(2), true);
        t
    }

    #[test]
    fn last_writer_wins_in_any_order_with_a_deterministic_tie_break() {
        let writes = [put(1, 5, "a"), put(2, 5, "b"), put(1, 3, "c"), del(1, 4)];
        let mut results = Vec::new();
        for perm in [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]] {
            let mut t = tables();
            for i in perm {
                t.merge(key("k"), writes[i].clone(), 0, 1000);
            }
            results.push(t.visible(&key("k")).cloned());
        }
        assert!(results.iter().all(|r| r == &results[0]));
        assert_eq!(results[0], Some(TableValue::Networks(vec!["b".into()])));
    }

    #[test]
    fn a_delete_beats_older_writes_and_is_reaped_later() {
        let mut t = tables();
        assert!(matches!(
            t.merge(key("k"), put(1, 1, "a"), 0, 100),
            Some(Change::Added(..))
        ));
        assert!(matches!(
            t.merge(key("k"), del(1, 2), 0, 100),
            Some(Change::Removed(_))
        ));
        assert_eq!(
            t.merge(key("k"), put(1, 1, "a"), 50, 100),
            None,
            "no resurrection"
        );
        t.reap(99);
        assert!(t.get(&key("k")).is_some());
        t.reap(100);
        assert!(t.get(&key("k")).is_none());
    }

    #[test]
    fn only_a_tombstone_still_in_place_is_reaped_at_its_time() {
        let mut t = tables();
        // Deleted at 0 (reap at 100), written again: the write stays.
        t.merge(key("a"), del(1, 1), 0, 100);
        t.merge(key("a"), put(1, 2, "a"), 10, 100);
        // Deleted at 0, deleted again at 50: reaped at 150, not 100.
        t.merge(key("b"), del(1, 1), 0, 100);
        t.merge(key("b"), del(1, 2), 50, 100);
        t.reap(120);
        assert!(t.visible(&key("a")).is_some());
        assert!(t.get(&key("b")).is_some());
        t.reap(150);
        assert!(t.visible(&key("a")).is_some());
        assert!(t.get(&key("b")).is_none());
        assert!(t.reaps.is_empty(), "nothing left to look at");
    }

    #[test]
    fn dead_or_unknown_owners_vanish_from_reads_and_come_back() {
        let mut t = tables();
        t.merge(key("a"), put(2, 1, "a"), 0, 100);
        t.merge(key("b"), put(1, 1, "b"), 0, 100);
        assert_eq!(
            t.set_live(NodeId(2), false),
            vec![Change::Removed(key("a"))]
        );
        assert_eq!(t.visible_in("net").count(), 1);
        assert_eq!(
            t.merge(key("c"), put(2, 2, "c"), 0, 100),
            None,
            "a dead owner's news is silent"
        );
        assert_eq!(
            t.merge(key("d"), put(3, 1, "d"), 0, 100),
            None,
            "so is an unknown owner's"
        );
        assert_eq!(t.set_live(NodeId(2), true).len(), 2);
        assert_eq!(t.visible_in("net").count(), 3);
    }

    #[test]
    fn digests_match_exactly_when_entries_match() {
        let mut a = tables();
        let mut b = tables();
        a.merge(key("x"), put(1, 1, "x"), 0, 100);
        b.merge(key("x"), put(1, 1, "x"), 0, 100);
        assert!(differing_owners(a.digest("net"), b.digest("net")).is_empty());
        assert_eq!(root(a.digest("net")), root(b.digest("net")));
        b.merge(key("x"), put(1, 2, "y"), 0, 100);
        b.merge(key("z"), put(2, 1, "z"), 0, 100);
        let diff = differing_owners(a.digest("net"), b.digest("net"));
        assert_eq!(diff, BTreeSet::from([NodeId(1), NodeId(2)]));
        assert_ne!(root(a.digest("net")), root(b.digest("net")));
    }

    #[test]
    fn a_cached_digest_follows_every_change() {
        let mut a = tables();
        a.merge(key("x"), put(1, 1, "x"), 0, 100);
        let first = a.digest("net").clone();
        assert_eq!(a.digest("net"), &first, "nothing changed");
        assert_eq!(a.root("net"), root(&first));
        a.merge(key("x"), put(1, 2, "y"), 0, 100);
        let second = a.digest("net").clone();
        assert_ne!(second, first);
        assert_eq!(a.root("net"), root(&second));
        // A tombstone, then reaped.
        a.merge(key("x"), del(1, 3), 0, 100);
        let third = a.digest("net").clone();
        assert_ne!(third, second);
        a.reap(1_000);
        assert_eq!(a.digest("net").clone(), a.compute_digest("net"));
        assert!(a.digest("net").is_empty());
        a.merge(key("z"), put(2, 1, "z"), 0, 100);
        a.purge_owner_in(NodeId(2), "net");
        assert_eq!(a.digest("net").clone(), a.compute_digest("net"));
        // A key taken over by another owner leaves the first owner's share.
        a.merge(key("w"), put(1, 1, "w"), 0, 100);
        a.merge(key("w"), put(2, 5, "w"), 0, 100);
        assert_eq!(a.digest("net").clone(), a.compute_digest("net"));
        assert_eq!(a.digest("net").keys().collect::<Vec<_>>(), [&NodeId(2)]);
        assert_eq!(a.root("net"), root(&a.compute_digest("net")));
    }

    #[test]
    fn an_owners_entries_are_found_across_scopes_after_takeovers_and_removals() {
        let mut t = tables();
        t.merge(key("a"), put(1, 1, "a"), 0, 100);
        t.merge(key("b"), put(2, 1, "b"), 0, 100);
        // Node 2 takes `a` over.
        t.merge(key("a"), put(2, 5, "a2"), 0, 100);
        t.merge(networks_key_of(NodeId(2)), put(2, 6, "net"), 0, 100);
        t.merge(networks_key_of(NodeId(3)), put(3, 1, "net"), 0, 100);
        assert_eq!(t.set_live(NodeId(2), false).len(), 3);
        assert_eq!(t.set_live(NodeId(2), true).len(), 3);
        assert!(t.purge_owner_before(NodeId(1), u64::MAX).is_empty());
        assert_eq!(t.purge_owner_before(NodeId(2), 5).len(), 1, "`b` only");
        assert!(t.purge_owner_in(NodeId(2), "other").is_empty());
        assert_eq!(t.purge_owner_in(NodeId(2), "net").len(), 1, "`a`");
        assert_eq!(t.purge_owner_before(NodeId(2), 7).len(), 1, "`networks`");
        assert_eq!(t.all().count(), 1, "node 3's");
    }
}
