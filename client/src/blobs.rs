//! A directory of audit blobs in the layout auditors read: one file per step, at
//! `DIR/{E}/{hex root of E-1}/{hex root of E}` ([`AuditBlobName`]), holding the protobuf
//! `SingleAppendOnlyProof` exactly as served.
//!
//! `ktd audit-blobs` stores verified blobs here and prunes old epochs; `ktd auditor` (with
//! `--blob-dir`) reads them back in epoch order. Files are written to a temporary name and
//! renamed, so a reader never sees half a blob.

use std::io;
use std::path::{Path, PathBuf};

use ktd_proto::audit_blob::AuditBlobName;

use crate::client::VerifiedBlob;

/// An audit blob read from a [`BlobDir`]: its name as found on disk, and its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredBlob {
    /// `E/{hex root E-1}/{hex root E}` (not parsed: the reader judges malformed names).
    pub name: String,
    /// The end epoch `E` (the first path component).
    pub epoch: u64,
    /// The protobuf bytes.
    pub bytes: Vec<u8>,
}

/// A directory of audit blobs.
#[derive(Clone, Debug)]
pub struct BlobDir {
    root: PathBuf,
}

fn with_path(path: &Path, what: &str) -> impl FnOnce(io::Error) -> io::Error {
    let context = format!("{what} {}", path.display());
    move |error| io::Error::new(error.kind(), format!("{context}: {error}"))
}

impl BlobDir {
    /// The blob directory at `root` (created on the first [`BlobDir::store`]).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Epoch directories present (names that are epoch numbers), unsorted.
    fn epochs(&self) -> io::Result<Vec<u64>> {
        Ok(std::fs::read_dir(&self.root)
            .map_err(with_path(&self.root, "read"))?
            .filter_map(|entry| {
                let entry = entry.ok()?;
                entry.file_type().ok()?.is_dir().then_some(())?;
                entry.file_name().to_str()?.parse().ok()
            })
            .collect())
    }

    /// The newest end epoch stored (`None` if the directory is missing or holds none).
    pub fn newest_epoch(&self) -> Option<u64> {
        self.epochs().ok()?.into_iter().max()
    }

    /// Stores a verified blob under its name (write, sync, rename).
    pub fn store(&self, blob: &VerifiedBlob) -> io::Result<PathBuf> {
        let name: AuditBlobName = blob
            .name
            .parse()
            .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, format!("{error}")))?;
        let path = self.root.join(name.to_string());
        let parent = path
            .parent()
            .ok_or_else(|| io::Error::other("a blob path has a parent"))?;
        std::fs::create_dir_all(parent).map_err(with_path(parent, "create"))?;
        let partial = parent.join(".partial");
        std::fs::write(&partial, &blob.bytes).map_err(with_path(&partial, "write"))?;
        std::fs::rename(&partial, &path).map_err(with_path(&path, "rename to"))?;
        Ok(path)
    }

    /// Deletes the epoch directories of all but the newest `keep` epochs (only directories
    /// named by an epoch number; anything else is left alone). Returns the epochs deleted.
    pub fn prune(&self, keep: u64) -> io::Result<Vec<u64>> {
        let mut epochs = self.epochs()?;
        epochs.sort_unstable();
        let excess = epochs
            .len()
            .saturating_sub(usize::try_from(keep).unwrap_or(usize::MAX));
        let pruned = epochs[..excess].to_vec();
        for epoch in &pruned {
            let dir = self.root.join(epoch.to_string());
            std::fs::remove_dir_all(&dir).map_err(with_path(&dir, "remove"))?;
        }
        Ok(pruned)
    }

    /// Blobs of end epochs `next..` (at most `limit` epochs), in epoch order, and the highest
    /// epoch present. Epochs are listed as found: a gap or a second root for one epoch is the
    /// reader's to judge.
    pub fn read_from(&self, next: u64, limit: usize) -> io::Result<(Vec<StoredBlob>, u64)> {
        let mut epochs: Vec<u64> = self
            .epochs()?
            .into_iter()
            .filter(|epoch| *epoch >= next)
            .collect();
        epochs.sort_unstable();
        let highest = epochs.last().copied().unwrap_or(0);
        let mut blobs = Vec::new();
        for epoch in epochs.into_iter().take(limit) {
            let epoch_dir = self.root.join(epoch.to_string());
            for previous in std::fs::read_dir(&epoch_dir).map_err(with_path(&epoch_dir, "read"))? {
                let previous = previous?;
                for root in std::fs::read_dir(previous.path())? {
                    let root = root?;
                    let (Some(previous), Some(root)) = (
                        previous.file_name().to_str().map(String::from),
                        root.file_name().to_str().map(String::from),
                    ) else {
                        continue;
                    };
                    if root.starts_with('.') {
                        continue;
                    }
                    let name = format!("{epoch}/{previous}/{root}");
                    let path = self.root.join(&name);
                    let bytes = std::fs::read(&path).map_err(with_path(&path, "read"))?;
                    blobs.push(StoredBlob { name, epoch, bytes });
                }
            }
        }
        Ok((blobs, highest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(epoch: u64, fill: u8) -> VerifiedBlob {
        VerifiedBlob {
            name: AuditBlobName::new(epoch, [fill; 32], [fill + 1; 32])
                .expect("epoch ≥ 1")
                .to_string(),
            epoch,
            bytes: vec![fill; 3],
        }
    }

    #[test]
    fn stored_blobs_read_back_in_epoch_order_and_prune_keeps_the_newest() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path().join("blobs");
        let blobs = BlobDir::new(&dir);
        assert_eq!(blobs.newest_epoch(), None);
        for epoch in [3, 1, 2] {
            blobs.store(&blob(epoch, epoch as u8)).expect("store");
        }
        std::fs::create_dir_all(dir.join("notes")).expect("a foreign directory");
        assert_eq!(blobs.newest_epoch(), Some(3));
        let (read, highest) = blobs.read_from(2, 16).expect("read");
        assert_eq!(highest, 3);
        assert_eq!(
            read.iter().map(|blob| blob.epoch).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert_eq!(read[0].name, blob(2, 2).name);
        assert_eq!(read[0].bytes, vec![2; 3]);
        assert_eq!(blobs.prune(1).expect("prune"), vec![1, 2]);
        assert_eq!(blobs.read_from(0, 16).expect("read").0.len(), 1);
        assert!(
            dir.join("notes").exists(),
            "foreign directories are left alone"
        );
    }
}
