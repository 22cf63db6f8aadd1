//! What a shard server keeps about itself as a replica, beside the tree and the users: its
//! identity, the fence it has accepted, and one *built marker* per partition it holds — and the
//! partition-wide operations a replica needs: discarding one epoch of one partition, copying a
//! partition out at an epoch (for a peer's bootstrap) and taking such a copy in.
//!
//! | `meta` key | value |
//! |---|---|
//! | `shard_id` | the server id the data directory belongs to (written once) |
//! | `fence` | `format ‖ be64(term) ‖ be64(committed epoch) ‖ be64(map version) [‖ be64(safe epoch)]` |
//! | `prune_floor` | `be64(epoch)`: reads below it are refused, history below it may be deleted (`prune.rs`) |
//! | `built/` `be32(partition)` | `format ‖ be64(epoch) ‖ 0 / 1 ‖ NodeRef`: the partition's highest built epoch and its root then |
//!
//! **Invariant:** a built marker `(E, root)` is written in a synced batch after every node
//! version and user version of `E` for that partition; RocksDB's write-ahead log is sequential,
//! so the sync makes the earlier unsynced writes durable too. A partition without a marker is not
//! held: a new or wiped data directory holds nothing until a bootstrap fills it.
//!
//! Partitions are key ranges: node keys are `be64(epoch) ‖ label bytes ‖ be16(len)` and every
//! label of partition `p` starts with `p`'s `k` bits, so epoch `E` of `p` is one contiguous range;
//! user keys are `blake3(label) ‖ be64(version)` and user partition `p` is the hashes starting
//! with `p`'s bits, one contiguous range.

use ktd_core::codec::{Reader, put_node_ref};
use ktd_core::tree::NodeRef;
use ktd_core::{Error as CoreError, Result};
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};

use super::{CF_META, CF_NODES, CF_PROOFS, CF_STALE, CF_USERS, RocksStore, storage};

const FORMAT: u8 = 1;
const SHARD_ID_KEY: &[u8] = b"shard_id";
const FENCE_KEY: &[u8] = b"fence";
const BUILT_PREFIX: &[u8] = b"built/";
/// Range deletions per synced batch when a moved partition is deleted.
const RANGES_PER_BATCH: usize = 4096;

/// The highest fence a shard has accepted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoredFence {
    /// The highest coordinator term.
    pub term: u64,
    /// The highest committed epoch seen.
    pub committed_epoch: u64,
    /// The version of the newest shard map seen.
    pub map_version: u64,
    /// The newest cluster safe epoch seen (history retention).
    pub safe_epoch: u64,
}

/// A partition's built marker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BuiltMarker {
    /// The partition.
    pub partition: u32,
    /// Its highest built epoch.
    pub epoch: u64,
    /// Its root as of that epoch (`None`: empty partition).
    pub root: Option<NodeRef>,
}

/// One stored record (key and value as the store keeps them).
pub type RawRecord = (Vec<u8>, Vec<u8>);

/// The first two key bytes of `partition` out of `2^bits` (`bits ≤ 12 < 16`), and of the next one
/// (`None` past the last partition).
fn partition_bounds(partition: u32, bits: u8) -> ([u8; 2], Option<[u8; 2]>) {
    let shift = 16 - u32::from(bits);
    let start = ((partition << shift) as u16).to_be_bytes();
    let end =
        (partition + 1 < (1 << bits)).then(|| (((partition + 1) << shift) as u16).to_be_bytes());
    (start, end)
}

/// The node keys of `partition` written at `epoch`: one contiguous range `[from, to)` (also of
/// the stale-version index, whose keys are node keys).
pub(super) fn node_range(epoch: u64, partition: u32, bits: u8) -> (Vec<u8>, Vec<u8>) {
    let (start, end) = partition_bounds(partition, bits);
    let mut from = epoch.to_be_bytes().to_vec();
    from.extend_from_slice(&start);
    let to = match end {
        Some(end) => {
            let mut to = epoch.to_be_bytes().to_vec();
            to.extend_from_slice(&end);
            to
        }
        None => (epoch + 1).to_be_bytes().to_vec(),
    };
    (from, to)
}

/// The user keys of user partition `partition`: one contiguous range `[from, to)`.
fn user_range(partition: u32, bits: u8) -> (Vec<u8>, Vec<u8>) {
    let (start, end) = partition_bounds(partition, bits);
    let to = match end {
        Some(end) => end.to_vec(),
        None => vec![0xff; super::codec::USER_HASH_LEN + 9],
    };
    (start.to_vec(), to)
}

fn built_key(partition: u32) -> Vec<u8> {
    let mut key = BUILT_PREFIX.to_vec();
    key.extend_from_slice(&partition.to_be_bytes());
    key
}

fn encode_marker(marker: &BuiltMarker) -> Vec<u8> {
    let mut out = vec![FORMAT];
    out.extend_from_slice(&marker.epoch.to_be_bytes());
    match &marker.root {
        None => out.push(0),
        Some(root) => {
            out.push(1);
            put_node_ref(&mut out, root);
        }
    }
    out
}

fn decode_marker(partition: u32, bytes: &[u8]) -> Result<BuiltMarker> {
    let mut reader = Reader::new(bytes, "built marker");
    reader.format(FORMAT)?;
    let epoch = reader.u64()?;
    let root = match reader.u8()? {
        0 => None,
        1 => Some(reader.node_ref()?),
        _ => return Err(reader.corrupt("bad root presence byte")),
    };
    reader.finish()?;
    Ok(BuiltMarker {
        partition,
        epoch,
        root,
    })
}

impl RocksStore {
    /// The shard id this data directory belongs to, if one was recorded.
    pub fn shard_id(&self) -> Result<Option<String>> {
        self.db
            .get_cf(self.cf(CF_META), SHARD_ID_KEY)
            .map_err(storage("read the shard id"))?
            .map(|bytes| {
                String::from_utf8(bytes)
                    .map_err(|_| CoreError::Corrupt("the stored shard id is not UTF-8".into()))
            })
            .transpose()
    }

    /// Records the shard id this data directory belongs to (synced).
    pub fn set_shard_id(&self, id: &str) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_META), SHARD_ID_KEY, id.as_bytes());
        self.write_synced(batch, "meta", "record the shard id")
    }

    /// The highest fence accepted so far.
    pub fn fence(&self) -> Result<StoredFence> {
        let Some(bytes) = self
            .db
            .get_cf(self.cf(CF_META), FENCE_KEY)
            .map_err(storage("read the fence"))?
        else {
            return Ok(StoredFence::default());
        };
        let mut reader = Reader::new(&bytes, "fence");
        reader.format(FORMAT)?;
        let fence = StoredFence {
            term: reader.u64()?,
            committed_epoch: reader.u64()?,
            map_version: reader.u64()?,
            // Fences stored before history retention have no safe epoch.
            safe_epoch: if reader.remaining() > 0 {
                reader.u64()?
            } else {
                0
            },
        };
        reader.finish()?;
        Ok(fence)
    }

    /// Stores the highest fence accepted (synced).
    pub fn put_fence(&self, fence: &StoredFence) -> Result<()> {
        let mut value = vec![FORMAT];
        value.extend_from_slice(&fence.term.to_be_bytes());
        value.extend_from_slice(&fence.committed_epoch.to_be_bytes());
        value.extend_from_slice(&fence.map_version.to_be_bytes());
        value.extend_from_slice(&fence.safe_epoch.to_be_bytes());
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_META), FENCE_KEY, value);
        self.write_synced(batch, "meta", "store the fence")
    }

    /// Every partition's built marker, in partition order.
    pub fn built_markers(&self) -> Result<Vec<BuiltMarker>> {
        let mut markers = Vec::new();
        for entry in self.db.iterator_cf(
            self.cf(CF_META),
            IteratorMode::From(BUILT_PREFIX, Direction::Forward),
        ) {
            let (key, value) = entry.map_err(storage("read built markers"))?;
            let Some(partition) = key.strip_prefix(BUILT_PREFIX) else {
                break;
            };
            let partition = u32::from_be_bytes(partition.try_into().map_err(|_| {
                CoreError::Corrupt("a built marker key is not a partition number".into())
            })?);
            markers.push(decode_marker(partition, &value)?);
        }
        Ok(markers)
    }

    /// Writes built markers in one synced batch: the epoch's node and user versions written
    /// before become durable with it.
    pub fn put_built_markers(&self, markers: &[BuiltMarker]) -> Result<()> {
        let meta = self.cf(CF_META);
        let mut batch = WriteBatch::default();
        for marker in markers {
            batch.put_cf(meta, built_key(marker.partition), encode_marker(marker));
        }
        self.write_synced(batch, "built", "write built markers")
    }

    /// Forgets that `partition` is held (synced), before a bootstrap replaces it.
    pub fn drop_built_marker(&self, partition: u32) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_META), built_key(partition));
        self.write_synced(batch, "built", "drop a built marker")
    }

    /// Deletes the node versions of epoch `epoch` in `partition` (an abandoned attempt at it),
    /// and nothing else.
    pub fn discard_partition_epoch(&self, epoch: u64, partition: u32, bits: u8) -> Result<()> {
        let (from, to) = node_range(epoch, partition, bits);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf(CF_NODES), &from, &to);
        batch.delete_range_cf(self.cf(CF_STALE), &from, &to);
        self.db
            .write(batch)
            .map_err(storage("discard an abandoned epoch of a partition"))?;
        self.hot.discard_partition_from(partition, bits, epoch);
        Ok(())
    }

    /// Deletes every user version of user partition `partition` (before a bootstrap copies it in).
    pub fn delete_user_partition(&self, partition: u32, bits: u8) -> Result<()> {
        let (from, to) = user_range(partition, bits);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf(CF_USERS), &from, &to);
        batch.delete_range_cf(self.cf(CF_PROOFS), &from, &to);
        self.db
            .write(batch)
            .map_err(storage("delete a user partition"))
    }

    /// Deletes every record of `partition` — once the shard map has moved it to other servers.
    /// The built marker goes first (synced), so from then on the partition is not held whatever
    /// happens next; then its node versions of epochs `0..=up_to` and its user versions, as
    /// range deletions in synced batches of at most 4096. The space returns as
    /// RocksDB compacts the ranges. Blocking.
    pub fn delete_partition(&self, partition: u32, bits: u8, up_to: u64) -> Result<()> {
        self.drop_built_marker(partition)?;
        let deleted = (|| {
            let mut batch = WriteBatch::default();
            for epoch in 0..=up_to {
                let (from, to) = node_range(epoch, partition, bits);
                batch.delete_range_cf(self.cf(CF_NODES), &from, &to);
                batch.delete_range_cf(self.cf(CF_STALE), &from, &to);
                if batch.len() >= RANGES_PER_BATCH {
                    let full = std::mem::take(&mut batch);
                    self.write_synced(full, "built", "delete a moved partition's node versions")?;
                }
            }
            let (from, to) = user_range(partition, bits);
            batch.delete_range_cf(self.cf(CF_USERS), &from, &to);
            batch.delete_range_cf(self.cf(CF_PROOFS), &from, &to);
            self.write_synced(batch, "built", "delete a moved partition's user versions")
        })();
        // Dropped whether or not every batch went: a partial delete must not leave them held.
        self.hot.clear_partition(partition, bits);
        deleted
    }

    /// RocksDB's estimate of the bytes on disk of each of `partitions`: the store's SST bytes
    /// (tree and users) times the partition's share of the user versions (one key range per
    /// partition; node keys start with the epoch, so a partition's tree is thousands of
    /// ranges, and its share of the tree is its share of the users — both follow the same
    /// uniformly spread labels). RocksDB estimates a range by whole data blocks, so while the
    /// user versions fit in a few blocks the shares are split evenly; while everything is in
    /// memtables every size is 0. Blocking.
    pub fn partition_sizes(&self, partitions: &[u32], bits: u8) -> Result<Vec<u64>> {
        let bounds: Vec<(Vec<u8>, Vec<u8>)> = partitions
            .iter()
            .map(|partition| user_range(*partition, bits))
            .collect();
        let mut ranges: Vec<rocksdb::Range<'_>> = bounds
            .iter()
            .map(|(from, to)| rocksdb::Range::new(from, to))
            .collect();
        let everything = [0xffu8; super::codec::USER_HASH_LEN + 9];
        ranges.push(rocksdb::Range::new(&[], &everything));
        let mut users = self.db.get_approximate_sizes_cf(self.cf(CF_USERS), &ranges);
        let all_users = users.pop().unwrap_or(0);
        let mut on_disk = 0u64;
        for name in [CF_NODES, CF_USERS] {
            on_disk += self
                .db
                .property_int_value_cf(self.cf(name), "rocksdb.total-sst-files-size")
                .map_err(storage("read RocksDB properties"))?
                .unwrap_or(0);
        }
        let counted: u64 = users.iter().sum();
        Ok(users
            .into_iter()
            .map(|size| {
                if counted == 0 {
                    on_disk / partitions.len().max(1) as u64
                } else {
                    (u128::from(on_disk) * u128::from(size) / u128::from(all_users.max(counted)))
                        as u64
                }
            })
            .collect())
    }

    /// Calls `sink` with the records of `partition` as of `epoch`, in chunks of about
    /// `chunk_bytes`: node versions of epochs `from + 1 ..= epoch` (`epochs` is `from..=epoch`;
    /// `from` 0 for a whole copy) whose label is in the partition, then user versions of its
    /// users published in those epochs. Reads one RocksDB snapshot, so writes of later epochs
    /// do not disturb the copy. Blocking.
    pub fn export_partition(
        &self,
        partition: u32,
        epochs: std::ops::RangeInclusive<u64>,
        bits: u8,
        chunk_bytes: usize,
        mut sink: impl FnMut(Vec<RawRecord>, Vec<RawRecord>) -> Result<()>,
    ) -> Result<u64> {
        let (from, epoch) = (*epochs.start(), *epochs.end());
        let snapshot = self.db.snapshot();
        let (start, end) = partition_bounds(partition, bits);
        let mut records = 0u64;
        let mut nodes: Vec<RawRecord> = Vec::new();
        let mut users: Vec<RawRecord> = Vec::new();
        let mut pending = 0usize;
        let flush = |nodes: &mut Vec<RawRecord>,
                     users: &mut Vec<RawRecord>,
                     pending: &mut usize,
                     sink: &mut dyn FnMut(Vec<RawRecord>, Vec<RawRecord>) -> Result<()>|
         -> Result<()> {
            if !nodes.is_empty() || !users.is_empty() {
                sink(std::mem::take(nodes), std::mem::take(users))?;
            }
            *pending = 0;
            Ok(())
        };
        for version in from + 1..=epoch {
            let mut from = version.to_be_bytes().to_vec();
            from.extend_from_slice(&start);
            let mut to = version.to_be_bytes().to_vec();
            match end {
                Some(end) => to.extend_from_slice(&end),
                None => to = (version + 1).to_be_bytes().to_vec(),
            }
            let mut read_options = ReadOptions::default();
            read_options.set_snapshot(&snapshot);
            read_options.set_iterate_upper_bound(to);
            let mut iter = self.db.raw_iterator_cf_opt(self.cf(CF_NODES), read_options);
            iter.seek(&from);
            while iter.valid() {
                if let (Some(key), Some(value)) = (iter.key(), iter.value()) {
                    pending += key.len() + value.len();
                    nodes.push((key.to_vec(), value.to_vec()));
                    records += 1;
                }
                if pending >= chunk_bytes {
                    flush(&mut nodes, &mut users, &mut pending, &mut sink)?;
                }
                iter.next();
            }
            iter.status().map_err(storage("export tree nodes"))?;
        }
        let mut read_options = ReadOptions::default();
        read_options.set_snapshot(&snapshot);
        read_options.set_total_order_seek(true);
        if let Some(end) = end {
            read_options.set_iterate_upper_bound(end.to_vec());
        }
        let mut iter = self.db.raw_iterator_cf_opt(self.cf(CF_USERS), read_options);
        iter.seek(start);
        while iter.valid() {
            if let (Some(key), Some(value)) = (iter.key(), iter.value())
                && (from + 1..=epoch).contains(&super::codec::user_record_epoch(value)?)
            {
                pending += key.len() + value.len();
                users.push((key.to_vec(), value.to_vec()));
                records += 1;
            }
            if pending >= chunk_bytes {
                flush(&mut nodes, &mut users, &mut pending, &mut sink)?;
            }
            iter.next();
        }
        iter.status().map_err(storage("export user versions"))?;
        flush(&mut nodes, &mut users, &mut pending, &mut sink)?;
        Ok(records)
    }

    /// **Test hook** (drills and tests only; nothing in a server calls it): damages the stored
    /// copy of `partition` as of `epoch` by flipping a bit in every child hash of every node
    /// version, and syncs. The built marker is left alone, so the restart check passes and the
    /// damage shows only when the replica computes its next root — which then disagrees with its
    /// majority. Returns the node versions damaged. Blocking.
    #[doc(hidden)]
    pub fn damage_partition_for_tests(&self, partition: u32, epoch: u64, bits: u8) -> Result<u64> {
        let mut batch = WriteBatch::default();
        let mut damaged = 0u64;
        self.export_partition(partition, 0..=epoch, bits, 1 << 20, |nodes, _users| {
            for (key, value) in nodes {
                let mut node = super::codec::decode_node(&value)?;
                for child in &mut node.children {
                    child.hash.0[0] ^= 1;
                }
                batch.put_cf(self.cf(CF_NODES), key, super::codec::encode_node(&node));
                damaged += 1;
            }
            Ok(())
        })?;
        let mut options = rocksdb::WriteOptions::default();
        options.set_sync(true);
        self.db
            .write_opt(batch, &options)
            .map_err(storage("damage a partition (test hook)"))?;
        // Drills must read the damaged bytes, not the held good ones.
        self.hot.clear_partition(partition, bits);
        Ok(damaged)
    }

    /// Writes records copied from a peer (unsynced: the bootstrap's final built marker syncs
    /// them). Node and user records are checked to decode and to belong to `partition` as of
    /// `epoch`.
    pub fn import_records(
        &self,
        partition: u32,
        epoch: u64,
        bits: u8,
        nodes: &[RawRecord],
        users: &[RawRecord],
    ) -> Result<()> {
        let (start, end) = partition_bounds(partition, bits);
        let in_partition = |bytes: &[u8]| {
            bytes.len() >= 2
                && bytes[..2] >= start[..]
                && end.is_none_or(|end| bytes[..2] < end[..])
        };
        let mut batch = WriteBatch::default();
        for (key, value) in nodes {
            let version = key
                .get(..8)
                .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| CoreError::Corrupt("a copied node key is too short".into()))?;
            if version == 0
                || version > epoch
                || !in_partition(&key[8..])
                || super::codec::decode_node_key(key).is_err()
            {
                return Err(CoreError::Corrupt(format!(
                    "a copied node version (epoch {version}) is not part of partition {partition} as of epoch {epoch}"
                )));
            }
            super::codec::decode_node(value)?;
            batch.put_cf(self.cf(CF_NODES), key, value);
        }
        for (key, value) in users {
            if key.len() != super::codec::USER_HASH_LEN + 8
                || !in_partition(key)
                || super::codec::user_record_epoch(value)? > epoch
            {
                return Err(CoreError::Corrupt(format!(
                    "a copied user version is not part of user partition {partition} as of epoch {epoch}"
                )));
            }
            batch.put_cf(self.cf(CF_USERS), key, value);
        }
        self.db
            .write(batch)
            .map_err(storage("write a copied partition"))?;
        self.hot.clear_partition(partition, bits);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use akd_core::AzksValue;

    use super::*;

    #[test]
    fn partition_bounds_cover_the_key_space_without_overlap() {
        for bits in [0u8, 1, 4, 12] {
            let mut previous_end: Option<[u8; 2]> = Some([0, 0]);
            for partition in 0..(1u32 << bits) {
                let (start, end) = partition_bounds(partition, bits);
                assert_eq!(
                    Some(start),
                    previous_end,
                    "bits {bits} partition {partition}"
                );
                previous_end = end;
            }
            assert_eq!(previous_end, None, "the last partition runs to the end");
        }
    }

    #[test]
    fn built_markers_round_trip() {
        let root = NodeRef {
            label: akd_core::NodeLabel::new([0x80; 32], 9).get_prefix(9),
            hash: AzksValue([7; 32]),
            min_epoch: 2,
            max_epoch: 5,
        };
        for marker in [
            BuiltMarker {
                partition: 3,
                epoch: 5,
                root: Some(root),
            },
            BuiltMarker {
                partition: 0,
                epoch: 0,
                root: None,
            },
        ] {
            let decoded =
                decode_marker(marker.partition, &encode_marker(&marker)).expect("round trip");
            assert_eq!(decoded, marker);
        }
        assert!(decode_marker(0, &[FORMAT, 0]).is_err());
    }
}
