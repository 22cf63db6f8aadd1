//! Bounded fuzzing of the replicated state machine (`sequencer::machine::Machine`, pure):
//! arbitrary sequences of commands — appends with random labels, values and idempotency keys,
//! seals of any epoch, commits of any epoch with valid, forged or malformed roots, shard maps
//! of any shape, repeated and changed cluster metadata, empty commands — never panic and keep
//! the machine's invariants after every step:
//!
//! * epochs and sequence numbers never go back; the last committed epoch stays below the open
//!   one and every epoch up to it has exactly one record;
//! * one root per epoch: a committed epoch's record never changes;
//! * a refused command (and an idempotent duplicate) changes nothing — neither the replicated
//!   state nor anything written through the transaction;
//! * no more caller idempotency keys are remembered than the cluster's cap, and they are
//!   forgotten oldest first.
//!
//! Case counts are fixed (a few seconds in release).

use std::collections::BTreeMap;

use ktd_proto::ktd::cluster::v1 as cluster_pb;
use proptest::prelude::*;
use sequencer::machine::{EpochState, Machine, MachineTx};
use sequencer::pb;

/// An in-memory transaction: everything is applied immediately.
#[derive(Clone, Debug, Default, PartialEq)]
struct MemTx {
    idem: BTreeMap<Vec<u8>, (u64, pb::AppendResponse)>,
    idem_order: BTreeMap<u64, Vec<u8>>,
    epochs: BTreeMap<u64, pb::EpochRecord>,
    updates: BTreeMap<(u64, Vec<u8>), (u64, Vec<u8>)>,
}

impl MachineTx for MemTx {
    fn idem_get(&self, key: &[u8]) -> sequencer::Result<Option<pb::AppendResponse>> {
        Ok(self.idem.get(key).map(|(_, answer)| answer.clone()))
    }
    fn idem_put(&mut self, key: &[u8], ordinal: u64, answer: &pb::AppendResponse) {
        self.idem.insert(key.to_vec(), (ordinal, answer.clone()));
        self.idem_order.insert(ordinal, key.to_vec());
    }
    fn idem_evict(&mut self, ordinal: u64) -> sequencer::Result<()> {
        if let Some(key) = self.idem_order.remove(&ordinal) {
            self.idem.remove(&key);
        }
        Ok(())
    }
    fn epoch_get(&self, epoch: u64) -> sequencer::Result<Option<pb::EpochRecord>> {
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

const BITS: u32 = 2;

fn metadata() -> pb::ClusterMetadata {
    pb::ClusterMetadata {
        cluster_id: vec![7; 16],
        partition_bits: BITS,
        akd_configuration: "whatsapp_v1".into(),
        vrf_public_key: vec![1; 32],
        max_epoch_updates: 5,
        idempotency_window: 3,
        retained_committed_batches: 1,
        max_label_bytes: 8,
        max_value_bytes: 16,
        max_epoch_bytes: 64,
        max_uncommitted_epochs: 4,
        idempotency_retention_ms: 2_000,
        max_idempotency_keys: 2,
        ..pb::ClusterMetadata::default()
    }
}

/// A root hash and partition roots for `epoch` that stitch together (`seed` picks the root).
fn stitched(epoch: u64, seed: u8) -> (Vec<u8>, Vec<u8>) {
    use ktd_core::akd_core::{AzksValue, NodeLabel};
    use ktd_core::stitch::TopTree;
    use ktd_core::tree::NodeRef;
    let mut partitions = vec![None; 1 << BITS];
    partitions[0] = Some(NodeRef {
        label: NodeLabel::new([0; 32], 256),
        hash: AzksValue([seed; 32]),
        min_epoch: epoch.max(1),
        max_epoch: epoch.max(1),
    });
    let top = TopTree::<ktd_core::config::WhatsAppV1>::new(BITS as u8, partitions.clone())
        .expect("stitch");
    let record = ktd_core::EpochRecord {
        epoch,
        root_hash: top.root_hash(),
        partitions,
    };
    (record.root_hash.to_vec(), record.encode())
}

/// One step, relative to the machine's state when it runs (so epochs are often the right ones).
#[derive(Clone, Debug)]
enum Step {
    Append {
        updates: Vec<(Vec<u8>, Vec<u8>)>,
        key: Option<u8>,
        honest_hash: bool,
        retry_key: bool,
    },
    Seal {
        offset: i8,
        heartbeat: bool,
    },
    Commit {
        offset: i8,
        root: Root,
    },
    ShardMap {
        stale: bool,
        partitions: Vec<(u32, Vec<String>)>,
        replication_factor: u32,
    },
    Init {
        changed: bool,
    },
    /// Moves the safe epoch to the committed epoch plus `offset`.
    Advance {
        offset: i8,
    },
    /// Pins the committed epoch plus `offset` (pin id `p<id>`), alive until `expires`.
    Pin {
        id: u8,
        offset: i8,
        expires: u16,
    },
    Unpin {
        id: u8,
    },
    Empty,
}

#[derive(Clone, Debug)]
enum Root {
    /// Stitched partition roots and their root.
    Valid(u8),
    /// Stitched partition roots with another root hash.
    Forged(u8),
    /// Any bytes.
    Garbage(Vec<u8>, Vec<u8>),
}

fn label() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::sample::select(vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec(), b"d".to_vec()]),
        1 => prop::collection::vec(any::<u8>(), 0..12),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let server = prop::sample::select(vec!["s1".to_string(), "s2".to_string(), String::new()]);
    prop_oneof![
        6 => (
            prop::collection::vec((label(), prop::collection::vec(any::<u8>(), 0..20)), 0..4),
            prop::option::of(0u8..3),
            prop::bool::weighted(0.8),
            any::<bool>(),
        )
            .prop_map(|(updates, key, honest_hash, retry_key)| Step::Append {
                updates,
                key,
                honest_hash,
                retry_key,
            }),
        3 => (-2i8..3, any::<bool>()).prop_map(|(offset, heartbeat)| Step::Seal { offset, heartbeat }),
        4 => (
            -2i8..3,
            prop_oneof![
                3 => any::<u8>().prop_map(Root::Valid),
                1 => any::<u8>().prop_map(Root::Forged),
                1 => (prop::collection::vec(any::<u8>(), 0..40), prop::collection::vec(any::<u8>(), 0..60))
                    .prop_map(|(root, partitions)| Root::Garbage(root, partitions)),
            ],
        )
            .prop_map(|(offset, root)| Step::Commit { offset, root }),
        1 => (
            any::<bool>(),
            prop::collection::vec((0u32..6, prop::collection::vec(server, 0..3)), 0..6),
            0u32..3,
        )
            .prop_map(|(stale, partitions, replication_factor)| Step::ShardMap {
                stale,
                partitions,
                replication_factor,
            }),
        1 => any::<bool>().prop_map(|changed| Step::Init { changed }),
        2 => (-3i8..2).prop_map(|offset| Step::Advance { offset }),
        1 => (0u8..3, -3i8..2, any::<u16>()).prop_map(|(id, offset, expires)| Step::Pin { id, offset, expires }),
        1 => (0u8..3).prop_map(|id| Step::Unpin { id }),
        1 => Just(Step::Empty),
    ]
}

/// The retention commands' clock: moves on with the sequence numbers, so pins expire.
fn retention_now(state: &EpochState) -> u64 {
    state.next_sequence * 1_000
}

fn command(step: &Step, state: &EpochState) -> Option<pb::command::Kind> {
    let at = |base: u64, offset: i8| base.saturating_add_signed(i64::from(offset));
    Some(match step.clone() {
        Step::Append {
            updates,
            key,
            honest_hash,
            retry_key,
        } => {
            let updates: Vec<pb::Update> = updates
                .into_iter()
                .map(|(label, value)| pb::Update { label, value })
                .collect();
            let idempotency_key = key.map(|key| vec![b'k', key]).unwrap_or_default();
            let payload_hash = match (key, honest_hash) {
                (None, _) => Vec::new(),
                (Some(_), true) => sequencer::node::payload_hash(&updates).to_vec(),
                (Some(_), false) => vec![0x5a; 32],
            };
            pb::command::Kind::Append(pb::AppendRequest {
                updates,
                idempotency_key,
                // Time moves on with the appends, so caller keys outlive their retention.
                proposed_at_ms: 1_000 + state.next_sequence * 700,
                payload_hash,
                retry_key,
            })
        }
        Step::Seal { offset, heartbeat } => pb::command::Kind::Seal(pb::SealRequest {
            epoch: at(state.open_epoch, offset),
            heartbeat,
            sealed_at_ms: 1_000,
        }),
        Step::Commit { offset, root } => {
            let epoch = at(state.last_committed_epoch + 1, offset);
            let (root_hash, partition_roots) = match root {
                Root::Valid(seed) => stitched(epoch, seed),
                Root::Forged(seed) => (vec![seed; 32], stitched(epoch, seed).1),
                Root::Garbage(root, partitions) => (root, partitions),
            };
            pb::command::Kind::CommitEpoch(pb::CommitEpochRequest {
                epoch,
                root_hash,
                partition_roots,
                committed_at_ms: 2_000,
                ..pb::CommitEpochRequest::default()
            })
        }
        Step::ShardMap {
            stale,
            partitions,
            replication_factor,
        } => pb::command::Kind::SetShardMap(pb::SetShardMapRequest {
            shards: Vec::new(),
            expected_version: state.shard_map.version + u64::from(stale),
            map: Some(cluster_pb::ShardMap {
                version: 0,
                shards: Vec::new(),
                replication_factor,
                servers: ["s1", "s2"]
                    .map(|id| cluster_pb::ShardServer {
                        id: id.into(),
                        address: format!("{id}:1"),
                        maintenance_until_ms: 0,
                        draining: false,
                    })
                    .to_vec(),
                partitions: partitions
                    .into_iter()
                    .map(|(partition, voters)| cluster_pb::PartitionReplicas {
                        partition,
                        voters,
                        learners: Vec::new(),
                        quarantined: Vec::new(),
                    })
                    .collect(),
            }),
        }),
        Step::Advance { offset } => pb::command::Kind::Retention(pb::RetentionCommand {
            kind: Some(pb::retention_command::Kind::AdvanceSafeEpoch(at(
                state.last_committed_epoch,
                offset,
            ))),
            now_ms: retention_now(state),
        }),
        Step::Pin {
            id,
            offset,
            expires,
        } => pb::command::Kind::Retention(pb::RetentionCommand {
            kind: Some(pb::retention_command::Kind::AddPin(pb::HistoryPin {
                id: format!("p{id}"),
                owner: "operator".into(),
                epoch: at(state.last_committed_epoch, offset),
                expires_at_ms: u64::from(expires),
                reason: String::new(),
                created_at_ms: 0,
            })),
            now_ms: retention_now(state),
        }),
        Step::Unpin { id } => pb::command::Kind::Retention(pb::RetentionCommand {
            kind: Some(pb::retention_command::Kind::RemovePin(format!("p{id}"))),
            now_ms: retention_now(state),
        }),
        Step::Init { changed } => {
            let mut metadata = metadata();
            if changed {
                metadata.max_epoch_updates += 1;
            }
            pb::command::Kind::InitCluster(metadata)
        }
        Step::Empty => return None,
    })
}

/// A valid shard map for the tests' 4 partitions on `s1` (so maps can also be accepted).
fn valid_map_step() -> Step {
    Step::ShardMap {
        stale: false,
        partitions: (0..1 << BITS)
            .map(|p| (p, vec!["s1".to_string()]))
            .collect(),
        replication_factor: 1,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_command_sequences_keep_epochs_monotonic_one_root_per_epoch_and_refusals_inert(
        steps in prop::collection::vec(step(), 1..60),
        map_first in any::<bool>(),
    ) {
        let mut machine = Machine::default();
        let mut tx = MemTx::default();
        let mut index = 0u64;
        let steps: Vec<Step> = map_first.then(valid_map_step).into_iter().chain(steps).collect();
        let mut init = Some(pb::command::Kind::InitCluster(metadata()));
        let mut roots: BTreeMap<u64, (Vec<u8>, Vec<u8>)> = BTreeMap::new();
        for step in std::iter::once(None).chain(steps.iter().map(Some)) {
            let kind = match step {
                None => init.take(),
                Some(step) => command(step, machine.state()),
            };
            let command = pb::Command { kind };
            let before_state = machine.state().clone();
            let before_tx = tx.clone();
            index += 1;
            let applied = machine.apply(&mut tx, index, &command).expect("an in-memory apply never fails");
            let state = machine.state();
            let kind = applied.kind.as_ref().expect("every command has an outcome");
            let inert = match kind {
                pb::apply_result::Kind::Rejected(rejection) => {
                    prop_assert!(!rejection.message.is_empty());
                    prop_assert_ne!(rejection.code, 0, "a rejection with code OK");
                    true
                }
                pb::apply_result::Kind::Appended(answer) => answer.duplicate,
                pb::apply_result::Kind::Committed(answer) => answer.already_committed,
                pb::apply_result::Kind::Sealed(answer) => answer.already_sealed,
                pb::apply_result::Kind::Metadata(_) => before_state.metadata.is_some(),
                pb::apply_result::Kind::ShardMap(_) => false,
                pb::apply_result::Kind::Noop(_) => true,
                pb::apply_result::Kind::Retention(_) => false,
                pb::apply_result::Kind::Restore(_) => false,
            };
            // History retention: the safe epoch never decreases, never passes the committed
            // epoch, and never passes a pin that was live when it moved.
            let history = &state.history;
            prop_assert!(history.safe_epoch >= before_state.history.safe_epoch);
            prop_assert!(history.safe_epoch <= state.last_committed_epoch.max(before_state.history.safe_epoch));
            if history.safe_epoch > before_state.history.safe_epoch {
                let now = retention_now(&before_state);
                for pin in before_state.history.pins.values().filter(|pin| pin.expires_at_ms > now) {
                    prop_assert!(history.safe_epoch <= pin.epoch, "advanced past live pin {:?}", pin);
                }
            }
            if inert {
                prop_assert_eq!(&before_state, state, "a refused or repeated command changed the state: {:?}", command);
                prop_assert_eq!(&before_tx, &tx, "a refused or repeated command wrote: {:?}", command);
            }
            prop_assert!(state.open_epoch >= before_state.open_epoch);
            prop_assert!(state.next_sequence >= before_state.next_sequence);
            prop_assert!(state.last_committed_epoch >= before_state.last_committed_epoch);
            prop_assert!(state.last_committed_epoch < state.open_epoch);
            prop_assert!(state.shard_map.version >= before_state.shard_map.version);
            // Caller keys: never more than the cap, never forgotten out of order.
            prop_assert!(state.kept_next_ordinal - state.kept_oldest_ordinal <= metadata().max_idempotency_keys);
            prop_assert!(state.kept_oldest_ordinal >= before_state.kept_oldest_ordinal);
            prop_assert!(state.kept_next_ordinal >= before_state.kept_next_ordinal);
            prop_assert_eq!(state.metadata.as_ref(), Some(&metadata()), "InitCluster changed the metadata");
            // One record per committed epoch, and a committed epoch's root never changes.
            let committed: Vec<u64> = tx.epochs.keys().copied().collect();
            prop_assert_eq!(committed, (1..=state.last_committed_epoch).collect::<Vec<_>>());
            for (epoch, record) in &tx.epochs {
                let root = (record.root_hash.clone(), record.partition_roots.clone());
                prop_assert_eq!(record.root_hash.len(), 32);
                if let Some(earlier) = roots.insert(*epoch, root.clone()) {
                    prop_assert_eq!(earlier, root, "epoch {} changed its root", epoch);
                }
            }
        }
    }
}
