//! ktd's proof messages (`proto/ktd/v1/akd.proto`) are wire-compatible with `akd_core`'s
//! protobuf types: for real lookup, history and audit proofs, ktd's encoding is byte-identical
//! to akd_core's, decodes with `akd_core::proto` into the same `akd_core` structs, and akd_core's
//! bytes decode with ktd's messages into the same structs.

use akd_core::proto::specs::types as akd_pb;
use akd_core::verify::history::HistoryParams;
use akd_core::{AkdLabel, AkdValue};
use ktd_core::AkdConfig;
use ktd_proto::ktd::v1 as ktd_pb;
use prost::Message as _;

use crate::support::directory::open;

fn check<Ours, Theirs, Core>(core: &Core)
where
    Core: std::fmt::Debug + PartialEq,
    for<'a> Ours: prost::Message + Default + From<&'a Core>,
    for<'a> Core: TryFrom<&'a Ours, Error = ktd_proto::akd::ProofDecodeError>,
    for<'a> Theirs: protobuf::Message + From<&'a Core>,
    for<'a> Core: TryFrom<&'a Theirs, Error = akd_core::proto::ConversionError>,
{
    let ours = Ours::from(core).encode_to_vec();
    let theirs = Theirs::from(core)
        .write_to_bytes()
        .expect("akd_core encodes");
    if ours != theirs {
        let first_difference = ours.iter().zip(&theirs).position(|(a, b)| a != b);
        panic!(
            "ktd's bytes differ from akd_core's: {} vs {} bytes, first difference at {first_difference:?}",
            ours.len(),
            theirs.len()
        );
    }
    let decoded_by_akd = Theirs::parse_from_bytes(&ours).expect("akd_core parses ktd's bytes");
    assert_eq!(
        &Core::try_from(&decoded_by_akd).expect("akd_core converts"),
        core
    );
    let decoded_by_ktd = Ours::decode(theirs.as_slice()).expect("ktd parses akd_core's bytes");
    assert_eq!(
        &Core::try_from(&decoded_by_ktd).expect("ktd converts"),
        core
    );
}

#[test]
fn every_proof_type_round_trips_through_akd_core() {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let directory = open(data_dir.path(), AkdConfig::WhatsAppV1, 2, 9);
    for epoch in 0..6u64 {
        let mut batch = vec![(
            AkdLabel::from("alice"),
            AkdValue(format!("key-{epoch}").into_bytes()),
        )];
        batch.extend((0..20).map(|i| {
            (
                AkdLabel(format!("user-{epoch}-{i}").into_bytes()),
                AkdValue(vec![]),
            )
        }));
        directory.publish(batch).expect("publish");
    }
    let alice = AkdLabel::from("alice");
    let (lookup, _) = directory.lookup(&alice, None).expect("lookup");
    check::<ktd_pb::LookupProof, akd_pb::LookupProof, _>(&lookup);
    let (history, _) = directory
        .key_history(&alice, HistoryParams::Complete, None)
        .expect("history");
    check::<ktd_pb::HistoryProof, akd_pb::HistoryProof, _>(&history);
    check::<ktd_pb::MembershipProof, akd_pb::MembershipProof, _>(&lookup.existence_proof);
    check::<ktd_pb::NonMembershipProof, akd_pb::NonMembershipProof, _>(&lookup.freshness_proof);
    let audit = directory.audit(0, 6).expect("audit");
    check::<ktd_pb::AppendOnlyProof, akd_pb::AppendOnlyProof, _>(&audit);
    check::<ktd_pb::SingleAppendOnlyProof, akd_pb::SingleAppendOnlyProof, _>(&audit.proofs[3]);
}

#[test]
fn malformed_messages_are_errors_not_panics() {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let directory = open(data_dir.path(), AkdConfig::WhatsAppV1, 0, 10);
    directory
        .publish(vec![(AkdLabel::from("a"), AkdValue::from("v"))])
        .expect("publish");
    let (lookup, _) = directory
        .lookup(&AkdLabel::from("a"), None)
        .expect("lookup");
    let good = ktd_pb::LookupProof::from(&lookup);

    let mut missing = good.clone();
    missing.epoch = None;
    assert!(akd_core::LookupProof::try_from(&missing).is_err());
    let mut short_digest = good.clone();
    if let Some(proof) = short_digest.existence_proof.as_mut() {
        proof.hash_val = Some(vec![1, 2, 3]);
    }
    assert!(akd_core::LookupProof::try_from(&short_digest).is_err());
    let mut long_label = good.clone();
    if let Some(proof) = long_label.existence_proof.as_mut() {
        proof.label = Some(ktd_pb::NodeLabel {
            label_val: Some(vec![0; 33]),
            label_len: Some(256),
        });
    }
    assert!(akd_core::LookupProof::try_from(&long_label).is_err());
    let mut bad_children = good.clone();
    if let Some(proof) = bad_children.freshness_proof.as_mut() {
        proof.longest_prefix_children.pop();
    }
    assert!(akd_core::LookupProof::try_from(&bad_children).is_err());
    // Garbage bytes never panic the decoder.
    for garbage in [&b"\xff\xff\xff"[..], b"\x0a\x05hello", &[0x12; 40]] {
        let _ = ktd_pb::LookupProof::decode(garbage)
            .map(|message| akd_core::LookupProof::try_from(&message));
    }
}
