//! The distributed epoch pipeline (`shard::cluster`) against the in-process directory (itself
//! proven equal to stock akd), with replica sets: one in-process shard (RF 1), three shard
//! servers over gRPC on 127.0.0.1 holding every partition (RF 3), and in-process replica sets
//! with injected faults. Every committed root, lookup, history and audit step must equal the
//! in-process directory's; a minority of replicas down, behind or wrong never changes that.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use akd_core::configuration::WhatsAppV1Configuration;
use akd_core::verify::history::HistoryParams;
use akd_core::{AkdLabel, AkdValue, AzksValue};
use futures::stream::BoxStream;
use ktd_core::proof::{AbsencePlan, HistoryPlan, LookupPlan, StoredLookupProofs};
use ktd_core::stitch::TopTree;
use ktd_core::tree::audit::AppendOnlySlice;
use ktd_core::tree::{LeavesByPartition, NodeRef, PartitionWalk, WalkRequest};
use ktd_core::user::UpdateLimits;
use ktd_core::vrf::VrfKey;
use ktd_core::{AkdConfig, ShardMap};
use ktd_testkit::with_deadline_blocking;
use shard::Directory;
use shard::api::{
    BootstrapSource, BootstrapSummary, BuildSummary, Fence, PartitionChunk, PrepareSummary,
    ShardApi, ShardStatus, UpdateTrace, UserPartitionLeaves,
};
use shard::client::{ClientTimeouts, GrpcPeers, TransferChunks};
use shard::cluster::{self, CommittedEpoch, EpochOutcome, Participation, ReplicaVerdict, ShardSet};
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

fn local(id: &str, path: &std::path::Path, bits: u8, seed: u64) -> Arc<LocalShard<Wa>> {
    Arc::new(LocalShard::load(id, node(path, bits, seed), Arc::new(NoPeers)).expect("load"))
}

/// The fence of a coordinator in `term` driving the epoch after `committed`.
fn fence(map: &ShardMap, term: u64, committed: u64) -> Fence {
    Fence {
        term,
        committed_epoch: committed,
        map: map.clone(),
        safe_epoch: 0,
    }
}

/// One epoch on every healthy voter and learner of `shards`' map.
async fn run(
    shards: &ShardSet,
    epoch: u64,
    base: &TopTree<Wa>,
    batch: Vec<(AkdLabel, AkdValue)>,
) -> EpochOutcome<Wa> {
    let map = shards.map().clone();
    cluster::run_epoch(
        shards,
        &fence(&map, 1, epoch - 1),
        epoch,
        base,
        batch,
        &HashMap::new(),
        &Participation::everyone(&map),
    )
    .await
    .unwrap_or_else(|failure| panic!("epoch {epoch}: {failure}"))
}

/// Drives `batches` through `shards` and through an in-process directory, comparing as it goes.
async fn compare_with_directory(
    shards: &ShardSet,
    bits: u8,
    seed: u64,
    batches: Vec<Vec<(AkdLabel, AkdValue)>>,
) -> Vec<TopTree<Wa>> {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let reference: Directory = open(data_dir.path(), AkdConfig::WhatsAppV1, bits, seed);
    let mut tops = vec![TopTree::<Wa>::new(bits, vec![None; 1 << bits]).expect("empty top")];
    let mut users: Vec<AkdLabel> = Vec::new();
    for batch in batches {
        let epoch = tops.len() as u64;
        let outcome = run(shards, epoch, &tops[tops.len() - 1], batch.clone()).await;
        // Running the same epoch again (a re-driven epoch: built, not committed) gives the same
        // result.
        let again = run(shards, epoch, &tops[tops.len() - 1], batch.clone()).await;
        assert_eq!(outcome.top.root_hash(), again.top.root_hash());
        assert_eq!(outcome.leaf_digests, again.leaf_digests);
        assert!(
            outcome
                .verdicts
                .iter()
                .all(|(_, _, verdict)| *verdict == ReplicaVerdict::Agreed),
            "{:?}",
            outcome.verdicts
        );
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
    tops
}

#[test]
fn one_in_process_shard_matches_the_directory() {
    with_deadline_blocking(Duration::from_secs(120), || {
        let runtime = runtime();
        let (bits, seed) = (4, 31);
        let data_dir = tempfile::tempdir().expect("temp dir");
        let shard = local("dev", data_dir.path(), bits, seed);
        let map = ShardMap::even(bits, 1, vec![("dev".into(), String::new())]).expect("map");
        let apis: HashMap<String, Arc<dyn ShardApi>> =
            HashMap::from([("dev".to_string(), shard as Arc<dyn ShardApi>)]);
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

/// Request messages a deliberately strict shard server decodes: far less than one epoch's share.
const STRICT_MESSAGE_BYTES: usize = 4 << 10;

#[test]
fn epoch_shares_travel_in_parts_so_a_server_that_takes_only_small_messages_still_builds_the_directorys_roots()
 {
    with_deadline_blocking(Duration::from_secs(120), || {
        let runtime = runtime();
        let (bits, seed) = (2, 33);
        let dir = tempfile::tempdir().expect("temp dir");
        runtime.block_on(async {
            let strict = local("strict", dir.path(), bits, seed);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let address = listener.local_addr().expect("address");
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let service = ShardService::new(strict.clone() as Arc<dyn ShardApi>)
                .into_server()
                .max_decoding_message_size(STRICT_MESSAGE_BYTES);
            tokio::spawn(async move {
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(incoming)
                    .await
            });
            let map = ShardMap::even(
                bits,
                1,
                vec![("strict".to_string(), format!("http://{address}"))],
            )
            .expect("map");
            let batches = workload::random(seed, 6, 200, 2).batches;
            let empty = TopTree::<Wa>::new(bits, vec![None; 1 << bits]).expect("empty top");

            // Sent whole, the first epoch's share is refused by the server's message limit, and
            // nothing is written.
            let whole = GrpcPeers::new(ClientTimeouts::default());
            let shards = ShardSet::resolve(map.clone(), &whole).expect("shard set");
            let Err(failure) = cluster::run_epoch(
                &shards,
                &fence(&map, 1, 0),
                1,
                &empty,
                batches[0].clone(),
                &HashMap::new(),
                &Participation::everyone(&map),
            )
            .await
            else {
                panic!("a whole share larger than the server's message limit was accepted");
            };
            assert!(
                failure.to_string().contains("too large"),
                "unexpected failure: {failure}"
            );
            assert!(
                failure.refused,
                "every replica refused the epoch itself: retrying cannot help"
            );

            // In parts, every epoch builds the directory's roots, proofs and audits.
            let chunks = TransferChunks {
                bytes: 1 << 10,
                updates: 8,
            };
            let parted = GrpcPeers::new(ClientTimeouts::default()).with_transfer_chunks(chunks);
            let shards = ShardSet::resolve(map.clone(), &parted).expect("shard set");
            let tops = compare_with_directory(&shards, bits, seed, batches.clone()).await;

            // A recomputation of one user partition's leaves in parts equals the whole one.
            let epoch = 1;
            let user_partition = 1;
            let updates: Vec<_> = batches[0]
                .iter()
                .filter(|(label, _)| {
                    ktd_core::label::user_partition(&label.0, bits) == user_partition
                })
                .cloned()
                .collect();
            assert!(updates.len() > 2 * chunks.updates, "several parts");
            let client = parted.client(&map.servers()[0]).expect("client");
            let parts = client
                .compute_leaves(epoch, user_partition, updates.clone())
                .await
                .expect("leaves in parts");
            let whole = strict
                .compute_leaves(epoch, user_partition, updates)
                .await
                .expect("leaves in process");
            assert_eq!(parts, whole);
            assert_eq!(tops.len(), batches.len() + 1);
        });
    });
}

#[test]
fn three_grpc_replicas_match_the_directory_and_copy_a_partition_to_a_new_one() {
    with_deadline_blocking(Duration::from_secs(240), || {
        let runtime = runtime();
        let (bits, seed) = (4, 32);
        let dirs: Vec<_> = (0..4)
            .map(|_| tempfile::tempdir().expect("temp dir"))
            .collect();
        runtime.block_on(async {
            // Bind first so that the map can name every address; a bootstrapping server reaches
            // its source through the same pool of gRPC clients the cluster uses.
            let peers = Arc::new(GrpcPeers::new(ClientTimeouts::default()));
            let mut servers = Vec::new();
            let nodes: Vec<_> = dirs
                .iter()
                .map(|dir| node(dir.path(), bits, seed))
                .collect();
            for (index, node) in nodes.iter().enumerate() {
                let id = format!("shard-{index}");
                let local: Arc<dyn ShardApi> = Arc::new(
                    LocalShard::load(
                        id.clone(),
                        node.clone(),
                        peers.clone() as Arc<dyn PeerResolver>,
                    )
                    .expect("load"),
                );
                let address = serve(local).await;
                servers.push((id, format!("http://{address}")));
            }
            let map = ShardMap::even(bits, 3, servers[..3].to_vec()).expect("map");
            let shards = ShardSet::resolve(map.clone(), peers.as_ref()).expect("shard set");
            let batches = workload::random(seed, 8, 120, 2).batches;
            let labels: Vec<AkdLabel> = batches
                .iter()
                .flatten()
                .map(|(akd_label, _)| akd_label.clone())
                .collect();
            let tops = compare_with_directory(&shards, bits, seed, batches).await;
            let committed = (tops.len() - 1) as u64;

            // A fourth server copies partition 5 from shard-0 at the committed epoch: the copy
            // is checked node by node against the committed root, and then serves the same proof
            // bytes as the replicas it was copied from.
            let map4 = map
                .with_servers(
                    servers
                        .iter()
                        .map(|(id, address)| ktd_core::shard_map::ShardServer {
                            id: id.clone(),
                            address: address.clone(),
                            maintenance_until_ms: 0,
                            draining: false,
                        })
                        .collect(),
                )
                .expect("map with a fourth server");
            let mut partitions = map4.partitions().to_vec();
            partitions[5].learners.push(ktd_core::shard_map::Learner {
                server: "shard-3".into(),
                replaces: None,
            });
            let with_learner = map4.with_partitions(partitions).expect("learner map");
            let shards4 = ShardSet::resolve(with_learner.clone(), peers.as_ref()).expect("set");
            let summary = shards4
                .api("shard-3")
                .expect("api")
                .bootstrap(
                    &fence(&with_learner, 1, committed),
                    BootstrapSource {
                        partition: 5,
                        epoch: committed,
                        source_id: "shard-0".into(),
                        source_address: servers[0].1.clone(),
                        expected_root: tops[committed as usize].partitions()[5],
                        max_bytes_per_second: 0,
                    },
                )
                .await
                .expect("bootstrap");
            assert!(
                summary.records > 0 && summary.nodes_checked > 0,
                "{summary:?}"
            );
            let status = shards4
                .api("shard-3")
                .expect("api")
                .status()
                .await
                .expect("status");
            assert_eq!(status.partitions, [5]);
            assert_eq!(status.built_epoch, committed);
            let root = tops[committed as usize].partitions()[5].expect("partition 5 has a root");
            let target = WalkRequest {
                root: Some(root),
                target: root.label,
            };
            let copied = shards4
                .api("shard-3")
                .expect("api")
                .walk(vec![target])
                .await
                .expect("walk on the copy");
            let original = shards
                .api("shard-1")
                .expect("api")
                .walk(vec![target])
                .await
                .expect("walk on a voter");
            assert_eq!(copied, original);

            // Copies carry no lookup proofs; the new server's filler stores those of every
            // copied version.
            let copy = nodes[3].clone();
            let vrf = VrfKey::from_seed(&vrf_seed(seed)).expect("seed");
            tokio::task::spawn_blocking(move || {
                assert!(copy.flush_lookup_proofs());
                let mut checked = 0;
                for akd_label in labels {
                    for version in copy
                        .store()
                        .user_versions(&akd_label, u64::MAX)
                        .expect("read")
                    {
                        let stored = copy
                            .store()
                            .lookup_proofs(&akd_label, &[version.version])
                            .expect("read stored lookup proofs")
                            .pop()
                            .flatten();
                        assert_eq!(
                            stored,
                            Some(StoredLookupProofs::compute::<Wa>(
                                &vrf,
                                &akd_label,
                                version.version
                            ))
                        );
                        checked += 1;
                    }
                }
                assert!(checked > 0, "partition 5 holds user versions");
            })
            .await
            .expect("check the copy's lookup proofs");

            // A copy whose expected root is not the source's is refused and left not held.
            let mut wrong = root;
            wrong.hash = AzksValue([7; 32]);
            let error = shards4
                .api("shard-3")
                .expect("api")
                .bootstrap(
                    &fence(&with_learner, 1, committed),
                    BootstrapSource {
                        partition: 5,
                        epoch: committed,
                        source_id: "shard-0".into(),
                        source_address: servers[0].1.clone(),
                        expected_root: Some(wrong),
                        max_bytes_per_second: 0,
                    },
                )
                .await
                .expect_err("a copy that does not hash to the committed root");
            assert!(error.to_string().contains("hash"), "{error}");
            let status = shards4
                .api("shard-3")
                .expect("api")
                .status()
                .await
                .expect("status");
            assert!(status.partitions.is_empty(), "{status:?}");
        });
    });
}

/// The map after a move of `partition` from `from` to `to`: version + 1, `to` in `from`'s seat.
fn moved(map: &ShardMap, partition: usize, from: &str, to: &str, learner: bool) -> ShardMap {
    let mut partitions = map.partitions().to_vec();
    if learner {
        partitions[partition]
            .learners
            .push(ktd_core::shard_map::Learner {
                server: to.into(),
                replaces: Some(from.into()),
            });
    } else {
        partitions[partition].learners.clear();
        for voter in &mut partitions[partition].voters {
            if voter == from {
                *voter = to.into();
            }
        }
    }
    ShardMap::new(
        map.version() + 1,
        map.bits(),
        map.replication_factor(),
        map.servers().to_vec(),
        partitions,
    )
    .expect("moved map")
}

#[test]
fn a_moved_copy_is_copied_resumably_and_the_source_serves_until_its_grace_period_then_deletes_it() {
    with_deadline_blocking(Duration::from_secs(240), || {
        let runtime = runtime();
        let (bits, seed) = (4, 33);
        let dirs: Vec<_> = (0..4)
            .map(|_| tempfile::tempdir().expect("temp dir"))
            .collect();
        runtime.block_on(async {
            let peers = Arc::new(GrpcPeers::new(ClientTimeouts::default()));
            let mut locals = Vec::new();
            let mut servers = Vec::new();
            for (index, dir) in dirs.iter().enumerate() {
                let id = format!("shard-{index}");
                let local = Arc::new(
                    LocalShard::load(
                        id.clone(),
                        node(dir.path(), bits, seed),
                        peers.clone() as Arc<dyn PeerResolver>,
                    )
                    .expect("load")
                    .with_orphan_grace(Duration::from_secs(3600)),
                );
                let address = serve(local.clone()).await;
                locals.push(local);
                servers.push(ktd_core::shard_map::ShardServer {
                    id,
                    address: format!("http://{address}"),
                    maintenance_until_ms: 0,
                    draining: false,
                });
            }
            let three: Vec<(String, String)> = servers[..3]
                .iter()
                .map(|server| (server.id.clone(), server.address.clone()))
                .collect();
            let map = ShardMap::even(bits, 3, three)
                .and_then(|map| map.with_servers(servers.clone()))
                .expect("map");
            let shards = ShardSet::resolve(map.clone(), peers.as_ref()).expect("shard set");
            let batches = workload::random(seed, 4, 120, 2).batches;
            let tops = compare_with_directory(&shards, bits, seed, batches).await;
            let committed = (tops.len() - 1) as u64;
            let root5 = tops[committed as usize].partitions()[5];
            let source = |rate| BootstrapSource {
                partition: 5,
                epoch: committed,
                source_id: "shard-0".into(),
                source_address: servers[0].address.clone(),
                expected_root: root5,
                max_bytes_per_second: rate,
            };

            // Partition 5 moves from shard-0 to shard-3. A copy cut off part-way (its
            // coordinator went away) is reported while it runs and forgotten when it stops, so
            // the next coordinator's copy is not refused.
            let learning = moved(&map, 5, "shard-0", "shard-3", true);
            let api3 = locals[3].clone();
            let slow = {
                let (api3, fence, source) =
                    (api3.clone(), fence(&learning, 1, committed), source(1));
                tokio::spawn(async move { api3.bootstrap(&fence, source).await })
            };
            let copying = ktd_testkit::Poll::new(
                "shard-3 reports the copy in progress",
                Duration::from_secs(30),
            )
            .until_ok(|| {
                let api3 = api3.clone();
                async move {
                    let status = api3.status().await.map_err(|error| error.to_string())?;
                    status
                        .partition_states
                        .iter()
                        .find(|state| {
                            state.partition == 5 && state.copying && state.copied_bytes > 0
                        })
                        .cloned()
                        .ok_or_else(|| format!("{status:?}"))
                }
            })
            .await;
            assert!(!copying.held, "{copying:?}");
            slow.abort();
            ktd_testkit::Poll::new(
                "shard-3 forgets the abandoned copy",
                Duration::from_secs(30),
            )
            .until_ok(|| {
                let api3 = api3.clone();
                async move {
                    let status = api3.status().await.map_err(|error| error.to_string())?;
                    if status.partition_states.iter().any(|state| state.copying) {
                        Err(format!("{status:?}"))
                    } else {
                        Ok(())
                    }
                }
            })
            .await;
            let summary = api3
                .bootstrap(&fence(&learning, 1, committed), source(0))
                .await
                .expect("the copy, started again");
            assert_eq!(summary.epoch, committed);

            // Promoted: the next epoch runs on the new replica set and commits.
            let promoted = moved(&learning, 5, "shard-0", "shard-3", false);
            let moved_shards = ShardSet::resolve(promoted.clone(), peers.as_ref()).expect("set");
            let batch = workload::random(seed + 1, 1, 60, 2).batches.remove(0);
            let outcome = run(
                &moved_shards,
                committed + 1,
                &tops[committed as usize],
                batch,
            )
            .await;
            assert!(
                outcome
                    .verdicts
                    .iter()
                    .all(|(_, _, verdict)| *verdict == ReplicaVerdict::Agreed),
                "{:?}",
                outcome.verdicts
            );

            // shard-0 saw the new map: its copy of partition 5 is moved away, still served
            // (a gateway may still route by the older map) until its grace period ends.
            let status = locals[0].status().await.expect("status");
            let state5 = status
                .partition_states
                .iter()
                .find(|state| state.partition == 5)
                .expect("still held");
            assert!(state5.held && state5.orphaned, "{state5:?}");
            assert!(state5.orphan_drop_in_millis > 3_000_000, "{state5:?}");
            let root = root5.expect("partition 5 has a root");
            let walk = WalkRequest {
                root: Some(root),
                target: root.label,
            };
            locals[0]
                .walk(vec![walk])
                .await
                .expect("served during the grace period");
            assert!(
                locals[0]
                    .drop_orphans(Duration::from_secs(3600))
                    .await
                    .expect("nothing due")
                    .is_empty()
            );
            assert_eq!(
                locals[0].drop_orphans(Duration::ZERO).await.expect("drop"),
                [5]
            );
            let status = locals[0].status().await.expect("status");
            assert!(!status.partitions.contains(&5), "{status:?}");
            assert_eq!(status.partitions.len(), 15, "{status:?}");
            let error = locals[0]
                .walk(vec![walk])
                .await
                .expect_err("deleted: not served");
            assert!(error.to_string().contains("not held"), "{error}");
            // Its other partitions, and the new copy, serve as before.
            let root4 = tops[committed as usize].partitions()[4].expect("root");
            locals[0]
                .walk(vec![WalkRequest {
                    root: Some(root4),
                    target: root4.label,
                }])
                .await
                .expect("partition 4 is untouched");
            locals[3]
                .walk(vec![walk])
                .await
                .expect("the new copy serves");
            // Sizes come from RocksDB once the memtables are flushed.
            let sizes = |status: &ShardStatus| -> u64 {
                status
                    .partition_states
                    .iter()
                    .map(|state| state.approximate_bytes)
                    .sum()
            };
            assert_eq!(sizes(&locals[1].status().await.expect("status")), 0);
            locals[1].node().store().flush().expect("flush");
            let status = locals[1].status().await.expect("status");
            let on_disk = locals[1].node().store().sst_bytes().expect("sst bytes");
            assert!(
                sizes(&status) > 0 && sizes(&status) <= on_disk,
                "{on_disk} bytes on disk: {status:?}"
            );
        });
    });
}

/// What a faulty replica does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Healthy,
    /// Every call fails (a dead or partitioned server).
    Down,
    /// Builds report a wrong root for every partition (a damaged replica).
    WrongRoots,
}

/// A replica whose behaviour a test switches.
struct Faulty {
    inner: Arc<dyn ShardApi>,
    fault: Mutex<Fault>,
}

impl Faulty {
    fn new(inner: Arc<dyn ShardApi>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            fault: Mutex::new(Fault::Healthy),
        })
    }

    fn set(&self, fault: Fault) {
        *self.fault.lock().expect("fault lock") = fault;
    }

    fn check(&self) -> shard::Result<()> {
        if *self.fault.lock().expect("fault lock") == Fault::Down {
            return Err(shard::Error::Remote {
                peer: "faulty".into(),
                code: tonic::Code::Unavailable,
                message: "down (injected)".into(),
            });
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl ShardApi for Faulty {
    async fn prepare_epoch(
        &self,
        epoch: u64,
        fence: &Fence,
        user_partitions: Vec<u32>,
        updates: Vec<(AkdLabel, AkdValue)>,
        traces: Vec<UpdateTrace>,
    ) -> shard::Result<PrepareSummary> {
        self.check()?;
        self.inner
            .prepare_epoch(epoch, fence, user_partitions, updates, traces)
            .await
    }
    async fn compute_leaves(
        &self,
        epoch: u64,
        user_partition: u32,
        updates: Vec<(AkdLabel, AkdValue)>,
    ) -> shard::Result<UserPartitionLeaves> {
        self.check()?;
        self.inner
            .compute_leaves(epoch, user_partition, updates)
            .await
    }
    async fn build_epoch(
        &self,
        epoch: u64,
        fence: &Fence,
        base_roots: Vec<(u32, Option<NodeRef>)>,
        leaves: LeavesByPartition,
        sources: Vec<u32>,
    ) -> shard::Result<BuildSummary> {
        self.check()?;
        let mut built = self
            .inner
            .build_epoch(epoch, fence, base_roots, leaves, sources)
            .await?;
        if *self.fault.lock().expect("fault lock") == Fault::WrongRoots {
            for (_, root) in &mut built.roots {
                if let Some(root) = root {
                    root.hash = AzksValue([0xee; 32]);
                }
            }
        }
        Ok(built)
    }
    async fn bootstrap(
        &self,
        fence: &Fence,
        source: BootstrapSource,
    ) -> shard::Result<BootstrapSummary> {
        self.check()?;
        self.inner.bootstrap(fence, source).await
    }
    async fn stream_partition(
        &self,
        partition: u32,
        epoch: u64,
        from_epoch: u64,
    ) -> shard::Result<BoxStream<'static, shard::Result<PartitionChunk>>> {
        self.check()?;
        self.inner
            .stream_partition(partition, epoch, from_epoch)
            .await
    }
    async fn walk(&self, requests: Vec<WalkRequest>) -> shard::Result<Vec<PartitionWalk>> {
        self.check()?;
        self.inner.walk(requests).await
    }
    async fn append_only_slice(
        &self,
        root: NodeRef,
        start_epoch: u64,
    ) -> shard::Result<AppendOnlySlice> {
        self.check()?;
        self.inner.append_only_slice(root, start_epoch).await
    }
    async fn lookup_plan(&self, akd_label: AkdLabel, epoch: u64) -> shard::Result<LookupPlan> {
        self.check()?;
        self.inner.lookup_plan(akd_label, epoch).await
    }
    async fn absence_plan(&self, akd_label: AkdLabel, epoch: u64) -> shard::Result<AbsencePlan> {
        self.check()?;
        self.inner.absence_plan(akd_label, epoch).await
    }
    async fn history_plan(
        &self,
        akd_label: AkdLabel,
        params: HistoryParams,
        epoch: u64,
    ) -> shard::Result<HistoryPlan> {
        self.check()?;
        self.inner.history_plan(akd_label, params, epoch).await
    }
    async fn status(&self) -> shard::Result<ShardStatus> {
        self.check()?;
        self.inner.status().await
    }
}

/// Three in-process replicas of every partition (RF 3, partition bits 2), each behind a
/// [`Faulty`] switch.
struct ReplicaSet {
    shards: ShardSet,
    faulty: Vec<Arc<Faulty>>,
    locals: Vec<Arc<LocalShard<Wa>>>,
    _dirs: Vec<tempfile::TempDir>,
}

fn replica_set(bits: u8, seed: u64) -> ReplicaSet {
    let dirs: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("temp dir"))
        .collect();
    let ids = ["r0", "r1", "r2"];
    let locals: Vec<_> = ids
        .iter()
        .zip(&dirs)
        .map(|(id, dir)| local(id, dir.path(), bits, seed))
        .collect();
    let faulty: Vec<_> = locals
        .iter()
        .map(|local| Faulty::new(local.clone() as Arc<dyn ShardApi>))
        .collect();
    let map = ShardMap::even(
        bits,
        3,
        ids.iter().map(|id| ((*id).into(), String::new())).collect(),
    )
    .expect("map");
    let apis: HashMap<String, Arc<dyn ShardApi>> = ids
        .iter()
        .zip(&faulty)
        .map(|(id, faulty)| ((*id).to_string(), faulty.clone() as Arc<dyn ShardApi>))
        .collect();
    ReplicaSet {
        shards: ShardSet::new(map, apis).expect("shard set"),
        faulty,
        locals,
        _dirs: dirs,
    }
}

#[test]
fn a_replica_set_commits_without_one_replica_and_the_replica_replays_to_the_same_roots() {
    with_deadline_blocking(Duration::from_secs(180), || {
        let runtime = runtime();
        let (bits, seed) = (2, 41);
        let set = replica_set(bits, seed);
        let batches = workload::random(seed, 6, 60, 2).batches;
        let data_dir = tempfile::tempdir().expect("temp dir");
        let reference: Directory = open(data_dir.path(), AkdConfig::WhatsAppV1, bits, seed);
        runtime.block_on(async {
            let mut tops = vec![TopTree::<Wa>::new(bits, vec![None; 1 << bits]).expect("empty")];
            let mut digests = vec![Vec::new()];
            for (index, batch) in batches.iter().enumerate() {
                let epoch = index as u64 + 1;
                // r2 is down from epoch 3 on: two of three replicas are a majority.
                if epoch == 3 {
                    set.faulty[2].set(Fault::Down);
                }
                let outcome = run(&set.shards, epoch, &tops[index], batch.clone()).await;
                let expected = reference.publish(batch.clone()).expect("reference");
                assert_eq!(outcome.top.root_hash(), expected.root_hash, "epoch {epoch}");
                if epoch >= 3 {
                    assert!(
                        outcome
                            .verdicts
                            .iter()
                            .any(|(server, _, verdict)| server == "r2"
                                && matches!(verdict, ReplicaVerdict::Behind { .. }))
                    );
                }
                digests.push(outcome.leaf_digests.clone());
                tops.push(outcome.top);
            }
            let committed = batches.len() as u64;
            // Reads go around the dead replica.
            let label = batches[0][0].0.clone();
            let proof = cluster::lookup(&set.shards, &tops[committed as usize], committed, &label)
                .await
                .expect("lookup with a replica down");
            assert_eq!(proof, reference.lookup(&label, None).expect("reference").0);

            // r2 comes back at epoch 2 and replays 3.. from the batches, checked against the
            // committed roots and leaf digests; then it holds the same roots as the others.
            set.faulty[2].set(Fault::Healthy);
            let map = set.shards.map().clone();
            for epoch in 3..=committed {
                let committed_epoch = CommittedEpoch {
                    epoch,
                    base_roots: tops[epoch as usize - 1].partitions().to_vec(),
                    roots: tops[epoch as usize].partitions().to_vec(),
                    leaf_digests: digests[epoch as usize].clone(),
                };
                let outcome = cluster::replay_epoch(
                    &set.shards,
                    &fence(&map, 1, committed),
                    "r2",
                    &(0..1 << bits).collect::<Vec<u32>>(),
                    batches[epoch as usize - 1].clone(),
                    &committed_epoch,
                    &|server, _| server != "r2",
                )
                .await
                .expect("replay");
                assert!(
                    outcome
                        .verdicts
                        .iter()
                        .all(|(_, verdict)| *verdict == ReplicaVerdict::Agreed),
                    "epoch {epoch}: {outcome:?}"
                );
            }
            let statuses = [
                set.locals[0].status().await.expect("r0"),
                set.locals[2].status().await.expect("r2"),
            ];
            assert_eq!(statuses[0].partition_states, statuses[1].partition_states);

            // Only r2 answering is not a majority: the epoch fails rather than commit a
            // minority's root.
            set.faulty[0].set(Fault::Down);
            set.faulty[1].set(Fault::Down);
            let next = workload::random(seed + 1, 1, 10, 0).batches.remove(0);
            let failure = cluster::run_epoch(
                &set.shards,
                &fence(&map, 1, committed),
                committed + 1,
                &tops[committed as usize],
                next,
                &HashMap::new(),
                &Participation::everyone(&map),
            )
            .await
            .expect_err("one replica of three is no majority");
            assert!(failure.reason.contains("no majority"), "{failure}");
        });
    });
}

#[test]
fn a_replica_that_builds_another_root_is_outvoted_and_named() {
    with_deadline_blocking(Duration::from_secs(120), || {
        let runtime = runtime();
        let (bits, seed) = (2, 42);
        let set = replica_set(bits, seed);
        let batches = workload::random(seed, 3, 40, 1).batches;
        let data_dir = tempfile::tempdir().expect("temp dir");
        let reference: Directory = open(data_dir.path(), AkdConfig::WhatsAppV1, bits, seed);
        runtime.block_on(async {
            let mut top = TopTree::<Wa>::new(bits, vec![None; 1 << bits]).expect("empty");
            set.faulty[1].set(Fault::WrongRoots);
            for (index, batch) in batches.iter().enumerate() {
                let epoch = index as u64 + 1;
                let outcome = run(&set.shards, epoch, &top, batch.clone()).await;
                let expected = reference.publish(batch.clone()).expect("reference");
                assert_eq!(
                    outcome.top.root_hash(),
                    expected.root_hash,
                    "the majority's root, not the damaged replica's"
                );
                let dissents: Vec<_> = outcome
                    .verdicts
                    .iter()
                    .filter(|(_, _, verdict)| matches!(verdict, ReplicaVerdict::Dissented { .. }))
                    .map(|(server, _, _)| server.as_str())
                    .collect();
                assert!(!dissents.is_empty(), "epoch {epoch}");
                assert!(
                    dissents.iter().all(|server| *server == "r1"),
                    "{dissents:?}"
                );
                top = outcome.top;
            }
        });
    });
}

#[test]
fn fenced_mutations_are_refused_and_change_nothing() {
    with_deadline_blocking(Duration::from_secs(120), || {
        let runtime = runtime();
        let (bits, seed) = (2, 43);
        let set = replica_set(bits, seed);
        let batches = workload::random(seed, 3, 40, 1).batches;
        runtime.block_on(async {
            let mut tops = vec![TopTree::<Wa>::new(bits, vec![None; 1 << bits]).expect("empty")];
            for (index, batch) in batches.iter().enumerate() {
                let epoch = index as u64 + 1;
                let map = set.shards.map().clone();
                let outcome = cluster::run_epoch(
                    &set.shards,
                    &fence(&map, 5, epoch - 1),
                    epoch,
                    &tops[index],
                    batch.clone(),
                    &HashMap::new(),
                    &Participation::everyone(&map),
                )
                .await
                .expect("epoch");
                tops.push(outcome.top);
            }
            let committed = batches.len() as u64;
            let r0 = &set.locals[0];
            let store = r0.node().store().clone();
            let nodes_before = store.node_versions_from(0).expect("count");
            let status_before = r0.status().await.expect("status");
            let map = set.shards.map().clone();
            let all: Vec<u32> = (0..1 << bits).collect();
            let refusals = [
                (
                    "BuildEpoch for a committed epoch (the request that wiped a shard)",
                    r0.build_epoch(
                        1,
                        &fence(&map, 5, committed),
                        vec![(0, None)],
                        Vec::new(),
                        all.clone(),
                    )
                    .await
                    .map(|_| ()),
                ),
                (
                    "a build from a deposed coordinator's older term",
                    r0.build_epoch(
                        committed + 1,
                        &fence(&map, 4, committed),
                        vec![(0, tops[committed as usize].partitions()[0])],
                        Vec::new(),
                        all.clone(),
                    )
                    .await
                    .map(|_| ()),
                ),
                (
                    "a prepare of an old epoch",
                    r0.prepare_epoch(
                        2,
                        &fence(&map, 5, committed),
                        vec![0],
                        Vec::new(),
                        Vec::new(),
                    )
                    .await
                    .map(|_| ()),
                ),
                (
                    "a build that does not account for every user partition",
                    r0.build_epoch(
                        committed + 1,
                        &fence(&map, 5, committed),
                        vec![(0, tops[committed as usize].partitions()[0])],
                        Vec::new(),
                        vec![0],
                    )
                    .await
                    .map(|_| ()),
                ),
            ];
            for (what, refused) in refusals {
                let error = refused.expect_err(what);
                assert!(
                    matches!(error, shard::Error::Fenced { .. }),
                    "{what}: {error:?}"
                );
            }
            // A map that does not assign the partition here is refused too.
            let elsewhere = ShardMap::even(
                bits,
                1,
                vec![("r1".into(), String::new()), ("r2".into(), String::new())],
            )
            .expect("map");
            let error = r0
                .prepare_epoch(
                    committed + 1,
                    &fence(&elsewhere.with_version(9), 5, committed),
                    vec![0],
                    Vec::new(),
                    Vec::new(),
                )
                .await
                .expect_err("partition not assigned");
            assert!(matches!(error, shard::Error::Fenced { .. }), "{error:?}");
            assert_eq!(store.node_versions_from(0).expect("count"), nodes_before);
            assert_eq!(
                r0.status().await.expect("status").partition_states,
                status_before.partition_states
            );
            // And the replica still serves its committed state.
            let label = batches[0][0].0.clone();
            cluster::lookup(&set.shards, &tops[committed as usize], committed, &label)
                .await
                .expect("still serving");
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
            let shard = local("dev", data_dir.path(), bits, seed);
            let map = ShardMap::even(bits, 1, vec![("dev".into(), String::new())]).expect("map");
            let apis: HashMap<String, Arc<dyn ShardApi>> =
                HashMap::from([("dev".to_string(), shard as Arc<dyn ShardApi>)]);
            let shards = ShardSet::new(map, apis).expect("shard set");
            runtime.block_on(async {
                let batch: Vec<(AkdLabel, AkdValue)> = (0..20)
                    .map(|i| (AkdLabel(format!("u{i}").into_bytes()), AkdValue::from("v")))
                    .collect();
                let empty = TopTree::<Wa>::new(bits, vec![None; 1 << bits]).expect("empty");
                let first = run(&shards, 1, &empty, batch.clone()).await;
                let heartbeat = run(&shards, 2, &first.top, batch).await;
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
