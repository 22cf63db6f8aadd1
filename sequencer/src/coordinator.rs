//! The epoch coordinator: runs on the sequencer leader and moves with leadership.
//!
//! It turns every sealed epoch into a committed root, in epoch order:
//!
//! ```text
//!   Raft state: sealed E (batch), last committed E-1 (root, partition roots)
//!        │
//!        ▼                       shard::cluster::run_epoch
//!   sealed batch of E ──► prepare_epoch on every shard ──► deliver_leaves shard → shard
//!                     ──► build_epoch on every shard (base = partition roots of E-1)
//!                     ──► TopTree::new(partition roots of E) ──► root hash
//!        │
//!        ▼
//!   CommitEpoch(E, root hash, partition roots) through Raft  ◄── the only commit point
//! ```
//!
//! Every step is idempotent per epoch, so a coordinator that loses leadership half-way, or a new
//! leader that takes over, simply drives the oldest sealed, uncommitted epoch again and gets the
//! same root. A different root for a committed epoch is refused by the state machine, so no two
//! roots can exist for one epoch even if two nodes believe they lead.
//!
//! Decisions are a small pure function ([`next_step`]) over the replicated state; the loop around
//! it does the IO and retries with capped exponential backoff.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::trace::TraceContextExt;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use ktd_core::EpochRecord;
use ktd_core::akd_core::configuration::Configuration;
use ktd_core::config::{AkdConfig, Experimental, WhatsAppV1};
use shard::cluster::{self, ShardConnector, ShardSet};
use shard::replicated;
use tokio_util::sync::CancellationToken;

use crate::error::{Result, SequencerError};
use crate::machine::EpochState;
use crate::node::Sequencer;

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

/// Runs the coordinator until `shutdown`: active while this node leads, idle otherwise.
pub async fn run<TC: Configuration>(
    sequencer: Sequencer,
    connector: Arc<dyn ShardConnector>,
    shutdown: CancellationToken,
) {
    let mut leader = sequencer.leader_changes();
    let mut state = sequencer.state();
    let mut backoff = Backoff::default();
    let mut shards: Option<(u64, ShardSet)> = None;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let leading = leader.borrow_and_update().is_self;
        let epochs = state.borrow_and_update().epochs();
        let step = if leading {
            next_step(&epochs)
        } else {
            Step::Idle
        };
        match step {
            Step::Idle | Step::NotConfigured => {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
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
                let outcome =
                    drive::<TC>(&sequencer, connector.as_ref(), &mut shards, &epochs, epoch)
                        .instrument(span)
                        .await;
                match outcome {
                    Ok(root) => {
                        backoff.reset();
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
                    Err(error) => {
                        metrics::counter!("ktd_epoch_commit_failures_total").increment(1);
                        let delay = backoff.next();
                        tracing::warn!(epoch, %error, retry_in_ms = delay.as_millis() as u64, "epoch not committed yet");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            }
        }
    }
}

async fn drive<TC: Configuration>(
    sequencer: &Sequencer,
    connector: &dyn ShardConnector,
    shards: &mut Option<(u64, ShardSet)>,
    epochs: &EpochState,
    epoch: u64,
) -> Result<[u8; 32]> {
    let metadata = epochs
        .metadata
        .clone()
        .ok_or(SequencerError::NotInitialized)?;
    let map = replicated::shard_map(&metadata, &epochs.shard_map).map_err(coordination)?;
    let bits = map.bits;
    if shards.as_ref().map(|(version, _)| *version) != Some(map.version) {
        *shards = Some((map.version, connector.connect(map).map_err(coordination)?));
    }
    let shard_set = &shards.as_ref().expect("set just above").1;

    let base_record = sequencer.get_epoch(Some(epoch - 1)).await?;
    let base = replicated::top_tree::<TC>(bits, &base_record).map_err(coordination)?;
    let batch = sequencer.sealed_batch(epoch).await?;
    // Continue each traced publish's trace into this epoch: one span per traced update (linked
    // to the epoch's span), whose context goes to the shard that prepares the update.
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
    let outcome = cluster::run_epoch(shard_set, epoch, &base, updates, &traces)
        .await
        .map_err(coordination)?;
    let root_hash = outcome.top.root_hash();
    let record = EpochRecord {
        epoch,
        root_hash,
        partitions: outcome.top.partitions().to_vec(),
    };
    let response = sequencer
        .commit_epoch(epoch, root_hash.to_vec(), record.encode())
        .await?;
    sequencer.note_epoch_committed(&response, epoch);
    sequencer.update_traces().forget_through(epoch);
    drop(update_spans);
    Ok(root_hash)
}

fn coordination(error: shard::Error) -> SequencerError {
    SequencerError::Coordination(error.to_string())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
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
    use crate::pb;

    fn state(open: u64, committed: u64) -> EpochState {
        EpochState {
            open_epoch: open,
            last_committed_epoch: committed,
            metadata: Some(pb::ClusterMetadata::default()),
            shard_map: pb::ShardMap {
                version: 1,
                shards: Vec::new(),
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
