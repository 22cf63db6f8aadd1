//! One tree partition: the canonical compressed trie of the leaves whose labels share a prefix,
//! stored copy-on-write with every node version keyed by the epoch that wrote it.
//!
//! # Storage model (see `shard/docs/0001-mvcc-by-epoch.md`)
//! Only interior nodes are stored. A record holds its two children as [`NodeRef`]s: label,
//! hash, and the smallest and largest leaf epoch below. A node is rewritten exactly when a leaf
//! is inserted below it, so the epoch that wrote a version equals its largest leaf epoch, and a
//! parent's `NodeRef` names the child's record exactly: `NodeKey { label, version: max_epoch }`.
//! Reading "as of epoch E" is following pointers from the partition root as of E; the previous
//! epoch stays readable while the next is written (new versions get new keys), and an unfinished
//! epoch is unreferenced garbage that can be dropped by key range.
//!
//! **Architecture invariant:** this module is pure tree math. It reads through [`TreeStore`] and
//! returns what to write ([`insert::PartitionDelta`]); it knows nothing about RocksDB.

use akd_core::configuration::Configuration;
use akd_core::{AzksElement, AzksValue, NodeLabel};

use crate::error::Result;
use crate::label::LEAF_LEN;

pub mod audit;
pub mod insert;
pub mod mem;
pub mod verify;
pub mod walk;

pub use insert::{NewLeaf, PartitionDelta, SortedLeaves, insert_leaves};
pub use mem::MemTreeStore;
pub use verify::verify_partition;
pub use walk::{PartitionWalk, WalkRequest, walk};

/// What a parent records about one child subtree; also a partition's exported root summary.
///
/// For a leaf, `hash` is the raw commitment (akd's `TreeNode.hash`) and `min_epoch ==
/// max_epoch` is the epoch it was inserted in. For an interior node, `hash` is the node's value
/// `parent(left, right)` and the epochs bound the leaf epochs below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeRef {
    /// The node's label (canonical: zero bits beyond `label_len`).
    pub label: NodeLabel,
    /// Raw commitment for a leaf, node value for an interior node.
    pub hash: AzksValue,
    /// Smallest leaf epoch in the subtree.
    pub min_epoch: u64,
    /// Largest leaf epoch in the subtree; also the version its record is stored under.
    pub max_epoch: u64,
}

/// Leaves grouped by partition, as shards deliver them to each other.
pub type LeavesByPartition = Vec<(u32, Vec<NewLeaf>)>;

/// A partition's root summary `(label = LCP of its leaves, value, min and max leaf epoch)`.
pub type PartitionRoot = NodeRef;

impl NodeRef {
    /// Whether this is a leaf (a full 256-bit label).
    #[inline]
    pub fn is_leaf(&self) -> bool {
        self.label.label_len == LEAF_LEN
    }

    /// The value its parent hashes: epoch-mixed `H(commitment ‖ be64(epoch))` for a leaf
    /// (akd-spec §1.4), the node value for an interior node.
    #[inline]
    pub fn value<TC: Configuration>(&self) -> AzksValue {
        if self.is_leaf() {
            AzksValue(TC::hash_leaf_with_commitment(self.hash, self.max_epoch).0)
        } else {
            self.hash
        }
    }

    /// The `(label, value-as-seen-by-parent)` element used in sibling and append-only proofs.
    #[inline]
    pub fn element<TC: Configuration>(&self) -> AzksElement {
        AzksElement {
            label: self.label,
            value: self.value::<TC>(),
        }
    }

    /// Key of this interior node's record.
    #[inline]
    pub fn key(&self) -> NodeKey {
        NodeKey {
            label: self.label,
            version: self.max_epoch,
        }
    }
}

/// Key of one stored interior-node version: its label and the epoch that wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeKey {
    /// The node's label.
    pub label: NodeLabel,
    /// The epoch that wrote this version (= the largest leaf epoch below the node).
    pub version: u64,
}

/// A stored interior node: its two children, left (bit 0) then right (bit 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InteriorNode {
    /// `[left, right]`.
    pub children: [NodeRef; 2],
}

impl InteriorNode {
    /// Builds the node over `left` and `right` and returns its own `NodeRef` under `label`.
    pub fn join<TC: Configuration>(
        label: NodeLabel,
        left: NodeRef,
        right: NodeRef,
    ) -> (NodeRef, Self) {
        let hash = parent_value::<TC>(&left, &right);
        let node_ref = NodeRef {
            label,
            hash,
            min_epoch: left.min_epoch.min(right.min_epoch),
            max_epoch: left.max_epoch.max(right.max_epoch),
        };
        (
            node_ref,
            Self {
                children: [left, right],
            },
        )
    }
}

/// `parent(left, right)` exactly as akd computes an interior node (akd-spec §1.3).
#[inline]
pub fn parent_value<TC: Configuration>(left: &NodeRef, right: &NodeRef) -> AzksValue {
    element_parent_value::<TC>(&left.element::<TC>(), &right.element::<TC>())
}

/// `parent(left, right)` over two proof elements (used for top nodes and the root).
#[inline]
pub fn element_parent_value<TC: Configuration>(
    left: &AzksElement,
    right: &AzksElement,
) -> AzksValue {
    TC::compute_parent_hash_from_children(
        &left.value,
        &left.label.value::<TC>(),
        &right.value,
        &right.label.value::<TC>(),
    )
}

/// The `(empty_label, empty_node_hash)` element akd uses for a missing child of the root.
#[inline]
pub fn empty_element<TC: Configuration>() -> AzksElement {
    AzksElement {
        label: TC::empty_label(),
        value: TC::empty_node_hash(),
    }
}

/// Read access to stored interior-node versions.
///
/// Implemented by `shard::store::RocksStore` and [`MemTreeStore`]; both pass the same conformance
/// suite. Implementations should serve a batch with one multi-get (the engine asks once per tree
/// level), and may split it across threads.
pub trait TreeStore: Sync {
    /// Reads the records at `keys`; `result[i]` answers `keys[i]`, `None` if absent.
    fn read_nodes(&self, keys: &[NodeKey]) -> Result<Vec<Option<InteriorNode>>>;
}

/// Reads `keys`, treating an absent record as corruption: every key the engine asks for is
/// referenced by a committed (or staged) parent.
pub(crate) fn read_existing<S: TreeStore + ?Sized>(
    store: &S,
    keys: &[NodeKey],
) -> Result<Vec<InteriorNode>> {
    let found = store.read_nodes(keys)?;
    found
        .into_iter()
        .zip(keys)
        .map(|(node, key)| {
            node.ok_or_else(|| {
                crate::Error::Corrupt(format!(
                    "tree node {} version {} is referenced but missing",
                    crate::label::display(&key.label),
                    key.version
                ))
            })
        })
        .collect()
}

/// Checks that `node`, read under `label`, has a left child below bit 0 and a right child below
/// bit 1 of position `label.label_len`. Catches records that do not belong to their key.
pub(crate) fn check_children(label: &NodeLabel, node: &InteriorNode) -> Result<()> {
    for (side, child) in node.children.iter().enumerate() {
        let below = crate::label::is_strict_prefix(label, &child.label)
            && usize::from(crate::label::bit(&child.label.label_val, label.label_len)) == side;
        if !below {
            return Err(crate::Error::Corrupt(format!(
                "tree node {} has child {} on the wrong side",
                crate::label::display(label),
                crate::label::display(&child.label)
            )));
        }
    }
    Ok(())
}
