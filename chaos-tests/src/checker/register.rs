//! Per-key consistency of lookups against the sequencer's order.
//!
//! ktd's write path has a total order the client can see: a publish is acknowledged with the
//! epoch it is sealed in and its sequence number, and a lookup answers "as of epoch E". The
//! value a lookup at E must return is therefore determined: the value of the publish with the
//! largest `(epoch, sequence)` among those sealed in epochs ≤ E (last writer wins within an
//! epoch). This is linearizability with the write's linearization point at its position in the
//! sequencer's log, made visible at its epoch's commit — checked by replaying that order instead
//! of searching for one (the order is known), WGL-style only where it is not: publishes with an
//! unknown outcome may or may not have taken effect, and one that was seen has an unknown
//! sequence number, so only what is contradictory in every placement is flagged.

use std::collections::HashMap;

use super::Verdict;
use crate::history::{Event, History, Op, Outcome};

#[derive(Clone, Copy, Debug)]
enum Known {
    /// Acknowledged: sealed in `epoch` at `sequence`.
    Acked { epoch: u64, sequence: u64 },
    /// Outcome unknown: may have been applied, at an unknown position.
    Unknown,
    /// Definitely not applied.
    Failed,
}

struct Publish<'a> {
    event: &'a Event,
    known: Known,
}

/// Every lookup returns the value the sequencer's order puts at its epoch.
pub fn reads_follow_the_log(history: &History) -> Verdict {
    let mut verdict = Verdict::new("reads_follow_the_log");
    let mut by_value: HashMap<(&str, &str), Publish<'_>> = HashMap::new();
    let mut acked_by_key: HashMap<&str, Vec<(u64, u64, &str)>> = HashMap::new();
    for event in &history.events {
        let Op::Publish { key, value, .. } = &event.op else {
            continue;
        };
        let known = match event.outcome {
            Outcome::Published { epoch, sequence } => {
                acked_by_key
                    .entry(key)
                    .or_default()
                    .push((epoch, sequence, value));
                Known::Acked { epoch, sequence }
            }
            Outcome::Failed { .. } => Known::Failed,
            _ => Known::Unknown,
        };
        if by_value
            .insert((key.as_str(), value.as_str()), Publish { event, known })
            .is_some()
        {
            verdict.violation(format!(
                "the workload published value {value} of {key} twice; values must be unique"
            ));
        }
    }
    for acked in acked_by_key.values_mut() {
        acked.sort_unstable();
    }
    // The latest acknowledged publish of `key` sealed at or before `epoch`.
    let latest_acked = |key: &str, epoch: u64| -> Option<(u64, u64, &str)> {
        let acked = acked_by_key.get(key)?;
        let end = acked.partition_point(|(sealed, _, _)| *sealed <= epoch);
        end.checked_sub(1).map(|index| acked[index])
    };

    for lookup in &history.events {
        let Op::Lookup { key } = &lookup.op else {
            continue;
        };
        match &lookup.outcome {
            Outcome::Found {
                epoch,
                value,
                value_epoch,
                ..
            } => {
                verdict.count("lookups that found a value");
                let Some(publish) = by_value.get(&(key.as_str(), value.as_str())) else {
                    verdict.violation(format!(
                        "lookup {} of {key} at epoch {epoch} returned {value}, which no client published",
                        lookup.id
                    ));
                    continue;
                };
                if value_epoch > epoch {
                    verdict.violation(format!(
                        "lookup {} at epoch {epoch} returned a version from the later epoch {value_epoch}",
                        lookup.id
                    ));
                }
                match publish.known {
                    Known::Failed => verdict.violation(format!(
                        "lookup {} returned {value} of {key}, whose publish {} was refused",
                        lookup.id, publish.event.id
                    )),
                    Known::Acked {
                        epoch: sealed,
                        sequence,
                    } => {
                        if sealed != *value_epoch {
                            verdict.violation(format!(
                                "publish {} was acknowledged for epoch {sealed} but lookup {} says it was published in epoch {value_epoch}",
                                publish.event.id, lookup.id
                            ));
                        }
                        if let Some((later_epoch, later_sequence, later_value)) =
                            latest_acked(key, *epoch)
                            && (later_epoch, later_sequence) > (sealed, sequence)
                        {
                            verdict.violation(format!(
                                "stale read: lookup {} of {key} at epoch {epoch} returned {value} (epoch {sealed}, seq {sequence}) although {later_value} was sealed later (epoch {later_epoch}, seq {later_sequence})",
                                lookup.id
                            ));
                        }
                    }
                    Known::Unknown => {
                        if publish.event.invoke_us > lookup.complete_us {
                            verdict.violation(format!(
                                "lookup {} returned {value} of {key} before publish {} was sent",
                                lookup.id, publish.event.id
                            ));
                        }
                        // Its sequence is unknown, but an acknowledged write sealed in a strictly
                        // later epoch (still ≤ the lookup's) must win over it.
                        if let Some((later_epoch, _, later_value)) = latest_acked(key, *epoch)
                            && later_epoch > *value_epoch
                        {
                            verdict.violation(format!(
                                "stale read: lookup {} of {key} at epoch {epoch} returned {value} (epoch {value_epoch}) although {later_value} was sealed in epoch {later_epoch}",
                                lookup.id
                            ));
                        }
                    }
                }
            }
            Outcome::Absent { epoch: Some(epoch) } => {
                verdict.count("lookups that found nothing");
                if let Some((sealed, _, value)) = latest_acked(key, *epoch) {
                    verdict.violation(format!(
                        "lookup {} of {key} at epoch {epoch} found nothing although {value} was sealed in epoch {sealed}",
                        lookup.id
                    ));
                }
            }
            _ => {}
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::test_history::{Builder, acked, found, unknown};

    #[test]
    fn correct_reads_pass() {
        let mut history = Builder::default();
        history
            .publish((0, 5), "k", "a", acked(2, 10))
            .publish((6, 9), "k", "b", acked(2, 11))
            .publish((10, 12), "k", "c", acked(3, 12))
            .lookup((20, 21), "k", found(2, "b", 2))
            .lookup((30, 31), "k", found(3, "c", 3))
            .lookup((1, 2), "k", Outcome::Absent { epoch: Some(1) });
        let verdict = reads_follow_the_log(&history.history);
        assert!(verdict.ok(), "{verdict:?}");
    }

    #[test]
    fn stale_and_phantom_reads_are_flagged() {
        let mut history = Builder::default();
        history
            .publish((0, 5), "k", "a", acked(2, 10))
            .publish((6, 9), "k", "b", acked(2, 11))
            // Same epoch, lower sequence: last writer wins, so "a" is stale at epoch 2.
            .lookup((20, 21), "k", found(2, "a", 2))
            // Nothing published "z".
            .lookup((22, 23), "k", found(2, "z", 2))
            // "b" was sealed in epoch 2, so epoch 2 cannot be empty.
            .lookup((24, 25), "k", Outcome::Absent { epoch: Some(2) });
        let verdict = reads_follow_the_log(&history.history);
        assert_eq!(verdict.violations.len(), 3, "{verdict:#?}");
    }

    #[test]
    fn unknown_publishes_may_or_may_not_apply() {
        let mut history = Builder::default();
        history
            .publish((0, 5), "k", "a", acked(2, 10))
            .publish((6, 100), "k", "b", unknown())
            // b may have been sequenced after a in epoch 2: allowed.
            .lookup((20, 21), "k", found(2, "b", 2))
            // ...or never applied: also allowed.
            .lookup((30, 31), "k", found(2, "a", 2));
        assert!(reads_follow_the_log(&history.history).ok());

        let mut history = Builder::default();
        history
            .publish((0, 5), "k", "b", unknown())
            .publish((6, 9), "k", "a", acked(3, 10))
            // b (epoch 2) cannot be the latest at epoch 3 once a was sealed in epoch 3.
            .lookup((20, 21), "k", found(3, "b", 2));
        assert_eq!(reads_follow_the_log(&history.history).violations.len(), 1);

        let mut history = Builder::default();
        history
            .lookup((0, 1), "k", found(2, "b", 2))
            .publish((5, 9), "k", "b", unknown());
        assert_eq!(
            reads_follow_the_log(&history.history).violations.len(),
            1,
            "read before write"
        );
    }
}
