//! The epoch record: an epoch's root hash and every partition root as of the epoch, and its one
//! byte encoding.
//!
//! The same bytes are replicated through the sequencer's Raft log (`CommitEpoch`'s partition
//! roots) and stored by shards, so this encoding is part of the Raft log format: it is owned
//! here, not by any store, and changes only with a new format byte.
//!
//! `format(1) ‖ root hash(32) ‖ be32(n) ‖ n × (0 | 1 ‖ NodeRef)` (see [`crate::codec`]).

use crate::codec::{Reader, put_node_ref};
use crate::error::{Error, Result};
use crate::label::MAX_PARTITION_BITS;
use crate::tree::NodeRef;

/// Format byte of the encoding this version writes.
pub const FORMAT: u8 = 1;

/// A directory epoch: its root hash and every partition root as of the epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochRecord {
    /// The epoch.
    pub epoch: u64,
    /// Its published root hash.
    pub root_hash: [u8; 32],
    /// Partition roots (index = partition id); `None` for an empty partition.
    pub partitions: Vec<Option<NodeRef>>,
}

impl EpochRecord {
    /// The record's bytes (the epoch itself is not part of them: it is the key, or the log
    /// entry's epoch).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 32 + 4 + self.partitions.len() * 90);
        out.push(FORMAT);
        out.extend_from_slice(&self.root_hash);
        out.extend_from_slice(&(self.partitions.len() as u32).to_be_bytes());
        for partition in &self.partitions {
            match partition {
                None => out.push(0),
                Some(root) => {
                    out.push(1);
                    put_node_ref(&mut out, root);
                }
            }
        }
        out
    }

    /// Decodes the record of `epoch`; malformed bytes are [`Error::Corrupt`].
    pub fn decode(epoch: u64, bytes: &[u8]) -> Result<Self> {
        let mut reader = Reader::new(bytes, "epoch record");
        reader.format(FORMAT)?;
        let root_hash = reader.array::<32>()?;
        let n_partitions = reader.u32()? as usize;
        if n_partitions > 1 << MAX_PARTITION_BITS {
            return Err(reader.corrupt("too many partitions"));
        }
        let mut partitions = Vec::with_capacity(n_partitions);
        for _ in 0..n_partitions {
            partitions.push(match reader.u8()? {
                0 => None,
                1 => Some(reader.node_ref()?),
                _ => return Err(reader.corrupt("bad partition presence byte")),
            });
        }
        reader.finish()?;
        Ok(Self {
            epoch,
            root_hash,
            partitions,
        })
    }

    /// Fails unless the record has one root per partition of a `bits`-bit directory.
    pub fn check_partitions(&self, bits: u8) -> Result<()> {
        let expected = 1usize << bits;
        if self.partitions.len() != expected {
            return Err(Error::Corrupt(format!(
                "epoch {}: {} partition roots, the directory has {expected} partitions",
                self.epoch,
                self.partitions.len()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use akd_core::{AzksValue, NodeLabel};

    use super::*;

    fn node_ref(len: u32, byte: u8, epochs: (u64, u64)) -> NodeRef {
        NodeRef {
            label: NodeLabel::new([byte; 32], 256).get_prefix(len),
            hash: AzksValue([byte ^ 0x5a; 32]),
            min_epoch: epochs.0,
            max_epoch: epochs.1,
        }
    }

    #[test]
    fn epoch_record_round_trips_and_rejects_every_truncation() {
        let record = EpochRecord {
            epoch: 7,
            root_hash: [3; 32],
            partitions: vec![None, Some(node_ref(40, 0x81, (2, 7))), None],
        };
        let bytes = record.encode();
        assert_eq!(EpochRecord::decode(7, &bytes).expect("round trip"), record);
        for cut in 0..bytes.len() {
            assert!(
                EpochRecord::decode(7, &bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(EpochRecord::decode(7, &trailing).is_err());
        assert!(record.check_partitions(2).is_err());
    }

    #[test]
    fn epoch_record_bytes_are_format_1() {
        // The Raft log holds these bytes: a change here is a log format change.
        let record = EpochRecord {
            epoch: 1,
            root_hash: [0xab; 32],
            partitions: vec![None, Some(node_ref(8, 0x80, (1, 1)))],
        };
        let bytes = record.encode();
        let mut expected = vec![1];
        expected.extend_from_slice(&[0xab; 32]);
        expected.extend_from_slice(&2u32.to_be_bytes());
        expected.push(0);
        expected.push(1);
        expected.extend_from_slice(&8u16.to_be_bytes());
        expected.push(0x80);
        expected.extend_from_slice(&[0x80 ^ 0x5a; 32]);
        expected.extend_from_slice(&1u64.to_be_bytes());
        expected.extend_from_slice(&1u64.to_be_bytes());
        assert_eq!(bytes, expected);
    }
}
