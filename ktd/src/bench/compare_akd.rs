//! `ktd bench --compare-akd`: the same per-epoch batches through a stock in-process
//! `akd::Directory`, side by side with what the cluster did.
//!
//! The bench knows every update it published and the epoch each publish landed in (pre-load
//! included), so after the run it replays those epochs, in order, into an in-memory akd
//! directory and times each `publish`. ktd's side is the sequencer's own record of each epoch
//! (seal → committed root). Lookup generation is timed for the same labels on both sides: ktd
//! through the gateway (network, proof assembly across shards), akd in process. With the
//! directory's VRF seed (`--vrf-seed-file`) and a run that started on an empty directory, every
//! epoch's root is also compared with akd's (they must be equal: ktd is bit-exact with akd).

use std::collections::BTreeMap;
use std::time::Instant;

use akd::storage::StorageManager;
use akd::storage::memory::AsyncInMemoryDatabase;
use ktd_core::AkdConfig;
use ktd_core::akd_core::configuration::Configuration;
use ktd_core::akd_core::{AkdLabel, AkdValue};
use ktd_core::config::{Experimental, WhatsAppV1};
use ktd_core::vrf::VrfKey;
use serde::{Deserialize, Serialize};

use ktd_client::Client;

/// (label, value) pairs.
pub type Updates = Vec<(Vec<u8>, Vec<u8>)>;

/// What the bench published: each acknowledged publish's epoch and updates.
#[derive(Clone, Debug, Default)]
pub struct Published {
    /// Epoch → updates acknowledged into it, in acknowledgement order.
    pub epochs: BTreeMap<u64, Updates>,
    /// The directory's latest epoch before the bench published anything.
    pub start_epoch: u64,
}

impl Published {
    /// Records one acknowledged publish.
    pub fn add(&mut self, epoch: u64, updates: Updates) {
        self.epochs.entry(epoch).or_default().extend(updates);
    }
}

/// The side-by-side result (`report.json` field `compare_akd`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AkdComparison {
    /// Measured epochs (committed during the run, with a known seal latency).
    pub epochs: u64,
    /// Updates in them.
    pub updates: u64,
    /// ktd: sum of seal → committed root over those epochs, seconds.
    pub ktd_seal_seconds: f64,
    /// akd: sum of `Directory::publish` times over the same batches, seconds.
    pub akd_publish_seconds: f64,
    /// ktd: median seal → committed root, ms.
    pub ktd_seal_median_ms: f64,
    /// akd: median `publish`, ms.
    pub akd_publish_median_ms: f64,
    /// Updates per second of epoch processing: updates / ktd seal seconds.
    pub ktd_updates_per_second: f64,
    /// Updates / akd publish seconds.
    pub akd_updates_per_second: f64,
    /// ktd seal seconds / akd publish seconds (below 1: ktd is faster).
    pub seal_ratio: f64,
    /// ktd lookup through the gateway (unloaded, sequential), median ms.
    pub ktd_lookup_median_ms: f64,
    /// akd `Directory::lookup` in process, median ms.
    pub akd_lookup_median_ms: f64,
    /// ktd / akd lookup medians.
    pub lookup_ratio: f64,
    /// Epochs whose root was compared with akd's (0 without the VRF seed or on a directory
    /// that was not empty at the start).
    pub roots_compared: u64,
    /// Of those, roots equal to akd's (must equal `roots_compared`).
    pub roots_equal: u64,
    /// Why some part was not compared, if so.
    pub notes: Vec<String>,
}

fn median(values: &mut [f64]) -> f64 {
    super::quantiles(values).map_or(0.0, |[p50, _, _]| p50)
}

/// Replays `published` into a stock akd directory and compares with the cluster. `seal_ms`
/// maps measured epochs to ktd's seal latency. `seed` is the directory's VRF seed, if known.
pub async fn compare(
    client: &Client,
    published: &Published,
    seal_ms: &BTreeMap<u64, f64>,
    seed: Option<[u8; 32]>,
) -> anyhow::Result<AkdComparison> {
    match client.configuration() {
        AkdConfig::WhatsAppV1 => compare_with::<WhatsAppV1>(client, published, seal_ms, seed).await,
        AkdConfig::Experimental { .. } => {
            compare_with::<Experimental>(client, published, seal_ms, seed).await
        }
    }
}

async fn compare_with<TC: Configuration>(
    client: &Client,
    published: &Published,
    seal_ms: &BTreeMap<u64, f64>,
    seed: Option<[u8; 32]>,
) -> anyhow::Result<AkdComparison> {
    let mut comparison = AkdComparison::default();
    let check_roots = match seed {
        None => {
            comparison
                .notes
                .push("roots not compared: no --vrf-seed-file (akd used a random VRF key)".into());
            false
        }
        Some(_) if published.start_epoch != 0 => {
            comparison.notes.push(format!(
                "roots not compared: the directory already had {} epochs when the bench started",
                published.start_epoch
            ));
            false
        }
        Some(_) => true,
    };
    let seed = seed.unwrap_or_else(rand::random);
    let akd = akd::Directory::<TC, AsyncInMemoryDatabase, VrfKey>::new(
        StorageManager::new_no_cache(AsyncInMemoryDatabase::new()),
        VrfKey::from_seed(&seed)?,
        akd::append_only_zks::AzksParallelismConfig::default(),
    )
    .await?;

    let mut ktd_seals = Vec::new();
    let mut akd_publishes = Vec::new();
    let mut expected_epoch = published.start_epoch;
    let mut roots_in_step = check_roots;
    let latest = client.epoch(None).await?.epoch;
    if published.epochs.keys().any(|epoch| *epoch > latest) {
        comparison.notes.push(format!(
            "epochs after {latest} were not committed when the run ended; they are left out"
        ));
    }
    for (epoch, updates) in published.epochs.range(..=latest) {
        let batch: Vec<(AkdLabel, AkdValue)> = updates
            .iter()
            .map(|(label, value)| (AkdLabel(label.clone()), AkdValue(value.clone())))
            .collect();
        let count = batch.len() as u64;
        let started = Instant::now();
        let akd_root = akd.publish(batch).await?.1;
        let seconds = started.elapsed().as_secs_f64();
        expected_epoch += 1;
        if *epoch != expected_epoch && roots_in_step {
            comparison.notes.push(format!(
                "roots compared up to epoch {}: epoch {} held updates the bench did not publish",
                expected_epoch - 1,
                expected_epoch
            ));
            roots_in_step = false;
        }
        if roots_in_step {
            let root = client.epoch(Some(*epoch)).await?;
            comparison.roots_compared += 1;
            if root.root_hash == akd_root {
                comparison.roots_equal += 1;
            } else {
                comparison.notes.push(format!(
                    "epoch {epoch}: ktd root {} differs from akd's {}",
                    hex::encode(root.root_hash),
                    hex::encode(akd_root)
                ));
            }
        }
        if let Some(ms) = seal_ms.get(epoch).filter(|ms| **ms > 0.0) {
            comparison.epochs += 1;
            comparison.updates += count;
            ktd_seals.push(*ms);
            akd_publishes.push(seconds * 1e3);
        }
    }
    comparison.ktd_seal_seconds = ktd_seals.iter().sum::<f64>() / 1e3;
    comparison.akd_publish_seconds = akd_publishes.iter().sum::<f64>() / 1e3;
    comparison.ktd_seal_median_ms = median(&mut ktd_seals);
    comparison.akd_publish_median_ms = median(&mut akd_publishes);
    if comparison.ktd_seal_seconds > 0.0 && comparison.akd_publish_seconds > 0.0 {
        comparison.ktd_updates_per_second = comparison.updates as f64 / comparison.ktd_seal_seconds;
        comparison.akd_updates_per_second =
            comparison.updates as f64 / comparison.akd_publish_seconds;
        comparison.seal_ratio = comparison.ktd_seal_seconds / comparison.akd_publish_seconds;
    } else {
        comparison
            .notes
            .push("no epoch committed during the run had a known seal latency".into());
    }

    // Lookups of the same labels, one at a time on each side.
    let labels: Vec<&Vec<u8>> = published
        .epochs
        .values()
        .flat_map(|updates| updates.iter().map(|(label, _)| label))
        .step_by((published.epochs.values().map(Vec::len).sum::<usize>() / 200).max(1))
        .take(200)
        .collect();
    let (mut ktd_lookups, mut akd_lookups) = (Vec::new(), Vec::new());
    for label in labels {
        let started = Instant::now();
        client.lookup(label, None).await?;
        ktd_lookups.push(started.elapsed().as_secs_f64() * 1e3);
        let started = Instant::now();
        akd.lookup(AkdLabel(label.clone())).await?;
        akd_lookups.push(started.elapsed().as_secs_f64() * 1e3);
    }
    comparison.ktd_lookup_median_ms = median(&mut ktd_lookups);
    comparison.akd_lookup_median_ms = median(&mut akd_lookups);
    if comparison.akd_lookup_median_ms > 0.0 {
        comparison.lookup_ratio = comparison.ktd_lookup_median_ms / comparison.akd_lookup_median_ms;
    }
    Ok(comparison)
}

/// The comparison as Markdown.
pub fn markdown(comparison: &AkdComparison) -> String {
    let mut text = format!(
        "\n## ktd vs stock akd 0.13, same batches\n\n\
         | | ktd (cluster) | akd (in process) | ktd / akd |\n|---|---|---|---|\n\
         | epoch processing, {} epochs, {} updates | {:.2} s ({:.0} updates/s) | {:.2} s ({:.0} updates/s) | {:.2} |\n\
         | median epoch (ktd: seal → committed root; akd: publish) | {:.0} ms | {:.0} ms | {:.2} |\n\
         | lookup (ktd: through the gateway, verified; akd: generation) median | {:.2} ms | {:.2} ms | {:.2} |\n\n\
         Roots compared with akd: {} of {} equal.\n",
        comparison.epochs,
        comparison.updates,
        comparison.ktd_seal_seconds,
        comparison.ktd_updates_per_second,
        comparison.akd_publish_seconds,
        comparison.akd_updates_per_second,
        comparison.seal_ratio,
        comparison.ktd_seal_median_ms,
        comparison.akd_publish_median_ms,
        if comparison.akd_publish_median_ms > 0.0 {
            comparison.ktd_seal_median_ms / comparison.akd_publish_median_ms
        } else {
            0.0
        },
        comparison.ktd_lookup_median_ms,
        comparison.akd_lookup_median_ms,
        comparison.lookup_ratio,
        comparison.roots_equal,
        comparison.roots_compared,
    );
    for note in &comparison.notes {
        text.push_str(&format!("- {note}\n"));
    }
    text
}
