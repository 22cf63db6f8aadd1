//! `ktd dev`: a complete directory in one process — a one-node sequencer, one in-process shard
//! owning every partition (tailing the in-process log), the epoch coordinator and the public
//! gateway — with a generated VRF seed kept in its data directory.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use ktd_core::AkdConfig;
use ktd_core::ShardMap;
use ktd_core::akd_core::configuration::Configuration;
use ktd_core::config::{Experimental, WhatsAppV1};
use sequencer::{Sequencer, SequencerConfig};
use shard::api::ShardApi;
use shard::cluster::ShardSet;
use shard::cluster::{FixedShards, ShardConnector};
use shard::local::{LocalShard, NoPeers};
use tokio::net::TcpListener;

use gateway::sequencing::Sequencing;
use gateway::service::GatewayOptions;

use crate::seed_file::{read_vrf_seed, vrf_public_key, write_new_vrf_seed};
use crate::serve::gateway_server::serve_for_config;
use crate::serve::shard_server::{ShardSettings, open_node};
use crate::serve::tail::{LogSource, precompute_from_log};
use crate::serve::{DEV_SHARD, cluster_metadata};

/// Settings of `ktd dev`.
#[derive(Clone, Debug)]
pub struct DevSettings {
    /// Data directory (sequencer, shard and, by default, the VRF seed live under it).
    pub data_dir: PathBuf,
    /// The VRF seed file (created if missing).
    pub vrf_seed_file: Option<PathBuf>,
    /// Seal a non-empty open epoch this often.
    pub epoch_interval: Duration,
    /// Seal an empty (heartbeat) epoch after this long without updates.
    pub heartbeat_interval: Option<Duration>,
    /// Partition bits.
    pub partition_bits: u8,
    /// akd configuration.
    pub config: AkdConfig,
    /// When lookups' VRF proofs are stored.
    pub lookup_proofs: shard::lookup_proofs::LookupProofs,
    /// The shard store's tuning (block cache, hot tree levels).
    pub store: shard::store::StoreOptions,
    /// Gateway limits.
    pub options: GatewayOptions,
}

/// Runs a complete directory in this process on `listener`: a one-node sequencer with its
/// coordinator, one in-process shard owning every partition, and the gateway. `ready` gets the
/// address once it serves.
pub async fn run_dev(
    settings: DevSettings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    ready: impl FnOnce(std::net::SocketAddr) + Send,
) -> anyhow::Result<()> {
    settings.config.install()?;
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("create data dir {}", settings.data_dir.display()))?;
    let seed_file = settings
        .vrf_seed_file
        .clone()
        .unwrap_or_else(|| settings.data_dir.join("vrf-seed.hex"));
    let seed = if seed_file.exists() {
        read_vrf_seed(&seed_file)?
    } else {
        tracing::info!(file = %seed_file.display(), "generating a VRF seed");
        write_new_vrf_seed(&seed_file)?
    };
    let public_key = vrf_public_key(&seed)?;
    let addr = listener.local_addr()?;

    let mut config = SequencerConfig {
        id: Some(1),
        listen: addr.to_string(),
        data_dir: settings.data_dir.join("sequencer"),
        peers: vec![format!("1={addr}")],
        init: true,
        ..SequencerConfig::default()
    };
    config.cluster.partition_bits = u32::from(settings.partition_bits);
    config.cluster.akd_configuration = settings.config.to_string();
    config.cluster.vrf_public_key = hex::encode(public_key);
    config.cluster.shards = vec![format!("{DEV_SHARD}=in-process")];
    config.epoch.interval = settings.epoch_interval;
    config.epoch.heartbeat_interval = settings.heartbeat_interval;
    let sequencer = Sequencer::start(config)
        .await
        .context("start the sequencer")?;
    let result = async {
        let stop = sequencer.shutdown_token();
        let metadata = cluster_metadata(&sequencer, &stop).await?;
        if metadata.partition_bits != u32::from(settings.partition_bits)
            || metadata.akd_configuration != settings.config.to_string()
            || metadata.vrf_public_key != public_key
        {
            bail!(
                "{} holds a directory with {} partition bits, configuration {} and another or the same VRF key; \
                 start with matching flags or another --data-dir",
                settings.data_dir.display(),
                metadata.partition_bits,
                metadata.akd_configuration
            );
        }
        let shard_settings = ShardSettings {
            id: DEV_SHARD.into(),
            data_dir: settings.data_dir.join("shard"),
            vrf_seed: seed,
            partition_bits: settings.partition_bits,
            config: settings.config.clone(),
            sequencers: Vec::new(),
            orphan_grace: shard::local::DEFAULT_ORPHAN_GRACE,
            prune_interval: shard::local::DEFAULT_PRUNE_INTERVAL,
            lookup_proofs: settings.lookup_proofs,
            store: settings.store,
        };
        let shards = match settings.config {
            AkdConfig::WhatsAppV1 => dev_shards::<WhatsAppV1>(&shard_settings, &sequencer).await?,
            AkdConfig::Experimental { .. } => {
                dev_shards::<Experimental>(&shard_settings, &sequencer).await?
            }
        };
        let connector: Arc<dyn ShardConnector> = Arc::new(FixedShards(shards));
        sequencer.spawn_coordinator(connector.clone());
        {
            // `ktd sequencer` exports its gauges from its health loop; here nobody serves the
            // sequencer, so a small loop does it.
            let sequencer = sequencer.clone();
            let stop = sequencer.shutdown_token();
            tokio::spawn(async move {
                loop {
                    sequencer.export_metrics();
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            });
        }
        ready(addr);
        let sequencing: Arc<dyn Sequencing> = Arc::new(sequencer.clone());
        serve_for_config(
            sequencing,
            connector,
            metadata,
            settings.options.clone(),
            (listener, None),
            shutdown,
            Duration::from_secs(5),
        )
        .await
    }
    .await;
    sequencer.shutdown().await.context("stop the sequencer")?;
    result
}

async fn dev_shards<TC: Configuration>(
    settings: &ShardSettings,
    sequencer: &Sequencer,
) -> anyhow::Result<ShardSet> {
    let node = open_node::<TC>(settings, sequencer.shutdown_token()).await?;
    tokio::spawn(precompute_from_log(
        node.clone(),
        DEV_SHARD.to_string(),
        LogSource::Local(sequencer.clone()),
        sequencer.shutdown_token(),
    ));
    let shard = Arc::new(
        tokio::task::spawn_blocking(move || LocalShard::load(DEV_SHARD, node, Arc::new(NoPeers)))
            .await??,
    );
    super::readiness::check_in_process(&shard, sequencer).await?;
    tokio::spawn(super::shard_server::prune(
        shard.clone(),
        settings.prune_interval,
        sequencer.shutdown_token(),
    ));
    let shard: Arc<dyn ShardApi> = shard;
    let map = ShardMap::even(
        settings.partition_bits,
        1,
        vec![(DEV_SHARD.to_string(), "in-process".to_string())],
    )?;
    Ok(ShardSet::new(map, [(DEV_SHARD.to_string(), shard)].into())?)
}
