//! The `ktd.shard.v1.Shard` gRPC service: decodes requests, calls a [`ShardApi`] (a
//! [`crate::local::LocalShard`]), encodes answers. The one place where shard errors become gRPC
//! status codes.

use std::sync::Arc;

use ktd_proto::ktd::shard::v1 as pb;
use tonic::{Request, Response, Status, Streaming};

use futures::StreamExt;
use futures::stream::BoxStream;

use crate::api::{BootstrapSource, ShardApi, UpdateTrace};
use crate::error::Error;
use crate::wire::{self, Decoder};
use ktd_core::Error as CoreError;

/// Largest message a shard sends (audit slices and proof answers can be large), and the most
/// bytes one `BuildEpoch` stream may carry in all.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// Largest request message a shard accepts. Epoch shares travel in parts
/// ([`crate::client::TRANSFER_CHUNK_BYTES`] each: several `PrepareEpoch` or `ComputeLeaves`
/// requests, one `BuildEpoch` stream), so no single message holds a server's whole share of an
/// epoch, whatever the epoch's size.
pub const MAX_REQUEST_MESSAGE_BYTES: usize = 16 << 20;

/// Request bytes per method (`ktd_rpc::limits`): a `BuildEpoch` stream carries a server's
/// leaves of an epoch (up to [`MAX_MESSAGE_BYTES`] in all, [`MAX_REQUEST_MESSAGE_BYTES`] per
/// message); every other request (a part of a share, plans, walks, fences) at most
/// [`MAX_REQUEST_MESSAGE_BYTES`].
pub fn request_limits(path: &str) -> usize {
    // 5 bytes of gRPC framing per message.
    5 + match path {
        "/ktd.shard.v1.Shard/BuildEpoch" => MAX_MESSAGE_BYTES + (1 << 20),
        _ => MAX_REQUEST_MESSAGE_BYTES,
    }
}

/// The gRPC code of a core error: the caller's input, a state that does not allow the call,
/// data loss, or an internal failure.
pub fn core_code(error: &CoreError) -> tonic::Code {
    use tonic::Code;
    match error {
        CoreError::DuplicateLabel { .. }
        | CoreError::EmptyLabel
        | CoreError::LabelTooLong { .. }
        | CoreError::ValueTooLarge { .. }
        | CoreError::BatchTooLarge { .. }
        | CoreError::InvalidAuditRange { .. }
        | CoreError::EmptyHistoryRequest
        | CoreError::InvalidSeedLength { .. }
        | CoreError::InvalidConfig(_) => Code::InvalidArgument,
        CoreError::EpochNotFound { .. } | CoreError::LabelNotFound { .. } => Code::NotFound,
        CoreError::EpochPruned { .. } => Code::OutOfRange,
        CoreError::EpochOutOfOrder { .. }
        | CoreError::LeafExists { .. }
        | CoreError::LabelExists { .. }
        | CoreError::EmptyDirectory { .. } => Code::FailedPrecondition,
        CoreError::Corrupt(_) => Code::DataLoss,
        CoreError::Storage { .. } | CoreError::Vrf(_) | CoreError::Proof(_) => Code::Internal,
    }
}

/// Trailer on `OUT_OF_RANGE` answers for an epoch older than the retention window: the oldest
/// readable epoch (as etcd's "required revision has been compacted" names its compaction).
pub const OLDEST_EPOCH_METADATA: &str = "ktd-oldest-epoch";
/// Trailer beside [`OLDEST_EPOCH_METADATA`]: the epoch that was asked for.
pub const PRUNED_EPOCH_METADATA: &str = "ktd-pruned-epoch";

/// The [`CoreError::EpochPruned`] a status carries in its trailers, if it is one.
pub fn pruned_of(status: &Status) -> Option<CoreError> {
    if status.code() != tonic::Code::OutOfRange {
        return None;
    }
    let read = |key: &str| {
        status
            .metadata()
            .get(key)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok())
    };
    Some(CoreError::EpochPruned {
        epoch: read(PRUNED_EPOCH_METADATA)?,
        oldest: read(OLDEST_EPOCH_METADATA)?,
    })
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match error {
            Error::Core(CoreError::EpochPruned { epoch, oldest }) => {
                let mut status = Status::out_of_range(message);
                let metadata = status.metadata_mut();
                metadata.insert(OLDEST_EPOCH_METADATA, oldest.into());
                metadata.insert(PRUNED_EPOCH_METADATA, epoch.into());
                status
            }
            Error::Core(core) => Status::new(core_code(&core), message),
            Error::BadMessage { .. } => Status::invalid_argument(message),
            Error::IncompatibleDataDir { .. } | Error::Fenced { .. } => {
                Status::failed_precondition(message)
            }
            Error::NotServing { .. } => Status::unavailable(message),
            Error::Remote { code, message, .. } => Status::new(code, message),
        }
    }
}

/// The gRPC service over a shard.
pub struct ShardService {
    api: Arc<dyn ShardApi>,
}

impl ShardService {
    /// Serves `api`.
    pub fn new(api: Arc<dyn ShardApi>) -> Self {
        Self { api }
    }

    /// The tonic server for this service, with ktd's message size limits.
    pub fn into_server(self) -> pb::shard_server::ShardServer<Self> {
        pb::shard_server::ShardServer::new(self)
            .max_decoding_message_size(MAX_REQUEST_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

fn decoder<T>(request: &Request<T>) -> String {
    request
        .remote_addr()
        .map(|addr| addr.to_string())
        .unwrap_or_else(|| "a peer".to_string())
}

#[tonic::async_trait]
impl pb::shard_server::Shard for ShardService {
    async fn prepare_epoch(
        &self,
        request: Request<pb::PrepareEpochRequest>,
    ) -> Result<Response<pb::PrepareEpochResponse>, Status> {
        let peer = decoder(&request);
        let decoder = Decoder { peer: &peer };
        let request = request.into_inner();
        let fence = decoder.fence(&request.fence)?;
        let updates = decoder.updates(&request.updates);
        let traces = request
            .traces
            .into_iter()
            .map(|trace| UpdateTrace {
                index: trace.index,
                traceparent: trace.traceparent,
            })
            .collect();
        let summary = self
            .api
            .prepare_epoch(
                request.epoch,
                &fence,
                request.user_partitions,
                updates,
                traces,
            )
            .await?;
        Ok(Response::new(pb::PrepareEpochResponse {
            updates: summary.updates,
            changed: summary.changed,
            leaves: summary.leaves,
            user_partitions: summary
                .user_partitions
                .iter()
                .map(wire::user_partition_leaves)
                .collect(),
        }))
    }

    async fn compute_leaves(
        &self,
        request: Request<pb::ComputeLeavesRequest>,
    ) -> Result<Response<pb::ComputeLeavesResponse>, Status> {
        let peer = decoder(&request);
        let request = request.into_inner();
        let updates = Decoder { peer: &peer }.updates(&request.updates);
        let leaves = self
            .api
            .compute_leaves(request.epoch, request.user_partition, updates)
            .await?;
        Ok(Response::new(pb::ComputeLeavesResponse {
            leaves: Some(wire::user_partition_leaves(&leaves)),
        }))
    }

    async fn build_epoch(
        &self,
        request: Request<Streaming<pb::BuildEpochRequest>>,
    ) -> Result<Response<pb::BuildEpochResponse>, Status> {
        let peer = decoder(&request);
        let decoder = Decoder { peer: &peer };
        let mut stream = request.into_inner();
        let Some(first) = stream.message().await? else {
            return Err(Status::invalid_argument(
                "BuildEpoch: the stream ended before its first message",
            ));
        };
        let fence = decoder.fence(&first.fence)?;
        let base_roots = decoder.partition_roots(&first.base_roots)?;
        let mut leaves = decoder.partition_leaves(&first.leaves)?;
        // The stream's total is bounded by the method's request limit (`request_limits`).
        while let Some(part) = stream.message().await? {
            if part.epoch != 0
                || part.fence.is_some()
                || !part.base_roots.is_empty()
                || !part.sources.is_empty()
            {
                return Err(Status::invalid_argument(
                    "BuildEpoch: only the stream's first message may set epoch, fence, base_roots \
                     or sources",
                ));
            }
            leaves.extend(decoder.partition_leaves(&part.leaves)?);
        }
        let summary = self
            .api
            .build_epoch(first.epoch, &fence, base_roots, leaves, first.sources)
            .await?;
        Ok(Response::new(pb::BuildEpochResponse {
            roots: wire::partition_roots(&summary.roots),
            nodes_written: summary.nodes_written,
        }))
    }

    async fn bootstrap(
        &self,
        request: Request<pb::BootstrapRequest>,
    ) -> Result<Response<pb::BootstrapResponse>, Status> {
        let peer = decoder(&request);
        let decoder = Decoder { peer: &peer };
        let request = request.into_inner();
        let fence = decoder.fence(&request.fence)?;
        let source = BootstrapSource {
            partition: request.partition,
            epoch: request.epoch,
            source_id: request.source_id,
            source_address: request.source_address,
            expected_root: decoder.optional_node_ref(&request.expected_root)?,
            max_bytes_per_second: request.max_bytes_per_second,
        };
        let summary = self.api.bootstrap(&fence, source).await?;
        Ok(Response::new(pb::BootstrapResponse {
            epoch: summary.epoch,
            records: summary.records,
            bytes: summary.bytes,
            nodes_checked: summary.nodes_checked,
        }))
    }

    type StreamPartitionStream = BoxStream<'static, Result<pb::PartitionChunk, Status>>;

    async fn stream_partition(
        &self,
        request: Request<pb::StreamPartitionRequest>,
    ) -> Result<Response<Self::StreamPartitionStream>, Status> {
        let request = request.into_inner();
        let chunks = self
            .api
            .stream_partition(request.partition, request.epoch, request.from_epoch)
            .await?;
        Ok(Response::new(
            chunks
                .map(|chunk| chunk.map(|chunk| wire::chunk(&chunk)).map_err(Status::from))
                .boxed(),
        ))
    }

    async fn walk(
        &self,
        request: Request<pb::WalkRequest>,
    ) -> Result<Response<pb::WalkResponse>, Status> {
        let peer = decoder(&request);
        let requests = Decoder { peer: &peer }.walk_requests(&request.into_inner().targets)?;
        let walks = self.api.walk(requests).await?;
        Ok(Response::new(pb::WalkResponse {
            walks: wire::walks(&walks),
        }))
    }

    async fn append_only_slice(
        &self,
        request: Request<pb::AppendOnlySliceRequest>,
    ) -> Result<Response<pb::AppendOnlySliceResponse>, Status> {
        let peer = decoder(&request);
        let request = request.into_inner();
        let root = Decoder { peer: &peer }
            .optional_node_ref(&request.root)?
            .ok_or_else(|| Status::invalid_argument("root is missing"))?;
        let slice = self
            .api
            .append_only_slice(root, request.start_epoch)
            .await?;
        Ok(Response::new(wire::slice(&slice)))
    }

    async fn lookup_plan(
        &self,
        request: Request<pb::LookupPlanRequest>,
    ) -> Result<Response<pb::LookupPlanResponse>, Status> {
        let request = request.into_inner();
        let plan = self
            .api
            .lookup_plan(akd_core::AkdLabel(request.label), request.epoch)
            .await?;
        Ok(Response::new(wire::lookup_plan(&plan)))
    }

    async fn absence_plan(
        &self,
        request: Request<pb::AbsencePlanRequest>,
    ) -> Result<Response<pb::AbsencePlanResponse>, Status> {
        let request = request.into_inner();
        let plan = self
            .api
            .absence_plan(akd_core::AkdLabel(request.label), request.epoch)
            .await?;
        Ok(Response::new(wire::absence_plan(&plan)))
    }

    async fn history_plan(
        &self,
        request: Request<pb::HistoryPlanRequest>,
    ) -> Result<Response<pb::HistoryPlanResponse>, Status> {
        let request = request.into_inner();
        let params = match request.most_recent {
            0 => akd_core::verify::history::HistoryParams::Complete,
            n => akd_core::verify::history::HistoryParams::MostRecent(
                usize::try_from(n)
                    .map_err(|_| Status::invalid_argument("most_recent is too large"))?,
            ),
        };
        let plan = self
            .api
            .history_plan(akd_core::AkdLabel(request.label), params, request.epoch)
            .await?;
        Ok(Response::new(wire::history_plan(&plan)))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let status = self.api.status().await?;
        Ok(Response::new(pb::StatusResponse {
            shard_id: status.id,
            partitions: status.partitions,
            prepared_epoch: status.prepared_epoch,
            built_epoch: status.built_epoch,
            seen_committed_epoch: status.seen_committed_epoch,
            label_cache_entries: status.label_cache_entries,
            partition_states: status
                .partition_states
                .iter()
                .map(wire::partition_state)
                .collect(),
            fence_term: status.fence_term,
            shard_map_version: status.shard_map_version,
            prune_floor: status.prune_floor,
            safe_epoch: status.safe_epoch,
            pruned_node_versions: status.pruned_node_versions,
        }))
    }
}
