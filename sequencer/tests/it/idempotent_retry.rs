//! Idempotent retry: the same idempotency key twice gives one log entry's worth of updates and
//! the same answer, also when the retry lands on a follower and follows the leader hint.

use std::time::Duration;

use crate::support::cluster::{TestCluster, client_for, sequenced_updates, update};
use crate::support::with_deadline;

#[test]
fn same_key_applies_once_and_returns_the_original_answer() {
    with_deadline(Duration::from_secs(90), || async {
        let cluster = TestCluster::start(3, |_| {}).await;
        let client = cluster.client();
        let key = b"retry-key-1".to_vec();
        let batch = || vec![update("alice", "key-1"), update("bob", "key-2")];

        let first = client
            .append(batch(), Some(key.clone()))
            .await
            .expect("append");
        assert!(!first.duplicate);
        assert_eq!((first.epoch, first.first_sequence, first.count), (1, 1, 2));

        let retry = client
            .append(batch(), Some(key.clone()))
            .await
            .expect("retry");
        assert!(retry.duplicate, "{retry:?}");
        assert_eq!(
            (retry.epoch, retry.first_sequence, retry.count),
            (first.epoch, first.first_sequence, first.count)
        );

        tracing::info!("--- retry through a follower, which answers with a leader hint");
        {
            let leader = cluster.wait_leader().await;
            let follower = (1..=3).find(|id| *id != leader).expect("a follower");
            let via_follower = client_for([cluster.addr(follower)])
                .append(batch(), Some(key.clone()))
                .await
                .expect("retry via follower");
            assert!(via_follower.duplicate);
            assert_eq!(via_follower.first_sequence, first.first_sequence);
        }

        let next = client
            .append(vec![update("carol", "key-3")], None)
            .await
            .expect("append");
        assert_eq!(
            next.first_sequence, 3,
            "retries consumed no sequence numbers"
        );

        let to = cluster.wait_converged(&[1, 2, 3]).await;
        for id in 1..=3 {
            let events = cluster.log(id, to).await;
            let updates = sequenced_updates(&events);
            let labels: Vec<&[u8]> = updates
                .iter()
                .map(|(_, label, _)| label.as_slice())
                .collect();
            assert_eq!(labels, vec![&b"alice"[..], b"bob", b"carol"], "node {id}");
            let duplicates = events
                .iter()
                .filter(|event| {
                    matches!(&event.kind, Some(sequencer::pb::log_event::Kind::Append(append)) if append.duplicate)
                })
                .count();
            assert_eq!(
                duplicates, 2,
                "node {id}: both retries are logged as duplicates"
            );
            let open = client
                .open_epoch_at(&cluster.addr(id))
                .await
                .expect("open epoch");
            let pending: usize = open.iter().map(|chunk| chunk.updates.len()).sum();
            assert_eq!(pending, 3, "node {id}: alice, bob, carol once each");
        }
        cluster.shutdown().await;
    });
}
