//! A gateway's health, per capability, as its `grpc.health.v1` service reports it (see
//! [`track_gateway_readiness`]): the process is alive (`""`), publishes work (the sequencer
//! leader answers a linearizable `GetEpoch`: `ktd.v1.Directory`), reads work (and every
//! partition has a live healthy replica: `ktd.v1.Directory.Read`). One shard server down
//! changes none of them; every server of some partition down makes reads NOT_SERVING only. It
//! reports NOT_SERVING on every name first thing on SIGTERM, before it drains.
//!
//! The table of every process's readiness rule is in `docs/operations.md`; the shard server's
//! is `ktd::serve::readiness`, the sequencer's `sequencer::node::readiness`.

use std::sync::Arc;
use std::time::Duration;

use ktd_core::akd_core::configuration::Configuration;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::service::Gateway;

/// How often readiness is re-evaluated.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Bound on one probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Keeps a gateway's health up to date until `stop`, per capability:
///
/// | health name | SERVING while |
/// |---|---|
/// | `""` (the whole server) | the process runs (liveness: never depends on other processes) |
/// | `ktd.v1.Directory` | the sequencer leader answers: publishes work (readiness for traffic) |
/// | `ktd.v1.Directory.Read` | the leader answers and every partition has a live healthy replica |
pub async fn track_gateway_readiness<TC: Configuration>(
    gateway: Arc<Gateway<TC>>,
    reporter: HealthReporter,
    stop: CancellationToken,
) {
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    let mut serving: Option<(bool, bool)> = None;
    loop {
        let publish = tokio::time::timeout(PROBE_TIMEOUT, gateway.publish_readiness())
            .await
            .unwrap_or_else(|_| Err("the probe did not finish in time".into()));
        let read = match &publish {
            Ok(()) => tokio::time::timeout(PROBE_TIMEOUT, gateway.read_readiness())
                .await
                .unwrap_or_else(|_| Err("the probe did not finish in time".into())),
            Err(reason) => Err(reason.clone()),
        };
        if stop.is_cancelled() {
            return;
        }
        let now = (publish.is_ok(), read.is_ok());
        if serving != Some(now) {
            let status = |up: bool| {
                if up {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                }
            };
            reporter
                .set_service_status(crate::server::HEALTH_SERVICE, status(now.0))
                .await;
            reporter
                .set_service_status(crate::server::READ_HEALTH_SERVICE, status(now.1))
                .await;
            tracing::info!(
                publishes = now.0,
                reads = now.1,
                publish_reason = publish.err().unwrap_or_default(),
                read_reason = read.err().unwrap_or_default(),
                "health changed"
            );
            serving = Some(now);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            () = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
    }
}
