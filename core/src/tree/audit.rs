//! The append-only slice of one partition for the step `s → s+1`.
//!
//! Read on the partition as of epoch `s+1`: every maximal subtree whose leaves are all from
//! epochs `≤ s` becomes an unchanged element `(label, value-as-seen-by-parent)` (epoch-mixed for
//! a leaf), and every leaf from epoch `s+1` an inserted element `(label, raw commitment)`
//! (akd-spec §5.2, §10.1 item 8). Subtrees are expanded breadth-first, one store read per level.
//!
//! akd computes the same step on its *latest* tree, so its frontier can be finer when later
//! epochs split an old subtree; at the time akd would publish the proof (latest = `s+1`) the two
//! are equal as sets, and ours does not depend on when it is generated.

use akd_core::AzksElement;
use akd_core::configuration::Configuration;

use super::{NodeRef, TreeStore, check_children, read_existing};
use crate::error::{Error, Result};

/// One partition's part of a `SingleAppendOnlyProof`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppendOnlySlice {
    /// Maximal subtrees unchanged since `s`.
    pub unchanged: Vec<AzksElement>,
    /// Leaves inserted in `s+1`, with raw commitments.
    pub inserted: Vec<AzksElement>,
}

/// Computes the slice for `start_epoch → start_epoch + 1` of the partition whose root as of
/// `start_epoch + 1` is `root`.
pub fn append_only_slice<TC: Configuration, S: TreeStore + ?Sized>(
    store: &S,
    root: Option<NodeRef>,
    start_epoch: u64,
) -> Result<AppendOnlySlice> {
    let end_epoch = start_epoch + 1;
    let mut slice = AppendOnlySlice::default();
    let mut frontier = Vec::new();
    let classify =
        |node: NodeRef, slice: &mut AppendOnlySlice, frontier: &mut Vec<NodeRef>| -> Result<()> {
            if node.label.label_len == 0 {
                // The root itself (a k = 0 partition) is never an element: akd's auditor
                // rejects an element labelled ROOT, so an unchanged root is expanded into its
                // children (only a heartbeat epoch leaves the root unchanged).
                frontier.push(node);
            } else if node.max_epoch <= start_epoch {
                slice.unchanged.push(node.element::<TC>());
            } else if node.min_epoch > end_epoch {
                // Only leaves from later epochs: not part of this step.
            } else if node.is_leaf() {
                if node.max_epoch != end_epoch {
                    return Err(Error::Corrupt(format!(
                        "leaf from epoch {} found while auditing {start_epoch} -> {end_epoch}",
                        node.max_epoch
                    )));
                }
                slice.inserted.push(AzksElement {
                    label: node.label,
                    value: node.hash,
                });
            } else {
                frontier.push(node);
            }
            Ok(())
        };
    if let Some(root) = root {
        classify(root, &mut slice, &mut frontier)?;
    }
    while !frontier.is_empty() {
        let level = std::mem::take(&mut frontier);
        let keys: Vec<_> = level.iter().map(NodeRef::key).collect();
        let records = read_existing(store, &keys)?;
        for (node, record) in level.iter().zip(records) {
            check_children(&node.label, &record)?;
            for child in record.children {
                classify(child, &mut slice, &mut frontier)?;
            }
        }
    }
    Ok(slice)
}
