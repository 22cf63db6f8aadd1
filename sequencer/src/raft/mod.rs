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
//! | `force.rs` | re-forming a cluster from one survivor (offline log rewrite) |

pub mod codec;
pub mod db;
pub mod force;
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

/// Room reserved for one log entry's envelope around an `Append`'s updates (log id, command
/// framing, idempotency key, payload hash, timestamps) and for the AppendEntries header (vote,
/// previous log id, commit index). Commands other than `Append` are far smaller than
/// [`crate::api::MAX_REQUEST_BYTES`].
pub const ENTRY_ENVELOPE_BYTES: usize = 64 << 10;

/// Most entries openraft puts in one AppendEntries message: with every entry as large as the
/// API lets an `Append` be (16 MiB plus its envelope), the message still fits the transport's
/// [`network::MAX_MESSAGE_BYTES`] (31 entries: 31 × (16 MiB + 64 KiB) + 64 KiB < 512 MiB), so a
/// lagging follower is never sent a batch its transport refuses (audit finding L6).
pub const MAX_PAYLOAD_ENTRIES: u64 = ((network::MAX_MESSAGE_BYTES - ENTRY_ENVELOPE_BYTES)
    / (crate::api::MAX_REQUEST_BYTES + ENTRY_ENVELOPE_BYTES))
    as u64;

const _: () = assert!(
    MAX_PAYLOAD_ENTRIES as usize * (crate::api::MAX_REQUEST_BYTES + ENTRY_ENVELOPE_BYTES)
        + ENTRY_ENVELOPE_BYTES
        <= network::MAX_MESSAGE_BYTES
        && MAX_PAYLOAD_ENTRIES >= 1
);

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
        // One AppendEntries message stays below the transport's message limit (see the const).
        max_payload_entries: MAX_PAYLOAD_ENTRIES,
        ..Default::default()
    };
    config
        .validate()
        .map(Arc::new)
        .map_err(|error| SequencerError::InvalidConfig(format!("raft timing: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_append_entries_message_of_maximum_appends_fits_the_transport_limit() {
        let config = raft_config(&RaftOptions::default()).expect("default config");
        let entries = usize::try_from(config.max_payload_entries).expect("small");
        let largest_message =
            entries * (crate::api::MAX_REQUEST_BYTES + ENTRY_ENVELOPE_BYTES) + ENTRY_ENVELOPE_BYTES;
        assert!(
            largest_message <= network::MAX_MESSAGE_BYTES,
            "{entries} entries of up to {} bytes make {largest_message} bytes, over the \
             {}-byte transport limit",
            crate::api::MAX_REQUEST_BYTES + ENTRY_ENVELOPE_BYTES,
            network::MAX_MESSAGE_BYTES
        );
        assert_eq!(config.max_payload_entries, 31);
    }
}
