//! Positive controls: mutations of a real run's history or final state that model a broken
//! cluster, which the checkers must flag (exit 1). They prove that a green run means the
//! checkers looked, not that they cannot fail.
//!
//! - [`Mutation::LoseAckedPublish`]: the cluster "forgets" an acknowledged publish (it
//!   vanishes from the final key history), as a leader that acknowledged before replicating
//!   would.
//! - [`Mutation::StaleRead`]: one lookup answers with the key's previous version while claiming
//!   the latest epoch, as a gateway serving reads from a lagging follower would.
//!
//! And a real broken *mode* of the product, run end to end ([`BrokenMode`], scenario
//! `broken-stale-reads`): the gateway started with `--unsafe-test-mode` and
//! `KTD_UNSAFE_STALE_READS=3s` answers latest-epoch lookups from a view of the latest epoch that
//! it refreshes only every 3 s instead of a linearizable read at the sequencer. Every answer is
//! a genuine, verifiable proof for the epoch it names; only the recency is wrong, so the checkers
//! must catch it from real time alone (`monotonic_reads`: a lookup returns an older epoch than a
//! `GetEpoch` that completed before it was sent).

use serde::{Deserialize, Serialize};

use crate::history::{FinalState, History, Op, Outcome};

/// A deliberate bug.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mutation {
    /// Drop one acknowledged publish from the final state.
    LoseAckedPublish,
    /// Make one lookup return the previous version of its key.
    StaleRead,
}

/// A deliberately broken mode of the cluster (test-only flags of the product).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BrokenMode {
    /// The gateway serves latest-epoch lookups from a 3 s old view (stale reads).
    StaleReads,
}

impl BrokenMode {
    /// The gateway's environment for this mode (it also gets `--unsafe-test-mode`).
    pub fn gateway_env(self) -> Vec<(String, String)> {
        match self {
            Self::StaleReads => vec![("KTD_UNSAFE_STALE_READS".into(), "3s".into())],
        }
    }

    /// One line for the report.
    pub fn describe(self) -> String {
        match self {
            Self::StaleReads => {
                "gateway --unsafe-test-mode with KTD_UNSAFE_STALE_READS=3s: latest-epoch lookups served from a view up to 3 s old".into()
            }
        }
    }
}

/// Applies `mutation`; returns a description of what was changed, or `None` if the history has
/// nothing to mutate (too short a run).
pub fn apply(
    mutation: Mutation,
    history: &mut History,
    final_state: &mut FinalState,
) -> Option<String> {
    match mutation {
        Mutation::LoseAckedPublish => {
            // The newest acknowledged publish whose value is a key's final version.
            for event in history.events.iter().rev() {
                let (Op::Publish { key, value, .. }, Outcome::Published { epoch, .. }) =
                    (&event.op, &event.outcome)
                else {
                    continue;
                };
                let Some(versions) = final_state.histories.get_mut(key) else {
                    continue;
                };
                let before = versions.len();
                versions.retain(|(v, _, e)| !(v == value && e == epoch));
                if versions.len() < before {
                    return Some(format!(
                        "dropped acknowledged publish {} ({key} = {value}, epoch {epoch}) from the final state",
                        event.id
                    ));
                }
            }
            None
        }
        Mutation::StaleRead => {
            // A lookup that found version n >= 2 of an acknowledged publish: answer with version
            // n - 1 instead.
            let acked: std::collections::HashSet<(String, String)> = history
                .events
                .iter()
                .filter_map(|event| match (&event.op, &event.outcome) {
                    (Op::Publish { key, value, .. }, Outcome::Published { .. }) => {
                        Some((key.clone(), value.clone()))
                    }
                    _ => None,
                })
                .collect();
            for event in history.events.iter_mut().rev() {
                let Op::Lookup { key } = &event.op else {
                    continue;
                };
                let Outcome::Found {
                    value,
                    version,
                    value_epoch,
                    ..
                } = &mut event.outcome
                else {
                    continue;
                };
                if !acked.contains(&(key.clone(), value.clone())) {
                    continue;
                }
                let Some(versions) = final_state.histories.get(key) else {
                    continue;
                };
                let Some((old_value, old_version, old_epoch)) = versions
                    .iter()
                    .find(|(_, v, e)| *v + 1 == *version && *e < *value_epoch)
                else {
                    continue;
                };
                let description = format!(
                    "lookup {} of {key} now returns version {old_version} (epoch {old_epoch}) instead of {version} (epoch {value_epoch})",
                    event.id
                );
                *value = old_value.clone();
                *version = *old_version;
                *value_epoch = *old_epoch;
                return Some(description);
            }
            None
        }
    }
}
