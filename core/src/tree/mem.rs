//! An in-memory [`TreeStore`], for property tests and as the conformance reference.

use std::collections::HashMap;
use std::sync::RwLock;

use super::{InteriorNode, NodeKey, PartitionDelta, TreeStore};
use crate::error::Result;

/// Interior-node versions in a hash map.
#[derive(Debug, Default)]
pub struct MemTreeStore {
    nodes: RwLock<HashMap<NodeKey, InteriorNode>>,
}

impl MemTreeStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores every node version of `delta`.
    pub fn apply(&self, delta: &PartitionDelta) {
        let mut nodes = self
            .nodes
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for (key, node) in delta.nodes.iter().flatten() {
            nodes.insert(*key, *node);
        }
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
