//! Starting each kind of ktd process: a shard server, a gateway, and `ktd dev` (a whole
//! directory in one process). The `ktd` binary parses flags and calls these.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use sequencer::coordinator::{FixedShards, GrpcConnector, ShardConnector};
use sequencer::{Sequencer, SequencerClient, SequencerConfig, pb};
use shard::AkdConfig;
use shard::akd_core::configuration::Configuration;
use shard::api::{ShardApi, ShardMap};
use shard::client::{ClientTimeouts, GrpcPeers};
use shard::cluster::ShardSet;
use shard::config::{Experimental, WhatsAppV1};
use shard::local::{LocalShard, NoPeers, PeerResolver};
use shard::node::ShardNode;
use shard::server::ShardService;
use shard::user::UpdateLimits;
use shard::vrf::VrfKey;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::sequencing::Sequencing;
use crate::service::{Gateway, GatewayOptions};
use crate::tail::{LogSource, precompute_from_log};

/// The shard id of `ktd dev`'s in-process shard.
pub const DEV_SHARD: &str = "dev";

/// A 32-byte VRF seed from a file of 64 hex digits. Refuses files others can read.
pub fn read_vrf_seed(path: &Path) -> anyhow::Result<[u8; 32]> {
    read_secret_file(path, "VRF seed file")
}

/// A 32-byte secret (`what`: "VRF seed file", "signing key file") from a file of 64 hex
/// digits. Refuses files others can read; never logs the contents.
pub fn read_secret_file(path: &Path, what: &str) -> anyhow::Result<[u8; 32]> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::metadata(path).with_context(|| format!("{what} {}", path.display()))?;
    if metadata.permissions().mode() & 0o077 != 0 {
        bail!(
            "{what} {} is readable by others (mode {:o}); chmod 600 it",
            path.display(),
            metadata.permissions().mode() & 0o777
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("read {what} {}", path.display()))?;
    let bytes = hex::decode(text.trim())
        .map_err(|error| anyhow!("{what} {}: not hex ({error})", path.display()))?;
    bytes.try_into().map_err(|bytes: Vec<u8>| {
        anyhow!(
            "{what} {}: expected 32 bytes (64 hex digits), got {}",
            path.display(),
            bytes.len()
        )
    })
}

/// Writes a new random VRF seed to `path` (mode 600, refusing to overwrite); returns it.
pub fn write_new_vrf_seed(path: &Path) -> anyhow::Result<[u8; 32]> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let seed: [u8; 32] = rand::random();
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create VRF seed file {}", path.display()))?;
    writeln!(file, "{}", hex::encode(seed))?;
    file.sync_all()?;
    Ok(seed)
}

/// The VRF public key of a seed.
pub fn vrf_public_key(seed: &[u8; 32]) -> anyhow::Result<[u8; 32]> {
    Ok(VrfKey::from_seed(seed)?.public_key())
}

/// Settings of a shard server.
#[derive(Clone, Debug)]
pub struct ShardSettings {
    /// The shard's id in the shard map.
    pub id: String,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// The directory's VRF seed.
    pub vrf_seed: [u8; 32],
    /// Partition bits of the directory.
    pub partition_bits: u8,
    /// The directory's akd configuration.
    pub config: AkdConfig,
    /// Sequencer addresses to tail the log from (pre-computing VRF labels while an epoch is
    /// open); empty: no pre-computation, labels are evaluated when the epoch is built.
    pub sequencers: Vec<String>,
}

/// How long a shard server's shutdown waits for in-flight requests.
pub const SHARD_DRAIN: Duration = Duration::from_secs(10);

/// A started shard: its API, what flushes its store, and its readiness tracker.
struct OpenShard {
    api: Arc<dyn ShardApi>,
    store: Arc<shard::store::RocksStore>,
    readiness: futures::future::BoxFuture<'static, ()>,
}

/// Runs a shard server on `listener` until `shutdown`: NOT_SERVING until it holds the latest
/// committed epoch ([`crate::readiness`]); on `shutdown`, NOT_SERVING, drain in-flight requests
/// for at most [`SHARD_DRAIN`], then flush the store.
pub async fn run_shard(
    settings: ShardSettings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    settings.config.install()?;
    let stop = tokio_util::sync::CancellationToken::new();
    let _stop_tail = stop.clone().drop_guard();
    let (reporter, health) = tonic_health::server::health_reporter();
    let services = [crate::readiness::SHARD_HEALTH_SERVICE];
    crate::readiness::set_health(&reporter, &services, ServingStatus::NotServing).await;
    let opened = match settings.config {
        AkdConfig::WhatsAppV1 => {
            open_shard::<WhatsAppV1>(&settings, stop.clone(), reporter.clone()).await?
        }
        AkdConfig::Experimental { .. } => {
            open_shard::<Experimental>(&settings, stop.clone(), reporter.clone()).await?
        }
    };
    let readiness = tokio::spawn(opened.readiness);
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(10)));
    let (stop_serving, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(
        proto::security::server_builder(false)?
            .tcp_nodelay(true)
            .layer(proto::telemetry::GrpcServerLayer::new("shard"))
            .layer(proto::security::AuthorizeLayer::new(
                proto::security::shard_policy,
            ))
            .add_service(health)
            .add_service(ShardService::new(opened.api).into_server())
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            }),
    );
    tracing::info!(shard = %settings.id, "shard serving");
    tokio::select! {
        () = shutdown => {}
        result = &mut server => {
            return match result {
                Ok(Ok(())) => Err(anyhow!("the shard's gRPC server stopped unexpectedly")),
                Ok(Err(error)) => Err(anyhow!("the shard's gRPC server failed: {error}")),
                Err(error) => Err(anyhow!("the shard's gRPC server panicked: {error}")),
            };
        }
    }
    tracing::info!(shard = %settings.id, "shard shutting down");
    stop.cancel();
    readiness.abort();
    let _ = readiness.await;
    crate::readiness::set_health(&reporter, &services, ServingStatus::NotServing).await;
    let _ = stop_serving.send(());
    if tokio::time::timeout(SHARD_DRAIN, &mut server)
        .await
        .is_err()
    {
        tracing::warn!(drain = ?SHARD_DRAIN, "in-flight requests did not finish in time; closing them");
        server.abort();
    }
    let store = opened.store;
    tokio::task::spawn_blocking(move || store.flush())
        .await
        .context("flush task")?
        .context("flush the shard's store")?;
    tracing::info!(shard = %settings.id, "shard stopped");
    Ok(())
}

async fn open_shard<TC: Configuration>(
    settings: &ShardSettings,
    stop: tokio_util::sync::CancellationToken,
    reporter: tonic_health::server::HealthReporter,
) -> anyhow::Result<OpenShard> {
    let node = open_node::<TC>(settings, stop.clone()).await?;
    if settings.sequencers.is_empty() {
        tracing::warn!("no --sequencers: VRF labels are evaluated when each epoch is built");
    } else {
        let source = LogSource::Remote {
            client: SequencerClient::new(settings.sequencers.clone()),
            addrs: settings.sequencers.clone(),
        };
        tokio::spawn(precompute_from_log(
            node.clone(),
            settings.id.clone(),
            source,
            stop.clone(),
        ));
    }
    let peers: Arc<dyn PeerResolver> = Arc::new(GrpcPeers::new(ClientTimeouts::default()));
    let store = node.store().clone();
    let shard = Arc::new(LocalShard::new(settings.id.clone(), node, peers));
    let readiness = Box::pin(crate::readiness::track_shard_readiness(
        shard.clone(),
        settings.sequencers.clone(),
        reporter,
        stop,
    ));
    Ok(OpenShard {
        api: shard,
        store,
        readiness,
    })
}

/// Opens the shard's node and samples its storage gauges until `stop`.
async fn open_node<TC: Configuration>(
    settings: &ShardSettings,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<Arc<ShardNode<TC>>> {
    let settings = settings.clone();
    let node = tokio::task::spawn_blocking(move || {
        ShardNode::<TC>::open(
            &settings.data_dir,
            &settings.config,
            settings.partition_bits,
            VrfKey::from_seed(&settings.vrf_seed)?,
            UpdateLimits::default(),
            shard::store::StoreOptions::default(),
        )
    })
    .await??;
    tokio::spawn(shard::metrics::sample_storage(
        Arc::downgrade(node.store()),
        stop.cancelled_owned(),
    ));
    Ok(Arc::new(node))
}

/// Waits until the sequencer cluster has metadata and a shard map.
async fn cluster_metadata(
    sequencing: &dyn Sequencing,
    shutdown: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<pb::ClusterMetadata> {
    let mut logged = false;
    loop {
        match sequencing.cluster_metadata().await {
            Ok(pb::ClusterMetadataResponse {
                metadata: Some(metadata),
                shard_map: Some(map),
            }) if map.version > 0 => return Ok(metadata),
            Ok(_) => {
                if !logged {
                    tracing::info!("waiting for the cluster's metadata and shard map");
                    logged = true;
                }
            }
            Err(error) => {
                if !logged {
                    tracing::info!(%error, "waiting for the sequencer");
                    logged = true;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => bail!("stopped before the cluster was ready"),
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Settings of a gateway.
#[derive(Clone, Debug, Default)]
pub struct GatewaySettings {
    /// Sequencer addresses (`http://host:port`); any member will do, the client follows the leader.
    pub sequencers: Vec<String>,
    /// Limits and timeouts.
    pub options: GatewayOptions,
    /// How long shutdown waits for in-flight requests.
    pub drain: Duration,
}

/// Runs a gateway on `listener` until `shutdown`.
pub async fn run_gateway(
    settings: GatewaySettings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if settings.sequencers.is_empty() {
        bail!("a gateway needs at least one sequencer address (--sequencers)");
    }
    let sequencing: Arc<dyn Sequencing> =
        Arc::new(SequencerClient::new(settings.sequencers.clone()));
    let connector: Arc<dyn ShardConnector> = Arc::new(GrpcConnector::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let shutdown = {
        let stop = stop.clone();
        async move {
            shutdown.await;
            stop.cancel();
        }
    };
    let waiter = tokio::spawn(shutdown);
    let metadata = cluster_metadata(sequencing.as_ref(), &stop).await?;
    let stopped = async move {
        let _ = waiter.await;
    };
    serve_for_config(
        sequencing,
        connector,
        metadata,
        settings.options,
        listener,
        stopped,
        settings.drain,
    )
    .await
}

async fn serve_for_config(
    sequencing: Arc<dyn Sequencing>,
    connector: Arc<dyn ShardConnector>,
    metadata: pb::ClusterMetadata,
    options: GatewayOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    drain: Duration,
) -> anyhow::Result<()> {
    let config: AkdConfig = metadata.akd_configuration.parse()?;
    config.install()?;
    match config {
        AkdConfig::WhatsAppV1 => {
            let gateway = Gateway::<WhatsAppV1>::new(sequencing, connector, metadata, options)?;
            crate::server::serve(gateway, listener, shutdown, drain).await
        }
        AkdConfig::Experimental { .. } => {
            let gateway = Gateway::<Experimental>::new(sequencing, connector, metadata, options)?;
            crate::server::serve(gateway, listener, shutdown, drain).await
        }
    }
}

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
            listener,
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
    let shard: Arc<dyn ShardApi> = Arc::new(LocalShard::new(DEV_SHARD, node, Arc::new(NoPeers)));
    let map = ShardMap::even(
        settings.partition_bits,
        vec![(DEV_SHARD.to_string(), "in-process".to_string())],
    )?;
    Ok(ShardSet::new(map, [(DEV_SHARD.to_string(), shard)].into())?)
}
