//! Bad input gets a typed error, never a panic, and the directory keeps serving afterwards.

use std::time::Duration;

use akd_core::verify::history::HistoryParams;
use akd_core::{AkdLabel, AkdValue};
use ktd_core::AkdConfig;
use ktd_core::Error as CoreError;
use ktd_core::user::UpdateLimits;
use ktd_testkit::with_deadline_blocking;
use shard::{Directory, DirectoryOptions, Error};

use crate::support::directory::{open, vrf_seed};

fn update(label: &str, value: &[u8]) -> (AkdLabel, AkdValue) {
    (AkdLabel::from(label), AkdValue(value.to_vec()))
}

#[test]
fn publish_and_proof_requests_reject_bad_input() {
    with_deadline_blocking(Duration::from_secs(60), || {
        let data_dir = tempfile::tempdir().expect("temp dir");
        let directory = open(data_dir.path(), AkdConfig::WhatsAppV1, 2, 1);
        directory
            .publish(vec![update("alice", b"k1"), update("bob", b"k2")])
            .expect("publish");

        let duplicate = directory.publish(vec![update("carol", b"a"), update("carol", b"b")]);
        assert!(
            matches!(
                duplicate,
                Err(Error::Core(CoreError::DuplicateLabel { .. }))
            ),
            "{duplicate:?}"
        );
        let too_large = directory.publish(vec![update("dave", &vec![0u8; 64 * 1024 + 1])]);
        assert!(
            matches!(
                too_large,
                Err(Error::Core(CoreError::ValueTooLarge {
                    len: 65537,
                    max: 65536
                }))
            ),
            "{too_large:?}"
        );
        directory
            .publish(vec![update("dave", &vec![0u8; 64 * 1024])])
            .expect("exactly the limit is fine");
        assert!(matches!(
            directory.publish(vec![update("", b"x")]),
            Err(Error::Core(CoreError::EmptyLabel))
        ));

        let alice = AkdLabel::from("alice");
        let future = directory.lookup(&alice, Some(99));
        assert!(
            matches!(
                future,
                Err(Error::Core(CoreError::EpochNotFound {
                    epoch: 99,
                    latest: 2
                }))
            ),
            "{future:?}"
        );
        assert!(matches!(
            directory.epoch_hash(Some(3)),
            Err(Error::Core(CoreError::EpochNotFound { .. }))
        ));
        assert!(matches!(
            directory.key_history(&alice, HistoryParams::Complete, Some(7)),
            Err(Error::Core(CoreError::EpochNotFound { .. }))
        ));
        assert!(matches!(
            directory.key_history(&alice, HistoryParams::MostRecent(0), None),
            Err(Error::Core(CoreError::EmptyHistoryRequest))
        ));
        assert!(matches!(
            directory.audit(2, 2),
            Err(Error::Core(CoreError::InvalidAuditRange {
                start: 2,
                end: 2
            }))
        ));
        assert!(matches!(
            directory.audit(2, 1),
            Err(Error::Core(CoreError::InvalidAuditRange { .. }))
        ));
        assert!(matches!(
            directory.audit(0, 3),
            Err(Error::Core(CoreError::EpochNotFound { epoch: 3, .. }))
        ));
        // Before alice existed (epoch 0) there is nothing to prove.
        assert!(matches!(
            directory.lookup(&alice, Some(0)),
            Err(Error::Core(CoreError::LabelNotFound { epoch: 0, .. }))
        ));

        // Still serving.
        directory.lookup(&alice, None).expect("lookup after errors");
        assert_eq!(directory.audit(0, 2).expect("audit").proofs.len(), 2);
    });
}

#[test]
fn configured_limits_apply() {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let options = DirectoryOptions {
        limits: UpdateLimits {
            max_label_len: 8,
            max_value_len: 16,
            max_batch: 2,
        },
        ..DirectoryOptions::default()
    };
    let directory = Directory::open(data_dir.path(), options, &vrf_seed(1)).expect("open");
    assert!(matches!(
        directory.publish(vec![update("a", &[0; 17])]),
        Err(Error::Core(CoreError::ValueTooLarge { max: 16, .. }))
    ));
    assert!(matches!(
        directory.publish(vec![update("123456789", b"v")]),
        Err(Error::Core(CoreError::LabelTooLong { max: 8, .. }))
    ));
    assert!(matches!(
        directory.publish(vec![
            update("a", b"v"),
            update("b", b"v"),
            update("c", b"v")
        ]),
        Err(Error::Core(CoreError::BatchTooLarge { max: 2, .. }))
    ));
}

#[test]
fn wrong_seed_length_and_bad_options() {
    let data_dir = tempfile::tempdir().expect("temp dir");
    for len in [0, 16, 31, 33] {
        let opened = Directory::open(
            data_dir.path(),
            DirectoryOptions::default(),
            &vec![1u8; len],
        );
        assert!(
            matches!(opened, Err(Error::Core(CoreError::InvalidSeedLength { len: got })) if got == len)
        );
    }
    let too_many_bits = DirectoryOptions {
        partition_bits: 13,
        ..DirectoryOptions::default()
    };
    assert!(matches!(
        Directory::open(data_dir.path(), too_many_bits, &vrf_seed(1)),
        Err(Error::Core(CoreError::InvalidConfig(_)))
    ));
}

#[test]
fn reopening_with_another_identity_is_refused() {
    let data_dir = tempfile::tempdir().expect("temp dir");
    drop(open(data_dir.path(), AkdConfig::WhatsAppV1, 4, 1));
    let mismatches = [
        (AkdConfig::WhatsAppV1, 5, 1, "partition bits"),
        (AkdConfig::WhatsAppV1, 4, 2, "VRF key"),
        (
            crate::support::directory::experimental(),
            4,
            1,
            "configuration",
        ),
    ];
    for (config, bits, seed, what) in mismatches {
        let options = DirectoryOptions {
            config,
            partition_bits: bits,
            ..DirectoryOptions::default()
        };
        let opened = Directory::open(data_dir.path(), options, &vrf_seed(seed));
        assert!(
            matches!(opened, Err(Error::IncompatibleDataDir { .. })),
            "{what}: {opened:?}"
        );
    }
    // The rightful owner still opens it.
    drop(open(data_dir.path(), AkdConfig::WhatsAppV1, 4, 1));
}

#[test]
fn foreign_and_corrupt_data_directories_are_refused() {
    // A directory with unrelated files.
    let foreign = tempfile::tempdir().expect("temp dir");
    std::fs::write(foreign.path().join("notes.txt"), b"not a database").expect("write");
    let opened = Directory::open(foreign.path(), DirectoryOptions::default(), &vrf_seed(1));
    assert!(
        matches!(opened, Err(Error::IncompatibleDataDir { .. })),
        "{opened:?}"
    );
    assert!(
        foreign.path().join("notes.txt").exists(),
        "never re-initialised"
    );

    // Someone else's RocksDB.
    let other_db = tempfile::tempdir().expect("temp dir");
    {
        let mut options = rocksdb::Options::default();
        options.create_if_missing(true);
        let db = rocksdb::DB::open(&options, other_db.path()).expect("open plain rocksdb");
        db.put(b"k", b"v").expect("put");
    }
    let opened = Directory::open(other_db.path(), DirectoryOptions::default(), &vrf_seed(1));
    assert!(
        matches!(opened, Err(Error::IncompatibleDataDir { .. })),
        "{opened:?}"
    );

    // A ktd directory whose manifest was damaged.
    let damaged = tempfile::tempdir().expect("temp dir");
    {
        let directory = open(damaged.path(), AkdConfig::WhatsAppV1, 2, 1);
        directory
            .publish(vec![update("alice", b"k")])
            .expect("publish");
    }
    for entry in std::fs::read_dir(damaged.path()).expect("list") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or_default()
            .to_string();
        if name.starts_with("MANIFEST") {
            std::fs::write(&path, vec![0xa5u8; 4096]).expect("damage manifest");
        }
    }
    let opened = Directory::open(
        damaged.path(),
        DirectoryOptions {
            partition_bits: 2,
            ..DirectoryOptions::default()
        },
        &vrf_seed(1),
    );
    assert!(
        matches!(
            opened,
            Err(
                Error::Core(CoreError::Storage { .. } | CoreError::Corrupt(_))
                    | Error::IncompatibleDataDir { .. }
            )
        ),
        "{opened:?}"
    );
}

#[test]
fn a_data_directory_in_use_is_refused() {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let _first = open(data_dir.path(), AkdConfig::WhatsAppV1, 2, 1);
    let second = Directory::open(
        data_dir.path(),
        DirectoryOptions {
            partition_bits: 2,
            ..DirectoryOptions::default()
        },
        &vrf_seed(1),
    );
    assert!(
        matches!(second, Err(Error::IncompatibleDataDir { .. })),
        "{second:?}"
    );
}
