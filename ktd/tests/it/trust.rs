//! Trust boundaries and overload, end to end on real processes: what a caller sends cannot halt
//! the directory or lose an acknowledged publish.
//!
//! * **Poison epoch.** Many large publishes inside one epoch interval become several epochs
//!   bounded by bytes (`--max-epoch-bytes`), and every one of them commits; a label longer than
//!   the shards accept is refused by the sequencer itself, at `Append`.
//! * **Memory.** 40 concurrent 15 MiB publishes and 40 oversized lookups on one connection are
//!   refused (the lookups after their first 64 KiB) while the gateway's peak memory stays
//!   bounded and small reads are still served.
//! * **Idempotency.** A key reused with other updates is refused; a true retry is answered
//!   `duplicate` and applied once.
//! * **Backpressure.** While commits are stalled (the only shard server stopped), publishes get
//!   `RESOURCE_EXHAUSTED` once `--max-uncommitted-epochs` sealed epochs wait, nothing more is
//!   sealed, and everything acknowledged commits after the shard server returns.

use std::time::Duration;

use ktd_client::Client;
use ktd_testkit::with_deadline;
use sequencer::pb;
use tonic::Code;

use crate::support::cluster::{Topology, TopologyOptions, connect};

const SEED: [u8; 32] = [0x7e; 32];

/// One shard server holding every partition (the reproduction's shape: no other server shares
/// the load), epochs of at most 4 MiB, at most 3 sealed epochs waiting for their commit.
fn start() -> Topology {
    Topology::start(TopologyOptions {
        seed: SEED,
        ip_base: 140,
        epoch_interval: "3s",
        shards: 1,
        replication_factor: Some(1),
        init_args: &[
            "--max-epoch-bytes",
            "4194304",
            "--max-uncommitted-epochs",
            "3",
        ],
    })
}

/// `count` updates of `value_bytes` each, labels `{prefix}-{i}`.
fn large_updates(prefix: &str, count: usize, value_bytes: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    (0..count)
        .map(|i| {
            (
                format!("{prefix}-{i}").into_bytes(),
                vec![i as u8; value_bytes],
            )
        })
        .collect()
}

#[test]
fn large_publishes_in_one_epoch_commit_as_byte_bounded_epochs_and_the_sequencer_refuses_what_shards_would()
 {
    with_deadline(Duration::from_secs(240), || async {
        let topology = start();
        let client = connect(&topology.gateways[0].addr).await;

        tracing::info!("--- 12 publishes of 32 × 60 KiB (≈ 23 MiB) inside one 3 s epoch interval");
        let mut published = Vec::new();
        for round in 0..12 {
            let answer = client
                .publish(large_updates(&format!("big-{round}"), 32, 60 << 10), None)
                .await
                .expect("a publish within the limits is acknowledged");
            published.push((round, answer.epoch));
        }
        let first = published.first().expect("published").1;
        let last = published.last().expect("published").1;
        assert!(
            last >= first + 4,
            "23 MiB of updates must span at least 6 epochs of ≤ 4 MiB: {published:?}"
        );
        let committed = client
            .wait_for_epoch(last)
            .await
            .expect("every epoch commits");
        assert!(committed.epoch >= last);
        for (round, epoch) in [published[0], published[11]] {
            let lookup = client
                .lookup(format!("big-{round}-31").as_bytes(), None)
                .await
                .expect("verified lookup");
            assert_eq!(lookup.value, vec![31u8; 60 << 10]);
            assert_eq!(lookup.epoch, epoch);
        }

        tracing::info!("--- labels the shards would refuse never reach an epoch");
        let sequencers = topology.sequencer_client();
        let refused = sequencers
            .append(
                vec![pb::Update {
                    label: vec![b'l'; 2048],
                    value: b"v".to_vec(),
                }],
                None,
            )
            .await
            .expect_err("a 2 KiB label is refused at the sequencer");
        let status = tonic::Status::from(refused);
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("2048"), "{status:?}");

        tracing::info!("--- a publish larger than the sequencer takes is refused by the gateway");
        let oversized = client
            .publish(large_updates("huge", 300, 60 << 10), None)
            .await
            .expect_err("≈ 18 MiB in one publish");
        assert_eq!(oversized.code(), Some(Code::OutOfRange), "{oversized}");
        assert!(
            !oversized.to_string().contains("sequencer"),
            "refused by the gateway before it reaches the sequencer: {oversized}"
        );

        tracing::info!(
            "--- 40 concurrent 15 MiB publishes and 40 oversized lookups on one connection"
        );
        let gateway_pid = topology.gateways[0].pid().expect("gateway pid");
        let baseline = ktd_testkit::process::peak_rss_bytes(Some(gateway_pid)).expect("VmHWM");
        let channel = tonic::transport::Endpoint::from_shared(topology.gateway_url())
            .expect("endpoint")
            .connect()
            .await
            .expect("one connection");
        let directory = ktd_proto::ktd::v1::directory_client::DirectoryClient::new(channel)
            .max_encoding_message_size(usize::MAX);
        // Refused by the gateway after it received them (an empty label), so the sequencers
        // never see them: what they cost is the gateway's receive buffers.
        let big_publish = ktd_proto::ktd::v1::PublishRequest {
            updates: (0..240)
                .map(|i| ktd_proto::ktd::v1::Update {
                    label: if i == 239 {
                        Vec::new()
                    } else {
                        format!("storm-{i}").into_bytes()
                    },
                    value: vec![7; 64 << 10],
                })
                .collect(),
            idempotency_key: String::new(),
        };
        let huge_lookup = ktd_proto::ktd::v1::LookupRequest {
            label: vec![b'x'; 1 << 20],
            epoch: None,
        };
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..40 {
            let (mut publisher, request) = (directory.clone(), big_publish.clone());
            calls.spawn(async move { publisher.publish(request).await.map(|_| ()) });
            let (mut reader, request) = (directory.clone(), huge_lookup.clone());
            calls.spawn(async move { reader.lookup(request).await.map(|_| ()) });
        }
        // Small requests are still served meanwhile.
        for _ in 0..5 {
            client
                .epoch(None)
                .await
                .expect("a small read during the storm");
        }
        let mut codes = std::collections::BTreeMap::new();
        while let Some(joined) = calls.join_next().await {
            let status = joined
                .expect("call task")
                .expect_err("every storm call is refused");
            assert!(
                matches!(
                    status.code(),
                    Code::InvalidArgument | Code::ResourceExhausted | Code::OutOfRange
                ),
                "{status:?}"
            );
            *codes.entry(format!("{:?}", status.code())).or_insert(0) += 1;
        }
        assert_eq!(
            codes.get("OutOfRange").copied().unwrap_or(0),
            40,
            "every 1 MiB lookup is refused past 64 KiB: {codes:?}"
        );
        let grown = ktd_testkit::process::peak_rss_bytes(Some(gateway_pid))
            .expect("VmHWM")
            .saturating_sub(baseline);
        assert!(
            grown < 1536 << 20,
            "the gateway's peak RSS grew by {} MiB (bound: 32 large requests × 16 MiB, decoded)",
            grown >> 20
        );

        tracing::info!("--- the directory still commits");
        let after = client
            .publish(vec![(b"after".to_vec(), b"1".to_vec())], None)
            .await
            .expect("publish");
        client.wait_for_epoch(after.epoch).await.expect("commit");
        assert_eq!(
            client.lookup(b"after", None).await.expect("lookup").value,
            b"1"
        );
    });
}

#[test]
fn an_idempotency_key_binds_its_updates_and_stalled_commits_push_back_on_publishers() {
    with_deadline(Duration::from_secs(240), || async {
        let mut topology = start();
        let client: Client = connect(&topology.gateways[0].addr).await;

        tracing::info!("--- one key, two payloads: the second is refused, a retry is a duplicate");
        let key = Some("order-17".to_string());
        let first = client
            .publish(vec![(b"alice".to_vec(), b"k1".to_vec())], key.clone())
            .await
            .expect("publish");
        assert!(!first.duplicate);
        let reused = client
            .publish(vec![(b"mallory".to_vec(), b"k9".to_vec())], key.clone())
            .await
            .expect_err("another payload under the same key");
        assert_eq!(reused.code(), Some(Code::AlreadyExists), "{reused}");
        let retry = client
            .publish(vec![(b"alice".to_vec(), b"k1".to_vec())], key)
            .await
            .expect("retry");
        assert!(retry.duplicate);
        assert_eq!((retry.epoch, retry.sequence), (first.epoch, first.sequence));
        client.wait_for_epoch(first.epoch).await.expect("commit");
        assert!(
            client.lookup(b"mallory", None).await.is_err(),
            "the refused payload was never applied"
        );

        tracing::info!(
            "--- the only shard server stops: commits stall, publishers are pushed back"
        );
        let committed_before = client.epoch(None).await.expect("latest").epoch;
        topology.shards[0].kill9();
        let mut acknowledged = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let pushed_back = loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "publishes were never refused with RESOURCE_EXHAUSTED ({} acknowledged)",
                acknowledged.len()
            );
            let label = format!("stalled-{}", acknowledged.len());
            match client
                .publish(vec![(label.clone().into_bytes(), b"v".to_vec())], None)
                .await
            {
                Ok(answer) => acknowledged.push((label, answer.epoch)),
                Err(error) if error.code() == Some(Code::ResourceExhausted) => {
                    break error.to_string();
                }
                Err(error) => panic!("publish while commits stall: {error}"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        assert!(
            pushed_back.contains("waiting to be committed"),
            "{pushed_back}"
        );
        let status = topology
            .sequencer_client()
            .cluster_status()
            .await
            .expect("status");
        let sealed = status.open_epoch - 1;
        assert_eq!(
            sealed - status.last_committed_epoch,
            3,
            "exactly max_uncommitted_epochs wait: {status:?}"
        );
        for _ in 0..5 {
            let refused = client
                .publish(vec![(b"more".to_vec(), b"v".to_vec())], None)
                .await
                .expect_err("still pushed back");
            assert_eq!(refused.code(), Some(Code::ResourceExhausted), "{refused}");
        }
        tokio::time::sleep(Duration::from_secs(4)).await;
        let status = topology
            .sequencer_client()
            .cluster_status()
            .await
            .expect("status");
        assert!(
            status.open_epoch - 1 <= sealed,
            "nothing more is sealed while pushed back: {status:?}"
        );
        assert_eq!(status.last_committed_epoch, committed_before);

        tracing::info!("--- the shard server returns: everything acknowledged commits");
        topology.shards[0].restart();
        let last = acknowledged
            .iter()
            .map(|(_, epoch)| *epoch)
            .max()
            .expect("some were acknowledged");
        client
            .wait_for_epoch(last)
            .await
            .expect("the backlog commits");
        for (label, epoch) in &acknowledged {
            let lookup = client.lookup(label.as_bytes(), None).await.expect("lookup");
            assert_eq!(lookup.epoch, *epoch, "{label}");
        }
        let after = client
            .publish(vec![(b"after-stall".to_vec(), b"1".to_vec())], None)
            .await
            .expect("publishing resumes");
        client.wait_for_epoch(after.epoch).await.expect("commit");
    });
}
