//! What a shard does for the rest of the cluster, as one async trait with two implementations:
//! [`crate::local::LocalShard`] (the logic, in-process; `ktd dev` and every shard server run it)
//! and [`crate::client::GrpcShard`] (the same calls over gRPC to a remote shard server).
//!
//! The epoch coordinator drives [`ShardApi::prepare_epoch`] on every shard, then
//! [`ShardApi::build_epoch`] on every shard, then stitches the partition roots; shards deliver
//! leaves to each other with [`ShardApi::deliver_leaves`]; gateways read with the rest.

use akd_core::verify::history::HistoryParams;
use akd_core::{AkdLabel, AkdValue};

use crate::error::Result;
use ktd_core::proof::{AbsencePlan, HistoryPlan, LookupPlan};
use ktd_core::shard_map::ShardMap;
use ktd_core::tree::audit::AppendOnlySlice;
use ktd_core::tree::{LeavesByPartition, NodeRef, PartitionWalk, WalkRequest};

/// What preparing an epoch did on one shard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrepareSummary {
    /// Updates of this shard's users.
    pub updates: u64,
    /// Of those, updates that changed something.
    pub changed: u64,
    /// Leaves computed and delivered.
    pub leaves: u64,
}

/// What building an epoch did on one shard.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildSummary {
    /// Roots of every partition the shard owns, as of the epoch.
    pub roots: Vec<(u32, Option<NodeRef>)>,
    /// Node versions written.
    pub nodes_written: u64,
}

/// A shard's identity and progress.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardStatus {
    /// Shard id.
    pub id: String,
    /// Owned partitions (as of the last prepare; empty before the first).
    pub partitions: Vec<u32>,
    /// Highest epoch prepared.
    pub prepared_epoch: u64,
    /// Highest epoch built.
    pub built_epoch: u64,
    /// Highest committed epoch seen in the sequencer's log.
    pub seen_committed_epoch: u64,
    /// Node labels precomputed for open epochs.
    pub label_cache_entries: u64,
}

/// The trace context (W3C `traceparent`) of update `index` of a prepared batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpdateTrace {
    /// Index into the batch.
    pub index: u32,
    /// The W3C `traceparent` the update's publish was traced under.
    pub traceparent: String,
}

/// The calls a shard answers. Every call is idempotent.
#[async_trait::async_trait]
pub trait ShardApi: Send + Sync {
    /// Step 1 of `epoch`: computes the leaves of `updates` (this shard's users, one update per
    /// label), stores the new user versions durably, and delivers the leaves to the owners of
    /// their partitions according to `map`.
    ///
    /// `traces` names the updates (by index) whose publish was traced: the shard records its
    /// part of the work in those traces. Telemetry only: bad entries are ignored.
    async fn prepare_epoch(
        &self,
        epoch: u64,
        map: &ShardMap,
        updates: Vec<(AkdLabel, AkdValue)>,
        traces: Vec<UpdateTrace>,
    ) -> Result<PrepareSummary>;

    /// Stores the leaves `from` computed for this shard's partitions in `epoch`, durably.
    async fn deliver_leaves(&self, epoch: u64, from: &str, leaves: LeavesByPartition)
    -> Result<()>;

    /// Step 2 of `epoch`: inserts the delivered leaves of each partition of `base_roots` (this
    /// shard's partitions, with their roots as of `epoch - 1`) and returns the new roots. Fails
    /// unless every shard in `senders` delivered its leaves.
    async fn build_epoch(
        &self,
        epoch: u64,
        base_roots: Vec<(u32, Option<NodeRef>)>,
        senders: Vec<String>,
    ) -> Result<BuildSummary>;

    /// Proof walks from the given partition roots.
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
