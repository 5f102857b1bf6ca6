//! The durable Raft log on redb.
//!
//! One redb file holds two tables: `log` (index → encoded entry) and `meta`
//! (vote, last purged log ID, last committed log ID). Every write is a redb
//! transaction with immediate durability: it is fsynced before `commit`
//! returns, and only then is openraft told that the entries are on disk.
//! Entries are sealed with the node's data key (`at_rest`); the meta values
//! (votes and log IDs) are not secret and stay in the clear.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    AnyError, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader, StorageError,
    StorageIOError, Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;
use shoal_mesh::codec;

use crate::StoreError;
use crate::at_rest::{AtRest, log_place};
use crate::types::TypeConfig;

type Entry = openraft::Entry<TypeConfig>;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const KEY_VOTE: &str = "vote";
const KEY_PURGED: &str = "last_purged";
const KEY_COMMITTED: &str = "committed";

/// The durable log store. Cheap to clone: clones share the database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    at_rest: AtRest,
}

fn io_err(subject: ErrorSubject<u64>, verb: ErrorVerb, e: impl ToString) -> StorageError<u64> {
    StorageIOError::new(subject, verb, AnyError::error(e.to_string())).into()
}

fn read_err(e: impl ToString) -> StorageError<u64> {
    io_err(ErrorSubject::Logs, ErrorVerb::Read, e)
}

fn write_err(e: impl ToString) -> StorageError<u64> {
    io_err(ErrorSubject::Logs, ErrorVerb::Write, e)
}

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>, StorageError<u64>> {
    codec::encode(v).map_err(write_err)
}

fn dec<T: DeserializeOwned>(b: &[u8]) -> Result<T, StorageError<u64>> {
    codec::decode(b, codec::DEFAULT_LIMIT).map_err(read_err)
}

impl LogStore {
    /// Opens or creates the log database at `path`, its entries sealed as
    /// `at_rest` says.
    pub fn open(path: &Path, at_rest: AtRest) -> Result<Self, StoreError> {
        let fail = |reason: String| StoreError::OpenLog {
            path: path.to_owned(),
            reason,
        };
        let db = Database::create(path).map_err(|e| fail(e.to_string()))?;
        let txn = db.begin_write().map_err(|e| fail(e.to_string()))?;
        txn.open_table(LOG).map_err(|e| fail(e.to_string()))?;
        txn.open_table(META).map_err(|e| fail(e.to_string()))?;
        txn.commit().map_err(|e| fail(e.to_string()))?;
        let store = LogStore {
            db: Arc::new(db),
            at_rest,
        };
        // Read everything once so that a corrupt entry or meta value is found
        // now, with the file named, rather than at some later Raft step.
        store.check().map_err(|e| fail(e.to_string()))?;
        Ok(store)
    }

    fn check(&self) -> Result<(), StorageError<u64>> {
        self.meta::<Vote<u64>>(KEY_VOTE)?;
        self.meta::<LogId<u64>>(KEY_PURGED)?;
        self.meta::<Option<LogId<u64>>>(KEY_COMMITTED)?;
        let txn = self.db.begin_read().map_err(read_err)?;
        let table = txn.open_table(LOG).map_err(read_err)?;
        for row in table.iter().map_err(read_err)? {
            let (k, v) = row.map_err(read_err)?;
            self.entry(k.value(), v.value())?;
        }
        Ok(())
    }

    /// The entry stored at `index` as `stored`.
    fn entry(&self, index: u64, stored: &[u8]) -> Result<Entry, StorageError<u64>> {
        let plain = self
            .at_rest
            .open(&log_place(index), stored)
            .map_err(read_err)?;
        dec(&plain)
    }

    fn meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StorageError<u64>> {
        let txn = self.db.begin_read().map_err(read_err)?;
        let table = txn.open_table(META).map_err(read_err)?;
        match table.get(key).map_err(read_err)? {
            Some(v) => Ok(Some(dec(v.value())?)),
            None => Ok(None),
        }
    }

    fn put_meta<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StorageError<u64>> {
        let bytes = enc(value)?;
        let txn = self.db.begin_write().map_err(write_err)?;
        {
            let mut table = txn.open_table(META).map_err(write_err)?;
            table.insert(key, bytes.as_slice()).map_err(write_err)?;
        }
        txn.commit().map_err(write_err)
    }

    /// Writes `entries` in one transaction, fsynced before it returns.
    pub fn write_entries(
        &self,
        entries: impl IntoIterator<Item = Entry>,
    ) -> Result<(), StorageError<u64>> {
        let txn = self.db.begin_write().map_err(write_err)?;
        {
            let mut table = txn.open_table(LOG).map_err(write_err)?;
            for entry in entries {
                let index = entry.log_id.index;
                let bytes = self.at_rest.seal(&log_place(index), enc(&entry)?);
                table
                    .insert(entry.log_id.index, bytes.as_slice())
                    .map_err(write_err)?;
            }
        }
        // Immediate durability: fsynced when commit returns.
        txn.commit().map_err(write_err)
    }

    /// The saved vote.
    pub fn vote(&self) -> Result<Option<Vote<u64>>, StorageError<u64>> {
        self.meta(KEY_VOTE)
    }

    /// Saves `vote`, fsynced.
    pub fn set_vote(&self, vote: &Vote<u64>) -> Result<(), StorageError<u64>> {
        self.put_meta(KEY_VOTE, vote)
    }

    /// The last log ID, present or purged.
    pub fn last_log_id(&self) -> Result<Option<LogId<u64>>, StorageError<u64>> {
        Ok(self
            .last_entry_id()?
            .or(self.meta::<LogId<u64>>(KEY_PURGED)?))
    }

    fn last_entry_id(&self) -> Result<Option<LogId<u64>>, StorageError<u64>> {
        let txn = self.db.begin_read().map_err(read_err)?;
        let table = txn.open_table(LOG).map_err(read_err)?;
        match table.last().map_err(read_err)? {
            Some((k, v)) => Ok(Some(self.entry(k.value(), v.value())?.log_id)),
            None => Ok(None),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError<u64>> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let txn = self.db.begin_read().map_err(read_err)?;
        let table = txn.open_table(LOG).map_err(read_err)?;
        let mut out = Vec::new();
        for row in table.range(start..).map_err(read_err)? {
            let (k, v) = row.map_err(read_err)?;
            if !range.contains(&k.value()) {
                break;
            }
            out.push(self.entry(k.value(), v.value())?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<u64>> {
        let last_purged_log_id = self.meta::<LogId<u64>>(KEY_PURGED)?;
        let last_log_id = self.last_log_id()?;
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError<u64>> {
        self.set_vote(vote)
            .map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError<u64>> {
        self.vote()
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<u64>>,
    ) -> Result<(), StorageError<u64>> {
        self.put_meta(KEY_COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError<u64>> {
        Ok(self.meta::<Option<LogId<u64>>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<u64>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let result = self.write_entries(entries);
        callback.log_io_completed(
            result
                .as_ref()
                .map(|_| ())
                .map_err(|e| std::io::Error::other(e.to_string())),
        );
        result
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        let txn = self.db.begin_write().map_err(write_err)?;
        {
            let mut table = txn.open_table(LOG).map_err(write_err)?;
            table
                .retain_in(log_id.index.., |_, _| false)
                .map_err(write_err)?;
        }
        txn.commit().map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        let bytes = enc(&log_id)?;
        let txn = self.db.begin_write().map_err(write_err)?;
        {
            let mut meta = txn.open_table(META).map_err(write_err)?;
            meta.insert(KEY_PURGED, bytes.as_slice())
                .map_err(write_err)?;
            let mut table = txn.open_table(LOG).map_err(write_err)?;
            table
                .retain_in(..=log_id.index, |_, _| false)
                .map_err(write_err)?;
        }
        txn.commit().map_err(write_err)
    }
}
