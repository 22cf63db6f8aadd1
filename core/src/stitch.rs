//! Stitching: the top of the trie above the partition roots, and proofs that cross it.
//!
//! The canonical trie over all leaves equals the canonical trie over the partition roots with
//! each root's subtree hung below it (akd-spec §3.3, §10.3), so the global root and every
//! proof can be assembled from the partition roots plus in-partition walks:
//!
//! * the root (`ROOT`, length 0) splits on bit 0; below it, top nodes sit at the longest common
//!   prefix of the partition roots they cover; a missing root child is akd's empty element;
//! * with no leaves at all the root value is `empty_root_value` (not `parent(empty, empty)`);
//! * with one partition (`k = 0`) whose leaves straddle bit 0, that partition's root *is* the
//!   root;
//! * a proof path is the top path (root → partition root) followed by the partition's path;
//!   the deepest prefix node of a non-membership proof may be a top node or the root;
//! * an append-only proof emits a top node whole when none of its partitions changed, which
//!   makes `unchanged_nodes` maximal across partitions and equal to akd's as a set.
//!
//! **Architecture invariant:** pure; used by the in-process directory, the shard servers'
//! coordinator and the gateway alike. It imports neither RocksDB nor any RPC crate.

use std::marker::PhantomData;

use akd_core::configuration::Configuration;
use akd_core::hash::Digest;
use akd_core::{
    AzksElement, AzksValue, MembershipProof, NodeLabel, NonMembershipProof, SiblingProof,
    SingleAppendOnlyProof,
};

use crate::error::{Error, Result};
use crate::label::{self, ROOT};
use crate::tree::audit::AppendOnlySlice;
use crate::tree::{PartitionRoot, PartitionWalk, WalkRequest, element_parent_value, empty_element};

/// The top of the trie as of one epoch, built from that epoch's partition roots.
#[derive(Clone, Debug)]
pub struct TopTree<TC> {
    bits: u8,
    partitions: Vec<Option<PartitionRoot>>,
    shape: Shape,
    nodes: Vec<TopNode>,
    root_value: AzksValue,
    config: PhantomData<TC>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// No leaves anywhere.
    Empty,
    /// One partition whose root has label `ROOT` (only possible with `k = 0`).
    RootIsPartition(u32),
    /// `nodes[0]` is the root.
    Root,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopChild {
    Empty,
    Node(usize),
    Partition(u32),
}

#[derive(Clone, Debug)]
struct TopNode {
    label: NodeLabel,
    value: AzksValue,
    min_epoch: u64,
    max_epoch: u64,
    children: [TopChild; 2],
}

/// Where a target label's path leaves the top of the trie.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Located {
    /// The path continues inside `partition`, whose root is a strict prefix of the target.
    Partition {
        /// Partition to walk.
        partition: u32,
        /// Its root.
        root: PartitionRoot,
        /// Sibling proofs from `ROOT` down to the partition root (exclusive).
        steps: Vec<SiblingProof>,
    },
    /// The target is a one-leaf partition's leaf.
    Member {
        /// Sibling proofs from `ROOT` to the leaf's parent.
        steps: Vec<SiblingProof>,
        /// The leaf's epoch-mixed value.
        hash_val: AzksValue,
    },
    /// The target is absent and its deepest strict-prefix node is a top node (or `ROOT`).
    Deepest {
        /// Sibling proofs from `ROOT` down to `node` (exclusive).
        steps: Vec<SiblingProof>,
        /// The deepest strict-prefix node.
        node: NodeLabel,
        /// Its value.
        node_value: AzksValue,
        /// Its children `[left, right]`, or akd's empty element for a missing child of `ROOT`.
        children: [AzksElement; 2],
    },
    /// The directory has no leaves: nothing can be proven (akd cannot either).
    EmptyTree,
}

impl Located {
    /// The in-partition walk this location needs, if any.
    pub fn walk_request(&self, target: NodeLabel) -> Option<WalkRequest> {
        match self {
            Located::Partition { root, .. } => Some(WalkRequest {
                root: Some(*root),
                target,
            }),
            _ => None,
        }
    }

    /// The partition the walk must run in, if any.
    pub fn partition(&self) -> Option<u32> {
        match self {
            Located::Partition { partition, .. } => Some(*partition),
            _ => None,
        }
    }
}

/// The top-level part of an append-only step: what is decided above the partitions, and the
/// partitions whose slices must be added.
#[derive(Clone, Debug, Default)]
pub struct TopAudit {
    /// Unchanged top nodes (or partition roots whose parents changed).
    pub unchanged: Vec<AzksElement>,
    /// Partitions to slice, with their roots as of the end epoch.
    pub partitions: Vec<(u32, PartitionRoot)>,
}

impl<TC: Configuration> TopTree<TC> {
    /// Builds the top of the trie over `partitions` (index = partition id, `2^bits` entries).
    ///
    /// Fails with [`Error::Corrupt`] if a root does not belong to its partition.
    pub fn new(bits: u8, partitions: Vec<Option<PartitionRoot>>) -> Result<Self> {
        if partitions.len() != 1usize << bits {
            return Err(Error::Corrupt(format!(
                "expected {} partition roots for {bits} partition bits, got {}",
                1usize << bits,
                partitions.len()
            )));
        }
        let mut items = Vec::new();
        for (partition, root) in partitions.iter().enumerate() {
            let Some(root) = root else { continue };
            let partition = partition as u32;
            if root.label.label_len < u32::from(bits)
                || label::partition_of(&root.label.label_val, bits) != partition
            {
                return Err(Error::Corrupt(format!(
                    "root {} does not belong to partition {partition}",
                    label::display(&root.label)
                )));
            }
            items.push((partition, *root));
        }

        let mut top = Self {
            bits,
            partitions,
            shape: Shape::Empty,
            nodes: Vec::new(),
            root_value: TC::empty_root_value(),
            config: PhantomData,
        };
        match items.as_slice() {
            [] => {}
            [(partition, root)] if root.label.label_len == 0 => {
                top.shape = Shape::RootIsPartition(*partition);
                top.root_value = root.hash;
            }
            _ => {
                top.shape = Shape::Root;
                top.nodes.push(TopNode {
                    label: ROOT,
                    value: TC::empty_root_value(),
                    min_epoch: 0,
                    max_epoch: 0,
                    children: [TopChild::Empty; 2],
                });
                let split =
                    items.partition_point(|(_, root)| label::bit(&root.label.label_val, 0) == 0);
                let left = top.build(&items[..split]);
                let right = top.build(&items[split..]);
                let (node, value) = top.join(ROOT, left, right);
                top.root_value = value;
                top.nodes[0] = node;
            }
        }
        Ok(top)
    }

    /// Builds the canonical subtree over prefix-free `items` sorted by label.
    fn build(&mut self, items: &[(u32, PartitionRoot)]) -> TopChild {
        match items {
            [] => TopChild::Empty,
            [(partition, _)] => TopChild::Partition(*partition),
            _ => {
                let first = items[0].1.label;
                let last = items[items.len() - 1].1.label;
                let lcp_len = label::common_prefix_len(&first.label_val, &last.label_val);
                let split = items
                    .partition_point(|(_, root)| label::bit(&root.label.label_val, lcp_len) == 0);
                let left = self.build(&items[..split]);
                let right = self.build(&items[split..]);
                let (node, _) = self.join(label::prefix(&first, lcp_len), left, right);
                self.nodes.push(node);
                TopChild::Node(self.nodes.len() - 1)
            }
        }
    }

    fn join(&self, label: NodeLabel, left: TopChild, right: TopChild) -> (TopNode, AzksValue) {
        let (left_element, right_element) = (self.element(left), self.element(right));
        let value = element_parent_value::<TC>(&left_element, &right_element);
        let bounds = [self.bounds(left), self.bounds(right)];
        let min_epoch = bounds
            .iter()
            .flatten()
            .map(|(min, _)| *min)
            .min()
            .unwrap_or(0);
        let max_epoch = bounds
            .iter()
            .flatten()
            .map(|(_, max)| *max)
            .max()
            .unwrap_or(0);
        (
            TopNode {
                label,
                value,
                min_epoch,
                max_epoch,
                children: [left, right],
            },
            value,
        )
    }

    fn element(&self, child: TopChild) -> AzksElement {
        match child {
            TopChild::Empty => empty_element::<TC>(),
            TopChild::Node(node) => AzksElement {
                label: self.nodes[node].label,
                value: self.nodes[node].value,
            },
            TopChild::Partition(partition) => self.root(partition).element::<TC>(),
        }
    }

    fn bounds(&self, child: TopChild) -> Option<(u64, u64)> {
        match child {
            TopChild::Empty => None,
            TopChild::Node(node) => Some((self.nodes[node].min_epoch, self.nodes[node].max_epoch)),
            TopChild::Partition(partition) => {
                let root = self.root(partition);
                Some((root.min_epoch, root.max_epoch))
            }
        }
    }

    fn root(&self, partition: u32) -> PartitionRoot {
        self.partitions[partition as usize].expect("top-tree children name non-empty partitions")
    }

    /// Number of partition bits `k`.
    pub fn bits(&self) -> u8 {
        self.bits
    }

    /// The partition roots this tree was built from (index = partition id).
    pub fn partitions(&self) -> &[Option<PartitionRoot>] {
        &self.partitions
    }

    /// The root's value (`empty_root_value` for an empty directory).
    pub fn root_value(&self) -> AzksValue {
        self.root_value
    }

    /// The published root hash, `compute_root_hash_from_val(root value)`.
    pub fn root_hash(&self) -> Digest {
        TC::compute_root_hash_from_val(&self.root_value)
    }

    /// The largest leaf epoch in the directory (0 when empty).
    pub fn max_epoch(&self) -> u64 {
        self.partitions
            .iter()
            .flatten()
            .map(|root| root.max_epoch)
            .max()
            .unwrap_or(0)
    }

    /// Follows `target` (a 256-bit label) down the top of the trie.
    pub fn locate(&self, target: &NodeLabel) -> Located {
        match self.shape {
            Shape::Empty => Located::EmptyTree,
            Shape::RootIsPartition(partition) => Located::Partition {
                partition,
                root: self.root(partition),
                steps: Vec::new(),
            },
            Shape::Root => {
                let mut steps = Vec::new();
                let mut current = 0;
                loop {
                    let node = &self.nodes[current];
                    let direction = label::direction(&target.label_val, node.label.label_len);
                    let side = direction as usize;
                    let step = SiblingProof {
                        label: node.label,
                        siblings: [self.element(node.children[1 - side])],
                        direction,
                    };
                    match node.children[side] {
                        TopChild::Node(next)
                            if label::is_strict_prefix(&self.nodes[next].label, target) =>
                        {
                            steps.push(step);
                            current = next;
                            continue;
                        }
                        TopChild::Partition(partition) => {
                            let root = self.root(partition);
                            if root.label == *target {
                                steps.push(step);
                                return Located::Member {
                                    steps,
                                    hash_val: root.value::<TC>(),
                                };
                            }
                            if !root.is_leaf() && label::is_strict_prefix(&root.label, target) {
                                steps.push(step);
                                return Located::Partition {
                                    partition,
                                    root,
                                    steps,
                                };
                            }
                        }
                        TopChild::Node(_) | TopChild::Empty => {}
                    }
                    return Located::Deepest {
                        steps,
                        node: node.label,
                        node_value: node.value,
                        children: [
                            self.element(node.children[0]),
                            self.element(node.children[1]),
                        ],
                    };
                }
            }
        }
    }

    /// The top-level part of the append-only step `start_epoch → start_epoch + 1`, on this
    /// tree as of `start_epoch + 1`.
    ///
    /// When no leaf is from `start_epoch + 1` (a heartbeat epoch, which akd never produces),
    /// akd's generator would emit an empty proof, which `audit_verify` rejects; the root's
    /// children are emitted as unchanged instead (akd-spec §10.2), which verifies.
    pub fn append_only_top(&self, start_epoch: u64) -> TopAudit {
        let mut audit = TopAudit::default();
        match self.shape {
            Shape::Empty => {}
            Shape::RootIsPartition(partition) => {
                audit.partitions.push((partition, self.root(partition)))
            }
            Shape::Root => {
                let mut stack: Vec<TopChild> = self.nodes[0].children.to_vec();
                while let Some(child) = stack.pop() {
                    match child {
                        TopChild::Empty => {}
                        TopChild::Partition(partition) => {
                            audit.partitions.push((partition, self.root(partition)))
                        }
                        TopChild::Node(node) => {
                            let node = &self.nodes[node];
                            if node.max_epoch <= start_epoch {
                                audit.unchanged.push(AzksElement {
                                    label: node.label,
                                    value: node.value,
                                });
                            } else if node.min_epoch <= start_epoch + 1 {
                                stack.extend(node.children);
                            }
                        }
                    }
                }
            }
        }
        audit
    }
}

/// Joins the top path and the partition walk into akd's membership proof of `target`.
pub fn membership_proof(
    target: NodeLabel,
    located: Located,
    walk: Option<PartitionWalk>,
) -> Result<MembershipProof> {
    match (located, walk) {
        (Located::Member { steps, hash_val }, _) => Ok(MembershipProof {
            label: target,
            hash_val,
            sibling_proofs: steps,
        }),
        (
            Located::Partition { mut steps, .. },
            Some(PartitionWalk::Found {
                steps: partition_steps,
                hash_val,
            }),
        ) => {
            steps.extend(partition_steps);
            Ok(MembershipProof {
                label: target,
                hash_val,
                sibling_proofs: steps,
            })
        }
        _ => Err(Error::Proof(format!(
            "label {} is not in the tree",
            label::display(&target)
        ))),
    }
}

/// Joins the top path and the partition walk into akd's non-membership proof of `target`,
/// anchored at the deepest strict-prefix node.
pub fn non_membership_proof(
    target: NodeLabel,
    located: Located,
    walk: Option<PartitionWalk>,
) -> Result<NonMembershipProof> {
    let (steps, node, node_value, children) = match (located, walk) {
        (
            Located::Deepest {
                steps,
                node,
                node_value,
                children,
            },
            _,
        ) => (steps, node, node_value, children),
        (
            Located::Partition { mut steps, .. },
            Some(PartitionWalk::Absent {
                steps: partition_steps,
                node,
                node_value,
                children,
            }),
        ) => {
            steps.extend(partition_steps);
            (steps, node, node_value, children)
        }
        (Located::EmptyTree, _) => {
            return Err(Error::Proof(
                "non-membership cannot be proven in an empty directory".into(),
            ));
        }
        _ => {
            return Err(Error::Proof(format!(
                "label {} is in the tree; non-membership requested",
                label::display(&target)
            )));
        }
    };
    Ok(NonMembershipProof {
        label: target,
        longest_prefix: node,
        longest_prefix_children: children,
        longest_prefix_membership_proof: MembershipProof {
            label: node,
            hash_val: node_value,
            sibling_proofs: steps,
        },
    })
}

/// Joins the top-level audit and the partition slices into one `SingleAppendOnlyProof`.
pub fn append_only_proof(
    top: TopAudit,
    slices: impl IntoIterator<Item = AppendOnlySlice>,
) -> SingleAppendOnlyProof {
    let mut proof = SingleAppendOnlyProof {
        inserted: Vec::new(),
        unchanged_nodes: top.unchanged,
    };
    for slice in slices {
        proof.unchanged_nodes.extend(slice.unchanged);
        proof.inserted.extend(slice.inserted);
    }
    proof
}
