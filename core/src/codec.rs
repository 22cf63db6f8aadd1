//! Byte-level primitives shared by every fixed-layout record ktd stores or replicates: labels,
//! [`NodeRef`]s and a bounds-checked [`Reader`].
//!
//! Fixed-width big-endian integers; labels as `be16(len) ‖ ceil(len/8) bytes` (canonical labels
//! are zero beyond `len`, so nothing is lost). Decoding never panics: malformed bytes are
//! [`Error::Corrupt`]. The record formats built from these live with their owners: the epoch
//! record in [`crate::epoch_record`], tree nodes and user versions in the shard's store.

use akd_core::{AzksValue, NodeLabel};

use crate::error::{Error, Result};
use crate::tree::NodeRef;

/// The bytes of a label's value that its length covers.
pub fn label_bytes(label: &NodeLabel) -> &[u8] {
    &label.label_val[..(label.label_len as usize).div_ceil(8)]
}

/// Appends `be16(len) ‖ label bytes`.
pub fn put_label(out: &mut Vec<u8>, label: &NodeLabel) {
    out.extend_from_slice(&(label.label_len as u16).to_be_bytes());
    out.extend_from_slice(label_bytes(label));
}

/// Appends a [`NodeRef`]: label, hash, min and max leaf epoch.
pub fn put_node_ref(out: &mut Vec<u8>, node_ref: &NodeRef) {
    put_label(out, &node_ref.label);
    out.extend_from_slice(&node_ref.hash.0);
    out.extend_from_slice(&node_ref.min_epoch.to_be_bytes());
    out.extend_from_slice(&node_ref.max_epoch.to_be_bytes());
}

/// A cursor over one record's bytes: every read is bounds-checked and fails with
/// [`Error::Corrupt`] naming the record, never panics.
pub struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// Reads `bytes`, a record called `what` in error messages.
    pub fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Self { bytes, what }
    }

    /// A [`Error::Corrupt`] naming the record and `why`.
    pub fn corrupt(&self, why: &str) -> Error {
        Error::Corrupt(format!("malformed {}: {why}", self.what))
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.bytes.len() < n {
            return Err(self.corrupt("truncated"));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }

    /// A big-endian `u32`.
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// A big-endian `u64`.
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// The leading format byte, which must be `format`.
    pub fn format(&mut self, format: u8) -> Result<()> {
        match self.u8()? {
            found if found == format => Ok(()),
            other => Err(self.corrupt(&format!("unknown format {other}"))),
        }
    }

    /// How many bytes are left.
    pub fn remaining(&self) -> usize {
        self.bytes.len()
    }

    /// A label written by [`put_label`] (canonical: no bits beyond its length).
    pub fn label(&mut self) -> Result<NodeLabel> {
        let len = u16::from_be_bytes(self.array()?) as u32;
        if len > 256 {
            return Err(self.corrupt("label longer than 256 bits"));
        }
        let bytes = self.take((len as usize).div_ceil(8))?;
        let mut label_val = [0u8; 32];
        label_val[..bytes.len()].copy_from_slice(bytes);
        let label = NodeLabel::new(label_val, len);
        if label.get_prefix(len) != label {
            return Err(self.corrupt("label has bits set beyond its length"));
        }
        Ok(label)
    }

    /// A [`NodeRef`] written by [`put_node_ref`].
    pub fn node_ref(&mut self) -> Result<NodeRef> {
        let label = self.label()?;
        let hash = AzksValue(self.array()?);
        let min_epoch = self.u64()?;
        let max_epoch = self.u64()?;
        if min_epoch > max_epoch {
            return Err(self.corrupt("min epoch above max epoch"));
        }
        Ok(NodeRef {
            label,
            hash,
            min_epoch,
            max_epoch,
        })
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    /// Fails unless every byte was read.
    pub fn finish(&self) -> Result<()> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(self.corrupt("trailing bytes"))
        }
    }
}
