//! `ktd shard`: a shard server. It opens its RocksDB store, waits for the cluster's metadata,
//! tails the sequencer's log to pre-compute VRF labels ([`super::tail`]), serves
//! `ktd.shard.v1.Shard`, and reports readiness ([`super::readiness`]).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use ktd_core::AkdConfig;
use ktd_core::akd_core::configuration::Configuration;
use ktd_core::config::{Experimental, WhatsAppV1};
use ktd_core::user::UpdateLimits;
use ktd_core::vrf::VrfKey;
use sequencer::SequencerClient;
use shard::api::ShardApi;
use shard::client::{ClientTimeouts, GrpcPeers};
use shard::local::{LocalShard, PeerResolver};
use shard::node::ShardNode;
use shard::server::ShardService;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;

use crate::serve::tail::{LogSource, precompute_from_log};

/// Settings of a shard server. `Debug` never shows the VRF seed, and dropping the settings
/// zeroes it.
#[derive(Clone)]
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
    /// How long a partition copy moved to other servers keeps serving before it is deleted.
    pub orphan_grace: Duration,
    /// How often history below the cluster's safe epoch is pruned.
    pub prune_interval: Duration,
    /// When lookups' VRF proofs are stored.
    pub lookup_proofs: shard::lookup_proofs::LookupProofs,
    /// The store's tuning (block cache, hot tree levels).
    pub store: shard::store::StoreOptions,
}

impl std::fmt::Debug for ShardSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardSettings")
            .field("id", &self.id)
            .field("data_dir", &self.data_dir)
            .field("vrf_seed", &"<redacted>")
            .field("partition_bits", &self.partition_bits)
            .field("config", &self.config)
            .field("sequencers", &self.sequencers)
            .field("orphan_grace", &self.orphan_grace)
            .field("prune_interval", &self.prune_interval)
            .field("lookup_proofs", &self.lookup_proofs)
            .field("store", &self.store)
            .finish()
    }
}

impl Drop for ShardSettings {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.vrf_seed);
    }
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
/// committed epoch ([`super::readiness`]); on `shutdown`, NOT_SERVING, drain in-flight requests
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
    let services = [super::readiness::SHARD_HEALTH_SERVICE];
    ktd_rpc::health::set_health(&reporter, &services, ServingStatus::NotServing).await;
    let opened = match settings.config {
        AkdConfig::WhatsAppV1 => {
            open_shard::<WhatsAppV1>(&settings, stop.clone(), reporter.clone()).await?
        }
        AkdConfig::Experimental { .. } => {
            open_shard::<Experimental>(&settings, stop.clone(), reporter.clone()).await?
        }
    };
    let readiness = tokio::spawn(opened.readiness);
    let incoming = ktd_rpc::limits::incoming(
        listener,
        "shard",
        ktd_rpc::limits::ConnectionLimits::default(),
    );
    let (stop_serving, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(
        ktd_rpc::limits::bounded(ktd_rpc::security::server_builder(false)?)
            .tcp_nodelay(true)
            .layer(ktd_rpc::telemetry::GrpcServerLayer::new("shard"))
            .layer(ktd_rpc::security::AuthorizeLayer::new(
                ktd_rpc::security::shard_policy,
            ))
            .layer(ktd_rpc::limits::RequestLimitLayer::large_in_flight(
                shard::server::request_limits,
                16,
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
    ktd_rpc::health::set_health(&reporter, &services, ServingStatus::NotServing).await;
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
    let id = settings.id.clone();
    let grace = settings.orphan_grace;
    let shard = Arc::new(
        tokio::task::spawn_blocking(move || {
            LocalShard::load(id, node, peers).map(|shard| shard.with_orphan_grace(grace))
        })
        .await??,
    );
    tokio::spawn(drop_orphans(shard.clone(), stop.clone()));
    tokio::spawn(prune(shard.clone(), settings.prune_interval, stop.clone()));
    let readiness = Box::pin(super::readiness::track_shard_readiness(
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

/// Deletes the partition copies the shard map moved away once their grace period is over,
/// checking a few times per grace period (at most every 10 s), until `stop`.
async fn drop_orphans<TC: Configuration>(
    shard: Arc<LocalShard<TC>>,
    stop: tokio_util::sync::CancellationToken,
) {
    let every =
        (shard.orphan_grace() / 4).clamp(Duration::from_millis(100), Duration::from_secs(10));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        if let Err(error) = shard.drop_orphans(shard.orphan_grace()).await {
            tracing::warn!(%error, "deleting moved-away partitions failed; retrying");
        }
    }
}

/// Prunes the history the cluster's retention window let go of every `every`, until `stop`
/// (`LocalShard::prune`: off the commit path, on blocking threads).
pub(crate) async fn prune<TC: Configuration>(
    shard: Arc<LocalShard<TC>>,
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let every = every.max(Duration::from_millis(100));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let started = std::time::Instant::now();
        match shard.prune().await {
            Ok(report) => {
                metrics::histogram!("ktd_shard_prune_duration_seconds")
                    .record(started.elapsed().as_secs_f64());
                if report.node_versions > 0 {
                    tracing::info!(
                        floor = report.floor,
                        node_versions = report.node_versions,
                        compacted = report.compacted,
                        seconds = started.elapsed().as_secs_f64(),
                        "pruned tree history below the safe epoch"
                    );
                }
            }
            Err(error) => tracing::warn!(%error, "pruning failed; retrying"),
        }
    }
}

/// Opens the shard's node and samples its storage gauges until `stop`.
pub(crate) async fn open_node<TC: Configuration>(
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
            settings.store,
        )
        .map(|node| node.with_lookup_proofs(settings.lookup_proofs))
    })
    .await??;
    tokio::spawn(shard::metrics::sample_storage(
        Arc::downgrade(node.store()),
        stop.cancelled_owned(),
    ));
    Ok(Arc::new(node))
}
