//! The `ktd_storage_*` Prometheus series: RocksDB batch-write latency, write stalls, pending
//! compaction and free disk space of every data directory this process opens.
//!
//! Latencies are recorded where the write happens ([`record_batch_write`], called on the blocking
//! thread that wrote). Stalls and disk space are gauges sampled by [`sample_storage`] every few
//! seconds; [`StorageHealth::read`] does the RocksDB property reads and the `statvfs`, so it runs
//! on a blocking thread, never on an async one. The sequencer crate reuses both for its own
//! database (`store = "sequencer"`).
//!
//! Every gauge is labelled with the directory (`dir`) so several databases in one process
//! (`ktd dev`) stay apart.

use std::path::Path;
use std::sync::Weak;
use std::time::{Duration, Instant};

use rocksdb::{ColumnFamily, DB};

use crate::store::RocksStore;

/// How often [`sample_storage`] reads the gauges.
pub const STORAGE_SAMPLE_PERIOD: Duration = Duration::from_secs(5);

/// Records one RocksDB `WriteBatch` write into `ktd_storage_batch_write_seconds{store,batch}`:
/// `store` is the process role owning the database (`shard`, `sequencer`), `batch` what the batch
/// holds.
pub fn record_batch_write(store: &'static str, batch: &'static str, started: Instant) {
    metrics::histogram!("ktd_storage_batch_write_seconds", "store" => store, "batch" => batch)
        .record(started.elapsed().as_secs_f64());
}

/// Write stalls, compaction debt and disk space of one database, as sampled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StorageHealth {
    /// RocksDB stopped all writes (`rocksdb.is-write-stopped`).
    pub write_stopped: bool,
    /// The rate RocksDB currently throttles writes to, in bytes per second; 0 when writes are not
    /// delayed (`rocksdb.actual-delayed-write-rate`).
    pub delayed_write_rate_bytes: u64,
    /// Bytes compaction estimates it must rewrite to settle the LSM tree, summed over the column
    /// families (`rocksdb.estimate-pending-compaction-bytes`).
    pub pending_compaction_bytes: u64,
    /// Bytes available to this (unprivileged) process on the directory's file system.
    pub disk_free_bytes: u64,
    /// Size of that file system, in bytes.
    pub disk_total_bytes: u64,
}

/// Why a [`StorageHealth`] sample failed.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    /// A RocksDB property could not be read.
    #[error("read RocksDB property {property}: {message}")]
    Property {
        /// The property name.
        property: &'static str,
        /// RocksDB's message.
        message: String,
    },
    /// `statvfs` on the data directory failed.
    #[error("statvfs {dir}: {source}")]
    DiskSpace {
        /// The directory.
        dir: String,
        /// The OS error.
        source: std::io::Error,
    },
}

impl StorageHealth {
    /// Reads the properties of `db` (summing per-column-family ones over `column_families`) and
    /// the space of the file system holding `dir`. Blocking.
    pub fn read(
        db: &DB,
        column_families: &[&ColumnFamily],
        dir: &Path,
    ) -> Result<Self, SampleError> {
        let property = |name: &'static str| {
            db.property_int_value(name)
                .map(Option::unwrap_or_default)
                .map_err(|error| SampleError::Property {
                    property: name,
                    message: error.into_string(),
                })
        };
        let mut pending_compaction_bytes = property("rocksdb.estimate-pending-compaction-bytes")?;
        for cf in column_families {
            pending_compaction_bytes += db
                .property_int_value_cf(*cf, "rocksdb.estimate-pending-compaction-bytes")
                .map_err(|error| SampleError::Property {
                    property: "rocksdb.estimate-pending-compaction-bytes",
                    message: error.into_string(),
                })?
                .unwrap_or_default();
        }
        let space = rustix::fs::statvfs(dir).map_err(|errno| SampleError::DiskSpace {
            dir: dir.display().to_string(),
            source: errno.into(),
        })?;
        Ok(Self {
            write_stopped: property("rocksdb.is-write-stopped")? != 0,
            delayed_write_rate_bytes: property("rocksdb.actual-delayed-write-rate")?,
            pending_compaction_bytes,
            disk_free_bytes: space.f_bavail.saturating_mul(space.f_frsize),
            disk_total_bytes: space.f_blocks.saturating_mul(space.f_frsize),
        })
    }

    /// Sets the `ktd_storage_*` gauges of `dir` from this sample.
    pub fn export(&self, dir: &Path) {
        let dir = dir.display().to_string();
        metrics::gauge!("ktd_storage_rocksdb_write_stopped", "dir" => dir.clone())
            .set(f64::from(u8::from(self.write_stopped)));
        metrics::gauge!("ktd_storage_rocksdb_delayed_write_rate_bytes", "dir" => dir.clone())
            .set(self.delayed_write_rate_bytes as f64);
        metrics::gauge!("ktd_storage_rocksdb_pending_compaction_bytes", "dir" => dir.clone())
            .set(self.pending_compaction_bytes as f64);
        metrics::gauge!("ktd_storage_disk_free_bytes", "dir" => dir.clone())
            .set(self.disk_free_bytes as f64);
        metrics::gauge!("ktd_storage_disk_total_bytes", "dir" => dir)
            .set(self.disk_total_bytes as f64);
    }
}

/// Exports the storage gauges of `store` every [`STORAGE_SAMPLE_PERIOD`] (the first sample at
/// once) until `stop` completes or the store is dropped. Each sample runs on a blocking thread.
///
/// # Cancel safety
///
/// Cancel safe: dropping the future only stops further samples.
pub async fn sample_storage(store: Weak<RocksStore>, stop: impl Future<Output = ()>) {
    let mut stop = std::pin::pin!(stop);
    loop {
        let store = store.clone();
        let sampled = tokio::task::spawn_blocking(move || {
            let store = store.upgrade()?;
            if let Err(error) = store.export_storage_health() {
                tracing::debug!(%error, path = %store.path().display(), "storage sample failed");
            }
            Some(())
        })
        .await;
        if !matches!(sampled, Ok(Some(()))) {
            return;
        }
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(STORAGE_SAMPLE_PERIOD) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_store_reports_no_stall_and_some_free_space() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (store, _) = RocksStore::open(dir.path(), crate::store::StoreOptions::default())
            .expect("open store");
        let health = store.storage_health().expect("sample");
        assert!(!health.write_stopped);
        assert_eq!(health.delayed_write_rate_bytes, 0);
        assert!(health.disk_total_bytes > 0);
        assert!(health.disk_free_bytes > 0 && health.disk_free_bytes <= health.disk_total_bytes);
    }
}
