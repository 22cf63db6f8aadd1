//! The `sequencer` crate's integration tests: one binary, so RocksDB links once.
//!
//! Every test runs real nodes (in this process) serving gRPC on `127.0.0.x` ephemeral ports, each
//! with its own data directory, under a deadline. Tests that kill a process with SIGKILL live in
//! `ktd/tests/` (they need the `ktd` binary). Shared helpers are in `support/`.

mod bad_input;
mod bounded_streams;
mod codec_props;
mod corrupt_data_dir;
mod idempotent_retry;
mod machine_props;
mod membership;
mod no_fork;
mod poisoned_epoch;
mod restart;
mod snapshot_catchup;
mod support;
