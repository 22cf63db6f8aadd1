//! The shard map: which shard server owns which partitions, and its one validation.
//!
//! Every component that holds a shard map — the sequencer's state machine when a map is
//! proposed or applied, the epoch coordinator, shard servers receiving one in `PrepareEpoch`,
//! gateways routing reads — builds it with [`ShardMap::new`], so a map that one of them would
//! refuse is refused by all of them, before it is replicated.
//!
//! **Invariant:** a valid map covers each of the `2^bits` partitions exactly once, with
//! `bits ≤ MAX_PARTITION_BITS`, non-empty unique shard ids, and at least one shard.
//! A shard owning partition `p` owns both the tree partition and the user partition `p`
//! ([`crate::label::user_partition`]).

use std::collections::HashSet;

use akd_core::NodeLabel;

use crate::error::{Error, Result};
use crate::label::{self, MAX_PARTITION_BITS};

/// One shard server in the shard map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardInfo {
    /// Stable identity, e.g. `shard-1`.
    pub id: String,
    /// gRPC address, e.g. `http://127.0.0.1:7001` (empty for in-process shards).
    pub address: String,
    /// The tree partitions (and the user partitions with the same numbers) it owns.
    pub partitions: Vec<u32>,
}

/// Which shard owns which partitions: every partition exactly once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardMap {
    /// Version of the map in the sequencer (0 for a map that was never stored).
    pub version: u64,
    /// Partition bits `k`.
    pub bits: u8,
    /// The shards.
    pub shards: Vec<ShardInfo>,
    owner: Vec<usize>,
}

fn invalid(message: String) -> Error {
    Error::InvalidConfig(message)
}

/// Checks partition bits against [`MAX_PARTITION_BITS`], from any integer width a caller holds.
pub fn check_partition_bits(bits: u64) -> Result<u8> {
    u8::try_from(bits)
        .ok()
        .filter(|bits| *bits <= MAX_PARTITION_BITS)
        .ok_or_else(|| {
            invalid(format!(
                "partition bits must be at most {MAX_PARTITION_BITS}, got {bits}"
            ))
        })
}

impl ShardMap {
    /// Builds the map and checks it: `bits ≤ MAX_PARTITION_BITS`, non-empty unique shard ids,
    /// and the shards cover the `2^bits` partitions exactly once.
    pub fn new(version: u64, bits: u8, shards: Vec<ShardInfo>) -> Result<Self> {
        check_partition_bits(u64::from(bits))?;
        if shards.is_empty() {
            return Err(invalid("a shard map needs at least one shard".into()));
        }
        let mut ids = HashSet::new();
        for shard in &shards {
            if shard.id.is_empty() || !ids.insert(shard.id.as_str()) {
                return Err(invalid(format!(
                    "shard ids must be non-empty and unique ({:?})",
                    shard.id
                )));
            }
        }
        let n_partitions = 1usize << bits;
        let mut owner = vec![usize::MAX; n_partitions];
        for (index, shard) in shards.iter().enumerate() {
            for &partition in &shard.partitions {
                let slot = owner.get_mut(partition as usize).ok_or_else(|| {
                    invalid(format!(
                        "shard {} owns partition {partition}, but there are only {n_partitions}",
                        shard.id
                    ))
                })?;
                if *slot != usize::MAX {
                    return Err(invalid(format!(
                        "partition {partition} is owned by both {} and {}",
                        shards[*slot].id, shard.id
                    )));
                }
                *slot = index;
            }
        }
        if let Some(orphan) = owner.iter().position(|slot| *slot == usize::MAX) {
            return Err(invalid(format!("partition {orphan} has no shard")));
        }
        Ok(Self {
            version,
            bits,
            shards,
            owner,
        })
    }

    /// `shards` shards splitting the `2^bits` partitions into contiguous, near-equal ranges.
    pub fn even(bits: u8, shards: Vec<(String, String)>) -> Result<Self> {
        check_partition_bits(u64::from(bits))?;
        let n_partitions = 1u32 << bits;
        let n_shards = shards.len() as u32;
        if n_shards == 0 || n_shards > n_partitions {
            return Err(invalid(format!(
                "{n_shards} shards cannot split {n_partitions} partitions"
            )));
        }
        let infos = shards
            .into_iter()
            .enumerate()
            .map(|(index, (id, address))| {
                let index = index as u32;
                let start = index * n_partitions / n_shards;
                let end = (index + 1) * n_partitions / n_shards;
                ShardInfo {
                    id,
                    address,
                    partitions: (start..end).collect(),
                }
            })
            .collect();
        Self::new(0, bits, infos)
    }

    /// The same shards under another version.
    pub fn with_version(mut self, version: u64) -> Self {
        self.version = version;
        self
    }

    /// The shard owning tree partition `partition`.
    ///
    /// # Panics
    /// If `partition` is not below `2^bits` (callers compute it from the map's own bits).
    pub fn partition_owner(&self, partition: u32) -> &ShardInfo {
        &self.shards[self.owner[partition as usize]]
    }

    /// The shard owning the node label's partition.
    pub fn label_owner(&self, node_label: &NodeLabel) -> &ShardInfo {
        self.partition_owner(label::partition_of(&node_label.label_val, self.bits))
    }

    /// The shard owning the user `akd_label` (by `blake3(akd_label)`).
    pub fn user_owner(&self, akd_label: &[u8]) -> &ShardInfo {
        self.partition_owner(label::user_partition(akd_label, self.bits))
    }

    /// The shard with this id.
    pub fn shard(&self, id: &str) -> Option<&ShardInfo> {
        self.shards.iter().find(|shard| shard.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, partitions: &[u32]) -> ShardInfo {
        ShardInfo {
            id: id.into(),
            address: format!("http://{id}"),
            partitions: partitions.to_vec(),
        }
    }

    #[test]
    fn a_map_must_cover_every_partition_exactly_once() {
        assert!(ShardMap::new(1, 2, vec![info("a", &[0, 1]), info("b", &[2, 3])]).is_ok());
        let gap = ShardMap::new(1, 2, vec![info("a", &[0, 1]), info("b", &[3])]);
        assert!(
            gap.unwrap_err()
                .to_string()
                .contains("partition 2 has no shard")
        );
        let overlap = ShardMap::new(1, 2, vec![info("a", &[0, 1, 2]), info("b", &[2, 3])]);
        assert!(overlap.unwrap_err().to_string().contains("owned by both"));
        let beyond = ShardMap::new(1, 1, vec![info("a", &[0, 1, 2])]);
        assert!(beyond.unwrap_err().to_string().contains("only 2"));
    }

    #[test]
    fn a_map_needs_unique_ids_one_shard_and_bits_within_the_limit() {
        let twice = ShardMap::new(1, 1, vec![info("a", &[0]), info("a", &[1])]);
        assert!(twice.unwrap_err().to_string().contains("unique"));
        let unnamed = ShardMap::new(1, 0, vec![info("", &[0])]);
        assert!(unnamed.unwrap_err().to_string().contains("unique"));
        assert!(ShardMap::new(1, 0, Vec::new()).is_err());
        let too_wide = ShardMap::even(MAX_PARTITION_BITS + 1, vec![("a".into(), String::new())]);
        assert!(too_wide.unwrap_err().to_string().contains("at most"));
    }

    #[test]
    fn even_maps_split_partitions_into_contiguous_ranges() {
        let map = ShardMap::even(4, vec![("a".into(), "x".into()), ("b".into(), "y".into())])
            .expect("valid");
        assert_eq!(map.shards[0].partitions, (0..8).collect::<Vec<_>>());
        assert_eq!(map.shards[1].partitions, (8..16).collect::<Vec<_>>());
        assert_eq!(map.partition_owner(9).id, "b");
    }
}
