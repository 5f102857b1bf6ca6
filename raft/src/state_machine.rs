//! The state-machine adapter: loops over committed entries and hands each
//! command to [`shoal_mesh::apply`]; builds, stores and installs snapshots.
//!
//! Persistence: `apply` works in memory; snapshots are written to
//! `snapshot.bin` (write to a temporary file, fsync, rename, fsync the
//! directory). On start the state is the last snapshot, and openraft
//! re-applies the committed entries after it from the durable log (the log
//! store persists the committed log ID).

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, EntryPayload, ErrorSubject, ErrorVerb, LogId, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use shoal_mesh::{ClusterState, Outcome, apply, codec};
use tokio::sync::watch;

use crate::StoreError;
use crate::at_rest::{AtRest, SNAPSHOT_PLACE};
use crate::types::{ApplyResult, TypeConfig};

/// Everything the state machine holds; also the snapshot's content.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SmData {
    /// The last entry applied.
    pub last_applied: Option<LogId<u64>>,
    /// The last membership applied.
    pub membership: StoredMembership<u64, BasicNode>,
    /// The cluster state.
    pub state: ClusterState,
}

/// [`SmData`] with an older shape of the cluster state: `ClusterStateV1`
/// (before `revoked`), `ClusterStateV2` (before CA rotation and autolock)
/// `ClusterStateV3` (before containers) or `ClusterStateV4` (before
/// `StateExt`).
#[derive(Deserialize)]
struct SmDataOld<S> {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    state: S,
}

fn decode_old<S>(bytes: &[u8]) -> Result<SmData, codec::DecodeError>
where
    S: serde::de::DeserializeOwned + Into<ClusterState>,
{
    codec::decode::<SmDataOld<S>>(bytes, codec::DEFAULT_LIMIT).map(|old| SmData {
        last_applied: old.last_applied,
        membership: old.membership,
        state: old.state.into(),
    })
}

/// A snapshot's content, in the current shape or an older one.
fn decode_data(bytes: &[u8]) -> Result<SmData, codec::DecodeError> {
    use shoal_mesh::state::{
        ClusterStateV1, ClusterStateV2, ClusterStateV3, ClusterStateV4, ClusterStateV5,
    };
    codec::decode::<SmData>(bytes, codec::DEFAULT_LIMIT).or_else(|current| {
        decode_old::<ClusterStateV5>(bytes)
            .or_else(|_| decode_old::<ClusterStateV4>(bytes))
            .or_else(|_| decode_old::<ClusterStateV3>(bytes))
            .or_else(|_| decode_old::<ClusterStateV2>(bytes))
            .or_else(|_| decode_old::<ClusterStateV1>(bytes))
            .map_err(|_| current)
    })
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, BasicNode>,
    data: Vec<u8>,
}

/// Read access to the applied state, for the rest of the node.
#[derive(Clone)]
pub struct StateHandle {
    data: Arc<RwLock<SmData>>,
    changes: watch::Receiver<u64>,
}

impl StateHandle {
    /// A handle over `data`, told of changes by `changes`.
    pub(crate) fn new(data: Arc<RwLock<SmData>>, changes: watch::Receiver<u64>) -> Self {
        StateHandle { data, changes }
    }

    /// A copy of the current cluster state.
    pub fn state(&self) -> ClusterState {
        self.read(|d| d.state.clone())
    }

    /// Runs `f` over the current data under the read lock.
    pub fn read<T>(&self, f: impl FnOnce(&SmData) -> T) -> T {
        let guard = self.data.read().unwrap_or_else(|p| p.into_inner());
        f(&guard)
    }

    /// A receiver that changes whenever an entry is applied or a snapshot installed.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }
}

/// The state machine store.
#[derive(Clone)]
pub struct StateMachineStore {
    data: Arc<RwLock<SmData>>,
    dir: PathBuf,
    /// How the snapshot file is sealed.
    at_rest: AtRest,
    changed: Arc<watch::Sender<u64>>,
    changes: watch::Receiver<u64>,
}

fn sm_err(verb: ErrorVerb, e: impl ToString) -> StorageError<u64> {
    StorageIOError::new(
        ErrorSubject::StateMachine,
        verb,
        AnyError::error(e.to_string()),
    )
    .into()
}

fn snap_err(verb: ErrorVerb, e: impl ToString) -> StorageError<u64> {
    StorageIOError::new(ErrorSubject::None, verb, AnyError::error(e.to_string())).into()
}

impl StateMachineStore {
    /// Opens the state machine under `dir`, loading `snapshot.bin` if
    /// present; the snapshot file is sealed as `at_rest` says.
    pub fn open(dir: &Path, at_rest: AtRest) -> Result<Self, StoreError> {
        let path = dir.join("snapshot.bin");
        let data = match std::fs::read(&path) {
            Ok(bytes) => {
                let fail = |reason: String| StoreError::Snapshot {
                    path: path.clone(),
                    reason,
                };
                let plain = at_rest
                    .open(SNAPSHOT_PLACE, &bytes)
                    .map_err(|e| fail(e.to_string()))?;
                let snap: StoredSnapshot =
                    codec::decode(&plain, codec::DEFAULT_LIMIT).map_err(|e| fail(e.to_string()))?;
                decode_data(&snap.data).map_err(|e| fail(e.to_string()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => SmData::default(),
            Err(e) => {
                return Err(StoreError::Snapshot {
                    path,
                    reason: e.to_string(),
                });
            }
        };
        let (tx, rx) = watch::channel(0);
        Ok(StateMachineStore {
            data: Arc::new(RwLock::new(data)),
            dir: dir.to_owned(),
            at_rest,
            changed: Arc::new(tx),
            changes: rx,
        })
    }

    /// A read handle to the applied state.
    pub fn handle(&self) -> StateHandle {
        StateHandle {
            data: self.data.clone(),
            changes: self.changes.clone(),
        }
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn snapshot_path(&self) -> PathBuf {
        self.dir.join("snapshot.bin")
    }

    fn save_snapshot(&self, snap: &StoredSnapshot) -> Result<(), StorageError<u64>> {
        let plain = codec::encode(snap).map_err(|e| snap_err(ErrorVerb::Write, e))?;
        let bytes = self.at_rest.seal(SNAPSHOT_PLACE, plain);
        let tmp = self.dir.join("snapshot.bin.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, self.snapshot_path())?;
            std::fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| snap_err(ErrorVerb::Write, e))
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, SmData> {
        self.data.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, SmData> {
        self.data.read().unwrap_or_else(|p| p.into_inner())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<u64>> {
        let (data, meta) = {
            let d = self.read();
            let data = codec::encode(&*d).map_err(|e| sm_err(ErrorVerb::Read, e))?;
            let snapshot_id = match d.last_applied {
                Some(id) => format!("{}-{}-{}", id.leader_id, id.index, data.len()),
                None => format!("none-{}", data.len()),
            };
            let meta = SnapshotMeta {
                last_log_id: d.last_applied,
                last_membership: d.membership.clone(),
                snapshot_id,
            };
            (data, meta)
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        self.save_snapshot(&stored)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), StorageError<u64>> {
        let d = self.read();
        Ok((d.last_applied, d.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ApplyResult>, StorageError<u64>>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut replies = Vec::new();
        {
            let mut d = self.write();
            for entry in entries {
                d.last_applied = Some(entry.log_id);
                let reply = match &entry.payload {
                    EntryPayload::Blank => Ok(Outcome::Done),
                    EntryPayload::Normal(cmd) => apply(&mut d.state, cmd),
                    EntryPayload::Membership(m) => {
                        d.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                        Ok(Outcome::Done)
                    }
                };
                replies.push(reply);
            }
        }
        self.notify();
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u64>> {
        let bytes = snapshot.into_inner();
        let new: SmData = decode_data(&bytes).map_err(|e| {
            StorageError::from(StorageIOError::new(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Read,
                AnyError::error(e.to_string()),
            ))
        })?;
        self.save_snapshot(&StoredSnapshot {
            meta: meta.clone(),
            data: bytes,
        })?;
        *self.write() = SmData {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            state: new.state,
        };
        self.notify();
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<u64>> {
        let bytes = match std::fs::read(self.snapshot_path()) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(snap_err(ErrorVerb::Read, e)),
        };
        let plain = self
            .at_rest
            .open(SNAPSHOT_PLACE, &bytes)
            .map_err(|e| snap_err(ErrorVerb::Read, e))?;
        let snap: StoredSnapshot = codec::decode(&plain, codec::DEFAULT_LIMIT)
            .map_err(|e| snap_err(ErrorVerb::Read, e))?;
        Ok(Some(Snapshot {
            meta: snap.meta,
            snapshot: Box::new(Cursor::new(snap.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use shoal_mesh::NodeId;
    use shoal_mesh::fixtures::{cluster_info, node};

    /// The snapshot's shape before `ClusterState::revoked`, as it was written.
    #[derive(Serialize)]
    struct OldState {
        cluster: Option<shoal_mesh::ClusterInfo>,
        nodes: BTreeMap<NodeId, shoal_mesh::Node>,
        networks: BTreeMap<String, shoal_mesh::network::Network>,
        services: BTreeMap<String, shoal_mesh::service::Service>,
        tasks: BTreeMap<String, shoal_mesh::task::Task>,
        ingress_addrs: BTreeMap<NodeId, std::net::Ipv4Addr>,
    }

    #[derive(Serialize)]
    struct OldSm {
        last_applied: Option<LogId<u64>>,
        membership: StoredMembership<u64, BasicNode>,
        state: OldState,
    }

    #[test]
    fn snapshots_written_before_the_deny_list_still_open() {
        let old = OldSm {
            last_applied: None,
            membership: Default::default(),
            state: OldState {
                cluster: Some(cluster_info("c")),
                nodes: BTreeMap::from([(NodeId(1), node(1))]),
                networks: BTreeMap::new(),
                services: BTreeMap::new(),
                tasks: BTreeMap::new(),
                ingress_addrs: BTreeMap::new(),
            },
        };
        let bytes = codec::encode(&old).unwrap();
        let data = decode_data(&bytes).unwrap();
        assert_eq!(data.state.nodes[&NodeId(1)], node(1));
        assert!(data.state.revoked.is_empty());
        // The shape before CA rotation and autolock.
        #[derive(Serialize)]
        struct V2 {
            last_applied: Option<LogId<u64>>,
            membership: StoredMembership<u64, BasicNode>,
            state: OldState,
            revoked: std::collections::BTreeSet<NodeId>,
            cert_expiry_ms: u64,
        }
        // (bincode lays a nested struct's fields out in line, so the
        // state's two later fields can follow it here.)
        let v2 = V2 {
            last_applied: old.last_applied,
            membership: old.membership.clone(),
            state: old.state,
            revoked: [NodeId(4)].into(),
            cert_expiry_ms: 3_600_000,
        };
        let data2 = decode_data(&codec::encode(&v2).unwrap()).unwrap();
        assert!(data2.state.revoked.contains(&NodeId(4)));
        assert_eq!(data2.state.cert_expiry_ms, 3_600_000);
        assert!(data2.state.ca_rotation.is_none());
        // The current shape reads as itself.
        let mut now = data.clone();
        now.state.revoked.insert(NodeId(7));
        let back = decode_data(&codec::encode(&now).unwrap()).unwrap();
        assert!(back.state.revoked.contains(&NodeId(7)));
        assert!(decode_data(b"\x01garbage").is_err());
    }

    #[test]
    fn snapshots_written_before_containers_still_open_with_their_services() {
        use shoal_mesh::legacy::ServiceSpecV1;
        use shoal_mesh::service::{Service, ServiceMode, ServiceSpec};
        /// `Service` before containers, as it was written.
        #[derive(Serialize)]
        struct ServiceV1 {
            id: String,
            spec: ServiceSpecV1,
            vips: BTreeMap<String, std::net::Ipv4Addr>,
            ports: Vec<shoal_mesh::service::PublishedPort>,
            created_at_ms: u64,
            version: u64,
            updated_at_ms: u64,
        }
        #[derive(Serialize)]
        struct V3 {
            last_applied: Option<LogId<u64>>,
            membership: StoredMembership<u64, BasicNode>,
            cluster: Option<shoal_mesh::ClusterInfo>,
            nodes: BTreeMap<NodeId, shoal_mesh::Node>,
            networks: BTreeMap<String, shoal_mesh::network::Network>,
            services: BTreeMap<String, ServiceV1>,
            tasks: BTreeMap<String, shoal_mesh::task::Task>,
            ingress_addrs: BTreeMap<NodeId, std::net::Ipv4Addr>,
            revoked: std::collections::BTreeSet<NodeId>,
            cert_expiry_ms: u64,
            ca_rotation: Option<shoal_mesh::ca::CaRotation>,
            autolock: Option<Vec<u8>>,
        }
        let spec = ServiceSpec {
            name: "web".into(),
            mode: ServiceMode::Replicated(2),
            networks: vec![],
            ports: vec![],
            endpoint_mode: shoal_mesh::service::EndpointMode::Vip,
            constraints: vec![],
            env: BTreeMap::from([("A".into(), "1".into())]),
            command: vec!["sleep".into(), "9".into()],
            labels: BTreeMap::new(),
            restart: Default::default(),
            update: Default::default(),
            container: None,
            ext: Default::default(),
        };
        let old = V3 {
            last_applied: None,
            membership: Default::default(),
            cluster: Some(cluster_info("c")),
            nodes: BTreeMap::from([(NodeId(1), node(1))]),
            networks: BTreeMap::new(),
            services: BTreeMap::from([(
                "s1".into(),
                ServiceV1 {
                    id: "s1".into(),
                    spec: ServiceSpecV1::from_current(&spec),
                    vips: BTreeMap::new(),
                    ports: vec![],
                    created_at_ms: 5,
                    version: 3,
                    updated_at_ms: 6,
                },
            )]),
            tasks: BTreeMap::new(),
            ingress_addrs: BTreeMap::new(),
            revoked: [NodeId(4)].into(),
            cert_expiry_ms: 3_600_000,
            ca_rotation: None,
            autolock: Some(vec![1, 2]),
        };
        let data = decode_data(&codec::encode(&old).unwrap()).unwrap();
        let s: &Service = &data.state.services["s1"];
        assert_eq!(s.spec, spec);
        assert_eq!((s.version, s.created_at_ms), (3, 5));
        assert_eq!(data.state.autolock, Some(vec![1, 2]));
        assert!(data.state.revoked.contains(&NodeId(4)));
    }

    #[test]
    fn snapshots_written_before_http_routes_still_open_with_their_services() {
        use shoal_mesh::legacy::ServiceSpecV2;
        use shoal_mesh::service::{ContainerSpec, ServiceMode, ServiceSpec};
        /// `Service` before `ServiceExt`, as it was written.
        #[derive(Serialize)]
        struct ServiceV2 {
            id: String,
            spec: ServiceSpecV2,
            vips: BTreeMap<String, std::net::Ipv4Addr>,
            ports: Vec<shoal_mesh::service::PublishedPort>,
            created_at_ms: u64,
            version: u64,
            updated_at_ms: u64,
        }
        #[derive(Serialize)]
        struct V5 {
            last_applied: Option<LogId<u64>>,
            membership: StoredMembership<u64, BasicNode>,
            cluster: Option<shoal_mesh::ClusterInfo>,
            nodes: BTreeMap<NodeId, shoal_mesh::Node>,
            networks: BTreeMap<String, shoal_mesh::network::Network>,
            services: BTreeMap<String, ServiceV2>,
            tasks: BTreeMap<String, shoal_mesh::task::Task>,
            ingress_addrs: BTreeMap<NodeId, std::net::Ipv4Addr>,
            revoked: std::collections::BTreeSet<NodeId>,
            cert_expiry_ms: u64,
            ca_rotation: Option<shoal_mesh::ca::CaRotation>,
            autolock: Option<Vec<u8>>,
            #[serde(with = "shoal_mesh::service::json_field")]
            ext: shoal_mesh::state::StateExt,
        }
        let spec = ServiceSpec {
            name: "web".into(),
            mode: ServiceMode::Replicated(2),
            networks: vec![],
            ports: vec![],
            endpoint_mode: shoal_mesh::service::EndpointMode::Vip,
            constraints: vec![],
            env: BTreeMap::new(),
            command: vec![],
            labels: BTreeMap::new(),
            restart: Default::default(),
            update: Default::default(),
            container: Some(ContainerSpec {
                image: "registry.test/web:1".into(),
                ..Default::default()
            }),
            ext: Default::default(),
        };
        let mut ext = shoal_mesh::state::StateExt::default();
        ext.node_resources.insert(NodeId(1), Default::default());
        let old = V5 {
            last_applied: None,
            membership: Default::default(),
            cluster: Some(cluster_info("c")),
            nodes: BTreeMap::from([(NodeId(1), node(1))]),
            networks: BTreeMap::new(),
            services: BTreeMap::from([(
                "s1".into(),
                ServiceV2 {
                    id: "s1".into(),
                    spec: ServiceSpecV2::from_current(&spec),
                    vips: BTreeMap::new(),
                    ports: vec![],
                    created_at_ms: 5,
                    version: 3,
                    updated_at_ms: 6,
                },
            )]),
            tasks: BTreeMap::new(),
            ingress_addrs: BTreeMap::new(),
            revoked: [NodeId(4)].into(),
            cert_expiry_ms: 3_600_000,
            ca_rotation: None,
            autolock: None,
            ext: ext.clone(),
        };
        let data = decode_data(&codec::encode(&old).unwrap()).unwrap();
        assert_eq!(data.state.services["s1"].spec, spec);
        assert_eq!(data.state.ext, ext);
        // And the current shape, routes and all, reads as itself.
        let mut now = data.clone();
        now.state
            .services
            .get_mut("s1")
            .unwrap()
            .spec
            .ext
            .http_routes
            .push("host=a.test".parse().unwrap());
        let back = decode_data(&codec::encode(&now).unwrap()).unwrap();
        assert_eq!(back.state.services["s1"].spec.ext.http_routes.len(), 1);
    }
}
