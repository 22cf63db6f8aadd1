//! ktd against stock akd 0.13 on seeded workloads: both configurations × `k ∈ {0, 1, 4, 8}`.
//!
//! After every epoch: the root hash equals `akd::Directory::publish`'s; lookup and history
//! proofs equal akd's (`==` on the structs) and pass `lookup_verify` / `key_history_verify`; the
//! audit proof of the step equals akd's as a set and passes `audit_verify`. At the end, proofs
//! regenerated at earlier epochs equal the ones akd produced back then, and one audit over all
//! epochs verifies. Replay a failure with `check_against_akd::<TC>(config, bits, seed)`.

use std::time::Duration;

use akd_core::configuration::{
    Configuration, ExampleLabel, ExperimentalConfiguration, WhatsAppV1Configuration,
};
use akd_core::verify::history::HistoryParams;
use akd_core::verify::history::HistoryVerificationParams;
use akd_core::{AkdLabel, HistoryProof, LookupProof};
use ktd_core::AkdConfig;
use ktd_core::Error as CoreError;
use ktd_testkit::with_deadline_blocking;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shard::Error;

use crate::support::directory::{assert_same_step, experimental, open, stock_akd};
use crate::support::workload;

type Experimental = ExperimentalConfiguration<ExampleLabel>;

struct Recorded {
    epoch: u64,
    lookups: Vec<(AkdLabel, LookupProof)>,
    histories: Vec<(AkdLabel, HistoryParams, HistoryProof)>,
}

/// Runs one seeded workload through ktd (`bits` partition bits) and stock akd side by side.
pub fn check_against_akd<TC: Configuration>(config: AkdConfig, bits: u8, seed: u64) {
    let context = format!("config {config}, bits {bits}, seed {seed}");
    let (runtime, akd) = stock_akd::<TC>(seed);
    let data_dir = tempfile::tempdir().expect("temp dir");
    let mut ours = open(data_dir.path(), config.clone(), bits, seed);
    let public_key = ours.vrf_public_key();
    assert_eq!(
        &public_key,
        runtime
            .block_on(akd.get_public_key())
            .expect("akd public key")
            .as_bytes()
    );
    let empty_root = runtime
        .block_on(akd.get_epoch_hash())
        .expect("akd epoch hash");
    assert_eq!(
        ours.epoch_hash(None).expect("epoch 0").root_hash,
        empty_root.hash(),
        "{context}"
    );

    let workload = workload::random(seed, 75, 300, 3);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut roots = vec![empty_root.hash()];
    let mut published: Vec<AkdLabel> = Vec::new();
    let mut recorded = Vec::new();

    for (batch_index, batch) in workload.batches.iter().enumerate() {
        if batch_index == 40 {
            // Persistence: everything must survive a close and reopen.
            drop(ours);
            ours = open(data_dir.path(), config.clone(), bits, seed);
        }
        let theirs = runtime
            .block_on(akd.publish(batch.clone()))
            .expect("akd publish");
        let mine = ours.publish(batch.clone()).expect("ktd publish");
        assert_eq!(
            (mine.epoch, mine.root_hash),
            (theirs.epoch(), theirs.hash()),
            "root of batch {batch_index} ({context})"
        );
        let epoch = mine.epoch;
        if epoch as usize == roots.len() {
            roots.push(mine.root_hash);
            let ours_audit = ours.audit(epoch - 1, epoch).expect("ktd audit");
            let theirs_audit = runtime
                .block_on(akd.audit(epoch - 1, epoch))
                .expect("akd audit");
            assert_eq!(ours_audit.epochs, theirs_audit.epochs);
            assert_same_step(
                &ours_audit.proofs[0],
                &theirs_audit.proofs[0],
                &format!("epoch {epoch}, {context}"),
            );
            runtime
                .block_on(akd::auditor::audit_verify::<TC>(
                    roots[roots.len() - 2..].to_vec(),
                    ours_audit,
                ))
                .expect("audit_verify accepts the step");
        }
        for (label, _) in batch {
            if !published.contains(label) {
                published.push(label.clone());
            }
        }

        let mut record = Recorded {
            epoch,
            lookups: Vec::new(),
            histories: Vec::new(),
        };
        let mut sample: Vec<AkdLabel> = batch
            .iter()
            .take(4)
            .map(|(label, _)| label.clone())
            .collect();
        for _ in 0..3 {
            sample.push(published[rng.random_range(0..published.len())].clone());
        }
        for label in sample {
            let (proof, epoch_hash) = ours.lookup(&label, None).expect("ktd lookup");
            let (akd_proof, _) = runtime
                .block_on(akd.lookup(label.clone()))
                .expect("akd lookup");
            assert_eq!(
                proof, akd_proof,
                "lookup proof at epoch {epoch} ({context})"
            );
            akd::client::lookup_verify::<TC>(
                &public_key,
                epoch_hash.root_hash,
                epoch,
                label.clone(),
                proof.clone(),
            )
            .expect("lookup_verify accepts ktd's proof");
            record.lookups.push((label, proof));
        }

        let heavy = &workload.heavy[batch_index % workload.heavy.len()];
        let random_user = published[rng.random_range(0..published.len())].clone();
        let heavy_params = if batch_index % 10 == 0 {
            HistoryParams::Complete
        } else {
            HistoryParams::MostRecent(rng.random_range(1..6))
        };
        for (label, params) in [
            (heavy.clone(), heavy_params),
            (random_user, HistoryParams::Complete),
        ] {
            let (proof, epoch_hash) = ours.key_history(&label, params, None).expect("ktd history");
            let (akd_proof, _) = runtime
                .block_on(akd.key_history(&label, params))
                .expect("akd history");
            assert_eq!(
                proof, akd_proof,
                "history proof at epoch {epoch} ({context})"
            );
            akd::client::key_history_verify::<TC>(
                &public_key,
                epoch_hash.root_hash,
                epoch,
                label.clone(),
                proof.clone(),
                HistoryVerificationParams::Default {
                    history_params: params,
                },
            )
            .expect("key_history_verify accepts ktd's proof");
            record.histories.push((label, params, proof));
        }
        if batch_index % 6 == 0 || batch_index + 1 == workload.batches.len() {
            recorded.push(record);
        }
    }

    // Never-published labels: akd and ktd both refuse a lookup.
    let stranger = AkdLabel::from("never-published");
    assert!(matches!(
        ours.lookup(&stranger, None),
        Err(Error::Core(CoreError::LabelNotFound { .. }))
    ));
    assert!(runtime.block_on(akd.lookup(stranger)).is_err());

    // Proofs at earlier epochs are the bytes akd produced at those epochs.
    for record in &recorded {
        for (label, proof) in &record.lookups {
            let (again, epoch_hash) = ours
                .lookup(label, Some(record.epoch))
                .expect("lookup at a past epoch");
            assert_eq!(
                &again, proof,
                "past lookup at epoch {} ({context})",
                record.epoch
            );
            akd::client::lookup_verify::<TC>(
                &public_key,
                epoch_hash.root_hash,
                record.epoch,
                label.clone(),
                again,
            )
            .expect("past lookup verifies");
        }
        for (label, params, proof) in &record.histories {
            let (again, _) = ours
                .key_history(label, *params, Some(record.epoch))
                .expect("history at a past epoch");
            assert_eq!(
                &again, proof,
                "past history at epoch {} ({context})",
                record.epoch
            );
        }
    }

    // One audit over the whole life of the directory.
    let latest = roots.len() as u64 - 1;
    let full = ours.audit(0, latest).expect("full audit");
    runtime
        .block_on(akd::auditor::audit_verify::<TC>(roots, full))
        .expect("audit_verify accepts every step");
}

const DEADLINE: Duration = Duration::from_secs(300);

macro_rules! oracle_tests {
    ($($name:ident: $tc:ty, $config:expr, $bits:expr, $seed:expr;)*) => {$(
        #[test]
        fn $name() {
            with_deadline_blocking(DEADLINE, || check_against_akd::<$tc>($config, $bits, $seed));
        }
    )*};
}

oracle_tests! {
    whatsapp_k0: WhatsAppV1Configuration, AkdConfig::WhatsAppV1, 0, 1;
    whatsapp_k1: WhatsAppV1Configuration, AkdConfig::WhatsAppV1, 1, 2;
    whatsapp_k4: WhatsAppV1Configuration, AkdConfig::WhatsAppV1, 4, 3;
    whatsapp_k8: WhatsAppV1Configuration, AkdConfig::WhatsAppV1, 8, 4;
    experimental_k0: Experimental, experimental(), 0, 5;
    experimental_k1: Experimental, experimental(), 1, 6;
    experimental_k4: Experimental, experimental(), 4, 7;
    experimental_k8: Experimental, experimental(), 8, 8;
}
