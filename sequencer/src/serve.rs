//! Serving a node: one gRPC listener for the Raft transport, the data and admin APIs, and
//! `grpc.health.v1`; and the shutdown sequence.
//!
//! Health is SERVING while the node is initialised, knows a leader, and has applied to within
//! `raft.max_apply_lag` of the commit index the leader reported (`node::readiness`). On
//! shutdown: health goes NOT_SERVING, a leader hands leadership to the most caught-up voter and
//! waits until another node leads (bounded), background tasks and WatchLog streams end, the
//! server stops accepting and drains in-flight requests (bounded), Raft stops and the WAL is
//! synced.

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::admin::AdminService;
use crate::api::ApiService;
use crate::config::SequencerConfig;
use crate::error::{Result, SequencerError};
use crate::node::Sequencer;
use crate::raft::server::RaftService;

/// The health service name of the data API (`""` is the whole server).
pub const HEALTH_SERVICE: &str = <ktd_proto::ktd::sequencer::v1::sequencer_server::SequencerServer<
    ApiService,
> as NamedService>::NAME;

/// Starts a node from `config` (with its epoch coordinator, reaching shards over gRPC) and
/// serves it on `listener` until `shutdown` completes; then shuts down gracefully. Returns once the node has stopped.
pub async fn run(
    config: SequencerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let sequencer = Sequencer::start(config).await?;
    sequencer.spawn_coordinator(std::sync::Arc::new(shard::cluster::GrpcConnector::default()));
    serve(sequencer, listener, shutdown).await
}

/// Request bytes per method (`ktd_rpc::limits`): Raft streams are bounded per message by the
/// transport (`raft::network::MAX_MESSAGE_BYTES`), an `Append` by
/// [`crate::api::MAX_REQUEST_BYTES`], admin calls (a shard map) by 1 MiB, every read by 64 KiB.
pub fn request_limits(path: &str) -> usize {
    const FRAME: usize = 5;
    if path.starts_with("/ktd.raft.v1.Raft/") {
        usize::MAX
    } else if path == "/ktd.sequencer.v1.Sequencer/Append" {
        crate::api::MAX_REQUEST_BYTES + FRAME
    } else if path.starts_with("/ktd.sequencer.v1.SequencerAdmin/") {
        (1 << 20) + FRAME
    } else {
        (64 << 10) + FRAME
    }
}

async fn set_health(reporter: &HealthReporter, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    ktd_rpc::health::set_health(reporter, &[HEALTH_SERVICE], status).await;
}

async fn track_health(
    sequencer: Sequencer,
    reporter: HealthReporter,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut metrics = sequencer.raft_metrics();
    let mut serving = None;
    loop {
        sequencer.export_metrics();
        let readiness = sequencer.readiness();
        let now = readiness.is_ok();
        if serving != Some(now) {
            set_health(&reporter, now).await;
            match readiness {
                Ok(()) => tracing::info!(serving = now, "health changed"),
                Err(reason) => tracing::info!(serving = now, %reason, "health changed"),
            }
            serving = Some(now);
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Serves a started node on `listener` until `shutdown` completes (see the module docs).
pub async fn serve(
    sequencer: Sequencer,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let local_addr = listener.local_addr().ok();
    let (reporter, health_service) = tonic_health::server::health_reporter();
    set_health(&reporter, false).await;
    // Stopped (and awaited) before shutdown reports NOT_SERVING, so it cannot flip health back
    // while a leader hands over.
    let stop_health = tokio_util::sync::CancellationToken::new();
    let health_tracker = tokio::spawn(track_health(
        sequencer.clone(),
        reporter.clone(),
        stop_health.clone(),
    ));

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let incoming = ktd_rpc::limits::incoming(
        listener,
        "sequencer",
        ktd_rpc::limits::ConnectionLimits::default(),
    );
    let router = ktd_rpc::limits::bounded(
        ktd_rpc::security::server_builder(false)
            .map_err(|error| SequencerError::InvalidConfig(error.to_string()))?,
    )
    .tcp_nodelay(true)
    .layer(ktd_rpc::telemetry::GrpcServerLayer::new("sequencer"))
    .layer(ktd_rpc::security::AuthorizeLayer::new(
        ktd_rpc::security::sequencer_policy,
    ))
    .layer(ktd_rpc::limits::RequestLimitLayer::large_in_flight(
        request_limits,
        64,
    ))
    .http2_keepalive_interval(Some(Duration::from_secs(2)))
    .http2_keepalive_timeout(Some(Duration::from_secs(5)))
    .add_service(health_service)
    .add_service(
        RaftService::new(
            sequencer.raft().clone(),
            sequencer.storage().clone(),
            sequencer.shutdown_token(),
        )
        .with_snapshot_limits(
            sequencer.config().raft.snapshot_limits(),
            sequencer.config().raft.snapshot_min_timeout,
        )
        .into_server(),
    )
    .add_service(ApiService::new(&sequencer).into_server())
    .add_service(AdminService::new(&sequencer).into_server());
    let mut server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = stopped.await;
    }));
    tracing::info!(node_id = sequencer.id(), addr = ?local_addr, "serving");

    let server_failure = tokio::select! {
        () = shutdown => None,
        result = &mut server => Some(match result {
            Ok(Ok(())) => SequencerError::Raft("the gRPC server stopped unexpectedly".into()),
            Ok(Err(error)) => SequencerError::Raft(format!("the gRPC server failed: {error}")),
            Err(error) => SequencerError::Raft(format!("the gRPC server panicked: {error}")),
        }),
    };
    tracing::info!(node_id = sequencer.id(), "shutting down");
    stop_health.cancel();
    let _ = health_tracker.await;
    set_health(&reporter, false).await;
    sequencer.step_down().await;
    let _ = stop.send(());
    if server_failure.is_none() {
        let drain = sequencer.config().shutdown.drain_timeout;
        if tokio::time::timeout(drain, &mut server).await.is_err() {
            tracing::warn!(
                ?drain,
                "in-flight requests did not finish in time; closing them"
            );
            server.abort();
        }
    }
    sequencer.shutdown().await?;
    match server_failure {
        Some(error) => Err(error),
        None => Ok(()),
    }
}
