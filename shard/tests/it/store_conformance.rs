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

/// A delta of `n` nodes at `epoch` (keys distinct; the records need not form a tree here).
fn delta(n: u32, epoch: u64) -> PartitionDelta {
    let nodes = (0..n)
        .map(|i| {
            let key = NodeKey {
                label: node_ref(i, 200 + i % 57, epoch).label,
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
}

#[test]
fn mem_tree_store_conforms() {
    let store = MemTreeStore::new();
    suite(&store, &|delta| store.apply(delta));
}

#[test]
fn rocks_tree_store_conforms() {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let (store, created) =
        RocksStore::open(data_dir.path(), StoreOptions::default()).expect("open");
    assert!(created);
    suite(&*store, &|delta| store.write_nodes(delta).expect("write"));
}
