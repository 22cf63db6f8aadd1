//! The client's one error type. Its variants separate what a caller must treat differently:
//! the gateway could not be reached or refused the call (retry, or fix the request), the answer
//! was malformed, or a proof **did not verify** — evidence that the directory, or something
//! between it and the caller, is lying. Never retry a [`ClientError::Verification`] silently.

/// Result alias of the client.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Everything a call through [`crate::Client`] can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address is not usable or the connection could not be made.
    #[error("cannot connect to {addr}: {message}")]
    Connect {
        /// The gateway address.
        addr: String,
        /// What went wrong (address parsing, TCP, TLS).
        message: String,
    },
    /// The gateway answered with a gRPC error status (including `UNAVAILABLE` for a connection
    /// lost mid-call and `DEADLINE_EXCEEDED`).
    #[error("{call}: {status}")]
    Refused {
        /// The call, e.g. `Lookup`.
        call: &'static str,
        /// The status, with its code and message.
        status: tonic::Status,
    },
    /// The answer could not be understood: a missing proof, a digest of the wrong length, bytes
    /// that are not the expected protobuf.
    #[error("malformed answer to {call}: {message}")]
    Malformed {
        /// The call.
        call: &'static str,
        /// What was wrong.
        message: String,
    },
    /// A proof did not verify against the root it names: the answer is forged or broken.
    #[error("the {what} does not verify: {reason}")]
    Verification {
        /// Which proof (`lookup proof`, `history proof`, `append-only proof`, ...).
        what: &'static str,
        /// The verifier's reason.
        reason: String,
    },
    /// The directory uses an akd configuration this process cannot use.
    #[error("configuration: {0}")]
    Configuration(#[from] ktd_core::Error),
}

impl ClientError {
    /// For a read of an epoch older than the directory's history retention window
    /// (`OUT_OF_RANGE`): the oldest epoch it still serves (trailer `ktd-oldest-epoch`).
    pub fn oldest_epoch(&self) -> Option<u64> {
        match self {
            Self::Refused { status, .. } if status.code() == tonic::Code::OutOfRange => status
                .metadata()
                .get("ktd-oldest-epoch")
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse().ok()),
            _ => None,
        }
    }

    /// The gRPC code the gateway answered with, for [`ClientError::Refused`].
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Refused { status, .. } => Some(status.code()),
            _ => None,
        }
    }

    /// Whether the gateway answered `NOT_FOUND` (no such version, or no such epoch yet).
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(tonic::Code::NotFound)
    }

    /// Whether a proof failed verification.
    pub fn is_verification_failure(&self) -> bool {
        matches!(self, Self::Verification { .. })
    }

    pub(crate) fn refused(call: &'static str) -> impl FnOnce(tonic::Status) -> Self {
        move |status| Self::Refused { call, status }
    }

    pub(crate) fn malformed(call: &'static str, message: impl Into<String>) -> Self {
        Self::Malformed {
            call,
            message: message.into(),
        }
    }
}
