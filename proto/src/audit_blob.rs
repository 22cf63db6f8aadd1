//! The name of an audit blob: `"{E}/{hex root of E-1}/{hex root of E}"`.
//!
//! An audit blob is the protobuf `SingleAppendOnlyProof` of the step `E-1 → E`. Its name is the
//! layout akd's WhatsApp auditor lists and fetches (`/{E}/{prev}/{cur}`), ktd serves
//! (`ListAuditBlobs`, `GetAuditBlob`), `ktd audit-blobs` writes to a directory and the auditor
//! reads from one: every one of them parses and prints names with [`AuditBlobName`].

use std::fmt;
use std::str::FromStr;

/// A parsed audit blob name. **Invariant:** `epoch ≥ 1` (epoch 0 has no predecessor).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AuditBlobName {
    /// The end epoch `E` of the step.
    pub epoch: u64,
    /// The root hash of `E - 1`.
    pub previous_root: [u8; 32],
    /// The root hash of `E`.
    pub root: [u8; 32],
}

/// Why a string is not an audit blob name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{name:?} is not an audit blob name (EPOCH/HEX ROOT/HEX ROOT, EPOCH >= 1)")]
pub struct BadAuditBlobName {
    /// The string that was given.
    pub name: String,
}

impl AuditBlobName {
    /// The name of the step `epoch - 1 → epoch`; `None` for epoch 0.
    pub fn new(epoch: u64, previous_root: [u8; 32], root: [u8; 32]) -> Option<Self> {
        (epoch >= 1).then_some(Self {
            epoch,
            previous_root,
            root,
        })
    }
}

impl fmt::Display for AuditBlobName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}",
            self.epoch,
            hex::encode(self.previous_root),
            hex::encode(self.root)
        )
    }
}

impl FromStr for AuditBlobName {
    type Err = BadAuditBlobName;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        let bad = || BadAuditBlobName {
            name: name.to_string(),
        };
        let mut parts = name.split('/');
        let (Some(epoch), Some(previous), Some(root), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let epoch: u64 = epoch.parse().map_err(|_| bad())?;
        let digest = |text: &str| -> Option<[u8; 32]> {
            hex::decode(text)
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
        };
        match (digest(previous), digest(root)) {
            (Some(previous_root), Some(root)) => {
                Self::new(epoch, previous_root, root).ok_or_else(bad)
            }
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_garbage_is_refused() {
        let name = AuditBlobName::new(7, [1; 32], [2; 32]).expect("epoch 7");
        let text = name.to_string();
        assert_eq!(text, format!("7/{}/{}", "01".repeat(32), "02".repeat(32)));
        assert_eq!(text.parse::<AuditBlobName>(), Ok(name));
        for bad in [
            "",
            "7",
            "7/ab/cd",
            &format!("0/{}/{}", "01".repeat(32), "02".repeat(32)),
            &format!("x/{}/{}", "01".repeat(32), "02".repeat(32)),
            &format!("7/{}/{}/", "01".repeat(32), "02".repeat(32)),
            &format!("7/{}/{}", "0g".repeat(32), "02".repeat(32)),
        ] {
            assert!(bad.parse::<AuditBlobName>().is_err(), "{bad:?}");
        }
    }
}
