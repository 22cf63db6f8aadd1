//! The `sequencer` crate's integration tests: one binary, so RocksDB links once.
//!
//! Every test runs real nodes (in this process) serving gRPC on `127.0.0.x` ephemeral ports, each
//! with its own data directory, under a deadline. Tests that kill a process with SIGKILL live in
//! `gateway/tests/` (they need the `ktd` binary).

mod bad_input;
mod cluster;
mod corrupt_data_dir;
mod deadline;
mod idempotent_retry;
mod membership;
mod no_fork;
mod restart;
mod snapshot_catchup;

/// A commit of `epoch` with `root_hash` and `partition_roots`, no leaf digests and no replica
/// progress (what a coordinator of an unreplicated cluster would send).
fn commit(
    epoch: u64,
    root_hash: Vec<u8>,
    partition_roots: Vec<u8>,
) -> ktd_proto::ktd::sequencer::v1::CommitEpochRequest {
    ktd_proto::ktd::sequencer::v1::CommitEpochRequest {
        epoch,
        root_hash,
        partition_roots,
        ..Default::default()
    }
}
