//! Every proof a client got verified, and the audit chain has no gap.

use super::Verdict;
use crate::history::{FinalState, History, Outcome};

/// Lookup proofs verified when received; every step `e → e+1` up to the final epoch has a
/// verifying append-only proof.
pub fn proofs_verified(history: &History, final_state: &FinalState) -> Verdict {
    let mut verdict = Verdict::new("proofs_verified");
    for event in &history.events {
        if let Outcome::Found {
            verified, epoch, ..
        } = &event.outcome
        {
            verdict.count("lookup proofs");
            if !verified {
                verdict.violation(format!(
                    "lookup {} at epoch {epoch}: the proof did not verify",
                    event.id
                ));
            }
        }
        if let Outcome::Unverified { reason } = &event.outcome {
            verdict.count("answers that did not verify");
            verdict.violation(format!(
                "{:?} {}: the answer did not verify: {reason}",
                event.op, event.id
            ));
        }
    }
    for problem in &final_state.unverified {
        verdict.violation(format!("final read: {problem}"));
    }
    let mut audited: Vec<(u64, bool)> = final_state.audits.clone();
    audited.sort_unstable();
    for start in 0..final_state.epoch {
        verdict.count("audit steps");
        match audited.binary_search_by_key(&start, |(epoch, _)| *epoch) {
            Ok(index) if audited[index].1 => {}
            Ok(_) => verdict.violation(format!(
                "audit step {start} -> {} did not verify",
                start + 1
            )),
            Err(_) => verdict.violation(format!("audit step {start} -> {} is missing", start + 1)),
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::test_history::Builder;

    #[test]
    fn unverified_proofs_and_audit_gaps_are_flagged() {
        let mut history = Builder::default();
        history.lookup(
            (0, 1),
            "k",
            Outcome::Found {
                epoch: 2,
                root: "r".into(),
                value: "v".into(),
                version: 1,
                value_epoch: 1,
                verified: false,
            },
        );
        history.lookup(
            (2, 3),
            "k",
            Outcome::Unverified {
                reason: "bad membership proof".into(),
            },
        );
        let final_state = FinalState {
            epoch: 3,
            audits: vec![(0, true), (2, false)],
            unverified: vec!["history of k: bad proof".into()],
            ..FinalState::default()
        };
        let verdict = proofs_verified(&history.history, &final_state);
        assert_eq!(verdict.violations.len(), 5, "{verdict:#?}");
    }
}
