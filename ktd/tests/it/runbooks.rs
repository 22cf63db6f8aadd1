//! The README's "Operations runbooks", run step by step with the exact `ktd admin` commands they
//! document, against real processes: 3 sequencers, 2 shards and 1 gateway on 127.0.0.x, while a
//! client publishes through the gateway. Each phase is named after its runbook:
//!
//! 1. **status**: `ktd admin status` (table and `-o json`), `--check`; the old `ktd status`.
//! 2. **leader transfer**: `ktd admin transfer-leader --to ID`.
//! 3. **rolling restart**: SIGTERM each sequencer (followers, then the leader: leadership moves
//!    before the process exits, exit status 0), each shard and the gateway; each restarted
//!    process is NOT_SERVING until caught up, and `status --check` passes before the next.
//! 4. **replace a failed sequencer**: SIGKILL a follower, `remove-sequencer`, wipe it, start a
//!    node with a new id, `add-sequencer`; reusing an id is refused.
//! 5. **shard failure**: SIGKILL a shard: the gateway and `status --check` report it; restart it,
//!    it becomes SERVING once it holds the latest committed epoch, and epochs commit again.
//! 6. **backup and restore**: `seal`, `snapshot`, stop everything (SIGTERM), copy the data
//!    directories, start a cluster from the copies: same latest epoch and root, the audit from
//!    epoch 0 verifies with stock akd, and every acknowledged publish is found (verified).
//!
//! "Disk full" is documented only (see the README).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ktd_client::Client;
use serde_json::Value;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::deadline::with_deadline;
use crate::process::{KtdNode, TEST_VRF_KEY, free_addr, write_vrf_seed};

const SEED: [u8; 32] = [0x3c; 32];

/// The acknowledged publishes: (label, value).
type Acked = Arc<Mutex<Vec<(Vec<u8>, Vec<u8>)>>>;

struct Runbook {
    root: tempfile::TempDir,
    seed_file: String,
    sequencers: BTreeMap<u64, (KtdNode, PathBuf)>,
    shards: Vec<(KtdNode, PathBuf)>,
    gateway: KtdNode,
    /// What `KTD_SEQUENCERS` holds in the runbooks.
    sequencer_list: String,
}

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

fn shard_args(
    index: usize,
    addr: &str,
    data_dir: &Path,
    seed_file: &str,
    sequencers: &str,
) -> Vec<String> {
    [
        "shard",
        "--id",
        &format!("s{index}"),
        "--listen",
        addr,
        "--data-dir",
        &data_dir.display().to_string(),
        "--vrf-seed-file",
        seed_file,
        "--partition-bits",
        "4",
        "--sequencers",
        sequencers,
    ]
    .map(String::from)
    .to_vec()
}

impl Runbook {
    fn start() -> Self {
        let root = tempfile::tempdir().expect("temp dir");
        let seed_file = write_vrf_seed(root.path(), &SEED);
        let public_key = hex::encode(
            ktd_core::vrf::VrfKey::from_seed(&SEED)
                .expect("seed")
                .public_key(),
        );
        assert_ne!(public_key, TEST_VRF_KEY);
        let sequencer_addrs: Vec<(u64, String)> = (1..=3u64)
            .map(|id| (id, free_addr(&format!("127.0.0.{}", 40 + id))))
            .collect();
        let sequencer_list = sequencer_addrs
            .iter()
            .map(|(_, addr)| addr.clone())
            .collect::<Vec<_>>()
            .join(",");
        let mut shards = Vec::new();
        for index in 1..=2usize {
            let addr = free_addr(&format!("127.0.0.{}", 50 + index));
            let data_dir = root.path().join(format!("shard-{index}"));
            let args = shard_args(index, &addr, &data_dir, &seed_file, &sequencer_list);
            let mut node = KtdNode::new(
                &format!("shard-{index}"),
                root.path(),
                index as u64,
                addr,
                args,
            );
            node.spawn(&[]);
            shards.push((node, data_dir));
        }
        let shard_map = shards
            .iter()
            .enumerate()
            .map(|(index, (node, _))| format!("s{}=http://{}", index + 1, node.addr))
            .collect::<Vec<_>>()
            .join(",");
        let peers = sequencer_addrs
            .iter()
            .map(|(id, addr)| format!("{id}={addr}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut sequencers = BTreeMap::new();
        for (id, addr) in sequencer_addrs {
            let data_dir = root.path().join(format!("node-{id}"));
            let mut node = KtdNode::sequencer(root.path(), id, addr, data_dir.clone());
            let mut args = vec![
                "--id".to_string(),
                id.to_string(),
                "--peers".into(),
                peers.clone(),
            ];
            args.extend(epoch_interval());
            if id == 1 {
                args.extend(
                    [
                        "--init",
                        "--vrf-public-key",
                        &public_key,
                        "--shards",
                        &shard_map,
                        "--partition-bits",
                        "4",
                    ]
                    .map(String::from),
                );
            }
            node.spawn(&args);
            sequencers.insert(id, (node, data_dir));
        }
        let gateway_addr = free_addr("127.0.0.60");
        let mut gateway = KtdNode::new(
            "gateway",
            root.path(),
            1,
            gateway_addr.clone(),
            [
                "gateway",
                "--listen",
                &gateway_addr,
                "--sequencers",
                &sequencer_list,
            ]
            .map(String::from)
            .to_vec(),
        );
        gateway.spawn(&[]);
        Self {
            root,
            seed_file,
            sequencers,
            shards,
            gateway,
            sequencer_list,
        }
    }

    fn gateway_url(&self) -> String {
        format!("http://{}", self.gateway.addr)
    }

    /// `ktd <args>` with `KTD_SEQUENCERS` and `KTD_ADDR` set, as an operator would run it.
    async fn ktd(&self, args: &[&str]) -> Output {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_ktd"))
            .args(args)
            .env("KTD_SEQUENCERS", &self.sequencer_list)
            .env("KTD_ADDR", self.gateway_url())
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
        let started = Instant::now();
        loop {
            let output = self.ktd(&["admin", "status", "--check"]).await;
            if output.code == 0 {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{what}: `ktd admin status --check` still fails after 30 s: {}\n{}",
                output.stderr,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    fn logs(&self) -> String {
        self.sequencers
            .values()
            .map(|(node, _)| node)
            .chain(self.shards.iter().map(|(node, _)| node))
            .chain([&self.gateway])
            .map(|node| format!("===== {} =====\n{}", node.addr, node.log_text()))
            .collect()
    }

    fn sequencer_addr_list(&self) -> String {
        self.sequencers
            .values()
            .map(|(node, _)| node.addr.clone())
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Drop for Runbook {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// The flags a sequencer gets at every start besides its address and data directory (a
/// restart from the data directory keeps the id, peers and cluster metadata, but not the local
/// epoch interval).
fn epoch_interval() -> Vec<String> {
    vec!["--epoch-interval".into(), "1s".into()]
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create backup dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

/// The `grpc.health.v1` status (service `""`) of the server at `addr`, if it answers.
async fn health(addr: &str) -> Option<ServingStatus> {
    let check = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .ok()?
            .connect_timeout(Duration::from_millis(500))
            .connect()
            .await
            .ok()?;
        let answer = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .ok()?;
        Some(answer.into_inner().status())
    };
    tokio::time::timeout(Duration::from_secs(2), check)
        .await
        .ok()
        .flatten()
}

async fn wait_health(addr: &str, wanted: ServingStatus, what: &str) {
    let started = Instant::now();
    while health(addr).await != Some(wanted) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{what}: {addr} not {wanted:?} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
                    Ok(_) => acked.lock().expect("lock").push((label, value)),
                    Err(_) => client = None,
                }
                next += 1;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

#[test]
fn operations_runbooks_work_as_documented() {
    with_deadline(Duration::from_secs(150), || async {
        let started = Instant::now();
        let mut cluster = Runbook::start();
        cluster.wait_check_passes("startup").await;
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Acked = Arc::default();
        let publisher = start_publisher(cluster.gateway_url(), stop.clone(), acked.clone());

        tracing::info!("--- runbook: status");
        {
            let began = Instant::now();
            loop {
                let status = cluster.status_json().await;
                if status["epochs"]["last_committed_epoch"].as_u64() >= Some(1) {
                    break;
                }
                assert!(
                    began.elapsed() < Duration::from_secs(20),
                    "no epoch committed: {status}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
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
        }

        tracing::info!("--- runbook: leader transfer");
        {
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
        }

        tracing::info!("--- runbook: rolling restart");
        {
            let leader = leader_of(&cluster.status_json().await);
            let mut order: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
            order.push(leader);
            for id in order {
                let status = cluster.status_json().await;
                let was_leader = leader_of(&status) == id;
                let leader_commit = row(&status, leader_of(&status))["committed_index"]
                    .as_u64()
                    .expect("commit");
                let (node, _) = cluster.sequencers.get_mut(&id).expect("node");
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
                    // (The log has ANSI colour codes between field names and values; match
                    // whole messages only.)
                    let handed_over = log[transfer..]
                        .find("handed over leadership before stopping")
                        .map(|offset| transfer + offset)
                        .expect("leadership was handed over");
                    assert!(
                        handed_over < stopped,
                        "the leader stopped before leadership moved"
                    );
                }
                node.spawn(&epoch_interval());
                // Readiness means caught up: when it first says SERVING, it has applied (to
                // within the readiness lag) what the leader had committed before it stopped.
                let addr = node.addr.clone();
                wait_health(&addr, ServingStatus::Serving, "restarted sequencer").await;
                let client = sequencer::SequencerClient::new([addr.clone()]);
                let applied = client
                    .node_status_at(&addr)
                    .await
                    .expect("node status")
                    .applied_index;
                assert!(
                    applied + sequencer::config::RaftOptions::default().max_apply_lag
                        >= leader_commit,
                    "node {id} said SERVING with applied {applied}, the leader had committed {leader_commit}"
                );
                cluster
                    .wait_check_passes(&format!("after restarting sequencer {id}"))
                    .await;
            }
            for index in 0..cluster.shards.len() {
                let (node, _) = &mut cluster.shards[index];
                let exit = node.terminate(Duration::from_secs(20));
                assert!(exit.success(), "shard exited with {exit:?}");
                node.restart();
                let addr = node.addr.clone();
                wait_health(&addr, ServingStatus::Serving, "restarted shard").await;
                cluster.wait_check_passes("after restarting a shard").await;
            }
            let exit = cluster.gateway.terminate(Duration::from_secs(20));
            assert!(exit.success(), "gateway exited with {exit:?}");
            cluster.gateway.restart();
            wait_health(
                &cluster.gateway.addr.clone(),
                ServingStatus::Serving,
                "restarted gateway",
            )
            .await;
        }

        tracing::info!("--- runbook: replace a failed sequencer");
        {
            let status = cluster.status_json().await;
            let failed = (1..=3)
                .find(|id| *id != leader_of(&status))
                .expect("follower");
            cluster.sequencers.get_mut(&failed).expect("node").0.kill9();
            let check = cluster.ktd(&["admin", "status", "--check"]).await;
            assert_eq!(check.code, 1, "a dead member fails the check");
            assert!(
                check
                    .stderr
                    .contains(&format!("sequencer {failed} unreachable")),
                "{}",
                check.stderr
            );
            cluster
                .ktd_ok(&["admin", "remove-sequencer", "--id", &failed.to_string()])
                .await;
            let (_, data_dir) = cluster.sequencers.remove(&failed).expect("node");
            std::fs::remove_dir_all(&data_dir).expect("wipe the failed node's data");
            let new_id = 4u64;
            let addr = free_addr("127.0.0.44");
            let data_dir = cluster.root.path().join(format!("node-{new_id}"));
            let mut node =
                KtdNode::sequencer(cluster.root.path(), new_id, addr.clone(), data_dir.clone());
            node.spawn(
                &[
                    &["--id".to_string(), new_id.to_string()][..],
                    &epoch_interval(),
                ]
                .concat(),
            );
            cluster.sequencers.insert(new_id, (node, data_dir));
            let reused = cluster
                .ktd(&["admin", "add-sequencer", "--id", "2", "--address", &addr])
                .await;
            assert_eq!(reused.code, 1, "an id in use is refused");
            let started_add = Instant::now();
            let added = loop {
                // The new process may still be starting.
                let output = cluster
                    .ktd(&[
                        "admin",
                        "add-sequencer",
                        "--id",
                        &new_id.to_string(),
                        "--address",
                        &addr,
                    ])
                    .await;
                if output.code == 0 {
                    break output.stdout;
                }
                assert!(
                    started_add.elapsed() < Duration::from_secs(20),
                    "add-sequencer: {}",
                    output.stderr
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            assert!(added.contains("added as a voter"), "{added}");
            cluster.sequencer_list = cluster.sequencer_addr_list();
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
            let mut expected: Vec<u64> =
                (1..=3).filter(|id| *id != failed).chain([new_id]).collect();
            expected.sort_unstable();
            assert_eq!(ids, expected);
        }

        tracing::info!("--- runbook: shard failure");
        {
            let (shard, _) = &mut cluster.shards[1];
            shard.kill9();
            // `--check` names the dead server; the gateway's liveness never depends on another
            // process (replication factor 2: reads still have a replica of every partition).
            let began = Instant::now();
            loop {
                let check = cluster.ktd(&["admin", "status", "--check"]).await;
                if check.code == 1 && check.stderr.contains("shard server s2 unreachable") {
                    break;
                }
                assert!(
                    began.elapsed() < Duration::from_secs(30),
                    "{}",
                    check.stderr
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            assert_eq!(
                health(&cluster.gateway.addr.clone()).await,
                Some(ServingStatus::Serving),
                "gateway liveness with a shard down"
            );
            let (shard, _) = &mut cluster.shards[1];
            shard.restart();
            let addr = shard.addr.clone();
            wait_health(&addr, ServingStatus::Serving, "restarted shard").await;
            wait_health(
                &cluster.gateway.addr.clone(),
                ServingStatus::Serving,
                "gateway",
            )
            .await;
            cluster.wait_check_passes("after the shard restart").await;
            let before = cluster.status_json().await["epochs"]["last_committed_epoch"]
                .as_u64()
                .expect("epoch");
            let began = Instant::now();
            loop {
                let status = cluster.status_json().await;
                if status["epochs"]["last_committed_epoch"].as_u64() > Some(before) {
                    break;
                }
                assert!(
                    began.elapsed() < Duration::from_secs(20),
                    "no epoch committed after the shard restart"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }

        tracing::info!("--- runbook: backup and restore");
        {
            stop.store(true, Ordering::SeqCst);
            publisher.await.expect("publisher");
            let sealed = cluster.ktd_ok(&["admin", "seal"]).await;
            assert!(
                sealed.contains("sealed and committed epoch") || sealed.contains("nothing to seal"),
                "{sealed}"
            );
            let began = Instant::now();
            loop {
                let status = cluster.status_json().await;
                let epochs = &status["epochs"];
                if epochs["last_committed_epoch"].as_u64() >= epochs["last_sealed_epoch"].as_u64() {
                    break;
                }
                assert!(
                    began.elapsed() < Duration::from_secs(20),
                    "sealed epochs did not commit: {status}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
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
            let exit = cluster.gateway.terminate(Duration::from_secs(20));
            assert!(exit.success());
            for (node, _) in cluster.sequencers.values_mut() {
                assert!(node.terminate(Duration::from_secs(20)).success());
            }
            for (node, _) in &mut cluster.shards {
                assert!(node.terminate(Duration::from_secs(20)).success());
            }
            let backup = cluster.root.path().join("backup");
            let mut restored_sequencers = BTreeMap::new();
            for (id, (node, data_dir)) in &cluster.sequencers {
                let copy = backup.join(format!("node-{id}"));
                copy_dir(data_dir, &copy);
                let mut restored =
                    KtdNode::sequencer(cluster.root.path(), *id, node.addr.clone(), copy.clone());
                restored.spawn(&epoch_interval());
                restored_sequencers.insert(*id, (restored, copy));
            }
            cluster.sequencers = restored_sequencers;
            let mut restored_shards = Vec::new();
            for (index, (node, data_dir)) in cluster.shards.iter().enumerate() {
                let copy = backup.join(format!("shard-{}", index + 1));
                copy_dir(data_dir, &copy);
                let args = shard_args(
                    index + 1,
                    &node.addr,
                    &copy,
                    &cluster.seed_file,
                    &cluster.sequencer_list,
                );
                let mut restored = KtdNode::new(
                    &format!("shard-{}", index + 1),
                    cluster.root.path(),
                    node.id,
                    node.addr.clone(),
                    args,
                );
                restored.spawn(&[]);
                restored_shards.push((restored, copy));
            }
            cluster.shards = restored_shards;
            cluster.gateway.restart();
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
            let client = Client::connect(&cluster.gateway_url())
                .await
                .expect("connect");
            let acked = acked.lock().expect("lock").clone();
            assert!(
                acked.len() > 50,
                "only {} publishes acknowledged",
                acked.len()
            );
            for (label, value) in &acked {
                let found = client.lookup(label, None).await.unwrap_or_else(|error| {
                    panic!(
                        "acknowledged {} lost: {error:#}",
                        String::from_utf8_lossy(label)
                    )
                });
                assert_eq!(&found.value, value);
            }
            eprintln!(
                "{} acknowledged publishes found (verified) after the rolling restart, the replacement, the shard failure and the restore; {:?} in all",
                acked.len(),
                started.elapsed()
            );
        }
    });
}
