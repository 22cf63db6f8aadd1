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
            }
        })
        .collect()
}

/// SLO checks over the figures and the heal.
pub fn slo_checks(
    figures: &[FaultFigures],
    slo: &Slo,
    heal_error: Option<&str>,
    converged: &Result<crate::nemesis::Converged, String>,
) -> Vec<SloCheck> {
    let mut checks = Vec::new();
    let limit_ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    for figure in figures.iter().filter(|f| f.fault.installed()) {
        let name = format!("{:?} {}", figure.fault.kind, figure.fault.target);
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
                        "  {at:7.2}  {:?} {} (healed {healed}{leader}): writes unavailable {}, new leader after {}, p99 publish {} over {} publishes, epochs delayed {}",
                        fault.kind,
                        fault.target,
                        show_ms(figure.write_unavailable_ms),
                        show_ms(figure.new_leader_ms),
                        show_ms(figure.p99_publish_ms),
                        figure.publishes_in_window,
                        figure.epochs_delayed
                    );
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
