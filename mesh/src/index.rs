//! Lookups derived from the replicated state, so that applying one command
//! costs what the command touches, not the size of the store: the addresses
//! in use on each network (for the lowest free one) and each service's
//! tasks (for its replica slots).
//!
//! The index is never stored or sent: a decoded state starts without it and
//! builds it on first use (one walk of the store); from then on the
//! functions of [`ClusterState`] below that change tasks, services and
//! ingress addresses keep it up to date. It is a function of the state, so
//! two equal states have equal indexes and [`StateIndex`] compares equal
//! to any other. Debug builds check it against a fresh build on every use
//! while the store is small.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::OnceLock;

use crate::ids::{NetworkId, NodeId, ServiceId, TaskId};
use crate::ipam::AllocError;
use crate::network::Network;
use crate::service::Service;
use crate::state::ClusterState;
use crate::task::Task;

/// The index of a [`ClusterState`]: empty until first used. A copy of the
/// state starts without it: copies are read (the data plane's, a
/// snapshot's), the store applies in place.
#[derive(Default)]
pub struct StateIndex(OnceLock<Index>);

impl Clone for StateIndex {
    fn clone(&self) -> Self {
        StateIndex::default()
    }
}

impl PartialEq for StateIndex {
    /// Always equal: the index is derived from the rest of the state.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for StateIndex {}

impl std::fmt::Debug for StateIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "StateIndex(built)"
        } else {
            "StateIndex(not built)"
        })
    }
}

/// What the index holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Index {
    /// VIPs and task addresses, per network.
    addrs: HashMap<NetworkId, Runs>,
    /// Nodes' addresses on the ingress network.
    ingress_nodes: Runs,
    /// Each service's tasks.
    service_tasks: HashMap<ServiceId, BTreeSet<TaskId>>,
    /// The tasks placed on each node.
    node_tasks: HashMap<NodeId, BTreeSet<TaskId>>,
    /// The tasks with an address on each network.
    network_tasks: HashMap<NetworkId, BTreeSet<TaskId>>,
}

/// Adds `id` to `key`'s set.
fn add_to<K: std::hash::Hash + Eq + Clone>(
    sets: &mut HashMap<K, BTreeSet<TaskId>>,
    key: &K,
    id: &TaskId,
) {
    sets.entry(key.clone()).or_default().insert(id.clone());
}

/// Removes `id` from `key`'s set, and the set once empty.
fn remove_from<K: std::hash::Hash + Eq>(
    sets: &mut HashMap<K, BTreeSet<TaskId>>,
    key: &K,
    id: &TaskId,
) {
    if let Some(ids) = sets.get_mut(key) {
        ids.remove(id);
        if ids.is_empty() {
            sets.remove(key);
        }
    }
}

/// A multiset of addresses, kept also as maximal runs of consecutive
/// addresses so that the lowest free one is found in a few lookups.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Runs {
    /// First address of a run → its last.
    runs: BTreeMap<u32, u32>,
    /// How many holders each address has (two only in a state some bug
    /// produced; counted so that removing one keeps the other).
    holders: HashMap<u32, u32>,
}

impl Runs {
    /// Adds one holder of `ip`.
    pub fn insert(&mut self, ip: Ipv4Addr) {
        let a = u32::from(ip);
        let n = self.holders.entry(a).or_default();
        *n += 1;
        if *n > 1 {
            return;
        }
        let left = self
            .runs
            .range(..a)
            .next_back()
            .filter(|(_, end)| end.checked_add(1) == Some(a))
            .map(|(start, _)| *start);
        let right = a
            .checked_add(1)
            .and_then(|b| self.runs.remove_entry(&b))
            .map(|(_, end)| end);
        self.runs.insert(left.unwrap_or(a), right.unwrap_or(a));
    }

    /// Removes one holder of `ip` (nothing if it has none).
    pub fn remove(&mut self, ip: Ipv4Addr) {
        let a = u32::from(ip);
        match self.holders.get_mut(&a) {
            None => return,
            Some(n) if *n > 1 => {
                *n -= 1;
                return;
            }
            Some(_) => {
                self.holders.remove(&a);
            }
        }
        let Some((&start, &end)) = self.runs.range(..=a).next_back() else {
            return;
        };
        self.runs.remove(&start);
        if start < a {
            self.runs.insert(start, a - 1);
        }
        if a < end {
            self.runs.insert(a + 1, end);
        }
    }

    /// The last address of the run holding `a`, if `a` is in use.
    fn run_end(&self, a: u32) -> Option<u32> {
        self.runs
            .range(..=a)
            .next_back()
            .filter(|(_, end)| **end >= a)
            .map(|(_, end)| *end)
    }

    /// Whether no address is held.
    fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }
}

/// The lowest address of `network` (inside `--ip-range` if set, else its
/// subnets in order) that is neither reserved nor in any of `used`: what
/// [`crate::ipam::allocate_ip`] returns, in a few lookups per run of used
/// addresses met instead of one per address.
fn lowest_free(network: &Network, used: &[&Runs]) -> Result<Ipv4Addr, AllocError> {
    let reserved = crate::ipam::reserved(network);
    let ranges: Vec<crate::cidr::Ipv4Net> = match network.spec.ip_range {
        Some(r) => vec![r],
        None => network.subnets.iter().map(|s| s.subnet).collect(),
    };
    for r in ranges {
        let first = u64::from(u32::from(r.network()));
        let last = first + r.size() - 1;
        let mut at = first;
        while at <= last {
            let a = at as u32;
            if reserved.contains(&Ipv4Addr::from(a)) {
                at += 1;
                continue;
            }
            match used.iter().filter_map(|u| u.run_end(a)).max() {
                Some(end) => at = u64::from(end) + 1,
                None => return Ok(Ipv4Addr::from(a)),
            }
        }
    }
    Err(AllocError::NetworkFull(network.spec.name.clone()))
}

impl Index {
    /// Walks `state` once.
    fn build(state: &ClusterState) -> Index {
        let mut ix = Index::default();
        for s in state.services.values() {
            ix.add_vips(s);
        }
        for t in state.tasks.values() {
            ix.add_task(t);
        }
        for ip in state.ingress_addrs.values() {
            ix.ingress_nodes.insert(*ip);
        }
        ix
    }

    fn add_vips(&mut self, s: &Service) {
        for (net, ip) in &s.vips {
            self.addrs.entry(net.clone()).or_default().insert(*ip);
        }
    }

    fn remove_vips(&mut self, s: &Service) {
        for (net, ip) in &s.vips {
            self.release(net, *ip);
        }
    }

    fn add_task(&mut self, t: &Task) {
        for (net, ip) in &t.addresses {
            self.addrs.entry(net.clone()).or_default().insert(*ip);
            add_to(&mut self.network_tasks, net, &t.id);
        }
        add_to(&mut self.service_tasks, &t.service_id, &t.id);
        if let Some(n) = &t.node {
            add_to(&mut self.node_tasks, n, &t.id);
        }
    }

    fn remove_task(&mut self, t: &Task) {
        for (net, ip) in &t.addresses {
            self.release(net, *ip);
            remove_from(&mut self.network_tasks, net, &t.id);
        }
        remove_from(&mut self.service_tasks, &t.service_id, &t.id);
        if let Some(n) = &t.node {
            remove_from(&mut self.node_tasks, n, &t.id);
        }
    }

    fn release(&mut self, net: &NetworkId, ip: Ipv4Addr) {
        if let Some(runs) = self.addrs.get_mut(net) {
            runs.remove(ip);
            if runs.is_empty() {
                self.addrs.remove(net);
            }
        }
    }
}

impl ClusterState {
    /// The index, built now if this state has none yet.
    fn index(&self) -> &Index {
        let ix = self.index.0.get_or_init(|| Index::build(self));
        #[cfg(debug_assertions)]
        if self.tasks.len() <= 2_000 {
            debug_assert_eq!(
                ix,
                &Index::build(self),
                "the state's index is stale: a change bypassed ClusterState's indexed setters"
            );
        }
        ix
    }

    /// The index to update, if built (else it is built from the changed
    /// state when next used).
    fn index_mut(&mut self) -> Option<&mut Index> {
        self.index.0.get_mut()
    }

    /// The lowest free address of `network`: not reserved, not a VIP or a
    /// task's address on it, and on the ingress network not a node's.
    pub fn free_address(&self, network: &Network) -> Result<Ipv4Addr, AllocError> {
        let ix = self.index();
        let empty = Runs::default();
        let on_net = ix.addrs.get(&network.id).unwrap_or(&empty);
        if network.ingress {
            lowest_free(network, &[on_net, &ix.ingress_nodes])
        } else {
            lowest_free(network, &[on_net])
        }
    }

    /// Whether any VIP or task holds an address on `network`.
    pub fn holds_addresses(&self, network: &Network) -> bool {
        self.index().addrs.contains_key(&network.id)
    }

    /// The tasks of `service`, in ID order.
    pub fn tasks_of<'a>(&'a self, service: &ServiceId) -> impl Iterator<Item = &'a Task> + 'a {
        self.indexed_tasks(self.index().service_tasks.get(service))
    }

    /// The tasks placed on `node`, in ID order.
    pub fn tasks_on(&self, node: NodeId) -> impl Iterator<Item = &Task> + '_ {
        self.indexed_tasks(self.index().node_tasks.get(&node))
    }

    /// The tasks with an address on `network`, in ID order.
    pub fn tasks_in<'a>(&'a self, network: &NetworkId) -> impl Iterator<Item = &'a Task> + 'a {
        self.indexed_tasks(self.index().network_tasks.get(network))
    }

    fn indexed_tasks<'a>(
        &'a self,
        ids: Option<&'a BTreeSet<TaskId>>,
    ) -> impl Iterator<Item = &'a Task> + 'a {
        ids.into_iter()
            .flatten()
            .filter_map(|id| self.tasks.get(id))
    }

    /// The part of the state node `me` runs its tasks from: the tasks
    /// placed on it, their services, itself and every network; no other
    /// node, task or service, no cluster facts. A copy that costs what
    /// the node runs, not the size of the store.
    pub fn node_view(&self, me: NodeId) -> ClusterState {
        let tasks: BTreeMap<TaskId, Task> = self
            .tasks_on(me)
            .map(|t| (t.id.clone(), t.clone()))
            .collect();
        let services = tasks
            .values()
            .filter_map(|t| self.services.get_key_value(&t.service_id))
            .map(|(id, s)| (id.clone(), s.clone()))
            .collect();
        ClusterState {
            nodes: self
                .nodes
                .get_key_value(&me)
                .map(|(id, n)| (*id, n.clone()))
                .into_iter()
                .collect(),
            networks: self.networks.clone(),
            services,
            tasks,
            ..ClusterState::default()
        }
    }

    /// Changes task `id` with `f`, which may change what the index holds
    /// of it (its node); `None` if there is no such task.
    pub fn update_task<T>(&mut self, id: &TaskId, f: impl FnOnce(&mut Task) -> T) -> Option<T> {
        let t = self.tasks.get_mut(id)?;
        let ix = self.index.0.get_mut();
        if let Some(ix) = ix {
            ix.remove_task(t);
            let out = f(t);
            ix.add_task(t);
            Some(out)
        } else {
            Some(f(t))
        }
    }

    /// Adds a task, or replaces the one with its ID.
    pub fn put_task(&mut self, task: Task) {
        if let Some(ix) = self.index.0.get_mut() {
            if let Some(old) = self.tasks.get(&task.id) {
                ix.remove_task(old);
            }
            ix.add_task(&task);
        }
        self.tasks.insert(task.id.clone(), task);
    }

    /// Removes a task.
    pub fn take_task(&mut self, id: &TaskId) -> Option<Task> {
        let old = self.tasks.remove(id)?;
        if let Some(ix) = self.index_mut() {
            ix.remove_task(&old);
        }
        Some(old)
    }

    /// Adds a service, or replaces the one with its ID (its tasks stay).
    pub fn put_service(&mut self, service: Service) {
        if let Some(ix) = self.index.0.get_mut() {
            if let Some(old) = self.services.get(&service.id) {
                ix.remove_vips(old);
            }
            ix.add_vips(&service);
        }
        self.services.insert(service.id.clone(), service);
    }

    /// Removes a service and its tasks.
    pub fn take_service(&mut self, id: &ServiceId) -> Option<Service> {
        let old = self.services.remove(id)?;
        let tasks: Vec<TaskId> = match self.index.0.get_mut() {
            Some(ix) => {
                ix.remove_vips(&old);
                ix.service_tasks
                    .get(id)
                    .map(|ids| ids.iter().cloned().collect())
                    .unwrap_or_default()
            }
            None => {
                self.tasks.retain(|_, t| t.service_id != *id);
                Vec::new()
            }
        };
        for t in &tasks {
            self.take_task(t);
        }
        Some(old)
    }

    /// Sets a node's address on the ingress network.
    pub fn put_ingress_addr(&mut self, node: NodeId, ip: Ipv4Addr) {
        let old = self.ingress_addrs.insert(node, ip);
        if let Some(ix) = self.index_mut() {
            if let Some(old) = old {
                ix.ingress_nodes.remove(old);
            }
            ix.ingress_nodes.insert(ip);
        }
    }

    /// Forgets a node's address on the ingress network.
    pub fn take_ingress_addr(&mut self, node: &NodeId) -> Option<Ipv4Addr> {
        let old = self.ingress_addrs.remove(node)?;
        if let Some(ix) = self.index_mut() {
            ix.ingress_nodes.remove(old);
        }
        Some(old)
    }
}

#[cfg(test)]
#[path = "index_test.rs"]
mod tests;
