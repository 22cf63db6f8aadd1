//! `grpc.health.v1` plumbing every server shares.

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Sets `status` for the whole server (`""`) and every name in `services`.
pub async fn set_health(reporter: &HealthReporter, services: &[&str], status: ServingStatus) {
    reporter.set_service_status("", status).await;
    for service in services {
        reporter.set_service_status(*service, status).await;
    }
}
