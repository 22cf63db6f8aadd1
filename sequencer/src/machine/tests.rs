//! Unit tests of the pure state machine, through an in-memory [`MachineTx`].

use std::collections::BTreeMap;

use super::*;

/// An in-memory transaction: everything is applied immediately.
#[derive(Default)]
struct MemTx {
    idem: BTreeMap<Vec<u8>, (u64, pb::AppendResponse)>,
    idem_order: BTreeMap<u64, Vec<u8>>,
    epochs: BTreeMap<u64, pb::EpochRecord>,
    updates: BTreeMap<(u64, Vec<u8>), (u64, Vec<u8>)>,
}

impl MachineTx for MemTx {
    fn idem_get(&self, key: &[u8]) -> Result<Option<pb::AppendResponse>> {
        Ok(self.idem.get(key).map(|(_, answer)| answer.clone()))
    }
    fn idem_put(&mut self, key: &[u8], ordinal: u64, answer: &pb::AppendResponse) {
        self.idem.insert(key.to_vec(), (ordinal, answer.clone()));
        self.idem_order.insert(ordinal, key.to_vec());
    }
    fn idem_evict(&mut self, ordinal: u64) -> Result<()> {
        if let Some(key) = self.idem_order.remove(&ordinal) {
            self.idem.remove(&key);
        }
        Ok(())
    }
    fn epoch_get(&self, epoch: u64) -> Result<Option<pb::EpochRecord>> {
        Ok(self.epochs.get(&epoch).cloned())
    }
    fn epoch_put(&mut self, record: &pb::EpochRecord) {
        self.epochs.insert(record.epoch, record.clone());
    }
    fn update_put(&mut self, epoch: u64, label: &[u8], sequence: u64, value: &[u8]) {
        self.updates
            .insert((epoch, label.to_vec()), (sequence, value.to_vec()));
    }
    fn updates_drop(&mut self, epoch: u64) {
        self.updates.retain(|(e, _), _| *e != epoch);
    }
}

impl MemTx {
    fn batch(&self, epoch: u64) -> Vec<(Vec<u8>, u64)> {
        self.updates
            .iter()
            .filter(|((e, _), _)| *e == epoch)
            .map(|((_, label), (sequence, _))| (label.clone(), *sequence))
            .collect()
    }
}

fn metadata(max_epoch_updates: u64, window: u64, retain: u64) -> pb::ClusterMetadata {
    pb::ClusterMetadata {
        cluster_id: vec![7; 16],
        partition_bits: 2,
        akd_configuration: "whatsapp_v1".into(),
        vrf_public_key: vec![1; 32],
        max_epoch_updates,
        idempotency_window: window,
        retained_committed_batches: retain,
        ..pb::ClusterMetadata::default()
    }
}

struct Harness {
    machine: Machine,
    tx: MemTx,
    index: u64,
}

impl Harness {
    fn new(max_epoch_updates: u64, window: u64, retain: u64) -> Self {
        Self::with_metadata(metadata(max_epoch_updates, window, retain))
    }

    fn with_metadata(metadata: pb::ClusterMetadata) -> Self {
        let mut harness = Self {
            machine: Machine::default(),
            tx: MemTx::default(),
            index: 0,
        };
        let applied = harness.run(pb::command::Kind::InitCluster(metadata));
        assert!(matches!(
            applied.kind,
            Some(pb::apply_result::Kind::Metadata(_))
        ));
        harness
    }

    fn run(&mut self, kind: pb::command::Kind) -> pb::ApplyResult {
        self.index += 1;
        self.machine
            .apply(&mut self.tx, self.index, &pb::Command { kind: Some(kind) })
            .expect("apply")
    }

    fn append(&mut self, labels: &[&str], key: &str) -> pb::ApplyResult {
        self.append_as(labels, key, false, 500)
    }

    /// An append proposed at `at_ms`, its key a caller's or (`retry_key`) a client library's.
    fn append_as(
        &mut self,
        labels: &[&str],
        key: &str,
        retry_key: bool,
        at_ms: u64,
    ) -> pb::ApplyResult {
        let updates: Vec<pb::Update> = labels
            .iter()
            .map(|label| pb::Update {
                label: label.as_bytes().to_vec(),
                value: format!("v-{label}").into_bytes(),
            })
            .collect();
        // As the proposing node does (`Sequencer::append`).
        let payload_hash = if key.is_empty() {
            Vec::new()
        } else {
            crate::node::payload_hash(&updates).to_vec()
        };
        self.run(pb::command::Kind::Append(pb::AppendRequest {
            updates,
            idempotency_key: key.as_bytes().to_vec(),
            proposed_at_ms: at_ms,
            payload_hash,
            retry_key,
        }))
    }

    fn appended_as(
        &mut self,
        labels: &[&str],
        key: &str,
        retry_key: bool,
        at_ms: u64,
    ) -> pb::AppendResponse {
        match self.append_as(labels, key, retry_key, at_ms).kind {
            Some(pb::apply_result::Kind::Appended(answer)) => answer,
            other => panic!("expected Appended, got {other:?}"),
        }
    }

    fn appended(&mut self, labels: &[&str], key: &str) -> pb::AppendResponse {
        self.appended_as(labels, key, false, 500)
    }

    fn seal(&mut self, epoch: u64) -> pb::ApplyResult {
        self.run(pb::command::Kind::Seal(pb::SealRequest {
            epoch,
            heartbeat: false,
            sealed_at_ms: 1_000 + epoch,
        }))
    }

    fn heartbeat(&mut self, epoch: u64) -> pb::ApplyResult {
        self.run(pb::command::Kind::Seal(pb::SealRequest {
            epoch,
            heartbeat: true,
            sealed_at_ms: 1_000 + epoch,
        }))
    }

    fn commit(&mut self, epoch: u64, root: u8) -> pb::ApplyResult {
        self.run(pb::command::Kind::CommitEpoch(pb::CommitEpochRequest {
            epoch,
            root_hash: stitched(epoch, root).0,
            partition_roots: stitched(epoch, root).1,
            committed_at_ms: 2_000 + epoch,
            ..pb::CommitEpochRequest::default()
        }))
    }

    fn commit_with_progress(
        &mut self,
        epoch: u64,
        now_ms: u64,
        progress: &[(&str, u64)],
    ) -> pb::ApplyResult {
        self.run(pb::command::Kind::CommitEpoch(pb::CommitEpochRequest {
            epoch,
            root_hash: stitched(epoch, epoch as u8).0,
            partition_roots: stitched(epoch, epoch as u8).1,
            committed_at_ms: now_ms,
            leaf_digests: Vec::new(),
            progress: progress
                .iter()
                .map(|(server, built_epoch)| cluster_pb::ServerProgress {
                    server: (*server).into(),
                    built_epoch: *built_epoch,
                })
                .collect(),
        }))
    }
}

/// A commit's root hash and partition roots for `epoch` of the tests' 2-bit `whatsapp_v1`
/// directory that stitch together: partition 0 holds one leaf whose value is `seed` repeated
/// (another seed, another root).
fn stitched(epoch: u64, seed: u8) -> (Vec<u8>, Vec<u8>) {
    use ktd_core::akd_core::{AzksValue, NodeLabel};
    use ktd_core::stitch::TopTree;
    use ktd_core::tree::NodeRef;
    let mut partitions = vec![None; 4];
    partitions[0] = Some(NodeRef {
        label: NodeLabel::new([0; 32], 256),
        hash: AzksValue([seed; 32]),
        min_epoch: epoch,
        max_epoch: epoch,
    });
    let top = TopTree::<ktd_core::config::WhatsAppV1>::new(2, partitions.clone()).expect("stitch");
    let record = ktd_core::EpochRecord {
        epoch,
        root_hash: top.root_hash(),
        partitions,
    };
    (record.root_hash.to_vec(), record.encode())
}

fn rejection_code(applied: &pb::ApplyResult) -> Option<Code> {
    match &applied.kind {
        Some(pb::apply_result::Kind::Rejected(rejection)) => Some(Code::from(rejection.code)),
        _ => None,
    }
}

fn rejection_message(applied: &pb::ApplyResult) -> &str {
    match &applied.kind {
        Some(pb::apply_result::Kind::Rejected(rejection)) => &rejection.message,
        _ => "",
    }
}

#[test]
fn appends_get_sequences_and_last_writer_wins() {
    let mut harness = Harness::new(100, 100, 0);
    let first = harness.appended(&["a", "b"], "");
    assert_eq!((first.epoch, first.first_sequence, first.count), (1, 1, 2));
    let second = harness.appended(&["b", "c", "c"], "");
    assert_eq!(
        (second.epoch, second.first_sequence, second.count),
        (1, 3, 3)
    );
    // "b" was replaced by sequence 3, "c" by its later copy (5).
    assert_eq!(
        harness.tx.batch(1),
        vec![(b"a".to_vec(), 1), (b"b".to_vec(), 3), (b"c".to_vec(), 5)]
    );
    assert_eq!(harness.machine.open_epoch_updates(), 3);
}

#[test]
fn idempotent_retry_returns_original_answer_and_applies_once() {
    let mut harness = Harness::new(100, 2, 0);
    let original = harness.appended(&["a"], "k1");
    let retry = harness.appended(&["a"], "k1");
    assert!(retry.duplicate);
    assert_eq!(
        (retry.epoch, retry.first_sequence),
        (original.epoch, original.first_sequence)
    );
    assert_eq!(harness.machine.state().next_sequence, 2, "applied once");
}

#[test]
fn a_key_a_client_library_made_up_for_its_retries_is_remembered_for_the_window_of_such_keys() {
    // The window holds two retry keys: after two more, r1 is forgotten.
    let mut harness = Harness::new(100, 2, 0);
    harness.appended_as(&["a"], "r1", true, 500);
    assert!(harness.appended_as(&["a"], "r1", true, 600).duplicate);
    harness.appended_as(&["b"], "r2", true, 700);
    harness.appended_as(&["c"], "r3", true, 800);
    let late = harness.appended_as(&["a"], "r1", true, 900);
    assert!(!late.duplicate, "r1 fell out of the window");
    assert!(harness.appended_as(&["c"], "r3", true, 1_000).duplicate);
    // Caller keys do not count against the window of retry keys.
    for key in ["c1", "c2", "c3"] {
        harness.appended_as(&["d"], key, false, 1_100);
    }
    assert!(harness.appended_as(&["c"], "r3", true, 1_200).duplicate);
}

/// M1: a caller's key is remembered for its retention however many keys follow; when the
/// store is full of keys younger than that, new keyed appends are refused, never is a young
/// key forgotten; keys past their retention go, and then a retry is applied again.
#[test]
fn a_caller_key_is_remembered_for_its_retention_however_many_keyed_appends_follow() {
    let retention = 60_000;
    let mut harness = Harness::with_metadata(pb::ClusterMetadata {
        idempotency_retention_ms: retention,
        max_idempotency_keys: 3,
        ..metadata(100, 1, 0)
    });
    // Time spans of max(60 s / 64, 1 s) = 1 s: k1 and k2 share the first, k3 opens the next.
    let k1 = harness.appended_as(&["a"], "k1", false, 0);
    harness.appended_as(&["b"], "k2", false, 500);
    harness.appended_as(&["c"], "k3", false, 1_500);
    // Unkeyed appends and retry keys do not fill the store of caller keys.
    harness.appended_as(&["x"], "", false, 1_600);
    harness.appended_as(&["y"], "r1", true, 1_700);

    // Full of keys younger than the retention: refused, and nothing changes.
    let state = harness.machine.state().clone();
    let refused = harness.append_as(&["d"], "k4", false, 61_499);
    assert_eq!(rejection_code(&refused), Some(Code::ResourceExhausted));
    assert!(
        rejection_message(&refused).contains("max_idempotency_keys = 3"),
        "{refused:?}"
    );
    assert_eq!(harness.machine.state(), &state);
    // A retry just before the retention ends is still a duplicate.
    let retry = harness.appended_as(&["a"], "k1", false, 59_999);
    assert!(retry.duplicate);
    assert_eq!(retry.first_sequence, k1.first_sequence);

    // Once the next span is a retention old, k1 and k2 are forgotten and k4 fits.
    assert!(!harness.appended_as(&["d"], "k4", false, 61_500).duplicate);
    assert_eq!(harness.machine.state().kept_oldest_ordinal, 2);
    assert!(harness.appended_as(&["c"], "k3", false, 61_600).duplicate);
    let late = harness.appended_as(&["a"], "k1", false, 61_700);
    assert!(
        !late.duplicate,
        "past its retention, a retry is a new append"
    );
}

#[test]
fn full_epoch_is_sealed_before_the_append_that_would_overflow_it() {
    let mut harness = Harness::new(3, 100, 0);
    harness.appended(&["a", "b"], "");
    // Replacing a label does not grow the epoch.
    let same = harness.appended(&["a", "c"], "");
    assert_eq!(same.epoch, 1);
    assert!(same.sealed_before.is_none());
    let next = harness.appended(&["d", "e"], "");
    assert_eq!(next.epoch, 2);
    assert_eq!(
        next.sealed_before,
        Some(pb::SealResponse {
            epoch: 1,
            updates: 3,
            already_sealed: false
        })
    );
    // A batch with more distinct labels than an epoch may hold is refused.
    assert_eq!(
        rejection_code(&harness.append(&["w", "x", "y", "z"], "")),
        Some(Code::InvalidArgument)
    );
}

#[test]
fn seal_rules() {
    let mut harness = Harness::new(100, 100, 0);
    assert_eq!(
        rejection_code(&harness.seal(1)),
        Some(Code::FailedPrecondition),
        "empty"
    );
    harness.appended(&["a"], "");
    assert_eq!(
        rejection_code(&harness.seal(2)),
        Some(Code::FailedPrecondition),
        "future"
    );
    let sealed = harness.seal(1);
    assert!(matches!(
        sealed.kind,
        Some(pb::apply_result::Kind::Sealed(pb::SealResponse {
            epoch: 1,
            updates: 1,
            already_sealed: false
        }))
    ));
    let again = harness.seal(1);
    assert!(matches!(
        again.kind,
        Some(pb::apply_result::Kind::Sealed(pb::SealResponse {
            epoch: 1,
            already_sealed: true,
            ..
        }))
    ));
    assert_eq!(harness.appended(&["b"], "").epoch, 2);
}

#[test]
fn heartbeat_seals_an_empty_epoch_only_after_the_first_updates() {
    let mut harness = Harness::new(100, 100, 0);
    assert_eq!(
        rejection_code(&harness.heartbeat(1)),
        Some(Code::FailedPrecondition),
        "no heartbeat while the directory is empty"
    );
    harness.appended(&["a"], "");
    harness.seal(1);
    assert_eq!(
        rejection_code(&harness.seal(2)),
        Some(Code::FailedPrecondition),
        "a plain seal of an empty epoch is still refused"
    );
    assert_eq!(
        rejection_code(&harness.heartbeat(2)),
        Some(Code::FailedPrecondition),
        "no heartbeat while epoch 1 waits for its commit"
    );
    assert!(rejection_code(&harness.commit(1, 1)).is_none());
    assert!(matches!(
        harness.heartbeat(2).kind,
        Some(pb::apply_result::Kind::Sealed(pb::SealResponse {
            epoch: 2,
            updates: 0,
            already_sealed: false
        }))
    ));
    assert!(matches!(
        harness.heartbeat(2).kind,
        Some(pb::apply_result::Kind::Sealed(pb::SealResponse {
            epoch: 2,
            already_sealed: true,
            ..
        }))
    ));
    assert_eq!(harness.appended(&["b"], "").epoch, 3);
    // A heartbeat on an epoch that holds updates is an ordinary seal.
    assert!(matches!(
        harness.heartbeat(3).kind,
        Some(pb::apply_result::Kind::Sealed(pb::SealResponse {
            epoch: 3,
            updates: 1,
            ..
        }))
    ));
}

#[test]
fn epoch_records_carry_their_size_and_seal_and_commit_times() {
    let mut harness = Harness::new(3, 100, 8);
    harness.appended(&["a", "b"], "");
    harness.seal(1);
    // Epoch 2 is sealed for size by the append that would overflow it (at its proposal time).
    harness.appended(&["c", "d"], "");
    harness.appended(&["e", "f"], "");
    let records: Vec<pb::EpochRecord> = [(1, 9), (2, 8)]
        .into_iter()
        .map(|(epoch, root)| match harness.commit(epoch, root).kind {
            Some(pb::apply_result::Kind::Committed(committed)) => {
                committed.record.expect("a record")
            }
            other => panic!("expected Committed, got {other:?}"),
        })
        .collect();
    assert_eq!(
        records
            .iter()
            .map(|record| (record.updates, record.sealed_at_ms, record.committed_at_ms))
            .collect::<Vec<_>>(),
        vec![(2, 1_001, 2_001), (2, 500, 2_002)]
    );
    assert!(
        harness.machine.state().sealed_at_ms.is_empty(),
        "seal times are dropped once committed"
    );
}

#[test]
fn commit_epoch_never_forks() {
    let mut harness = Harness::new(100, 100, 1);
    harness.appended(&["a"], "");
    assert_eq!(
        rejection_code(&harness.commit(1, 9)),
        Some(Code::FailedPrecondition),
        "not sealed"
    );
    harness.seal(1);
    harness.appended(&["b"], "");
    harness.seal(2);
    assert_eq!(
        rejection_code(&harness.commit(2, 9)),
        Some(Code::FailedPrecondition),
        "out of order"
    );
    assert!(rejection_code(&harness.commit(1, 9)).is_none());
    match harness.commit(1, 9).kind {
        Some(pb::apply_result::Kind::Committed(response)) => assert!(response.already_committed),
        other => panic!("same root again must be OK, got {other:?}"),
    }
    assert_eq!(
        rejection_code(&harness.commit(1, 8)),
        Some(Code::AlreadyExists),
        "fork refused"
    );
    assert_eq!(
        harness.tx.epochs[&1].root_hash,
        stitched(1, 9).0,
        "the first root stays"
    );
    assert_eq!(
        rejection_code(&harness.commit(0, 1)),
        Some(Code::AlreadyExists)
    );
    // Retention 1: epoch 1's batch is kept until epoch 2 commits.
    assert_eq!(harness.tx.batch(1).len(), 1);
    assert!(rejection_code(&harness.commit(2, 7)).is_none());
    assert!(harness.tx.batch(1).is_empty());
    assert_eq!(harness.tx.batch(2).len(), 1);
    assert_eq!(harness.machine.state().last_committed_epoch, 2);
}

#[test]
fn uninitialised_cluster_refuses_appends_and_metadata_identity_is_fixed() {
    let mut machine = Machine::default();
    let mut tx = MemTx::default();
    let append = pb::Command {
        kind: Some(pb::command::Kind::Append(pb::AppendRequest {
            updates: vec![pb::Update {
                label: b"a".to_vec(),
                value: b"1".to_vec(),
            }],
            idempotency_key: Vec::new(),
            proposed_at_ms: 500,
            payload_hash: Vec::new(),
            retry_key: false,
        })),
    };
    let applied = machine.apply(&mut tx, 1, &append).expect("apply");
    assert_eq!(rejection_code(&applied), Some(Code::FailedPrecondition));

    let mut harness = Harness::new(10, 10, 0);
    let mut other = metadata(10, 10, 0);
    other.vrf_public_key = vec![2; 32];
    assert_eq!(
        rejection_code(&harness.run(pb::command::Kind::InitCluster(other))),
        Some(Code::AlreadyExists)
    );
    // Same identity, new limits: refused too (InitCluster sets the metadata once).
    assert_eq!(
        rejection_code(&harness.run(pb::command::Kind::InitCluster(metadata(20, 10, 0)))),
        Some(Code::AlreadyExists)
    );
    // The same metadata again: an idempotent retry.
    assert!(
        rejection_code(&harness.run(pb::command::Kind::InitCluster(metadata(10, 10, 0)))).is_none()
    );
}

#[test]
fn shard_map_is_versioned_and_checked() {
    let mut harness = Harness::new(10, 10, 0);
    let shard = |id: &str, partitions: Vec<u32>| cluster_pb::LegacyShard {
        shard_id: id.into(),
        address: "127.0.0.1:1".into(),
        partitions,
    };
    let set = |shards, expected_version| {
        pb::command::Kind::SetShardMap(pb::SetShardMapRequest {
            shards,
            expected_version,
            map: None,
        })
    };
    assert_eq!(
        rejection_code(&harness.run(set(vec![shard("s1", vec![4])], 0))),
        Some(Code::InvalidArgument),
        "2 bits = partitions 0..3"
    );
    assert!(
        rejection_code(&harness.run(set(
            vec![shard("s1", vec![0, 1]), shard("s2", vec![2, 3])],
            0
        )))
        .is_none()
    );
    assert_eq!(
        rejection_code(&harness.run(set(vec![shard("s1", vec![0])], 0))),
        Some(Code::Aborted),
        "stale version"
    );
    // The same checks a shard and the coordinator apply (`ktd_core::ShardMap::new`): a map
    // with a gap, an overlap or a repeated id is refused before it is replicated, since
    // every epoch after it would fail.
    for (shards, what) in [
        (vec![shard("s1", vec![0, 1]), shard("s2", vec![3])], "gap"),
        (
            vec![shard("s1", vec![0, 1, 2]), shard("s2", vec![2, 3])],
            "overlap",
        ),
        (
            vec![shard("s1", vec![0, 1]), shard("s1", vec![2, 3])],
            "repeated id",
        ),
        (Vec::new(), "no shard"),
    ] {
        assert_eq!(
            rejection_code(&harness.run(set(shards, 1))),
            Some(Code::InvalidArgument),
            "{what}"
        );
    }
    assert_eq!(harness.machine.state().shard_map.version, 1);
}

fn replica_map(rf: u32, partitions: Vec<Vec<&str>>) -> cluster_pb::ShardMap {
    cluster_pb::ShardMap {
        replication_factor: rf,
        servers: ["a", "b", "c"]
            .iter()
            .map(|id| cluster_pb::ShardServer {
                id: (*id).into(),
                address: format!("http://{id}"),
                maintenance_until_ms: 0,
                draining: false,
            })
            .collect(),
        partitions: partitions
            .into_iter()
            .enumerate()
            .map(|(partition, voters)| cluster_pb::PartitionReplicas {
                partition: partition as u32,
                voters: voters.into_iter().map(String::from).collect(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn set_map(map: cluster_pb::ShardMap, expected_version: u64) -> pb::command::Kind {
    pb::command::Kind::SetShardMap(pb::SetShardMapRequest {
        shards: Vec::new(),
        expected_version,
        map: Some(map),
    })
}

#[test]
fn replica_set_maps_are_checked_before_they_are_replicated() {
    let mut harness = Harness::new(10, 10, 0);
    let good = replica_map(
        2,
        vec![
            vec!["a", "b"],
            vec!["b", "c"],
            vec!["c", "a"],
            vec!["a", "b"],
        ],
    );
    assert!(rejection_code(&harness.run(set_map(good, 0))).is_none());
    assert_eq!(harness.machine.state().shard_map.version, 1);
    assert_eq!(harness.machine.state().shard_map.replication_factor, 2);
    for (map, what) in [
        (
            replica_map(
                2,
                vec![
                    vec!["a", "a"],
                    vec!["b", "c"],
                    vec!["c", "a"],
                    vec!["a", "b"],
                ],
            ),
            "two replicas on one server",
        ),
        (
            replica_map(
                2,
                vec![vec!["a"], vec!["b", "c"], vec!["c", "a"], vec!["a", "b"]],
            ),
            "too few replicas",
        ),
        (
            replica_map(2, vec![vec!["a", "b"], vec!["b", "c"], vec!["c", "a"]]),
            "a partition uncovered",
        ),
        (
            replica_map(
                2,
                vec![
                    vec!["a", "x"],
                    vec!["b", "c"],
                    vec!["c", "a"],
                    vec!["a", "b"],
                ],
            ),
            "an unknown server",
        ),
        (
            replica_map(4, vec![vec!["a", "b", "c", "a"]; 4]),
            "a factor above the servers",
        ),
    ] {
        assert_eq!(
            rejection_code(&harness.run(set_map(map, 1))),
            Some(Code::InvalidArgument),
            "{what}"
        );
    }
    assert_eq!(harness.machine.state().shard_map.version, 1);
}

#[test]
fn committed_batches_stay_until_every_assigned_replica_built_them_within_the_bounds() {
    let mut harness = Harness::new(10, 10, 1);
    let map = replica_map(3, vec![vec!["a", "b", "c"]; 4]);
    assert!(rejection_code(&harness.run(set_map(map, 0))).is_none());
    for epoch in 1..=5u64 {
        harness.append(&["k"], "");
        harness.seal(epoch);
    }
    // c is down at epoch 1: every batch after it stays.
    for epoch in 1..=5u64 {
        assert!(
            rejection_code(&harness.commit_with_progress(
                epoch,
                10_000 + epoch,
                &[("a", epoch), ("b", epoch), ("c", 1)]
            ))
            .is_none()
        );
    }
    let retained: Vec<u64> = harness
        .machine
        .state()
        .retained_batches
        .keys()
        .copied()
        .collect();
    assert_eq!(retained, [2, 3, 4, 5], "c still needs 2..5");
    assert_eq!(harness.machine.state().oldest_pin(), Some(("c".into(), 1)));
    assert!(harness.machine.state().retained_bytes() > 0);

    // c catches up to 4: 2..4 are released, 5 stays (the last `retained_committed_batches`).
    harness.append(&["k"], "");
    harness.seal(6);
    harness.commit_with_progress(6, 10_006, &[("a", 6), ("b", 6), ("c", 4)]);
    let retained: Vec<u64> = harness
        .machine
        .state()
        .retained_batches
        .keys()
        .copied()
        .collect();
    assert_eq!(retained, [5, 6]);

    // c goes silent again; past the age bound its pin is released anyway.
    harness.append(&["k"], "");
    harness.seal(7);
    harness.commit_with_progress(
        7,
        10_007 + crate::machine::DEFAULT_RETENTION_MAX_AGE_MS,
        &[],
    );
    let retained: Vec<u64> = harness
        .machine
        .state()
        .retained_batches
        .keys()
        .copied()
        .collect();
    assert_eq!(
        retained,
        [7],
        "batches older than the age bound go, whoever still needs them"
    );
}

#[test]
fn a_commit_whose_partition_roots_do_not_stitch_to_its_root_is_refused_and_changes_nothing() {
    let mut harness = Harness::new(10, 10, 0);
    harness.appended(&["a"], "");
    assert!(rejection_code(&harness.seal(1)).is_none());
    let (root, roots) = stitched(1, 9);
    let forged = |root_hash: Vec<u8>, partition_roots: Vec<u8>| {
        pb::command::Kind::CommitEpoch(pb::CommitEpochRequest {
            epoch: 1,
            root_hash,
            partition_roots,
            ..pb::CommitEpochRequest::default()
        })
    };
    // Any 32 bytes as the root, with the real roots; garbage roots; no roots; roots that carry
    // the right hash but another leaf; a partition root claiming a later epoch.
    let (_, other_roots) = stitched(1, 8);
    let (future_root, future_roots) = stitched(2, 9);
    for (what, command) in [
        ("a random root", forged(vec![0xab; 32], roots.clone())),
        (
            "garbage partition roots",
            forged(root.clone(), vec![1, 2, 3]),
        ),
        ("no partition roots", forged(root.clone(), Vec::new())),
        ("another leaf's roots", forged(root.clone(), other_roots)),
        (
            "a leaf from a later epoch",
            forged(future_root, future_roots),
        ),
    ] {
        assert_eq!(
            rejection_code(&harness.run(command)),
            Some(Code::InvalidArgument),
            "{what}"
        );
        assert_eq!(harness.machine.state().last_committed_epoch, 0, "{what}");
        assert!(harness.tx.epochs.is_empty(), "{what}");
    }
    assert!(rejection_code(&harness.commit(1, 9)).is_none());
    assert_eq!(harness.tx.epochs[&1].root_hash, root);
}

#[test]
fn appends_are_bounded_by_the_replicated_limits_and_epochs_by_bytes() {
    let mut harness = Harness::new(100, 100, 0);
    let append = |label: Vec<u8>, value: Vec<u8>| {
        pb::command::Kind::Append(pb::AppendRequest {
            updates: vec![pb::Update { label, value }],
            idempotency_key: Vec::new(),
            proposed_at_ms: 500,
            payload_hash: Vec::new(),
            retry_key: false,
        })
    };
    // The shards' own limits (1 KiB labels, 64 KiB values) are the defaults: a label the
    // sequencer accepts is a label every shard builds.
    for (what, command) in [
        ("a 1025-byte label", append(vec![b'l'; 1025], b"v".to_vec())),
        ("an empty label", append(Vec::new(), b"v".to_vec())),
        ("a 64 KiB + 1 value", append(b"l".to_vec(), vec![0; 65_537])),
    ] {
        assert_eq!(
            rejection_code(&harness.run(command)),
            Some(Code::InvalidArgument),
            "{what}"
        );
    }
    assert_eq!(
        harness.machine.state().next_sequence,
        1,
        "nothing was sequenced"
    );
    assert!(rejection_code(&harness.run(append(vec![b'l'; 1024], vec![0; 65_536]))).is_none());

    // Epochs are bounded by bytes: with max_epoch_bytes = 200 KiB, 64 KiB updates seal an
    // epoch every three appends.
    let mut metadata = metadata(100, 100, 0);
    metadata.max_epoch_bytes = 200 << 10;
    let mut harness = Harness::with_metadata(metadata);
    let epochs: Vec<u64> = (0..7)
        .map(|i| {
            match harness
                .run(append(format!("u{i}").into_bytes(), vec![0; 64 << 10]))
                .kind
            {
                Some(pb::apply_result::Kind::Appended(answer)) => answer.epoch,
                other => panic!("append {i}: {other:?}"),
            }
        })
        .collect();
    assert_eq!(epochs, [1, 1, 1, 2, 2, 2, 3]);
    let mut bigger = pb::AppendRequest::default();
    for i in 0..4 {
        bigger.updates.push(pb::Update {
            label: format!("b{i}").into_bytes(),
            value: vec![0; 64 << 10],
        });
    }
    assert_eq!(
        rejection_code(&harness.run(pb::command::Kind::Append(bigger))),
        Some(Code::InvalidArgument),
        "one append larger than an epoch is refused, not split"
    );
}

#[test]
fn appends_are_refused_while_too_many_sealed_epochs_wait_for_their_commit() {
    let mut metadata = metadata(100, 100, 0);
    metadata.max_uncommitted_epochs = 2;
    let mut harness = Harness::with_metadata(metadata);
    harness.appended(&["a"], "k1");
    harness.seal(1);
    harness.appended(&["b"], "k2");
    harness.seal(2);
    assert_eq!(
        rejection_code(&harness.append(&["c"], "k3")),
        Some(Code::ResourceExhausted)
    );
    // A retry of an acknowledged append still gets its answer.
    assert!(harness.appended(&["a"], "k1").duplicate);
    assert!(rejection_code(&harness.commit(1, 1)).is_none());
    assert_eq!(harness.appended(&["c"], "k3").epoch, 3);
}

#[test]
fn metadata_that_would_let_an_acknowledged_update_fail_to_build_is_refused() {
    for (what, tweak) in [
        (
            "labels over 1 KiB",
            (|m: &mut pb::ClusterMetadata| m.max_label_bytes = 4096) as fn(&mut _),
        ),
        ("values over 64 KiB", |m| m.max_value_bytes = 65_537),
        ("epochs over 128 MiB", |m| {
            m.max_epoch_bytes = (128 << 20) + 1
        }),
        ("over a million updates per epoch", |m| {
            m.max_epoch_updates = 1_000_001
        }),
        ("an epoch smaller than one update", |m| {
            m.max_epoch_bytes = 1000
        }),
    ] {
        let mut metadata = metadata(100, 100, 0);
        tweak(&mut metadata);
        assert!(validate_metadata(&metadata).is_err(), "{what}");
    }
}

#[test]
fn an_idempotency_key_reused_for_other_updates_is_refused_and_a_true_retry_is_a_duplicate() {
    let mut harness = Harness::new(100, 100, 0);
    let first = harness.appended(&["alice"], "k");
    assert!(!first.duplicate);
    assert_eq!(
        rejection_code(&harness.append(&["mallory"], "k")),
        Some(Code::AlreadyExists),
        "another payload under the same key is never answered with the first one's result"
    );
    let retry = harness.appended(&["alice"], "k");
    assert!(retry.duplicate);
    assert_eq!(
        (retry.epoch, retry.first_sequence),
        (first.epoch, first.first_sequence)
    );
    assert_eq!(
        harness.tx.batch(1).len(),
        1,
        "only alice's update was applied"
    );
}

fn restored_record(epoch: u64, seed: u8) -> pb::EpochRecord {
    let (root_hash, partition_roots) = stitched(epoch, seed);
    pb::EpochRecord {
        epoch,
        root_hash,
        partition_roots,
        committed_at_ms: 5_000 + epoch,
        shard_map_version: 99,
        ..pb::EpochRecord::default()
    }
}

fn restore_step(records: Vec<pb::EpochRecord>, epoch: u64, finish: bool) -> pb::command::Kind {
    pb::command::Kind::Restore(pb::RestoreCommand {
        records,
        epoch,
        source_address: "http://127.0.0.1:9".into(),
        history: Some(pb::HistoryRetention {
            window: None,
            pins: Vec::new(),
            safe_epoch: 2,
        }),
        next_sequence: 41,
        finish,
        backup_cluster_id: vec![3; 16],
        replay: None,
    })
}

fn replay_step(
    epoch: u64,
    labels: &[&str],
    first_sequence: u64,
    seal_with: Option<u8>,
) -> pb::command::Kind {
    pb::command::Kind::Restore(pb::RestoreCommand {
        epoch: 3,
        replay: Some(pb::ReplayEpoch {
            epoch,
            updates: labels
                .iter()
                .zip(first_sequence..)
                .map(|(label, sequence)| pb::SequencedUpdate {
                    label: label.as_bytes().to_vec(),
                    value: b"v".to_vec(),
                    sequence,
                })
                .collect(),
            last: seal_with.is_some(),
            record: seal_with.map(|seed| pb::EpochRecord {
                updates: 2,
                sealed_at_ms: 7_000 + epoch,
                ..restored_record(epoch, seed)
            }),
        }),
        ..pb::RestoreCommand::default()
    })
}

#[test]
fn a_backup_is_restored_only_into_a_cluster_that_never_took_an_update() {
    let mut written = Harness::new(100, 10, 2);
    written.append(&["a"], "");
    let refused = written.run(restore_step(vec![restored_record(1, 1)], 1, false));
    assert_eq!(rejection_code(&refused), Some(Code::FailedPrecondition));
    assert!(
        rejection_message(&refused).contains("never took an update"),
        "{refused:?}"
    );
}

#[test]
fn a_restore_installs_epochs_in_order_refuses_updates_meanwhile_and_finishes_only_when_complete() {
    let mut h = Harness::new(100, 10, 2);
    // Records go in order, each checked to stitch.
    let gap = h.run(restore_step(vec![restored_record(2, 2)], 3, false));
    assert_eq!(rejection_code(&gap), Some(Code::FailedPrecondition));
    let mut forged = restored_record(1, 1);
    forged.root_hash = vec![9; 32];
    let forged = h.run(restore_step(vec![forged], 3, false));
    assert_eq!(rejection_code(&forged), Some(Code::InvalidArgument));
    let started = h.run(restore_step(
        vec![restored_record(1, 1), restored_record(2, 2)],
        3,
        false,
    ));
    assert!(matches!(
        started.kind,
        Some(pb::apply_result::Kind::Restore(ref state)) if state.active && state.installed_epoch == 2
    ));
    // While it runs: no appends, no seals, no other restore, no early finish.
    assert_eq!(
        rejection_code(&h.append(&["a"], "")),
        Some(Code::Unavailable)
    );
    assert_eq!(rejection_code(&h.seal(3)), Some(Code::Unavailable));
    let other = h.run(restore_step(vec![], 7, false));
    assert_eq!(rejection_code(&other), Some(Code::FailedPrecondition));
    let early = h.run(restore_step(vec![], 3, true));
    assert_eq!(rejection_code(&early), Some(Code::FailedPrecondition));
    // A repeated step is accepted (idempotent); a different root for an installed epoch is not.
    let repeated = h.run(restore_step(vec![restored_record(2, 2)], 3, false));
    assert!(rejection_code(&repeated).is_none(), "{repeated:?}");
    let rewritten = h.run(restore_step(vec![restored_record(2, 7)], 3, false));
    assert_eq!(rejection_code(&rewritten), Some(Code::AlreadyExists));
    let finished = h.run(restore_step(vec![restored_record(3, 3)], 3, true));
    assert!(matches!(
        finished.kind,
        Some(pb::apply_result::Kind::Restore(ref state)) if !state.active && state.installed_epoch == 3
    ));
    let state = h.machine.state();
    assert_eq!(state.last_committed_epoch, 3);
    assert_eq!(state.open_epoch, 4);
    assert_eq!(state.history.safe_epoch, 2);
    // Installed records keep their roots and times; they name this cluster's map.
    let record = h.tx.epochs.get(&3).expect("record 3");
    assert_eq!(record.root_hash, stitched(3, 3).0);
    assert_eq!(record.committed_at_ms, 5_003);
    assert_eq!(record.shard_map_version, state.shard_map.version);
    // Updates go to the next epoch, with sequence numbers after the backup's.
    let answer = h.appended(&["a"], "");
    assert_eq!(answer.epoch, 4);
    assert_eq!(answer.first_sequence, 41);
    // A finished restore cannot be started again: the cluster is written now.
    let again = h.run(restore_step(vec![], 5, false));
    assert_eq!(rejection_code(&again), Some(Code::FailedPrecondition));
}

#[test]
fn archived_epochs_replay_one_at_a_time_after_the_backup_and_commit_only_with_the_archived_root() {
    let mut h = Harness::new(100, 10, 2);
    let started = h.run(restore_step(
        vec![restored_record(1, 1), restored_record(2, 2)],
        3,
        false,
    ));
    assert!(rejection_code(&started).is_none(), "{started:?}");
    // Not before every record of the backup is installed.
    let early = h.run(replay_step(4, &["a"], 50, Some(4)));
    assert_eq!(rejection_code(&early), Some(Code::FailedPrecondition));
    let installed = h.run(restore_step(vec![restored_record(3, 3)], 3, false));
    assert!(rejection_code(&installed).is_none(), "{installed:?}");
    // Not out of order, and not an archived record that does not stitch or has another count.
    let ahead = h.run(replay_step(5, &["a"], 50, Some(5)));
    assert_eq!(rejection_code(&ahead), Some(Code::FailedPrecondition));
    let mut forged = replay_step(4, &["a", "b"], 50, Some(4));
    if let pb::command::Kind::Restore(command) = &mut forged
        && let Some(record) = command
            .replay
            .as_mut()
            .and_then(|replay| replay.record.as_mut())
    {
        record.root_hash = vec![9; 32];
    }
    assert_eq!(rejection_code(&h.run(forged)), Some(Code::InvalidArgument));
    let short = h.run(replay_step(4, &["a"], 50, Some(4)));
    assert_eq!(rejection_code(&short), Some(Code::InvalidArgument));
    // In steps: the last one seals the epoch with the archived record's time; a retried step
    // of a sealed epoch changes nothing.
    let first = h.run(replay_step(4, &["a"], 50, None));
    assert!(rejection_code(&first).is_none(), "{first:?}");
    let sealed = h.run(replay_step(4, &["b"], 51, Some(4)));
    assert!(matches!(
        sealed.kind,
        Some(pb::apply_result::Kind::Restore(ref state)) if state.active && state.replay_epoch == 4
    ));
    assert_eq!(h.machine.state().open_epoch, 5);
    assert_eq!(h.machine.state().sealed_at_ms.get(&4), Some(&7_004));
    assert_eq!(
        h.tx.updates
            .get(&(4, b"b".to_vec()))
            .map(|(sequence, _)| *sequence),
        Some(51)
    );
    let retried = h.run(replay_step(4, &["b"], 51, Some(4)));
    assert!(rejection_code(&retried).is_none(), "{retried:?}");
    assert_eq!(h.machine.state().open_epoch, 5);
    // The next epoch waits for this one's commit; the restore cannot finish meanwhile.
    let next = h.run(replay_step(5, &["c"], 52, None));
    assert_eq!(rejection_code(&next), Some(Code::FailedPrecondition));
    let unfinished = h.run(restore_step(vec![], 3, true));
    assert_eq!(rejection_code(&unfinished), Some(Code::FailedPrecondition));
    h.commit(4, 4);
    assert_eq!(h.machine.state().last_committed_epoch, 4);
    // A computed root other than the archive's is refused, and stops the replay.
    let replayed = h.run(replay_step(5, &["c", "d"], 52, Some(5)));
    assert!(rejection_code(&replayed).is_none(), "{replayed:?}");
    let diverged = h.commit(5, 6);
    assert_eq!(rejection_code(&diverged), Some(Code::DataLoss));
    assert_eq!(h.machine.state().last_committed_epoch, 4);
    let failure = h
        .machine
        .state()
        .restore
        .clone()
        .expect("restore")
        .replay_failure;
    assert!(
        failure.contains("replayed epoch 5 computed root"),
        "{failure}"
    );
    let stopped = h.run(replay_step(6, &["e"], 54, None));
    assert_eq!(rejection_code(&stopped), Some(Code::FailedPrecondition));
    // The archived root commits; then the restore finishes with sequence numbers after the
    // replayed ones.
    h.commit(5, 5);
    assert_eq!(h.machine.state().last_committed_epoch, 5);
}

#[test]
fn a_restore_finishes_after_its_replayed_epochs_and_new_updates_follow_their_sequence_numbers() {
    let mut h = Harness::new(100, 10, 2);
    let installed = h.run(restore_step(
        vec![
            restored_record(1, 1),
            restored_record(2, 2),
            restored_record(3, 3),
        ],
        3,
        false,
    ));
    assert!(rejection_code(&installed).is_none(), "{installed:?}");
    let sealed = h.run(replay_step(4, &["a", "b"], 60, Some(4)));
    assert!(rejection_code(&sealed).is_none(), "{sealed:?}");
    h.commit(4, 4);
    let finished = h.run(restore_step(vec![], 3, true));
    assert!(matches!(
        finished.kind,
        Some(pb::apply_result::Kind::Restore(ref state)) if !state.active && state.installed_epoch == 4
    ));
    assert_eq!(h.machine.state().last_committed_epoch, 4);
    let answer = h.appended(&["c"], "");
    assert_eq!(answer.epoch, 5);
    assert_eq!(answer.first_sequence, 62);
}

#[test]
fn an_archive_pin_keeps_sealed_batches_after_its_epoch() {
    let mut h = Harness::new(100, 10, 1);
    let pin = |epoch: u64| {
        pb::command::Kind::Retention(pb::RetentionCommand {
            kind: Some(pb::retention_command::Kind::AddPin(pb::HistoryPin {
                id: "archive".into(),
                owner: crate::machine::ARCHIVE_PIN_OWNER.into(),
                epoch,
                expires_at_ms: u64::MAX,
                reason: String::new(),
                created_at_ms: 1,
            })),
            now_ms: 1,
        })
    };
    for epoch in 1..=2 {
        h.append(&["a"], "");
        h.seal(epoch);
        h.commit(epoch, epoch as u8);
    }
    let pinned = h.run(pin(2));
    assert!(rejection_code(&pinned).is_none(), "{pinned:?}");
    for epoch in 3..=6 {
        h.append(&["a"], "");
        h.seal(epoch);
        h.commit(epoch, epoch as u8);
    }
    let retained: Vec<u64> = h.machine.state().retained_batches.keys().copied().collect();
    assert_eq!(retained, vec![3, 4, 5, 6]);
    let moved = h.run(pin(5));
    assert!(rejection_code(&moved).is_none(), "{moved:?}");
    h.append(&["a"], "");
    h.seal(7);
    h.commit(7, 7);
    let retained: Vec<u64> = h.machine.state().retained_batches.keys().copied().collect();
    assert_eq!(retained, vec![6, 7]);
}
