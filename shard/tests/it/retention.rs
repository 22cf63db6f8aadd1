//! History retention on one store (ADR 0003): pruning leaves exactly the node versions the
//! window's roots reach, so the tree's disk grows only as the current tree does (akd's tree never
//! drops a leaf: every update adds a fresh and a stale leaf for good); epochs inside the window
//! stay exact with stock akd, epochs below it get the typed error, and the stale-version index a
//! copy or an old data directory lacks is rebuilt exactly. Backup segments taken across pruning
//! (a full one, then what later epochs wrote) restore every partition to its root.

use std::collections::HashSet;

use akd::append_only_zks::AzksParallelismConfig;
use akd::storage::StorageManager;
use akd::storage::memory::AsyncInMemoryDatabase;
use akd_core::configuration::WhatsAppV1Configuration as TC;
use akd_core::verify::history::{HistoryParams, HistoryVerificationParams};
use akd_core::{AkdLabel, AkdValue};
use ktd_core::AkdConfig;
use ktd_core::Error as CoreError;
use ktd_core::tree::{NodeKey, NodeRef, TreeStore};
use ktd_core::vrf::VrfKey;
use ktd_testkit::with_deadline_blocking;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shard::Error;
use shard::store::RocksStore;

use crate::support::directory::{open, vrf_seed};

const USERS: usize = 1_000;
const PER_EPOCH: usize = 100;
const EPOCHS: u64 = 300;
const WINDOW: u64 = 20;

fn label(user: usize) -> AkdLabel {
    AkdLabel::from(format!("user-{user}").as_str())
}

/// Epoch 1 publishes every user; each later epoch gives `PER_EPOCH` random users a new value.
fn batch(epoch: u64, rng: &mut StdRng) -> Vec<(AkdLabel, AkdValue)> {
    let users: Vec<usize> = if epoch == 1 {
        (0..USERS).collect()
    } else {
        let mut picked = std::collections::BTreeSet::new();
        while picked.len() < PER_EPOCH {
            picked.insert(rng.random_range(0..USERS));
        }
        picked.into_iter().collect()
    };
    users
        .into_iter()
        .map(|user| {
            let value: Vec<u8> = (0..32).map(|_| rng.random()).collect();
            (label(user), AkdValue(value))
        })
        .collect()
}

/// The node versions reachable from the roots of `epochs` (read from the store's records).
fn reachable(store: &RocksStore, epochs: std::ops::RangeInclusive<u64>) -> HashSet<NodeKey> {
    let mut found = HashSet::new();
    for epoch in epochs {
        let record = store.epoch(epoch).expect("read").expect("a record");
        let mut level: Vec<NodeRef> = record.partitions.iter().flatten().copied().collect();
        while !level.is_empty() {
            let keys: Vec<NodeKey> = level
                .iter()
                .filter(|node| !node.is_leaf())
                .map(NodeRef::key)
                .filter(|key| !found.contains(key))
                .collect();
            let nodes = store.read_nodes(&keys).expect("read nodes");
            level = Vec::new();
            for (key, node) in keys.into_iter().zip(nodes) {
                let node = node.unwrap_or_else(|| panic!("epoch {epoch} reaches a pruned node"));
                found.insert(key);
                level.extend(node.children);
            }
        }
    }
    found
}

/// Bytes of the write-ahead log files in a store directory.
fn wal_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("read the store")
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_name().to_string_lossy().ends_with(".log"))
        .filter_map(|entry| entry.metadata().ok())
        .map(|metadata| metadata.len())
        .sum()
}

#[test]
fn the_write_ahead_log_stays_bounded_though_quiet_column_families_rarely_flush() {
    with_deadline_blocking(std::time::Duration::from_secs(240), || {
        let dir = tempfile::tempdir().expect("temp dir");
        let options = shard::DirectoryOptions {
            partition_bits: 2,
            store: shard::store::StoreOptions {
                // A 256 KiB memtable: the WAL bound is 512 KiB.
                write_buffer_bytes: 256 << 10,
                ..Default::default()
            },
            ..Default::default()
        };
        let ours =
            shard::Directory::open(dir.path(), options, &vrf_seed(5)).expect("open directory");
        let mut rng = StdRng::seed_from_u64(5);
        let mut largest = 0;
        for epoch in 1..=120 {
            ours.publish(batch(epoch, &mut rng)).expect("publish");
            largest = largest.max(wal_bytes(dir.path()));
        }
        let written = ours.store().tree_and_user_bytes().expect("bytes").0;
        eprintln!("largest WAL {largest} bytes; {written} bytes of tree SSTs written");
        assert!(
            written > 8 << 20,
            "the run writes far more than the bound ({written} bytes)"
        );
        // The bound plus the memtables being flushed when it is crossed.
        assert!(
            largest < 4 << 20,
            "the WAL grew to {largest} bytes: quiet column families pin it"
        );
    });
}

#[test]
fn pruning_keeps_only_what_the_window_reads_and_the_window_exact_with_akd() {
    with_deadline_blocking(std::time::Duration::from_secs(300), || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("temp dir");
        let seed = 17;
        let ours = open(dir.path(), AkdConfig::WhatsAppV1, 2, seed);
        // The same batches without a window: what pruning saves.
        let unpruned_dir = tempfile::tempdir().expect("temp dir");
        let unpruned = open(unpruned_dir.path(), AkdConfig::WhatsAppV1, 2, seed);
        let akd = runtime
            .block_on(akd::Directory::<TC, _, _>::new(
                StorageManager::new_no_cache(AsyncInMemoryDatabase::new()),
                VrfKey::from_seed(&vrf_seed(seed)).expect("seed"),
                AzksParallelismConfig::default(),
            ))
            .expect("akd directory");
        let public_key = ours.vrf_public_key();
        let mut rng = StdRng::seed_from_u64(seed);
        let sampled = [label(3), label(500), label(999)];
        // Proofs akd gave at each of the last epochs, to compare with ours after pruning.
        let mut recorded = Vec::new();
        let mut roots = vec![[0u8; 32]];
        let mut measured = Vec::new();
        let mut pruned_total = 0;
        for epoch in 1..=EPOCHS {
            let updates = batch(epoch, &mut rng);
            let theirs = runtime
                .block_on(akd.publish(updates.clone()))
                .expect("akd publish");
            let mine = ours.publish(updates.clone()).expect("ktd publish");
            unpruned.publish(updates).expect("ktd publish");
            assert_eq!((mine.epoch, mine.root_hash), (epoch, theirs.hash()));
            roots.push(mine.root_hash);
            if epoch > WINDOW && epoch % 10 == 0 {
                let (floor, deleted) = ours.prune(epoch - WINDOW).expect("prune");
                assert_eq!(floor, epoch - WINDOW);
                pruned_total += deleted;
            }
            if epoch + 30 > EPOCHS {
                for user in &sampled {
                    let (lookup, _) = runtime
                        .block_on(akd.lookup(user.clone()))
                        .expect("akd lookup");
                    let (history, _) = runtime
                        .block_on(akd.key_history(user, HistoryParams::Complete))
                        .expect("akd history");
                    recorded.push((epoch, user.clone(), lookup, history));
                }
            }
            if epoch == EPOCHS / 2 || epoch == EPOCHS {
                let mut sizes = Vec::new();
                for directory in [&ours, &unpruned] {
                    directory.store().compact_all().expect("compact");
                    sizes.push(directory.store().tree_and_user_bytes().expect("bytes").0);
                }
                measured.push((sizes[0], sizes[1]));
            }
        }
        let [(half, half_unpruned), (end, end_unpruned)] = measured[..] else {
            panic!("two measurements");
        };
        let updates = (EPOCHS / 2 * PER_EPOCH as u64) as f64;
        let per_update = (end - half) as f64 / updates;
        let per_update_unpruned = (end_unpruned - half_unpruned) as f64 / updates;
        eprintln!(
            "window {WINDOW} epochs: tree SST bytes {half} at epoch {} and {end} at {EPOCHS} \
             ({per_update:.0} B per update); without pruning {half_unpruned} and {end_unpruned} \
             ({per_update_unpruned:.0} B per update); {pruned_total} node versions pruned",
            EPOCHS / 2
        );
        // Exactly the versions the window's roots reach are left: nothing older survives, and
        // nothing they need is gone (`reachable` panics on a missing node).
        let floor = EPOCHS - WINDOW;
        let stored = ours.store().node_versions_from(0).expect("count");
        let needed = reachable(ours.store(), floor..=EPOCHS);
        assert_eq!(stored, needed.len(), "stored node versions vs the window's");
        // What is left grows only as the current tree does: well under half of keeping all.
        assert!(
            per_update * 2.0 < per_update_unpruned,
            "{per_update:.0} B per update with the window, {per_update_unpruned:.0} without"
        );

        // Inside the window: exactly akd's proofs, and they verify.
        for (epoch, user, lookup, history) in recorded.iter().filter(|r| r.0 >= floor) {
            let (mine, hash) = ours.lookup(user, Some(*epoch)).expect("lookup in window");
            assert_eq!(&mine, lookup, "lookup at epoch {epoch}");
            akd::client::lookup_verify::<TC>(
                &public_key,
                hash.root_hash,
                *epoch,
                user.clone(),
                mine,
            )
            .expect("lookup verifies");
            let (mine, hash) = ours
                .key_history(user, HistoryParams::Complete, Some(*epoch))
                .expect("history in window");
            assert_eq!(&mine, history, "history at epoch {epoch}");
            akd::client::key_history_verify::<TC>(
                &public_key,
                hash.root_hash,
                *epoch,
                user.clone(),
                mine,
                HistoryVerificationParams::Default {
                    history_params: HistoryParams::Complete,
                },
            )
            .expect("history verifies");
        }
        let audit = ours.audit(floor, EPOCHS).expect("audit in window");
        runtime
            .block_on(akd::auditor::audit_verify::<TC>(
                roots[floor as usize..].to_vec(),
                audit,
            ))
            .expect("the window's audit verifies");

        // Below it: the typed error naming the oldest readable epoch.
        for refused in [
            ours.lookup(&sampled[0], Some(floor - 1)).map(|_| ()),
            ours.key_history(&sampled[0], HistoryParams::Complete, Some(floor - 1))
                .map(|_| ()),
            ours.audit(floor - 1, floor).map(|_| ()),
        ] {
            assert!(
                matches!(
                    refused,
                    Err(Error::Core(CoreError::EpochPruned { epoch, oldest }))
                        if epoch == floor - 1 && oldest == floor
                ),
                "{refused:?}"
            );
        }
        // The floor never lowers.
        assert_eq!(ours.prune(5).expect("prune").0, floor);
    });
}

#[test]
fn the_stale_version_index_rebuilt_from_nodes_equals_the_one_builds_write() {
    with_deadline_blocking(std::time::Duration::from_secs(120), || {
        let dir = tempfile::tempdir().expect("temp dir");
        let bits = 2;
        let ours = open(dir.path(), AkdConfig::WhatsAppV1, bits, 5);
        let mut rng = StdRng::seed_from_u64(5);
        for epoch in 1..=40 {
            let updates = batch(epoch, &mut rng);
            ours.publish(updates).expect("publish");
        }
        let store = ours.store();
        let written = store.stale_index_for_tests().expect("index");
        assert!(!written.is_empty());
        store.clear_stale_index_for_tests().expect("clear");
        assert!(store.stale_index_for_tests().expect("index").is_empty());
        let partitions: Vec<u32> = (0..1u32 << bits).collect();
        let rebuilt = store
            .rebuild_stale_index(&partitions, bits, 40)
            .expect("rebuild");
        assert_eq!(rebuilt as usize, written.len());
        assert_eq!(store.stale_index_for_tests().expect("index"), written);
    });
}

/// Writes segment `p<partition>-<from>-<to>.seg` of `store` under `dir`.
fn export_segment(
    store: &RocksStore,
    dir: &std::path::Path,
    partition: u32,
    bits: u8,
    epochs: std::ops::RangeInclusive<u64>,
) -> std::path::PathBuf {
    let path = dir.join(format!(
        "p{partition}-{}-{}.seg",
        epochs.start(),
        epochs.end()
    ));
    let mut writer = shard::backup::SegmentWriter::create(&path).expect("create");
    store
        .export_partition(partition, epochs, bits, 1 << 14, |nodes, users| {
            writer
                .write_chunk(&shard::api::PartitionChunk {
                    checksum: shard::api::chunk_checksum(&nodes, &users),
                    nodes,
                    users,
                    total_records: None,
                })
                .map_err(|error| ktd_core::Error::Corrupt(error.to_string()))
        })
        .expect("export");
    writer.finish().expect("finish");
    path
}

#[test]
fn an_incremental_backup_chain_taken_across_pruning_restores_every_partition_to_its_root() {
    with_deadline_blocking(std::time::Duration::from_secs(120), || {
        let dir = tempfile::tempdir().expect("temp dir");
        let backups = tempfile::tempdir().expect("temp dir");
        let bits = 2;
        let ours = open(dir.path(), AkdConfig::WhatsAppV1, bits, 9);
        let store = ours.store();
        let mut rng = StdRng::seed_from_u64(9);
        let mut chains = vec![Vec::new(); 1 << bits];
        // A full backup at 30 and an incremental one at 60, with a 5-epoch window pruning
        // throughout: versions the first segment holds are pruned before the second is taken.
        for (from, to) in [(0, 30), (30, 60)] {
            for epoch in from + 1..=to {
                ours.publish(batch(epoch, &mut rng)).expect("publish");
                if epoch > 10 && epoch % 5 == 0 {
                    ours.prune(epoch - 5).expect("prune");
                }
            }
            for (partition, chain) in chains.iter_mut().enumerate() {
                chain.push(export_segment(
                    store,
                    backups.path(),
                    partition as u32,
                    bits,
                    from..=to,
                ));
            }
        }
        let record = store.epoch(60).expect("read").expect("a record");
        let mut checked = 0;
        for (partition, chain) in chains.iter().enumerate() {
            let root = record.partitions[partition];
            let scratch = backups.path().join(format!("scratch-{partition}"));
            let restored = shard::backup::verify_segments::<TC>(
                chain,
                partition as u32,
                60,
                bits,
                root,
                &scratch,
            )
            .expect("the chain restores the partition to its root at 60");
            checked += restored.nodes_checked;
            // Without its base the chain misses the versions older epochs wrote.
            if root.is_some() {
                let partial = shard::backup::verify_segments::<TC>(
                    &chain[1..],
                    partition as u32,
                    60,
                    bits,
                    root,
                    &scratch,
                );
                assert!(
                    partial.is_err(),
                    "partition {partition} verified without its base"
                );
            }
        }
        assert!(checked > 0);
        // A truncated segment is refused when read.
        let segment = &chains[0][0];
        let bytes = std::fs::read(segment).expect("read");
        std::fs::write(segment, &bytes[..bytes.len() - 3]).expect("truncate");
        let truncated = shard::backup::read_segment(segment, |_| Ok(()));
        assert!(
            matches!(truncated, Err(Error::Core(CoreError::Corrupt(_)))),
            "{truncated:?}"
        );
    });
}
