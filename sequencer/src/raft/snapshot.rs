//! Snapshots: a RocksDB checkpoint of the state machine's column families, kept as a directory
//! and streamed file by file to followers that fell behind the purged log.
//!
//! Building: under the apply lock (so the cut matches the last applied log id exactly) the
//! builder hard-links a checkpoint of the database into `snapshots/tmp-*`; outside the lock it
//! opens that copy, drops the column families a snapshot does not carry (the Raft log and vote,
//! the per-entry WatchLog results), writes `meta.pb`, and renames the directory to
//! `snapshots/snap-<index>-<nonce>`. The two newest snapshots are kept (a follower may still be
//! receiving the older one), the rest deleted.
//!
//! Installing: the receiver writes the files into `snapshots/incoming/<nonce>`, checks each file's
//! size and BLAKE3 against the sender's trailer, fsyncs them, and hands the directory to openraft.
//! Receiving is bounded ([`SnapshotLimits`]: total bytes, files, bytes per file); files arrive one
//! after the other, each closed (synced) when the next starts, so one file is open at a time; a
//! failed or abandoned transfer removes its directory. [`install`] moves the directory in place
//! as the current snapshot, then replaces the live state-machine column families with the
//! checkpoint's content in bounded writes (crash safety: `state_machine::replace_state`).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ktd_proto::ktd::raft::v1 as rpb;
use openraft::RaftSnapshotBuilder;
use openraft::storage::Snapshot;
use prost::Message;
use rocksdb::checkpoint::Checkpoint;
use rocksdb::{DB, Options};

use crate::error::{Result, SequencerError};
use crate::raft::codec;
use crate::raft::db::{
    CF_RAFT_LOG, CF_RAFT_META, CF_SM_RESULTS, SNAPSHOT_COLUMN_FAMILIES, Storage, sync_dir,
};
use crate::raft::state_machine::SmShared;
use crate::raft::types::{SnapshotMeta, TypeConfig};

/// A snapshot as openraft passes it around: the checkpoint directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotHandle {
    /// The checkpoint directory (RocksDB files plus `meta.pb`).
    pub dir: PathBuf,
}

/// A snapshot with its metadata.
pub type RaftSnapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotHandle>;

const META_FILE: &str = "meta.pb";
const KEEP: usize = 2;

fn io(context: &'static str) -> impl Fn(std::io::Error) -> SequencerError {
    move |source| SequencerError::Io { context, source }
}

/// A name no other snapshot directory of this process or an earlier one has.
pub fn nonce() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    format!("{nanos:x}-{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

fn snapshot_name(index: u64) -> String {
    format!("snap-{index:020}-{}", nonce())
}

/// Builds snapshots for openraft.
pub struct RocksSnapshotBuilder {
    shared: Arc<SmShared>,
}

impl RocksSnapshotBuilder {
    /// A builder over the shared state machine.
    pub fn new(shared: Arc<SmShared>) -> Self {
        Self { shared }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for RocksSnapshotBuilder {
    type SnapshotData = SnapshotHandle;

    async fn build_snapshot(&mut self) -> std::io::Result<RaftSnapshot> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || build(&shared))
            .await
            .map_err(|error| std::io::Error::other(format!("snapshot task failed: {error}")))?
            .map_err(std::io::Error::from)
    }
}

/// Builds a snapshot of the applied state now.
pub fn build(shared: &SmShared) -> Result<RaftSnapshot> {
    let storage = shared.storage();
    let root = storage.snapshot_dir();
    let tmp = root.join(format!("tmp-{}", nonce()));
    let (last_log_id, last_membership) = shared.with_apply_lock(|applied, membership| {
        Checkpoint::new(storage.db())
            .and_then(|checkpoint| checkpoint.create_checkpoint(&tmp))
            .map_err(SequencerError::storage("create a checkpoint"))?;
        Ok::<_, SequencerError>((applied, membership.clone()))
    })?;
    strip_checkpoint(&tmp)?;
    let meta = SnapshotMeta {
        last_log_id,
        last_membership,
    };
    write_meta(&tmp, &meta)?;
    let dir = root.join(snapshot_name(
        last_log_id.map_or(0, |log_id| log_id.index()),
    ));
    std::fs::rename(&tmp, &dir).map_err(io("move a snapshot in place"))?;
    sync_dir(&root)?;
    prune(&root)?;
    let index = last_log_id.map_or(0, |log_id| log_id.index());
    shared.set_snapshot_index(index);
    tracing::info!(index, "built a snapshot");
    Ok(Snapshot {
        meta,
        snapshot: SnapshotHandle { dir },
    })
}

/// Drops the column families a snapshot does not carry from a checkpoint copy.
fn strip_checkpoint(dir: &Path) -> Result<()> {
    let names = DB::list_cf(&Options::default(), dir).map_err(SequencerError::storage(
        "list a checkpoint's column families",
    ))?;
    let mut db = DB::open_cf(&Options::default(), dir, &names)
        .map_err(SequencerError::storage("open a checkpoint"))?;
    for name in [CF_RAFT_LOG, CF_RAFT_META, CF_SM_RESULTS] {
        db.drop_cf(name).map_err(SequencerError::storage(
            "drop a column family from a checkpoint",
        ))?;
    }
    db.flush_wal(true)
        .map_err(SequencerError::storage("sync a checkpoint"))?;
    Ok(())
}

fn write_meta(dir: &Path, meta: &SnapshotMeta) -> Result<()> {
    let path = dir.join(META_FILE);
    let mut file = std::fs::File::create(&path).map_err(io("write snapshot metadata"))?;
    file.write_all(&codec::snapshot_meta_to_pb(meta).encode_to_vec())
        .and_then(|()| file.sync_all())
        .map_err(io("write snapshot metadata"))?;
    sync_dir(dir)
}

fn read_meta(dir: &Path) -> Result<SnapshotMeta> {
    let bytes = std::fs::read(dir.join(META_FILE)).map_err(io("read snapshot metadata"))?;
    let meta = rpb::SnapshotMeta::decode(bytes.as_slice())
        .map_err(|error| SequencerError::Corrupt(format!("snapshot metadata: {error}")))?;
    codec::snapshot_meta_from_pb(Some(&meta))
        .map_err(|error| SequencerError::Corrupt(error.to_string()))
}

/// Snapshot directories under `root`, newest (highest index) last.
fn snapshots(root: &Path) -> Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(io("list snapshots"))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("snap-"))
        })
        .collect();
    found.sort();
    Ok(found)
}

fn prune(root: &Path) -> Result<()> {
    let found = snapshots(root)?;
    for old in found.iter().take(found.len().saturating_sub(KEEP)) {
        std::fs::remove_dir_all(old).map_err(io("delete an old snapshot"))?;
    }
    Ok(())
}

/// The newest snapshot, if any.
pub fn current(storage: &Storage) -> Result<Option<RaftSnapshot>> {
    let Some(dir) = snapshots(&storage.snapshot_dir())?.pop() else {
        return Ok(None);
    };
    Ok(Some(Snapshot {
        meta: read_meta(&dir)?,
        snapshot: SnapshotHandle { dir },
    }))
}

/// Removes half-built and half-received snapshots left by a crash.
pub fn clean_leftovers(storage: &Storage) -> Result<()> {
    let root = storage.snapshot_dir();
    for entry in std::fs::read_dir(&root).map_err(io("list snapshots"))? {
        let path = entry.map_err(io("list snapshots"))?.path();
        if path
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with("tmp-"))
        {
            std::fs::remove_dir_all(&path).map_err(io("delete a half-built snapshot"))?;
        }
    }
    let incoming = root.join("incoming");
    for entry in std::fs::read_dir(&incoming).map_err(io("list incoming snapshots"))? {
        std::fs::remove_dir_all(entry.map_err(io("list incoming snapshots"))?.path())
            .map_err(io("delete a half-received snapshot"))?;
    }
    Ok(())
}

/// Opens a snapshot's checkpoint read-only, after checking it has every column family a
/// snapshot carries.
pub(crate) fn open_checkpoint(dir: &Path) -> Result<DB> {
    let names = DB::list_cf(&Options::default(), dir)
        .map_err(SequencerError::storage("list a snapshot's column families"))?;
    for name in SNAPSHOT_COLUMN_FAMILIES {
        if !names.iter().any(|found| found == name) {
            return Err(SequencerError::Corrupt(format!(
                "snapshot lacks column family {name}"
            )));
        }
    }
    DB::open_cf_for_read_only(&Options::default(), dir, &names, false)
        .map_err(SequencerError::storage("open a snapshot"))
}

/// Installs a received snapshot: moves its directory in place as the current snapshot (synced,
/// so an interrupted install can be finished from it), then replaces the state machine with its
/// content.
pub fn install(shared: &SmShared, meta: &SnapshotMeta, handle: &SnapshotHandle) -> Result<()> {
    let storage = shared.storage();
    let root = storage.snapshot_dir();
    let index = meta.last_log_id.map_or(0, |log_id| log_id.index());
    let already_current = handle.dir.parent() == Some(root.as_path());
    // Checked before anything moves: a snapshot that cannot be opened is refused as it came.
    SmShared::check_snapshot(meta, &open_checkpoint(&handle.dir)?)?;
    let dir = if already_current {
        handle.dir.clone()
    } else {
        let dir = root.join(snapshot_name(index));
        std::fs::rename(&handle.dir, &dir).map_err(io("keep a received snapshot"))?;
        write_meta(&dir, meta)?;
        sync_dir(&root)?;
        dir
    };
    let dir_name = dir
        .file_name()
        .and_then(|name| name.to_str())
        .ok_or_else(|| SequencerError::Corrupt(format!("snapshot directory {dir:?}")))?
        .to_string();
    {
        let checkpoint = open_checkpoint(&dir)?;
        shared.install_blocking(&checkpoint, &dir_name)?;
    }
    prune(&root)?;
    shared.set_snapshot_index(index);
    tracing::info!(index, "installed a snapshot");
    Ok(())
}

/// The regular files of a snapshot directory with their sizes, in name order.
pub fn files(dir: &Path) -> Result<Vec<(String, u64)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io("list snapshot files"))? {
        let entry = entry.map_err(io("list snapshot files"))?;
        let metadata = entry.metadata().map_err(io("stat a snapshot file"))?;
        if metadata.is_file()
            && let Some(name) = entry.file_name().to_str()
        {
            files.push((name.to_string(), metadata.len()));
        }
    }
    files.sort();
    Ok(files)
}

/// Bounds on one received snapshot (`raft.snapshot_max_*` in the configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotLimits {
    /// Total bytes of all files.
    pub max_bytes: u64,
    /// Number of files.
    pub max_files: u64,
    /// Bytes of one file.
    pub max_file_bytes: u64,
}

impl Default for SnapshotLimits {
    fn default() -> Self {
        Self {
            max_bytes: 32 << 30,
            max_files: 10_000,
            max_file_bytes: 4 << 30,
        }
    }
}

/// The file being received: open until the next one starts or the trailer arrives.
struct OpenFile {
    name: String,
    file: std::fs::File,
    hasher: blake3::Hasher,
    written: u64,
}

/// A snapshot being received into `snapshots/incoming/<nonce>`.
pub struct IncomingSnapshot {
    dir: PathBuf,
    limits: SnapshotLimits,
    current: Option<OpenFile>,
    /// Files received and closed: name → (size, BLAKE3).
    closed: HashMap<String, (u64, [u8; 32])>,
    total_bytes: u64,
    finished: bool,
}

impl IncomingSnapshot {
    /// Starts receiving under `storage`'s snapshot directory, within `limits`.
    pub fn create(storage: &Storage, limits: SnapshotLimits) -> Result<Self> {
        let dir = storage.snapshot_dir().join("incoming").join(nonce());
        std::fs::create_dir_all(&dir).map_err(io("create an incoming snapshot"))?;
        Ok(Self {
            dir,
            limits,
            current: None,
            closed: HashMap::new(),
            total_bytes: 0,
            finished: false,
        })
    }

    /// The directory files are written to.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Syncs and closes the file being received.
    fn close_current(&mut self) -> Result<()> {
        if let Some(open) = self.current.take() {
            open.file.sync_all().map_err(io("sync a snapshot file"))?;
            self.closed.insert(
                open.name,
                (open.written, *open.hasher.finalize().as_bytes()),
            );
        }
        Ok(())
    }

    /// Appends one chunk. Files arrive one after the other, each one's chunks in order; a file
    /// is closed when the next one starts.
    pub fn write_chunk(&mut self, chunk: &rpb::FileChunk) -> Result<()> {
        let name = &chunk.file_name;
        if name.is_empty() || name.contains('/') || name.contains('\\') || name.starts_with('.') {
            return Err(SequencerError::Malformed(format!(
                "snapshot file name {name:?}"
            )));
        }
        if self.current.as_ref().is_none_or(|open| &open.name != name) {
            if self.closed.contains_key(name) {
                return Err(SequencerError::Malformed(format!(
                    "snapshot file {name} resumed after another file started"
                )));
            }
            self.close_current()?;
            let files = self.closed.len() as u64 + 1;
            if files > self.limits.max_files {
                return Err(SequencerError::SnapshotTooLarge(format!(
                    "more than {} files (raft.snapshot_max_files)",
                    self.limits.max_files
                )));
            }
            let file =
                std::fs::File::create(self.dir.join(name)).map_err(io("create a snapshot file"))?;
            self.current = Some(OpenFile {
                name: name.clone(),
                file,
                hasher: blake3::Hasher::new(),
                written: 0,
            });
        }
        let open = self.current.as_mut().expect("opened above");
        if chunk.offset != open.written {
            return Err(SequencerError::Malformed(format!(
                "snapshot file {name}: chunk at offset {} but {} bytes received",
                chunk.offset, open.written
            )));
        }
        let len = chunk.data.len() as u64;
        if open.written + len > self.limits.max_file_bytes {
            return Err(SequencerError::SnapshotTooLarge(format!(
                "file {name} is over {} bytes (raft.snapshot_max_file_bytes)",
                self.limits.max_file_bytes
            )));
        }
        if self.total_bytes + len > self.limits.max_bytes {
            return Err(SequencerError::SnapshotTooLarge(format!(
                "over {} bytes in all (raft.snapshot_max_bytes)",
                self.limits.max_bytes
            )));
        }
        open.file
            .write_all(&chunk.data)
            .map_err(io("write a snapshot file"))?;
        open.hasher.update(&chunk.data);
        open.written += len;
        self.total_bytes += len;
        Ok(())
    }

    /// Checks every file against the trailer, syncs them, and returns the handle.
    pub fn finish(mut self, trailer: &rpb::SnapshotTrailer) -> Result<SnapshotHandle> {
        self.close_current()?;
        if trailer.files.len() != self.closed.len() {
            return Err(SequencerError::Malformed(format!(
                "snapshot trailer lists {} files, {} received",
                trailer.files.len(),
                self.closed.len()
            )));
        }
        for digest in &trailer.files {
            let (written, hash) = self.closed.get(&digest.file_name).ok_or_else(|| {
                SequencerError::Malformed(format!(
                    "snapshot file {} never arrived",
                    digest.file_name
                ))
            })?;
            if *written != digest.size || hash.as_slice() != digest.blake3 {
                return Err(SequencerError::Malformed(format!(
                    "snapshot file {} does not match its digest",
                    digest.file_name
                )));
            }
        }
        sync_dir(&self.dir)?;
        self.finished = true;
        Ok(SnapshotHandle {
            dir: self.dir.clone(),
        })
    }

    /// Removes what was received (a failed transfer).
    pub fn discard(mut self) {
        self.current = None;
        let _ = std::fs::remove_dir_all(&self.dir);
        self.finished = true;
    }
}

impl Drop for IncomingSnapshot {
    fn drop(&mut self) {
        if !self.finished {
            // Best effort: a leftover is also removed at the next start.
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
