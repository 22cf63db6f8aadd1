//! Conversions between `akd_core`'s proof types and ktd's wire messages (`ktd/v1/akd.proto`).
//!
//! Encoding follows akd_core's own converters byte for byte (akd-spec §6): `label_val` is
//! minimised (trailing zero bytes stripped), digests are 32 bytes, every scalar is present.
//! Decoding is as strict as akd_core's: missing fields, digests that are not 32 bytes, labels
//! over 32 bytes or 256 bits, and directions other than 0/1 (after akd's `& 0x0F` mask) are
//! errors, never panics.

use akd_core::{AkdValue, AzksValue, Direction};

use crate::ktd::v1 as pb;

/// Why a wire message does not convert to an akd proof.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed proof: {0}")]
pub struct ProofDecodeError(pub String);

type Result<T> = std::result::Result<T, ProofDecodeError>;

fn missing(what: &str) -> ProofDecodeError {
    ProofDecodeError(format!("required field {what} is missing"))
}

fn required<'a, T>(field: &'a Option<T>, what: &str) -> Result<&'a T> {
    field.as_ref().ok_or_else(|| missing(what))
}

fn digest(bytes: &[u8], what: &str) -> Result<[u8; 32]> {
    bytes
        .try_into()
        .map_err(|_| ProofDecodeError(format!("{what} must be 32 bytes, got {}", bytes.len())))
}

fn minimal_label_val(label_val: &[u8; 32]) -> Vec<u8> {
    match label_val.iter().rposition(|byte| *byte != 0) {
        Some(last) => label_val[..=last].to_vec(),
        None => Vec::new(),
    }
}

impl From<&akd_core::NodeLabel> for pb::NodeLabel {
    fn from(label: &akd_core::NodeLabel) -> Self {
        Self {
            label_val: Some(minimal_label_val(&label.label_val)),
            label_len: Some(label.label_len),
        }
    }
}

impl TryFrom<&pb::NodeLabel> for akd_core::NodeLabel {
    type Error = ProofDecodeError;

    fn try_from(label: &pb::NodeLabel) -> Result<Self> {
        let label_val = required(&label.label_val, "NodeLabel.label_val")?;
        let label_len = *required(&label.label_len, "NodeLabel.label_len")?;
        if label_val.len() > 32 {
            return Err(ProofDecodeError(format!(
                "label value of {} bytes",
                label_val.len()
            )));
        }
        if label_len > 256 {
            return Err(ProofDecodeError(format!(
                "label length {label_len} exceeds 256 bits"
            )));
        }
        let mut value = [0u8; 32];
        value[..label_val.len()].copy_from_slice(label_val);
        Ok(akd_core::NodeLabel::new(value, label_len))
    }
}

fn label(field: &Option<pb::NodeLabel>, what: &str) -> Result<akd_core::NodeLabel> {
    required(field, what)?.try_into()
}

impl From<&akd_core::AzksElement> for pb::AzksElement {
    fn from(element: &akd_core::AzksElement) -> Self {
        Self {
            label: Some((&element.label).into()),
            value: Some(element.value.0.to_vec()),
        }
    }
}

impl TryFrom<&pb::AzksElement> for akd_core::AzksElement {
    type Error = ProofDecodeError;

    fn try_from(element: &pb::AzksElement) -> Result<Self> {
        Ok(Self {
            label: label(&element.label, "AzksElement.label")?,
            value: AzksValue(digest(
                required(&element.value, "AzksElement.value")?,
                "AzksElement.value",
            )?),
        })
    }
}

impl From<&akd_core::SiblingProof> for pb::SiblingProof {
    fn from(step: &akd_core::SiblingProof) -> Self {
        Self {
            label: Some((&step.label).into()),
            siblings: step.siblings.iter().map(Into::into).collect(),
            direction: Some(step.direction as u32),
        }
    }
}

impl TryFrom<&pb::SiblingProof> for akd_core::SiblingProof {
    type Error = ProofDecodeError;

    fn try_from(step: &pb::SiblingProof) -> Result<Self> {
        let direction = match required(&step.direction, "SiblingProof.direction")? & 0x0F {
            0 => Direction::Left,
            1 => Direction::Right,
            other => return Err(ProofDecodeError(format!("invalid direction {other}"))),
        };
        let sibling = step
            .siblings
            .first()
            .ok_or_else(|| missing("SiblingProof.siblings"))?;
        Ok(Self {
            label: label(&step.label, "SiblingProof.label")?,
            siblings: [sibling.try_into()?],
            direction,
        })
    }
}

impl From<&akd_core::MembershipProof> for pb::MembershipProof {
    fn from(proof: &akd_core::MembershipProof) -> Self {
        Self {
            label: Some((&proof.label).into()),
            hash_val: Some(proof.hash_val.0.to_vec()),
            sibling_proofs: proof.sibling_proofs.iter().map(Into::into).collect(),
        }
    }
}

impl TryFrom<&pb::MembershipProof> for akd_core::MembershipProof {
    type Error = ProofDecodeError;

    fn try_from(proof: &pb::MembershipProof) -> Result<Self> {
        Ok(Self {
            label: label(&proof.label, "MembershipProof.label")?,
            hash_val: AzksValue(digest(
                required(&proof.hash_val, "MembershipProof.hash_val")?,
                "MembershipProof.hash_val",
            )?),
            sibling_proofs: proof
                .sibling_proofs
                .iter()
                .map(TryInto::try_into)
                .collect::<Result<_>>()?,
        })
    }
}

fn membership(
    field: &Option<pb::MembershipProof>,
    what: &str,
) -> Result<akd_core::MembershipProof> {
    required(field, what)?.try_into()
}

impl From<&akd_core::NonMembershipProof> for pb::NonMembershipProof {
    fn from(proof: &akd_core::NonMembershipProof) -> Self {
        Self {
            label: Some((&proof.label).into()),
            longest_prefix: Some((&proof.longest_prefix).into()),
            longest_prefix_children: proof
                .longest_prefix_children
                .iter()
                .map(Into::into)
                .collect(),
            longest_prefix_membership_proof: Some((&proof.longest_prefix_membership_proof).into()),
        }
    }
}

impl TryFrom<&pb::NonMembershipProof> for akd_core::NonMembershipProof {
    type Error = ProofDecodeError;

    fn try_from(proof: &pb::NonMembershipProof) -> Result<Self> {
        let children: Vec<akd_core::AzksElement> = proof
            .longest_prefix_children
            .iter()
            .map(TryInto::try_into)
            .collect::<Result<_>>()?;
        let longest_prefix_children: [akd_core::AzksElement; 2] =
            children.try_into().map_err(|children: Vec<_>| {
                ProofDecodeError(format!(
                    "longest_prefix_children must have 2 elements, got {}",
                    children.len()
                ))
            })?;
        Ok(Self {
            label: label(&proof.label, "NonMembershipProof.label")?,
            longest_prefix: label(&proof.longest_prefix, "NonMembershipProof.longest_prefix")?,
            longest_prefix_children,
            longest_prefix_membership_proof: membership(
                &proof.longest_prefix_membership_proof,
                "NonMembershipProof.longest_prefix_membership_proof",
            )?,
        })
    }
}

impl From<&akd_core::LookupProof> for pb::LookupProof {
    fn from(proof: &akd_core::LookupProof) -> Self {
        Self {
            epoch: Some(proof.epoch),
            value: Some(proof.value.0.clone()),
            version: Some(proof.version),
            existence_vrf_proof: Some(proof.existence_vrf_proof.clone()),
            existence_proof: Some((&proof.existence_proof).into()),
            marker_vrf_proof: Some(proof.marker_vrf_proof.clone()),
            marker_proof: Some((&proof.marker_proof).into()),
            freshness_vrf_proof: Some(proof.freshness_vrf_proof.clone()),
            freshness_proof: Some((&proof.freshness_proof).into()),
            commitment_nonce: Some(proof.commitment_nonce.clone()),
        }
    }
}

impl TryFrom<&pb::LookupProof> for akd_core::LookupProof {
    type Error = ProofDecodeError;

    fn try_from(proof: &pb::LookupProof) -> Result<Self> {
        Ok(Self {
            epoch: *required(&proof.epoch, "LookupProof.epoch")?,
            value: AkdValue(required(&proof.value, "LookupProof.value")?.clone()),
            version: *required(&proof.version, "LookupProof.version")?,
            existence_vrf_proof: required(
                &proof.existence_vrf_proof,
                "LookupProof.existence_vrf_proof",
            )?
            .clone(),
            existence_proof: membership(&proof.existence_proof, "LookupProof.existence_proof")?,
            marker_vrf_proof: required(&proof.marker_vrf_proof, "LookupProof.marker_vrf_proof")?
                .clone(),
            marker_proof: membership(&proof.marker_proof, "LookupProof.marker_proof")?,
            freshness_vrf_proof: required(
                &proof.freshness_vrf_proof,
                "LookupProof.freshness_vrf_proof",
            )?
            .clone(),
            freshness_proof: required(&proof.freshness_proof, "LookupProof.freshness_proof")?
                .try_into()?,
            commitment_nonce: required(&proof.commitment_nonce, "LookupProof.commitment_nonce")?
                .clone(),
        })
    }
}

impl From<&akd_core::UpdateProof> for pb::UpdateProof {
    fn from(proof: &akd_core::UpdateProof) -> Self {
        Self {
            epoch: Some(proof.epoch),
            value: Some(proof.value.0.clone()),
            version: Some(proof.version),
            existence_vrf_proof: Some(proof.existence_vrf_proof.clone()),
            existence_proof: Some((&proof.existence_proof).into()),
            previous_version_vrf_proof: proof.previous_version_vrf_proof.clone(),
            previous_version_proof: proof.previous_version_proof.as_ref().map(Into::into),
            commitment_nonce: Some(proof.commitment_nonce.clone()),
        }
    }
}

impl TryFrom<&pb::UpdateProof> for akd_core::UpdateProof {
    type Error = ProofDecodeError;

    fn try_from(proof: &pb::UpdateProof) -> Result<Self> {
        Ok(Self {
            epoch: *required(&proof.epoch, "UpdateProof.epoch")?,
            value: AkdValue(required(&proof.value, "UpdateProof.value")?.clone()),
            version: *required(&proof.version, "UpdateProof.version")?,
            existence_vrf_proof: required(
                &proof.existence_vrf_proof,
                "UpdateProof.existence_vrf_proof",
            )?
            .clone(),
            existence_proof: membership(&proof.existence_proof, "UpdateProof.existence_proof")?,
            previous_version_vrf_proof: proof.previous_version_vrf_proof.clone(),
            previous_version_proof: proof
                .previous_version_proof
                .as_ref()
                .map(TryInto::try_into)
                .transpose()?,
            commitment_nonce: required(&proof.commitment_nonce, "UpdateProof.commitment_nonce")?
                .clone(),
        })
    }
}

impl From<&akd_core::HistoryProof> for pb::HistoryProof {
    fn from(proof: &akd_core::HistoryProof) -> Self {
        Self {
            update_proofs: proof.update_proofs.iter().map(Into::into).collect(),
            past_marker_vrf_proofs: proof.past_marker_vrf_proofs.clone(),
            existence_of_past_marker_proofs: proof
                .existence_of_past_marker_proofs
                .iter()
                .map(Into::into)
                .collect(),
            future_marker_vrf_proofs: proof.future_marker_vrf_proofs.clone(),
            non_existence_of_future_marker_proofs: proof
                .non_existence_of_future_marker_proofs
                .iter()
                .map(Into::into)
                .collect(),
        }
    }
}

impl TryFrom<&pb::HistoryProof> for akd_core::HistoryProof {
    type Error = ProofDecodeError;

    fn try_from(proof: &pb::HistoryProof) -> Result<Self> {
        Ok(Self {
            update_proofs: proof
                .update_proofs
                .iter()
                .map(TryInto::try_into)
                .collect::<Result<_>>()?,
            past_marker_vrf_proofs: proof.past_marker_vrf_proofs.clone(),
            existence_of_past_marker_proofs: proof
                .existence_of_past_marker_proofs
                .iter()
                .map(TryInto::try_into)
                .collect::<Result<_>>()?,
            future_marker_vrf_proofs: proof.future_marker_vrf_proofs.clone(),
            non_existence_of_future_marker_proofs: proof
                .non_existence_of_future_marker_proofs
                .iter()
                .map(TryInto::try_into)
                .collect::<Result<_>>()?,
        })
    }
}

impl From<&akd_core::SingleAppendOnlyProof> for pb::SingleAppendOnlyProof {
    fn from(proof: &akd_core::SingleAppendOnlyProof) -> Self {
        Self {
            inserted: proof.inserted.iter().map(Into::into).collect(),
            unchanged_nodes: proof.unchanged_nodes.iter().map(Into::into).collect(),
        }
    }
}

impl TryFrom<&pb::SingleAppendOnlyProof> for akd_core::SingleAppendOnlyProof {
    type Error = ProofDecodeError;

    fn try_from(proof: &pb::SingleAppendOnlyProof) -> Result<Self> {
        Ok(Self {
            inserted: proof
                .inserted
                .iter()
                .map(TryInto::try_into)
                .collect::<Result<_>>()?,
            unchanged_nodes: proof
                .unchanged_nodes
                .iter()
                .map(TryInto::try_into)
                .collect::<Result<_>>()?,
        })
    }
}

impl From<&akd_core::AppendOnlyProof> for pb::AppendOnlyProof {
    fn from(proof: &akd_core::AppendOnlyProof) -> Self {
        Self {
            proofs: proof.proofs.iter().map(Into::into).collect(),
            epochs: proof.epochs.clone(),
        }
    }
}

impl TryFrom<&pb::AppendOnlyProof> for akd_core::AppendOnlyProof {
    type Error = ProofDecodeError;

    fn try_from(proof: &pb::AppendOnlyProof) -> Result<Self> {
        Ok(Self {
            proofs: proof
                .proofs
                .iter()
                .map(TryInto::try_into)
                .collect::<Result<_>>()?,
            epochs: proof.epochs.clone(),
        })
    }
}
