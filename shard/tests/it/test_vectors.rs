//! akd's conformance schedule (examples/src/test_vectors): labels "1", "2", "4", "8", "16",
//! label `i` publishing `"{i},{epoch}"` whenever `epoch % i == 0`, over epochs 1..=49, with akd's
//! `HardCodedAkdVRF` test seed. The epoch-49 root hashes are the published fixtures
//! (akd-spec §10.2), reproduced here with the tree split into partitions.

use std::time::Duration;

use akd_core::ecvrf::{HardCodedAkdVRF, VRFKeyStorage};
use akd_core::{AkdLabel, AkdValue};
use ktd_core::AkdConfig;
use ktd_testkit::with_deadline_blocking;
use shard::{Directory, DirectoryOptions};

use crate::support::directory::experimental;

const WHATSAPP_EPOCH_49: &str = "51f48b4d0e0b6200fcf75a14f959cd5430e3ed27a31144ca545b9c76a23481f0";
const EXPERIMENTAL_EPOCH_49: &str =
    "020c26b809a068a558fc8e58b4bf0bcda27e1a05e961235f247c6159c1b96d71";
const WHATSAPP_EMPTY: &str = "f48ded419214732a2c610c1e280543744bab3c17aec33e444997fa2d8f79792a";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn run_schedule(config: AkdConfig, bits: u8) -> (String, String) {
    let seed = futures_lite_block_on(HardCodedAkdVRF.retrieve()).expect("test seed");
    let data_dir = tempfile::tempdir().expect("temp dir");
    let options = DirectoryOptions {
        config,
        partition_bits: bits,
        ..DirectoryOptions::default()
    };
    let directory = Directory::open(data_dir.path(), options, &seed).expect("open");
    let empty = hex(&directory.epoch_hash(None).expect("epoch 0").root_hash);
    let mut last = None;
    for epoch in 1..50u64 {
        let batch: Vec<(AkdLabel, AkdValue)> = (0..5)
            .map(|i| 1u64 << i)
            .filter(|index| epoch % index == 0)
            .map(|index| {
                (
                    AkdLabel::from(format!("{index}").as_str()),
                    AkdValue::from(format!("{index},{epoch}").as_str()),
                )
            })
            .collect();
        last = Some(directory.publish(batch).expect("publish"));
    }
    let last = last.expect("49 epochs");
    assert_eq!(last.epoch, 49);
    (empty, hex(&last.root_hash))
}

/// Drives a future that never waits (akd's hard-coded key storage) to completion.
fn futures_lite_block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(future)
}

#[test]
fn whatsapp_fixture_reproduced_in_partitions() {
    with_deadline_blocking(Duration::from_secs(120), || {
        for bits in [0, 1, 4, 8] {
            let (empty, epoch_49) = run_schedule(AkdConfig::WhatsAppV1, bits);
            assert_eq!(empty, WHATSAPP_EMPTY, "empty root, {bits} bits");
            assert_eq!(epoch_49, WHATSAPP_EPOCH_49, "epoch 49, {bits} bits");
        }
    });
}

#[test]
fn experimental_fixture_reproduced_in_partitions() {
    with_deadline_blocking(Duration::from_secs(120), || {
        for bits in [0, 1, 4, 8] {
            let (empty, epoch_49) = run_schedule(experimental(), bits);
            assert_eq!(empty, hex(&[0u8; 32]), "empty root, {bits} bits");
            assert_eq!(epoch_49, EXPERIMENTAL_EPOCH_49, "epoch 49, {bits} bits");
        }
    });
}
