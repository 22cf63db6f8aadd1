//! [`SequencerClient`]: a typed client for a sequencer cluster that finds the leader.
//!
//! Calls that must reach the leader go to the last node that answered as leader; a follower's
//! `UNAVAILABLE` with a leader hint (`ktd-leader-addr`) redirects the next attempt at once (for
//! [`MAX_IMMEDIATE_HINTS`] hints in a row; later ones after the backoff), other
//! retryable failures (connection refused, no leader yet, a node shutting down, a timed-out
//! attempt) move to the next configured endpoint after an exponential backoff. Attempts and total
//! time are bounded ([`ClientOptions`]). Only operations that are safe to repeat are retried
//! after an indeterminate failure: appends always carry an idempotency key (one is generated if
//! the caller gives none), `Seal(E)` is idempotent by design.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use ktd_proto::ktd::sequencer::v1 as pb;
use ktd_proto::ktd::sequencer::v1::sequencer_admin_client::SequencerAdminClient;
use ktd_proto::ktd::sequencer::v1::sequencer_client::SequencerClient as ApiClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::error::{LEADER_ADDR_METADATA, Result, SequencerError};
use crate::raft::NodeId;
use crate::raft::network::endpoint;

/// Leader hints followed at once in a row; later hints are followed after the backoff (hints
/// can point in a circle during an election).
pub const MAX_IMMEDIATE_HINTS: u32 = 2;

/// Retry and timeout policy.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Most attempts per call (the first one included).
    pub max_attempts: u32,
    /// Total time a call may spend retrying.
    pub total_timeout: Duration,
    /// Deadline of one attempt.
    pub attempt_timeout: Duration,
    /// First backoff; doubles per failed attempt up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Largest backoff.
    pub max_backoff: Duration,
    /// Bound on connecting to a node.
    pub connect_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            max_attempts: 30,
            total_timeout: Duration::from_secs(15),
            attempt_timeout: Duration::from_secs(5),
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
            connect_timeout: Duration::from_millis(500),
        }
    }
}

/// Whether a failed attempt may have taken effect.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Only retry failures that certainly did not reach the state machine (not the leader).
    IfNotApplied,
    /// Retry any transient failure (the operation is idempotent).
    Idempotent,
}

/// A client for a sequencer cluster. Cheap to clone.
#[derive(Clone, Debug)]
pub struct SequencerClient {
    inner: Arc<ClientInner>,
}

#[derive(Debug)]
struct ClientInner {
    endpoints: Vec<String>,
    options: ClientOptions,
    channels: Mutex<HashMap<String, Channel>>,
    /// The node to try first: the last leader seen or hinted.
    preferred: Mutex<Option<String>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn is_transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
            | Code::Aborted
    ) && !(status.code() == Code::Aborted && status.message().contains("shard map"))
}

impl SequencerClient {
    /// A client for the cluster whose nodes listen at `endpoints` (`HOST:PORT`).
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self::with_options(endpoints, ClientOptions::default())
    }

    /// A client with an explicit retry policy.
    pub fn with_options(
        endpoints: impl IntoIterator<Item = impl Into<String>>,
        options: ClientOptions,
    ) -> Self {
        Self {
            inner: Arc::new(ClientInner {
                endpoints: endpoints.into_iter().map(Into::into).collect(),
                options,
                channels: Mutex::new(HashMap::new()),
                preferred: Mutex::new(None),
            }),
        }
    }

    fn channel(&self, addr: &str) -> Result<Channel> {
        let mut channels = lock(&self.inner.channels);
        if let Some(channel) = channels.get(addr) {
            return Ok(channel.clone());
        }
        let channel = endpoint(addr, self.inner.options.connect_timeout)
            .map_err(|error| {
                SequencerError::InvalidRequest(format!("bad address {addr:?}: {error}"))
            })?
            .connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        ktd_rpc::telemetry::inject_context(&mut request);
        request.set_timeout(self.inner.options.attempt_timeout);
        request
    }

    /// A request for a server stream: trace context, no `grpc-timeout` (the caller bounds each
    /// message instead).
    fn stream_request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        ktd_rpc::telemetry::inject_context(&mut request);
        request
    }

    /// Runs `call` against the leader, following hints and retrying (see the module docs).
    async fn on_leader<T, F, Fut>(&self, retry: Retry, mut call: F) -> Result<T>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = std::result::Result<T, Status>>,
    {
        let options = &self.inner.options;
        if self.inner.endpoints.is_empty() {
            return Err(SequencerError::InvalidRequest(
                "the client has no endpoints".into(),
            ));
        }
        let started = Instant::now();
        let mut backoff = options.initial_backoff;
        let mut rotation = 0usize;
        let mut hints_in_a_row = 0u32;
        let mut last_error = None;
        for attempt in 0..options.max_attempts {
            let addr = lock(&self.inner.preferred).clone().unwrap_or_else(|| {
                self.inner.endpoints[rotation % self.inner.endpoints.len()].clone()
            });
            let channel = self.channel(&addr)?;
            let outcome = tokio::time::timeout(options.attempt_timeout, call(channel))
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded("attempt timed out")));
            let status = match outcome {
                Ok(value) => {
                    *lock(&self.inner.preferred) = Some(addr);
                    return Ok(value);
                }
                Err(status) => status,
            };
            let hint = status
                .metadata()
                .get(LEADER_ADDR_METADATA)
                .and_then(|value| value.to_str().ok())
                .map(str::to_string);
            let not_leader = status.code() == Code::Unavailable
                && status.message().starts_with("not the leader");
            let retryable = match retry {
                Retry::Idempotent => is_transient(&status),
                // Not the leader, or the connection was refused: the request never ran.
                Retry::IfNotApplied => not_leader || is_connect_failure(&status),
            };
            if !retryable {
                return Err(SequencerError::Remote(status));
            }
            tracing::debug!(attempt, %addr, code = ?status.code(), message = status.message(), "sequencer call will be retried");
            last_error = Some(status);
            match hint {
                Some(hint) if hint != addr => {
                    // Follow the hint at once, twice in a row at most: during an election
                    // nodes may point at each other, and later hints wait for the backoff.
                    *lock(&self.inner.preferred) = Some(hint);
                    hints_in_a_row += 1;
                    if hints_in_a_row <= MAX_IMMEDIATE_HINTS {
                        continue;
                    }
                }
                _ => {
                    hints_in_a_row = 0;
                    *lock(&self.inner.preferred) = None;
                    rotation += 1;
                }
            }
            if started.elapsed() + backoff > options.total_timeout {
                break;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(options.max_backoff);
        }
        Err(SequencerError::Remote(last_error.unwrap_or_else(|| {
            Status::unavailable("no sequencer answered")
        })))
    }

    /// Appends a batch. The caller's idempotency key is remembered for the cluster's
    /// `idempotency_retention`; without one, a random key is made up (a `retry_key`, remembered
    /// for a shorter window) so that this client's own retries are safe.
    pub async fn append(
        &self,
        updates: Vec<pb::Update>,
        idempotency_key: Option<Vec<u8>>,
    ) -> Result<pb::AppendResponse> {
        let retry_key = idempotency_key.is_none();
        let idempotency_key =
            idempotency_key.unwrap_or_else(|| rand::random::<[u8; 16]>().to_vec());
        let request = pb::AppendRequest {
            updates,
            idempotency_key,
            // Stamped and computed by the node that proposes it.
            proposed_at_ms: 0,
            payload_hash: Vec::new(),
            retry_key,
        };
        self.on_leader(Retry::Idempotent, |channel| {
            let request = self.request(request.clone());
            async move {
                ApiClient::new(channel)
                    .append(request)
                    .await
                    .map(tonic::Response::into_inner)
            }
        })
        .await
    }

    /// The latest committed epoch, or `epoch` (linearizable).
    pub async fn get_epoch(&self, epoch: Option<u64>) -> Result<pb::EpochRecord> {
        self.on_leader(Retry::Idempotent, |channel| {
            let request = self.request(pb::GetEpochRequest {
                epoch,
                local: false,
            });
            async move {
                ApiClient::new(channel)
                    .get_epoch(request)
                    .await
                    .map(tonic::Response::into_inner)
            }
        })
        .await
    }

    /// Seals `epoch`, or the open epoch if `None` (not retried after an indeterminate failure,
    /// since "the open epoch" may have moved on).
    pub async fn seal(&self, epoch: Option<u64>) -> Result<pb::SealResponse> {
        let retry = if epoch.is_some() {
            Retry::Idempotent
        } else {
            Retry::IfNotApplied
        };
        self.on_leader(retry, |channel| {
            let request = self.request(pb::SealRequest {
                epoch: epoch.unwrap_or(0),
                heartbeat: false,
                // Stamped by the node that proposes it.
                sealed_at_ms: 0,
            });
            async move {
                SequencerAdminClient::new(channel)
                    .seal(request)
                    .await
                    .map(tonic::Response::into_inner)
            }
        })
        .await
    }

    /// Sets the cluster metadata on the leader.
    pub async fn init_cluster(&self, metadata: pb::ClusterMetadata) -> Result<pb::ClusterMetadata> {
        self.on_leader(Retry::Idempotent, |channel| {
            let request = self.request(metadata.clone());
            async move {
                SequencerAdminClient::new(channel)
                    .init_cluster(request)
                    .await
                    .map(tonic::Response::into_inner)
            }
        })
        .await
    }

    /// Changes the history retention record (window, pins) on the leader; setting the window or
    /// adding or removing a pin is idempotent, so it is retried like one.
    pub async fn update_retention(
        &self,
        command: pb::RetentionCommand,
    ) -> Result<pb::HistoryRetention> {
        self.on_leader(Retry::Idempotent, |channel| {
            let request = self.request(command.clone());
            async move {
                SequencerAdminClient::new(channel)
                    .update_retention(request)
                    .await
                    .map(tonic::Response::into_inner)
            }
        })
        .await
    }

    /// One step of restoring a backup (`ktd admin restore`). A step is idempotent (records
    /// already installed with the same roots are skipped), so it is retried like one.
    pub async fn restore(&self, command: pb::RestoreCommand) -> Result<pb::RestoreState> {
        self.on_leader(Retry::Idempotent, |channel| {
            let request = self.request(command.clone());
            async move {
                SequencerAdminClient::new(channel)
                    .restore(request)
                    .await
                    .map(tonic::Response::into_inner)
            }
        })
        .await
    }

    /// The history retention record as the leader applied it.
    pub async fn retention(&self) -> Result<pb::HistoryRetention> {
        self.on_leader(Retry::Idempotent, |channel| {
            let request = self.request(pb::GetRetentionRequest {});
            async move {
                SequencerAdminClient::new(channel)
                    .get_retention(request)
                    .await
                    .map(tonic::Response::into_inner)
            }
        })
        .await
    }

    /// Replaces the shard map if it is at `expected_version`.
    pub async fn set_shard_map(
        &self,
        map: ktd_proto::ktd::cluster::v1::ShardMap,
        expected_version: u64,
    ) -> Result<ktd_proto::ktd::cluster::v1::ShardMap> {
        let request = pb::SetShardMapRequest {
            shards: Vec::new(),
            expected_version,
            map: Some(map),
        };
        self.on_leader(Retry::IfNotApplied, |channel| {
            let request = self.request(request.clone());
            async move {
                SequencerAdminClient::new(channel)
                    .set_shard_map(request)
                    .await
                    .map(|response| response.into_inner().shard_map.unwrap_or_default())
            }
        })
        .await
    }

    /// Cluster status as the leader sees it.
    pub async fn cluster_status(&self) -> Result<pb::ClusterStatusResponse> {
        self.on_leader(Retry::Idempotent, |channel| {
            let request = self.request(pb::ClusterStatusRequest {});
            async move {
                let status = SequencerAdminClient::new(channel)
                    .get_cluster_status(request)
                    .await?
                    .into_inner();
                if status.leader_id == 0 {
                    return Err(Status::unavailable(
                        "not the leader; no leader is known yet",
                    ));
                }
                Ok(status)
            }
        })
        .await
    }

    /// Adds a learner (waiting, bounded, for it to catch up if `wait`).
    pub async fn add_learner(
        &self,
        node_id: NodeId,
        address: String,
        wait: bool,
    ) -> Result<pb::MembershipResponse> {
        self.on_leader(Retry::IfNotApplied, |channel| {
            let mut request = tonic::Request::new(pb::AddLearnerRequest {
                node_id,
                address: address.clone(),
                wait,
            });
            request.set_timeout(Duration::from_secs(60));
            async move {
                SequencerAdminClient::new(channel)
                    .add_learner(request)
                    .await
                    .map(tonic::Response::into_inner)
            }
        })
        .await
    }

    /// Makes learners voters.
    pub async fn promote(&self, node_ids: BTreeSet<NodeId>) -> Result<pb::MembershipResponse> {
        self.on_leader(Retry::IfNotApplied, |channel| {
            let mut request = tonic::Request::new(pb::PromoteRequest {
                node_ids: node_ids.iter().copied().collect(),
            });
            request.set_timeout(Duration::from_secs(60));
            async move {
                SequencerAdminClient::new(channel)
                    .promote(request)
                    .await
                    .map(tonic::Response::into_inner)
            }
        })
        .await
    }

    /// Removes a voter or learner.
    pub async fn remove_node(&self, node_id: NodeId) -> Result<pb::MembershipResponse> {
        self.on_leader(Retry::IfNotApplied, |channel| {
            let mut request = tonic::Request::new(pb::RemoveNodeRequest { node_id });
            request.set_timeout(Duration::from_secs(60));
            async move {
                SequencerAdminClient::new(channel)
                    .remove_node(request)
                    .await
                    .map(tonic::Response::into_inner)
            }
        })
        .await
    }

    /// Moves leadership to `to` (or the most caught-up voter); returns the new leader.
    pub async fn transfer_leader(&self, to: Option<NodeId>) -> Result<NodeId> {
        self.on_leader(Retry::IfNotApplied, |channel| {
            let mut request = tonic::Request::new(pb::TransferLeaderRequest {
                to_node_id: to.unwrap_or(0),
            });
            request.set_timeout(Duration::from_secs(20));
            async move {
                SequencerAdminClient::new(channel)
                    .transfer_leader(request)
                    .await
                    .map(|response| response.into_inner().leader_id)
            }
        })
        .await
    }

    /// The cluster metadata as applied on the first node that answers.
    pub async fn cluster_metadata(&self) -> Result<pb::ClusterMetadataResponse> {
        self.on_leader(Retry::Idempotent, |channel| {
            let request = self.request(pb::GetClusterMetadataRequest {});
            async move {
                ApiClient::new(channel)
                    .get_cluster_metadata(request)
                    .await
                    .map(tonic::Response::into_inner)
            }
        })
        .await
    }

    /// A sealed epoch's batch from the node at `addr`, all chunks collected. The stream has no
    /// overall deadline; each chunk must arrive within `attempt_timeout` of the previous one.
    pub async fn sealed_batch_at(&self, addr: &str, epoch: u64) -> Result<Vec<pb::BatchChunk>> {
        let mut client = ApiClient::new(self.channel(addr)?).max_decoding_message_size(64 << 20);
        let idle = self.inner.options.attempt_timeout;
        let request = self.stream_request(pb::GetSealedBatchRequest { epoch });
        let stream = within(idle, client.get_sealed_batch(request))
            .await?
            .into_inner();
        Ok(collect(stream, idle).await?)
    }

    /// The open epoch's updates from the node at `addr`, all chunks collected (deadlines as
    /// for [`SequencerClient::sealed_batch_at`]).
    pub async fn open_epoch_at(&self, addr: &str) -> Result<Vec<pb::BatchChunk>> {
        self.open_epoch_chunks(addr, false).await
    }

    /// The open epoch's labels (values left empty) from the node at `addr`: what a shard's log
    /// tail needs, at a fraction of the bytes.
    pub async fn open_epoch_labels_at(&self, addr: &str) -> Result<Vec<pb::BatchChunk>> {
        self.open_epoch_chunks(addr, true).await
    }

    async fn open_epoch_chunks(
        &self,
        addr: &str,
        labels_only: bool,
    ) -> Result<Vec<pb::BatchChunk>> {
        let mut client = ApiClient::new(self.channel(addr)?).max_decoding_message_size(64 << 20);
        let idle = self.inner.options.attempt_timeout;
        let request = self.stream_request(pb::GetOpenEpochRequest { labels_only });
        let stream = within(idle, client.get_open_epoch(request))
            .await?
            .into_inner();
        Ok(collect(stream, idle).await?)
    }

    /// Tails the committed log of the node at `addr` from `from_index` (no deadline: the stream
    /// lives until the caller drops it or the node shuts down).
    pub async fn watch_log_at(
        &self,
        addr: &str,
        from_index: u64,
    ) -> Result<tonic::Streaming<pb::LogEvent>> {
        let mut client = ApiClient::new(self.channel(addr)?).max_decoding_message_size(64 << 20);
        Ok(client
            .watch_log(pb::WatchLogRequest { from_index })
            .await?
            .into_inner())
    }

    /// The node at `addr`'s own status.
    pub async fn node_status_at(&self, addr: &str) -> Result<pb::NodeStatus> {
        let mut client = SequencerAdminClient::new(self.channel(addr)?);
        Ok(client
            .get_node_status(self.request(pb::NodeStatusRequest {}))
            .await?
            .into_inner())
    }

    /// Epoch `epoch` (or the latest) as the node at `addr` has applied it, without a
    /// linearizable read: for comparing replicas.
    pub async fn local_epoch_at(&self, addr: &str, epoch: Option<u64>) -> Result<pb::EpochRecord> {
        let mut client = ApiClient::new(self.channel(addr)?);
        Ok(client
            .get_epoch(self.request(pb::GetEpochRequest { epoch, local: true }))
            .await?
            .into_inner())
    }

    /// Builds a snapshot on the node at `addr` (optionally purging its log).
    pub async fn trigger_snapshot_at(
        &self,
        addr: &str,
        purge: bool,
    ) -> Result<pb::TriggerSnapshotResponse> {
        let mut client = SequencerAdminClient::new(self.channel(addr)?);
        let mut request = tonic::Request::new(pb::TriggerSnapshotRequest { purge });
        request.set_timeout(Duration::from_secs(60));
        Ok(client.trigger_snapshot(request).await?.into_inner())
    }
}

fn is_connect_failure(status: &Status) -> bool {
    status.code() == Code::Unavailable
        && (status.message().contains("connect") || status.message().contains("shutting down"))
}

/// Runs `call` for at most `limit` (a stream's start, or one of its messages).
async fn within<T>(
    limit: Duration,
    call: impl Future<Output = std::result::Result<T, Status>>,
) -> std::result::Result<T, Status> {
    tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
        Err(Status::deadline_exceeded(format!(
            "nothing received for {} ms",
            limit.as_millis()
        )))
    })
}

/// Collects a stream, each message within `idle` of the previous one (no overall deadline: a
/// large batch takes as long as it takes while it keeps moving).
async fn collect<T>(
    mut stream: tonic::Streaming<T>,
    idle: Duration,
) -> std::result::Result<Vec<T>, Status> {
    let mut items = Vec::new();
    while let Some(item) = within(idle, async { stream.next().await.transpose() }).await? {
        items.push(item);
    }
    Ok(items)
}

/// One node's status, with a one-off connection (used by `ClusterStatus`).
pub async fn node_status_at(addr: &str) -> Result<pb::NodeStatus> {
    let options = ClientOptions::default();
    let channel = endpoint(addr, options.connect_timeout)
        .map_err(|error| SequencerError::InvalidRequest(format!("bad address {addr:?}: {error}")))?
        .connect()
        .await
        .map_err(|error| {
            SequencerError::Remote(Status::unavailable(format!("connect to {addr}: {error}")))
        })?;
    let mut request = tonic::Request::new(pb::NodeStatusRequest {});
    request.set_timeout(Duration::from_secs(1));
    Ok(SequencerAdminClient::new(channel)
        .get_node_status(request)
        .await?
        .into_inner())
}
