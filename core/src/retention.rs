//! The history retention window: which committed epochs stay readable
//! (`shard/docs/0003-retention-backup-recovery.md`).
//!
//! [`Retention`] is the replicated record the sequencer's state machine keeps: the window, the
//! pins and `safe_epoch`, the oldest readable epoch. Everything here is pure: the leader asks
//! [`Retention::target`] where `safe_epoch` may go, proposes it, and every replica of the state
//! applies it with [`Retention::advance`], which checks the same rules again.
//!
//! **Invariants** (kept by every method that changes the record):
//! - `safe_epoch` never decreases, and never exceeds the head (the latest committed epoch) it
//!   was advanced under;
//! - `safe_epoch` is never above the epoch of a live pin: a pin below it is refused when added
//!   ([`RetentionError::BadPin`]), and an advance past a live pin is refused;
//! - an epoch below `safe_epoch` is refused to readers with [`crate::Error::EpochPruned`],
//!   which names the oldest readable epoch.

use std::collections::BTreeMap;

/// The default window: 30 days (issue 17; the IETF draft's `maximum_lifetime` is the same idea).
pub const DEFAULT_WINDOW: Window = Window::Millis(30 * 24 * 3_600_000);

/// How much history the window keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// Every epoch stays readable.
    Forever,
    /// The latest `n` epochs before the head stay readable (epochs `head − n ..= head`).
    Epochs(u64),
    /// Epochs committed within this many milliseconds of now stay readable, and so does the
    /// newest epoch committed before that (so the window is never empty).
    Millis(u64),
}

/// A hold on history: `safe_epoch` stays at or below `epoch` while the pin lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pin {
    /// Who holds it (`backup`, `copy`, `auditor`, `operator`…), for status and alerts.
    pub owner: String,
    /// The oldest epoch it needs readable.
    pub epoch: u64,
    /// When it lapses by itself (leader wall clock, ms since the Unix epoch).
    pub expires_at_ms: u64,
    /// Why, in the holder's words.
    pub reason: String,
    /// When it came to hold `epoch` (leader wall clock, ms; a renewal at the same epoch keeps
    /// it): a pin much older than its purpose is stale.
    pub created_at_ms: u64,
}

/// Why a change to the retention record or a read was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RetentionError {
    /// An advance would move `safe_epoch` backwards, past the head or past a live pin.
    #[error("safe epoch {proposed} refused: {reason}")]
    Refused {
        /// The proposed safe epoch.
        proposed: u64,
        /// What it would break.
        reason: String,
    },
    /// A pin that has already expired, names no owner, or needs an epoch already below
    /// `safe_epoch`.
    #[error("pin {id:?} refused: {reason}")]
    BadPin {
        /// The pin's id.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The replicated retention record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    /// The window.
    pub window: Window,
    /// Live pins by id.
    pub pins: BTreeMap<String, Pin>,
    /// The oldest readable epoch.
    pub safe_epoch: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            window: DEFAULT_WINDOW,
            pins: BTreeMap::new(),
            safe_epoch: 0,
        }
    }
}

impl Retention {
    /// The pins that have not expired at `now_ms`.
    pub fn live_pins(&self, now_ms: u64) -> impl Iterator<Item = (&String, &Pin)> {
        self.pins
            .iter()
            .filter(move |(_, pin)| pin.expires_at_ms > now_ms)
    }

    /// The ids of the pins that expired at `now_ms` (the leader proposes their removal).
    pub fn expired_pins(&self, now_ms: u64) -> Vec<String> {
        self.pins
            .iter()
            .filter(|(_, pin)| pin.expires_at_ms <= now_ms)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Where `safe_epoch` may go with the latest committed epoch `head` at `now_ms`:
    /// min(the window's bound, the oldest live pin), and never below the current value.
    /// `newest_committed_before(ms)` is the newest epoch committed at or before `ms` (0 if
    /// none): the bound of a [`Window::Millis`] window.
    pub fn target(
        &self,
        head: u64,
        now_ms: u64,
        newest_committed_before: impl Fn(u64) -> u64,
    ) -> u64 {
        let by_window = match self.window {
            Window::Forever => 0,
            Window::Epochs(keep) => head.saturating_sub(keep),
            Window::Millis(keep) => newest_committed_before(now_ms.saturating_sub(keep)),
        };
        let by_pins = self
            .live_pins(now_ms)
            .map(|(_, pin)| pin.epoch)
            .min()
            .unwrap_or(u64::MAX);
        by_window.min(by_pins).min(head).max(self.safe_epoch)
    }

    /// Applies a proposed `safe_epoch` under head `head` at `now_ms` (the entry's time): equal
    /// to the current value is a no-op; lower, above the head or above a live pin is refused.
    pub fn advance(&mut self, proposed: u64, head: u64, now_ms: u64) -> Result<(), RetentionError> {
        let refuse = |reason: String| Err(RetentionError::Refused { proposed, reason });
        if proposed < self.safe_epoch {
            return refuse(format!(
                "the safe epoch is already {} and never decreases",
                self.safe_epoch
            ));
        }
        if proposed > head {
            return refuse(format!("the latest committed epoch is {head}"));
        }
        if let Some((id, pin)) = self
            .live_pins(now_ms)
            .min_by_key(|(_, pin)| pin.epoch)
            .filter(|(_, pin)| pin.epoch < proposed)
        {
            return refuse(format!(
                "pin {id:?} ({}) holds epoch {}",
                pin.owner, pin.epoch
            ));
        }
        self.safe_epoch = proposed;
        Ok(())
    }

    /// Adds (or replaces) pin `id` at `now_ms`. Refused if it needs an epoch already below
    /// `safe_epoch`, has expired, or names no owner. Replacing a pin at the same epoch (a
    /// renewal) keeps its `created_at_ms`: a pin's age is how long it has held that epoch, so a
    /// holder that renews without moving (a stuck auditor or archive) ages into the stale-pin
    /// alert.
    pub fn add_pin(&mut self, id: &str, mut pin: Pin, now_ms: u64) -> Result<(), RetentionError> {
        let bad = |reason: String| {
            Err(RetentionError::BadPin {
                id: id.to_string(),
                reason,
            })
        };
        if pin.owner.is_empty() {
            return bad("it names no owner".into());
        }
        if pin.expires_at_ms <= now_ms {
            return bad("it has already expired".into());
        }
        if let Err(error) = self.check_readable(pin.epoch) {
            return bad(error.to_string());
        }
        if let Some(held) = self.pins.get(id).filter(|held| held.epoch == pin.epoch) {
            pin.created_at_ms = held.created_at_ms;
        }
        self.pins.insert(id.to_string(), pin);
        Ok(())
    }

    /// Removes pin `id`; `None` if there was none.
    pub fn remove_pin(&mut self, id: &str) -> Option<Pin> {
        self.pins.remove(id)
    }

    /// Whether `epoch` may be read: [`crate::Error::EpochPruned`] below `safe_epoch`.
    pub fn check_readable(&self, epoch: u64) -> crate::Result<()> {
        check_retained(epoch, self.safe_epoch)
    }
}

/// Whether `epoch` may be read where the oldest readable epoch is `safe_epoch`: the one check
/// the gateway, the shards and the record itself make.
pub fn check_retained(epoch: u64, safe_epoch: u64) -> crate::Result<()> {
    if epoch < safe_epoch {
        return Err(crate::Error::EpochPruned {
            epoch,
            oldest: safe_epoch,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin(owner: &str, epoch: u64, expires_at_ms: u64) -> Pin {
        Pin {
            owner: owner.into(),
            epoch,
            expires_at_ms,
            reason: String::new(),
            created_at_ms: 0,
        }
    }

    fn epochs(keep: u64) -> Retention {
        Retention {
            window: Window::Epochs(keep),
            ..Retention::default()
        }
    }

    #[test]
    fn forever_keeps_every_epoch() {
        let retention = Retention {
            window: Window::Forever,
            ..Retention::default()
        };
        assert_eq!(retention.target(1_000, 0, |_| 999), 0);
        assert!(retention.check_readable(0).is_ok());
    }

    #[test]
    fn an_epoch_window_keeps_the_latest_epochs_and_the_safe_epoch_never_decreases() {
        let mut retention = epochs(20);
        assert_eq!(retention.target(10, 0, |_| 0), 0);
        assert_eq!(retention.target(300, 0, |_| 0), 280);
        retention.advance(280, 300, 0).expect("advance");
        assert!(matches!(
            retention.check_readable(279),
            Err(crate::Error::EpochPruned {
                epoch: 279,
                oldest: 280
            })
        ));
        assert!(retention.check_readable(280).is_ok());
        // A wider window later cannot bring pruned epochs back.
        retention.window = Window::Epochs(1_000);
        assert_eq!(retention.target(300, 0, |_| 0), 280);
        assert!(matches!(
            retention.advance(100, 300, 0),
            Err(RetentionError::Refused { .. })
        ));
        // Equal is a no-op; past the head is refused.
        retention.advance(280, 300, 0).expect("no-op");
        assert!(matches!(
            retention.advance(301, 300, 0),
            Err(RetentionError::Refused { .. })
        ));
    }

    #[test]
    fn a_time_window_keeps_the_newest_epoch_committed_before_its_start() {
        let retention = Retention {
            window: Window::Millis(60_000),
            ..Retention::default()
        };
        // Epoch e committed at e seconds: at t = 200 s the window starts at 140 s.
        let committed_before = |ms: u64| ms / 1_000;
        assert_eq!(retention.target(200, 200_000, committed_before), 140);
    }

    #[test]
    fn a_live_pin_holds_the_safe_epoch_and_an_expired_one_does_not() {
        let mut retention = epochs(20);
        retention
            .add_pin("backup-1", pin("backup", 150, 10_000), 0)
            .expect("pin");
        assert_eq!(retention.target(300, 0, |_| 0), 150);
        let refused = retention.advance(151, 300, 0);
        assert!(
            matches!(&refused, Err(RetentionError::Refused { reason, .. }) if reason.contains("backup-1")),
            "{refused:?}"
        );
        retention.advance(150, 300, 0).expect("up to the pin");
        // Expired: it no longer holds anything, and the leader is told to remove it.
        assert_eq!(retention.target(300, 10_000, |_| 0), 280);
        assert_eq!(retention.expired_pins(10_000), vec!["backup-1".to_string()]);
        retention
            .advance(280, 300, 10_000)
            .expect("past the expired pin");
        assert!(retention.remove_pin("backup-1").is_some());
        assert!(retention.pins.is_empty());
    }

    #[test]
    fn a_pin_below_the_safe_epoch_an_expired_pin_and_an_ownerless_pin_are_refused() {
        let mut retention = epochs(20);
        retention.advance(280, 300, 0).expect("advance");
        let late = retention.add_pin("late", pin("backup", 279, 10_000), 0);
        assert!(
            matches!(&late, Err(RetentionError::BadPin { reason, .. }) if reason.contains("oldest readable epoch is 280")),
            "{late:?}"
        );
        assert!(matches!(
            retention.add_pin("old", pin("backup", 290, 5), 5),
            Err(RetentionError::BadPin { .. })
        ));
        assert!(matches!(
            retention.add_pin("anon", pin("", 290, 10_000), 0),
            Err(RetentionError::BadPin { .. })
        ));
        retention
            .add_pin("hold", pin("operator", 280, 10_000), 0)
            .expect("at the safe epoch");
    }

    #[test]
    fn a_renewal_at_the_same_epoch_keeps_the_pins_age_and_a_move_restarts_it() {
        let mut retention = epochs(20);
        let at = |epoch, created_at_ms| Pin {
            created_at_ms,
            ..pin("auditor", epoch, 100_000)
        };
        retention
            .add_pin("auditor-a", at(5, 1_000), 1_000)
            .expect("add");
        retention
            .add_pin("auditor-a", at(5, 9_000), 9_000)
            .expect("renew");
        assert_eq!(
            retention.pins["auditor-a"].created_at_ms, 1_000,
            "renewed, not moved"
        );
        retention
            .add_pin("auditor-a", at(6, 9_500), 9_500)
            .expect("move");
        assert_eq!(retention.pins["auditor-a"].created_at_ms, 9_500, "moved");
    }
}
