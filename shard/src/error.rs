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
    /// A shard has not delivered its leaves for an epoch that is being built.
    #[error("leaves from shard {from} for epoch {epoch} have not been delivered")]
    MissingDelivery {
        /// The epoch being built.
        epoch: u64,
        /// The shard whose delivery is missing.
        from: String,
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
    /// A [`ktd_core::Error::Corrupt`]: stored data contradicts itself.
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::Core(ktd_core::Error::Corrupt(message.into()))
    }

    /// A [`ktd_core::Error::InvalidConfig`]: a configuration value is out of range.
    pub fn invalid_config(message: impl Into<String>) -> Self {
        Self::Core(ktd_core::Error::InvalidConfig(message.into()))
    }

    /// The core error inside, if this is one.
    pub fn as_core(&self) -> Option<&ktd_core::Error> {
        match self {
            Self::Core(error) => Some(error),
            _ => None,
        }
    }
}
