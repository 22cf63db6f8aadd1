//! `ktd gateway`: the public API process. It waits for the cluster's metadata, then serves
//! [`gateway::service::Gateway`] (with its readiness probe) until shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use ktd_core::AkdConfig;
use ktd_core::config::{Experimental, WhatsAppV1};
use sequencer::{SequencerClient, pb};
use shard::cluster::{GrpcConnector, ShardConnector};
use tokio::net::TcpListener;

use gateway::sequencing::Sequencing;
use gateway::service::{Gateway, GatewayOptions};

use crate::serve::cluster_metadata;

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

/// Runs a gateway on `listener` (its Admin service on `admin_listener` if given: the
/// `--admin-listen` port, bound and checked like every listener by the caller) until
/// `shutdown`.
pub async fn run_gateway(
    settings: GatewaySettings,
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
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
        (listener, admin_listener),
        stopped,
        settings.drain,
    )
    .await
}

pub(crate) async fn serve_for_config(
    sequencing: Arc<dyn Sequencing>,
    connector: Arc<dyn ShardConnector>,
    metadata: pb::ClusterMetadata,
    options: GatewayOptions,
    (listener, admin_listener): (TcpListener, Option<TcpListener>),
    shutdown: impl Future<Output = ()> + Send,
    drain: Duration,
) -> anyhow::Result<()> {
    let config: AkdConfig = metadata.akd_configuration.parse()?;
    config.install()?;
    let blob_listener = match &options.blob_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("bind the audit blob port {addr} (--blob-listen)"))?,
        ),
        None => None,
    };
    match config {
        AkdConfig::WhatsAppV1 => {
            let gateway = Gateway::<WhatsAppV1>::new(sequencing, connector, metadata, options)?;
            serve_with_blobs(
                gateway,
                listener,
                admin_listener,
                blob_listener,
                shutdown,
                drain,
            )
            .await
        }
        AkdConfig::Experimental { .. } => {
            let gateway = Gateway::<Experimental>::new(sequencing, connector, metadata, options)?;
            serve_with_blobs(
                gateway,
                listener,
                admin_listener,
                blob_listener,
                shutdown,
                drain,
            )
            .await
        }
    }
}

/// Serves `gateway`, and its audit blobs over HTTP on `blob_listener` if given, until
/// `shutdown`.
async fn serve_with_blobs<TC: ktd_core::akd_core::configuration::Configuration>(
    gateway: Arc<Gateway<TC>>,
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
    blob_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
    drain: Duration,
) -> anyhow::Result<()> {
    let stop = tokio_util::sync::CancellationToken::new();
    let blobs = match blob_listener {
        Some(blob_listener) => {
            tracing::info!(
                addr = ?blob_listener.local_addr().ok(),
                "serving audit blobs over HTTP (S3 ListObjectsV2 layout)"
            );
            let stopped = stop.clone().cancelled_owned();
            Some(tokio::spawn(
                axum::serve(blob_listener, gateway::blob_http::router(gateway.clone()))
                    .with_graceful_shutdown(stopped)
                    .into_future(),
            ))
        }
        None => None,
    };
    let served = gateway::server::serve(gateway, listener, admin_listener, shutdown, drain).await;
    stop.cancel();
    if let Some(blobs) = blobs {
        blobs.await??;
    }
    served
}
