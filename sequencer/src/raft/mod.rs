//! The thin layer that hides openraft (pinned at `=0.10.0-alpha.37`): type configuration, log
//! storage, state machine, snapshots and the gRPC transport. Nothing outside this module names an
//! openraft type except through the aliases re-exported here.
//!
//! | file | job |
//! |---|---|
//! | `types.rs` | `declare_raft_types!` and aliases |
//! | `codec.rs` | openraft types ⇄ `ktd.raft.v1` messages (wire and disk) |
//! | `db.rs` | the node's one RocksDB: column families, data-dir identity |
//! | `log_store.rs` | `RaftLogStorage` (vote, log; synced, group-committed) |
//! | `state_machine.rs` | `RaftStateMachine` over [`crate::machine::Machine`] |
//! | `snapshot.rs` | checkpoint snapshots: build, send, receive, install |
//! | `network.rs` | `RaftNetworkV2` client: pooled channels, deadlines |
//! | `server.rs` | the `ktd.raft.v1.Raft` gRPC service |

pub mod codec;
pub mod db;
pub mod log_store;
pub mod network;
pub mod server;
pub mod snapshot;
pub mod state_machine;
pub mod types;

use std::sync::Arc;

pub use types::{Command, NodeId, TypeConfig};

use crate::config::RaftOptions;
use crate::error::{Result, SequencerError};

/// The openraft handle of a node.
pub type Raft = openraft::Raft<TypeConfig, state_machine::RocksStateMachine>;

/// openraft's configuration from ours.
pub fn raft_config(options: &RaftOptions) -> Result<Arc<openraft::Config>> {
    let millis =
        |duration: std::time::Duration| u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    let config = openraft::Config {
        cluster_name: "ktd-sequencer".into(),
        heartbeat_interval: millis(options.heartbeat_interval),
        election_timeout_min: millis(options.election_timeout_min),
        election_timeout_max: millis(options.election_timeout_max),
        // Log replication versus snapshot: a follower further behind than this gets a snapshot.
        replication_lag_threshold: options.snapshot_logs_since_last,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(options.snapshot_logs_since_last),
        max_in_snapshot_log_to_keep: options.max_in_snapshot_log_to_keep,
        install_snapshot_timeout: millis(options.snapshot_min_timeout),
        enable_pre_vote: Some(options.pre_vote),
        purge_batch_size: 256,
        // With appends of at most 16 MiB (the API's request limit), one AppendEntries message
        // stays below the transport's 512 MiB message limit.
        max_payload_entries: 32,
        ..Default::default()
    };
    config
        .validate()
        .map(Arc::new)
        .map_err(|error| SequencerError::InvalidConfig(format!("raft timing: {error}")))
}
