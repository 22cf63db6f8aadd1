//! The shard crate's one error type: the core's errors (tree math, proofs, VRF, storage reached
//! through `TreeStore`) plus what only a shard server can hit — an unusable data directory, a
//! missing leaf delivery, and answers from other processes.
//!
//! [`crate::server`] maps every variant to a gRPC code in one place. Labels are never printed raw
//! (they identify users): errors carry a [`LabelTag`].

pub use ktd_core::error::LabelTag;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong on a shard server and in the in-process directory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error of the tree math, proofs, VRF, configuration or store.
    #[error(transparent)]
    Core(#[from] ktd_core::Error),
    /// The data directory belongs to another directory, configuration or program.
    #[error("data directory {path} is not usable: {reason}")]
    IncompatibleDataDir {
        /// The directory.
        path: String,
        /// What did not match.
        reason: String,
    },
    /// Another process answered with an error (a remote shard, over gRPC).
    #[error("{peer} answered {code:?}: {message}")]
    Remote {
        /// Which peer.
        peer: String,
        /// Its gRPC status code.
        code: tonic::Code,
        /// Its message.
        message: String,
    },
    /// A mutation the shard's fence refuses (a deposed coordinator, an epoch that is final, a
    /// map or partition the request is not entitled to): nothing was changed.
    #[error("refused by the fence: {reason}")]
    Fenced {
        /// What the fence refused.
        reason: String,
    },
    /// This server cannot serve a partition at the epoch asked (not held, not built that far,
    /// quarantined, or its stored root disagrees with the committed one): another replica can.
    #[error("partition {partition} is not readable here at epoch {epoch}: {reason}")]
    NotServing {
        /// The partition.
        partition: u32,
        /// The epoch asked for.
        epoch: u64,
        /// Why.
        reason: String,
    },
    /// A message from another process could not be understood.
    #[error("malformed message from {peer}: {message}")]
    BadMessage {
        /// Which peer.
        peer: String,
        /// What was wrong.
        message: String,
    },
}

impl Error {
    /// Whether the error says stored data is damaged (a local [`ktd_core::Error::Corrupt`], or
    /// a peer answering `DATA_LOSS`): the copy that produced it must be rebuilt, not retried.
    pub fn is_data_loss(&self) -> bool {
        matches!(self, Self::Core(ktd_core::Error::Corrupt(_)))
            || matches!(
                self,
                Self::Remote {
                    code: tonic::Code::DataLoss,
                    ..
                }
            )
    }

    /// Whether the error refuses the request itself, so that sending it again gets the same
    /// answer: input a server will not take (`INVALID_ARGUMENT`; `OUT_OF_RANGE`, which is also
    /// a message over its size limits; an unknown method) or an answer that cannot be
    /// understood. Timeouts, unreachable or busy servers (`RESOURCE_EXHAUSTED` says "retry
    /// later"), fences and damaged copies are not refusals.
    pub fn is_refusal(&self) -> bool {
        match self {
            Self::Core(error) => crate::server::core_code(error) == tonic::Code::InvalidArgument,
            Self::BadMessage { .. } => true,
            Self::Remote { code, .. } => matches!(
                code,
                tonic::Code::InvalidArgument | tonic::Code::OutOfRange | tonic::Code::Unimplemented
            ),
            Self::IncompatibleDataDir { .. } | Self::Fenced { .. } | Self::NotServing { .. } => {
                false
            }
        }
    }

    /// A [`ktd_core::Error::Corrupt`]: stored data contradicts itself.
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::Core(ktd_core::Error::Corrupt(message.into()))
    }

    /// A [`ktd_core::Error::InvalidConfig`]: a configuration value is out of range.
    pub fn invalid_config(message: impl Into<String>) -> Self {
        Self::Core(ktd_core::Error::InvalidConfig(message.into()))
    }

    /// A [`Error::Fenced`] refusal.
    pub fn fenced(reason: impl Into<String>) -> Self {
        Self::Fenced {
            reason: reason.into(),
        }
    }

    /// The core error inside, if this is one.
    pub fn as_core(&self) -> Option<&ktd_core::Error> {
        match self {
            Self::Core(error) => Some(error),
            _ => None,
        }
    }
}
