//! A gateway's readiness — "caught up", not just "process alive" — as its `grpc.health.v1`
//! service reports it: SERVING (for `""` and `ktd.v1.Directory`) while its last probe, every
//! second, reached the sequencer leader (a linearizable `GetEpoch`) and every shard in the
//! shard map. It reports NOT_SERVING first thing on SIGTERM, before it drains.
//!
//! The table of every process's readiness rule is in `docs/operations.md`; the shard server's
//! is `ktd::serve::readiness`, the sequencer's `sequencer::node::readiness`.

use std::sync::Arc;
use std::time::Duration;

use ktd_core::akd_core::configuration::Configuration;
use ktd_rpc::health::set_health;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::service::Gateway;

/// How often readiness is re-evaluated.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Bound on one probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Keeps a gateway's health up to date until `stop`: SERVING while its last probe reached the
/// sequencer leader and every shard ([`Gateway::readiness`]).
pub async fn track_gateway_readiness<TC: Configuration>(
    gateway: Arc<Gateway<TC>>,
    reporter: HealthReporter,
    services: Vec<&'static str>,
    stop: CancellationToken,
) {
    let mut serving: Option<bool> = None;
    loop {
        let probe = tokio::time::timeout(PROBE_TIMEOUT, gateway.readiness())
            .await
            .unwrap_or_else(|_| Err("the probe did not finish in time".into()));
        if stop.is_cancelled() {
            return;
        }
        let now = probe.is_ok();
        if serving != Some(now) {
            let status = if now {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            set_health(&reporter, &services, status).await;
            match probe {
                Ok(()) => tracing::info!(serving = now, "health changed"),
                Err(reason) => tracing::info!(serving = now, %reason, "health changed"),
            }
            serving = Some(now);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            () = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
    }
}
