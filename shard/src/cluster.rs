//! Driving a directory whose partitions live on several shards, over [`ShardApi`].
//!
//! The epoch coordinator calls [`run_epoch`]: the sealed batch is split by user owner, every
//! shard prepares its users' leaves and delivers them to the partition owners, every shard builds
//! its partitions, and the partition roots are stitched into the epoch's [`TopTree`]. Gateways
//! call [`lookup`], [`key_history`] and [`audit_step`]: the user's shard plans the proof (versions,
//! VRF proofs), the top tree locates each claim, the partition owners walk, and [`ktd_core::stitch`]
//! joins the pieces. `ktd dev` runs the same code against one in-process shard.
//!
//! Each phase runs in a span (`ktd.epoch.prepare`, `ktd.epoch.build`); updates whose publish
//! was traced carry their trace context to the shard that prepares them (`traces`).
//!
//! ```text
//!   sealed batch ──split by user owner──► prepare_epoch (every shard, parallel)
//!                                           └─ deliver_leaves ──► partition owners (inbox)
//!   base roots (epoch-1) ─────────────────► build_epoch (every shard, parallel)
//!   partition roots ──► TopTree::new ──► root hash ──► (coordinator commits through Raft)
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use akd_core::configuration::Configuration;
use akd_core::verify::history::HistoryParams;
use akd_core::{AkdLabel, AkdValue, HistoryProof, LookupProof, SingleAppendOnlyProof};
use futures::future::try_join_all;
use tracing::Instrument;

use crate::api::{ShardApi, UpdateTrace};
use crate::client::{ClientTimeouts, GrpcPeers};
use crate::error::{Error, Result};
use crate::local::PeerResolver;
use ktd_core::Error as CoreError;
use ktd_core::ShardMap;
use ktd_core::label;
use ktd_core::proof::{AbsenceProof, Claim, LocatedClaims, TreeProof};
use ktd_core::stitch::{self, TopTree};
use ktd_core::tree::{NodeRef, PartitionWalk, WalkRequest};

/// The shards of a directory and a client for each.
#[derive(Clone)]
pub struct ShardSet {
    map: ShardMap,
    apis: HashMap<String, Arc<dyn ShardApi>>,
}

impl std::fmt::Debug for ShardSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardSet")
            .field("map", &self.map)
            .finish_non_exhaustive()
    }
}

impl ShardSet {
    /// Shards of `map`, reached through `apis` (one per shard id).
    pub fn new(map: ShardMap, apis: HashMap<String, Arc<dyn ShardApi>>) -> Result<Self> {
        if let Some(shard) = map
            .shards
            .iter()
            .find(|shard| !apis.contains_key(&shard.id))
        {
            return Err(
                CoreError::InvalidConfig(format!("no client for shard {}", shard.id)).into(),
            );
        }
        Ok(Self { map, apis })
    }

    /// Shards of `map`, reached through `resolver`.
    pub fn resolve(map: ShardMap, resolver: &dyn PeerResolver) -> Result<Self> {
        let apis = map
            .shards
            .iter()
            .map(|shard| Ok((shard.id.clone(), resolver.peer(shard)?)))
            .collect::<Result<_>>()?;
        Self::new(map, apis)
    }

    /// The shard map.
    pub fn map(&self) -> &ShardMap {
        &self.map
    }

    /// The client of shard `id`.
    pub fn api(&self, id: &str) -> Result<&Arc<dyn ShardApi>> {
        self.apis
            .get(id)
            .ok_or_else(|| Error::invalid_config(format!("no client for shard {id}")))
    }

    fn partition_api(&self, partition: u32) -> Result<&Arc<dyn ShardApi>> {
        self.api(&self.map.partition_owner(partition).id)
    }
}

/// How a process reaches the shards of a shard map: the coordinator to drive epochs, gateways
/// to read.
pub trait ShardConnector: Send + Sync {
    /// A [`ShardSet`] for `map` (gRPC clients in a cluster, the in-process shard in `ktd dev`).
    fn connect(&self, map: ShardMap) -> Result<ShardSet>;
}

/// Reaches shards over gRPC (the production connector): one pooled client per shard address.
#[derive(Debug, Default)]
pub struct GrpcConnector {
    peers: GrpcPeers,
}

impl GrpcConnector {
    /// A connector whose clients use `timeouts`.
    pub fn new(timeouts: ClientTimeouts) -> Self {
        Self {
            peers: GrpcPeers::new(timeouts),
        }
    }
}

impl ShardConnector for GrpcConnector {
    fn connect(&self, map: ShardMap) -> Result<ShardSet> {
        ShardSet::resolve(map, &self.peers)
    }
}

/// Always the same shard set (the in-process shard of `ktd dev`, tests).
#[derive(Debug)]
pub struct FixedShards(pub ShardSet);

impl ShardConnector for FixedShards {
    fn connect(&self, map: ShardMap) -> Result<ShardSet> {
        if map.shards != self.0.map().shards {
            return Err(Error::invalid_config(format!(
                "the cluster's shard map (version {}) is not the one this process serves",
                map.version
            )));
        }
        Ok(self.0.clone())
    }
}

/// What one epoch did across the shards.
#[derive(Clone, Debug)]
pub struct EpochOutcome<TC> {
    /// The top tree (and so the root hash and partition roots) of the epoch.
    pub top: TopTree<TC>,
    /// Updates that changed something (0: every update was an identical republish, and the
    /// root is unchanged — a heartbeat epoch).
    pub changed: u64,
    /// Leaves inserted.
    pub leaves: u64,
    /// Node versions written.
    pub nodes_written: u64,
}

/// One shard's part of a sealed batch: its users' updates and the traces among them.
type ShardBatch = (Vec<(AkdLabel, AkdValue)>, Vec<UpdateTrace>);

/// Runs `epoch` (the sealed batch `updates`, one update per label) on every shard, on top of
/// the directory as of `epoch - 1` (`base`). Idempotent: running it again gives the same result.
/// `traces` maps the labels of traced updates to their trace context (see
/// [`ShardApi::prepare_epoch`]).
pub async fn run_epoch<TC: Configuration>(
    shards: &ShardSet,
    epoch: u64,
    base: &TopTree<TC>,
    updates: Vec<(AkdLabel, AkdValue)>,
    traces: &HashMap<Vec<u8>, String>,
) -> Result<EpochOutcome<TC>> {
    let map = shards.map();
    let mut per_shard: HashMap<&str, ShardBatch> = map
        .shards
        .iter()
        .map(|shard| (shard.id.as_str(), Default::default()))
        .collect();
    for update in updates {
        let owner = map.user_owner(&update.0).id.as_str();
        let (batch, batch_traces) = per_shard.entry(owner).or_default();
        if let Some(traceparent) = traces.get(&update.0.0) {
            batch_traces.push(UpdateTrace {
                index: batch.len() as u32,
                traceparent: traceparent.clone(),
            });
        }
        batch.push(update);
    }
    let prepares = map.shards.iter().map(|shard| {
        let (updates, traces) = per_shard.remove(shard.id.as_str()).unwrap_or_default();
        async move {
            shards
                .api(&shard.id)?
                .prepare_epoch(epoch, map, updates, traces)
                .await
        }
    });
    let prepared = try_join_all(prepares)
        .instrument(tracing::info_span!(
            "prepare",
            otel.name = "ktd.epoch.prepare",
            epoch
        ))
        .await?;

    let senders: Vec<String> = map.shards.iter().map(|shard| shard.id.clone()).collect();
    let builds = map.shards.iter().map(|shard| {
        let base_roots: Vec<(u32, Option<NodeRef>)> = shard
            .partitions
            .iter()
            .map(|partition| (*partition, base.partitions()[*partition as usize]))
            .collect();
        let senders = senders.clone();
        async move {
            shards
                .api(&shard.id)?
                .build_epoch(epoch, base_roots, senders)
                .await
        }
    });
    let built = try_join_all(builds)
        .instrument(tracing::info_span!(
            "build",
            otel.name = "ktd.epoch.build",
            epoch
        ))
        .await?;

    let mut partitions = base.partitions().to_vec();
    let mut nodes_written = 0;
    for (shard, summary) in map.shards.iter().zip(&built) {
        nodes_written += summary.nodes_written;
        for (partition, root) in &summary.roots {
            if !shard.partitions.contains(partition) {
                return Err(Error::BadMessage {
                    peer: shard.id.clone(),
                    message: format!(
                        "returned a root for partition {partition}, which it does not own"
                    ),
                });
            }
            partitions[*partition as usize] = *root;
        }
    }
    Ok(EpochOutcome {
        top: TopTree::new(map.bits, partitions)?,
        changed: prepared.iter().map(|summary| summary.changed).sum(),
        leaves: prepared.iter().map(|summary| summary.leaves).sum(),
        nodes_written,
    })
}

/// Walks `requests` on the shards owning their partitions, in parallel, answering in order.
async fn walk_on_shards(shards: &ShardSet, requests: &[WalkRequest]) -> Result<Vec<PartitionWalk>> {
    let mut by_shard: HashMap<&str, (Vec<usize>, Vec<WalkRequest>)> = HashMap::new();
    for (index, request) in requests.iter().enumerate() {
        let partition = label::partition_of(&request.target.label_val, shards.map.bits);
        let owner = shards.map.partition_owner(partition).id.as_str();
        let entry = by_shard.entry(owner).or_default();
        entry.0.push(index);
        entry.1.push(*request);
    }
    let calls = by_shard
        .into_iter()
        .map(|(owner, (indexes, requests))| async move {
            let walks = shards.api(owner)?.walk(requests).await?;
            Ok::<_, Error>((indexes, walks))
        });
    let mut walks: Vec<Option<PartitionWalk>> = vec![None; requests.len()];
    for (indexes, answers) in try_join_all(calls).await? {
        if answers.len() != indexes.len() {
            return Err(
                CoreError::Proof("a shard answered the wrong number of walks".into()).into(),
            );
        }
        for (index, walk) in indexes.into_iter().zip(answers) {
            walks[index] = Some(walk);
        }
    }
    walks
        .into_iter()
        .map(|walk| walk.ok_or_else(|| CoreError::Proof("a walk went unanswered".into()).into()))
        .collect()
}

async fn prove_on_shards<TC: Configuration>(
    shards: &ShardSet,
    top: &TopTree<TC>,
    claims: &[Claim],
) -> Result<Vec<TreeProof>> {
    let located = LocatedClaims::new(top, claims);
    let walks = walk_on_shards(shards, located.walk_requests()).await?;
    Ok(located.finish(walks)?)
}

/// akd's lookup proof of `akd_label` as of `epoch`, whose top tree is `top`.
pub async fn lookup<TC: Configuration>(
    shards: &ShardSet,
    top: &TopTree<TC>,
    epoch: u64,
    akd_label: &AkdLabel,
) -> Result<LookupProof> {
    let owner = shards.map.user_owner(akd_label).id.clone();
    let plan = shards
        .api(&owner)?
        .lookup_plan(akd_label.clone(), epoch)
        .await?;
    let proofs = prove_on_shards(shards, top, &plan.claims()).await?;
    Ok(plan.assemble(proofs)?)
}

/// Proof that `akd_label` has no version as of `epoch`, whose top tree is `top`.
pub async fn absence<TC: Configuration>(
    shards: &ShardSet,
    top: &TopTree<TC>,
    epoch: u64,
    akd_label: &AkdLabel,
) -> Result<AbsenceProof> {
    if top.partitions().iter().all(Option::is_none) {
        return Err(CoreError::EmptyDirectory { epoch }.into());
    }
    let owner = shards.map.user_owner(akd_label).id.clone();
    let plan = shards
        .api(&owner)?
        .absence_plan(akd_label.clone(), epoch)
        .await?;
    let proofs = prove_on_shards(shards, top, &plan.claims()).await?;
    Ok(plan.assemble(proofs)?)
}

/// akd's history proof of `akd_label` as of `epoch`, whose top tree is `top`.
pub async fn key_history<TC: Configuration>(
    shards: &ShardSet,
    top: &TopTree<TC>,
    epoch: u64,
    akd_label: &AkdLabel,
    params: HistoryParams,
) -> Result<HistoryProof> {
    let owner = shards.map.user_owner(akd_label).id.clone();
    let plan = shards
        .api(&owner)?
        .history_plan(akd_label.clone(), params, epoch)
        .await?;
    let proofs = prove_on_shards(shards, top, &plan.claims()).await?;
    Ok(plan.assemble(proofs)?)
}

/// The append-only step `start_epoch → start_epoch + 1`, where `end` is the top tree of
/// `start_epoch + 1`.
pub async fn audit_step<TC: Configuration>(
    shards: &ShardSet,
    end: &TopTree<TC>,
    start_epoch: u64,
) -> Result<SingleAppendOnlyProof> {
    let top_audit = end.append_only_top(start_epoch);
    let slices = top_audit
        .partitions
        .iter()
        .map(|(partition, root)| async move {
            shards
                .partition_api(*partition)?
                .append_only_slice(*root, start_epoch)
                .await
        });
    let slices = try_join_all(slices).await?;
    Ok(stitch::append_only_proof(top_audit, slices))
}
