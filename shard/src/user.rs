//! User state and akd's version rules (akd-spec §2.4).
//!
//! For an update `(label, value)` published in epoch `E`:
//! * a new label gets version 1: one fresh leaf `FreshLabel(1)`;
//! * a changed value at version `n` gets a stale leaf `StaleLabel(n)` (value
//!   `stale_azks_value`) and a fresh leaf `FreshLabel(n+1)`, both in epoch `E`;
//! * a byte-identical republish changes nothing;
//! * a batch naming a label twice is rejected (last-writer-wins is the sequencer's job).
//!
//! VRF evaluation dominates the cost (~45 µs per label), so [`compute_leaves`] spreads it over
//! the rayon pool; the distributed pipeline calls the same function while the epoch is open.

use std::collections::HashSet;

use akd_core::configuration::Configuration;
use akd_core::{AkdLabel, AkdValue, NodeLabel, VersionFreshness};
use rayon::prelude::*;

use crate::error::{Error, LabelTag, Result};
use crate::tree::NewLeaf;
use crate::vrf::VrfKey;

/// One stored version of a user's value (akd's `ValueState` without the username).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserVersion {
    /// Version number, from 1.
    pub version: u64,
    /// Epoch the version was published in.
    pub epoch: u64,
    /// The value.
    pub value: AkdValue,
    /// `FreshLabel(version)`, the leaf that commits to the value.
    pub fresh_label: NodeLabel,
}

/// Limits on what a publish may contain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpdateLimits {
    /// Largest label, in bytes.
    pub max_label_len: usize,
    /// Largest value, in bytes.
    pub max_value_len: usize,
    /// Most updates per batch.
    pub max_batch: usize,
}

impl Default for UpdateLimits {
    fn default() -> Self {
        Self {
            max_label_len: 1024,
            max_value_len: 64 * 1024,
            max_batch: 1_000_000,
        }
    }
}

impl UpdateLimits {
    /// Checks one label.
    pub fn check_label(&self, akd_label: &[u8]) -> Result<()> {
        if akd_label.is_empty() {
            return Err(Error::EmptyLabel);
        }
        if akd_label.len() > self.max_label_len {
            return Err(Error::LabelTooLong {
                len: akd_label.len(),
                max: self.max_label_len,
            });
        }
        Ok(())
    }

    /// Checks a publish batch: sizes, and no label twice.
    pub fn check_batch(&self, updates: &[(AkdLabel, AkdValue)]) -> Result<()> {
        if updates.len() > self.max_batch {
            return Err(Error::BatchTooLarge {
                len: updates.len(),
                max: self.max_batch,
            });
        }
        let mut seen = HashSet::with_capacity(updates.len());
        for (akd_label, value) in updates {
            self.check_label(akd_label)?;
            if value.len() > self.max_value_len {
                return Err(Error::ValueTooLarge {
                    len: value.len(),
                    max: self.max_value_len,
                });
            }
            if !seen.insert(&akd_label.0) {
                return Err(Error::DuplicateLabel {
                    label: LabelTag::of(akd_label),
                });
            }
        }
        Ok(())
    }
}

/// An update that changes the directory, with the version it creates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedUpdate {
    /// The user label.
    pub akd_label: AkdLabel,
    /// The new value.
    pub value: AkdValue,
    /// The version it becomes (`previous + 1`, or 1).
    pub version: u64,
}

/// Applies akd's version rules to `updates`, given each label's latest version and value
/// before the epoch (`prior[i]` for `updates[i]`). Identical republishes are dropped.
pub fn plan_updates(
    updates: Vec<(AkdLabel, AkdValue)>,
    prior: &[Option<(u64, AkdValue)>],
) -> Vec<PlannedUpdate> {
    updates
        .into_iter()
        .zip(prior)
        .filter_map(|((akd_label, value), prior)| match prior {
            Some((_, previous)) if *previous == value => None,
            Some((version, _)) => Some(PlannedUpdate {
                akd_label,
                value,
                version: version + 1,
            }),
            None => Some(PlannedUpdate {
                akd_label,
                value,
                version: 1,
            }),
        })
        .collect()
}

/// The leaves and user versions one epoch inserts.
#[derive(Clone, Debug, Default)]
pub struct EpochLeaves {
    /// Fresh and stale leaves, unsorted.
    pub leaves: Vec<NewLeaf>,
    /// New user versions, one per planned update, in the planned order.
    pub versions: Vec<(AkdLabel, UserVersion)>,
}

/// Evaluates the VRF and the commitments for `planned` updates published in `epoch`, in
/// parallel. The stale leaf of version `n` carries `stale_azks_value` (akd-spec §2.4).
pub fn compute_leaves<TC: Configuration>(
    vrf: &VrfKey,
    planned: &[PlannedUpdate],
    epoch: u64,
) -> EpochLeaves {
    let commitment_key = vrf.commitment_key::<TC>();
    let per_update: Vec<(NewLeaf, Option<NewLeaf>, UserVersion)> = planned
        .par_iter()
        .map(|update| {
            let fresh_label =
                vrf.node_label::<TC>(&update.akd_label, VersionFreshness::Fresh, update.version);
            let fresh = NewLeaf {
                label: fresh_label,
                commitment: TC::compute_fresh_azks_value(
                    &commitment_key,
                    &fresh_label,
                    update.version,
                    &update.value,
                ),
            };
            let stale = (update.version > 1).then(|| NewLeaf {
                label: vrf.node_label::<TC>(
                    &update.akd_label,
                    VersionFreshness::Stale,
                    update.version - 1,
                ),
                commitment: TC::stale_azks_value(),
            });
            let version = UserVersion {
                version: update.version,
                epoch,
                value: update.value.clone(),
                fresh_label,
            };
            (fresh, stale, version)
        })
        .collect();

    let mut out = EpochLeaves {
        leaves: Vec::with_capacity(per_update.len() * 2),
        versions: Vec::with_capacity(per_update.len()),
    };
    for ((fresh, stale, version), update) in per_update.into_iter().zip(planned) {
        out.leaves.push(fresh);
        out.leaves.extend(stale);
        out.versions.push((update.akd_label.clone(), version));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(label: &str, value: &str) -> (AkdLabel, AkdValue) {
        (AkdLabel::from(label), AkdValue::from(value))
    }

    #[test]
    fn version_rules() {
        let updates = vec![
            update("new", "a"),
            update("same", "b"),
            update("changed", "c"),
        ];
        let prior = vec![
            None,
            Some((4, AkdValue::from("b"))),
            Some((7, AkdValue::from("x"))),
        ];
        let planned = plan_updates(updates, &prior);
        let versions: Vec<_> = planned
            .iter()
            .map(|p| (p.akd_label.0.clone(), p.version))
            .collect();
        assert_eq!(
            versions,
            vec![(b"new".to_vec(), 1), (b"changed".to_vec(), 8)]
        );
    }

    #[test]
    fn batch_checks_give_typed_errors() {
        let limits = UpdateLimits {
            max_label_len: 4,
            max_value_len: 3,
            max_batch: 2,
        };
        assert!(matches!(
            limits.check_batch(&[update("", "v")]),
            Err(Error::EmptyLabel)
        ));
        assert!(matches!(
            limits.check_batch(&[update("abcde", "v")]),
            Err(Error::LabelTooLong { len: 5, max: 4 })
        ));
        assert!(matches!(
            limits.check_batch(&[update("a", "vvvv")]),
            Err(Error::ValueTooLarge { len: 4, max: 3 })
        ));
        assert!(matches!(
            limits.check_batch(&[update("a", "v"), update("a", "w")]),
            Err(Error::DuplicateLabel { .. })
        ));
        assert!(matches!(
            limits.check_batch(&[update("a", "v"), update("b", "w"), update("c", "x")]),
            Err(Error::BatchTooLarge { len: 3, max: 2 })
        ));
        assert!(
            limits
                .check_batch(&[update("a", "v"), update("b", "w")])
                .is_ok()
        );
    }
}
