//! No acknowledged publish is lost, none is applied twice, and each key's final history is a
//! well-formed version chain.

use std::collections::HashMap;

use super::Verdict;
use crate::history::{FinalState, History, Op, Outcome};

/// Checks the final histories against what was acknowledged.
pub fn no_lost_publish(history: &History, final_state: &FinalState) -> Verdict {
    let mut verdict = Verdict::new("no_lost_publish");
    // (key, value) -> (outcome, event id)
    let mut publishes: HashMap<(&str, &str), (&Outcome, u64)> = HashMap::new();
    let mut acked: Vec<(&str, &str, u64, u64, u64)> = Vec::new();
    for event in &history.events {
        if let Op::Publish { key, value, .. } = &event.op {
            publishes.insert((key, value), (&event.outcome, event.id));
            if let Outcome::Published { epoch, sequence } = event.outcome {
                acked.push((key, value, epoch, sequence, event.id));
            }
        }
    }

    // Per key: value -> (version, epoch); epoch -> value.
    let mut by_value: HashMap<(&str, &str), (u64, u64)> = HashMap::new();
    let mut by_epoch: HashMap<(&str, u64), &str> = HashMap::new();
    for (key, versions) in &final_state.histories {
        verdict.count("keys");
        let mut chain: Vec<&(String, u64, u64)> = versions.iter().collect();
        chain.sort_by_key(|(_, version, _)| *version);
        for (index, (value, version, epoch)) in chain.iter().enumerate() {
            if *version != index as u64 + 1 {
                verdict.violation(format!(
                    "{key}: versions are not 1, 2, 3, ...: found {version} at position {}",
                    index + 1
                ));
            }
            if index > 0 && chain[index - 1].2 >= *epoch {
                verdict.violation(format!(
                    "{key}: version {version} is not in a later epoch than version {}",
                    version - 1
                ));
            }
            if by_value.insert((key, value), (*version, *epoch)).is_some() {
                verdict.violation(format!("{key}: value {value} was applied twice"));
            }
            by_epoch.insert((key, *epoch), value);
            match publishes.get(&(key.as_str(), value.as_str())) {
                None => verdict.violation(format!(
                    "{key}: version {version} holds {value}, which no client published"
                )),
                Some((Outcome::Failed { .. }, id)) => verdict.violation(format!(
                    "{key}: refused publish {id} was applied as version {version}"
                )),
                _ => {}
            }
        }
    }

    for (key, value, epoch, sequence, id) in &acked {
        verdict.count("acknowledged publishes");
        match by_value.get(&(*key, *value)) {
            Some((_, applied_epoch)) if applied_epoch == epoch => {}
            Some((_, applied_epoch)) => verdict.violation(format!(
                "publish {id} of {key} was acknowledged for epoch {epoch} but applied in epoch {applied_epoch}"
            )),
            None => {
                // Legitimately gone only if a later write of the same epoch replaced it.
                let replaced_by = by_epoch.get(&(*key, *epoch)).and_then(|winner| publishes.get(&(*key, *winner)));
                match replaced_by {
                    Some((Outcome::Published { epoch: winner_epoch, sequence: winner_sequence }, _))
                        if winner_epoch == epoch && winner_sequence > sequence => {}
                    Some((Outcome::Unknown { .. }, _)) => {}
                    Some((_, winner)) => verdict.violation(format!(
                        "lost publish {id} of {key} (epoch {epoch}, seq {sequence}): epoch {epoch} holds the value of publish {winner}, which was sequenced before it"
                    )),
                    None => verdict.violation(format!(
                        "lost publish {id} of {key}: acknowledged for epoch {epoch}, absent from the final history"
                    )),
                }
            }
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::test_history::{Builder, acked, unknown};

    /// `(value, version, epoch)` rows of one key's history.
    type Versions<'a> = &'a [(&'a str, u64, u64)];

    fn final_state(entries: &[(&str, Versions<'_>)]) -> FinalState {
        FinalState {
            epoch: 10,
            histories: entries
                .iter()
                .map(|(key, versions)| {
                    (
                        key.to_string(),
                        versions
                            .iter()
                            .map(|(value, version, epoch)| (value.to_string(), *version, *epoch))
                            .collect(),
                    )
                })
                .collect(),
            ..FinalState::default()
        }
    }

    #[test]
    fn acknowledged_publishes_are_found() {
        let mut history = Builder::default();
        history
            .publish((0, 1), "k", "a", acked(2, 1))
            .publish((2, 3), "k", "b", acked(3, 2))
            .publish((4, 5), "k", "c", acked(3, 3))
            .publish((6, 7), "k", "d", unknown());
        let good = final_state(&[("k", &[("c", 2, 3), ("a", 1, 2)])]);
        let verdict = no_lost_publish(&history.history, &good);
        assert!(verdict.ok(), "b was replaced by c in epoch 3: {verdict:?}");

        let lost = final_state(&[("k", &[("a", 1, 2)])]);
        assert_eq!(
            no_lost_publish(&history.history, &lost).violations.len(),
            2,
            "b and c lost"
        );

        let duplicated = final_state(&[("k", &[("c", 3, 4), ("c", 2, 3), ("a", 1, 2)])]);
        assert!(!no_lost_publish(&history.history, &duplicated).ok());

        let reordered = final_state(&[("k", &[("b", 2, 3), ("a", 1, 2)])]);
        assert!(
            !no_lost_publish(&history.history, &reordered).ok(),
            "c was sequenced after b"
        );
    }
}
