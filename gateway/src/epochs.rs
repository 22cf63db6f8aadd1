//! Committed epochs as the gateway sees them: the latest one (a linearizable read at the
//! sequencer, shared by every request that arrives while one is in flight) and each epoch's top
//! tree (decoded once from its partition roots and cached; committed epochs never change).
//!
//! Invariants: decoding and hashing a top tree (up to 4096 partition roots) runs on the
//! blocking pool, never on a runtime thread; requests waiting for a future epoch
//! (`GetEpoch{wait}`) poll only through the shared latest-epoch read, so however many wait,
//! at most one read per round reaches the sequencer for all of them.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ktd_core::akd_core::configuration::Configuration;
use ktd_core::stitch::TopTree;
use sequencer::{SequencerError, pb};
use tokio::sync::oneshot;

use crate::error::{GatewayError, Result};
use crate::sequencing::Sequencing;

/// How many epochs' top trees stay decoded.
const CACHED_EPOCHS: usize = 128;

/// A committed epoch: its number and its top tree (whose root hash is the epoch's root).
pub struct Committed<TC> {
    /// The epoch.
    pub epoch: u64,
    /// The stitched top of the tree as of `epoch`.
    pub top: Arc<TopTree<TC>>,
    /// Its size and seal/commit times, as the sequencer recorded them.
    pub info: EpochInfo,
}

/// Recently used epochs' top trees and records.
type TopCache<TC> = BTreeMap<u64, (Arc<TopTree<TC>>, EpochInfo)>;

/// What the sequencer records about a committed epoch besides its roots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpochInfo {
    /// Distinct labels in its batch.
    pub updates: u64,
    /// Leader wall clock at the seal, ms since the Unix epoch (0 = unknown).
    pub sealed_at_ms: u64,
    /// Leader wall clock at the commit, ms since the Unix epoch (0 = unknown).
    pub committed_at_ms: u64,
    /// The shard map version in force at the commit (0 = unknown): reads of the epoch are
    /// routed by a map at least this new.
    pub shard_map_version: u64,
}

impl EpochInfo {
    fn of(record: &pb::EpochRecord) -> Self {
        Self {
            updates: record.updates,
            sealed_at_ms: record.sealed_at_ms,
            committed_at_ms: record.committed_at_ms,
            shard_map_version: record.shard_map_version,
        }
    }
}

impl<TC: Configuration> Committed<TC> {
    /// The epoch's root hash.
    pub fn root_hash(&self) -> [u8; 32] {
        self.top.root_hash()
    }
}

type Waiter = oneshot::Sender<Result<pb::EpochRecord, (tonic::Code, String)>>;

#[derive(Default)]
struct Batch {
    waiters: Vec<Waiter>,
    running: bool,
}

/// Committed epochs, read through a [`Sequencing`].
pub struct Epochs<TC> {
    sequencing: Arc<dyn Sequencing>,
    bits: u8,
    batch: Arc<Mutex<Batch>>,
    tops: Mutex<TopCache<TC>>,
    latest_seen: std::sync::atomic::AtomicU64,
    /// [`Epochs::stale_latest`]'s cached answer: when it was read, and the epoch.
    stale: Mutex<Option<(std::time::Instant, u64)>>,
    config: PhantomData<fn() -> TC>,
}

impl<TC: Configuration> Epochs<TC> {
    /// Epochs of a directory with `bits` partition bits.
    pub fn new(sequencing: Arc<dyn Sequencing>, bits: u8) -> Self {
        Self {
            sequencing,
            bits,
            batch: Arc::default(),
            tops: Mutex::new(BTreeMap::new()),
            latest_seen: std::sync::atomic::AtomicU64::new(0),
            stale: Mutex::new(None),
            config: PhantomData,
        }
    }

    /// The latest committed epoch, linearizable: the read at the sequencer starts after this
    /// call did. Requests that arrive while a read is in flight share the next one.
    pub async fn latest(&self) -> Result<Committed<TC>> {
        let record = self.latest_record().await?;
        let epoch = record.epoch;
        let committed = self.committed(record).await?;
        if epoch
            > self
                .latest_seen
                .swap(epoch, std::sync::atomic::Ordering::Relaxed)
        {
            // First sight of a new latest epoch: its age is time() minus this, in PromQL.
            metrics::gauge!("ktd_epoch_latest_committed").set(epoch as f64);
            ktd_rpc::telemetry::log_context().set_epoch(epoch);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |elapsed| elapsed.as_secs_f64());
            metrics::gauge!("ktd_epoch_latest_seen_timestamp_seconds").set(now);
        }
        Ok(committed)
    }

    /// **Deliberately broken, test-only** (`KTD_UNSAFE_STALE_READS`, see
    /// [`crate::service::GatewayOptions::unsafe_stale_reads`]): "the latest epoch" from a cache
    /// refreshed at most every `max_age`, not a linearizable read. A lookup served from it can
    /// return an epoch older than one a client has already seen: the chaos checkers must catch
    /// it.
    pub async fn stale_latest(&self, max_age: Duration) -> Result<Committed<TC>> {
        let cached = *self
            .stale
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((read_at, epoch)) = cached
            && read_at.elapsed() < max_age
        {
            return self.at(epoch).await;
        }
        let latest = self.latest().await?;
        *self
            .stale
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) =
            Some((std::time::Instant::now(), latest.epoch));
        Ok(latest)
    }

    /// Committed epoch `epoch`, or [`GatewayError::EpochNotCommitted`].
    pub async fn at(&self, epoch: u64) -> Result<Committed<TC>> {
        if let Some(committed) = self.cached(epoch) {
            return Ok(committed);
        }
        match self.sequencing.get_epoch(Some(epoch)).await {
            Ok(record) => self.committed(record).await,
            Err(SequencerError::EpochNotFound { epoch, latest }) => {
                Err(GatewayError::EpochNotCommitted { epoch, latest })
            }
            Err(SequencerError::Remote(status)) if status.code() == tonic::Code::NotFound => {
                let latest = self.latest_record().await?.epoch;
                Err(GatewayError::EpochNotCommitted { epoch, latest })
            }
            Err(error) => Err(error.into()),
        }
    }

    /// `epoch` if given, else the latest.
    pub async fn resolve(&self, epoch: Option<u64>) -> Result<Committed<TC>> {
        match epoch {
            Some(epoch) => self.at(epoch).await,
            None => self.latest().await,
        }
    }

    /// Committed epochs `epochs`, in order (fetched a few at a time).
    pub async fn range(&self, epochs: std::ops::RangeInclusive<u64>) -> Result<Vec<Committed<TC>>> {
        use futures::{StreamExt, TryStreamExt};
        futures::stream::iter(epochs)
            .map(|epoch| self.at(epoch))
            .buffered(8)
            .try_collect()
            .await
    }

    /// Waits until `epoch` is committed (the caller bounds the wait with its deadline). Every
    /// waiter polls through the shared latest-epoch read ([`Epochs::latest`]'s batch), so a
    /// thousand waiters cost the sequencer one read per round, not a thousand.
    pub async fn wait_for(&self, epoch: u64) -> Result<Committed<TC>> {
        let mut delay = Duration::from_millis(20);
        loop {
            if let Some(committed) = self.cached(epoch) {
                return Ok(committed);
            }
            let latest = self.latest_record().await?;
            if latest.epoch == epoch {
                return self.committed(latest).await;
            }
            if latest.epoch > epoch {
                return self.at(epoch).await;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(250));
        }
    }

    fn cached(&self, epoch: u64) -> Option<Committed<TC>> {
        self.tops
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&epoch)
            .map(|(top, info)| Committed {
                epoch,
                top: top.clone(),
                info: *info,
            })
    }

    async fn committed(&self, record: pb::EpochRecord) -> Result<Committed<TC>> {
        let epoch = record.epoch;
        if let Some(committed) = self.cached(epoch) {
            return Ok(committed);
        }
        let info = EpochInfo::of(&record);
        let bits = self.bits;
        // Decoding and hashing up to 4096 roots: CPU work, off the runtime threads.
        let top =
            tokio::task::spawn_blocking(move || shard::replicated::top_tree::<TC>(bits, &record))
                .await
                .map_err(|error| {
                    GatewayError::Internal(format!("decoding epoch {epoch}: {error}"))
                })??;
        let top = Arc::new(top);
        let mut tops = self
            .tops
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        tops.insert(epoch, (top.clone(), info));
        while tops.len() > CACHED_EPOCHS {
            tops.pop_first();
        }
        Ok(Committed { epoch, top, info })
    }

    async fn latest_record(&self) -> Result<pb::EpochRecord> {
        let (sender, receiver) = oneshot::channel();
        let start = {
            let mut batch = self
                .batch
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            batch.waiters.push(sender);
            !std::mem::replace(&mut batch.running, true)
        };
        if start {
            tokio::spawn(run_batches(self.sequencing.clone(), self.batch.clone()));
        }
        match receiver.await {
            Ok(Ok(record)) => Ok(record),
            Ok(Err((code, message))) => {
                Err(SequencerError::Remote(tonic::Status::new(code, message)).into())
            }
            Err(_) => Err(SequencerError::ShuttingDown.into()),
        }
    }
}

/// Serves waiting `latest` requests one read at a time: everyone who arrived during a read gets
/// the next one, so no answer predates its request.
async fn run_batches(sequencing: Arc<dyn Sequencing>, batch: Arc<Mutex<Batch>>) {
    loop {
        let waiters = {
            let mut batch = batch
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if batch.waiters.is_empty() {
                batch.running = false;
                return;
            }
            std::mem::take(&mut batch.waiters)
        };
        let answer = sequencing
            .get_epoch(None)
            .await
            .map_err(|error| (error.code(), format!("latest epoch: {error}")));
        for waiter in waiters {
            let _ = waiter.send(answer.clone());
        }
    }
}
