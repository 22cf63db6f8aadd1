//! The `ktd.sequencer.v1.Sequencer` gRPC service: the data path (Append, GetEpoch, batches,
//! WatchLog). Commits are not served here: the leader's own coordinator proposes them in
//! process. Thin: each handler calls [`Sequencer`] and maps errors through
//! `From<SequencerError> for Status`.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use ktd_proto::ktd::sequencer::v1 as pb;
use ktd_proto::ktd::sequencer::v1::sequencer_server;
use tonic::{Request, Response, Status};

use crate::node::{Sequencer, WeakSequencer};
use crate::raft::state_machine::BatchRead;

/// Bytes of updates per streamed batch chunk.
const CHUNK_BYTES: usize = 1 << 20;

/// Largest request (an Append): one Raft entry, see `raft::network::MAX_MESSAGE_BYTES`.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;

/// The data-path service.
#[derive(Clone, Debug)]
pub struct ApiService {
    sequencer: WeakSequencer,
}

impl ApiService {
    /// Serves `sequencer` (without keeping it alive).
    pub fn new(sequencer: &Sequencer) -> Self {
        Self {
            sequencer: sequencer.downgrade(),
        }
    }

    fn node(&self) -> Result<Sequencer, Status> {
        self.sequencer
            .upgrade()
            .ok_or_else(|| Status::unavailable("the sequencer is shutting down"))
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> sequencer_server::SequencerServer<Self> {
        sequencer_server::SequencerServer::new(self)
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(64 << 20)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Splits a batch into chunks of about [`CHUNK_BYTES`].
fn chunks(batch: BatchRead) -> Vec<Result<pb::BatchChunk, Status>> {
    let total = batch.updates.len() as u64;
    let header = |updates| pb::BatchChunk {
        epoch: batch.epoch,
        as_of_index: batch.as_of_index,
        updates,
        total,
        sealed: batch.sealed,
    };
    let mut out = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0;
    for update in batch.updates {
        let size = update.label.len() + update.value.len() + 16;
        if !current.is_empty() && bytes + size > CHUNK_BYTES {
            out.push(Ok(header(std::mem::take(&mut current))));
            bytes = 0;
        }
        bytes += size;
        current.push(update);
    }
    if !current.is_empty() || out.is_empty() {
        out.push(Ok(header(current)));
    }
    out
}

#[tonic::async_trait]
impl sequencer_server::Sequencer for ApiService {
    async fn append(
        &self,
        request: Request<pb::AppendRequest>,
    ) -> Result<Response<pb::AppendResponse>, Status> {
        let request = request.into_inner();
        let answer = self
            .node()?
            .append(request.updates, request.idempotency_key)
            .await?;
        Ok(Response::new(answer))
    }

    async fn get_epoch(
        &self,
        request: Request<pb::GetEpochRequest>,
    ) -> Result<Response<pb::EpochRecord>, Status> {
        let request = request.into_inner();
        let node = self.node()?;
        let record = if request.local {
            node.get_local_epoch(request.epoch).await?
        } else {
            node.get_epoch(request.epoch).await?
        };
        Ok(Response::new(record))
    }

    type GetSealedBatchStream = BoxStream<pb::BatchChunk>;

    async fn get_sealed_batch(
        &self,
        request: Request<pb::GetSealedBatchRequest>,
    ) -> Result<Response<Self::GetSealedBatchStream>, Status> {
        let batch = self
            .node()?
            .sealed_batch(request.into_inner().epoch)
            .await?;
        Ok(Response::new(Box::pin(futures::stream::iter(chunks(
            batch,
        )))))
    }

    type GetOpenEpochStream = BoxStream<pb::BatchChunk>;

    async fn get_open_epoch(
        &self,
        _request: Request<pb::GetOpenEpochRequest>,
    ) -> Result<Response<Self::GetOpenEpochStream>, Status> {
        let batch = self.node()?.open_epoch().await?;
        Ok(Response::new(Box::pin(futures::stream::iter(chunks(
            batch,
        )))))
    }

    type WatchLogStream = BoxStream<pb::LogEvent>;

    async fn watch_log(
        &self,
        request: Request<pb::WatchLogRequest>,
    ) -> Result<Response<Self::WatchLogStream>, Status> {
        let from_index = request.into_inner().from_index;
        let node = self.node()?;
        // A purged start position is an error status, not a stream that fails at once.
        node.check_log_position(from_index).await?;
        let stream = node
            .watch_log(from_index)
            .map(|item| item.map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_cluster_metadata(
        &self,
        _request: Request<pb::GetClusterMetadataRequest>,
    ) -> Result<Response<pb::ClusterMetadataResponse>, Status> {
        let (metadata, shard_map) = self.node()?.cluster_metadata();
        Ok(Response::new(pb::ClusterMetadataResponse {
            metadata,
            shard_map: Some(shard_map),
        }))
    }
}
