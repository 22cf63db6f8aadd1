//! The gateway's errors and the one place they become gRPC status codes.

use sequencer::SequencerError;
use tonic::{Code, Status};

/// Result of a gateway operation.
pub type Result<T, E = GatewayError> = std::result::Result<T, E>;

/// Why a gateway request failed.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The request itself is wrong (empty label, oversized value, start > end, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// The epoch is not committed (yet).
    #[error("epoch {epoch} is not committed; the latest committed epoch is {latest}")]
    EpochNotCommitted {
        /// The requested epoch.
        epoch: u64,
        /// The latest committed epoch.
        latest: u64,
    },
    /// The epoch is older than the history retention window (checked against the safe epoch
    /// this gateway last read with the shard map; shards check again).
    #[error(
        "epoch {epoch} is no longer retained (history retention); the oldest readable epoch is {oldest}"
    )]
    EpochPruned {
        /// The requested epoch.
        epoch: u64,
        /// The oldest readable epoch.
        oldest: u64,
    },
    /// Too many requests are in flight at this gateway.
    #[error("the gateway is overloaded ({in_flight} requests in flight); retry with backoff")]
    Overloaded {
        /// The configured limit.
        in_flight: usize,
    },
    /// The request's deadline passed.
    #[error("deadline exceeded after {0:?}")]
    DeadlineExceeded(std::time::Duration),
    /// Nothing to seal.
    #[error("the open epoch has no updates; nothing to seal")]
    NothingToSeal,
    /// The sequencer answered with an error (or could not be reached).
    #[error("sequencer: {0}")]
    Sequencer(#[from] SequencerError),
    /// A shard answered with an error (or could not be reached), or a proof could not be built.
    #[error("{0}")]
    Shard(#[from] shard::Error),
    /// The gateway's own work failed (a blocking task panicked or was cancelled).
    #[error("internal: {0}")]
    Internal(String),
    /// The caller already has its maximum of waiting requests.
    #[error(
        "{what}: this caller already has {max} requests waiting, the most one caller may have; \
         retry when one has finished"
    )]
    TooManyWaits {
        /// The kind of request refused.
        what: &'static str,
        /// The limit.
        max: usize,
    },
    /// The caller spent its budget of expensive reads.
    #[error(
        "{what}: this caller's budget of expensive reads is spent; retry in {} ms",
        retry_after.as_millis()
    )]
    RateLimited {
        /// The kind of request refused.
        what: &'static str,
        /// When the caller's budget allows it again.
        retry_after: std::time::Duration,
    },
}

impl From<GatewayError> for Status {
    fn from(error: GatewayError) -> Self {
        let message = error.to_string();
        match error {
            GatewayError::InvalidArgument(_) => Status::invalid_argument(message),
            GatewayError::EpochNotCommitted { latest, .. } => {
                let mut status = Status::not_found(message);
                status
                    .metadata_mut()
                    .insert(LATEST_EPOCH_METADATA, latest.into());
                status
            }
            GatewayError::EpochPruned { epoch, oldest } => {
                Status::from(shard::Error::Core(ktd_core::Error::EpochPruned {
                    epoch,
                    oldest,
                }))
            }
            GatewayError::Overloaded { .. } => Status::resource_exhausted(message),
            GatewayError::DeadlineExceeded(_) => Status::deadline_exceeded(message),
            GatewayError::NothingToSeal => Status::failed_precondition(message),
            GatewayError::Internal(_) => Status::internal(message),
            GatewayError::TooManyWaits { .. } => Status::resource_exhausted(message),
            GatewayError::RateLimited { retry_after, .. } => {
                let mut status = Status::resource_exhausted(message);
                let millis = u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX);
                status
                    .metadata_mut()
                    .insert(RETRY_AFTER_MS_METADATA, millis.into());
                status
            }
            GatewayError::Sequencer(error) => Status::new(error.code(), message),
            GatewayError::Shard(
                error @ shard::Error::Core(
                    ktd_core::Error::LabelExists { .. } | ktd_core::Error::EmptyDirectory { .. },
                ),
            ) => Status::failed_precondition(error.to_string()),
            GatewayError::Shard(error) => {
                let status = Status::from(error);
                match status.code() {
                    // Internal shard-to-shard failures are the gateway's problem, not the
                    // client's argument: report them as retryable.
                    Code::FailedPrecondition | Code::Aborted => {
                        Status::unavailable(status.message())
                    }
                    _ => status,
                }
            }
        }
    }
}

/// Trailer on rate-limited (`RESOURCE_EXHAUSTED`) answers: milliseconds until the caller's
/// budget allows the request again.
pub const RETRY_AFTER_MS_METADATA: &str = "ktd-retry-after-ms";

/// Trailer on `NOT_FOUND` answers for uncommitted epochs: the latest committed epoch.
pub const LATEST_EPOCH_METADATA: &str = "ktd-latest-epoch";
