//! A shard server's readiness — "caught up", not just "process alive" — as its
//! `grpc.health.v1` service reports it: SERVING (for `""` and `ktd.shard.v1.Shard`) when its
//! store holds the latest committed epoch's root of every partition the shard map gives it
//! (checked against the sequencer every second when started with `--sequencers`; without it,
//! as soon as the data directory is open). NOT_SERVING first thing on SIGTERM.
//!
//! A shard that once held the latest committed epoch cannot fall behind while it runs: no epoch
//! commits without every shard building its partitions. So after a restart the check matters
//! (a data directory restored from an old copy, or damaged, stays NOT_SERVING); an unreachable
//! sequencer leaves a shard's readiness as it was.

use std::sync::Arc;

use gateway::readiness::{PROBE_INTERVAL, PROBE_TIMEOUT};
use ktd_core::akd_core::configuration::Configuration;
use ktd_core::tree::{NodeKey, TreeStore};
use ktd_rpc::health::set_health;
use sequencer::{ClientOptions, SequencerClient, pb};
use shard::local::LocalShard;
use shard::node::ShardNode;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// The shard server's health service name (`""` is the whole server).
pub const SHARD_HEALTH_SERVICE: &str = ktd_proto::ktd::shard::v1::shard_server::SERVICE_NAME;

/// Why a shard is not (yet) known to be caught up.
#[derive(Debug)]
enum ShardCheck {
    /// The sequencer could not be asked: readiness stays as it was.
    Unknown(String),
    /// The store lacks data of a committed epoch.
    Behind(String),
}

/// Whether `node`'s store holds `record`'s roots of the partitions `map` gives shard
/// `shard_id`. Blocking (RocksDB reads).
pub fn shard_holds_epoch<TC: Configuration>(
    node: &ShardNode<TC>,
    shard_id: &str,
    map: &pb::ShardMap,
    record: &pb::EpochRecord,
) -> Result<(), String> {
    if record.partition_roots.is_empty() {
        // Epoch 0: the empty directory, nothing to hold.
        return Ok(());
    }
    let decoded = ktd_core::EpochRecord::decode(record.epoch, &record.partition_roots)
        .map_err(|error| format!("epoch {}: {error}", record.epoch))?;
    let owned = &map
        .shards
        .iter()
        .find(|assignment| assignment.shard_id == shard_id)
        .ok_or_else(|| {
            format!(
                "shard {shard_id} is not in the shard map (version {})",
                map.version
            )
        })?
        .partitions;
    // A partition whose root is a single leaf has no stored interior node to look for.
    let keys: Vec<NodeKey> = owned
        .iter()
        .filter_map(|partition| {
            decoded
                .partitions
                .get(*partition as usize)
                .copied()
                .flatten()
        })
        .filter(|root| !root.is_leaf())
        .map(|root| root.key())
        .collect();
    let found = node
        .store()
        .read_nodes(&keys)
        .map_err(|error| format!("read partition roots: {error}"))?;
    let missing = found.iter().filter(|node| node.is_none()).count();
    if missing > 0 {
        return Err(format!(
            "{missing} of {} partition roots of committed epoch {} are missing from this shard's store",
            keys.len(),
            record.epoch
        ));
    }
    Ok(())
}

async fn check_shard<TC: Configuration>(
    node: &Arc<ShardNode<TC>>,
    shard_id: &str,
    client: &SequencerClient,
) -> Result<u64, ShardCheck> {
    let unknown = |error: sequencer::SequencerError| ShardCheck::Unknown(error.to_string());
    let metadata = client.cluster_metadata().await.map_err(unknown)?;
    let record = client.get_epoch(None).await.map_err(unknown)?;
    let map = metadata.shard_map.unwrap_or_default();
    let node = node.clone();
    let shard_id = shard_id.to_string();
    let epoch = record.epoch;
    tokio::task::spawn_blocking(move || shard_holds_epoch(&node, &shard_id, &map, &record))
        .await
        .map_err(|error| ShardCheck::Unknown(format!("check task: {error}")))?
        .map_err(ShardCheck::Behind)?;
    Ok(epoch)
}

/// Keeps a shard server's health up to date until `stop` (see the module docs). With no
/// sequencer addresses the shard has nothing to catch up with and is SERVING at once.
pub async fn track_shard_readiness<TC: Configuration>(
    shard: Arc<LocalShard<TC>>,
    sequencers: Vec<String>,
    reporter: HealthReporter,
    stop: CancellationToken,
) {
    let services = [SHARD_HEALTH_SERVICE];
    if sequencers.is_empty() {
        set_health(&reporter, &services, ServingStatus::Serving).await;
        tracing::info!(
            serving = true,
            "health changed (no --sequencers: nothing to catch up with)"
        );
        return;
    }
    let client = SequencerClient::with_options(
        sequencers,
        ClientOptions {
            total_timeout: PROBE_TIMEOUT,
            ..ClientOptions::default()
        },
    );
    let mut serving: Option<bool> = None;
    let mut waiting_logged = false;
    loop {
        let check = tokio::time::timeout(
            PROBE_TIMEOUT,
            check_shard(shard.node(), shard.id(), &client),
        )
        .await
        .unwrap_or_else(|_| Err(ShardCheck::Unknown("no answer in time".into())));
        match check {
            Ok(epoch) => {
                shard.saw_committed(epoch);
                if serving != Some(true) {
                    set_health(&reporter, &services, ServingStatus::Serving).await;
                    tracing::info!(
                        serving = true,
                        epoch,
                        "health changed: holds the latest committed epoch"
                    );
                    serving = Some(true);
                }
            }
            Err(ShardCheck::Behind(reason)) => {
                if serving != Some(false) {
                    set_health(&reporter, &services, ServingStatus::NotServing).await;
                    tracing::warn!(serving = false, %reason, "health changed: not caught up");
                    serving = Some(false);
                }
            }
            Err(ShardCheck::Unknown(reason)) => {
                if serving.is_none() && !waiting_logged {
                    tracing::info!(%reason, "waiting for the sequencer to learn the latest committed epoch");
                    waiting_logged = true;
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            () = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
    }
}
