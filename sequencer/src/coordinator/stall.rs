//! Commit stalls: the epoch the coordinator keeps failing to commit, for how long, and whether
//! it is *poisoned*.
//!
//! Most failed commits are transient (a replica unreachable, an election, a slow disk) and the
//! coordinator retries with backoff until the epoch commits. A poisoned epoch is one that every
//! replica answered and refused, [`POISON_AFTER`] attempts in a row (input the shards will not
//! take, or answers that contradict each other): retrying will not help and an operator must
//! act (see the runbook "An epoch does not commit"). Input limits enforced at `Append` are meant
//! to make this impossible; the verdict is the alarm for when they are not enough.
//!
//! [`Stall`] is pure (time is passed in); the coordinator feeds it and publishes
//! [`Stall::current`] in the leader's `NodeStatus`, the `ktd_epoch_commit_stall_seconds` and
//! `ktd_epoch_poisoned` gauges and `ktd admin status`.

use crate::pb;

/// Refusals in a row after which an epoch is reported poisoned.
pub const POISON_AFTER: u64 = 5;

/// Longest error kept (bytes); longer ones are cut at a character boundary.
const MAX_ERROR_BYTES: usize = 2048;

/// The coordinator's record of its current commit stall (none while epochs commit).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stall {
    current: Option<pb::CommitStall>,
    refusals_in_a_row: u64,
}

impl Stall {
    /// Records a failed attempt to commit `epoch` at `now_ms`; `refused` says every replica
    /// answered and refused it. Returns the stall as it now stands.
    pub fn failed(
        &mut self,
        epoch: u64,
        error: &str,
        refused: bool,
        now_ms: u64,
    ) -> &pb::CommitStall {
        if self
            .current
            .as_ref()
            .is_none_or(|stall| stall.epoch != epoch)
        {
            self.refusals_in_a_row = 0;
            self.current = Some(pb::CommitStall {
                epoch,
                since_ms: now_ms,
                ..Default::default()
            });
        }
        self.refusals_in_a_row = if refused {
            self.refusals_in_a_row + 1
        } else {
            0
        };
        let stall = self.current.get_or_insert_with(Default::default);
        stall.attempts += 1;
        stall.last_error = truncate(error);
        stall.poisoned = self.refusals_in_a_row >= POISON_AFTER;
        stall
    }

    /// The epoch committed (or this node stopped leading): no stall any more.
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// The current stall, if an epoch is failing.
    pub fn current(&self) -> Option<&pb::CommitStall> {
        self.current.as_ref()
    }
}

fn truncate(error: &str) -> String {
    if error.len() <= MAX_ERROR_BYTES {
        return error.to_string();
    }
    let mut end = MAX_ERROR_BYTES;
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &error[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_is_poisoned_only_after_consecutive_refusals_of_that_same_epoch() {
        let mut stall = Stall::default();
        for attempt in 1..POISON_AFTER {
            let now = stall.failed(7, "refused", true, 1_000 + attempt);
            assert!(!now.poisoned, "attempt {attempt}");
            assert_eq!(now.since_ms, 1_001);
        }
        // A transient failure in between restarts the count of refusals, not the stall.
        assert!(!stall.failed(7, "unreachable", false, 2_000).poisoned);
        for _ in 1..POISON_AFTER {
            assert!(!stall.failed(7, "refused", true, 3_000).poisoned);
        }
        let poisoned = stall.failed(7, "refused again", true, 4_000).clone();
        assert!(poisoned.poisoned);
        assert_eq!(poisoned.attempts, 2 * POISON_AFTER);
        assert_eq!(poisoned.since_ms, 1_001);
        assert_eq!(poisoned.last_error, "refused again");
        // The next epoch failing starts a new stall.
        let next = stall.failed(8, "refused", true, 5_000);
        assert_eq!((next.epoch, next.attempts, next.since_ms), (8, 1, 5_000));
        assert!(!next.poisoned);
        stall.clear();
        assert_eq!(stall.current(), None);
    }

    #[test]
    fn long_errors_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_ERROR_BYTES);
        let mut stall = Stall::default();
        let kept = &stall.failed(1, &long, false, 0).last_error;
        assert!(kept.len() <= MAX_ERROR_BYTES + '…'.len_utf8());
        assert!(kept.ends_with('…'));
    }
}
