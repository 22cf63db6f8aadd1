//! RocksDB storage: one database, seven column families.
//!
//! | column family | key | value |
//! |---|---|---|
//! | `meta` | `"directory"` | [`DirectoryMeta`]: format, configuration, partition bits, VRF public key |
//! | `nodes` | `be64(version) ‖ label bytes ‖ be16(len)` | interior node (two [`NodeRef`](ktd_core::tree::NodeRef)s) |
//! | `epochs` | `be64(epoch)` | [`EpochRecord`]: root hash and partition roots |
//! | `users` | `blake3(label) ‖ be64(version)` | one user version |
//! | `inbox` | — | retired (the first release's leaf deliveries); kept so its data directories open |
//! | `stale` | the node key of a new version `(E, L)` | `be64(v)`: the version `(v, L)` it superseded |
//! | `proofs` | the user key of version `n` | the version's [`StoredLookupProofs`]: the VRF proofs of `(Fresh, n)`, `(Stale, n)` and the marker |
//!
//! The `stale` family is the stale-version index of pruning (`prune.rs`, ADR 0003): its keys
//! mirror `nodes` exactly, so every range rule on node versions (an epoch, a partition's part of
//! an epoch) applies to both families unchanged. Data directories created before it get the
//! family on open, empty: their earlier history is not pruned until it is indexed
//! ([`RocksStore::rebuild_stale_index`]; no command runs it yet). A binary from before the
//! index refuses a directory that has the family (its column-family check is exact).
//!
//! The `proofs` family is a cache of deterministic data (every VRF proof is a function of the
//! key, the label, the freshness and the version): written without the WAL, never shipped in
//! partition copies or backups, absent records recomputed on demand, malformed ones ignored and
//! rewritten. Its keys mirror `users`, so every user range rule applies to both. Directories
//! from before it get the family on open, empty.
//!
//! Node versions of an epoch are written first (one `WriteBatch` per partition, in parallel,
//! unsynced); the epoch record and the user versions follow in one synced `WriteBatch`, which is
//! the commit point. Node versions of an epoch that never committed are unreferenced; opening
//! deletes them with one range delete.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use akd_core::AkdLabel;
use rayon::prelude::*;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DB, DBCompressionType,
    Direction, IteratorMode, Options, ReadOptions, SliceTransform, WriteBatch, WriteOptions,
};

use crate::error::Error;
use crate::metrics::{SampleError, StorageHealth};
use ktd_core::Error as CoreError;
use ktd_core::Result;
use ktd_core::proof::StoredLookupProofs;
use ktd_core::tree::{InteriorNode, NodeKey, PartitionDelta, TreeStore};
use ktd_core::user::UserVersion;

use self::hot::HotNodes;

pub mod codec;
pub mod hot;
pub mod prune;
pub mod replica;

use ktd_core::EpochRecord;

const CF_META: &str = "meta";
const CF_NODES: &str = "nodes";
const CF_EPOCHS: &str = "epochs";
const CF_USERS: &str = "users";
const CF_INBOX: &str = "inbox";
const CF_STALE: &str = "stale";
const CF_PROOFS: &str = "proofs";
const COLUMN_FAMILIES: [&str; 7] = [
    CF_META, CF_NODES, CF_EPOCHS, CF_USERS, CF_INBOX, CF_STALE, CF_PROOFS,
];
const META_KEY: &[u8] = b"directory";

/// Keys per `multi_get` call when a level's reads are split across threads.
const READ_CHUNK: usize = 2048;

/// Tuning for the RocksDB instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreOptions {
    /// Shared block cache, in bytes.
    pub block_cache_bytes: usize,
    /// Memtable size per column family, in bytes.
    pub write_buffer_bytes: usize,
    /// Collect RocksDB statistics (write amplification in [`RocksStore::io_stats`]); costs a
    /// few percent of throughput.
    pub statistics: bool,
    /// Memory for the hot tree levels ([`hot`]): node versions of labels shorter than
    /// [`HotNodes::levels_for`]`(bytes)` bits are held in memory. 0 holds none.
    pub hot_tree_bytes: usize,
    /// Data block size of the `nodes` family's SST files (the other families use 16 KiB). A
    /// node read that misses the block cache copies one block from the page cache; a change
    /// applies to files written from then on.
    pub node_block_bytes: usize,
}

impl StoreOptions {
    /// The default block cache: 512 MiB.
    pub const DEFAULT_BLOCK_CACHE_BYTES: usize = 512 << 20;
    /// The default memory of the hot tree levels: 256 MiB (labels shorter than 19 bits).
    pub const DEFAULT_HOT_TREE_BYTES: usize = 256 << 20;
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            block_cache_bytes: Self::DEFAULT_BLOCK_CACHE_BYTES,
            write_buffer_bytes: 128 << 20,
            statistics: false,
            hot_tree_bytes: Self::DEFAULT_HOT_TREE_BYTES,
            node_block_bytes: 16 << 10,
        }
    }
}

/// What identifies a directory; checked on every open so a data directory is never served
/// with another configuration, partitioning or key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectoryMeta {
    /// `AkdConfig` name, e.g. `whatsapp_v1` or `experimental:ExampleLabel`.
    pub configuration: String,
    /// Partition bits `k`.
    pub partition_bits: u8,
    /// The VRF public key.
    pub vrf_public_key: [u8; 32],
}

impl DirectoryMeta {
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![codec::FORMAT, self.partition_bits];
        out.extend_from_slice(&self.vrf_public_key);
        out.extend_from_slice(self.configuration.as_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self> {
        let corrupt = || CoreError::Corrupt("malformed directory metadata".into());
        if bytes.len() < 34 || bytes[0] != codec::FORMAT {
            return Err(corrupt());
        }
        Ok(Self {
            partition_bits: bytes[1],
            vrf_public_key: bytes[2..34].try_into().map_err(|_| corrupt())?,
            configuration: String::from_utf8(bytes[34..].to_vec()).map_err(|_| corrupt())?,
        })
    }
}

/// Bytes written by the application and by RocksDB itself (needs `StoreOptions::statistics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoStats {
    /// Logical bytes the application wrote (keys + values).
    pub user_bytes: u64,
    /// Bytes appended to the write-ahead log.
    pub wal_bytes: u64,
    /// Bytes written by memtable flushes.
    pub flush_bytes: u64,
    /// Bytes written by compactions.
    pub compaction_bytes: u64,
}

impl IoStats {
    /// LSM write amplification: SST bytes written (flush + compaction) per logical byte.
    pub fn lsm_write_amplification(&self) -> f64 {
        (self.flush_bytes + self.compaction_bytes) as f64 / self.user_bytes.max(1) as f64
    }
}

/// The opened database.
pub struct RocksStore {
    db: DB,
    path: PathBuf,
    options: Options,
    hot: HotNodes,
}

impl std::fmt::Debug for RocksStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksStore")
            .field("path", &self.path)
            .finish()
    }
}

fn storage(context: &'static str) -> impl Fn(rocksdb::Error) -> CoreError {
    move |error| CoreError::Storage {
        context,
        message: error.into_string(),
    }
}

fn incompatible(path: &Path, reason: impl Into<String>) -> Error {
    Error::IncompatibleDataDir {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

impl RocksStore {
    /// Opens the database at `path`, creating it if `path` is missing or an empty directory.
    /// Returns whether it was created. A directory holding anything else is refused, never
    /// re-initialised.
    pub fn open(path: &Path, options: StoreOptions) -> crate::error::Result<(Arc<Self>, bool)> {
        let is_new = match std::fs::read_dir(path) {
            Ok(mut entries) => entries.next().is_none(),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => true,
            Err(error) => return Err(incompatible(path, format!("cannot read it: {error}"))),
        };
        if !is_new {
            let found = DB::list_cf(&Options::default(), path).map_err(|error| {
                incompatible(
                    path,
                    format!("not a RocksDB database ({})", error.into_string()),
                )
            })?;
            let mut expected: Vec<&str> =
                COLUMN_FAMILIES.iter().copied().chain(["default"]).collect();
            let mut found_sorted: Vec<&str> = found.iter().map(String::as_str).collect();
            // Directories from before the stale-version index or the stored lookup proofs lack
            // only those families.
            for added in [CF_STALE, CF_PROOFS] {
                if !found_sorted.contains(&added) {
                    found_sorted.push(added);
                }
            }
            expected.sort_unstable();
            found_sorted.sort_unstable();
            if expected != found_sorted {
                return Err(incompatible(
                    path,
                    format!("not a ktd data directory (column families {found:?})"),
                ));
            }
        }

        let cache = Cache::new_lru_cache(options.block_cache_bytes);
        let mut db_options = Options::default();
        db_options.create_if_missing(is_new);
        // Every family was checked above; only `stale` and `proofs` can be missing (an older
        // directory).
        db_options.create_missing_column_families(true);
        db_options.set_max_background_jobs(2);
        db_options.set_bytes_per_sync(1 << 20);
        db_options.set_max_open_files(4096);
        db_options.set_keep_log_file_num(4);
        // One WAL serves every column family, and a file is deleted only once every family with
        // writes in it has flushed. The quiet families (meta, epochs, inbox) fill their memtables
        // rarely, so without a bound they pin every WAL written since their last flush: RocksDB's
        // default bound is 4× the sum of all memtables, gigabytes per shard. Past this size the
        // families holding the oldest WAL are flushed (small SSTs) and the WAL is reclaimed.
        db_options.set_max_total_wal_size(max_total_wal_bytes(options));
        if options.statistics {
            db_options.enable_statistics();
        }
        let descriptors = COLUMN_FAMILIES.iter().map(|name| {
            ColumnFamilyDescriptor::new(*name, column_family_options(name, &cache, options))
        });
        let db = DB::open_cf_descriptors(&db_options, path, descriptors).map_err(|error| {
            let message = error.into_string();
            if message.contains("lock") {
                incompatible(path, format!("it is in use by another process ({message})"))
            } else {
                CoreError::Storage {
                    context: "open the database",
                    message,
                }
                .into()
            }
        })?;
        Ok((
            Arc::new(Self {
                db,
                path: path.to_path_buf(),
                options: db_options,
                hot: HotNodes::with_bytes(options.hot_tree_bytes),
            }),
            is_new,
        ))
    }

    fn cf(&self, name: &'static str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created on open")
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the directory metadata, `None` if the database has none yet.
    pub fn meta(&self) -> Result<Option<DirectoryMeta>> {
        self.db
            .get_cf(self.cf(CF_META), META_KEY)
            .map_err(storage("read directory metadata"))?
            .map(|bytes| DirectoryMeta::decode(&bytes))
            .transpose()
    }

    /// Writes the node versions of one partition's epoch, and the stale-version index entry of
    /// each version it superseded, in one (unsynced) `WriteBatch`.
    pub fn write_nodes(&self, delta: &PartitionDelta) -> Result<()> {
        let cf = self.cf(CF_NODES);
        let stale = self.cf(CF_STALE);
        let mut batch = WriteBatch::default();
        for (key, node) in delta.nodes.iter().flatten() {
            batch.put_cf(cf, codec::node_key(key), codec::encode_node(node));
        }
        for old in &delta.superseded {
            let new = NodeKey {
                label: old.label,
                version: delta.epoch,
            };
            batch.put_cf(stale, codec::node_key(&new), old.version.to_be_bytes());
        }
        let mut write_options = WriteOptions::default();
        write_options.set_sync(false);
        let started = std::time::Instant::now();
        let written = self
            .db
            .write_opt(batch, &write_options)
            .map_err(storage("write tree nodes"));
        crate::metrics::record_batch_write("shard", "nodes", started);
        written?;
        for (key, node) in delta.nodes.iter().flatten() {
            self.hot.insert(key, node);
        }
        Ok(())
    }

    /// Deletes every node version (and stale-index entry) written for epochs `≥ from` (an
    /// interrupted epoch's garbage).
    pub fn discard_nodes_from(&self, from: u64) -> Result<()> {
        let end = [0xffu8; 8 + 32 + 2 + 1];
        let deleted = [CF_NODES, CF_STALE].into_iter().try_for_each(|family| {
            self.db
                .delete_range_cf(self.cf(family), codec::node_epoch_start(from), end.to_vec())
                .map_err(storage("discard uncommitted tree nodes"))
        });
        // Dropped whether or not every range went: a partial delete must not leave them held.
        self.hot.discard_from(from);
        deleted
    }

    /// Number of node versions stored for epochs `≥ from` (diagnostics and tests).
    pub fn node_versions_from(&self, from: u64) -> Result<usize> {
        let start = codec::node_epoch_start(from);
        let mut count = 0;
        for entry in self.db.iterator_cf(
            self.cf(CF_NODES),
            IteratorMode::From(&start, Direction::Forward),
        ) {
            entry.map_err(storage("count tree nodes"))?;
            count += 1;
        }
        Ok(count)
    }

    /// Reads the record of `epoch`.
    pub fn epoch(&self, epoch: u64) -> Result<Option<EpochRecord>> {
        self.db
            .get_cf(self.cf(CF_EPOCHS), epoch.to_be_bytes())
            .map_err(storage("read an epoch record"))?
            .map(|bytes| EpochRecord::decode(epoch, &bytes))
            .transpose()
    }

    /// Reads the latest epoch record.
    pub fn last_epoch(&self) -> Result<Option<EpochRecord>> {
        let mut iter = self.db.iterator_cf(self.cf(CF_EPOCHS), IteratorMode::End);
        match iter.next() {
            None => Ok(None),
            Some(entry) => {
                let (key, value) = entry.map_err(storage("find the latest epoch"))?;
                let epoch = u64::from_be_bytes(
                    key.as_ref()
                        .try_into()
                        .map_err(|_| CoreError::Corrupt("epoch key is not 8 bytes".into()))?,
                );
                EpochRecord::decode(epoch, &value).map(Some)
            }
        }
    }

    /// The latest version of `akd_label` published at or before `as_of`.
    pub fn latest_user_version(&self, akd_label: &[u8], as_of: u64) -> Result<Option<UserVersion>> {
        let mut iter = self
            .db
            .raw_iterator_cf_opt(self.cf(CF_USERS), prefix_read_options());
        latest_user_version_with(&mut iter, akd_label, as_of)
    }

    /// [`RocksStore::latest_user_version`] for many labels, on the rayon pool, reusing one
    /// iterator per chunk of labels.
    pub fn latest_user_versions<L: AsRef<[u8]> + Sync>(
        &self,
        akd_labels: &[L],
        as_of: u64,
    ) -> Result<Vec<Option<UserVersion>>> {
        let chunks: Vec<Vec<Option<UserVersion>>> = akd_labels
            .par_chunks(READ_CHUNK)
            .map(|chunk| {
                let mut iter = self
                    .db
                    .raw_iterator_cf_opt(self.cf(CF_USERS), prefix_read_options());
                chunk
                    .iter()
                    .map(|akd_label| latest_user_version_with(&mut iter, akd_label.as_ref(), as_of))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?;
        Ok(chunks.into_iter().flatten().collect())
    }

    /// The stored lookup proofs of versions `versions` of `akd_label`, in order; `None` where
    /// absent or malformed (a malformed record is logged and will be overwritten: the family
    /// is a cache, see the module docs).
    pub fn lookup_proofs(
        &self,
        akd_label: &[u8],
        versions: &[u64],
    ) -> Result<Vec<Option<StoredLookupProofs>>> {
        let keys: Vec<(&[u8], u64)> = versions
            .iter()
            .map(|version| (akd_label, *version))
            .collect();
        self.lookup_proofs_many(&keys)
    }

    /// [`RocksStore::lookup_proofs`] of `(akd_label, version)` pairs, in order.
    pub fn lookup_proofs_many<L: AsRef<[u8]>>(
        &self,
        versions: &[(L, u64)],
    ) -> Result<Vec<Option<StoredLookupProofs>>> {
        let cf = self.cf(CF_PROOFS);
        let keys: Vec<Vec<u8>> = versions
            .iter()
            .map(|(akd_label, version)| codec::user_key(akd_label.as_ref(), *version))
            .collect();
        let values = self
            .db
            .batched_multi_get_cf(cf, &keys, false)
            .into_iter()
            .zip(versions);
        let mut out = Vec::with_capacity(versions.len());
        for (value, (_, version)) in values {
            let value = value.map_err(storage("read stored lookup proofs"))?;
            out.push(value.and_then(|bytes| {
                codec::decode_lookup_proofs(*version, &bytes)
                    .map_err(|error| {
                        tracing::warn!(%error, version, "ignoring a malformed stored lookup-proofs record")
                    })
                    .ok()
            }));
        }
        Ok(out)
    }

    /// Stores lookup proofs `(akd_label, version, proofs)`, without the WAL (a record lost in a
    /// crash is recomputed when next needed).
    pub fn put_lookup_proofs(&self, records: &[(&[u8], u64, &StoredLookupProofs)]) -> Result<()> {
        let cf = self.cf(CF_PROOFS);
        let mut batch = WriteBatch::default();
        for (akd_label, version, proofs) in records {
            if let Some(value) = codec::encode_lookup_proofs(proofs) {
                batch.put_cf(cf, codec::user_key(akd_label, *version), value);
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        let mut write_options = WriteOptions::default();
        write_options.disable_wal(true);
        self.db
            .write_opt(batch, &write_options)
            .map_err(storage("write stored lookup proofs"))
    }

    /// Up to `limit` user versions after user key `after` (from the first when `None`), in key
    /// order: each one's key, label and version number. The lookup-proof backfill's walk.
    pub fn user_versions_after(
        &self,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, AkdLabel, u64)>> {
        let mut read_options = ReadOptions::default();
        read_options.set_total_order_seek(true);
        let mut iter = self.db.raw_iterator_cf_opt(self.cf(CF_USERS), read_options);
        match after {
            Some(after) => {
                iter.seek(after);
                if iter.valid() && iter.key() == Some(after) {
                    iter.next();
                }
            }
            None => iter.seek_to_first(),
        }
        let mut out = Vec::with_capacity(limit.min(4096));
        while out.len() < limit && iter.valid() {
            if let (Some(key), Some(value)) = (iter.key(), iter.value()) {
                let (akd_label, version) = codec::user_record_label_and_version(value)?;
                out.push((key.to_vec(), akd_label, version));
            }
            iter.next();
        }
        iter.status().map_err(storage("walk user versions"))?;
        Ok(out)
    }

    /// Writes raw bytes as the lookup-proofs record of `(akd_label, version)` (fault tests).
    #[doc(hidden)]
    pub fn put_raw_lookup_proofs_for_tests(
        &self,
        akd_label: &[u8],
        version: u64,
        bytes: &[u8],
    ) -> Result<()> {
        self.db
            .put_cf(
                self.cf(CF_PROOFS),
                codec::user_key(akd_label, version),
                bytes,
            )
            .map_err(storage("write stored lookup proofs"))
    }

    /// Every version of `akd_label` published at or before `as_of`, oldest first.
    pub fn user_versions(&self, akd_label: &[u8], as_of: u64) -> Result<Vec<UserVersion>> {
        let prefix = codec::user_prefix(akd_label);
        let iter = self.db.iterator_cf_opt(
            self.cf(CF_USERS),
            prefix_read_options(),
            IteratorMode::From(&prefix, Direction::Forward),
        );
        let mut versions = Vec::new();
        for entry in iter {
            let (key, value) = entry.map_err(storage("read a user's versions"))?;
            if !key.starts_with(&prefix) {
                break;
            }
            let version = codec::decode_user(akd_label, &value)?;
            if version.epoch <= as_of {
                versions.push(version);
            }
        }
        Ok(versions)
    }

    /// Opens the database at `path` for the directory `expected` describes: a new or empty
    /// database is stamped with it; an existing one must carry the same configuration, partition
    /// bits and VRF key. Returns whether the database was new.
    pub fn open_checked(
        path: &Path,
        options: StoreOptions,
        expected: &DirectoryMeta,
    ) -> crate::error::Result<(Arc<Self>, bool)> {
        let (store, _) = Self::open(path, options)?;
        let incompatible = |reason: String| incompatible(path, reason);
        match store.meta()? {
            None => {
                // A database with our column families but no metadata is only acceptable if it
                // holds nothing (a first start that stopped before stamping it).
                for name in [CF_NODES, CF_EPOCHS, CF_USERS, CF_INBOX] {
                    if store
                        .db
                        .iterator_cf(store.cf(name), IteratorMode::Start)
                        .next()
                        .is_some()
                    {
                        return Err(incompatible("it holds data but no ktd metadata".into()));
                    }
                }
                let mut batch = WriteBatch::default();
                batch.put_cf(store.cf(CF_META), META_KEY, expected.encode());
                store.write_synced(batch, "meta", "stamp the directory metadata")?;
                Ok((store, true))
            }
            Some(meta) => {
                if meta.configuration != expected.configuration {
                    return Err(incompatible(format!(
                        "it holds configuration {}, not {}",
                        meta.configuration, expected.configuration
                    )));
                }
                if meta.partition_bits != expected.partition_bits {
                    return Err(incompatible(format!(
                        "it has {} partition bits, not {}",
                        meta.partition_bits, expected.partition_bits
                    )));
                }
                if meta.vrf_public_key != expected.vrf_public_key {
                    return Err(incompatible(
                        "it was created with a different VRF key".into(),
                    ));
                }
                Ok((store, false))
            }
        }
    }

    /// Writes an epoch record on its own, synced (epoch 0 of a new directory).
    pub fn put_epoch(&self, record: &EpochRecord) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(CF_EPOCHS),
            record.epoch.to_be_bytes(),
            record.encode(),
        );
        self.write_synced(batch, "epoch", "write an epoch record")
    }

    /// Writes user versions in one synced `WriteBatch` (a shard's prepare step).
    pub fn write_user_versions(&self, versions: &[(AkdLabel, UserVersion)]) -> Result<()> {
        let users = self.cf(CF_USERS);
        let mut batch = WriteBatch::default();
        for (akd_label, version) in versions {
            batch.put_cf(
                users,
                codec::user_key(akd_label, version.version),
                codec::encode_user(akd_label, version),
            );
        }
        self.write_synced(batch, "user_versions", "write user versions")
    }

    /// Commits an epoch: its record and its new user versions, in one synced `WriteBatch`.
    pub fn commit_epoch(
        &self,
        record: &EpochRecord,
        versions: &[(AkdLabel, UserVersion)],
    ) -> Result<()> {
        let users = self.cf(CF_USERS);
        let mut batch = WriteBatch::default();
        for (akd_label, version) in versions {
            batch.put_cf(
                users,
                codec::user_key(akd_label, version.version),
                codec::encode_user(akd_label, version),
            );
        }
        batch.put_cf(
            self.cf(CF_EPOCHS),
            record.epoch.to_be_bytes(),
            record.encode(),
        );
        self.write_synced(batch, "commit", "commit an epoch")
    }

    /// Writes `batch` synced; its latency goes to `ktd_storage_batch_write_seconds{batch=kind}`.
    fn write_synced(
        &self,
        batch: WriteBatch,
        kind: &'static str,
        context: &'static str,
    ) -> Result<()> {
        let mut write_options = WriteOptions::default();
        write_options.set_sync(true);
        let started = std::time::Instant::now();
        let written = self
            .db
            .write_opt(batch, &write_options)
            .map_err(storage(context));
        crate::metrics::record_batch_write("shard", kind, started);
        written
    }

    /// Samples this store's write stalls, compaction debt and disk space. Blocking.
    pub fn storage_health(&self) -> std::result::Result<StorageHealth, SampleError> {
        let column_families: Vec<&ColumnFamily> =
            COLUMN_FAMILIES.iter().map(|name| self.cf(name)).collect();
        StorageHealth::read(&self.db, &column_families, &self.path)
    }

    /// Samples [`RocksStore::storage_health`] and sets the `ktd_storage_*` gauges of this
    /// store's directory. Blocking.
    pub fn export_storage_health(&self) -> std::result::Result<(), SampleError> {
        self.storage_health()?.export(&self.path);
        self.hot.stats().export(&self.path);
        Ok(())
    }

    /// Total bytes of live SST files (for benchmarks and capacity reports).
    pub fn sst_bytes(&self) -> Result<u64> {
        let mut total = 0;
        for name in COLUMN_FAMILIES {
            total += self
                .db
                .property_int_value_cf(self.cf(name), "rocksdb.total-sst-files-size")
                .map_err(storage("read RocksDB properties"))?
                .unwrap_or(0);
        }
        Ok(total)
    }

    /// Cumulative write volumes since open (zeros unless statistics are enabled).
    pub fn io_stats(&self) -> IoStats {
        use rocksdb::statistics::Ticker;
        IoStats {
            user_bytes: self.options.get_ticker_count(Ticker::BytesWritten),
            wal_bytes: self.options.get_ticker_count(Ticker::WalFileBytes),
            flush_bytes: self.options.get_ticker_count(Ticker::FlushWriteBytes),
            compaction_bytes: self.options.get_ticker_count(Ticker::CompactWriteBytes),
        }
    }

    /// Flushes memtables to SST files (synced): benchmarks measuring disk footprint, and a shard
    /// server's graceful shutdown.
    pub fn flush(&self) -> Result<()> {
        for name in COLUMN_FAMILIES {
            self.db
                .flush_cf(self.cf(name))
                .map_err(storage("flush memtables"))?;
        }
        Ok(())
    }
}

impl TreeStore for RocksStore {
    /// Reads the held ones from the hot tree levels, the rest from RocksDB, and holds those
    /// found that are short enough.
    fn read_nodes(&self, keys: &[NodeKey]) -> ktd_core::Result<Vec<Option<InteriorNode>>> {
        // The deep rounds of a build (and every read with the levels off) hold nothing.
        if !keys.iter().any(|key| self.hot.holds(&key.label)) {
            return self.read_stored_nodes(keys);
        }
        let generation = self.hot.generation();
        let mut found: Vec<Option<InteriorNode>> =
            keys.iter().map(|key| self.hot.get(key)).collect();
        let missing: Vec<usize> = (0..keys.len()).filter(|&i| found[i].is_none()).collect();
        if missing.is_empty() {
            return Ok(found);
        }
        if missing.len() == keys.len() {
            found = self.read_stored_nodes(keys)?;
        } else {
            let wanted: Vec<NodeKey> = missing.iter().map(|&i| keys[i]).collect();
            for (i, node) in missing.iter().zip(self.read_stored_nodes(&wanted)?) {
                found[*i] = node;
            }
        }
        for &i in &missing {
            if let Some(node) = &found[i] {
                self.hot.fill(&keys[i], node, generation);
            }
        }
        Ok(found)
    }
}

impl RocksStore {
    /// The hot tree levels' hit and miss counts and memory in use.
    pub fn hot_stats(&self) -> hot::HotStats {
        self.hot.stats()
    }

    /// Reads `keys` from the `nodes` family (a level's reads split across threads above
    /// [`READ_CHUNK`] keys).
    fn read_stored_nodes(&self, keys: &[NodeKey]) -> Result<Vec<Option<InteriorNode>>> {
        let cf = self.cf(CF_NODES);
        let read_chunk = |chunk: &[NodeKey]| -> ktd_core::Result<Vec<Option<InteriorNode>>> {
            let encoded: Vec<Vec<u8>> = chunk.iter().map(codec::node_key).collect();
            self.db
                .batched_multi_get_cf(cf, &encoded, false)
                .into_iter()
                .map(|found| {
                    found
                        .map_err(storage("read tree nodes"))?
                        .map(|bytes| codec::decode_node(&bytes))
                        .transpose()
                })
                .collect()
        };
        if keys.len() <= READ_CHUNK {
            return read_chunk(keys);
        }
        let chunks: Vec<Vec<Option<InteriorNode>>> = keys
            .par_chunks(READ_CHUNK)
            .map(read_chunk)
            .collect::<Result<_>>()?;
        Ok(chunks.into_iter().flatten().collect())
    }
}

fn latest_user_version_with(
    iter: &mut rocksdb::DBRawIterator<'_>,
    akd_label: &[u8],
    as_of: u64,
) -> Result<Option<UserVersion>> {
    let prefix = codec::user_prefix(akd_label);
    iter.seek_for_prev(codec::user_key(akd_label, u64::MAX));
    while iter.valid() {
        let Some(key) = iter.key() else { break };
        if !key.starts_with(&prefix) {
            break;
        }
        let version = codec::decode_user(akd_label, iter.value().unwrap_or_default())?;
        if version.epoch <= as_of {
            return Ok(Some(version));
        }
        iter.prev();
    }
    iter.status().map_err(storage("read a user's versions"))?;
    Ok(None)
}

fn prefix_read_options() -> ReadOptions {
    let mut read_options = ReadOptions::default();
    read_options.set_prefix_same_as_start(true);
    read_options
}

/// The WAL bound: two `nodes` memtables' worth (256 MiB with the default 128 MiB memtable).
fn max_total_wal_bytes(options: StoreOptions) -> u64 {
    (options.write_buffer_bytes as u64).saturating_mul(2)
}

fn column_family_options(name: &str, cache: &Cache, options: StoreOptions) -> Options {
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    table.set_bloom_filter(10.0, false);
    // 16 KiB measured better than 4 KiB at 10M entries (smaller index and filter footprint).
    table.set_block_size(if name == CF_NODES {
        options.node_block_bytes.max(1 << 10)
    } else {
        16 << 10
    });
    table.set_cache_index_and_filter_blocks(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);

    let mut cf_options = Options::default();
    cf_options.set_compression_type(DBCompressionType::None);
    cf_options.set_level_compaction_dynamic_level_bytes(true);
    match name {
        CF_NODES => {
            cf_options.set_write_buffer_size(options.write_buffer_bytes);
            cf_options.set_max_write_buffer_number(4);
            // Every node read hits (keys come from parents), so the last level needs no filter.
            cf_options.set_optimize_filters_for_hits(true);
        }
        CF_USERS | CF_PROOFS => {
            cf_options.set_write_buffer_size(options.write_buffer_bytes / 2);
            cf_options
                .set_prefix_extractor(SliceTransform::create_fixed_prefix(codec::USER_HASH_LEN));
            cf_options.set_memtable_prefix_bloom_ratio(0.1);
        }
        _ => {}
    }
    cf_options.set_block_based_table_factory(&table);
    cf_options
}
