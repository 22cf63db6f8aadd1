//! Stored lookup proofs (issue 19, `shard::lookup_proofs`) against proving and against stock
//! akd: after every epoch, each new version's stored record equals the proofs computed afresh,
//! and lookups and histories served from the records equal akd's and verify. A malformed record
//! is ignored and rewritten; `Lazy` stores what the first lookup proves; `Off` stores nothing.

use std::time::Duration;

use akd_core::AkdLabel;
use akd_core::configuration::{
    Configuration, ExampleLabel, ExperimentalConfiguration, WhatsAppV1Configuration,
};
use akd_core::verify::history::{HistoryParams, HistoryVerificationParams};
use ktd_core::AkdConfig;
use ktd_core::proof::StoredLookupProofs;
use ktd_core::vrf::VrfKey;
use ktd_testkit::with_deadline_blocking;
use shard::Directory;
use shard::lookup_proofs::LookupProofs;

use crate::support::directory::{experimental, open_with, stock_akd, vrf_seed};
use crate::support::workload;

/// The record stored for version `version` of `akd_label`.
fn record(ours: &Directory, akd_label: &AkdLabel, version: u64) -> Option<StoredLookupProofs> {
    ours.store()
        .lookup_proofs(akd_label, &[version])
        .expect("read stored lookup proofs")
        .pop()
        .flatten()
}

/// The record stored for `akd_label`'s latest version, and that version.
fn stored_record(ours: &Directory, akd_label: &AkdLabel) -> (u64, Option<StoredLookupProofs>) {
    let (proof, _) = ours.lookup(akd_label, None).expect("ktd lookup");
    (proof.version, record(ours, akd_label, proof.version))
}

fn eager_records_equal_fresh_proofs_and_serve_akds_proofs<TC: Configuration>(
    config: AkdConfig,
    bits: u8,
    seed: u64,
) {
    let context = format!("config {config}, bits {bits}, seed {seed}");
    let (runtime, akd) = stock_akd::<TC>(seed);
    let data_dir = tempfile::tempdir().expect("temp dir");
    let ours = open_with(data_dir.path(), config, bits, seed, LookupProofs::Eager);
    let vrf = VrfKey::from_seed(&vrf_seed(seed)).expect("seed");
    let public_key = ours.vrf_public_key();
    // Heavy users reach version 40: records with the marker inline (versions that are not
    // powers of two) and past markers in their histories.
    let workload = workload::random(seed, 40, 120, 3);
    let mut non_power_of_two = 0;
    for (batch_index, batch) in workload.batches.iter().enumerate() {
        runtime
            .block_on(akd.publish(batch.clone()))
            .expect("akd publish");
        let epoch = ours.publish(batch.clone()).expect("ktd publish").epoch;
        assert!(ours.flush_lookup_proofs(), "eager mode has a filler");

        // Every version this epoch created has its record, byte-identical to proving afresh,
        // before any lookup asked for it.
        let mut records = Vec::new();
        for (akd_label, _) in batch {
            let (akd_proof, _) = runtime
                .block_on(akd.lookup(akd_label.clone()))
                .expect("akd lookup");
            let version = akd_proof.version;
            let record = record(&ours, akd_label, version).unwrap_or_else(|| {
                panic!("no stored lookup proofs for version {version} at epoch {epoch} ({context})")
            });
            assert_eq!(
                record,
                StoredLookupProofs::compute::<TC>(&vrf, akd_label, version),
                "stored proofs of version {version} at epoch {epoch} ({context})"
            );
            if !version.is_power_of_two() {
                non_power_of_two += 1;
            }
            records.push(akd_label.clone());
        }

        // Served from the records: equal to akd's proofs and accepted by akd's verifier.
        for akd_label in records.iter().take(6).chain(&workload.heavy) {
            let (proof, epoch_hash) = ours.lookup(akd_label, None).expect("ktd lookup");
            let (akd_proof, _) = runtime
                .block_on(akd.lookup(akd_label.clone()))
                .expect("akd lookup");
            assert_eq!(proof, akd_proof, "lookup at epoch {epoch} ({context})");
            akd::client::lookup_verify::<TC>(
                &public_key,
                epoch_hash.root_hash,
                epoch,
                akd_label.clone(),
                proof,
            )
            .expect("lookup_verify accepts a lookup served from stored proofs");
        }
        let heavy = &workload.heavy[batch_index % workload.heavy.len()];
        for params in [HistoryParams::Complete, HistoryParams::MostRecent(3)] {
            let (proof, epoch_hash) = ours.key_history(heavy, params, None).expect("ktd history");
            let (akd_proof, _) = runtime
                .block_on(akd.key_history(heavy, params))
                .expect("akd history");
            assert_eq!(proof, akd_proof, "history at epoch {epoch} ({context})");
            akd::client::key_history_verify::<TC>(
                &public_key,
                epoch_hash.root_hash,
                epoch,
                heavy.clone(),
                proof,
                HistoryVerificationParams::Default {
                    history_params: params,
                },
            )
            .expect("key_history_verify accepts a history from stored proofs");
        }
    }
    assert!(
        non_power_of_two > 50,
        "the workload must store records with an inline marker ({non_power_of_two})"
    );

    // A malformed record is ignored (the lookup proves, still equal to akd's) and rewritten.
    let heavy = &workload.heavy[0];
    let (version, record) = stored_record(&ours, heavy);
    let good = record.expect("a stored record");
    for garbage in [&b""[..], &b"\x01\x00short"[..], &[0xffu8; 196][..]] {
        ours.store()
            .put_raw_lookup_proofs_for_tests(heavy, version, garbage)
            .expect("write garbage");
        let (proof, _) = ours
            .lookup(heavy, None)
            .expect("lookup over a malformed record");
        let (akd_proof, _) = runtime
            .block_on(akd.lookup(heavy.clone()))
            .expect("akd lookup");
        assert_eq!(proof, akd_proof, "{context}");
        assert_eq!(stored_record(&ours, heavy), (version, Some(good.clone())));
    }
    // Lookups are served from the record, not re-proven: a well-formed but wrong record (which
    // only a broken disk or binary could write) reaches the client, whose verifier refuses it.
    let mut wrong = good.clone();
    wrong.freshness.vrf_proof[0] ^= 1;
    ours.store()
        .put_lookup_proofs(&[(heavy.as_slice(), version, &wrong)])
        .expect("write a wrong record");
    let (proof, epoch_hash) = ours.lookup(heavy, None).expect("lookup");
    assert_eq!(proof.freshness_vrf_proof, wrong.freshness.vrf_proof);
    assert!(
        akd::client::lookup_verify::<TC>(
            &public_key,
            epoch_hash.root_hash,
            epoch_hash.epoch,
            heavy.clone(),
            proof,
        )
        .is_err()
    );
}

#[test]
fn eager_stored_lookup_proofs_equal_fresh_ones_at_every_epoch_and_serve_akds_proofs() {
    with_deadline_blocking(Duration::from_secs(300), || {
        eager_records_equal_fresh_proofs_and_serve_akds_proofs::<WhatsAppV1Configuration>(
            AkdConfig::WhatsAppV1,
            4,
            19,
        );
        eager_records_equal_fresh_proofs_and_serve_akds_proofs::<
            ExperimentalConfiguration<ExampleLabel>,
        >(experimental(), 1, 20);
    });
}

#[test]
fn lazy_mode_stores_what_the_first_lookup_proves_and_off_stores_nothing() {
    with_deadline_blocking(Duration::from_secs(120), || {
        let seed = 21;
        let vrf = VrfKey::from_seed(&vrf_seed(seed)).expect("seed");
        let workload = workload::random(seed, 6, 40, 2);
        for mode in [LookupProofs::Lazy, LookupProofs::Off] {
            let data_dir = tempfile::tempdir().expect("temp dir");
            let ours = open_with(data_dir.path(), AkdConfig::WhatsAppV1, 2, seed, mode);
            for batch in &workload.batches {
                ours.publish(batch.clone()).expect("publish");
                assert!(!ours.flush_lookup_proofs(), "{mode} has no filler");
            }
            let labels = workload.batches[0].iter().map(|(label, _)| label).take(10);
            for akd_label in labels.chain(&workload.heavy) {
                let version = ours
                    .store()
                    .latest_user_version(akd_label, u64::MAX)
                    .expect("read")
                    .expect("published")
                    .version;
                let record = || record(&ours, akd_label, version);
                assert_eq!(
                    record(),
                    None,
                    "{mode}: nothing stored when the version was written"
                );
                let (first, _) = ours.lookup(akd_label, None).expect("lookup");
                let expected = match mode {
                    LookupProofs::Lazy => Some(StoredLookupProofs::compute::<
                        WhatsAppV1Configuration,
                    >(&vrf, akd_label, version)),
                    _ => None,
                };
                assert_eq!(record(), expected, "{mode}: what the first lookup stored");
                let (second, _) = ours.lookup(akd_label, None).expect("lookup");
                assert_eq!(
                    second, first,
                    "{mode}: a stored proof equals the computed one"
                );
            }
        }
    });
}

#[test]
fn eager_mode_backfills_the_records_of_versions_written_without_them() {
    with_deadline_blocking(Duration::from_secs(120), || {
        let seed = 22;
        let vrf = VrfKey::from_seed(&vrf_seed(seed)).expect("seed");
        let workload = workload::random(seed, 8, 300, 2);
        let data_dir = tempfile::tempdir().expect("temp dir");
        let mut versions = Vec::new();
        {
            let ours = open_with(
                data_dir.path(),
                AkdConfig::WhatsAppV1,
                3,
                seed,
                LookupProofs::Off,
            );
            for batch in &workload.batches {
                ours.publish(batch.clone()).expect("publish");
            }
            for akd_label in workload.batches.iter().flatten().map(|(label, _)| label) {
                for version in ours
                    .store()
                    .user_versions(akd_label, u64::MAX)
                    .expect("read")
                {
                    assert_eq!(record(&ours, akd_label, version.version), None);
                    versions.push((akd_label.clone(), version.version));
                }
            }
        }
        versions.sort();
        versions.dedup();
        assert!(versions.len() > 300, "{} versions", versions.len());
        // Reopened eager (an upgrade, or a directory that ran lazy): the filler's walk proves
        // every stored version, including older ones that lookups never reach.
        let ours = open_with(
            data_dir.path(),
            AkdConfig::WhatsAppV1,
            3,
            seed,
            LookupProofs::Eager,
        );
        assert!(ours.flush_lookup_proofs());
        for (akd_label, version) in &versions {
            assert_eq!(
                record(&ours, akd_label, *version),
                Some(StoredLookupProofs::compute::<WhatsAppV1Configuration>(
                    &vrf, akd_label, *version
                )),
                "version {version}"
            );
        }
    });
}
