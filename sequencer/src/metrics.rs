//! The sequencer's Prometheus series beyond the per-node status gauges set in
//! [`crate::node::Sequencer::export_metrics`]: replication progress per follower, membership,
//! Raft log durability latency, epoch seal and inclusion latency, epoch age.
//!
//! The mapping from openraft's [`RaftMetrics`] to follower gauges is the pure function
//! [`follower_progress`], unit-tested below. A follower's gauges are set while this node leads
//! and set to NaN ("unknown") when it stops leading or the follower leaves, because the `metrics`
//! facade cannot remove a series.
//!
//! Definitions (also in the metrics catalogue, `docs/metrics.md`):
//! - `ktd_epoch_seal_duration_seconds`: an epoch's `committed_at_ms − sealed_at_ms` from its
//!   replicated [`pb::EpochRecord`], i.e. seal → committed root, across coordinator retries and
//!   leader changes (`ktd_epoch_commit_duration_seconds` times one successful coordinator pass).
//! - `ktd_publish_to_inclusion_seconds`: on the leader, from an `Append` being acknowledged
//!   (committed and applied) to the root of its epoch being committed, observed per update by
//!   the coordinator that committed it. Appends acknowledged by an earlier leader are not
//!   observed (the seal histogram still covers their epochs).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ktd_proto::ktd::sequencer::v1 as pb;
use openraft::{Instant as _, ServerState};

use crate::raft::NodeId;
use crate::raft::types::{RaftMetrics, TypeConfig};

/// The clock openraft stamps heartbeat acknowledgements with.
pub type RaftInstant = openraft::alias::InstantOf<TypeConfig>;

/// One follower's replication progress as the leader sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct FollowerProgress {
    /// The follower (or learner).
    pub follower: NodeId,
    /// Entries the leader holds that the follower has not acknowledged.
    pub lag_entries: u64,
    /// Time since the send time of the latest request this follower acknowledged; `None` if it
    /// never acknowledged one in this term.
    pub heartbeat_ack_age: Option<Duration>,
}

/// The progress of every other voter and learner, from the leader's Raft metrics; empty unless
/// `metrics` is a leader's.
pub fn follower_progress(metrics: &RaftMetrics, now: RaftInstant) -> Vec<FollowerProgress> {
    if metrics.state != ServerState::Leader {
        return Vec::new();
    }
    let Some(replication) = &metrics.replication else {
        return Vec::new();
    };
    let last_log_index = metrics.last_log_index.unwrap_or(0);
    replication
        .iter()
        .filter(|(follower, _)| **follower != metrics.id)
        .map(|(follower, matched)| {
            let matched_index = matched.as_ref().map_or(0, |log_id| log_id.index());
            let heartbeat_ack_age = metrics
                .heartbeat
                .as_ref()
                .and_then(|heartbeat| heartbeat.get(follower).cloned().flatten())
                .map(|acked| now.saturating_duration_since(*acked));
            FollowerProgress {
                follower: *follower,
                lag_entries: last_log_index.saturating_sub(matched_index),
                heartbeat_ack_age,
            }
        })
        .collect()
}

/// Whether the effective membership is a joint configuration (a change in progress).
pub fn membership_is_joint(metrics: &RaftMetrics) -> bool {
    metrics
        .membership_config
        .membership()
        .get_joint_config()
        .len()
        > 1
}

/// Sets the Raft gauges that need more than the node status, remembering which followers it
/// exported so their series can be marked unknown later.
#[derive(Debug, Default)]
pub struct RaftExporter {
    followers: Mutex<BTreeSet<NodeId>>,
}

impl RaftExporter {
    /// Sets `ktd_raft_follower_lag_entries`, `ktd_raft_heartbeat_ack_age_seconds`,
    /// `ktd_raft_membership_joint` and `ktd_raft_purged_index` from `metrics`.
    pub fn export(&self, metrics: &RaftMetrics) {
        metrics::gauge!("ktd_raft_membership_joint")
            .set(f64::from(u8::from(membership_is_joint(metrics))));
        metrics::gauge!("ktd_raft_purged_index")
            .set(metrics.purged.as_ref().map_or(0, |log_id| log_id.index()) as f64);
        let progress = follower_progress(metrics, RaftInstant::now());
        let mut exported = self
            .followers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let current: BTreeSet<NodeId> = progress.iter().map(|entry| entry.follower).collect();
        for gone in exported.difference(&current) {
            let follower = gone.to_string();
            metrics::gauge!("ktd_raft_follower_lag_entries", "follower" => follower.clone())
                .set(f64::NAN);
            metrics::gauge!("ktd_raft_heartbeat_ack_age_seconds", "follower" => follower)
                .set(f64::NAN);
        }
        for entry in &progress {
            let follower = entry.follower.to_string();
            metrics::gauge!("ktd_raft_follower_lag_entries", "follower" => follower.clone())
                .set(entry.lag_entries as f64);
            // Never acknowledged in this term: infinitely old, so an age alert fires.
            metrics::gauge!("ktd_raft_heartbeat_ack_age_seconds", "follower" => follower).set(
                entry
                    .heartbeat_ack_age
                    .map_or(f64::INFINITY, |age| age.as_secs_f64()),
            );
        }
        *exported = current;
    }
}

/// Records an epoch this node's coordinator has just committed (not a repeat of an earlier
/// commit): its seal latency and its number of updates.
pub fn record_epoch_committed(record: &pb::EpochRecord) {
    if record.sealed_at_ms > 0 && record.committed_at_ms >= record.sealed_at_ms {
        let seal_ms = record.committed_at_ms - record.sealed_at_ms;
        metrics::histogram!("ktd_epoch_seal_duration_seconds").record(seal_ms as f64 / 1000.0);
    }
    metrics::histogram!("ktd_epoch_updates").record(record.updates as f64);
}

/// Sets `ktd_epoch_age_seconds`: now − the wall-clock commit time of the latest committed epoch.
pub fn export_epoch_age(committed_at_ms: u64, now_ms: u64) {
    let age_ms = now_ms.saturating_sub(committed_at_ms);
    metrics::gauge!("ktd_epoch_age_seconds").set(age_ms as f64 / 1000.0);
}

/// Records the Raft log's durability latency: one WAL fsync covering `appends` appends, each
/// started at its `Instant` (`ktd_storage_raft_log_fsync_seconds`,
/// `ktd_storage_raft_log_append_seconds`).
pub fn record_raft_log_sync(fsync_started: Instant, appends: impl IntoIterator<Item = Instant>) {
    let synced = Instant::now();
    metrics::histogram!("ktd_storage_raft_log_fsync_seconds")
        .record(synced.duration_since(fsync_started).as_secs_f64());
    let append = metrics::histogram!("ktd_storage_raft_log_append_seconds");
    for started in appends {
        append.record(synced.duration_since(started).as_secs_f64());
    }
}

/// Acknowledged appends per epoch, until the coordinator commits the epoch: the source of
/// `ktd_publish_to_inclusion_seconds`. Appends acknowledged within [`Self::COALESCE`] of each
/// other share one entry, and at most [`Self::MAX_EPOCHS`] × [`Self::MAX_POINTS`] entries are
/// kept, so memory stays bounded whatever the load.
#[derive(Debug, Default)]
pub struct InclusionTracker {
    acked: Mutex<BTreeMap<u64, Vec<(Instant, u64)>>>,
}

impl InclusionTracker {
    /// Appends acknowledged this close together are timed as one.
    pub const COALESCE: Duration = Duration::from_millis(10);
    /// Epochs tracked at most (the oldest are dropped: their commits are not observed).
    pub const MAX_EPOCHS: usize = 64;
    /// Time points kept per epoch; later appends join the last point.
    pub const MAX_POINTS: usize = 4096;

    /// Notes that `updates` updates of `epoch` were acknowledged at `acked_at`.
    pub fn acknowledged(&self, epoch: u64, updates: u64, acked_at: Instant) {
        let mut acked = self.lock();
        let points = acked.entry(epoch).or_default();
        let full = points.len() >= Self::MAX_POINTS;
        match points.last_mut() {
            Some((at, count))
                if full || acked_at.saturating_duration_since(*at) < Self::COALESCE =>
            {
                *count += updates
            }
            _ => points.push((acked_at, updates)),
        }
        while acked.len() > Self::MAX_EPOCHS {
            acked.pop_first();
        }
    }

    /// Observes every tracked update of epochs up to `epoch` as included at `committed_at`,
    /// and forgets them.
    pub fn committed(&self, epoch: u64, committed_at: Instant) {
        let included = {
            let mut acked = self.lock();
            let later = acked.split_off(&(epoch + 1));
            std::mem::replace(&mut *acked, later)
        };
        let histogram = metrics::histogram!("ktd_publish_to_inclusion_seconds");
        for (acked_at, updates) in included.into_values().flatten() {
            let seconds = committed_at
                .saturating_duration_since(acked_at)
                .as_secs_f64();
            histogram.record_many(seconds, usize::try_from(updates).unwrap_or(usize::MAX));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Vec<(Instant, u64)>>> {
        self.acked
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    #[cfg(test)]
    fn tracked(&self) -> Vec<(u64, u64)> {
        self.lock()
            .iter()
            .map(|(epoch, points)| (*epoch, points.iter().map(|(_, count)| count).sum()))
            .collect()
    }
}

/// Servers with a `ktd_batch_retention_pin_epoch` series (set to NaN once they leave the map).
static PINNED_SERVERS: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Sets the `WatchLog` gauges: `ktd_sequencer_watch_subscribers` (streams open on this node)
/// and `ktd_sequencer_watch_buffered_bytes` (events read for them and not yet taken).
pub fn export_watch(subscribers: usize, buffered_bytes: u64) {
    metrics::gauge!("ktd_sequencer_watch_subscribers").set(subscribers as f64);
    metrics::gauge!("ktd_sequencer_watch_buffered_bytes").set(buffered_bytes as f64);
}

/// Sets the commit-stall gauges of the coordinator on this node:
/// `ktd_epoch_commit_stall_seconds` (how long the epoch it drives has been failing; 0 while
/// epochs commit) and `ktd_epoch_poisoned` (1 while every replica refuses that epoch, see
/// `coordinator::stall`).
pub fn export_commit_stall(stall: Option<&pb::CommitStall>, now_ms: u64) {
    let (seconds, poisoned) = stall.map_or((0.0, false), |stall| {
        (
            now_ms.saturating_sub(stall.since_ms) as f64 / 1000.0,
            stall.poisoned,
        )
    });
    metrics::gauge!("ktd_epoch_commit_stall_seconds").set(seconds);
    metrics::gauge!("ktd_epoch_poisoned").set(if poisoned { 1.0 } else { 0.0 });
}

/// Counts a `WatchLog` subscriber dropped for reading too slowly
/// (`ktd_sequencer_watch_dropped_total`).
pub fn record_watch_dropped() {
    metrics::counter!("ktd_sequencer_watch_dropped_total").increment(1);
}

/// Sets the batch-retention gauges from the replicated state (every node exports them; they are
/// the same on every caught-up member):
/// - `ktd_batch_retained` (batches), `ktd_batch_retained_bytes` and `ktd_batch_retention_max_bytes`;
/// - `ktd_batch_oldest_retained_sealed_at_seconds` (Unix time; age = `time() - …`) and
///   `ktd_batch_retention_max_age_seconds`;
/// - `ktd_batch_retention_pin_epoch{server}`: each assigned shard server's durable epoch, which
///   pins the batches after it (the lowest one is the oldest pin).
pub fn export_retention(retention: &pb::BatchRetention) {
    metrics::gauge!("ktd_batch_retained").set(retention.batches as f64);
    metrics::gauge!("ktd_batch_retained_bytes").set(retention.bytes as f64);
    metrics::gauge!("ktd_batch_retention_max_bytes").set(retention.max_bytes as f64);
    metrics::gauge!("ktd_batch_retention_max_age_seconds")
        .set(retention.max_age_ms as f64 / 1000.0);
    metrics::gauge!("ktd_batch_oldest_retained_sealed_at_seconds").set(
        if retention.oldest_sealed_at_ms == 0 {
            f64::NAN
        } else {
            retention.oldest_sealed_at_ms as f64 / 1000.0
        },
    );
    let current: BTreeSet<String> = retention
        .pins
        .iter()
        .map(|pin| pin.server.clone())
        .collect();
    for pin in &retention.pins {
        metrics::gauge!("ktd_batch_retention_pin_epoch", "server" => pin.server.clone())
            .set(pin.built_epoch as f64);
    }
    let mut exported = PINNED_SERVERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for gone in exported.difference(&current) {
        metrics::gauge!("ktd_batch_retention_pin_epoch", "server" => gone.clone()).set(f64::NAN);
    }
    *exported = current;
}

/// Exports the history retention record (ADR 0003):
/// - `ktd_retention_safe_epoch`: the oldest readable epoch; `ktd_retention_retained_epochs`:
///   epochs readable (head − safe epoch + 1);
/// - `ktd_retention_window_epochs` / `ktd_retention_window_seconds`: the window (NaN for the
///   other kind; both NaN for `forever`);
/// - `ktd_retention_pins` and `ktd_retention_oldest_pin_created_at_seconds` (Unix time, NaN
///   without pins): alert `KtdRetentionPinStale` fires on a pin held for more than a day, the
///   forgotten-protected-timestamp failure that fills disks.
pub fn export_history(history: &pb::HistoryRetention, head: u64, _now_ms: u64) {
    use pb::retention_window::Kind;
    metrics::gauge!("ktd_retention_safe_epoch").set(history.safe_epoch as f64);
    metrics::gauge!("ktd_retention_retained_epochs")
        .set((head.saturating_sub(history.safe_epoch) + 1) as f64);
    let (epochs, seconds) = match history.window.as_ref().and_then(|window| window.kind) {
        Some(Kind::Epochs(epochs)) => (epochs as f64, f64::NAN),
        Some(Kind::Millis(millis)) => (f64::NAN, millis as f64 / 1000.0),
        _ => (f64::NAN, f64::NAN),
    };
    metrics::gauge!("ktd_retention_window_epochs").set(epochs);
    metrics::gauge!("ktd_retention_window_seconds").set(seconds);
    metrics::gauge!("ktd_retention_pins").set(history.pins.len() as f64);
    metrics::gauge!("ktd_retention_oldest_pin_created_at_seconds").set(
        history
            .pins
            .iter()
            .map(|pin| pin.created_at_ms)
            .min()
            .map_or(f64::NAN, |ms| ms as f64 / 1000.0),
    );
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use openraft::metrics::SerdeInstant;
    use openraft::vote::RaftLeaderId;

    use super::*;
    use crate::raft::types::{LeaderId, LogId, Membership, StoredMembership};

    fn leader_metrics(now: RaftInstant) -> RaftMetrics {
        let mut metrics = RaftMetrics::new_initial(1);
        metrics.state = ServerState::Leader;
        metrics.current_leader = Some(1);
        metrics.last_log_index = Some(10);
        let log_id = |index| Some(LogId::new(LeaderId::new(2, 1), index));
        metrics.replication = Some(BTreeMap::from([(1, log_id(10)), (2, log_id(7)), (3, None)]));
        metrics.heartbeat = Some(BTreeMap::from([
            (1, Some(SerdeInstant::new(now))),
            (
                2,
                Some(SerdeInstant::new(now - Duration::from_millis(1500))),
            ),
            (3, None),
        ]));
        metrics
    }

    #[test]
    fn a_leader_reports_each_other_members_lag_and_ack_age() {
        let now = RaftInstant::now();
        let progress = follower_progress(&leader_metrics(now), now);
        assert_eq!(
            progress,
            vec![
                FollowerProgress {
                    follower: 2,
                    lag_entries: 3,
                    heartbeat_ack_age: Some(Duration::from_millis(1500)),
                },
                FollowerProgress {
                    follower: 3,
                    lag_entries: 10,
                    heartbeat_ack_age: None,
                },
            ]
        );
    }

    #[test]
    fn a_follower_reports_no_progress() {
        let now = RaftInstant::now();
        let mut metrics = leader_metrics(now);
        metrics.state = ServerState::Follower;
        assert!(follower_progress(&metrics, now).is_empty());
        metrics.state = ServerState::Leader;
        metrics.replication = None;
        assert!(follower_progress(&metrics, now).is_empty());
    }

    #[test]
    fn joint_membership_is_detected() {
        let node = |addr: &str| crate::raft::types::Node { addr: addr.into() };
        let nodes = BTreeMap::from([(1, node("a")), (2, node("b")), (3, node("c"))]);
        let mut metrics = RaftMetrics::new_initial(1);
        let uniform =
            Membership::new(vec![BTreeSet::from([1, 2])], nodes.clone()).expect("membership");
        metrics.membership_config = Arc::new(StoredMembership::new(None, uniform));
        assert!(!membership_is_joint(&metrics));
        let joint = Membership::new(
            vec![BTreeSet::from([1, 2]), BTreeSet::from([1, 2, 3])],
            nodes,
        )
        .expect("membership");
        metrics.membership_config = Arc::new(StoredMembership::new(None, joint));
        assert!(membership_is_joint(&metrics));
    }

    #[test]
    fn inclusion_tracker_coalesces_and_forgets_committed_epochs() {
        let tracker = InclusionTracker::default();
        let start = Instant::now();
        tracker.acknowledged(3, 2, start);
        tracker.acknowledged(3, 5, start + Duration::from_millis(1));
        tracker.acknowledged(3, 1, start + Duration::from_millis(50));
        tracker.acknowledged(4, 7, start + Duration::from_millis(60));
        assert_eq!(tracker.tracked(), vec![(3, 8), (4, 7)]);
        assert_eq!(
            tracker.lock()[&3].len(),
            2,
            "the first two appends share a point"
        );
        tracker.committed(3, start + Duration::from_secs(1));
        assert_eq!(tracker.tracked(), vec![(4, 7)]);
        for epoch in 10..10 + InclusionTracker::MAX_EPOCHS as u64 + 5 {
            tracker.acknowledged(epoch, 1, start);
        }
        assert_eq!(tracker.tracked().len(), InclusionTracker::MAX_EPOCHS);
        assert_eq!(
            tracker.tracked()[0].0,
            15,
            "the oldest epochs are dropped first"
        );
    }
}
