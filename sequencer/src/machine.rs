//! The sequencer's replicated state machine, as a pure transition function.
//!
//! [`Machine::apply`] takes one committed command and returns what it did (an
//! [`pb::ApplyResult`]); its reads and writes go through [`MachineTx`], which the RocksDB layer
//! (`raft/state_machine.rs`) turns into one synced `WriteBatch` per apply call and which tests
//! implement in memory. Everything here is deterministic: the same commands in the same order give
//! the same results and state on every replica, so every rule that changes state reads only
//! replicated data (the cluster metadata), never a node's local configuration.
//!
//! Rules:
//!
//! * **Epochs.** Epoch 0 is the empty directory (committed implicitly). Appends go to the open
//!   epoch (starting at 1); `Seal(E)` closes the open epoch `E` if it has updates and opens `E+1`.
//!   An append whose new labels would push the open epoch past `max_epoch_updates` first seals it,
//!   so no epoch is ever larger than the limit, and a backlog becomes several bounded epochs.
//! * **Last writer wins** per label within the open epoch (also within one batch); every update
//!   still gets its own sequence number (gap-free, cluster-wide).
//! * **Idempotency.** A keyed append is remembered (key → original answer and payload hash); a
//!   repeat with the same payload returns the original answer marked `duplicate` and changes
//!   nothing; a repeat with another payload is refused (`ALREADY_EXISTS`), never answered with
//!   the first payload's result. A caller's key is remembered for at least
//!   `idempotency_retention_ms` after it was applied (by the `proposed_at_ms` stamps, kept in
//!   time spans of 1/64 of the retention); at most `max_idempotency_keys` at once, and while
//!   that many are younger than the retention a new keyed append is refused
//!   (`RESOURCE_EXHAUSTED`), so a key is never forgotten early. Keys a client library made up
//!   for its own retries (`retry_key`) are remembered for the last `idempotency_window` such
//!   appends.
//! * **One root per epoch.** `CommitEpoch(E)` is accepted only for the sealed epoch right after
//!   the last committed one; repeating the same root is OK; any other root for a committed epoch
//!   is refused with `ALREADY_EXISTS`.
//! * **Batch retention follows the replicas.** A committed epoch's sealed batch is kept while a
//!   shard server assigned to the map has not durably built it (the progress each commit
//!   carries), always for the last `retained_committed_batches` epochs, and never beyond the
//!   cluster's bounds: total bytes and age (measured against the commit's own timestamp, so every
//!   replica drops the same batches). A replica behind the oldest retained batch must bootstrap.
//! * **History retention** (`crate::history`, ADR 0003): `safe_epoch`, the oldest readable
//!   epoch, never decreases, never passes the latest committed epoch and never passes a live
//!   pin; pins expire against the proposer's clock carried in the command, so every replica
//!   decides alike.
//! * **Restore** (`ktd admin restore`, ADR 0003): a backup's committed epoch records are
//!   installed only into a cluster that never took an update, in order, each refused unless
//!   its partition roots stitch to its root; while the restore is active, appends and seals are
//!   refused (`UNAVAILABLE`), so the restored epochs are the only ones; finishing it needs every
//!   record up to the backup's epoch, and never lowers the safe epoch or the sequence number.
//!   Point in time: once every record is installed, archived epochs after the backup's are
//!   replayed one at a time (`ReplayEpoch`: the batch's updates with their sequence numbers into
//!   the open epoch, the last step seals it with the archived record); the coordinator computes
//!   each as any epoch, and its commit is refused (`DATA_LOSS`, recorded in the restore state,
//!   which then stops) unless root and partition roots equal the archived record's.
//! * **The batch archive holds batches.** A live history pin owned by `archive` (`ktd admin
//!   archive`) also keeps every sealed batch after its epoch, within the cluster's bounds on
//!   retained bytes and age, so an archiver that was away a while finds them.
//! * **One shard-map validation.** `SetShardMap` is checked with `ktd_core::ShardMap::new` (via
//!   `shard::replicated`): a map a shard or the coordinator would refuse is never replicated.

use std::collections::{BTreeMap, HashSet};

use ktd_proto::ktd::cluster::v1 as cluster_pb;
use ktd_proto::ktd::sequencer::v1 as pb;
use tonic::Code;

use crate::error::Result;

/// The owner of the history pins that also hold sealed batches (`ktd admin archive`).
pub const ARCHIVE_PIN_OWNER: &str = "archive";

/// Reads and writes of one apply batch (see the module docs).
pub trait MachineTx {
    /// The remembered answer of an idempotency key (including writes of this batch).
    fn idem_get(&self, key: &[u8]) -> Result<Option<pb::AppendResponse>>;
    /// Remembers `answer` for `key` under `ordinal`.
    fn idem_put(&mut self, key: &[u8], ordinal: u64, answer: &pb::AppendResponse);
    /// Forgets the key remembered under `ordinal`.
    fn idem_evict(&mut self, ordinal: u64) -> Result<()>;
    /// A committed epoch's record (including writes of this batch).
    fn epoch_get(&self, epoch: u64) -> Result<Option<pb::EpochRecord>>;
    /// Stores a committed epoch's record.
    fn epoch_put(&mut self, record: &pb::EpochRecord);
    /// Stores (or replaces) `label`'s update in `epoch`.
    fn update_put(&mut self, epoch: u64, label: &[u8], sequence: u64, value: &[u8]);
    /// Drops every update of `epoch`.
    fn updates_drop(&mut self, epoch: u64);
}

/// The replicated epoch state (persisted in `MachineMeta`).
#[derive(Clone, Debug, PartialEq)]
pub struct EpochState {
    /// The epoch new appends go to.
    pub open_epoch: u64,
    /// Sequence number of the next update.
    pub next_sequence: u64,
    /// The latest committed epoch (0 = only the empty directory).
    pub last_committed_epoch: u64,
    /// Ordinal of the next remembered idempotency key.
    pub idem_next_ordinal: u64,
    /// Ordinal of the oldest remembered idempotency key.
    pub idem_oldest_ordinal: u64,
    /// Cluster metadata, once `InitCluster` has been applied.
    pub metadata: Option<pb::ClusterMetadata>,
    /// The shard map (version 0 = never set).
    pub shard_map: cluster_pb::ShardMap,
    /// Epochs whose batch is retained → number of updates in it.
    pub retained_batches: BTreeMap<u64, u64>,
    /// Sealed, uncommitted epochs → when they were sealed (ms since the Unix epoch).
    pub sealed_at_ms: BTreeMap<u64, u64>,
    /// Retained epochs → bytes appended to them (labels + values; replaced values included).
    pub retained_batch_bytes: BTreeMap<u64, u64>,
    /// Retained epochs → when they were sealed (ms since the Unix epoch).
    pub retained_sealed_at_ms: BTreeMap<u64, u64>,
    /// Shard server → the durable epoch the coordinator last reported for it.
    pub replica_progress: BTreeMap<String, u64>,
    /// Bytes appended to the open epoch so far.
    pub open_epoch_bytes: u64,
    /// Ordinal of the next remembered caller key.
    pub kept_next_ordinal: u64,
    /// Ordinal of the oldest remembered caller key.
    pub kept_oldest_ordinal: u64,
    /// First ordinal of each time span of caller keys → the span's start (ms).
    pub kept_marks: BTreeMap<u64, u64>,
    /// The history retention record (window, pins, safe epoch).
    pub history: ktd_core::retention::Retention,
    /// A restore from a backup in progress, or the last one (`None`: never restored).
    pub restore: Option<pb::RestoreState>,
}

impl Default for EpochState {
    fn default() -> Self {
        Self {
            open_epoch: 1,
            next_sequence: 1,
            last_committed_epoch: 0,
            idem_next_ordinal: 0,
            idem_oldest_ordinal: 0,
            metadata: None,
            shard_map: cluster_pb::ShardMap::default(),
            retained_batches: BTreeMap::new(),
            sealed_at_ms: BTreeMap::new(),
            retained_batch_bytes: BTreeMap::new(),
            retained_sealed_at_ms: BTreeMap::new(),
            replica_progress: BTreeMap::new(),
            open_epoch_bytes: 0,
            kept_next_ordinal: 0,
            kept_oldest_ordinal: 0,
            kept_marks: BTreeMap::new(),
            history: ktd_core::retention::Retention::default(),
            restore: None,
        }
    }
}

impl EpochState {
    /// Sealed epochs waiting for their commit.
    pub fn uncommitted_epochs(&self) -> u64 {
        self.last_sealed_epoch()
            .saturating_sub(self.last_committed_epoch)
    }

    /// The latest sealed epoch (0 if none).
    pub fn last_sealed_epoch(&self) -> u64 {
        self.open_epoch - 1
    }

    /// The restore in progress (`None`: none is).
    pub fn active_restore(&self) -> Option<&pb::RestoreState> {
        self.restore.as_ref().filter(|restore| restore.active)
    }

    /// The oldest committed epoch whose sealed batch is still retained (`None`: none is).
    pub fn oldest_retained_committed(&self) -> Option<u64> {
        self.retained_batches
            .keys()
            .copied()
            .find(|epoch| *epoch <= self.last_committed_epoch)
    }

    /// Bytes of every retained batch.
    pub fn retained_bytes(&self) -> u64 {
        self.retained_batch_bytes.values().sum()
    }

    /// The lowest durable epoch of the shard servers assigned in the map, and who holds it
    /// (`None` without a map). A server never reported counts as epoch 0.
    pub fn oldest_pin(&self) -> Option<(String, u64)> {
        assigned_servers(&self.shard_map)
            .into_iter()
            .map(|server| {
                let epoch = self.replica_progress.get(&server).copied().unwrap_or(0);
                (server, epoch)
            })
            .min_by_key(|(_, epoch)| *epoch)
    }
}

impl EpochState {
    /// The batch-retention summary `ClusterStatus` and the metrics report.
    pub fn retention(&self) -> pb::BatchRetention {
        let oldest = self.retained_batches.keys().next().copied();
        let (oldest_pin_server, oldest_pin_epoch) = self.oldest_pin().unwrap_or_default();
        let (max_bytes, max_age_ms) = self.retention_bounds();
        pb::BatchRetention {
            batches: self.retained_batches.len() as u64,
            bytes: self.retained_bytes(),
            max_bytes,
            oldest_epoch: self.oldest_retained_committed().unwrap_or(0),
            oldest_sealed_at_ms: oldest
                .and_then(|epoch| self.retained_sealed_at_ms.get(&epoch).copied())
                .unwrap_or(0),
            max_age_ms,
            oldest_pin_epoch,
            oldest_pin_server,
            pins: assigned_servers(&self.shard_map)
                .into_iter()
                .map(|server| cluster_pb::ServerProgress {
                    built_epoch: self.replica_progress.get(&server).copied().unwrap_or(0),
                    server,
                })
                .collect(),
        }
    }

    /// `(max bytes, max age in ms)` of retained batches: the cluster's settings, or the defaults.
    pub fn retention_bounds(&self) -> (u64, u64) {
        let metadata = self.metadata.clone().unwrap_or_default();
        (
            match metadata.batch_retention_max_bytes {
                0 => DEFAULT_RETENTION_MAX_BYTES,
                bytes => bytes,
            },
            match metadata.batch_retention_max_age_ms {
                0 => DEFAULT_RETENTION_MAX_AGE_MS,
                age => age,
            },
        )
    }
}

/// Default bound on the bytes of retained batches when the metadata sets none.
pub const DEFAULT_RETENTION_MAX_BYTES: u64 = 2 << 30;
/// Default bound on the age of retained batches (ms) when the metadata sets none.
pub const DEFAULT_RETENTION_MAX_AGE_MS: u64 = 3_600_000;

/// The servers that hold or build a copy of some partition in `map`.
fn assigned_servers(map: &cluster_pb::ShardMap) -> Vec<String> {
    let mut servers: Vec<String> = map
        .partitions
        .iter()
        .flat_map(|partition| {
            partition.voters.iter().cloned().chain(
                partition
                    .learners
                    .iter()
                    .map(|learner| learner.server.clone()),
            )
        })
        .chain(map.shards.iter().map(|shard| shard.shard_id.clone()))
        .collect();
    servers.sort_unstable();
    servers.dedup();
    servers
}

/// The state machine: replicated state plus the open epoch's label set (rebuilt on open).
#[derive(Clone, Debug, Default)]
pub struct Machine {
    state: EpochState,
    open_labels: HashSet<Vec<u8>>,
}

fn rejected(code: Code, message: impl Into<String>) -> pb::ApplyResult {
    pb::ApplyResult {
        kind: Some(pb::apply_result::Kind::Rejected(pb::Rejection {
            code: code as i32,
            message: message.into(),
        })),
    }
}

/// The refusal of appends and seals while a backup is being restored.
fn restoring(restore: &pb::RestoreState) -> pb::ApplyResult {
    rejected(
        Code::Unavailable,
        format!(
            "a backup (epoch {}) is being restored into this cluster; updates are taken once \
             `ktd admin restore` has finished",
            restore.epoch
        ),
    )
}

fn result(kind: pb::apply_result::Kind) -> pb::ApplyResult {
    pb::ApplyResult { kind: Some(kind) }
}

impl Machine {
    /// A machine with `state` whose open epoch holds `open_labels`.
    pub fn new(state: EpochState, open_labels: HashSet<Vec<u8>>) -> Self {
        Self { state, open_labels }
    }

    /// The replicated state.
    pub fn state(&self) -> &EpochState {
        &self.state
    }

    /// Distinct labels in the open epoch.
    pub fn open_epoch_updates(&self) -> u64 {
        self.open_labels.len() as u64
    }

    /// Applies the command of log entry `index`.
    pub fn apply(
        &mut self,
        tx: &mut dyn MachineTx,
        index: u64,
        command: &pb::Command,
    ) -> Result<pb::ApplyResult> {
        use pb::command::Kind;
        match &command.kind {
            Some(Kind::Append(append)) => self.append(tx, append),
            Some(Kind::Seal(seal)) => Ok(self.seal(seal)),
            Some(Kind::CommitEpoch(commit)) => self.commit_epoch(tx, index, commit),
            Some(Kind::InitCluster(metadata)) => Ok(self.init_cluster(metadata)),
            Some(Kind::SetShardMap(request)) => Ok(self.set_shard_map(request)),
            Some(Kind::Retention(command)) => Ok(self.retention(command)),
            Some(Kind::Restore(command)) => self.restore(tx, index, command),
            None => Ok(rejected(Code::InvalidArgument, "empty command")),
        }
    }

    fn seal_open(&mut self, sealed_at_ms: u64) -> pb::SealResponse {
        let epoch = self.state.open_epoch;
        let updates = self.open_labels.len() as u64;
        self.state.retained_batches.insert(epoch, updates);
        self.state.sealed_at_ms.insert(epoch, sealed_at_ms);
        self.state
            .retained_batch_bytes
            .insert(epoch, std::mem::take(&mut self.state.open_epoch_bytes));
        self.state.retained_sealed_at_ms.insert(epoch, sealed_at_ms);
        self.state.open_epoch += 1;
        self.open_labels.clear();
        pb::SealResponse {
            epoch,
            updates,
            already_sealed: false,
        }
    }

    fn append(
        &mut self,
        tx: &mut dyn MachineTx,
        append: &pb::AppendRequest,
    ) -> Result<pb::ApplyResult> {
        let Some(metadata) = &self.state.metadata else {
            return Ok(rejected(
                Code::FailedPrecondition,
                "the cluster is not initialised",
            ));
        };
        if let Some(restore) = self.state.active_restore() {
            return Ok(restoring(restore));
        }
        let max_epoch_updates = metadata.max_epoch_updates;
        let window = metadata.idempotency_window;
        let limits = InputLimits::of(metadata);
        let retention = KeyRetention::of(metadata);
        let keep = !append.idempotency_key.is_empty() && !append.retry_key;
        let now = append.proposed_at_ms;
        if !append.idempotency_key.is_empty()
            && let Some(mut answer) = tx.idem_get(&append.idempotency_key)?
        {
            if !answer.payload_hash.is_empty()
                && !append.payload_hash.is_empty()
                && answer.payload_hash != append.payload_hash
            {
                return Ok(rejected(
                    Code::AlreadyExists,
                    "this idempotency key was already used for other updates; use a new key for \
                     new updates",
                ));
            }
            answer.duplicate = true;
            return Ok(result(pb::apply_result::Kind::Appended(answer)));
        }
        if append.updates.is_empty() {
            return Ok(rejected(
                Code::InvalidArgument,
                "an append must contain at least one update",
            ));
        }
        if let Err(message) = limits.check(&append.updates) {
            return Ok(rejected(Code::InvalidArgument, message));
        }
        let backlog = self.state.uncommitted_epochs();
        if backlog >= limits.max_uncommitted_epochs {
            return Ok(rejected(
                Code::ResourceExhausted,
                format!(
                    "{backlog} sealed epochs are waiting to be committed (limit \
                     max_uncommitted_epochs = {}): the directory is not committing; retry later",
                    limits.max_uncommitted_epochs
                ),
            ));
        }
        if keep {
            let remembered = self.state.kept_next_ordinal - self.state.kept_oldest_ordinal;
            let expiring = self.kept_expiry_end(now, &retention) - self.state.kept_oldest_ordinal;
            if remembered - expiring >= retention.max_keys {
                return Ok(rejected(
                    Code::ResourceExhausted,
                    format!(
                        "{remembered} idempotency keys younger than their retention ({} s) are \
                         remembered, the most this cluster keeps (max_idempotency_keys = {}): \
                         retry later",
                        retention.retention_ms / 1000,
                        retention.max_keys
                    ),
                ));
            }
        }
        let batch_labels: HashSet<&[u8]> = append
            .updates
            .iter()
            .map(|update| update.label.as_slice())
            .collect();
        if batch_labels.len() as u64 > max_epoch_updates {
            return Ok(rejected(
                Code::InvalidArgument,
                format!(
                    "the batch has {} distinct labels, more than max_epoch_updates ({max_epoch_updates})",
                    batch_labels.len()
                ),
            ));
        }
        let new_labels = batch_labels
            .iter()
            .filter(|label| !self.open_labels.contains(**label))
            .count() as u64;
        let too_many = self.open_labels.len() as u64 + new_labels > max_epoch_updates;
        let too_big = !self.open_labels.is_empty()
            && self.state.open_epoch_bytes + append_bytes(&append.updates) > limits.max_epoch_bytes;
        let sealed_before = (too_many || too_big).then(|| self.seal_open(append.proposed_at_ms));

        let epoch = self.state.open_epoch;
        let first_sequence = self.state.next_sequence;
        for update in &append.updates {
            tx.update_put(
                epoch,
                &update.label,
                self.state.next_sequence,
                &update.value,
            );
            self.state.open_epoch_bytes += (update.label.len() + update.value.len()) as u64;
            self.state.next_sequence += 1;
            if !self.open_labels.contains(update.label.as_slice()) {
                self.open_labels.insert(update.label.clone());
            }
        }
        let answer = pb::AppendResponse {
            epoch,
            first_sequence,
            count: append.updates.len() as u32,
            duplicate: false,
            sealed_before,
            payload_hash: if append.idempotency_key.is_empty() {
                Vec::new()
            } else {
                append.payload_hash.clone()
            },
        };
        if keep {
            self.expire_kept(tx, now, &retention)?;
            let ordinal = self.state.kept_next_ordinal;
            tx.idem_put(
                &append.idempotency_key,
                KEPT_ORDINAL_BASE | ordinal,
                &answer,
            );
            let span = (retention.retention_ms / 64).max(1000);
            match self.state.kept_marks.last_key_value() {
                Some((_, start)) if now < start.saturating_add(span) => {}
                last => {
                    let start = last.map_or(now, |(_, start)| now.max(*start));
                    self.state.kept_marks.insert(ordinal, start);
                }
            }
            self.state.kept_next_ordinal += 1;
        } else if !append.idempotency_key.is_empty() {
            tx.idem_put(
                &append.idempotency_key,
                self.state.idem_next_ordinal,
                &answer,
            );
            self.state.idem_next_ordinal += 1;
            while self.state.idem_next_ordinal - self.state.idem_oldest_ordinal > window {
                tx.idem_evict(self.state.idem_oldest_ordinal)?;
                self.state.idem_oldest_ordinal += 1;
            }
        }
        Ok(result(pb::apply_result::Kind::Appended(answer)))
    }

    /// The end of the caller keys that have outlived their retention at `now` (at most
    /// [`EXPIRE_PER_APPEND`] past the oldest): every key of a time span whose *next* span
    /// started at least the retention before `now`.
    fn kept_expiry_end(&self, now: u64, retention: &KeyRetention) -> u64 {
        let oldest = self.state.kept_oldest_ordinal;
        let mut end = oldest;
        let marks = &self.state.kept_marks;
        for (_, (next_first, next_start)) in marks.iter().zip(marks.iter().skip(1)) {
            if next_start.saturating_add(retention.retention_ms) <= now {
                end = *next_first;
            } else {
                break;
            }
        }
        end.clamp(oldest, oldest + EXPIRE_PER_APPEND)
    }

    /// Forgets the caller keys that have outlived their retention at `now` (a bounded number
    /// per append), and the time spans they leave empty.
    fn expire_kept(
        &mut self,
        tx: &mut dyn MachineTx,
        now: u64,
        retention: &KeyRetention,
    ) -> Result<()> {
        let end = self.kept_expiry_end(now, retention);
        while self.state.kept_oldest_ordinal < end {
            tx.idem_evict(KEPT_ORDINAL_BASE | self.state.kept_oldest_ordinal)?;
            self.state.kept_oldest_ordinal += 1;
        }
        // A span is dropped once the next one starts at or below the oldest kept ordinal.
        let oldest = self.state.kept_oldest_ordinal;
        let covering = self
            .state
            .kept_marks
            .range(..=oldest)
            .next_back()
            .map(|(first, _)| *first);
        if let Some(covering) = covering {
            self.state.kept_marks = self.state.kept_marks.split_off(&covering);
        }
        Ok(())
    }

    fn seal(&mut self, seal: &pb::SealRequest) -> pb::ApplyResult {
        let (epoch, heartbeat) = (seal.epoch, seal.heartbeat);
        if let Some(restore) = self.state.active_restore() {
            return restoring(restore);
        }
        let open = self.state.open_epoch;
        if epoch == 0 {
            return rejected(Code::InvalidArgument, "epoch 0 is the empty directory");
        }
        if epoch < open {
            let updates = self
                .state
                .retained_batches
                .get(&epoch)
                .copied()
                .unwrap_or(0);
            return result(pb::apply_result::Kind::Sealed(pb::SealResponse {
                epoch,
                updates,
                already_sealed: true,
            }));
        }
        if epoch > open {
            return rejected(
                Code::FailedPrecondition,
                format!("epoch {epoch} is not open yet; the open epoch is {open}"),
            );
        }
        if self.open_labels.is_empty() && heartbeat && self.state.uncommitted_epochs() > 0 {
            return rejected(
                Code::FailedPrecondition,
                format!(
                    "no heartbeat epoch while {} sealed epochs wait for their commit",
                    self.state.uncommitted_epochs()
                ),
            );
        }
        if self.open_labels.is_empty() && heartbeat && epoch > 1 {
            return result(pb::apply_result::Kind::Sealed(
                self.seal_open(seal.sealed_at_ms),
            ));
        }
        if self.open_labels.is_empty() {
            return rejected(
                Code::FailedPrecondition,
                format!("epoch {epoch} has no updates; an empty epoch is never sealed"),
            );
        }
        result(pb::apply_result::Kind::Sealed(
            self.seal_open(seal.sealed_at_ms),
        ))
    }

    fn commit_epoch(
        &mut self,
        tx: &mut dyn MachineTx,
        index: u64,
        commit: &pb::CommitEpochRequest,
    ) -> Result<pb::ApplyResult> {
        let epoch = commit.epoch;
        let last = self.state.last_committed_epoch;
        if epoch == 0 {
            return Ok(rejected(
                Code::AlreadyExists,
                "epoch 0 is the empty directory and is always committed",
            ));
        }
        if commit.root_hash.len() != 32 {
            return Ok(rejected(
                Code::InvalidArgument,
                format!("root hash must be 32 bytes, got {}", commit.root_hash.len()),
            ));
        }
        let Some(metadata) = &self.state.metadata else {
            return Ok(rejected(
                Code::FailedPrecondition,
                "the cluster is not initialised",
            ));
        };
        if let Err(message) = check_commit(metadata, commit) {
            return Ok(rejected(Code::InvalidArgument, message));
        }
        let partitions = 1usize << metadata.partition_bits;
        if !commit.leaf_digests.is_empty() && commit.leaf_digests.len() != 32 * partitions {
            return Ok(rejected(
                Code::InvalidArgument,
                format!(
                    "leaf digests must be 32 bytes per user partition ({} bytes for {partitions} \
                     partitions), got {}",
                    32 * partitions,
                    commit.leaf_digests.len()
                ),
            ));
        }
        if epoch <= last {
            let existing = tx.epoch_get(epoch)?;
            return Ok(match existing {
                Some(record)
                    if record.root_hash == commit.root_hash
                        && record.partition_roots == commit.partition_roots =>
                {
                    result(pb::apply_result::Kind::Committed(pb::CommitEpochResponse {
                        record: Some(record),
                        already_committed: true,
                    }))
                }
                _ => rejected(
                    Code::AlreadyExists,
                    format!(
                        "epoch {epoch} is already committed with a different root; an epoch never \
                         has two roots"
                    ),
                ),
            });
        }
        if epoch >= self.state.open_epoch {
            return Ok(rejected(
                Code::FailedPrecondition,
                format!(
                    "epoch {epoch} is not sealed; the open epoch is {}",
                    self.state.open_epoch
                ),
            ));
        }
        if epoch != last + 1 {
            return Ok(rejected(
                Code::FailedPrecondition,
                format!(
                    "epoch {epoch} cannot be committed before epoch {}; the latest committed \
                     epoch is {last}",
                    epoch - 1
                ),
            ));
        }
        if let Some(restore) = self.state.active_restore()
            && restore.replay_epoch == epoch
            && (restore.replay_root != commit.root_hash
                || restore.replay_partition_roots != commit.partition_roots)
        {
            let message = format!(
                "replayed epoch {epoch} computed root {} but the archive recorded {}: the archive \
                 does not continue the backup it is replayed onto",
                hex::encode(&commit.root_hash),
                hex::encode(&restore.replay_root)
            );
            let mut restore = restore.clone();
            restore.replay_failure = message.clone();
            self.state.restore = Some(restore);
            return Ok(rejected(Code::DataLoss, message));
        }
        let record = pb::EpochRecord {
            epoch,
            root_hash: commit.root_hash.clone(),
            partition_roots: commit.partition_roots.clone(),
            commit_index: index,
            updates: self
                .state
                .retained_batches
                .get(&epoch)
                .copied()
                .unwrap_or(0),
            sealed_at_ms: self.state.sealed_at_ms.remove(&epoch).unwrap_or(0),
            committed_at_ms: commit.committed_at_ms,
            leaf_digests: commit.leaf_digests.clone(),
            shard_map_version: self.state.shard_map.version,
        };
        tx.epoch_put(&record);
        self.state.last_committed_epoch = epoch;
        let assigned = assigned_servers(&self.state.shard_map);
        for progress in &commit.progress {
            if assigned.contains(&progress.server) {
                let known = self
                    .state
                    .replica_progress
                    .entry(progress.server.clone())
                    .or_default();
                *known = (*known).max(progress.built_epoch.min(epoch));
            }
        }
        self.state
            .replica_progress
            .retain(|server, _| assigned.contains(server));
        self.drop_released_batches(tx, epoch, commit.committed_at_ms);
        Ok(result(pb::apply_result::Kind::Committed(
            pb::CommitEpochResponse {
                record: Some(record),
                already_committed: false,
            },
        )))
    }

    /// Drops committed batches that no assigned replica needs any more, or that are past the
    /// cluster's retention bounds, oldest first; never the last `retained_committed_batches`.
    fn drop_released_batches(&mut self, tx: &mut dyn MachineTx, committed: u64, now_ms: u64) {
        let Some(metadata) = &self.state.metadata else {
            return;
        };
        let retain = metadata.retained_committed_batches;
        let (max_bytes, max_age) = self.state.retention_bounds();
        let replicas = self
            .state
            .oldest_pin()
            .map_or(committed, |(_, epoch)| epoch);
        let archive = self
            .state
            .history
            .live_pins(now_ms)
            .filter(|(_, pin)| pin.owner == ARCHIVE_PIN_OWNER)
            .map(|(_, pin)| pin.epoch)
            .min()
            .unwrap_or(committed);
        let pin = replicas.min(archive);
        let mut retained_bytes = self.state.retained_bytes();
        while let Some((&oldest, _)) = self.state.retained_batches.first_key_value() {
            if oldest > committed || oldest + retain > committed {
                break;
            }
            let sealed_at = self
                .state
                .retained_sealed_at_ms
                .get(&oldest)
                .copied()
                .unwrap_or(0);
            let released = oldest <= pin
                || retained_bytes > max_bytes
                || now_ms.saturating_sub(sealed_at) > max_age;
            if !released {
                break;
            }
            tx.updates_drop(oldest);
            self.state.retained_batches.remove(&oldest);
            self.state.retained_sealed_at_ms.remove(&oldest);
            let bytes = self.state.retained_batch_bytes.remove(&oldest).unwrap_or(0);
            retained_bytes = retained_bytes.saturating_sub(bytes);
        }
    }

    fn init_cluster(&mut self, metadata: &pb::ClusterMetadata) -> pb::ApplyResult {
        if let Err(message) = validate_metadata(metadata) {
            return rejected(Code::InvalidArgument, message);
        }
        if let Some(existing) = &self.state.metadata {
            // Set once: the identity and the limits every replica enforces never change under
            // a running cluster (a repeat of the same metadata is an idempotent retry).
            if existing != metadata {
                return rejected(
                    Code::AlreadyExists,
                    "the cluster is already initialised with other metadata; InitCluster cannot \
                     change an initialised cluster",
                );
            }
            return result(pb::apply_result::Kind::Metadata(existing.clone()));
        }
        self.state.metadata = Some(metadata.clone());
        result(pb::apply_result::Kind::Metadata(metadata.clone()))
    }

    fn retention(&mut self, command: &pb::RetentionCommand) -> pb::ApplyResult {
        if self.state.metadata.is_none() {
            return rejected(Code::FailedPrecondition, "the cluster is not initialised");
        }
        let head = self.state.last_committed_epoch;
        let mut history = self.state.history.clone();
        match crate::history::apply(&mut history, head, command) {
            Ok(()) => {
                self.state.history = history;
                result(pb::apply_result::Kind::Retention(crate::history::to_pb(
                    &self.state.history,
                )))
            }
            Err(message) => rejected(Code::FailedPrecondition, message),
        }
    }

    fn restore(
        &mut self,
        tx: &mut dyn MachineTx,
        index: u64,
        command: &pb::RestoreCommand,
    ) -> Result<pb::ApplyResult> {
        let Some(metadata) = self.state.metadata.clone() else {
            return Ok(rejected(
                Code::FailedPrecondition,
                "the cluster is not initialised",
            ));
        };
        let mut restore = match self.state.active_restore() {
            Some(active) if active.epoch != command.epoch => {
                return Ok(rejected(
                    Code::FailedPrecondition,
                    format!(
                        "a restore of epoch {} is in progress; finish it before another",
                        active.epoch
                    ),
                ));
            }
            Some(active) => active.clone(),
            None => {
                let written = self.state.next_sequence != 1
                    || self.state.last_committed_epoch != 0
                    || self.state.open_epoch != 1
                    || !self.open_labels.is_empty();
                if written {
                    return Ok(rejected(
                        Code::FailedPrecondition,
                        format!(
                            "a backup is restored only into a new cluster that never took an \
                             update; this one has committed epoch {} and assigned {} sequence \
                             numbers",
                            self.state.last_committed_epoch,
                            self.state.next_sequence - 1
                        ),
                    ));
                }
                if command.epoch == 0 || command.finish {
                    return Ok(rejected(
                        Code::InvalidArgument,
                        "a restore starts with the backup's epoch (at least 1) and its records",
                    ));
                }
                pb::RestoreState {
                    active: true,
                    epoch: command.epoch,
                    backup_cluster_id: command.backup_cluster_id.clone(),
                    ..pb::RestoreState::default()
                }
            }
        };
        if !command.source_address.is_empty() {
            restore.source_address = command.source_address.clone();
        }
        if let Some(replay) = &command.replay {
            if !restore.active || self.state.active_restore().is_none() {
                return Ok(rejected(
                    Code::FailedPrecondition,
                    "archived epochs are replayed only into a restore in progress",
                ));
            }
            return Ok(self.replay(tx, restore, replay, &metadata));
        }
        let mut last = self.state.last_committed_epoch;
        let mut installed = Vec::new();
        for record in &command.records {
            if record.epoch <= last {
                let same = tx.epoch_get(record.epoch)?.is_some_and(|existing| {
                    existing.root_hash == record.root_hash
                        && existing.partition_roots == record.partition_roots
                });
                if !same {
                    return Ok(rejected(
                        Code::AlreadyExists,
                        format!(
                            "epoch {} is already installed with a different root",
                            record.epoch
                        ),
                    ));
                }
                continue;
            }
            if record.epoch != last + 1 || record.epoch > restore.epoch {
                return Ok(rejected(
                    Code::FailedPrecondition,
                    format!(
                        "restored epoch records go in order up to epoch {}: the next one is {}, \
                         not {}",
                        restore.epoch,
                        last + 1,
                        record.epoch
                    ),
                ));
            }
            let check = pb::CommitEpochRequest {
                epoch: record.epoch,
                root_hash: record.root_hash.clone(),
                partition_roots: record.partition_roots.clone(),
                ..pb::CommitEpochRequest::default()
            };
            if record.root_hash.len() != 32 {
                return Ok(rejected(
                    Code::InvalidArgument,
                    format!(
                        "epoch {}: root hash must be 32 bytes, got {}",
                        record.epoch,
                        record.root_hash.len()
                    ),
                ));
            }
            if let Err(message) = check_commit(&metadata, &check) {
                return Ok(rejected(Code::InvalidArgument, message));
            }
            installed.push(pb::EpochRecord {
                commit_index: index,
                // Gateways read an epoch with a map at least this new: this cluster's map.
                shard_map_version: self.state.shard_map.version,
                ..record.clone()
            });
            last = record.epoch;
        }
        if command.finish && last < restore.epoch {
            return Ok(rejected(
                Code::FailedPrecondition,
                format!(
                    "the restore of epoch {} cannot finish: epochs up to {last} are installed",
                    restore.epoch
                ),
            ));
        }
        if command.finish
            && (self.state.open_epoch != self.state.last_committed_epoch + 1
                || !self.open_labels.is_empty())
        {
            return Ok(rejected(
                Code::FailedPrecondition,
                format!(
                    "the restore cannot finish while a replayed epoch is not committed (committed \
                     {last}, open {})",
                    self.state.open_epoch
                ),
            ));
        }
        for record in &installed {
            tx.epoch_put(record);
        }
        self.state.last_committed_epoch = last;
        self.state.open_epoch = last + 1;
        self.state.next_sequence = self.state.next_sequence.max(command.next_sequence);
        restore.installed_epoch = last;
        if command.finish {
            if let Some(history) = &command.history {
                let backup = crate::history::from_pb(Some(history));
                self.state.history.window = backup.window;
                self.state.history.safe_epoch = self
                    .state
                    .history
                    .safe_epoch
                    .max(backup.safe_epoch)
                    .min(last);
            }
            restore.active = false;
        }
        self.state.restore = Some(restore.clone());
        Ok(result(pb::apply_result::Kind::Restore(restore)))
    }

    /// One step of replaying an archived epoch into a restore in progress (see the module docs).
    fn replay(
        &mut self,
        tx: &mut dyn MachineTx,
        mut restore: pb::RestoreState,
        replay: &pb::ReplayEpoch,
        metadata: &pb::ClusterMetadata,
    ) -> pb::ApplyResult {
        let refused = |message: String| rejected(Code::FailedPrecondition, message);
        if restore.installed_epoch != restore.epoch {
            return refused(format!(
                "archived epochs are replayed once every record up to the backup's epoch {} is \
                 installed; up to {} are",
                restore.epoch, restore.installed_epoch
            ));
        }
        if !restore.replay_failure.is_empty() {
            return refused(format!(
                "the replay stopped: {}; restore again into a new cluster",
                restore.replay_failure
            ));
        }
        let (open, committed) = (self.state.open_epoch, self.state.last_committed_epoch);
        if replay.epoch < open
            && replay.epoch > restore.epoch
            && replay.epoch <= restore.replay_epoch
        {
            // A retried step of an epoch already sealed: nothing to do.
            return result(pb::apply_result::Kind::Restore(restore));
        }
        if replay.epoch != open || committed + 1 != open {
            return refused(format!(
                "archived epoch {} cannot be replayed now: epochs go one at a time after the \
                 backup's, each once the previous one is committed (committed {committed}, open \
                 {open})",
                replay.epoch
            ));
        }
        let limits = InputLimits::of(metadata);
        let mut labels = self.open_labels.clone();
        for update in &replay.updates {
            if update.label.is_empty()
                || update.label.len() as u64 > limits.max_label_bytes
                || update.value.len() as u64 > limits.max_value_bytes
            {
                return rejected(
                    Code::InvalidArgument,
                    format!(
                        "archived epoch {}: an update's label ({} bytes) or value ({} bytes) is \
                         outside this cluster's limits",
                        replay.epoch,
                        update.label.len(),
                        update.value.len()
                    ),
                );
            }
            labels.insert(update.label.clone());
        }
        if labels.len() as u64 > metadata.max_epoch_updates {
            return rejected(
                Code::InvalidArgument,
                format!(
                    "archived epoch {} has more than this cluster's {} updates per epoch",
                    replay.epoch, metadata.max_epoch_updates
                ),
            );
        }
        let record = if replay.last {
            let Some(record) = &replay.record else {
                return rejected(
                    Code::InvalidArgument,
                    "the last replay step carries the archived epoch record",
                );
            };
            let check = pb::CommitEpochRequest {
                epoch: record.epoch,
                root_hash: record.root_hash.clone(),
                partition_roots: record.partition_roots.clone(),
                ..pb::CommitEpochRequest::default()
            };
            if record.epoch != replay.epoch || record.root_hash.len() != 32 {
                return rejected(
                    Code::InvalidArgument,
                    format!(
                        "the archived record of epoch {} is of epoch {} with a {}-byte root",
                        replay.epoch,
                        record.epoch,
                        record.root_hash.len()
                    ),
                );
            }
            if let Err(message) = check_commit(metadata, &check) {
                return rejected(Code::InvalidArgument, message);
            }
            if labels.is_empty() || (record.updates != 0 && record.updates != labels.len() as u64) {
                return rejected(
                    Code::InvalidArgument,
                    format!(
                        "archived epoch {} records {} updates; the replay sent {}",
                        replay.epoch,
                        record.updates,
                        labels.len()
                    ),
                );
            }
            Some(record)
        } else {
            None
        };
        for update in &replay.updates {
            tx.update_put(open, &update.label, update.sequence, &update.value);
            self.state.open_epoch_bytes += (update.label.len() + update.value.len()) as u64;
            self.state.next_sequence = self.state.next_sequence.max(update.sequence + 1);
        }
        self.open_labels = labels;
        if let Some(record) = record {
            self.seal_open(record.sealed_at_ms);
            restore.replay_epoch = replay.epoch;
            restore.replay_root = record.root_hash.clone();
            restore.replay_partition_roots = record.partition_roots.clone();
        }
        self.state.restore = Some(restore.clone());
        result(pb::apply_result::Kind::Restore(restore))
    }

    fn set_shard_map(&mut self, request: &pb::SetShardMapRequest) -> pb::ApplyResult {
        let Some(metadata) = &self.state.metadata else {
            return rejected(Code::FailedPrecondition, "the cluster is not initialised");
        };
        let current = self.state.shard_map.version;
        if request.expected_version != current {
            return rejected(
                Code::Aborted,
                format!(
                    "the shard map is at version {current}, not {}; re-read it and retry",
                    request.expected_version
                ),
            );
        }
        let proposed = match &request.map {
            Some(map) => map.clone(),
            None => cluster_pb::ShardMap {
                shards: request.shards.clone(),
                ..cluster_pb::ShardMap::default()
            },
        };
        // The one validation every holder of a shard map applies (`ktd_core::ShardMap::new`):
        // a map a shard or the coordinator would refuse is refused before it is replicated.
        let map = match shard::replicated::shard_map_with_bits(metadata.partition_bits, &proposed) {
            Ok(map) => map.with_version(current + 1),
            Err(error) => return rejected(Code::InvalidArgument, error.to_string()),
        };
        self.state.shard_map = shard::replicated::shard_map_to_pb(&map);
        result(pb::apply_result::Kind::ShardMap(
            self.state.shard_map.clone(),
        ))
    }
}

/// Checks that a commit's partition roots stitch to its root hash in this cluster's directory
/// (`shard::replicated::check_commit`): a forged or garbage root is refused before it becomes the
/// epoch's one root.
fn check_commit(
    metadata: &pb::ClusterMetadata,
    commit: &pb::CommitEpochRequest,
) -> std::result::Result<(), String> {
    let akd = metadata
        .akd_configuration
        .parse::<ktd_core::AkdConfig>()
        .map_err(|error| error.to_string())?;
    let bits = u8::try_from(metadata.partition_bits)
        .map_err(|_| format!("partition bits {} out of range", metadata.partition_bits))?;
    shard::replicated::check_commit(
        &akd,
        bits,
        commit.epoch,
        &commit.root_hash,
        &commit.partition_roots,
    )
    .map_err(|error| format!("refusing the commit of epoch {}: {error}", commit.epoch))
}

/// Default of `ClusterMetadata.max_epoch_bytes`.
pub const DEFAULT_MAX_EPOCH_BYTES: u64 = 64 << 20;
/// Largest `ClusterMetadata.max_epoch_bytes`: bounds what the coordinator holds of one epoch
/// while it drives it (the batch and each server's share). Shares travel to shards in parts
/// (`shard::client::TRANSFER_CHUNK_BYTES` per message), and an epoch's leaves (at most two per
/// update, ≤ 1,000,000 updates) fit one `BuildEpoch` stream (`shard::server::MAX_MESSAGE_BYTES`).
pub const MAX_EPOCH_BYTES_CEILING: u64 = 128 << 20;
/// Default of `ClusterMetadata.idempotency_retention_ms`: 10 minutes.
pub const DEFAULT_IDEMPOTENCY_RETENTION_MS: u64 = 600_000;
/// Default of `ClusterMetadata.max_idempotency_keys`.
pub const DEFAULT_MAX_IDEMPOTENCY_KEYS: u64 = 4 << 20;
/// Caller keys are stored under ordinals with this bit set (retry keys without).
pub const KEPT_ORDINAL_BASE: u64 = 1 << 63;
/// Most caller keys one append forgets (the rest go with later appends).
pub const EXPIRE_PER_APPEND: u64 = 4096;

/// How long and how many caller idempotency keys are remembered (a 0 field is the default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyRetention {
    /// A key is remembered at least this long (ms) after its append.
    pub retention_ms: u64,
    /// Most keys remembered at once.
    pub max_keys: u64,
}

impl KeyRetention {
    /// The retention `metadata` sets.
    pub fn of(metadata: &pb::ClusterMetadata) -> Self {
        let or = |value: u64, default: u64| if value == 0 { default } else { value };
        Self {
            retention_ms: or(
                metadata.idempotency_retention_ms,
                DEFAULT_IDEMPOTENCY_RETENTION_MS,
            ),
            max_keys: or(metadata.max_idempotency_keys, DEFAULT_MAX_IDEMPOTENCY_KEYS),
        }
    }
}

/// Default of `ClusterMetadata.max_uncommitted_epochs`.
pub const DEFAULT_MAX_UNCOMMITTED_EPOCHS: u64 = 16;

/// The input limits of a cluster, from its replicated metadata (a 0 field is the default):
/// enforced by the state machine at `Append` on every replica, so an update that was
/// acknowledged always fits what a shard accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InputLimits {
    /// Longest label, in bytes (at most the shards' `UpdateLimits::max_label_len`).
    pub max_label_bytes: u64,
    /// Largest value, in bytes (at most the shards' `UpdateLimits::max_value_len`).
    pub max_value_bytes: u64,
    /// Most label + value bytes in one epoch.
    pub max_epoch_bytes: u64,
    /// Most sealed epochs waiting for their commit before appends are refused.
    pub max_uncommitted_epochs: u64,
}

impl InputLimits {
    /// The limits `metadata` sets.
    pub fn of(metadata: &pb::ClusterMetadata) -> Self {
        let shard = ktd_core::user::UpdateLimits::default();
        let or = |value: u64, default: u64| if value == 0 { default } else { value };
        Self {
            max_label_bytes: or(metadata.max_label_bytes, shard.max_label_len as u64),
            max_value_bytes: or(metadata.max_value_bytes, shard.max_value_len as u64),
            max_epoch_bytes: or(metadata.max_epoch_bytes, DEFAULT_MAX_EPOCH_BYTES),
            max_uncommitted_epochs: or(
                metadata.max_uncommitted_epochs,
                DEFAULT_MAX_UNCOMMITTED_EPOCHS,
            ),
        }
    }

    /// The first update of `updates` these limits refuse, as a message.
    pub fn check(&self, updates: &[pb::Update]) -> std::result::Result<(), String> {
        for (position, update) in updates.iter().enumerate() {
            if update.label.is_empty() {
                return Err(format!("update {position}: the label is empty"));
            }
            if update.label.len() as u64 > self.max_label_bytes {
                return Err(format!(
                    "update {position}: label of {} bytes exceeds the limit of {} bytes",
                    update.label.len(),
                    self.max_label_bytes
                ));
            }
            if update.value.len() as u64 > self.max_value_bytes {
                return Err(format!(
                    "update {position}: value of {} bytes exceeds the limit of {} bytes",
                    update.value.len(),
                    self.max_value_bytes
                ));
            }
        }
        let bytes = append_bytes(updates);
        if bytes > self.max_epoch_bytes {
            return Err(format!(
                "the batch holds {bytes} bytes of labels and values, more than one epoch may \
                 hold (max_epoch_bytes = {}); split it",
                self.max_epoch_bytes
            ));
        }
        Ok(())
    }
}

/// Label + value bytes of `updates` (what `max_epoch_bytes` counts).
fn append_bytes(updates: &[pb::Update]) -> u64 {
    updates
        .iter()
        .map(|update| (update.label.len() + update.value.len()) as u64)
        .sum()
}

/// Checks cluster metadata before it is proposed and again when applied.
pub fn validate_metadata(metadata: &pb::ClusterMetadata) -> std::result::Result<(), String> {
    if metadata.vrf_public_key.len() != 32 {
        return Err(format!(
            "the VRF public key must be 32 bytes, got {}",
            metadata.vrf_public_key.len()
        ));
    }
    ktd_core::shard_map::check_partition_bits(u64::from(metadata.partition_bits))
        .map_err(|error| error.to_string())?;
    if metadata.max_epoch_updates == 0 || metadata.idempotency_window == 0 {
        return Err("max_epoch_updates and idempotency_window must be positive".into());
    }
    if metadata.akd_configuration.is_empty() {
        return Err("the akd configuration name must not be empty".into());
    }
    let shard = ktd_core::user::UpdateLimits::default();
    if metadata.max_epoch_updates > shard.max_batch as u64 {
        return Err(format!(
            "max_epoch_updates {} exceeds what a shard builds in one epoch ({})",
            metadata.max_epoch_updates, shard.max_batch
        ));
    }
    let limits = InputLimits::of(metadata);
    if limits.max_label_bytes > shard.max_label_len as u64 {
        return Err(format!(
            "max_label_bytes {} exceeds the shards' label limit ({})",
            limits.max_label_bytes, shard.max_label_len
        ));
    }
    if limits.max_value_bytes > shard.max_value_len as u64 {
        return Err(format!(
            "max_value_bytes {} exceeds the shards' value limit ({})",
            limits.max_value_bytes, shard.max_value_len
        ));
    }
    if limits.max_epoch_bytes > MAX_EPOCH_BYTES_CEILING {
        return Err(format!(
            "max_epoch_bytes {} exceeds {MAX_EPOCH_BYTES_CEILING} (a shard's share of an epoch \
             must fit one PrepareEpoch message)",
            limits.max_epoch_bytes
        ));
    }
    if limits.max_epoch_bytes < limits.max_label_bytes + limits.max_value_bytes {
        return Err("max_epoch_bytes must hold at least one largest update".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
