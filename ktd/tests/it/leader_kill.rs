//! Three `ktd sequencer` processes, appends from concurrent clients, `kill -9` of the leader
//! mid-stream: every acknowledged append is in the log exactly once, with the sequence number it
//! was acknowledged with, in the same order on every node after failover (the killed node
//! restarts from its data directory and catches up). Then SIGTERM stops every node cleanly
//! (exit status 0), the leader handing over leadership first.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use ktd_testkit::process::KtdCluster;
use ktd_testkit::{eventually, with_deadline};
use sequencer::pb;

use crate::support::KTD;
use crate::support::cluster::sequencer_client;

struct PrintLogsOnPanic(Arc<Mutex<String>>);

impl Drop for PrintLogsOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "{}",
                self.0.lock().map(|logs| logs.clone()).unwrap_or_default()
            );
        }
    }
}

/// The `(sequence, label)` of every update node `addr` applied, up to log index `to`.
async fn applied_updates(
    client: &sequencer::SequencerClient,
    addr: &str,
    to: u64,
) -> Vec<(u64, Vec<u8>)> {
    let mut stream = client.watch_log_at(addr, 1).await.expect("watch log");
    let mut updates = Vec::new();
    let mut index = 0;
    while index < to {
        let event = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("log event within 10 s")
            .expect("stream open")
            .expect("log event");
        index = event.index;
        if let Some(pb::log_event::Kind::Append(append)) = event.kind {
            updates.extend(
                append
                    .updates
                    .into_iter()
                    .map(|update| (update.sequence, update.label)),
            );
        }
    }
    updates
}

#[test]
fn leader_kill_loses_no_acknowledged_append() {
    with_deadline(Duration::from_secs(150), || async {
        let mut cluster = KtdCluster::start(KTD, 3);
        let logs = Arc::new(Mutex::new(String::new()));
        let _print = PrintLogsOnPanic(logs.clone());
        let client = sequencer_client(&cluster);
        eventually(
            "the cluster to accept appends",
            Duration::from_secs(30),
            || async {
                client
                    .append(
                        vec![pb::Update {
                            label: b"warm-up".to_vec(),
                            value: b"v".to_vec(),
                        }],
                        None,
                    )
                    .await
                    .ok()
            },
        )
        .await;

        tracing::info!("--- concurrent writers");
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Arc<Mutex<BTreeMap<Vec<u8>, u64>>> = Arc::default();
        let mut writers = Vec::new();
        for writer in 0..4 {
            let client = sequencer_client(&cluster);
            let stop = stop.clone();
            let acked = acked.clone();
            writers.push(tokio::spawn(async move {
                let mut round = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let labels: Vec<Vec<u8>> = (0..10)
                        .map(|i| format!("w{writer}-r{round}-{i}").into_bytes())
                        .collect();
                    let updates = labels
                        .iter()
                        .map(|label| pb::Update {
                            label: label.clone(),
                            value: b"key".to_vec(),
                        })
                        .collect();
                    // A failed append is indeterminate: it may or may not be in the log.
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
        let acked_now = || acked.lock().expect("lock").len();
        eventually(
            "appends before the kill",
            Duration::from_secs(20),
            || async { (acked_now() >= 500).then_some(()) },
        )
        .await;

        tracing::info!("--- kill -9 the leader mid-stream");
        let leader = client.cluster_status().await.expect("status").leader_id;
        let before_kill = acked_now();
        cluster.nodes.get_mut(&leader).expect("leader node").kill9();
        let killed_at = Instant::now();
        eventually(
            "appends after failover",
            Duration::from_secs(30),
            || async { (acked_now() >= before_kill + 500).then_some(()) },
        )
        .await;
        eprintln!(
            "writes resumed {:?} after the kill (by acknowledged count)",
            killed_at.elapsed()
        );
        stop.store(true, Ordering::SeqCst);
        for writer in writers {
            writer.await.expect("writer");
        }

        tracing::info!("--- restart the killed node from its data directory");
        cluster.nodes.get_mut(&leader).expect("node").restart();
        let addrs = cluster.addrs();
        let to = eventually(
            "all nodes to apply everything",
            Duration::from_secs(30),
            || async {
                let status = client.cluster_status().await.ok()?;
                let committed = status
                    .members
                    .iter()
                    .find(|member| member.node_id == status.leader_id)?
                    .status
                    .as_ref()?
                    .committed_index;
                let mut all = true;
                for addr in &addrs {
                    all &= client.node_status_at(addr).await.ok()?.applied_index == committed;
                }
                all.then_some(committed)
            },
        )
        .await;
        *logs.lock().expect("lock") = cluster.logs();

        let acked = acked.lock().expect("lock").clone();
        let reference = applied_updates(&client, &addrs[0], to).await;
        for addr in &addrs[1..] {
            assert!(
                applied_updates(&client, addr, to).await == reference,
                "node {addr} applied a different sequence of updates"
            );
        }
        let mut seen: BTreeMap<&[u8], Vec<u64>> = BTreeMap::new();
        for (sequence, label) in &reference {
            seen.entry(label.as_slice()).or_default().push(*sequence);
        }
        for (label, sequence) in &acked {
            assert_eq!(
                seen.get(label.as_slice()),
                Some(&vec![*sequence]),
                "acknowledged update {} is in the log exactly once, at its sequence",
                String::from_utf8_lossy(label)
            );
        }
        let sequences: Vec<u64> = reference.iter().map(|(sequence, _)| *sequence).collect();
        assert!(
            sequences.windows(2).all(|pair| pair[1] == pair[0] + 1),
            "gap-free, ordered sequences"
        );
        eprintln!("{} acknowledged updates checked on 3 nodes", acked.len());

        tracing::info!("--- SIGTERM: every node exits 0, the leader hands over first");
        for id in [1, 2, 3] {
            let status = cluster
                .nodes
                .get_mut(&id)
                .expect("node")
                .terminate(Duration::from_secs(20));
            *logs.lock().expect("lock") = cluster.logs();
            assert!(status.success(), "node {id} exited with {status:?}");
        }
    });
}
