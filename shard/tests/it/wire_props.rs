//! Bounded fuzzing of the wire → domain decoders (`shard::wire::Decoder`): whatever a peer
//! sends — arbitrary bytes, or well-formed messages with arbitrary field values (labels of any
//! length, digests of any size, shard maps of any shape and width) — decoding never panics and
//! either succeeds or returns a typed `BadMessage` error that names the peer; and what the
//! encoders produce always decodes back to itself.
//!
//! Case counts are fixed (run in CI in a few seconds in release).

use ktd_proto::ktd::cluster::v1 as cluster_pb;
use ktd_proto::ktd::shard::v1 as pb;
use ktd_proto::ktd::v1 as akd_pb;
use proptest::prelude::*;
use prost::Message;
use shard::error::Error;
use shard::wire::{self, Decoder};

const PEER: &str = "fuzz-peer";

fn decoder() -> Decoder<'static> {
    Decoder { peer: PEER }
}

/// A decode result: Ok, or a `BadMessage` naming the peer (the only error a decoder returns).
fn typed<T>(result: shard::error::Result<T>) -> Result<(), TestCaseError> {
    match result {
        Ok(_) => Ok(()),
        Err(Error::BadMessage { peer, message }) => {
            prop_assert_eq!(peer, PEER);
            prop_assert!(!message.is_empty());
            Ok(())
        }
        Err(other) => Err(TestCaseError::fail(format!(
            "untyped decode error: {other:?}"
        ))),
    }
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

/// Digest-like fields: usually 32 bytes, sometimes not.
fn digest() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![4 => prop::collection::vec(any::<u8>(), 32), 1 => bytes(40)]
}

fn label() -> impl Strategy<Value = akd_pb::NodeLabel> {
    (
        prop::option::of(bytes(40)),
        prop::option::of(prop_oneof![0u32..=257, any::<u32>()]),
    )
        .prop_map(|(label_val, label_len)| akd_pb::NodeLabel {
            label_val,
            label_len,
        })
}

fn node_ref() -> impl Strategy<Value = pb::NodeRef> {
    (prop::option::of(label()), digest(), 0u64..5, 0u64..5).prop_map(
        |(label, hash, min_epoch, max_epoch)| pb::NodeRef {
            label,
            hash,
            min_epoch,
            max_epoch,
        },
    )
}

fn server_id() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("s1".to_string()),
        Just("s2".to_string()),
        Just(String::new()),
        "[a-z0-9]{0,4}",
    ]
}

fn shard_map() -> impl Strategy<Value = cluster_pb::ShardMap> {
    let partition = (
        prop_oneof![0u32..8, any::<u32>()],
        prop::collection::vec(server_id(), 0..4),
        prop::collection::vec(
            (server_id(), server_id())
                .prop_map(|(server, replaces)| cluster_pb::Learner { server, replaces }),
            0..2,
        ),
        prop::collection::vec(server_id(), 0..2),
    )
        .prop_map(
            |(partition, voters, learners, quarantined)| cluster_pb::PartitionReplicas {
                partition,
                voters,
                learners,
                quarantined,
            },
        );
    let legacy =
        (server_id(), prop::collection::vec(0u32..10, 0..6)).prop_map(|(shard_id, partitions)| {
            cluster_pb::LegacyShard {
                shard_id,
                address: "127.0.0.1:1".into(),
                partitions,
            }
        });
    let server = (server_id(), any::<u64>()).prop_map(|(id, maintenance_until_ms)| {
        cluster_pb::ShardServer {
            id,
            address: "127.0.0.1:1".into(),
            maintenance_until_ms,
            draining: false,
        }
    });
    (
        any::<u64>(),
        prop::collection::vec(legacy, 0..3),
        prop_oneof![0u32..4, any::<u32>()],
        prop::collection::vec(server, 0..4),
        prop::collection::vec(partition, 0..9),
    )
        .prop_map(
            |(version, shards, replication_factor, servers, partitions)| cluster_pb::ShardMap {
                version,
                shards,
                replication_factor,
                servers,
                partitions,
            },
        )
}

fn fence() -> impl Strategy<Value = Option<cluster_pb::Fence>> {
    prop::option::of(
        (
            any::<u64>(),
            any::<u64>(),
            prop::option::of(shard_map()),
            prop_oneof![0u32..4, 0u32..40, any::<u32>()],
            any::<u64>(),
        )
            .prop_map(
                |(term, committed_epoch, shard_map, partition_bits, safe_epoch)| {
                    cluster_pb::Fence {
                        term,
                        committed_epoch,
                        shard_map,
                        partition_bits,
                        safe_epoch,
                    }
                },
            ),
    )
}

fn partition_leaves() -> impl Strategy<Value = pb::PartitionLeaves> {
    (
        any::<u32>(),
        prop::collection::vec(
            (digest(), digest()).prop_map(|(label, commitment)| pb::Leaf { label, commitment }),
            0..4,
        ),
    )
        .prop_map(|(partition, leaves)| pb::PartitionLeaves { partition, leaves })
}

/// Runs every decoder that takes a whole message of that type on `bytes` (when they parse).
fn decode_all(bytes: &[u8]) -> Result<(), TestCaseError> {
    let d = decoder();
    if let Ok(message) = pb::BuildEpochRequest::decode(bytes) {
        typed(d.fence(&message.fence))?;
        typed(d.partition_roots(&message.base_roots))?;
        typed(d.partition_leaves(&message.leaves))?;
    }
    if let Ok(message) = pb::PrepareEpochRequest::decode(bytes) {
        typed(d.fence(&message.fence))?;
        let _ = d.updates(&message.updates);
    }
    if let Ok(message) = pb::WalkRequest::decode(bytes) {
        typed(d.walk_requests(&message.targets))?;
    }
    if let Ok(message) = pb::WalkResponse::decode(bytes) {
        typed(d.walks(&message.walks))?;
    }
    if let Ok(message) = pb::AppendOnlySliceResponse::decode(bytes) {
        typed(d.slice(&message))?;
    }
    if let Ok(message) = pb::LookupPlanResponse::decode(bytes) {
        typed(d.lookup_plan(&message))?;
    }
    if let Ok(message) = pb::HistoryPlanResponse::decode(bytes) {
        typed(d.history_plan(&message))?;
    }
    if let Ok(message) = pb::AbsencePlanResponse::decode(bytes) {
        typed(d.absence_plan(&message))?;
    }
    if let Ok(message) = pb::UserPartitionLeaves::decode(bytes) {
        typed(d.user_partition_leaves(&message))?;
    }
    if let Ok(message) = pb::PartitionChunk::decode(bytes) {
        typed(d.chunk(message))?;
    }
    if let Ok(message) = pb::PartitionState::decode(bytes) {
        typed(d.partition_state(&message))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_decode_to_a_value_or_a_typed_error(input in bytes(256)) {
        decode_all(&input)?;
    }

    #[test]
    fn mutated_well_formed_requests_decode_to_a_value_or_a_typed_error(
        fence in fence(),
        roots in prop::collection::vec(
            (any::<u32>(), prop::option::of(node_ref()))
                .prop_map(|(partition, root)| pb::PartitionRoot { partition, root }),
            0..5,
        ),
        leaves in prop::collection::vec(partition_leaves(), 0..4),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
    ) {
        let request = pb::BuildEpochRequest {
            epoch: 3,
            base_roots: roots,
            fence,
            leaves,
            sources: vec![0, 1, 2, 3],
        };
        let mut encoded = request.encode_to_vec();
        decode_all(&encoded)?;
        for (index, byte) in flips {
            if !encoded.is_empty() {
                let at = index.index(encoded.len());
                encoded[at] ^= byte;
            }
        }
        decode_all(&encoded)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3_000, ..ProptestConfig::default() })]

    #[test]
    fn node_refs_and_labels_decode_canonically_or_are_refused(node_ref in node_ref()) {
        let d = decoder();
        match d.node_ref(&node_ref) {
            Ok(decoded) => {
                // What decodes re-encodes to the same canonical message.
                let encoded = wire::node_ref(&decoded);
                let again = d.node_ref(&encoded).expect("an encoded node ref decodes");
                prop_assert_eq!(again, decoded);
            }
            Err(error) => typed::<()>(Err(error))?,
        }
    }

    #[test]
    fn fences_decode_only_with_a_valid_map_of_their_width(fence in fence()) {
        match decoder().fence(&fence) {
            Ok(decoded) => {
                let sent = fence.expect("a decoded fence was sent");
                prop_assert_eq!(u32::from(decoded.map.bits()), sent.partition_bits);
                prop_assert!(
                    decoded.map.bits() <= ktd_core::label::MAX_PARTITION_BITS,
                    "{} bits", decoded.map.bits()
                );
                let encoded = wire::fence(&decoded);
                let again = decoder().fence(&Some(encoded)).expect("an encoded fence decodes");
                prop_assert_eq!(again.map, decoded.map);
            }
            Err(error) => typed::<()>(Err(error))?,
        }
    }
}
