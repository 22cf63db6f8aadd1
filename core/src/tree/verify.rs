//! A partition's consistency check: every interior node reachable from a root is present, sits
//! under its key, and hashes to what its parent records — so a stored copy is known to be the
//! tree its root names, not only at the root.
//!
//! A shard runs it on a partition copied from a peer before it counts the copy as built, and it
//! is the basis of the background agreement scan (replicas compare whole trees, not only roots).

use akd_core::configuration::Configuration;

use super::{NodeRef, TreeStore, check_children, parent_value, read_existing};
use crate::error::{Error, Result};
use crate::label;

/// Walks the tree under `root` level by level (one batched read per level) and checks every
/// interior node: present, children on the right sides, `parent(left, right)` equal to the hash
/// its parent records, and epoch bounds that match its children. Returns the number of interior
/// nodes checked.
pub fn verify_partition<TC: Configuration, S: TreeStore + ?Sized>(
    store: &S,
    root: Option<NodeRef>,
) -> Result<u64> {
    let Some(root) = root else {
        return Ok(0);
    };
    let mut level: Vec<NodeRef> = vec![root]
        .into_iter()
        .filter(|node| !node.is_leaf())
        .collect();
    let mut checked = 0u64;
    while !level.is_empty() {
        let keys: Vec<_> = level.iter().map(NodeRef::key).collect();
        let nodes = read_existing(store, &keys)?;
        let mut next = Vec::with_capacity(level.len() * 2);
        for (node_ref, node) in level.iter().zip(nodes) {
            check_children(&node_ref.label, &node)?;
            let [left, right] = node.children;
            let mismatch = |what: &str| {
                Error::Corrupt(format!(
                    "tree node {} version {}: {what}",
                    label::display(&node_ref.label),
                    node_ref.max_epoch
                ))
            };
            if parent_value::<TC>(&left, &right) != node_ref.hash {
                return Err(mismatch(
                    "its children do not hash to the value its parent records",
                ));
            }
            if left.min_epoch.min(right.min_epoch) != node_ref.min_epoch
                || left.max_epoch.max(right.max_epoch) != node_ref.max_epoch
            {
                return Err(mismatch("its children's epochs do not match its own"));
            }
            checked += 1;
            next.extend([left, right].into_iter().filter(|child| !child.is_leaf()));
        }
        level = next;
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use akd_core::configuration::WhatsAppV1Configuration as TC;
    use akd_core::{AzksValue, NodeLabel};

    use super::*;
    use crate::tree::{MemTreeStore, NewLeaf, SortedLeaves, insert_leaves};

    fn leaf(byte: u8) -> NewLeaf {
        let mut label_val = [byte; 32];
        label_val[31] = byte.wrapping_mul(7);
        NewLeaf {
            label: NodeLabel::new(label_val, 256),
            commitment: AzksValue([byte; 32]),
        }
    }

    #[test]
    fn a_copied_tree_is_checked_node_by_node() {
        let store = MemTreeStore::default();
        let mut root = None;
        for (epoch, bytes) in [(1u64, [1u8, 9, 200]), (2, [3, 77, 250])] {
            let leaves =
                SortedLeaves::new(bytes.iter().map(|b| leaf(*b)).collect()).expect("sorted");
            let delta = insert_leaves::<TC, _>(&store, root, &leaves, epoch).expect("insert");
            store.apply(&delta);
            root = delta.root;
        }
        let checked = verify_partition::<TC, _>(&store, root).expect("consistent");
        assert!(checked >= 4, "{checked}");

        // A wrong root hash, a missing node and a changed child are all caught.
        let mut forged = root.expect("a root");
        forged.hash = AzksValue([0; 32]);
        assert!(verify_partition::<TC, _>(&store, Some(forged)).is_err());
        let empty = MemTreeStore::default();
        assert!(verify_partition::<TC, _>(&empty, root).is_err());
        assert_eq!(verify_partition::<TC, _>(&store, None).expect("empty"), 0);
    }
}
