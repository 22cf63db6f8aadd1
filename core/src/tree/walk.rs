//! Proof paths inside one partition, as of the epoch its root was taken from.
//!
//! A walk descends from the partition root toward a target label, recording one
//! `SiblingProof` per step exactly as akd's `get_lcp_node_label_with_membership_proof` does
//! (akd-spec §5.2): the path node's label, the other child as `(label, value-as-seen-by-parent)`,
//! and the side taken. It ends at the target (membership) or at the **deepest** node whose label
//! is a strict prefix of the target (canonical non-membership). Many walks advance together,
//! with one store read per tree level for all of them. Every node read is re-hashed against the
//! value its parent records, so a damaged or diverged copy fails instead of answering.

use akd_core::configuration::Configuration;
use akd_core::{AzksElement, AzksValue, NodeLabel, SiblingProof};

use super::{NodeRef, TreeStore, check_children, parent_value, read_existing};
use crate::error::Result;
use crate::label;

/// One walk: a partition root (as of some epoch) and the label to walk toward.
#[derive(Clone, Copy, Debug)]
pub struct WalkRequest {
    /// The partition root, `None` for an empty partition.
    pub root: Option<NodeRef>,
    /// The label to prove membership or non-membership of.
    pub target: NodeLabel,
}

/// Where a walk ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartitionWalk {
    /// The target is in the partition. `steps` run from the partition root to the target's
    /// parent; `hash_val` is the target's value as seen by its parent (epoch-mixed for a leaf).
    Found {
        /// Sibling proofs, partition root first.
        steps: Vec<SiblingProof>,
        /// The target's value as its parent hashes it.
        hash_val: AzksValue,
    },
    /// The target is absent; `node` is the deepest node whose label is a strict prefix of it.
    /// `steps` lead from the partition root to `node` (exclusive).
    Absent {
        /// Sibling proofs, partition root first, ending above `node`.
        steps: Vec<SiblingProof>,
        /// The deepest strict-prefix node.
        node: NodeLabel,
        /// Its value.
        node_value: AzksValue,
        /// Its children `[left, right]` as `(label, value-as-seen-by-parent)`.
        children: [AzksElement; 2],
    },
    /// The partition root is neither the target nor a strict prefix of it (or the partition is
    /// empty): the answer lies above the partition, in the stitched top of the trie.
    Outside,
}

/// Walks every request; `result[i]` answers `requests[i]`.
pub fn walk<TC: Configuration, S: TreeStore + ?Sized>(
    store: &S,
    requests: &[WalkRequest],
) -> Result<Vec<PartitionWalk>> {
    struct Active {
        index: usize,
        current: NodeRef,
        steps: Vec<SiblingProof>,
    }

    let mut results = vec![PartitionWalk::Outside; requests.len()];
    let mut active = Vec::new();
    for (index, request) in requests.iter().enumerate() {
        let Some(root) = request.root else { continue };
        if root.label == request.target {
            results[index] = PartitionWalk::Found {
                steps: Vec::new(),
                hash_val: root.value::<TC>(),
            };
        } else if !root.is_leaf() && label::is_strict_prefix(&root.label, &request.target) {
            active.push(Active {
                index,
                current: root,
                steps: Vec::new(),
            });
        }
    }

    while !active.is_empty() {
        let keys: Vec<_> = active.iter().map(|walk| walk.current.key()).collect();
        let records = read_existing(store, &keys)?;
        let mut still_active = Vec::with_capacity(active.len());
        for (mut walk, record) in active.into_iter().zip(records) {
            check_children(&walk.current.label, &record)?;
            // A stored node that does not hash to what its parent records belongs to another
            // tree (a damaged or diverged copy): refuse rather than answer with a path that
            // cannot verify.
            if parent_value::<TC>(&record.children[0], &record.children[1]) != walk.current.hash {
                return Err(crate::Error::Corrupt(format!(
                    "tree node {} version {} does not hash to the value its parent records",
                    label::display(&walk.current.label),
                    walk.current.max_epoch
                )));
            }
            let target = requests[walk.index].target;
            let direction = label::direction(&target.label_val, walk.current.label.label_len);
            let side = direction as usize;
            let child = record.children[side];
            let step = SiblingProof {
                label: walk.current.label,
                siblings: [record.children[1 - side].element::<TC>()],
                direction,
            };
            if child.label == target {
                walk.steps.push(step);
                results[walk.index] = PartitionWalk::Found {
                    steps: walk.steps,
                    hash_val: child.value::<TC>(),
                };
            } else if !child.is_leaf() && label::is_strict_prefix(&child.label, &target) {
                walk.steps.push(step);
                walk.current = child;
                still_active.push(walk);
            } else {
                results[walk.index] = PartitionWalk::Absent {
                    steps: walk.steps,
                    node: walk.current.label,
                    node_value: walk.current.hash,
                    children: [
                        record.children[0].element::<TC>(),
                        record.children[1].element::<TC>(),
                    ],
                };
            }
        }
        active = still_active;
    }
    Ok(results)
}
