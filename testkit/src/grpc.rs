//! gRPC answers as tests look at them: the status code of a result, and the standard health
//! service (`grpc.health.v1`) of a server.

use std::time::Duration;

use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::poll::Poll;

/// The code of a failed call; `None` for a success.
pub fn code<T>(result: &Result<T, tonic::Status>) -> Option<Code> {
    result.as_ref().err().map(tonic::Status::code)
}

/// How long one health check may take to connect, and to answer.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// The status of health service `service` (`""`: the whole server) of the plaintext server at
/// `addr` (`ip:port`); an error says why there is none.
pub async fn health(addr: &str, service: &str) -> Result<ServingStatus, String> {
    let check = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|error| error.to_string())?
            .connect_timeout(HEALTH_TIMEOUT)
            .timeout(HEALTH_TIMEOUT)
            .connect()
            .await
            .map_err(|error| error.to_string())?;
        let answer = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .map_err(|status| status.to_string())?;
        Ok(answer.into_inner().status())
    };
    tokio::time::timeout(2 * HEALTH_TIMEOUT, check)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:?}", 2 * HEALTH_TIMEOUT)))
}

/// Waits (up to 30 s) until the whole server at `addr` reports `wanted`; `what` names it in
/// the failure.
pub async fn wait_health(addr: &str, wanted: ServingStatus, what: &str) {
    Poll::new(
        format!("{what}: {addr} to be {wanted:?}"),
        Duration::from_secs(30),
    )
    .until_ok(|| async {
        match health(addr, "").await {
            Ok(status) if status == wanted => Ok(()),
            Ok(status) => Err(format!("{status:?}")),
            Err(error) => Err(error),
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_code_of_a_result() {
        assert_eq!(code(&Ok::<(), _>(())), None);
        assert_eq!(
            code(&Err::<(), _>(tonic::Status::not_found("x"))),
            Some(Code::NotFound)
        );
    }
}
