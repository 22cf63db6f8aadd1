//! The run report: the fault timeline with per-fault figures (write unavailability, time to new
//! leader, p99 publish latency during the fault, epochs delayed), every checker's verdict, SLO
//! checks, and the exit code. Rendered as text for people and JSON for tools.
//!
//! Definitions (all on the history's monotonic clock):
//! - **write unavailability**: from the fault to the first acknowledged publish that was
//!   *sent* after it (a publish sent before the fault and acknowledged after does not count: it
//!   may have been sequenced before the fault took effect).
//! - **time to new leader**: from the fault to the first poll in which another sequencer
//!   reported itself leader (leader faults only).
//! - **p99 publish latency during the fault**: over acknowledged publishes sent between the
//!   fault and its heal plus the unavailability after the heal (at least 5 s).
//! - **epochs delayed**: in the same window, the largest gap between two newly committed
//!   epochs seen by the epoch poller, in epoch intervals, minus one.
//! - **longest commit gap**: the largest gap between the first sightings (by the epoch poller
//!   or a lookup) of two consecutive newly committed epochs, from the last commit before the
//!   fault through the same window to the first commit after it (so a stall that outlasts the
//!   window is measured whole; with no commit after it, up to the last recorded operation).
//! - **failed reads**: lookups that ended without an answer (a timeout, `UNAVAILABLE`, any
//!   refusal other than "not found"), in the window per fault and over the whole run. A lookup
//!   that answered with a proof that did not verify is a correctness violation instead.

use std::fmt::Write as _;
use std::time::Duration;

use ktd_testkit::stats::nearest_rank;
use serde::Serialize;

use crate::checker::Verdict;
use crate::history::{History, Op, Outcome};
use crate::nemesis::FaultRecord;
use crate::scenario::Slo;

/// Exit codes of `ktd-chaos`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Exit {
    /// Every checker passed and every SLO held.
    Ok = 0,
    /// A checker found a correctness violation.
    Violation = 1,
    /// Correct, but an SLO was breached (including "did not heal in time").
    SloBreach = 2,
    /// The harness could not do its job (not the system's fault).
    Harness = 3,
}

/// Figures for one fault.
#[derive(Clone, Debug, Serialize)]
pub struct FaultFigures {
    /// The fault.
    pub fault: FaultRecord,
    /// Write unavailability, ms (`None`: no publish was acknowledged after it).
    pub write_unavailable_ms: Option<u64>,
    /// Time to a new leader, ms.
    pub new_leader_ms: Option<u64>,
    /// p99 latency of acknowledged publishes in the fault window, ms.
    pub p99_publish_ms: Option<u64>,
    /// Acknowledged publishes in the window.
    pub publishes_in_window: u64,
    /// Epoch intervals missed in the window.
    pub epochs_delayed: u64,
    /// Longest gap between consecutive committed epochs around the fault, ms (`None`: no
    /// epoch was ever seen).
    pub max_commit_gap_ms: Option<u64>,
    /// Lookups invoked in the window that ended without an answer.
    pub failed_reads: u64,
}

/// One SLO check.
#[derive(Clone, Debug, Serialize)]
pub struct SloCheck {
    /// What.
    pub what: String,
    /// Whether it held.
    pub ok: bool,
}

/// A run's report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Seed.
    pub seed: u64,
    /// Fault window length, s.
    pub duration_s: f64,
    /// Operation counts.
    pub ops: std::collections::BTreeMap<&'static str, u64>,
    /// Per-fault figures.
    pub faults: Vec<FaultFigures>,
    /// Lookups over the whole run that ended without an answer.
    pub failed_reads: u64,
    /// Checker verdicts.
    pub verdicts: Vec<Verdict>,
    /// SLO checks.
    pub slo: Vec<SloCheck>,
    /// Why the final state could not be read (the cluster did not heal), if so.
    pub heal_error: Option<String>,
    /// The sequencers after the heal: one leader every node follows and has caught up with
    /// (an error names the disagreement).
    pub converged: Result<crate::nemesis::Converged, String>,
    /// Positive-control mutation applied to the history, if any.
    pub mutation: Option<String>,
    /// Deliberately broken mode the cluster ran in (a positive control), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broken_mode: Option<String>,
    /// The verdict.
    pub exit: Exit,
}

/// Figures for every fault in `faults`.
pub fn fault_figures(
    history: &History,
    faults: &[FaultRecord],
    epoch_interval: Duration,
) -> Vec<FaultFigures> {
    // (invoke, complete) of acknowledged publishes, by invoke.
    let mut acked: Vec<(u64, u64)> = history
        .events
        .iter()
        .filter(|e| {
            matches!(e.op, Op::Publish { .. }) && matches!(e.outcome, Outcome::Published { .. })
        })
        .map(|e| (e.invoke_us, e.complete_us))
        .collect();
    acked.sort_unstable();
    // When each epoch was first seen committed.
    let mut first_seen: std::collections::BTreeMap<u64, u64> = Default::default();
    for event in &history.events {
        if let Outcome::Epoch { epoch, .. } | Outcome::Found { epoch, .. } = event.outcome {
            let at = first_seen.entry(epoch).or_insert(event.complete_us);
            *at = (*at).min(event.complete_us);
        }
    }
    let interval_us = epoch_interval.as_micros().max(1) as u64;
    let commits: Vec<u64> = {
        let mut times: Vec<u64> = first_seen.values().copied().collect();
        times.sort_unstable();
        times
    };
    let last_event_us = history
        .events
        .iter()
        .map(|e| e.complete_us)
        .max()
        .unwrap_or(0);
    let failed: Vec<u64> = history
        .events
        .iter()
        .filter(|e| is_failed_read(e))
        .map(|e| e.invoke_us)
        .collect();
    faults
        .iter()
        .map(|fault| {
            let start = fault.injected_us;
            let write_unavailable_ms = acked
                .iter()
                .filter(|(invoke, _)| *invoke >= start)
                .map(|(_, complete)| complete - start)
                .min()
                .map(|us| us / 1000);
            let new_leader_ms = fault
                .new_leader_us
                .map(|at| at.saturating_sub(start) / 1000);
            let after_heal = fault.healed_us.unwrap_or(start).saturating_sub(start);
            let window_us = after_heal + (write_unavailable_ms.unwrap_or(0) * 1000).max(5_000_000);
            let end = start + window_us;
            let mut latencies: Vec<u64> = acked
                .iter()
                .filter(|(invoke, _)| (start..end).contains(invoke))
                .map(|(invoke, complete)| (complete - invoke) / 1000)
                .collect();
            latencies.sort_unstable();
            // Epoch commits seen in the window, plus the last one before it.
            let before = first_seen
                .values()
                .copied()
                .filter(|at| *at < start)
                .max()
                .unwrap_or(start);
            let mut times: Vec<u64> = std::iter::once(before)
                .chain(
                    first_seen
                        .values()
                        .copied()
                        .filter(|at| (start..end).contains(at)),
                )
                .collect();
            times.sort_unstable();
            let gap = times
                .windows(2)
                .map(|pair| pair[1] - pair[0])
                .max()
                .unwrap_or(0);
            FaultFigures {
                fault: fault.clone(),
                write_unavailable_ms,
                new_leader_ms,
                p99_publish_ms: nearest_rank(&latencies, 0.99),
                publishes_in_window: latencies.len() as u64,
                epochs_delayed: (gap / interval_us).saturating_sub(1),
                max_commit_gap_ms: commit_gap_us(&commits, start, end, last_event_us)
                    .map(|us| us / 1000),
                failed_reads: failed
                    .iter()
                    .filter(|at| (start..end).contains(*at))
                    .count() as u64,
            }
        })
        .collect()
}

/// A lookup that ended without an answer (see the module docs).
pub fn is_failed_read(event: &crate::history::Event) -> bool {
    matches!(event.op, Op::Lookup { .. })
        && matches!(
            event.outcome,
            Outcome::Unknown { .. } | Outcome::Failed { .. }
        )
}

/// Lookups in `history` that ended without an answer.
pub fn failed_reads(history: &History) -> u64 {
    history.events.iter().filter(|e| is_failed_read(e)).count() as u64
}

/// The longest gap between consecutive `commits` (sorted first-sighting times) from the last
/// one before `start`, through `[start, end)`, to the first one at or after `end` (or
/// `last_event_us` if there is none). `None` if no epoch was ever seen.
fn commit_gap_us(commits: &[u64], start: u64, end: u64, last_event_us: u64) -> Option<u64> {
    let before = commits.iter().copied().rfind(|at| *at < start);
    let after = commits
        .iter()
        .copied()
        .find(|at| *at >= end)
        .unwrap_or(last_event_us.max(start));
    let times: Vec<u64> = before
        .into_iter()
        .chain(
            commits
                .iter()
                .copied()
                .filter(|at| (start..end).contains(at)),
        )
        .chain(std::iter::once(after))
        .collect();
    if commits.is_empty() {
        return None;
    }
    times.windows(2).map(|pair| pair[1] - pair[0]).max()
}

/// SLO checks over the figures, the run's failed reads and the heal.
pub fn slo_checks(
    figures: &[FaultFigures],
    slo: &Slo,
    failed_reads: u64,
    heal_error: Option<&str>,
    converged: &Result<crate::nemesis::Converged, String>,
) -> Vec<SloCheck> {
    let mut checks = Vec::new();
    let limit_ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if let Some(limit) = slo.max_failed_reads {
        checks.push(SloCheck {
            what: format!(
                "failed reads (lookups without an answer) over the run: {failed_reads} <= {limit}"
            ),
            ok: failed_reads <= limit,
        });
    }
    for figure in figures.iter().filter(|f| f.fault.installed()) {
        let name = format!("{:?} {}", figure.fault.kind, figure.fault.target);
        if let Some(limit) = slo.max_commit_gap {
            checks.push(SloCheck {
                what: format!(
                    "{name}: longest gap between committed epochs {} <= {}",
                    show_ms(figure.max_commit_gap_ms),
                    humantime::format_duration(limit)
                ),
                ok: figure
                    .max_commit_gap_ms
                    .is_some_and(|ms| ms <= limit_ms(limit)),
            });
        }
        if let Some(replica) = &figure.fault.replica {
            let rebuilt = figure.fault.kind != crate::nemesis::FaultKind::WipeReplica
                || replica.partitions_copied > 0;
            checks.push(SloCheck {
                what: match &replica.error {
                    None => format!(
                        "{name}: back: SERVING {} after the heal, voter with lag 0 in {} partitions after {} (<= {}); {} partition copies for {}{}",
                        show_ms(replica.serving_ms),
                        replica.voter_after.len(),
                        show_ms(replica.caught_up_ms),
                        humantime::format_duration(slo.max_heal),
                        replica.partitions_copied,
                        replica.server,
                        if rebuilt { "" } else { " (a wiped replica must be rebuilt by copies)" }
                    ),
                    Some(error) => format!("{name}: not back: {error}"),
                },
                ok: replica.error.is_none()
                    && rebuilt
                    && replica
                        .caught_up_ms
                        .is_some_and(|ms| ms <= limit_ms(slo.max_heal)),
            });
        }
        let unavailable = figure.write_unavailable_ms;
        checks.push(SloCheck {
            what: format!(
                "{name}: write unavailability {} <= {}",
                show_ms(unavailable),
                humantime::format_duration(slo.max_write_unavailable)
            ),
            ok: unavailable.is_some_and(|ms| ms <= limit_ms(slo.max_write_unavailable)),
        });
        if let Some(p99) = figure.p99_publish_ms {
            checks.push(SloCheck {
                what: format!(
                    "{name}: p99 publish {p99} ms <= {}",
                    humantime::format_duration(slo.max_p99_publish)
                ),
                ok: p99 <= limit_ms(slo.max_p99_publish),
            });
        }
        if let Some(snapshot) = &figure.fault.snapshot {
            checks.push(SloCheck {
                what: match (&snapshot.error, snapshot.catch_up_ms) {
                    (None, Some(ms)) => format!(
                        "{name}: caught up {ms} ms after restart (<= {}) by installing a snapshot: {}",
                        humantime::format_duration(slo.max_heal),
                        if snapshot.via_snapshot { "yes" } else { "NO (log replay)" }
                    ),
                    (Some(error), _) => format!("{name}: snapshot catch-up: {error}"),
                    (None, None) => format!("{name}: did not catch up"),
                },
                ok: snapshot.error.is_none()
                    && snapshot.via_snapshot
                    && snapshot
                        .catch_up_ms
                        .is_some_and(|ms| ms <= limit_ms(slo.max_heal)),
            });
        }
        if let Some(rebalance) = &figure.fault.rebalance {
            checks.push(SloCheck {
                what: match (&rebalance.error, rebalance.balanced_ms) {
                    (None, Some(ms)) => format!(
                        "{name}: balanced {ms} ms after it joined: {} votes in {} partitions, copies per server {:?}",
                        rebalance.server,
                        rebalance.voter_of.len(),
                        rebalance.copies
                    ),
                    (Some(error), _) => format!("{name}: not balanced: {error}"),
                    (None, None) => format!("{name}: not balanced"),
                },
                ok: rebalance.error.is_none() && rebalance.balanced_ms.is_some(),
            });
        }
        if let Some(change) = &figure.fault.membership {
            checks.push(SloCheck {
                what: match &change.error {
                    None => format!(
                        "{name}: learner caught up in {}, promoted in {}, removed in {}",
                        show_ms(change.learner_ms),
                        show_ms(change.promote_ms),
                        show_ms(change.remove_ms)
                    ),
                    Some(error) => format!("{name}: membership change failed: {error}"),
                },
                ok: change.error.is_none() && change.remove_ms.is_some(),
            });
        }
    }
    checks.push(SloCheck {
        what: match heal_error {
            None => format!(
                "healed: the last acknowledged epoch committed within {}",
                humantime::format_duration(slo.max_heal)
            ),
            Some(error) => format!("healed: {error}"),
        },
        ok: heal_error.is_none(),
    });
    checks.push(SloCheck {
        what: match converged {
            Ok(c) => format!(
                "converged: every sequencer follows seq-{} (term {}) and has caught up, {} ms after the final reads",
                c.leader, c.term, c.waited_ms
            ),
            Err(error) => format!(
                "converged within {}: {error}",
                humantime::format_duration(slo.max_heal)
            ),
        },
        ok: converged.is_ok(),
    });
    checks
}

/// The exit code for verdicts and SLO checks.
pub fn exit_code(verdicts: &[Verdict], slo: &[SloCheck]) -> Exit {
    if verdicts.iter().any(|v| !v.ok()) {
        Exit::Violation
    } else if slo.iter().any(|c| !c.ok) {
        Exit::SloBreach
    } else {
        Exit::Ok
    }
}

fn show_ms(ms: Option<u64>) -> String {
    ms.map_or_else(|| "never".to_string(), |ms| format!("{ms} ms"))
}

/// Median and p99 of the figures that exist.
pub fn summary(values: impl Iterator<Item = Option<u64>>) -> (Option<u64>, Option<u64>, usize) {
    let mut sorted: Vec<u64> = values.flatten().collect();
    sorted.sort_unstable();
    (
        nearest_rank(&sorted, 0.5),
        nearest_rank(&sorted, 0.99),
        sorted.len(),
    )
}

impl Report {
    /// The human-readable report.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "ktd-chaos: scenario {} seed {} ({:.1} s)",
            self.scenario, self.seed, self.duration_s
        );
        if let Some(mutation) = &self.mutation {
            let _ = writeln!(
                out,
                "POSITIVE CONTROL: the history was mutated ({mutation}); a violation is expected"
            );
        }
        if let Some(mode) = &self.broken_mode {
            let _ = writeln!(
                out,
                "POSITIVE CONTROL: the cluster ran in a deliberately broken mode ({mode}); a violation is expected"
            );
        }
        let ops: Vec<String> = self.ops.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(out, "operations: {}", ops.join(", "));
        let _ = writeln!(
            out,
            "failed reads (lookups without an answer): {}",
            self.failed_reads
        );
        let _ = writeln!(out, "\ntimeline (s since start):");
        for figure in &self.faults {
            let fault = &figure.fault;
            let at = fault.injected_us as f64 / 1e6;
            match &fault.status {
                crate::nemesis::FaultStatus::Skipped { reason } => {
                    let _ = writeln!(out, "  {at:7.2}  {:?} skipped: {reason}", fault.kind);
                }
                crate::nemesis::FaultStatus::Installed => {
                    let healed = fault
                        .healed_us
                        .map_or_else(|| "-".into(), |us| format!("{:.2}", us as f64 / 1e6));
                    let leader = match (fault.leader_before, fault.new_leader) {
                        (Some(old), Some(new)) => format!(", leader {old} -> {new}"),
                        _ => String::new(),
                    };
                    let _ = writeln!(
                        out,
                        "  {at:7.2}  {:?} {} (healed {healed}{leader}): writes unavailable {}, new leader after {}, p99 publish {} over {} publishes, epochs delayed {}, longest commit gap {}, failed reads {}",
                        fault.kind,
                        fault.target,
                        show_ms(figure.write_unavailable_ms),
                        show_ms(figure.new_leader_ms),
                        show_ms(figure.p99_publish_ms),
                        figure.publishes_in_window,
                        figure.epochs_delayed,
                        show_ms(figure.max_commit_gap_ms),
                        figure.failed_reads
                    );
                    if let Some(rebalance) = &fault.rebalance {
                        let _ = writeln!(
                            out,
                            "           rebalance onto {}: balanced after {}; votes in {} partitions; copies per server {:?}{}",
                            rebalance.server,
                            show_ms(rebalance.balanced_ms),
                            rebalance.voter_of.len(),
                            rebalance.copies,
                            rebalance
                                .error
                                .as_ref()
                                .map_or_else(String::new, |e| format!("; ERROR {e}"))
                        );
                    }
                    if let Some(replica) = &fault.replica {
                        let _ = writeln!(
                            out,
                            "           replica {}: voter in {} partitions before; SERVING {} after the heal, voter with lag 0 in {} partitions after {}; {} partition copies{}",
                            replica.server,
                            replica.voter_before.len(),
                            show_ms(replica.serving_ms),
                            replica.voter_after.len(),
                            show_ms(replica.caught_up_ms),
                            replica.partitions_copied,
                            replica
                                .error
                                .as_ref()
                                .map_or_else(String::new, |e| format!("; ERROR {e}"))
                        );
                    }
                    if let Some(snap) = &fault.snapshot {
                        let _ = writeln!(
                            out,
                            "           snapshot catch-up: follower's log ended at {}; snapshots (node, index, purged) {:?} built in {} ms; leader purged to {}; follower caught up to {} in {} (snapshot index {}, install logged: {}, via snapshot: {}){}",
                            snap.follower_last_log_before,
                            snap.snapshots,
                            snap.build_ms,
                            snap.leader_purged_index,
                            snap.target_index,
                            show_ms(snap.catch_up_ms),
                            snap.follower_snapshot_index,
                            snap.install_logged,
                            snap.via_snapshot,
                            snap.error
                                .as_ref()
                                .map_or_else(String::new, |e| format!("; ERROR {e}"))
                        );
                    }
                    if let Some(change) = &fault.membership {
                        let _ = writeln!(
                            out,
                            "           membership: seq-{} learner caught up in {}, promoted in {} (voters {:?}), removed in {} (voters {:?}){}",
                            change.node,
                            show_ms(change.learner_ms),
                            show_ms(change.promote_ms),
                            change.voters_after_promote,
                            show_ms(change.remove_ms),
                            change.voters_after_remove,
                            change
                                .error
                                .as_ref()
                                .map_or_else(String::new, |e| format!("; ERROR {e}"))
                        );
                    }
                }
            }
        }
        let installed = || self.faults.iter().filter(|f| f.fault.installed());
        let (median, p99, n) = summary(installed().map(|f| f.write_unavailable_ms));
        if n > 0 {
            let (leader_median, leader_p99, leaders) =
                summary(installed().map(|f| f.new_leader_ms));
            let delayed: u64 = installed().map(|f| f.epochs_delayed).sum();
            let _ = writeln!(
                out,
                "\nover {n} faults: write unavailability median {} p99 {}; time to new leader median {} p99 {} ({leaders} leader changes); epochs delayed {delayed} in total",
                show_ms(median),
                show_ms(p99),
                show_ms(leader_median),
                show_ms(leader_p99),
            );
        }
        let _ = writeln!(out, "\ncheckers:");
        for verdict in &self.verdicts {
            let checked: Vec<String> = verdict
                .checked
                .iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect();
            let _ = writeln!(
                out,
                "  {:<28} {}  ({})",
                verdict.checker,
                if verdict.ok() { "ok" } else { "VIOLATED" },
                checked.join(", ")
            );
            for violation in verdict.violations.iter().take(10) {
                let _ = writeln!(out, "      - {violation}");
            }
            if verdict.violations.len() > 10 {
                let _ = writeln!(out, "      ... {} more", verdict.violations.len() - 10);
            }
        }
        let _ = writeln!(out, "\nSLOs:");
        for check in &self.slo {
            let _ = writeln!(
                out,
                "  {}  {}",
                if check.ok { "ok    " } else { "BREACH" },
                check.what
            );
        }
        let _ = writeln!(
            out,
            "\nverdict: {}",
            match self.exit {
                Exit::Ok => "OK (exit 0)",
                Exit::Violation => "CORRECTNESS VIOLATION (exit 1)",
                Exit::SloBreach => "SLO BREACH (exit 2)",
                Exit::Harness => "HARNESS PROBLEM (exit 3)",
            }
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::test_history::{Builder, found, unknown};
    use crate::history::Outcome;
    use crate::nemesis::{FaultKind, FaultRecord, FaultStatus};

    fn fault(injected_s: u64, healed_s: u64) -> FaultRecord {
        FaultRecord {
            kind: FaultKind::KillReplica,
            target: "shard-2".into(),
            status: FaultStatus::Installed,
            injected_us: injected_s * 1_000_000,
            healed_us: Some(healed_s * 1_000_000),
            leader_before: Some(1),
            new_leader: None,
            new_leader_us: None,
            isolated: Vec::new(),
            links: Vec::new(),
            snapshot: None,
            membership: None,
            replica: None,
            rebalance: None,
        }
    }

    fn epoch_seen(builder: &mut Builder, at_s: f64, epoch: u64) {
        let at = (at_s * 1e6) as u64;
        builder.push(
            0,
            at,
            at,
            Op::GetEpoch,
            Outcome::Epoch {
                epoch,
                root: format!("root{epoch}"),
            },
        );
    }

    #[test]
    fn the_commit_gap_spans_a_stall_that_outlasts_the_window_and_failed_reads_are_counted() {
        let mut steady = Builder::default();
        for epoch in 1..=30 {
            epoch_seen(&mut steady, epoch as f64, epoch);
        }
        steady.lookup((12_000_000, 12_100_000), "k", found(12, "v", 3));
        let figures = fault_figures(&steady.history, &[fault(10, 14)], Duration::from_secs(1));
        assert_eq!(figures[0].max_commit_gap_ms, Some(1000));
        assert_eq!(figures[0].failed_reads, 0);

        // Epochs stop at 9 s and resume at 25 s, after the window (heal 14 s + 5 s) ends.
        let mut stalled = Builder::default();
        for epoch in 1..=9 {
            epoch_seen(&mut stalled, epoch as f64, epoch);
        }
        for (epoch, at) in (10..=12).zip([25.0, 26.0, 27.0]) {
            epoch_seen(&mut stalled, at, epoch);
        }
        stalled.lookup((11_000_000, 14_000_000), "k", unknown());
        stalled.lookup((30_000_000, 31_000_000), "k", unknown());
        let figures = fault_figures(&stalled.history, &[fault(10, 14)], Duration::from_secs(1));
        assert_eq!(figures[0].max_commit_gap_ms, Some(16_000));
        assert_eq!(figures[0].failed_reads, 1, "only the one in the window");
        assert_eq!(failed_reads(&stalled.history), 2);

        let slo = Slo {
            max_commit_gap: Some(Duration::from_secs(3)),
            max_failed_reads: Some(0),
            ..Slo::default()
        };
        let checks = slo_checks(&figures, &slo, 2, None, &Err("not converged".into()));
        let breached: Vec<&str> = checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.what.as_str())
            .collect();
        assert!(
            breached.iter().any(|w| w.contains("failed reads")),
            "{breached:?}"
        );
        assert!(
            breached
                .iter()
                .any(|w| w.contains("longest gap between committed epochs 16000 ms")),
            "{breached:?}"
        );
    }
}
