//! [`LocalShard`]: the shard logic behind [`ShardApi`], running in this process.
//!
//! A shard server wraps one in a gRPC service; `ktd dev` calls one directly. Every call hands
//! its blocking work (RocksDB, VRF, hashing) to `spawn_blocking`, so the async runtime's threads
//! never wait on the disk or the CPU-heavy tree code.
//!
//! Prepare stores the new user versions (synced) and then delivers leaves to every shard in the
//! map, an empty delivery included, so that build can tell "no leaves" from "not delivered yet".

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use akd_core::configuration::Configuration;
use akd_core::verify::history::HistoryParams;
use akd_core::{AkdLabel, AkdValue};
use futures::future::try_join_all;

use crate::api::{BuildSummary, PrepareSummary, ShardApi, ShardStatus, UpdateTrace};
use crate::error::{Error, Result};
use crate::node::ShardNode;
use ktd_core::Error as CoreError;
use ktd_core::proof::{AbsencePlan, HistoryPlan, LookupPlan};
use ktd_core::tree::audit::AppendOnlySlice;
use ktd_core::tree::{
    LeavesByPartition, NewLeaf, NodeRef, PartitionWalk, SortedLeaves, WalkRequest,
};
use ktd_core::{ShardInfo, ShardMap};

/// Finds the [`ShardApi`] of another shard (a pooled gRPC client in a cluster).
pub trait PeerResolver: Send + Sync {
    /// The shard described by `info`.
    fn peer(&self, info: &ShardInfo) -> Result<Arc<dyn ShardApi>>;
}

/// A resolver for a single-shard cluster: there are no peers.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoPeers;

impl PeerResolver for NoPeers {
    fn peer(&self, info: &ShardInfo) -> Result<Arc<dyn ShardApi>> {
        Err(CoreError::InvalidConfig(format!(
            "no route to shard {} in a single-shard process",
            info.id
        ))
        .into())
    }
}

#[derive(Debug, Default)]
struct Progress {
    partitions: Vec<u32>,
    prepared_epoch: u64,
    built_epoch: u64,
    seen_committed_epoch: u64,
}

/// One shard's logic over its [`ShardNode`].
pub struct LocalShard<TC> {
    id: String,
    node: Arc<ShardNode<TC>>,
    peers: Arc<dyn PeerResolver>,
    progress: Mutex<Progress>,
}

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
    /// The shard `id` over `node`, reaching other shards through `peers`.
    pub fn new(
        id: impl Into<String>,
        node: Arc<ShardNode<TC>>,
        peers: Arc<dyn PeerResolver>,
    ) -> Self {
        Self {
            id: id.into(),
            node,
            peers,
            progress: Mutex::new(Progress::default()),
        }
    }

    /// This shard's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The node underneath.
    pub fn node(&self) -> &Arc<ShardNode<TC>> {
        &self.node
    }

    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records that the sequencer's log shows `epoch` committed.
    pub fn saw_committed(&self, epoch: u64) {
        let mut progress = self.progress();
        progress.seen_committed_epoch = progress.seen_committed_epoch.max(epoch);
    }
}

#[async_trait::async_trait]
impl<TC: Configuration> ShardApi for LocalShard<TC> {
    async fn prepare_epoch(
        &self,
        epoch: u64,
        map: &ShardMap,
        updates: Vec<(AkdLabel, AkdValue)>,
        traces: Vec<UpdateTrace>,
    ) -> Result<PrepareSummary> {
        // One span per traced update, in its publish's trace, open while the shard prepares it.
        let _update_spans = update_spans(&self.id, epoch, updates.len(), &traces);
        if epoch == 0 {
            return Err(CoreError::EpochOutOfOrder { epoch, previous: 0 }.into());
        }
        let me = map.shard(&self.id).ok_or_else(|| {
            CoreError::InvalidConfig(format!("shard {} is not in the shard map", self.id))
        })?;
        if let Some((akd_label, _)) = updates
            .iter()
            .find(|(akd_label, _)| map.user_owner(akd_label).id != self.id)
        {
            return Err(CoreError::InvalidConfig(format!(
                "user {} belongs to shard {}, not {}",
                crate::error::LabelTag::of(akd_label),
                map.user_owner(akd_label).id,
                self.id
            ))
            .into());
        }
        self.node.limits().check_batch(&updates)?;
        let n_updates = updates.len() as u64;
        let node = self.node.clone();
        let user_leaves = blocking(move || {
            let user_leaves = node.user_leaves(epoch, updates)?;
            node.store().write_user_versions(&user_leaves.versions)?;
            Ok(user_leaves)
        })
        .await?;

        let mut per_owner: HashMap<&str, LeavesByPartition> = map
            .shards
            .iter()
            .map(|shard| (shard.id.as_str(), Vec::new()))
            .collect();
        let mut n_leaves = 0u64;
        for (partition, leaves) in user_leaves.by_partition {
            n_leaves += leaves.len() as u64;
            let owner = map.partition_owner(partition).id.as_str();
            per_owner
                .entry(owner)
                .or_default()
                .push((partition, leaves.as_slice().to_vec()));
        }
        let deliveries = map.shards.iter().map(|shard| {
            let leaves = per_owner.remove(shard.id.as_str()).unwrap_or_default();
            async move {
                if shard.id == self.id {
                    self.deliver_leaves(epoch, &self.id, leaves).await
                } else {
                    self.peers
                        .peer(shard)?
                        .deliver_leaves(epoch, &self.id, leaves)
                        .await
                }
            }
        });
        try_join_all(deliveries).await?;

        let mut progress = self.progress();
        progress.partitions = me.partitions.clone();
        progress.prepared_epoch = progress.prepared_epoch.max(epoch);
        Ok(PrepareSummary {
            updates: n_updates,
            changed: user_leaves.changed as u64,
            leaves: n_leaves,
        })
    }

    async fn deliver_leaves(
        &self,
        epoch: u64,
        from: &str,
        leaves: LeavesByPartition,
    ) -> Result<()> {
        let node = self.node.clone();
        let from = from.to_string();
        blocking(move || Ok(node.store().put_inbox(epoch, &from, &leaves)?)).await
    }

    async fn build_epoch(
        &self,
        epoch: u64,
        base_roots: Vec<(u32, Option<NodeRef>)>,
        senders: Vec<String>,
    ) -> Result<BuildSummary> {
        if epoch == 0 {
            return Err(CoreError::EpochOutOfOrder { epoch, previous: 0 }.into());
        }
        let node = self.node.clone();
        let summary = blocking(move || {
            let mut by_partition: HashMap<u32, Vec<NewLeaf>> =
                base_roots.iter().map(|(partition, _)| (*partition, Vec::new())).collect();
            for sender in &senders {
                let delivered = node
                    .store()
                    .inbox(epoch, sender)?
                    .ok_or_else(|| Error::MissingDelivery { epoch, from: sender.clone() })?;
                for (partition, leaves) in delivered {
                    by_partition
                        .get_mut(&partition)
                        .ok_or_else(|| {
                            CoreError::InvalidConfig(format!("shard {sender} delivered leaves for partition {partition}, which is not built here"))
                        })?
                        .extend(leaves);
                }
            }
            let inputs = base_roots
                .iter()
                .filter_map(|(partition, root)| {
                    let leaves = by_partition.remove(partition).unwrap_or_default();
                    (!leaves.is_empty()).then(|| SortedLeaves::new(leaves).map(|leaves| (*partition, *root, leaves)))
                })
                .collect::<ktd_core::Result<Vec<_>>>()?;
            let built = node.build_partitions(epoch, inputs)?;
            let mut roots: HashMap<u32, Option<NodeRef>> = base_roots.into_iter().collect();
            roots.extend(built.roots);
            let mut roots: Vec<(u32, Option<NodeRef>)> = roots.into_iter().collect();
            roots.sort_unstable_by_key(|(partition, _)| *partition);
            // Deliveries of earlier epochs are no longer needed: those epochs are committed.
            node.store().discard_inbox_before(epoch)?;
            Ok(BuildSummary {
                roots,
                nodes_written: built.nodes_written as u64,
            })
        })
        .await?;
        let mut progress = self.progress();
        progress.built_epoch = progress.built_epoch.max(epoch);
        Ok(summary)
    }

    async fn walk(&self, requests: Vec<WalkRequest>) -> Result<Vec<PartitionWalk>> {
        let node = self.node.clone();
        blocking(move || Ok(node.walk(&requests)?)).await
    }

    async fn append_only_slice(&self, root: NodeRef, start_epoch: u64) -> Result<AppendOnlySlice> {
        let node = self.node.clone();
        blocking(move || node.append_only_slice(Some(root), start_epoch)).await
    }

    async fn lookup_plan(&self, akd_label: AkdLabel, epoch: u64) -> Result<LookupPlan> {
        let node = self.node.clone();
        blocking(move || node.lookup_plan(&akd_label, epoch)).await
    }

    async fn absence_plan(&self, akd_label: AkdLabel, epoch: u64) -> Result<AbsencePlan> {
        let node = self.node.clone();
        blocking(move || node.absence_plan(&akd_label, epoch)).await
    }

    async fn history_plan(
        &self,
        akd_label: AkdLabel,
        params: HistoryParams,
        epoch: u64,
    ) -> Result<HistoryPlan> {
        let node = self.node.clone();
        blocking(move || node.history_plan(&akd_label, params, epoch)).await
    }

    async fn status(&self) -> Result<ShardStatus> {
        let progress = self.progress();
        Ok(ShardStatus {
            id: self.id.clone(),
            partitions: progress.partitions.clone(),
            prepared_epoch: progress.prepared_epoch,
            built_epoch: progress.built_epoch,
            seen_committed_epoch: progress.seen_committed_epoch,
            label_cache_entries: self.node.label_cache().len() as u64,
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
