//! The crate's one error type, with variants named by cause, and its single mapping to
//! `tonic::Status`.
//!
//! Input errors (`EmptyLabel`, `ValueTooLarge`, ...) are the caller's to fix and map to
//! `INVALID_ARGUMENT`; `NotLeader` maps to `UNAVAILABLE` with a leader hint in the message and in
//! the `ktd-leader-id` / `ktd-leader-addr` metadata; refusals of the state machine (a second root
//! for an epoch, an epoch out of order) keep the code the state machine chose. Labels and values
//! are never printed.

use tonic::Code;

use crate::raft::NodeId;

/// Result alias used throughout the crate.
pub type Result<T, E = SequencerError> = std::result::Result<T, E>;

/// Metadata key of the leader's node id in a not-leader status.
pub const LEADER_ID_METADATA: &str = "ktd-leader-id";
/// Metadata key of the leader's address in a not-leader status.
pub const LEADER_ADDR_METADATA: &str = "ktd-leader-addr";

/// Everything that can go wrong in the sequencer, its server and its client.
#[derive(Debug, thiserror::Error)]
pub enum SequencerError {
    /// An append has no updates.
    #[error("an append must contain at least one update")]
    EmptyBatch,
    /// An append has more updates than allowed.
    #[error("batch of {len} updates exceeds the limit of {max}")]
    BatchTooLarge {
        /// Updates in the batch.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// An update has an empty label.
    #[error("update {position} has an empty label")]
    EmptyLabel {
        /// Position of the update in its batch.
        position: usize,
    },
    /// A label is longer than allowed.
    #[error("update {position}: label of {len} bytes exceeds the limit of {max} bytes")]
    LabelTooLong {
        /// Position of the update in its batch.
        position: usize,
        /// Label length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// A value is larger than allowed.
    #[error("update {position}: value of {len} bytes exceeds the limit of {max} bytes")]
    ValueTooLarge {
        /// Position of the update in its batch.
        position: usize,
        /// Value length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// An idempotency key is longer than allowed.
    #[error("idempotency key of {len} bytes exceeds the limit of {max} bytes")]
    IdempotencyKeyTooLong {
        /// Key length.
        len: usize,
        /// Maximum.
        max: usize,
    },
    /// A root hash does not have 32 bytes.
    #[error("root hash must be 32 bytes, got {len}")]
    InvalidRootHash {
        /// Length supplied.
        len: usize,
    },
    /// A request is malformed in some other way.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// This node is not the leader; `leader_*` say who is, if known.
    #[error("{}", not_leader_message(*.leader_id, .leader_addr.as_deref()))]
    NotLeader {
        /// The leader's node id, if known.
        leader_id: Option<NodeId>,
        /// The leader's address, if known.
        leader_addr: Option<String>,
    },
    /// This node is the Raft leader but no quorum has acknowledged it for longer than the
    /// election timeout: it is probably cut off, and a newer leader may exist. It refuses work
    /// (the request never ran), so clients try another node.
    #[error(
        "not the leader: no quorum has acknowledged this leader for {since_ms} ms (partitioned?)"
    )]
    LeaseExpired {
        /// Time since a quorum last acknowledged this leader.
        since_ms: u64,
    },
    /// The requested epoch is not committed.
    #[error("epoch {epoch} is not committed; the latest committed epoch is {latest}")]
    EpochNotFound {
        /// Requested epoch.
        epoch: u64,
        /// Latest committed epoch.
        latest: u64,
    },
    /// The requested epoch has not been sealed (on this node).
    #[error("epoch {epoch} is not sealed here; the open epoch is {open}")]
    EpochNotSealed {
        /// Requested epoch.
        epoch: u64,
        /// This node's open epoch.
        open: u64,
    },
    /// The batch of a committed epoch is no longer retained.
    #[error(
        "the batch of epoch {epoch} is no longer retained (epochs up to {oldest_retained_before} \
         were released after commit)"
    )]
    BatchNotRetained {
        /// Requested epoch.
        epoch: u64,
        /// Batches of epochs below this were dropped.
        oldest_retained_before: u64,
    },
    /// This node believes it leads but cannot reach a quorum.
    #[error("no quorum: {0}")]
    NoQuorum(String),
    /// The state machine refused a command (nothing changed). `code` is a gRPC code.
    #[error("{message}")]
    Rejected {
        /// The gRPC code the state machine chose.
        code: Code,
        /// Why.
        message: String,
    },
    /// A WatchLog position is below the first retained log index.
    #[error(
        "log position {from_index} was purged; the first retained index is {first_retained}: \
         resync from GetSealedBatch / GetOpenEpoch"
    )]
    LogPurged {
        /// Requested position.
        from_index: u64,
        /// First index still in the log.
        first_retained: u64,
    },
    /// A snapshot install is half done: the state is neither the old one nor the new one.
    #[error("a snapshot is being installed on this node; retry shortly")]
    InstallingSnapshot,
    /// One snapshot is received at a time.
    #[error("another snapshot is being received by this node; one at a time")]
    SnapshotInProgress,
    /// A received snapshot exceeds a `raft.snapshot_max_*` limit.
    #[error("snapshot refused: {0}")]
    SnapshotTooLarge(String),
    /// `watch.max_subscribers` WatchLog streams are open already.
    #[error(
        "too many WatchLog subscribers on this node (at most {max}); retry later or use another node"
    )]
    TooManySubscribers {
        /// `watch.max_subscribers`.
        max: usize,
    },
    /// A WatchLog subscriber read nothing for `watch.stall_timeout` with its buffer full.
    #[error(
        "WatchLog subscriber dropped: it read nothing for {waited_ms} ms with {buffered_bytes} \
         bytes waiting; resume from the next index"
    )]
    SubscriberTooSlow {
        /// How long the subscriber's buffer stayed full.
        waited_ms: u64,
        /// Bytes buffered for it then.
        buffered_bytes: u64,
    },
    /// The cluster has no metadata yet (not initialised, or InitCluster not yet applied).
    #[error("the cluster is not initialised")]
    NotInitialized,
    /// A membership change was refused.
    #[error("membership change refused: {0}")]
    Membership(String),
    /// An operation did not finish in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The node is shutting down.
    #[error("the sequencer is shutting down")]
    ShuttingDown,
    /// The data directory belongs to another node or program, or is damaged.
    #[error("data directory {path} is not usable: {reason}")]
    IncompatibleDataDir {
        /// The directory.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Stored data contradicts itself.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// A message from a peer or client could not be decoded.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A configuration value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The storage engine failed.
    #[error("storage error while trying to {context}: {message}")]
    Storage {
        /// What the engine was asked to do.
        context: &'static str,
        /// The engine's message.
        message: String,
    },
    /// openraft failed (a fatal error, or an unexpected API error).
    #[error("raft: {0}")]
    Raft(String),
    /// Network or server I/O failed.
    #[error("I/O error while trying to {context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Driving an epoch through the shards failed (retried by the coordinator).
    #[error("epoch coordination failed: {0}")]
    Coordination(String),
    /// A remote sequencer answered with an error status (client side).
    #[error("remote error {}: {}", .0.code(), .0.message())]
    Remote(tonic::Status),
}

fn not_leader_message(leader_id: Option<NodeId>, leader_addr: Option<&str>) -> String {
    match (leader_id, leader_addr) {
        (Some(id), Some(addr)) => format!("not the leader; the leader is node {id} at {addr}"),
        (Some(id), None) => format!("not the leader; the leader is node {id}"),
        _ => "not the leader; no leader is known yet, retry shortly".into(),
    }
}

impl SequencerError {
    /// A storage error constructor for `map_err`.
    pub(crate) fn storage(context: &'static str) -> impl Fn(rocksdb::Error) -> Self {
        move |error| Self::Storage {
            context,
            message: error.into_string(),
        }
    }

    /// The gRPC code this error maps to.
    pub fn code(&self) -> Code {
        match self {
            Self::EmptyBatch
            | Self::BatchTooLarge { .. }
            | Self::EmptyLabel { .. }
            | Self::LabelTooLong { .. }
            | Self::ValueTooLarge { .. }
            | Self::IdempotencyKeyTooLong { .. }
            | Self::InvalidRootHash { .. }
            | Self::InvalidRequest(_)
            | Self::Malformed(_) => Code::InvalidArgument,
            Self::NotLeader { .. }
            | Self::LeaseExpired { .. }
            | Self::ShuttingDown
            | Self::InstallingSnapshot
            | Self::NoQuorum(_)
            | Self::Coordination(_) => Code::Unavailable,
            Self::EpochNotFound { .. } | Self::BatchNotRetained { .. } => Code::NotFound,
            Self::SnapshotInProgress
            | Self::SnapshotTooLarge(_)
            | Self::TooManySubscribers { .. }
            | Self::SubscriberTooSlow { .. } => Code::ResourceExhausted,
            Self::EpochNotSealed { .. } | Self::NotInitialized | Self::Membership(_) => {
                Code::FailedPrecondition
            }
            Self::Rejected { code, .. } => *code,
            Self::LogPurged { .. } => Code::OutOfRange,
            Self::Timeout(_) => Code::DeadlineExceeded,
            Self::IncompatibleDataDir { .. }
            | Self::Corrupt(_)
            | Self::InvalidConfig(_)
            | Self::Storage { .. }
            | Self::Raft(_)
            | Self::Io { .. } => Code::Internal,
            Self::Remote(status) => status.code(),
        }
    }
}

impl From<SequencerError> for tonic::Status {
    fn from(error: SequencerError) -> Self {
        if let SequencerError::Remote(status) = error {
            return status;
        }
        let mut status = tonic::Status::new(error.code(), error.to_string());
        if let SequencerError::NotLeader {
            leader_id,
            leader_addr,
        } = &error
        {
            let metadata = status.metadata_mut();
            if let Some(id) = leader_id
                && let Ok(value) = id.to_string().parse()
            {
                metadata.insert(LEADER_ID_METADATA, value);
            }
            if let Some(addr) = leader_addr
                && let Ok(value) = addr.parse()
            {
                metadata.insert(LEADER_ADDR_METADATA, value);
            }
        }
        status
    }
}

impl From<tonic::Status> for SequencerError {
    fn from(status: tonic::Status) -> Self {
        Self::Remote(status)
    }
}

/// Storage errors cross openraft's storage traits as `io::Error`.
impl From<SequencerError> for std::io::Error {
    fn from(error: SequencerError) -> Self {
        match error {
            SequencerError::Io { source, .. } => source,
            other => std::io::Error::other(other.to_string()),
        }
    }
}
