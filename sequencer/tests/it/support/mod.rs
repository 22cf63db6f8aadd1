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

/// A commit of `epoch` whose partition roots stitch to its root hash in the test clusters'
/// directory (the default 4 partition bits, `whatsapp_v1`): partition 0 holds one leaf whose
/// value is `seed` repeated (another seed, another root). No leaf digests, no replica progress.
pub fn commit(epoch: u64, seed: u8) -> sequencer::pb::CommitEpochRequest {
    use ktd_core::akd_core::{AzksValue, NodeLabel};
    use ktd_core::stitch::TopTree;
    use ktd_core::tree::NodeRef;
    let bits = 4;
    let mut partitions = vec![None; 1 << bits];
    partitions[0] = Some(NodeRef {
        label: NodeLabel::new([0; 32], 256),
        hash: AzksValue([seed; 32]),
        min_epoch: epoch,
        max_epoch: epoch,
    });
    let top = TopTree::<ktd_core::config::WhatsAppV1>::new(bits, partitions.clone())
        .expect("one leaf stitches");
    let record = ktd_core::EpochRecord {
        epoch,
        root_hash: top.root_hash(),
        partitions,
    };
    sequencer::pb::CommitEpochRequest {
        epoch,
        root_hash: record.root_hash.to_vec(),
        partition_roots: record.encode(),
        ..Default::default()
    }
}
