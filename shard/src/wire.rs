//! Conversions between the shard's domain types and `ktd.shard.v1` messages, used by the gRPC
//! server ([`crate::server`]) and client ([`crate::client`]) and nowhere else.
//!
//! Decoding checks what a peer could get wrong (32-byte digests and leaf labels, labels within
//! 256 bits and canonical, known enum values) and returns [`Error::BadMessage`], never panics.

use akd_core::{AkdValue, AzksValue, NodeLabel};
use ktd_proto::ktd::cluster::v1 as cluster_pb;
use ktd_proto::ktd::shard::v1 as pb;
use ktd_proto::ktd::v1 as akd_pb;

use crate::api::{Fence, PartitionChunk, PartitionState, UserPartitionLeaves};
use crate::store::replica::RawRecord;

use crate::error::{Error, Result};
use ktd_core::proof::{AbsencePlan, HistoryPlan, LookupPlan, ProvenLabel, UpdatePlan};
use ktd_core::tree::audit::AppendOnlySlice;
use ktd_core::tree::{LeavesByPartition, NewLeaf, NodeRef, PartitionWalk, WalkRequest};
use ktd_core::user::UserVersion;

/// Builds decode errors attributed to `peer`.
#[derive(Clone, Copy, Debug)]
pub struct Decoder<'a> {
    /// Who sent the message (for error messages).
    pub peer: &'a str,
}

impl Decoder<'_> {
    fn bad(&self, message: impl Into<String>) -> Error {
        Error::BadMessage {
            peer: self.peer.to_string(),
            message: message.into(),
        }
    }

    fn digest(&self, bytes: &[u8], what: &str) -> Result<[u8; 32]> {
        bytes
            .try_into()
            .map_err(|_| self.bad(format!("{what} must be 32 bytes, got {}", bytes.len())))
    }

    fn required<'m, T>(&self, field: &'m Option<T>, what: &str) -> Result<&'m T> {
        field
            .as_ref()
            .ok_or_else(|| self.bad(format!("{what} is missing")))
    }

    /// A node label, which must be canonical (no bits beyond its length).
    pub fn label(&self, label: &akd_pb::NodeLabel) -> Result<NodeLabel> {
        let label = NodeLabel::try_from(label).map_err(|error| self.bad(error.to_string()))?;
        if label.get_prefix(label.label_len) != label {
            return Err(self.bad("node label has bits set beyond its length"));
        }
        Ok(label)
    }

    fn required_label(&self, label: &Option<akd_pb::NodeLabel>, what: &str) -> Result<NodeLabel> {
        self.label(self.required(label, what)?)
    }

    /// A `NodeRef`.
    pub fn node_ref(&self, node_ref: &pb::NodeRef) -> Result<NodeRef> {
        if node_ref.min_epoch > node_ref.max_epoch {
            return Err(self.bad("node ref with min epoch above max epoch"));
        }
        Ok(NodeRef {
            label: self.required_label(&node_ref.label, "NodeRef.label")?,
            hash: AzksValue(self.digest(&node_ref.hash, "NodeRef.hash")?),
            min_epoch: node_ref.min_epoch,
            max_epoch: node_ref.max_epoch,
        })
    }

    /// An optional `NodeRef`.
    pub fn optional_node_ref(&self, node_ref: &Option<pb::NodeRef>) -> Result<Option<NodeRef>> {
        node_ref
            .as_ref()
            .map(|node_ref| self.node_ref(node_ref))
            .transpose()
    }

    /// Leaves of some partitions.
    pub fn partition_leaves(
        &self,
        partitions: &[pb::PartitionLeaves],
    ) -> Result<LeavesByPartition> {
        partitions
            .iter()
            .map(|partition| {
                let leaves = partition
                    .leaves
                    .iter()
                    .map(|leaf| {
                        Ok(NewLeaf {
                            label: NodeLabel::new(self.digest(&leaf.label, "Leaf.label")?, 256),
                            commitment: AzksValue(
                                self.digest(&leaf.commitment, "Leaf.commitment")?,
                            ),
                        })
                    })
                    .collect::<Result<_>>()?;
                Ok((partition.partition, leaves))
            })
            .collect()
    }

    /// Partition roots.
    pub fn partition_roots(
        &self,
        roots: &[pb::PartitionRoot],
    ) -> Result<Vec<(u32, Option<NodeRef>)>> {
        roots
            .iter()
            .map(|root| Ok((root.partition, self.optional_node_ref(&root.root)?)))
            .collect()
    }

    /// Walk requests.
    pub fn walk_requests(&self, targets: &[pb::WalkTarget]) -> Result<Vec<WalkRequest>> {
        targets
            .iter()
            .map(|target| {
                Ok(WalkRequest {
                    root: self.optional_node_ref(&target.root)?,
                    target: self.required_label(&target.target, "WalkTarget.target")?,
                })
            })
            .collect()
    }

    fn steps(&self, steps: &[akd_pb::SiblingProof]) -> Result<Vec<akd_core::SiblingProof>> {
        steps
            .iter()
            .map(|step| {
                akd_core::SiblingProof::try_from(step).map_err(|error| self.bad(error.to_string()))
            })
            .collect()
    }

    /// Walk results.
    pub fn walks(&self, walks: &[pb::PartitionWalk]) -> Result<Vec<PartitionWalk>> {
        walks
            .iter()
            .map(
                |walk| match self.required(&walk.outcome, "PartitionWalk.outcome")? {
                    pb::partition_walk::Outcome::Found(found) => Ok(PartitionWalk::Found {
                        steps: self.steps(&found.steps)?,
                        hash_val: AzksValue(self.digest(&found.hash_val, "Found.hash_val")?),
                    }),
                    pb::partition_walk::Outcome::Absent(absent) => {
                        let children: Vec<akd_core::AzksElement> = absent
                            .children
                            .iter()
                            .map(|child| {
                                akd_core::AzksElement::try_from(child)
                                    .map_err(|error| self.bad(error.to_string()))
                            })
                            .collect::<Result<_>>()?;
                        let children: [akd_core::AzksElement; 2] = children
                            .try_into()
                            .map_err(|_| self.bad("Absent.children must have two elements"))?;
                        Ok(PartitionWalk::Absent {
                            steps: self.steps(&absent.steps)?,
                            node: self.required_label(&absent.node, "Absent.node")?,
                            node_value: AzksValue(
                                self.digest(&absent.node_value, "Absent.node_value")?,
                            ),
                            children,
                        })
                    }
                    pb::partition_walk::Outcome::Outside(_) => Ok(PartitionWalk::Outside),
                },
            )
            .collect()
    }

    /// An append-only slice.
    pub fn slice(&self, slice: &pb::AppendOnlySliceResponse) -> Result<AppendOnlySlice> {
        let elements = |elements: &[akd_pb::AzksElement]| {
            elements
                .iter()
                .map(|element| {
                    akd_core::AzksElement::try_from(element)
                        .map_err(|error| self.bad(error.to_string()))
                })
                .collect::<Result<Vec<_>>>()
        };
        Ok(AppendOnlySlice {
            unchanged: elements(&slice.unchanged)?,
            inserted: elements(&slice.inserted)?,
        })
    }

    fn proven(&self, proven: &Option<pb::ProvenLabel>, what: &str) -> Result<ProvenLabel> {
        let proven = self.required(proven, what)?;
        Ok(ProvenLabel {
            label: self.required_label(&proven.label, what)?,
            vrf_proof: proven.vrf_proof.clone(),
        })
    }

    fn user_version(&self, version: &Option<pb::UserVersion>) -> Result<UserVersion> {
        let version = self.required(version, "UserVersion")?;
        Ok(UserVersion {
            version: version.version,
            epoch: version.epoch,
            value: AkdValue(version.value.clone()),
            fresh_label: self.required_label(&version.fresh_label, "UserVersion.fresh_label")?,
        })
    }

    /// A lookup plan.
    pub fn lookup_plan(&self, plan: &pb::LookupPlanResponse) -> Result<LookupPlan> {
        Ok(LookupPlan {
            version: self.user_version(&plan.version)?,
            existence: self.proven(&plan.existence, "LookupPlan.existence")?,
            marker: self.proven(&plan.marker, "LookupPlan.marker")?,
            freshness: self.proven(&plan.freshness, "LookupPlan.freshness")?,
            commitment_nonce: plan.commitment_nonce.clone(),
        })
    }

    /// An absence plan.
    pub fn absence_plan(&self, plan: &pb::AbsencePlanResponse) -> Result<AbsencePlan> {
        Ok(AbsencePlan {
            first: self.proven(&plan.first, "AbsencePlan.first")?,
        })
    }

    /// A history plan.
    pub fn history_plan(&self, plan: &pb::HistoryPlanResponse) -> Result<HistoryPlan> {
        let markers = |markers: &[pb::ProvenLabel]| {
            markers
                .iter()
                .map(|marker| self.proven(&Some(marker.clone()), "HistoryPlan marker"))
                .collect::<Result<Vec<_>>>()
        };
        Ok(HistoryPlan {
            updates: plan
                .updates
                .iter()
                .map(|update| {
                    Ok(UpdatePlan {
                        version: self.user_version(&update.version)?,
                        fresh: self.proven(&update.fresh, "HistoryUpdatePlan.fresh")?,
                        stale: update
                            .stale
                            .as_ref()
                            .map(|stale| {
                                self.proven(&Some(stale.clone()), "HistoryUpdatePlan.stale")
                            })
                            .transpose()?,
                        commitment_nonce: update.commitment_nonce.clone(),
                    })
                })
                .collect::<Result<_>>()?,
            past_markers: markers(&plan.past_markers)?,
            future_markers: markers(&plan.future_markers)?,
        })
    }
}

/// Encodes a `NodeRef`.
pub fn node_ref(node_ref: &NodeRef) -> pb::NodeRef {
    pb::NodeRef {
        label: Some((&node_ref.label).into()),
        hash: node_ref.hash.0.to_vec(),
        min_epoch: node_ref.min_epoch,
        max_epoch: node_ref.max_epoch,
    }
}

/// Encodes leaves of some partitions.
pub fn partition_leaves(partitions: &[(u32, Vec<NewLeaf>)]) -> Vec<pb::PartitionLeaves> {
    partitions
        .iter()
        .map(|(partition, leaves)| pb::PartitionLeaves {
            partition: *partition,
            leaves: leaves
                .iter()
                .map(|leaf| pb::Leaf {
                    label: leaf.label.label_val.to_vec(),
                    commitment: leaf.commitment.0.to_vec(),
                })
                .collect(),
        })
        .collect()
}

/// Encodes partition roots.
pub fn partition_roots(roots: &[(u32, Option<NodeRef>)]) -> Vec<pb::PartitionRoot> {
    roots
        .iter()
        .map(|(partition, root)| pb::PartitionRoot {
            partition: *partition,
            root: root.as_ref().map(node_ref),
        })
        .collect()
}

/// Encodes walk requests.
pub fn walk_requests(requests: &[WalkRequest]) -> Vec<pb::WalkTarget> {
    requests
        .iter()
        .map(|request| pb::WalkTarget {
            root: request.root.as_ref().map(node_ref),
            target: Some((&request.target).into()),
        })
        .collect()
}

/// Encodes walk results.
pub fn walks(walks: &[PartitionWalk]) -> Vec<pb::PartitionWalk> {
    walks
        .iter()
        .map(|walk| pb::PartitionWalk {
            outcome: Some(match walk {
                PartitionWalk::Found { steps, hash_val } => {
                    pb::partition_walk::Outcome::Found(pb::Found {
                        steps: steps.iter().map(Into::into).collect(),
                        hash_val: hash_val.0.to_vec(),
                    })
                }
                PartitionWalk::Absent {
                    steps,
                    node,
                    node_value,
                    children,
                } => pb::partition_walk::Outcome::Absent(pb::Absent {
                    steps: steps.iter().map(Into::into).collect(),
                    node: Some(node.into()),
                    node_value: node_value.0.to_vec(),
                    children: children.iter().map(Into::into).collect(),
                }),
                PartitionWalk::Outside => pb::partition_walk::Outcome::Outside(pb::Outside {}),
            }),
        })
        .collect()
}

/// Encodes an append-only slice.
pub fn slice(slice: &AppendOnlySlice) -> pb::AppendOnlySliceResponse {
    pb::AppendOnlySliceResponse {
        unchanged: slice.unchanged.iter().map(Into::into).collect(),
        inserted: slice.inserted.iter().map(Into::into).collect(),
    }
}

fn proven(proven: &ProvenLabel) -> pb::ProvenLabel {
    pb::ProvenLabel {
        label: Some((&proven.label).into()),
        vrf_proof: proven.vrf_proof.clone(),
    }
}

fn user_version(version: &UserVersion) -> pb::UserVersion {
    pb::UserVersion {
        version: version.version,
        epoch: version.epoch,
        value: version.value.0.clone(),
        fresh_label: Some((&version.fresh_label).into()),
    }
}

/// Encodes a lookup plan.
pub fn lookup_plan(plan: &LookupPlan) -> pb::LookupPlanResponse {
    pb::LookupPlanResponse {
        version: Some(user_version(&plan.version)),
        existence: Some(proven(&plan.existence)),
        marker: Some(proven(&plan.marker)),
        freshness: Some(proven(&plan.freshness)),
        commitment_nonce: plan.commitment_nonce.clone(),
    }
}

/// Encodes an absence plan.
pub fn absence_plan(plan: &AbsencePlan) -> pb::AbsencePlanResponse {
    pb::AbsencePlanResponse {
        first: Some(proven(&plan.first)),
    }
}

/// Encodes a history plan.
pub fn history_plan(plan: &HistoryPlan) -> pb::HistoryPlanResponse {
    pb::HistoryPlanResponse {
        updates: plan
            .updates
            .iter()
            .map(|update| pb::HistoryUpdatePlan {
                version: Some(user_version(&update.version)),
                fresh: Some(proven(&update.fresh)),
                stale: update.stale.as_ref().map(proven),
                commitment_nonce: update.commitment_nonce.clone(),
            })
            .collect(),
        past_markers: plan.past_markers.iter().map(proven).collect(),
        future_markers: plan.future_markers.iter().map(proven).collect(),
    }
}

/// Encodes a fence.
pub fn fence(fence: &Fence) -> cluster_pb::Fence {
    cluster_pb::Fence {
        term: fence.term,
        committed_epoch: fence.committed_epoch,
        shard_map: Some(crate::replicated::shard_map_to_pb(&fence.map)),
        partition_bits: u32::from(fence.map.bits()),
        safe_epoch: fence.safe_epoch,
    }
}

/// Encodes one user partition's leaves.
pub fn user_partition_leaves(leaves: &UserPartitionLeaves) -> pb::UserPartitionLeaves {
    pb::UserPartitionLeaves {
        user_partition: leaves.user_partition,
        digest: leaves.digest.to_vec(),
        leaves: partition_leaves(&leaves.leaves),
    }
}

/// Encodes a chunk of a partition copy.
pub fn chunk(chunk: &PartitionChunk) -> pb::PartitionChunk {
    let records = |records: &[RawRecord]| {
        records
            .iter()
            .map(|(key, value)| pb::Record {
                key: key.clone(),
                value: value.clone(),
            })
            .collect()
    };
    pb::PartitionChunk {
        nodes: records(&chunk.nodes),
        users: records(&chunk.users),
        checksum: chunk.checksum.to_vec(),
        last: chunk.total_records.is_some(),
        total_records: chunk.total_records.unwrap_or(0),
    }
}

/// Encodes a partition's state.
pub fn partition_state(state: &PartitionState) -> pb::PartitionState {
    pb::PartitionState {
        partition: state.partition,
        built_epoch: state.built_epoch,
        root: state.root.as_ref().map(node_ref),
        held: state.held,
        mismatch: state.mismatch,
        approximate_bytes: state.approximate_bytes,
        copying: state.copying,
        copied_bytes: state.copied_bytes,
        copy_millis: state.copy_millis,
        orphaned: state.orphaned,
        orphan_drop_in_millis: state.orphan_drop_in_millis,
    }
}

impl Decoder<'_> {
    /// A fence (its map checked by `ShardMap::new`).
    pub fn fence(&self, fence: &Option<cluster_pb::Fence>) -> Result<Fence> {
        let fence = self.required(fence, "fence")?;
        let map = self.required(&fence.shard_map, "Fence.shard_map")?;
        let map = crate::replicated::shard_map_with_bits(fence.partition_bits, map)
            .map_err(|error| self.bad(format!("fence shard map: {error}")))?;
        if fence.safe_epoch > fence.committed_epoch {
            return Err(self.bad(format!(
                "fence safe epoch {} is above its committed epoch {}",
                fence.safe_epoch, fence.committed_epoch
            )));
        }
        Ok(Fence {
            term: fence.term,
            committed_epoch: fence.committed_epoch,
            map,
            safe_epoch: fence.safe_epoch,
        })
    }

    /// One user partition's leaves.
    pub fn user_partition_leaves(
        &self,
        leaves: &pb::UserPartitionLeaves,
    ) -> Result<UserPartitionLeaves> {
        Ok(UserPartitionLeaves {
            user_partition: leaves.user_partition,
            digest: self.digest(&leaves.digest, "UserPartitionLeaves.digest")?,
            leaves: self.partition_leaves(&leaves.leaves)?,
        })
    }

    /// A chunk of a partition copy.
    pub fn chunk(&self, chunk: pb::PartitionChunk) -> Result<PartitionChunk> {
        let records = |records: Vec<pb::Record>| {
            records
                .into_iter()
                .map(|record| (record.key, record.value))
                .collect()
        };
        Ok(PartitionChunk {
            checksum: self.digest(&chunk.checksum, "PartitionChunk.checksum")?,
            nodes: records(chunk.nodes),
            users: records(chunk.users),
            total_records: chunk.last.then_some(chunk.total_records),
        })
    }

    /// A partition's state.
    pub fn partition_state(&self, state: &pb::PartitionState) -> Result<PartitionState> {
        Ok(PartitionState {
            partition: state.partition,
            held: state.held,
            built_epoch: state.built_epoch,
            root: self.optional_node_ref(&state.root)?,
            mismatch: state.mismatch,
            approximate_bytes: state.approximate_bytes,
            copying: state.copying,
            copied_bytes: state.copied_bytes,
            copy_millis: state.copy_millis,
            orphaned: state.orphaned,
            orphan_drop_in_millis: state.orphan_drop_in_millis,
        })
    }

    /// Updates.
    pub fn updates(&self, updates: &[akd_pb::Update]) -> Vec<(akd_core::AkdLabel, AkdValue)> {
        updates
            .iter()
            .map(|update| {
                (
                    akd_core::AkdLabel(update.label.clone()),
                    AkdValue(update.value.clone()),
                )
            })
            .collect()
    }
}

/// Encodes updates.
pub fn updates(updates: &[(akd_core::AkdLabel, AkdValue)]) -> Vec<akd_pb::Update> {
    updates
        .iter()
        .map(|(akd_label, value)| akd_pb::Update {
            label: akd_label.0.clone(),
            value: value.0.clone(),
        })
        .collect()
}
