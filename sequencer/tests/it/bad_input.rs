//! Bad input gets a clear gRPC status (code and message), never a crash, and the node keeps
//! serving afterwards.

use std::time::Duration;

use bytes::{Buf, BufMut};
use sequencer::{SequencerError, pb};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::support::cluster::{TestCluster, update};
use crate::support::with_deadline;

fn status<T: std::fmt::Debug>(result: sequencer::Result<T>) -> (Code, String) {
    match result {
        Err(SequencerError::Remote(status)) => (status.code(), status.message().to_string()),
        other => panic!("expected an error status, got {other:?}"),
    }
}

fn assert_status<T: std::fmt::Debug>(result: sequencer::Result<T>, code: Code, message_part: &str) {
    let (actual, message) = status(result);
    assert_eq!(actual, code, "{message}");
    assert!(
        message.contains(message_part),
        "{message:?} should mention {message_part:?}"
    );
}

/// Sends raw bytes as a request body, to check how undecodable messages are answered.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let bytes = src.chunk().to_vec();
        src.advance(bytes.len());
        Ok(Some(bytes))
    }
}

#[test]
fn bad_requests_get_clear_statuses() {
    with_deadline(Duration::from_secs(60), || async {
        let cluster = TestCluster::start(1, |config| config.epoch.max_batch_updates = 100).await;
        let client = cluster.client();

        assert_status(
            client.append(Vec::new(), None).await,
            Code::InvalidArgument,
            "at least one update",
        );
        let oversized: Vec<pb::Update> = (0..101).map(|i| update(format!("u{i}"), "v")).collect();
        assert_status(
            client.append(oversized, None).await,
            Code::InvalidArgument,
            "batch of 101 updates exceeds the limit of 100",
        );
        assert_status(
            client
                .append(vec![update("a", "1"), update("", "2")], None)
                .await,
            Code::InvalidArgument,
            "update 1 has an empty label",
        );
        assert_status(
            client
                .append(vec![update("a", vec![0u8; 64 * 1024 + 1])], None)
                .await,
            Code::InvalidArgument,
            "value of 65537 bytes exceeds the limit of 65536 bytes",
        );
        client
            .append(vec![update("a", vec![0u8; 64 * 1024])], None)
            .await
            .expect("exactly the limit is fine");

        assert_status(
            client.get_epoch(Some(99)).await,
            Code::NotFound,
            "epoch 99 is not committed; the latest committed epoch is 0",
        );
        let empty = client
            .get_epoch(Some(0))
            .await
            .expect("epoch 0 always exists");
        assert!(empty.root_hash.is_empty());
        let mut short_root = crate::support::commit(1, 7);
        short_root.root_hash.truncate(5);
        let refused = tonic::Status::from(
            cluster
                .commit_epoch(short_root)
                .await
                .expect_err("a 5-byte root is refused"),
        );
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(
            refused
                .message()
                .contains("root hash must be 32 bytes, got 5")
        );
        assert_status(
            client.seal(Some(7)).await,
            Code::FailedPrecondition,
            "not open yet",
        );
        assert_status(
            client.sealed_batch_at(&cluster.addr(1), 42).await,
            Code::FailedPrecondition,
            "epoch 42 is not sealed",
        );
        assert_status(
            client
                .set_shard_map(
                    ktd_proto::ktd::cluster::v1::ShardMap {
                        shards: vec![ktd_proto::ktd::cluster::v1::LegacyShard {
                            shard_id: "s1".into(),
                            address: "127.0.0.1:9".into(),
                            partitions: vec![999],
                        }],
                        ..Default::default()
                    },
                    0,
                )
                .await,
            Code::InvalidArgument,
            "owns partition 999",
        );
        assert_status(
            client.add_learner(0, "127.0.0.1:9".into(), false).await,
            Code::InvalidArgument,
            "node id > 0",
        );

        tracing::info!("--- an undecodable message");
        {
            let channel =
                tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.addr(1)))
                    .expect("endpoint")
                    .connect()
                    .await
                    .expect("connect");
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready().await.expect("ready");
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(
                "/ktd.sequencer.v1.Sequencer/Append",
            );
            let answer = grpc
                .unary(
                    tonic::Request::new(vec![0xff, 0xff, 0xff, 0xff]),
                    path,
                    RawCodec,
                )
                .await;
            let status = answer.expect_err("garbage must be refused");
            // gRPC's convention for a message that does not parse is INTERNAL.
            assert_eq!(status.code(), Code::Internal, "{status:?}");
            assert!(status.message().contains("decode"), "{status:?}");

            tracing::info!("--- nobody commits over the wire, not even a well-formed commit");
            client
                .append(vec![update("c", "1")], None)
                .await
                .expect("append");
            let sealed = client.seal(None).await.expect("seal");
            let forged = prost::Message::encode_to_vec(&pb::CommitEpochRequest {
                epoch: sealed.epoch,
                root_hash: vec![0xab; 32],
                ..crate::support::commit(sealed.epoch, 1)
            });
            grpc.ready().await.expect("ready");
            let answer = grpc
                .unary(
                    tonic::Request::new(forged),
                    tonic::codegen::http::uri::PathAndQuery::from_static(
                        "/ktd.sequencer.v1.Sequencer/CommitEpoch",
                    ),
                    RawCodec,
                )
                .await;
            let status = answer.expect_err("CommitEpoch is not served");
            assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
            assert_status(
                client.get_epoch(Some(sealed.epoch)).await,
                Code::NotFound,
                "is not committed",
            );
        }

        let after = client
            .append(vec![update("b", "2")], None)
            .await
            .expect("still serving");
        assert_eq!(after.first_sequence, 3);
        cluster.shutdown().await;
    });
}
