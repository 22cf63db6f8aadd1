//! The runbooks of `docs/operations.md`, run with the exact `ktd admin` commands they document,
//! against real processes: 3 sequencers, 2 shards and 1 gateway on 127.0.0.x, while a client
//! publishes through the gateway. One test per runbook, each on a fresh cluster (the
//! [`Runbook`] fixture), one at a time; each ends by finding every acknowledged publish
//! (verified):
//!
//! - **status**: `ktd admin status` (table and `-o json`), `--check`; the old `ktd status`.
//! - **leader transfer**: `ktd admin transfer-leader --to ID`.
//! - **rolling restart**: SIGTERM each sequencer (followers, then the leader: leadership moves
//!   before the process exits, exit status 0), each shard and the gateway; each restarted
//!   process is NOT_SERVING until caught up, and `status --check` passes before the next.
//! - **replace a failed sequencer**: SIGKILL a follower and wipe its disk: restarted as it is,
//!   or with `--join` under its old id, it refuses to start; `remove-sequencer`, start a node
//!   with a new id and `--join`, `add-sequencer`; reusing an id is refused.
//! - **lost quorum**: SIGKILL two of three sequencers and destroy their disks; `ktd admin
//!   force-new-cluster` on the stopped survivor (refused while it runs, without
//!   `--confirm-quorum-lost`, and a second time); it leads alone, every acknowledged publish is
//!   found, a new publish lands in a later epoch; two members join under new ids, an old id is
//!   refused.
//! - **shard failure**: SIGKILL a shard: the gateway and `status --check` report it; restart it,
//!   it becomes SERVING once it holds the latest committed epoch, and epochs commit again.
//! - **backup and restore**: `seal`, `snapshot`, stop everything (SIGTERM), copy the data
//!   directories, start a cluster from the copies: same latest epoch and root, the audit from
//!   epoch 0 verifies with stock akd, and every acknowledged publish is found (verified).
//!
//! "Disk full" is a recorded run, not a test (see `docs/operations.md`).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ktd_client::Client;
use ktd_testkit::fs::copy_dir;
use ktd_testkit::grpc::{health, wait_health};
use ktd_testkit::net::free_addr;
use ktd_testkit::seed::TEST_VRF_KEY;
use ktd_testkit::{Deadline, Poll};
use serde_json::Value;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::KTD;
use crate::support::cluster::{Topology, TopologyOptions};

const SEED: [u8; 32] = [0x3c; 32];

/// An acknowledged publish: label, value, and the epoch it was acknowledged for.
type Publish = (Vec<u8>, Vec<u8>, u64);

/// The acknowledged publishes.
type Acked = Arc<Mutex<Vec<Publish>>>;

/// What `ktd` printed and how it exited.
struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

/// The fixture: a fresh cluster (sequencers on 127.0.0.41-43, shards on .51-52, the gateway
/// on .61, epochs every second) that passed `ktd admin status --check`, and a client publishing
/// unique labels through the gateway. Prints every log if the test fails.
struct Runbook {
    topology: Topology,
    stop: Arc<AtomicBool>,
    acked: Acked,
    /// Publishes that failed (each is indeterminate; with a sequencer quorum there are none).
    failed_publishes: Arc<AtomicU64>,
    publisher: Option<tokio::task::JoinHandle<()>>,
}

/// Runs one runbook under a deadline, alone (each starts six processes).
fn runbook<F, Fut>(body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    Deadline::new(Duration::from_secs(120))
        .one_at_a_time()
        .run(body);
}

impl Runbook {
    /// Two shard servers; every partition on both.
    async fn start() -> Self {
        Self::start_with(2, None).await
    }

    /// Three shard servers, replication factor 3: the topology of the replica runbooks.
    async fn replicated() -> Self {
        Self::start_with(3, Some(3)).await
    }

    async fn start_with(shards: u64, replication_factor: Option<u32>) -> Self {
        let public_key = hex::encode(
            ktd_core::vrf::VrfKey::from_seed(&SEED)
                .expect("seed")
                .public_key(),
        );
        assert_ne!(public_key, TEST_VRF_KEY);
        let topology = Topology::start(TopologyOptions {
            seed: SEED,
            ip_base: 40,
            epoch_interval: "1s",
            shards,
            replication_factor,
            init_args: &[],
        });
        let mut cluster = Self {
            topology,
            stop: Arc::new(AtomicBool::new(false)),
            acked: Arc::default(),
            failed_publishes: Arc::default(),
            publisher: None,
        };
        cluster.wait_check_passes("startup").await;
        cluster.publisher = Some(start_publisher(
            cluster.topology.gateway_url(),
            cluster.stop.clone(),
            cluster.acked.clone(),
            cluster.failed_publishes.clone(),
        ));
        cluster
    }

    /// `ktd <args>` with `KTD_SEQUENCERS` and `KTD_ADDR` set, as an operator would run it.
    async fn ktd(&self, args: &[&str]) -> Output {
        let output = tokio::process::Command::new(KTD)
            .args(args)
            .env("KTD_SEQUENCERS", &self.topology.sequencer_list)
            .env("KTD_ADDR", self.topology.gateway_url())
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(Duration::from_secs(60), output)
            .await
            .unwrap_or_else(|_| panic!("ktd {args:?} did not finish within 60 s"))
            .expect("run ktd");
        let result = Output {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        eprintln!(
            "$ ktd {}\n{}{}(exit {})",
            args.join(" "),
            result.stdout,
            result.stderr,
            result.code
        );
        result
    }

    async fn ktd_ok(&self, args: &[&str]) -> String {
        let output = self.ktd(args).await;
        assert_eq!(output.code, 0, "ktd {args:?} failed: {}", output.stderr);
        output.stdout
    }

    async fn status_json(&self) -> Value {
        let stdout = self.ktd_ok(&["admin", "status", "-o", "json"]).await;
        serde_json::from_str(&stdout).expect("status JSON")
    }

    async fn wait_check_passes(&self, what: &str) {
        Poll::new(
            format!("{what}: `ktd admin status --check` to pass"),
            Duration::from_secs(30),
        )
        .every(Duration::from_millis(300))
        .until_ok(|| async {
            let output = self.ktd(&["admin", "status", "--check"]).await;
            if output.code == 0 {
                Ok(())
            } else {
                Err(output.stderr)
            }
        })
        .await;
    }

    /// Waits until `status -o json` satisfies `done` (`what`, within 20 s).
    async fn wait_status(&self, what: &str, done: impl Fn(&Value) -> bool) {
        self.wait_status_within(Duration::from_secs(20), what, done)
            .await;
    }

    /// Waits until `status -o json` satisfies `done` (`what`, within `limit`).
    async fn wait_status_within(&self, limit: Duration, what: &str, done: impl Fn(&Value) -> bool) {
        Poll::new(what, limit)
            .every(Duration::from_millis(200))
            .until_ok(|| async {
                let status = self.status_json().await;
                if done(&status) { Ok(()) } else { Err(status) }
            })
            .await;
    }

    /// `ktd admin add-sequencer --id ID --address ADDR`, retried while the new process starts
    /// (within 30 s); its stdout.
    async fn add_sequencer(&self, id: u64, addr: &str) -> String {
        Poll::new(
            format!("add-sequencer {id} to succeed"),
            Duration::from_secs(30),
        )
        .every(Duration::from_millis(200))
        .until_ok(|| async {
            let output = self
                .ktd(&[
                    "admin",
                    "add-sequencer",
                    "--id",
                    &id.to_string(),
                    "--address",
                    addr,
                ])
                .await;
            if output.code == 0 {
                Ok(output.stdout)
            } else {
                Err(output.stderr)
            }
        })
        .await
    }

    /// The latest committed epoch, as `status -o json` reports it.
    async fn last_committed(&self) -> u64 {
        self.status_json().await["epochs"]["last_committed_epoch"]
            .as_u64()
            .expect("epoch")
    }

    /// Waits until more than `min` publishes were acknowledged, stops the publisher and returns
    /// what it acknowledged.
    async fn stop_publishing(&mut self, min: usize) -> Vec<Publish> {
        let acked = self.acked.clone();
        Poll::new(
            format!("more than {min} acknowledged publishes"),
            Duration::from_secs(30),
        )
        .every(Duration::from_millis(100))
        .until(|| async { (acked.lock().expect("lock").len() > min).then_some(()) })
        .await;
        self.stop.store(true, Ordering::SeqCst);
        if let Some(publisher) = self.publisher.take() {
            publisher.await.expect("publisher");
        }
        self.acked.lock().expect("lock").clone()
    }

    /// Stops the publisher and finds every acknowledged publish through the gateway (verified).
    async fn finish(mut self, runbook: &str) {
        let acked = self.stop_publishing(0).await;
        every_publish_is_found(&self.topology.gateway_url(), &acked, runbook).await;
    }
}

impl Drop for Runbook {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.topology.logs());
        }
    }
}

/// Finds every publish of `acked` (verified lookups) at the gateway at `url`, once the last
/// epoch one was acknowledged for has committed.
async fn every_publish_is_found(url: &str, acked: &[Publish], runbook: &str) {
    let client = Client::connect(url).await.expect("connect");
    if let Some(last) = acked.iter().map(|(_, _, epoch)| *epoch).max() {
        client
            .wait_for_epoch(last)
            .await
            .unwrap_or_else(|error| panic!("{runbook}: epoch {last} never committed: {error:#}"));
    }
    for (label, value, _) in acked {
        let found = client.lookup(label, None).await.unwrap_or_else(|error| {
            panic!(
                "{runbook}: acknowledged {} lost: {error:#}",
                String::from_utf8_lossy(label)
            )
        });
        assert_eq!(&found.value, value);
    }
    eprintln!(
        "{runbook}: {} acknowledged publishes found (verified)",
        acked.len()
    );
}

fn leader_of(status: &Value) -> u64 {
    status["leader_id"].as_u64().expect("leader_id")
}

fn row(status: &Value, id: u64) -> &Value {
    status["sequencers"]
        .as_array()
        .expect("sequencers")
        .iter()
        .find(|row| row["id"].as_u64() == Some(id))
        .unwrap_or_else(|| panic!("no row for node {id} in {status}"))
}

/// Publishes unique labels through the gateway until stopped; records the acknowledged ones.
fn start_publisher(
    url: String,
    stop: Arc<AtomicBool>,
    acked: Acked,
    failed: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut client = None;
        let mut next = 0u64;
        while !stop.load(Ordering::SeqCst) {
            if client.is_none() {
                client = Client::connect(&url).await.ok();
            }
            if let Some(connected) = &client {
                let label = format!("runbook-{next}").into_bytes();
                let value = format!("value-{next}").into_bytes();
                // A failed publish is indeterminate: not recorded, never re-checked.
                match connected
                    .publish(
                        vec![(label.clone(), value.clone())],
                        Some(format!("runbook-key-{next}")),
                    )
                    .await
                {
                    Ok(published) => {
                        acked
                            .lock()
                            .expect("lock")
                            .push((label, value, published.epoch));
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::SeqCst);
                        client = None;
                    }
                }
                next += 1;
            }
            // Pacing, not waiting: about 50 publishes a second while the runbook runs.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

#[test]
fn status_shows_every_member_and_the_check_passes() {
    runbook(|| async {
        let cluster = Runbook::start().await;
        cluster
            .wait_status("an epoch to commit", |status| {
                status["epochs"]["last_committed_epoch"].as_u64() >= Some(1)
            })
            .await;
        let table = cluster.ktd_ok(&["admin", "status"]).await;
        for heading in [
            "SEQUENCERS",
            "EPOCHS",
            "SHARD SERVERS",
            "PARTITIONS",
            "BATCH RETENTION",
            "UP-TO-DATE/MAJORITY",
            "LAG",
            "leader",
        ] {
            assert!(table.contains(heading), "table lacks {heading}: {table}");
        }
        let status = cluster.status_json().await;
        let rows = status["sequencers"].as_array().expect("rows");
        assert_eq!(rows.len(), 3);
        assert_eq!(
            rows.iter().filter(|row| row["role"] == "leader").count(),
            1,
            "one leader: {status}"
        );
        assert!(
            rows.iter().all(|row| row["health"] == "SERVING"),
            "{status}"
        );
        let shards = status["shards"].as_array().expect("shards");
        assert_eq!(shards.len(), 2);
        let partitions: usize = shards
            .iter()
            .map(|shard| shard["partitions"].as_array().expect("partitions").len())
            .sum();
        assert_eq!(
            partitions, 32,
            "every partition held by both servers (replication factor 2): {status}"
        );
        assert_eq!(status["replication_factor"], 2, "{status}");
        let replica_sets = status["partitions"].as_array().expect("partitions");
        assert_eq!(replica_sets.len(), 16, "{status}");
        assert!(
            shards
                .iter()
                .all(|shard| shard["reachable"] == true && shard["health"] == "SERVING"),
            "{status}"
        );
        assert!(
            status["epochs"]["last_commit_age_seconds"]
                .as_f64()
                .is_some()
        );
        // The pre-existing gateway-side summary still works.
        let summary = cluster.ktd_ok(&["status"]).await;
        assert!(summary.contains("sequencer: leader"), "{summary}");
        cluster.finish("status").await;
    });
}

#[test]
fn transfer_leader_moves_leadership_and_refuses_bad_targets() {
    runbook(|| async {
        let cluster = Runbook::start().await;
        let leader = leader_of(&cluster.status_json().await);
        let target = (1..=3).find(|id| *id != leader).expect("a follower");
        let out = cluster
            .ktd_ok(&["admin", "transfer-leader", "--to", &target.to_string()])
            .await;
        assert!(
            out.contains(&format!("leader: node {leader} -> node {target}")),
            "{out}"
        );
        assert_eq!(leader_of(&cluster.status_json().await), target);
        // Usage errors exit 2; failures exit 1 with one error line.
        assert_eq!(
            cluster
                .ktd(&["admin", "transfer-leader", "--to", "x"])
                .await
                .code,
            2
        );
        let refused = cluster
            .ktd(&["admin", "transfer-leader", "--to", "9"])
            .await;
        assert_eq!(refused.code, 1);
        assert_eq!(
            refused.stderr.trim().lines().count(),
            1,
            "{}",
            refused.stderr
        );
        cluster.finish("leader transfer").await;
    });
}

#[test]
fn a_rolling_restart_moves_leadership_first_and_serves_each_process_once_caught_up() {
    runbook(|| async {
        let mut cluster = Runbook::start().await;
        let leader = leader_of(&cluster.status_json().await);
        let mut order: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
        order.push(leader);
        for id in order {
            let status = cluster.status_json().await;
            let was_leader = leader_of(&status) == id;
            let leader_commit = row(&status, leader_of(&status))["committed_index"]
                .as_u64()
                .expect("commit");
            let node = cluster.topology.sequencers.get_mut(&id).expect("node");
            let stopping = Instant::now();
            let exit = node.terminate(Duration::from_secs(20));
            eprintln!(
                "sequencer {id} (leader: {was_leader}) exited {exit:?} {:?} after SIGTERM",
                stopping.elapsed()
            );
            assert!(exit.success(), "sequencer {id} exited with {exit:?}");
            if was_leader {
                // Leadership moved before the process stopped.
                let log = node.log_text();
                let transfer = log
                    .rfind("transferring leadership")
                    .expect("a transfer was started");
                let stopped = log
                    .rfind("sequencer node stopped")
                    .expect("stopped cleanly");
                // (The log has ANSI colour codes between field names and values; match whole
                // messages only.)
                let handed_over = log[transfer..]
                    .find("handed over leadership before stopping")
                    .map(|offset| transfer + offset)
                    .expect("leadership was handed over");
                assert!(
                    handed_over < stopped,
                    "the leader stopped before leadership moved"
                );
            }
            node.restart();
            // Readiness means caught up: when it first says SERVING, it has applied (to within
            // the readiness lag) what the leader had committed before it stopped.
            let addr = node.addr.clone();
            wait_health(&addr, ServingStatus::Serving, "restarted sequencer").await;
            let client = sequencer::SequencerClient::new([addr.clone()]);
            let applied = client
                .node_status_at(&addr)
                .await
                .expect("node status")
                .applied_index;
            assert!(
                applied + sequencer::config::RaftOptions::default().max_apply_lag >= leader_commit,
                "node {id} said SERVING with applied {applied}, the leader had committed {leader_commit}"
            );
            cluster
                .wait_check_passes(&format!("after restarting sequencer {id}"))
                .await;
        }
        for index in 0..cluster.topology.shards.len() {
            let node = &mut cluster.topology.shards[index];
            let exit = node.terminate(Duration::from_secs(20));
            assert!(exit.success(), "shard exited with {exit:?}");
            node.restart();
            let addr = node.addr.clone();
            wait_health(&addr, ServingStatus::Serving, "restarted shard").await;
            cluster.wait_check_passes("after restarting a shard").await;
        }
        let gateway = &mut cluster.topology.gateways[0];
        let exit = gateway.terminate(Duration::from_secs(20));
        assert!(exit.success(), "gateway exited with {exit:?}");
        gateway.restart();
        let addr = gateway.addr.clone();
        wait_health(&addr, ServingStatus::Serving, "restarted gateway").await;
        cluster.finish("rolling restart").await;
    });
}

#[test]
fn a_failed_sequencer_is_replaced_by_a_node_with_a_new_id() {
    runbook(|| async {
        let mut cluster = Runbook::start().await;
        let status = cluster.status_json().await;
        let failed = (1..=3)
            .find(|id| *id != leader_of(&status))
            .expect("follower");
        let topology = &mut cluster.topology;
        topology.sequencers.get_mut(&failed).expect("node").kill9();
        let check = cluster.ktd(&["admin", "status", "--check"]).await;
        assert_eq!(check.code, 1, "a dead member fails the check");
        assert!(
            check
                .stderr
                .contains(&format!("sequencer {failed} unreachable")),
            "{}",
            check.stderr
        );
        tracing::info!("--- its disk is lost: it refuses to come back under its old id");
        {
            let topology = &mut cluster.topology;
            std::fs::remove_dir_all(topology.sequencer_dir(failed))
                .expect("wipe the failed node's data");
            let peers = topology
                .sequencers
                .iter()
                .map(|(id, node)| format!("{id}={}", node.addr))
                .collect::<Vec<_>>()
                .join(",");
            let node = topology.sequencers.get_mut(&failed).expect("node");
            for (attempt, refusal) in [
                (Vec::new(), "A new node needs --init"),
                (
                    vec![
                        "--id".to_string(),
                        failed.to_string(),
                        "--peers".into(),
                        peers,
                        "--join".into(),
                    ],
                    "lost its state and must not rejoin",
                ),
            ] {
                node.spawn(&attempt);
                Poll::new(
                    format!("the wiped node to refuse to start ({refusal})"),
                    Duration::from_secs(30),
                )
                .every(Duration::from_millis(200))
                .until_ok(|| async {
                    let log = node.log_text();
                    log.contains(refusal).then_some(()).ok_or(log)
                })
                .await;
                let exit = node.terminate(Duration::from_secs(10));
                assert!(!exit.success(), "the wiped node must exit with an error");
            }
        }
        cluster
            .ktd_ok(&["admin", "remove-sequencer", "--id", &failed.to_string()])
            .await;
        let topology = &mut cluster.topology;
        topology.sequencers.remove(&failed).expect("node");
        let new_id = 4u64;
        let addr = free_addr("127.0.0.44");
        let mut node =
            topology.sequencer_node(new_id, addr.clone(), &topology.sequencer_dir(new_id));
        node.spawn(&["--id".to_string(), new_id.to_string(), "--join".into()]);
        topology.sequencers.insert(new_id, node);
        let reused = cluster
            .ktd(&["admin", "add-sequencer", "--id", "2", "--address", &addr])
            .await;
        assert_eq!(reused.code, 1, "an id in use is refused");
        let added = cluster.add_sequencer(new_id, &addr).await;
        assert!(added.contains("added as a voter"), "{added}");
        cluster.topology.update_sequencer_list();
        cluster
            .wait_check_passes("after replacing a sequencer")
            .await;
        let status = cluster.status_json().await;
        let mut ids: Vec<u64> = status["sequencers"]
            .as_array()
            .expect("rows")
            .iter()
            .map(|row| row["id"].as_u64().expect("id"))
            .collect();
        ids.sort_unstable();
        let mut expected: Vec<u64> = (1..=3).filter(|id| *id != failed).chain([new_id]).collect();
        expected.sort_unstable();
        assert_eq!(ids, expected);
        cluster.finish("replace a failed sequencer").await;
    });
}

#[test]
fn a_cluster_that_lost_two_of_three_sequencers_is_re_formed_from_the_survivor_keeping_every_publish()
 {
    runbook(|| async {
        let mut cluster = Runbook::start().await;
        let acked = cluster.stop_publishing(40).await;
        // The survivor must hold what was acknowledged: wait until every member has applied the
        // leader's whole log (a committed entry is only sure to be on a majority).
        cluster
            .wait_status("every member to hold the leader's whole log", |status| {
                let leader = row(status, leader_of(status));
                let last = leader["last_log_index"].as_u64();
                leader["committed_index"].as_u64() == last
                    && status["sequencers"]
                        .as_array()
                        .expect("rows")
                        .iter()
                        .all(|member| {
                            member["applied_index"].as_u64() == last
                                && member["last_log_index"].as_u64() == last
                        })
            })
            .await;
        let committed_before = cluster.last_committed().await;
        let status = cluster.status_json().await;
        let survivor = (1..=3)
            .find(|id| *id != leader_of(&status))
            .expect("a follower");
        let lost: Vec<u64> = (1..=3).filter(|id| *id != survivor).collect();
        tracing::info!("--- sequencers {lost:?} and their disks are destroyed");
        for id in &lost {
            let topology = &mut cluster.topology;
            topology.sequencers.get_mut(id).expect("node").kill9();
            std::fs::remove_dir_all(topology.sequencer_dir(*id)).expect("destroy its disk");
        }
        let survivor_dir = cluster.topology.sequencer_dir(survivor);
        let survivor_dir = survivor_dir.display().to_string();
        let force = |extra: &'static [&'static str]| {
            let mut args = vec![
                "admin",
                "force-new-cluster",
                "--data-dir",
                survivor_dir.as_str(),
                "-o",
                "json",
            ];
            args.extend_from_slice(extra);
            args
        };
        let running = cluster.ktd(&force(&["--confirm-quorum-lost"])).await;
        assert_eq!(running.code, 1, "a running node's directory is refused");
        assert!(
            running.stderr.contains("in use by another process"),
            "{}",
            running.stderr
        );
        let node = cluster
            .topology
            .sequencers
            .get_mut(&survivor)
            .expect("survivor");
        node.terminate(Duration::from_secs(20));
        let unconfirmed = cluster.ktd(&force(&[])).await;
        assert_eq!(unconfirmed.code, 2, "the confirmation flag is required");
        let dry_run: Value =
            serde_json::from_str(&cluster.ktd_ok(&force(&["--dry-run"])).await).expect("JSON");
        assert_eq!(dry_run["written"], false);
        let forced: Value =
            serde_json::from_str(&cluster.ktd_ok(&force(&["--confirm-quorum-lost"])).await)
                .expect("JSON");
        assert_eq!(forced["written"], true);
        assert_eq!(forced["node_id"].as_u64(), Some(survivor));
        assert_eq!(forced["previous_voters"], serde_json::json!([1, 2, 3]));
        assert_eq!(forced["removed"], serde_json::json!(lost));
        assert_eq!(
            forced["last_log_index"], dry_run["last_log_index"],
            "the dry run wrote nothing"
        );
        assert_eq!(
            forced["index"].as_u64(),
            forced["last_log_index"].as_u64().map(|last| last + 1),
            "every entry it held is kept"
        );
        let again = cluster.ktd(&force(&["--confirm-quorum-lost"])).await;
        assert_eq!(again.code, 1, "a second rewrite is refused");
        assert!(
            again.stderr.contains("already is the only member"),
            "{}",
            again.stderr
        );

        tracing::info!("--- the survivor starts alone, leads, and takes updates again");
        let topology = &mut cluster.topology;
        topology
            .sequencers
            .get_mut(&survivor)
            .expect("survivor")
            .restart();
        for id in &lost {
            topology.sequencers.remove(id);
        }
        topology.update_sequencer_list();
        cluster.wait_check_passes("the survivor alone").await;
        let status = cluster.status_json().await;
        assert_eq!(leader_of(&status), survivor);
        assert!(cluster.last_committed().await >= committed_before);
        every_publish_is_found(&cluster.topology.gateway_url(), &acked, "lost quorum").await;
        let client = Client::connect(&cluster.topology.gateway_url())
            .await
            .expect("connect");
        let published = client
            .publish(
                vec![(b"after-the-loss".to_vec(), b"still here".to_vec())],
                None,
            )
            .await
            .expect("a publish after the cluster was re-formed");
        assert!(
            published.epoch > committed_before,
            "epochs continue after {committed_before}: {}",
            published.epoch
        );
        client
            .wait_for_epoch(published.epoch)
            .await
            .expect("its epoch commits");
        assert_eq!(
            client
                .lookup(b"after-the-loss", None)
                .await
                .expect("verified lookup")
                .value,
            b"still here"
        );

        tracing::info!("--- a node started under a removed id is refused");
        {
            let old_id = lost[0];
            let addr = free_addr("127.0.0.46");
            let topology = &mut cluster.topology;
            let mut reborn =
                topology.sequencer_node(old_id, addr.clone(), &topology.root().join("reborn"));
            reborn.spawn(&["--id".to_string(), old_id.to_string(), "--join".into()]);
            wait_health(
                &addr,
                ServingStatus::NotServing,
                "a node under a removed id",
            )
            .await;
            let reused = cluster
                .ktd(&[
                    "admin",
                    "add-sequencer",
                    "--id",
                    &old_id.to_string(),
                    "--address",
                    &addr,
                ])
                .await;
            assert_eq!(reused.code, 1, "a removed id is refused");
            assert!(
                reused.stderr.contains("never accepted again"),
                "{}",
                reused.stderr
            );
            reborn.terminate(Duration::from_secs(10));
        }
        tracing::info!("--- two new members join under new ids");
        for (new_id, ip) in [(4u64, "127.0.0.44"), (5, "127.0.0.45")] {
            let topology = &mut cluster.topology;
            let addr = free_addr(ip);
            let mut node =
                topology.sequencer_node(new_id, addr.clone(), &topology.sequencer_dir(new_id));
            node.spawn(&["--id".to_string(), new_id.to_string(), "--join".into()]);
            topology.sequencers.insert(new_id, node);
            cluster.add_sequencer(new_id, &addr).await;
            cluster.topology.update_sequencer_list();
        }
        cluster.wait_check_passes("three members again").await;
        let status = cluster.status_json().await;
        let mut voters: Vec<u64> = status["sequencers"]
            .as_array()
            .expect("rows")
            .iter()
            .filter(|member| member["voter"] == true)
            .map(|member| member["id"].as_u64().expect("id"))
            .collect();
        voters.sort_unstable();
        assert_eq!(voters, vec![survivor, 4, 5]);
        every_publish_is_found(&cluster.topology.gateway_url(), &acked, "lost quorum").await;
    });
}

#[test]
fn a_failed_shard_is_reported_and_serves_again_once_caught_up() {
    runbook(|| async {
        let mut cluster = Runbook::start().await;
        let gateway = cluster.topology.gateways[0].addr.clone();
        cluster.topology.shards[1].kill9();
        // `--check` names the dead server; the gateway's liveness (`""`) never depends on
        // another process, so an orchestrator does not restart healthy gateways.
        Poll::new(
            "`status --check` to name the dead shard server",
            Duration::from_secs(30),
        )
        .until_ok(|| async {
            let check = cluster.ktd(&["admin", "status", "--check"]).await;
            if check.code == 1 && check.stderr.contains("shard server s2 unreachable") {
                Ok(())
            } else {
                Err(format!("exit {}: {}", check.code, check.stderr))
            }
        })
        .await;
        assert_eq!(
            health(&gateway, "").await,
            Ok(ServingStatus::Serving),
            "gateway liveness with a shard down"
        );
        let shard = &mut cluster.topology.shards[1];
        shard.restart();
        let addr = shard.addr.clone();
        wait_health(&addr, ServingStatus::Serving, "restarted shard").await;
        wait_health(&gateway, ServingStatus::Serving, "gateway").await;
        cluster.wait_check_passes("after the shard restart").await;
        let before = cluster.last_committed().await;
        cluster
            .wait_status("an epoch to commit after the shard restart", |status| {
                status["epochs"]["last_committed_epoch"].as_u64() > Some(before)
            })
            .await;
        cluster.finish("shard failure").await;
    });
}

#[test]
fn backup_and_restore_keeps_the_root_and_every_acknowledged_publish() {
    runbook(|| async {
        let started = Instant::now();
        let mut cluster = Runbook::start().await;
        let acked = cluster.stop_publishing(50).await;
        let sealed = cluster.ktd_ok(&["admin", "seal"]).await;
        assert!(
            sealed.contains("sealed and committed epoch") || sealed.contains("nothing to seal"),
            "{sealed}"
        );
        cluster
            .wait_status("the sealed epochs to commit", |status| {
                let epochs = &status["epochs"];
                epochs["last_committed_epoch"].as_u64() >= epochs["last_sealed_epoch"].as_u64()
            })
            .await;
        let snapshots = cluster.ktd_ok(&["admin", "snapshot"]).await;
        assert_eq!(
            snapshots
                .lines()
                .filter(|line| line.contains("snapshot at log index"))
                .count(),
            3,
            "{snapshots}"
        );
        let latest = cluster.ktd_ok(&["epoch"]).await;
        let epoch: u64 = latest
            .split_whitespace()
            .nth(1)
            .and_then(|word| word.parse().ok())
            .expect("epoch N root R");

        // Stop everything gracefully, then copy the data directories.
        let topology = &mut cluster.topology;
        assert!(
            topology.gateways[0]
                .terminate(Duration::from_secs(20))
                .success()
        );
        for node in topology.sequencers.values_mut() {
            assert!(node.terminate(Duration::from_secs(20)).success());
        }
        for node in &mut topology.shards {
            assert!(node.terminate(Duration::from_secs(20)).success());
        }
        let backup = topology.root().join("backup");
        let mut restored_sequencers = BTreeMap::new();
        for (id, node) in &topology.sequencers {
            let copy = backup.join(format!("node-{id}"));
            copy_dir(&topology.sequencer_dir(*id), &copy);
            let mut restored = topology.sequencer_node(*id, node.addr.clone(), &copy);
            restored.restart();
            restored_sequencers.insert(*id, restored);
        }
        topology.sequencers = restored_sequencers;
        let mut restored_shards = Vec::new();
        for node in &topology.shards {
            let copy = backup.join(format!("shard-{}", node.id));
            copy_dir(&topology.shard_dir(node.id), &copy);
            let mut restored = topology.shard_node(node.id, node.addr.clone(), &copy);
            restored.restart();
            restored_shards.push(restored);
        }
        topology.shards = restored_shards;
        topology.gateways[0].restart();
        cluster.wait_check_passes("the restored cluster").await;
        let same = cluster.ktd_ok(&["epoch", &epoch.to_string()]).await;
        assert_eq!(
            same, latest,
            "the restored cluster has the same epoch {epoch} and root"
        );
        let audit = cluster
            .ktd_ok(&["audit", "0", &epoch.to_string(), "--verify"])
            .await;
        assert!(audit.contains("append-only"), "{audit}");
        every_publish_is_found(
            &cluster.topology.gateway_url(),
            &acked,
            "backup and restore",
        )
        .await;
        eprintln!("backup and restore: {:?} in all", started.elapsed());
    });
}

/// Runs one replica runbook (three shard servers, more steps) under a longer deadline, alone.
fn replica_runbook<F, Fut>(body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    Deadline::new(Duration::from_secs(240))
        .one_at_a_time()
        .run(body);
}

/// What a [`Looker`] saw.
#[derive(Debug, Default)]
struct LookerReport {
    /// Verified lookups that found the acknowledged value.
    verified: u64,
    /// Every failed or wrong lookup, with its error.
    failed: Vec<String>,
}

/// A client doing verified lookups of acknowledged publishes (the newest committed one and an
/// older one each round, about 50 a second) until stopped.
struct Looker {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<LookerReport>,
}

impl Looker {
    fn start(url: String, acked: Acked) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut report = LookerReport::default();
                let client = Client::connect(&url).await.expect("connect");
                let mut turn = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(40)).await;
                    let committed = match client.epoch(None).await {
                        Ok(root) => root.epoch,
                        Err(error) => {
                            report.failed.push(format!("latest epoch: {error:#}"));
                            continue;
                        }
                    };
                    let picks: Vec<Publish> = {
                        let acked = acked.lock().expect("lock");
                        let eligible: Vec<&Publish> = acked
                            .iter()
                            .filter(|(_, _, epoch)| *epoch <= committed)
                            .collect();
                        match eligible.last() {
                            None => continue,
                            Some(newest) => vec![
                                (*newest).clone(),
                                eligible[turn.wrapping_mul(7919) % eligible.len()].clone(),
                            ],
                        }
                    };
                    turn += 1;
                    for (label, value, _) in picks {
                        let name = String::from_utf8_lossy(&label).into_owned();
                        match client.lookup(&label, None).await {
                            Ok(found) if found.value == value => report.verified += 1,
                            Ok(found) => report.failed.push(format!(
                                "{name}: found {:?}",
                                String::from_utf8_lossy(&found.value)
                            )),
                            Err(error) => report.failed.push(format!("{name}: {error:#}")),
                        }
                    }
                }
                report
            }
        });
        Self { stop, task }
    }

    async fn stop(self) -> LookerReport {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("looker")
    }
}

impl Runbook {
    /// Waits until `ktd admin status --check` fails naming `problem`.
    async fn wait_check_names(&self, problem: &str) {
        Poll::new(
            format!("`ktd admin status --check` to report {problem:?}"),
            Duration::from_secs(30),
        )
        .every(Duration::from_millis(300))
        .until_ok(|| async {
            let check = self.ktd(&["admin", "status", "--check"]).await;
            if check.code == 1 && check.stderr.contains(problem) {
                Ok(())
            } else {
                Err(format!("exit {}: {}", check.code, check.stderr))
            }
        })
        .await;
    }

    /// Waits until `count` more epochs than `after` have committed.
    async fn wait_commits(&self, after: u64, count: u64, what: &str) -> u64 {
        self.wait_status(
            &format!("{count} epochs to commit after {after} ({what})"),
            |status| status["epochs"]["last_committed_epoch"].as_u64() >= Some(after + count),
        )
        .await;
        self.last_committed().await
    }

    /// The append-only proof from epoch 0 to the latest verifies with stock akd.
    async fn audit_from_genesis(&self) -> u64 {
        let client = Client::connect(&self.topology.gateway_url())
            .await
            .expect("connect");
        let latest = client.epoch(None).await.expect("latest").epoch;
        let audit = client
            .audit(0, latest)
            .await
            .unwrap_or_else(|error| panic!("audit 0..={latest}: {error:#}"));
        assert_eq!(audit.roots.len() as u64, latest + 1);
        latest
    }

    /// Waits until the gateway's own view of the shard map has `server` voting in every
    /// partition it holds (the gateway re-reads the map every few seconds).
    async fn wait_gateway_sees_voter(&self, server: &str) {
        let client = Client::connect(&self.topology.gateway_url())
            .await
            .expect("connect");
        Poll::new(
            format!("the gateway to read from {server} again"),
            Duration::from_secs(30),
        )
        .every(Duration::from_millis(200))
        .until_ok(|| async {
            let status = client
                .cluster_status()
                .await
                .map_err(|error| format!("{error:#}"))?;
            let row = status
                .shards
                .iter()
                .find(|shard| shard.shard_id == server)
                .ok_or("not in the map")?;
            if row.reachable
                && !row.partitions.is_empty()
                && row.learner_partitions.is_empty()
                && row.quarantined_partitions.is_empty()
            {
                Ok(())
            } else {
                Err(format!("{row:?}"))
            }
        })
        .await;
    }

    /// The partitions `server` is an up-to-date voter of, from `status -o json`.
    fn up_to_date_voter_of(status: &Value, server: &str) -> usize {
        status["partitions"]
            .as_array()
            .expect("partitions")
            .iter()
            .filter(|partition| {
                partition["replicas"]
                    .as_array()
                    .expect("replicas")
                    .iter()
                    .any(|replica| {
                        replica["server"] == server
                            && replica["role"] == "voter"
                            && replica["lag_epochs"].as_u64().is_some_and(|lag| lag <= 1)
                    })
            })
            .count()
    }
}

#[test]
fn a_shard_server_down_is_a_non_event_with_three_replicas() {
    replica_runbook(|| async {
        let mut cluster = Runbook::replicated().await;
        cluster.wait_commits(0, 2, "before the first kill").await;
        let looker = Looker::start(cluster.topology.gateway_url(), cluster.acked.clone());
        let gateway = cluster.topology.gateways[0].addr.clone();
        for index in 0..3 {
            let name = format!("s{}", index + 1);
            let before = cluster.last_committed().await;
            cluster.topology.shards[index].kill9();
            let down = Instant::now();
            // Runbook step 1: `status --check` names the server; the directory does not care.
            cluster
                .wait_check_names(&format!("shard server {name} unreachable"))
                .await;
            let committed = cluster
                .wait_commits(before, 2, &format!("{name} down"))
                .await;
            eprintln!(
                "{name} down: epochs {before}..{committed} committed in {:?}",
                down.elapsed()
            );
            for service in ["", "ktd.v1.Directory", "ktd.v1.Directory.Read"] {
                assert_eq!(
                    health(&gateway, service).await,
                    Ok(ServingStatus::Serving),
                    "gateway health {service:?} with {name} down"
                );
            }
            // Step 2: restart it; it replays what it missed and serves once caught up.
            let shard = &mut cluster.topology.shards[index];
            shard.restart();
            let addr = shard.addr.clone();
            wait_health(&addr, ServingStatus::Serving, "restarted shard server").await;
            cluster
                .wait_check_passes(&format!("after {name} restarted"))
                .await;
        }
        let report = looker.stop().await;
        eprintln!(
            "verified lookups: {}, failed: {}",
            report.verified,
            report.failed.len()
        );
        assert!(
            report.failed.is_empty(),
            "lookups failed while a replica was down: {:#?}",
            report.failed
        );
        assert!(report.verified > 100, "{report:?}");
        cluster.audit_from_genesis().await;
        assert_eq!(cluster.failed_publishes.load(Ordering::SeqCst), 0);
        cluster.finish("shard server down").await;
    });
}

#[test]
fn a_lost_shard_disk_is_rebuilt_from_the_other_replicas() {
    replica_runbook(|| async {
        let mut cluster = Runbook::replicated().await;
        let before = cluster.last_committed().await;
        cluster.wait_commits(before, 3, "history to copy").await;
        // The disk of s2 is lost: the server comes back empty under its old id.
        cluster.topology.shards[1].kill9();
        let data_dir = cluster.topology.shard_dir(2);
        std::fs::remove_dir_all(&data_dir).expect("wipe s2");
        let rebuilt = Instant::now();
        cluster.topology.shards[1].restart();
        cluster
            .wait_status_within(
                Duration::from_secs(60),
                "s2 to be an up-to-date voter of every partition again",
                |status| Runbook::up_to_date_voter_of(status, "s2") == 16,
            )
            .await;
        eprintln!("s2 rebuilt in {:?}", rebuilt.elapsed());
        cluster.wait_check_passes("after s2 was rebuilt").await;
        let acked = cluster.stop_publishing(20).await;
        let last = acked.iter().map(|(_, _, epoch)| *epoch).max().unwrap_or(0);
        cluster
            .wait_commits(last, 0, "the last acknowledged publish")
            .await;
        // The copy is real: with s1 and s3 stopped, s2 alone answers every read.
        cluster.wait_gateway_sees_voter("s2").await;
        cluster.topology.shards[0].kill9();
        cluster.topology.shards[2].kill9();
        every_publish_is_found(&cluster.topology.gateway_url(), &acked, "disk lost").await;
        cluster.audit_from_genesis().await;
        cluster.topology.shards[0].restart();
        cluster.topology.shards[2].restart();
        cluster.wait_check_passes("after s1 and s3 restarted").await;
    });
}

#[test]
fn a_replica_that_disagrees_is_quarantined_and_rebuilt() {
    replica_runbook(|| async {
        let mut cluster = Runbook::replicated().await;
        let before = cluster.last_committed().await;
        cluster.wait_commits(before, 2, "history to damage").await;
        // s3's copy of partition 5 goes bad while it is stopped (a bit flipped in every child
        // hash — what a silent disk error does); its built markers still look fine.
        let exit = cluster.topology.shards[2].terminate(Duration::from_secs(20));
        assert!(exit.success(), "s3 exited with {exit:?}");
        let damaged_at = cluster.last_committed().await;
        let data_dir = cluster.topology.shard_dir(3);
        let damaged = tokio::task::spawn_blocking(move || {
            let (store, _) =
                shard::store::RocksStore::open(&data_dir, shard::store::StoreOptions::default())
                    .expect("open s3's store");
            store
                .damage_partition_for_tests(5, damaged_at, 4)
                .expect("damage")
        })
        .await
        .expect("damage task");
        assert!(damaged > 0, "partition 5 had node versions to damage");
        cluster.topology.shards[2].restart();
        // Its next root for partition 5 disagrees with s1 and s2: it is quarantined there (and
        // never read), its copy is rebuilt, and it votes again.
        Poll::new(
            "the coordinator to quarantine s3 in partition 5",
            Duration::from_secs(60),
        )
        .every(Duration::from_millis(300))
        .until(|| async {
            cluster
                .topology
                .sequencers
                .values()
                .any(|node| {
                    node.log_text()
                        .contains("a replica disagrees with its majority")
                })
                .then_some(())
        })
        .await;
        cluster
            .wait_status_within(
                Duration::from_secs(60),
                "s3 to be an up-to-date voter of every partition again",
                |status| Runbook::up_to_date_voter_of(status, "s3") == 16,
            )
            .await;
        cluster.wait_check_passes("after s3 was rebuilt").await;
        cluster.audit_from_genesis().await;
        assert_eq!(cluster.failed_publishes.load(Ordering::SeqCst), 0);
        cluster.finish("replica disagrees").await;
    });
}

impl Runbook {
    /// Starts shard server `s<index>` with an empty data directory (not in the map yet).
    fn start_new_shard(&mut self, index: u64) -> String {
        let addr = free_addr(&format!("127.0.0.{}", 50 + index));
        let topology = &mut self.topology;
        let mut shard = topology.shard_node(index, addr.clone(), &topology.shard_dir(index));
        shard.spawn(&[]);
        topology.shards.push(shard);
        format!("http://{addr}")
    }

    /// Waits (at most 150 s) until the map has `servers` shard servers, none being moved to or
    /// from, none holding a copy the map moved away, each voting in `48 / servers` ± 2
    /// partitions (16 partitions × 3 replicas), and every partition has a majority of
    /// up-to-date voters.
    async fn wait_balanced(&self, servers: usize, what: &str) {
        let share = 48 / servers;
        self.wait_status_within(
            Duration::from_secs(150),
            &format!("{servers} balanced shard servers ({what})"),
            |status| {
                let rows = status["shards"].as_array().expect("shards");
                let moves = status["moves"].as_array().expect("moves");
                let partitions = status["partitions"].as_array().expect("partitions");
                rows.len() == servers
                    && moves.is_empty()
                    && rows.iter().all(|row| {
                        let voter_of = row["voter_of"].as_array().map_or(0, Vec::len);
                        voter_of.abs_diff(share) <= 2
                            && row["learner_of"].as_array().is_some_and(Vec::is_empty)
                            && row["orphaned"].as_array().is_some_and(Vec::is_empty)
                    })
                    && partitions.iter().all(|partition| {
                        partition["up_to_date_voters"].as_u64() >= partition["majority"].as_u64()
                    })
            },
        )
        .await;
    }

    /// Waits until `status` shows a copy moving (to `to`, if given) and returns that move.
    async fn wait_move(&self, to: Option<&str>, what: &str) -> Value {
        let found = Mutex::new(Value::Null);
        self.wait_status_within(
            Duration::from_secs(60),
            &format!("a move in flight ({what})"),
            |status| {
                let step = status["moves"].as_array().and_then(|moves| {
                    moves
                        .iter()
                        .find(|step| to.is_none_or(|to| step["to"] == to))
                        .cloned()
                });
                match step {
                    Some(step) => {
                        *found.lock().expect("lock") = step;
                        true
                    }
                    None => false,
                }
            },
        )
        .await;
        found.into_inner().expect("lock")
    }

    /// Stops the publisher; with no failed publish, every acknowledged publish grouped by the
    /// epoch it was acknowledged for is exactly each epoch's batch: replayed through a stock
    /// `akd::Directory`, every epoch's root must equal the gateway's. Then finds every
    /// acknowledged publish (verified).
    async fn roots_are_stock_akds(mut self, runbook: &str) {
        use akd::storage::StorageManager;
        use akd::storage::memory::AsyncInMemoryDatabase;
        let acked = self.stop_publishing(0).await;
        assert_eq!(
            self.failed_publishes.load(Ordering::SeqCst),
            0,
            "{runbook}: a failed publish makes the batches unknown"
        );
        let url = self.topology.gateway_url();
        let client = Client::connect(&url).await.expect("connect");
        let last = acked
            .iter()
            .map(|(_, _, epoch)| *epoch)
            .max()
            .expect("publishes");
        client
            .wait_for_epoch(last)
            .await
            .expect("the last epoch commits");
        let mut batches: BTreeMap<u64, Vec<(akd::AkdLabel, akd::AkdValue)>> = BTreeMap::new();
        for (label, value, epoch) in &acked {
            batches
                .entry(*epoch)
                .or_default()
                .push((akd::AkdLabel(label.clone()), akd::AkdValue(value.clone())));
        }
        let oracle = akd::Directory::<
            ktd_core::config::WhatsAppV1,
            AsyncInMemoryDatabase,
            ktd_core::vrf::VrfKey,
        >::new(
            StorageManager::new_no_cache(AsyncInMemoryDatabase::new()),
            ktd_core::vrf::VrfKey::from_seed(&SEED).expect("seed"),
            akd::append_only_zks::AzksParallelismConfig::default(),
        )
        .await
        .expect("akd directory");
        for epoch in 1..=last {
            let batch = batches.remove(&epoch).unwrap_or_else(|| {
                panic!("{runbook}: epoch {epoch} holds no acknowledged publish")
            });
            let akd::EpochHash(akd_epoch, akd_root) =
                oracle.publish(batch).await.expect("akd publish");
            assert_eq!(akd_epoch, epoch);
            let ours = client.epoch(Some(epoch)).await.expect("epoch root");
            assert_eq!(
                ours.root_hash, akd_root,
                "{runbook}: epoch {epoch}'s root differs from stock akd's"
            );
        }
        eprintln!("{runbook}: epochs 1..={last} equal stock akd's roots");
        every_publish_is_found(&url, &acked, runbook).await;
    }

    /// `status -o json`'s row of shard server `id`, if it is in the map.
    /// `ktd admin drain-shard --id ID --wait --timeout TIMEOUT`, which must succeed.
    async fn drain(&self, id: &str, timeout: &str) -> String {
        self.ktd_ok(&[
            "admin",
            "drain-shard",
            "--id",
            id,
            "--wait",
            "--timeout",
            timeout,
        ])
        .await
    }

    async fn shard_row(&self, id: &str) -> Option<Value> {
        let status = self.status_json().await;
        status["shards"]
            .as_array()
            .expect("shards")
            .iter()
            .find(|row| row["id"] == id)
            .cloned()
    }
}

#[test]
fn shard_servers_are_replaced_added_and_drained_online() {
    replica_runbook(|| async {
        let mut cluster = Runbook::replicated().await;

        // A maintenance window is recorded in the map (no re-replication while it lasts).
        let out = cluster
            .ktd_ok(&["admin", "maintenance", "--id", "s1", "--for", "10m"])
            .await;
        assert!(out.contains("s1: in maintenance"), "{out}");
        let row = cluster.shard_row("s1").await.expect("s1");
        assert!(row["maintenance_until_ms"].as_u64() > Some(0), "{row}");
        cluster
            .ktd_ok(&["admin", "maintenance", "--id", "s1", "--off"])
            .await;
        let row = cluster.shard_row("s1").await.expect("s1");
        assert_eq!(row["maintenance_until_ms"], 0, "{row}");

        // Replace s2 by a new, empty s4: every copy of s2 is rebuilt on s4, then s2 leaves.
        let s4 = cluster.start_new_shard(4);
        let out = cluster
            .ktd_ok(&[
                "admin",
                "replace-shard",
                "--id",
                "s2",
                "--with",
                "s4",
                "--address",
                &s4,
                "--wait",
                "--timeout",
                "50s",
            ])
            .await;
        assert!(out.contains("s2 holds nothing and left the map"), "{out}");
        assert!(cluster.shard_row("s2").await.is_none(), "s2 left the map");
        cluster
            .wait_status_within(
                Duration::from_secs(60),
                "s4 to vote in every partition",
                |status| Runbook::up_to_date_voter_of(status, "s4") == 16,
            )
            .await;
        let exit = cluster.topology.shards[1].terminate(Duration::from_secs(20));
        assert!(exit.success(), "s2 exited with {exit:?}");
        cluster.wait_check_passes("after s2 was replaced").await;

        // Three servers, replication factor 3: draining one would leave every partition short.
        let refused = cluster.ktd(&["admin", "drain-shard", "--id", "s4"]).await;
        assert_eq!(refused.code, 1, "{}", refused.stdout);
        assert_eq!(
            refused.stderr.trim().lines().count(),
            1,
            "{}",
            refused.stderr
        );
        // A server that still holds copies cannot be removed.
        let refused = cluster.ktd(&["admin", "remove-shard", "--id", "s4"]).await;
        assert_eq!(refused.code, 1, "{}", refused.stdout);

        // s5 joins and takes a share of the copies; then it is drained and leaves again.
        let s5 = cluster.start_new_shard(5);
        let out = cluster
            .ktd_ok(&[
                "admin",
                "add-shard",
                "--id",
                "s5",
                "--address",
                &s5,
                "--rebalance",
                "--wait",
                "--timeout",
                "50s",
            ])
            .await;
        assert!(out.contains("s5 votes in partitions"), "{out}");
        let row = cluster.shard_row("s5").await.expect("s5");
        let share = row["voter_of"].as_array().expect("voter_of").len();
        assert!(
            (8..=16).contains(&share),
            "s5 took {share} of 48 copies: {row}"
        );
        cluster.wait_check_passes("after s5 joined").await;
        let out = cluster.drain("s5", "50s").await;
        assert!(out.contains("s5 holds nothing and left the map"), "{out}");
        cluster.wait_check_passes("after s5 was drained").await;
        cluster.audit_from_genesis().await;
        assert_eq!(cluster.failed_publishes.load(Ordering::SeqCst), 0);
        cluster.finish("replace, add and drain shard servers").await;
    });
}

#[test]
fn a_new_shard_server_is_filled_by_the_balancer_and_a_drained_one_empties_under_load() {
    replica_runbook(|| async {
        let mut cluster = Runbook::replicated().await;
        let looker = Looker::start(cluster.topology.gateway_url(), cluster.acked.clone());

        // Add capacity: the new server joins holding nothing, and the balancer moves copies
        // onto it (one at a time into it), each copied, caught up and promoted before its
        // source stops voting; the sources delete their moved-away copies after the grace.
        let s4 = cluster.start_new_shard(4);
        let out = cluster
            .ktd_ok(&["admin", "add-shard", "--id", "s4", "--address", &s4])
            .await;
        assert!(out.contains("s4"), "{out}");
        let first = cluster.wait_move(Some("s4"), "s4 joined").await;
        assert!(
            first["from"].as_str().is_some_and(|from| from != "s4"),
            "{first}"
        );
        cluster.wait_balanced(4, "s4 joined").await;
        let row = cluster.shard_row("s4").await.expect("s4");
        assert!(row["bytes"].as_u64().is_some(), "{row}");

        // Move a hot partition by hand: partition 0's copy on one of its voters goes to the
        // server that holds none (the balancer may even the counts out again afterwards).
        let status = cluster.status_json().await;
        let voters: Vec<String> = status["partitions"][0]["replicas"]
            .as_array()
            .expect("replicas")
            .iter()
            .filter(|replica| replica["role"] == "voter")
            .map(|replica| replica["server"].as_str().expect("server").to_string())
            .collect();
        let to = ["s1", "s2", "s3", "s4"]
            .into_iter()
            .find(|server| !voters.iter().any(|voter| voter == server))
            .expect("one server holds no copy of partition 0");
        let out = cluster
            .ktd_ok(&[
                "admin",
                "move-partition",
                "--partition",
                "0",
                "--from",
                &voters[0],
                "--to",
                to,
                "--wait",
                "--timeout",
                "60s",
            ])
            .await;
        assert!(out.contains("partition 0 moved"), "{out}");
        assert!(out.contains(to), "{out}");
        cluster.wait_balanced(4, "partition 0 moved").await;

        // Decommission: s1 is drained (marked, so nothing moves onto it), ends holding nothing
        // and leaves the map.
        let out = cluster.drain("s1", "120s").await;
        assert!(out.contains("s1 holds nothing and left the map"), "{out}");
        cluster.wait_balanced(3, "s1 drained").await;
        let exit = cluster.topology.shards[0].terminate(Duration::from_secs(20));
        assert!(exit.success(), "s1 exited with {exit:?}");
        cluster.wait_check_passes("after s1 was drained").await;

        let report = looker.stop().await;
        assert!(
            report.failed.is_empty(),
            "verified lookups failed while copies moved: {:?}",
            report.failed
        );
        assert!(report.verified >= 50, "{report:?}");
        cluster.audit_from_genesis().await;
        cluster
            .roots_are_stock_akds("add capacity and decommission")
            .await;
    });
}

/// The process a [`kill_mid_move`] run SIGKILLs while a copy moves.
#[derive(Clone, Copy, Debug)]
enum MoveVictim {
    /// The sequencer leader: the moves are in the replicated map, the next leader carries them.
    Leader,
    /// The server the copy moves to: the copy it was taking in is abandoned (not held) and
    /// taken again once it is back.
    Destination,
    /// The server the copy moves from: its partitions keep a majority, and the copy comes from
    /// another voter.
    Source,
}

/// Adds s4 to a 3-server RF=3 cluster under a publish and verified-lookup load, SIGKILLs
/// `victim` while a copy moves (restarting it 500 ms later), and checks that the moves finish
/// (balanced, nothing left in flight), that no sample of the status showed a partition with
/// fewer up-to-date voters than its majority, that no verified lookup failed, that the audit
/// from genesis verifies and that every acknowledged publish is found.
async fn kill_mid_move(victim: MoveVictim) {
    let mut cluster = Runbook::replicated().await;
    let watch = MajorityWatch::start(&cluster);
    let looker = Looker::start(cluster.topology.gateway_url(), cluster.acked.clone());
    let s4 = cluster.start_new_shard(4);
    cluster
        .ktd_ok(&["admin", "add-shard", "--id", "s4", "--address", &s4])
        .await;
    let step = cluster
        .wait_move(Some("s4"), &format!("before the {victim:?} dies"))
        .await;
    // (The pause is the fault, not a wait.)
    let node = match victim {
        MoveVictim::Leader => {
            let leader = leader_of(&cluster.status_json().await);
            cluster
                .topology
                .sequencers
                .get_mut(&leader)
                .expect("leader")
        }
        MoveVictim::Destination => &mut cluster.topology.shards[3],
        MoveVictim::Source => {
            let from = step["from"].as_str().expect("from");
            let index: usize = from[1..].parse().expect("s<N>");
            &mut cluster.topology.shards[index - 1]
        }
    };
    node.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    node.restart();

    cluster
        .wait_balanced(4, &format!("after the {victim:?} died"))
        .await;
    cluster.wait_check_passes("after the fault").await;
    let (samples, short) = watch.stop().await;
    assert!(
        short.is_empty(),
        "{victim:?}: partitions below a majority of up-to-date voters: {short:?}"
    );
    assert!(samples >= 10, "{victim:?}: only {samples} status samples");
    let report = looker.stop().await;
    // Lookups fail over between replicas inside the gateway; a leader death may fail the
    // latest-epoch read of a round while no leader answers (the client retries for 20 s).
    assert!(
        report.failed.is_empty(),
        "{victim:?}: verified lookups failed: {:?}",
        report.failed
    );
    cluster.audit_from_genesis().await;
    // A publish in flight when the leader died may have failed (indeterminate); every
    // acknowledged one is there.
    cluster
        .finish(&format!("a move through the death of the {victim:?}"))
        .await;
}

#[test]
fn a_move_finishes_when_the_sequencer_leader_dies_mid_move() {
    replica_runbook(|| kill_mid_move(MoveVictim::Leader));
}

#[test]
fn a_move_finishes_when_its_destination_dies_mid_move() {
    replica_runbook(|| kill_mid_move(MoveVictim::Destination));
}

#[test]
fn a_move_finishes_when_its_source_dies_mid_move() {
    replica_runbook(|| kill_mid_move(MoveVictim::Source));
}

/// Samples `ktd admin status -o json` every 300 ms, recording each partition seen with fewer
/// up-to-date voters (built to within one epoch of the latest committed; status reads the
/// committed epoch and the servers at slightly different moments) than its majority.
/// Samples the leader cannot answer (mid-election) are skipped.
struct MajorityWatch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(u64, Vec<String>)>,
}

impl MajorityWatch {
    fn start(cluster: &Runbook) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sequencers = cluster.topology.sequencer_list.clone();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let (mut samples, mut short) = (0u64, Vec::new());
                while !stop.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let output = tokio::process::Command::new(KTD)
                        .args(["admin", "status", "-o", "json"])
                        .env("KTD_SEQUENCERS", &sequencers)
                        .env("RUST_LOG", "off")
                        .kill_on_drop(true)
                        .output();
                    let Ok(Ok(output)) =
                        tokio::time::timeout(Duration::from_secs(10), output).await
                    else {
                        continue;
                    };
                    let Ok(status) = serde_json::from_slice::<Value>(&output.stdout) else {
                        continue;
                    };
                    let Some(partitions) = status["partitions"].as_array() else {
                        continue;
                    };
                    samples += 1;
                    for partition in partitions {
                        let replicas = partition["replicas"]
                            .as_array()
                            .map_or(&[][..], Vec::as_slice);
                        let current = replicas
                            .iter()
                            .filter(|replica| {
                                replica["role"] == "voter"
                                    && replica["lag_epochs"].as_u64().is_some_and(|lag| lag <= 1)
                            })
                            .count() as u64;
                        if Some(current) < partition["majority"].as_u64() {
                            short.push(format!("{partition}"));
                        }
                    }
                }
                (samples, short)
            }
        });
        Self { stop, task }
    }

    /// Stops sampling: how many samples were taken, and the short partitions seen.
    async fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("majority watch")
    }
}

#[test]
fn a_gateway_routing_by_an_hour_old_map_reaches_copies_that_moved() {
    runbook(|| async {
        // One copy of each partition, on s1 or s2; two more gateways that re-read the map only
        // hourly, with metrics to tell which way they found the new owners.
        let mut cluster = Runbook::start_with(2, Some(1)).await;
        let metrics: Vec<String> = (0..2).map(|_| free_addr("127.0.0.64")).collect();
        for addr in &metrics {
            cluster.topology.add_gateway_with(&[
                "--shard-map-refresh",
                "1h",
                "--metrics-listen",
                addr,
            ]);
        }
        let stale: Vec<Client> = futures::future::join_all(
            cluster.topology.gateways[1..]
                .iter()
                .map(|gateway| crate::support::cluster::connect(&gateway.addr)),
        )
        .await;
        // Twenty acknowledged publishes, committed; both stale gateways read them (and cache
        // the map).
        let acked = {
            let acked = cluster.acked.clone();
            Poll::new("20 acknowledged publishes", Duration::from_secs(30))
                .every(Duration::from_millis(100))
                .until(|| async {
                    let acked = acked.lock().expect("lock");
                    (acked.len() >= 20).then(|| acked[..20].to_vec())
                })
                .await
        };
        let before = acked
            .iter()
            .map(|(_, _, epoch)| *epoch)
            .max()
            .expect("epochs");
        for client in &stale {
            client.wait_for_epoch(before).await.expect("committed");
            for (label, value, _) in &acked {
                let found = client.lookup(label, Some(before)).await.expect("lookup");
                assert_eq!(&found.value, value);
            }
        }

        // Decommission s1: its partitions move to s2, s1 leaves the map and stops.
        let out = cluster.drain("s1", "60s").await;
        assert!(out.contains("s1 holds nothing and left the map"), "{out}");
        let exit = cluster.topology.shards[0].terminate(Duration::from_secs(20));
        assert!(exit.success(), "s1 exited with {exit:?}");

        // The first stale gateway reads the old epoch, whose record names the old map: s1
        // does not answer, so the gateway re-reads the map and reads again from s2.
        for (label, value, _) in &acked {
            let found = stale[0]
                .lookup(label, Some(before))
                .await
                .unwrap_or_else(|error| panic!("lookup at epoch {before}: {error:#}"));
            assert_eq!(&found.value, value);
        }
        let scrape = crate::support::metrics::scrape(&metrics[0]).await;
        let rerouted = scrape.value("ktd_gateway_rerouted_reads_total", &[]);
        assert!(rerouted >= Some(1.0), "rerouted reads: {rerouted:?}");

        // The second reads the latest epoch, committed under the new map: it re-reads the map
        // before reading, and no read fails first.
        let latest = cluster
            .wait_commits(cluster.last_committed().await, 1, "new map")
            .await;
        stale[1].wait_for_epoch(latest).await.expect("committed");
        for (label, value, _) in &acked {
            let found = stale[1]
                .lookup(label, None)
                .await
                .expect("lookup at the latest");
            assert_eq!(&found.value, value);
        }
        let scrape = crate::support::metrics::scrape(&metrics[1]).await;
        let refreshed = scrape.value(
            "ktd_gateway_shard_map_refreshes_total",
            &[("reason", "epoch_record")],
        );
        assert!(
            refreshed >= Some(1.0),
            "map re-reads for an epoch: {refreshed:?}"
        );
        let rerouted = scrape.value("ktd_gateway_rerouted_reads_total", &[]);
        assert!(
            rerouted.unwrap_or(0.0) == 0.0,
            "rerouted reads: {rerouted:?}"
        );
        cluster.finish("reads racing a move").await;
    });
}

/// `ktd admin retention show -o json`.
async fn retention_shown(cluster: &Runbook) -> Value {
    admin_json(cluster, &["retention", "show"]).await
}

/// `ktd admin retention show -o json`'s safe epoch.
async fn safe_epoch(cluster: &Runbook) -> u64 {
    retention_shown(cluster).await["safe_epoch"]
        .as_u64()
        .expect("safe epoch")
}

/// A verified lookup of `label` at `epoch` must be refused with `OUT_OF_RANGE` naming an oldest
/// readable epoch above it (`Some(oldest)`: exactly that one). The gateway may take one map
/// refresh to learn a new safe epoch; a shard refuses meanwhile.
async fn refused_below(client: &Client, label: &[u8], epoch: u64, oldest: Option<u64>) {
    Poll::new(
        format!("a lookup at epoch {epoch} to be refused as pruned"),
        Duration::from_secs(20),
    )
    .every(Duration::from_millis(250))
    .until_ok(|| async {
        match client.lookup(label, Some(epoch)).await {
            Err(error)
                if error
                    .oldest_epoch()
                    .is_some_and(|found| found > epoch && oldest.is_none_or(|o| o == found)) =>
            {
                Ok(())
            }
            other => Err(format!("{:?}", other.map(|found| found.at.epoch))),
        }
    })
    .await;
}

#[test]
fn a_history_window_prunes_old_tree_versions_refuses_older_reads_and_a_hold_keeps_its_epoch() {
    runbook(|| async {
        let mut cluster = Runbook::start().await;
        let client = crate::support::cluster::connect(&cluster.topology.gateways[0].addr).await;
        // Publishes land in epochs 1, 2, ...; pin epoch 3 before any window applies.
        let first = cluster.wait_commits(0, 4, "history to keep").await;
        let hold = cluster
            .ktd_ok(&[
                "admin",
                "retention",
                "hold",
                "--id",
                "drill",
                "--epoch",
                "3",
                "--for",
                "10m",
                "--reason",
                "runbook",
            ])
            .await;
        assert!(hold.contains("drill"), "{hold}");
        cluster
            .ktd_ok(&["admin", "retention", "set-window", "5e"])
            .await;
        // The hold keeps epoch 3 readable while the window moves on.
        cluster.wait_commits(first, 8, "past the window").await;
        Poll::new("the safe epoch to reach the hold", Duration::from_secs(20))
            .until(|| async { (safe_epoch(&cluster).await == 3).then_some(()) })
            .await;
        let early = {
            let acked = cluster.acked.lock().expect("lock");
            acked
                .iter()
                .find(|(_, _, epoch)| *epoch <= 3)
                .cloned()
                .expect("a publish in epochs 1..=3")
        };
        let at_hold = client
            .lookup(&early.0, Some(3))
            .await
            .expect("epoch 3 held");
        assert_eq!(at_hold.at.epoch, 3);
        refused_below(&client, &early.0, 2, Some(3)).await;

        // Released: the safe epoch follows the window, both shards prune below it, reads
        // below it are refused and every epoch inside it verifies.
        cluster
            .ktd_ok(&["admin", "retention", "release", "--id", "drill"])
            .await;
        let acked = cluster.stop_publishing(0).await;
        let safe = Poll::new(
            "the safe epoch to follow the window",
            Duration::from_secs(20),
        )
        .until(|| async {
            let safe = safe_epoch(&cluster).await;
            (safe > 3).then_some(safe)
        })
        .await;
        cluster
            .wait_status("both shards to prune up to the safe epoch", |status| {
                status["shards"].as_array().is_some_and(|servers| {
                    servers.iter().all(|server| {
                        server["prune_floor"].as_u64() >= Some(safe)
                            && server["pruned_node_versions"].as_u64() > Some(0)
                    })
                })
            })
            .await;
        refused_below(&client, &early.0, safe - 1, None).await;
        let latest = cluster.last_committed().await;
        let found = client
            .lookup(&early.0, Some(latest - 2))
            .await
            .expect("an epoch inside the window is readable");
        assert_eq!(found.at.epoch, latest - 2);
        client
            .audit(latest - 3, latest)
            .await
            .expect("the window's audit verifies");
        let below = client
            .audit(safe - 1, latest)
            .await
            .expect_err("an audit from below the window");
        assert!(below.oldest_epoch() > Some(safe - 1), "{below}");
        every_publish_is_found(&cluster.topology.gateway_url(), &acked, "history retention").await;
    });
}

/// The pin `follow-auditor --name runbook` keeps: (epoch, created at).
async fn auditor_pin(cluster: &Runbook) -> Option<(u64, u64)> {
    retention_shown(cluster).await["pins"]
        .as_array()
        .expect("pins")
        .iter()
        .find(|pin| pin["id"] == "auditor-runbook")
        .map(|pin| {
            assert_eq!(pin["owner"], "auditor", "{pin}");
            (
                pin["epoch"].as_u64().expect("epoch"),
                pin["created_at_ms"].as_u64().expect("created at"),
            )
        })
}

#[test]
fn a_registered_auditor_holds_history_at_its_newest_verified_epoch_until_it_catches_up() {
    runbook(|| async {
        let state = tempfile::tempdir().expect("tempdir");
        let auditor_dir = state.path().join("auditor");
        let cluster = Runbook::start().await;
        let client = crate::support::cluster::connect(&cluster.topology.gateways[0].addr).await;
        let gateway = cluster.topology.gateway_url();
        let first = cluster.wait_commits(0, 3, "epochs to audit").await;
        let (auditor, url, task) = start_auditor(&auditor_dir, &gateway).await;
        let wait_signed = |auditor: Arc<ktd_auditor::Auditor>, epoch: u64| async move {
            Poll::new(
                format!("the auditor to sign epoch {epoch}"),
                Duration::from_secs(60),
            )
            .until(|| {
                let auditor = auditor.clone();
                async move { auditor.latest().filter(|head| head.epoch >= epoch) }
            })
            .await
        };
        wait_signed(auditor.clone(), first).await;
        let follow = |url: &str| {
            [
                "admin",
                "retention",
                "follow-auditor",
                "--auditor",
                url,
                "--name",
                "runbook",
                "--once",
                "--hold-for",
                "10m",
                "-o",
                "json",
            ]
            .map(str::to_owned)
        };
        let round = |args: [String; 12]| {
            let cluster = &cluster;
            async move {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let stdout = cluster.ktd_ok(&args).await;
                serde_json::from_str::<Value>(stdout.trim()).expect("one JSON report")
            }
        };
        let report = round(follow(&url)).await;
        let pinned = report["pin_epoch"].as_u64().expect("pin epoch");
        assert_eq!(
            report["last_verified_epoch"].as_u64(),
            Some(pinned),
            "{report}"
        );
        assert!(pinned >= first, "{report}");
        assert_eq!(report["behind_window"], false, "{report}");
        let (held, created_at) = auditor_pin(&cluster).await.expect("the auditor's pin");
        assert_eq!(held, pinned);

        // The auditor stops. A short window moves on, but not past the auditor's epoch: the
        // blob it needs next is still served.
        drop(task);
        drop(auditor);
        cluster
            .ktd_ok(&["admin", "retention", "set-window", "2e"])
            .await;
        cluster.wait_commits(pinned, 6, "past the window").await;
        Poll::new(
            "the safe epoch to reach the auditor's pin",
            Duration::from_secs(20),
        )
        .until(|| async { (safe_epoch(&cluster).await == pinned).then_some(()) })
        .await;
        client
            .audit(pinned, pinned + 1)
            .await
            .expect("the stopped auditor's next blob is still served");
        // Asking an auditor that is down fails and leaves the pin (and its age) as it was.
        let down = cluster
            .ktd(&follow(&url).each_ref().map(String::as_str))
            .await;
        assert_eq!(down.code, 1, "{}", down.stderr);
        assert!(
            down.stderr.contains(&format!("auditor {url}")),
            "{}",
            down.stderr
        );
        assert_eq!(auditor_pin(&cluster).await, Some((pinned, created_at)));
        assert_eq!(safe_epoch(&cluster).await, pinned);

        // Back, it resumes from its state and catches up; the next round moves the pin and
        // the window follows.
        let (auditor, url, _task) = start_auditor(&auditor_dir, &gateway).await;
        let latest = cluster.last_committed().await;
        wait_signed(auditor.clone(), latest).await;
        let report = round(follow(&url)).await;
        let moved = report["pin_epoch"].as_u64().expect("pin epoch");
        assert!(moved >= latest, "{report}");
        let (held, moved_at) = auditor_pin(&cluster).await.expect("the auditor's pin");
        assert_eq!(held, moved);
        assert!(
            moved_at > created_at,
            "a moved pin is a new pin: {moved_at} vs {created_at}"
        );
        Poll::new(
            "the safe epoch to move past the old pin",
            Duration::from_secs(20),
        )
        .until(|| async { (safe_epoch(&cluster).await > pinned).then_some(()) })
        .await;

        // Deregistered: the pin is gone.
        let released = cluster
            .ktd_ok(&[
                "admin",
                "retention",
                "follow-auditor",
                "--auditor",
                &url,
                "--name",
                "runbook",
                "--release",
            ])
            .await;
        assert!(released.contains("auditor-runbook"), "{released}");
        assert_eq!(auditor_pin(&cluster).await, None);
        cluster.finish("registered auditor").await;
    });
}

/// `ktd admin verify-backup` or `restore` failed at the node-by-node root check.
fn refused_by_the_root_check(output: &Output) {
    assert_eq!(output.code, 1, "{}", output.stderr);
    assert!(
        output
            .stderr
            .contains("does not hash to the committed root"),
        "{}",
        output.stderr
    );
}

/// An in-process auditor following the gateway at `gateway_url`, served on ephemeral ports:
/// the auditor, its gRPC URL, and the task serving and following it (aborted when dropped).
async fn start_auditor(
    data_dir: &std::path::Path,
    gateway_url: &str,
) -> (
    Arc<ktd_auditor::Auditor>,
    String,
    tokio_util::task::AbortOnDropHandle<()>,
) {
    let auditor = ktd_auditor::Auditor::open(ktd_auditor::AuditorSettings {
        namespace: "runbook.key-transparency.v1".into(),
        data_dir: data_dir.to_path_buf(),
        signing_key: [0x44; 32],
        config: ktd_core::AkdConfig::WhatsAppV1,
        start: None,
        source: ktd_auditor::BlobSource::Gateway(gateway_url.to_owned()),
        poll: Duration::from_millis(100),
        log_directory: None,
    })
    .expect("open the auditor");
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let http = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", grpc.local_addr().expect("addr"));
    let task = {
        let auditor = auditor.clone();
        tokio::spawn(async move {
            let stop = tokio_util::sync::CancellationToken::new();
            let follower = tokio::spawn(auditor.clone().follow(stop.clone()));
            let _ = ktd_auditor::server::serve(auditor, grpc, http, std::future::pending()).await;
            stop.cancel();
            let _ = follower.await;
        })
    };
    (auditor, url, tokio_util::task::AbortOnDropHandle::new(task))
}

/// `ktd admin <args> -o json` on `cluster`, parsed.
async fn admin_json(cluster: &Runbook, args: &[&str]) -> Value {
    let mut full = vec!["admin"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["-o", "json"]);
    let stdout = cluster.ktd_ok(&full).await;
    serde_json::from_str(&stdout).expect("JSON")
}

/// Rewrites one node version of the backup's largest partition segment so that it still
/// decodes, re-frames it with correct chunk checksums and updates the manifest's checksum: a
/// forger's tampering that only the root check can catch.
fn tamper_consistently(dir: &std::path::Path, epoch: u64) {
    let manifest_path = dir.join(format!("backup-{epoch:020}.json"));
    let mut manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).expect("manifest"))
            .expect("manifest JSON");
    let (partition, segment) = manifest["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .enumerate()
        .flat_map(|(index, partition)| {
            partition["segments"]
                .as_array()
                .expect("segments")
                .iter()
                .enumerate()
                .map(move |(segment, file)| (index, segment, file["records"].as_u64()))
        })
        .max_by_key(|(_, _, records)| *records)
        .map(|(partition, segment, _)| (partition, segment))
        .expect("a segment");
    let entry = &mut manifest["partitions"][partition]["segments"][segment];
    let path = dir
        .join("segments")
        .join(entry["file"].as_str().expect("file"));
    let mut chunks = Vec::new();
    shard::backup::read_segment(&path, |chunk| {
        chunks.push(chunk);
        Ok(())
    })
    .expect("read the segment");
    // The newest node version of the segment (written by the backup's own epoch, so its root
    // reaches it); its last byte is part of a hash, so it still decodes.
    let mut changed = false;
    for chunk in chunks.iter_mut().rev() {
        if !changed && let Some((_, value)) = chunk.nodes.last_mut() {
            let last = value.len() - 1;
            value[last] ^= 0x01;
            changed = true;
        }
        chunk.checksum = shard::api::chunk_checksum(&chunk.nodes, &chunk.users);
    }
    assert!(changed, "the segment holds node versions");
    let mut writer = shard::backup::SegmentWriter::create(&path).expect("rewrite");
    for chunk in &chunks {
        writer.write_chunk(chunk).expect("write");
    }
    let summary = writer.finish().expect("finish");
    entry["blake3"] = Value::String(hex::encode(summary.blake3));
    entry["bytes"] = Value::from(summary.file_bytes);
    std::fs::write(
        &manifest_path,
        serde_json::to_string_pretty(&manifest).expect("JSON"),
    )
    .expect("write the manifest");
}

#[test]
fn a_backup_and_its_archive_taken_under_load_restore_a_new_cluster_to_a_later_epoch_and_tampered_ones_are_refused()
 {
    Deadline::new(Duration::from_secs(300))
        .one_at_a_time()
        .run(|| async {
            let backups = tempfile::tempdir().expect("tempdir");
            let dir = backups.path().join("ktd-backup");
            let dir_text = dir.to_str().expect("utf-8").to_owned();
            let mut cluster = Runbook::start().await;
            // Two backups while publishes keep landing: a full one, then an incremental one
            // over it.
            let first_epoch = cluster.wait_commits(0, 3, "history to back up").await;
            let full = admin_json(&cluster, &["backup", "--to", &dir_text]).await;
            assert!(full["parent_epoch"].is_null(), "{full}");
            let first = full["epoch"].as_u64().expect("epoch");
            assert!(first >= first_epoch, "{full}");
            cluster.wait_commits(first, 3, "more history").await;
            // An auditor follows the directory; the incremental backup keeps its signed head.
            let auditor_dir = backups.path().join("auditor");
            let (auditor, auditor_url, _auditor_task) =
                start_auditor(&auditor_dir, &cluster.topology.gateway_url()).await;
            Poll::new(
                "the auditor to sign the full backup's epoch",
                Duration::from_secs(60),
            )
            .until(|| {
                let auditor = auditor.clone();
                async move { auditor.latest().filter(|head| head.epoch >= first) }
            })
            .await;
            let incremental = admin_json(
                &cluster,
                &["backup", "--to", &dir_text, "--auditor", &auditor_url],
            )
            .await;
            let signed = incremental["auditor_head_epoch"]
                .as_u64()
                .expect("the auditor's head kept");
            let epoch = incremental["epoch"].as_u64().expect("epoch");
            assert!((first..=epoch).contains(&signed), "{incremental}");
            assert_eq!(
                incremental["parent_epoch"].as_u64(),
                Some(first),
                "{incremental}"
            );
            assert!(
                incremental["bytes_written"].as_u64() < incremental["chain_bytes"].as_u64(),
                "an incremental backup copies only what later epochs wrote: {incremental}"
            );
            // The backup pins were released.
            let retention = admin_json(&cluster, &["retention", "show"]).await;
            assert_eq!(
                retention["pins"].as_array().map(Vec::len),
                Some(0),
                "{retention}"
            );
            // The batch archive from the backup on, run as a timer would run it: each run
            // resumes after the newest archived epoch, and its pin holds the batches after it.
            let archived_to = cluster.wait_commits(epoch, 2, "epochs to archive").await;
            let archived = admin_json(&cluster, &["archive", "--to", &dir_text]).await;
            assert_eq!(
                archived["first_epoch"].as_u64(),
                Some(epoch + 1),
                "{archived}"
            );
            let first_run = archived["last_epoch"].as_u64().expect("last_epoch");
            assert!(first_run >= archived_to, "{archived}");
            cluster
                .wait_commits(first_run, 2, "more epochs to archive")
                .await;
            let acked = cluster.stop_publishing(0).await;
            let resumed = admin_json(&cluster, &["archive", "--to", &dir_text]).await;
            let target = resumed["last_epoch"].as_u64().expect("last_epoch");
            assert_eq!(
                resumed["first_epoch"].as_u64(),
                Some(epoch + 1),
                "{resumed}"
            );
            assert_eq!(
                resumed["epochs_written"].as_u64(),
                Some(target - first_run),
                "the second run resumes after the first: {resumed}"
            );
            assert!(target >= first_run + 2, "{resumed}");
            let retention = admin_json(&cluster, &["retention", "show"]).await;
            let pins = retention["pins"].as_array().cloned().unwrap_or_default();
            assert!(
                pins.iter()
                    .any(|pin| pin["owner"] == "archive" && pin["epoch"].as_u64() == Some(target)),
                "the archiver's pin holds the batches after {target}: {retention}"
            );
            let client = Client::connect(&cluster.topology.gateway_url())
                .await
                .expect("connect");
            let mut roots = Vec::new();
            for number in 1..=target {
                roots.push(client.epoch(Some(number)).await.expect("root").root_hash);
            }
            // One more epoch after the archive's newest, signed by the auditor: restoring to
            // the archive's newest rolls a signed epoch back.
            let later = client
                .publish(vec![(b"after-the-archive".to_vec(), b"v".to_vec())], None)
                .await
                .expect("a publish after the archive");
            let later = client
                .wait_for_epoch(later.epoch)
                .await
                .expect("its commit")
                .epoch;
            assert!(later > target);
            Poll::new(
                "the auditor to sign the epoch after the archive",
                Duration::from_secs(60),
            )
            .until(|| {
                let auditor = auditor.clone();
                async move { auditor.latest().filter(|head| head.epoch >= later) }
            })
            .await;
            drop(client);
            let verified = admin_json(&cluster, &["verify-backup", "--from", &dir_text]).await;
            assert_eq!(verified["epoch"].as_u64(), Some(epoch), "{verified}");
            assert!(verified["nodes_checked"].as_u64() > Some(0), "{verified}");
            // A manifest whose auditor head was changed is refused by its signature check.
            let forged_head = backups.path().join("forged-head");
            copy_dir(&dir, &forged_head);
            let manifest_path = forged_head.join(format!("backup-{epoch:020}.json"));
            let mut manifest: Value =
                serde_json::from_str(&std::fs::read_to_string(&manifest_path).expect("manifest"))
                    .expect("manifest JSON");
            manifest["auditor_head"]["namespace"] = Value::String("another.namespace".into());
            std::fs::write(&manifest_path, manifest.to_string()).expect("write");
            let refused = cluster
                .ktd(&[
                    "admin",
                    "verify-backup",
                    "--from",
                    forged_head.to_str().expect("utf-8"),
                ])
                .await;
            assert_eq!(refused.code, 1, "{}", refused.stderr);
            assert!(
                refused.stderr.contains("auditor head"),
                "{}",
                refused.stderr
            );
            let with_archive = admin_json(
                &cluster,
                &[
                    "verify-backup",
                    "--from",
                    &dir_text,
                    "--to-epoch",
                    &target.to_string(),
                ],
            )
            .await;
            assert_eq!(
                with_archive["archived_epochs"].as_u64(),
                Some(target - epoch),
                "{with_archive}"
            );

            // Two tampered copies: a flipped byte is caught by the checksums; a node rewritten
            // with every checksum forged to match is caught by the root check.
            let flipped = backups.path().join("flipped");
            copy_dir(&dir, &flipped);
            let segment = std::fs::read_dir(flipped.join("segments"))
                .expect("segments")
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .filter(|path| path.to_string_lossy().contains("/p"))
                .max_by_key(|path| std::fs::metadata(path).map(|meta| meta.len()).unwrap_or(0))
                .expect("a partition segment");
            let mut bytes = std::fs::read(&segment).expect("read");
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x40;
            std::fs::write(&segment, bytes).expect("write");
            let refused = cluster
                .ktd(&[
                    "admin",
                    "verify-backup",
                    "--from",
                    flipped.to_str().expect("utf-8"),
                ])
                .await;
            assert_eq!(refused.code, 1, "{}", refused.stderr);
            let forged = backups.path().join("forged");
            copy_dir(&dir, &forged);
            tamper_consistently(&forged, epoch);
            let forged_text = forged.to_str().expect("utf-8").to_owned();
            refused_by_the_root_check(
                &cluster
                    .ktd(&["admin", "verify-backup", "--from", &forged_text])
                    .await,
            );

            // The cluster is lost; a new one starts with the same VRF seed and settings.
            drop(cluster);
            let topology = Topology::start(TopologyOptions {
                seed: SEED,
                ip_base: 40,
                epoch_interval: "1s",
                shards: 2,
                replication_factor: None,
                init_args: &[],
            });
            let restored = Runbook {
                topology,
                stop: Arc::new(AtomicBool::new(true)),
                acked: Arc::default(),
                failed_publishes: Arc::default(),
                publisher: None,
            };
            restored
                .wait_check_passes("the new cluster's startup")
                .await;
            // The forged backup is refused before anything is installed…
            refused_by_the_root_check(
                &restored
                    .ktd(&["admin", "restore", "--from", &forged_text])
                    .await,
            );
            assert_eq!(restored.last_committed().await, 0);
            // …so is an archive with a flipped byte, by its checksum…
            let flipped_archive = backups.path().join("flipped-archive");
            copy_dir(&dir, &flipped_archive);
            let last_file = flipped_archive
                .join("archive")
                .join(format!("epoch-{target:020}.seg"));
            let mut bytes = std::fs::read(&last_file).expect("read");
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x40;
            std::fs::write(&last_file, bytes).expect("write");
            let target_text = target.to_string();
            let refused = restored
                .ktd(&[
                    "admin",
                    "restore",
                    "--from",
                    flipped_archive.to_str().expect("utf-8"),
                    "--to-epoch",
                    &target_text,
                ])
                .await;
            assert_eq!(refused.code, 1, "{}", refused.stderr);
            assert!(refused.stderr.contains("checksum"), "{}", refused.stderr);
            assert_eq!(restored.last_committed().await, 0);
            // …and the real one is restored to the archive's newest epoch: the backup, then
            // the archived epochs replayed, each committed only with its archived root.
            // The auditor of the lost cluster signed a later epoch: refused unless forced (and
            // then its heads up to the target are checked against the archived roots).
            let restore_args = [
                "restore",
                "--from",
                &dir_text,
                "--to-epoch",
                &target_text,
                "--auditor",
                &auditor_url,
            ];
            let refused = restored
                .ktd(&[&["admin"][..], &restore_args[..]].concat())
                .await;
            assert_eq!(refused.code, 1, "{}", refused.stderr);
            assert!(
                refused.stderr.contains("newer than the restored epoch"),
                "{}",
                refused.stderr
            );
            assert_eq!(restored.last_committed().await, 0);
            let report =
                admin_json(&restored, &[&restore_args[..], &["--force"][..]].concat()).await;
            assert_eq!(report["epoch"].as_u64(), Some(target), "{report}");
            assert_eq!(report["backup_epoch"].as_u64(), Some(epoch), "{report}");
            assert_eq!(
                report["replayed_epochs"].as_u64(),
                Some(target - epoch),
                "{report}"
            );
            assert_eq!(report["replicas"].as_u64(), Some(2 * 16), "{report}");
            restored.wait_check_passes("after the restore").await;

            // Same roots, every acknowledged publish up to the chosen epoch, an audit from
            // genesis, and new publishes continue the epochs.
            let client = Client::connect(&restored.topology.gateway_url())
                .await
                .expect("connect");
            for (number, root) in (1..=target).zip(&roots) {
                let found = client.epoch(Some(number)).await.expect("restored root");
                assert_eq!(&found.root_hash, root, "epoch {number}'s root");
            }
            let mut latest: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            for (label, value, acked_epoch) in &acked {
                if *acked_epoch <= target {
                    latest.insert(label.clone(), value.clone());
                }
            }
            assert!(!latest.is_empty());
            for (label, value) in &latest {
                let found = client
                    .lookup(label, Some(target))
                    .await
                    .unwrap_or_else(|error| panic!("a restored publish: {error:#}"));
                assert_eq!(&found.value, value);
            }
            let audit = client
                .audit(0, target)
                .await
                .expect("audit of the restored epochs");
            assert_eq!(audit.roots.len() as u64, target + 1);
            let published = client
                .publish(vec![(b"after-restore".to_vec(), b"v1".to_vec())], None)
                .await
                .expect("a publish after the restore");
            assert_eq!(published.epoch, target + 1);
            // Sequence numbers continue after the backup's and the replayed ones: never one
            // already handed out.
            let manifest: Value = serde_json::from_str(
                &std::fs::read_to_string(dir.join(format!("backup-{epoch:020}.json")))
                    .expect("manifest"),
            )
            .expect("manifest JSON");
            let next = manifest["next_sequence"].as_u64().expect("next_sequence");
            let before = acked.iter().filter(|(_, _, e)| *e <= target).count() as u64;
            assert!(
                published.sequence >= next && published.sequence > before,
                "sequence {} after the backup's next {next} and {before} acknowledged updates",
                published.sequence
            );
            client
                .wait_for_epoch(target + 1)
                .await
                .expect("epochs continue after the restore");
            let found = client.lookup(b"after-restore", None).await.expect("lookup");
            assert_eq!(found.value, b"v1");
            eprintln!(
                "backup/restore: backup of epoch {epoch} + archived epochs to {target} restored \
                 with equal roots, {} labels found",
                latest.len()
            );
        });
}
