//! The workload both pipeline benches drive through a gateway: users named by number, epochs
//! of new users and changed values, publishes of 5,000 updates 4 at a time, and the wait for
//! the shards' VRF pre-compute (production epochs stay open for minutes, so the labels are
//! ready before the seal).

use std::time::{Duration, Instant};

use futures::StreamExt;
use ktd_client::Client;

/// How long the pre-computed count may stand still before the wait gives up. The count moves
/// once per flush of the shard's log tail (8,192 labels: about 1 s of ECVRF work per server
/// when three servers share two cores), so a 1 s bound gave up half-way at random and the seal
/// then computed the rest itself (14 s instead of 2 s at 300k, bench-results/2026-12-03-2core).
const PRECOMPUTE_STALL: Duration = Duration::from_secs(10);

/// Updates per `Publish`.
pub const PUBLISH_CHUNK: usize = 5_000;

/// User `id`'s label.
pub fn label(id: u64) -> Vec<u8> {
    format!("user-{id:012}").into_bytes()
}

/// Epoch `epoch`'s batch: `first_new..` new users and as many changed values of older ones.
pub fn batch(epoch: u64, first_new: u64, new: u64, changed: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut updates: Vec<(Vec<u8>, Vec<u8>)> = (first_new..first_new + new)
        .map(|id| (label(id), format!("key-{id}-{epoch}").into_bytes()))
        .collect();
    // Changed values: a stride through the existing users, distinct within the epoch.
    let stride = (first_new / changed.max(1)).max(1);
    updates.extend(
        (0..changed.min(first_new))
            .map(|i| (i * stride + epoch) % first_new.max(1))
            .map(|id| (label(id), format!("key-{id}-{epoch}").into_bytes())),
    );
    updates
}

/// Waits until the shards hold `expected` pre-computed VRF labels between them (or the count
/// stops growing for [`PRECOMPUTE_STALL`]); returns how long that took.
pub async fn wait_for_precompute(client: &Client, expected: u64) -> f64 {
    let started = Instant::now();
    let (mut last, mut since) = (0, Instant::now());
    loop {
        let count: u64 = match client.cluster_status().await {
            Ok(status) => status.shards.iter().map(|s| s.precomputed_labels).sum(),
            // A status call that failed (a shard restarting) counts as no progress.
            Err(_) => last,
        };
        if count >= expected {
            return started.elapsed().as_secs_f64();
        }
        if count != last {
            (last, since) = (count, Instant::now());
        } else if since.elapsed() > PRECOMPUTE_STALL {
            eprintln!("pre-compute stalled at {count} of {expected} labels");
            return started.elapsed().as_secs_f64();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publishes `updates` in chunks of [`PUBLISH_CHUNK`], 4 in flight.
pub async fn publish_all(client: &Client, updates: Vec<(Vec<u8>, Vec<u8>)>) {
    let chunks: Vec<_> = updates.chunks(PUBLISH_CHUNK).map(<[_]>::to_vec).collect();
    futures::stream::iter(chunks)
        .map(|chunk| async move { client.publish(chunk, None).await.expect("publish") })
        .buffer_unordered(4)
        .collect::<Vec<_>>()
        .await;
}
