//! Leader duties: the seal timer.
//!
//! While this node leads, it seals the open epoch once it has been open for `epoch.interval` and
//! holds updates. An empty epoch is sealed only as a *heartbeat*, when
//! `epoch.heartbeat_interval` is set and the epoch has been open that long (its root equals the
//! previous one; its append-only step carries the root's children as unchanged nodes). The size limit needs no timer: the state
//! machine itself seals an epoch before an append would push it past `max_epoch_updates`, so a
//! backlog becomes several bounded epochs (bounded by updates and by bytes). Heartbeats pause
//! while a sealed epoch waits for its commit (backpressure: the state machine also refuses them
//! then, and refuses appends past `max_uncommitted_epochs`). Sealing is one small Raft entry proposed beside the
//! appends, so it never blocks them. `Seal(E)` names the epoch, so a seal that races another one
//! (an operator's "seal now", or a previous leader's timer) is harmless.

use std::time::{Duration, Instant};

use crate::error::SequencerError;
use crate::node::Sequencer;

/// Starts the duty loop for `sequencer` (runs until shutdown).
pub fn spawn(sequencer: Sequencer) {
    let duty = sequencer.clone();
    sequencer.spawn_task(async move { run(duty).await });
}

async fn run(sequencer: Sequencer) {
    let shutdown = sequencer.shutdown_token();
    let mut leader = sequencer.leader_changes();
    let interval = sequencer.config().epoch.interval;
    let heartbeat = sequencer.config().epoch.heartbeat_interval;
    let shortest = heartbeat.map_or(interval, |heartbeat| heartbeat.min(interval));
    let tick = (shortest / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        // Wait to become leader.
        while !leader.borrow_and_update().is_self {
            tokio::select! {
                changed = leader.changed() => if changed.is_err() { return },
                _ = shutdown.cancelled() => return,
            }
        }
        let term = leader.borrow().term;
        tracing::info!(term, "leading: seal timer armed");
        // The epoch counts as opened when this leader first saw it (conservative after a
        // failover: at most one extra interval).
        let (mut tracked_epoch, _, _) = sequencer.open_epoch_view();
        let mut opened_at = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = leader.changed() => {
                    if changed.is_err() { return }
                    let state = leader.borrow_and_update().clone();
                    if !state.is_self || state.term != term { break }
                }
                () = tokio::time::sleep(tick) => {}
            }
            let (open_epoch, open_updates, uncommitted) = sequencer.open_epoch_view();
            if open_epoch != tracked_epoch {
                tracked_epoch = open_epoch;
                opened_at = Instant::now();
            }
            let open_for = opened_at.elapsed();
            let sealed = if open_updates > 0 && open_for >= interval {
                sequencer.seal(Some(open_epoch)).await
            } else if open_updates == 0
                && heartbeat.is_some_and(|heartbeat| open_for >= heartbeat)
                && open_epoch > 1
                && uncommitted == 0
            {
                sequencer.heartbeat(open_epoch).await
            } else {
                continue;
            };
            match sealed {
                Ok(sealed) => {
                    tracing::info!(
                        epoch = sealed.epoch,
                        updates = sealed.updates,
                        "sealed epoch on timer"
                    );
                }
                Err(SequencerError::NotLeader { .. } | SequencerError::ShuttingDown) => {}
                Err(error) => tracing::warn!(epoch = open_epoch, %error, "timer seal failed"),
            }
        }
    }
}
