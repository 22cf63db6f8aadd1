//! An epoch whose node versions were written but which never committed (a crash between the
//! partition writes and the epoch record) leaves the directory at its last committed epoch with
//! an identical root; redoing the epoch gives the same result as if nothing had happened.

use std::time::Duration;

use akd_core::{AkdLabel, AkdValue};
use ktd_core::AkdConfig;
use ktd_testkit::with_deadline_blocking;

use crate::support::directory::open;
use crate::support::workload;

fn replay(batches: &[Vec<(AkdLabel, AkdValue)>], bits: u8, seed: u64) -> Vec<[u8; 32]> {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let directory = open(data_dir.path(), AkdConfig::WhatsAppV1, bits, seed);
    batches
        .iter()
        .map(|batch| directory.publish(batch.clone()).expect("publish").root_hash)
        .collect()
}

#[test]
fn interrupted_epoch_reopens_at_last_commit_and_redo_matches() {
    with_deadline_blocking(Duration::from_secs(120), || {
        let (bits, seed) = (4, 77);
        let batches = workload::random(seed, 8, 60, 2).batches;
        let reference = replay(&batches, bits, seed);

        let data_dir = tempfile::tempdir().expect("temp dir");
        let directory = open(data_dir.path(), AkdConfig::WhatsAppV1, bits, seed);
        for batch in &batches[..5] {
            directory.publish(batch.clone()).expect("publish");
        }
        let committed = directory.epoch_hash(None).expect("latest");
        assert_eq!(committed.root_hash, reference[4]);

        // Write epoch 6's nodes, then "crash": never commit, drop everything.
        let prepared = directory.prepare(batches[5].clone()).expect("prepare");
        assert_eq!(prepared.epoch_hash().root_hash, reference[5]);
        assert!(directory.store().node_versions_from(6).expect("count") > 0);
        drop(prepared);
        assert_eq!(
            directory.epoch_hash(None).expect("latest"),
            committed,
            "readers never see a prepared epoch"
        );
        drop(directory);

        let directory = open(data_dir.path(), AkdConfig::WhatsAppV1, bits, seed);
        assert_eq!(
            directory.epoch_hash(None).expect("latest after reopen"),
            committed
        );
        assert_eq!(
            directory.store().node_versions_from(6).expect("count"),
            0,
            "garbage of epoch 6 removed"
        );
        let some_user = batches[0][0].0.clone();
        directory
            .lookup(&some_user, None)
            .expect("lookups still served");

        for (index, batch) in batches.iter().enumerate().skip(5) {
            let epoch_hash = directory.publish(batch.clone()).expect("redo");
            assert_eq!(
                epoch_hash.root_hash,
                reference[index],
                "epoch {} after redo",
                index + 1
            );
        }
    });
}

#[test]
fn abandoned_epoch_then_a_different_batch_is_clean() {
    with_deadline_blocking(Duration::from_secs(120), || {
        let (bits, seed) = (1, 78);
        let batches = workload::random(seed, 4, 30, 1).batches;
        let mut other = batches.clone();
        other[2] = workload::random(seed + 1, 3, 25, 0).batches[0].clone();
        let reference = replay(&other, bits, seed);

        let data_dir = tempfile::tempdir().expect("temp dir");
        let directory = open(data_dir.path(), AkdConfig::WhatsAppV1, bits, seed);
        directory.publish(batches[0].clone()).expect("publish");
        directory.publish(batches[1].clone()).expect("publish");
        drop(
            directory
                .prepare(batches[2].clone())
                .expect("prepare, then abandon"),
        );
        // The same process carries on with another batch for epoch 3: stale nodes must not leak in.
        for (index, batch) in other.iter().enumerate().skip(2) {
            let epoch_hash = directory.publish(batch.clone()).expect("publish");
            assert_eq!(epoch_hash.root_hash, reference[index]);
        }
    });
}
