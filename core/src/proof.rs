//! Assembly of akd's `LookupProof` and `HistoryProof` (akd-spec §5.2).
//!
//! A proof is built in three steps so that the distributed pipeline can run them in different
//! processes: a *plan* from the user's versions and the VRF key (which node labels to prove, with
//! their VRF proofs and commitment nonces), tree *claims* answered by walks and stitching
//! ([`prove_claims`]), and assembly into akd's structs, field for field as akd fills them.

use std::collections::HashMap;

use akd_core::configuration::Configuration;
use akd_core::utils::get_marker_versions;
use akd_core::verify::history::HistoryParams;
use akd_core::{
    AkdLabel, HistoryProof, LookupProof, MembershipProof, NodeLabel, NonMembershipProof,
    UpdateProof, VersionFreshness,
};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::stitch::{self, Located, TopTree};
use crate::tree::{PartitionWalk, WalkRequest};
use crate::user::UserVersion;
use crate::vrf::VrfKey;

/// A statement about the tree that a proof needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The label is a leaf.
    Member(NodeLabel),
    /// The label is not a leaf.
    Absent(NodeLabel),
}

/// The tree proof answering a [`Claim`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TreeProof {
    /// Answer to [`Claim::Member`].
    Member(MembershipProof),
    /// Answer to [`Claim::Absent`].
    Absent(Box<NonMembershipProof>),
}

impl TreeProof {
    fn member(self) -> Result<MembershipProof> {
        match self {
            TreeProof::Member(proof) => Ok(proof),
            TreeProof::Absent(_) => Err(Error::Proof("expected a membership proof".into())),
        }
    }

    fn absent(self) -> Result<NonMembershipProof> {
        match self {
            TreeProof::Absent(proof) => Ok(*proof),
            TreeProof::Member(_) => Err(Error::Proof("expected a non-membership proof".into())),
        }
    }
}

/// Answers `claims` on the tree whose top is `top`; `walk` runs the in-partition walks (locally
/// over a `TreeStore`) and must answer its requests in order. Remote callers use
/// [`LocatedClaims`] directly and walk asynchronously.
pub fn prove_claims<TC: Configuration>(
    top: &TopTree<TC>,
    claims: &[Claim],
    walk: impl FnOnce(&[WalkRequest]) -> Result<Vec<PartitionWalk>>,
) -> Result<Vec<TreeProof>> {
    let located = LocatedClaims::new(top, claims);
    let walks = walk(located.walk_requests())?;
    located.finish(walks)
}

/// Claims located in the top of the trie: what is left to walk inside partitions.
#[derive(Clone, Debug)]
pub struct LocatedClaims {
    claims: Vec<(Claim, NodeLabel, Located)>,
    requests: Vec<WalkRequest>,
}

impl LocatedClaims {
    /// Locates every claim's label in `top`.
    pub fn new<TC: Configuration>(top: &TopTree<TC>, claims: &[Claim]) -> Self {
        let claims: Vec<(Claim, NodeLabel, Located)> = claims
            .iter()
            .map(|claim| {
                let target = match claim {
                    Claim::Member(label) | Claim::Absent(label) => *label,
                };
                (*claim, target, top.locate(&target))
            })
            .collect();
        let requests = claims
            .iter()
            .filter_map(|(_, target, located)| located.walk_request(*target))
            .collect();
        Self { claims, requests }
    }

    /// The in-partition walks still needed, in order (each names its partition root).
    pub fn walk_requests(&self) -> &[WalkRequest] {
        &self.requests
    }

    /// Stitches the answers to [`LocatedClaims::walk_requests`] (in the same order) into proofs.
    pub fn finish(self, walks: Vec<PartitionWalk>) -> Result<Vec<TreeProof>> {
        if walks.len() != self.requests.len() {
            return Err(Error::Proof(format!(
                "asked for {} partition walks, got {}",
                self.requests.len(),
                walks.len()
            )));
        }
        let mut walks = walks.into_iter();
        self.claims
            .into_iter()
            .map(|(claim, target, located)| {
                let walk = if located.walk_request(target).is_some() {
                    walks.next()
                } else {
                    None
                };
                match claim {
                    Claim::Member(_) => {
                        stitch::membership_proof(target, located, walk).map(TreeProof::Member)
                    }
                    Claim::Absent(_) => stitch::non_membership_proof(target, located, walk)
                        .map(|proof| TreeProof::Absent(Box::new(proof))),
                }
            })
            .collect()
    }
}

/// A node label with the VRF proof that binds it to `(akd_label, freshness, version)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProvenLabel {
    /// The node label.
    pub label: NodeLabel,
    /// The 80-byte VRF proof.
    pub vrf_proof: Vec<u8>,
}

/// Label proofs of one user's versions already at hand (stored with the versions, see
/// [`StoredLookupProofs`]), by `(freshness, version)`. Every VRF proof is a function of the key,
/// the label, the freshness and the version alone, so a stored one is byte-identical to a fresh
/// one and a plan built from it is the plan [`LookupPlan::new`] would compute.
#[derive(Clone, Debug, Default)]
pub struct KnownProofs {
    fresh: HashMap<u64, ProvenLabel>,
    stale: HashMap<u64, ProvenLabel>,
}

impl KnownProofs {
    /// No proofs: every label is proven.
    pub fn none() -> Self {
        Self::default()
    }

    /// Adds the proofs stored with `version`: `(Fresh, n)`, `(Stale, n)` and, when `n` is not a
    /// power of two, `(Fresh, 2^⌊log2 n⌋)`.
    pub fn add(&mut self, version: &UserVersion, stored: StoredLookupProofs) {
        let n = version.version;
        self.fresh.insert(
            n,
            ProvenLabel {
                label: version.fresh_label,
                vrf_proof: stored.existence_proof,
            },
        );
        self.stale.insert(n, stored.freshness);
        if let Some(marker) = stored.marker {
            self.fresh.entry(lookup_marker_version(n)).or_insert(marker);
        }
    }

    /// Number of `(freshness, version)` proofs held.
    pub fn len(&self) -> usize {
        self.fresh.len() + self.stale.len()
    }

    /// Whether no proof is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get(&self, freshness: VersionFreshness, version: u64) -> Option<&ProvenLabel> {
        match freshness {
            VersionFreshness::Fresh => self.fresh.get(&version),
            VersionFreshness::Stale => self.stale.get(&version),
        }
    }
}

/// The label proofs `work` asks for, in order: from `known` where held, else proven (in
/// parallel on the rayon pool, only if any is missing).
fn prove_labels<TC: Configuration>(
    vrf: &VrfKey,
    akd_label: &AkdLabel,
    work: &[(VersionFreshness, u64)],
    known: &KnownProofs,
) -> Vec<ProvenLabel> {
    let held: Vec<Option<ProvenLabel>> = work
        .iter()
        .map(|(freshness, version)| known.get(*freshness, *version).cloned())
        .collect();
    let missing: Vec<(VersionFreshness, u64)> = work
        .iter()
        .zip(&held)
        .filter(|(_, held)| held.is_none())
        .map(|(item, _)| *item)
        .collect();
    let mut proven = match missing.len() {
        0 => Vec::new(),
        1 => vec![prove_one::<TC>(vrf, akd_label, missing[0])],
        _ => missing
            .par_iter()
            .map(|item| prove_one::<TC>(vrf, akd_label, *item))
            .collect(),
    }
    .into_iter();
    held.into_iter()
        .map(|held| held.unwrap_or_else(|| next(&mut proven)))
        .collect()
}

fn prove_one<TC: Configuration>(
    vrf: &VrfKey,
    akd_label: &AkdLabel,
    (freshness, version): (VersionFreshness, u64),
) -> ProvenLabel {
    let (label, vrf_proof) = vrf.prove::<TC>(akd_label, freshness, version);
    ProvenLabel { label, vrf_proof }
}

/// The label proofs a lookup of one version needs besides the existence label (which the user
/// version holds): stored with the version so that a lookup does no ECVRF work, and reused by
/// history proofs. A cache of deterministic data: any copy equals [`StoredLookupProofs::compute`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredLookupProofs {
    /// The VRF proof of `FreshLabel(n)`.
    pub existence_proof: Vec<u8>,
    /// `StaleLabel(n)` and its VRF proof.
    pub freshness: ProvenLabel,
    /// `FreshLabel(2^⌊log2 n⌋)` and its VRF proof, when `n` is not a power of two (otherwise
    /// the marker is the existence label itself).
    pub marker: Option<ProvenLabel>,
}

impl StoredLookupProofs {
    /// Proves them for version `version` of `akd_label`: two VRF proofs, three when `version`
    /// is not a power of two.
    pub fn compute<TC: Configuration>(vrf: &VrfKey, akd_label: &AkdLabel, version: u64) -> Self {
        let marker_version = lookup_marker_version(version);
        let prove = |freshness, version| prove_one::<TC>(vrf, akd_label, (freshness, version));
        Self {
            existence_proof: prove(VersionFreshness::Fresh, version).vrf_proof,
            freshness: prove(VersionFreshness::Stale, version),
            marker: (marker_version != version)
                .then(|| prove(VersionFreshness::Fresh, marker_version)),
        }
    }

    /// The same proofs, taken from a lookup plan.
    pub fn from_plan(plan: &LookupPlan) -> Self {
        Self {
            existence_proof: plan.existence.vrf_proof.clone(),
            freshness: plan.freshness.clone(),
            marker: (lookup_marker_version(plan.version.version) != plan.version.version)
                .then(|| plan.marker.clone()),
        }
    }
}

/// Everything a lookup proof needs besides the tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LookupPlan {
    /// The latest version as of the proof's epoch.
    pub version: UserVersion,
    /// `FreshLabel(n)` and its VRF proof.
    pub existence: ProvenLabel,
    /// `FreshLabel(2^⌊log2 n⌋)` and its VRF proof.
    pub marker: ProvenLabel,
    /// `StaleLabel(n)` and its VRF proof.
    pub freshness: ProvenLabel,
    /// The commitment nonce of version `n`.
    pub commitment_nonce: Vec<u8>,
}

/// akd's marker version for a lookup: the largest power of two `≤ version` (versions start at
/// 1; 0, which stored data never holds, gives 1 instead of an underflow).
pub fn lookup_marker_version(version: u64) -> u64 {
    1u64 << (63 - version.max(1).leading_zeros())
}

impl LookupPlan {
    /// Plans the lookup of `akd_label` whose latest version (as of the proof's epoch) is
    /// `latest`. Three VRF proofs, computed in parallel.
    pub fn new<TC: Configuration>(vrf: &VrfKey, akd_label: &AkdLabel, latest: UserVersion) -> Self {
        Self::with_known::<TC>(vrf, akd_label, latest, &KnownProofs::none())
    }

    /// [`LookupPlan::new`], taking the label proofs `known` holds instead of proving them (no
    /// ECVRF work at all when the version's [`StoredLookupProofs`] are known).
    pub fn with_known<TC: Configuration>(
        vrf: &VrfKey,
        akd_label: &AkdLabel,
        latest: UserVersion,
        known: &KnownProofs,
    ) -> Self {
        let n = latest.version;
        let mut labels = prove_labels::<TC>(
            vrf,
            akd_label,
            &[
                (VersionFreshness::Fresh, n),
                (VersionFreshness::Fresh, lookup_marker_version(n)),
                (VersionFreshness::Stale, n),
            ],
            known,
        )
        .into_iter();
        let (existence, marker, freshness) =
            (next(&mut labels), next(&mut labels), next(&mut labels));
        let commitment_nonce = TC::get_commitment_nonce(
            &vrf.commitment_key::<TC>(),
            &existence.label,
            n,
            &latest.value,
        )
        .to_vec();
        Self {
            version: latest,
            existence,
            marker,
            freshness,
            commitment_nonce,
        }
    }

    /// The tree claims, in the order [`LookupPlan::assemble`] expects their proofs.
    pub fn claims(&self) -> Vec<Claim> {
        vec![
            Claim::Member(self.existence.label),
            Claim::Member(self.marker.label),
            Claim::Absent(self.freshness.label),
        ]
    }

    /// Builds akd's `LookupProof` from the answers to [`LookupPlan::claims`].
    pub fn assemble(self, proofs: Vec<TreeProof>) -> Result<LookupProof> {
        let [existence, marker, freshness]: [TreeProof; 3] = proofs
            .try_into()
            .map_err(|_| Error::Proof("a lookup needs exactly three tree proofs".into()))?;
        Ok(LookupProof {
            epoch: self.version.epoch,
            value: self.version.value,
            version: self.version.version,
            existence_vrf_proof: self.existence.vrf_proof,
            existence_proof: existence.member()?,
            marker_vrf_proof: self.marker.vrf_proof,
            marker_proof: marker.member()?,
            freshness_vrf_proof: self.freshness.vrf_proof,
            freshness_proof: freshness.absent()?,
            commitment_nonce: self.commitment_nonce,
        })
    }
}

/// Proof that a label has never been published as of an epoch, which akd cannot give: the
/// VRF-proven `FreshLabel(1)` and its non-membership proof. Versions are numbered from 1 without
/// gaps, so a label whose version 1 is absent has no version at all. Each half verifies with
/// stock akd code (the VRF with `akd_core::ecvrf`, the tree proof like a lookup's freshness
/// proof); `ktd_client::strict::absence_verify` checks both plus canonical anchoring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AbsenceProof {
    /// VRF proof binding `non_membership.label` to `(akd_label, Fresh, 1)`.
    pub vrf_proof: Vec<u8>,
    /// Non-membership proof of `FreshLabel(1)`.
    pub non_membership: NonMembershipProof,
}

/// Everything an absence proof needs besides the tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AbsencePlan {
    /// `FreshLabel(1)` and its VRF proof.
    pub first: ProvenLabel,
}

impl AbsencePlan {
    /// Plans the absence proof of `akd_label` (the caller has checked it has no version).
    pub fn new<TC: Configuration>(vrf: &VrfKey, akd_label: &AkdLabel) -> Self {
        let (label, vrf_proof) = vrf.prove::<TC>(akd_label, VersionFreshness::Fresh, 1);
        Self {
            first: ProvenLabel { label, vrf_proof },
        }
    }

    /// The one tree claim: `FreshLabel(1)` is not a leaf.
    pub fn claims(&self) -> Vec<Claim> {
        vec![Claim::Absent(self.first.label)]
    }

    /// Builds the proof from the answer to [`AbsencePlan::claims`].
    pub fn assemble(self, proofs: Vec<TreeProof>) -> Result<AbsenceProof> {
        let [absent]: [TreeProof; 1] = proofs
            .try_into()
            .map_err(|_| Error::Proof("an absence proof needs exactly one tree proof".into()))?;
        Ok(AbsenceProof {
            vrf_proof: self.first.vrf_proof,
            non_membership: absent.absent()?,
        })
    }
}

fn next(labels: &mut impl Iterator<Item = ProvenLabel>) -> ProvenLabel {
    labels.next().expect("one proven label per requested label")
}

/// One version's part of a history proof.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpdatePlan {
    /// The version.
    pub version: UserVersion,
    /// `FreshLabel(v)` and its VRF proof.
    pub fresh: ProvenLabel,
    /// `StaleLabel(v - 1)` and its VRF proof (none for version 1).
    pub stale: Option<ProvenLabel>,
    /// The commitment nonce of version `v`.
    pub commitment_nonce: Vec<u8>,
}

/// Everything a history proof needs besides the tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryPlan {
    /// Versions, newest first.
    pub updates: Vec<UpdatePlan>,
    /// Past marker versions (akd #444), with VRF proofs; proven present.
    pub past_markers: Vec<ProvenLabel>,
    /// Future marker versions, with VRF proofs; proven absent.
    pub future_markers: Vec<ProvenLabel>,
}

impl HistoryPlan {
    /// Plans the history proof of `akd_label` as of `epoch`, given all its versions published
    /// at or before `epoch` (any order).
    pub fn new<TC: Configuration>(
        vrf: &VrfKey,
        akd_label: &AkdLabel,
        versions: Vec<UserVersion>,
        params: HistoryParams,
        epoch: u64,
    ) -> Result<Self> {
        Self::with_known::<TC>(
            vrf,
            akd_label,
            versions,
            params,
            epoch,
            &KnownProofs::none(),
        )
    }

    /// [`HistoryPlan::new`], taking the label proofs `known` holds instead of proving them:
    /// every `(Fresh, v)`, `(Stale, v − 1)` and past marker is a stored lookup proof of some
    /// version; only future markers are always proven.
    pub fn with_known<TC: Configuration>(
        vrf: &VrfKey,
        akd_label: &AkdLabel,
        mut versions: Vec<UserVersion>,
        params: HistoryParams,
        epoch: u64,
        known: &KnownProofs,
    ) -> Result<Self> {
        versions.retain(|version| version.epoch <= epoch);
        versions.sort_by_key(|version| std::cmp::Reverse(version.epoch));
        if let HistoryParams::MostRecent(n) = params {
            if n == 0 {
                return Err(Error::EmptyHistoryRequest);
            }
            versions.truncate(n);
        }
        let (Some(start_version), Some(end_version)) = (
            versions.iter().map(|version| version.version).min(),
            versions.iter().map(|version| version.version).max(),
        ) else {
            return Err(Error::LabelNotFound {
                label: crate::error::LabelTag::of(akd_label),
                epoch,
            });
        };
        if start_version == 0 {
            return Err(Error::Corrupt("stored user version 0".into()));
        }
        let (past, future) = get_marker_versions(start_version, end_version, epoch);

        let mut work = Vec::new();
        for version in &versions {
            work.push((VersionFreshness::Fresh, version.version));
            if version.version > 1 {
                work.push((VersionFreshness::Stale, version.version - 1));
            }
        }
        work.extend(
            past.iter()
                .chain(&future)
                .map(|marker| (VersionFreshness::Fresh, *marker)),
        );
        let mut labels = prove_labels::<TC>(vrf, akd_label, &work, known).into_iter();

        let commitment_key = vrf.commitment_key::<TC>();
        let updates = versions
            .into_iter()
            .map(|version| {
                let fresh = next(&mut labels);
                let stale = (version.version > 1).then(|| next(&mut labels));
                let commitment_nonce = TC::get_commitment_nonce(
                    &commitment_key,
                    &fresh.label,
                    version.version,
                    &version.value,
                )
                .to_vec();
                UpdatePlan {
                    version,
                    fresh,
                    stale,
                    commitment_nonce,
                }
            })
            .collect();
        let past_markers = past.iter().map(|_| next(&mut labels)).collect();
        let future_markers = future.iter().map(|_| next(&mut labels)).collect();
        Ok(Self {
            updates,
            past_markers,
            future_markers,
        })
    }

    /// The tree claims, in the order [`HistoryPlan::assemble`] expects their proofs.
    pub fn claims(&self) -> Vec<Claim> {
        let mut claims = Vec::new();
        for update in &self.updates {
            claims.push(Claim::Member(update.fresh.label));
            if let Some(stale) = &update.stale {
                claims.push(Claim::Member(stale.label));
            }
        }
        claims.extend(
            self.past_markers
                .iter()
                .map(|marker| Claim::Member(marker.label)),
        );
        claims.extend(
            self.future_markers
                .iter()
                .map(|marker| Claim::Absent(marker.label)),
        );
        claims
    }

    /// Builds akd's `HistoryProof` from the answers to [`HistoryPlan::claims`].
    pub fn assemble(self, proofs: Vec<TreeProof>) -> Result<HistoryProof> {
        if proofs.len() != self.claims().len() {
            return Err(Error::Proof(
                "wrong number of tree proofs for a history proof".into(),
            ));
        }
        let mut proofs = proofs.into_iter();
        let mut take = || {
            proofs
                .next()
                .ok_or_else(|| Error::Proof("missing tree proof".into()))
        };
        let mut update_proofs = Vec::with_capacity(self.updates.len());
        for UpdatePlan {
            version,
            fresh,
            stale,
            commitment_nonce,
        } in self.updates
        {
            let existence_proof = take()?.member()?;
            let (previous_version_vrf_proof, previous_version_proof) = match stale {
                Some(stale) => (Some(stale.vrf_proof), Some(take()?.member()?)),
                None => (None, None),
            };
            update_proofs.push(UpdateProof {
                epoch: version.epoch,
                value: version.value,
                version: version.version,
                existence_vrf_proof: fresh.vrf_proof,
                existence_proof,
                previous_version_vrf_proof,
                previous_version_proof,
                commitment_nonce,
            });
        }
        let mut past_marker_vrf_proofs = Vec::new();
        let mut existence_of_past_marker_proofs = Vec::new();
        for marker in self.past_markers {
            past_marker_vrf_proofs.push(marker.vrf_proof);
            existence_of_past_marker_proofs.push(take()?.member()?);
        }
        let mut future_marker_vrf_proofs = Vec::new();
        let mut non_existence_of_future_marker_proofs = Vec::new();
        for marker in self.future_markers {
            future_marker_vrf_proofs.push(marker.vrf_proof);
            non_existence_of_future_marker_proofs.push(take()?.absent()?);
        }
        Ok(HistoryProof {
            update_proofs,
            past_marker_vrf_proofs,
            existence_of_past_marker_proofs,
            future_marker_vrf_proofs,
            non_existence_of_future_marker_proofs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use akd_core::AkdValue;
    use akd_core::configuration::WhatsAppV1Configuration as Wa;

    fn versions(vrf: &VrfKey, akd_label: &AkdLabel, count: u64) -> Vec<UserVersion> {
        (1..=count)
            .map(|version| UserVersion {
                version,
                epoch: version * 2,
                value: AkdValue::from(format!("value {version}").as_str()),
                fresh_label: vrf.node_label::<Wa>(akd_label, VersionFreshness::Fresh, version),
            })
            .collect()
    }

    #[test]
    fn stored_lookup_proofs_equal_the_ones_a_plan_computes_and_replace_them() {
        let vrf = VrfKey::from_seed(&[3u8; 32]).expect("valid seed");
        let akd_label = AkdLabel::from("alice");
        for version in versions(&vrf, &akd_label, 9) {
            let fresh = LookupPlan::new::<Wa>(&vrf, &akd_label, version.clone());
            let stored = StoredLookupProofs::compute::<Wa>(&vrf, &akd_label, version.version);
            assert_eq!(stored, StoredLookupProofs::from_plan(&fresh));
            assert_eq!(stored.marker.is_none(), version.version.is_power_of_two());
            let mut tampered = stored.clone();
            tampered.freshness.vrf_proof[0] ^= 1;
            let mut known = KnownProofs::none();
            known.add(&version, stored);
            assert_eq!(
                LookupPlan::with_known::<Wa>(&vrf, &akd_label, version.clone(), &known),
                fresh
            );
            // The stored proof is what the plan carries: nothing is re-proven.
            let mut known = KnownProofs::none();
            known.add(&version, tampered);
            let plan = LookupPlan::with_known::<Wa>(&vrf, &akd_label, version, &known);
            assert_ne!(plan.freshness, fresh.freshness);
        }
    }

    #[test]
    fn history_plans_from_stored_proofs_equal_computed_ones() {
        let vrf = VrfKey::from_seed(&[4u8; 32]).expect("valid seed");
        let akd_label = AkdLabel::from("bob");
        let all = versions(&vrf, &akd_label, 11);
        let mut known = KnownProofs::none();
        for version in &all[..7] {
            let stored = StoredLookupProofs::compute::<Wa>(&vrf, &akd_label, version.version);
            known.add(version, stored);
        }
        for params in [HistoryParams::Complete, HistoryParams::MostRecent(3)] {
            for epoch in [2, 9, 14, 22, 40] {
                let fresh = HistoryPlan::new::<Wa>(&vrf, &akd_label, all.clone(), params, epoch);
                let reused = HistoryPlan::with_known::<Wa>(
                    &vrf,
                    &akd_label,
                    all.clone(),
                    params,
                    epoch,
                    &known,
                );
                assert_eq!(reused.expect("plan"), fresh.expect("plan"));
            }
        }
        // Every label of the complete history at epoch 14 (versions 1..=7) is stored.
        let mut tampered = KnownProofs::none();
        for version in &all[..7] {
            let mut stored = StoredLookupProofs::compute::<Wa>(&vrf, &akd_label, version.version);
            stored.existence_proof[0] ^= 1;
            stored.freshness.vrf_proof[0] ^= 1;
            tampered.add(version, stored);
        }
        let fresh =
            HistoryPlan::new::<Wa>(&vrf, &akd_label, all.clone(), HistoryParams::Complete, 14)
                .expect("plan");
        let reused = HistoryPlan::with_known::<Wa>(
            &vrf,
            &akd_label,
            all,
            HistoryParams::Complete,
            14,
            &tampered,
        )
        .expect("plan");
        for (fresh, reused) in fresh.updates.iter().zip(&reused.updates) {
            assert_ne!(fresh.fresh.vrf_proof, reused.fresh.vrf_proof);
            if let (Some(fresh), Some(reused)) = (&fresh.stale, &reused.stale) {
                assert_ne!(fresh.vrf_proof, reused.vrf_proof);
            }
        }
    }
}
