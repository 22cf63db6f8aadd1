//! One conformance suite for every `TreeStore`: the in-memory reference and RocksDB.

use akd_core::{AzksValue, NodeLabel};
use ktd_core::tree::{InteriorNode, MemTreeStore, NodeKey, NodeRef, PartitionDelta, TreeStore};
use shard::store::{RocksStore, StoreOptions};

fn node_ref(seed: u32, len: u32, epoch: u64) -> NodeRef {
    let bytes = blake3::hash(&seed.to_be_bytes());
    let label = NodeLabel::new(*bytes.as_bytes(), 256).get_prefix(len);
    NodeRef {
        label,
        hash: AzksValue(*blake3::hash(&[seed as u8]).as_bytes()),
        min_epoch: 1,
        max_epoch: epoch,
    }
}

/// The `i`-th label in heap order: `""`, `"0"`, `"1"`, `"00"`, … (distinct, short).
fn heap_label(i: u32) -> NodeLabel {
    let len = (i + 1).ilog2();
    let prefix = (i + 1) - (1 << len);
    let mut val = [0u8; 32];
    if len > 0 {
        val[..4].copy_from_slice(&(prefix << (32 - len)).to_be_bytes());
    }
    NodeLabel::new(val, len)
}

/// A delta of `n` nodes at `epoch` (keys distinct; the records need not form a tree here): the
/// first thousand labels short (lengths 0–9, held by the hot tree levels), the rest long.
fn delta(n: u32, epoch: u64) -> PartitionDelta {
    let nodes = (0..n)
        .map(|i| {
            let label = if i < 1000 {
                heap_label(i)
            } else {
                node_ref(i, 200 + i % 57, epoch).label
            };
            let key = NodeKey {
                label,
                version: epoch,
            };
            let node = InteriorNode {
                children: [
                    node_ref(i * 2 + 1, 256, epoch),
                    node_ref(i * 2 + 2, 200, epoch),
                ],
            };
            (key, node)
        })
        .collect();
    PartitionDelta {
        epoch,
        root: None,
        nodes: vec![nodes],
        superseded: Vec::new(),
    }
}

fn suite(store: &dyn TreeStore, apply: &dyn Fn(&PartitionDelta)) {
    let first = delta(5000, 3);
    let second = delta(10, 4);
    apply(&first);
    apply(&second);

    // Every written key reads back (a batch larger than one multi-get chunk), in order.
    let keys: Vec<NodeKey> = first.nodes[0].iter().map(|(key, _)| *key).collect();
    let found = store.read_nodes(&keys).expect("read");
    for ((_, node), found) in first.nodes[0].iter().zip(found) {
        assert_eq!(Some(*node), found);
    }
    // Versions are distinct keys: the same label at another epoch is another record or absent.
    let (key, node) = second.nodes[0][0];
    let other_version = NodeKey { version: 3, ..key };
    let found = store
        .read_nodes(&[key, other_version, NodeKey { version: 9, ..key }])
        .expect("read");
    assert_eq!(found[0], Some(node));
    assert_eq!(
        found[1],
        first.nodes[0]
            .iter()
            .find(|(k, _)| *k == other_version)
            .map(|(_, n)| *n)
    );
    assert_eq!(found[2], None);
    assert!(store.read_nodes(&[]).expect("empty read").is_empty());
    // A second read (from the hot tree levels where a store has them) gives the same records.
    let again = store.read_nodes(&keys).expect("read again");
    for ((_, node), found) in first.nodes[0].iter().zip(again) {
        assert_eq!(Some(*node), found);
    }
}

#[test]
fn mem_tree_store_conforms() {
    let store = MemTreeStore::new();
    suite(&store, &|delta| store.apply(delta));
}

#[test]
fn rocks_tree_store_conforms_with_and_without_hot_tree_levels() {
    for hot_tree_bytes in [0, StoreOptions::DEFAULT_HOT_TREE_BYTES] {
        let data_dir = tempfile::tempdir().expect("temp dir");
        let options = StoreOptions {
            hot_tree_bytes,
            ..StoreOptions::default()
        };
        let (store, created) = RocksStore::open(data_dir.path(), options).expect("open");
        assert!(created);
        suite(&*store, &|delta| store.write_nodes(delta).expect("write"));
        let hot = store.hot_stats();
        if hot_tree_bytes == 0 {
            assert_eq!((hot.levels, hot.hits, hot.allocated_bytes), (0, 0, 0));
        } else {
            assert_eq!(hot.levels, 19);
            assert!(hot.hits >= 1000, "{hot:?}");
        }
    }
}

fn open_hot() -> (tempfile::TempDir, std::sync::Arc<RocksStore>) {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let (store, _) = RocksStore::open(data_dir.path(), StoreOptions::default()).expect("open");
    (data_dir, store)
}

fn node(tag: u32, epoch: u64) -> InteriorNode {
    InteriorNode {
        children: [node_ref(tag, 256, epoch), node_ref(tag + 1, 256, epoch)],
    }
}

fn single(label: NodeLabel, epoch: u64, node: InteriorNode, superseded: &[u64]) -> PartitionDelta {
    PartitionDelta {
        epoch,
        root: None,
        nodes: vec![vec![(
            NodeKey {
                label,
                version: epoch,
            },
            node,
        )]],
        superseded: superseded
            .iter()
            .map(|&version| NodeKey { label, version })
            .collect(),
    }
}

fn read_one(store: &RocksStore, label: NodeLabel, version: u64) -> Option<InteriorNode> {
    store
        .read_nodes(&[NodeKey { label, version }])
        .expect("read")[0]
}

#[test]
fn a_discarded_epoch_rebuilt_differently_reads_back_its_new_nodes() {
    let (_dir, store) = open_hot();
    // Partition bits 2: labels "01…" are partition 1.
    let label = heap_label(0b1_0110 - 1); // "0110"
    store
        .write_nodes(&single(label, 5, node(1, 5), &[]))
        .expect("write");
    assert_eq!(read_one(&store, label, 5), Some(node(1, 5)));
    store.discard_partition_epoch(5, 1, 2).expect("discard");
    assert_eq!(read_one(&store, label, 5), None, "discarded, not held");
    store
        .write_nodes(&single(label, 5, node(7, 5), &[]))
        .expect("rebuild");
    assert_eq!(read_one(&store, label, 5), Some(node(7, 5)));
    store.discard_nodes_from(5).expect("discard from");
    assert_eq!(read_one(&store, label, 5), None);
}

#[test]
fn pruned_versions_are_not_read_from_the_hot_tree_levels() {
    let (_dir, store) = open_hot();
    let label = heap_label(5);
    store
        .write_nodes(&single(label, 3, node(1, 3), &[]))
        .expect("write 3");
    store
        .write_nodes(&single(label, 4, node(2, 4), &[3]))
        .expect("write 4");
    assert_eq!(read_one(&store, label, 3), Some(node(1, 3)));
    store.raise_prune_floor(4).expect("floor");
    let step = store.prune_step(100, 4).expect("prune");
    assert_eq!(step.node_versions, 1);
    assert_eq!(read_one(&store, label, 3), None, "pruned");
    assert_eq!(read_one(&store, label, 4), Some(node(2, 4)));
}

/// A store with hot levels holding `node(1, 2)` under label `"0110"` (partition 1 of bits 2),
/// read once.
fn held_node_in_partition_1() -> (tempfile::TempDir, std::sync::Arc<RocksStore>, NodeLabel) {
    let (dir, store) = open_hot();
    let label = heap_label(0b1_0110 - 1);
    store
        .write_nodes(&single(label, 2, node(1, 2), &[]))
        .expect("write");
    assert_eq!(read_one(&store, label, 2), Some(node(1, 2)));
    (dir, store, label)
}

#[test]
fn a_damaged_partition_reads_damaged_even_after_its_good_nodes_were_held() {
    let (_dir, store, label) = held_node_in_partition_1();
    assert_eq!(
        store.damage_partition_for_tests(1, 2, 2).expect("damage"),
        1
    );
    let damaged = read_one(&store, label, 2).expect("still stored");
    assert_ne!(damaged, node(1, 2), "the held good copy was dropped");
}

#[test]
fn copied_nodes_replace_held_ones_and_malformed_keys_are_refused() {
    let (_dir, store, label) = held_node_in_partition_1();
    let key = shard::store::codec::node_key(&NodeKey { label, version: 2 });
    let copied = (key.clone(), shard::store::codec::encode_node(&node(5, 2)));
    store
        .import_records(1, 2, 2, &[copied], &[])
        .expect("import");
    assert_eq!(
        read_one(&store, label, 2),
        Some(node(5, 2)),
        "the copy, not the held"
    );
    // A key claiming 16 label bits with one byte of label: refused, nothing written.
    let mut malformed = key[..9].to_vec();
    malformed.extend_from_slice(&16u16.to_be_bytes());
    let error = store
        .import_records(
            1,
            2,
            2,
            &[(malformed, shard::store::codec::encode_node(&node(6, 2)))],
            &[],
        )
        .expect_err("malformed key");
    assert!(error.to_string().contains("partition 1"), "{error}");
    assert_eq!(read_one(&store, label, 2), Some(node(5, 2)));
}
