//! A follower that was down while the rest of the cluster snapshotted and purged its log
//! catches up by snapshot transfer, ends with the same state, and keeps following afterwards.

use std::time::Duration;

use futures::StreamExt;
use sequencer::{SequencerError, pb};
use tonic::Code;

use crate::support::cluster::{TestCluster, sequenced_updates, update};
use crate::support::with_deadline;

fn batch(round: usize) -> Vec<pb::Update> {
    (0..20)
        .map(|i| update(format!("user-{round}-{i}"), format!("key-{round}-{i}")))
        .collect()
}

#[test]
fn follower_behind_a_purged_log_catches_up_by_snapshot() {
    with_deadline(Duration::from_secs(120), || async {
        let mut cluster = TestCluster::start(3, |_| {}).await;
        let client = cluster.client();
        for round in 0..10 {
            client.append(batch(round), None).await.expect("append");
        }
        cluster.wait_converged(&[1, 2, 3]).await;
        let leader = cluster.wait_leader().await;
        let lagging = (1..=3).find(|id| *id != leader).expect("a follower");
        let other = (1..=3)
            .find(|id| *id != leader && *id != lagging)
            .expect("another follower");

        tracing::info!("--- stop node {lagging}, write on, snapshot and purge everywhere else");
        cluster.stop(lagging).await;
        let lagging_last = {
            let live =
                crate::support::cluster::client_for([cluster.addr(leader), cluster.addr(other)]);
            for round in 10..60 {
                live.append(batch(round), None).await.expect("append");
            }
            assert_eq!(live.seal(None).await.expect("seal").epoch, 1);
            cluster
                .commit_epoch(crate::support::commit(1, 9))
                .await
                .expect("commit");
            for round in 60..70 {
                live.append(batch(round), None).await.expect("append");
            }
            cluster.wait_converged(&[leader, other]).await;
            for id in [leader, other] {
                let snapshot = live
                    .trigger_snapshot_at(&cluster.addr(id), true)
                    .await
                    .expect("snapshot");
                assert!(snapshot.snapshot_index > 60, "{snapshot:?}");
                assert_eq!(
                    snapshot.purged_index, snapshot.snapshot_index,
                    "node {id} purged its log"
                );
            }
            cluster.status(leader).await.expect("status").purged_index
        };

        tracing::info!("--- restart node {lagging}: only a snapshot can bring it up to date");
        cluster.restart(lagging).await;
        let applied = cluster.wait_converged(&[1, 2, 3]).await;
        let status = cluster.status(lagging).await.expect("status");
        assert!(
            status.snapshot_index >= lagging_last,
            "node {lagging} installed a snapshot at or beyond the purge point: {status:?}"
        );
        let leader_status = cluster.status(leader).await.expect("status");
        for field in [
            |s: &pb::NodeStatus| s.open_epoch,
            |s: &pb::NodeStatus| s.open_epoch_updates,
            |s: &pb::NodeStatus| s.last_committed_epoch,
            |s: &pb::NodeStatus| s.next_sequence,
        ] {
            assert_eq!(
                field(&status),
                field(&leader_status),
                "{status:?} vs {leader_status:?}"
            );
        }
        assert!(applied >= leader_status.snapshot_index);
        for epoch_batch in [
            client
                .sealed_batch_at(&cluster.addr(lagging), 1)
                .await
                .expect("sealed batch"),
            client
                .open_epoch_at(&cluster.addr(lagging))
                .await
                .expect("open epoch"),
        ] {
            let epoch = epoch_batch[0].epoch;
            let reference = if epoch_batch[0].sealed {
                client
                    .sealed_batch_at(&cluster.addr(leader), epoch)
                    .await
                    .expect("leader batch")
            } else {
                client
                    .open_epoch_at(&cluster.addr(leader))
                    .await
                    .expect("leader open")
            };
            let updates = |chunks: &[pb::BatchChunk]| {
                chunks
                    .iter()
                    .flat_map(|chunk| chunk.updates.clone())
                    .collect::<Vec<_>>()
            };
            assert_eq!(updates(&epoch_batch), updates(&reference), "epoch {epoch}");
        }
        assert_eq!(
            client
                .sealed_batch_at(&cluster.addr(lagging), 1)
                .await
                .expect("batch")[0]
                .total,
            60 * 20
        );

        tracing::info!("--- its purged log positions are OUT_OF_RANGE; later ones stream");
        {
            match client.watch_log_at(&cluster.addr(lagging), 1).await {
                Err(SequencerError::Remote(status)) => {
                    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
                    assert!(status.message().contains("resync"), "{status:?}");
                }
                Ok(_) => panic!("position 1 was purged and must be OUT_OF_RANGE"),
                Err(other) => panic!("unexpected {other:?}"),
            }
            let from = status.snapshot_index + 1;
            let mut stream = client
                .watch_log_at(&cluster.addr(lagging), from)
                .await
                .expect("watch from after the snapshot");
            let new = client
                .append(vec![update("after-snapshot", "v")], None)
                .await
                .expect("append");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let event = tokio::time::timeout_at(deadline, stream.next())
                    .await
                    .expect("the new append reaches the caught-up node")
                    .expect("stream open")
                    .expect("log event");
                let updates = sequenced_updates(std::slice::from_ref(&event));
                if updates.iter().any(|(sequence, label, _)| {
                    label == b"after-snapshot" && *sequence == new.first_sequence
                }) {
                    break;
                }
            }
        }
        cluster.shutdown().await;
    });
}
