//! Serving a gateway: `ktd.v1.Directory`, `ktd.v1.Admin`, `grpc.health.v1` and server
//! reflection on one listener, with `TCP_NODELAY` on every accepted socket. Health is per
//! capability ([`crate::readiness`]); NOT_SERVING first thing on shutdown, then in-flight
//! requests drain.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ktd_core::akd_core::configuration::Configuration;
use ktd_proto::ktd::v1 as api;
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic_health::ServingStatus;

use crate::service::{AdminService, DirectoryService, Gateway};

/// Largest answer (history and audit proofs of busy labels can be large).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Largest `Publish`: whatever the gateway accepts fits the sequencer's `Append` limit
/// (`sequencer::api::MAX_REQUEST_BYTES`) once re-encoded with the scoped idempotency key.
pub const MAX_PUBLISH_BYTES: usize = sequencer::api::MAX_REQUEST_BYTES - (64 << 10);

/// Largest request of every other method (a label, an epoch range, a blob name).
pub const MAX_READ_REQUEST_BYTES: usize = 64 << 10;

/// Request bytes per method (`ktd_rpc::limits`): publishes up to [`MAX_PUBLISH_BYTES`], every
/// read and admin call up to [`MAX_READ_REQUEST_BYTES`] (plus the 5-byte gRPC frame header).
pub fn request_limits(path: &str) -> usize {
    5 + match path {
        "/ktd.v1.Directory/Publish" => MAX_PUBLISH_BYTES,
        _ => MAX_READ_REQUEST_BYTES,
    }
}

/// The health service name of the public API: SERVING while publishes work (`""` is the whole
/// server: SERVING while it runs).
pub const HEALTH_SERVICE: &str = <api::directory_server::DirectoryServer<
    DirectoryService<ktd_core::config::WhatsAppV1>,
> as NamedService>::NAME;

/// The health service name of reads: SERVING while every partition has a live healthy replica.
pub const READ_HEALTH_SERVICE: &str = "ktd.v1.Directory.Read";

/// Serves `gateway` on `listener` (and its Admin service on `admin_listener` if given, the
/// `--admin-listen` port the caller bound and checked) until `shutdown`; then reports
/// NOT_SERVING and drains in-flight requests for at most `drain`. Health follows the gateway's
/// capabilities meanwhile.
pub async fn serve<TC: Configuration>(
    gateway: Arc<Gateway<TC>>,
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
    drain: Duration,
) -> anyhow::Result<()> {
    let local_addr = listener.local_addr()?;
    let (reporter, health) = tonic_health::server::health_reporter();
    let services = [HEALTH_SERVICE, READ_HEALTH_SERVICE];
    ktd_rpc::health::set_health(&reporter, &services, ServingStatus::NotServing).await;
    let stop_probe = tokio_util::sync::CancellationToken::new();
    let probe = tokio::spawn(crate::readiness::track_gateway_readiness(
        gateway.clone(),
        reporter.clone(),
        stop_probe.clone(),
    ));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ktd_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let directory = api::directory_server::DirectoryServer::new(DirectoryService(gateway.clone()))
        .max_decoding_message_size(MAX_PUBLISH_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let admin = api::admin_server::AdminServer::new(AdminService(gateway.clone()));
    // The admin service on its own port (with TLS: admin certificates only), or, without
    // --admin-listen, beside the public API.
    let incoming = ktd_rpc::limits::incoming(
        listener,
        "gateway",
        ktd_rpc::limits::ConnectionLimits::default(),
    );
    let (stop, _) = tokio::sync::watch::channel(false);
    let stopped_signal = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let public = ktd_rpc::limits::bounded(ktd_rpc::security::server_builder(
        gateway.options().tls_client_auth_optional,
    )?)
    .tcp_nodelay(true)
    .layer(ktd_rpc::telemetry::GrpcServerLayer::new("gateway"))
    .layer(ktd_rpc::security::AuthorizeLayer::new(
        ktd_rpc::security::gateway_policy,
    ))
    .layer(ktd_rpc::limits::RequestLimitLayer::new(request_limits))
    .add_service(health.clone())
    .add_service(reflection)
    .add_service(directory);
    let (public, admin_server) = match admin_listener {
        None => (public.add_service(admin), None),
        Some(admin_listener) => {
            tracing::info!(addr = %admin_listener.local_addr()?, "gateway admin port serving");
            let incoming = ktd_rpc::limits::incoming(
                admin_listener,
                "gateway-admin",
                ktd_rpc::limits::ConnectionLimits::default(),
            );
            let admin_server = ktd_rpc::limits::bounded(ktd_rpc::security::server_builder(false)?)
                .tcp_nodelay(true)
                .layer(ktd_rpc::telemetry::GrpcServerLayer::new("gateway"))
                .layer(ktd_rpc::security::AuthorizeLayer::new(
                    ktd_rpc::security::gateway_policy,
                ))
                .layer(ktd_rpc::limits::RequestLimitLayer::new(request_limits))
                .add_service(health)
                .add_service(admin)
                .serve_with_incoming_shutdown(incoming, stopped_signal(stop.subscribe()));
            (public, Some(tokio::spawn(admin_server)))
        }
    };
    let mut server = tokio::spawn(
        public.serve_with_incoming_shutdown(incoming, stopped_signal(stop.subscribe())),
    );
    tracing::info!(addr = %local_addr, "gateway serving");
    tokio::select! {
        () = shutdown => {}
        result = &mut server => {
            probe.abort();
            return match result {
                Ok(Ok(())) => Err(anyhow::anyhow!("the gateway's gRPC server stopped unexpectedly")),
                Ok(Err(error)) => Err(anyhow::anyhow!("the gateway's gRPC server failed: {error}")),
                Err(error) => Err(anyhow::anyhow!("the gateway's gRPC server panicked: {error}")),
            };
        }
    }
    tracing::info!("gateway shutting down");
    stop_probe.cancel();
    probe.abort();
    let _ = probe.await;
    ktd_rpc::health::set_health(&reporter, &services, ServingStatus::NotServing).await;
    let _ = stop.send(true);
    if tokio::time::timeout(drain, &mut server).await.is_err() {
        tracing::warn!(
            ?drain,
            "in-flight requests did not finish in time; closing them"
        );
        server.abort();
    }
    if let Some(mut admin_server) = admin_server
        && tokio::time::timeout(drain, &mut admin_server)
            .await
            .is_err()
    {
        admin_server.abort();
    }
    Ok(())
}
