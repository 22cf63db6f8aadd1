//! The `ktd.sequencer.v1.Sequencer` gRPC service: the data path (Append, GetEpoch, batches,
//! WatchLog). Batches are streamed from RocksDB a chunk at a time (never loaded whole);
//! `WatchLog` subscribers are bounded in number and buffered bytes (`watch.*`). Commits are not served here: the leader's own coordinator proposes them in
//! process. Thin: each handler calls [`Sequencer`] and maps errors through
//! `From<SequencerError> for Status`.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use ktd_proto::ktd::sequencer::v1 as pb;
use ktd_proto::ktd::sequencer::v1::sequencer_server;
use tonic::{Request, Response, Status};

use crate::node::{Sequencer, WeakSequencer};
use crate::raft::state_machine::BatchCursor;

/// Bytes of updates per streamed batch chunk (one update larger than this is a chunk alone).
pub const CHUNK_BYTES: usize = 1 << 20;

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

/// Streams a batch from `cursor` on, one chunk of about [`CHUNK_BYTES`] read from RocksDB (on a
/// blocking thread) when the transport asks for the next: a stream holds one chunk, whatever
/// the batch's size. Always at least one chunk (an empty batch is one empty chunk). The stream
/// holds the node weakly; a node shutting down ends it with `UNAVAILABLE`.
fn batch_stream(
    sequencer: WeakSequencer,
    cursor: BatchCursor,
    labels_only: bool,
) -> BoxStream<pb::BatchChunk> {
    let first = cursor.clone();
    let header = move |updates| pb::BatchChunk {
        epoch: first.epoch,
        as_of_index: first.as_of_index,
        updates,
        total: first.total,
        sealed: first.sealed,
    };
    Box::pin(futures::stream::try_unfold(Some(cursor), move |state| {
        let sequencer = sequencer.clone();
        async move {
            let Some(cursor) = state else {
                return Ok(None);
            };
            let node = sequencer
                .upgrade()
                .ok_or_else(|| Status::unavailable("the sequencer is shutting down"))?;
            let (updates, cursor) = node.batch_page(cursor, CHUNK_BYTES, labels_only).await?;
            let next = (!cursor.done).then_some(cursor);
            Ok(Some((header(updates), next)))
        }
    }))
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
            .append_keyed(request.updates, request.idempotency_key, request.retry_key)
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
        let cursor = self
            .node()?
            .start_batch(Some(request.into_inner().epoch))
            .await?;
        Ok(Response::new(batch_stream(
            self.sequencer.clone(),
            cursor,
            false,
        )))
    }

    type GetOpenEpochStream = BoxStream<pb::BatchChunk>;

    async fn get_open_epoch(
        &self,
        request: Request<pb::GetOpenEpochRequest>,
    ) -> Result<Response<Self::GetOpenEpochStream>, Status> {
        let labels_only = request.into_inner().labels_only;
        let cursor = self.node()?.start_batch(None).await?;
        Ok(Response::new(batch_stream(
            self.sequencer.clone(),
            cursor,
            labels_only,
        )))
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
            .watch_log(from_index)?
            .map(|item| item.map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_cluster_metadata(
        &self,
        _request: Request<pb::GetClusterMetadataRequest>,
    ) -> Result<Response<pb::ClusterMetadataResponse>, Status> {
        let node = self.node()?;
        let (metadata, shard_map) = node.cluster_metadata();
        Ok(Response::new(pb::ClusterMetadataResponse {
            metadata,
            shard_map: Some(shard_map),
            safe_epoch: node.history_retention().safe_epoch,
        }))
    }
}
