//! Bit arithmetic on `NodeLabel`s: bits, common prefixes, prefixes and partitions.
//!
//! Bits are MSB-first (akd-spec §2.1): bit `i` is `(label_val[i / 8] >> (7 - i % 8)) & 1`, and
//! bit 0 picks the root's child. Canonical labels have every bit beyond `label_len` zero, which
//! is what lets `common_prefix_len` work on the padded 32-byte values. akd's own helpers walk
//! bit by bit; these compare eight bytes at a time because they sit on the insertion hot path.

use akd_core::{Direction, NodeLabel};

/// Bit length of a leaf label (a VRF output truncated to 32 bytes).
pub const LEAF_LEN: u32 = 256;

/// The label of the tree's root: length 0, all bits zero.
pub const ROOT: NodeLabel = NodeLabel {
    label_val: [0u8; 32],
    label_len: 0,
};

/// Returns bit `index` (0 or 1) of `label_val`. `index` must be below 256.
#[inline]
pub fn bit(label_val: &[u8; 32], index: u32) -> u8 {
    debug_assert!(index < LEAF_LEN);
    (label_val[(index / 8) as usize] >> (7 - index % 8)) & 1
}

/// Returns the direction of bit `index` of `label_val`.
#[inline]
pub fn direction(label_val: &[u8; 32], index: u32) -> Direction {
    if bit(label_val, index) == 0 {
        Direction::Left
    } else {
        Direction::Right
    }
}

/// Number of leading bits two 256-bit values have in common (256 if equal).
#[inline]
pub fn common_prefix_len(a: &[u8; 32], b: &[u8; 32]) -> u32 {
    for word in 0..4 {
        let range = word * 8..word * 8 + 8;
        let x = u64::from_be_bytes(a[range.clone()].try_into().expect("8-byte slice"));
        let y = u64::from_be_bytes(b[range].try_into().expect("8-byte slice"));
        let diff = x ^ y;
        if diff != 0 {
            return word as u32 * 64 + diff.leading_zeros();
        }
    }
    LEAF_LEN
}

/// The first `len` bits of `label`, zero-padded (akd's `get_prefix`, canonical by construction).
#[inline]
pub fn prefix(label: &NodeLabel, len: u32) -> NodeLabel {
    label.get_prefix(len)
}

/// Whether `p` is a strict prefix of `label` (shorter, and equal on `p`'s bits).
#[inline]
pub fn is_strict_prefix(p: &NodeLabel, label: &NodeLabel) -> bool {
    p.label_len < label.label_len
        && common_prefix_len(&p.label_val, &label.label_val) >= p.label_len
}

/// Largest supported number of partition bits `k` (a directory has `2^k` partitions). Every
/// check of `k` — cluster metadata, shard maps, shard servers, the in-process directory — uses
/// this one limit.
pub const MAX_PARTITION_BITS: u8 = 12;

/// The tree partition (top `bits` bits, as an integer) that a node label's `label_val` falls in.
/// `bits` ≤ [`MAX_PARTITION_BITS`].
#[inline]
pub fn partition_of(label_val: &[u8; 32], bits: u8) -> u32 {
    debug_assert!(bits <= MAX_PARTITION_BITS);
    if bits == 0 {
        return 0;
    }
    let top = u16::from_be_bytes([label_val[0], label_val[1]]);
    u32::from(top >> (16 - u32::from(bits)))
}

/// The user partition of `akd_label`: the top `bits` bits of `blake3(akd_label)` (DESIGN §3).
///
/// NOTE: "partition" is an overloaded term. A *tree* partition ([`partition_of`]) holds the
/// tree nodes under a node-label prefix; a *user* partition holds the versions of the users
/// whose hashed label has that prefix. A shard owning partition `p` owns both.
pub fn user_partition(akd_label: &[u8], bits: u8) -> u32 {
    partition_of(blake3::hash(akd_label).as_bytes(), bits)
}

/// The `bits`-bit label that every node of `partition` starts with.
pub fn partition_prefix(partition: u32, bits: u8) -> NodeLabel {
    let mut label_val = [0u8; 32];
    if bits > 0 {
        let top = (partition << (16 - u32::from(bits))) as u16;
        label_val[..2].copy_from_slice(&top.to_be_bytes());
    }
    NodeLabel::new(label_val, u32::from(bits))
}

/// Lowercase hex of a label's value bytes and its length, for error messages.
pub fn display(label: &NodeLabel) -> String {
    let mut out = String::with_capacity(70);
    for byte in label.label_val {
        out.push_str(&format!("{byte:02x}"));
    }
    out.push_str(&format!("/{}", label.label_len));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use akd_core::configuration::WhatsAppV1Configuration;

    fn label(bytes: &[u8], len: u32) -> NodeLabel {
        let mut val = [0u8; 32];
        val[..bytes.len()].copy_from_slice(bytes);
        NodeLabel::new(val, len)
    }

    #[test]
    fn common_prefix_agrees_with_akd() {
        let cases = [
            (label(&[0b1010_0000], 256), label(&[0b1011_0000], 256)),
            (label(&[0xff; 32], 256), label(&[0xff; 32], 256)),
            (
                label(&[0, 0, 0, 0, 0, 0, 0, 0, 1], 256),
                label(&[0; 9], 256),
            ),
            (label(&[0x80], 256), label(&[0x00], 256)),
        ];
        for (a, b) in cases {
            let akd = a.get_longest_common_prefix::<WhatsAppV1Configuration>(b);
            let ours = prefix(&a, common_prefix_len(&a.label_val, &b.label_val));
            assert_eq!(akd, ours);
        }
    }

    #[test]
    fn strict_prefix_matches_akd_is_prefix_of() {
        let p = label(&[0b1010_0000], 3);
        let l = label(&[0b1010_1111], 256);
        assert!(is_strict_prefix(&p, &l));
        assert!(p.is_prefix_of(&l));
        assert!(!is_strict_prefix(&l, &l));
        assert!(is_strict_prefix(&ROOT, &l));
        let q = label(&[0b1000_0000], 3);
        assert!(!is_strict_prefix(&q, &l));
        assert!(!q.is_prefix_of(&l));
    }

    #[test]
    fn partitions_round_trip() {
        for bits in [0u8, 1, 4, 8, 12, 16] {
            let n_partitions = 1u32 << bits;
            for partition in [0, n_partitions / 3, n_partitions - 1] {
                let p = partition_prefix(partition, bits);
                assert_eq!(partition_of(&p.label_val, bits), partition);
                let mut leaf = p.label_val;
                leaf[31] = 0xff;
                assert_eq!(partition_of(&leaf, bits), partition);
            }
        }
    }
}
