//! The distributed epoch pipeline (`shard::cluster`) against the in-process directory (itself
//! proven equal to stock akd): one in-process shard, and three shard servers talking gRPC on
//! 127.0.0.1 with leaves delivered shard to shard. Every epoch's root, lookup, history and audit
//! step must equal the in-process directory's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use akd_core::configuration::WhatsAppV1Configuration;
use akd_core::verify::history::HistoryParams;
use akd_core::{AkdLabel, AkdValue};
use ktd_core::AkdConfig;
use ktd_core::ShardMap;
use ktd_core::stitch::TopTree;
use ktd_core::user::UpdateLimits;
use ktd_core::vrf::VrfKey;
use ktd_testkit::with_deadline_blocking;
use shard::Directory;
use shard::api::ShardApi;
use shard::client::{ClientTimeouts, GrpcPeers};
use shard::cluster::{self, ShardSet};
use shard::local::{LocalShard, NoPeers, PeerResolver};
use shard::node::ShardNode;
use shard::server::ShardService;
use shard::store::StoreOptions;

use crate::support::directory::{assert_same_step, open, vrf_seed};
use crate::support::workload;

type Wa = WhatsAppV1Configuration;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn node(path: &std::path::Path, bits: u8, seed: u64) -> Arc<ShardNode<Wa>> {
    let vrf = VrfKey::from_seed(&vrf_seed(seed)).expect("seed");
    Arc::new(
        ShardNode::open(
            path,
            &AkdConfig::WhatsAppV1,
            bits,
            vrf,
            UpdateLimits::default(),
            StoreOptions::default(),
        )
        .expect("open node"),
    )
}

/// Drives `batches` through `shards` and through an in-process directory, comparing as it goes.
async fn compare_with_directory(
    shards: &ShardSet,
    bits: u8,
    seed: u64,
    batches: Vec<Vec<(AkdLabel, AkdValue)>>,
) {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let reference: Directory = open(data_dir.path(), AkdConfig::WhatsAppV1, bits, seed);
    let mut tops = vec![TopTree::<Wa>::new(bits, vec![None; 1 << bits]).expect("empty top")];
    let mut users: Vec<AkdLabel> = Vec::new();
    for batch in batches {
        let epoch = tops.len() as u64;
        let outcome = cluster::run_epoch(
            shards,
            epoch,
            &tops[tops.len() - 1],
            batch.clone(),
            &Default::default(),
        )
        .await
        .expect("run epoch");
        // Running the same epoch again (a re-driven epoch) gives the same result.
        let again = cluster::run_epoch(
            shards,
            epoch,
            &tops[tops.len() - 1],
            batch.clone(),
            &Default::default(),
        )
        .await
        .expect("re-run epoch");
        assert_eq!(outcome.top.root_hash(), again.top.root_hash());
        let expected = reference.publish(batch.clone()).expect("reference publish");
        assert_eq!(
            expected.epoch, epoch,
            "every workload batch changes something"
        );
        assert_eq!(
            outcome.top.root_hash(),
            expected.root_hash,
            "root of epoch {epoch}"
        );
        tops.push(outcome.top);
        users.extend(batch.into_iter().map(|(label, _)| label).take(3));

        let top = &tops[epoch as usize];
        let step = cluster::audit_step(shards, top, epoch - 1)
            .await
            .expect("audit step");
        assert_same_step(
            &step,
            &reference.audit(epoch - 1, epoch).expect("audit").proofs[0],
            "cluster audit",
        );

        for label in users.iter().rev().take(4) {
            let proof = cluster::lookup(shards, top, epoch, label)
                .await
                .expect("lookup");
            assert_eq!(
                proof,
                reference.lookup(label, None).expect("reference lookup").0
            );
            let params = HistoryParams::MostRecent(3);
            let history = cluster::key_history(shards, top, epoch, label, params)
                .await
                .expect("history");
            assert_eq!(
                history,
                reference
                    .key_history(label, params, None)
                    .expect("reference history")
                    .0
            );
        }
    }
    // Past epochs through the cluster too.
    let label = users[0].clone();
    for epoch in [1u64, tops.len() as u64 / 2] {
        let proof = cluster::lookup(shards, &tops[epoch as usize], epoch, &label)
            .await
            .expect("past lookup");
        assert_eq!(
            proof,
            reference.lookup(&label, Some(epoch)).expect("reference").0
        );
    }
}

#[test]
fn one_in_process_shard_matches_the_directory() {
    with_deadline_blocking(Duration::from_secs(120), || {
        let runtime = runtime();
        let (bits, seed) = (4, 31);
        let data_dir = tempfile::tempdir().expect("temp dir");
        let shard = LocalShard::new("dev", node(data_dir.path(), bits, seed), Arc::new(NoPeers));
        let map = ShardMap::even(bits, vec![("dev".into(), String::new())]).expect("map");
        let apis: HashMap<String, Arc<dyn ShardApi>> =
            HashMap::from([("dev".to_string(), Arc::new(shard) as Arc<dyn ShardApi>)]);
        let shards = ShardSet::new(map, apis).expect("shard set");
        let batches = workload::random(seed, 12, 80, 2).batches;
        runtime.block_on(compare_with_directory(&shards, bits, seed, batches));
    });
}

/// Starts a shard gRPC server on 127.0.0.1 (ephemeral port); returns its address.
async fn serve(shard: Arc<dyn ShardApi>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(ShardService::new(shard).into_server())
            .serve_with_incoming(incoming)
            .await
    });
    address
}

#[test]
fn three_grpc_shards_match_the_directory() {
    with_deadline_blocking(Duration::from_secs(180), || {
        let runtime = runtime();
        let (bits, seed) = (4, 32);
        let dirs: Vec<_> = (0..3)
            .map(|_| tempfile::tempdir().expect("temp dir"))
            .collect();
        runtime.block_on(async {
            // Bind first so that the map can name every address; the shards resolve each other
            // through the same pool of gRPC clients the cluster uses.
            let peers = Arc::new(GrpcPeers::new(ClientTimeouts::default()));
            let mut shards_info = Vec::new();
            for (index, dir) in dirs.iter().enumerate() {
                let id = format!("shard-{index}");
                let local: Arc<dyn ShardApi> = Arc::new(LocalShard::new(
                    id.clone(),
                    node(dir.path(), bits, seed),
                    peers.clone() as Arc<dyn PeerResolver>,
                ));
                let address = serve(local).await;
                shards_info.push((id, format!("http://{address}")));
            }
            let map = ShardMap::even(bits, shards_info).expect("map");
            let shards = ShardSet::resolve(map.clone(), peers.as_ref()).expect("shard set");
            let batches = workload::random(seed, 10, 120, 2).batches;
            compare_with_directory(&shards, bits, seed, batches).await;

            // Building an epoch whose leaves were never delivered is refused, not guessed.
            let first = &map.shards[0];
            let error = shards
                .api(&first.id)
                .expect("api")
                .build_epoch(
                    99,
                    vec![(first.partitions[0], None)],
                    vec!["shard-1".into()],
                )
                .await
                .expect_err("no deliveries for epoch 99");
            assert!(
                matches!(
                    &error,
                    shard::Error::Remote {
                        code: tonic::Code::FailedPrecondition,
                        ..
                    }
                ),
                "{error:?}"
            );
        });
    });
}

#[test]
fn an_all_republish_epoch_is_a_heartbeat_that_audits() {
    with_deadline_blocking(Duration::from_secs(60), || {
        let runtime = runtime();
        let seed = 33;
        for bits in [0u8, 2] {
            let data_dir = tempfile::tempdir().expect("temp dir");
            let shard =
                LocalShard::new("dev", node(data_dir.path(), bits, seed), Arc::new(NoPeers));
            let map = ShardMap::even(bits, vec![("dev".into(), String::new())]).expect("map");
            let apis: HashMap<String, Arc<dyn ShardApi>> =
                HashMap::from([("dev".to_string(), Arc::new(shard) as Arc<dyn ShardApi>)]);
            let shards = ShardSet::new(map, apis).expect("shard set");
            runtime.block_on(async {
                let batch: Vec<(AkdLabel, AkdValue)> = (0..20)
                    .map(|i| (AkdLabel(format!("u{i}").into_bytes()), AkdValue::from("v")))
                    .collect();
                let empty = TopTree::<Wa>::new(bits, vec![None; 1 << bits]).expect("empty");
                let first =
                    cluster::run_epoch(&shards, 1, &empty, batch.clone(), &Default::default())
                        .await
                        .expect("epoch 1");
                let heartbeat =
                    cluster::run_epoch(&shards, 2, &first.top, batch, &Default::default())
                        .await
                        .expect("epoch 2");
                assert_eq!(heartbeat.changed, 0);
                assert_eq!(
                    heartbeat.top.root_hash(),
                    first.top.root_hash(),
                    "the root does not change"
                );
                let step = cluster::audit_step(&shards, &heartbeat.top, 1)
                    .await
                    .expect("audit");
                assert!(step.inserted.is_empty());
                assert!(
                    !step.unchanged_nodes.is_empty(),
                    "akd would emit an empty (unverifiable) proof"
                );
                let proof = akd_core::AppendOnlyProof {
                    proofs: vec![step],
                    epochs: vec![1],
                };
                akd::auditor::audit_verify::<Wa>(
                    vec![first.top.root_hash(), heartbeat.top.root_hash()],
                    proof,
                )
                .await
                .expect("a heartbeat step verifies");
                // Lookups at the heartbeat epoch verify with the heartbeat epoch as current.
                let label = AkdLabel::from("u3");
                let lookup = cluster::lookup(&shards, &heartbeat.top, 2, &label)
                    .await
                    .expect("lookup");
                let public_key = VrfKey::from_seed(&vrf_seed(seed))
                    .expect("seed")
                    .public_key();
                akd::client::lookup_verify::<Wa>(
                    &public_key,
                    heartbeat.top.root_hash(),
                    2,
                    label,
                    lookup,
                )
                .expect("lookup at a heartbeat epoch verifies");
            });
        }
    });
}
