//! What one caller can make a sequencer hold is bounded (issue 15, audit findings M3, M4, M5):
//! batches are streamed from RocksDB a chunk at a time, `WatchLog` subscribers are limited in
//! number and in buffered bytes (a stalled one is dropped with a clear status), and a received
//! snapshot is limited in bytes and files, one at a time, and leaves nothing behind when refused.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use ktd_proto::ktd::raft::v1 as rpb;
use ktd_proto::ktd::raft::v1::raft_client::RaftClient;
use ktd_testkit::eventually;
use sequencer::{SequencerError, pb};
use tonic::Code;

use crate::support::cluster::{TestCluster, update};
use crate::support::with_deadline;

/// `count` updates with distinct labels and values of `value_bytes` bytes.
fn large_updates(prefix: &str, count: usize, value_bytes: usize) -> Vec<pb::Update> {
    (0..count)
        .map(|i| {
            let label = format!("{prefix}-{i:04}");
            let value = vec![(i % 251) as u8; value_bytes];
            update(label, value)
        })
        .collect()
}

fn chunk_bytes(chunk: &pb::BatchChunk) -> usize {
    chunk
        .updates
        .iter()
        .map(|update| update.label.len() + update.value.len() + 16)
        .sum()
}

fn labels_and_values(updates: &[pb::SequencedUpdate]) -> Vec<(Vec<u8>, Vec<u8>)> {
    updates
        .iter()
        .map(|update| (update.label.clone(), update.value.clone()))
        .collect()
}

#[test]
fn a_batch_of_many_chunks_streams_whole_and_the_reader_reads_bounded_pages() {
    with_deadline(Duration::from_secs(120), || async {
        let cluster = TestCluster::start(1, |_| {}).await;
        let client = cluster.client();
        let addr = cluster.addr(1);
        // 6 MiB of values: several 1 MiB chunks.
        let appended = large_updates("user", 100, 60 << 10);
        client.append(appended.clone(), None).await.expect("append");
        let node = cluster.node(1).expect("node 1 runs");
        let whole = node.open_epoch().await.expect("open epoch, read whole");
        assert_eq!(whole.updates.len(), 100);

        let chunks = client
            .open_epoch_at(&addr)
            .await
            .expect("open epoch, streamed");
        assert!(chunks.len() >= 5, "6 MiB in {} chunks", chunks.len());
        for chunk in &chunks {
            assert!(chunk_bytes(chunk) <= sequencer::api::CHUNK_BYTES);
            assert_eq!((chunk.epoch, chunk.total, chunk.sealed), (1, 100, false));
            assert_eq!(chunk.as_of_index, whole.as_of_index);
        }
        let streamed: Vec<_> = chunks
            .iter()
            .flat_map(|chunk| chunk.updates.clone())
            .collect();
        assert_eq!(streamed, whole.updates, "streamed = read whole");
        let mut expected: Vec<_> = appended
            .iter()
            .map(|update| (update.label.clone(), update.value.clone()))
            .collect();
        expected.sort();
        assert_eq!(labels_and_values(&streamed), expected);

        let labels = client
            .open_epoch_labels_at(&addr)
            .await
            .expect("open epoch, labels only");
        let label_updates: Vec<_> = labels
            .iter()
            .flat_map(|chunk| chunk.updates.clone())
            .collect();
        assert_eq!(
            label_updates
                .iter()
                .map(|update| (update.label.clone(), update.sequence))
                .collect::<Vec<_>>(),
            whole
                .updates
                .iter()
                .map(|update| (update.label.clone(), update.sequence))
                .collect::<Vec<_>>()
        );
        assert!(label_updates.iter().all(|update| update.value.is_empty()));
        assert_eq!(labels.len(), 1, "100 labels fit one chunk");

        // The server's reader: pages of at most 256 KiB, each read under its own RocksDB
        // snapshot, concatenating to the batch.
        let mut cursor = node.start_batch(None).await.expect("start");
        let mut paged = Vec::new();
        let mut pages = 0;
        while !cursor.done {
            let (updates, next) = node
                .batch_page(cursor, 256 << 10, false)
                .await
                .expect("page");
            let bytes: usize = updates
                .iter()
                .map(|update| update.label.len() + update.value.len() + 16)
                .sum();
            assert!(bytes <= 256 << 10, "a page of {bytes} bytes");
            pages += 1;
            paged.extend(updates);
            cursor = next;
        }
        assert!(pages >= 24, "6 MiB in {pages} pages of 256 KiB");
        assert_eq!(paged, whole.updates);

        client.seal(None).await.expect("seal");
        let sealed = client
            .sealed_batch_at(&addr, 1)
            .await
            .expect("sealed batch");
        assert!(sealed.len() >= 5);
        assert!(
            sealed
                .iter()
                .all(|chunk| chunk.sealed && chunk.total == 100)
        );
        let sealed: Vec<_> = sealed.into_iter().flat_map(|chunk| chunk.updates).collect();
        assert_eq!(
            sealed, whole.updates,
            "the sealed batch streams the same updates"
        );
        cluster.shutdown().await;
    });
}

#[test]
fn watch_log_subscribers_past_the_cap_are_refused_until_one_leaves() {
    with_deadline(Duration::from_secs(60), || async {
        let cluster = TestCluster::start(1, |config| config.watch.max_subscribers = 2).await;
        let client = cluster.client();
        let addr = cluster.addr(1);
        let first = client
            .watch_log_at(&addr, 1)
            .await
            .expect("first subscriber");
        let _second = client
            .watch_log_at(&addr, 1)
            .await
            .expect("second subscriber");
        match client.watch_log_at(&addr, 1).await {
            Err(SequencerError::Remote(status)) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(
                    status.message().contains("too many WatchLog subscribers"),
                    "{status:?}"
                );
            }
            other => panic!(
                "a third subscriber was not refused: {:?}",
                other.map(|_| ())
            ),
        }
        drop(first);
        eventually(
            "a subscriber slot to free up",
            Duration::from_secs(10),
            || async { client.watch_log_at(&addr, 1).await.ok() },
        )
        .await;
        cluster.shutdown().await;
    });
}

#[test]
fn a_stalled_watch_log_subscriber_buffers_at_most_its_budget_then_is_dropped_with_a_status() {
    const BUDGET: usize = 2 << 20;
    with_deadline(Duration::from_secs(120), || async {
        let cluster = TestCluster::start(1, |config| {
            config.watch.buffer_bytes = BUDGET;
            config.watch.stall_timeout = Duration::from_secs(2);
        })
        .await;
        let client = cluster.client();
        let addr = cluster.addr(1);
        let node = cluster.node(1).expect("node 1 runs");
        // Subscribed, and never read until the end: 32 MiB of events, far past the transport's
        // windows and the subscriber's 2 MiB budget.
        let mut stalled = client.watch_log_at(&addr, 1).await.expect("subscribe");
        for round in 0..64 {
            let updates = large_updates(&format!("round-{round}"), 8, 60 << 10);
            client.append(updates, None).await.expect("append");
            let buffered = node.watch_buffered_bytes();
            assert!(
                buffered <= BUDGET as u64,
                "{buffered} bytes buffered for one subscriber with a {BUDGET}-byte budget"
            );
        }
        eventually(
            "the subscriber's buffer to fill",
            Duration::from_secs(20),
            || async { (node.watch_buffered_bytes() > (BUDGET / 2) as u64).then_some(()) },
        )
        .await;
        assert!(node.watch_buffered_bytes() <= BUDGET as u64);
        eventually(
            "the stalled subscriber to be dropped",
            Duration::from_secs(30),
            || async { (node.watch_subscriber_count() == 0).then_some(()) },
        )
        .await;
        let mut events = 0;
        let ending = loop {
            match stalled.next().await {
                Some(Ok(_)) => events += 1,
                Some(Err(status)) => break status,
                None => panic!("the stream ended without a status after {events} events"),
            }
        };
        assert_eq!(ending.code(), Code::ResourceExhausted, "{ending:?}");
        assert!(
            ending.message().contains("subscriber dropped"),
            "{ending:?}"
        );
        assert!(events > 0, "the buffered events came first");
        drop(stalled);
        eventually(
            "the buffer to be released",
            Duration::from_secs(10),
            || async { (node.watch_buffered_bytes() == 0).then_some(()) },
        )
        .await;
        cluster.shutdown().await;
    });
}

/// A snapshot stream's header from a made-up leader (the transfer is refused before it matters).
fn snapshot_header() -> rpb::SnapshotChunk {
    rpb::SnapshotChunk {
        kind: Some(rpb::snapshot_chunk::Kind::Header(rpb::SnapshotHeader {
            vote: Some(rpb::Vote {
                leader_id: Some(rpb::LeaderId {
                    term: 99,
                    node_id: 1,
                }),
                committed: true,
            }),
            meta: Some(rpb::SnapshotMeta::default()),
            total_bytes: 0,
        })),
    }
}

fn file_chunk(name: &str, offset: u64, bytes: usize) -> rpb::SnapshotChunk {
    rpb::SnapshotChunk {
        kind: Some(rpb::snapshot_chunk::Kind::File(rpb::FileChunk {
            file_name: name.into(),
            offset,
            data: vec![7; bytes],
        })),
    }
}

fn incoming_entries(data_dir: &Path) -> Vec<PathBuf> {
    let incoming = data_dir.join("snapshots").join("incoming");
    std::fs::read_dir(&incoming)
        .map(|entries| entries.flatten().map(|entry| entry.path()).collect())
        .unwrap_or_default()
}

#[test]
fn snapshot_streams_over_the_limits_or_concurrent_are_refused_and_leave_no_files() {
    with_deadline(Duration::from_secs(90), || async {
        let cluster = TestCluster::start(1, |config| {
            config.raft.snapshot_max_bytes = 1 << 20;
            config.raft.snapshot_max_files = 3;
        })
        .await;
        let data_dir = cluster.data_dir(1);
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.addr(1)))
                .expect("endpoint")
                .connect()
                .await
                .expect("connect");
        let mut raft = RaftClient::new(channel);

        // An endless file: refused past 1 MiB in all.
        let endless = futures::stream::iter(
            std::iter::once(snapshot_header())
                .chain((0..64u64).map(|i| file_chunk("big.sst", i * (64 << 10), 64 << 10))),
        );
        let status = raft.install_snapshot(endless).await.expect_err("refused");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("raft.snapshot_max_bytes"),
            "{status:?}"
        );
        assert_eq!(incoming_entries(&data_dir), Vec::<PathBuf>::new());

        // Endless files: refused past 3.
        let many = futures::stream::iter(
            std::iter::once(snapshot_header())
                .chain((0..100).map(|i| file_chunk(&format!("{i}.sst"), 0, 10))),
        );
        let status = raft.install_snapshot(many).await.expect_err("refused");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("raft.snapshot_max_files"),
            "{status:?}"
        );
        assert_eq!(incoming_entries(&data_dir), Vec::<PathBuf>::new());

        // One transfer under way: a second one is refused.
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        sender.send(snapshot_header()).await.expect("send");
        sender
            .send(file_chunk("a.sst", 0, 1000))
            .await
            .expect("send");
        let mut first_raft = raft.clone();
        let first = tokio::spawn(async move {
            first_raft
                .install_snapshot(tokio_stream::wrappers::ReceiverStream::new(receiver))
                .await
        });
        eventually(
            "the first transfer to be under way",
            Duration::from_secs(10),
            || async { (!incoming_entries(&data_dir).is_empty()).then_some(()) },
        )
        .await;
        let second = futures::stream::iter([snapshot_header(), file_chunk("b.sst", 0, 10)]);
        let status = raft.install_snapshot(second).await.expect_err("refused");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("one at a time"), "{status:?}");

        // The first one ends without its trailer: refused, and its files removed.
        drop(sender);
        let status = first.await.expect("join").expect_err("no trailer");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("without a trailer"), "{status:?}");
        assert_eq!(incoming_entries(&data_dir), Vec::<PathBuf>::new());
        cluster.shutdown().await;
    });
}
