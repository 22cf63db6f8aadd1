//! `RocksLogStore`: the Raft log and vote on the node's RocksDB (`raft_log`, `raft_meta`).
//!
//! Durability: `save_vote`, `truncate_after` and `purge` write with `sync = true` before they
//! return. `append` writes its batch (so the entries are readable at once), then hands the IO
//! callback to one flusher thread that syncs the WAL and completes callbacks in submission order;
//! a sync covers every write before it, so several appends share one fsync (group commit). No
//! callback fires before its entries are on disk.
//!
//! Blocking RocksDB work runs on `spawn_blocking` threads or the flusher thread, never on an
//! async runtime thread.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::Instant;

use ktd_proto::ktd::raft::v1 as pb;
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use prost::Message;
use rocksdb::{Direction, IteratorMode, WriteBatch};

use crate::error::SequencerError;
use crate::raft::codec;
use crate::raft::db::{CF_RAFT_LOG, CF_RAFT_META, CF_SM_RESULTS, Storage, be64, synced};
use crate::raft::types::{Entry, LogId, TypeConfig, Vote};

const VOTE_KEY: &[u8] = b"vote";
const LAST_PURGED_KEY: &[u8] = b"last_purged";
const COMMITTED_KEY: &[u8] = b"committed";

fn to_io(error: SequencerError) -> io::Error {
    io::Error::other(error.to_string())
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, SequencerError> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| io::Error::other(format!("storage task failed: {error}")))?
        .map_err(to_io)
}

/// Reads a protobuf value from `raft_meta`.
fn read_meta<M: Message + Default>(
    storage: &Storage,
    key: &[u8],
) -> Result<Option<M>, SequencerError> {
    storage
        .db()
        .get_cf(storage.cf(CF_RAFT_META), key)
        .map_err(SequencerError::storage("read raft metadata"))?
        .map(|bytes| {
            M::decode(bytes.as_slice())
                .map_err(|error| SequencerError::Corrupt(format!("raft metadata: {error}")))
        })
        .transpose()
}

/// Decodes one stored log entry.
pub fn decode_entry(bytes: &[u8]) -> Result<Entry, SequencerError> {
    let entry = pb::Entry::decode(bytes)
        .map_err(|error| SequencerError::Corrupt(format!("raft log entry: {error}")))?;
    codec::entry_from_pb(entry).map_err(|error| SequencerError::Corrupt(error.to_string()))
}

/// Reads log entries with index in `[start, end)`.
pub fn read_entries(storage: &Storage, start: u64, end: u64) -> Result<Vec<Entry>, SequencerError> {
    read_entries_bounded(storage, start, end, usize::MAX)
}

/// Like [`read_entries`], but stops after the entry that brings the stored bytes read to
/// `max_bytes` (so at least one entry, if there is one).
pub fn read_entries_bounded(
    storage: &Storage,
    start: u64,
    end: u64,
    max_bytes: usize,
) -> Result<Vec<Entry>, SequencerError> {
    let mut entries = Vec::new();
    let mut bytes = 0usize;
    if start >= end {
        return Ok(entries);
    }
    let iter = storage.db().iterator_cf(
        storage.cf(CF_RAFT_LOG),
        IteratorMode::From(&be64(start), Direction::Forward),
    );
    for item in iter {
        let (key, value) = item.map_err(SequencerError::storage("read the raft log"))?;
        let index = crate::raft::db::read_be64(&key)?;
        if index >= end {
            break;
        }
        let entry = decode_entry(&value)?;
        if entry.log_id.index() != index {
            return Err(SequencerError::Corrupt(format!(
                "raft log key {index} holds entry {}",
                entry.log_id.index()
            )));
        }
        entries.push(entry);
        bytes = bytes.saturating_add(value.len());
        if bytes >= max_bytes {
            break;
        }
    }
    Ok(entries)
}

/// The stored vote, if any.
pub fn stored_vote(storage: &Storage) -> Result<Option<Vote>, SequencerError> {
    read_meta::<pb::Vote>(storage, VOTE_KEY)?
        .map(|vote| codec::vote_from_pb(Some(&vote)))
        .transpose()
        .map_err(|error| SequencerError::Corrupt(error.to_string()))
}

/// The last committed log id this node learned (not synced: it may trail what it knew).
pub fn stored_committed(storage: &Storage) -> Result<Option<LogId>, SequencerError> {
    read_meta::<pb::LogId>(storage, COMMITTED_KEY)?
        .map(|log_id| codec::log_id_from_pb(&log_id))
        .transpose()
        .map_err(|error| SequencerError::Corrupt(error.to_string()))
}

/// The last purged log id and the last log id (the last purged one if the log is empty).
pub fn stored_log_state(storage: &Storage) -> Result<LogState<TypeConfig>, SequencerError> {
    let last_purged = read_meta::<pb::LogId>(storage, LAST_PURGED_KEY)?
        .map(|log_id| codec::log_id_from_pb(&log_id))
        .transpose()
        .map_err(|error| SequencerError::Corrupt(error.to_string()))?;
    let last = storage
        .db()
        .iterator_cf(storage.cf(CF_RAFT_LOG), IteratorMode::End)
        .next()
        .transpose()
        .map_err(SequencerError::storage("read the last log entry"))?
        .map(|(_, value)| decode_entry(&value).map(|entry| entry.log_id))
        .transpose()?;
    Ok(LogState {
        last_purged_log_id: last_purged,
        last_log_id: last.or(last_purged),
    })
}

/// The newest membership entry of the log with an index above `above`, read newest first.
pub fn last_membership_entry_above(
    storage: &Storage,
    above: u64,
) -> Result<Option<Entry>, SequencerError> {
    for item in storage
        .db()
        .iterator_cf(storage.cf(CF_RAFT_LOG), IteratorMode::End)
    {
        let (key, value) = item.map_err(SequencerError::storage("read the raft log"))?;
        if crate::raft::db::read_be64(&key)? <= above {
            break;
        }
        let entry = decode_entry(&value)?;
        if matches!(
            entry.payload,
            crate::raft::types::EntryPayload::Membership(_)
        ) {
            return Ok(Some(entry));
        }
    }
    Ok(None)
}

/// Writes `entry` at its index and `vote` in one synced batch (the offline membership rewrite
/// of [`crate::raft::force`]; openraft is not running).
pub fn write_entry_and_vote(
    storage: &Storage,
    entry: &Entry,
    vote: &Vote,
) -> Result<(), SequencerError> {
    let mut batch = WriteBatch::default();
    batch.put_cf(
        storage.cf(CF_RAFT_LOG),
        be64(entry.log_id.index()),
        codec::entry_to_pb(entry).encode_to_vec(),
    );
    batch.put_cf(
        storage.cf(CF_RAFT_META),
        VOTE_KEY,
        codec::vote_to_pb(vote).encode_to_vec(),
    );
    storage
        .db()
        .write_opt(batch, &synced())
        .map_err(SequencerError::storage("write the forced membership"))
}

/// The index of the last purged entry (0 = nothing purged).
pub fn last_purged_index(storage: &Storage) -> Result<u64, SequencerError> {
    Ok(read_meta::<pb::LogId>(storage, LAST_PURGED_KEY)?
        .map(|log_id| log_id.index)
        .unwrap_or(0))
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(start) => *start,
        Bound::Excluded(start) => start.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(end) => end.saturating_add(1),
        Bound::Excluded(end) => *end,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

/// The Raft log store.
pub struct RocksLogStore {
    storage: Arc<Storage>,
    /// Appends written but not yet synced: when each started, and its callback.
    flusher: std_mpsc::Sender<(Instant, IOFlushed<TypeConfig>)>,
}

impl RocksLogStore {
    /// Opens the log store on `storage` and starts its flusher thread.
    pub fn new(storage: Arc<Storage>) -> io::Result<Self> {
        let (flusher, callbacks) = std_mpsc::channel::<(Instant, IOFlushed<TypeConfig>)>();
        let flusher_storage = storage.clone();
        std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || run_flusher(&flusher_storage, &callbacks))?;
        Ok(Self { storage, flusher })
    }
}

/// Completes IO callbacks in order, one WAL sync per group of pending appends, and records the
/// sync's latency and each append's (write start → durable).
fn run_flusher(
    storage: &Storage,
    callbacks: &std_mpsc::Receiver<(Instant, IOFlushed<TypeConfig>)>,
) {
    while let Ok(first) = callbacks.recv() {
        let mut group = vec![first];
        while let Ok(next) = callbacks.try_recv() {
            group.push(next);
        }
        let fsync_started = Instant::now();
        let result = storage.db().flush_wal(true);
        if result.is_ok() {
            crate::metrics::record_raft_log_sync(
                fsync_started,
                group.iter().map(|(started, _)| *started),
            );
        }
        for (_, callback) in group {
            callback.io_completed(
                result
                    .as_ref()
                    .map(|_| ())
                    .map_err(|error| io::Error::other(format!("sync the raft log: {error}"))),
            );
        }
    }
}

/// Reads the log and the vote; cheap to create, one per replication task.
#[derive(Clone)]
pub struct RocksLogReader {
    storage: Arc<Storage>,
}

impl RaftLogReader<TypeConfig> for RocksLogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<Entry>> {
        let (start, end) = bounds(&range);
        let storage = self.storage.clone();
        blocking(move || read_entries(&storage, start, end)).await
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        let storage = self.storage.clone();
        blocking(move || stored_vote(&storage)).await
    }
}

impl RaftLogReader<TypeConfig> for RocksLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<Entry>> {
        self.get_log_reader().await.try_get_log_entries(range).await
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        self.get_log_reader().await.read_vote().await
    }
}

impl RaftLogStorage<TypeConfig> for RocksLogStore {
    type LogReader = RocksLogReader;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        let storage = self.storage.clone();
        blocking(move || stored_log_state(&storage)).await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        RocksLogReader {
            storage: self.storage.clone(),
        }
    }

    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        let storage = self.storage.clone();
        let bytes = codec::vote_to_pb(vote).encode_to_vec();
        blocking(move || {
            storage
                .db()
                .put_cf_opt(storage.cf(CF_RAFT_META), VOTE_KEY, bytes, &synced())
                .map_err(SequencerError::storage("save the vote"))
        })
        .await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> io::Result<()> {
        let Some(committed) = committed else {
            return Ok(());
        };
        let storage = self.storage.clone();
        let bytes = codec::log_id_to_pb(&committed).encode_to_vec();
        // Not synced: a lost `committed` only means re-learning it from the leader.
        blocking(move || {
            storage
                .db()
                .put_cf(storage.cf(CF_RAFT_META), COMMITTED_KEY, bytes)
                .map_err(SequencerError::storage("save the committed log id"))
        })
        .await
    }

    async fn read_committed(&mut self) -> io::Result<Option<LogId>> {
        let storage = self.storage.clone();
        blocking(move || stored_committed(&storage)).await
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let encoded: Vec<(u64, Vec<u8>)> = entries
            .into_iter()
            .map(|entry| {
                (
                    entry.log_id.index(),
                    codec::entry_to_pb(&entry).encode_to_vec(),
                )
            })
            .collect();
        let storage = self.storage.clone();
        let started = Instant::now();
        blocking(move || {
            let mut batch = WriteBatch::default();
            let log = storage.cf(CF_RAFT_LOG);
            for (index, bytes) in encoded {
                batch.put_cf(log, be64(index), bytes);
            }
            storage
                .db()
                .write(batch)
                .map_err(SequencerError::storage("append to the raft log"))
        })
        .await?;
        self.flusher
            .send((started, callback))
            .map_err(|_| io::Error::other("the raft log flusher has stopped"))
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> io::Result<()> {
        let from = last_log_id.map_or(0, |log_id| log_id.index() + 1);
        let storage = self.storage.clone();
        blocking(move || {
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(storage.cf(CF_RAFT_LOG), be64(from), be64(u64::MAX));
            storage
                .db()
                .write_opt(batch, &synced())
                .map_err(SequencerError::storage("truncate the raft log"))
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        let storage = self.storage.clone();
        let bytes = codec::log_id_to_pb(&log_id).encode_to_vec();
        let end = log_id.index() + 1;
        blocking(move || {
            // One atomic batch: the purge mark and the deletions (and the WatchLog results of
            // the purged entries) become durable together.
            let mut batch = WriteBatch::default();
            batch.put_cf(storage.cf(CF_RAFT_META), LAST_PURGED_KEY, bytes);
            batch.delete_range_cf(storage.cf(CF_RAFT_LOG), be64(0), be64(end));
            batch.delete_range_cf(storage.cf(CF_SM_RESULTS), be64(0), be64(end));
            storage
                .db()
                .write_opt(batch, &synced())
                .map_err(SequencerError::storage("purge the raft log"))
        })
        .await
    }
}
