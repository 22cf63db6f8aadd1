//! [`LocalShard`]: the shard server's logic behind [`ShardApi`], running in this process — a
//! replica of the partitions the shard map assigns to it.
//!
//! A shard server wraps one in a gRPC service; `ktd dev` calls one directly. Every call hands
//! its blocking work (RocksDB, VRF, hashing) to `spawn_blocking`, so the async runtime's threads
//! never wait on the disk or the CPU-heavy tree code.
//!
//! **Fencing.** Every mutation is checked against the highest fence accepted so far (persisted,
//! synced when it grows) before anything is written; a refusal is [`Error::Fenced`] and changes
//! nothing. Mutations are serialised: one prepare, build or bootstrap at a time per server.
//!
//! **Durability.** Prepare writes the epoch's user versions in a synced batch before it answers;
//! build writes the node versions and then each partition's built marker in a synced batch
//! before it answers, so what a replica reports is on disk.
//!
//! **Reads** are served for a partition only at epochs it has built, never while the restart
//! check found its stored root disagreeing with the committed one, and never while the latest
//! map seen quarantines it here ([`Error::NotServing`]: the gateway asks another replica).
//!
//! **Pruning** ([`LocalShard::prune`], `store/prune.rs`): the floor is the lowest of the newest
//! safe epoch a fence carried, the built epoch of every held partition, and the epoch of every
//! partition copy streaming out or in; reads below the floor are refused with
//! [`ktd_core::Error::EpochPruned`] (`OUT_OF_RANGE`), which no other replica would answer
//! differently.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use akd_core::configuration::Configuration;
use akd_core::verify::history::HistoryParams;
use akd_core::{AkdLabel, AkdValue};
use futures::StreamExt;
use futures::stream::BoxStream;
use ktd_core::proof::{AbsencePlan, HistoryPlan, LookupPlan};
use ktd_core::shard_map::{Role, ShardServer};
use ktd_core::tree::audit::AppendOnlySlice;
use ktd_core::tree::{
    LeavesByPartition, NewLeaf, NodeRef, PartitionWalk, SortedLeaves, WalkRequest,
};
use ktd_core::{Error as CoreError, ShardMap, label};

use crate::api::{
    BootstrapSource, BootstrapSummary, BuildSummary, Fence, PartitionChunk, PartitionState,
    PrepareSummary, ShardApi, ShardStatus, UpdateTrace, UserPartitionLeaves, chunk_checksum,
};
use crate::error::{Error, Result};
use crate::node::ShardNode;
use crate::store::replica::{BuiltMarker, StoredFence};

/// Finds the [`ShardApi`] of another shard server (a pooled gRPC client in a cluster): where a
/// bootstrap copies a partition from.
pub trait PeerResolver: Send + Sync {
    /// The server described by `server`.
    fn peer(&self, server: &ShardServer) -> Result<Arc<dyn ShardApi>>;
}

/// A resolver for a single-server process: there are no peers.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoPeers;

impl PeerResolver for NoPeers {
    fn peer(&self, server: &ShardServer) -> Result<Arc<dyn ShardApi>> {
        Err(Error::invalid_config(format!(
            "no route to shard {} in a single-shard process",
            server.id
        )))
    }
}

/// Bytes per chunk of a partition copy.
const CHUNK_BYTES: usize = 4 << 20;
/// Chunks of a partition copy buffered between the RocksDB reader and the network.
const CHUNK_QUEUE: usize = 4;

/// What the replica knows about itself, mirrored from the store.
#[derive(Debug, Default)]
struct ReplicaState {
    markers: BTreeMap<u32, BuiltMarker>,
    fence: StoredFence,
    /// Partitions whose stored root disagrees with the committed one (restart check).
    mismatched: BTreeSet<u32>,
    /// The newest map a fence carried (reads of partitions it quarantines here are refused).
    map: Option<ShardMap>,
    seen_committed_epoch: u64,
    /// Partitions a bootstrap is copying in (at most one copy per partition at a time): when
    /// the copy started and the bytes received so far.
    copies: BTreeMap<u32, (Instant, u64)>,
    /// Held partitions the newest map assigns to other servers, since when that is so.
    orphaned: BTreeMap<u32, Instant>,
    /// Reads below this epoch are refused (the store's persisted prune floor).
    prune_floor: u64,
    /// Node versions deleted since start, and since the last compaction of pruned ranges (with
    /// the lowest version among those).
    pruned_total: u64,
    pruned_since_compaction: u64,
    lowest_pruned_version: u64,
    /// Epochs partition copies (out or in) are reading or writing right now → how many.
    holds: BTreeMap<u64, usize>,
}

/// Keeps the pruner from deleting history an in-progress partition copy needs at `epoch`.
struct EpochHold {
    state: Arc<Mutex<ReplicaState>>,
    epoch: u64,
}

impl EpochHold {
    /// Holds `epoch` unless the prune floor is already above it ([`CoreError::EpochPruned`]).
    /// The check and the registration happen under the state lock, where
    /// [`LocalShard::prune`] also takes its bound and raises the floor: either the hold is
    /// seen by the pass, or the pass's floor refuses the hold — never a sweep past a hold.
    fn new(state: &Arc<Mutex<ReplicaState>>, epoch: u64) -> Result<Self> {
        let mut locked = state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        ktd_core::retention::check_retained(epoch, locked.prune_floor)?;
        *locked.holds.entry(epoch).or_default() += 1;
        Ok(Self {
            state: state.clone(),
            epoch,
        })
    }
}

impl Drop for EpochHold {
    fn drop(&mut self) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = state.holds.get_mut(&self.epoch) {
            *count -= 1;
            if *count == 0 {
                state.holds.remove(&self.epoch);
            }
        }
    }
}

/// What one [`LocalShard::prune`] pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// The floor in force after the pass.
    pub floor: u64,
    /// Node versions deleted.
    pub node_versions: u64,
    /// Whether the pruned key range was compacted.
    pub compacted: bool,
}

/// Stale-index entries deleted per batch by the pruner.
const PRUNE_BATCH: usize = 10_000;

impl ReplicaState {
    /// Brings `orphaned` up to date with the markers and the newest map: a held partition that
    /// map gives this server no role in is orphaned (from now, if it was not already).
    fn refresh_orphans(&mut self, id: &str, now: Instant) {
        let Some(map) = &self.map else {
            self.orphaned.clear();
            return;
        };
        let orphans: Vec<u32> = self
            .markers
            .keys()
            .copied()
            .filter(|partition| {
                (*partition as usize) < map.partitions().len()
                    && map.replicas(*partition).role_of(id).is_none()
                    && !self.copies.contains_key(partition)
            })
            .collect();
        self.orphaned
            .retain(|partition, _| orphans.contains(partition));
        for partition in orphans {
            self.orphaned.entry(partition).or_insert(now);
        }
    }
}

/// Forgets a partition copy in progress however its bootstrap ends — finished, failed, or
/// dropped because the coordinator that asked for it went away — so a later bootstrap of the
/// partition is never refused as "already being copied in".
struct CopyGuard<'a> {
    state: &'a Arc<Mutex<ReplicaState>>,
    partition: u32,
}

impl Drop for CopyGuard<'_> {
    fn drop(&mut self) {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .copies
            .remove(&self.partition);
    }
}

/// One shard server's logic over its [`ShardNode`].
pub struct LocalShard<TC> {
    id: String,
    node: Arc<ShardNode<TC>>,
    peers: Arc<dyn PeerResolver>,
    state: Arc<Mutex<ReplicaState>>,
    writes: tokio::sync::Mutex<()>,
    /// One prune pass at a time.
    pruning: tokio::sync::Mutex<()>,
    orphan_grace: Duration,
}

/// How often a shard server prunes history the retention window let go of
/// ([`LocalShard::prune`]).
pub const DEFAULT_PRUNE_INTERVAL: Duration = Duration::from_secs(30);

/// How long a partition copy the shard map moved away keeps serving before it is deleted
/// ([`LocalShard::drop_orphans`]): far longer than any gateway routes by an older map.
pub const DEFAULT_ORPHAN_GRACE: Duration = Duration::from_secs(600);

impl<TC> std::fmt::Debug for LocalShard<TC> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalShard")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| CoreError::Storage {
            context: "run blocking shard work",
            message: error.to_string(),
        })?
}

impl<TC: Configuration> LocalShard<TC> {
    /// The shard server `id` over `node`, reaching peers through `peers`. Reads its identity,
    /// fence and built markers from the store: a data directory that belongs to another shard id
    /// is refused; a new one is stamped with `id`. Blocking (RocksDB).
    pub fn load(
        id: impl Into<String>,
        node: Arc<ShardNode<TC>>,
        peers: Arc<dyn PeerResolver>,
    ) -> Result<Self> {
        let id = id.into();
        let store = node.store();
        match store.shard_id()? {
            Some(stored) if stored != id => {
                return Err(Error::IncompatibleDataDir {
                    path: store.path().display().to_string(),
                    reason: format!("it belongs to shard {stored:?}, not {id:?}"),
                });
            }
            Some(_) => {}
            None => store.set_shard_id(&id)?,
        }
        let markers = store
            .built_markers()?
            .into_iter()
            .map(|marker| (marker.partition, marker))
            .collect();
        let fence = store.fence()?;
        let prune_floor = store.prune_floor()?;
        Ok(Self {
            id,
            node,
            peers,
            state: Arc::new(Mutex::new(ReplicaState {
                markers,
                seen_committed_epoch: fence.committed_epoch,
                fence,
                prune_floor,
                ..ReplicaState::default()
            })),
            writes: tokio::sync::Mutex::new(()),
            pruning: tokio::sync::Mutex::new(()),
            orphan_grace: DEFAULT_ORPHAN_GRACE,
        })
    }

    /// The same shard, deleting moved-away partitions after `grace` instead of
    /// [`DEFAULT_ORPHAN_GRACE`] (its status reports the time left by this grace).
    #[must_use]
    pub fn with_orphan_grace(mut self, grace: Duration) -> Self {
        self.orphan_grace = grace;
        self
    }

    /// The grace period after which moved-away partitions are deleted.
    pub fn orphan_grace(&self) -> Duration {
        self.orphan_grace
    }

    /// This shard's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The node underneath.
    pub fn node(&self) -> &Arc<ShardNode<TC>> {
        &self.node
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ReplicaState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records that the sequencer's log shows `epoch` committed.
    pub fn saw_committed(&self, epoch: u64) {
        let mut state = self.state();
        state.seen_committed_epoch = state.seen_committed_epoch.max(epoch);
    }

    /// The built marker of every held partition.
    pub fn markers(&self) -> Vec<BuiltMarker> {
        self.state().markers.values().copied().collect()
    }

    /// Marks `partition` as disagreeing with the committed epoch record (the restart check):
    /// it is not read, and reported so that the coordinator rebuilds it.
    pub fn set_mismatch(&self, partition: u32) {
        self.state().mismatched.insert(partition);
    }

    /// Adopts `marker` for a partition that has none, after the caller checked that the store
    /// holds the partition's committed root at that epoch (a data directory written before
    /// built markers existed). Synced. Blocking.
    pub fn adopt_marker(&self, marker: BuiltMarker) -> Result<()> {
        if self.state().markers.contains_key(&marker.partition) {
            return Ok(());
        }
        self.node.store().put_built_markers(&[marker])?;
        self.state().markers.insert(marker.partition, marker);
        Ok(())
    }

    /// Deletes the copies of partitions that the newest map seen has assigned to other servers
    /// for at least `grace` (a move's source after the move finished; a server drained or
    /// replaced), and returns them. Until then such a copy keeps serving reads, so a gateway
    /// still routing by an older map is answered. The map is checked again under the write
    /// lock just before each deletion, so a partition assigned back here in the meantime is
    /// kept. Deleting the built marker first (synced) means a crash part-way leaves the
    /// partition not held, never half held.
    pub async fn drop_orphans(&self, grace: Duration) -> Result<Vec<u32>> {
        let _writes = self.writes.lock().await;
        let now = Instant::now();
        let (expired, up_to) = {
            let mut state = self.state();
            state.refresh_orphans(&self.id, now);
            let expired: Vec<(u32, u64)> = state
                .orphaned
                .iter()
                .filter(|(_, since)| now.duration_since(**since) >= grace)
                .filter_map(|(partition, _)| {
                    state
                        .markers
                        .get(partition)
                        .map(|marker| (*partition, marker.epoch))
                })
                .collect();
            (expired, state.fence.committed_epoch)
        };
        let bits = self.node.bits();
        let mut dropped = Vec::new();
        for (partition, built) in expired {
            let node = self.node.clone();
            let last = built.max(up_to) + 1;
            blocking(move || Ok(node.store().delete_partition(partition, bits, last)?)).await?;
            let mut state = self.state();
            state.markers.remove(&partition);
            state.orphaned.remove(&partition);
            state.mismatched.remove(&partition);
            tracing::info!(
                partition,
                built,
                "deleted a partition copy the shard map moved to other servers"
            );
            dropped.push(partition);
        }
        Ok(dropped)
    }

    /// Checks `fence` for a mutation touching `partitions`, and accepts it: refuses a term below
    /// the highest seen, a map older than one seen, a map for another partitioning, and
    /// partitions the map does not assign here. Persists the fence (synced) when it grows. Call
    /// with the write lock held.
    async fn accept_fence(&self, fence: &Fence, partitions: &[u32]) -> Result<StoredFence> {
        let bits = self.node.bits();
        if fence.map.bits() != bits {
            return Err(Error::fenced(format!(
                "the map has {} partition bits; this shard has {bits}",
                fence.map.bits()
            )));
        }
        let stored = self.state().fence;
        if fence.term < stored.term {
            return Err(Error::fenced(format!(
                "coordinator term {} is older than term {} already accepted",
                fence.term, stored.term
            )));
        }
        if fence.map.version() < stored.map_version {
            return Err(Error::fenced(format!(
                "shard map version {} is older than version {} already seen",
                fence.map.version(),
                stored.map_version
            )));
        }
        let assigned: HashSet<u32> = fence
            .map
            .assignments(&self.id)
            .into_iter()
            .map(|(partition, _)| partition)
            .collect();
        if let Some(partition) = partitions
            .iter()
            .find(|partition| !assigned.contains(partition))
        {
            return Err(Error::fenced(format!(
                "shard map version {} does not assign partition {partition} to {}",
                fence.map.version(),
                self.id
            )));
        }
        let grown = StoredFence {
            term: stored.term.max(fence.term),
            committed_epoch: stored.committed_epoch.max(fence.committed_epoch),
            map_version: stored.map_version.max(fence.map.version()),
            safe_epoch: stored.safe_epoch.max(fence.safe_epoch),
        };
        if grown != stored {
            let node = self.node.clone();
            blocking(move || Ok(node.store().put_fence(&grown)?)).await?;
        }
        let mut state = self.state();
        state.fence = grown;
        state.seen_committed_epoch = state.seen_committed_epoch.max(grown.committed_epoch);
        if state
            .map
            .as_ref()
            .is_none_or(|map| map.version() <= fence.map.version())
        {
            state.map = Some(fence.map.clone());
            state.refresh_orphans(&self.id, Instant::now());
        }
        Ok(grown)
    }

    /// Refuses a write of `epoch` to `partition` unless it extends the built epoch by one, or
    /// redoes the built epoch while it is not committed.
    fn check_extends(&self, partition: u32, epoch: u64, committed: u64) -> Result<()> {
        let built = self
            .state()
            .markers
            .get(&partition)
            .map(|marker| marker.epoch);
        match built {
            // Epoch 0 is the empty directory: every partition of a new cluster starts there.
            None if epoch == 1 && committed == 0 => Ok(()),
            None => Err(Error::fenced(format!(
                "partition {partition} is not held here (a bootstrap must copy it first)"
            ))),
            Some(built) if epoch == built + 1 => Ok(()),
            Some(built) if epoch == built && epoch > committed => Ok(()),
            Some(built) => Err(Error::fenced(format!(
                "partition {partition} is built to epoch {built} and epoch {committed} is \
                 committed: epoch {epoch} cannot be written"
            ))),
        }
    }

    /// Refuses a read at `epoch` below the prune floor: its history may be gone here, and is
    /// gone or going on every replica (the floor never passes the cluster's safe epoch).
    fn check_retained(&self, epoch: u64) -> Result<()> {
        Ok(ktd_core::retention::check_retained(
            epoch,
            self.state().prune_floor,
        )?)
    }

    /// Deletes the node versions no epoch at or above the floor reads (`store/prune.rs`), the
    /// floor being the lowest of: the newest safe epoch a fence carried, the built epoch of
    /// every held partition (a replica rebuilding or extending a partition reads its tree as of
    /// its built epoch), and the epoch of every partition copy in progress. Raises and persists
    /// the floor first, then sweeps in batches of 10,000 on a blocking thread, and compacts the
    /// pruned key range once the versions deleted since the last compaction are a quarter of
    /// the node family (and at least 10,000), so space returns without rewriting the live
    /// history on every pass. Never on the commit path: a background task calls it.
    pub async fn prune(&self) -> Result<PruneReport> {
        let _pruning = self.pruning.lock().await;
        // Markers as stored too: a bootstrap cancelled while its blocking step still writes
        // the marker leaves the partition held on disk but not in memory.
        let node = self.node.clone();
        let stored = blocking(move || Ok(node.store().built_markers()?)).await?;
        let bound = {
            let mut state = self.state();
            let mut bound = state.fence.safe_epoch.min(state.fence.committed_epoch);
            for marker in state.markers.values().chain(&stored) {
                bound = bound.min(marker.epoch);
            }
            if let Some((epoch, _)) = state.holds.first_key_value() {
                bound = bound.min(*epoch);
            }
            // Raised here, under the lock holds are taken under: a copy starting from now on
            // is checked against it (see `EpochHold::new`). Reads are refused from now on,
            // before the floor is persisted — the safe direction.
            let bound = bound.max(state.prune_floor);
            state.prune_floor = bound;
            bound
        };
        let node = self.node.clone();
        let floor = blocking(move || Ok(node.store().raise_prune_floor(bound)?)).await?;
        let mut report = PruneReport {
            floor,
            ..PruneReport::default()
        };
        loop {
            let node = self.node.clone();
            // Only through this pass's bound: what the floor persisted by an earlier pass
            // allowed may not be what this pass's markers and holds allow.
            let step = blocking(move || Ok(node.store().prune_step(PRUNE_BATCH, bound)?)).await?;
            report.node_versions += step.node_versions;
            if step.node_versions > 0 {
                metrics::counter!("ktd_shard_pruned_node_versions_total")
                    .increment(step.node_versions);
                let mut state = self.state();
                state.pruned_total += step.node_versions;
                state.lowest_pruned_version = if state.pruned_since_compaction == 0 {
                    step.lowest_version
                } else {
                    state.lowest_pruned_version.min(step.lowest_version)
                };
                state.pruned_since_compaction += step.node_versions;
            }
            if step.done {
                break;
            }
        }
        metrics::gauge!("ktd_shard_prune_floor").set(floor as f64);
        let (pending, lowest) = {
            let state = self.state();
            (state.pruned_since_compaction, state.lowest_pruned_version)
        };
        if pending >= PRUNE_BATCH as u64 {
            let node = self.node.clone();
            let compact = blocking(move || {
                let keys = node.store().node_version_count()?;
                if pending.saturating_mul(4) >= keys {
                    node.store().compact_pruned(lowest, floor);
                    return Ok(true);
                }
                Ok(false)
            })
            .await?;
            if compact {
                report.compacted = true;
                self.state().pruned_since_compaction = 0;
            }
        }
        Ok(report)
    }

    /// Refuses to read `partition` at `epoch` unless it is held, built that far, not found
    /// disagreeing at restart, and not quarantined here by the latest map seen.
    fn check_readable(&self, partition: u32, epoch: u64) -> Result<()> {
        let state = self.state();
        let not_serving = |reason: String| Error::NotServing {
            partition,
            epoch,
            reason,
        };
        if state.mismatched.contains(&partition) {
            return Err(not_serving(
                "its stored root disagrees with the committed one (being rebuilt)".into(),
            ));
        }
        if let Some(map) = &state.map
            && map.replicas(partition).role_of(&self.id) == Some(Role::Quarantined)
        {
            return Err(not_serving("it is quarantined on this server".into()));
        }
        match state.markers.get(&partition) {
            // Epoch 0 is the empty directory: nothing to hold.
            None if epoch == 0 => Ok(()),
            None => Err(not_serving("it is not held on this server".into())),
            Some(marker) if marker.epoch < epoch => Err(not_serving(format!(
                "it is built only to epoch {}",
                marker.epoch
            ))),
            Some(_) => Ok(()),
        }
    }
}

impl<TC: Configuration> LocalShard<TC> {
    /// Streams `source`'s copy of its partition in, checking every chunk's checksum and the
    /// record count, at most `max_bytes_per_second`. Returns the records and bytes copied.
    async fn copy_partition(&self, source: &BootstrapSource) -> Result<(u64, u64)> {
        let partition = source.partition;
        let bits = self.node.bits();
        let peer = self.peers.peer(&ShardServer {
            id: source.source_id.clone(),
            address: source.source_address.clone(),
            maintenance_until_ms: 0,
            draining: false,
        })?;
        let mut chunks = peer.stream_partition(partition, source.epoch, 0).await?;
        let started = Instant::now();
        let mut records = 0u64;
        let mut bytes = 0u64;
        let mut total = None;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            if chunk_checksum(&chunk.nodes, &chunk.users) != chunk.checksum {
                return Err(Error::corrupt(format!(
                    "a chunk of partition {partition} from {} failed its checksum",
                    source.source_id
                )));
            }
            records += (chunk.nodes.len() + chunk.users.len()) as u64;
            bytes += chunk
                .nodes
                .iter()
                .chain(&chunk.users)
                .map(|(key, value)| (key.len() + value.len()) as u64)
                .sum::<u64>();
            total = total.or(chunk.total_records);
            if let Some(progress) = self.state().copies.get_mut(&partition) {
                progress.1 = bytes;
            }
            let node = self.node.clone();
            let epoch = source.epoch;
            blocking(move || {
                Ok(node.store().import_records(
                    partition,
                    epoch,
                    bits,
                    &chunk.nodes,
                    &chunk.users,
                )?)
            })
            .await?;
            if source.max_bytes_per_second > 0 {
                let due =
                    Duration::from_secs_f64(bytes as f64 / source.max_bytes_per_second as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        if total != Some(records) {
            return Err(Error::corrupt(format!(
                "the copy of partition {partition} from {} ended after {records} records; it announced {total:?}",
                source.source_id
            )));
        }
        // Copies carry no lookup proofs: the filler stores the copied versions' records.
        self.node.request_lookup_proof_backfill();
        Ok((records, bytes))
    }
}

#[async_trait::async_trait]
impl<TC: Configuration> ShardApi for LocalShard<TC> {
    async fn prepare_epoch(
        &self,
        epoch: u64,
        fence: &Fence,
        user_partitions: Vec<u32>,
        updates: Vec<(AkdLabel, AkdValue)>,
        traces: Vec<UpdateTrace>,
    ) -> Result<PrepareSummary> {
        // One span per traced update, in its publish's trace, open while the shard prepares it.
        let _update_spans = update_spans(&self.id, epoch, updates.len(), &traces);
        if epoch == 0 {
            return Err(CoreError::EpochOutOfOrder { epoch, previous: 0 }.into());
        }
        let mut user_partitions = user_partitions;
        user_partitions.sort_unstable();
        user_partitions.dedup();
        let _writes = self.writes.lock().await;
        let accepted = self.accept_fence(fence, &user_partitions).await?;
        for partition in &user_partitions {
            self.check_extends(*partition, epoch, accepted.committed_epoch)?;
        }
        self.node.limits().check_batch(&updates)?;
        let n_updates = updates.len() as u64;
        let node = self.node.clone();
        let prepared = blocking(move || {
            let prepared = node.user_partition_leaves(epoch, &user_partitions, updates)?;
            node.store().write_user_versions(&prepared.versions)?;
            node.versions_written(&prepared.versions);
            Ok(prepared)
        })
        .await?;
        let leaves = prepared
            .partitions
            .iter()
            .flat_map(|partition| &partition.leaves)
            .map(|(_, leaves)| leaves.len() as u64)
            .sum();
        Ok(PrepareSummary {
            updates: n_updates,
            changed: prepared.changed as u64,
            leaves,
            user_partitions: prepared.partitions,
        })
    }

    async fn compute_leaves(
        &self,
        epoch: u64,
        user_partition: u32,
        updates: Vec<(AkdLabel, AkdValue)>,
    ) -> Result<UserPartitionLeaves> {
        if epoch == 0 {
            return Err(CoreError::EpochOutOfOrder { epoch, previous: 0 }.into());
        }
        self.check_readable(user_partition, epoch - 1)?;
        self.node.limits().check_batch(&updates)?;
        let node = self.node.clone();
        let mut prepared =
            blocking(move || node.user_partition_leaves(epoch, &[user_partition], updates)).await?;
        prepared.partitions.pop().ok_or_else(|| {
            CoreError::Proof("no leaves were computed for the user partition".into()).into()
        })
    }

    async fn build_epoch(
        &self,
        epoch: u64,
        fence: &Fence,
        base_roots: Vec<(u32, Option<NodeRef>)>,
        leaves: LeavesByPartition,
        sources: Vec<u32>,
    ) -> Result<BuildSummary> {
        if epoch == 0 {
            return Err(CoreError::EpochOutOfOrder { epoch, previous: 0 }.into());
        }
        let bits = self.node.bits();
        let mut sources = sources;
        sources.sort_unstable();
        sources.dedup();
        if sources.len() != 1usize << bits {
            return Err(Error::fenced(format!(
                "the leaves come from {} of the {} user partitions; every one must be accounted for",
                sources.len(),
                1u32 << bits
            )));
        }
        let mut base: BTreeMap<u32, Option<NodeRef>> = BTreeMap::new();
        for (partition, root) in base_roots {
            if base.insert(partition, root).is_some() {
                return Err(Error::fenced(format!(
                    "partition {partition} is named twice"
                )));
            }
        }
        let partitions: Vec<u32> = base.keys().copied().collect();
        let _writes = self.writes.lock().await;
        let accepted = self.accept_fence(fence, &partitions).await?;
        for partition in &partitions {
            self.check_extends(*partition, epoch, accepted.committed_epoch)?;
            let built = self.state().markers.get(partition).copied();
            // A replica whose own root at epoch - 1 differs from the base it is given has
            // diverged (or the base is not the committed one): building on either would be
            // wrong. Refused as DATA_LOSS and nothing more: the coordinator, which holds the
            // committed roots, quarantines the replica through the shard map and the repair loop
            // rebuilds it (its status root differs from the committed one); a claim in a request
            // alone never stops this server from serving reads.
            if let Some(marker) = built
                && marker.epoch == epoch - 1
                && marker.root != base[partition]
            {
                return Err(Error::corrupt(format!(
                    "partition {partition}: the stored root of epoch {} is not the committed one",
                    epoch - 1
                )));
            }
        }
        let mut by_partition: BTreeMap<u32, Vec<NewLeaf>> = BTreeMap::new();
        for (partition, partition_leaves) in leaves {
            if !base.contains_key(&partition) {
                return Err(Error::fenced(format!(
                    "leaves for partition {partition}, which this request does not build"
                )));
            }
            by_partition
                .entry(partition)
                .or_default()
                .extend(partition_leaves);
        }
        let node = self.node.clone();
        let (summary, markers) = blocking(move || {
            let inputs = by_partition
                .into_iter()
                .filter(|(_, leaves)| !leaves.is_empty())
                .map(|(partition, leaves)| {
                    SortedLeaves::new(leaves).map(|leaves| (partition, base[&partition], leaves))
                })
                .collect::<ktd_core::Result<Vec<_>>>()?;
            let built = node.build_partitions(epoch, &partitions, inputs)?;
            let mut roots = base;
            roots.extend(built.roots);
            let markers: Vec<BuiltMarker> = roots
                .iter()
                .map(|(partition, root)| BuiltMarker {
                    partition: *partition,
                    epoch,
                    root: *root,
                })
                .collect();
            // Synced: the node versions written above become durable with the markers.
            node.store().put_built_markers(&markers)?;
            Ok((
                BuildSummary {
                    roots: roots.into_iter().collect(),
                    nodes_written: built.nodes_written as u64,
                },
                markers,
            ))
        })
        .await?;
        let mut state = self.state();
        for marker in markers {
            state.mismatched.remove(&marker.partition);
            state.markers.insert(marker.partition, marker);
        }
        Ok(summary)
    }

    async fn bootstrap(&self, fence: &Fence, source: BootstrapSource) -> Result<BootstrapSummary> {
        let partition = source.partition;
        let bits = self.node.bits();
        let guard;
        // Step 1, under the write lock: accept the fence and forget the partition, so a crash
        // from here on leaves it not held, never half held. The copy itself runs without the lock
        // (the partition is not held, so no prepare or build touches its key ranges meanwhile),
        // and other partitions keep building.
        {
            let _writes = self.writes.lock().await;
            let accepted = self.accept_fence(fence, &[partition]).await?;
            if source.epoch > accepted.committed_epoch {
                return Err(Error::fenced(format!(
                    "epoch {} is not committed (the latest committed epoch is {})",
                    source.epoch, accepted.committed_epoch
                )));
            }
            let hold = EpochHold::new(&self.state, source.epoch)?;
            {
                let mut state = self.state();
                if state.copies.contains_key(&partition) {
                    return Err(Error::fenced(format!(
                        "partition {partition} is already being copied in"
                    )));
                }
                state.copies.insert(partition, (Instant::now(), 0));
                state.orphaned.remove(&partition);
            }
            guard = Some((
                CopyGuard {
                    state: &self.state,
                    partition,
                },
                hold,
            ));
            // Everything of the partition goes, node versions and their stale-version index
            // entries included: the index rebuilt after the copy then names only the copy's
            // own history, never a version left from an earlier tenure here.
            let up_to = self
                .state()
                .markers
                .get(&partition)
                .map_or(0, |marker| marker.epoch)
                .max(accepted.committed_epoch)
                + 1;
            let node = self.node.clone();
            let forgotten = blocking(move || {
                node.store().delete_partition(partition, bits, up_to)?;
                Ok(())
            })
            .await;
            self.state().markers.remove(&partition);
            forgotten?;
        }
        let copied = self.copy_partition(&source).await;
        let finished = match copied {
            Ok((records, bytes)) => {
                let _writes = self.writes.lock().await;
                let node = self.node.clone();
                let marker = BuiltMarker {
                    partition,
                    epoch: source.epoch,
                    root: source.expected_root,
                };
                blocking(move || {
                    // The copy must be the tree the committed root names, node by node.
                    let checked = node.verify_partition(marker.root)?;
                    // A copy carries node versions, not the stale-version index: index them
                    // here so the copied history is pruned like the rest.
                    node.store()
                        .rebuild_stale_index(&[partition], bits, marker.epoch)?;
                    node.store().put_built_markers(&[marker])?;
                    Ok(checked)
                })
                .await
                .map(|nodes_checked| {
                    let mut state = self.state();
                    state.mismatched.remove(&partition);
                    state.markers.insert(partition, marker);
                    BootstrapSummary {
                        epoch: source.epoch,
                        records,
                        bytes,
                        nodes_checked,
                    }
                })
            }
            Err(error) => Err(error),
        };
        drop(guard);
        finished
    }

    async fn stream_partition(
        &self,
        partition: u32,
        epoch: u64,
        from_epoch: u64,
    ) -> Result<BoxStream<'static, Result<PartitionChunk>>> {
        self.check_readable(partition, epoch)?;
        if from_epoch > epoch {
            return Err(Error::BadMessage {
                peer: "a StreamPartition caller".into(),
                message: format!("from_epoch {from_epoch} is after epoch {epoch}"),
            });
        }
        let hold = EpochHold::new(&self.state, epoch)?;
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<PartitionChunk>>(CHUNK_QUEUE);
        let node = self.node.clone();
        let bits = node.bits();
        tokio::task::spawn_blocking(move || {
            let _hold = hold;
            let send = |chunk: Result<PartitionChunk>| sender.blocking_send(chunk).is_ok();
            let exported = node.store().export_partition(
                partition,
                from_epoch..=epoch,
                bits,
                CHUNK_BYTES,
                |nodes, users| {
                    let checksum = chunk_checksum(&nodes, &users);
                    if send(Ok(PartitionChunk {
                        nodes,
                        users,
                        checksum,
                        total_records: None,
                    })) {
                        Ok(())
                    } else {
                        Err(CoreError::Storage {
                            context: "stream a partition",
                            message: "the receiver went away".into(),
                        })
                    }
                },
            );
            let last = match exported {
                Ok(total) => Ok(PartitionChunk {
                    checksum: chunk_checksum(&[], &[]),
                    total_records: Some(total),
                    ..PartitionChunk::default()
                }),
                Err(error) => Err(error.into()),
            };
            send(last);
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(receiver).boxed())
    }

    async fn walk(&self, requests: Vec<WalkRequest>) -> Result<Vec<PartitionWalk>> {
        let bits = self.node.bits();
        for request in &requests {
            if let Some(root) = &request.root {
                let partition = label::partition_of(&root.label.label_val, bits);
                self.check_readable(partition, root.max_epoch)?;
            }
        }
        // A walk carries roots, not the epoch read, so it is not checked against the floor
        // here: the user partition's plan (which names the epoch) is, and the gateway before
        // it. A node missing under a root stays `Corrupt` (damage, or a read that raced a
        // prune): the gateway fails over to another replica rather than hide damage.
        let node = self.node.clone();
        blocking(move || Ok(node.walk(&requests)?)).await
    }

    async fn append_only_slice(&self, root: NodeRef, start_epoch: u64) -> Result<AppendOnlySlice> {
        let partition = label::partition_of(&root.label.label_val, self.node.bits());
        self.check_readable(partition, root.max_epoch)?;
        self.check_retained(start_epoch)?;
        let node = self.node.clone();
        blocking(move || node.append_only_slice(Some(root), start_epoch)).await
    }

    async fn lookup_plan(&self, akd_label: AkdLabel, epoch: u64) -> Result<LookupPlan> {
        self.check_retained(epoch)?;
        self.check_readable(label::user_partition(&akd_label, self.node.bits()), epoch)?;
        let node = self.node.clone();
        blocking(move || node.lookup_plan(&akd_label, epoch)).await
    }

    async fn absence_plan(&self, akd_label: AkdLabel, epoch: u64) -> Result<AbsencePlan> {
        self.check_retained(epoch)?;
        self.check_readable(label::user_partition(&akd_label, self.node.bits()), epoch)?;
        let node = self.node.clone();
        blocking(move || node.absence_plan(&akd_label, epoch)).await
    }

    async fn history_plan(
        &self,
        akd_label: AkdLabel,
        params: HistoryParams,
        epoch: u64,
    ) -> Result<HistoryPlan> {
        self.check_retained(epoch)?;
        self.check_readable(label::user_partition(&akd_label, self.node.bits()), epoch)?;
        let node = self.node.clone();
        blocking(move || node.history_plan(&akd_label, params, epoch)).await
    }

    async fn status(&self) -> Result<ShardStatus> {
        let held: Vec<u32> = self.state().markers.keys().copied().collect();
        let (node, bits, asked) = (self.node.clone(), self.node.bits(), held.clone());
        let sizes = blocking(move || Ok(node.store().partition_sizes(&asked, bits)?)).await?;
        let sizes: BTreeMap<u32, u64> = held.into_iter().zip(sizes).collect();
        let now = Instant::now();
        let grace = self.orphan_grace;
        let state = self.state();
        let mut partition_states: Vec<PartitionState> = state
            .markers
            .values()
            .map(|marker| {
                let orphaned_since = state.orphaned.get(&marker.partition);
                PartitionState {
                    partition: marker.partition,
                    held: true,
                    built_epoch: marker.epoch,
                    root: marker.root,
                    mismatch: state.mismatched.contains(&marker.partition),
                    approximate_bytes: sizes.get(&marker.partition).copied().unwrap_or(0),
                    orphaned: orphaned_since.is_some(),
                    orphan_drop_in_millis: orphaned_since.map_or(0, |since| {
                        grace.saturating_sub(now.duration_since(*since)).as_millis() as u64
                    }),
                    ..PartitionState::default()
                }
            })
            .collect();
        for (partition, (started, bytes)) in &state.copies {
            if state.markers.contains_key(partition) {
                continue;
            }
            partition_states.push(PartitionState {
                partition: *partition,
                copying: true,
                copied_bytes: *bytes,
                copy_millis: now.duration_since(*started).as_millis() as u64,
                ..PartitionState::default()
            });
        }
        partition_states.sort_by_key(|state| state.partition);
        Ok(ShardStatus {
            id: self.id.clone(),
            partitions: state.markers.keys().copied().collect(),
            prepared_epoch: state
                .markers
                .values()
                .map(|marker| marker.epoch)
                .min()
                .unwrap_or(0),
            built_epoch: state
                .markers
                .values()
                .map(|marker| marker.epoch)
                .max()
                .unwrap_or(0),
            seen_committed_epoch: state.seen_committed_epoch,
            label_cache_entries: self.node.label_cache().len() as u64,
            partition_states,
            fence_term: state.fence.term,
            shard_map_version: state.fence.map_version,
            prune_floor: state.prune_floor,
            safe_epoch: state.fence.safe_epoch,
            pruned_node_versions: state.pruned_total,
        })
    }
}

/// The spans of the traced updates among `len` prepared in `epoch` (see
/// [`ShardApi::prepare_epoch`]); entries with an index out of range or a malformed context are
/// skipped, and at most `len` spans are made whatever the request holds.
fn update_spans(shard: &str, epoch: u64, len: usize, traces: &[UpdateTrace]) -> Vec<tracing::Span> {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    traces
        .iter()
        .filter(|trace| (trace.index as usize) < len)
        .take(len)
        .filter_map(|trace| {
            let parent = ktd_rpc::telemetry::context_from_traceparent(&trace.traceparent)?;
            let span = tracing::info_span!(
                "prepare_update",
                otel.name = "ktd.shard.prepare_update",
                ktd.component = "shard",
                shard = %shard,
                epoch,
            );
            span.set_parent(parent).ok()?;
            Some(span)
        })
        .collect()
}
