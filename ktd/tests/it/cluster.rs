//! The distributed directory end to end, over real processes: 3 sequencers, 3 shard servers
//! (16 partitions, each on all three: replication factor 3) and 2 gateways on 127.0.0.x. Seeded
//! random publishes over 22 epochs; after every epoch the root equals a stock `akd::Directory`
//! fed the same batches with the same VRF seed, and lookup/history proofs fetched over gRPC
//! verify with stock akd. Mid-run:
//!
//! - shard server `s2` is killed with SIGKILL in the middle of an epoch and stays down for three
//!   epochs, which commit without it (a majority of every replica set is up), then restarts and
//!   catches up;
//! - shard server `s3` loses its disk (SIGKILL, data directory deleted, restarted empty) and is
//!   rebuilt from its replicas while epochs keep committing;
//! - the sequencer leader is killed with SIGKILL in the middle of an epoch and restarted.
//!
//! Each epoch commits once, with akd's root, and no acknowledged publish is missing (every root
//! matches an oracle fed exactly the acknowledged batches). At the end, with `s1` and `s2`
//! stopped so that the rebuilt `s3` alone answers: one audit over all epochs verifies with
//! `akd::auditor`, absence proofs at old epochs verify, and the latest proofs equal akd's own,
//! field for field. Then a second gateway and a restarted first gateway serve identical roots
//! and proof bytes.

use std::time::Duration;

use akd::storage::StorageManager;
use akd::storage::memory::AsyncInMemoryDatabase;
use akd::{AkdLabel, AkdValue};
use futures::FutureExt;
use ktd_client::{Client, EpochRoot};
use ktd_core::config::WhatsAppV1;
use ktd_core::vrf::VrfKey;
use ktd_proto::ktd::v1 as api;
use ktd_testkit::{Poll, eventually, with_deadline};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::cluster::{Topology, TopologyOptions, connect};

type Oracle = akd::Directory<WhatsAppV1, AsyncInMemoryDatabase, VrfKey>;

const SEED: [u8; 32] = [0x5a; 32];
const EPOCHS: u64 = 22;
const SHARD_KILL_EPOCH: u64 = 8;
const SHARD_RESTART_EPOCH: u64 = 11;
const DISK_LOSS_EPOCH: u64 = 13;
const LEADER_KILL_EPOCH: u64 = 16;

/// Sequencers on 127.0.0.11-13, shards on .21-23, gateways from .31; the test seals every epoch
/// itself, so the batches are known exactly.
fn start() -> Topology {
    Topology::start(TopologyOptions {
        seed: SEED,
        ip_base: 10,
        epoch_interval: "1h",
        shards: 3,
        replication_factor: Some(3),
        init_args: &[],
    })
}

/// Seals the open epoch (retrying through failovers) until `epoch` is committed.
async fn seal_until_committed(client: &Client, epoch: u64) -> EpochRoot {
    Poll::new(format!("epoch {epoch} to commit"), Duration::from_secs(120))
        .every(Duration::from_millis(200))
        .until_ok(|| async {
            if let Ok(root) = client.epoch(Some(epoch)).await {
                return Ok::<_, String>(root);
            }
            // FAILED_PRECONDITION: already sealed by an earlier attempt, wait for its commit.
            let root = client.seal().await.map_err(|error| format!("{error:#}"))?;
            assert_eq!(root.epoch, epoch, "sealed the wrong epoch");
            Ok(root)
        })
        .await
}

/// The sequencer leader's node id.
async fn leader_id(client: &Client) -> u64 {
    let status = client.cluster_status().await.expect("cluster status");
    let leader = status.sequencer.expect("sequencer status").leader_id;
    assert!(leader > 0, "no leader");
    leader
}

/// Raw lookup answers (bytes) of `labels` at `epoch` from the gateway at `client`.
async fn raw_lookups(client: &Client, labels: &[Vec<u8>], epoch: u64) -> Vec<api::LookupResponse> {
    let mut answers = Vec::new();
    for label in labels {
        let answer = client
            .directory()
            .lookup(api::LookupRequest {
                label: label.clone(),
                epoch: Some(epoch),
            })
            .await
            .expect("lookup")
            .into_inner();
        answers.push(answer);
    }
    answers
}

#[test]
fn a_multi_process_cluster_matches_akd_through_failures() {
    with_deadline(Duration::from_secs(600), || async {
        let mut topology = start();
        let result = std::panic::AssertUnwindSafe(run(&mut topology))
            .catch_unwind()
            .await;
        if let Err(panic) = result {
            eprintln!("{}", topology.logs());
            std::panic::resume_unwind(panic);
        }
    });
}

async fn run(topology: &mut Topology) {
    let oracle = Oracle::new(
        StorageManager::new_no_cache(AsyncInMemoryDatabase::new()),
        VrfKey::from_seed(&SEED).expect("seed"),
        akd::append_only_zks::AzksParallelismConfig::default(),
    )
    .await
    .expect("akd directory");
    let client = connect(&topology.gateways[0].addr).await;
    let epoch0 = client.epoch(Some(0)).await.expect("epoch 0");
    let akd_root0 = oracle.get_epoch_hash().await.expect("akd epoch 0");
    assert_eq!(epoch0.root_hash, akd_root0.1, "the empty directory's root");

    let mut rng = StdRng::seed_from_u64(20261126);
    let labels: Vec<Vec<u8>> = (0..90).map(|i| format!("user-{i}").into_bytes()).collect();
    let mut roots = vec![epoch0];
    for epoch in 1..=EPOCHS {
        let count = rng.random_range(8..30);
        let mut chosen: Vec<Vec<u8>> = Vec::new();
        while chosen.len() < count {
            let label = labels[rng.random_range(0..labels.len())].clone();
            if !chosen.contains(&label) {
                chosen.push(label);
            }
        }
        let batch: Vec<(Vec<u8>, Vec<u8>)> = chosen
            .into_iter()
            .map(|label| {
                let value = format!("{}@{epoch}", String::from_utf8_lossy(&label)).into_bytes();
                (label, value)
            })
            .collect();
        let (first, second) = batch.split_at(batch.len() / 2);
        for (part, updates) in [first, second].into_iter().enumerate() {
            let published = client
                .publish(updates.to_vec(), Some(format!("epoch-{epoch}-part-{part}")))
                .await
                .expect("publish");
            assert_eq!(published.epoch, epoch, "updates land in the open epoch");
        }

        if epoch == 1 {
            // While the epoch is open, the shards tail the log and evaluate its VRF labels. Up to
            // 20 s: the shards start tailing only once the cluster has its metadata.
            eventually(
                "a shard to pre-compute a VRF label",
                Duration::from_secs(20),
                || async {
                    let status = client.cluster_status().await.expect("cluster status");
                    let precomputed: u64 = status
                        .shards
                        .iter()
                        .map(|shard| shard.precomputed_labels)
                        .sum();
                    (precomputed > 0).then_some(())
                },
            )
            .await;
        }
        if epoch == SHARD_KILL_EPOCH {
            // s2 dies with the epoch's updates ordered but not built: s1 and s3 are a majority
            // of every replica set, so this epoch and the next two commit without it.
            topology.shards[1].kill9();
        }
        if epoch == SHARD_RESTART_EPOCH {
            topology.shards[1].restart();
        }
        if epoch == DISK_LOSS_EPOCH {
            // s3's disk is lost: it comes back empty under its old id and is rebuilt from s1
            // and s2 (a bootstrap per partition) while this and later epochs commit.
            let shard = &mut topology.shards[2];
            shard.kill9();
            let data_dir = topology.shard_dir(3);
            std::fs::remove_dir_all(&data_dir).expect("wipe s3's data directory");
            topology.shards[2].restart();
        }
        let sealing = {
            let client = client.clone();
            tokio::spawn(async move { client.seal().await })
        };
        // The fixed 700 ms below are the fault, not a wait for a condition: the process stays
        // down while the seal is in flight.
        if epoch == LEADER_KILL_EPOCH {
            let leader = leader_id(&client).await;
            let node = topology.sequencers.get_mut(&leader).expect("leader");
            node.kill9();
            tokio::time::sleep(Duration::from_millis(700)).await;
            node.restart();
        }
        let _ = sealing.await;
        let root = seal_until_committed(&client, epoch).await;

        let akd_batch = batch
            .iter()
            .map(|(label, value)| (AkdLabel(label.clone()), AkdValue(value.clone())))
            .collect();
        let akd_root = oracle.publish(akd_batch).await.expect("akd publish");
        assert_eq!(akd_root.0, epoch);
        assert_eq!(
            root.root_hash, akd_root.1,
            "epoch {epoch}: ktd's root differs from akd's"
        );
        roots.push(root);

        let (label, value) = &batch[rng.random_range(0..batch.len())];
        let found = client.lookup(label, None).await.expect("verified lookup");
        assert_eq!((&found.value, found.epoch, found.at), (value, epoch, root));
        let (at, versions) = client
            .history(label, 0, None)
            .await
            .expect("verified history");
        assert_eq!(at, root);
        assert_eq!(&versions[0].value, value);
    }

    // The rebuilt s3 holds every partition again: its copies were checked against the committed
    // partition roots as they arrived, and its readiness says it holds the latest epoch.
    let s3 = topology.shards[2].addr.clone();
    ktd_testkit::grpc::wait_health(&s3, ServingStatus::Serving, "the rebuilt s3").await;
    eventually(
        "the gateway to see s3 as an up-to-date voter of every partition",
        Duration::from_secs(60),
        || async {
            let status = client.cluster_status().await.ok()?;
            let s3 = status.shards.iter().find(|shard| shard.shard_id == "s3")?;
            (s3.reachable
                && s3.partitions.len() == 16
                && s3.learner_partitions.is_empty()
                && s3.quarantined_partitions.is_empty()
                && s3.min_built_epoch >= EPOCHS)
                .then_some(())
        },
    )
    .await;
    let copied: usize = topology
        .sequencers
        .values()
        .map(|node| node.log_text().matches("partition copied").count())
        .sum();
    assert!(copied >= 16, "s3 was rebuilt by copies ({copied} logged)");
    // From here on s3 answers alone: every proof below comes from the rebuilt copy.
    topology.shards[0].kill9();
    topology.shards[1].kill9();

    // Labels never published are proven absent (at the latest and an earlier epoch); a
    // published label and the empty directory are refused.
    for label in ["nobody-1", "nobody-2", "nobody-3"] {
        for epoch in [None, Some(3)] {
            let absent = client
                .prove_absence(label.as_bytes(), epoch)
                .await
                .expect("verified absence proof");
            assert_eq!(absent.at, roots[epoch.unwrap_or(EPOCHS) as usize]);
        }
        match client.lookup_or_absence(label.as_bytes(), None).await {
            Ok(Err(absent)) => assert_eq!(absent.at.epoch, EPOCHS),
            other => panic!("{label}: expected a verified absence, got {other:?}"),
        }
    }
    let mut published_label = None;
    for label in &labels {
        if client.lookup(label, None).await.is_ok() {
            published_label = Some(label.clone());
            break;
        }
    }
    let published_label = published_label.expect("some label was published");
    let published = client.prove_absence(&published_label, None).await;
    let empty = client.prove_absence(b"nobody-1", Some(0)).await;
    for refused in [published.map(|_| ()), empty.map(|_| ())] {
        let error = refused.expect_err("refused");
        assert_eq!(
            error.code(),
            Some(tonic::Code::FailedPrecondition),
            "{error:#}"
        );
    }

    let audit = client.audit(0, EPOCHS).await.expect("verified audit");
    assert_eq!(audit.roots, roots, "audit roots are the committed roots");

    // The latest proofs are akd's own, field for field.
    for label in labels.iter().take(12) {
        let ours = client
            .directory()
            .lookup(api::LookupRequest {
                label: label.clone(),
                epoch: None,
            })
            .await;
        let theirs = oracle.lookup(AkdLabel(label.clone())).await;
        match (ours, theirs) {
            (Ok(ours), Ok((proof, _))) => {
                let ours: akd::LookupProof = ours
                    .into_inner()
                    .proof
                    .as_ref()
                    .expect("proof")
                    .try_into()
                    .expect("decodes");
                assert_eq!(ours, proof, "lookup proof of {label:?}");
            }
            (Err(status), Err(_)) => assert_eq!(status.code(), tonic::Code::NotFound),
            (ours, theirs) => panic!("{label:?}: ktd {ours:?}, akd {:?}", theirs.map(|_| ())),
        }
    }

    topology.shards[0].restart();
    topology.shards[1].restart();

    // A second gateway, and the first one restarted: identical roots and proof bytes.
    let probe: Vec<Vec<u8>> = labels.iter().take(8).cloned().collect();
    let reference = raw_lookups(&client, &probe, LEADER_KILL_EPOCH).await;
    topology.add_gateway();
    topology.gateways[0].kill9();
    topology.gateways[0].restart();
    for gateway in [&topology.gateways[0], &topology.gateways[1]] {
        let other = connect(&gateway.addr).await;
        for root in &roots {
            assert_eq!(&other.epoch(Some(root.epoch)).await.expect("epoch"), root);
        }
        assert_eq!(
            raw_lookups(&other, &probe, LEADER_KILL_EPOCH).await,
            reference
        );
    }
}
