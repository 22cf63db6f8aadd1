//! A directory of audit blobs in the layout auditors read: one file per step, at
//! `DIR/{E}/{hex root of E-1}/{hex root of E}` ([`AuditBlobName`](ktd_proto::audit_blob::AuditBlobName)), holding the protobuf
//! `SingleAppendOnlyProof` exactly as served.
//!
//! `ktd audit-blobs --to DIR` writes verified blobs here (through `object_store`, staged as
//! `{name}#{n}` and linked into place) and prunes old epochs; `ktd auditor` (with `--blob-dir`)
//! reads them back in epoch order. Staging files and dot-files are skipped, so a reader never
//! sees half a blob.

use std::io;
use std::path::{Path, PathBuf};

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

/// A file a writer has not finished: a dot-file, or an `object_store` staging file
/// (`{name}#{digits}`).
fn is_partial(file_name: &str) -> bool {
    file_name.starts_with('.')
        || file_name.split_once('#').is_some_and(|(_, suffix)| {
            !suffix.is_empty() && suffix.bytes().all(|byte| byte.is_ascii_digit())
        })
}

impl BlobDir {
    /// The blob directory at `root`.
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
                    if is_partial(&root) {
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
    use ktd_proto::audit_blob::AuditBlobName;

    fn store(dir: &Path, epoch: u64, fill: u8) -> String {
        let name = AuditBlobName::new(epoch, [fill; 32], [fill + 1; 32])
            .expect("epoch ≥ 1")
            .to_string();
        let path = dir.join(&name);
        std::fs::create_dir_all(path.parent().expect("nested")).expect("dirs");
        std::fs::write(&path, vec![fill; 3]).expect("write");
        name
    }

    #[test]
    fn stored_blobs_read_back_in_epoch_order_without_partial_files() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path().join("blobs");
        let blobs = BlobDir::new(&dir);
        assert_eq!(blobs.newest_epoch(), None);
        let mut names = Vec::new();
        for epoch in [3, 1, 2] {
            names.push(store(&dir, epoch, epoch as u8));
        }
        // A writer killed mid-put leaves a staging file; a foreign directory is not an epoch.
        std::fs::write(dir.join(format!("{}#12", names[0])), b"ha").expect("staging");
        let dot_file = dir.join(&names[0]).with_file_name(".partial");
        std::fs::write(dot_file, b"").expect("dot-file");
        std::fs::create_dir_all(dir.join("notes")).expect("a foreign directory");
        assert_eq!(blobs.newest_epoch(), Some(3));
        let (read, highest) = blobs.read_from(2, 16).expect("read");
        assert_eq!(highest, 3);
        assert_eq!(
            read.iter().map(|blob| blob.epoch).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert_eq!(read[0].name, names[2]);
        assert_eq!(read[0].bytes, vec![2; 3]);
        assert_eq!(read[1].name, names[0], "no staging file read as a blob");
        assert!(is_partial("ab#3") && is_partial(".partial"));
        assert!(!is_partial("ab") && !is_partial("ab#x"));
    }
}
