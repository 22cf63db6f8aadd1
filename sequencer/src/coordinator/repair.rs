//! The repair loop: on the leader, every `replicas.check_interval`, read every shard server's
//! status, ask [`super::replicas::plan`] what to repair, and do it — shard-map changes through
//! Raft (compare-and-set), replays and bootstraps as background tasks (one per server at a
//! time, at most [`super::replicas::MAX_PARALLEL_BOOTSTRAPS`] copies cluster-wide).
//!
//! Also exports the replicas' health: `ktd_replicas{state}`, `ktd_replica_lag_epochs{server}`,
//! `ktd_replica_bootstraps_running`, and counts replays, bootstraps and their bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ktd_core::shard_map::Role;
use ktd_core::tree::NodeRef;
use shard::api::{BootstrapSource, Fence};
use shard::cluster::{self, CommittedEpoch, ReplicaVerdict};
use shard::replicated;
use tokio_util::sync::CancellationToken;

use super::balance::{BalanceOptions, plan_moves};
use super::replicas::{Committed, MapChange, Repair, RepairOptions, plan};
use super::{Shared, change_map, current_map};
use crate::error::{Result, SequencerError};
use crate::node::{Sequencer, unix_ms};

/// How long one status call may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// Epochs one replay task replays before it yields to the next check.
const REPLAY_BATCH: u64 = 64;

/// Runs the repair loop until `shutdown` (idle while this node does not lead).
pub(crate) async fn run(sequencer: Sequencer, shared: Arc<Shared>, shutdown: CancellationToken) {
    let options = sequencer.config().replicas.clone();
    let mut leader = sequencer.leader_changes();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            () = tokio::time::sleep(options.check_interval) => {}
        }
        let leading = leader.borrow_and_update().clone();
        if !leading.is_self {
            continue;
        }
        if let Err(error) = check(&sequencer, &shared, leading.term, &options).await {
            tracing::debug!(%error, "replica check");
        }
    }
}

/// One round: statuses, decisions, actions.
async fn check(
    sequencer: &Sequencer,
    shared: &Arc<Shared>,
    term: u64,
    options: &crate::config::ReplicaOptions,
) -> Result<()> {
    let epochs = sequencer.state().borrow().epochs();
    let map = current_map(&epochs)?;
    let shard_set = shared.shards(&map).map_err(super::coordination)?;
    let committed = epochs.last_committed_epoch;

    let statuses = futures::future::join_all(map.servers().iter().map(|server| {
        let api = shard_set.api(&server.id).cloned();
        async move {
            let status = match api {
                Ok(api) => tokio::time::timeout(STATUS_TIMEOUT, api.status())
                    .await
                    .ok()
                    .and_then(Result::ok),
                Err(_) => None,
            };
            (server.id.clone(), status)
        }
    }))
    .await;
    let now = Instant::now();
    {
        let mut tracker = shared.tracker();
        for (server, status) in &statuses {
            match status {
                Some(status) => tracker.record_status(server, status, now),
                None => tracker.record_unreachable(server, now),
            }
        }
    }

    // The committed roots at every epoch a replica reports being built to.
    let wanted: BTreeSet<u64> = shared
        .tracker()
        .servers
        .values()
        .flat_map(|view| view.partitions.values().map(|progress| progress.built))
        .filter(|built| *built <= committed)
        .collect();
    let mut roots: BTreeMap<u64, Vec<Option<NodeRef>>> = BTreeMap::new();
    for epoch in wanted {
        if let Ok(record) = sequencer.get_local_epoch(Some(epoch)).await
            && let Ok(decoded) = replicated::partition_roots(map.bits(), &record)
        {
            roots.insert(epoch, decoded);
        }
    }
    let roots_at = |epoch: u64| roots.get(&epoch).cloned();
    let tracker = shared.tracker().clone();
    export_health(&map, &tracker, committed);
    let repairs = plan(
        &map,
        &tracker,
        &Committed {
            epoch: committed,
            oldest_retained: epochs.oldest_retained_committed(),
            roots_at: &roots_at,
            restoring: epochs
                .active_restore()
                .is_some_and(|restore| restore.installed_epoch == committed),
        },
        now,
        unix_ms(),
        RepairOptions {
            failure_timeout: options.failure_timeout,
        },
    );
    let fence = Fence {
        term,
        committed_epoch: committed,
        map: map.clone(),
        safe_epoch: epochs.history.safe_epoch.min(committed),
    };
    let changes: Vec<_> = repairs
        .iter()
        .filter_map(|repair| match repair {
            Repair::Map(change) => Some(change.clone()),
            _ => None,
        })
        .collect();
    if !changes.is_empty() {
        // The map moved on: the other repairs are decided again against the new map.
        change_map(sequencer, &map, &changes).await?;
        return Ok(());
    }
    if options.balance {
        let reachable = |id: &str| {
            tracker
                .servers
                .get(id)
                .is_some_and(|view| view.known && view.unreachable_since.is_none())
        };
        let moves = plan_moves(
            &map,
            &tracker,
            &reachable,
            unix_ms(),
            BalanceOptions {
                tolerance: options.balance_tolerance,
                max_moves: options.max_moves as usize,
                max_moves_per_server: options.max_moves_per_server as usize,
            },
        );
        if !moves.is_empty() {
            for change in &moves {
                if let MapChange::AddLearner {
                    server,
                    partition,
                    replaces,
                } = change
                {
                    tracing::info!(
                        partition,
                        from = %replaces,
                        to = %server,
                        "moving a partition copy to balance the shard servers"
                    );
                }
            }
            metrics::counter!("ktd_balancer_moves_total").increment(moves.len() as u64);
            change_map(sequencer, &map, &moves).await?;
            return Ok(());
        }
    }
    for repair in repairs {
        match repair {
            Repair::Replay {
                server,
                partitions,
                epoch,
            } => {
                shared
                    .tracker()
                    .servers
                    .entry(server.clone())
                    .or_default()
                    .replaying = true;
                let (sequencer, shared, fence) = (sequencer.clone(), shared.clone(), fence.clone());
                tokio::spawn(async move {
                    let replayed =
                        replay(&sequencer, &shared, &fence, &server, partitions, epoch).await;
                    if let Err(error) = replayed {
                        tracing::warn!(server, epoch, %error, "replay stopped");
                    }
                    if let Some(view) = shared.tracker().servers.get_mut(&server) {
                        view.replaying = false;
                    }
                });
            }
            Repair::Bootstrap {
                server,
                partition,
                source,
                epoch,
            } => {
                let expected_root = roots
                    .get(&epoch)
                    .and_then(|roots| roots.get(partition as usize).copied())
                    .flatten();
                let source_server = if source == super::replicas::RESTORE_SOURCE {
                    let Some(restore) = epochs.active_restore() else {
                        continue;
                    };
                    ktd_core::shard_map::ShardServer {
                        id: source.clone(),
                        address: restore.source_address.clone(),
                        maintenance_until_ms: 0,
                        draining: false,
                    }
                } else {
                    let Some(server) = map.server(&source).cloned() else {
                        continue;
                    };
                    server
                };
                let api = shard_set.api(&server).map_err(super::coordination)?.clone();
                shared
                    .tracker()
                    .servers
                    .entry(server.clone())
                    .or_default()
                    .bootstrapping
                    .insert(partition, epoch);
                let (shared, fence) = (shared.clone(), fence.clone());
                let rate = options.bootstrap_max_bytes_per_second;
                tokio::spawn(async move {
                    tracing::info!(server, partition, source, epoch, "copying a partition");
                    metrics::gauge!("ktd_replica_bootstraps_running").increment(1.0);
                    let started = Instant::now();
                    let copied = api
                        .bootstrap(
                            &fence,
                            BootstrapSource {
                                partition,
                                epoch,
                                source_id: source_server.id.clone(),
                                source_address: source_server.address.clone(),
                                expected_root,
                                max_bytes_per_second: rate,
                            },
                        )
                        .await;
                    metrics::gauge!("ktd_replica_bootstraps_running").decrement(1.0);
                    let mut tracker = shared.tracker();
                    let view = tracker.servers.entry(server.clone()).or_default();
                    view.bootstrapping.remove(&partition);
                    match copied {
                        Ok(summary) => {
                            metrics::counter!("ktd_replica_bootstraps_total", "outcome" => "ok")
                                .increment(1);
                            metrics::counter!("ktd_replica_bootstrap_bytes_total")
                                .increment(summary.bytes);
                            let seconds = started.elapsed().as_secs_f64();
                            tracing::info!(
                                server,
                                partition,
                                epoch,
                                records = summary.records,
                                bytes = summary.bytes,
                                nodes_checked = summary.nodes_checked,
                                seconds,
                                mib_per_second =
                                    summary.bytes as f64 / (1 << 20) as f64 / seconds.max(1e-9),
                                "partition copied"
                            );
                            view.partitions.insert(
                                partition,
                                super::replicas::PartitionProgress {
                                    held: true,
                                    built: summary.epoch,
                                    root: expected_root,
                                    ..Default::default()
                                },
                            );
                        }
                        Err(error) => {
                            metrics::counter!("ktd_replica_bootstraps_total", "outcome" => "failed")
                                .increment(1);
                            tracing::warn!(server, partition, source, %error, "partition copy failed");
                        }
                    }
                });
            }
            Repair::Map(_) => {}
        }
    }
    Ok(())
}

/// Replays committed epochs `epoch..` on `server` for `partitions` (built there to
/// `epoch - 1`), up to [`REPLAY_BATCH`] epochs or the latest committed one.
async fn replay(
    sequencer: &Sequencer,
    shared: &Shared,
    fence: &Fence,
    server: &str,
    partitions: Vec<u32>,
    first: u64,
) -> Result<()> {
    let map = &fence.map;
    let shard_set = shared.shards(map).map_err(super::coordination)?;
    let mut partitions = partitions;
    for epoch in first..first + REPLAY_BATCH {
        if epoch > sequencer.state().borrow().epochs().last_committed_epoch {
            return Ok(());
        }
        let previous = sequencer.get_local_epoch(Some(epoch - 1)).await?;
        let record = sequencer.get_local_epoch(Some(epoch)).await?;
        let committed = CommittedEpoch {
            epoch,
            base_roots: replicated::partition_roots(map.bits(), &previous)
                .map_err(super::coordination)?,
            roots: replicated::partition_roots(map.bits(), &record).map_err(super::coordination)?,
            leaf_digests: replicated::leaf_digests(map.bits(), &record)
                .map_err(super::coordination)?,
        };
        let batch = sequencer.sealed_batch(epoch).await?;
        let updates = batch
            .updates
            .into_iter()
            .map(|update| {
                (
                    ktd_core::akd_core::AkdLabel(update.label),
                    ktd_core::akd_core::AkdValue(update.value),
                )
            })
            .collect();
        let tracker = shared.tracker().clone();
        let up_to_date =
            move |source: &str, partition: u32| tracker.up_to_date(source, partition, epoch - 1);
        let fence = Fence {
            committed_epoch: fence.committed_epoch.max(epoch),
            ..fence.clone()
        };
        let outcome = cluster::replay_epoch(
            &shard_set,
            &fence,
            server,
            &partitions,
            updates,
            &committed,
            &up_to_date,
        )
        .await
        .map_err(super::coordination)?;
        metrics::counter!("ktd_replica_replays_total").increment(1);
        let mut tracker = shared.tracker();
        let mut agreed = Vec::new();
        for (partition, verdict) in &outcome.verdicts {
            match verdict {
                ReplicaVerdict::Agreed => agreed.push(*partition),
                ReplicaVerdict::Dissented { what } => {
                    tracing::error!(
                        server,
                        partition,
                        what,
                        "a replayed replica disagrees with the committed epoch"
                    );
                    metrics::counter!("ktd_coordinator_replica_dissents_total").increment(1);
                    tracker.record_dissent(server, *partition);
                }
                ReplicaVerdict::Behind { reason } => {
                    return Err(SequencerError::Coordination(reason.clone()));
                }
            }
        }
        let roots = committed.roots.clone();
        let verdicts: Vec<_> = agreed
            .iter()
            .map(|partition| (server.to_string(), *partition, ReplicaVerdict::Agreed))
            .collect();
        tracker.record_epoch(epoch, &roots, &verdicts);
        partitions = agreed;
        if partitions.is_empty() {
            return Ok(());
        }
    }
    Ok(())
}

/// Sets the replica health gauges.
fn export_health(map: &ktd_core::ShardMap, tracker: &super::replicas::Tracker, committed: u64) {
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    for partition in map.partitions() {
        *counts.entry("voter").or_default() += partition.healthy_voters().count() as u64;
        *counts.entry("quarantined").or_default() += partition.quarantined.len() as u64;
        *counts.entry("learner").or_default() += partition.learners.len() as u64;
    }
    for (state, count) in counts {
        metrics::gauge!("ktd_replicas", "state" => state).set(count as f64);
    }
    for server in map.servers() {
        let lag = map
            .assignments(&server.id)
            .iter()
            .filter(|(_, role)| *role != Role::Learner)
            .map(|(partition, _)| {
                tracker
                    .servers
                    .get(&server.id)
                    .and_then(|view| view.partitions.get(partition))
                    .filter(|progress| progress.held)
                    .map_or(committed, |progress| {
                        committed.saturating_sub(progress.built)
                    })
            })
            .max()
            .unwrap_or(0);
        metrics::gauge!("ktd_replica_lag_epochs", "server" => server.id.clone()).set(lag as f64);
    }
}
