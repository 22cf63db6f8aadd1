//! A shard node: the tree partitions and user partitions one process owns, on one RocksDB.
//!
//! The epoch pipeline's two shard-side steps live here, and both the in-process
//! [`crate::Directory`] and the distributed shard server call them:
//!
//! 1. [`ShardNode::user_leaves`]: for the epoch's updates of the users this node owns, apply
//!    akd's version rules against the users' versions as of the previous epoch and compute the
//!    leaves (VRF labels and commitments; labels precomputed in a [`LabelCache`] are used).
//! 2. [`ShardNode::build_partitions`]: insert each owned partition's leaves as the epoch on top
//!    of its root as of the previous epoch, and write the new node versions.
//!
//! Everything here is blocking (RocksDB, hashing, VRF on the rayon pool): async callers go
//! through `spawn_blocking`. Reads ([`ShardNode::walk`], [`ShardNode::append_only_slice`], the
//! proof plans) take the epoch or the partition roots they read at; a node never needs to know
//! which epochs are committed, because an uncommitted epoch's versions are only reachable from
//! roots nobody hands out.

use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use akd_core::configuration::Configuration;
use akd_core::verify::history::HistoryParams;
use akd_core::{AkdLabel, AkdValue};
use rayon::prelude::*;

use crate::error::{LabelTag, Result};
use crate::lookup_proofs::{self, LookupProofs, ProofFiller};
use crate::store::RocksStore;
use ktd_core::Error as CoreError;
use ktd_core::label;
use ktd_core::proof::{AbsencePlan, HistoryPlan, KnownProofs, LookupPlan, StoredLookupProofs};
use ktd_core::tree::audit::{AppendOnlySlice, append_only_slice};
use ktd_core::tree::{
    self, InteriorNode, NodeKey, NodeRef, PartitionWalk, SortedLeaves, TreeStore, WalkRequest,
};
use ktd_core::user::{self, LabelCache, UpdateLimits, UserVersion};
use ktd_core::vrf::VrfKey;

/// The leaves one epoch's updates produce, and the user versions they create.
#[derive(Clone, Debug, Default)]
pub struct UserLeaves {
    /// Leaves by tree partition, in partition order; each run is sorted.
    pub by_partition: Vec<(u32, SortedLeaves)>,
    /// New user versions (write them before the epoch can commit).
    pub versions: Vec<(AkdLabel, UserVersion)>,
    /// Updates that changed something (identical republishes excluded).
    pub changed: usize,
    /// Reading the users' previous versions.
    pub read_users: Duration,
    /// VRF and commitments.
    pub vrf: Duration,
}

/// The leaves of one epoch's updates, grouped by user partition, and the new user versions.
#[derive(Clone, Debug, Default)]
pub struct PartitionedUserLeaves {
    /// One entry per requested user partition, in partition order.
    pub partitions: Vec<crate::api::UserPartitionLeaves>,
    /// New user versions (write them before the epoch can commit).
    pub versions: Vec<(AkdLabel, UserVersion)>,
    /// Updates that changed something (identical republishes excluded).
    pub changed: usize,
    /// Reading the users' previous versions.
    pub read_users: Duration,
    /// VRF and commitments.
    pub vrf: Duration,
}

/// What building an epoch's partitions produced.
#[derive(Clone, Debug, Default)]
pub struct BuiltPartitions {
    /// New roots of the partitions that received leaves.
    pub roots: Vec<(u32, Option<NodeRef>)>,
    /// Node versions written.
    pub nodes_written: usize,
    /// Planning and hashing, including node reads.
    pub tree: Duration,
    /// Time inside node reads, summed over threads.
    pub node_reads: Duration,
    /// Node versions read, by label length in bits (index 0..=256): which trie levels an
    /// epoch's build reads (the hot-levels measurement of issue 19).
    pub reads_by_label_len: Vec<u64>,
    /// Writing node versions.
    pub write_nodes: Duration,
}

/// One process's share of the directory.
pub struct ShardNode<TC> {
    store: Arc<RocksStore>,
    bits: u8,
    vrf: VrfKey,
    limits: UpdateLimits,
    labels: LabelCache,
    lookup_proofs: LookupProofs,
    filler: Option<ProofFiller>,
    config: PhantomData<TC>,
}

impl<TC> std::fmt::Debug for ShardNode<TC> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardNode")
            .field("store", &self.store)
            .field("bits", &self.bits)
            .finish_non_exhaustive()
    }
}

/// Labels kept for open epochs; about 100 bytes each.
const LABEL_CACHE_CAPACITY: usize = 2_000_000;

impl<TC: Configuration> ShardNode<TC> {
    /// A node over `store` with `2^bits` partitions and the directory's VRF key, storing lookup
    /// proofs in the default mode ([`LookupProofs::Eager`]; see [`ShardNode::with_lookup_proofs`]).
    pub fn new(store: Arc<RocksStore>, bits: u8, vrf: VrfKey, limits: UpdateLimits) -> Self {
        Self {
            store,
            bits,
            vrf,
            limits,
            labels: LabelCache::new(LABEL_CACHE_CAPACITY),
            lookup_proofs: LookupProofs::Off,
            filler: None,
            config: PhantomData,
        }
        .with_lookup_proofs(LookupProofs::default())
    }

    /// The node with lookup proofs stored in `mode` (`Eager` starts the background filler; the
    /// mode the node already has changes nothing).
    pub fn with_lookup_proofs(mut self, mode: LookupProofs) -> Self {
        if mode == self.lookup_proofs {
            return self;
        }
        self.lookup_proofs = mode;
        self.filler = match mode {
            LookupProofs::Eager => ProofFiller::start::<TC>(self.store.clone(), self.vrf.clone()),
            LookupProofs::Lazy | LookupProofs::Off => None,
        };
        self
    }

    /// When lookup proofs are stored.
    pub fn lookup_proofs_mode(&self) -> LookupProofs {
        self.lookup_proofs
    }

    /// Called once user versions are written (a shard's prepare, the directory's commit): in
    /// `Eager` mode, queues their lookup proofs for the background filler. Never blocks.
    pub fn versions_written(&self, versions: &[(AkdLabel, UserVersion)]) {
        if let Some(filler) = &self.filler {
            filler.enqueue(
                versions
                    .iter()
                    .map(|(akd_label, version)| (akd_label.clone(), version.version))
                    .collect(),
            );
        }
    }

    /// In `Eager` mode, has the filler walk every stored version and prove those without
    /// records (after a partition copy or restore, which carry none).
    pub fn request_lookup_proof_backfill(&self) {
        if let Some(filler) = &self.filler {
            filler.request_backfill();
        }
    }

    /// Waits until the filler has stored every lookup proof queued so far and finished its
    /// backfill walk (tests and benches). `false` when there is no filler (`Lazy`, `Off`, or it
    /// could not start).
    pub fn flush_lookup_proofs(&self) -> bool {
        self.filler.as_ref().is_some_and(ProofFiller::flush)
    }

    /// Opens (or creates) a node's data directory. An existing one must have been created for
    /// the same configuration, partition bits and VRF key.
    pub fn open(
        path: &std::path::Path,
        config: &ktd_core::AkdConfig,
        bits: u8,
        vrf: VrfKey,
        limits: UpdateLimits,
        store_options: crate::store::StoreOptions,
    ) -> Result<Self> {
        ktd_core::shard_map::check_partition_bits(u64::from(bits))?;
        config.install()?;
        let expected = crate::store::DirectoryMeta {
            configuration: config.to_string(),
            partition_bits: bits,
            vrf_public_key: vrf.public_key(),
        };
        let (store, _) = RocksStore::open_checked(path, store_options, &expected)?;
        Ok(Self::new(store, bits, vrf, limits))
    }

    /// The RocksDB store.
    pub fn store(&self) -> &Arc<RocksStore> {
        &self.store
    }

    /// The VRF key.
    pub fn vrf(&self) -> &VrfKey {
        &self.vrf
    }

    /// Partition bits `k`.
    pub fn bits(&self) -> u8 {
        self.bits
    }

    /// Input limits.
    pub fn limits(&self) -> &UpdateLimits {
        &self.limits
    }

    /// The label cache that [`ShardNode::user_leaves`] consults.
    pub fn label_cache(&self) -> &LabelCache {
        &self.labels
    }

    /// Evaluates ahead of time the node labels that updates of `labels` in the open epoch will
    /// need (a new user's fresh label of version 1; an existing user's fresh label of the next
    /// version and stale label of the current one, as of the newest epoch this node has built)
    /// and keeps them in the [`LabelCache`]. A guess that turns out wrong (the user also changed
    /// in a sealed epoch not built yet) only costs a cache miss later. Blocking (RocksDB, VRF on
    /// the rayon pool). Returns the number of labels evaluated or found cached.
    pub fn precompute_labels(&self, labels: Vec<AkdLabel>) -> Result<usize> {
        let keys: Vec<&[u8]> = labels.iter().map(|label| label.as_slice()).collect();
        let prior = self.store.latest_user_versions(&keys, u64::MAX)?;
        let inputs: Vec<user::LabelInput> = labels
            .into_iter()
            .zip(prior)
            .flat_map(|(akd_label, prior)| {
                let input = |freshness, version| user::LabelInput {
                    akd_label: akd_label.to_vec(),
                    freshness,
                    version,
                };
                match prior {
                    None => vec![input(akd_core::VersionFreshness::Fresh, 1)],
                    Some(prior) => vec![
                        input(akd_core::VersionFreshness::Fresh, prior.version + 1),
                        input(akd_core::VersionFreshness::Stale, prior.version),
                    ],
                }
            })
            .collect();
        let count = inputs.len();
        self.labels.precompute::<TC>(&self.vrf, inputs);
        Ok(count)
    }

    /// Step 1 of an epoch: applies the version rules to `updates` (users this node owns, at
    /// most one update per label) against their versions as of `epoch - 1`, and computes the
    /// leaves. Writes nothing.
    pub fn user_leaves(
        &self,
        epoch: u64,
        updates: Vec<(AkdLabel, AkdValue)>,
    ) -> Result<UserLeaves> {
        let (planned, read_users) = self.plan_updates(epoch, updates)?;
        if planned.is_empty() {
            return Ok(UserLeaves {
                read_users,
                ..UserLeaves::default()
            });
        }
        let started = Instant::now();
        let epoch_leaves =
            user::compute_leaves::<TC>(&self.vrf, &planned, epoch, Some(&self.labels));
        let vrf = started.elapsed();
        Ok(UserLeaves {
            by_partition: SortedLeaves::new(epoch_leaves.leaves)?.split_by_partition(self.bits),
            versions: epoch_leaves.versions,
            changed: planned.len(),
            read_users,
            vrf,
        })
    }

    /// Reads each updated user's latest version before `epoch` and plans the updates (akd's
    /// version rules); returns the plan and the time the reads took.
    fn plan_updates(
        &self,
        epoch: u64,
        updates: Vec<(AkdLabel, AkdValue)>,
    ) -> Result<(Vec<user::PlannedUpdate>, std::time::Duration)> {
        let started = Instant::now();
        let labels: Vec<&[u8]> = updates
            .iter()
            .map(|(akd_label, _)| akd_label.as_slice())
            .collect();
        let prior: Vec<Option<(u64, AkdValue)>> = self
            .store
            .latest_user_versions(&labels, epoch - 1)?
            .into_iter()
            .map(|version| version.map(|version| (version.version, version.value)))
            .collect();
        Ok((user::plan_updates(updates, &prior), started.elapsed()))
    }

    /// Step 1 of an epoch for a replica: like [`ShardNode::user_leaves`], but the leaves are
    /// grouped by the user partition (of `user_partitions`) whose update produced them, each
    /// group sorted and digested, so replicas of a user partition can compare what they
    /// computed. Every update must belong to one of `user_partitions`. Writes nothing.
    pub fn user_partition_leaves(
        &self,
        epoch: u64,
        user_partitions: &[u32],
        updates: Vec<(AkdLabel, AkdValue)>,
    ) -> Result<PartitionedUserLeaves> {
        let (planned, read_users) = self.plan_updates(epoch, updates)?;
        let started = Instant::now();
        let per_update =
            user::compute_update_leaves::<TC>(&self.vrf, &planned, epoch, Some(&self.labels));
        let vrf = started.elapsed();
        let mut grouped: std::collections::BTreeMap<u32, Vec<tree::NewLeaf>> = user_partitions
            .iter()
            .map(|partition| (*partition, Vec::new()))
            .collect();
        let mut versions = Vec::with_capacity(planned.len());
        for (leaves, update) in per_update.into_iter().zip(&planned) {
            let partition = label::user_partition(&update.akd_label, self.bits);
            let group = grouped.get_mut(&partition).ok_or_else(|| {
                CoreError::InvalidConfig(format!(
                    "user {} belongs to user partition {partition}, which this request does not prepare",
                    LabelTag::of(&update.akd_label)
                ))
            })?;
            group.push(leaves.fresh);
            group.extend(leaves.stale);
            versions.push((update.akd_label.clone(), leaves.version));
        }
        let partitions = grouped
            .into_iter()
            .map(|(user_partition, leaves)| {
                let sorted = SortedLeaves::new(leaves)?;
                Ok(crate::api::UserPartitionLeaves {
                    user_partition,
                    digest: sorted.digest(),
                    leaves: sorted
                        .split_by_partition(self.bits)
                        .into_iter()
                        .map(|(partition, leaves)| (partition, leaves.into_vec()))
                        .collect(),
                })
            })
            .collect::<ktd_core::Result<Vec<_>>>()?;
        Ok(PartitionedUserLeaves {
            partitions,
            versions,
            changed: planned.len(),
            read_users,
            vrf,
        })
    }

    /// Step 2 of an epoch: inserts each partition's leaves (with its root as of the previous
    /// epoch) as `epoch`, in parallel, and writes the node versions (one unsynced `WriteBatch`
    /// per partition). Node versions an abandoned attempt at `epoch` left in `partitions` (the
    /// partitions being built, a superset of those in `inputs`) are dropped first — only that
    /// epoch's, only those partitions'.
    pub fn build_partitions(
        &self,
        epoch: u64,
        partitions: &[u32],
        inputs: Vec<(u32, Option<NodeRef>, SortedLeaves)>,
    ) -> Result<BuiltPartitions> {
        let started = Instant::now();
        let timed_store = TimedStore {
            inner: &self.store,
            nanos: AtomicU64::new(0),
            by_label_len: (0..=256).map(|_| AtomicU64::new(0)).collect(),
        };
        let deltas: Vec<(u32, tree::PartitionDelta)> =
            inputs
                .into_par_iter()
                .map(|(partition, root, leaves)| {
                    if leaves.as_slice().iter().any(|leaf| {
                        label::partition_of(&leaf.label.label_val, self.bits) != partition
                    }) {
                        return Err(CoreError::Corrupt(format!(
                            "leaves routed to the wrong partition {partition}"
                        )));
                    }
                    tree::insert_leaves::<TC, _>(&timed_store, root, &leaves, epoch)
                        .map(|delta| (partition, delta))
                })
                .collect::<ktd_core::Result<_>>()?;
        let tree = started.elapsed();
        let node_reads = Duration::from_nanos(timed_store.nanos.load(Ordering::Relaxed));
        let reads_by_label_len = timed_store
            .by_label_len
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .collect();

        let started = Instant::now();
        for partition in partitions {
            self.store
                .discard_partition_epoch(epoch, *partition, self.bits)?;
        }
        deltas
            .par_iter()
            .try_for_each(|(_, delta)| self.store.write_nodes(delta))?;
        Ok(BuiltPartitions {
            nodes_written: deltas.iter().map(|(_, delta)| delta.node_count()).sum(),
            roots: deltas
                .into_iter()
                .map(|(partition, delta)| (partition, delta.root))
                .collect(),
            tree,
            node_reads,
            reads_by_label_len,
            write_nodes: started.elapsed(),
        })
    }

    /// Proof walks inside this node's partitions, from the roots given in the requests.
    pub fn walk(&self, requests: &[WalkRequest]) -> ktd_core::Result<Vec<PartitionWalk>> {
        tree::walk::<TC, _>(&*self.store, requests)
    }

    /// Re-hashes the stored tree under `root` (a partition copied from a peer): see
    /// [`ktd_core::tree::verify_partition`]. Returns the interior nodes checked.
    pub fn verify_partition(&self, root: Option<NodeRef>) -> Result<u64> {
        Ok(tree::verify_partition::<TC, _>(&*self.store, root)?)
    }

    /// The append-only slice of one partition for `start_epoch → start_epoch + 1`, given its
    /// root as of `start_epoch + 1`.
    pub fn append_only_slice(
        &self,
        root: Option<NodeRef>,
        start_epoch: u64,
    ) -> Result<AppendOnlySlice> {
        Ok(append_only_slice::<TC, _>(&*self.store, root, start_epoch)?)
    }

    /// The lookup plan of `akd_label` as of `epoch` (its latest version then, and VRF proofs).
    pub fn lookup_plan(&self, akd_label: &AkdLabel, epoch: u64) -> Result<LookupPlan> {
        self.limits.check_label(akd_label)?;
        let latest =
            self.store
                .latest_user_version(akd_label, epoch)?
                .ok_or(CoreError::LabelNotFound {
                    label: LabelTag::of(akd_label),
                    epoch,
                })?;
        if !self.lookup_proofs.stores() {
            lookup_proofs::count("computed", 1);
            return Ok(LookupPlan::new::<TC>(&self.vrf, akd_label, latest));
        }
        let stored = self
            .store
            .lookup_proofs(akd_label, &[latest.version])
            .unwrap_or_else(|error| {
                tracing::warn!(%error, "reading stored lookup proofs failed; computing them");
                Vec::new()
            })
            .pop()
            .flatten();
        if let Some(stored) = stored {
            lookup_proofs::count("stored", 1);
            let mut known = KnownProofs::none();
            known.add(&latest, stored);
            return Ok(LookupPlan::with_known::<TC>(
                &self.vrf, akd_label, latest, &known,
            ));
        }
        lookup_proofs::count("computed", 1);
        let plan = LookupPlan::new::<TC>(&self.vrf, akd_label, latest);
        // A record written after this node lost the user's partition (a move racing this read)
        // is correct data nobody reads; a later bootstrap of the partition deletes it.
        let record = StoredLookupProofs::from_plan(&plan);
        if let Err(error) =
            self.store
                .put_lookup_proofs(&[(akd_label.as_slice(), plan.version.version, &record)])
        {
            tracing::warn!(%error, "storing computed lookup proofs failed");
        }
        Ok(plan)
    }

    /// The absence plan of `akd_label` as of `epoch`; [`CoreError::LabelExists`] if it has a
    /// version then.
    pub fn absence_plan(&self, akd_label: &AkdLabel, epoch: u64) -> Result<AbsencePlan> {
        self.limits.check_label(akd_label)?;
        if self.store.latest_user_version(akd_label, epoch)?.is_some() {
            return Err(CoreError::LabelExists {
                label: LabelTag::of(akd_label),
                epoch,
            }
            .into());
        }
        Ok(AbsencePlan::new::<TC>(&self.vrf, akd_label))
    }

    /// The history plan of `akd_label` as of `epoch`.
    pub fn history_plan(
        &self,
        akd_label: &AkdLabel,
        params: HistoryParams,
        epoch: u64,
    ) -> Result<HistoryPlan> {
        self.limits.check_label(akd_label)?;
        let versions = self.store.user_versions(akd_label, epoch)?;
        let known = if self.lookup_proofs.stores() {
            self.stored_history_proofs(akd_label, &versions, params)
        } else {
            KnownProofs::none()
        };
        Ok(HistoryPlan::with_known::<TC>(
            &self.vrf, akd_label, versions, params, epoch, &known,
        )?)
    }

    /// The stored lookup proofs a history proof of `versions` can use: those of the versions
    /// it covers, of the version before each, and of the powers of two (past markers). A
    /// superset of what the plan takes is harmless: a stored proof equals a proven one.
    fn stored_history_proofs(
        &self,
        akd_label: &AkdLabel,
        versions: &[UserVersion],
        params: HistoryParams,
    ) -> KnownProofs {
        let mut by_epoch: Vec<&UserVersion> = versions.iter().collect();
        by_epoch.sort_by_key(|version| std::cmp::Reverse(version.epoch));
        if let HistoryParams::MostRecent(n) = params {
            by_epoch.truncate(n);
        }
        let newest = by_epoch.iter().map(|version| version.version).max();
        let mut wanted: Vec<u64> = by_epoch
            .iter()
            .flat_map(|version| [version.version, version.version.saturating_sub(1)])
            .chain((0..64).map(|bit| 1u64 << bit))
            .filter(|version| *version >= 1 && Some(*version) <= newest)
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let stored = match self.store.lookup_proofs(akd_label, &wanted) {
            Ok(stored) => stored,
            Err(error) => {
                tracing::warn!(%error, "reading stored lookup proofs failed; computing them");
                return KnownProofs::none();
            }
        };
        let by_number: std::collections::HashMap<u64, &UserVersion> = versions
            .iter()
            .map(|version| (version.version, version))
            .collect();
        let mut known = KnownProofs::none();
        for (number, stored) in wanted.into_iter().zip(stored) {
            if let (Some(version), Some(stored)) = (by_number.get(&number), stored) {
                known.add(version, stored);
            }
        }
        known
    }
}

/// A `TreeStore` that adds up the time spent in reads and counts them by label length.
struct TimedStore<'a> {
    inner: &'a RocksStore,
    nanos: AtomicU64,
    by_label_len: Vec<AtomicU64>,
}

impl TreeStore for TimedStore<'_> {
    fn read_nodes(&self, keys: &[NodeKey]) -> ktd_core::Result<Vec<Option<InteriorNode>>> {
        for key in keys {
            if let Some(count) = self.by_label_len.get(key.label.label_len as usize) {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        let started = Instant::now();
        let nodes = self.inner.read_nodes(keys);
        self.nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        nodes
    }
}
