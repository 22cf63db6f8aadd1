//! Stored lookup proofs: the VRF proofs a lookup of a user version needs, kept with the version
//! so that a lookup does no ECVRF work (issue 19; [`ktd_core::proof::StoredLookupProofs`]).
//!
//! A lookup of version `n` proves `FreshLabel(n)` and `FreshLabel(2^⌊log2 n⌋)` present and
//! `StaleLabel(n)` absent; each VRF proof is a function of the key, the label, the freshness and
//! the version alone, so a record is valid from the moment the version exists and forever
//! after. The `proofs` column family is therefore a cache of deterministic data: written without
//! the WAL, never shipped in copies or backups, recomputed when absent or malformed.
//!
//! [`LookupProofs`] chooses when records are made:
//! - `Eager` (default): when an epoch's user versions are written, a `ProofFiller` thread
//!   proves and stores their records at the lowest CPU priority (`nice 19`), so it uses the CPU
//!   the epoch pipeline leaves idle and never delays a seal. Its queue is bounded; versions that
//!   do not fit are shed (counted as `shed`). Whenever the queue is empty the thread *backfills*:
//!   it walks every stored user version in key order and proves those without a record —
//!   versions written before the process started (an upgrade, `Lazy` or `Off` earlier), shed
//!   ones, partitions copied from a peer or restored from a backup (records are never shipped).
//!   A walk starts when the thread starts and again after anything is shed. Lookups also store
//!   what they compute.
//! - `Lazy`: a lookup that finds no record computes the proofs, as before, and stores them.
//! - `Off`: no records are read or written (every lookup proves; the pre-issue-19 behaviour).
//!
//! **Invariant:** a plan built from stored proofs equals the plan built by proving (tests:
//! `ktd_core::proof` unit tests, `shard/tests/it/stored_proofs.rs` against stock akd).

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;

use akd_core::AkdLabel;
use akd_core::configuration::Configuration;
use ktd_core::proof::StoredLookupProofs;
use ktd_core::vrf::VrfKey;

use crate::store::RocksStore;

/// When lookup proofs are stored (module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LookupProofs {
    /// Proved in the background as versions are written, and by lookups that miss.
    #[default]
    Eager,
    /// Proved and stored by the first lookup of a version.
    Lazy,
    /// Never stored: every lookup proves.
    Off,
}

impl LookupProofs {
    /// Whether records are read and written at all.
    pub fn stores(self) -> bool {
        self != Self::Off
    }
}

impl FromStr for LookupProofs {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "eager" => Ok(Self::Eager),
            "lazy" => Ok(Self::Lazy),
            "off" => Ok(Self::Off),
            other => Err(format!(
                "unknown lookup-proofs mode {other:?} (expected eager, lazy or off)"
            )),
        }
    }
}

impl std::fmt::Display for LookupProofs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Eager => "eager",
            Self::Lazy => "lazy",
            Self::Off => "off",
        })
    }
}

/// Counts one outcome in `ktd_shard_lookup_proofs_total{outcome}`: `stored` (a lookup used a
/// record), `computed` (a lookup proved), `filled` (the filler stored a record), `shed` (a
/// version the filler's queue had no room for).
pub(crate) fn count(outcome: &'static str, n: u64) {
    metrics::counter!("ktd_shard_lookup_proofs_total", "outcome" => outcome).increment(n);
}

/// Versions queued for the filler at most (about 100 bytes each): 4 epochs of 100,000 updates.
const QUEUE_VERSIONS: usize = 400_000;
/// Versions proved between checks for a record already stored and for shutdown; also the
/// versions one backfill step reads.
const FILL_CHUNK: usize = 256;

enum Job {
    Fill(Vec<(AkdLabel, u64)>),
    Flush(mpsc::Sender<()>),
}

/// The background prover of `Eager` mode: one thread at the lowest CPU priority, fed the user
/// versions each epoch writes. Dropping it stops the thread (after the record it is proving) and
/// waits for it, so the store is released.
pub(crate) struct ProofFiller {
    jobs: Option<SyncSender<Job>>,
    queued: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    /// Set when versions are shed: the thread starts another backfill walk.
    shed: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ProofFiller {
    /// Starts the thread. `None` if the OS refuses a thread (then lookups fill records lazily).
    pub(crate) fn start<TC: Configuration>(store: Arc<RocksStore>, vrf: VrfKey) -> Option<Self> {
        // Each job holds at most one epoch's versions; the version count bounds the memory.
        let (jobs, receiver) = mpsc::sync_channel(1024);
        let queued = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let shed = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("ktd-proof-filler".into())
            .spawn({
                let flags = Flags {
                    queued: queued.clone(),
                    stop: stop.clone(),
                    shed: shed.clone(),
                };
                move || fill::<TC>(&store, &vrf, &receiver, &flags)
            })
            .map_err(|error| tracing::warn!(%error, "cannot start the lookup-proof filler"))
            .ok()?;
        Some(Self {
            jobs: Some(jobs),
            queued,
            stop,
            shed,
            thread: Some(thread),
        })
    }

    /// Queues `versions` for proving; what the queue has no room for is shed (left to the
    /// next backfill walk, or to its first lookup if that comes sooner). Never blocks.
    pub(crate) fn enqueue(&self, versions: Vec<(AkdLabel, u64)>) {
        let Some(jobs) = &self.jobs else { return };
        let n = versions.len();
        if n == 0 {
            return;
        }
        if self.queued.load(Ordering::Relaxed) + n > QUEUE_VERSIONS {
            self.shed.store(true, Ordering::Relaxed);
            count("shed", n as u64);
            return;
        }
        self.queued.fetch_add(n, Ordering::Relaxed);
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            jobs.try_send(Job::Fill(versions))
        {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            self.shed.store(true, Ordering::Relaxed);
            count("shed", n as u64);
        }
    }

    /// Asks for a backfill walk (versions were stored without being queued: a partition copied
    /// or restored).
    pub(crate) fn request_backfill(&self) {
        self.shed.store(true, Ordering::Relaxed);
        if let Some(jobs) = &self.jobs {
            // Wake a thread blocked on an empty queue; a full queue is woken by its next job.
            let _ = jobs.try_send(Job::Fill(Vec::new()));
        }
    }

    /// Waits until every version queued before this call is proved and stored, and the current
    /// backfill walk has finished: then every version stored before the call has its record
    /// (tests and benches; `false` if the thread is gone).
    pub(crate) fn flush(&self) -> bool {
        let Some(jobs) = &self.jobs else { return false };
        let (done, wait) = mpsc::channel();
        jobs.send(Job::Flush(done)).is_ok() && wait.recv().is_ok()
    }
}

impl Drop for ProofFiller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What the filler thread shares with its handle.
struct Flags {
    queued: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    shed: Arc<AtomicBool>,
}

/// The backfill walk's position: the last user key it covered (`None`: from the first).
struct Backfill {
    walking: bool,
    after: Option<Vec<u8>>,
    /// Versions were shed (or copied in) during this walk, possibly behind the cursor: walk
    /// again once this walk ends. Never restarting mid-walk keeps the walk progressing under
    /// sustained shedding.
    again: bool,
}

impl Backfill {
    /// Versions were stored without being queued.
    fn request(&mut self) {
        if self.walking {
            self.again = true;
        } else {
            self.walking = true;
            self.after = None;
        }
    }

    /// Proves the records of the next [`FILL_CHUNK`] stored versions that lack one.
    fn step<TC: Configuration>(&mut self, store: &RocksStore, vrf: &VrfKey, stop: &AtomicBool) {
        let versions = match store.user_versions_after(self.after.as_deref(), FILL_CHUNK) {
            Ok(versions) => versions,
            Err(error) => {
                tracing::warn!(%error, "the lookup-proof backfill stopped; lookups will compute");
                self.walking = false;
                return;
            }
        };
        if versions.len() < FILL_CHUNK {
            self.walking = false;
        }
        self.after = versions.last().map(|(key, _, _)| key.clone());
        let chunk: Vec<(AkdLabel, u64)> = versions
            .into_iter()
            .map(|(_, akd_label, version)| (akd_label, version))
            .collect();
        if let Err(error) = fill_chunk::<TC>(store, vrf, &chunk, stop) {
            tracing::warn!(%error, "storing lookup proofs failed; lookups will compute them");
        }
        if !self.walking {
            self.after = None;
            if std::mem::take(&mut self.again) {
                self.walking = true;
            }
        }
    }
}

fn fill<TC: Configuration>(store: &RocksStore, vrf: &VrfKey, jobs: &Receiver<Job>, flags: &Flags) {
    // Linux keeps a nice value per thread: this one yields to every other thread of the process.
    if let Err(error) = rustix::process::nice(19) {
        tracing::debug!(%error, "the lookup-proof filler keeps its CPU priority");
    }
    let mut backfill = Backfill {
        walking: true,
        after: None,
        again: false,
    };
    while !flags.stop.load(Ordering::Relaxed) {
        if flags.shed.swap(false, Ordering::Relaxed) {
            backfill.request();
        }
        let job = if backfill.walking {
            match jobs.try_recv() {
                Ok(job) => job,
                Err(mpsc::TryRecvError::Empty) => {
                    backfill.step::<TC>(store, vrf, &flags.stop);
                    continue;
                }
                Err(mpsc::TryRecvError::Disconnected) => return,
            }
        } else {
            match jobs.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        match job {
            Job::Flush(done) => {
                while backfill.walking && !flags.stop.load(Ordering::Relaxed) {
                    backfill.step::<TC>(store, vrf, &flags.stop);
                }
                let _ = done.send(());
            }
            Job::Fill(versions) => {
                for chunk in versions.chunks(FILL_CHUNK) {
                    flags.queued.fetch_sub(chunk.len(), Ordering::Relaxed);
                    if flags.stop.load(Ordering::Relaxed) {
                        continue;
                    }
                    if let Err(error) = fill_chunk::<TC>(store, vrf, chunk, &flags.stop) {
                        tracing::warn!(
                            %error,
                            "storing lookup proofs failed; lookups will compute them"
                        );
                    }
                }
            }
        }
    }
}

fn fill_chunk<TC: Configuration>(
    store: &RocksStore,
    vrf: &VrfKey,
    chunk: &[(AkdLabel, u64)],
    stop: &AtomicBool,
) -> ktd_core::Result<()> {
    let keys: Vec<(&[u8], u64)> = chunk
        .iter()
        .map(|(akd_label, version)| (akd_label.as_slice(), *version))
        .collect();
    let held = store.lookup_proofs_many(&keys)?;
    let mut proved = Vec::with_capacity(chunk.len());
    for ((akd_label, version), held) in chunk.iter().zip(held) {
        if held.is_some() {
            continue;
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let proofs = StoredLookupProofs::compute::<TC>(vrf, akd_label, *version);
        proved.push((akd_label.as_slice(), *version, proofs));
    }
    let records: Vec<(&[u8], u64, &StoredLookupProofs)> = proved
        .iter()
        .map(|(akd_label, version, proofs)| (*akd_label, *version, proofs))
        .collect();
    store.put_lookup_proofs(&records)?;
    count("filled", records.len() as u64);
    Ok(())
}
