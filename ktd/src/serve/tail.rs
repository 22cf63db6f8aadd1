//! Shards tail the sequencer's log while an epoch is open and evaluate the VRF labels their
//! users' pending updates will need (DESIGN §4 step 2), so that sealing an epoch finds them in
//! the shard's [`ktd_core::user::LabelCache`] instead of paying ~30 µs of ECVRF per update on the
//! critical path. Purely an optimisation: a missed or wrong guess costs one VRF evaluation at
//! build time, never a different root.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;

use ktd_core::ShardMap;
use ktd_core::akd_core::AkdLabel;
use ktd_core::akd_core::configuration::Configuration;
use sequencer::pb::log_event::Kind;
use sequencer::{Sequencer, SequencerClient, pb};
use shard::node::ShardNode;
use tokio_util::sync::CancellationToken;

/// Labels evaluated in one go (bounded so the log keeps moving).
const FLUSH_LABELS: usize = 8192;
/// A quiet log flushes what is pending after this long.
const FLUSH_IDLE: Duration = Duration::from_millis(20);

/// Where the log comes from.
#[derive(Clone)]
pub enum LogSource {
    /// Sequencer nodes over gRPC (any node serves the log; the tailer moves on if one fails).
    Remote {
        /// A client for metadata reads.
        client: SequencerClient,
        /// The nodes' addresses.
        addrs: Vec<String>,
    },
    /// The sequencer in this process (`ktd dev`).
    Local(Sequencer),
}

type EventStream = BoxStream<'static, Result<pb::LogEvent, tonic::Status>>;

impl LogSource {
    fn addr(&self, attempt: usize) -> Option<&str> {
        match self {
            LogSource::Remote { addrs, .. } if !addrs.is_empty() => {
                Some(addrs[attempt % addrs.len()].as_str())
            }
            _ => None,
        }
    }

    async fn metadata(
        &self,
    ) -> Result<(pb::ClusterMetadata, ktd_proto::ktd::cluster::v1::ShardMap), String> {
        let (metadata, map) = match self {
            LogSource::Remote { client, .. } => {
                let answer = client
                    .cluster_metadata()
                    .await
                    .map_err(|error| error.to_string())?;
                (answer.metadata, answer.shard_map.unwrap_or_default())
            }
            LogSource::Local(sequencer) => sequencer.cluster_metadata(),
        };
        Ok((metadata.ok_or("the cluster has no metadata yet")?, map))
    }

    /// The open epoch's pending updates (remote: labels only, values empty) and the log index
    /// they are consistent with.
    async fn open_epoch(&self, attempt: usize) -> Result<(Vec<pb::SequencedUpdate>, u64), String> {
        match (self, self.addr(attempt)) {
            (LogSource::Remote { client, .. }, Some(addr)) => {
                let chunks = client
                    .open_epoch_labels_at(addr)
                    .await
                    .map_err(|error| error.to_string())?;
                let as_of = chunks.first().map_or(0, |chunk| chunk.as_of_index);
                let updates = chunks.into_iter().flat_map(|chunk| chunk.updates).collect();
                Ok((updates, as_of))
            }
            (LogSource::Local(sequencer), _) => {
                let batch = sequencer
                    .open_epoch()
                    .await
                    .map_err(|error| error.to_string())?;
                Ok((batch.updates, batch.as_of_index))
            }
            (LogSource::Remote { .. }, None) => Err("no sequencer addresses".into()),
        }
    }

    async fn watch(&self, attempt: usize, from: u64) -> Result<EventStream, String> {
        match (self, self.addr(attempt)) {
            (LogSource::Remote { client, .. }, Some(addr)) => Ok(client
                .watch_log_at(addr, from)
                .await
                .map_err(|error| error.to_string())?
                .boxed()),
            (LogSource::Local(sequencer), _) => Ok(sequencer
                .watch_log(from)
                .map_err(|error| error.to_string())?
                .map(|event| event.map_err(tonic::Status::from))
                .boxed()),
            (LogSource::Remote { .. }, None) => Err("no sequencer addresses".into()),
        }
    }
}

/// A tail that ran this long before it broke was healthy: the next retry starts from the
/// shortest delay again.
const TAIL_HEALTHY_AFTER: Duration = Duration::from_secs(30);

/// The wait before reconnecting after `failures` breaks in a row: 200 ms doubling to 10 s,
/// times a jitter factor in [0.5, 1.5) from `unit` in [0, 1), so shard servers that lost the
/// same sequencer do not reconnect in step.
fn tail_backoff(failures: u32, unit: f64) -> Duration {
    let base = Duration::from_millis(200 << failures.min(6)).min(Duration::from_secs(10));
    base.mul_f64(0.5 + unit.clamp(0.0, 1.0))
}

/// Tails the log from `source` until `shutdown`, pre-computing the labels of the updates whose
/// users shard `shard_id` owns. Reconnects (to the next node) after errors.
pub async fn precompute_from_log<TC: Configuration>(
    node: Arc<ShardNode<TC>>,
    shard_id: String,
    source: LogSource,
    shutdown: CancellationToken,
) {
    let mut attempt = 0;
    let mut failures_in_a_row = 0u32;
    let mut next_index = None;
    loop {
        let started = std::time::Instant::now();
        match follow(
            &node,
            &shard_id,
            &source,
            attempt,
            &mut next_index,
            &shutdown,
        )
        .await
        {
            Ok(()) => return,
            Err(error) => {
                if started.elapsed() > TAIL_HEALTHY_AFTER {
                    failures_in_a_row = 0;
                }
                let delay = tail_backoff(failures_in_a_row, rand::random::<f64>());
                tracing::debug!(%error, attempt, retry_in_ms = delay.as_millis() as u64, "log tail interrupted; reconnecting");
                attempt += 1;
                failures_in_a_row = failures_in_a_row.saturating_add(1);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

async fn follow<TC: Configuration>(
    node: &Arc<ShardNode<TC>>,
    shard_id: &str,
    source: &LogSource,
    attempt: usize,
    next_index: &mut Option<u64>,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let (metadata, map) = source.metadata().await?;
    let mut owners: ShardMap =
        shard::replicated::shard_map(&metadata, &map).map_err(|error| error.to_string())?;
    let mut pending: Vec<AkdLabel> = Vec::new();
    let owned = |owners: &ShardMap, updates: Vec<pb::SequencedUpdate>| {
        updates
            .into_iter()
            .filter(|update| {
                owners
                    .replicas(owners.user_partition(&update.label))
                    .role_of(shard_id)
                    .is_some()
            })
            .map(|update| AkdLabel(update.label))
            .collect::<Vec<_>>()
    };
    let from = match *next_index {
        Some(index) => index,
        None => {
            // (Re)starting: what the open epoch already holds, then the log after it.
            let (updates, as_of) = source.open_epoch(attempt).await?;
            pending.extend(owned(&owners, updates));
            as_of + 1
        }
    };
    let mut events = source.watch(attempt, from).await?;
    tracing::info!(from, "tailing the sequencer log to pre-compute VRF labels");
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            event = events.next() => event,
            () = tokio::time::sleep(FLUSH_IDLE), if !pending.is_empty() => {
                flush(node, &mut pending).await;
                continue;
            }
        };
        let event = match event {
            Some(Ok(event)) => event,
            Some(Err(status)) => {
                if status.code() == tonic::Code::OutOfRange {
                    // The position was purged: start again from the present.
                    *next_index = None;
                }
                return Err(status.to_string());
            }
            None => return Err("the log stream ended".into()),
        };
        *next_index = Some(event.index + 1);
        match event.kind {
            Some(Kind::Append(append)) => pending.extend(owned(&owners, append.updates)),
            Some(Kind::ShardMap(map)) => {
                owners = shard::replicated::shard_map(&metadata, &map)
                    .map_err(|error| error.to_string())?;
            }
            _ => {}
        }
        if pending.len() >= FLUSH_LABELS {
            flush(node, &mut pending).await;
        }
    }
}

async fn flush<TC: Configuration>(node: &Arc<ShardNode<TC>>, pending: &mut Vec<AkdLabel>) {
    let labels = std::mem::take(pending);
    let node = node.clone();
    match tokio::task::spawn_blocking(move || node.precompute_labels(labels)).await {
        Ok(Ok(count)) => {
            metrics::counter!("ktd_shard_precomputed_labels_total").increment(count as u64);
        }
        Ok(Err(error)) => tracing::warn!(%error, "pre-computing VRF labels failed"),
        Err(error) => tracing::warn!(%error, "pre-computing VRF labels panicked"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_reconnects_back_off_exponentially_with_jitter_up_to_a_cap() {
        let middle = |failures| tail_backoff(failures, 0.5);
        assert_eq!(middle(0), Duration::from_millis(200));
        assert_eq!(middle(1), Duration::from_millis(400));
        assert_eq!(middle(5), Duration::from_millis(6_400));
        assert_eq!(middle(6), Duration::from_secs(10));
        assert_eq!(middle(60), Duration::from_secs(10));
        assert_eq!(tail_backoff(0, 0.0), Duration::from_millis(100));
        assert!(tail_backoff(6, 0.999) < Duration::from_secs(15));
    }
}
