//! Epoch-level properties: monotonic latest reads, appends only into open epochs, no fork.

use std::collections::BTreeMap;

use super::Verdict;
use crate::history::{Event, FinalState, History, Op, Outcome};

/// The epoch a latest-epoch read observed, if the event is one.
fn read_epoch(event: &Event) -> Option<u64> {
    match (&event.op, &event.outcome) {
        (
            Op::Lookup { .. } | Op::GetEpoch,
            Outcome::Found { epoch, .. } | Outcome::Epoch { epoch, .. },
        ) => Some(*epoch),
        (Op::Lookup { .. }, Outcome::Absent { epoch: Some(epoch) }) => Some(*epoch),
        _ => None,
    }
}

/// Reads of the latest epoch are linearizable: if read A completed before read B was invoked,
/// B's epoch is at least A's.
pub fn monotonic_reads(history: &History) -> Verdict {
    let mut verdict = Verdict::new("monotonic_reads");
    let mut reads: Vec<(&Event, u64)> = history
        .events
        .iter()
        .filter_map(|event| read_epoch(event).map(|epoch| (event, epoch)))
        .collect();
    let mut by_completion = reads.clone();
    by_completion.sort_by_key(|(event, _)| event.complete_us);
    reads.sort_by_key(|(event, _)| event.invoke_us);
    // Sweep in invocation order; `highest` is the largest epoch among reads completed so far.
    let mut completed = by_completion.iter().peekable();
    let mut highest: Option<(u64, u64)> = None;
    for (event, epoch) in reads {
        while let Some((done, done_epoch)) = completed.peek() {
            if done.complete_us >= event.invoke_us {
                break;
            }
            if highest.is_none_or(|(best, _)| *done_epoch > best) {
                highest = Some((*done_epoch, done.id));
            }
            completed.next();
        }
        verdict.count("reads");
        if let Some((best, witness)) = highest
            && epoch < best
        {
            verdict.violation(format!(
                "read {} saw epoch {epoch} after read {witness} had already returned epoch {best}",
                event.id
            ));
        }
    }
    verdict
}

/// An acknowledged publish is sealed in an epoch that no client had seen committed before the
/// publish was invoked (sealed epochs take no more updates).
pub fn appends_land_in_open_epochs(history: &History) -> Verdict {
    let mut verdict = Verdict::new("appends_land_in_open_epochs");
    let mut reads: Vec<(u64, u64, u64)> = history
        .events
        .iter()
        .filter_map(|event| read_epoch(event).map(|epoch| (event.complete_us, epoch, event.id)))
        .collect();
    reads.sort_unstable();
    let mut publishes: Vec<&Event> = history
        .events
        .iter()
        .filter(|event| matches!(event.outcome, Outcome::Published { .. }))
        .collect();
    publishes.sort_by_key(|event| event.invoke_us);
    let mut index = 0;
    let mut highest: Option<(u64, u64)> = None;
    for publish in publishes {
        while index < reads.len() && reads[index].0 < publish.invoke_us {
            if highest.is_none_or(|(best, _)| reads[index].1 > best) {
                highest = Some((reads[index].1, reads[index].2));
            }
            index += 1;
        }
        let Outcome::Published { epoch, .. } = publish.outcome else {
            continue;
        };
        verdict.count("acknowledged publishes");
        if let Some((committed, witness)) = highest
            && epoch <= committed
        {
            verdict.violation(format!(
                "publish {} was acknowledged for epoch {epoch}, but read {witness} had seen epoch {committed} committed before it was sent",
                publish.id
            ));
        }
    }
    verdict
}

/// Every epoch has one root, wherever it was observed: client answers, the gateway's final
/// reads, and every sequencer node's own state (sampled during the run and read in full after
/// it converged). After convergence every node must also hold every epoch up to the final one,
/// and every node must have answered.
pub fn no_fork(history: &History, final_state: &FinalState) -> Verdict {
    let mut verdict = Verdict::new("no_fork");
    for (node, last) in &final_state.replicas {
        verdict.count("replicas compared");
        if *last < final_state.epoch {
            verdict.violation(format!(
                "{node} holds committed epochs up to {last} only, after converging; the cluster's final epoch is {}",
                final_state.epoch
            ));
        }
    }
    for error in &final_state.replica_errors {
        verdict.violation(format!("a replica could not be compared: {error}"));
    }
    let mut roots: BTreeMap<u64, BTreeMap<String, String>> = BTreeMap::new();
    for event in &history.events {
        if let Outcome::Found { epoch, root, .. } | Outcome::Epoch { epoch, root } = &event.outcome
        {
            roots
                .entry(*epoch)
                .or_default()
                .entry(root.clone())
                .or_insert_with(|| format!("event {} via {}", event.id, event.gateway));
        }
    }
    for (epoch, root, source) in &final_state.roots {
        roots
            .entry(*epoch)
            .or_default()
            .entry(root.clone())
            .or_insert_with(|| source.clone());
    }
    for (epoch, seen) in roots {
        verdict.count("epochs");
        if seen.len() > 1 {
            let listing: Vec<String> = seen
                .iter()
                .map(|(root, source)| format!("{root} ({source})"))
                .collect();
            verdict.violation(format!(
                "epoch {epoch} has {} roots: {}",
                seen.len(),
                listing.join(", ")
            ));
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::test_history::{Builder, acked, found};

    #[test]
    fn a_read_going_back_is_flagged() {
        let mut history = Builder::default();
        history
            .lookup((0, 10), "k", found(5, "a", 1))
            .lookup((20, 30), "k", found(4, "a", 1));
        let verdict = monotonic_reads(&history.history);
        assert_eq!(verdict.violations.len(), 1, "{verdict:?}");
        // Concurrent reads may be in any order.
        let mut history = Builder::default();
        history
            .lookup((0, 30), "k", found(5, "a", 1))
            .lookup((10, 40), "k", found(4, "a", 1));
        assert!(monotonic_reads(&history.history).ok());
    }

    #[test]
    fn a_publish_into_a_committed_epoch_is_flagged() {
        let mut history = Builder::default();
        history
            .lookup((0, 10), "k", found(7, "a", 1))
            .publish((20, 30), "k", "b", acked(7, 3));
        assert!(!appends_land_in_open_epochs(&history.history).ok());
        let mut history = Builder::default();
        history
            .lookup((0, 10), "k", found(7, "a", 1))
            .publish((20, 30), "k", "b", acked(8, 3));
        assert!(appends_land_in_open_epochs(&history.history).ok());
    }

    #[test]
    fn two_roots_for_one_epoch_is_a_fork() {
        let mut history = Builder::default();
        history.lookup((0, 10), "k", found(3, "a", 1));
        let mut final_state = FinalState::default();
        final_state
            .roots
            .push((3, "other".into(), "sequencer node 2".into()));
        let verdict = no_fork(&history.history, &final_state);
        assert_eq!(verdict.violations.len(), 1, "{verdict:?}");
        final_state.roots[0].1 = "root3".into();
        assert!(no_fork(&history.history, &final_state).ok());
        // A replica that converged without the final epoch has lost state.
        final_state.epoch = 3;
        final_state.replicas = vec![("seq-1".into(), 3), ("seq-2".into(), 2)];
        let verdict = no_fork(&history.history, &final_state);
        assert_eq!(verdict.violations.len(), 1, "{verdict:?}");
        assert!(verdict.violations[0].contains("seq-2"), "{verdict:?}");
        final_state.replicas[1].1 = 3;
        assert!(no_fork(&history.history, &final_state).ok());
        final_state.replica_errors.push("seq-3: no answer".into());
        assert!(!no_fork(&history.history, &final_state).ok());
    }
}
