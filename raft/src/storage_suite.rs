//! openraft's storage test suite against our redb log store and snapshotting
//! state machine (encrypted at rest, as the node runs them), each run in a
//! fresh temporary directory.

use openraft::StorageError;
use openraft::testing::{StoreBuilder, Suite};

use crate::types::TypeConfig;
use crate::{AtRest, LogStore, StateMachineStore};

const KEY: [u8; 32] = [3; 32];

struct TempStoreBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for TempStoreBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, sm) = crate::open(dir.path(), AtRest::with_key(&KEY)).expect("open store");
        Ok((dir, log, sm))
    }
}

#[test]
fn passes_openraft_storage_suite() {
    Suite::test_all(TempStoreBuilder).unwrap();
}

#[test]
fn a_corrupt_snapshot_or_log_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("snapshot.bin"), b"\x01garbage").unwrap();
    let err = crate::open(dir.path(), AtRest::clear())
        .err()
        .expect("corrupt snapshot must be refused");
    assert!(err.to_string().contains("snapshot.bin"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("raft-log.redb"), vec![7u8; 4096]).unwrap();
    let err = crate::open(dir.path(), AtRest::clear())
        .err()
        .expect("corrupt log must be refused");
    assert!(err.to_string().contains("raft-log.redb"), "{err}");
}

fn entry_naming(index: u64, hostname: &str) -> openraft::Entry<TypeConfig> {
    let node = shoal_mesh::Node {
        hostname: hostname.into(),
        ..shoal_mesh::fixtures::node(2)
    };
    openraft::Entry {
        log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
        payload: openraft::EntryPayload::Normal(shoal_mesh::Command::AddNode(node)),
    }
}

fn file_has(path: &std::path::Path, marker: &str) -> bool {
    let bytes = std::fs::read(path).unwrap();
    bytes.windows(marker.len()).any(|w| w == marker.as_bytes())
}

#[test]
fn the_log_is_sealed_on_disk_and_a_log_from_before_encryption_still_reads() {
    use openraft::RaftLogReader;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft-log.redb");
    // Written in the clear, as before encryption.
    let clear = LogStore::open(&path, AtRest::clear()).unwrap();
    clear
        .write_entries([entry_naming(1, "clear-marker")])
        .unwrap();
    drop(clear);
    assert!(file_has(&path, "clear-marker"));
    let mut sealed = LogStore::open(&path, AtRest::with_key(&KEY)).unwrap();
    sealed
        .write_entries([entry_naming(2, "sealed-marker")])
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let read = rt.block_on(sealed.try_get_log_entries(1..3)).unwrap();
    assert_eq!(read.len(), 2);
    drop(sealed);
    assert!(!file_has(&path, "sealed-marker"));
    // Without its key, or with another, the log does not open, and says
    // which file.
    for other in [AtRest::clear(), AtRest::with_key(&[4; 32])] {
        let err = LogStore::open(&path, other).err().expect("must be refused");
        assert!(err.to_string().contains("raft-log.redb"), "{err}");
        assert!(err.to_string().contains("data key"), "{err}");
    }
}

#[test]
fn the_snapshot_is_sealed_on_disk_and_opens_only_with_its_key() {
    use openraft::RaftSnapshotBuilder;
    let dir = tempfile::tempdir().unwrap();
    let (_log, mut sm) = crate::open(dir.path(), AtRest::with_key(&KEY)).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(sm.build_snapshot()).unwrap();
    drop(sm);
    let path = dir.path().join("snapshot.bin");
    assert_eq!(std::fs::read(&path).unwrap()[0], crate::at_rest::SEALED);
    StateMachineStore::open(dir.path(), AtRest::with_key(&KEY)).unwrap();
    for other in [AtRest::clear(), AtRest::with_key(&[4; 32])] {
        let err = StateMachineStore::open(dir.path(), other)
            .err()
            .expect("must be refused");
        assert!(err.to_string().contains("snapshot.bin"), "{err}");
    }
}
