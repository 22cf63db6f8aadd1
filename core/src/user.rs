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

/// What one planned update produces: its fresh leaf, the stale leaf of its previous version
/// (none for version 1), and the new user version.
#[derive(Clone, Debug)]
pub struct UpdateLeaves {
    /// `FreshLabel(version)` with its commitment.
    pub fresh: NewLeaf,
    /// `StaleLabel(version - 1)` with akd's stale value.
    pub stale: Option<NewLeaf>,
    /// The user version to store.
    pub version: UserVersion,
}

/// The leaves and new user versions of `planned` in `epoch`, one entry per update, in order
/// (VRF labels from `cache` where present, evaluated in parallel otherwise).
pub fn compute_update_leaves<TC: Configuration>(
    vrf: &VrfKey,
    planned: &[PlannedUpdate],
    epoch: u64,
    cache: Option<&LabelCache>,
) -> Vec<UpdateLeaves> {
    let commitment_key = vrf.commitment_key::<TC>();
    let node_label = |akd_label: &AkdLabel, freshness, version| match cache {
        Some(cache) => cache.node_label::<TC>(vrf, akd_label, freshness, version),
        None => vrf.node_label::<TC>(akd_label, freshness, version),
    };
    planned
        .par_iter()
        .map(|update| {
            let fresh_label =
                node_label(&update.akd_label, VersionFreshness::Fresh, update.version);
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
                label: node_label(
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
            UpdateLeaves {
                fresh,
                stale,
                version,
            }
        })
        .collect()
}

/// The leaves and new user versions of `planned` in `epoch` (see [`compute_update_leaves`]),
/// flattened.
pub fn compute_leaves<TC: Configuration>(
    vrf: &VrfKey,
    planned: &[PlannedUpdate],
    epoch: u64,
    cache: Option<&LabelCache>,
) -> EpochLeaves {
    let per_update = compute_update_leaves::<TC>(vrf, planned, epoch, cache);
    let mut out = EpochLeaves {
        leaves: Vec::with_capacity(per_update.len() * 2),
        versions: Vec::with_capacity(per_update.len()),
    };
    for (leaves, update) in per_update.into_iter().zip(planned) {
        out.leaves.push(leaves.fresh);
        out.leaves.extend(leaves.stale);
        out.versions
            .push((update.akd_label.clone(), leaves.version));
    }
    out
}

/// What a node label is computed from: the VRF input `(label, freshness, version)`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LabelInput {
    /// The user label.
    pub akd_label: Vec<u8>,
    /// Fresh or stale.
    pub freshness: VersionFreshness,
    /// The version.
    pub version: u64,
}

/// Node labels computed ahead of time, while an epoch is open (DESIGN §4 step 2).
///
/// A cache in the strict sense: a miss costs one VRF evaluation, never a different answer, since
/// a label depends only on its input and the directory's fixed key. Bounded: when full it is
/// emptied (the entries of sealed epochs are removed as they are used, so that is rare).
#[derive(Debug)]
pub struct LabelCache {
    labels: std::sync::Mutex<std::collections::HashMap<LabelInput, NodeLabel>>,
    capacity: usize,
}

impl LabelCache {
    /// An empty cache holding at most `capacity` labels.
    pub fn new(capacity: usize) -> Self {
        Self {
            labels: std::sync::Mutex::new(std::collections::HashMap::new()),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<LabelInput, NodeLabel>> {
        self.labels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The label of `(akd_label, freshness, version)`: taken out of the cache, or evaluated.
    pub fn node_label<TC: Configuration>(
        &self,
        vrf: &VrfKey,
        akd_label: &AkdLabel,
        freshness: VersionFreshness,
        version: u64,
    ) -> NodeLabel {
        let input = LabelInput {
            akd_label: akd_label.to_vec(),
            freshness,
            version,
        };
        if let Some(label) = self.lock().remove(&input) {
            return label;
        }
        vrf.node_label::<TC>(akd_label, freshness, version)
    }

    /// Evaluates the labels of `inputs` that are not cached yet, in parallel, and keeps them.
    pub fn precompute<TC: Configuration>(&self, vrf: &VrfKey, mut inputs: Vec<LabelInput>) {
        {
            let labels = self.lock();
            inputs.retain(|input| !labels.contains_key(input));
        }
        let computed: Vec<(LabelInput, NodeLabel)> = inputs
            .into_par_iter()
            .map(|input| {
                let label = vrf.node_label::<TC>(
                    &AkdLabel(input.akd_label.clone()),
                    input.freshness,
                    input.version,
                );
                (input, label)
            })
            .collect();
        let mut labels = self.lock();
        if labels.len() + computed.len() > self.capacity {
            labels.clear();
        }
        labels.extend(computed);
    }

    /// Number of cached labels.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(label: &str, value: &str) -> (AkdLabel, AkdValue) {
        (AkdLabel::from(label), AkdValue::from(value))
    }

    #[test]
    fn cached_labels_equal_evaluated_labels() {
        use akd_core::configuration::WhatsAppV1Configuration as Wa;
        let vrf = VrfKey::from_seed(&[5u8; 32]).expect("seed");
        let cache = LabelCache::new(10);
        let alice = AkdLabel::from("alice");
        let input = LabelInput {
            akd_label: alice.to_vec(),
            freshness: VersionFreshness::Fresh,
            version: 2,
        };
        cache.precompute::<Wa>(&vrf, vec![input]);
        assert_eq!(cache.len(), 1);
        let cached = cache.node_label::<Wa>(&vrf, &alice, VersionFreshness::Fresh, 2);
        assert_eq!(
            cached,
            vrf.node_label::<Wa>(&alice, VersionFreshness::Fresh, 2)
        );
        assert!(cache.is_empty(), "a used label leaves the cache");
        let planned = [PlannedUpdate {
            akd_label: alice.clone(),
            value: AkdValue::from("v"),
            version: 2,
        }];
        let with_cache = compute_leaves::<Wa>(&vrf, &planned, 3, Some(&cache));
        let without = compute_leaves::<Wa>(&vrf, &planned, 3, None);
        assert_eq!(with_cache.leaves, without.leaves);
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
