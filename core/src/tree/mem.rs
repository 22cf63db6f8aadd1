//! An in-memory [`TreeStore`], for property tests and as the conformance reference — including
//! the reference for pruning: [`MemTreeStore::prune_through`] applies the stale-version rule of
//! `shard/docs/0003-retention-backup-recovery.md` the way the RocksDB store does.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::RwLock;

use super::{InteriorNode, NodeKey, NodeRef, PartitionDelta, TreeStore};
use crate::error::Result;

/// Interior-node versions in a hash map, with the stale-version index.
#[derive(Debug, Default)]
pub struct MemTreeStore {
    nodes: RwLock<HashMap<NodeKey, InteriorNode>>,
    /// Epoch that superseded them → the superseded versions.
    stale: RwLock<BTreeMap<u64, Vec<NodeKey>>>,
}

impl MemTreeStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores every node version of `delta` and indexes the versions it superseded.
    pub fn apply(&self, delta: &PartitionDelta) {
        let mut nodes = self
            .nodes
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for (key, node) in delta.nodes.iter().flatten() {
            nodes.insert(*key, *node);
        }
        if !delta.superseded.is_empty() {
            self.stale
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .entry(delta.epoch)
                .or_default()
                .extend_from_slice(&delta.superseded);
        }
    }

    /// Deletes every version superseded at an epoch `≤ through` (what no root of an epoch
    /// `≥ through` reads) and its index entries; returns how many were deleted.
    pub fn prune_through(&self, through: u64) -> usize {
        let mut stale = self
            .stale
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut nodes = self
            .nodes
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let keep = stale.split_off(&(through + 1));
        let dead = std::mem::replace(&mut *stale, keep);
        dead.values()
            .flatten()
            .filter(|key| nodes.remove(key).is_some())
            .count()
    }

    /// The stored node versions.
    pub fn keys(&self) -> HashSet<NodeKey> {
        self.nodes
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .keys()
            .copied()
            .collect()
    }

    /// The interior-node versions reachable from `root` (missing ones are not followed).
    pub fn reachable(&self, root: Option<NodeRef>) -> HashSet<NodeKey> {
        let nodes = self
            .nodes
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut found = HashSet::new();
        let mut todo: Vec<NodeRef> = root.into_iter().collect();
        while let Some(node_ref) = todo.pop() {
            if node_ref.is_leaf() {
                continue;
            }
            let key = node_ref.key();
            if let Some(node) = nodes.get(&key) {
                found.insert(key);
                todo.extend(node.children);
            }
        }
        found
    }

    /// Number of stored node versions.
    pub fn len(&self) -> usize {
        self.nodes
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }

    /// Whether the store holds no node versions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl TreeStore for MemTreeStore {
    fn read_nodes(&self, keys: &[NodeKey]) -> Result<Vec<Option<InteriorNode>>> {
        let nodes = self
            .nodes
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok(keys.iter().map(|key| nodes.get(key).copied()).collect())
    }
}

#[cfg(test)]
mod tests {
    use akd_core::configuration::WhatsAppV1Configuration as TC;
    use akd_core::{AzksValue, NodeLabel};
    use proptest::prelude::*;

    use super::*;
    use crate::tree::{NewLeaf, SortedLeaves, insert_leaves, verify_partition};

    fn leaves(seeds: &[u16], epoch: u64) -> SortedLeaves {
        let mut unique: Vec<u16> = seeds.to_vec();
        unique.sort_unstable();
        unique.dedup();
        SortedLeaves::new(
            unique
                .iter()
                .map(|seed| {
                    let mut label_val = [0u8; 32];
                    label_val[..2].copy_from_slice(&seed.to_be_bytes());
                    label_val[2..10].copy_from_slice(&epoch.to_be_bytes());
                    NewLeaf {
                        label: NodeLabel::new(label_val, 256),
                        commitment: AzksValue([*seed as u8; 32]),
                    }
                })
                .collect(),
        )
        .expect("distinct leaves")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// What an epoch supersedes is exactly what its root stops reaching, and pruning
        /// through any safe epoch leaves exactly the versions the retained roots reach.
        #[test]
        fn pruning_keeps_exactly_what_retained_roots_reach(
            epochs in prop::collection::vec(prop::collection::vec(any::<u16>(), 1..40), 2..24),
            safe_points in prop::collection::vec(any::<prop::sample::Index>(), 1..4),
        ) {
            let store = MemTreeStore::new();
            let mut roots = vec![None];
            for (index, seeds) in epochs.iter().enumerate() {
                let epoch = index as u64 + 1;
                let before = store.reachable(*roots.last().expect("a root"));
                let delta = insert_leaves::<TC, _>(&store, *roots.last().expect("a root"), &leaves(seeds, epoch), epoch)
                    .expect("insert");
                store.apply(&delta);
                let after = store.reachable(delta.root);
                let dropped: HashSet<NodeKey> = before.difference(&after).copied().collect();
                let superseded: HashSet<NodeKey> = delta.superseded.iter().copied().collect();
                prop_assert_eq!(superseded.len(), delta.superseded.len(), "each version superseded once");
                prop_assert_eq!(dropped, superseded);
                roots.push(delta.root);
            }
            let head = epochs.len() as u64;
            let mut safe_points: Vec<u64> = safe_points.iter().map(|index| index.index(epochs.len() + 1) as u64).collect();
            safe_points.sort_unstable();
            for safe in safe_points {
                store.prune_through(safe);
                let retained: HashSet<NodeKey> = (safe..=head)
                    .flat_map(|epoch| store.reachable(roots[epoch as usize]))
                    .collect();
                prop_assert_eq!(store.keys(), retained, "safe epoch {}", safe);
                for epoch in safe..=head {
                    prop_assert!(verify_partition::<TC, _>(&store, roots[epoch as usize]).is_ok(), "epoch {} walks", epoch);
                }
            }
        }
    }
}
