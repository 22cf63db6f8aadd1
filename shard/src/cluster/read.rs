//! Reads across replica sets: a partition is read from one of its healthy voters, in the map's
//! read order (rotated per partition so load spreads); a failure that another replica may not
//! share (unreachable, not built that far, damaged) moves the read to the next replica, and a
//! replica slower than the recent p99 gets a second, hedged request to the next one — whichever
//! answers first wins. Answers that are about the request itself (no such label, a bad label)
//! are returned as they are: every replica would say the same.
//!
//! Gateways call [`lookup`], [`absence`], [`key_history`] and [`audit_step`]: the user's
//! partition plans the proof (versions, VRF proofs), the top tree locates each claim, the tree
//! partitions walk, and [`ktd_core::stitch`] joins the pieces. The caller bounds the whole read
//! with its deadline.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use akd_core::configuration::Configuration;
use akd_core::verify::history::HistoryParams;
use akd_core::{AkdLabel, HistoryProof, LookupProof, SingleAppendOnlyProof};
use futures::StreamExt;
use futures::future::try_join_all;
use futures::stream::FuturesUnordered;
use ktd_core::proof::{AbsenceProof, Claim, LocatedClaims, TreeProof};
use ktd_core::stitch::{self, TopTree};
use ktd_core::tree::{PartitionWalk, WalkRequest};
use ktd_core::{Error as CoreError, label};

use super::ShardSet;
use crate::api::ShardApi;
use crate::error::{Error, Result};

/// Read latencies kept for the hedge delay.
const SAMPLES: usize = 512;
/// Hedge delay bounds, and the delay before enough reads were seen.
const MIN_HEDGE: Duration = Duration::from_millis(5);
const MAX_HEDGE: Duration = Duration::from_secs(1);
const DEFAULT_HEDGE: Duration = Duration::from_millis(50);

/// Recent read latencies, from which the hedge delay (their p99) is taken.
#[derive(Debug, Default)]
pub struct Hedging {
    samples: Mutex<VecDeque<Duration>>,
}

impl Hedging {
    /// How long a read waits before asking a second replica: the p99 of recent reads, between
    /// 5 ms and 1 s (50 ms before 32 reads were seen).
    pub fn delay(&self) -> Duration {
        let samples = self
            .samples
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if samples.len() < 32 {
            return DEFAULT_HEDGE;
        }
        let mut sorted: Vec<Duration> = samples.iter().copied().collect();
        sorted.sort_unstable();
        let p99 = sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)];
        p99.clamp(MIN_HEDGE, MAX_HEDGE)
    }

    fn record(&self, latency: Duration) {
        let mut samples = self
            .samples
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if samples.len() == SAMPLES {
            samples.pop_front();
        }
        samples.push_back(latency);
    }
}

/// Whether another replica may answer where this one failed: the server is unreachable, does
/// not hold the partition (any more, or yet), is not built that far or is damaged. A gateway
/// whose every replica failed this way may be routing by an old shard map, and asks again with
/// a newer one.
pub fn replica_failure(error: &Error) -> bool {
    match error {
        Error::NotServing { .. } => true,
        Error::Remote { code, .. } => matches!(
            code,
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::DataLoss
                | tonic::Code::Internal
                | tonic::Code::Unknown
                | tonic::Code::ResourceExhausted
                | tonic::Code::Aborted
                | tonic::Code::Cancelled
        ),
        Error::Core(CoreError::Corrupt(_) | CoreError::Storage { .. }) => true,
        Error::BadMessage { .. } => true,
        _ => false,
    }
}

/// Runs `call` on the healthy voters of `partition`, failing over and hedging (see the module
/// docs).
async fn on_replicas<T, F, Fut>(shards: &ShardSet, partition: u32, call: F) -> Result<T>
where
    F: Fn(Arc<dyn ShardApi>) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let replicas = shards.map().read_order(partition);
    if replicas.is_empty() {
        return Err(Error::NotServing {
            partition,
            epoch: 0,
            reason: "the shard map gives it no healthy voter".into(),
        });
    }
    let hedge = shards.hedging().delay();
    let mut next = 0;
    let mut running = FuturesUnordered::new();
    let mut last_error = None;
    let started = Instant::now();
    let start_next = |running: &mut FuturesUnordered<_>, next: &mut usize| -> Result<bool> {
        let Some(server) = replicas.get(*next) else {
            return Ok(false);
        };
        *next += 1;
        let api = shards.api(&server.id)?.clone();
        running.push(call(api));
        Ok(true)
    };
    start_next(&mut running, &mut next)?;
    loop {
        let hedge_timer = tokio::time::sleep(hedge);
        tokio::pin!(hedge_timer);
        tokio::select! {
            answer = running.next() => match answer {
                Some(Ok(value)) => {
                    shards.hedging().record(started.elapsed());
                    return Ok(value);
                }
                Some(Err(error)) if replica_failure(&error) => {
                    last_error = Some(error);
                    if !start_next(&mut running, &mut next)? && running.is_empty() {
                        break;
                    }
                }
                Some(Err(error)) => return Err(error),
                None => break,
            },
            () = &mut hedge_timer, if next < replicas.len() => {
                start_next(&mut running, &mut next)?;
            }
        }
    }
    Err(last_error.unwrap_or_else(|| Error::NotServing {
        partition,
        epoch: 0,
        reason: "no replica answered".into(),
    }))
}

/// Walks `requests` on replicas of their partitions, one call per partition, in parallel,
/// answering in order.
async fn walk_on_replicas(
    shards: &ShardSet,
    requests: &[WalkRequest],
) -> Result<Vec<PartitionWalk>> {
    let bits = shards.map().bits();
    let mut by_partition: BTreeMap<u32, (Vec<usize>, Vec<WalkRequest>)> = BTreeMap::new();
    for (index, request) in requests.iter().enumerate() {
        let partition = label::partition_of(&request.target.label_val, bits);
        let entry = by_partition.entry(partition).or_default();
        entry.0.push(index);
        entry.1.push(*request);
    }
    let calls = by_partition
        .into_iter()
        .map(|(partition, (indexes, requests))| async move {
            let walks = on_replicas(shards, partition, |api| {
                let requests = requests.clone();
                async move { api.walk(requests).await }
            })
            .await?;
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

async fn prove_on_replicas<TC: Configuration>(
    shards: &ShardSet,
    top: &TopTree<TC>,
    claims: &[Claim],
) -> Result<Vec<TreeProof>> {
    let located = LocatedClaims::new(top, claims);
    let walks = walk_on_replicas(shards, located.walk_requests()).await?;
    Ok(located.finish(walks)?)
}

/// akd's lookup proof of `akd_label` as of `epoch`, whose top tree is `top`.
pub async fn lookup<TC: Configuration>(
    shards: &ShardSet,
    top: &TopTree<TC>,
    epoch: u64,
    akd_label: &AkdLabel,
) -> Result<LookupProof> {
    let partition = shards.map().user_partition(akd_label);
    let plan = on_replicas(shards, partition, |api| {
        let akd_label = akd_label.clone();
        async move { api.lookup_plan(akd_label, epoch).await }
    })
    .await?;
    let proofs = prove_on_replicas(shards, top, &plan.claims()).await?;
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
    let partition = shards.map().user_partition(akd_label);
    let plan = on_replicas(shards, partition, |api| {
        let akd_label = akd_label.clone();
        async move { api.absence_plan(akd_label, epoch).await }
    })
    .await?;
    let proofs = prove_on_replicas(shards, top, &plan.claims()).await?;
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
    let partition = shards.map().user_partition(akd_label);
    let plan = on_replicas(shards, partition, |api| {
        let akd_label = akd_label.clone();
        async move { api.history_plan(akd_label, params, epoch).await }
    })
    .await?;
    let proofs = prove_on_replicas(shards, top, &plan.claims()).await?;
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
            on_replicas(shards, *partition, |api| {
                let root = *root;
                async move { api.append_only_slice(root, start_epoch).await }
            })
            .await
        });
    let slices = try_join_all(slices).await?;
    Ok(stitch::append_only_proof(top_audit, slices))
}
