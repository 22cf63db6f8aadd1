//! Audit blobs written to object storage: `ktd audit-blobs --to TARGET`.
//!
//! TARGET is a local directory (a path or `file:///…`), or a bucket: `s3://bucket[/prefix]`,
//! `gs://bucket[/prefix]`, `az://container[/prefix]`, with credentials and endpoints from the
//! usual environment (`AWS_*`, `GOOGLE_*`, `AZURE_*`; the `object_store` crate's builders). Each
//! blob is one object at `{prefix/}{E}/{hex root E-1}/{hex root E}` ([`AuditBlobName`]), holding
//! the protobuf `SingleAppendOnlyProof` exactly as served — the layout akd's WhatsApp auditor
//! lists and Plexi's `log_directory` points at. (Those tools list from the bucket's root: keep
//! the blobs at the root of a bucket or behind a CDN origin path if they read it directly.)
//!
//! # Invariants
//! - **Create-once.** A blob is written with `PutMode::Create` (an `If-None-Match: *` put on S3,
//!   a hard link on a local disk; a store without it falls back to look-then-write). A put that
//!   finds its key taken compares bytes: equal is success (a retried or resumed upload), different
//!   is [`BlobStoreError::Conflict`] and nothing is overwritten.
//! - **Atomic objects.** A put is all or nothing (S3/GCS/Azure single-request puts; local files are
//!   staged as `{name}#{n}` and linked into place, and listings skip staging files), so a kill at any
//!   point leaves whole blobs and at most a staging file.
//! - **Resumable.** A run starts from the store's own listing ([`Inventory`]): epochs already there
//!   are skipped, so rerunning after a kill uploads exactly what is missing.
//! - **One history.** An epoch already in the store under a different name (other roots) is a
//!   history the directory no longer serves — a restore to an earlier epoch, or a fork — and
//!   stops the upload with [`BlobStoreError::HistoryDiffers`]; the operator decides.
//! - Keys that are not blob names are never read, changed or deleted.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::TryStreamExt;
use ktd_proto::audit_blob::AuditBlobName;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutPayload};

/// What can go wrong writing blobs.
#[derive(Debug, thiserror::Error)]
pub enum BlobStoreError {
    /// The target is not a directory or a supported URL.
    #[error("blob target {target:?}: {reason}")]
    Target {
        /// As given.
        target: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// The object store failed (network, permissions, disk).
    #[error("object store {target}: {source}")]
    Store {
        /// The target, for the message.
        target: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },
    /// The key is taken by different bytes.
    #[error(
        "{target}: {key} already holds a different blob ({existing} bytes, ours {ours}); \
         nothing was overwritten — inspect it (a torn copy from another tool?) and delete it to retry"
    )]
    Conflict {
        /// The target, for the message.
        target: String,
        /// The object's key.
        key: String,
        /// Bytes of the object found.
        existing: usize,
        /// Bytes of the blob we verified.
        ours: usize,
    },
    /// The store holds another history for this epoch.
    #[error(
        "{target}: epoch {epoch} is stored as {stored} but the directory serves {served}: the \
         store holds a history the directory no longer serves (a restore to an earlier epoch, or \
         a fork); refusing to mix them — keep the old blobs elsewhere and start a new prefix"
    )]
    HistoryDiffers {
        /// The target, for the message.
        target: String,
        /// The end epoch.
        epoch: u64,
        /// Names in the store.
        stored: String,
        /// The name the directory serves.
        served: String,
    },
    /// A blob handed to [`BlobStore::put`] is not named as a blob.
    #[error("{0:?} is not an audit blob name")]
    BadName(String),
}

/// How a put ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Put {
    /// Written now.
    Created,
    /// The same bytes were already there (a resumed or repeated upload).
    AlreadyThere,
}

/// The blobs a store holds, by end epoch (several names for one epoch are a fork someone
/// wrote; they are listed, never chosen between).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inventory {
    /// End epoch → blob names stored for it.
    pub epochs: BTreeMap<u64, Vec<String>>,
    /// Keys under the prefix that are not blob names (left alone).
    pub foreign: u64,
}

impl Inventory {
    /// Records a stored blob.
    pub fn insert(&mut self, epoch: u64, name: String) {
        let names = self.epochs.entry(epoch).or_default();
        if !names.contains(&name) {
            names.push(name);
        }
    }
}

/// The first end epoch to upload: `--from` if given, else the oldest stored epoch (so gaps left
/// by an interrupted or out-of-order writer are filled), else 1; never below what `--keep` would
/// prune at once (`latest - keep + 1`).
pub fn first_epoch(stored: &Inventory, from: Option<u64>, latest: u64, keep: Option<u64>) -> u64 {
    let start = from.unwrap_or_else(|| stored.epochs.keys().next().copied().unwrap_or(1));
    let floor = keep.map_or(1, |keep| latest.saturating_sub(keep) + 1);
    start.max(floor).max(1)
}

/// The epochs `--keep N` removes: all but the newest `keep` stored.
pub fn epochs_to_prune(stored: &Inventory, keep: u64) -> Vec<u64> {
    let excess = stored
        .epochs
        .len()
        .saturating_sub(usize::try_from(keep).unwrap_or(usize::MAX));
    stored.epochs.keys().take(excess).copied().collect()
}

/// An object store holding audit blobs.
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    target: String,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore")
            .field("target", &self.target)
            .finish()
    }
}

fn target_error(target: &str, reason: impl std::fmt::Display) -> BlobStoreError {
    BlobStoreError::Target {
        target: target.to_string(),
        reason: reason.to_string(),
    }
}

impl BlobStore {
    /// Opens TARGET (see the module docs). A local directory is created if missing and written
    /// with fsync (file and directories) before a put returns.
    pub fn open(target: &str) -> Result<Self, BlobStoreError> {
        let (scheme, rest) = match target.split_once("://") {
            Some((scheme, rest)) => (scheme.to_ascii_lowercase(), rest),
            None => ("file".to_string(), target),
        };
        if scheme == "file" {
            return Self::local(target, std::path::Path::new(rest));
        }
        let (bucket, path) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(target_error(target, "no bucket or container"));
        }
        let prefix = ObjectPath::parse(path.trim_matches('/'))
            .map_err(|error| target_error(target, error))?;
        let store: Arc<dyn ObjectStore> = match scheme.as_str() {
            #[cfg(feature = "cloud-storage")]
            "s3" | "s3a" => Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_url(target)
                    .build()
                    .map_err(|error| target_error(target, error))?,
            ),
            #[cfg(feature = "cloud-storage")]
            "gs" => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(target)
                    .build()
                    .map_err(|error| target_error(target, error))?,
            ),
            #[cfg(feature = "cloud-storage")]
            "az" | "azure" | "abfs" | "abfss" => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(target)
                    .build()
                    .map_err(|error| target_error(target, error))?,
            ),
            #[cfg(not(feature = "cloud-storage"))]
            "s3" | "s3a" | "gs" | "az" | "azure" | "abfs" | "abfss" => {
                return Err(target_error(
                    target,
                    "this ktd was built without the `cloud-storage` feature (S3, GCS, Azure)",
                ));
            }
            other => {
                return Err(target_error(
                    target,
                    format!(
                        "unsupported scheme {other:?} (a directory, file://, s3://, gs:// or az://)"
                    ),
                ));
            }
        };
        Ok(Self {
            store,
            prefix,
            target: target.to_string(),
        })
    }

    fn local(target: &str, dir: &std::path::Path) -> Result<Self, BlobStoreError> {
        if dir.as_os_str().is_empty() {
            return Err(target_error(target, "an empty directory name"));
        }
        std::fs::create_dir_all(dir).map_err(|error| target_error(target, error))?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(dir)
            .map_err(|error| target_error(target, error))?
            .with_fsync(true);
        Ok(Self {
            store: Arc::new(store),
            prefix: ObjectPath::default(),
            target: target.to_string(),
        })
    }

    fn store_error(&self, source: object_store::Error) -> BlobStoreError {
        BlobStoreError::Store {
            target: self.target.clone(),
            source,
        }
    }

    fn key(&self, name: &AuditBlobName) -> ObjectPath {
        let name = name.to_string();
        self.prefix
            .parts()
            .chain(ObjectPath::from(name.as_str()).parts())
            .collect()
    }

    /// The blobs stored under the prefix (one listing of the store).
    pub async fn inventory(&self) -> Result<Inventory, BlobStoreError> {
        let prefix = (!self.prefix.as_ref().is_empty()).then_some(&self.prefix);
        let mut objects = self.store.list(prefix);
        let mut inventory = Inventory::default();
        while let Some(object) = objects.try_next().await.map_err(|e| self.store_error(e))? {
            let key = object.location.as_ref();
            let relative = match self.prefix.as_ref() {
                "" => key,
                prefix => key
                    .strip_prefix(prefix)
                    .and_then(|rest| rest.strip_prefix('/'))
                    .unwrap_or(key),
            };
            match relative.parse::<AuditBlobName>() {
                // Only canonical names count: `AuditBlobName` also accepts upper-case hex and
                // trailing parts, which are not keys this writer makes.
                Ok(name) if name.to_string() == relative => {
                    inventory.insert(name.epoch, relative.to_string());
                }
                _ => inventory.foreign += 1,
            }
        }
        Ok(inventory)
    }

    /// Writes one verified blob, create-once (see the module docs).
    pub async fn put(&self, name: &str, bytes: &[u8]) -> Result<Put, BlobStoreError> {
        let parsed: AuditBlobName = name
            .parse()
            .map_err(|_| BlobStoreError::BadName(name.to_string()))?;
        let key = self.key(&parsed);
        let payload = PutPayload::from(bytes.to_vec());
        match self
            .store
            .put_opts(&key, payload.clone(), PutMode::Create.into())
            .await
        {
            Ok(_) => Ok(Put::Created),
            Err(object_store::Error::AlreadyExists { .. }) => self.compare(&key, bytes).await,
            Err(object_store::Error::NotImplemented { .. }) => {
                // A store without conditional puts: look, then write.
                match self.store.head(&key).await {
                    Ok(_) => self.compare(&key, bytes).await,
                    Err(object_store::Error::NotFound { .. }) => {
                        self.store
                            .put(&key, payload)
                            .await
                            .map_err(|e| self.store_error(e))?;
                        Ok(Put::Created)
                    }
                    Err(error) => Err(self.store_error(error)),
                }
            }
            Err(error) => Err(self.store_error(error)),
        }
    }

    async fn compare(&self, key: &ObjectPath, bytes: &[u8]) -> Result<Put, BlobStoreError> {
        let existing = self
            .store
            .get(key)
            .await
            .map_err(|e| self.store_error(e))?
            .bytes()
            .await
            .map_err(|e| self.store_error(e))?;
        if existing.as_ref() == bytes {
            Ok(Put::AlreadyThere)
        } else {
            Err(BlobStoreError::Conflict {
                target: self.target.clone(),
                key: key.to_string(),
                existing: existing.len(),
                ours: bytes.len(),
            })
        }
    }

    /// Deletes the blobs of `epoch` listed in `stored` (and forgets them there).
    pub async fn delete_epoch(
        &self,
        stored: &mut Inventory,
        epoch: u64,
    ) -> Result<(), BlobStoreError> {
        for name in stored.epochs.remove(&epoch).unwrap_or_default() {
            let parsed: AuditBlobName = name
                .parse()
                .map_err(|_| BlobStoreError::BadName(name.clone()))?;
            match self.store.delete(&self.key(&parsed)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(error) => return Err(self.store_error(error)),
            }
        }
        Ok(())
    }

    /// Checks that `name` (served for `epoch`) is the history the store holds for that epoch.
    pub fn check_history(
        &self,
        stored: &Inventory,
        epoch: u64,
        name: &str,
    ) -> Result<bool, BlobStoreError> {
        match stored.epochs.get(&epoch) {
            None => Ok(false),
            Some(names) if names.len() == 1 && names[0] == name => Ok(true),
            Some(names) => Err(BlobStoreError::HistoryDiffers {
                target: self.target.clone(),
                epoch,
                stored: names.join(", "),
                served: name.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(epoch: u64, fill: u8) -> String {
        AuditBlobName::new(epoch, [fill; 32], [fill.wrapping_add(1); 32])
            .expect("epoch ≥ 1")
            .to_string()
    }

    fn inventory(epochs: &[u64]) -> Inventory {
        let mut stored = Inventory::default();
        for &epoch in epochs {
            stored.insert(epoch, name(epoch, epoch as u8));
        }
        stored
    }

    #[test]
    fn the_first_epoch_resumes_from_the_store_and_never_uploads_what_keep_would_prune() {
        assert_eq!(first_epoch(&inventory(&[]), None, 50, None), 1);
        // Resuming starts at the oldest stored epoch; stored epochs are skipped one by one, so a
        // gap an interrupted writer left is filled.
        assert_eq!(first_epoch(&inventory(&[4, 5, 7]), None, 50, None), 4);
        assert_eq!(first_epoch(&inventory(&[4, 5]), Some(2), 50, None), 2);
        assert_eq!(first_epoch(&inventory(&[]), None, 50, Some(10)), 41);
        assert_eq!(first_epoch(&inventory(&[]), Some(45), 50, Some(10)), 45);
        assert_eq!(first_epoch(&inventory(&[]), None, 5, Some(10)), 1);
        assert_eq!(first_epoch(&inventory(&[]), Some(0), 5, None), 1);
    }

    #[test]
    fn keep_prunes_all_but_the_newest_stored_epochs() {
        assert_eq!(epochs_to_prune(&inventory(&[1, 2, 3, 9]), 2), vec![1, 2]);
        assert_eq!(epochs_to_prune(&inventory(&[1, 2]), 5), Vec::<u64>::new());
    }

    #[tokio::test]
    async fn a_local_store_is_create_once_resumable_and_leaves_foreign_keys_alone() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path().join("blobs");
        let store = BlobStore::open(&dir.display().to_string()).expect("open");
        assert_eq!(store.inventory().await.expect("list"), Inventory::default());
        assert_eq!(
            store.put(&name(1, 1), b"one").await.expect("put"),
            Put::Created
        );
        assert_eq!(
            store.put(&name(1, 1), b"one").await.expect("put again"),
            Put::AlreadyThere
        );
        let conflict = store.put(&name(1, 1), b"other").await;
        assert!(
            matches!(conflict, Err(BlobStoreError::Conflict { .. })),
            "{conflict:?}"
        );
        assert_eq!(
            std::fs::read(dir.join(name(1, 1))).expect("the file"),
            b"one",
            "a conflict overwrites nothing"
        );
        store.put(&name(2, 2), b"two").await.expect("put");
        // What a kill mid-put leaves (a staging file) and what another tool wrote.
        let staging = dir.join(format!("{}#7", name(3, 3)));
        std::fs::create_dir_all(staging.parent().expect("nested")).expect("dir");
        std::fs::write(&staging, b"th").expect("staging");
        std::fs::write(dir.join("README"), b"notes").expect("foreign");
        let mut stored = store.inventory().await.expect("list");
        assert_eq!(
            stored.epochs.keys().copied().collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(stored.foreign, 1, "README; the staging file is not listed");
        assert!(store.check_history(&stored, 2, &name(2, 2)).expect("same"));
        assert!(
            !store
                .check_history(&stored, 3, &name(3, 3))
                .expect("absent")
        );
        assert!(matches!(
            store.check_history(&stored, 2, &name(2, 9)),
            Err(BlobStoreError::HistoryDiffers { epoch: 2, .. })
        ));
        let mut again = stored.clone();
        store.delete_epoch(&mut stored, 1).await.expect("delete");
        assert!(!stored.epochs.contains_key(&1));
        store
            .delete_epoch(&mut again, 1)
            .await
            .expect("deleting a blob already gone is fine");
        let listed = store.inventory().await.expect("list");
        assert_eq!(listed.epochs.keys().copied().collect::<Vec<_>>(), vec![2]);
        assert!(dir.join("README").exists());
    }

    #[test]
    fn unsupported_targets_are_refused_with_the_reason() {
        for target in ["ftp://host/x", ""] {
            let error = BlobStore::open(target).expect_err(target);
            assert!(
                matches!(error, BlobStoreError::Target { .. }),
                "{target}: {error}"
            );
        }
    }
}
