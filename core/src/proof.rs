//! Assembly of akd's `LookupProof` and `HistoryProof` (akd-spec §5.2).
//!
//! A proof is built in three steps so that the distributed pipeline can run them in different
//! processes: a *plan* from the user's versions and the VRF key (which node labels to prove, with
//! their VRF proofs and commitment nonces), tree *claims* answered by walks and stitching
//! ([`prove_claims`]), and assembly into akd's structs, field for field as akd fills them.

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

fn prove_labels<TC: Configuration>(
    vrf: &VrfKey,
    akd_label: &AkdLabel,
    work: &[(VersionFreshness, u64)],
) -> Vec<ProvenLabel> {
    work.par_iter()
        .map(|(freshness, version)| {
            let (label, vrf_proof) = vrf.prove::<TC>(akd_label, *freshness, *version);
            ProvenLabel { label, vrf_proof }
        })
        .collect()
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
        let n = latest.version;
        let mut labels = prove_labels::<TC>(
            vrf,
            akd_label,
            &[
                (VersionFreshness::Fresh, n),
                (VersionFreshness::Fresh, lookup_marker_version(n)),
                (VersionFreshness::Stale, n),
            ],
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
        mut versions: Vec<UserVersion>,
        params: HistoryParams,
        epoch: u64,
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
        let mut labels = prove_labels::<TC>(vrf, akd_label, &work).into_iter();

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
