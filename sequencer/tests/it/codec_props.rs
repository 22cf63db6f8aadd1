//! Bounded fuzzing of what a sequencer decodes from peers and callers: the Raft codec
//! (`raft::codec`, also the log's on-disk format) fed arbitrary bytes and well-formed messages
//! with arbitrary fields (memberships whose voters are not nodes, missing ids, any terms), and
//! the request checks of `Append` and `InitCluster` (`InputLimits::check`,
//! `validate_metadata`) fed arbitrary updates and metadata. Nothing panics; a refusal is a typed
//! `SequencerError::Malformed` (the codec) or a message (the checks); what decodes re-encodes to
//! a message that decodes to the same value.
//!
//! Case counts are fixed (a few seconds in release).

use ktd_proto::ktd::raft::v1 as pb;
use ktd_proto::ktd::sequencer::v1 as seq;
use proptest::prelude::*;
use prost::Message;
use sequencer::SequencerError;
use sequencer::machine::{InputLimits, validate_metadata};
use sequencer::raft::codec;

fn typed<T>(result: sequencer::Result<T>) -> Result<Option<T>, TestCaseError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(SequencerError::Malformed(message)) => {
            prop_assert!(!message.is_empty());
            Ok(None)
        }
        Err(other) => Err(TestCaseError::fail(format!(
            "untyped decode error: {other:?}"
        ))),
    }
}

fn leader_id() -> impl Strategy<Value = pb::LeaderId> {
    (any::<u64>(), prop_oneof![0u64..4, any::<u64>()])
        .prop_map(|(term, node_id)| pb::LeaderId { term, node_id })
}

fn log_id() -> impl Strategy<Value = pb::LogId> {
    (prop::option::of(leader_id()), any::<u64>())
        .prop_map(|(leader_id, index)| pb::LogId { leader_id, index })
}

fn vote() -> impl Strategy<Value = Option<pb::Vote>> {
    prop::option::of((prop::option::of(leader_id()), any::<bool>()).prop_map(
        |(leader_id, committed)| pb::Vote {
            leader_id,
            committed,
        },
    ))
}

fn membership() -> impl Strategy<Value = pb::Membership> {
    (
        prop::collection::vec(
            prop::collection::vec(0u64..6, 0..4).prop_map(|node_ids| pb::NodeIdSet { node_ids }),
            0..3,
        ),
        prop::collection::btree_map(0u64..6, "[a-z0-9:.]{0,12}", 0..5),
    )
        .prop_map(|(configs, nodes)| pb::Membership {
            configs,
            nodes: nodes
                .into_iter()
                .map(|(id, address)| (id, pb::Node { address }))
                .collect(),
        })
}

fn entry() -> impl Strategy<Value = pb::Entry> {
    let payload = prop_oneof![
        Just(pb::entry::Payload::Blank(pb::Blank {})),
        Just(pb::entry::Payload::Normal(seq::Command::default())),
        membership().prop_map(pb::entry::Payload::Membership),
    ];
    (prop::option::of(log_id()), prop::option::of(payload))
        .prop_map(|(log_id, payload)| pb::Entry { log_id, payload })
}

fn append_request() -> impl Strategy<Value = pb::AppendEntriesRequest> {
    (
        vote(),
        prop::option::of(log_id()),
        prop::collection::vec(entry(), 0..4),
        prop::option::of(log_id()),
    )
        .prop_map(
            |(vote, prev_log_id, entries, leader_commit)| pb::AppendEntriesRequest {
                vote,
                prev_log_id,
                entries,
                leader_commit,
            },
        )
}

/// Every codec decoder that takes a whole message, on `bytes` (when they parse).
fn decode_all(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(message) = pb::AppendEntriesRequest::decode(bytes) {
        typed(codec::append_request_from_pb(message))?;
    }
    if let Ok(message) = pb::AppendEntriesResponse::decode(bytes) {
        typed(codec::append_response_from_pb(message))?;
    }
    if let Ok(message) = pb::StreamAppendResponse::decode(bytes) {
        typed(codec::stream_result_from_pb(message))?;
    }
    if let Ok(message) = pb::VoteRequest::decode(bytes) {
        typed(codec::vote_request_from_pb(&message))?;
    }
    if let Ok(message) = pb::VoteResponse::decode(bytes) {
        typed(codec::vote_response_from_pb(&message))?;
    }
    if let Ok(message) = pb::TransferLeaderRequest::decode(bytes) {
        typed(codec::transfer_request_from_pb(&message))?;
    }
    if let Ok(message) = pb::TransferLeaderResponse::decode(bytes) {
        typed(codec::transfer_response_from_pb(&message))?;
    }
    if let Ok(message) = pb::SnapshotMeta::decode(bytes) {
        typed(codec::snapshot_meta_from_pb(Some(&message)))?;
    }
    if let Ok(message) = pb::Entry::decode(bytes) {
        typed(codec::entry_from_pb(message))?;
    }
    Ok(())
}

fn metadata() -> impl Strategy<Value = seq::ClusterMetadata> {
    (
        (
            prop_oneof![
                Just(vec![7u8; 16]),
                prop::collection::vec(any::<u8>(), 0..20)
            ],
            prop_oneof![0u32..14, any::<u32>()],
            prop_oneof![
                Just("whatsapp_v1".to_string()),
                Just("experimental:x".to_string()),
                ".{0,12}"
            ],
            prop_oneof![
                Just(vec![1u8; 32]),
                prop::collection::vec(any::<u8>(), 0..40)
            ],
        ),
        (
            prop_oneof![0u64..100, any::<u64>()],
            prop_oneof![0u64..100, any::<u64>()],
            prop_oneof![0u64..100, any::<u64>()],
            any::<u64>(),
            any::<u64>(),
        ),
        (
            prop_oneof![0u64..2048, any::<u64>()],
            prop_oneof![0u64..(1 << 17), any::<u64>()],
            prop_oneof![0u64..(1 << 28), any::<u64>()],
            prop_oneof![0u64..32, any::<u64>()],
        ),
        (
            prop_oneof![0u64..3_600_000, any::<u64>()],
            prop_oneof![0u64..1024, any::<u64>()],
        ),
    )
        .prop_map(
            |(
                (cluster_id, partition_bits, akd_configuration, vrf_public_key),
                (max_epoch_updates, idempotency_window, retained, max_bytes, max_age),
                (max_label_bytes, max_value_bytes, max_epoch_bytes, max_uncommitted_epochs),
                (idempotency_retention_ms, max_idempotency_keys),
            )| seq::ClusterMetadata {
                cluster_id,
                partition_bits,
                akd_configuration,
                vrf_public_key,
                max_epoch_updates,
                idempotency_window,
                retained_committed_batches: retained,
                batch_retention_max_bytes: max_bytes,
                batch_retention_max_age_ms: max_age,
                max_label_bytes,
                max_value_bytes,
                max_epoch_bytes,
                max_uncommitted_epochs,
                idempotency_retention_ms,
                max_idempotency_keys,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_decode_to_raft_messages_or_a_typed_error(
        input in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        decode_all(&input)?;
    }

    #[test]
    fn arbitrary_raft_messages_decode_or_are_refused_and_round_trip(
        request in append_request(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
    ) {
        let mut encoded = request.encode_to_vec();
        if let Some(decoded) = typed(codec::append_request_from_pb(request))? {
            let again = codec::append_request_to_pb(&decoded);
            let twice = codec::append_request_from_pb(again.clone()).expect("re-decodes");
            prop_assert_eq!(codec::append_request_to_pb(&twice), again);
        }
        for (index, byte) in flips {
            if !encoded.is_empty() {
                let at = index.index(encoded.len());
                encoded[at] ^= byte;
            }
        }
        decode_all(&encoded)?;
    }

    #[test]
    fn memberships_decode_only_when_every_voter_is_a_node(membership in membership()) {
        if let Some(decoded) = typed(codec::membership_from_pb(&membership))? {
            let nodes: std::collections::BTreeSet<u64> = membership.nodes.keys().copied().collect();
            for config in &membership.configs {
                for voter in &config.node_ids {
                    prop_assert!(nodes.contains(voter), "voter {voter} without a node: {decoded:?}");
                }
            }
        }
    }

    #[test]
    fn cluster_metadata_and_updates_are_checked_without_panicking(
        metadata in metadata(),
        updates in prop::collection::vec(
            (prop::collection::vec(any::<u8>(), 0..40), prop::collection::vec(any::<u8>(), 0..80))
                .prop_map(|(label, value)| seq::Update { label, value }),
            0..6,
        ),
    ) {
        let valid = validate_metadata(&metadata);
        if let Err(message) = &valid {
            prop_assert!(!message.is_empty());
        }
        let limits = InputLimits::of(&metadata);
        match limits.check(&updates) {
            Ok(()) => {
                for update in &updates {
                    prop_assert!(!update.label.is_empty());
                    prop_assert!(update.label.len() as u64 <= limits.max_label_bytes);
                    prop_assert!(update.value.len() as u64 <= limits.max_value_bytes);
                }
            }
            Err(message) => prop_assert!(!message.is_empty()),
        }
    }
}
