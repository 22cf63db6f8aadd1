//! One epoch across replica sets: [`run_epoch`] for the coordinator's next epoch, and
//! [`replay_epoch`] to bring one lagging server forward by a committed epoch.
//!
//! **Majority, not all.** Each phase sends every participating replica its request at once and
//! collects answers as they come; once every partition has `majority` healthy voters agreeing
//! (on a leaf digest in the prepare phase, on a root in the build phase), it waits a grace
//! period as long as it took to get there (between 100 ms and 5 s) for the others and then goes
//! on without them. A replica that answered differently from its partition's majority
//! *dissented*; one that failed or was too late is behind and will be replayed. A partition
//! without a matching majority fails the epoch: a minority's answer is never used.
//!
//! **Leaves travel through the coordinator**: a server builds its tree partitions from the
//! majority's leaves of every user partition, never from its own alone, and only partitions
//! whose user side it prepared with the majority's digest in this epoch (a partition's built
//! marker covers both sides).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::{Duration, Instant};

use akd_core::configuration::Configuration;
use akd_core::{AkdLabel, AkdValue};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use ktd_core::ShardMap;
use ktd_core::shard_map::Role;
use ktd_core::stitch::TopTree;
use ktd_core::tree::{NewLeaf, NodeRef};
use tracing::Instrument;

use super::ShardSet;
use crate::api::{Fence, PrepareSummary, UpdateTrace, UserPartitionLeaves};
use crate::error::{Error, Result};

/// The shortest and longest wait for replicas that have not answered once every partition has
/// its majority.
const MIN_GRACE: Duration = Duration::from_millis(100);
const MAX_GRACE: Duration = Duration::from_secs(5);

/// Who takes part in an epoch: per partition (index = partition), the servers whose copy is
/// built to `epoch - 1` (or to the epoch itself while it is not committed). Voters, quarantined
/// voters excluded, and learners that are caught up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Participation {
    /// Servers per partition.
    pub by_partition: Vec<Vec<String>>,
}

impl Participation {
    /// Every healthy voter and learner of every partition: what a coordinator that knows no
    /// better asks (replicas that are behind refuse, and count as behind).
    pub fn everyone(map: &ShardMap) -> Self {
        Self {
            by_partition: map
                .partitions()
                .iter()
                .map(|replicas| {
                    replicas
                        .healthy_voters()
                        .chain(
                            replicas
                                .learners
                                .iter()
                                .map(|learner| learner.server.as_str()),
                        )
                        .map(str::to_string)
                        .collect()
                })
                .collect(),
        }
    }

    /// The partitions `server` takes part in, in order.
    fn partitions_of(&self, server: &str) -> Vec<u32> {
        self.by_partition
            .iter()
            .enumerate()
            .filter(|(_, servers)| servers.iter().any(|s| s == server))
            .map(|(partition, _)| partition as u32)
            .collect()
    }

    fn servers(&self) -> Vec<String> {
        let mut servers: Vec<String> = self.by_partition.iter().flatten().cloned().collect();
        servers.sort_unstable();
        servers.dedup();
        servers
    }
}

/// The verdict on a replica whose `call` failed: a damaged copy (`DATA_LOSS`) dissents — it
/// is quarantined and rebuilt, since retrying would fail the same way; anything else leaves it
/// behind (replayed later).
fn failed_verdict(call: &str, error: &crate::Error) -> ReplicaVerdict {
    if error.is_data_loss() {
        ReplicaVerdict::Dissented {
            what: format!("its copy is damaged ({call}: {error})"),
        }
    } else {
        ReplicaVerdict::Behind {
            reason: format!("{call}: {error}"),
        }
    }
}

/// What became of one replica of one partition in an epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicaVerdict {
    /// It computed what its partition's majority computed, and built the epoch.
    Agreed,
    /// It computed something else (a different leaf digest or root).
    Dissented {
        /// What differed.
        what: String,
    },
    /// It failed, or was too late: it is behind and must be replayed.
    Behind {
        /// Why.
        reason: String,
    },
}

/// What one epoch did across the replica sets.
#[derive(Clone)]
pub struct EpochOutcome<TC> {
    /// The top tree (and so the root hash and partition roots) of the epoch.
    pub top: TopTree<TC>,
    /// Per user partition, the digest of the majority's leaves.
    pub leaf_digests: Vec<[u8; 32]>,
    /// Updates that changed something (0: every update was an identical republish, and the
    /// root is unchanged — a heartbeat epoch).
    pub changed: u64,
    /// Leaves inserted.
    pub leaves: u64,
    /// Node versions written, summed over the replicas.
    pub nodes_written: u64,
    /// `(server, partition, verdict)` for every participant.
    pub verdicts: Vec<(String, u32, ReplicaVerdict)>,
}

impl<TC: akd_core::configuration::Configuration> std::fmt::Debug for EpochOutcome<TC> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochOutcome")
            .field("root", &self.top.root_hash())
            .field("changed", &self.changed)
            .field("leaves", &self.leaves)
            .field("nodes_written", &self.nodes_written)
            .field("verdicts", &self.verdicts)
            .finish_non_exhaustive()
    }
}

/// Why an epoch could not be computed: partitions without a matching majority.
#[derive(Clone, Debug)]
pub struct EpochFailure {
    /// One line per partition without a majority, and why.
    pub reason: String,
    /// `(server, partition, verdict)` for the participants that answered or failed.
    pub verdicts: Vec<(String, u32, ReplicaVerdict)>,
    /// Whether the epoch itself was refused: every participant answered in time and every one
    /// that failed refused the request ([`Error::is_refusal`]), or the majority's answers
    /// contradict each other. Retrying the same epoch gets the same answer; a run of such
    /// failures is what the coordinator reports as a poisoned epoch.
    pub refused: bool,
}

/// Whether `answers` (none late) failed only by refusals.
fn refused_by_all<T>(answers: &BTreeMap<String, Result<T>>, late: &[String]) -> bool {
    late.is_empty()
        && answers.values().any(|answer| answer.is_err())
        && answers
            .values()
            .all(|answer| answer.as_ref().err().is_none_or(Error::is_refusal))
}

impl std::fmt::Display for EpochFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// Runs the futures as they complete; once `quorum` (over the answers so far) holds, waits at
/// most a grace period as long as it took to get there, then returns what has answered and
/// names the servers that had not.
async fn collect_with_grace<T, F>(
    calls: Vec<(String, F)>,
    mut quorum: impl FnMut(&BTreeMap<String, Result<T>>) -> bool,
) -> (BTreeMap<String, Result<T>>, Vec<String>)
where
    F: Future<Output = Result<T>>,
{
    let started = Instant::now();
    let mut pending: Vec<String> = calls.iter().map(|(server, _)| server.clone()).collect();
    let mut running: FuturesUnordered<_> = calls
        .into_iter()
        .map(|(server, call)| async move { (server, call.await) })
        .collect();
    let mut answers = BTreeMap::new();
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let next = match deadline {
            None => running.next().await,
            Some(deadline) => match tokio::time::timeout_at(deadline, running.next()).await {
                Ok(next) => next,
                Err(_) => break,
            },
        };
        let Some((server, answer)) = next else {
            break;
        };
        pending.retain(|waiting| *waiting != server);
        answers.insert(server, answer);
        if deadline.is_none() && quorum(&answers) {
            let grace = started.elapsed().clamp(MIN_GRACE, MAX_GRACE);
            deadline = Some(tokio::time::Instant::now() + grace);
        }
    }
    (answers, pending)
}

/// The value a majority of `partition`'s healthy voters answered, among `(server, value)`.
fn majority_value<'a, V: Eq + std::hash::Hash>(
    map: &ShardMap,
    partition: u32,
    answers: impl Iterator<Item = (&'a str, V)>,
) -> Option<V> {
    let replicas = map.replicas(partition);
    let mut counts: HashMap<V, usize> = HashMap::new();
    for (server, value) in answers {
        if replicas.role_of(server) == Some(Role::Voter) {
            *counts.entry(value).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .find(|(_, count)| *count >= replicas.majority())
        .map(|(value, _)| value)
}

/// Updates grouped by user partition, with the trace context of traced ones.
type PartitionBatch = Vec<(AkdLabel, AkdValue, Option<String>)>;

fn split_by_user_partition(
    map: &ShardMap,
    updates: Vec<(AkdLabel, AkdValue)>,
    traces: &HashMap<Vec<u8>, String>,
) -> Vec<PartitionBatch> {
    let mut per_partition: Vec<PartitionBatch> = vec![Vec::new(); map.partition_count() as usize];
    for (akd_label, value) in updates {
        let trace = traces.get(&akd_label.0).cloned();
        per_partition[map.user_partition(&akd_label) as usize].push((akd_label, value, trace));
    }
    per_partition
}

/// The updates (and traces, indexed into them) of `partitions`.
fn batch_of(
    per_partition: &[PartitionBatch],
    partitions: &[u32],
) -> (Vec<(AkdLabel, AkdValue)>, Vec<UpdateTrace>) {
    let mut updates = Vec::new();
    let mut traces = Vec::new();
    for partition in partitions {
        for (akd_label, value, trace) in &per_partition[*partition as usize] {
            if let Some(traceparent) = trace {
                traces.push(UpdateTrace {
                    index: updates.len() as u32,
                    traceparent: traceparent.clone(),
                });
            }
            updates.push((akd_label.clone(), value.clone()));
        }
    }
    (updates, traces)
}

/// The leaves for tree partitions `partitions`, from the agreed leaves of every user partition.
fn leaves_for(agreed: &[UserPartitionLeaves], partitions: &[u32]) -> Vec<(u32, Vec<NewLeaf>)> {
    let mut by_partition: BTreeMap<u32, Vec<NewLeaf>> = BTreeMap::new();
    for user_partition in agreed {
        for (partition, leaves) in &user_partition.leaves {
            if partitions.contains(partition) {
                by_partition
                    .entry(*partition)
                    .or_default()
                    .extend(leaves.iter().copied());
            }
        }
    }
    by_partition.into_iter().collect()
}

/// Runs `epoch` (the sealed batch `updates`, one update per label) on the replicas in
/// `participation`, on top of the directory as of `epoch - 1` (`base`), fenced by `fence`.
/// Idempotent: running it again gives the same result. `traces` maps the labels of traced
/// updates to their trace context.
pub async fn run_epoch<TC: Configuration>(
    shards: &ShardSet,
    fence: &Fence,
    epoch: u64,
    base: &TopTree<TC>,
    updates: Vec<(AkdLabel, AkdValue)>,
    traces: &HashMap<Vec<u8>, String>,
    participation: &Participation,
) -> std::result::Result<EpochOutcome<TC>, EpochFailure> {
    let map = &fence.map;
    let n_partitions = map.partition_count();
    let per_partition = split_by_user_partition(map, updates, traces);
    let mut verdicts: BTreeMap<(String, u32), ReplicaVerdict> = BTreeMap::new();

    // Prepare: every participant computes its user partitions' leaves.
    let calls: Vec<(String, _)> = participation
        .servers()
        .into_iter()
        .map(|server| {
            let partitions = participation.partitions_of(&server);
            let (batch, batch_traces) = batch_of(&per_partition, &partitions);
            let call = {
                let server = server.clone();
                async move {
                    shards
                        .api(&server)?
                        .prepare_epoch(epoch, fence, partitions, batch, batch_traces)
                        .await
                }
            };
            (server, call)
        })
        .collect();
    let prepare_quorum = |answers: &BTreeMap<String, Result<PrepareSummary>>| {
        (0..n_partitions).all(|partition| {
            majority_value(
                map,
                partition,
                answers
                    .iter()
                    .filter_map(|(server, answer)| Some((server.as_str(), answer.as_ref().ok()?)))
                    .filter_map(|(server, summary)| {
                        summary
                            .user_partitions
                            .iter()
                            .find(|leaves| leaves.user_partition == partition)
                            .map(|leaves| (server, leaves.digest))
                    }),
            )
            .is_some()
        })
    };
    let (prepared, late) = collect_with_grace(calls, prepare_quorum)
        .instrument(tracing::info_span!(
            "prepare",
            otel.name = "ktd.epoch.prepare",
            epoch
        ))
        .await;
    let late_to_prepare = late.clone();
    for server in late {
        for partition in participation.partitions_of(&server) {
            verdicts.insert(
                (server.clone(), partition),
                ReplicaVerdict::Behind {
                    reason: "no answer to PrepareEpoch within the grace period".into(),
                },
            );
        }
    }
    let mut agreed: Vec<UserPartitionLeaves> = Vec::with_capacity(n_partitions as usize);
    let mut failures = Vec::new();
    for partition in 0..n_partitions {
        let digests = prepared.iter().filter_map(|(server, answer)| {
            let leaves = answer
                .as_ref()
                .ok()?
                .user_partitions
                .iter()
                .find(|leaves| leaves.user_partition == partition)?;
            Some((server.as_str(), leaves))
        });
        let winner = majority_value(map, partition, digests.clone().map(|(s, l)| (s, l.digest)));
        for (server, leaves) in digests {
            let verdict = match winner {
                Some(digest) if digest == leaves.digest => ReplicaVerdict::Agreed,
                Some(_) => ReplicaVerdict::Dissented {
                    what: format!("leaf digest of user partition {partition} in epoch {epoch}"),
                },
                None => continue,
            };
            verdicts.insert((server.to_string(), partition), verdict);
        }
        match winner {
            Some(digest) => {
                let leaves = prepared
                    .values()
                    .filter_map(|answer| answer.as_ref().ok())
                    .flat_map(|summary| &summary.user_partitions)
                    .find(|leaves| leaves.user_partition == partition && leaves.digest == digest)
                    .cloned()
                    .expect("the winning digest came from an answer");
                agreed.push(leaves);
            }
            None => failures.push(format!(
                "user partition {partition}: no majority of its voters agreed on the leaves"
            )),
        }
    }
    for (server, answer) in &prepared {
        if let Err(error) = answer {
            for partition in participation.partitions_of(server) {
                verdicts.insert(
                    (server.clone(), partition),
                    failed_verdict("PrepareEpoch", error),
                );
            }
        }
    }
    let verdict_list = |verdicts: &BTreeMap<(String, u32), ReplicaVerdict>| {
        verdicts
            .iter()
            .map(|((server, partition), verdict)| (server.clone(), *partition, verdict.clone()))
            .collect::<Vec<_>>()
    };
    if !failures.is_empty() {
        // Name what each server answered, so the coordinator's log says why there was no
        // majority (a refusal, an error, or no answer in time).
        let mut answers: Vec<String> = prepared
            .iter()
            .map(|(server, answer)| match answer {
                Ok(_) => format!("{server}: prepared"),
                Err(error) => format!("{server}: {error}"),
            })
            .collect();
        answers.extend(
            late_to_prepare
                .iter()
                .map(|server| format!("{server}: no answer within the grace period")),
        );
        let failed = if failures.len() as u32 == n_partitions && n_partitions > 1 {
            "every user partition: no majority of its voters agreed on the leaves".to_string()
        } else {
            failures.join("; ")
        };
        return Err(EpochFailure {
            reason: format!(
                "epoch {epoch}: {failed} (PrepareEpoch answers: {})",
                answers.join("; ")
            ),
            verdicts: verdict_list(&verdicts),
            refused: refused_by_all(&prepared, &late_to_prepare),
        });
    }
    // Every update that changed something has exactly one fresh leaf; stale leaves carry akd's
    // constant stale value.
    let stale = TC::stale_azks_value();
    let changed = agreed
        .iter()
        .flat_map(|partition| &partition.leaves)
        .flat_map(|(_, leaves)| leaves)
        .filter(|leaf| leaf.commitment != stale)
        .count() as u64;
    let leaves_total: u64 = agreed
        .iter()
        .flat_map(|partition| &partition.leaves)
        .map(|(_, leaves)| leaves.len() as u64)
        .sum();

    // Build: every server that prepared with its majority builds those partitions.
    let builders: BTreeMap<String, Vec<u32>> = participation
        .servers()
        .into_iter()
        .map(|server| {
            let partitions: Vec<u32> = participation
                .partitions_of(&server)
                .into_iter()
                .filter(|partition| {
                    verdicts.get(&(server.clone(), *partition)) == Some(&ReplicaVerdict::Agreed)
                })
                .collect();
            (server, partitions)
        })
        .filter(|(_, partitions)| !partitions.is_empty())
        .collect();
    let sources: Vec<u32> = (0..n_partitions).collect();
    let calls: Vec<(String, _)> = builders
        .iter()
        .map(|(server, partitions)| {
            let base_roots: Vec<(u32, Option<NodeRef>)> = partitions
                .iter()
                .map(|partition| (*partition, base.partitions()[*partition as usize]))
                .collect();
            let leaves = leaves_for(&agreed, partitions);
            let sources = sources.clone();
            let call = {
                let server = server.clone();
                async move {
                    shards
                        .api(&server)?
                        .build_epoch(epoch, fence, base_roots, leaves, sources)
                        .await
                }
            };
            (server.clone(), call)
        })
        .collect();
    let build_quorum = |answers: &BTreeMap<String, Result<crate::api::BuildSummary>>| {
        (0..n_partitions).all(|partition| {
            majority_value(
                map,
                partition,
                answers.iter().filter_map(|(server, answer)| {
                    let root = answer
                        .as_ref()
                        .ok()?
                        .roots
                        .iter()
                        .find(|(p, _)| *p == partition)?
                        .1;
                    Some((server.as_str(), root_key(&root)))
                }),
            )
            .is_some()
        })
    };
    let (built, late) = collect_with_grace(calls, build_quorum)
        .instrument(tracing::info_span!(
            "build",
            otel.name = "ktd.epoch.build",
            epoch
        ))
        .await;
    let build_refused = refused_by_all(&built, &late);
    for server in late {
        for partition in &builders[&server] {
            verdicts.insert(
                (server.clone(), *partition),
                ReplicaVerdict::Behind {
                    reason: "no answer to BuildEpoch within the grace period".into(),
                },
            );
        }
    }
    let mut roots: Vec<Option<NodeRef>> = base.partitions().to_vec();
    let mut nodes_written = 0;
    for (server, answer) in &built {
        match answer {
            Ok(summary) => nodes_written += summary.nodes_written,
            Err(error) => {
                for partition in &builders[server] {
                    verdicts.insert(
                        (server.clone(), *partition),
                        failed_verdict("BuildEpoch", error),
                    );
                }
            }
        }
    }
    for partition in 0..n_partitions {
        let answered = built.iter().filter_map(|(server, answer)| {
            let root = answer
                .as_ref()
                .ok()?
                .roots
                .iter()
                .find(|(p, _)| *p == partition)?
                .1;
            Some((server.as_str(), root))
        });
        let winner = majority_value(
            map,
            partition,
            answered
                .clone()
                .map(|(server, root)| (server, root_key(&root))),
        );
        for (server, root) in answered {
            let verdict = match &winner {
                Some(key) if *key == root_key(&root) => ReplicaVerdict::Agreed,
                Some(_) => ReplicaVerdict::Dissented {
                    what: format!("root of partition {partition} in epoch {epoch}"),
                },
                None => continue,
            };
            verdicts.insert((server.to_string(), partition), verdict);
        }
        match winner {
            Some(key) => {
                roots[partition as usize] = built
                    .values()
                    .filter_map(|answer| answer.as_ref().ok())
                    .flat_map(|summary| &summary.roots)
                    .find(|(p, root)| *p == partition && root_key(root) == key)
                    .map(|(_, root)| *root)
                    .expect("the winning root came from an answer");
            }
            None => failures.push(format!(
                "partition {partition}: no majority of its voters built the same root"
            )),
        }
    }
    if !failures.is_empty() {
        return Err(EpochFailure {
            reason: format!("epoch {epoch}: {}", failures.join("; ")),
            verdicts: verdict_list(&verdicts),
            refused: build_refused,
        });
    }
    let top = TopTree::new(map.bits(), roots).map_err(|error| EpochFailure {
        reason: format!("epoch {epoch}: the majority's roots do not stitch: {error}"),
        verdicts: verdict_list(&verdicts),
        refused: true,
    })?;
    Ok(EpochOutcome {
        top,
        leaf_digests: agreed.iter().map(|leaves| leaves.digest).collect(),
        changed,
        leaves: leaves_total,
        nodes_written,
        verdicts: verdict_list(&verdicts),
    })
}

/// A hashable identity of a partition root (its encoding).
fn root_key(root: &Option<NodeRef>) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(root) = root {
        ktd_core::codec::put_node_ref(&mut out, root);
    }
    out
}

/// What replaying one committed epoch on one server did, per partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayOutcome {
    /// `(partition, verdict)` for every partition replayed.
    pub verdicts: Vec<(u32, ReplicaVerdict)>,
}

/// The committed facts of an epoch a replay must reproduce.
#[derive(Clone, Debug)]
pub struct CommittedEpoch {
    /// The epoch.
    pub epoch: u64,
    /// Partition roots as of the epoch before (what the replayed partitions build on).
    pub base_roots: Vec<Option<NodeRef>>,
    /// Partition roots as of the epoch.
    pub roots: Vec<Option<NodeRef>>,
    /// Per user partition, the committed leaf digests (empty if not recorded).
    pub leaf_digests: Vec<[u8; 32]>,
}

/// Replays the `committed` epoch (its sealed batch `updates`) on `server` for `partitions` (built
/// there to `epoch - 1`): prepares their users, gets every other user partition's leaves from
/// one of its up-to-date voters (`ComputeLeaves`, read-only), builds, and compares the roots
/// (and leaf digests) with the committed ones. A partition that differs dissented; a server
/// error leaves it behind.
pub async fn replay_epoch(
    shards: &ShardSet,
    fence: &Fence,
    server: &str,
    partitions: &[u32],
    updates: Vec<(AkdLabel, AkdValue)>,
    committed: &CommittedEpoch,
    up_to_date: &(dyn Fn(&str, u32) -> bool + Sync),
) -> Result<ReplayOutcome> {
    let epoch = committed.epoch;
    let map = &fence.map;
    let n_partitions = map.partition_count();
    let per_partition = split_by_user_partition(map, updates, &HashMap::new());
    let api = shards.api(server)?;
    let (batch, _) = batch_of(&per_partition, partitions);
    let damaged = |call: &str, error: &Error| ReplayOutcome {
        verdicts: partitions
            .iter()
            .map(|partition| (*partition, failed_verdict(call, error)))
            .collect(),
    };
    let prepared = match api
        .prepare_epoch(epoch, fence, partitions.to_vec(), batch, Vec::new())
        .await
    {
        Ok(prepared) => prepared,
        Err(error) if error.is_data_loss() => return Ok(damaged("PrepareEpoch", &error)),
        Err(error) => return Err(error),
    };
    let mut verdicts: BTreeMap<u32, ReplicaVerdict> = BTreeMap::new();
    let mut leaves: Vec<UserPartitionLeaves> = Vec::with_capacity(n_partitions as usize);
    for own in prepared.user_partitions {
        if let Some(expected) = committed.leaf_digests.get(own.user_partition as usize)
            && *expected != own.digest
        {
            verdicts.insert(
                own.user_partition,
                ReplicaVerdict::Dissented {
                    what: format!(
                        "leaf digest of user partition {} in epoch {epoch}",
                        own.user_partition
                    ),
                },
            );
        }
        leaves.push(own);
    }
    for user_partition in (0..n_partitions).filter(|partition| !partitions.contains(partition)) {
        let mut computed = None;
        let mut errors = Vec::new();
        for source in map.read_order(user_partition) {
            if source.id == server || !up_to_date(&source.id, user_partition) {
                continue;
            }
            let (batch, _) = batch_of(&per_partition, &[user_partition]);
            match shards
                .api(&source.id)?
                .compute_leaves(epoch, user_partition, batch)
                .await
            {
                Ok(answer)
                    if committed
                        .leaf_digests
                        .get(user_partition as usize)
                        .is_none_or(|expected| *expected == answer.digest) =>
                {
                    computed = Some(answer);
                    break;
                }
                Ok(_) => errors.push(format!(
                    "{}: digest differs from the committed one",
                    source.id
                )),
                Err(error) => errors.push(format!("{}: {error}", source.id)),
            }
        }
        leaves.push(computed.ok_or_else(|| {
            Error::invalid_config(format!(
                "no up-to-date replica of user partition {user_partition} could recompute its leaves of epoch {epoch} ({})",
                errors.join("; ")
            ))
        })?);
    }
    let building: Vec<u32> = partitions
        .iter()
        .copied()
        .filter(|partition| !verdicts.contains_key(partition))
        .collect();
    if !building.is_empty() {
        let base_roots = building
            .iter()
            .map(|partition| (*partition, committed.base_roots[*partition as usize]))
            .collect();
        let built = match api
            .build_epoch(
                epoch,
                fence,
                base_roots,
                leaves_for(&leaves, &building),
                (0..n_partitions).collect(),
            )
            .await
        {
            Ok(built) => built,
            Err(error) if error.is_data_loss() => return Ok(damaged("BuildEpoch", &error)),
            Err(error) => return Err(error),
        };
        for (partition, root) in built.roots {
            let verdict = if committed.roots.get(partition as usize) == Some(&root) {
                ReplicaVerdict::Agreed
            } else {
                ReplicaVerdict::Dissented {
                    what: format!("root of partition {partition} in epoch {epoch}"),
                }
            };
            verdicts.insert(partition, verdict);
        }
    }
    Ok(ReplayOutcome {
        verdicts: verdicts.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(code: tonic::Code) -> Result<()> {
        Err(Error::Remote {
            peer: "s1".into(),
            code,
            message: "no".into(),
        })
    }

    #[test]
    fn an_epoch_is_refused_only_when_every_replica_answered_and_every_failure_is_a_refusal() {
        let answers = |list: Vec<(&str, Result<()>)>| -> BTreeMap<String, Result<()>> {
            list.into_iter()
                .map(|(server, answer)| (server.to_string(), answer))
                .collect()
        };
        let refusals = answers(vec![
            ("s1", remote(tonic::Code::InvalidArgument)),
            ("s2", remote(tonic::Code::OutOfRange)),
            ("s3", Ok(())),
        ]);
        assert!(refused_by_all(&refusals, &[]));
        // A replica that did not answer might have taken it.
        assert!(!refused_by_all(&refusals, &["s4".to_string()]));
        // Busy, unreachable, fenced or damaged replicas are transient or their own problem.
        for transient in [
            remote(tonic::Code::Unavailable),
            remote(tonic::Code::ResourceExhausted),
            remote(tonic::Code::DeadlineExceeded),
            remote(tonic::Code::DataLoss),
            Err(Error::fenced("stale term")),
        ] {
            let mixed = answers(vec![
                ("s1", remote(tonic::Code::InvalidArgument)),
                ("s2", transient),
            ]);
            assert!(!refused_by_all(&mixed, &[]));
        }
        // No failure at all is not a refusal.
        assert!(!refused_by_all(&answers(vec![("s1", Ok(()))]), &[]));
    }
}
