//! The public `ktd.v1.Directory` and `ktd.v1.Admin` services.
//!
//! Publishes go to the sequencer; reads resolve a committed epoch (the latest, linearizable, or
//! the requested one), then fan out to the owning shards in parallel through
//! [`shard::cluster`], which stitches the proof — routed by a shard map at least as new as the
//! one the epoch's record names (see [`Gateway`]). Every request holds one of a bounded number of
//! in-flight permits (none left: `RESOURCE_EXHAUSTED`, at once) and runs under its deadline (the
//! client's `grpc-timeout`, capped by the gateway's own); when it expires the handler's future is
//! dropped, which cancels the calls it made downstream.
//!
//! Expensive reads also spend the caller's budget ([`crate::rate`]): a complete history or one
//! over [`CHEAP_HISTORY_VERSIONS`] versions and a `GetEpoch{wait}` cost 1 (and a wait holds one
//! of the caller's waits), an `Audit` [`audit_cost`]. Callers without a client certificate over
//! TLS are also capped in size (history versions, audit span): what one anonymous request can
//! cost is bounded, not only how many it sends.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use ktd_core::akd_core::AkdLabel;
use ktd_core::akd_core::configuration::Configuration;
use ktd_core::akd_core::verify::history::HistoryParams;
use ktd_core::stitch::TopTree;
use ktd_core::user::UpdateLimits;
use ktd_proto::audit_blob::{AuditBlobName, BadAuditBlobName};
use ktd_proto::ktd::v1 as api;
use sequencer::pb;
use shard::cluster::ShardConnector;
use shard::cluster::{self, ShardSet};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Response, Status};

use crate::epochs::{Committed, Epochs};
use crate::error::{GatewayError, Result};
use crate::rate::{Caller, RateLimiter, RateLimits};
use crate::sequencing::Sequencing;

/// Gateway limits and timeouts.
#[derive(Clone, Debug)]
pub struct GatewayOptions {
    /// Requests served at once; more are refused with `RESOURCE_EXHAUSTED`.
    pub max_in_flight: usize,
    /// Longest label, in bytes.
    pub max_label_bytes: usize,
    /// Largest value, in bytes.
    pub max_value_bytes: usize,
    /// Most updates in one `Publish`.
    pub max_publish_updates: usize,
    /// Most epochs one `Audit` may span.
    pub max_audit_epochs: u64,
    /// Deadline of a request that carries none (and the cap on any it carries).
    pub max_request_time: Duration,
    /// How often the shard map is re-read from the sequencer leader. Reads do not depend on it
    /// for correctness: an epoch whose record names a newer map, or a read every replica in the
    /// cached map failed, re-reads the map at once (see [`Gateway`]).
    pub shard_map_refresh: Duration,
    /// **Deliberately broken, test-only**: serve latest-epoch lookups from a view of the latest
    /// epoch refreshed at most this often instead of a linearizable read (stale reads). Set only
    /// by `ktd gateway --unsafe-test-mode` with `KTD_UNSAFE_STALE_READS=<duration>`; it exists so
    /// the chaos checkers can be shown to catch a real broken mode end to end.
    pub unsafe_stale_reads: Option<Duration>,
    /// Serve the `Admin` service (seal, cluster status) on this address instead of the public
    /// one (recommended: keep it off networks clients reach). The process binds it (`ktd`
    /// refuses plaintext on it off loopback, like on every listener) and hands the listener to
    /// [`crate::server::serve`].
    pub admin_listen: Option<String>,
    /// Serve the audit blobs over plain HTTP in the S3 `ListObjectsV2` layout on this address
    /// ([`crate::blob_http`]; no TLS: the blobs are public and verifiable, put a CDN or a TLS
    /// proxy in front).
    pub blob_listen: Option<String>,
    /// With TLS: accept public-port clients without a certificate (role `anonymous`:
    /// read-only). The admin port always requires one.
    pub tls_client_auth_optional: bool,
    /// Per-caller budgets of the expensive reads ([`crate::rate`]).
    pub rate_limits: RateLimits,
    /// Most versions of a key history a caller without a client certificate (over TLS) may
    /// ask for (`most_recent` 0, every version, is refused to it).
    pub anonymous_max_history_versions: u64,
    /// Most epochs one `Audit` of a caller without a client certificate (over TLS) may span.
    pub anonymous_max_audit_epochs: u64,
}

/// After a read every replica in the cached map failed, the map is re-read at most this often.
const FAILED_READ_REFRESH: Duration = Duration::from_millis(250);

/// A history of at most this many versions is a cheap read (no budget spent).
pub const CHEAP_HISTORY_VERSIONS: u64 = 16;

/// Budget tokens an `Audit` spanning `epochs` epochs costs: 1, plus 1 per 64 epochs.
pub fn audit_cost(epochs: u64) -> f64 {
    1.0 + (epochs / 64) as f64
}

impl Default for GatewayOptions {
    fn default() -> Self {
        Self {
            max_in_flight: 1024,
            // The shards' own limits: a publish they would refuse is refused here, at once.
            max_label_bytes: UpdateLimits::default().max_label_len,
            max_value_bytes: UpdateLimits::default().max_value_len,
            max_publish_updates: 10_000,
            max_audit_epochs: 1024,
            max_request_time: Duration::from_secs(60),
            shard_map_refresh: Duration::from_secs(5),
            unsafe_stale_reads: None,
            admin_listen: None,
            blob_listen: None,
            tls_client_auth_optional: false,
            rate_limits: RateLimits::default(),
            anonymous_max_history_versions: 64,
            anonymous_max_audit_epochs: 64,
        }
    }
}

/// A gateway: the state behind both services.
///
/// **Routing.** Reads are routed by the shard map, cached and re-read from the sequencer
/// leader every [`GatewayOptions::shard_map_refresh`]. The cache never routes an epoch by a map
/// older than the one its committed record names (`EpochRecord.shard_map_version`, read with
/// the epoch), and a read every replica of a partition failed in the cached map is retried once
/// on a newer map if there is one: a read that races a partition move reaches the new owner
/// within its deadline, whether or not the old owner still holds its copy.
pub struct Gateway<TC> {
    sequencing: Arc<dyn Sequencing>,
    connector: Arc<dyn ShardConnector>,
    metadata: pb::ClusterMetadata,
    epochs: Epochs<TC>,
    shards: Mutex<Option<(Instant, ShardSet)>>,
    /// The cluster's oldest readable epoch as last read with the map (history retention).
    safe_epoch: std::sync::atomic::AtomicU64,
    /// Held while the map is fetched: concurrent readers that need a newer map share a fetch.
    refreshing: tokio::sync::Mutex<()>,
    options: GatewayOptions,
    permits: Arc<Semaphore>,
    rate: RateLimiter,
    config: PhantomData<fn() -> TC>,
}

impl<TC: Configuration> Gateway<TC> {
    /// The gateway's limits and options.
    pub fn options(&self) -> &GatewayOptions {
        &self.options
    }

    /// A gateway for the cluster described by `metadata`.
    pub fn new(
        sequencing: Arc<dyn Sequencing>,
        connector: Arc<dyn ShardConnector>,
        metadata: pb::ClusterMetadata,
        options: GatewayOptions,
    ) -> Result<Arc<Self>> {
        let bits = u8::try_from(metadata.partition_bits).map_err(|_| {
            GatewayError::InvalidArgument(format!(
                "cluster metadata: partition bits {}",
                metadata.partition_bits
            ))
        })?;
        // The deliberately broken test mode is loud: an error log line and a gauge an alert
        // watches (`KtdUnsafeTestMode`), so it cannot run unnoticed where it does not belong.
        let unsafe_mode = options.unsafe_stale_reads.is_some();
        metrics::gauge!("ktd_gateway_unsafe_test_mode").set(if unsafe_mode { 1.0 } else { 0.0 });
        if let Some(max_age) = options.unsafe_stale_reads {
            tracing::error!(
                max_age_ms = max_age.as_millis() as u64,
                "UNSAFE TEST MODE: latest-epoch lookups are served from a stale view \
                 (KTD_UNSAFE_STALE_READS); never run this outside chaos tests"
            );
        }
        Ok(Arc::new(Self {
            epochs: Epochs::new(sequencing.clone(), bits),
            sequencing,
            connector,
            metadata,
            shards: Mutex::new(None),
            safe_epoch: std::sync::atomic::AtomicU64::new(0),
            refreshing: tokio::sync::Mutex::new(()),
            permits: Arc::new(Semaphore::new(options.max_in_flight.max(1))),
            rate: RateLimiter::new(options.rate_limits),
            options,
            config: PhantomData,
        }))
    }

    /// The committed epochs this gateway reads.
    pub fn epochs(&self) -> &Epochs<TC> {
        &self.epochs
    }

    fn admit(&self) -> Result<OwnedSemaphorePermit> {
        self.permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| GatewayError::Overloaded {
                in_flight: self.options.max_in_flight,
            })
    }

    /// Runs `work` under an in-flight permit and the request's deadline. (Every call is
    /// counted and timed by `ktd_rpc::telemetry::GrpcServerLayer`.)
    async fn serve<T, F>(&self, deadline: Option<Duration>, work: F) -> Result<Response<T>, Status>
    where
        F: Future<Output = Result<T>>,
    {
        let _permit = self.admit()?;
        let limit = deadline
            .unwrap_or(self.options.max_request_time)
            .min(self.options.max_request_time);
        match tokio::time::timeout(limit, work).await {
            Ok(Ok(answer)) => Ok(Response::new(answer)),
            Ok(Err(error)) => {
                tracing::debug!(%error, "request failed");
                Err(error.into())
            }
            Err(_) => Err(GatewayError::DeadlineExceeded(limit).into()),
        }
    }

    /// The shard set to read an epoch with: routed by a map at least `min_version` new (the
    /// version the epoch's record names; 0 = any), re-read from the sequencer leader when the
    /// cached map is older than that or than [`GatewayOptions::shard_map_refresh`].
    async fn shard_set(&self, min_version: u64) -> Result<ShardSet> {
        if let Some(shards) = self.cached_shards(min_version, self.options.shard_map_refresh) {
            return Ok(shards);
        }
        let _refreshing = self.refreshing.lock().await;
        // Another reader may have fetched it while this one waited.
        if let Some(shards) = self.cached_shards(min_version, self.options.shard_map_refresh) {
            return Ok(shards);
        }
        let behind = self
            .cached_shards(0, Duration::MAX)
            .is_some_and(|shards| shards.map().version() < min_version);
        let reason = if behind { "epoch_record" } else { "interval" };
        self.fetch_shards(min_version, reason).await
    }

    /// The cached shard set if it was fetched less than `max_age` ago and its map is at least
    /// `min_version` new.
    fn cached_shards(&self, min_version: u64, max_age: Duration) -> Option<ShardSet> {
        let slot = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        let (fetched, shards) = slot.as_ref()?;
        (fetched.elapsed() < max_age && shards.map().version() >= min_version)
            .then(|| shards.clone())
    }

    /// Reads the map from the sequencer leader until it is at least `min_version` new (a
    /// leader elected a moment ago may not have applied the entry a committed epoch names yet;
    /// the request's deadline bounds the wait) and caches it. Called with `refreshing` held.
    async fn fetch_shards(&self, min_version: u64, reason: &'static str) -> Result<ShardSet> {
        let mut pause = Duration::from_millis(10);
        loop {
            let answer = self.sequencing.cluster_metadata().await?;
            self.safe_epoch
                .fetch_max(answer.safe_epoch, std::sync::atomic::Ordering::Relaxed);
            let map = shard::replicated::shard_map(
                &self.metadata,
                &answer.shard_map.unwrap_or_default(),
            )?;
            if map.version() >= min_version {
                metrics::counter!("ktd_gateway_shard_map_refreshes_total", "reason" => reason)
                    .increment(1);
                let mut slot = self.shards.lock().unwrap_or_else(|p| p.into_inner());
                let shards = match slot.take() {
                    Some((_, shards)) if shards.map().version() == map.version() => shards,
                    _ => self.connector.connect(map)?,
                };
                *slot = Some((Instant::now(), shards.clone()));
                return Ok(shards);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// A map newer than version `than`, after a read every replica in it failed: `None` if the
    /// sequencer has none. Fetches at most every [`FAILED_READ_REFRESH`], so a shard server that
    /// is simply down does not turn every read into a map fetch.
    async fn newer_shards(&self, than: u64) -> Result<Option<ShardSet>> {
        if let Some(shards) = self.cached_shards(than + 1, self.options.shard_map_refresh) {
            return Ok(Some(shards));
        }
        let _refreshing = self.refreshing.lock().await;
        let shards = match self.cached_shards(0, FAILED_READ_REFRESH) {
            Some(shards) => shards,
            None => self.fetch_shards(0, "read_failed").await?,
        };
        Ok((shards.map().version() > than).then_some(shards))
    }

    /// Runs `read` (a read of an epoch whose record names map version `min_version`) on the
    /// shard set. If every replica of a partition failed in a way a newer map explains
    /// ([`cluster::replica_failure`]: the copy was moved away and deleted, the server left),
    /// the map is re-read and, if it changed, the read runs once more on the new owners — all
    /// within the request's deadline.
    async fn read_shards<T, F, Fut>(&self, min_version: u64, read: F) -> Result<T>
    where
        F: Fn(ShardSet) -> Fut,
        Fut: Future<Output = shard::Result<T>>,
    {
        let shards = self.shard_set(min_version).await?;
        let version = shards.map().version();
        match read(shards).await {
            Err(error) if cluster::replica_failure(&error) => {
                match self.newer_shards(version).await? {
                    Some(shards) => {
                        metrics::counter!("ktd_gateway_rerouted_reads_total").increment(1);
                        Ok(read(shards).await?)
                    }
                    None => Err(error.into()),
                }
            }
            answer => Ok(answer?),
        }
    }

    /// Refuses a read at `epoch` below the oldest readable epoch this gateway knows (refreshed
    /// with the shard map; a shard refuses what a stale value lets through).
    /// The oldest epoch this gateway may read (the retention record's safe epoch, as last
    /// learned with the shard map).
    pub fn safe_epoch(&self) -> u64 {
        self.safe_epoch.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn check_retained(&self, epoch: u64) -> Result<()> {
        let oldest = self.safe_epoch.load(std::sync::atomic::Ordering::Relaxed);
        if epoch < oldest {
            return Err(GatewayError::EpochPruned { epoch, oldest });
        }
        Ok(())
    }

    fn label(&self, label: Vec<u8>) -> Result<AkdLabel> {
        if label.is_empty() {
            return Err(GatewayError::InvalidArgument("the label is empty".into()));
        }
        if label.len() > self.options.max_label_bytes {
            return Err(GatewayError::InvalidArgument(format!(
                "the label is {} bytes; the limit is {}",
                label.len(),
                self.options.max_label_bytes
            )));
        }
        Ok(AkdLabel(label))
    }

    async fn publish(
        &self,
        caller: Option<Vec<u8>>,
        request: api::PublishRequest,
    ) -> Result<api::PublishResponse> {
        if request.idempotency_key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
            return Err(GatewayError::InvalidArgument(format!(
                "the idempotency key is {} bytes; the limit is {MAX_IDEMPOTENCY_KEY_BYTES}",
                request.idempotency_key.len()
            )));
        }
        if request.updates.is_empty() {
            return Err(GatewayError::InvalidArgument("no updates".into()));
        }
        if request.updates.len() > self.options.max_publish_updates {
            return Err(GatewayError::InvalidArgument(format!(
                "{} updates in one publish; the limit is {}",
                request.updates.len(),
                self.options.max_publish_updates
            )));
        }
        let mut updates = Vec::with_capacity(request.updates.len());
        for (index, update) in request.updates.into_iter().enumerate() {
            let label = self.label(update.label).map_err(|error| {
                GatewayError::InvalidArgument(format!("update {index}: {error}"))
            })?;
            if update.value.len() > self.options.max_value_bytes {
                return Err(GatewayError::InvalidArgument(format!(
                    "update {index}: the value is {} bytes; the limit is {}",
                    update.value.len(),
                    self.options.max_value_bytes
                )));
            }
            updates.push(pb::Update {
                label: label.0,
                value: update.value,
            });
        }
        let key = scoped_idempotency_key(caller.as_deref(), &request.idempotency_key);
        let answer = self.sequencing.append(updates, key).await?;
        Ok(api::PublishResponse {
            epoch: answer.epoch,
            sequence: answer.first_sequence,
            duplicate: answer.duplicate,
        })
    }

    async fn get_epoch(
        &self,
        caller: Caller,
        request: api::GetEpochRequest,
    ) -> Result<api::EpochHash> {
        let committed = match request.epoch {
            Some(epoch) if request.wait => {
                let _wait = self.rate.wait(&caller.principal, "GetEpoch", 1.0)?;
                self.epochs.wait_for(epoch).await?
            }
            epoch => self.epochs.resolve(epoch).await?,
        };
        Ok(epoch_hash(&committed))
    }

    async fn lookup(&self, request: api::LookupRequest) -> Result<api::LookupResponse> {
        let label = self.label(request.label)?;
        let committed = match (request.epoch, self.options.unsafe_stale_reads) {
            (None, Some(max_age)) => self.epochs.stale_latest(max_age).await?,
            (epoch, _) => self.epochs.resolve(epoch).await?,
        };
        let (top, epoch) = (&committed.top, committed.epoch);
        self.check_retained(epoch)?;
        let proof = self
            .read_shards(committed.info.shard_map_version, |shards| {
                let label = label.clone();
                async move { cluster::lookup(&shards, top, epoch, &label).await }
            })
            .await?;
        Ok(api::LookupResponse {
            epoch_hash: Some(epoch_hash(&committed)),
            proof: Some((&proof).into()),
        })
    }

    async fn prove_absence(
        &self,
        request: api::ProveAbsenceRequest,
    ) -> Result<api::ProveAbsenceResponse> {
        let label = self.label(request.label)?;
        let committed = self.epochs.resolve(request.epoch).await?;
        let (top, epoch) = (&committed.top, committed.epoch);
        self.check_retained(epoch)?;
        let proof = self
            .read_shards(committed.info.shard_map_version, |shards| {
                let label = label.clone();
                async move { cluster::absence(&shards, top, epoch, &label).await }
            })
            .await?;
        Ok(api::ProveAbsenceResponse {
            epoch_hash: Some(epoch_hash(&committed)),
            proof: Some(api::AbsenceProof {
                vrf_proof: proof.vrf_proof,
                non_membership_proof: Some((&proof.non_membership).into()),
            }),
        })
    }

    async fn key_history(
        &self,
        caller: Caller,
        request: api::KeyHistoryRequest,
    ) -> Result<api::KeyHistoryResponse> {
        let label = self.label(request.label)?;
        let cap = self.options.anonymous_max_history_versions;
        if caller.anonymous && (request.most_recent == 0 || request.most_recent > cap) {
            return Err(GatewayError::InvalidArgument(format!(
                "callers without a client certificate get at most the {cap} most recent \
                 versions of a history; ask for most_recent between 1 and {cap}"
            )));
        }
        if request.most_recent == 0 || request.most_recent > CHEAP_HISTORY_VERSIONS {
            self.rate.charge(&caller.principal, "KeyHistory", 1.0)?;
        }
        let params = match request.most_recent {
            0 => HistoryParams::Complete,
            n => HistoryParams::MostRecent(usize::try_from(n).unwrap_or(usize::MAX)),
        };
        let committed = self.epochs.resolve(request.epoch).await?;
        let (top, epoch) = (&committed.top, committed.epoch);
        self.check_retained(epoch)?;
        let proof = self
            .read_shards(committed.info.shard_map_version, |shards| {
                let label = label.clone();
                async move { cluster::key_history(&shards, top, epoch, &label, params).await }
            })
            .await?;
        Ok(api::KeyHistoryResponse {
            epoch_hash: Some(epoch_hash(&committed)),
            proof: Some((&proof).into()),
        })
    }

    async fn audit(
        &self,
        caller: Caller,
        request: api::AuditRequest,
    ) -> Result<api::AuditResponse> {
        let (start, end) = (request.start_epoch, request.end_epoch);
        if start > end {
            return Err(GatewayError::InvalidArgument(format!(
                "start epoch {start} is after end epoch {end}"
            )));
        }
        let max_span = match caller.anonymous {
            true => self
                .options
                .max_audit_epochs
                .min(self.options.anonymous_max_audit_epochs),
            false => self.options.max_audit_epochs,
        };
        if end - start > max_span {
            return Err(GatewayError::InvalidArgument(format!(
                "an audit {}spans at most {max_span} epochs; ask for {start}..{} and continue \
                 from there",
                if caller.anonymous {
                    "by a caller without a client certificate "
                } else {
                    ""
                },
                start + max_span
            )));
        }
        self.rate
            .charge(&caller.principal, "Audit", audit_cost(end - start))?;
        // Resolving the end first answers NOT_FOUND for an uncommitted range at once.
        let last = self.epochs.at(end).await?;
        self.check_retained(start)?;
        let tops = self.epochs.range(start..=end).await?;
        let steps: Vec<(u64, Arc<TopTree<TC>>)> = tops
            .windows(2)
            .map(|pair| (pair[0].epoch, pair[1].top.clone()))
            .collect();
        let proofs: Vec<_> = self
            .read_shards(last.info.shard_map_version, |shards| {
                let steps = steps.clone();
                async move {
                    let shards = &shards;
                    futures::stream::iter(steps)
                        .map(|(from, to)| async move { cluster::audit_step(shards, &to, from).await })
                        .buffered(4)
                        .try_collect()
                        .await
                }
            })
            .await?;
        let proof = ktd_core::akd_core::AppendOnlyProof {
            proofs,
            epochs: (start..end).collect(),
        };
        Ok(api::AuditResponse {
            proof: Some((&proof).into()),
            root_hashes: tops.iter().map(|top| top.root_hash().to_vec()).collect(),
        })
    }

    async fn list_audit_blobs(
        &self,
        request: api::ListAuditBlobsRequest,
    ) -> Result<api::ListAuditBlobsResponse> {
        let latest = self.epochs.latest().await?.epoch;
        let start = request.start_epoch.max(1);
        let limit = match request.limit {
            0 => 100,
            limit => u64::from(limit.min(1000)),
        };
        let end = latest.min(start.saturating_add(limit - 1));
        let mut names = Vec::new();
        if start <= end {
            let tops = self.epochs.range(start - 1..=end).await?;
            names = tops
                .windows(2)
                .map(|pair| {
                    AuditBlobName {
                        epoch: pair[1].epoch,
                        previous_root: pair[0].root_hash(),
                        root: pair[1].root_hash(),
                    }
                    .to_string()
                })
                .collect();
        }
        Ok(api::ListAuditBlobsResponse {
            names,
            latest_epoch: latest,
        })
    }

    /// `GetAuditBlob`: the append-only proof `E-1 → E` a blob name names (also served over
    /// HTTP by [`crate::blob_http`]).
    pub async fn get_audit_blob(
        &self,
        request: api::GetAuditBlobRequest,
    ) -> Result<api::AuditBlob> {
        let AuditBlobName {
            epoch,
            previous_root,
            root,
        } = request
            .name
            .parse()
            .map_err(|error: BadAuditBlobName| GatewayError::InvalidArgument(error.to_string()))?;
        let end = self.epochs.at(epoch).await?;
        let start = self.epochs.at(epoch - 1).await?;
        if start.root_hash() != previous_root || end.root_hash() != root {
            return Err(GatewayError::InvalidArgument(format!(
                "{:?} names roots this directory did not commit for epochs {} and {epoch}",
                request.name,
                epoch - 1
            )));
        }
        self.check_retained(epoch - 1)?;
        let top = &end.top;
        let proof = self
            .read_shards(end.info.shard_map_version, |shards| async move {
                cluster::audit_step(&shards, top, epoch - 1).await
            })
            .await?;
        let proof: ktd_proto::ktd::v1::SingleAppendOnlyProof = (&proof).into();
        Ok(api::AuditBlob {
            name: request.name,
            proof: prost::Message::encode_to_vec(&proof),
        })
    }

    async fn seal(&self) -> Result<api::EpochHash> {
        let sealed = match self.sequencing.seal().await {
            Ok(sealed) => sealed,
            Err(error) if error.code() == tonic::Code::FailedPrecondition => {
                return Err(GatewayError::NothingToSeal);
            }
            Err(error) => return Err(error.into()),
        };
        let committed = self.epochs.wait_for(sealed.epoch).await?;
        Ok(epoch_hash(&committed))
    }

    /// Whether this gateway can serve publishes: the sequencer leader answers a linearizable
    /// read of the latest committed epoch. `Err` says why not.
    pub async fn publish_readiness(&self) -> std::result::Result<(), String> {
        self.sequencing
            .get_epoch(None)
            .await
            .map(|_| ())
            .map_err(|error| format!("sequencer leader: {error}"))
    }

    /// Whether this gateway can serve reads: every partition has at least one healthy voter
    /// whose server answers a status call (not every server: a partition with one live replica
    /// is readable). `Err` names the partitions that are not.
    pub async fn read_readiness(&self) -> std::result::Result<(), String> {
        let shards = self
            .shard_set(0)
            .await
            .map_err(|error| format!("shard map: {error}"))?;
        let map = shards.map();
        let answers = futures::future::join_all(map.servers().iter().map(|server| {
            let shards = &shards;
            async move {
                let up = match shards.api(&server.id) {
                    Ok(api) => api.status().await.is_ok(),
                    Err(_) => false,
                };
                (server.id.as_str(), up)
            }
        }))
        .await;
        let up: std::collections::HashSet<&str> = answers
            .into_iter()
            .filter_map(|(server, up)| up.then_some(server))
            .collect();
        let unreadable: Vec<String> = (0..map.partition_count())
            .filter(|partition| {
                !map.replicas(*partition)
                    .healthy_voters()
                    .any(|voter| up.contains(voter))
            })
            .map(|partition| partition.to_string())
            .collect();
        if unreadable.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "no live healthy replica of partitions {}",
                unreadable.join(", ")
            ))
        }
    }

    async fn cluster_status(&self) -> Result<api::ClusterStatusResponse> {
        let sequencer = self.sequencing.cluster_status().await?;
        let shards = self.shard_set(0).await?;
        let map = shards.map();
        let statuses = futures::future::join_all(map.servers().iter().map(|info| {
            let shards = &shards;
            async move {
                let answer = match shards.api(&info.id) {
                    Ok(api) => api.status().await,
                    Err(error) => Err(error),
                };
                let assignments = map.assignments(&info.id);
                let role_partitions = |wanted: ktd_core::shard_map::Role| {
                    assignments
                        .iter()
                        .filter(|(_, role)| *role == wanted)
                        .map(|(partition, _)| *partition)
                        .collect::<Vec<u32>>()
                };
                let (reachable, built_epoch, min_built_epoch, precomputed_labels, error) =
                    match answer {
                        Ok(status) => (
                            true,
                            status.built_epoch,
                            status.prepared_epoch,
                            status.label_cache_entries,
                            String::new(),
                        ),
                        Err(error) => (false, 0, 0, 0, error.to_string()),
                    };
                api::ShardStatus {
                    shard_id: info.id.clone(),
                    address: info.address.clone(),
                    partitions: assignments
                        .iter()
                        .map(|(partition, _)| *partition)
                        .collect(),
                    reachable,
                    built_epoch,
                    error,
                    precomputed_labels,
                    learner_partitions: role_partitions(ktd_core::shard_map::Role::Learner),
                    quarantined_partitions: role_partitions(ktd_core::shard_map::Role::Quarantined),
                    min_built_epoch,
                }
            }
        }))
        .await;
        Ok(api::ClusterStatusResponse {
            sequencer: Some(sequencer),
            shards: statuses,
        })
    }
}

fn epoch_hash<TC: Configuration>(committed: &Committed<TC>) -> api::EpochHash {
    api::EpochHash {
        epoch: committed.epoch,
        root_hash: committed.root_hash().to_vec(),
        updates: committed.info.updates,
        sealed_at_ms: committed.info.sealed_at_ms,
        committed_at_ms: committed.info.committed_at_ms,
    }
}

/// Longest idempotency key a client may send (the sequencer's limit, 256 bytes, less the
/// caller scope).
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 240;

/// The sequencer-level key of a client's idempotency key: scoped to the caller (16 bytes of
/// BLAKE3 of its TLS client certificate, or of nothing for callers without one), so two callers
/// using the same key never see each other's answers. Empty stays empty (the sequencing layer
/// then makes one up: the publish is not retried).
pub fn scoped_idempotency_key(caller: Option<&[u8]>, key: &str) -> Vec<u8> {
    if key.is_empty() {
        return Vec::new();
    }
    let scope = blake3::hash(caller.unwrap_or_default());
    let mut scoped = scope.as_bytes()[..16].to_vec();
    scoped.extend_from_slice(key.as_bytes());
    scoped
}

/// The client's deadline from the `grpc-timeout` header (`"<digits><unit>"`, gRPC over HTTP/2).
fn deadline<T>(request: &Request<T>) -> Option<Duration> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The `ktd.v1.Directory` service over a [`Gateway`].
pub struct DirectoryService<TC>(pub Arc<Gateway<TC>>);

/// The `ktd.v1.Admin` service over a [`Gateway`].
pub struct AdminService<TC>(pub Arc<Gateway<TC>>);

#[tonic::async_trait]
impl<TC: Configuration> api::directory_server::Directory for DirectoryService<TC> {
    async fn publish(
        &self,
        request: Request<api::PublishRequest>,
    ) -> Result<Response<api::PublishResponse>, Status> {
        let deadline = deadline(&request);
        let caller = ktd_rpc::security::peer_certificate(&request);
        self.0
            .serve(deadline, self.0.publish(caller, request.into_inner()))
            .await
    }

    async fn get_epoch(
        &self,
        request: Request<api::GetEpochRequest>,
    ) -> Result<Response<api::EpochHash>, Status> {
        let deadline = deadline(&request);
        let caller = Caller::of(&request);
        self.0
            .serve(deadline, self.0.get_epoch(caller, request.into_inner()))
            .await
    }

    async fn lookup(
        &self,
        request: Request<api::LookupRequest>,
    ) -> Result<Response<api::LookupResponse>, Status> {
        let deadline = deadline(&request);
        self.0
            .serve(deadline, self.0.lookup(request.into_inner()))
            .await
    }

    async fn prove_absence(
        &self,
        request: Request<api::ProveAbsenceRequest>,
    ) -> Result<Response<api::ProveAbsenceResponse>, Status> {
        let deadline = deadline(&request);
        self.0
            .serve(deadline, self.0.prove_absence(request.into_inner()))
            .await
    }

    async fn key_history(
        &self,
        request: Request<api::KeyHistoryRequest>,
    ) -> Result<Response<api::KeyHistoryResponse>, Status> {
        let deadline = deadline(&request);
        let caller = Caller::of(&request);
        self.0
            .serve(deadline, self.0.key_history(caller, request.into_inner()))
            .await
    }

    async fn audit(
        &self,
        request: Request<api::AuditRequest>,
    ) -> Result<Response<api::AuditResponse>, Status> {
        let deadline = deadline(&request);
        let caller = Caller::of(&request);
        self.0
            .serve(deadline, self.0.audit(caller, request.into_inner()))
            .await
    }

    async fn list_audit_blobs(
        &self,
        request: Request<api::ListAuditBlobsRequest>,
    ) -> Result<Response<api::ListAuditBlobsResponse>, Status> {
        let deadline = deadline(&request);
        self.0
            .serve(deadline, self.0.list_audit_blobs(request.into_inner()))
            .await
    }

    async fn get_audit_blob(
        &self,
        request: Request<api::GetAuditBlobRequest>,
    ) -> Result<Response<api::AuditBlob>, Status> {
        let deadline = deadline(&request);
        self.0
            .serve(deadline, self.0.get_audit_blob(request.into_inner()))
            .await
    }

    async fn get_public_key(
        &self,
        _request: Request<api::GetPublicKeyRequest>,
    ) -> Result<Response<api::PublicKeyResponse>, Status> {
        Ok(Response::new(api::PublicKeyResponse {
            vrf_public_key: self.0.metadata.vrf_public_key.clone(),
            configuration: self.0.metadata.akd_configuration.clone(),
        }))
    }
}

#[tonic::async_trait]
impl<TC: Configuration> api::admin_server::Admin for AdminService<TC> {
    async fn seal_epoch(
        &self,
        request: Request<api::SealEpochRequest>,
    ) -> Result<Response<api::EpochHash>, Status> {
        let deadline = deadline(&request);
        self.0.serve(deadline, self.0.seal()).await
    }

    async fn cluster_status(
        &self,
        request: Request<api::ClusterStatusRequest>,
    ) -> Result<Response<api::ClusterStatusResponse>, Status> {
        let deadline = deadline(&request);
        self.0.serve(deadline, self.0.cluster_status()).await
    }
}
