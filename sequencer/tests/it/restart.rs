//! A full-cluster restart from the data directories (no node ids or init flags) gives identical
//! state on every node, and the leader's seal timer resumes.

use std::time::Duration;

use ktd_testkit::eventually;
use sequencer::pb;

use crate::support::cluster::{TestCluster, update};
use crate::support::with_deadline;

/// What must survive a restart, as seen from one node.
#[derive(Debug, PartialEq)]
struct Durable {
    open_epoch: u64,
    last_sealed_epoch: u64,
    last_committed_epoch: u64,
    next_sequence: u64,
    batches: Vec<Vec<pb::SequencedUpdate>>,
    open: Vec<pb::SequencedUpdate>,
}

async fn durable(cluster: &TestCluster, id: u64) -> Durable {
    let client = cluster.client();
    let addr = cluster.addr(id);
    let status = cluster.status(id).await.expect("status");
    let mut batches = Vec::new();
    for epoch in 1..=status.last_sealed_epoch {
        let chunks = client
            .sealed_batch_at(&addr, epoch)
            .await
            .expect("sealed batch");
        batches.push(chunks.into_iter().flat_map(|chunk| chunk.updates).collect());
    }
    let open = client
        .open_epoch_at(&addr)
        .await
        .expect("open epoch")
        .into_iter()
        .flat_map(|chunk| chunk.updates)
        .collect();
    Durable {
        open_epoch: status.open_epoch,
        last_sealed_epoch: status.last_sealed_epoch,
        last_committed_epoch: status.last_committed_epoch,
        next_sequence: status.next_sequence,
        batches,
        open,
    }
}

#[test]
fn full_cluster_restart_keeps_state_and_resumes_sealing() {
    with_deadline(Duration::from_secs(120), || async {
        // The timer is off (1 h) while the state is recorded, so nothing moves under the reads;
        // the restarted nodes get a 500 ms interval, which must seal the epoch left open.
        let mut cluster = TestCluster::start(3, |_| {}).await;
        let client = cluster.client();
        let first = client
            .append(
                (0..10).map(|i| update(format!("a{i}"), "1")).collect(),
                None,
            )
            .await
            .expect("append");
        assert_eq!(first.epoch, 1);
        assert_eq!(client.seal(None).await.expect("seal").epoch, 1);
        cluster
            .commit_epoch(crate::support::commit(1, 5))
            .await
            .expect("commit");
        let second = client
            .append((0..5).map(|i| update(format!("b{i}"), "2")).collect(), None)
            .await
            .expect("append");
        assert_eq!(second.epoch, 2);
        assert_eq!(client.seal(None).await.expect("seal").epoch, 2);
        let open = client
            .append(vec![update("c0", "3"), update("c1", "3")], None)
            .await
            .expect("append to the open epoch");
        assert_eq!(open.epoch, 3);
        cluster.wait_converged(&[1, 2, 3]).await;
        let mut before = Vec::new();
        for id in 1..=3 {
            before.push(durable(&cluster, id).await);
        }
        assert_eq!(before[0], before[1]);
        assert_eq!(before[0], before[2]);
        assert_eq!(before[0].open.len(), 2);
        let root_before = client.get_epoch(Some(1)).await.expect("epoch 1");

        tracing::info!("--- stop every node, restart from the data directories");
        for id in 1..=3 {
            cluster.stop(id).await;
        }
        cluster.set_tweak(|config| config.epoch.interval = Duration::from_millis(500));
        for id in 1..=3 {
            cluster.restart(id).await;
        }
        cluster.wait_leader().await;
        cluster.wait_converged(&[1, 2, 3]).await;
        let client = cluster.client();
        for (offset, id) in (1..=3).enumerate() {
            let expected = &before[offset];
            // The timer may seal the epoch left open at any moment after the restart: compare
            // the sealed epochs, then epoch 3's updates wherever they are (retry if it moved
            // between two reads).
            let after = durable(&cluster, id).await;
            assert_eq!(
                after.last_committed_epoch, expected.last_committed_epoch,
                "node {id}"
            );
            assert_eq!(after.next_sequence, expected.next_sequence, "node {id}");
            assert_eq!(after.batches[..2], expected.batches[..], "node {id}");
            let addr = cluster.addr(id);
            eventually("epoch 3's updates", Duration::from_secs(10), || async {
                let sealed = client.sealed_batch_at(&addr, 3).await;
                let chunks = match sealed {
                    Ok(chunks) => chunks,
                    Err(_) => client.open_epoch_at(&addr).await.ok()?,
                };
                let updates: Vec<pb::SequencedUpdate> = chunks
                    .into_iter()
                    .filter(|chunk| chunk.epoch == 3)
                    .flat_map(|chunk| chunk.updates)
                    .collect();
                (updates == expected.open).then_some(())
            })
            .await;
        }
        assert_eq!(
            client.get_epoch(Some(1)).await.expect("epoch 1"),
            root_before
        );

        tracing::info!("--- sealing resumes: the timer seals the epoch left open, then new ones");
        eventually(
            "epoch 3 sealed by the timer",
            Duration::from_secs(10),
            || async {
                (cluster
                    .status(cluster.wait_leader().await)
                    .await?
                    .last_sealed_epoch
                    >= 3)
                    .then_some(())
            },
        )
        .await;
        let fourth = client
            .append(vec![update("d0", "4")], None)
            .await
            .expect("append after restart");
        assert_eq!(fourth.epoch, 4);
        assert_eq!(fourth.first_sequence, before[0].next_sequence);
        eventually(
            "epoch 4 sealed by the timer",
            Duration::from_secs(10),
            || async {
                (cluster
                    .status(cluster.wait_leader().await)
                    .await?
                    .last_sealed_epoch
                    >= 4)
                    .then_some(())
            },
        )
        .await;
        cluster.shutdown().await;
    });
}
