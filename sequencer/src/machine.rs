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
//! * **Idempotency.** A keyed append is remembered (key → original answer) for the last
//!   `idempotency_window` keyed appends; a repeat returns the original answer marked `duplicate`
//!   and changes nothing.
//! * **One root per epoch.** `CommitEpoch(E)` is accepted only for the sealed epoch right after
//!   the last committed one; repeating the same root is OK; any other root for a committed epoch
//!   is refused with `ALREADY_EXISTS`.

use std::collections::{BTreeMap, HashSet};

use ktd_proto::ktd::sequencer::v1 as pb;
use tonic::Code;

use crate::error::Result;

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
    pub shard_map: pb::ShardMap,
    /// Epochs whose batch is retained → number of updates in it.
    pub retained_batches: BTreeMap<u64, u64>,
    /// Sealed, uncommitted epochs → when they were sealed (ms since the Unix epoch).
    pub sealed_at_ms: BTreeMap<u64, u64>,
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
            shard_map: pb::ShardMap::default(),
            retained_batches: BTreeMap::new(),
            sealed_at_ms: BTreeMap::new(),
        }
    }
}

impl EpochState {
    /// The latest sealed epoch (0 if none).
    pub fn last_sealed_epoch(&self) -> u64 {
        self.open_epoch - 1
    }
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
            None => Ok(rejected(Code::InvalidArgument, "empty command")),
        }
    }

    fn seal_open(&mut self, sealed_at_ms: u64) -> pb::SealResponse {
        let epoch = self.state.open_epoch;
        let updates = self.open_labels.len() as u64;
        self.state.retained_batches.insert(epoch, updates);
        self.state.sealed_at_ms.insert(epoch, sealed_at_ms);
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
        let max_epoch_updates = metadata.max_epoch_updates;
        let window = metadata.idempotency_window;
        if !append.idempotency_key.is_empty()
            && let Some(mut answer) = tx.idem_get(&append.idempotency_key)?
        {
            answer.duplicate = true;
            return Ok(result(pb::apply_result::Kind::Appended(answer)));
        }
        if append.updates.is_empty() {
            return Ok(rejected(
                Code::InvalidArgument,
                "an append must contain at least one update",
            ));
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
        let sealed_before = (self.open_labels.len() as u64 + new_labels > max_epoch_updates)
            .then(|| self.seal_open(append.proposed_at_ms));

        let epoch = self.state.open_epoch;
        let first_sequence = self.state.next_sequence;
        for update in &append.updates {
            tx.update_put(
                epoch,
                &update.label,
                self.state.next_sequence,
                &update.value,
            );
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
        };
        if !append.idempotency_key.is_empty() {
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

    fn seal(&mut self, seal: &pb::SealRequest) -> pb::ApplyResult {
        let (epoch, heartbeat) = (seal.epoch, seal.heartbeat);
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
        };
        tx.epoch_put(&record);
        self.state.last_committed_epoch = epoch;
        let retain = self
            .state
            .metadata
            .as_ref()
            .map_or(0, |metadata| metadata.retained_committed_batches);
        while let Some((&oldest, _)) = self.state.retained_batches.first_key_value() {
            if oldest + retain > epoch {
                break;
            }
            tx.updates_drop(oldest);
            self.state.retained_batches.remove(&oldest);
        }
        Ok(result(pb::apply_result::Kind::Committed(
            pb::CommitEpochResponse {
                record: Some(record),
                already_committed: false,
            },
        )))
    }

    fn init_cluster(&mut self, metadata: &pb::ClusterMetadata) -> pb::ApplyResult {
        if let Err(message) = validate_metadata(metadata) {
            return rejected(Code::InvalidArgument, message);
        }
        if let Some(existing) = &self.state.metadata
            && (existing.cluster_id != metadata.cluster_id
                || existing.partition_bits != metadata.partition_bits
                || existing.akd_configuration != metadata.akd_configuration
                || existing.vrf_public_key != metadata.vrf_public_key)
        {
            return rejected(
                Code::AlreadyExists,
                "the cluster is already initialised with a different identity (cluster id, \
                 partition bits, akd configuration or VRF key)",
            );
        }
        self.state.metadata = Some(metadata.clone());
        result(pb::apply_result::Kind::Metadata(metadata.clone()))
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
        // The one validation every holder of a shard map applies (`ktd_core::ShardMap::new`):
        // a map a shard or the coordinator would refuse is refused before it is replicated.
        if let Err(error) =
            shard::replicated::shard_map_of(metadata.partition_bits, current + 1, &request.shards)
        {
            return rejected(Code::InvalidArgument, error.to_string());
        }
        self.state.shard_map = pb::ShardMap {
            version: current + 1,
            shards: request.shards.clone(),
        };
        result(pb::apply_result::Kind::ShardMap(
            self.state.shard_map.clone(),
        ))
    }
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
    Ok(())
}

#[cfg(test)]
mod tests;
