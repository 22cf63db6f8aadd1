//! The epoch coordinator: runs on the sequencer leader and moves with leadership.
//!
//! It turns every sealed epoch into a committed root, in epoch order, across replica sets of
//! shard servers (see `shard/docs/0002-replicated-shards.md`):
//!
//! ```text
//!   Raft state: sealed E (batch), last committed E-1 (root, partition roots), shard map
//!        │
//!        ▼                       shard::cluster::run_epoch (fenced: term, committed epoch, map)
//!   sealed batch of E ──► prepare_epoch on every up-to-date replica ──► majority leaf digests
//!                     ──► build_epoch (base = partition roots of E-1, the majority's leaves)
//!                     ──► majority partition roots ──► TopTree ──► root hash
//!        │               dissenting voters ──► SetShardMap (quarantined) before the commit
//!        ▼
//!   CommitEpoch(E, root hash, partition roots, leaf digests, replica progress) through Raft
//!                                                                 ◄── the only commit point
//! ```
//!
//! Beside the epochs, a repair loop ([`repair`]) polls every shard server's status and brings
//! replicas back: it replays committed epochs on servers that are behind, copies partitions
//! onto new, wiped, damaged or too-far-behind replicas from a healthy voter, quarantines voters
//! whose stored root differs from the committed one, promotes caught-up learners, lifts the
//! quarantine of rebuilt voters, and replaces servers unreachable past the failure timeout. Its
//! decisions are the pure [`replicas::plan`]; the loop does the IO.
//!
//! Every step is idempotent per epoch, so a coordinator that loses leadership half-way, or a new
//! leader that takes over, simply drives the oldest sealed, uncommitted epoch again and gets the
//! same root; a deposed coordinator's late mutations are refused by the shards' fences. A
//! different root for a committed epoch is refused by the state machine, so no two roots can
//! exist for one epoch even if two nodes believe they lead.
//!
//! Decisions are small pure functions ([`next_step`], [`replicas::plan`]) over the replicated
//! state and the replicas' progress; the loops around them do the IO and retry with capped
//! exponential backoff.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ktd_core::akd_core::configuration::Configuration;
use ktd_core::config::{AkdConfig, Experimental, WhatsAppV1};
use ktd_core::{EpochRecord, ShardMap};
use opentelemetry::trace::TraceContextExt;
use shard::api::Fence;
use shard::cluster::{self, ReplicaVerdict, ShardConnector, ShardSet};
use shard::replicated;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::error::{Result, SequencerError};
use crate::machine::EpochState;
use crate::node::Sequencer;
use crate::pb;

pub mod balance;
pub mod repair;
pub mod replicas;
pub mod stall;

use replicas::{MapChange, Tracker};

/// Waits for the cluster metadata, installs its akd configuration in this process and runs
/// the coordinator with it until `shutdown`.
pub async fn run_configured(
    sequencer: Sequencer,
    connector: Arc<dyn ShardConnector>,
    shutdown: CancellationToken,
) {
    let mut state = sequencer.state();
    let metadata = loop {
        if let Some(metadata) = state.borrow_and_update().epochs().metadata.clone() {
            break metadata;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = state.changed() => if changed.is_err() { return },
        }
    };
    let config = match metadata.akd_configuration.parse::<AkdConfig>() {
        Ok(config) => config,
        Err(error) => {
            tracing::error!(%error, "the coordinator cannot run: unknown akd configuration");
            return;
        }
    };
    if let Err(error) = config.install() {
        tracing::error!(%error, "the coordinator cannot run");
        return;
    }
    match config {
        AkdConfig::WhatsAppV1 => run::<WhatsAppV1>(sequencer, connector, shutdown).await,
        AkdConfig::Experimental { .. } => run::<Experimental>(sequencer, connector, shutdown).await,
    }
}

/// What the coordinator should do next, given the replicated epoch state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing sealed is waiting.
    Idle,
    /// The cluster has no metadata or no shard map yet.
    NotConfigured,
    /// Drive this sealed epoch.
    Drive(u64),
}

/// The next step: the oldest sealed epoch that is not committed yet.
pub fn next_step(state: &EpochState) -> Step {
    if state.metadata.is_none() || state.shard_map.version == 0 {
        return Step::NotConfigured;
    }
    let next = state.last_committed_epoch + 1;
    if next < state.open_epoch {
        Step::Drive(next)
    } else {
        Step::Idle
    }
}

/// What the epoch drive and the repair loop share: the replicas' progress and the clients.
pub(crate) struct Shared {
    pub(crate) tracker: Mutex<Tracker>,
    shards: Mutex<Option<ShardSet>>,
    connector: Arc<dyn ShardConnector>,
}

impl Shared {
    pub(crate) fn tracker(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.tracker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Clients of `map`'s servers (reconnecting only when the servers change).
    pub(crate) fn shards(&self, map: &ShardMap) -> shard::Result<ShardSet> {
        let mut cached = self
            .shards
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(set) = cached.as_ref() {
            if set.map() == map {
                return Ok(set.clone());
            }
            if set.map().servers() == map.servers()
                && let Ok(updated) = set.with_map(map.clone())
            {
                *cached = Some(updated.clone());
                return Ok(updated);
            }
        }
        let set = self.connector.connect(map.clone())?;
        *cached = Some(set.clone());
        Ok(set)
    }
}

/// The cluster's replicated shard map, checked.
pub(crate) fn current_map(epochs: &EpochState) -> Result<ShardMap> {
    let metadata = epochs
        .metadata
        .as_ref()
        .ok_or(SequencerError::NotInitialized)?;
    replicated::shard_map(metadata, &epochs.shard_map).map_err(coordination)
}

/// Proposes `changes` to the shard map at `map`'s version (compare-and-set), applying each in
/// turn and skipping any the map would refuse. Returns whether a new map was written.
pub(crate) async fn change_map(
    sequencer: &Sequencer,
    map: &ShardMap,
    changes: &[MapChange],
) -> Result<bool> {
    let mut changed = map.clone();
    for change in changes {
        match change.apply(&changed) {
            Ok(next) => changed = next,
            Err(error) => tracing::warn!(?change, %error, "shard map change refused"),
        }
    }
    if changed == *map {
        return Ok(false);
    }
    let written = sequencer
        .set_shard_map(replicated::shard_map_to_pb(&changed), map.version())
        .await?;
    tracing::warn!(
        version = written.version,
        ?changes,
        "shard map changed by the coordinator"
    );
    Ok(true)
}

/// Runs the coordinator until `shutdown`: active while this node leads, idle otherwise.
pub async fn run<TC: Configuration>(
    sequencer: Sequencer,
    connector: Arc<dyn ShardConnector>,
    shutdown: CancellationToken,
) {
    // The stall gauges exist (at 0) from the start, so an alert on them has a series to read.
    crate::metrics::export_commit_stall(None, 0);
    let shared = Arc::new(Shared {
        tracker: Mutex::new(Tracker::default()),
        shards: Mutex::new(None),
        connector,
    });
    let repairs = tokio::spawn(repair::run(
        sequencer.clone(),
        shared.clone(),
        shutdown.clone(),
    ));
    let history = tokio::spawn(crate::history::run(sequencer.clone(), shutdown.clone()));
    let mut leader = sequencer.leader_changes();
    let mut state = sequencer.state();
    let mut backoff = Backoff::default();
    let mut stall = stall::Stall::default();
    let mut led_in_term = None;
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        let leading = leader.borrow_and_update().clone();
        if leading.is_self && led_in_term != Some(leading.term) {
            // A new leadership knows nothing of the replicas' progress yet.
            *shared.tracker() = Tracker::default();
            led_in_term = Some(leading.term);
        }
        let epochs = state.borrow_and_update().epochs();
        let step = if leading.is_self {
            next_step(&epochs)
        } else {
            Step::Idle
        };
        if !matches!(step, Step::Drive(_)) {
            // Caught up, or no longer leading: whatever stalled is not this node's to report.
            end_stall(&mut stall, &sequencer);
        }
        match step {
            Step::Idle | Step::NotConfigured => {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = leader.changed() => {}
                    _ = state.changed() => {}
                }
            }
            Step::Drive(epoch) => {
                let started = Instant::now();
                let span = tracing::info_span!(
                    "epoch",
                    otel.name = "ktd.epoch.commit",
                    ktd.component = "sequencer",
                    epoch,
                    node_id = sequencer.id(),
                );
                let outcome = drive::<TC>(&sequencer, &shared, &epochs, leading.term, epoch)
                    .instrument(span)
                    .await;
                match outcome {
                    Ok(root) => {
                        backoff.reset();
                        end_stall(&mut stall, &sequencer);
                        metrics::counter!("ktd_epochs_committed_total").increment(1);
                        metrics::histogram!("ktd_epoch_commit_duration_seconds")
                            .record(started.elapsed().as_secs_f64());
                        tracing::info!(
                            epoch,
                            root = %hex(&root),
                            seconds = started.elapsed().as_secs_f64(),
                            "epoch committed"
                        );
                    }
                    Err(DriveFailure { error, refused }) => {
                        metrics::counter!("ktd_epoch_commit_failures_total").increment(1);
                        let delay = backoff.next();
                        let now = stall
                            .failed(epoch, &error.to_string(), refused, crate::node::unix_ms())
                            .clone();
                        if now.poisoned {
                            tracing::error!(
                                epoch,
                                %error,
                                attempts = now.attempts,
                                "epoch poisoned: every replica refuses it; retrying will not help \
                                 (runbook: an epoch does not commit)"
                            );
                        } else {
                            tracing::warn!(epoch, %error, refused, retry_in_ms = delay.as_millis() as u64, "epoch not committed yet");
                        }
                        sequencer.set_commit_stall(Some(now));
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            }
        }
    }
    repairs.abort();
    history.abort();
}

/// Clears the commit stall, if any, and its report in this node's status and gauges.
fn end_stall(stall: &mut stall::Stall, sequencer: &Sequencer) {
    if stall.current().is_some() {
        stall.clear();
        sequencer.set_commit_stall(None);
    }
}

/// Why an epoch did not commit, and whether its replicas refused the epoch itself (see
/// [`stall`]).
struct DriveFailure {
    error: SequencerError,
    refused: bool,
}

impl From<SequencerError> for DriveFailure {
    fn from(error: SequencerError) -> Self {
        Self {
            error,
            refused: false,
        }
    }
}

async fn drive<TC: Configuration>(
    sequencer: &Sequencer,
    shared: &Shared,
    epochs: &EpochState,
    term: u64,
    epoch: u64,
) -> std::result::Result<[u8; 32], DriveFailure> {
    let map = current_map(epochs)?;
    let bits = map.bits();
    let shard_set = shared.shards(&map).map_err(coordination)?;
    let base_record = sequencer.get_epoch(Some(epoch - 1)).await?;
    let base = replicated::top_tree::<TC>(bits, &base_record).map_err(coordination)?;
    let batch = sequencer.sealed_batch(epoch).await?;
    // Continue each traced publish's trace into this epoch: one span per traced update (linked
    // to the epoch's span), whose context goes to the replicas that prepare the update.
    let traced = sequencer.update_traces().of_epoch(epoch);
    let epoch_span = tracing::Span::current()
        .context()
        .span()
        .span_context()
        .clone();
    let mut update_spans = Vec::with_capacity(traced.len());
    let mut traces = HashMap::with_capacity(traced.len());
    for (label, traceparent) in traced {
        let Some(parent) = ktd_rpc::telemetry::context_from_traceparent(&traceparent) else {
            continue;
        };
        let span = tracing::info_span!(
            "include",
            otel.name = "ktd.epoch.include",
            ktd.component = "sequencer",
            epoch,
        );
        if span.set_parent(parent).is_err() {
            continue;
        }
        if epoch_span.is_valid() {
            span.add_link(epoch_span.clone());
        }
        if let Some(context) = ktd_rpc::telemetry::traceparent_of(&span.context()) {
            traces.insert(label, context);
        }
        update_spans.push(span);
    }
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
    let fence = Fence {
        term,
        committed_epoch: epoch - 1,
        map: map.clone(),
        safe_epoch: epochs.history.safe_epoch.min(epoch - 1),
    };
    let participation = shared.tracker().participation(&map, epoch);
    let outcome = cluster::run_epoch(
        &shard_set,
        &fence,
        epoch,
        &base,
        updates,
        &traces,
        &participation,
    )
    .await;
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(failure) => {
            note_verdicts(shared, &failure.verdicts);
            return Err(DriveFailure {
                error: SequencerError::Coordination(failure.reason),
                refused: failure.refused,
            });
        }
    };
    note_verdicts(shared, &outcome.verdicts);
    // A voter that computed something else than its majority must not be read: quarantine it
    // before the epoch becomes visible.
    let quarantines: Vec<MapChange> = outcome
        .verdicts
        .iter()
        .filter(|(server, partition, verdict)| {
            matches!(verdict, ReplicaVerdict::Dissented { .. })
                && map.replicas(*partition).role_of(server)
                    == Some(ktd_core::shard_map::Role::Voter)
        })
        .map(|(server, partition, _)| MapChange::Quarantine {
            server: server.clone(),
            partition: *partition,
        })
        .collect();
    if !quarantines.is_empty() {
        metrics::counter!("ktd_coordinator_replica_dissents_total")
            .increment(quarantines.len() as u64);
        change_map(sequencer, &map, &quarantines).await?;
    }
    let root_hash = outcome.top.root_hash();
    let record = EpochRecord {
        epoch,
        root_hash,
        partitions: outcome.top.partitions().to_vec(),
    };
    let progress = {
        let mut tracker = shared.tracker();
        tracker.record_epoch(epoch, outcome.top.partitions(), &outcome.verdicts);
        tracker.durable_epochs(&map)
    };
    let commit = pb::CommitEpochRequest {
        epoch,
        root_hash: root_hash.to_vec(),
        partition_roots: record.encode(),
        committed_at_ms: 0,
        leaf_digests: outcome.leaf_digests.concat(),
        progress: progress
            .into_iter()
            .map(
                |(server, built_epoch)| ktd_proto::ktd::cluster::v1::ServerProgress {
                    server,
                    built_epoch,
                },
            )
            .collect(),
    };
    let response = sequencer.commit_epoch(commit).await?;
    sequencer.note_epoch_committed(&response, epoch);
    sequencer.update_traces().forget_through(epoch);
    drop(update_spans);
    Ok(root_hash)
}

/// Records dissents and failures of an epoch in the tracker, and logs them.
fn note_verdicts(shared: &Shared, verdicts: &[(String, u32, ReplicaVerdict)]) {
    let mut tracker = shared.tracker();
    for (server, partition, verdict) in verdicts {
        match verdict {
            ReplicaVerdict::Agreed => {}
            ReplicaVerdict::Dissented { what } => {
                tracing::error!(
                    server,
                    partition,
                    what,
                    "a replica disagrees with its majority"
                );
                tracker.record_dissent(server, *partition);
            }
            ReplicaVerdict::Behind { reason } => {
                tracing::debug!(server, partition, reason, "a replica fell behind");
            }
        }
    }
}

pub(crate) fn coordination(error: shard::Error) -> SequencerError {
    SequencerError::Coordination(error.to_string())
}

fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// Capped exponential backoff: 100 ms doubling to 5 s.
#[derive(Debug, Default)]
struct Backoff {
    attempts: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let delay =
            Duration::from_millis(100u64 << self.attempts.min(6)).min(Duration::from_secs(5));
        self.attempts += 1;
        delay
    }

    fn reset(&mut self) {
        self.attempts = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(open: u64, committed: u64) -> EpochState {
        EpochState {
            open_epoch: open,
            last_committed_epoch: committed,
            metadata: Some(pb::ClusterMetadata::default()),
            shard_map: ktd_proto::ktd::cluster::v1::ShardMap {
                version: 1,
                ..Default::default()
            },
            ..EpochState::default()
        }
    }

    #[test]
    fn drives_the_oldest_sealed_uncommitted_epoch() {
        assert_eq!(next_step(&state(1, 0)), Step::Idle);
        assert_eq!(next_step(&state(2, 0)), Step::Drive(1));
        assert_eq!(next_step(&state(5, 2)), Step::Drive(3));
        assert_eq!(next_step(&state(5, 4)), Step::Idle);
        assert_eq!(next_step(&EpochState::default()), Step::NotConfigured);
    }
}
