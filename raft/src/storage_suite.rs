//! openraft's storage test suite against our redb log store and snapshotting
//! state machine, each run in a fresh temporary directory.

use openraft::StorageError;
use openraft::testing::{StoreBuilder, Suite};

use crate::types::TypeConfig;
use crate::{LogStore, StateMachineStore};

struct TempStoreBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for TempStoreBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, sm) = crate::open(dir.path()).expect("open store");
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
    let err = crate::open(dir.path())
        .err()
        .expect("corrupt snapshot must be refused");
    assert!(err.to_string().contains("snapshot.bin"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("raft-log.redb"), vec![7u8; 4096]).unwrap();
    let err = crate::open(dir.path())
        .err()
        .expect("corrupt log must be refused");
    assert!(err.to_string().contains("raft-log.redb"), "{err}");
}
