//! No fork: an epoch gets exactly one root. A conflicting `CommitEpoch` for a committed epoch is
//! refused (also by a new leader), the same root again is idempotent, and epochs commit in order
//! and only once sealed.

use std::time::Duration;

use sequencer::pb;
use tonic::Code;

use crate::support::cluster::{TestCluster, update};
use crate::support::with_deadline;

fn code<T: std::fmt::Debug>(result: sequencer::Result<T>) -> Code {
    match result {
        Err(error) => tonic::Status::from(error).code(),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn conflicting_commit_is_refused_and_epochs_commit_in_order() {
    with_deadline(Duration::from_secs(90), || async {
        let cluster = TestCluster::start(3, |_| {}).await;
        let client = cluster.client();
        client
            .append(vec![update("alice", "1")], None)
            .await
            .expect("append");
        assert_eq!(
            code(cluster.commit_epoch(crate::support::commit(1, 1)).await),
            Code::FailedPrecondition,
            "epoch 1 is not sealed yet"
        );
        let sealed = client.seal(None).await.expect("seal");
        assert_eq!((sealed.epoch, sealed.updates), (1, 1));

        let committed = cluster
            .commit_epoch(crate::support::commit(1, 1))
            .await
            .expect("commit");
        assert!(!committed.already_committed);
        let again = cluster
            .commit_epoch(crate::support::commit(1, 1))
            .await
            .expect("same root again");
        assert!(again.already_committed);
        match cluster.commit_epoch(crate::support::commit(1, 2)).await {
            Err(error) => {
                let status = tonic::Status::from(error);
                assert_eq!(status.code(), Code::AlreadyExists);
                assert!(
                    status.message().contains("different root"),
                    "{}",
                    status.message()
                );
            }
            other => panic!("a second root must be refused, got {other:?}"),
        }

        tracing::info!("--- a new leader refuses the fork too");
        {
            let new_leader = client.transfer_leader(None).await.expect("transfer");
            assert_eq!(cluster.wait_leader().await, new_leader);
            assert_eq!(
                code(cluster.commit_epoch(crate::support::commit(1, 3)).await),
                Code::AlreadyExists
            );
            let record = client.get_epoch(Some(1)).await.expect("get epoch 1");
            assert_eq!(record.root_hash, crate::support::commit(1, 1).root_hash);
            assert_eq!(
                record.partition_roots,
                crate::support::commit(1, 1).partition_roots
            );
            assert_eq!(client.get_epoch(None).await.expect("latest").epoch, 1);
        }

        tracing::info!("--- order: epoch 3 cannot commit before epoch 2");
        {
            client
                .append(vec![update("bob", "2")], None)
                .await
                .expect("append");
            assert_eq!(client.seal(None).await.expect("seal").epoch, 2);
            client
                .append(vec![update("carol", "3")], None)
                .await
                .expect("append");
            assert_eq!(client.seal(None).await.expect("seal").epoch, 3);
            assert_eq!(
                code(cluster.commit_epoch(crate::support::commit(3, 3)).await),
                Code::FailedPrecondition
            );
            cluster
                .commit_epoch(crate::support::commit(2, 2))
                .await
                .expect("commit 2");
            cluster
                .commit_epoch(crate::support::commit(3, 3))
                .await
                .expect("commit 3");
        }

        let to = cluster.wait_converged(&[1, 2, 3]).await;
        for id in 1..=3 {
            let commits: Vec<(u64, Vec<u8>)> = cluster
                .log(id, to)
                .await
                .into_iter()
                .filter_map(|event| match event.kind {
                    Some(pb::log_event::Kind::Committed(record)) => {
                        Some((record.epoch, record.root_hash))
                    }
                    _ => None,
                })
                .collect();
            assert_eq!(
                commits,
                (1..=3)
                    .map(|e| (e, crate::support::commit(e, e as u8).root_hash))
                    .collect::<Vec<_>>(),
                "node {id}: one commit per epoch"
            );
        }
        cluster.shutdown().await;
    });
}
