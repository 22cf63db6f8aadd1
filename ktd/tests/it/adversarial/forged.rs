//! Well-formed calls from roles that may make them, carrying stale terms and epochs, forged
//! roots, a changed cluster metadata and invalid shard maps.

use std::time::Duration;

use ktd_proto::ktd::cluster::v1 as cluster;
use ktd_proto::ktd::raft::v1 as raft;
use ktd_proto::ktd::sequencer::v1 as seq;
use ktd_proto::ktd::shard::v1 as shard_pb;
use ktd_proto::ktd::v1 as api;
use ktd_testkit::with_deadline;
use tonic::Code;

use super::{PARTITION_BITS, Secured, refused};

/// A Raft vote of `term` by node 2 (the only id sequencer 2's certificate may claim).
fn vote(term: u64, committed: bool) -> Option<raft::Vote> {
    Some(raft::Vote {
        leader_id: Some(raft::LeaderId { term, node_id: 2 }),
        committed,
    })
}

fn fence(term: u64, committed_epoch: u64, map: &cluster::ShardMap) -> Option<cluster::Fence> {
    Some(cluster::Fence {
        term,
        committed_epoch,
        shard_map: Some(map.clone()),
        partition_bits: PARTITION_BITS,
        safe_epoch: 0,
    })
}

/// One forged leaf in each partition (its label's top bits name the partition).
fn forged_leaves() -> Vec<shard_pb::PartitionLeaves> {
    (0..1u32 << PARTITION_BITS)
        .map(|partition| {
            let mut label = [0x15u8; 32];
            label[0] = ((partition << (8 - PARTITION_BITS)) as u8) | 0x15;
            shard_pb::PartitionLeaves {
                partition,
                leaves: vec![shard_pb::Leaf {
                    label: label.to_vec(),
                    commitment: vec![0xee; 32],
                }],
            }
        })
        .collect()
}

fn all_sources() -> Vec<u32> {
    (0..1u32 << PARTITION_BITS).collect()
}

/// `base` with every root replaced by one that was never committed.
fn forged_roots(base: &[shard_pb::PartitionRoot]) -> Vec<shard_pb::PartitionRoot> {
    base.iter()
        .map(|root| {
            let mut root = root.clone();
            match &mut root.root {
                Some(node) => node.hash = vec![0xab; 32],
                None => {
                    root.root = Some(shard_pb::NodeRef {
                        label: Some(api::NodeLabel {
                            label_val: Some(vec![0; 32]),
                            label_len: Some(256),
                        }),
                        hash: vec![0xab; 32],
                        min_epoch: 1,
                        max_epoch: 1,
                    })
                }
            }
            root
        })
        .collect()
}

/// Every partition's root as the shard reports it (the committed ones, at rest).
fn base_roots(partitions: &[shard_pb::PartitionState]) -> Vec<shard_pb::PartitionRoot> {
    partitions
        .iter()
        .map(|state| shard_pb::PartitionRoot {
            partition: state.partition,
            root: state.root.clone(),
        })
        .collect()
}

fn forged_update() -> Vec<api::Update> {
    vec![api::Update {
        label: b"alice".to_vec(),
        value: b"forged-key".to_vec(),
    }]
}

#[test]
fn stale_terms_stale_epochs_a_changed_cluster_and_invalid_shard_maps_are_refused_without_changing_state()
 {
    with_deadline(Duration::from_secs(180), || async {
        let secured = Secured::start("127.0.0.52", [0x52; 32]).await;
        let before = secured.state_at_rest().await;
        let (term, leader, _) = before.raft.clone();
        let committed = before.latest.0;
        assert!(term >= 1 && leader == 1 && committed >= 1, "{before:?}");
        let map = before
            .metadata
            .shard_map
            .clone()
            .expect("the shard map is set");
        let metadata = before
            .metadata
            .metadata
            .clone()
            .expect("the cluster is initialized");

        tracing::info!("--- Raft: another sequencer with a stale term");
        let peer = secured
            .as_role(&secured.sequencer.addr, "sequencer-2")
            .await;
        let mut raft_client = raft::raft_client::RaftClient::new(peer);
        let stale_vote = raft::VoteRequest {
            vote: vote(term - 1, false),
            last_log_id: None,
            leadership_transfer: false,
        };
        for (what, answer) in [
            ("Vote", raft_client.vote(stale_vote).await),
            ("PreVote", raft_client.pre_vote(stale_vote).await),
        ] {
            match answer {
                Ok(response) => assert!(
                    !response.get_ref().vote_granted,
                    "a stale {what} was granted: {response:?}"
                ),
                Err(status) => {
                    refused(what, Err::<(), _>(status));
                }
            }
        }
        let stale_append = raft::AppendEntriesRequest {
            vote: vote(term - 1, true),
            prev_log_id: None,
            entries: vec![raft::Entry {
                log_id: Some(raft::LogId {
                    leader_id: Some(raft::LeaderId {
                        term: term - 1,
                        node_id: 2,
                    }),
                    index: 1,
                }),
                payload: Some(raft::entry::Payload::Blank(raft::Blank {})),
            }],
            leader_commit: None,
        };
        match raft_client.append_entries(stale_append.clone()).await {
            Ok(response) => assert!(
                matches!(
                    response.get_ref().result,
                    Some(raft::append_entries_response::Result::HigherVote(_))
                        | Some(raft::append_entries_response::Result::Conflict(_))
                ),
                "a stale AppendEntries was accepted: {response:?}"
            ),
            Err(status) => {
                refused("AppendEntries", Err::<(), _>(status));
            }
        }
        match raft_client
            .stream_append(futures::stream::iter(vec![stale_append]))
            .await
        {
            Ok(response) => {
                let mut stream = response.into_inner();
                match stream.message().await {
                    Ok(Some(answer)) => assert!(
                        matches!(
                            answer.result,
                            Some(raft::stream_append_response::Result::HigherVote(_))
                                | Some(raft::stream_append_response::Result::Conflict(_))
                        ),
                        "a stale StreamAppend was accepted: {answer:?}"
                    ),
                    Ok(None) => {}
                    Err(status) => {
                        refused("StreamAppend", Err::<(), _>(status));
                    }
                }
            }
            Err(status) => {
                refused("StreamAppend", Err::<(), _>(status));
            }
        }
        // openraft answers a delivered TransferLeader with `Ok` (it is a notice, not a
        // request); its engine drops one whose vote is not the node's own. The state check at
        // the end shows the leader did not change.
        if let Err(status) = raft_client
            .transfer_leader(raft::TransferLeaderRequest {
                from_leader: vote(term - 1, true),
                to_node_id: 2,
                last_log_id: None,
            })
            .await
        {
            refused("TransferLeader", Err::<(), _>(status));
        }
        let snapshot = vec![
            raft::SnapshotChunk {
                kind: Some(raft::snapshot_chunk::Kind::Header(raft::SnapshotHeader {
                    vote: vote(term - 1, true),
                    meta: Some(raft::SnapshotMeta {
                        last_log_id: Some(raft::LogId {
                            leader_id: Some(raft::LeaderId {
                                term: term - 1,
                                node_id: 2,
                            }),
                            index: 1_000_000,
                        }),
                        last_membership: None,
                    }),
                    total_bytes: 0,
                })),
            },
            raft::SnapshotChunk {
                kind: Some(raft::snapshot_chunk::Kind::Trailer(raft::SnapshotTrailer {
                    files: Vec::new(),
                })),
            },
        ];
        match raft_client
            .install_snapshot(futures::stream::iter(snapshot))
            .await
        {
            Ok(response) => {
                let answered = response.get_ref().vote;
                assert_ne!(
                    answered,
                    vote(term - 1, true),
                    "a stale snapshot was installed"
                );
            }
            Err(status) => {
                refused("InstallSnapshot", Err::<(), _>(status));
            }
        }

        tracing::info!("--- shard: stale fences, old epochs, forged base roots");
        let coordinator = secured.as_role(&secured.shard.addr, "sequencer-1").await;
        let mut shard = shard_pb::shard_client::ShardClient::new(coordinator);
        let (partitions, _, fence_term, map_version) = before.shard.clone();
        assert_eq!(map_version, map.version, "{before:?}");
        let next = committed + 1;
        let prepare = |fence: Option<cluster::Fence>, epoch: u64| shard_pb::PrepareEpochRequest {
            epoch,
            updates: forged_update(),
            traces: Vec::new(),
            fence,
            user_partitions: all_sources(),
        };
        let base_roots = base_roots(&partitions);
        let build =
            |fence: Option<cluster::Fence>, epoch: u64, base: Vec<shard_pb::PartitionRoot>| {
                shard_pb::BuildEpochRequest {
                    epoch,
                    base_roots: base,
                    fence,
                    leaves: forged_leaves(),
                    sources: all_sources(),
                }
            };
        let mut older_map = map.clone();
        older_map.version = map.version.saturating_sub(1);
        let stale_term = fence(fence_term.saturating_sub(1), committed, &map);
        let answer = refused(
            "PrepareEpoch with a stale coordinator term",
            shard.prepare_epoch(prepare(stale_term.clone(), next)).await,
        );
        assert_eq!(answer.code, Code::FailedPrecondition, "{answer:?}");
        assert!(answer.message.contains("older than term"), "{answer:?}");
        if map.version > 1 {
            let answer = refused(
                "PrepareEpoch with an older shard map",
                shard
                    .prepare_epoch(prepare(fence(fence_term, committed, &older_map), next))
                    .await,
            );
            assert!(answer.message.contains("older than version"), "{answer:?}");
        }
        refused(
            "PrepareEpoch of the committed epoch",
            shard
                .prepare_epoch(prepare(fence(fence_term, committed, &map), committed))
                .await,
        );
        refused(
            "PrepareEpoch of the committed epoch under a fence that has not seen it committed",
            shard
                .prepare_epoch(prepare(fence(fence_term, committed - 1, &map), committed))
                .await,
        );
        refused(
            "BuildEpoch with a stale coordinator term",
            shard
                .build_epoch(futures::stream::iter([build(
                    stale_term.clone(),
                    next,
                    base_roots.clone(),
                )]))
                .await,
        );
        refused(
            "BuildEpoch of the committed epoch",
            shard
                .build_epoch(futures::stream::iter([build(
                    fence(fence_term, committed, &map),
                    committed,
                    base_roots.clone(),
                )]))
                .await,
        );
        refused(
            "BuildEpoch of the committed epoch under a fence that has not seen it committed",
            shard
                .build_epoch(futures::stream::iter([build(
                    fence(fence_term, committed - 1, &map),
                    committed,
                    base_roots.clone(),
                )]))
                .await,
        );
        refused(
            "Bootstrap under a stale coordinator term",
            shard
                .bootstrap(shard_pb::BootstrapRequest {
                    fence: stale_term,
                    partition: 0,
                    epoch: committed,
                    source_id: "s1".into(),
                    source_address: secured.shard.addr.clone(),
                    expected_root: None,
                    max_bytes_per_second: 0,
                })
                .await,
        );

        tracing::info!("--- sequencer: a changed cluster, invalid shard maps");
        let operator = secured.as_role(&secured.sequencer.addr, "admin").await;
        let mut admin = seq::sequencer_admin_client::SequencerAdminClient::new(operator);
        let mut changed = metadata.clone();
        changed.vrf_public_key = vec![0x42; 32];
        refused(
            "InitCluster with another VRF key",
            admin.init_cluster(changed).await,
        );
        let mut changed = metadata.clone();
        changed.partition_bits += 1;
        refused(
            "InitCluster with other partition bits",
            admin.init_cluster(changed).await,
        );
        let set = |map: cluster::ShardMap, expected_version: u64| seq::SetShardMapRequest {
            shards: Vec::new(),
            expected_version,
            map: Some(map),
        };
        let partitions = 1u32 << PARTITION_BITS;
        let with_partitions = |replicas: Vec<cluster::PartitionReplicas>| cluster::ShardMap {
            partitions: replicas,
            ..map.clone()
        };
        let owned = |partition: u32, voters: &[&str]| cluster::PartitionReplicas {
            partition,
            voters: voters.iter().map(|voter| voter.to_string()).collect(),
            learners: Vec::new(),
            quarantined: Vec::new(),
        };
        let everything = |voters: &[&str], count: u32| -> Vec<cluster::PartitionReplicas> {
            (0..count)
                .map(|partition| owned(partition, voters))
                .collect()
        };
        let mut out_of_range = everything(&["s1"], partitions);
        out_of_range.push(owned(999, &["s1"]));
        let mut duplicated = with_partitions(everything(&["s1", "s1"], partitions));
        duplicated.replication_factor = 2;
        let bad_maps = [
            ("a partition out of range", with_partitions(out_of_range)),
            ("a partition owned twice by one server", duplicated),
            (
                "a missing partition",
                with_partitions(everything(&["s1"], partitions - 1)),
            ),
            (
                "one bit more than the cluster has",
                with_partitions(everything(&["s1"], partitions * 2)),
            ),
            (
                "more partition bits than ktd supports",
                with_partitions(everything(
                    &["s1"],
                    1 << (ktd_core::label::MAX_PARTITION_BITS + 1),
                )),
            ),
            (
                "a voter that is no server",
                with_partitions(everything(&["s9"], partitions)),
            ),
            (
                "replication factor 0",
                cluster::ShardMap {
                    replication_factor: 0,
                    ..with_partitions(everything(&[], partitions))
                },
            ),
        ];
        for (what, bad) in bad_maps {
            let answer = refused(
                &format!("SetShardMap with {what}"),
                admin.set_shard_map(set(bad, map.version)).await,
            );
            assert!(
                matches!(
                    answer.code,
                    Code::InvalidArgument | Code::FailedPrecondition
                ),
                "{what}: {answer:?}"
            );
        }
        refused(
            "SetShardMap in the legacy form with partition 999",
            admin
                .set_shard_map(seq::SetShardMapRequest {
                    shards: vec![cluster::LegacyShard {
                        shard_id: "s1".into(),
                        address: secured.shard.addr.clone(),
                        partitions: vec![999],
                    }],
                    expected_version: map.version,
                    map: None,
                })
                .await,
        );
        refused(
            "SetShardMap of a valid map against a stale version",
            admin
                .set_shard_map(set(map.clone(), map.version.wrapping_sub(1)))
                .await,
        );

        let after = secured.state_at_rest().await;
        assert_eq!(before, after, "a refused call changed the directory");
        secured
            .publish_and_verify("alice", "key-after-forgeries")
            .await;
        secured.stop();
    });
}

/// A coordinator-role caller's BuildEpoch on base roots that are not the committed ones is
/// refused (`DATA_LOSS`) and changes nothing: the shard keeps serving its partitions (a claim in
/// a request is not proof of damage; the coordinator quarantines through the shard map).
#[test]
fn a_build_on_forged_base_roots_is_refused_without_quarantining_the_partitions() {
    with_deadline(Duration::from_secs(120), || async {
        let secured = Secured::start("127.0.0.53", [0x53; 32]).await;
        let before = secured.state_at_rest().await;
        let committed = before.latest.0;
        let map = before
            .metadata
            .shard_map
            .clone()
            .expect("the shard map is set");
        let (partitions, _, fence_term, _) = before.shard.clone();
        let coordinator = secured.as_role(&secured.shard.addr, "sequencer-1").await;
        let mut shard = shard_pb::shard_client::ShardClient::new(coordinator);
        refused(
            "BuildEpoch on base roots that are not the committed ones",
            shard
                .build_epoch(futures::stream::iter([shard_pb::BuildEpochRequest {
                    epoch: committed + 1,
                    base_roots: forged_roots(&base_roots(&partitions)),
                    fence: fence(fence_term, committed, &map),
                    leaves: forged_leaves(),
                    sources: all_sources(),
                }]))
                .await,
        );
        let after = secured.state_at_rest().await;
        assert_eq!(before, after, "a refused build changed the shard");
        secured.publish_and_verify("alice", "key-2").await;
        secured.stop();
    });
}
