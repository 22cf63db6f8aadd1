//! `RocksStateMachine`: the [`Machine`] on the node's RocksDB, implementing openraft's
//! `RaftStateMachine`.
//!
//! Each `apply` call runs on a blocking thread: every entry of the call goes through
//! [`Machine::apply`] into one `WriteBatch` (updates, epoch records, idempotency keys, one
//! `ApplyResult` per log index, and `MachineMeta` with the last applied log id and membership),
//! written with `sync = true`; only then are the client responders answered. So applied state is
//! durable before anyone hears about it, and a restart resumes from exactly the last applied
//! entry.
//!
//! Readers never take the apply lock: they read RocksDB (one snapshot per read, so data and
//! `MachineMeta` agree) or the [`SmView`] published after every apply batch. A batch is read in
//! pages of bounded bytes ([`SmShared::read_batch_page`]), never loaded whole for a remote
//! reader. While a snapshot install is half done (the `installing` key in `sm_meta`), readers
//! refuse with `InstallingSnapshot` rather than see a mix of old and new state.
//!
//! Installing a snapshot writes in bounded batches, not one `WriteBatch` of the whole state; it
//! stays atomic with respect to a crash because the `installing` key, written first and deleted
//! last, names the (synced) snapshot directory and [`SmShared::open`] re-runs an interrupted
//! install from it before loading anything (see `replace_state`).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::StreamExt;
use ktd_proto::ktd::raft::v1 as rpb;
use ktd_proto::ktd::sequencer::v1 as pb;
use openraft::storage::{EntryResponder, RaftStateMachine};
use prost::Message;
use rocksdb::{DB, Direction, IteratorMode, ReadOptions, WriteBatch};
use tokio::sync::watch;

use crate::error::{Result, SequencerError};
use crate::machine::{EpochState, Machine, MachineTx};
use crate::raft::codec;
use crate::raft::db::{
    CF_SM_EPOCHS, CF_SM_IDEM, CF_SM_IDEM_ORDER, CF_SM_META, CF_SM_RESULTS, CF_SM_UPDATES, Storage,
    be64, read_be64, synced,
};
use crate::raft::log_store;
use crate::raft::snapshot::{self, RocksSnapshotBuilder, SnapshotHandle};
use crate::raft::types::{EntryPayload, LogId, SnapshotMeta, StoredMembership, TypeConfig};

const META_KEY: &[u8] = b"state";
/// Present in `sm_meta` while a snapshot install is half done (see [`SmShared::install_blocking`]).
const INSTALLING_KEY: &[u8] = b"installing";

/// What readers may know about the state machine without locking it; published after every
/// apply batch and snapshot install.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SmView {
    /// Index of the last applied log entry (0 = none).
    pub last_applied_index: u64,
    /// The replicated epoch state.
    pub epochs: Option<EpochState>,
    /// Distinct labels in the open epoch.
    pub open_epoch_updates: u64,
    /// Node ids removed from the membership: never accepted again.
    pub removed_node_ids: BTreeSet<u64>,
}

impl SmView {
    /// The epoch state, or the initial one.
    pub fn epochs(&self) -> EpochState {
        self.epochs.clone().unwrap_or_default()
    }
}

/// The state behind the apply lock.
struct SmInner {
    machine: Machine,
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    /// Node ids a membership change removed (replicated: derived from the membership entries).
    removed_node_ids: BTreeSet<u64>,
}

/// The ids in `before`'s membership that `after` no longer has (voters or learners).
fn removed_by(before: &StoredMembership, after: &crate::raft::types::Membership) -> Vec<u64> {
    let kept: BTreeSet<u64> = after.nodes().map(|(id, _)| *id).collect();
    before
        .membership()
        .nodes()
        .map(|(id, _)| *id)
        .filter(|id| !kept.contains(id))
        .collect()
}

/// The state machine shared by the openraft handle, the snapshot builder and readers.
pub struct SmShared {
    storage: Arc<Storage>,
    inner: Mutex<SmInner>,
    view: watch::Sender<SmView>,
    /// Index of the newest snapshot this node holds (built or installed).
    snapshot_index: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for SmShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmShared").finish_non_exhaustive()
    }
}

fn corrupt(what: &str) -> impl Fn(prost::DecodeError) -> SequencerError + '_ {
    move |error| SequencerError::Corrupt(format!("{what}: {error}"))
}

fn update_key(epoch: u64, label: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + label.len());
    key.extend_from_slice(&be64(epoch));
    key.extend_from_slice(label);
    key
}

/// Encodes the machine metadata.
fn encode_meta(inner: &SmInner) -> Vec<u8> {
    let state = inner.machine.state();
    rpb::MachineMeta {
        last_applied: inner.last_applied.as_ref().map(codec::log_id_to_pb),
        last_membership: Some(codec::stored_membership_to_pb(&inner.last_membership)),
        open_epoch: state.open_epoch,
        next_sequence: state.next_sequence,
        last_committed_epoch: state.last_committed_epoch,
        idem_next_ordinal: state.idem_next_ordinal,
        idem_oldest_ordinal: state.idem_oldest_ordinal,
        metadata: state.metadata.clone(),
        shard_map: Some(state.shard_map.clone()),
        retained_batches: state
            .retained_batches
            .iter()
            .map(|(epoch, count)| (*epoch, *count))
            .collect(),
        sealed_at_ms: state
            .sealed_at_ms
            .iter()
            .map(|(epoch, at)| (*epoch, *at))
            .collect(),
        retained_batch_bytes: state
            .retained_batch_bytes
            .iter()
            .map(|(epoch, bytes)| (*epoch, *bytes))
            .collect(),
        retained_sealed_at_ms: state
            .retained_sealed_at_ms
            .iter()
            .map(|(epoch, at)| (*epoch, *at))
            .collect(),
        replica_progress: state
            .replica_progress
            .iter()
            .map(|(server, epoch)| (server.clone(), *epoch))
            .collect(),
        open_epoch_bytes: state.open_epoch_bytes,
        removed_node_ids: inner.removed_node_ids.iter().copied().collect(),
        kept_next_ordinal: state.kept_next_ordinal,
        kept_oldest_ordinal: state.kept_oldest_ordinal,
        kept_marks: state
            .kept_marks
            .iter()
            .map(|(first, start)| (*first, *start))
            .collect(),
        history: Some(crate::history::to_pb(&state.history)),
        restore: state.restore.clone(),
    }
    .encode_to_vec()
}

/// Loads the state machine from `db` (the live database or a received checkpoint).
fn load(db: &DB) -> Result<SmInner> {
    let cf = |name| crate::raft::db::cf(db, name);
    let Some(bytes) = db
        .get_cf(cf(CF_SM_META), META_KEY)
        .map_err(SequencerError::storage("read the state machine metadata"))?
    else {
        return Ok(SmInner {
            machine: Machine::default(),
            last_applied: None,
            last_membership: StoredMembership::default(),
            removed_node_ids: BTreeSet::new(),
        });
    };
    let meta =
        rpb::MachineMeta::decode(bytes.as_slice()).map_err(corrupt("state machine metadata"))?;
    let state = EpochState {
        open_epoch: meta.open_epoch,
        next_sequence: meta.next_sequence,
        last_committed_epoch: meta.last_committed_epoch,
        idem_next_ordinal: meta.idem_next_ordinal,
        idem_oldest_ordinal: meta.idem_oldest_ordinal,
        metadata: meta.metadata,
        shard_map: meta.shard_map.unwrap_or_default(),
        retained_batches: meta.retained_batches.into_iter().collect(),
        sealed_at_ms: meta.sealed_at_ms.into_iter().collect(),
        retained_batch_bytes: meta.retained_batch_bytes.into_iter().collect(),
        retained_sealed_at_ms: meta.retained_sealed_at_ms.into_iter().collect(),
        replica_progress: meta.replica_progress.into_iter().collect(),
        open_epoch_bytes: meta.open_epoch_bytes,
        kept_next_ordinal: meta.kept_next_ordinal,
        kept_oldest_ordinal: meta.kept_oldest_ordinal,
        kept_marks: meta.kept_marks.into_iter().collect(),
        history: crate::history::from_pb(meta.history.as_ref()),
        restore: meta.restore,
    };
    if state.open_epoch == 0 || state.next_sequence == 0 {
        return Err(SequencerError::Corrupt(
            "state machine metadata has epoch or sequence 0".into(),
        ));
    }
    let prefix = be64(state.open_epoch);
    let mut open_labels = HashSet::new();
    let mut iter_read = ReadOptions::default();
    iter_read.set_iterate_upper_bound(be64(state.open_epoch + 1).to_vec());
    for item in db.iterator_cf_opt(
        cf(CF_SM_UPDATES),
        iter_read,
        IteratorMode::From(&prefix, Direction::Forward),
    ) {
        let (key, _) = item.map_err(SequencerError::storage("read the open epoch"))?;
        open_labels.insert(label_of_update_key(&key)?.to_vec());
    }
    let last_applied = codec::opt_log_id_from_pb(meta.last_applied.as_ref())
        .map_err(|error| SequencerError::Corrupt(error.to_string()))?;
    let last_membership = codec::stored_membership_from_pb(meta.last_membership.as_ref())
        .map_err(|error| SequencerError::Corrupt(error.to_string()))?;
    Ok(SmInner {
        machine: Machine::new(state, open_labels),
        last_applied,
        last_membership,
        removed_node_ids: meta.removed_node_ids.into_iter().collect(),
    })
}

/// Reads and writes of one apply batch on RocksDB (see [`MachineTx`]).
struct RocksTx<'a> {
    storage: &'a Storage,
    batch: WriteBatch,
    idem: HashMap<Vec<u8>, Option<pb::AppendResponse>>,
    idem_order: HashMap<u64, Option<Vec<u8>>>,
    epochs: HashMap<u64, pb::EpochRecord>,
}

impl<'a> RocksTx<'a> {
    fn new(storage: &'a Storage) -> Self {
        Self {
            storage,
            batch: WriteBatch::default(),
            idem: HashMap::new(),
            idem_order: HashMap::new(),
            epochs: HashMap::new(),
        }
    }
}

impl MachineTx for RocksTx<'_> {
    fn idem_get(&self, key: &[u8]) -> Result<Option<pb::AppendResponse>> {
        if let Some(answer) = self.idem.get(key) {
            return Ok(answer.clone());
        }
        let Some(bytes) = self
            .storage
            .db()
            .get_cf(self.storage.cf(CF_SM_IDEM), key)
            .map_err(SequencerError::storage("read an idempotency key"))?
        else {
            return Ok(None);
        };
        let answer = pb::AppendResponse::decode(bytes.get(8..).unwrap_or_default())
            .map_err(corrupt("idempotency record"))?;
        Ok(Some(answer))
    }

    fn idem_put(&mut self, key: &[u8], ordinal: u64, answer: &pb::AppendResponse) {
        let mut value = be64(ordinal).to_vec();
        answer.encode(&mut value).expect("a Vec grows as needed");
        self.batch.put_cf(self.storage.cf(CF_SM_IDEM), key, value);
        self.batch
            .put_cf(self.storage.cf(CF_SM_IDEM_ORDER), be64(ordinal), key);
        self.idem.insert(key.to_vec(), Some(answer.clone()));
        self.idem_order.insert(ordinal, Some(key.to_vec()));
    }

    fn idem_evict(&mut self, ordinal: u64) -> Result<()> {
        let key = match self.idem_order.get(&ordinal) {
            Some(key) => key.clone(),
            None => self
                .storage
                .db()
                .get_cf(self.storage.cf(CF_SM_IDEM_ORDER), be64(ordinal))
                .map_err(SequencerError::storage("read an idempotency ordinal"))?,
        };
        self.batch
            .delete_cf(self.storage.cf(CF_SM_IDEM_ORDER), be64(ordinal));
        self.idem_order.insert(ordinal, None);
        if let Some(key) = key {
            self.batch.delete_cf(self.storage.cf(CF_SM_IDEM), &key);
            self.idem.insert(key, None);
        }
        Ok(())
    }

    fn epoch_get(&self, epoch: u64) -> Result<Option<pb::EpochRecord>> {
        if let Some(record) = self.epochs.get(&epoch) {
            return Ok(Some(record.clone()));
        }
        read_epoch_record(self.storage, epoch)
    }

    fn epoch_put(&mut self, record: &pb::EpochRecord) {
        self.batch.put_cf(
            self.storage.cf(CF_SM_EPOCHS),
            be64(record.epoch),
            record.encode_to_vec(),
        );
        self.epochs.insert(record.epoch, record.clone());
    }

    fn update_put(&mut self, epoch: u64, label: &[u8], sequence: u64, value: &[u8]) {
        let mut stored = Vec::with_capacity(8 + value.len());
        stored.extend_from_slice(&be64(sequence));
        stored.extend_from_slice(value);
        self.batch.put_cf(
            self.storage.cf(CF_SM_UPDATES),
            update_key(epoch, label),
            stored,
        );
    }

    fn updates_drop(&mut self, epoch: u64) {
        self.batch
            .delete_range_cf(self.storage.cf(CF_SM_UPDATES), be64(epoch), be64(epoch + 1));
    }
}

/// Bytes of one write while a snapshot's content is copied in.
const INSTALL_BATCH_BYTES: usize = 8 << 20;

/// Replaces the live state-machine column families with `checkpoint`'s, in writes of about
/// [`INSTALL_BATCH_BYTES`] (memory stays bounded whatever the state's size).
///
/// Crash safety without one atomic write: the first synced write clears the live column
/// families (range deletions) and records [`INSTALLING_KEY`] = `dir_name`, the snapshot
/// directory (already synced in place, so it outlives a crash); the copies follow unsynced; the
/// last write deletes the key, synced (which also syncs the WAL before it). A crash in between
/// leaves the key, and [`SmShared::open`] runs the install again from that directory before it
/// loads anything ([`finish_interrupted_install`]). Readers refuse while the key is present
/// ([`SequencerError::InstallingSnapshot`]), so they see the old state or the new one, never a
/// mix; the apply lock keeps applies out.
fn replace_state(storage: &Storage, checkpoint: &DB, dir_name: &str) -> Result<()> {
    let db = storage.db();
    let mut batch = WriteBatch::default();
    for name in crate::raft::db::SNAPSHOT_COLUMN_FAMILIES {
        clear_column_family(db, storage.cf(name), &mut batch)?;
    }
    clear_column_family(db, storage.cf(CF_SM_RESULTS), &mut batch)?;
    batch.put_cf(storage.cf(CF_SM_META), INSTALLING_KEY, dir_name.as_bytes());
    db.write_opt(batch, &synced())
        .map_err(SequencerError::storage("start installing a snapshot"))?;
    let mut batch = WriteBatch::default();
    for name in crate::raft::db::SNAPSHOT_COLUMN_FAMILIES {
        let live = storage.cf(name);
        for item in
            checkpoint.iterator_cf(crate::raft::db::cf(checkpoint, name), IteratorMode::Start)
        {
            let (key, value) = item.map_err(SequencerError::storage("read a snapshot"))?;
            if name == CF_SM_META && &*key == INSTALLING_KEY {
                continue;
            }
            batch.put_cf(live, key, value);
            if batch.size_in_bytes() >= INSTALL_BATCH_BYTES {
                db.write(std::mem::take(&mut batch))
                    .map_err(SequencerError::storage("install a snapshot"))?;
            }
        }
    }
    batch.delete_cf(storage.cf(CF_SM_META), INSTALLING_KEY);
    db.write_opt(batch, &synced())
        .map_err(SequencerError::storage("finish installing a snapshot"))
}

/// Adds deletions of every key of `cf` to `batch`: one range deletion and one point deletion
/// (the range's end is exclusive), whatever the number of keys.
fn clear_column_family(db: &DB, cf: &rocksdb::ColumnFamily, batch: &mut WriteBatch) -> Result<()> {
    let mut iterator = db.raw_iterator_cf(cf);
    iterator.seek_to_first();
    let first = iterator.key().map(<[u8]>::to_vec);
    iterator.seek_to_last();
    let last = iterator.key().map(<[u8]>::to_vec);
    iterator
        .status()
        .map_err(SequencerError::storage("clear the state machine"))?;
    if let (Some(first), Some(last)) = (first, last) {
        batch.delete_range_cf(cf, &first, &last);
        batch.delete_cf(cf, &last);
    }
    Ok(())
}

/// Finishes a snapshot install a crash interrupted (see [`replace_state`]); does nothing if
/// none was under way.
fn finish_interrupted_install(storage: &Storage) -> Result<()> {
    let Some(dir_name) = storage
        .db()
        .get_cf(storage.cf(CF_SM_META), INSTALLING_KEY)
        .map_err(SequencerError::storage("read the state machine metadata"))?
    else {
        return Ok(());
    };
    let dir_name = String::from_utf8(dir_name)
        .map_err(|_| SequencerError::Corrupt("installing-snapshot marker is not UTF-8".into()))?;
    let dir = storage.snapshot_dir().join(&dir_name);
    tracing::warn!(dir = %dir.display(), "finishing a snapshot install interrupted by a crash");
    let checkpoint = snapshot::open_checkpoint(&dir)?;
    replace_state(storage, &checkpoint, &dir_name)
}

/// The last applied log id and membership on `storage` (finishing an interrupted snapshot
/// install first, as opening the state machine does). For offline tools: the node must not run.
pub fn applied_membership(storage: &Storage) -> Result<(Option<LogId>, StoredMembership)> {
    finish_interrupted_install(storage)?;
    let inner = load(storage.db())?;
    Ok((inner.last_applied, inner.last_membership))
}

fn read_epoch_record(storage: &Storage, epoch: u64) -> Result<Option<pb::EpochRecord>> {
    storage
        .db()
        .get_cf(storage.cf(CF_SM_EPOCHS), be64(epoch))
        .map_err(SequencerError::storage("read an epoch record"))?
        .map(|bytes| pb::EpochRecord::decode(bytes.as_slice()).map_err(corrupt("epoch record")))
        .transpose()
}

/// Bytes of labels and values [`SmShared::read_batch`] reads per page.
const BATCH_PAGE_BYTES: usize = 4 << 20;

/// Where a paged read of one epoch's batch stands (see [`SmShared::start_batch_read`]).
#[derive(Clone, Debug, PartialEq)]
pub struct BatchCursor {
    /// The epoch.
    pub epoch: u64,
    /// The log index the read is consistent with (fixed at the start).
    pub as_of_index: u64,
    /// Whether the epoch was sealed at the start.
    pub sealed: bool,
    /// Updates in the batch at the start.
    pub total: u64,
    /// The last label returned; the next page starts after it.
    after: Option<Vec<u8>>,
    /// Whether the last page was read.
    pub done: bool,
}

/// Checks that `epoch`'s batch is readable under `meta`: sealed and retained, or open.
fn check_batch_readable(meta: &rpb::MachineMeta, epoch: u64) -> Result<()> {
    if epoch == 0 || epoch > meta.open_epoch {
        return Err(SequencerError::EpochNotSealed {
            epoch,
            open: meta.open_epoch,
        });
    }
    if epoch < meta.open_epoch && !meta.retained_batches.contains_key(&epoch) {
        return Err(SequencerError::BatchNotRetained {
            epoch,
            oldest_retained_before: meta
                .retained_batches
                .keys()
                .min()
                .copied()
                .unwrap_or(meta.open_epoch),
        });
    }
    Ok(())
}

/// Read options bounding an iterator to `epoch`'s `sm_updates` keys.
fn epoch_bounds(epoch: u64) -> ReadOptions {
    let mut read = ReadOptions::default();
    read.set_iterate_lower_bound(be64(epoch).to_vec());
    read.set_iterate_upper_bound(be64(epoch + 1).to_vec());
    read
}

/// One epoch's updates as stored, consistent with `as_of_index`.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchRead {
    /// The epoch.
    pub epoch: u64,
    /// The log index the read is consistent with.
    pub as_of_index: u64,
    /// Whether the epoch is sealed.
    pub sealed: bool,
    /// The updates, in label order.
    pub updates: Vec<pb::SequencedUpdate>,
}

impl SmShared {
    /// Opens the state machine on `storage` and publishes its first view.
    pub fn open(storage: Arc<Storage>) -> Result<Arc<Self>> {
        finish_interrupted_install(&storage)?;
        let inner = load(storage.db())?;
        let (view, _) = watch::channel(SmView::default());
        let snapshot_index = snapshot::current(&storage)?
            .and_then(|current| current.meta.last_log_id)
            .map_or(0, |log_id| log_id.index());
        let shared = Arc::new(Self {
            storage,
            inner: Mutex::new(inner),
            view,
            snapshot_index: std::sync::atomic::AtomicU64::new(snapshot_index),
        });
        shared.publish(&shared.lock());
        Ok(shared)
    }

    fn lock(&self) -> MutexGuard<'_, SmInner> {
        // A panic while applying leaves the node unusable anyway; keep serving reads.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn publish(&self, inner: &SmInner) {
        let view = SmView {
            last_applied_index: inner
                .last_applied
                .as_ref()
                .map_or(0, |log_id| log_id.index()),
            epochs: Some(inner.machine.state().clone()),
            open_epoch_updates: inner.machine.open_epoch_updates(),
            removed_node_ids: inner.removed_node_ids.clone(),
        };
        self.view.send_replace(view);
    }

    /// Subscribes to the published view.
    pub fn view(&self) -> watch::Receiver<SmView> {
        self.view.subscribe()
    }

    /// Index of the newest snapshot this node holds (0 = none).
    pub fn snapshot_index(&self) -> u64 {
        self.snapshot_index
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Records a newer snapshot.
    pub(crate) fn set_snapshot_index(&self, index: u64) {
        self.snapshot_index
            .fetch_max(index, std::sync::atomic::Ordering::SeqCst);
    }

    /// The storage underneath.
    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    /// The last applied log id and membership (for snapshots).
    pub(crate) fn applied_state(&self) -> (Option<LogId>, StoredMembership) {
        let inner = self.lock();
        (inner.last_applied, inner.last_membership.clone())
    }

    /// Runs `work` with the apply lock held (the snapshot builder's consistent cut).
    pub(crate) fn with_apply_lock<T>(
        &self,
        work: impl FnOnce(Option<LogId>, &StoredMembership) -> T,
    ) -> T {
        let inner = self.lock();
        work(inner.last_applied, &inner.last_membership)
    }

    /// Applies a batch of committed entries durably; returns one result per entry.
    fn apply_blocking(
        &self,
        entries: Vec<crate::raft::types::Entry>,
    ) -> Result<Vec<pb::ApplyResult>> {
        let mut inner = self.lock();
        let mut tx = RocksTx::new(&self.storage);
        let mut results = Vec::with_capacity(entries.len());
        for entry in entries {
            let index = entry.log_id.index();
            let result = match &entry.payload {
                EntryPayload::Blank => noop("blank"),
                EntryPayload::Normal(command) => inner.machine.apply(&mut tx, index, &command.0)?,
                EntryPayload::Membership(membership) => {
                    let removed = removed_by(&inner.last_membership, membership);
                    inner.removed_node_ids.extend(removed);
                    inner.last_membership =
                        StoredMembership::new(Some(entry.log_id), membership.clone());
                    noop("membership")
                }
            };
            inner.last_applied = Some(entry.log_id);
            tx.batch.put_cf(
                self.storage.cf(CF_SM_RESULTS),
                be64(index),
                result.encode_to_vec(),
            );
            results.push(result);
        }
        let mut batch = tx.batch;
        batch.put_cf(self.storage.cf(CF_SM_META), META_KEY, encode_meta(&inner));
        let started = std::time::Instant::now();
        let written = self
            .storage
            .db()
            .write_opt(batch, &synced())
            .map_err(SequencerError::storage("apply committed entries"));
        shard::metrics::record_batch_write("sequencer", "apply", started);
        if let Err(error) = written {
            // The in-memory machine ran ahead of a write that failed: go back to what is on
            // disk, so nothing (snapshot builder, readers under the lock) sees state that was
            // never stored. openraft stops on this error; a restart reloads the same state.
            match load(self.storage.db()) {
                Ok(durable) => *inner = durable,
                Err(reload) => tracing::error!(
                    %reload,
                    "after a failed apply, the state machine could not be reloaded from disk"
                ),
            }
            return Err(error);
        }
        self.publish(&inner);
        Ok(results)
    }

    /// Checks that a received checkpoint loads and is at the log id its metadata says.
    pub(crate) fn check_snapshot(meta: &SnapshotMeta, checkpoint: &DB) -> Result<()> {
        let loaded = load(checkpoint)?;
        if loaded.last_applied != meta.last_log_id {
            return Err(SequencerError::Corrupt(format!(
                "snapshot data is at {:?} but its metadata says {:?}",
                loaded.last_applied, meta.last_log_id
            )));
        }
        Ok(())
    }

    /// Replaces the whole state with the checkpoint `checkpoint` (a received snapshot, already
    /// in place as `snapshots/<dir_name>`); see [`replace_state`] for how a crash half-way is
    /// finished at the next start.
    pub(crate) fn install_blocking(&self, checkpoint: &DB, dir_name: &str) -> Result<()> {
        let mut inner = self.lock();
        replace_state(&self.storage, checkpoint, dir_name)?;
        *inner = load(self.storage.db())?;
        self.publish(&inner);
        Ok(())
    }

    /// A committed epoch's record; epoch 0 is the empty directory. `None` if not committed.
    pub fn epoch_record(&self, epoch: u64) -> Result<Option<pb::EpochRecord>> {
        if epoch == 0 {
            return Ok(Some(pb::EpochRecord::default()));
        }
        if self
            .storage
            .db()
            .get_cf(self.storage.cf(CF_SM_META), INSTALLING_KEY)
            .map_err(SequencerError::storage("read the state machine metadata"))?
            .is_some()
        {
            return Err(SequencerError::InstallingSnapshot);
        }
        read_epoch_record(&self.storage, epoch)
    }

    /// Reads one epoch's updates whole (the in-process coordinator, which needs them all): the
    /// pages of [`SmShared::start_batch_read`] concatenated. `None` for `epoch` means the open
    /// epoch.
    pub fn read_batch(&self, epoch: Option<u64>) -> Result<BatchRead> {
        let mut cursor = self.start_batch_read(epoch)?;
        let mut updates = Vec::new();
        while !cursor.done {
            updates.extend(self.read_batch_page(&mut cursor, BATCH_PAGE_BYTES, false)?);
        }
        Ok(BatchRead {
            epoch: cursor.epoch,
            as_of_index: cursor.as_of_index,
            sealed: cursor.sealed,
            updates,
        })
    }

    /// Starts a paged read of one epoch's updates (`None`: the open epoch): checks the epoch is
    /// readable and fixes `as_of_index`, the sealed flag and the update count under one RocksDB
    /// snapshot. Reads no values into memory.
    pub fn start_batch_read(&self, epoch: Option<u64>) -> Result<BatchCursor> {
        let db = self.storage.db();
        let snapshot = db.snapshot();
        let meta = self.readable_meta(&snapshot)?;
        let as_of_index = meta.last_applied.as_ref().map_or(0, |log_id| log_id.index);
        let epoch = epoch.unwrap_or(meta.open_epoch);
        check_batch_readable(&meta, epoch)?;
        let sealed = epoch < meta.open_epoch;
        let total = match meta.retained_batches.get(&epoch) {
            Some(count) if sealed => *count,
            _ => {
                let mut count = 0;
                let mut iterator = snapshot
                    .raw_iterator_cf_opt(self.storage.cf(CF_SM_UPDATES), epoch_bounds(epoch));
                iterator.seek(be64(epoch));
                while iterator.valid() {
                    count += 1;
                    iterator.next();
                }
                iterator
                    .status()
                    .map_err(SequencerError::storage("count a batch"))?;
                count
            }
        };
        Ok(BatchCursor {
            epoch,
            as_of_index,
            sealed,
            total,
            after: None,
            done: false,
        })
    }

    /// Reads the next page of a batch: updates in label order after the cursor's last label,
    /// about `max_bytes` of labels and values (at least one update, so one update larger than
    /// `max_bytes` makes a page of its own). Sets `cursor.done` after the last one. With
    /// `labels_only`, values are left empty (and not counted).
    ///
    /// A sealed epoch's batch never changes, so its pages are exactly the batch. The open
    /// epoch's may grow between pages (a later update of a label replaces its value): the pages
    /// hold every update applied at `as_of_index`, possibly already replaced by a later one, so
    /// replaying `WatchLog` from `as_of_index + 1` over them gives the same state. A batch
    /// released between pages is `BatchNotRetained`.
    pub fn read_batch_page(
        &self,
        cursor: &mut BatchCursor,
        max_bytes: usize,
        labels_only: bool,
    ) -> Result<Vec<pb::SequencedUpdate>> {
        let db = self.storage.db();
        let snapshot = db.snapshot();
        let meta = self.readable_meta(&snapshot)?;
        check_batch_readable(&meta, cursor.epoch)?;
        let mut iterator = snapshot
            .raw_iterator_cf_opt(self.storage.cf(CF_SM_UPDATES), epoch_bounds(cursor.epoch));
        match &cursor.after {
            Some(label) => {
                iterator.seek(update_key(cursor.epoch, label));
                if iterator.key() == Some(update_key(cursor.epoch, label).as_slice()) {
                    iterator.next();
                }
            }
            None => iterator.seek(be64(cursor.epoch)),
        }
        let mut updates = Vec::new();
        let mut bytes = 0;
        loop {
            let (Some(key), Some(value)) = (iterator.key(), iterator.value()) else {
                iterator
                    .status()
                    .map_err(SequencerError::storage("read a batch"))?;
                cursor.done = true;
                break;
            };
            let label = label_of_update_key(key)?;
            let stored_value = value.get(8..).unwrap_or_default();
            let size = label.len() + if labels_only { 0 } else { stored_value.len() } + 16;
            if !updates.is_empty() && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            updates.push(pb::SequencedUpdate {
                label: label.to_vec(),
                sequence: read_be64(value)?,
                value: if labels_only {
                    Vec::new()
                } else {
                    stored_value.to_vec()
                },
            });
            iterator.next();
        }
        if let Some(last) = updates.last() {
            cursor.after = Some(last.label.clone());
        }
        Ok(updates)
    }

    /// The state machine metadata as of `snapshot`; `Installing` while a snapshot install is
    /// half done (its data is then neither the old state nor the new one).
    fn readable_meta(
        &self,
        snapshot: &rocksdb::SnapshotWithThreadMode<'_, DB>,
    ) -> Result<rpb::MachineMeta> {
        let meta_cf = self.storage.cf(CF_SM_META);
        if snapshot
            .get_cf(meta_cf, INSTALLING_KEY)
            .map_err(SequencerError::storage("read the state machine metadata"))?
            .is_some()
        {
            return Err(SequencerError::InstallingSnapshot);
        }
        let meta_bytes = snapshot
            .get_cf(meta_cf, META_KEY)
            .map_err(SequencerError::storage("read the state machine metadata"))?;
        Ok(match meta_bytes {
            Some(bytes) => rpb::MachineMeta::decode(bytes.as_slice())
                .map_err(corrupt("state machine metadata"))?,
            None => rpb::MachineMeta {
                open_epoch: 1,
                next_sequence: 1,
                ..Default::default()
            },
        })
    }

    /// The first log position this node can stream events from: past the purged log, and past
    /// entries applied before a snapshot install (their results are not kept).
    pub fn first_event_index(&self) -> Result<u64> {
        let after_purge = log_store::last_purged_index(&self.storage)? + 1;
        let first_result = self
            .storage
            .db()
            .iterator_cf(self.storage.cf(CF_SM_RESULTS), IteratorMode::Start)
            .next()
            .transpose()
            .map_err(SequencerError::storage("read the first apply result"))?
            .map(|(key, _)| read_be64(&key))
            .transpose()?;
        let applied = self.view.borrow().last_applied_index;
        Ok(after_purge.max(first_result.unwrap_or(applied + 1)))
    }

    /// The events of applied entries with index in `[from, to]` (stops early at a gap, and
    /// after the entry that brings the log bytes read to `max_bytes`).
    /// `Err(LogPurged)` if `from` is below the first retained index.
    pub fn read_events(&self, from: u64, to: u64, max_bytes: usize) -> Result<Vec<pb::LogEvent>> {
        let first_retained = log_store::last_purged_index(&self.storage)? + 1;
        if from < first_retained {
            return Err(SequencerError::LogPurged {
                from_index: from,
                first_retained,
            });
        }
        let entries =
            log_store::read_entries_bounded(&self.storage, from, to.saturating_add(1), max_bytes)?;
        let mut events = Vec::with_capacity(entries.len());
        for (offset, entry) in entries.into_iter().enumerate() {
            let index = entry.log_id.index();
            if index != from + offset as u64 {
                break;
            }
            let Some(bytes) = self
                .storage
                .db()
                .get_cf(self.storage.cf(CF_SM_RESULTS), be64(index))
                .map_err(SequencerError::storage("read an apply result"))?
            else {
                // Purged concurrently, or applied before a snapshot install.
                if events.is_empty() {
                    return Err(SequencerError::LogPurged {
                        from_index: index,
                        first_retained: log_store::last_purged_index(&self.storage)? + 1,
                    });
                }
                break;
            };
            let result =
                pb::ApplyResult::decode(bytes.as_slice()).map_err(corrupt("apply result"))?;
            events.push(event_of(index, entry, result));
        }
        Ok(events)
    }
}

fn noop(kind: &str) -> pb::ApplyResult {
    pb::ApplyResult {
        kind: Some(pb::apply_result::Kind::Noop(pb::Noop { kind: kind.into() })),
    }
}

/// Joins a log entry with what applying it did.
fn event_of(index: u64, entry: crate::raft::types::Entry, result: pb::ApplyResult) -> pb::LogEvent {
    use pb::apply_result::Kind as R;
    use pb::log_event::Kind as E;
    let term = entry.log_id.committed_leader_id().term;
    let kind = match result.kind {
        Some(R::Appended(answer)) => {
            let updates = match (answer.duplicate, entry.payload) {
                (false, EntryPayload::Normal(command)) => match command.0.kind {
                    Some(pb::command::Kind::Append(append)) => append
                        .updates
                        .into_iter()
                        .zip(answer.first_sequence..)
                        .map(|(update, sequence)| pb::SequencedUpdate {
                            label: update.label,
                            value: update.value,
                            sequence,
                        })
                        .collect(),
                    _ => Vec::new(),
                },
                _ => Vec::new(),
            };
            E::Append(pb::AppendEvent {
                epoch: answer.epoch,
                updates,
                duplicate: answer.duplicate,
                sealed_before: answer.sealed_before,
            })
        }
        Some(R::Sealed(sealed)) => E::Seal(sealed),
        // A repeated commit of the same root changed nothing: tailers see one commit per epoch.
        Some(R::Committed(committed)) if committed.already_committed => E::Noop(pb::Noop {
            kind: "repeated commit".into(),
        }),
        Some(R::Committed(committed)) => E::Committed(committed.record.unwrap_or_default()),
        Some(R::Metadata(metadata)) => E::Metadata(metadata),
        Some(R::ShardMap(map)) => E::ShardMap(map),
        Some(R::Rejected(rejection)) => E::Rejected(rejection),
        Some(R::Noop(noop)) => E::Noop(noop),
        Some(R::Retention(history)) => E::Retention(history),
        Some(R::Restore(restore)) => E::Restore(restore),
        None => E::Noop(pb::Noop {
            kind: "unknown".into(),
        }),
    };
    pb::LogEvent {
        index,
        term,
        kind: Some(kind),
    }
}

/// The openraft state machine handle.
pub struct RocksStateMachine {
    shared: Arc<SmShared>,
}

impl RocksStateMachine {
    /// Wraps the shared state machine.
    pub fn new(shared: Arc<SmShared>) -> Self {
        Self { shared }
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| io::Error::other(format!("state machine task failed: {error}")))?
        .map_err(io::Error::from)
}

impl RaftStateMachine<TypeConfig> for RocksStateMachine {
    type SnapshotData = SnapshotHandle;
    type SnapshotBuilder = RocksSnapshotBuilder;

    async fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)> {
        Ok(self.shared.applied_state())
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> io::Result<()>
    where
        Strm: futures::Stream<Item = io::Result<EntryResponder<TypeConfig>>>
            + Unpin
            + openraft::OptionalSend,
    {
        let mut batch = Vec::new();
        let mut responders = Vec::new();
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            batch.push(entry);
            responders.push(responder);
        }
        if batch.is_empty() {
            return Ok(());
        }
        let shared = self.shared.clone();
        let results = blocking(move || shared.apply_blocking(batch)).await?;
        for (responder, result) in responders.into_iter().zip(results) {
            if let Some(responder) = responder {
                responder.send(result);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        RocksSnapshotBuilder::new(self.shared.clone())
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotHandle,
    ) -> io::Result<()> {
        let shared = self.shared.clone();
        let meta = meta.clone();
        blocking(move || snapshot::install(&shared, &meta, &snapshot)).await
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> io::Result<Option<openraft::alias::SnapshotOf<TypeConfig, SnapshotHandle>>> {
        let storage = self.shared.storage.clone();
        blocking(move || snapshot::current(&storage)).await
    }
}

/// The label of an `sm_updates` key (`be64(epoch) ‖ label`); a shorter key is corrupt data,
/// reported, never a panic.
fn label_of_update_key(key: &[u8]) -> Result<&[u8]> {
    key.get(8..)
        .ok_or_else(|| SequencerError::Corrupt("update key shorter than 8 bytes".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn updates_of(storage: &Storage) -> Vec<(Vec<u8>, Vec<u8>)> {
        storage
            .db()
            .iterator_cf(storage.cf(CF_SM_UPDATES), IteratorMode::Start)
            .map(|item| {
                let (key, value) = item.expect("read");
                (key.to_vec(), value.to_vec())
            })
            .collect()
    }

    #[test]
    fn an_install_interrupted_by_a_crash_is_finished_at_the_next_open() {
        let source_dir = tempfile::tempdir().expect("tempdir");
        let target_dir = tempfile::tempdir().expect("tempdir");
        let source = Storage::open(source_dir.path(), Some(1)).expect("open source");
        for i in 0..100u64 {
            let mut value = be64(i).to_vec();
            value.extend_from_slice(&[7; 1000]);
            source
                .db()
                .put_cf(source.cf(CF_SM_UPDATES), update_key(1, &be64(i)), value)
                .expect("put");
        }
        let expected = updates_of(&source);
        let built = snapshot::build(&SmShared::open(source.clone()).expect("open sm"))
            .expect("build a snapshot");
        let target = Storage::open(target_dir.path(), Some(2)).expect("open target");
        let name = "snap-00000000000000000000-crashed";
        let in_place = target.snapshot_dir().join(name);
        std::fs::create_dir_all(&in_place).expect("mkdir");
        for entry in std::fs::read_dir(&built.snapshot.dir).expect("list") {
            let entry = entry.expect("entry");
            std::fs::copy(entry.path(), in_place.join(entry.file_name())).expect("copy");
        }
        // The state a crash after the first write and part of the copy leaves: the marker, and
        // some of the live data not yet replaced.
        target
            .db()
            .put_cf(target.cf(CF_SM_UPDATES), update_key(1, b"stale"), be64(1))
            .expect("put");
        target
            .db()
            .put_cf(target.cf(CF_SM_META), INSTALLING_KEY, name.as_bytes())
            .expect("put");
        let readers_refused = SmShared {
            storage: target.clone(),
            inner: Mutex::new(SmInner {
                machine: Machine::default(),
                last_applied: None,
                last_membership: StoredMembership::default(),
                removed_node_ids: BTreeSet::new(),
            }),
            view: watch::channel(SmView::default()).0,
            snapshot_index: std::sync::atomic::AtomicU64::new(0),
        };
        assert!(matches!(
            readers_refused.start_batch_read(None),
            Err(SequencerError::InstallingSnapshot)
        ));

        let reopened = SmShared::open(target.clone()).expect("open finishes the install");
        assert_eq!(updates_of(&target), expected);
        assert!(
            target
                .db()
                .get_cf(target.cf(CF_SM_META), INSTALLING_KEY)
                .expect("read")
                .is_none()
        );
        let batch = reopened.read_batch(None).expect("readable again");
        assert_eq!(batch.updates.len(), 100);
    }
}
