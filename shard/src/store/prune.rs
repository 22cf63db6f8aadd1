//! Pruning: deleting the node versions no retained epoch reads (ADR 0003, decision 2).
//!
//! A node version `(v, L)` superseded at epoch `E` (the build of `E` wrote `(E, L)`) is read only
//! by roots of epochs `v..E`. The build records that in the `stale` family (key `(E, L)`, value
//! `be64(v)`), in the same `WriteBatch` as the new version. Pruning through a *floor* `F` deletes
//! every version superseded at `E ≤ F`: every epoch `≥ F` still walks completely, epochs below
//! `F` may not.
//!
//! **Invariants.**
//! - The floor is persisted (synced, in `meta`) *before* anything is deleted and never lowers,
//!   so a read below it is refused ([`crate::error::Error`] → `OUT_OF_RANGE`) even after a
//!   crash in the middle of a sweep.
//! - The caller picks a floor no higher than the cluster's replicated `safe_epoch` and than the
//!   built epoch of every partition this store holds (a replica rebuilding an epoch reads its
//!   tree as of the epoch before). [`RocksStore::prune_step`] itself deletes only what the index
//!   names at or below the floor.
//! - A sweep deletes a version and its index entry in one batch, so an interrupted sweep
//!   resumes by sweeping again. Deletes are point deletes of keys below `be64(F + 1)`; RocksDB
//!   reclaims the space when it compacts them, which [`RocksStore::compact_pruned`] asks for
//!   once the deleted bytes are a large share of the family.
//!
//! User versions are never pruned: akd's history proofs need every version from 1 on (a
//! `Complete` history must start at version 1), so erasure is akd's tombstoning of values, a
//! separate, explicit operation.

use std::collections::HashMap;

use ktd_core::{Error as CoreError, Result};
use rocksdb::{ReadOptions, WriteBatch, WriteOptions};

use super::replica::node_range;
use super::{CF_META, CF_NODES, CF_STALE, RocksStore, storage};

const PRUNE_FLOOR_KEY: &[u8] = b"prune_floor";

/// What one [`RocksStore::prune_step`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PruneStep {
    /// Node versions deleted.
    pub node_versions: u64,
    /// Whether every index entry at or below the floor is gone.
    pub done: bool,
    /// The lowest version deleted (where the compaction range starts).
    pub lowest_version: u64,
}

impl RocksStore {
    /// The epoch below which history may have been deleted (0: nothing pruned).
    pub fn prune_floor(&self) -> Result<u64> {
        match self
            .db
            .get_cf(self.cf(CF_META), PRUNE_FLOOR_KEY)
            .map_err(storage("read the prune floor"))?
        {
            None => Ok(0),
            Some(bytes) => <[u8; 8]>::try_from(bytes.as_slice())
                .map(u64::from_be_bytes)
                .map_err(|_| CoreError::Corrupt("malformed prune floor".into())),
        }
    }

    /// Raises the prune floor to `floor` (synced) before any sweep deletes below it; a lower
    /// value changes nothing. Returns the floor now in force.
    pub fn raise_prune_floor(&self, floor: u64) -> Result<u64> {
        let current = self.prune_floor()?;
        if floor <= current {
            return Ok(current);
        }
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_META), PRUNE_FLOOR_KEY, floor.to_be_bytes());
        self.write_synced(batch, "meta", "raise the prune floor")?;
        Ok(floor)
    }

    /// Deletes up to `max_entries` of the versions the index names as superseded at or below
    /// `through` (never above the persisted floor), with their index entries (one unsynced
    /// batch). Blocking.
    pub fn prune_step(&self, max_entries: usize, through: u64) -> Result<PruneStep> {
        let floor = self.prune_floor()?.min(through);
        let mut step = PruneStep {
            lowest_version: u64::MAX,
            ..PruneStep::default()
        };
        if floor == 0 {
            step.done = true;
            step.lowest_version = 0;
            return Ok(step);
        }
        let mut read_options = ReadOptions::default();
        read_options.set_iterate_upper_bound((floor + 1).to_be_bytes().to_vec());
        let mut iter = self.db.raw_iterator_cf_opt(self.cf(CF_STALE), read_options);
        iter.seek_to_first();
        let (nodes, stale) = (self.cf(CF_NODES), self.cf(CF_STALE));
        let mut batch = WriteBatch::default();
        let mut entries = 0usize;
        let mut pruned = Vec::new();
        while iter.valid() && entries < max_entries {
            let (Some(key), Some(value)) = (iter.key(), iter.value()) else {
                break;
            };
            let old = <[u8; 8]>::try_from(value)
                .map(u64::from_be_bytes)
                .map_err(|_| CoreError::Corrupt("malformed stale-version entry".into()))?;
            let new = key
                .get(..8)
                .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| CoreError::Corrupt("malformed stale-version key".into()))?;
            if old >= new {
                return Err(CoreError::Corrupt(format!(
                    "stale-version entry says epoch {new} superseded version {old}"
                )));
            }
            let mut old_key = old.to_be_bytes().to_vec();
            old_key.extend_from_slice(&key[8..]);
            // A key that does not decode (copied in malformed) is still deleted; the hot levels
            // then forget everything rather than fail the sweep for good.
            pruned.push(super::codec::decode_node_key(&old_key).ok());
            batch.delete_cf(nodes, old_key);
            batch.delete_cf(stale, key);
            step.lowest_version = step.lowest_version.min(old);
            entries += 1;
            iter.next();
        }
        iter.status()
            .map_err(storage("read the stale-version index"))?;
        step.done = !iter.valid();
        if step.lowest_version == u64::MAX {
            step.lowest_version = 0;
        }
        step.node_versions = entries as u64;
        if entries > 0 {
            let mut write_options = WriteOptions::default();
            write_options.set_sync(false);
            self.db
                .write_opt(batch, &write_options)
                .map_err(storage("delete pruned node versions"))?;
            if pruned.iter().any(Option::is_none) {
                self.hot.clear();
            }
            for key in pruned.iter().flatten() {
                self.hot.remove(key);
            }
        }
        Ok(step)
    }

    /// Compacts the node versions of epochs `from..=through` and the index below
    /// `through + 1`, so the space of pruned versions returns now rather than whenever RocksDB
    /// next compacts those (old, otherwise untouched) key ranges. Blocking.
    pub fn compact_pruned(&self, from: u64, through: u64) {
        let end = (through.saturating_add(1)).to_be_bytes();
        self.db
            .compact_range_cf(self.cf(CF_NODES), Some(from.to_be_bytes()), Some(end));
        self.db
            .compact_range_cf(self.cf(CF_STALE), None::<&[u8]>, Some(end));
    }

    /// Flushes and compacts every column family fully (synced): live-data measurements, and an
    /// operator's one-off reclaim after a large prune. Blocking; rewrites the whole database.
    pub fn compact_all(&self) -> Result<()> {
        self.flush()?;
        for name in super::COLUMN_FAMILIES {
            self.db
                .compact_range_cf(self.cf(name), None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }

    /// Live SST bytes of the node family (the tree) and of the user family.
    pub fn tree_and_user_bytes(&self) -> Result<(u64, u64)> {
        let read = |name: &'static str| {
            self.db
                .property_int_value_cf(self.cf(name), "rocksdb.total-sst-files-size")
                .map_err(storage("read RocksDB properties"))
                .map(Option::unwrap_or_default)
        };
        Ok((read(CF_NODES)?, read(super::CF_USERS)?))
    }

    /// **Test hook**: every stale-version index entry, as (node key of the new version, the
    /// superseded version), in key order. Blocking.
    #[doc(hidden)]
    pub fn stale_index_for_tests(&self) -> Result<Vec<(Vec<u8>, u64)>> {
        let mut entries = Vec::new();
        for entry in self
            .db
            .iterator_cf(self.cf(CF_STALE), rocksdb::IteratorMode::Start)
        {
            let (key, value) = entry.map_err(storage("read the stale-version index"))?;
            let version = <[u8; 8]>::try_from(value.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| CoreError::Corrupt("malformed stale-version entry".into()))?;
            entries.push((key.to_vec(), version));
        }
        Ok(entries)
    }

    /// **Test hook**: deletes the whole stale-version index (a data directory from before it).
    #[doc(hidden)]
    pub fn clear_stale_index_for_tests(&self) -> Result<()> {
        let end = [0xffu8; 8 + 32 + 2 + 1];
        self.db
            .delete_range_cf(self.cf(CF_STALE), &[0u8][..], &end[..])
            .map_err(storage("clear the stale-version index"))
    }

    /// RocksDB's estimate of the node versions stored.
    pub fn node_version_count(&self) -> Result<u64> {
        self.db
            .property_int_value_cf(self.cf(CF_NODES), "rocksdb.estimate-num-keys")
            .map_err(storage("read RocksDB properties"))
            .map(Option::unwrap_or_default)
    }

    /// Writes the stale-version index of `partitions` (of `2^bits`) for epochs `1..=through`
    /// from the node versions stored: each version of a label names the one before it. For
    /// data directories from before the index, and for partitions copied in from a peer (a
    /// copy carries node versions, not the index). Idempotent. Returns the entries written.
    /// Memory: one entry per interior-node label of one partition. Blocking.
    pub fn rebuild_stale_index(&self, partitions: &[u32], bits: u8, through: u64) -> Result<u64> {
        let (nodes, stale) = (self.cf(CF_NODES), self.cf(CF_STALE));
        let mut written = 0u64;
        for partition in partitions {
            let mut latest: HashMap<Vec<u8>, u64> = HashMap::new();
            let mut batch = WriteBatch::default();
            for epoch in 1..=through {
                let (from, to) = node_range(epoch, *partition, bits);
                let mut read_options = ReadOptions::default();
                read_options.set_iterate_upper_bound(to);
                let mut iter = self.db.raw_iterator_cf_opt(nodes, read_options);
                iter.seek(&from);
                while iter.valid() {
                    if let Some(key) = iter.key()
                        && key.len() > 8
                    {
                        let label = key[8..].to_vec();
                        if let Some(previous) = latest.insert(label, epoch) {
                            batch.put_cf(stale, key, previous.to_be_bytes());
                            written += 1;
                        }
                    }
                    iter.next();
                }
                iter.status()
                    .map_err(storage("rebuild the stale-version index"))?;
                if batch.len() >= 10_000 {
                    self.db
                        .write(std::mem::take(&mut batch))
                        .map_err(storage("write the stale-version index"))?;
                }
            }
            self.write_synced(batch, "meta", "write the stale-version index")?;
        }
        Ok(written)
    }
}
