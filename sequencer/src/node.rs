//! [`Sequencer`]: one sequencer node as a library — the Raft node, its state machine, and every
//! operation the gRPC services and an in-process coordinator call.
//!
//! Writes go through [`Sequencer::append`], [`Sequencer::seal`], [`Sequencer::commit_epoch`]
//! (leader only; a follower returns [`SequencerError::NotLeader`] with a hint). Reads that must be
//! linearizable ([`Sequencer::get_epoch`]) confirm leadership with a ReadIndex round first; the
//! batch and log reads serve this node's applied state. [`Sequencer::leader_changes`] tells a
//! coordinator when this node gains or loses leadership.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::Stream;
use ktd_proto::ktd::sequencer::v1 as pb;
use openraft::error::{ClientWriteError, LinearizableReadError, RaftError};
use openraft::{ChangeMembers, ReadPolicy, ServerState};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::SequencerConfig;
use crate::error::{Result, SequencerError};
use crate::machine;
use crate::raft::db::Storage;
use crate::raft::log_store::RocksLogStore;
use crate::raft::network::{PeerNetwork, TransportOptions};
use crate::raft::snapshot;
use crate::raft::state_machine::{BatchCursor, BatchRead, RocksStateMachine, SmShared, SmView};
use crate::raft::types::{Node, RaftMetrics};
use crate::raft::{self, Command, NodeId, Raft};

/// Who leads the cluster, as this node sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaderState {
    /// The leader's id, if one is known.
    pub leader_id: Option<NodeId>,
    /// The leader's address, if known.
    pub leader_addr: Option<String>,
    /// The current term.
    pub term: u64,
    /// Whether this node is the leader.
    pub is_self: bool,
}

/// A sequencer node. Cheap to clone; every clone is the same node.
#[derive(Clone)]
pub struct Sequencer {
    inner: Arc<Inner>,
}

struct Inner {
    id: NodeId,
    config: SequencerConfig,
    raft: Raft,
    sm: Arc<SmShared>,
    storage: Arc<Storage>,
    leader: watch::Sender<LeaderState>,
    metrics: watch::Receiver<RaftMetrics>,
    shutdown: CancellationToken,
    /// Every background task, so shutdown can wait until none holds the node any more.
    tasks: TaskTracker,
    /// Trace contexts of traced updates, for the coordinator (leader only; not replicated).
    traces: crate::traces::UpdateTraces,
    /// Follower gauges exported so far.
    raft_exporter: crate::metrics::RaftExporter,
    /// Appends acknowledged here whose epochs are not committed yet.
    inclusion: crate::metrics::InclusionTracker,
    /// One permit per `WatchLog` subscriber (`watch.max_subscribers`).
    watch_subscribers: Arc<tokio::sync::Semaphore>,
    /// Bytes of events read for `WatchLog` subscribers and not yet taken by them, all together.
    watch_buffered_bytes: Arc<AtomicU64>,
    /// Leader only: the epoch the coordinator keeps failing to commit (see
    /// `coordinator::stall`).
    commit_stall: std::sync::Mutex<Option<pb::CommitStall>>,
}

/// Bytes of log entries one `WatchLog` read takes from the store (at least one entry).
pub const WATCH_READ_BYTES: usize = 4 << 20;

/// A `WatchLog` subscriber's side: the buffered events, then how the stream ended. Taking an
/// event gives its bytes back to the subscriber's buffer; dropping the stream gives back all.
struct WatchStream {
    receiver: tokio::sync::mpsc::Receiver<(pb::LogEvent, u32)>,
    end: Option<tokio::sync::oneshot::Receiver<SequencerError>>,
    buffer: Arc<tokio::sync::Semaphore>,
    buffered: Arc<AtomicU64>,
}

impl Stream for WatchStream {
    type Item = Result<pb::LogEvent>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        match self.receiver.poll_recv(cx) {
            Poll::Ready(Some((event, size))) => {
                self.buffered.fetch_sub(u64::from(size), Ordering::SeqCst);
                self.buffer.add_permits(size as usize);
                Poll::Ready(Some(Ok(event)))
            }
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                let Some(end) = self.end.as_mut() else {
                    return Poll::Ready(None);
                };
                match std::future::Future::poll(std::pin::Pin::new(end), cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(outcome) => {
                        self.end = None;
                        Poll::Ready(outcome.ok().map(Err))
                    }
                }
            }
        }
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.receiver.close();
        while let Ok((_, size)) = self.receiver.try_recv() {
            self.buffered.fetch_sub(u64::from(size), Ordering::SeqCst);
        }
    }
}

/// A handle that does not keep the node alive: services hold one, because a connection can
/// outlive the server and must not keep the database open.
#[derive(Clone)]
pub struct WeakSequencer(std::sync::Weak<Inner>);

impl WeakSequencer {
    /// The node, unless it has been dropped.
    pub fn upgrade(&self) -> Option<Sequencer> {
        self.0.upgrade().map(|inner| Sequencer { inner })
    }
}

impl std::fmt::Debug for WeakSequencer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WeakSequencer")
    }
}

impl std::fmt::Debug for Sequencer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequencer")
            .field("id", &self.inner.id)
            .finish_non_exhaustive()
    }
}

/// Bound on admin operations that wait for the cluster (membership, transfer, snapshot).
const ADMIN_WAIT: Duration = Duration::from_secs(30);

fn not_leader(leader_id: Option<NodeId>, leader_node: Option<&Node>) -> SequencerError {
    SequencerError::NotLeader {
        leader_id,
        leader_addr: leader_node.map(|node| node.addr.clone()),
    }
}

fn write_error(
    error: RaftError<raft::TypeConfig, ClientWriteError<raft::TypeConfig>>,
) -> SequencerError {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward))
        | RaftError::APIError(ClientWriteError::LogEntryDiscarded(forward)) => {
            not_leader(forward.leader_id, forward.leader_node.as_ref())
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(error)) => {
            SequencerError::Membership(error.to_string())
        }
        RaftError::APIError(ClientWriteError::PreconditionFailed(error)) => {
            SequencerError::Membership(error.to_string())
        }
        RaftError::Fatal(openraft::error::Fatal::Stopped) => SequencerError::ShuttingDown,
        RaftError::Fatal(fatal) => SequencerError::Raft(fatal.to_string()),
    }
}

/// Turns an apply result into the caller's answer, or the state machine's refusal.
fn accepted(result: pb::ApplyResult) -> Result<pb::apply_result::Kind> {
    match result.kind {
        Some(pb::apply_result::Kind::Rejected(rejection)) => Err(SequencerError::Rejected {
            code: tonic::Code::from(rejection.code),
            message: rejection.message,
        }),
        Some(kind) => Ok(kind),
        None => Err(SequencerError::Raft("empty apply result".into())),
    }
}

fn unexpected(kind: &pb::apply_result::Kind) -> SequencerError {
    SequencerError::Raft(format!("unexpected apply result {kind:?}"))
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| SequencerError::Raft(format!("blocking task failed: {error}")))?
}

/// Validates an append against this node's request limits and the cluster's replicated input
/// limits (which the state machine enforces again on every replica).
fn validate_append(
    config: &SequencerConfig,
    input: &machine::InputLimits,
    updates: &[pb::Update],
    key: &[u8],
) -> Result<()> {
    let limits = &config.epoch;
    if updates.is_empty() {
        return Err(SequencerError::EmptyBatch);
    }
    if updates.len() > limits.max_batch_updates {
        return Err(SequencerError::BatchTooLarge {
            len: updates.len(),
            max: limits.max_batch_updates,
        });
    }
    if key.len() > limits.max_idempotency_key_bytes {
        return Err(SequencerError::IdempotencyKeyTooLong {
            len: key.len(),
            max: limits.max_idempotency_key_bytes,
        });
    }
    for (position, update) in updates.iter().enumerate() {
        if update.label.is_empty() {
            return Err(SequencerError::EmptyLabel { position });
        }
        if update.label.len() as u64 > input.max_label_bytes {
            return Err(SequencerError::LabelTooLong {
                position,
                len: update.label.len(),
                max: input.max_label_bytes as usize,
            });
        }
        if update.value.len() as u64 > input.max_value_bytes {
            return Err(SequencerError::ValueTooLarge {
                position,
                len: update.value.len(),
                max: input.max_value_bytes as usize,
            });
        }
    }
    Ok(())
}

/// BLAKE3 of an append's updates (each label and value length-prefixed, in order): what an
/// idempotency key is bound to.
pub fn payload_hash(updates: &[pb::Update]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    for update in updates {
        hasher.update(&(update.label.len() as u64).to_be_bytes());
        hasher.update(&update.label);
        hasher.update(&(update.value.len() as u64).to_be_bytes());
        hasher.update(&update.value);
    }
    *hasher.finalize().as_bytes()
}

/// This node's wall clock in ms since the Unix epoch (0 if the clock is before 1970): stamped
/// into seal, append and commit commands by the proposer, so every replica records the same
/// value.
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// Mirrors openraft's metrics channel into a tokio watch channel (ends when Raft stops).
fn forward_metrics(raft: &Raft, tasks: &TaskTracker) -> watch::Receiver<RaftMetrics> {
    use openraft::async_runtime::WatchReceiver;
    let mut source = raft.metrics();
    let (sender, receiver) = watch::channel(source.borrow_watched().clone());
    tasks.spawn(async move {
        loop {
            let metrics = source.borrow_and_update().clone();
            sender.send_replace(metrics);
            if source.changed().await.is_err() {
                return;
            }
        }
    });
    receiver
}

/// Whether the node belongs to an initialised cluster (its membership names a node).
fn is_initialized(metrics: &RaftMetrics) -> bool {
    metrics
        .membership_config
        .membership()
        .nodes()
        .next()
        .is_some()
}

fn state_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

impl Sequencer {
    /// Opens the data directory, starts the Raft node, and (with `config.init`) bootstraps a new
    /// cluster. Does not serve gRPC: see [`crate::serve()`] or [`crate::run`].
    pub async fn start(config: SequencerConfig) -> Result<Self> {
        config.validate()?;
        let data_dir = config.data_dir.clone();
        let fresh = {
            let data_dir = data_dir.clone();
            blocking(move || Storage::is_new(&data_dir)).await?
        };
        if fresh {
            crate::membership::check_new_node(&config).await?;
        }
        let configured_id = config.id;
        let storage = blocking(move || Storage::open(&data_dir, configured_id)).await?;
        {
            let storage = storage.clone();
            blocking(move || snapshot::clean_leftovers(&storage)).await?;
        }
        let id = storage.node_id();
        let sm = {
            let storage = storage.clone();
            blocking(move || SmShared::open(storage)).await?
        };
        let log_store =
            RocksLogStore::new(storage.clone()).map_err(|source| SequencerError::Io {
                context: "start the raft log flusher",
                source,
            })?;
        let network = PeerNetwork::new(TransportOptions {
            connect_timeout: config.raft.connect_timeout,
            stream_progress_timeout: config.raft.stream_progress_timeout,
            snapshot_min_timeout: config.raft.snapshot_min_timeout,
            ..TransportOptions::default()
        })
        .with_overrides(config.peer_overrides()?);
        let raft_config = raft::raft_config(&config.raft)?;
        let raft = Raft::new(
            id,
            raft_config,
            network,
            log_store,
            RocksStateMachine::new(sm.clone()),
        )
        .await
        .map_err(|fatal| SequencerError::Raft(fatal.to_string()))?;
        let (leader, _) = watch::channel(LeaderState::default());
        let tasks = TaskTracker::new();
        let metrics = forward_metrics(&raft, &tasks);
        let watch_subscribers = Arc::new(tokio::sync::Semaphore::new(config.watch.max_subscribers));
        let sequencer = Self {
            inner: Arc::new(Inner {
                id,
                config,
                raft,
                sm,
                storage,
                leader,
                metrics,
                shutdown: CancellationToken::new(),
                tasks,
                traces: Default::default(),
                raft_exporter: crate::metrics::RaftExporter::default(),
                inclusion: crate::metrics::InclusionTracker::default(),
                watch_subscribers,
                watch_buffered_bytes: Arc::new(AtomicU64::new(0)),
                commit_stall: std::sync::Mutex::new(None),
            }),
        };
        tracing::info!(
            node_id = id,
            advertise = sequencer.inner.config.advertise_addr(),
            "sequencer node started"
        );
        sequencer.spawn_leader_tracker();
        sequencer.spawn_storage_sampler();
        if sequencer.inner.config.init {
            sequencer.bootstrap().await?;
        }
        crate::leader::spawn(sequencer.clone());
        Ok(sequencer)
    }

    /// Initialises Raft membership from the configured peers (once) and makes sure the cluster
    /// metadata gets written.
    async fn bootstrap(&self) -> Result<()> {
        let config = &self.inner.config;
        let initialized = self
            .inner
            .raft
            .is_initialized()
            .await
            .map_err(|fatal| SequencerError::Raft(fatal.to_string()))?;
        if initialized {
            tracing::info!("the data directory is already initialised; --init has no effect");
        } else {
            let members: BTreeMap<NodeId, Node> = config
                .initial_members()?
                .into_iter()
                .map(|(id, addr)| (id, Node::new(addr)))
                .collect();
            tracing::info!(members = ?members.keys().collect::<Vec<_>>(), "initialising a new cluster");
            self.inner
                .raft
                .initialize(members)
                .await
                .map_err(|error| SequencerError::Raft(format!("initialise: {error}")))?;
        }
        let metadata = pb::ClusterMetadata {
            cluster_id: rand::random::<[u8; 16]>().to_vec(),
            partition_bits: config.cluster.partition_bits,
            akd_configuration: config.cluster.akd_configuration.clone(),
            vrf_public_key: config.vrf_public_key()?.to_vec(),
            max_epoch_updates: config.cluster.max_epoch_updates,
            idempotency_window: config.cluster.idempotency_window,
            retained_committed_batches: config.cluster.retained_committed_batches,
            batch_retention_max_bytes: config.cluster.batch_retention_max_bytes,
            batch_retention_max_age_ms: config.cluster.batch_retention_max_age.as_millis() as u64,
            max_label_bytes: config.cluster.max_label_bytes,
            max_value_bytes: config.cluster.max_value_bytes,
            max_epoch_bytes: config.cluster.max_epoch_bytes,
            max_uncommitted_epochs: config.cluster.max_uncommitted_epochs,
            idempotency_retention_ms: config.cluster.idempotency_retention.as_millis() as u64,
            max_idempotency_keys: config.cluster.max_idempotency_keys,
        };
        machine::validate_metadata(&metadata).map_err(SequencerError::InvalidConfig)?;
        let sequencer = self.clone();
        self.inner
            .tasks
            .spawn(async move { sequencer.ensure_metadata(metadata).await });
        Ok(())
    }

    /// Writes the cluster metadata (and the initial shard map, if configured) through whichever
    /// node leads, until they exist.
    async fn ensure_metadata(&self, metadata: pb::ClusterMetadata) {
        let shards = match self.inner.config.initial_shard_map() {
            Ok(map) => map.map(|map| shard::replicated::shard_map_to_pb(&map)),
            Err(error) => {
                tracing::error!(%error, "the shard map from --init is invalid");
                None
            }
        };
        let mut view = self.inner.sm.view();
        loop {
            let (has_metadata, map_version) = {
                let view = view.borrow();
                let epochs = view.epochs();
                (epochs.metadata.is_some(), epochs.shard_map.version)
            };
            let write = if !has_metadata {
                "metadata"
            } else if shards.is_some() && map_version == 0 {
                "shard map"
            } else {
                return;
            };
            let leader = self.inner.leader.borrow().clone();
            let outcome = match (write, leader.is_self, leader.leader_addr) {
                ("metadata", true, _) => self.init_cluster(metadata.clone()).await.map(|_| ()),
                ("metadata", false, Some(addr)) => crate::client::SequencerClient::new([addr])
                    .init_cluster(metadata.clone())
                    .await
                    .map(|_| ()),
                (_, true, _) => self
                    .set_shard_map(shards.clone().unwrap_or_default(), 0)
                    .await
                    .map(|_| ()),
                (_, false, Some(addr)) => crate::client::SequencerClient::new([addr])
                    .set_shard_map(shards.clone().unwrap_or_default(), 0)
                    .await
                    .map(|_| ()),
                (_, false, None) => Err(SequencerError::NotLeader {
                    leader_id: None,
                    leader_addr: None,
                }),
            };
            match outcome {
                Ok(()) => {}
                Err(SequencerError::Rejected { message, .. }) => {
                    tracing::error!(%message, write, "the cluster {write} from --init was refused");
                    return;
                }
                Err(error) => {
                    tracing::debug!(%error, write, "cluster {write} not written yet; retrying")
                }
            }
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => return,
                _ = view.changed() => {}
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    /// Keeps [`LeaderState`] in step with the Raft metrics.
    fn spawn_leader_tracker(&self) {
        let sequencer = self.clone();
        self.inner.tasks.spawn(async move {
            let mut metrics = sequencer.inner.metrics.clone();
            loop {
                let state = {
                    let current = metrics.borrow_and_update();
                    let leader_addr = current.current_leader.and_then(|leader| {
                        current
                            .membership_config
                            .membership()
                            .get_node(&leader)
                            .map(|node| node.addr.clone())
                    });
                    LeaderState {
                        leader_id: current.current_leader,
                        leader_addr,
                        term: current.current_term,
                        is_self: current.current_leader == Some(sequencer.inner.id)
                            && current.state == ServerState::Leader,
                    }
                };
                sequencer.inner.leader.send_if_modified(|previous| {
                    if *previous == state {
                        return false;
                    }
                    if previous.leader_id != state.leader_id {
                        metrics::counter!("ktd_raft_leader_changes_total").increment(1);
                    }
                    if previous.is_self != state.is_self || previous.leader_id != state.leader_id {
                        tracing::info!(leader = ?state.leader_id, term = state.term, is_self = state.is_self, "leader changed");
                    }
                    *previous = state;
                    true
                });
                // Runs until Raft stops (not on the shutdown token: leaving leadership during
                // shutdown still needs fresh leader state).
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    /// Starts the epoch coordinator on this node: it drives sealed epochs through the shards
    /// reached by `connector` whenever this node leads, and stops with the node.
    pub fn spawn_coordinator(&self, connector: Arc<dyn shard::cluster::ShardConnector>) {
        let shutdown = self.inner.shutdown.clone();
        self.spawn_task(crate::coordinator::run_configured(
            self.clone(),
            connector,
            shutdown,
        ));
    }

    /// Trace contexts of traced updates (see [`crate::traces`]).
    pub fn update_traces(&self) -> &crate::traces::UpdateTraces {
        &self.inner.traces
    }

    /// Sets the `ktd_raft_*` and `ktd_epoch_*` gauges from this node's status (called on every
    /// Raft metrics change and at least every 500 ms while serving).
    pub fn export_metrics(&self) {
        let status = self.node_status();
        let leader = self.inner.leader.borrow().clone();
        metrics::gauge!("ktd_raft_term").set(status.term as f64);
        ktd_rpc::telemetry::log_context().set_term(status.term);
        ktd_rpc::telemetry::log_context().set_epoch(status.last_committed_epoch);
        metrics::gauge!("ktd_raft_leader_id").set(status.leader_id as f64);
        metrics::gauge!("ktd_raft_is_leader").set(if leader.is_self { 1.0 } else { 0.0 });
        metrics::gauge!("ktd_raft_last_log_index").set(status.last_log_index as f64);
        metrics::gauge!("ktd_raft_commit_index").set(status.committed_index as f64);
        metrics::gauge!("ktd_raft_applied_index").set(status.applied_index as f64);
        metrics::gauge!("ktd_raft_snapshot_index").set(status.snapshot_index as f64);
        metrics::gauge!("ktd_epoch_open").set(status.open_epoch as f64);
        metrics::gauge!("ktd_epoch_pending_updates").set(status.open_epoch_updates as f64);
        metrics::gauge!("ktd_epoch_last_sealed").set(status.last_sealed_epoch as f64);
        metrics::gauge!("ktd_epoch_last_committed").set(status.last_committed_epoch as f64);
        // Read in place: the epoch state is large (retention maps), and this runs every 5 s.
        let (max_uncommitted, retention, history) = {
            let view = self.inner.sm.view();
            let view = view.borrow();
            match &view.epochs {
                Some(epochs) => (
                    epochs
                        .metadata
                        .as_ref()
                        .map(|metadata| machine::InputLimits::of(metadata).max_uncommitted_epochs),
                    epochs.retention(),
                    crate::history::to_pb(&epochs.history),
                ),
                None => (
                    None,
                    machine::EpochState::default().retention(),
                    crate::history::to_pb(&ktd_core::retention::Retention::default()),
                ),
            }
        };
        crate::metrics::export_history(&history, status.last_committed_epoch, unix_ms());
        if let Some(max_uncommitted) = max_uncommitted {
            metrics::gauge!("ktd_epoch_max_uncommitted").set(max_uncommitted as f64);
        }
        crate::metrics::export_retention(&retention);
        crate::metrics::export_watch(self.watch_subscriber_count(), self.watch_buffered_bytes());
        self.inner
            .raft_exporter
            .export(&self.inner.metrics.borrow().clone());
    }

    /// Samples the `ktd_storage_*` gauges of this node's database and `ktd_epoch_age_seconds`
    /// every [`shard::metrics::STORAGE_SAMPLE_PERIOD`] on a blocking thread, until shutdown
    /// (a tracked task: shutdown waits for a sample in progress before the database closes).
    fn spawn_storage_sampler(&self) {
        let storage = self.inner.storage.clone();
        let sm = self.inner.sm.clone();
        let shutdown = self.inner.shutdown.clone();
        self.inner.tasks.spawn(async move {
            // (epoch, committed_at_ms) of the latest committed epoch, read once per epoch.
            let mut latest: Option<(u64, u64)> = None;
            loop {
                let storage = storage.clone();
                let sm = sm.clone();
                let known = latest;
                let sampled = tokio::task::spawn_blocking(move || {
                    let column_families: Vec<&rocksdb::ColumnFamily> =
                        crate::raft::db::COLUMN_FAMILIES
                            .iter()
                            .map(|name| storage.cf(name))
                            .collect();
                    match shard::metrics::StorageHealth::read(
                        storage.db(),
                        &column_families,
                        storage.data_dir(),
                    ) {
                        Ok(health) => health.export(storage.data_dir()),
                        Err(error) => tracing::debug!(%error, "storage sample failed"),
                    }
                    let epoch = sm.view().borrow().epochs().last_committed_epoch;
                    if epoch == 0 {
                        return None;
                    }
                    if let Some((known_epoch, _)) = known
                        && known_epoch == epoch
                    {
                        return known;
                    }
                    match sm.epoch_record(epoch) {
                        Ok(Some(record)) => Some((epoch, record.committed_at_ms)),
                        Ok(None) => known,
                        Err(error) => {
                            tracing::debug!(%error, epoch, "epoch age sample failed");
                            known
                        }
                    }
                })
                .await;
                match sampled {
                    Ok(now_latest) => latest = now_latest,
                    Err(_) => return,
                }
                if let Some((_, committed_at_ms)) = latest {
                    crate::metrics::export_epoch_age(committed_at_ms, unix_ms());
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    () = tokio::time::sleep(shard::metrics::STORAGE_SAMPLE_PERIOD) => {}
                }
            }
        });
    }

    /// Records a root the coordinator on this node committed: seal latency and size of the epoch
    /// (unless it had been committed before) and the inclusion latency of the appends
    /// acknowledged here.
    pub(crate) fn note_epoch_committed(&self, response: &pb::CommitEpochResponse, epoch: u64) {
        if !response.already_committed
            && let Some(record) = &response.record
        {
            crate::metrics::record_epoch_committed(record);
        }
        self.inner
            .inclusion
            .committed(epoch, std::time::Instant::now());
    }

    /// Publishes the coordinator's commit stall (`None`: epochs commit) in this node's status
    /// and its gauges.
    pub(crate) fn set_commit_stall(&self, stall: Option<pb::CommitStall>) {
        crate::metrics::export_commit_stall(stall.as_ref(), unix_ms());
        *self
            .inner
            .commit_stall
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = stall;
    }

    /// The coordinator's commit stall on this node, if an epoch keeps failing.
    pub fn commit_stall(&self) -> Option<pb::CommitStall> {
        self.inner
            .commit_stall
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// A handle that does not keep the node alive.
    pub fn downgrade(&self) -> WeakSequencer {
        WeakSequencer(Arc::downgrade(&self.inner))
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// This node's configuration.
    pub fn config(&self) -> &SequencerConfig {
        &self.inner.config
    }

    /// Leadership changes as this node sees them; `is_self` is true while this node leads.
    pub fn leader_changes(&self) -> watch::Receiver<LeaderState> {
        self.inner.leader.subscribe()
    }

    /// The state machine's published view (applied index, epochs, metadata).
    pub fn state(&self) -> watch::Receiver<SmView> {
        self.inner.sm.view()
    }

    /// The Raft metrics of this node.
    pub fn raft_metrics(&self) -> watch::Receiver<RaftMetrics> {
        self.inner.metrics.clone()
    }

    /// A token cancelled when this node begins to shut down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    /// Proposes a command and waits until it is committed and applied.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: a dropped future may still have its command committed. Retry with the
    /// same idempotency key.
    async fn propose(&self, kind: pb::command::Kind) -> Result<pb::apply_result::Kind> {
        if self.inner.shutdown.is_cancelled() {
            return Err(SequencerError::ShuttingDown);
        }
        self.check_lease()?;
        let response = self
            .inner
            .raft
            .client_write(Command(pb::Command { kind: Some(kind) }))
            .await
            .map_err(write_error)?;
        accepted(response.data)
    }

    fn require_metadata(&self) -> Result<pb::ClusterMetadata> {
        self.inner
            .sm
            .view()
            .borrow()
            .epochs()
            .metadata
            .ok_or(SequencerError::NotInitialized)
    }

    /// Orders a batch of updates into the open epoch. Returns the epoch they will be sealed in
    /// and the first update's sequence number; a repeated `idempotency_key` (a caller's key,
    /// remembered for the cluster's idempotency retention) returns the original answer
    /// (`duplicate = true`).
    pub async fn append(
        &self,
        updates: Vec<pb::Update>,
        idempotency_key: Vec<u8>,
    ) -> Result<pb::AppendResponse> {
        self.append_keyed(updates, idempotency_key, false).await
    }

    /// [`Sequencer::append`]; `retry_key` says the key was made up by a client library for its
    /// own retries (remembered for the last `idempotency_window` such appends only).
    pub async fn append_keyed(
        &self,
        updates: Vec<pb::Update>,
        idempotency_key: Vec<u8>,
        retry_key: bool,
    ) -> Result<pb::AppendResponse> {
        let metadata = self.require_metadata()?;
        validate_append(
            &self.inner.config,
            &machine::InputLimits::of(&metadata),
            &updates,
            &idempotency_key,
        )?;
        if updates.len() as u64 > metadata.max_epoch_updates {
            return Err(SequencerError::BatchTooLarge {
                len: updates.len(),
                max: metadata.max_epoch_updates as usize,
            });
        }
        // A traced publish: remember its context for the epoch's coordinator.
        let traced = ktd_rpc::telemetry::current_traceparent().map(|traceparent| {
            let labels: Vec<Vec<u8>> = updates.iter().map(|update| update.label.clone()).collect();
            (traceparent, labels)
        });
        // Hashing up to 16 MiB is CPU work: off the async threads.
        let (updates, payload_hash) = if idempotency_key.is_empty() {
            (updates, Vec::new())
        } else {
            blocking(move || {
                let hash = payload_hash(&updates).to_vec();
                Ok((updates, hash))
            })
            .await?
        };
        match self
            .propose(pb::command::Kind::Append(pb::AppendRequest {
                payload_hash,
                updates,
                idempotency_key,
                proposed_at_ms: unix_ms(),
                retry_key,
            }))
            .await?
        {
            pb::apply_result::Kind::Appended(answer) => {
                if !answer.duplicate {
                    self.inner.inclusion.acknowledged(
                        answer.epoch,
                        u64::from(answer.count),
                        std::time::Instant::now(),
                    );
                    if let Some((traceparent, labels)) = traced {
                        self.inner.traces.record(
                            answer.epoch,
                            labels.iter().map(Vec::as_slice),
                            &traceparent,
                        );
                    }
                }
                Ok(answer)
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Seals `epoch` (or the open epoch if `None`). An empty open epoch is refused.
    pub async fn seal(&self, epoch: Option<u64>) -> Result<pb::SealResponse> {
        let epoch = match epoch {
            Some(epoch) => epoch,
            None => {
                self.ensure_leader()?;
                self.inner.sm.view().borrow().epochs().open_epoch
            }
        };
        match self
            .propose(pb::command::Kind::Seal(pb::SealRequest {
                epoch,
                heartbeat: false,
                sealed_at_ms: unix_ms(),
            }))
            .await?
        {
            pb::apply_result::Kind::Sealed(sealed) => Ok(sealed),
            other => Err(unexpected(&other)),
        }
    }

    /// Seals open epoch `epoch` even if it holds no update: a heartbeat epoch (root unchanged,
    /// a new epoch number and audit step). Refused before the first epoch with updates.
    pub async fn heartbeat(&self, epoch: u64) -> Result<pb::SealResponse> {
        match self
            .propose(pb::command::Kind::Seal(pb::SealRequest {
                epoch,
                heartbeat: true,
                sealed_at_ms: unix_ms(),
            }))
            .await?
        {
            pb::apply_result::Kind::Sealed(sealed) => Ok(sealed),
            other => Err(unexpected(&other)),
        }
    }

    /// Records the root of a sealed epoch (with its partition roots, leaf digests and the
    /// replicas' progress): accepted once per epoch and in order; the same root again is OK; a
    /// different root for a committed epoch is refused (`ALREADY_EXISTS`). The commit is stamped
    /// with this node's clock.
    pub async fn commit_epoch(
        &self,
        mut commit: pb::CommitEpochRequest,
    ) -> Result<pb::CommitEpochResponse> {
        if commit.root_hash.len() != 32 {
            return Err(SequencerError::InvalidRootHash {
                len: commit.root_hash.len(),
            });
        }
        commit.committed_at_ms = unix_ms();
        match self.propose(pb::command::Kind::CommitEpoch(commit)).await? {
            pb::apply_result::Kind::Committed(committed) => Ok(committed),
            other => Err(unexpected(&other)),
        }
    }

    /// Sets the cluster metadata (see the `InitCluster` RPC).
    pub async fn init_cluster(&self, metadata: pb::ClusterMetadata) -> Result<pb::ClusterMetadata> {
        machine::validate_metadata(&metadata).map_err(SequencerError::InvalidRequest)?;
        match self
            .propose(pb::command::Kind::InitCluster(metadata))
            .await?
        {
            pb::apply_result::Kind::Metadata(metadata) => Ok(metadata),
            other => Err(unexpected(&other)),
        }
    }

    /// Changes the history retention record (see the `UpdateRetention` RPC) and returns it.
    /// The time the command carries is this leader's clock.
    pub async fn update_retention(
        &self,
        mut command: pb::RetentionCommand,
    ) -> Result<pb::HistoryRetention> {
        command.now_ms = unix_ms();
        match self.propose(pb::command::Kind::Retention(command)).await? {
            pb::apply_result::Kind::Retention(history) => Ok(history),
            other => Err(unexpected(&other)),
        }
    }

    /// One step of restoring a backup (see the `Restore` RPC); returns the restore's state.
    pub async fn restore(&self, command: pb::RestoreCommand) -> Result<pb::RestoreState> {
        match self.propose(pb::command::Kind::Restore(command)).await? {
            pb::apply_result::Kind::Restore(state) => Ok(state),
            other => Err(unexpected(&other)),
        }
    }

    /// The history retention record as applied on this node.
    pub fn history_retention(&self) -> pb::HistoryRetention {
        crate::history::to_pb(&self.inner.sm.view().borrow().epochs().history)
    }

    /// Replaces the shard map if it is still at `expected_version`.
    pub async fn set_shard_map(
        &self,
        map: ktd_proto::ktd::cluster::v1::ShardMap,
        expected_version: u64,
    ) -> Result<ktd_proto::ktd::cluster::v1::ShardMap> {
        match self
            .propose(pb::command::Kind::SetShardMap(pb::SetShardMapRequest {
                shards: Vec::new(),
                expected_version,
                map: Some(map),
            }))
            .await?
        {
            pb::apply_result::Kind::ShardMap(map) => Ok(map),
            other => Err(unexpected(&other)),
        }
    }

    fn ensure_leader(&self) -> Result<()> {
        let leader = self.inner.leader.borrow().clone();
        if leader.is_self {
            Ok(())
        } else {
            Err(SequencerError::NotLeader {
                leader_id: leader.leader_id,
                leader_addr: leader.leader_addr,
            })
        }
    }

    /// Refuses work while this node leads without a quorum's recent acknowledgement (longer
    /// than `raft.election_timeout_max`): a leader cut off in a minority never learns of the
    /// newer term by itself, and openraft does not step it down, so without this check its
    /// writes and reads would wait for a quorum that cannot answer. Single-voter clusters are
    /// their own quorum.
    fn check_lease(&self) -> Result<()> {
        use openraft::Instant as _;
        use openraft::async_runtime::WatchReceiver;
        let metrics = self.inner.raft.metrics();
        let metrics = metrics.borrow_watched();
        if metrics.state != ServerState::Leader
            || metrics.membership_config.membership().voter_ids().count() <= 1
        {
            return Ok(());
        }
        let Some(acked) = &metrics.last_quorum_acked else {
            return Ok(());
        };
        let since = acked.elapsed();
        if since > self.inner.config.raft.election_timeout_max {
            return Err(SequencerError::LeaseExpired {
                since_ms: since.as_millis() as u64,
            });
        }
        Ok(())
    }

    /// Confirms leadership with a ReadIndex round and waits until this node has applied
    /// everything committed before the read.
    pub async fn linearize(&self) -> Result<()> {
        self.check_lease()?;
        self.inner
            .raft
            .ensure_linearizable(ReadPolicy::ReadIndex)
            .await
            .map(|_| ())
            .map_err(|error| match error {
                RaftError::APIError(LinearizableReadError::ForwardToLeader(forward)) => {
                    not_leader(forward.leader_id, forward.leader_node.as_ref())
                }
                RaftError::APIError(LinearizableReadError::QuorumNotEnough(error)) => {
                    SequencerError::NoQuorum(error.to_string())
                }
                RaftError::Fatal(openraft::error::Fatal::Stopped) => SequencerError::ShuttingDown,
                RaftError::Fatal(fatal) => SequencerError::Raft(fatal.to_string()),
            })
    }

    /// The latest committed epoch, or `epoch` (linearizable). Epoch 0 is the empty directory.
    pub async fn get_epoch(&self, epoch: Option<u64>) -> Result<pb::EpochRecord> {
        self.linearize().await?;
        self.get_local_epoch(epoch).await
    }

    /// The latest committed epoch, or `epoch`, from this node's applied state without a
    /// linearizable read (any member answers; for comparing replicas, never for clients).
    pub async fn get_local_epoch(&self, epoch: Option<u64>) -> Result<pb::EpochRecord> {
        let latest = self.inner.sm.view().borrow().epochs().last_committed_epoch;
        let epoch = epoch.unwrap_or(latest);
        if epoch > latest {
            return Err(SequencerError::EpochNotFound { epoch, latest });
        }
        let sm = self.inner.sm.clone();
        blocking(move || sm.epoch_record(epoch))
            .await?
            .ok_or(SequencerError::Corrupt(format!(
                "committed epoch {epoch} has no record"
            )))
    }

    /// A sealed epoch's batch from this node's state, whole (the in-process coordinator).
    pub async fn sealed_batch(&self, epoch: u64) -> Result<BatchRead> {
        let sm = self.inner.sm.clone();
        let batch = blocking(move || sm.read_batch(Some(epoch))).await?;
        if !batch.sealed {
            return Err(SequencerError::EpochNotSealed { epoch, open: epoch });
        }
        Ok(batch)
    }

    /// The open epoch's pending updates from this node's state, whole.
    pub async fn open_epoch(&self) -> Result<BatchRead> {
        let sm = self.inner.sm.clone();
        blocking(move || sm.read_batch(None)).await
    }

    /// Starts a paged read of a batch from this node's state: a sealed epoch's, or the open
    /// one's (`None`); see [`SmShared::start_batch_read`].
    pub async fn start_batch(&self, epoch: Option<u64>) -> Result<BatchCursor> {
        let sm = self.inner.sm.clone();
        let cursor = blocking(move || sm.start_batch_read(epoch)).await?;
        if let Some(epoch) = epoch
            && !cursor.sealed
        {
            return Err(SequencerError::EpochNotSealed { epoch, open: epoch });
        }
        Ok(cursor)
    }

    /// The next page of a paged batch read: about `max_bytes` of updates (see
    /// [`SmShared::read_batch_page`]), read on a blocking thread.
    pub async fn batch_page(
        &self,
        mut cursor: BatchCursor,
        max_bytes: usize,
        labels_only: bool,
    ) -> Result<(Vec<pb::SequencedUpdate>, BatchCursor)> {
        let sm = self.inner.sm.clone();
        blocking(move || {
            let updates = sm.read_batch_page(&mut cursor, max_bytes, labels_only)?;
            Ok((updates, cursor))
        })
        .await
    }

    /// Checks that this node can stream events from `from_index`: `Err(LogPurged)` if that
    /// position was purged (or predates a snapshot this node installed).
    pub async fn check_log_position(&self, from_index: u64) -> Result<()> {
        let sm = self.inner.sm.clone();
        let first = blocking(move || sm.first_event_index()).await?;
        if from_index.max(1) < first {
            return Err(SequencerError::LogPurged {
                from_index,
                first_retained: first,
            });
        }
        Ok(())
    }

    /// `WatchLog` subscribers open on this node.
    pub fn watch_subscriber_count(&self) -> usize {
        self.inner.config.watch.max_subscribers - self.inner.watch_subscribers.available_permits()
    }

    /// Bytes of events buffered for `WatchLog` subscribers and not yet taken by them.
    pub fn watch_buffered_bytes(&self) -> u64 {
        self.inner.watch_buffered_bytes.load(Ordering::SeqCst)
    }

    /// Committed log events from `from_index` on, then new ones as they are applied; ends on
    /// shutdown. An item is `Err(LogPurged)` if the log was purged under the reader (see
    /// [`Sequencer::check_log_position`] to check the start position first).
    ///
    /// Bounded (`watch.*`): `Err(TooManySubscribers)` past `max_subscribers` streams; events
    /// are read about [`WATCH_READ_BYTES`] at a time and at most `buffer_bytes` of them wait
    /// for the subscriber (one larger event waits alone); a subscriber whose buffer stays full
    /// for `stall_timeout` is dropped, its stream ending with `Err(SubscriberTooSlow)` after the
    /// events already buffered.
    pub fn watch_log(
        &self,
        from_index: u64,
    ) -> Result<impl Stream<Item = Result<pb::LogEvent>> + Send + 'static> {
        let options = self.inner.config.watch.clone();
        let permit = self
            .inner
            .watch_subscribers
            .clone()
            .try_acquire_owned()
            .map_err(|_| SequencerError::TooManySubscribers {
                max: options.max_subscribers,
            })?;
        let budget = u32::try_from(options.buffer_bytes).unwrap_or(u32::MAX);
        let buffer = Arc::new(tokio::sync::Semaphore::new(budget as usize));
        let buffered = self.inner.watch_buffered_bytes.clone();
        // Events are bounded by bytes (`buffer`); the count bound only caps the queue's slots.
        let (sender, receiver) = tokio::sync::mpsc::channel::<(pb::LogEvent, u32)>(4096);
        let (end_sender, end) = tokio::sync::oneshot::channel::<SequencerError>();
        let sm = self.inner.sm.clone();
        let shutdown = self.inner.shutdown.clone();
        let producer_buffer = buffer.clone();
        let producer_buffered = buffered.clone();
        self.inner.tasks.spawn(async move {
            let _permit = permit;
            let buffer = producer_buffer;
            let buffered = producer_buffered;
            let mut view = sm.view();
            let mut next = from_index.max(1);
            let end_with = |error| {
                let _ = end_sender.send(error);
            };
            loop {
                let applied = view.borrow_and_update().last_applied_index;
                if next <= applied {
                    let reader = sm.clone();
                    let to = applied.min(next + 255);
                    let events =
                        blocking(move || reader.read_events(next, to, WATCH_READ_BYTES)).await;
                    let events = match events {
                        Ok(events) if events.is_empty() => {
                            return end_with(SequencerError::LogPurged {
                                from_index: next,
                                first_retained: applied + 1,
                            });
                        }
                        Ok(events) => events,
                        Err(error) => return end_with(error),
                    };
                    for event in events {
                        next = event.index + 1;
                        let size = u32::try_from(prost::Message::encoded_len(&event))
                            .unwrap_or(u32::MAX)
                            .min(budget)
                            .max(1);
                        let acquired = tokio::select! {
                            acquired = tokio::time::timeout(
                                options.stall_timeout,
                                buffer.acquire_many(size),
                            ) => acquired,
                            _ = shutdown.cancelled() => return,
                            _ = sender.closed() => return,
                        };
                        match acquired {
                            Ok(Ok(permit)) => permit.forget(),
                            Ok(Err(_closed)) => return,
                            Err(_elapsed) => {
                                crate::metrics::record_watch_dropped();
                                return end_with(SequencerError::SubscriberTooSlow {
                                    waited_ms: options.stall_timeout.as_millis() as u64,
                                    buffered_bytes: u64::from(budget)
                                        - buffer.available_permits() as u64,
                                });
                            }
                        }
                        buffered.fetch_add(u64::from(size), Ordering::SeqCst);
                        if sender.send((event, size)).await.is_err() {
                            buffered.fetch_sub(u64::from(size), Ordering::SeqCst);
                            return;
                        }
                    }
                    continue;
                }
                tokio::select! {
                    changed = view.changed() => if changed.is_err() { return },
                    _ = shutdown.cancelled() => return,
                    _ = sender.closed() => return,
                }
            }
        });
        Ok(WatchStream {
            receiver,
            end: Some(end),
            buffer,
            buffered,
        })
    }

    /// The cluster metadata and shard map as applied on this node.
    pub fn cluster_metadata(
        &self,
    ) -> (
        Option<pb::ClusterMetadata>,
        ktd_proto::ktd::cluster::v1::ShardMap,
    ) {
        let epochs = self.inner.sm.view().borrow().epochs();
        (epochs.metadata, epochs.shard_map)
    }

    /// This node's own status.
    pub fn node_status(&self) -> pb::NodeStatus {
        let metrics = self.inner.metrics.clone().borrow().clone();
        // The few numbers needed, read in place (the view's epoch state is large).
        let (
            last_applied_index,
            open_epoch_updates,
            open_epoch,
            last_sealed,
            last_committed,
            next_sequence,
        ) = {
            let view = self.inner.sm.view();
            let view = view.borrow();
            let initial = machine::EpochState::default();
            let epochs = view.epochs.as_ref().unwrap_or(&initial);
            (
                view.last_applied_index,
                view.open_epoch_updates,
                epochs.open_epoch,
                epochs.last_sealed_epoch(),
                epochs.last_committed_epoch,
                epochs.next_sequence,
            )
        };
        let index = |log_id: Option<raft::types::LogId>| log_id.map_or(0, |log_id| log_id.index());
        pb::NodeStatus {
            node_id: self.inner.id,
            address: self.inner.config.advertise_addr().to_string(),
            state: state_name(metrics.state).into(),
            term: metrics.current_term,
            leader_id: metrics.current_leader.unwrap_or(0),
            last_log_index: metrics.last_log_index.unwrap_or(0),
            committed_index: index(metrics.local_committed),
            applied_index: index(metrics.last_applied).max(last_applied_index),
            snapshot_index: index(metrics.snapshot).max(self.inner.sm.snapshot_index()),
            purged_index: index(metrics.purged),
            open_epoch,
            open_epoch_updates,
            last_sealed_epoch: last_sealed,
            last_committed_epoch: last_committed,
            next_sequence,
            initialized: is_initialized(&metrics),
            commit_stall: self.commit_stall(),
        }
    }

    fn voter_sets(&self, metrics: &RaftMetrics) -> Vec<pb::VoterSet> {
        metrics
            .membership_config
            .membership()
            .get_joint_config()
            .iter()
            .map(|set| pb::VoterSet {
                node_ids: set.iter().copied().collect(),
            })
            .collect()
    }

    /// The cluster as seen from this node, with every member's own status (members that do not
    /// answer within a second are reported with an error).
    pub async fn cluster_status(&self) -> Result<pb::ClusterStatusResponse> {
        let metrics = self.inner.metrics.clone().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let mut members = Vec::new();
        for (id, node) in membership.nodes() {
            let matched_index = metrics
                .replication
                .as_ref()
                .and_then(|replication| replication.get(id).cloned().flatten())
                .map_or(0, |log_id| log_id.index());
            let (status, error) = if *id == self.inner.id {
                (Some(self.node_status()), String::new())
            } else {
                match tokio::time::timeout(
                    Duration::from_secs(1),
                    crate::client::node_status_at(&node.addr),
                )
                .await
                {
                    Ok(Ok(status)) => (Some(status), String::new()),
                    Ok(Err(error)) => (None, error.to_string()),
                    Err(_) => (None, "no answer within 1s".to_string()),
                }
            };
            members.push(pb::MemberStatus {
                node_id: *id,
                address: node.addr.clone(),
                voter: voters.contains(id),
                status,
                error,
                matched_index,
            });
        }
        let epochs = self.inner.sm.view().borrow().epochs();
        Ok(pb::ClusterStatusResponse {
            leader_id: metrics.current_leader.unwrap_or(0),
            term: metrics.current_term,
            members,
            voter_sets: self.voter_sets(&metrics),
            open_epoch: epochs.open_epoch,
            last_committed_epoch: epochs.last_committed_epoch,
            retention: Some(epochs.retention()),
            history: Some(crate::history::to_pb(&epochs.history)),
            restore: epochs.restore.clone(),
            next_sequence: epochs.next_sequence,
        })
    }

    async fn membership_response(&self, log_index: u64) -> Result<pb::MembershipResponse> {
        let status = self.cluster_status().await?;
        Ok(pb::MembershipResponse {
            voter_sets: status.voter_sets,
            members: status.members,
            log_index,
        })
    }

    /// Adds a learner (optionally waiting, bounded, until it has caught up).
    pub async fn add_learner(
        &self,
        node_id: NodeId,
        address: String,
        wait: bool,
    ) -> Result<pb::MembershipResponse> {
        if node_id == 0 || address.is_empty() {
            return Err(SequencerError::InvalidRequest(
                "a learner needs a node id > 0 and an address".into(),
            ));
        }
        if self
            .inner
            .sm
            .view()
            .borrow()
            .removed_node_ids
            .contains(&node_id)
        {
            return Err(SequencerError::Membership(format!(
                "node id {node_id} was removed from this cluster and is never accepted again (a \
                 node that lost its log or vote must not rejoin under its old id): start the new \
                 node with a new id"
            )));
        }
        let response = tokio::time::timeout(
            ADMIN_WAIT,
            self.inner
                .raft
                .add_learner(node_id, Node::new(address), wait),
        )
        .await
        .map_err(|_| {
            SequencerError::Timeout(format!(
                "learner {node_id} did not catch up within {ADMIN_WAIT:?}"
            ))
        })?
        .map_err(write_error)?;
        self.membership_response(response.log_id.index()).await
    }

    /// Makes learners voters (joint consensus, then the new configuration).
    pub async fn promote(&self, node_ids: BTreeSet<NodeId>) -> Result<pb::MembershipResponse> {
        if node_ids.is_empty() {
            return Err(SequencerError::InvalidRequest(
                "promote needs at least one node id".into(),
            ));
        }
        let response = tokio::time::timeout(
            ADMIN_WAIT,
            self.inner
                .raft
                .change_membership(ChangeMembers::AddVoterIds(node_ids), false),
        )
        .await
        .map_err(|_| SequencerError::Timeout("membership change".into()))?
        .map_err(write_error)?;
        self.membership_response(response.log_id.index()).await
    }

    /// Removes a voter or a learner. The node id must never be reused.
    pub async fn remove_node(&self, node_id: NodeId) -> Result<pb::MembershipResponse> {
        let metrics = self.inner.metrics.clone().borrow().clone();
        let membership = metrics.membership_config.membership();
        let is_voter = membership.voter_ids().any(|id| id == node_id);
        let change = if is_voter {
            ChangeMembers::RemoveVoters(BTreeSet::from([node_id]))
        } else if membership.get_node(&node_id).is_some() {
            ChangeMembers::RemoveNodes(BTreeSet::from([node_id]))
        } else {
            return Err(SequencerError::InvalidRequest(format!(
                "node {node_id} is not a member"
            )));
        };
        let response =
            tokio::time::timeout(ADMIN_WAIT, self.inner.raft.change_membership(change, false))
                .await
                .map_err(|_| SequencerError::Timeout("membership change".into()))?
                .map_err(write_error)?;
        self.membership_response(response.log_id.index()).await
    }

    /// The most caught-up other voter, if any.
    fn best_successor(&self) -> Option<NodeId> {
        let metrics = self.inner.metrics.clone().borrow().clone();
        let replication = metrics.replication.clone().unwrap_or_default();
        metrics
            .membership_config
            .membership()
            .voter_ids()
            .filter(|id| *id != self.inner.id)
            .max_by_key(|id| {
                replication
                    .get(id)
                    .cloned()
                    .flatten()
                    .map(|log_id| log_id.index())
            })
    }

    /// Hands leadership to `to` (or the most caught-up voter) and waits until someone else
    /// leads. Returns the new leader.
    pub async fn transfer_leader(&self, to: Option<NodeId>, wait: Duration) -> Result<NodeId> {
        self.ensure_leader()?;
        let target = match to {
            Some(target) => target,
            None => self.best_successor().ok_or_else(|| {
                SequencerError::InvalidRequest("there is no other voter to transfer to".into())
            })?,
        };
        let voters: BTreeSet<NodeId> = self
            .inner
            .metrics
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        if target == self.inner.id || !voters.contains(&target) {
            return Err(SequencerError::InvalidRequest(format!(
                "node {target} is not another voter"
            )));
        }
        tracing::info!(to = target, "transferring leadership");
        self.inner
            .raft
            .trigger()
            .transfer_leader(target)
            .await
            .map_err(|fatal| SequencerError::Raft(fatal.to_string()))?;
        let mut leader = self.leader_changes();
        let waited = tokio::time::timeout(wait, async {
            loop {
                let state = leader.borrow_and_update().clone();
                if let Some(new_leader) = state.leader_id
                    && !state.is_self
                    && new_leader != self.inner.id
                {
                    return Ok(new_leader);
                }
                if leader.changed().await.is_err() {
                    return Err(SequencerError::ShuttingDown);
                }
            }
        })
        .await;
        waited.map_err(|_| {
            SequencerError::Timeout(format!("leadership did not move to node {target}"))
        })?
    }

    /// Builds a snapshot now (and optionally purges the log up to it); returns the snapshot and
    /// purged indexes.
    pub async fn trigger_snapshot(&self, purge: bool) -> Result<(u64, u64)> {
        let raft = &self.inner.raft;
        let applied = self.inner.sm.view().borrow().last_applied_index;
        raft.trigger()
            .snapshot()
            .await
            .map_err(|fatal| SequencerError::Raft(fatal.to_string()))?;
        let index = |log_id: Option<raft::types::LogId>| log_id.map_or(0, |log_id| log_id.index());
        let mut metrics = self.inner.metrics.clone();
        let snapshot_index = tokio::time::timeout(ADMIN_WAIT, async {
            loop {
                let snapshot_index = index(metrics.borrow_and_update().snapshot);
                if snapshot_index >= applied {
                    return Ok(snapshot_index);
                }
                if metrics.changed().await.is_err() {
                    return Err(SequencerError::ShuttingDown);
                }
            }
        })
        .await
        .map_err(|_| SequencerError::Timeout("snapshot".into()))??;
        if purge && snapshot_index > 0 {
            raft.trigger()
                .purge_log(snapshot_index)
                .await
                .map_err(|fatal| SequencerError::Raft(fatal.to_string()))?;
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while index(metrics.borrow_and_update().purged) < snapshot_index {
                    if metrics.changed().await.is_err() {
                        return;
                    }
                }
            })
            .await;
        }
        let purged = index(self.inner.metrics.borrow().purged);
        Ok((snapshot_index, purged))
    }

    /// Whether the node should receive traffic (see [`readiness`]).
    pub fn is_healthy(&self) -> bool {
        self.readiness().is_ok()
    }

    /// The node's readiness, or why it is not ready (see [`readiness`]).
    pub fn readiness(&self) -> std::result::Result<(), NotReady> {
        let metrics = self.inner.metrics.clone().borrow().clone();
        readiness(
            ReadinessInput {
                shutting_down: self.inner.shutdown.is_cancelled(),
                initialized: is_initialized(&metrics),
                leader_id: metrics.current_leader,
                cluster_committed: metrics
                    .cluster_committed
                    .or(metrics.local_committed)
                    .map_or(0, |log_id| log_id.index()),
                applied: metrics.last_applied.map_or(0, |log_id| log_id.index()),
            },
            self.inner.config.raft.max_apply_lag,
        )
    }

    /// Stops the node: stops Raft and every background task, then syncs the WAL. The database
    /// closes when the last clone of this `Sequencer` is dropped (serving must have stopped).
    pub async fn shutdown(&self) -> Result<()> {
        self.inner.shutdown.cancel();
        let _ = self.inner.raft.shutdown().await;
        self.inner.tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not stop within 10 s");
        }
        // Storage work already handed to blocking threads (and the log flusher thread) holds
        // the database until it finishes; wait for it so the data directory can be reopened.
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            while Arc::strong_count(&self.inner.storage) > 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        if waited.is_err() {
            tracing::warn!("storage still in use 10 s after stopping");
        }
        let storage = self.inner.storage.clone();
        blocking(move || storage.flush()).await?;
        tracing::info!(node_id = self.inner.id, "sequencer node stopped");
        Ok(())
    }

    /// Tracks a background task so that shutdown waits for it.
    pub(crate) fn spawn_task(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.inner.tasks.spawn(task);
    }

    /// Begins shutting down: if this node leads, hands leadership to the most caught-up voter
    /// and waits until another node leads (bounded by `shutdown.transfer_timeout`); then cancels
    /// background tasks and streams. The transfer comes first because the shutdown token also
    /// ends incoming replication streams: cancelled earlier, this node would never hear from
    /// its successor and would wait out the whole bound.
    pub async fn step_down(&self) {
        if self.inner.leader.borrow().is_self {
            match self
                .transfer_leader(None, self.inner.config.shutdown.transfer_timeout)
                .await
            {
                Ok(new_leader) => {
                    tracing::info!(new_leader, "handed over leadership before stopping");
                }
                Err(error) => {
                    tracing::warn!(%error, "could not hand over leadership before stopping");
                }
            }
        }
        self.inner.shutdown.cancel();
    }

    pub(crate) fn storage(&self) -> &Arc<Storage> {
        &self.inner.storage
    }

    pub(crate) fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// The open epoch and how many distinct labels it holds, as applied here.
    pub(crate) fn open_epoch_view(&self) -> (u64, u64, u64) {
        let view = self.inner.sm.view().borrow().clone();
        (
            view.epochs().open_epoch,
            view.open_epoch_updates,
            view.epochs().uncommitted_epochs(),
        )
    }
}

/// What readiness is decided from: one snapshot of a node's Raft metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadinessInput {
    /// Shutdown has begun.
    pub shutting_down: bool,
    /// The node has a membership (bootstrapped, or joined).
    pub initialized: bool,
    /// The leader this node follows (itself included), if it knows one.
    pub leader_id: Option<NodeId>,
    /// The commit index the leader last reported (openraft's `cluster_committed`): a follower
    /// that has not received the entries yet still learns how far behind it is.
    pub cluster_committed: u64,
    /// The last log index applied to this node's state machine.
    pub applied: u64,
}

/// Why a node is not ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    /// Shutdown has begun.
    #[error("shutting down")]
    ShuttingDown,
    /// No membership yet (a node waiting to be added, or to be bootstrapped).
    #[error("not initialised")]
    NotInitialized,
    /// No leader known (an election, or cut off from the cluster).
    #[error("no leader known")]
    NoLeader,
    /// Applied too far behind the cluster's commit index (a restarted or lagging node).
    #[error("applied index {applied} is {lag} entries behind the commit index {committed}")]
    Behind {
        /// Applied index.
        applied: u64,
        /// The leader's commit index.
        committed: u64,
        /// `committed - applied`.
        lag: u64,
    },
}

/// Readiness of a sequencer node, as `grpc.health.v1` reports it: SERVING only when the node is
/// initialised, knows a leader, and has applied to within `max_apply_lag` entries of the commit
/// index the leader reported ("caught up", not just "process alive").
pub fn readiness(input: ReadinessInput, max_apply_lag: u64) -> std::result::Result<(), NotReady> {
    if input.shutting_down {
        return Err(NotReady::ShuttingDown);
    }
    if !input.initialized {
        return Err(NotReady::NotInitialized);
    }
    if input.leader_id.is_none() {
        return Err(NotReady::NoLeader);
    }
    let lag = input.cluster_committed.saturating_sub(input.applied);
    if lag > max_apply_lag {
        return Err(NotReady::Behind {
            applied: input.applied,
            committed: input.cluster_committed,
            lag,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{NotReady, ReadinessInput, readiness};

    fn caught_up() -> ReadinessInput {
        ReadinessInput {
            shutting_down: false,
            initialized: true,
            leader_id: Some(2),
            cluster_committed: 5_000,
            applied: 5_000,
        }
    }

    #[test]
    fn readiness_means_a_leader_known_and_applied_near_the_leaders_commit() {
        assert_eq!(readiness(caught_up(), 1_000), Ok(()));
        let within = ReadinessInput {
            applied: 4_000,
            ..caught_up()
        };
        assert_eq!(readiness(within, 1_000), Ok(()));
        // A restarted follower that learnt the leader's commit index but has not applied up to it.
        let behind = ReadinessInput {
            applied: 3_999,
            ..caught_up()
        };
        assert_eq!(
            readiness(behind, 1_000),
            Err(NotReady::Behind {
                applied: 3_999,
                committed: 5_000,
                lag: 1_001
            })
        );
        let no_leader = ReadinessInput {
            leader_id: None,
            ..caught_up()
        };
        assert_eq!(readiness(no_leader, 1_000), Err(NotReady::NoLeader));
        let fresh = ReadinessInput {
            initialized: false,
            leader_id: None,
            ..caught_up()
        };
        assert_eq!(readiness(fresh, 1_000), Err(NotReady::NotInitialized));
        let stopping = ReadinessInput {
            shutting_down: true,
            ..caught_up()
        };
        assert_eq!(readiness(stopping, 1_000), Err(NotReady::ShuttingDown));
    }
}
