//! Conversions between the records the sequencer replicates through Raft
//! (`ktd.sequencer.v1.ShardMap`, `ktd.sequencer.v1.EpochRecord`) and the core's types.
//!
//! Everyone who reads the replicated shard map or a committed epoch — the state machine when it
//! validates a proposed map, the coordinator, shard servers, gateways — goes through these
//! functions, so they all accept and refuse the same maps ([`ktd_core::ShardMap::new`]) and
//! decode partition roots the same way ([`ktd_core::EpochRecord::decode`]).

use akd_core::configuration::Configuration;
use ktd_core::shard_map::check_partition_bits;
use ktd_core::stitch::TopTree;
use ktd_core::{EpochRecord, ShardInfo, ShardMap};
use ktd_proto::ktd::sequencer::v1 as pb;

use crate::error::{Error, Result};

/// The replicated shard map of a cluster with `metadata`, checked by [`ShardMap::new`].
pub fn shard_map(metadata: &pb::ClusterMetadata, map: &pb::ShardMap) -> Result<ShardMap> {
    shard_map_of(metadata.partition_bits, map.version, &map.shards)
}

/// A shard map from its replicated parts, checked by [`ShardMap::new`].
pub fn shard_map_of(
    partition_bits: u32,
    version: u64,
    shards: &[pb::ShardAssignment],
) -> Result<ShardMap> {
    let bits = check_partition_bits(u64::from(partition_bits))?;
    let shards = shards
        .iter()
        .map(|shard| ShardInfo {
            id: shard.shard_id.clone(),
            address: shard.address.clone(),
            partitions: shard.partitions.clone(),
        })
        .collect();
    Ok(ShardMap::new(version, bits, shards)?)
}

/// The replicated form of `map`'s shards.
pub fn shard_assignments(map: &ShardMap) -> Vec<pb::ShardAssignment> {
    map.shards
        .iter()
        .map(|info| pb::ShardAssignment {
            shard_id: info.id.clone(),
            address: info.address.clone(),
            partitions: info.partitions.clone(),
        })
        .collect()
}

/// A committed epoch's top tree from its replicated record (epoch 0 has no partition roots: the
/// empty directory), checked to hash to the committed root.
pub fn top_tree<TC: Configuration>(bits: u8, record: &pb::EpochRecord) -> Result<TopTree<TC>> {
    if record.partition_roots.is_empty() {
        return Ok(TopTree::new(bits, vec![None; 1 << bits])?);
    }
    let decoded = EpochRecord::decode(record.epoch, &record.partition_roots)?;
    let top = TopTree::<TC>::new(bits, decoded.partitions)?;
    if record.epoch > 0 && top.root_hash().as_slice() != record.root_hash.as_slice() {
        return Err(Error::corrupt(format!(
            "epoch {}: partition roots do not hash to the committed root",
            record.epoch
        )));
    }
    Ok(top)
}
