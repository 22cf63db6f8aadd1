//! The core's one error type, with variants named by cause.
//!
//! Input errors (`DuplicateLabel`, `ValueTooLarge`, `EpochNotFound`, ...) are the caller's to
//! fix; `Corrupt` and `Storage` come from whatever implements [`crate::tree::TreeStore`]; the
//! servers that surface these errors map each variant to a gRPC code in one place. Labels are
//! never printed raw (they identify users): errors carry a short hash.

use std::fmt;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A short, non-reversible tag for a user label, safe to log (first 8 bytes of its BLAKE3 hash).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct LabelTag(pub [u8; 8]);

impl LabelTag {
    /// Tags `akd_label`.
    pub fn of(akd_label: &[u8]) -> Self {
        let hash = blake3::hash(akd_label);
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&hash.as_bytes()[..8]);
        Self(tag)
    }
}

impl fmt::Display for LabelTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for LabelTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LabelTag({self})")
    }
}

/// Everything that can go wrong in the tree math, proofs, VRF, configuration and shard map.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A publish batch names the same label twice (deduplication is the sequencer's job).
    #[error("the batch contains label {label} more than once")]
    DuplicateLabel {
        /// Tag of the repeated label.
        label: LabelTag,
    },
    /// A label is empty.
    #[error("labels must not be empty")]
    EmptyLabel,
    /// A label is longer than the configured limit.
    #[error("label of {len} bytes exceeds the limit of {max} bytes")]
    LabelTooLong {
        /// Length of the offending label.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// A value is larger than the configured limit.
    #[error("value of {len} bytes exceeds the limit of {max} bytes")]
    ValueTooLarge {
        /// Length of the offending value.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// A publish batch holds more updates than allowed.
    #[error("batch of {len} updates exceeds the limit of {max}")]
    BatchTooLarge {
        /// Number of updates in the batch.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The requested epoch has not been committed (yet).
    #[error("epoch {epoch} does not exist; the latest committed epoch is {latest}")]
    EpochNotFound {
        /// Requested epoch.
        epoch: u64,
        /// Latest committed epoch.
        latest: u64,
    },
    /// The epoch is older than the history retention window: its history may be deleted.
    #[error(
        "epoch {epoch} is no longer retained (history retention); the oldest readable epoch is {oldest}"
    )]
    EpochPruned {
        /// The epoch asked for.
        epoch: u64,
        /// The oldest readable epoch.
        oldest: u64,
    },
    /// An audit range is empty or reversed.
    #[error("invalid audit range: start epoch {start} must be below end epoch {end}")]
    InvalidAuditRange {
        /// Start epoch.
        start: u64,
        /// End epoch.
        end: u64,
    },
    /// The label has no published version as of the requested epoch.
    #[error("label {label} has no published version as of epoch {epoch}")]
    LabelNotFound {
        /// Tag of the label.
        label: LabelTag,
        /// Epoch the lookup was made at.
        epoch: u64,
    },
    /// An absence proof was asked for a label that has a published version.
    #[error("label {label} has a published version as of epoch {epoch}; look it up instead")]
    LabelExists {
        /// Tag of the label.
        label: LabelTag,
        /// Epoch the absence proof was asked for.
        epoch: u64,
    },
    /// Non-membership cannot be proven in a directory with no leaves (akd-spec §10.2); every
    /// label is absent there, which its root (akd's empty root) shows.
    #[error(
        "the directory is empty as of epoch {epoch}: every label is absent (its root is akd's empty-directory root)"
    )]
    EmptyDirectory {
        /// The epoch.
        epoch: u64,
    },
    /// A history request asked for zero versions.
    #[error("a history request must ask for at least one version")]
    EmptyHistoryRequest,
    /// The VRF seed does not have 32 bytes.
    #[error("the VRF seed must be exactly 32 bytes, got {len}")]
    InvalidSeedLength {
        /// Length supplied.
        len: usize,
    },
    /// A configuration value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A leaf to insert already exists in the tree (a VRF label collision or a replayed epoch).
    #[error("a leaf with node label {label} already exists in the tree")]
    LeafExists {
        /// Hex of the node label (VRF output, not user data).
        label: String,
    },
    /// An epoch was written out of order.
    #[error("epoch {epoch} cannot follow epoch {previous}")]
    EpochOutOfOrder {
        /// Epoch being written.
        epoch: u64,
        /// Epoch already present.
        previous: u64,
    },
    /// Stored data contradicts itself: a referenced node is missing or malformed.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// The storage engine failed.
    #[error("storage error while trying to {context}: {message}")]
    Storage {
        /// What the engine was asked to do.
        context: &'static str,
        /// The engine's message.
        message: String,
    },
    /// The VRF implementation rejected a key or an input.
    #[error("VRF error: {0}")]
    Vrf(String),
    /// A proof was requested for a node that is not in the tree (an engine bug, not bad input).
    #[error("proof generation failed: {0}")]
    Proof(String),
}
