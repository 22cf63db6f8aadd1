//! A data directory that is damaged, foreign, or another node's is refused with a clear message
//! and left untouched: a sequencer never re-initialises data it cannot read; and an empty one
//! is created only with `--init` or `--join`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use sequencer::{Sequencer, SequencerConfig, SequencerError};

use crate::support::with_deadline;

/// A node's configuration; `--join` lets it create a new data directory (ignored otherwise).
fn config(data_dir: &Path, id: Option<u64>) -> SequencerConfig {
    SequencerConfig {
        id,
        data_dir: data_dir.to_path_buf(),
        join: true,
        ..SequencerConfig::default()
    }
}

/// Every file under `dir` with its bytes.
fn snapshot_of(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        for entry in std::fs::read_dir(&path).expect("read dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                files.insert(path.display().to_string(), bytes);
            }
        }
    }
    files
}

/// Starts a node on `config`, expects a refusal, and checks that the files were not touched.
async fn refused(config: SequencerConfig) -> String {
    let data_dir = config.data_dir.clone();
    let before = snapshot_of(&data_dir);
    let error = Sequencer::start(config)
        .await
        .expect_err("must refuse to start");
    assert!(
        matches!(error, SequencerError::IncompatibleDataDir { .. }),
        "{error:?}"
    );
    assert_eq!(
        snapshot_of(&data_dir),
        before,
        "a refused data directory is left untouched"
    );
    error.to_string()
}

#[test]
fn damaged_foreign_or_mismatched_data_dirs_are_refused() {
    with_deadline(Duration::from_secs(60), || async {
        let root = tempfile::tempdir().expect("temp dir");

        tracing::info!(
            "--- an empty data directory without --init or --join: refused, not created"
        );
        {
            let fresh = root.path().join("fresh");
            let error = Sequencer::start(SequencerConfig {
                join: false,
                ..config(&fresh, Some(1))
            })
            .await
            .expect_err("a new node needs --init or --join");
            assert!(
                error.to_string().contains("A new node needs --init"),
                "{error}"
            );
            assert!(!fresh.join("db").exists(), "nothing was created");
        }

        tracing::info!("--- a healthy data directory of node 1");
        let healthy = root.path().join("node-1");
        {
            let node = Sequencer::start(config(&healthy, Some(1)))
                .await
                .expect("create");
            node.shutdown().await.expect("stop");
            drop(node);
            let node = Sequencer::start(config(&healthy, None))
                .await
                .expect("reopen without --id");
            assert_eq!(node.id(), 1, "the id comes from the data directory");
            node.shutdown().await.expect("stop");
            drop(node);
        }

        tracing::info!("--- the same directory started as another node");
        {
            // RocksDB rewrites its own bookkeeping files when it opens a database to read the
            // identity, so compare what matters: the node still opens as itself afterwards.
            let error = Sequencer::start(config(&healthy, Some(2)))
                .await
                .expect_err("must refuse to start");
            let message = error.to_string();
            assert!(
                message.contains("belongs to node 1, not node 2"),
                "{message}"
            );
            let node = Sequencer::start(config(&healthy, Some(1)))
                .await
                .expect("still node 1");
            node.shutdown().await.expect("stop");
            drop(node);
        }

        tracing::info!("--- a damaged CURRENT file");
        {
            let damaged = root.path().join("damaged");
            let node = Sequencer::start(config(&damaged, Some(1)))
                .await
                .expect("create");
            node.shutdown().await.expect("stop");
            drop(node);
            std::fs::write(
                damaged.join("db").join("CURRENT"),
                b"garbage-without-newline",
            )
            .expect("corrupt");
            let message = refused(config(&damaged, None)).await;
            assert!(message.contains("not usable"), "{message}");
            assert!(
                message.contains("RocksDB") || message.contains("damaged"),
                "{message}"
            );
        }

        tracing::info!("--- missing MANIFEST");
        {
            let damaged = root.path().join("no-manifest");
            let node = Sequencer::start(config(&damaged, Some(1)))
                .await
                .expect("create");
            node.shutdown().await.expect("stop");
            drop(node);
            for entry in std::fs::read_dir(damaged.join("db"))
                .expect("list")
                .flatten()
            {
                if entry.file_name().to_string_lossy().starts_with("MANIFEST") {
                    std::fs::remove_file(entry.path()).expect("remove manifest");
                }
            }
            refused(config(&damaged, None)).await;
        }

        tracing::info!("--- a directory that holds something else");
        {
            let foreign = root.path().join("foreign");
            std::fs::create_dir_all(&foreign).expect("mkdir");
            std::fs::write(foreign.join("notes.txt"), b"not a database").expect("write");
            let message = refused(config(&foreign, Some(1))).await;
            assert!(
                message.contains("not a ktd sequencer data directory"),
                "{message}"
            );
        }

        tracing::info!("--- a RocksDB database of another program");
        {
            let other = root.path().join("other-db");
            {
                let mut options = rocksdb::Options::default();
                options.create_if_missing(true);
                let db = rocksdb::DB::open(&options, other.join("db")).expect("create other db");
                db.put(b"k", b"v").expect("put");
            }
            let message = refused(config(&other, Some(1))).await;
            assert!(
                message.contains("not a ktd sequencer database"),
                "{message}"
            );
        }
    });
}
