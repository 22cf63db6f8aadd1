//! What a shard server does for the rest of the cluster, as one async trait with two
//! implementations: [`crate::local::LocalShard`] (the logic, in-process; `ktd dev` and every
//! shard server run it) and [`crate::client::GrpcShard`] (the same calls over gRPC).
//!
//! The epoch coordinator — the only writer — drives [`ShardApi::prepare_epoch`] on every
//! up-to-date replica of every user partition, compares the leaf digests, hands each replica of
//! each tree partition the agreed leaves with [`ShardApi::build_epoch`], compares the roots and
//! stitches the majority's. Lagging replicas replay with the same two calls plus
//! [`ShardApi::compute_leaves`]; new and repaired ones copy a partition with
//! [`ShardApi::bootstrap`]. Every mutation carries a [`Fence`]. Gateways read with the rest. See
//! `shard/docs/0002-replicated-shards.md`.

use akd_core::verify::history::HistoryParams;
use akd_core::{AkdLabel, AkdValue};
use futures::stream::BoxStream;

use crate::error::Result;
use crate::store::replica::RawRecord;
use ktd_core::proof::{AbsencePlan, HistoryPlan, LookupPlan};
use ktd_core::shard_map::ShardMap;
use ktd_core::tree::audit::AppendOnlySlice;
use ktd_core::tree::{LeavesByPartition, NodeRef, PartitionWalk, WalkRequest};

/// What every shard mutation carries: who is driving (the coordinator's Raft term), what is
/// already final (the latest committed epoch) and the map it routes with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The Raft term of the coordinator's leadership.
    pub term: u64,
    /// The latest committed epoch the coordinator knows.
    pub committed_epoch: u64,
    /// The shard map it routes with.
    pub map: ShardMap,
    /// The cluster's oldest readable epoch (history retention; 0: everything is retained).
    pub safe_epoch: u64,
}

/// The leaves one user partition's updates produced in an epoch, and their digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserPartitionLeaves {
    /// The user partition.
    pub user_partition: u32,
    /// BLAKE3 over the leaves in label order (`SortedLeaves::digest`).
    pub digest: [u8; 32],
    /// The leaves, grouped by tree partition (non-empty groups, in partition order, each sorted).
    pub leaves: LeavesByPartition,
}

/// What preparing an epoch did on one replica.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrepareSummary {
    /// Updates of the prepared users.
    pub updates: u64,
    /// Of those, updates that changed something.
    pub changed: u64,
    /// Leaves computed.
    pub leaves: u64,
    /// One entry per prepared user partition (also those without updates), in partition order.
    pub user_partitions: Vec<UserPartitionLeaves>,
}

/// What building an epoch did on one replica.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildSummary {
    /// Roots of the built partitions, as of the epoch, in partition order.
    pub roots: Vec<(u32, Option<NodeRef>)>,
    /// Node versions written.
    pub nodes_written: u64,
}

/// Where a bootstrap copies a partition from, and what the copy must hash to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootstrapSource {
    /// The partition.
    pub partition: u32,
    /// The committed epoch to copy (built by the source).
    pub epoch: u64,
    /// The source server's id and address.
    pub source_id: String,
    /// Its gRPC address.
    pub source_address: String,
    /// The partition's committed root at `epoch` (`None`: empty partition).
    pub expected_root: Option<NodeRef>,
    /// Receive rate limit, bytes per second (0 = unlimited).
    pub max_bytes_per_second: u64,
}

/// What a bootstrap copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootstrapSummary {
    /// The epoch the partition is now built to.
    pub epoch: u64,
    /// Records copied.
    pub records: u64,
    /// Bytes copied (keys and values).
    pub bytes: u64,
    /// Interior nodes re-hashed by the consistency check.
    pub nodes_checked: u64,
}

/// One chunk of a partition copy: node records, user records, and their checksum.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionChunk {
    /// Node versions as stored.
    pub nodes: Vec<RawRecord>,
    /// User versions as stored.
    pub users: Vec<RawRecord>,
    /// BLAKE3 of the records (see [`chunk_checksum`]).
    pub checksum: [u8; 32],
    /// Set on the last chunk: the number of records sent in all.
    pub total_records: Option<u64>,
}

/// The checksum of a chunk's records: BLAKE3 over `len(key) ‖ key ‖ len(value) ‖ value` for the
/// node records, then the user records, lengths as `be32`.
pub fn chunk_checksum(nodes: &[RawRecord], users: &[RawRecord]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    for (key, value) in nodes.iter().chain(users) {
        hasher.update(&(key.len() as u32).to_be_bytes());
        hasher.update(key);
        hasher.update(&(value.len() as u32).to_be_bytes());
        hasher.update(value);
    }
    *hasher.finalize().as_bytes()
}

/// A partition as one server holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionState {
    /// The partition.
    pub partition: u32,
    /// Whether the server holds a copy (new, wiped and bootstrapping servers do not).
    pub held: bool,
    /// The highest epoch built.
    pub built_epoch: u64,
    /// Its root then (`None`: empty partition).
    pub root: Option<NodeRef>,
    /// The restart check found the stored root disagreeing with the committed one.
    pub mismatch: bool,
    /// RocksDB's estimate of the partition's bytes on disk (0 while it is all in memtables).
    pub approximate_bytes: u64,
    /// A copy is being taken in (`held` is false until it ends).
    pub copying: bool,
    /// Bytes of that copy received so far.
    pub copied_bytes: u64,
    /// How long that copy has run, in milliseconds.
    pub copy_millis: u64,
    /// The newest map seen assigns the partition elsewhere: it is deleted after the grace period.
    pub orphaned: bool,
    /// Milliseconds left before an orphaned copy is deleted.
    pub orphan_drop_in_millis: u64,
}

/// A shard server's identity and progress.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardStatus {
    /// Shard id.
    pub id: String,
    /// Held partitions.
    pub partitions: Vec<u32>,
    /// Lowest built epoch over the held partitions.
    pub prepared_epoch: u64,
    /// Highest built epoch over the held partitions.
    pub built_epoch: u64,
    /// Highest committed epoch seen (fences, the sequencer's log).
    pub seen_committed_epoch: u64,
    /// Node labels precomputed for open epochs.
    pub label_cache_entries: u64,
    /// Every partition the server holds or has a marker for, in partition order.
    pub partition_states: Vec<PartitionState>,
    /// The highest coordinator term accepted.
    pub fence_term: u64,
    /// The newest shard map version seen.
    pub shard_map_version: u64,
    /// Reads below this epoch are refused: history below it may be deleted.
    pub prune_floor: u64,
    /// The newest safe epoch a fence carried.
    pub safe_epoch: u64,
    /// Node versions pruned since the server started.
    pub pruned_node_versions: u64,
}

/// The trace context (W3C `traceparent`) of update `index` of a prepared batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpdateTrace {
    /// Index into the batch.
    pub index: u32,
    /// The W3C `traceparent` the update's publish was traced under.
    pub traceparent: String,
}

/// The calls a shard server answers. Every call is idempotent; every mutation is fenced.
#[async_trait::async_trait]
pub trait ShardApi: Send + Sync {
    /// Step 1 of `epoch` for `user_partitions` (assigned to this server; `updates` holds every
    /// update of the sealed batch that belongs to them, one per label): computes their leaves
    /// from the users' versions as of `epoch - 1`, stores the new user versions durably, and
    /// returns the leaves with a digest per user partition.
    ///
    /// `traces` names the updates (by index) whose publish was traced: the shard records its
    /// part of the work in those traces. Telemetry only: bad entries are ignored.
    async fn prepare_epoch(
        &self,
        epoch: u64,
        fence: &Fence,
        user_partitions: Vec<u32>,
        updates: Vec<(AkdLabel, AkdValue)>,
        traces: Vec<UpdateTrace>,
    ) -> Result<PrepareSummary>;

    /// Recomputes, without writing, the leaves `updates` (the epoch's updates of
    /// `user_partition`) produced in `epoch` — from the users' versions as of `epoch - 1`.
    async fn compute_leaves(
        &self,
        epoch: u64,
        user_partition: u32,
        updates: Vec<(AkdLabel, AkdValue)>,
    ) -> Result<UserPartitionLeaves>;

    /// Step 2 of `epoch`: inserts `leaves` (the epoch's leaves of the partitions in
    /// `base_roots`, from the user partitions in `sources` — which must be all of them) on top
    /// of each partition's root as of `epoch - 1`, writes the node versions and the built
    /// markers (synced) and returns the new roots.
    async fn build_epoch(
        &self,
        epoch: u64,
        fence: &Fence,
        base_roots: Vec<(u32, Option<NodeRef>)>,
        leaves: LeavesByPartition,
        sources: Vec<u32>,
    ) -> Result<BuildSummary>;

    /// Copies a partition from `source` at a committed epoch, checks the copy hashes to the
    /// committed root, and marks the partition built at that epoch.
    async fn bootstrap(&self, fence: &Fence, source: BootstrapSource) -> Result<BootstrapSummary>;

    /// A consistent copy of `partition` as of `epoch` (built here), in checksummed chunks; with
    /// `from_epoch` > 0 only what epochs `from_epoch + 1 ..= epoch` wrote (an incremental backup
    /// segment).
    async fn stream_partition(
        &self,
        partition: u32,
        epoch: u64,
        from_epoch: u64,
    ) -> Result<BoxStream<'static, Result<PartitionChunk>>>;

    /// Proof walks from the given partition roots (partitions built here at least to each
    /// root's newest leaf epoch).
    async fn walk(&self, requests: Vec<WalkRequest>) -> Result<Vec<PartitionWalk>>;

    /// One partition's share of the append-only step `start_epoch → start_epoch + 1`.
    async fn append_only_slice(&self, root: NodeRef, start_epoch: u64) -> Result<AppendOnlySlice>;

    /// The user-side plan of a lookup proof as of `epoch`.
    async fn lookup_plan(&self, akd_label: AkdLabel, epoch: u64) -> Result<LookupPlan>;

    /// The user-side plan of an absence proof as of `epoch`.
    async fn absence_plan(&self, akd_label: AkdLabel, epoch: u64) -> Result<AbsencePlan>;

    /// The user-side plan of a history proof as of `epoch`.
    async fn history_plan(
        &self,
        akd_label: AkdLabel,
        params: HistoryParams,
        epoch: u64,
    ) -> Result<HistoryPlan>;

    /// Identity and progress.
    async fn status(&self) -> Result<ShardStatus>;
}
