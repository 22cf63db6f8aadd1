//! Membership 3 → 5 → 3 with a leader transfer, under a running append load: two learners
//! join and are promoted, leadership moves to a new node, two original voters are removed, and
//! every acknowledged append is in the log exactly once, in the same order on every remaining
//! node.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::cluster::{TestCluster, client_for, sequenced_updates, update};
use crate::support::with_deadline;

#[test]
fn three_to_five_to_three_with_leader_transfer_under_load() {
    with_deadline(Duration::from_secs(150), || async {
        let mut cluster = TestCluster::start(3, |_| {}).await;
        let addr4 = cluster.add_node(4).await;
        let addr5 = cluster.add_node(5).await;
        let all: Vec<String> = (1..=5).map(|id| cluster.addr(id)).collect();

        tracing::info!("--- start the load");
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Arc<Mutex<BTreeMap<Vec<u8>, u64>>> = Arc::default();
        let mut writers = Vec::new();
        for writer in 0..3 {
            let client = client_for(all.clone());
            let stop = stop.clone();
            let acked = acked.clone();
            writers.push(tokio::spawn(async move {
                let mut round = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let labels: Vec<Vec<u8>> = (0..5)
                        .map(|i| format!("w{writer}-r{round}-{i}").into_bytes())
                        .collect();
                    let updates = labels
                        .iter()
                        .map(|label| update(label.clone(), "v"))
                        .collect();
                    if let Ok(answer) = client.append(updates, None).await {
                        let mut acked = acked.lock().expect("lock");
                        for (offset, label) in labels.into_iter().enumerate() {
                            acked.insert(label, answer.first_sequence + offset as u64);
                        }
                    }
                    round += 1;
                }
            }));
        }
        let client = client_for(all.clone());
        let acked_count = || acked.lock().expect("lock").len();
        let wait_progress = |floor: usize| {
            let acked = acked.clone();
            async move {
                ktd_testkit::eventually("append progress", Duration::from_secs(20), || {
                    let acked = acked.clone();
                    async move { (acked.lock().expect("lock").len() > floor).then_some(()) }
                })
                .await;
            }
        };
        wait_progress(50).await;

        tracing::info!("--- 3 -> 5: add two learners, promote them");
        client
            .add_learner(4, addr4, true)
            .await
            .expect("add learner 4");
        client
            .add_learner(5, addr5, true)
            .await
            .expect("add learner 5");
        let promoted = client
            .promote(BTreeSet::from([4, 5]))
            .await
            .expect("promote 4 and 5");
        let voters: Vec<Vec<u64>> = promoted
            .voter_sets
            .iter()
            .map(|set| set.node_ids.clone())
            .collect();
        assert_eq!(voters, vec![vec![1, 2, 3, 4, 5]]);
        wait_progress(acked_count()).await;

        tracing::info!("--- transfer leadership to node 4");
        let new_leader = client.transfer_leader(Some(4)).await.expect("transfer");
        assert_eq!(new_leader, 4);
        assert_eq!(cluster.wait_leader().await, 4);
        wait_progress(acked_count()).await;

        tracing::info!("--- 5 -> 3: remove nodes 1 and 2");
        client.remove_node(1).await.expect("remove 1");
        let removed = client.remove_node(2).await.expect("remove 2");
        let voters: Vec<Vec<u64>> = removed
            .voter_sets
            .iter()
            .map(|set| set.node_ids.clone())
            .collect();
        assert_eq!(voters, vec![vec![3, 4, 5]]);
        wait_progress(acked_count()).await;

        stop.store(true, Ordering::SeqCst);
        for writer in writers {
            writer.await.expect("writer");
        }
        cluster.stop(1).await;
        cluster.stop(2).await;

        let to = cluster.wait_converged(&[3, 4, 5]).await;
        let status = client_for([cluster.addr(4)])
            .cluster_status()
            .await
            .expect("status");
        let members: BTreeSet<u64> = status.members.iter().map(|member| member.node_id).collect();
        assert_eq!(members, BTreeSet::from([3, 4, 5]));
        let acked = acked.lock().expect("lock").clone();
        assert!(
            acked.len() > 100,
            "the load kept going: {} acked updates",
            acked.len()
        );
        let reference = sequenced_updates(&cluster.log(4, to).await);
        for id in [3, 5] {
            assert_eq!(
                sequenced_updates(&cluster.log(id, to).await),
                reference,
                "node {id} has the same log"
            );
        }
        let mut seen: BTreeMap<Vec<u8>, Vec<u64>> = BTreeMap::new();
        for (sequence, label, _) in &reference {
            seen.entry(label.clone()).or_default().push(*sequence);
        }
        for (label, sequence) in &acked {
            assert_eq!(
                seen.get(label),
                Some(&vec![*sequence]),
                "acknowledged update {} present exactly once with its sequence",
                String::from_utf8_lossy(label)
            );
        }
        let sequences: Vec<u64> = reference.iter().map(|(sequence, _, _)| *sequence).collect();
        assert!(
            sequences.windows(2).all(|pair| pair[1] == pair[0] + 1),
            "gap-free sequences"
        );
        cluster.shutdown().await;
    });
}

/// H3/L14: a node id removed from the membership is remembered in the replicated state and
/// refused by `AddLearner` — on the leader of the day, after every node restarted — so a node
/// that lost its log and vote can never rejoin under its old id, whatever tool adds it.
#[test]
fn a_removed_node_id_is_refused_when_added_again_even_after_every_node_restarts() {
    with_deadline(Duration::from_secs(90), || async {
        let mut cluster = TestCluster::start(3, |_| {}).await;
        let client = cluster.client();
        client.remove_node(3).await.expect("remove 3");
        cluster.stop(3).await;
        let refused = client
            .add_learner(3, cluster.addr(3), false)
            .await
            .expect_err("a removed id is refused");
        let status = tonic::Status::from(refused);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        assert!(
            status.message().contains("node id 3 was removed"),
            "{status:?}"
        );

        for id in [1, 2] {
            cluster.stop(id).await;
        }
        for id in [1, 2] {
            cluster.restart(id).await;
        }
        cluster.wait_leader().await;
        let refused = cluster
            .client()
            .add_learner(3, cluster.addr(3), false)
            .await
            .expect_err("still refused after the restarts");
        assert!(
            refused.to_string().contains("node id 3 was removed"),
            "{refused}"
        );
        // A new id for the same address is fine.
        let added = cluster.add_node(4).await;
        cluster
            .client()
            .add_learner(4, added, true)
            .await
            .expect("a new id joins");
        cluster.shutdown().await;
    });
}
