//! The in-process directory: `2^k` tree partitions in one RocksDB, driven together.
//!
//! This is the reference directory that the akd oracle tests, the tree-engine benches and the
//! library example drive (`ktd dev` runs the sequencer, a shard server and the gateway
//! instead), and the reference the distributed pipeline is built from: publish computes leaves
//! ([`ktd_core::user`]), inserts each partition's leaves with
//! [`ktd_core::tree::insert_leaves`] in parallel, stitches the root with [`ktd_core::stitch`],
//! and commits the epoch record; proofs locate in the top tree, walk partitions, and stitch.
//!
//! ```text
//!  publish(batch) ─► check ─► prior versions ─► VRF + commitments ─► leaves by partition
//!        ┌────────────────────────────────────────────────────────────────┘
//!        ▼  (rayon, one task per partition)
//!   insert_leaves ─► write node versions (unsynced)
//!        ▼
//!   TopTree::new(partition roots) ─► root hash ─► commit epoch record + user versions (synced)
//! ```
//!
//! One writer at a time (a mutex around publish); readers never block: every read is "as of" a
//! committed epoch, and node versions are immutable once referenced.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use akd_core::configuration::Configuration;
use akd_core::hash::Digest;
use akd_core::verify::history::HistoryParams;
use akd_core::{AkdLabel, AkdValue, AppendOnlyProof, HistoryProof, LookupProof};
use rayon::prelude::*;

use crate::error::Result;
use crate::lookup_proofs::LookupProofs;
use crate::node::ShardNode;
use crate::store::{DirectoryMeta, RocksStore, StoreOptions};
use ktd_core::EpochRecord;
use ktd_core::Error as CoreError;
use ktd_core::config::{AkdConfig, Experimental, WhatsAppV1};
use ktd_core::proof::{AbsenceProof, prove_claims};
use ktd_core::stitch::{self, TopTree};
use ktd_core::tree;
use ktd_core::user::{UpdateLimits, UserVersion};
use ktd_core::vrf::VrfKey;

macro_rules! dispatch {
    ($self:expr, $core:ident => $body:expr) => {
        match &$self.inner {
            Inner::WhatsAppV1($core) => $body,
            Inner::Experimental($core) => $body,
        }
    };
}

/// An epoch and its root hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochHash {
    /// The epoch.
    pub epoch: u64,
    /// The root hash published for it.
    pub root_hash: Digest,
}

/// How to open a directory.
#[derive(Clone, Debug)]
pub struct DirectoryOptions {
    /// Hash and commitment scheme; fixed when the directory is created.
    pub config: AkdConfig,
    /// Partition bits `k` (`2^k` partitions); fixed when the directory is created.
    pub partition_bits: u8,
    /// Input limits.
    pub limits: UpdateLimits,
    /// RocksDB tuning.
    pub store: StoreOptions,
    /// When lookup proofs are stored ([`crate::lookup_proofs`]).
    pub lookup_proofs: LookupProofs,
}

impl Default for DirectoryOptions {
    fn default() -> Self {
        Self {
            config: AkdConfig::WhatsAppV1,
            partition_bits: 4,
            limits: UpdateLimits::default(),
            store: StoreOptions::default(),
            lookup_proofs: LookupProofs::default(),
        }
    }
}

/// Where the time of one publish went (wall clock per phase).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PublishStats {
    /// Updates in the batch.
    pub updates: usize,
    /// Leaves inserted (fresh + stale).
    pub leaves: usize,
    /// Node versions written.
    pub nodes_written: usize,
    /// Reading each label's latest version.
    pub read_users: Duration,
    /// VRF evaluations and commitments.
    pub vrf: Duration,
    /// Planning and hashing the partitions, including their node reads.
    pub tree: Duration,
    /// Time spent inside node reads during `tree`, summed over threads.
    pub node_reads: Duration,
    /// Node versions read during `tree`, by label length in bits (index 0..=256).
    pub reads_by_label_len: Vec<u64>,
    /// Writing node versions.
    pub write_nodes: Duration,
    /// Stitching the root and committing the epoch (synced).
    pub commit: Duration,
}

/// A directory serving one AKD configuration (chosen at open time).
pub struct Directory {
    inner: Inner,
    /// One publish at a time, from prepare to commit.
    writer: Mutex<()>,
}

/// An epoch whose tree nodes are written but which is not yet visible.
pub struct PreparedEpoch<'a> {
    directory: &'a Directory,
    _writer: MutexGuard<'a, ()>,
    staged: Staged,
}

/// What a prepare computed; nothing of it is visible to readers yet.
struct Staged {
    epoch_hash: EpochHash,
    /// `None` when every update was an identical republish (no epoch is created).
    commit: Option<(EpochRecord, Vec<(AkdLabel, UserVersion)>)>,
    stats: PublishStats,
}

impl PreparedEpoch<'_> {
    /// The epoch and root hash this publish will commit.
    pub fn epoch_hash(&self) -> EpochHash {
        self.staged.epoch_hash
    }

    /// Makes the epoch visible: writes its record and user versions in one synced batch.
    pub fn commit(self) -> Result<(EpochHash, PublishStats)> {
        let Staged {
            epoch_hash,
            commit,
            mut stats,
        } = self.staged;
        if let Some((record, versions)) = commit {
            let started = Instant::now();
            dispatch!(self.directory, core => core.commit(record, &versions))?;
            stats.commit += started.elapsed();
        }
        Ok((epoch_hash, stats))
    }
}

enum Inner {
    WhatsAppV1(Core<WhatsAppV1>),
    Experimental(Core<Experimental>),
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        dispatch!(self, core => f
            .debug_struct("Directory")
            .field("path", &core.node.store().path())
            .field("config", &core.config)
            .field("partition_bits", &core.bits)
            .finish())
    }
}

impl Directory {
    /// Opens (or creates) the directory at `path` with the VRF key from `vrf_seed`.
    ///
    /// An existing directory must have been created with the same configuration, partition
    /// bits and VRF key; anything else is [`crate::Error::IncompatibleDataDir`].
    pub fn open(path: &Path, options: DirectoryOptions, vrf_seed: &[u8]) -> Result<Self> {
        ktd_core::shard_map::check_partition_bits(u64::from(options.partition_bits))?;
        options.config.install()?;
        let vrf = VrfKey::from_seed(vrf_seed)?;
        let inner = match options.config {
            AkdConfig::WhatsAppV1 => Inner::WhatsAppV1(Core::open(path, &options, vrf)?),
            AkdConfig::Experimental { .. } => Inner::Experimental(Core::open(path, &options, vrf)?),
        };
        Ok(Self {
            inner,
            writer: Mutex::new(()),
        })
    }

    /// Publishes `updates` as the next epoch and returns its hash. If every update is an
    /// identical republish no epoch is created and the current epoch is returned (as akd).
    pub fn publish(&self, updates: Vec<(AkdLabel, AkdValue)>) -> Result<EpochHash> {
        self.publish_with_stats(updates)
            .map(|(epoch_hash, _)| epoch_hash)
    }

    /// [`Directory::publish`], also reporting where the time went.
    pub fn publish_with_stats(
        &self,
        updates: Vec<(AkdLabel, AkdValue)>,
    ) -> Result<(EpochHash, PublishStats)> {
        self.prepare(updates)?.commit()
    }

    /// First half of a publish: computes the next epoch and writes its tree nodes, which stay
    /// invisible until [`PreparedEpoch::commit`]. Dropping the result abandons the epoch; the
    /// directory then still serves the previous one, and the next publish starts over.
    pub fn prepare(&self, updates: Vec<(AkdLabel, AkdValue)>) -> Result<PreparedEpoch<'_>> {
        dispatch!(self, core => core.node.limits().check_batch(&updates))?;
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let staged = dispatch!(self, core => core.prepare(updates))?;
        Ok(PreparedEpoch {
            directory: self,
            _writer: writer,
            staged,
        })
    }

    /// Deletes the tree history no epoch at or after `safe_epoch` reads (history retention,
    /// `store/prune.rs`): raises the prune floor to `safe_epoch` (at most the latest committed
    /// epoch; never lowered), sweeps the stale-version index and compacts the pruned range.
    /// Reads below the floor are refused from then on ([`CoreError::EpochPruned`]). Returns
    /// the floor in force and the node versions deleted. Blocking.
    pub fn prune(&self, safe_epoch: u64) -> Result<(u64, u64)> {
        let store = self.store();
        let latest = store.last_epoch()?.map_or(0, |record| record.epoch);
        let floor = store.raise_prune_floor(safe_epoch.min(latest))?;
        let (mut deleted, mut lowest) = (0u64, u64::MAX);
        loop {
            let step = store.prune_step(10_000, floor)?;
            deleted += step.node_versions;
            if step.node_versions > 0 {
                lowest = lowest.min(step.lowest_version);
            }
            if step.done {
                break;
            }
        }
        if deleted > 0 {
            store.compact_pruned(lowest, floor);
        }
        Ok((floor, deleted))
    }

    /// Refuses a read at `epoch` below the prune floor.
    fn check_retained(&self, epoch: Option<u64>) -> Result<()> {
        match epoch {
            Some(epoch) => Ok(ktd_core::retention::check_retained(
                epoch,
                self.store().prune_floor()?,
            )?),
            None => Ok(()),
        }
    }

    /// The lookup proof of `akd_label`'s latest version as of `epoch` (default: latest).
    pub fn lookup(
        &self,
        akd_label: &AkdLabel,
        epoch: Option<u64>,
    ) -> Result<(LookupProof, EpochHash)> {
        self.check_retained(epoch)?;
        dispatch!(self, core => core.lookup(akd_label, epoch))
    }

    /// Proof that `akd_label` was never published as of `epoch` (default: latest).
    pub fn absence(
        &self,
        akd_label: &AkdLabel,
        epoch: Option<u64>,
    ) -> Result<(AbsenceProof, EpochHash)> {
        self.check_retained(epoch)?;
        dispatch!(self, core => core.absence(akd_label, epoch))
    }

    /// The history proof of `akd_label` as of `epoch` (default: latest).
    pub fn key_history(
        &self,
        akd_label: &AkdLabel,
        params: HistoryParams,
        epoch: Option<u64>,
    ) -> Result<(HistoryProof, EpochHash)> {
        self.check_retained(epoch)?;
        dispatch!(self, core => core.key_history(akd_label, params, epoch))
    }

    /// The append-only proof from `start` to `end` (one step per epoch).
    pub fn audit(&self, start: u64, end: u64) -> Result<AppendOnlyProof> {
        self.check_retained(Some(start))?;
        dispatch!(self, core => core.audit(start, end))
    }

    /// The hash of `epoch` (default: the latest committed epoch).
    pub fn epoch_hash(&self, epoch: Option<u64>) -> Result<EpochHash> {
        dispatch!(self, core => core.view(epoch).map(|view| view.epoch_hash()))
    }

    /// The VRF public key clients verify labels with.
    pub fn vrf_public_key(&self) -> [u8; 32] {
        dispatch!(self, core => core.node.vrf().public_key())
    }

    /// The configuration name (`whatsapp_v1` or `experimental:<label>`).
    pub fn config(&self) -> &AkdConfig {
        dispatch!(self, core => &core.config)
    }

    /// The RocksDB store (for capacity reports).
    pub fn store(&self) -> &RocksStore {
        dispatch!(self, core => core.node.store())
    }

    /// Waits until the lookup proofs of every committed version are stored (`Eager` mode; tests
    /// and benches). `false` when the mode has no background filler.
    pub fn flush_lookup_proofs(&self) -> bool {
        dispatch!(self, core => core.node.flush_lookup_proofs())
    }
}

/// One committed epoch, ready to serve.
struct EpochView<TC> {
    epoch: u64,
    top: TopTree<TC>,
}

impl<TC: Configuration> EpochView<TC> {
    fn epoch_hash(&self) -> EpochHash {
        EpochHash {
            epoch: self.epoch,
            root_hash: self.top.root_hash(),
        }
    }
}

struct Core<TC> {
    node: ShardNode<TC>,
    config: AkdConfig,
    bits: u8,
    current: RwLock<Arc<EpochView<TC>>>,
}

impl<TC: Configuration> Core<TC> {
    fn open(path: &Path, options: &DirectoryOptions, vrf: VrfKey) -> Result<Self> {
        let expected = DirectoryMeta {
            configuration: options.config.to_string(),
            partition_bits: options.partition_bits,
            vrf_public_key: vrf.public_key(),
        };
        let (store, created) = RocksStore::open_checked(path, options.store, &expected)?;
        let record = match store.last_epoch()? {
            Some(record) => record,
            None => {
                let empty = TopTree::<TC>::new(
                    options.partition_bits,
                    vec![None; 1 << options.partition_bits],
                )?;
                let record = EpochRecord {
                    epoch: 0,
                    root_hash: empty.root_hash(),
                    partitions: empty.partitions().to_vec(),
                };
                store.put_epoch(&record)?;
                record
            }
        };
        let top = TopTree::<TC>::new(options.partition_bits, record.partitions)?;
        if top.root_hash() != record.root_hash {
            return Err(CoreError::Corrupt(format!(
                "epoch {}: stored root hash does not match its partition roots",
                record.epoch
            ))
            .into());
        }
        // Node versions above the last committed epoch belong to an interrupted publish.
        store.discard_nodes_from(record.epoch + 1)?;
        tracing::info!(
            path = %path.display(),
            epoch = record.epoch,
            created,
            config = %options.config,
            partition_bits = options.partition_bits,
            "directory opened"
        );
        Ok(Self {
            node: ShardNode::new(store, options.partition_bits, vrf, options.limits)
                .with_lookup_proofs(options.lookup_proofs),
            config: options.config.clone(),
            bits: options.partition_bits,
            current: RwLock::new(Arc::new(EpochView {
                epoch: record.epoch,
                top,
            })),
        })
    }

    fn current(&self) -> Arc<EpochView<TC>> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The committed epoch `epoch` (default: latest).
    fn view(&self, epoch: Option<u64>) -> Result<Arc<EpochView<TC>>> {
        let current = self.current();
        let Some(epoch) = epoch else {
            return Ok(current);
        };
        if epoch == current.epoch {
            return Ok(current);
        }
        if epoch > current.epoch {
            return Err(CoreError::EpochNotFound {
                epoch,
                latest: current.epoch,
            }
            .into());
        }
        let record = self.node.store().epoch(epoch)?.ok_or_else(|| {
            CoreError::Corrupt(format!(
                "epoch {epoch} is below the latest epoch but has no record"
            ))
        })?;
        Ok(Arc::new(EpochView {
            epoch,
            top: TopTree::new(self.bits, record.partitions)?,
        }))
    }

    /// Computes the next epoch and writes its node versions (the caller holds the writer lock).
    fn prepare(&self, updates: Vec<(AkdLabel, AkdValue)>) -> Result<Staged> {
        let base = self.current();
        let epoch = base.epoch + 1;
        let mut stats = PublishStats {
            updates: updates.len(),
            ..PublishStats::default()
        };
        let user_leaves = self.node.user_leaves(epoch, updates)?;
        stats.read_users = user_leaves.read_users;
        stats.vrf = user_leaves.vrf;
        if user_leaves.changed == 0 {
            return Ok(Staged {
                epoch_hash: base.epoch_hash(),
                commit: None,
                stats,
            });
        }
        stats.leaves = user_leaves
            .by_partition
            .iter()
            .map(|(_, leaves)| leaves.len())
            .sum();
        let inputs = user_leaves
            .by_partition
            .into_iter()
            .map(|(partition, leaves)| {
                (partition, base.top.partitions()[partition as usize], leaves)
            })
            .collect();
        let all_partitions: Vec<u32> = (0..1u32 << self.node.bits()).collect();
        let built = self.node.build_partitions(epoch, &all_partitions, inputs)?;
        stats.tree = built.tree;
        stats.node_reads = built.node_reads;
        stats.reads_by_label_len = built.reads_by_label_len;
        stats.write_nodes = built.write_nodes;
        stats.nodes_written = built.nodes_written;

        let started = Instant::now();
        let mut partitions = base.top.partitions().to_vec();
        for (partition, root) in built.roots {
            partitions[partition as usize] = root;
        }
        let top = TopTree::<TC>::new(self.bits, partitions)?;
        let record = EpochRecord {
            epoch,
            root_hash: top.root_hash(),
            partitions: top.partitions().to_vec(),
        };
        stats.commit = started.elapsed();
        Ok(Staged {
            epoch_hash: EpochHash {
                epoch,
                root_hash: record.root_hash,
            },
            commit: Some((record, user_leaves.versions)),
            stats,
        })
    }

    /// Commits a prepared epoch and makes it the one readers see.
    fn commit(&self, record: EpochRecord, versions: &[(AkdLabel, UserVersion)]) -> Result<()> {
        let expected = self.current().epoch + 1;
        if record.epoch != expected {
            return Err(CoreError::EpochOutOfOrder {
                epoch: record.epoch,
                previous: expected - 1,
            }
            .into());
        }
        self.node.store().commit_epoch(&record, versions)?;
        self.node.versions_written(versions);
        let epoch = record.epoch;
        let top = TopTree::<TC>::new(self.bits, record.partitions)?;
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(EpochView { epoch, top });
        tracing::debug!(epoch, updates = versions.len(), "epoch committed");
        Ok(())
    }

    fn walker(
        &self,
    ) -> impl FnOnce(&[tree::WalkRequest]) -> ktd_core::Result<Vec<tree::PartitionWalk>> + '_ {
        move |requests| self.node.walk(requests)
    }

    fn lookup(&self, akd_label: &AkdLabel, epoch: Option<u64>) -> Result<(LookupProof, EpochHash)> {
        let view = self.view(epoch)?;
        let plan = self.node.lookup_plan(akd_label, view.epoch)?;
        let proofs = prove_claims(&view.top, &plan.claims(), self.walker())?;
        Ok((plan.assemble(proofs)?, view.epoch_hash()))
    }

    fn absence(
        &self,
        akd_label: &AkdLabel,
        epoch: Option<u64>,
    ) -> Result<(AbsenceProof, EpochHash)> {
        let view = self.view(epoch)?;
        let plan = self.node.absence_plan(akd_label, view.epoch)?;
        if view.top.partitions().iter().all(Option::is_none) {
            return Err(CoreError::EmptyDirectory { epoch: view.epoch }.into());
        }
        let proofs = prove_claims(&view.top, &plan.claims(), self.walker())?;
        Ok((plan.assemble(proofs)?, view.epoch_hash()))
    }

    fn key_history(
        &self,
        akd_label: &AkdLabel,
        params: HistoryParams,
        epoch: Option<u64>,
    ) -> Result<(HistoryProof, EpochHash)> {
        let view = self.view(epoch)?;
        let plan = self.node.history_plan(akd_label, params, view.epoch)?;
        let proofs = prove_claims(&view.top, &plan.claims(), self.walker())?;
        Ok((plan.assemble(proofs)?, view.epoch_hash()))
    }

    fn audit(&self, start: u64, end: u64) -> Result<AppendOnlyProof> {
        if start >= end {
            return Err(CoreError::InvalidAuditRange { start, end }.into());
        }
        let latest = self.current().epoch;
        if end > latest {
            return Err(CoreError::EpochNotFound { epoch: end, latest }.into());
        }
        let mut proof = AppendOnlyProof {
            proofs: Vec::with_capacity((end - start) as usize),
            epochs: Vec::with_capacity((end - start) as usize),
        };
        for step_start in start..end {
            let view = self.view(Some(step_start + 1))?;
            let top_audit = view.top.append_only_top(step_start);
            let slices = top_audit
                .partitions
                .par_iter()
                .map(|(_, root)| self.node.append_only_slice(Some(*root), step_start))
                .collect::<Result<Vec<_>>>()?;
            proof
                .proofs
                .push(stitch::append_only_proof(top_audit, slices));
            proof.epochs.push(step_start);
        }
        Ok(proof)
    }
}
