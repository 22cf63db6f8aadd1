//! Conversions between the records the sequencer replicates through Raft — the shard map
//! (`ktd.cluster.v1.ShardMap`) and committed epochs (`ktd.sequencer.v1.EpochRecord`) — and the
//! core's types.
//!
//! Everyone who reads them — the state machine when it validates a proposed map, the
//! coordinator, shard servers receiving a fence, gateways — goes through these functions, so they
//! all accept and refuse the same maps ([`ktd_core::ShardMap::new`]) and decode partition roots
//! and leaf digests the same way.

use akd_core::configuration::Configuration;
use ktd_core::shard_map::{Learner, PartitionReplicas, ShardServer, check_partition_bits};
use ktd_core::stitch::TopTree;
use ktd_core::{EpochRecord, ShardInfo, ShardMap};
use ktd_proto::ktd::cluster::v1 as cluster_pb;
use ktd_proto::ktd::sequencer::v1 as pb;

use crate::error::{Error, Result};

/// The replicated shard map of a cluster with `metadata`, checked by [`ShardMap::new`]. A map
/// written by the first release (one owner per partition) becomes a replication-factor-1 map.
pub fn shard_map(metadata: &pb::ClusterMetadata, map: &cluster_pb::ShardMap) -> Result<ShardMap> {
    shard_map_with_bits(metadata.partition_bits, map)
}

/// A shard map for `partition_bits`, from its replicated form, checked.
pub fn shard_map_with_bits(partition_bits: u32, map: &cluster_pb::ShardMap) -> Result<ShardMap> {
    let bits = check_partition_bits(u64::from(partition_bits))?;
    if map.partitions.is_empty() && !map.shards.is_empty() {
        let owners = map
            .shards
            .iter()
            .map(|shard| ShardInfo {
                id: shard.shard_id.clone(),
                address: shard.address.clone(),
                partitions: shard.partitions.clone(),
            })
            .collect();
        return Ok(ShardMap::from_owners(map.version, bits, owners)?);
    }
    let replication_factor = u8::try_from(map.replication_factor).map_err(|_| {
        Error::invalid_config(format!(
            "replication factor {} is too large",
            map.replication_factor
        ))
    })?;
    let servers = map
        .servers
        .iter()
        .map(|server| ShardServer {
            id: server.id.clone(),
            address: server.address.clone(),
            maintenance_until_ms: server.maintenance_until_ms,
            draining: server.draining,
        })
        .collect();
    let mut partitions = vec![None; 1usize << bits];
    for entry in &map.partitions {
        let slot = partitions
            .get_mut(entry.partition as usize)
            .ok_or_else(|| {
                Error::invalid_config(format!(
                    "the map names partition {}; there are {}",
                    entry.partition,
                    1u32 << bits
                ))
            })?;
        if slot.is_some() {
            return Err(Error::invalid_config(format!(
                "the map names partition {} twice",
                entry.partition
            )));
        }
        *slot = Some(PartitionReplicas {
            voters: entry.voters.clone(),
            learners: entry
                .learners
                .iter()
                .map(|learner| Learner {
                    server: learner.server.clone(),
                    replaces: (!learner.replaces.is_empty()).then(|| learner.replaces.clone()),
                })
                .collect(),
            quarantined: entry.quarantined.clone(),
        });
    }
    let partitions = partitions
        .into_iter()
        .enumerate()
        .map(|(partition, replicas)| {
            replicas.ok_or_else(|| {
                Error::invalid_config(format!("the map does not name partition {partition}"))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ShardMap::new(
        map.version,
        bits,
        replication_factor,
        servers,
        partitions,
    )?)
}

/// The replicated form of `map`.
pub fn shard_map_to_pb(map: &ShardMap) -> cluster_pb::ShardMap {
    cluster_pb::ShardMap {
        version: map.version(),
        shards: Vec::new(),
        replication_factor: u32::from(map.replication_factor()),
        servers: map
            .servers()
            .iter()
            .map(|server| cluster_pb::ShardServer {
                id: server.id.clone(),
                address: server.address.clone(),
                maintenance_until_ms: server.maintenance_until_ms,
                draining: server.draining,
            })
            .collect(),
        partitions: map
            .partitions()
            .iter()
            .enumerate()
            .map(|(partition, replicas)| cluster_pb::PartitionReplicas {
                partition: partition as u32,
                voters: replicas.voters.clone(),
                learners: replicas
                    .learners
                    .iter()
                    .map(|learner| cluster_pb::Learner {
                        server: learner.server.clone(),
                        replaces: learner.replaces.clone().unwrap_or_default(),
                    })
                    .collect(),
                quarantined: replicas.quarantined.clone(),
            })
            .collect(),
    }
}

/// A committed record's partition roots (all empty for epoch 0), checked against `bits`.
pub fn partition_roots(
    bits: u8,
    record: &pb::EpochRecord,
) -> Result<Vec<Option<ktd_core::tree::NodeRef>>> {
    if record.partition_roots.is_empty() {
        return Ok(vec![None; 1 << bits]);
    }
    let decoded = EpochRecord::decode(record.epoch, &record.partition_roots)?;
    decoded.check_partitions(bits)?;
    Ok(decoded.partitions)
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

/// The committed per-user-partition leaf digests of `record` (empty for epoch 0 and records
/// committed before digests were recorded).
pub fn leaf_digests(bits: u8, record: &pb::EpochRecord) -> Result<Vec<[u8; 32]>> {
    if record.leaf_digests.is_empty() {
        return Ok(Vec::new());
    }
    let expected = (1usize << bits) * 32;
    if record.leaf_digests.len() != expected {
        return Err(Error::corrupt(format!(
            "epoch {}: {} bytes of leaf digests, expected {expected}",
            record.epoch,
            record.leaf_digests.len()
        )));
    }
    Ok(record
        .leaf_digests
        .chunks_exact(32)
        .map(|digest| digest.try_into().expect("chunks of 32"))
        .collect())
}

/// Checks a proposed commit of `epoch` before it is replicated: `partition_roots` must decode
/// to one root per partition of a `bits`-bit directory, carry `root_hash`, claim no leaf newer
/// than `epoch`, and stitch (with the directory's akd configuration `akd`) to `root_hash`.
///
/// The state machine runs this on every replica, so a commit that could not serve proofs is
/// never made permanent (an epoch has one root, ever).
pub fn check_commit(
    akd: &ktd_core::AkdConfig,
    bits: u8,
    epoch: u64,
    root_hash: &[u8],
    partition_roots: &[u8],
) -> Result<()> {
    let decoded = EpochRecord::decode(epoch, partition_roots)?;
    decoded.check_partitions(bits)?;
    if decoded.root_hash.as_slice() != root_hash {
        return Err(Error::corrupt(format!(
            "epoch {epoch}: the partition roots carry another root hash than the commit"
        )));
    }
    if let Some(newest) = decoded
        .partitions
        .iter()
        .flatten()
        .map(|root| root.max_epoch)
        .max()
        && newest > epoch
    {
        return Err(Error::corrupt(format!(
            "epoch {epoch}: a partition root claims a leaf of epoch {newest}"
        )));
    }
    akd.install()?;
    let stitched = ktd_core::with_configuration!(akd, TC => {
        TopTree::<TC>::new(bits, decoded.partitions)?.root_hash()
    });
    if stitched.as_slice() != root_hash {
        return Err(Error::corrupt(format!(
            "epoch {epoch}: the partition roots do not hash to the root hash"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_round_trip_and_first_release_maps_load_as_rf_1() {
        let map = ShardMap::even(
            2,
            2,
            vec![
                ("a".into(), "http://a".into()),
                ("b".into(), "http://b".into()),
                ("c".into(), "http://c".into()),
            ],
        )
        .expect("valid")
        .with_version(4);
        let encoded = shard_map_to_pb(&map);
        assert_eq!(shard_map_with_bits(2, &encoded).expect("decodes"), map);
        assert!(shard_map_with_bits(3, &encoded).is_err(), "bits must match");

        let legacy = cluster_pb::ShardMap {
            version: 2,
            shards: vec![
                cluster_pb::LegacyShard {
                    shard_id: "s1".into(),
                    address: "http://s1".into(),
                    partitions: vec![0, 1],
                },
                cluster_pb::LegacyShard {
                    shard_id: "s2".into(),
                    address: "http://s2".into(),
                    partitions: vec![2, 3],
                },
            ],
            ..cluster_pb::ShardMap::default()
        };
        let loaded = shard_map_with_bits(2, &legacy).expect("legacy map");
        assert_eq!(loaded.replication_factor(), 1);
        assert_eq!(loaded.replicas(3).voters, ["s2"]);
        assert_eq!(loaded.version(), 2);
    }
}
