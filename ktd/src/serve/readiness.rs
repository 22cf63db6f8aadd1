//! A shard server replica's restart check and readiness, as its `grpc.health.v1` service
//! reports it: SERVING (for `""` and `ktd.shard.v1.Shard`) when every partition the shard map
//! gives it as a healthy voter is held, undamaged and built to the latest committed epoch
//! (checked against the sequencer every second when started with `--sequencers`; without it,
//! as soon as the data directory is open). NOT_SERVING first thing on SIGTERM.
//!
//! Before the first readiness check, the restart check compares every built marker with the
//! committed epoch record: a partition whose stored root is not the committed one is refused
//! for reads and reported (`mismatch`), and the coordinator rebuilds it. A replica that is
//! behind is caught up by the coordinator while it runs; its readiness says so meanwhile. An
//! unreachable sequencer leaves readiness as it was.

use std::sync::Arc;

use gateway::readiness::{PROBE_INTERVAL, PROBE_TIMEOUT};
use gateway::sequencing::Sequencing;
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
    /// A partition assigned here is not held, is damaged, or is behind the committed epoch.
    Behind(String),
}

fn decode_roots(
    bits: u8,
    record: &pb::EpochRecord,
) -> Result<Vec<Option<ktd_core::tree::NodeRef>>, String> {
    if record.partition_roots.is_empty() {
        return Ok(vec![None; 1 << bits]);
    }
    ktd_core::EpochRecord::decode(record.epoch, &record.partition_roots)
        .map(|decoded| decoded.partitions)
        .map_err(|error| format!("epoch {}: {error}", record.epoch))
}

/// Whether `node`'s store holds the interior root nodes `roots` names for `partitions`
/// (partitions whose root is empty or a single leaf have nothing to look for). Blocking.
pub fn holds_roots<TC: Configuration>(
    node: &ShardNode<TC>,
    partitions: &[u32],
    roots: &[Option<ktd_core::tree::NodeRef>],
) -> Result<bool, String> {
    let keys: Vec<NodeKey> = partitions
        .iter()
        .filter_map(|partition| roots.get(*partition as usize).copied().flatten())
        .filter(|root| !root.is_leaf())
        .map(|root| root.key())
        .collect();
    let found = node
        .store()
        .read_nodes(&keys)
        .map_err(|error| format!("read partition roots: {error}"))?;
    Ok(found.iter().all(Option::is_some))
}

/// The restart check, once per process: every built marker at or below the committed epoch must
/// carry the committed root of its partition, or the partition is marked mismatched (not read,
/// rebuilt by the coordinator). A data directory written before built markers existed (none at
/// all, but tree nodes present) adopts markers at the latest committed epoch for the assigned
/// partitions whose committed roots it holds.
async fn restart_check<TC: Configuration>(
    shard: &Arc<LocalShard<TC>>,
    client: &dyn Sequencing,
    map: &ktd_core::ShardMap,
    latest: &pb::EpochRecord,
) -> Result<(), ShardCheck> {
    let unknown = |error: sequencer::SequencerError| ShardCheck::Unknown(error.to_string());
    let bits = map.bits();
    let markers = shard.markers();
    for marker in &markers {
        if marker.epoch > latest.epoch {
            continue;
        }
        let record = client
            .get_epoch(Some(marker.epoch))
            .await
            .map_err(unknown)?;
        let roots = decode_roots(bits, &record).map_err(ShardCheck::Unknown)?;
        if roots.get(marker.partition as usize).copied().flatten() != marker.root {
            tracing::error!(
                partition = marker.partition,
                epoch = marker.epoch,
                "the stored root differs from the committed one: not serving this partition until it is rebuilt"
            );
            shard.set_mismatch(marker.partition);
        }
    }
    let assigned: Vec<u32> = map
        .assignments(shard.id())
        .into_iter()
        .map(|(partition, _)| partition)
        .collect();
    let node = shard.node().clone();
    let has_nodes = tokio::task::spawn_blocking(move || node.store().node_versions_from(0))
        .await
        .map_err(|error| ShardCheck::Unknown(format!("check task: {error}")))?
        .map_err(|error| ShardCheck::Unknown(error.to_string()))?
        > 0;
    if markers.is_empty() && has_nodes && latest.epoch > 0 {
        let roots = decode_roots(bits, latest).map_err(ShardCheck::Unknown)?;
        let node = shard.node().clone();
        let (check_partitions, check_roots) = (assigned.clone(), roots.clone());
        let holds = tokio::task::spawn_blocking(move || {
            holds_roots(&node, &check_partitions, &check_roots)
        })
        .await
        .map_err(|error| ShardCheck::Unknown(format!("check task: {error}")))?
        .map_err(ShardCheck::Behind)?;
        if holds {
            for partition in assigned {
                let marker = shard::store::replica::BuiltMarker {
                    partition,
                    epoch: latest.epoch,
                    root: roots[partition as usize],
                };
                let shard = shard.clone();
                tokio::task::spawn_blocking(move || shard.adopt_marker(marker))
                    .await
                    .map_err(|error| ShardCheck::Unknown(format!("check task: {error}")))?
                    .map_err(|error| ShardCheck::Unknown(error.to_string()))?;
            }
            tracing::info!(
                epoch = latest.epoch,
                "adopted built markers for a data directory written before replica sets"
            );
        }
    }
    Ok(())
}

/// The restart check of `ktd dev`'s in-process shard against its in-process sequencer (see
/// [`track_shard_readiness`] for shard servers).
pub async fn check_in_process<TC: Configuration>(
    shard: &Arc<LocalShard<TC>>,
    sequencer: &dyn Sequencing,
) -> anyhow::Result<()> {
    let failed = |check: ShardCheck| match check {
        ShardCheck::Unknown(reason) | ShardCheck::Behind(reason) => anyhow::anyhow!(reason),
    };
    let metadata = sequencer.cluster_metadata().await?;
    let latest = sequencer.get_epoch(None).await?;
    let cluster = metadata
        .metadata
        .ok_or_else(|| anyhow::anyhow!("the cluster is not initialised"))?;
    let map = shard::replicated::shard_map(&cluster, &metadata.shard_map.unwrap_or_default())?;
    restart_check(shard, sequencer, &map, &latest)
        .await
        .map_err(failed)?;
    shard.saw_committed(latest.epoch);
    Ok(())
}

/// Readiness: every partition assigned here (as a healthy voter) is held, undamaged and built
/// to the latest committed epoch.
fn caught_up<TC: Configuration>(
    shard: &LocalShard<TC>,
    map: &ktd_core::ShardMap,
    committed: u64,
) -> Result<(), String> {
    let status_markers: std::collections::BTreeMap<u32, u64> = shard
        .markers()
        .into_iter()
        .map(|marker| (marker.partition, marker.epoch))
        .collect();
    let behind: Vec<String> = map
        .assignments(shard.id())
        .into_iter()
        .filter(|(_, role)| *role == ktd_core::shard_map::Role::Voter)
        .filter_map(|(partition, _)| match status_markers.get(&partition) {
            None if committed == 0 => None,
            None => Some(format!("partition {partition} is not held")),
            Some(built) if *built < committed => {
                Some(format!("partition {partition} is built to epoch {built}"))
            }
            Some(_) => None,
        })
        .collect();
    if behind.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "committed epoch {committed}: {}",
            behind.join(", ")
        ))
    }
}

/// Keeps a shard server's health up to date until `stop` (see the module docs), after the
/// restart check. With no sequencer addresses the shard has nothing to compare with and is
/// SERVING at once.
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
    let mut checked = false;
    loop {
        let check = async {
            let unknown = |error: sequencer::SequencerError| ShardCheck::Unknown(error.to_string());
            let metadata = client.cluster_metadata().await.map_err(unknown)?;
            let latest = client.get_epoch(None).await.map_err(unknown)?;
            let Some(cluster) = metadata.metadata else {
                return Err(ShardCheck::Unknown("the cluster is not initialised".into()));
            };
            let map =
                shard::replicated::shard_map(&cluster, &metadata.shard_map.unwrap_or_default())
                    .map_err(|error| ShardCheck::Unknown(error.to_string()))?;
            if !checked {
                restart_check(&shard, &client, &map, &latest).await?;
                checked = true;
            }
            shard.saw_committed(latest.epoch);
            caught_up(&shard, &map, latest.epoch).map_err(ShardCheck::Behind)?;
            Ok(latest.epoch)
        };
        let check = tokio::time::timeout(PROBE_TIMEOUT * 4, check)
            .await
            .unwrap_or_else(|_| Err(ShardCheck::Unknown("no answer in time".into())));
        match check {
            Ok(epoch) => {
                if serving != Some(true) {
                    set_health(&reporter, &services, ServingStatus::Serving).await;
                    tracing::info!(
                        serving = true,
                        epoch,
                        "health changed: every assigned partition holds the latest committed epoch"
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
        // Until it serves, check often: a starting shard is ready as soon as the cluster is
        // initialised (or the coordinator has caught it up), not a probe period later.
        let period = if serving == Some(true) {
            PROBE_INTERVAL
        } else {
            PROBE_INTERVAL.min(std::time::Duration::from_millis(100))
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
    }
}
