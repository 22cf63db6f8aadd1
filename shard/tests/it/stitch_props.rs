//! Property tests: for any leaf set (inserted over a few epochs) and any partition width `k`,
//! the stitched root equals the one-partition root and an independent reference computation,
//! and stitched membership, non-membership and append-only proofs equal the one-partition ones.
//!
//! Inputs are kept sharp: labels share long prefixes, partitions are often empty or hold a
//! single leaf, and `k` ranges over 0..=8.

use akd_core::configuration::{Configuration, WhatsAppV1Configuration};
use akd_core::{AzksElement, AzksValue, NodeLabel};
use ktd_core::label;
use ktd_core::proof::{Claim, TreeProof, prove_claims};
use ktd_core::stitch::{self, TopTree};
use ktd_core::tree::audit::append_only_slice;
use ktd_core::tree::{MemTreeStore, NewLeaf, NodeRef, SortedLeaves, insert_leaves, walk};
use proptest::prelude::*;

type Wa = WhatsAppV1Configuration;

/// Partitions in memory, built epoch by epoch.
struct Partitioned {
    bits: u8,
    store: MemTreeStore,
    roots: Vec<Option<NodeRef>>,
    tops: Vec<TopTree<Wa>>,
}

impl Partitioned {
    fn new(bits: u8) -> Self {
        let roots = vec![None; 1 << bits];
        let top = TopTree::new(bits, roots.clone()).expect("empty top");
        Self {
            bits,
            store: MemTreeStore::new(),
            roots,
            tops: vec![top],
        }
    }

    fn publish(&mut self, leaves: &[NewLeaf]) {
        let epoch = self.tops.len() as u64;
        let runs = SortedLeaves::new(leaves.to_vec())
            .expect("distinct leaves")
            .split_by_partition(self.bits);
        for (partition, run) in runs {
            let delta =
                insert_leaves::<Wa, _>(&self.store, self.roots[partition as usize], &run, epoch)
                    .expect("insert");
            self.store.apply(&delta);
            self.roots[partition as usize] = delta.root;
        }
        self.tops
            .push(TopTree::new(self.bits, self.roots.clone()).expect("top"));
    }

    fn prove(&self, epoch: usize, claims: &[Claim]) -> Vec<TreeProof> {
        prove_claims(&self.tops[epoch], claims, |requests| {
            walk::<Wa, _>(&self.store, requests)
        })
        .expect("proofs")
    }

    fn audit_step(&self, start: u64) -> (Vec<AzksElement>, Vec<AzksElement>) {
        let top = &self.tops[start as usize + 1];
        let top_audit = top.append_only_top(start);
        let slices = top_audit
            .partitions
            .iter()
            .map(|(_, root)| {
                append_only_slice::<Wa, _>(&self.store, Some(*root), start).expect("slice")
            })
            .collect::<Vec<_>>();
        let mut proof = stitch::append_only_proof(top_audit, slices);
        proof.unchanged_nodes.sort();
        proof.inserted.sort();
        (proof.unchanged_nodes, proof.inserted)
    }
}

/// The spec's reference algorithm (akd-spec §10.3), written independently of the engine.
fn reference_root(leaves: &[(NodeLabel, AzksValue, u64)]) -> [u8; 32] {
    fn build(items: &[(NodeLabel, AzksValue, u64)]) -> (NodeLabel, AzksValue) {
        if items.len() == 1 {
            let (label, commitment, epoch) = items[0];
            return (
                label,
                AzksValue(Wa::hash_leaf_with_commitment(commitment, epoch).0),
            );
        }
        let lcp_len =
            label::common_prefix_len(&items[0].0.label_val, &items[items.len() - 1].0.label_val);
        let split = items.partition_point(|item| label::bit(&item.0.label_val, lcp_len) == 0);
        let (left, right) = (build(&items[..split]), build(&items[split..]));
        let value = Wa::compute_parent_hash_from_children(
            &left.1,
            &left.0.value::<Wa>(),
            &right.1,
            &right.0.value::<Wa>(),
        );
        (items[0].0.get_prefix(lcp_len), value)
    }
    if leaves.is_empty() {
        return Wa::compute_root_hash_from_val(&Wa::empty_root_value());
    }
    let mut sorted = leaves.to_vec();
    sorted.sort_by_key(|item| item.0.label_val);
    let split = sorted.partition_point(|item| label::bit(&item.0.label_val, 0) == 0);
    let empty = (Wa::empty_label(), Wa::empty_node_hash());
    let left = if split > 0 {
        build(&sorted[..split])
    } else {
        empty
    };
    let right = if split < sorted.len() {
        build(&sorted[split..])
    } else {
        empty
    };
    let value = Wa::compute_parent_hash_from_children(
        &left.1,
        &left.0.value::<Wa>(),
        &right.1,
        &right.0.value::<Wa>(),
    );
    Wa::compute_root_hash_from_val(&value)
}

fn label_strategy() -> impl Strategy<Value = [u8; 32]> {
    // A few shared prefixes (down to the last bits of byte 2) plus fully random labels.
    let prefixes = prop::sample::select(vec![
        [0x00u8, 0x00, 0x00],
        [0x00, 0x00, 0x01],
        [0x80, 0x00, 0x00],
        [0xff, 0xff, 0xfe],
        [0x7f, 0x01, 0x00],
    ]);
    prop_oneof![
        (prefixes, prop::array::uniform29(any::<u8>())).prop_map(|(prefix, tail)| {
            let mut label = [0u8; 32];
            label[..3].copy_from_slice(&prefix);
            label[3..].copy_from_slice(&tail);
            label
        }),
        prop::array::uniform32(any::<u8>()),
    ]
}

fn epochs_strategy() -> impl Strategy<Value = Vec<Vec<NewLeaf>>> {
    (
        prop::collection::btree_set(label_strategy(), 1..48),
        1usize..5,
    )
        .prop_flat_map(|(labels, n_epochs)| {
            let labels: Vec<[u8; 32]> = labels.into_iter().collect();
            let n = labels.len();
            (Just(labels), prop::collection::vec(0..n_epochs, n)).prop_map(
                move |(labels, epochs)| {
                    let mut batches = vec![Vec::new(); n_epochs];
                    for (label_val, epoch) in labels.into_iter().zip(epochs) {
                        batches[epoch].push(NewLeaf {
                            label: NodeLabel::new(label_val, 256),
                            commitment: AzksValue(*blake3::hash(&label_val).as_bytes()),
                        });
                    }
                    batches.retain(|batch| !batch.is_empty());
                    batches
                },
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn stitched_trees_equal_one_partition(batches in epochs_strategy(), bits in 0u8..=8, probe in prop::array::uniform32(any::<u8>())) {
        let mut single = Partitioned::new(0);
        let mut split = Partitioned::new(bits);
        let mut all_leaves = Vec::new();
        for (index, batch) in batches.iter().enumerate() {
            single.publish(batch);
            split.publish(batch);
            let epoch = index + 1;
            all_leaves.extend(batch.iter().map(|leaf| (leaf.label, leaf.commitment, epoch as u64)));
            prop_assert_eq!(single.tops[epoch].root_hash(), split.tops[epoch].root_hash());
            prop_assert_eq!(split.tops[epoch].root_hash(), reference_root(&all_leaves));

            let mut claims: Vec<Claim> = all_leaves.iter().map(|(label, _, _)| Claim::Member(*label)).collect();
            let absent = NodeLabel::new(probe, 256);
            if !all_leaves.iter().any(|(label, _, _)| *label == absent) {
                claims.push(Claim::Absent(absent));
            }
            // Labels that diverge right next to existing leaves (deepest prefix deep in a partition).
            for (label, _, _) in all_leaves.iter().take(4) {
                let mut near = label.label_val;
                near[31] ^= 1;
                let near = NodeLabel::new(near, 256);
                if !all_leaves.iter().any(|(other, _, _)| *other == near) {
                    claims.push(Claim::Absent(near));
                }
            }
            prop_assert_eq!(single.prove(epoch, &claims), split.prove(epoch, &claims));
            prop_assert_eq!(single.audit_step(epoch as u64 - 1), split.audit_step(epoch as u64 - 1));
        }
        // Earlier epochs stay provable after later ones were written.
        let claims: Vec<Claim> = batches[0].iter().map(|leaf| Claim::Member(leaf.label)).collect();
        prop_assert_eq!(single.prove(1, &claims), split.prove(1, &claims));
    }
}

#[test]
fn empty_directory_root_is_akds() {
    let top = TopTree::<Wa>::new(4, vec![None; 16]).expect("empty");
    assert_eq!(top.root_hash(), reference_root(&[]));
    assert!(matches!(
        top.locate(&NodeLabel::new([1; 32], 256)),
        stitch::Located::EmptyTree
    ));
}

#[test]
fn foreign_partition_root_is_rejected() {
    let mut roots = vec![None; 2];
    roots[0] = Some(NodeRef {
        label: NodeLabel::new([0xff; 32], 256),
        hash: AzksValue([0; 32]),
        min_epoch: 1,
        max_epoch: 1,
    });
    assert!(TopTree::<Wa>::new(1, roots).is_err());
}
