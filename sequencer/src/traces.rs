//! The trace contexts of traced updates, kept on the leader from `Append` until their epoch is
//! committed, so the coordinator can continue each publish's trace into the epoch's work
//! (`ktd.epoch.include` spans, and the shard's `ktd.shard.prepare_update` through
//! `PrepareEpochRequest.traces`).
//!
//! Telemetry only, deliberately not replicated: it stays out of the Raft log and snapshots. If
//! leadership changes before an epoch is built, the traces of its updates end at the sequencer.
//! Memory is bounded: at most [`MAX_PER_EPOCH`] traced labels per epoch and [`MAX_EPOCHS`]
//! epochs (the oldest are dropped first).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// Most traced updates remembered per epoch.
pub const MAX_PER_EPOCH: usize = 4096;
/// Most epochs remembered.
pub const MAX_EPOCHS: usize = 64;

/// Epoch → label → W3C `traceparent` of the `Append` that last wrote the label.
#[derive(Debug, Default)]
pub struct UpdateTraces {
    epochs: Mutex<BTreeMap<u64, HashMap<Vec<u8>, String>>>,
}

impl UpdateTraces {
    fn epochs(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, HashMap<Vec<u8>, String>>> {
        self.epochs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records that `labels` were appended to `epoch` under `traceparent`.
    pub fn record<'a>(
        &self,
        epoch: u64,
        labels: impl IntoIterator<Item = &'a [u8]>,
        traceparent: &str,
    ) {
        let mut epochs = self.epochs();
        let traced = epochs.entry(epoch).or_default();
        for label in labels {
            if traced.len() >= MAX_PER_EPOCH && !traced.contains_key(label) {
                break;
            }
            traced.insert(label.to_vec(), traceparent.to_string());
        }
        while epochs.len() > MAX_EPOCHS {
            epochs.pop_first();
        }
    }

    /// The traced labels of `epoch`.
    pub fn of_epoch(&self, epoch: u64) -> HashMap<Vec<u8>, String> {
        self.epochs().get(&epoch).cloned().unwrap_or_default()
    }

    /// Forgets `epoch` and every earlier one (called once `epoch` is committed).
    pub fn forget_through(&self, epoch: u64) {
        let mut epochs = self.epochs();
        *epochs = epochs.split_off(&(epoch + 1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_per_epoch_and_in_epochs_and_forgotten_on_commit() {
        let traces = UpdateTraces::default();
        let labels: Vec<Vec<u8>> = (0..MAX_PER_EPOCH + 10)
            .map(|i| i.to_string().into_bytes())
            .collect();
        traces.record(1, labels.iter().map(Vec::as_slice), "tp-a");
        assert_eq!(traces.of_epoch(1).len(), MAX_PER_EPOCH);
        // A later append of a remembered label replaces its context, even when full.
        traces.record(1, [labels[0].as_slice()], "tp-b");
        assert_eq!(traces.of_epoch(1)[&labels[0]], "tp-b");
        for epoch in 2..=(MAX_EPOCHS as u64 + 5) {
            traces.record(epoch, [b"x".as_slice()], "tp");
        }
        assert!(
            traces.of_epoch(1).is_empty(),
            "oldest epochs are dropped first"
        );
        traces.forget_through(MAX_EPOCHS as u64);
        assert!(traces.of_epoch(MAX_EPOCHS as u64).is_empty());
        assert_eq!(traces.of_epoch(MAX_EPOCHS as u64 + 1).len(), 1);
    }
}
