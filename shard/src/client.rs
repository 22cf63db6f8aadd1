//! [`GrpcShard`]: [`ShardApi`] over gRPC to a remote shard server, and [`GrpcPeers`], the pool
//! of such clients a shard or a gateway keeps.
//!
//! One persistent HTTP/2 channel per peer (tonic multiplexes calls on it), `TCP_NODELAY` on, a
//! connect timeout, and a deadline on every call. A failed call is `Error::Remote` with the
//! peer's status code; transport failures arrive as `UNAVAILABLE`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use akd_core::verify::history::HistoryParams;
use akd_core::{AkdLabel, AkdValue};
use ktd_proto::ktd::shard::v1 as pb;
use ktd_proto::ktd::shard::v1::shard_client::ShardClient;
use tonic::transport::Channel;

use futures::StreamExt;
use futures::stream::BoxStream;

use crate::api::{
    BootstrapSource, BootstrapSummary, BuildSummary, Fence, PartitionChunk, PrepareSummary,
    ShardApi, ShardStatus, UpdateTrace, UserPartitionLeaves,
};
use crate::error::{Error, LabelTag, Result};
use crate::local::PeerResolver;
use crate::server::MAX_MESSAGE_BYTES;
use crate::wire::{self, Decoder};
use ktd_core::Error as CoreError;
use ktd_core::proof::{AbsencePlan, HistoryPlan, LookupPlan};
use ktd_core::shard_map::ShardServer;
use ktd_core::tree::audit::AppendOnlySlice;
use ktd_core::tree::{LeavesByPartition, NodeRef, PartitionWalk, WalkRequest};

/// Deadlines for calls to shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientTimeouts {
    /// Establishing a connection.
    pub connect: Duration,
    /// Reads (walks, plans, slices).
    pub read: Duration,
    /// Epoch steps (prepare, build, leaf recomputation), which can take seconds for large
    /// epochs.
    pub epoch_step: Duration,
    /// A whole partition bootstrap (the copy streams for as long as this).
    pub bootstrap: Duration,
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(2),
            read: Duration::from_secs(10),
            epoch_step: Duration::from_secs(120),
            bootstrap: Duration::from_secs(6 * 3600),
        }
    }
}

/// A client of one remote shard.
#[derive(Clone, Debug)]
pub struct GrpcShard {
    id: String,
    client: ShardClient<Channel>,
    timeouts: ClientTimeouts,
}

impl GrpcShard {
    /// A client of `info`'s server; connects on first use and reconnects as needed.
    pub fn connect_lazy(info: &ShardServer, timeouts: ClientTimeouts) -> Result<Self> {
        let endpoint = ktd_rpc::security::endpoint(&info.address)
            .map_err(|error| {
                CoreError::InvalidConfig(format!(
                    "shard {} address {:?}: {error}",
                    info.id, info.address
                ))
            })?
            .tcp_nodelay(true)
            .connect_timeout(timeouts.connect)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let client = ShardClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self {
            id: info.id.clone(),
            client,
            timeouts,
        })
    }

    fn request<T>(&self, message: T, timeout: Duration) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        ktd_rpc::telemetry::inject_context(&mut request);
        request.set_timeout(timeout);
        request
    }

    fn remote(&self, status: tonic::Status) -> Error {
        Error::Remote {
            peer: format!("shard {}", self.id),
            code: status.code(),
            message: status.message().to_string(),
        }
    }

    fn decoder(&self) -> Decoder<'_> {
        Decoder { peer: &self.id }
    }
}

#[async_trait::async_trait]
impl ShardApi for GrpcShard {
    async fn prepare_epoch(
        &self,
        epoch: u64,
        fence: &Fence,
        user_partitions: Vec<u32>,
        updates: Vec<(AkdLabel, AkdValue)>,
        traces: Vec<UpdateTrace>,
    ) -> Result<PrepareSummary> {
        let request = pb::PrepareEpochRequest {
            epoch,
            updates: wire::updates(&updates),
            traces: traces
                .into_iter()
                .map(|trace| pb::UpdateTrace {
                    index: trace.index,
                    traceparent: trace.traceparent,
                })
                .collect(),
            fence: Some(wire::fence(fence)),
            user_partitions,
        };
        let response = self
            .client
            .clone()
            .prepare_epoch(self.request(request, self.timeouts.epoch_step))
            .await
            .map_err(|status| self.remote(status))?
            .into_inner();
        let decoder = self.decoder();
        Ok(PrepareSummary {
            updates: response.updates,
            changed: response.changed,
            leaves: response.leaves,
            user_partitions: response
                .user_partitions
                .iter()
                .map(|leaves| decoder.user_partition_leaves(leaves))
                .collect::<Result<_>>()?,
        })
    }

    async fn compute_leaves(
        &self,
        epoch: u64,
        user_partition: u32,
        updates: Vec<(AkdLabel, AkdValue)>,
    ) -> Result<UserPartitionLeaves> {
        let request = pb::ComputeLeavesRequest {
            epoch,
            user_partition,
            updates: wire::updates(&updates),
        };
        let response = self
            .client
            .clone()
            .compute_leaves(self.request(request, self.timeouts.epoch_step))
            .await
            .map_err(|status| self.remote(status))?
            .into_inner();
        let decoder = self.decoder();
        let leaves = response.leaves.ok_or_else(|| Error::BadMessage {
            peer: self.id.clone(),
            message: "ComputeLeavesResponse.leaves is missing".into(),
        })?;
        decoder.user_partition_leaves(&leaves)
    }

    async fn build_epoch(
        &self,
        epoch: u64,
        fence: &Fence,
        base_roots: Vec<(u32, Option<NodeRef>)>,
        leaves: LeavesByPartition,
        sources: Vec<u32>,
    ) -> Result<BuildSummary> {
        let request = pb::BuildEpochRequest {
            epoch,
            base_roots: wire::partition_roots(&base_roots),
            fence: Some(wire::fence(fence)),
            leaves: wire::partition_leaves(&leaves),
            sources,
        };
        let response = self
            .client
            .clone()
            .build_epoch(self.request(request, self.timeouts.epoch_step))
            .await
            .map_err(|status| self.remote(status))?
            .into_inner();
        Ok(BuildSummary {
            roots: self.decoder().partition_roots(&response.roots)?,
            nodes_written: response.nodes_written,
        })
    }

    async fn bootstrap(&self, fence: &Fence, source: BootstrapSource) -> Result<BootstrapSummary> {
        let request = pb::BootstrapRequest {
            fence: Some(wire::fence(fence)),
            partition: source.partition,
            epoch: source.epoch,
            source_id: source.source_id,
            source_address: source.source_address,
            expected_root: source.expected_root.as_ref().map(wire::node_ref),
            max_bytes_per_second: source.max_bytes_per_second,
        };
        let response = self
            .client
            .clone()
            .bootstrap(self.request(request, self.timeouts.bootstrap))
            .await
            .map_err(|status| self.remote(status))?
            .into_inner();
        Ok(BootstrapSummary {
            epoch: response.epoch,
            records: response.records,
            bytes: response.bytes,
            nodes_checked: response.nodes_checked,
        })
    }

    async fn stream_partition(
        &self,
        partition: u32,
        epoch: u64,
    ) -> Result<BoxStream<'static, Result<PartitionChunk>>> {
        let request = pb::StreamPartitionRequest { partition, epoch };
        let stream = self
            .client
            .clone()
            .stream_partition(self.request(request, self.timeouts.bootstrap))
            .await
            .map_err(|status| self.remote(status))?
            .into_inner();
        let peer = self.id.clone();
        let remote = self.clone();
        Ok(stream
            .map(move |chunk| {
                let chunk = chunk.map_err(|status| remote.remote(status))?;
                Decoder { peer: &peer }.chunk(chunk)
            })
            .boxed())
    }

    async fn walk(&self, requests: Vec<WalkRequest>) -> Result<Vec<PartitionWalk>> {
        let request = pb::WalkRequest {
            targets: wire::walk_requests(&requests),
        };
        let response = self
            .client
            .clone()
            .walk(self.request(request, self.timeouts.read))
            .await
            .map_err(|status| self.remote(status))?
            .into_inner();
        let walks = self.decoder().walks(&response.walks)?;
        if walks.len() != requests.len() {
            return Err(Error::BadMessage {
                peer: self.id.clone(),
                message: format!("{} walks for {} requests", walks.len(), requests.len()),
            });
        }
        Ok(walks)
    }

    async fn append_only_slice(&self, root: NodeRef, start_epoch: u64) -> Result<AppendOnlySlice> {
        let request = pb::AppendOnlySliceRequest {
            root: Some(wire::node_ref(&root)),
            start_epoch,
        };
        let response = self
            .client
            .clone()
            .append_only_slice(self.request(request, self.timeouts.epoch_step))
            .await
            .map_err(|status| self.remote(status))?
            .into_inner();
        self.decoder().slice(&response)
    }

    async fn lookup_plan(&self, akd_label: AkdLabel, epoch: u64) -> Result<LookupPlan> {
        let request = pb::LookupPlanRequest {
            label: akd_label.0,
            epoch,
        };
        let response = self
            .client
            .clone()
            .lookup_plan(self.request(request, self.timeouts.read))
            .await
            .map_err(|status| self.remote(status))?
            .into_inner();
        self.decoder().lookup_plan(&response)
    }

    async fn absence_plan(&self, akd_label: AkdLabel, epoch: u64) -> Result<AbsencePlan> {
        let label = LabelTag::of(&akd_label);
        let request = pb::AbsencePlanRequest {
            label: akd_label.0,
            epoch,
        };
        let response = self
            .client
            .clone()
            .absence_plan(self.request(request, self.timeouts.read))
            .await
            .map_err(|status| match status.code() {
                // The one precondition the shard checks: the label has a version.
                tonic::Code::FailedPrecondition => CoreError::LabelExists { label, epoch }.into(),
                _ => self.remote(status),
            })?
            .into_inner();
        self.decoder().absence_plan(&response)
    }

    async fn history_plan(
        &self,
        akd_label: AkdLabel,
        params: HistoryParams,
        epoch: u64,
    ) -> Result<HistoryPlan> {
        let most_recent = match params {
            HistoryParams::Complete => 0,
            HistoryParams::MostRecent(0) => return Err(CoreError::EmptyHistoryRequest.into()),
            HistoryParams::MostRecent(n) => n as u64,
        };
        let request = pb::HistoryPlanRequest {
            label: akd_label.0,
            most_recent,
            epoch,
        };
        let response = self
            .client
            .clone()
            .history_plan(self.request(request, self.timeouts.read))
            .await
            .map_err(|status| self.remote(status))?
            .into_inner();
        self.decoder().history_plan(&response)
    }

    async fn status(&self) -> Result<ShardStatus> {
        let response = self
            .client
            .clone()
            .status(self.request(pb::StatusRequest {}, self.timeouts.read))
            .await
            .map_err(|status| self.remote(status))?
            .into_inner();
        Ok(ShardStatus {
            id: response.shard_id,
            partitions: response.partitions,
            prepared_epoch: response.prepared_epoch,
            built_epoch: response.built_epoch,
            seen_committed_epoch: response.seen_committed_epoch,
            label_cache_entries: response.label_cache_entries,
            partition_states: response
                .partition_states
                .iter()
                .map(|state| self.decoder().partition_state(state))
                .collect::<Result<_>>()?,
            fence_term: response.fence_term,
            shard_map_version: response.shard_map_version,
        })
    }
}

/// A pool of [`GrpcShard`] clients, one per shard id and address.
#[derive(Debug, Default)]
pub struct GrpcPeers {
    timeouts: ClientTimeouts,
    clients: Mutex<HashMap<(String, String), Arc<GrpcShard>>>,
}

impl GrpcPeers {
    /// An empty pool whose clients use `timeouts`.
    pub fn new(timeouts: ClientTimeouts) -> Self {
        Self {
            timeouts,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// The client of `info` (created on first use).
    pub fn client(&self, info: &ShardServer) -> Result<Arc<GrpcShard>> {
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let key = (info.id.clone(), info.address.clone());
        if let Some(client) = clients.get(&key) {
            return Ok(client.clone());
        }
        let client = Arc::new(GrpcShard::connect_lazy(info, self.timeouts)?);
        clients.insert(key, client.clone());
        Ok(client)
    }
}

impl PeerResolver for GrpcPeers {
    fn peer(&self, info: &ShardServer) -> Result<Arc<dyn ShardApi>> {
        Ok(self.client(info)?)
    }
}
