//! Byte encodings of the store's keys and records (format version 1).
//!
//! Built from the core's primitives ([`ktd_core::codec`]): fixed-width big-endian integers,
//! labels as `be16(len) ‖ ceil(len/8) bytes`. Node keys are `be64(version) ‖ label bytes ‖
//! be16(len)`: epoch-major, so each epoch's writes form one contiguous, increasing key range
//! (RocksDB then moves them down the LSM without rewriting them, and an unfinished epoch is one
//! range delete). Every record starts with a format byte so a future format can coexist.
//! Decoding never panics: malformed bytes are [`ktd_core::Error::Corrupt`].

use akd_core::{AkdLabel, AkdValue, NodeLabel};
use ktd_core::codec::{Reader, label_bytes, put_label, put_node_ref};
use ktd_core::error::Result;
use ktd_core::proof::{ProvenLabel, StoredLookupProofs};
use ktd_core::tree::{InteriorNode, NodeKey};
use ktd_core::user::UserVersion;

/// Format byte of every record written by this version.
pub const FORMAT: u8 = 1;

/// Length of a user key's hash part.
pub const USER_HASH_LEN: usize = 32;

/// Key of a node version.
pub fn node_key(key: &NodeKey) -> Vec<u8> {
    let bytes = label_bytes(&key.label);
    let mut out = Vec::with_capacity(8 + bytes.len() + 2);
    out.extend_from_slice(&key.version.to_be_bytes());
    out.extend_from_slice(bytes);
    out.extend_from_slice(&(key.label.label_len as u16).to_be_bytes());
    out
}

/// Decodes a node version's key ([`node_key`]).
pub fn decode_node_key(bytes: &[u8]) -> Result<NodeKey> {
    let corrupt = || ktd_core::Error::Corrupt("malformed tree node key".into());
    let (version, rest) = bytes.split_first_chunk::<8>().ok_or_else(corrupt)?;
    let (label, len) = rest.split_last_chunk::<2>().ok_or_else(corrupt)?;
    let len = u16::from_be_bytes(*len);
    if usize::from(len).div_ceil(8) != label.len() || len > 256 {
        return Err(corrupt());
    }
    let mut label_val = [0u8; 32];
    label_val[..label.len()].copy_from_slice(label);
    Ok(NodeKey {
        label: NodeLabel::new(label_val, u32::from(len)),
        version: u64::from_be_bytes(*version),
    })
}

/// First node key of `epoch` (inclusive range start for deleting an epoch's node versions).
pub fn node_epoch_start(epoch: u64) -> Vec<u8> {
    epoch.to_be_bytes().to_vec()
}

/// Encodes an interior node record.
pub fn encode_node(node: &InteriorNode) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 2 * (2 + 32 + 32 + 16));
    out.push(FORMAT);
    for child in &node.children {
        put_node_ref(&mut out, child);
    }
    out
}

/// Decodes an interior node record.
pub fn decode_node(bytes: &[u8]) -> Result<InteriorNode> {
    let mut reader = Reader::new(bytes, "tree node");
    reader.format(FORMAT)?;
    let left = reader.node_ref()?;
    let right = reader.node_ref()?;
    reader.finish()?;
    Ok(InteriorNode {
        children: [left, right],
    })
}

/// Key prefix of all versions of one user: `blake3(akd_label)`.
pub fn user_prefix(akd_label: &[u8]) -> [u8; USER_HASH_LEN] {
    *blake3::hash(akd_label).as_bytes()
}

/// Key of one user version.
pub fn user_key(akd_label: &[u8], version: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(USER_HASH_LEN + 8);
    out.extend_from_slice(&user_prefix(akd_label));
    out.extend_from_slice(&version.to_be_bytes());
    out
}

/// Encodes one user version (the raw label is kept to rule out hash collisions).
pub fn encode_user(akd_label: &[u8], version: &UserVersion) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 8 + 8 + 34 + 4 + akd_label.len() + version.value.len());
    out.push(FORMAT);
    out.extend_from_slice(&version.version.to_be_bytes());
    out.extend_from_slice(&version.epoch.to_be_bytes());
    put_label(&mut out, &version.fresh_label);
    out.extend_from_slice(&(akd_label.len() as u32).to_be_bytes());
    out.extend_from_slice(akd_label);
    out.extend_from_slice(&version.value);
    out
}

/// Decodes one user version, checking that it belongs to `akd_label`.
pub fn decode_user(akd_label: &[u8], bytes: &[u8]) -> Result<UserVersion> {
    let mut reader = Reader::new(bytes, "user version");
    reader.format(FORMAT)?;
    let version = reader.u64()?;
    if version == 0 {
        // akd versions start at 1; a 0 would underflow the lookup marker (2^⌊log2 n⌋).
        return Err(reader.corrupt("user version 0"));
    }
    let epoch = reader.u64()?;
    let fresh_label = reader.label()?;
    let label_len = reader.u32()? as usize;
    let stored_label = reader.take(label_len)?;
    if stored_label != akd_label {
        return Err(
            reader.corrupt("user record belongs to another label (hash collision or corruption)")
        );
    }
    let value = reader.rest().to_vec();
    Ok(UserVersion {
        version,
        epoch,
        value: AkdValue(value),
        fresh_label,
    })
}

/// The epoch of a stored user version, read without decoding the rest (bootstrap copies filter
/// on it).
pub fn user_record_epoch(bytes: &[u8]) -> Result<u64> {
    bytes
        .get(9..17)
        .and_then(|epoch| <[u8; 8]>::try_from(epoch).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| ktd_core::Error::Corrupt("malformed user version: truncated".into()))
}

/// The label and version number of a stored user version, without the value (the lookup-proof
/// backfill walks every version).
pub fn user_record_label_and_version(bytes: &[u8]) -> Result<(AkdLabel, u64)> {
    let mut reader = Reader::new(bytes, "user version");
    reader.format(FORMAT)?;
    let version = reader.u64()?;
    let _epoch = reader.u64()?;
    let _fresh_label = reader.label()?;
    let label_len = reader.u32()? as usize;
    Ok((AkdLabel(reader.take(label_len)?.to_vec()), version))
}

/// Rebuilds the `AkdLabel` type for callers holding raw bytes.
pub fn akd_label(bytes: &[u8]) -> AkdLabel {
    AkdLabel(bytes.to_vec())
}

/// Length of a VRF proof.
const VRF_PROOF_LEN: usize = 80;

/// Flag bit of a lookup-proofs record: the marker's label and proof follow.
const MARKER_INLINE: u8 = 1;

/// Encodes the stored lookup proofs of one user version (keyed like the version,
/// [`user_key`]): `FORMAT ‖ flags ‖ existence proof ‖ StaleLabel(n) ‖ its proof ‖ [marker
/// label ‖ its proof]`, 196 bytes, 310 with the marker. `None` if a proof is not 80 bytes
/// (never the case for [`StoredLookupProofs::compute`]'s).
pub fn encode_lookup_proofs(proofs: &StoredLookupProofs) -> Option<Vec<u8>> {
    let proven = std::iter::once(&proofs.existence_proof)
        .chain(std::iter::once(&proofs.freshness.vrf_proof))
        .chain(proofs.marker.as_ref().map(|marker| &marker.vrf_proof));
    for proof in proven {
        if proof.len() != VRF_PROOF_LEN {
            return None;
        }
    }
    let mut out = Vec::with_capacity(2 + 2 * (VRF_PROOF_LEN + 34) + VRF_PROOF_LEN);
    out.push(FORMAT);
    out.push(if proofs.marker.is_some() {
        MARKER_INLINE
    } else {
        0
    });
    out.extend_from_slice(&proofs.existence_proof);
    put_label(&mut out, &proofs.freshness.label);
    out.extend_from_slice(&proofs.freshness.vrf_proof);
    if let Some(marker) = &proofs.marker {
        put_label(&mut out, &marker.label);
        out.extend_from_slice(&marker.vrf_proof);
    }
    Some(out)
}

/// Decodes [`encode_lookup_proofs`]'s bytes, checking the format, the flags and the exact
/// length, and that the marker is inline exactly when `version` is not a power of two.
pub fn decode_lookup_proofs(version: u64, bytes: &[u8]) -> Result<StoredLookupProofs> {
    let mut reader = Reader::new(bytes, "lookup proofs");
    reader.format(FORMAT)?;
    let flags = reader.u8()?;
    if flags & !MARKER_INLINE != 0 {
        return Err(reader.corrupt("unknown flags"));
    }
    let inline = flags & MARKER_INLINE != 0;
    if inline == version.is_power_of_two() {
        return Err(
            reader.corrupt("the marker is inline exactly when the version is not a power of two")
        );
    }
    let existence_proof = reader.take(VRF_PROOF_LEN)?.to_vec();
    let proven = |reader: &mut Reader<'_>| -> Result<ProvenLabel> {
        let label = reader.label()?;
        let vrf_proof = reader.take(VRF_PROOF_LEN)?.to_vec();
        Ok(ProvenLabel { label, vrf_proof })
    };
    let freshness = proven(&mut reader)?;
    let marker = if inline {
        Some(proven(&mut reader)?)
    } else {
        None
    };
    reader.finish()?;
    Ok(StoredLookupProofs {
        existence_proof,
        freshness,
        marker,
    })
}

#[cfg(test)]
mod tests {
    use akd_core::{AzksValue, NodeLabel};
    use ktd_core::tree::NodeRef;

    use super::*;

    fn node_ref(len: u32, byte: u8, epochs: (u64, u64)) -> NodeRef {
        let mut label_val = [byte; 32];
        let label = NodeLabel::new(label_val, 256).get_prefix(len);
        label_val = label.label_val;
        NodeRef {
            label: NodeLabel::new(label_val, len),
            hash: AzksValue([byte ^ 0x5a; 32]),
            min_epoch: epochs.0,
            max_epoch: epochs.1,
        }
    }

    #[test]
    fn node_round_trip_and_rejects_garbage() {
        let node = InteriorNode {
            children: [node_ref(13, 0x0f, (1, 9)), node_ref(256, 0xf0, (4, 4))],
        };
        let bytes = encode_node(&node);
        assert_eq!(decode_node(&bytes).expect("round trip"), node);
        for cut in 0..bytes.len() {
            assert!(
                decode_node(&bytes[..cut]).is_err(),
                "truncated at {cut} must fail"
            );
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(decode_node(&extra).is_err());
        let mut bad_format = bytes;
        bad_format[0] = 9;
        assert!(decode_node(&bad_format).is_err());
    }

    #[test]
    fn node_key_round_trip_and_rejects_garbage() {
        for len in [0, 1, 13, 200, 256] {
            let key = NodeKey {
                label: node_ref(len, 0xa5, (0, 0)).label,
                version: 77,
            };
            let bytes = node_key(&key);
            assert_eq!(
                decode_node_key(&bytes).expect("round trip"),
                key,
                "len {len}"
            );
            assert!(decode_node_key(&bytes[..bytes.len() - 1]).is_err());
        }
        assert!(decode_node_key(&[0; 9]).is_err());
        let mut long = vec![0u8; 8];
        long.extend_from_slice(&[0; 33]);
        long.extend_from_slice(&264u16.to_be_bytes());
        assert!(decode_node_key(&long).is_err(), "longer than 256 bits");
    }

    #[test]
    fn user_round_trip() {
        let version = UserVersion {
            version: 3,
            epoch: 11,
            value: AkdValue(b"key material".to_vec()),
            fresh_label: node_ref(256, 0x42, (0, 0)).label,
        };
        let bytes = encode_user(b"alice", &version);
        assert_eq!(decode_user(b"alice", &bytes).expect("round trip"), version);
        assert_eq!(
            user_record_label_and_version(&bytes).expect("label and version"),
            (AkdLabel::from("alice"), 3)
        );
        assert!(user_record_label_and_version(&bytes[..20]).is_err());
        assert!(decode_user(b"bob", &bytes).is_err());
    }

    #[test]
    fn lookup_proofs_round_trip_and_reject_garbage() {
        let proven = |byte: u8| ProvenLabel {
            label: node_ref(256, byte, (0, 0)).label,
            vrf_proof: vec![byte; 80],
        };
        for (version, marker) in [(4, None), (6, Some(proven(3)))] {
            let proofs = StoredLookupProofs {
                existence_proof: vec![1; 80],
                freshness: proven(2),
                marker,
            };
            let bytes = encode_lookup_proofs(&proofs).expect("80-byte proofs");
            assert_eq!(bytes.len(), if version == 4 { 196 } else { 310 });
            assert_eq!(
                decode_lookup_proofs(version, &bytes).expect("round trip"),
                proofs
            );
            // The marker must be inline exactly when the version is not a power of two.
            assert!(decode_lookup_proofs(version ^ 2, &bytes).is_err());
            for cut in 0..bytes.len() {
                assert!(decode_lookup_proofs(version, &bytes[..cut]).is_err());
            }
            let mut extra = bytes.clone();
            extra.push(0);
            assert!(decode_lookup_proofs(version, &extra).is_err());
            let mut flags = bytes.clone();
            flags[1] |= 0x80;
            assert!(decode_lookup_proofs(version, &flags).is_err());
        }
        let short = StoredLookupProofs {
            existence_proof: vec![1; 79],
            freshness: proven(2),
            marker: None,
        };
        assert!(encode_lookup_proofs(&short).is_none());
    }

    #[test]
    fn node_keys_order_by_epoch_first() {
        let early = NodeKey {
            label: node_ref(256, 0xff, (0, 0)).label,
            version: 1,
        };
        let late = NodeKey {
            label: node_ref(1, 0x00, (0, 0)).label,
            version: 2,
        };
        assert!(node_key(&early) < node_key(&late));
        assert!(node_key(&late) >= node_epoch_start(2));
        assert!(node_key(&early) < node_epoch_start(2));
    }
}
