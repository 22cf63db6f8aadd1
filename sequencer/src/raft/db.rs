//! The one RocksDB instance of a sequencer node: column families for the Raft log and for the
//! state machine, one WAL for both, and the data directory's identity.
//!
//! Data directory layout:
//!
//! ```text
//! <data_dir>/db/                     RocksDB (column families below)
//! <data_dir>/snapshots/<index>-...   state-machine checkpoints (see `snapshot.rs`)
//! <data_dir>/snapshots/incoming/     snapshots being received
//! ```
//!
//! | column family | key | value |
//! |---|---|---|
//! | `raft_meta` | `identity`, `vote`, `last_purged`, `committed` | `NodeIdentity`, `Vote`, `LogId` (protobuf) |
//! | `raft_log` | `be64(index)` | `ktd.raft.v1.Entry` |
//! | `sm_meta` | `state` | `MachineMeta` (last applied, membership, epochs, metadata) |
//! | `sm_updates` | `be64(epoch) ‖ label` | `be64(sequence) ‖ value` |
//! | `sm_epochs` | `be64(epoch)` | `ktd.sequencer.v1.EpochRecord` |
//! | `sm_idem` | idempotency key | `be64(ordinal) ‖ ktd.sequencer.v1.AppendResponse` |
//! | `sm_idem_order` | `be64(ordinal)` | idempotency key |
//! | `sm_results` | `be64(index)` | `ktd.sequencer.v1.ApplyResult` (trimmed with the log) |
//!
//! **Invariant:** a data directory is created exactly once, with its identity written before the
//! database is moved into place; anything else found at the path is refused, never
//! re-initialised.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ktd_proto::ktd::raft::v1 as pb;
use prost::Message;
use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, DB, Options, WriteBatch, WriteOptions};

use crate::error::{Result, SequencerError};
use crate::raft::types::NodeId;

/// On-disk format version written into the identity.
pub const FORMAT: u32 = 1;

/// Raft log metadata.
pub const CF_RAFT_META: &str = "raft_meta";
/// Raft log entries.
pub const CF_RAFT_LOG: &str = "raft_log";
/// State-machine metadata.
pub const CF_SM_META: &str = "sm_meta";
/// Updates of the open and sealed epochs.
pub const CF_SM_UPDATES: &str = "sm_updates";
/// Committed epoch records.
pub const CF_SM_EPOCHS: &str = "sm_epochs";
/// Idempotency keys → answers.
pub const CF_SM_IDEM: &str = "sm_idem";
/// Idempotency keys in arrival order, for eviction.
pub const CF_SM_IDEM_ORDER: &str = "sm_idem_order";
/// What each applied entry did, for WatchLog.
pub const CF_SM_RESULTS: &str = "sm_results";

/// Column families of the state machine that a snapshot carries.
pub const SNAPSHOT_COLUMN_FAMILIES: [&str; 5] = [
    CF_SM_META,
    CF_SM_UPDATES,
    CF_SM_EPOCHS,
    CF_SM_IDEM,
    CF_SM_IDEM_ORDER,
];

/// Every column family (besides `default`).
pub const COLUMN_FAMILIES: [&str; 8] = [
    CF_RAFT_META,
    CF_RAFT_LOG,
    CF_SM_META,
    CF_SM_UPDATES,
    CF_SM_EPOCHS,
    CF_SM_IDEM,
    CF_SM_IDEM_ORDER,
    CF_SM_RESULTS,
];

const IDENTITY_KEY: &[u8] = b"identity";

/// The opened database and where it lives.
pub struct Storage {
    db: DB,
    data_dir: PathBuf,
    node_id: NodeId,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("data_dir", &self.data_dir)
            .field("node_id", &self.node_id)
            .finish()
    }
}

fn incompatible(path: &Path, reason: impl Into<String>) -> SequencerError {
    SequencerError::IncompatibleDataDir {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn io(context: &'static str) -> impl Fn(std::io::Error) -> SequencerError {
    move |source| SequencerError::Io { context, source }
}

/// Options for every column family and the database.
fn db_options(create: bool) -> Options {
    let mut options = Options::default();
    options.create_if_missing(create);
    options.create_missing_column_families(create);
    options.set_paranoid_checks(true);
    options.set_max_background_jobs(2);
    options.set_keep_log_file_num(4);
    options.set_max_total_wal_size(256 << 20);
    options
}

fn cf_options() -> Options {
    let mut options = Options::default();
    options.set_write_buffer_size(32 << 20);
    options
}

/// Write options for anything acknowledged to a peer or client: synced to disk.
pub fn synced() -> WriteOptions {
    let mut options = WriteOptions::default();
    options.set_sync(true);
    options
}

impl Storage {
    /// Whether `data_dir` holds no sequencer database yet (missing, empty, or left by a crash
    /// while it was being created): opening it would create a new node.
    pub fn is_new(data_dir: &Path) -> Result<bool> {
        match std::fs::read_dir(data_dir) {
            Ok(entries) => {
                let names: Vec<_> = entries
                    .filter_map(|entry| entry.ok().map(|entry| entry.file_name()))
                    .collect();
                // A crash while creating leaves only `db.tmp` (and maybe `snapshots`).
                Ok(names
                    .iter()
                    .all(|name| name == "db.tmp" || name == "snapshots")
                    && !data_dir.join("db").exists())
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(true),
            Err(error) => Err(incompatible(data_dir, format!("cannot read it: {error}"))),
        }
    }

    /// Opens the data directory, creating it if it is missing or empty.
    ///
    /// `node_id` is required to create a directory; for an existing one it is optional and, if
    /// given, must match the stored identity.
    pub fn open(data_dir: &Path, node_id: Option<NodeId>) -> Result<Arc<Self>> {
        let db_path = data_dir.join("db");
        if Self::is_new(data_dir)? {
            let node_id = node_id.ok_or_else(|| {
                SequencerError::InvalidConfig(format!(
                    "{} is a new data directory: a node id (--id) is required",
                    data_dir.display()
                ))
            })?;
            Self::create(data_dir, node_id)?;
        } else if !db_path.is_dir() {
            return Err(incompatible(
                data_dir,
                "not a ktd sequencer data directory (it is not empty and has no db/)",
            ));
        }

        let found = DB::list_cf(&Options::default(), &db_path).map_err(|error| {
            incompatible(
                data_dir,
                format!(
                    "db/ is not a readable RocksDB database ({})",
                    error.into_string()
                ),
            )
        })?;
        let mut expected: Vec<&str> = COLUMN_FAMILIES.iter().copied().chain(["default"]).collect();
        let mut found_sorted: Vec<&str> = found.iter().map(String::as_str).collect();
        expected.sort_unstable();
        found_sorted.sort_unstable();
        if expected != found_sorted {
            return Err(incompatible(
                data_dir,
                format!("not a ktd sequencer database (column families {found:?})"),
            ));
        }
        let descriptors = COLUMN_FAMILIES
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(*name, cf_options()));
        let db = DB::open_cf_descriptors(&db_options(false), &db_path, descriptors).map_err(
            |error| {
                let message = error.into_string();
                if message.contains("lock") {
                    incompatible(
                        data_dir,
                        format!("it is in use by another process ({message})"),
                    )
                } else {
                    incompatible(data_dir, format!("the database is damaged ({message})"))
                }
            },
        )?;
        let identity_bytes = db
            .get_cf(cf(&db, CF_RAFT_META), IDENTITY_KEY)
            .map_err(SequencerError::storage("read the node identity"))?
            .ok_or_else(|| incompatible(data_dir, "the database has no node identity"))?;
        let identity = pb::NodeIdentity::decode(identity_bytes.as_slice())
            .map_err(|error| incompatible(data_dir, format!("malformed node identity: {error}")))?;
        if identity.format != FORMAT {
            return Err(incompatible(
                data_dir,
                format!(
                    "on-disk format {} is not supported (expected {FORMAT})",
                    identity.format
                ),
            ));
        }
        if let Some(node_id) = node_id
            && node_id != identity.node_id
        {
            return Err(incompatible(
                data_dir,
                format!(
                    "it belongs to node {}, not node {node_id}",
                    identity.node_id
                ),
            ));
        }
        std::fs::create_dir_all(data_dir.join("snapshots").join("incoming"))
            .map_err(io("create the snapshot directory"))?;
        Ok(Arc::new(Self {
            db,
            data_dir: data_dir.to_path_buf(),
            node_id: identity.node_id,
        }))
    }

    /// Creates the database in `db.tmp`, writes the identity, then renames it to `db`.
    fn create(data_dir: &Path, node_id: NodeId) -> Result<()> {
        let tmp = data_dir.join("db.tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io("remove a half-created database"))?;
        }
        std::fs::create_dir_all(data_dir).map_err(io("create the data directory"))?;
        {
            let descriptors = COLUMN_FAMILIES
                .iter()
                .map(|name| ColumnFamilyDescriptor::new(*name, cf_options()));
            let db = DB::open_cf_descriptors(&db_options(true), &tmp, descriptors)
                .map_err(SequencerError::storage("create the database"))?;
            let identity = pb::NodeIdentity {
                format: FORMAT,
                node_id,
            };
            let mut batch = WriteBatch::default();
            batch.put_cf(
                cf(&db, CF_RAFT_META),
                IDENTITY_KEY,
                identity.encode_to_vec(),
            );
            db.write_opt(batch, &synced())
                .map_err(SequencerError::storage("write the node identity"))?;
        }
        std::fs::rename(&tmp, data_dir.join("db")).map_err(io("move the new database in place"))?;
        sync_dir(data_dir)?;
        tracing::info!(node_id, data_dir = %data_dir.display(), "created a new data directory");
        Ok(())
    }

    /// The database.
    pub fn db(&self) -> &DB {
        &self.db
    }

    /// A column family handle.
    pub fn cf(&self, name: &'static str) -> &ColumnFamily {
        cf(&self.db, name)
    }

    /// The node id stored in the data directory.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Where snapshots live.
    pub fn snapshot_dir(&self) -> PathBuf {
        self.data_dir.join("snapshots")
    }

    /// Flushes and syncs the WAL (shutdown).
    pub fn flush(&self) -> Result<()> {
        self.db
            .flush_wal(true)
            .map_err(SequencerError::storage("flush the WAL"))
    }
}

/// A column family handle of `db`.
pub fn cf<'db>(db: &'db DB, name: &'static str) -> &'db ColumnFamily {
    db.cf_handle(name)
        .expect("column families are checked or created on open")
}

/// fsyncs a directory so renames and new files in it survive a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|file| file.sync_all())
        .map_err(io("sync a directory"))
}

/// Big-endian `u64` key.
pub fn be64(value: u64) -> [u8; 8] {
    value.to_be_bytes()
}

/// Decodes a big-endian `u64` key prefix.
pub fn read_be64(bytes: &[u8]) -> Result<u64> {
    let prefix: [u8; 8] = bytes
        .get(..8)
        .and_then(|slice| slice.try_into().ok())
        .ok_or_else(|| SequencerError::Corrupt("key shorter than 8 bytes".into()))?;
    Ok(u64::from_be_bytes(prefix))
}
