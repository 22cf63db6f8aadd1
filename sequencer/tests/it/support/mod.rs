//! What the sequencer's integration tests share: the in-process test cluster, and the deadline
//! every test runs under.

pub mod cluster;

use std::future::Future;
use std::time::Duration;

/// Runs `body` under a deadline ([`ktd_testkit::Deadline`]) with the test log writer installed
/// (`RUST_LOG` selects), and waits for its thread to exit.
pub fn with_deadline<F, Fut>(limit: Duration, body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    ktd_testkit::Deadline::new(limit)
        .init_logging()
        .join_thread()
        .run(body);
}

/// A commit of `epoch` with `root_hash` and `partition_roots`, no leaf digests and no replica
/// progress (what a coordinator of an unreplicated cluster would send).
pub fn commit(
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
