//! The monitor's decisions, pure: what a verified history means against what the monitor saw
//! before and what the key owner said to expect, and what a directory's epoch roots mean
//! against the roots it recorded.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One version of a watched label, as the monitor saw it verified.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenVersion {
    /// The version number (1, 2, …).
    pub version: u64,
    /// The epoch it was published in.
    pub epoch: u64,
    /// Its value, hex.
    pub value: String,
}

/// What the monitor reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Alarm {
    /// A new version the key owner did not say to expect.
    KeyChange {
        /// The label, as watched.
        label: String,
        /// The new version.
        version: u64,
        /// Its epoch.
        epoch: u64,
        /// Its value, hex.
        value: String,
    },
    /// A version the monitor saw before is gone or changed, or one appeared below it.
    HistoryRewrite {
        /// The label, or `-` for the directory's own epochs.
        label: String,
        /// What changed.
        detail: String,
    },
    /// An epoch between two the directory served is missing.
    MissingEpoch {
        /// The epoch.
        epoch: u64,
        /// The answer.
        detail: String,
    },
    /// Two sources disagree on an epoch's root (another gateway, or the auditor's signed head).
    Fork {
        /// The epoch.
        epoch: u64,
        /// Who disagrees, and the two roots.
        detail: String,
    },
    /// A proof did not verify, or an answer was malformed: a forged or broken answer, not a key
    /// change. Nothing about the label is learned from it.
    Verification {
        /// The label, or `-`.
        label: String,
        /// The client's error.
        detail: String,
    },
}

impl Alarm {
    /// The metric and log kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Alarm::KeyChange { .. } => "key_change",
            Alarm::HistoryRewrite { .. } => "history_rewrite",
            Alarm::MissingEpoch { .. } => "missing_epoch",
            Alarm::Fork { .. } => "fork",
            Alarm::Verification { .. } => "verification",
        }
    }

    /// The label concerned (`-` for the directory as a whole).
    pub fn label(&self) -> &str {
        match self {
            Alarm::KeyChange { label, .. }
            | Alarm::HistoryRewrite { label, .. }
            | Alarm::Verification { label, .. } => label,
            Alarm::MissingEpoch { .. } | Alarm::Fork { .. } => "-",
        }
    }
}

impl std::fmt::Display for Alarm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Alarm::KeyChange {
                label,
                version,
                epoch,
                value,
            } => write!(
                f,
                "UNEXPECTED KEY CHANGE: {label} version {version} (epoch {epoch}) = {value}, which was not expected"
            ),
            Alarm::HistoryRewrite { label, detail } => {
                write!(f, "HISTORY REWRITE: {label}: {detail}")
            }
            Alarm::MissingEpoch { epoch, detail } => {
                write!(f, "MISSING EPOCH {epoch}: {detail}")
            }
            Alarm::Fork { epoch, detail } => write!(f, "FORK at epoch {epoch}: {detail}"),
            Alarm::Verification { label, detail } => {
                write!(f, "VERIFICATION FAILED: {label}: {detail}")
            }
        }
    }
}

/// What a label's verified history means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryVerdict {
    /// Alarms (key changes not expected, rewrites).
    pub alarms: Vec<Alarm>,
    /// New versions that were expected (reported quietly).
    pub expected: Vec<SeenVersion>,
    /// What the monitor keeps as seen: the served history, unless it rewrote what was seen
    /// (then the old record stays, so the rewrite is reported every round until resolved).
    pub seen: Vec<SeenVersion>,
}

/// Compares a label's verified history (`served`, any order) with what was `seen` before.
/// Versions newer than every seen one are checked with `expected(version)`; with nothing seen
/// yet and `first_sight`, the served history is the baseline (trust on first use).
pub fn judge_history(
    label: &str,
    seen: &[SeenVersion],
    served: &[SeenVersion],
    first_sight: bool,
    mut expected: impl FnMut(&SeenVersion) -> bool,
) -> HistoryVerdict {
    let mut served = served.to_vec();
    served.sort_by_key(|version| version.version);
    let by_version: BTreeMap<u64, &SeenVersion> = served
        .iter()
        .map(|version| (version.version, version))
        .collect();
    let newest_seen = seen
        .iter()
        .map(|version| version.version)
        .max()
        .unwrap_or(0);
    let mut alarms = Vec::new();
    for old in seen {
        match by_version.get(&old.version) {
            None => alarms.push(Alarm::HistoryRewrite {
                label: label.to_string(),
                detail: format!(
                    "version {} (epoch {}) seen before is no longer in its history",
                    old.version, old.epoch
                ),
            }),
            Some(now) if *now != old => alarms.push(Alarm::HistoryRewrite {
                label: label.to_string(),
                detail: format!(
                    "version {} was {} in epoch {}, is now {} in epoch {}",
                    old.version, old.value, old.epoch, now.value, now.epoch
                ),
            }),
            Some(_) => {}
        }
    }
    let seen_versions: std::collections::BTreeSet<u64> =
        seen.iter().map(|version| version.version).collect();
    for new in served.iter().filter(|version| {
        version.version < newest_seen && !seen_versions.contains(&version.version)
    }) {
        alarms.push(Alarm::HistoryRewrite {
            label: label.to_string(),
            detail: format!(
                "version {} (epoch {}) appeared below version {newest_seen}, seen before",
                new.version, new.epoch
            ),
        });
    }
    let rewritten = !alarms.is_empty();
    let mut expected_versions = Vec::new();
    if !(seen.is_empty() && first_sight) {
        for new in served
            .iter()
            .filter(|version| version.version > newest_seen)
        {
            if expected(new) {
                expected_versions.push(new.clone());
            } else {
                alarms.push(Alarm::KeyChange {
                    label: label.to_string(),
                    version: new.version,
                    epoch: new.epoch,
                    value: new.value.clone(),
                });
            }
        }
    }
    HistoryVerdict {
        alarms,
        expected: expected_versions,
        seen: if rewritten { seen.to_vec() } else { served },
    }
}

/// Checks a directory's roots (`served`: epoch → root, hex) against those recorded: a recorded
/// epoch with another root is a rewrite of the directory's history; an epoch in `wanted` that
/// the directory did not serve is missing.
pub fn judge_roots(
    recorded: &BTreeMap<u64, String>,
    served: &BTreeMap<u64, Result<String, String>>,
) -> Vec<Alarm> {
    let mut alarms = Vec::new();
    for (epoch, answer) in served {
        match (answer, recorded.get(epoch)) {
            (Ok(root), Some(was)) if root != was => alarms.push(Alarm::HistoryRewrite {
                label: "-".into(),
                detail: format!("epoch {epoch} had root {was}, the directory now serves {root}"),
            }),
            (Ok(_), _) => {}
            (Err(error), _) => alarms.push(Alarm::MissingEpoch {
                epoch: *epoch,
                detail: error.clone(),
            }),
        }
    }
    alarms
}

/// Which epochs' roots a round reads before the head, and the epoch it will have checked up to.
///
/// A round starts at the last epoch checked (`checked`; re-read, so a rewrite of it shows) and
/// reads at most `limit` epochs; a monitor far behind catches up over several rounds and never
/// skips an epoch. A first round (`checked == 0`) reads only the head. If the head is older
/// than `checked` (the directory went back), nothing is read: that is judged as a rewrite.
pub fn epochs_to_read(checked: u64, head: u64, limit: u64) -> (std::ops::Range<u64>, u64) {
    if checked == 0 || head <= checked {
        return (head..head, checked.max(head));
    }
    let end = head.min(checked.saturating_add(limit.max(1)));
    let now_checked = if end == head { head } else { end - 1 };
    (checked..end, now_checked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(version: u64, epoch: u64, value: &str) -> SeenVersion {
        SeenVersion {
            version,
            epoch,
            value: value.into(),
        }
    }

    #[test]
    fn an_expected_new_version_is_quiet_and_an_unexpected_one_is_a_key_change() {
        let seen = [version(1, 3, "aa")];
        let served = [
            version(2, 9, "bb"),
            version(1, 3, "aa"),
            version(3, 10, "cc"),
        ];
        let verdict = judge_history("alice", &seen, &served, true, |new| new.value == "bb");
        assert_eq!(verdict.expected, vec![version(2, 9, "bb")]);
        assert_eq!(
            verdict.alarms,
            vec![Alarm::KeyChange {
                label: "alice".into(),
                version: 3,
                epoch: 10,
                value: "cc".into()
            }]
        );
        assert_eq!(verdict.seen.len(), 3, "seen now, reported once");
    }

    #[test]
    fn the_first_sight_is_the_baseline_unless_told_otherwise() {
        let served = [version(1, 3, "aa")];
        let quiet = judge_history("bob", &[], &served, true, |_| false);
        assert!(quiet.alarms.is_empty() && quiet.seen.len() == 1);
        let strict = judge_history("bob", &[], &served, false, |_| false);
        assert_eq!(strict.alarms.len(), 1);
        assert_eq!(strict.alarms[0].kind(), "key_change");
    }

    #[test]
    fn a_changed_missing_or_inserted_old_version_is_a_rewrite_and_the_record_is_kept() {
        let seen = [version(1, 3, "aa"), version(3, 8, "cc")];
        let changed = [
            version(1, 3, "aa"),
            version(2, 5, "zz"),
            version(3, 8, "dd"),
        ];
        let verdict = judge_history("carol", &seen, &changed, true, |_| true);
        let kinds: Vec<_> = verdict.alarms.iter().map(Alarm::kind).collect();
        assert_eq!(kinds, vec!["history_rewrite", "history_rewrite"]);
        assert_eq!(verdict.seen, seen.to_vec(), "a rewrite is not accepted");
        let gone = judge_history("carol", &seen, &[version(1, 3, "aa")], true, |_| true);
        assert_eq!(gone.alarms.len(), 1);
        assert!(
            gone.alarms[0]
                .to_string()
                .contains("no longer in its history")
        );
    }

    #[test]
    fn a_served_root_other_than_the_recorded_one_is_a_rewrite_and_an_unserved_epoch_is_missing() {
        let recorded = BTreeMap::from([(4, "r4".to_string())]);
        let served = BTreeMap::from([
            (4, Ok("r4".to_string())),
            (5, Ok("r5".to_string())),
            (6, Err("NOT_FOUND".to_string())),
        ]);
        assert_eq!(
            judge_roots(&recorded, &served)
                .iter()
                .map(Alarm::kind)
                .collect::<Vec<_>>(),
            vec!["missing_epoch"]
        );
        let rewritten = BTreeMap::from([(4, Ok("r4'".to_string()))]);
        assert_eq!(
            judge_roots(&recorded, &rewritten)[0].kind(),
            "history_rewrite"
        );
    }

    #[test]
    fn a_monitor_far_behind_catches_up_over_rounds_without_skipping_an_epoch() {
        assert_eq!(
            epochs_to_read(0, 900, 256),
            (900..900, 900),
            "first round: the head"
        );
        assert_eq!(
            epochs_to_read(40, 45, 256),
            (40..45, 45),
            "re-reads the last checked"
        );
        let mut checked = 10;
        let mut read = vec![];
        while checked < 1000 {
            let (range, next) = epochs_to_read(checked, 1000, 256);
            assert!(range.start == checked && range.end - range.start <= 256);
            read.extend(range);
            checked = next;
        }
        read.dedup();
        assert_eq!(
            read,
            (10..1000).collect::<Vec<_>>(),
            "every epoch before the head once"
        );
        assert_eq!(
            epochs_to_read(50, 30, 256),
            (30..30, 50),
            "the directory went back"
        );
    }
}
