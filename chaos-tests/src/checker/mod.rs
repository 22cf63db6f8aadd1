//! Checkers: pure functions from a recorded [`History`] (and the [`FinalState`] read after
//! healing) to [`Verdict`]s. None of them trusts the system under test: each compares what
//! clients were told with what they later saw, and each has tests on crafted bad histories that
//! it must flag.
//!
//! | checker | property |
//! |---|---|
//! | [`epochs::monotonic_reads`] | latest-epoch reads never go back in real time |
//! | [`epochs::appends_land_in_open_epochs`] | an acknowledged publish never lands in an epoch already seen committed |
//! | [`epochs::no_fork`] | one root per epoch, across every client, gateway and node |
//! | [`register::reads_follow_the_log`] | every lookup returns the last value sequenced in epochs ≤ its epoch |
//! | [`durability::no_lost_publish`] | every acknowledged publish is in the final history (or lost to a later write of the same epoch) |
//! | [`proofs::proofs_verified`] | every lookup proof verified; every consecutive audit step verified |

use std::collections::BTreeMap;

use serde::Serialize;

use crate::history::{FinalState, History};

pub mod durability;
pub mod epochs;
pub mod proofs;
pub mod register;

/// One checker's judgement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Which checker.
    pub checker: &'static str,
    /// What was violated (empty: the property held).
    pub violations: Vec<String>,
    /// Counts that say how much was checked.
    pub checked: BTreeMap<&'static str, u64>,
}

impl Verdict {
    fn new(checker: &'static str) -> Self {
        Self {
            checker,
            violations: Vec::new(),
            checked: BTreeMap::new(),
        }
    }

    /// Whether the property held.
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    fn count(&mut self, what: &'static str) {
        *self.checked.entry(what).or_default() += 1;
    }

    fn violation(&mut self, message: String) {
        // A thousand examples are enough to diagnose anything.
        if self.violations.len() < 1000 {
            self.violations.push(message);
        }
    }
}

/// Runs every checker.
pub fn check_all(history: &History, final_state: &FinalState) -> Vec<Verdict> {
    vec![
        epochs::monotonic_reads(history),
        epochs::appends_land_in_open_epochs(history),
        epochs::no_fork(history, final_state),
        register::reads_follow_the_log(history),
        durability::no_lost_publish(history, final_state),
        proofs::proofs_verified(history, final_state),
    ]
}

#[cfg(test)]
pub(crate) mod test_history {
    //! Builders for crafted histories.
    use crate::history::{Event, History, Op, Outcome};

    #[derive(Default)]
    pub struct Builder {
        pub history: History,
        next_id: u64,
    }

    impl Builder {
        pub fn push(
            &mut self,
            client: u32,
            invoke_us: u64,
            complete_us: u64,
            op: Op,
            outcome: Outcome,
        ) -> &mut Self {
            self.next_id += 1;
            self.history.events.push(Event {
                id: self.next_id,
                client,
                gateway: "g1".into(),
                invoke_us,
                complete_us,
                op,
                outcome,
            });
            self
        }

        pub fn publish(
            &mut self,
            at: (u64, u64),
            key: &str,
            value: &str,
            outcome: Outcome,
        ) -> &mut Self {
            let op = Op::Publish {
                key: key.into(),
                value: value.into(),
                idempotency_key: format!("idem-{value}"),
            };
            self.push(1, at.0, at.1, op, outcome)
        }

        pub fn lookup(&mut self, at: (u64, u64), key: &str, outcome: Outcome) -> &mut Self {
            self.push(2, at.0, at.1, Op::Lookup { key: key.into() }, outcome)
        }
    }

    pub fn acked(epoch: u64, sequence: u64) -> Outcome {
        Outcome::Published { epoch, sequence }
    }

    pub fn found(epoch: u64, value: &str, value_epoch: u64) -> Outcome {
        Outcome::Found {
            epoch,
            root: format!("root{epoch}"),
            value: value.into(),
            version: 1,
            value_epoch,
            verified: true,
        }
    }

    pub fn unknown() -> Outcome {
        Outcome::Unknown {
            reason: "timeout".into(),
        }
    }
}
