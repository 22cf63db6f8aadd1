//! Batch insertion of one epoch's leaves into one partition.
//!
//! Two phases, both exact to akd's `recursive_batch_insert_nodes` (akd-spec §3.2–3.3) because
//! they build the same canonical trie:
//!
//! 1. **Plan**, top-down, breadth-first: the existing nodes whose subtrees receive new leaves
//!    are read one tree level at a time, with one [`TreeStore::read_nodes`] call per level.
//!    Where new leaves diverge above an existing node a new interior node is planned over it
//!    ("decompression"); where they land in empty space they form a *fresh* run that needs no
//!    reads at all.
//! 2. **Hash**, bottom-up, in parallel over disjoint subtrees (`rayon::join` wherever both
//!    sides carry enough new leaves), producing the node versions to write under the new epoch.
//!
//! Nothing is written here: the caller stores [`PartitionDelta::nodes`] in one `WriteBatch`.

use std::sync::Mutex;

use akd_core::configuration::Configuration;
use akd_core::{AzksValue, NodeLabel};

use super::{InteriorNode, NodeKey, NodeRef, TreeStore, check_children, read_existing};
use crate::error::{Error, Result};
use crate::label::{self, LEAF_LEN};

/// Subtrees with at least this many new leaves on each side are hashed on two threads.
const PARALLEL_MIN_LEAVES: usize = 1024;

/// A leaf to insert: its VRF node label and its raw commitment (`stale_azks_value` for a stale
/// leaf, the fresh commitment otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewLeaf {
    /// Full 256-bit node label.
    pub label: NodeLabel,
    /// Raw commitment, stored as the leaf's `hash`.
    pub commitment: AzksValue,
}

/// Leaves of one epoch, sorted by label, all 256 bits long, without duplicates.
#[derive(Clone, Debug, Default)]
pub struct SortedLeaves(Vec<NewLeaf>);

impl SortedLeaves {
    /// Sorts `leaves` and checks that they are full-length and distinct.
    pub fn new(mut leaves: Vec<NewLeaf>) -> Result<Self> {
        if let Some(short) = leaves.iter().find(|leaf| leaf.label.label_len != LEAF_LEN) {
            return Err(Error::Corrupt(format!(
                "leaf label {} is not {LEAF_LEN} bits long",
                label::display(&short.label)
            )));
        }
        leaves.sort_unstable_by_key(|leaf| leaf.label.label_val);
        if let Some(pair) = leaves
            .windows(2)
            .find(|pair| pair[0].label == pair[1].label)
        {
            return Err(Error::LeafExists {
                label: label::display(&pair[0].label),
            });
        }
        Ok(Self(leaves))
    }

    /// The leaves, in label order.
    pub fn as_slice(&self) -> &[NewLeaf] {
        &self.0
    }

    /// BLAKE3 over the leaves in label order (`label ‖ commitment` per leaf): what replicas
    /// compare to agree on one user partition's leaves of an epoch.
    pub fn digest(&self) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new();
        for leaf in &self.0 {
            hasher.update(&leaf.label.label_val);
            hasher.update(&leaf.commitment.0);
        }
        *hasher.finalize().as_bytes()
    }

    /// The leaves, in label order.
    pub fn into_vec(self) -> Vec<NewLeaf> {
        self.0
    }

    /// Number of leaves.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no leaves.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Splits into per-partition runs for `bits`-bit partitions, in partition order. Sorted
    /// leaves of one partition are contiguous, so each run stays sorted.
    pub fn split_by_partition(self, bits: u8) -> Vec<(u32, SortedLeaves)> {
        let mut runs: Vec<(u32, SortedLeaves)> = Vec::new();
        for leaf in self.0 {
            let partition = label::partition_of(&leaf.label.label_val, bits);
            match runs.last_mut() {
                Some((current, run)) if *current == partition => run.0.push(leaf),
                _ => runs.push((partition, SortedLeaves(vec![leaf]))),
            }
        }
        runs
    }
}

/// What inserting one epoch into one partition produced: the new root and the node versions to
/// write, all keyed with `epoch`.
#[derive(Debug)]
pub struct PartitionDelta {
    /// The epoch the leaves were inserted in.
    pub epoch: u64,
    /// The partition root after the insertion.
    pub root: Option<NodeRef>,
    /// New interior-node versions, in chunks produced by parallel workers.
    pub nodes: Vec<Vec<(NodeKey, InteriorNode)>>,
    /// The existing node versions this epoch rewrote, each replaced by a new version of the
    /// same label in [`PartitionDelta::nodes`]. A version `(v, L)` superseded at epoch `E` is
    /// read only by roots of epochs `v..E`: once no such epoch is retained it can be deleted
    /// (the stale-version index of `shard/docs/0003-retention-backup-recovery.md`). Interior
    /// nodes are never removed from the trie otherwise: an insertion above a node keeps it as a
    /// child, so this is every version that stops being current in `epoch`.
    pub superseded: Vec<NodeKey>,
}

impl PartitionDelta {
    /// Number of node versions to write.
    pub fn node_count(&self) -> usize {
        self.nodes.iter().map(Vec::len).sum()
    }
}

/// Inserts `leaves` as epoch `epoch` into the partition whose root (as of the previous epoch)
/// is `root`, reading existing nodes from `store`.
///
/// Fails with [`Error::LeafExists`] if a leaf is already in the tree and with
/// [`Error::EpochOutOfOrder`] unless `epoch` is above every epoch already in the partition.
pub fn insert_leaves<TC: Configuration, S: TreeStore + ?Sized>(
    store: &S,
    root: Option<NodeRef>,
    leaves: &SortedLeaves,
    epoch: u64,
) -> Result<PartitionDelta> {
    if let Some(root) = root
        && epoch <= root.max_epoch
    {
        return Err(Error::EpochOutOfOrder {
            epoch,
            previous: root.max_epoch,
        });
    }
    if leaves.is_empty() {
        return Ok(PartitionDelta {
            epoch,
            root,
            nodes: Vec::new(),
            superseded: Vec::new(),
        });
    }

    let mut planner = Planner {
        leaves: leaves.as_slice(),
        nodes: Vec::new(),
        pending: Vec::new(),
    };
    let top = planner.resolve(root, 0, leaves.len())?;
    let mut superseded = Vec::new();
    while !planner.pending.is_empty() {
        let reads = std::mem::take(&mut planner.pending);
        let keys: Vec<NodeKey> = reads.iter().map(|read| read.key).collect();
        let records = read_existing(store, &keys)?;
        // Every node read here is rewritten under `epoch` with its label unchanged.
        superseded.extend_from_slice(&keys);
        for (read, record) in reads.into_iter().zip(records) {
            check_children(&read.key.label, &record)?;
            let split = planner.split_point(read.start, read.end, read.key.label.label_len);
            let left = planner.resolve(Some(record.children[0]), read.start, split)?;
            let right = planner.resolve(Some(record.children[1]), split, read.end)?;
            planner.nodes[read.node].children = [left, right];
        }
    }

    let hasher = Hasher::<TC> {
        leaves: leaves.as_slice(),
        plan: &planner.nodes,
        epoch,
        chunks: Mutex::new(Vec::new()),
        config: std::marker::PhantomData,
    };
    let mut sink = Vec::new();
    let new_root = hasher.child(&top, &mut sink)?;
    hasher.flush(sink);
    let nodes = hasher
        .chunks
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    Ok(PartitionDelta {
        epoch,
        root: Some(new_root),
        nodes,
        superseded,
    })
}

/// One child slot of a planned node.
#[derive(Clone, Debug)]
enum PlanChild {
    /// An existing subtree that receives no new leaves (kept as is).
    Existing(NodeRef),
    /// A single new leaf, by index into the sorted leaves.
    Leaf(usize),
    /// At least two new leaves `start..end` with no existing node among them.
    Fresh(usize, usize),
    /// A planned (new or rewritten) interior node, by index into the plan.
    Node(usize),
    /// Not known until the existing node's record has been read.
    Pending,
}

/// A node version the epoch writes: a rewritten existing node or a new interior node.
#[derive(Debug)]
struct PlanNode {
    label: NodeLabel,
    children: [PlanChild; 2],
    n_leaves: usize,
}

/// An existing node whose children must be read before its new leaves can be routed.
struct PendingRead {
    node: usize,
    key: NodeKey,
    start: usize,
    end: usize,
}

struct Planner<'a> {
    leaves: &'a [NewLeaf],
    nodes: Vec<PlanNode>,
    pending: Vec<PendingRead>,
}

impl Planner<'_> {
    /// First index in `start..end` whose bit `index` is 1. The leaves in the range share
    /// their first `index` bits, so in sorted order that bit is monotone.
    fn split_point(&self, start: usize, end: usize, index: u32) -> usize {
        start
            + self.leaves[start..end]
                .partition_point(|leaf| label::bit(&leaf.label.label_val, index) == 0)
    }

    /// Plans the subtree that `existing` (if any) and the new leaves `start..end` form.
    fn resolve(
        &mut self,
        existing: Option<NodeRef>,
        start: usize,
        end: usize,
    ) -> Result<PlanChild> {
        let n_leaves = end - start;
        let Some(existing) = existing else {
            return Ok(match n_leaves {
                0 => return Err(Error::Corrupt("empty insertion planned".into())),
                1 => PlanChild::Leaf(start),
                _ => PlanChild::Fresh(start, end),
            });
        };
        if n_leaves == 0 {
            return Ok(PlanChild::Existing(existing));
        }
        let first = &self.leaves[start].label.label_val;
        let last = &self.leaves[end - 1].label.label_val;
        let lcp_len = existing
            .label
            .label_len
            .min(label::common_prefix_len(&existing.label.label_val, first))
            .min(label::common_prefix_len(first, last));

        if lcp_len < existing.label.label_len {
            // The new leaves diverge above `existing`: a new interior node at the common prefix
            // takes `existing` (with the leaves on its side) and a fresh subtree on the other.
            let existing_bit = label::bit(&existing.label.label_val, lcp_len);
            let split = self.split_point(start, end, lcp_len);
            let (zeros, ones) = ((start, split), (split, end));
            let (same_side, other_side) = if existing_bit == 0 {
                (zeros, ones)
            } else {
                (ones, zeros)
            };
            let with_existing = self.resolve(Some(existing), same_side.0, same_side.1)?;
            let fresh = self.resolve(None, other_side.0, other_side.1)?;
            let children = if existing_bit == 0 {
                [with_existing, fresh]
            } else {
                [fresh, with_existing]
            };
            self.nodes.push(PlanNode {
                label: label::prefix(&existing.label, lcp_len),
                children,
                n_leaves,
            });
            return Ok(PlanChild::Node(self.nodes.len() - 1));
        }

        if existing.is_leaf() {
            return Err(Error::LeafExists {
                label: label::display(&existing.label),
            });
        }
        // `existing` is a prefix of every new leaf here: rewrite it once its children are known.
        self.nodes.push(PlanNode {
            label: existing.label,
            children: [PlanChild::Pending, PlanChild::Pending],
            n_leaves,
        });
        let node = self.nodes.len() - 1;
        self.pending.push(PendingRead {
            node,
            key: existing.key(),
            start,
            end,
        });
        Ok(PlanChild::Node(node))
    }
}

type Record = (NodeKey, InteriorNode);

struct Hasher<'a, TC> {
    leaves: &'a [NewLeaf],
    plan: &'a [PlanNode],
    epoch: u64,
    chunks: Mutex<Vec<Vec<Record>>>,
    config: std::marker::PhantomData<TC>,
}

impl<TC: Configuration> Hasher<'_, TC> {
    fn flush(&self, records: Vec<Record>) {
        if !records.is_empty() {
            self.chunks
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(records);
        }
    }

    fn weight(&self, child: &PlanChild) -> usize {
        match child {
            PlanChild::Existing(_) | PlanChild::Pending => 0,
            PlanChild::Leaf(_) => 1,
            PlanChild::Fresh(start, end) => end - start,
            PlanChild::Node(node) => self.plan[*node].n_leaves,
        }
    }

    fn leaf(&self, index: usize) -> NodeRef {
        let leaf = &self.leaves[index];
        NodeRef {
            label: leaf.label,
            hash: leaf.commitment,
            min_epoch: self.epoch,
            max_epoch: self.epoch,
        }
    }

    fn child(&self, child: &PlanChild, sink: &mut Vec<Record>) -> Result<NodeRef> {
        match child {
            PlanChild::Existing(node_ref) => Ok(*node_ref),
            PlanChild::Leaf(index) => Ok(self.leaf(*index)),
            PlanChild::Fresh(start, end) => Ok(self.fresh(*start, *end, sink)),
            PlanChild::Node(node) => {
                let plan = &self.plan[*node];
                let [left, right] = &plan.children;
                let (left, right) =
                    if self.weight(left).min(self.weight(right)) >= PARALLEL_MIN_LEAVES {
                        let (left, right) =
                            rayon::join(|| self.child_apart(left), || self.child_apart(right));
                        (left?, right?)
                    } else {
                        (self.child(left, sink)?, self.child(right, sink)?)
                    };
                Ok(self.emit(plan.label, left, right, sink))
            }
            PlanChild::Pending => Err(Error::Corrupt(
                "insertion plan left a node unresolved".into(),
            )),
        }
    }

    /// Hashes `child` on its own sink (another thread may run it) and hands the sink over.
    fn child_apart(&self, child: &PlanChild) -> Result<NodeRef> {
        let mut sink = Vec::new();
        let node_ref = self.child(child, &mut sink);
        self.flush(sink);
        node_ref
    }

    /// Builds the canonical subtree of the new leaves `start..end` (≥ 1 leaf).
    fn fresh(&self, start: usize, end: usize, sink: &mut Vec<Record>) -> NodeRef {
        if end - start == 1 {
            return self.leaf(start);
        }
        let first = &self.leaves[start].label;
        let lcp_len =
            label::common_prefix_len(&first.label_val, &self.leaves[end - 1].label.label_val);
        let split = start
            + self.leaves[start..end]
                .partition_point(|leaf| label::bit(&leaf.label.label_val, lcp_len) == 0);
        let (left, right) = if (split - start).min(end - split) >= PARALLEL_MIN_LEAVES {
            rayon::join(
                || {
                    let mut own = Vec::new();
                    let node_ref = self.fresh(start, split, &mut own);
                    self.flush(own);
                    node_ref
                },
                || {
                    let mut own = Vec::new();
                    let node_ref = self.fresh(split, end, &mut own);
                    self.flush(own);
                    node_ref
                },
            )
        } else {
            (self.fresh(start, split, sink), self.fresh(split, end, sink))
        };
        self.emit(label::prefix(first, lcp_len), left, right, sink)
    }

    fn emit(
        &self,
        label: NodeLabel,
        left: NodeRef,
        right: NodeRef,
        sink: &mut Vec<Record>,
    ) -> NodeRef {
        let (node_ref, node) = InteriorNode::join::<TC>(label, left, right);
        debug_assert_eq!(node_ref.max_epoch, self.epoch);
        sink.push((node_ref.key(), node));
        node_ref
    }
}
