//! Raft transport, server side: the `ktd.raft.v1.Raft` gRPC service, handing each RPC to the
//! local openraft node.
//!
//! A snapshot arrives as a client stream (header, file chunks, trailer); it is written under
//! `snapshots/incoming/`, checked against the trailer's digests, synced, and only then given to
//! `Raft::install_full_snapshot`. One snapshot is received at a time (a second concurrent stream
//! gets `RESOURCE_EXHAUSTED`); a stream over [`SnapshotLimits`] gets `RESOURCE_EXHAUSTED`, one
//! that sends nothing for the idle timeout `DEADLINE_EXCEEDED`; either way, and on any other
//! failure, what it wrote is removed before the answer.

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};

use futures::{Stream, StreamExt};
use ktd_proto::ktd::raft::v1 as rpb;
use ktd_proto::ktd::raft::v1::raft_server;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::error::SequencerError;
use crate::raft::Raft;
use crate::raft::codec;
use crate::raft::db::Storage;
use crate::raft::snapshot::{IncomingSnapshot, SnapshotHandle, SnapshotLimits};

/// The Raft transport service.
pub struct RaftService {
    raft: Raft,
    /// Weak: a connection that outlives the server must not keep the database open.
    storage: Weak<Storage>,
    shutdown: CancellationToken,
    snapshot_limits: SnapshotLimits,
    /// Longest wait for the next message of a snapshot stream.
    snapshot_idle_timeout: std::time::Duration,
    /// The one permit to receive a snapshot.
    receiving: Arc<tokio::sync::Semaphore>,
}

impl RaftService {
    /// Serves `raft`; received snapshots go under `storage`'s snapshot directory. Long-lived
    /// replication streams end when `shutdown` is cancelled, so a stopping server can drain.
    pub fn new(raft: Raft, storage: Arc<Storage>, shutdown: CancellationToken) -> Self {
        Self {
            raft,
            storage: Arc::downgrade(&storage),
            shutdown,
            snapshot_limits: SnapshotLimits::default(),
            snapshot_idle_timeout: std::time::Duration::from_secs(30),
            receiving: Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }

    /// Bounds received snapshots by `limits`, and each message's wait by `idle_timeout`.
    pub fn with_snapshot_limits(
        mut self,
        limits: SnapshotLimits,
        idle_timeout: std::time::Duration,
    ) -> Self {
        self.snapshot_limits = limits;
        self.snapshot_idle_timeout = idle_timeout;
        self
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> raft_server::RaftServer<Self> {
        raft_server::RaftServer::new(self)
            .max_decoding_message_size(crate::raft::network::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(crate::raft::network::MAX_MESSAGE_BYTES)
    }
}

fn bad(error: SequencerError) -> Status {
    Status::invalid_argument(error.to_string())
}

/// Refuses a Raft message that claims to come from another node than the one the caller's
/// certificate is bound to (`urn:ktd:sequencer-id:N`): one sequencer's key cannot vote or lead
/// as another. Plaintext and unbound certificates are not checked here (the role check is
/// `ktd_rpc::security::sequencer_policy`).
fn check_sender<T>(request: &Request<T>, vote: Option<&rpb::Vote>) -> Result<(), Status> {
    check_claim(ktd_rpc::security::peer_sequencer_id(request), vote)
}

/// [`check_sender`] for a caller bound to node `bound` (`None`: not checked).
fn check_claim(bound: Option<u64>, vote: Option<&rpb::Vote>) -> Result<(), Status> {
    let Some(bound) = bound else {
        return Ok(());
    };
    let claimed = vote
        .and_then(|vote| vote.leader_id.as_ref())
        .map(|leader| leader.node_id);
    if claimed != Some(bound) {
        return Err(Status::permission_denied(format!(
            "this certificate is bound to node {bound}; the message claims node {}",
            claimed.map_or_else(|| "none".to_string(), |id| id.to_string())
        )));
    }
    Ok(())
}

fn raft_failed(error: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("raft: {error}"))
}

type StreamAppendStream =
    Pin<Box<dyn Stream<Item = Result<rpb::StreamAppendResponse, Status>> + Send>>;

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        request: Request<rpb::AppendEntriesRequest>,
    ) -> Result<Response<rpb::AppendEntriesResponse>, Status> {
        check_sender(&request, request.get_ref().vote.as_ref())?;
        let request = codec::append_request_from_pb(request.into_inner()).map_err(bad)?;
        let response = self
            .raft
            .append_entries(request)
            .await
            .map_err(raft_failed)?;
        Ok(Response::new(codec::append_response_to_pb(&response)))
    }

    type StreamAppendStream = StreamAppendStream;

    async fn stream_append(
        &self,
        request: Request<Streaming<rpb::AppendEntriesRequest>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        // A malformed request ends the input; openraft then ends the output after the replies
        // to the requests before it, and the output ends with the status saying why (an
        // undecodable message, a malformed one, or one claiming another node than the caller's
        // certificate is bound to); the leader starts a new stream. Shutdown ends the input
        // too: openraft reads it on a task of its own, which would otherwise keep the
        // connection (and this node's storage) alive until the leader sends again.
        let bound = ktd_rpc::security::peer_sequencer_id(&request);
        let refusal: Arc<Mutex<Option<Status>>> = Arc::default();
        let noted = refusal.clone();
        let input = request
            .into_inner()
            .take_until(self.shutdown.clone().cancelled_owned())
            .map(move |item| {
                let request = item?;
                check_claim(bound, request.vote.as_ref())?;
                codec::append_request_from_pb(request).map_err(bad)
            })
            .take_while(move |item| {
                if let Err(status) = item {
                    *noted
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(status.clone());
                }
                futures::future::ready(item.is_ok())
            })
            .filter_map(|item| futures::future::ready(item.ok()));
        let output = self
            .raft
            .stream_append(input)
            .map(|item| match item {
                Ok(result) => Ok(codec::stream_result_to_pb(&result)),
                Err(fatal) => Err(raft_failed(fatal)),
            })
            .chain(
                futures::stream::once(async move {
                    refusal
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .take()
                })
                .filter_map(|refused| futures::future::ready(refused.map(Err))),
            );
        Ok(Response::new(Box::pin(output)))
    }

    async fn vote(
        &self,
        request: Request<rpb::VoteRequest>,
    ) -> Result<Response<rpb::VoteResponse>, Status> {
        check_sender(&request, request.get_ref().vote.as_ref())?;
        let request = codec::vote_request_from_pb(request.get_ref()).map_err(bad)?;
        let response = self.raft.vote(request).await.map_err(raft_failed)?;
        Ok(Response::new(codec::vote_response_to_pb(&response)))
    }

    async fn pre_vote(
        &self,
        request: Request<rpb::VoteRequest>,
    ) -> Result<Response<rpb::VoteResponse>, Status> {
        check_sender(&request, request.get_ref().vote.as_ref())?;
        let request = codec::vote_request_from_pb(request.get_ref()).map_err(bad)?;
        let response = self.raft.pre_vote(request).await.map_err(raft_failed)?;
        Ok(Response::new(codec::vote_response_to_pb(&response)))
    }

    async fn transfer_leader(
        &self,
        request: Request<rpb::TransferLeaderRequest>,
    ) -> Result<Response<rpb::TransferLeaderResponse>, Status> {
        check_sender(&request, request.get_ref().from_leader.as_ref())?;
        let request = codec::transfer_request_from_pb(request.get_ref()).map_err(bad)?;
        let response = self
            .raft
            .handle_transfer_leader(request)
            .await
            .map_err(raft_failed)?;
        Ok(Response::new(codec::transfer_response_to_pb(&response)))
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<rpb::SnapshotChunk>>,
    ) -> Result<Response<rpb::SnapshotResponse>, Status> {
        let Ok(_permit) = self.receiving.clone().try_acquire_owned() else {
            return Err(SequencerError::SnapshotInProgress.into());
        };
        let mut chunks = request.into_inner();
        let idle = self.snapshot_idle_timeout;
        let Some(first) = next_chunk(&mut chunks, idle).await? else {
            return Err(Status::invalid_argument("empty snapshot stream"));
        };
        let Some(rpb::snapshot_chunk::Kind::Header(header)) = first.kind else {
            return Err(Status::invalid_argument(
                "a snapshot stream starts with its header",
            ));
        };
        if header.total_bytes > self.snapshot_limits.max_bytes {
            return Err(SequencerError::SnapshotTooLarge(format!(
                "announced {} bytes, over {} (raft.snapshot_max_bytes)",
                header.total_bytes, self.snapshot_limits.max_bytes
            ))
            .into());
        }
        let vote = codec::vote_from_pb(header.vote.as_ref()).map_err(bad)?;
        let meta = codec::snapshot_meta_from_pb(header.meta.as_ref()).map_err(bad)?;
        let storage = self
            .storage
            .upgrade()
            .ok_or_else(|| Status::unavailable("the node is shutting down"))?;
        let limits = self.snapshot_limits;
        let incoming =
            tokio::task::spawn_blocking(move || IncomingSnapshot::create(&storage, limits))
                .await
                .map_err(|error| Status::internal(error.to_string()))?
                .map_err(Status::from)?;
        let incoming = Arc::new(Mutex::new(Some(incoming)));
        let received = receive(&mut chunks, &incoming, idle).await;
        let handle = match received {
            Ok(handle) => handle,
            Err(status) => {
                // Remove what was written before answering (a leftover would also go at the
                // next start, or when the last reference drops).
                let _ = tokio::task::spawn_blocking(move || {
                    let taken = incoming
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .take();
                    if let Some(snapshot) = taken {
                        snapshot.discard();
                    }
                })
                .await;
                return Err(status);
            }
        };
        let dir = handle.dir.clone();
        let snapshot = openraft::storage::Snapshot {
            meta,
            snapshot: handle,
        };
        let result = self.raft.install_full_snapshot(vote, snapshot).await;
        // If openraft declined it (stale vote) the directory was never moved in place.
        if dir.exists() {
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        }
        let response = result.map_err(raft_failed)?;
        Ok(Response::new(rpb::SnapshotResponse {
            vote: Some(codec::vote_to_pb(&response.vote)),
        }))
    }
}

/// The next message of a snapshot stream, or `DEADLINE_EXCEEDED` after `idle` without one.
async fn next_chunk(
    chunks: &mut Streaming<rpb::SnapshotChunk>,
    idle: std::time::Duration,
) -> Result<Option<rpb::SnapshotChunk>, Status> {
    match tokio::time::timeout(idle, chunks.next()).await {
        Ok(next) => next.transpose(),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "snapshot stream: nothing received for {} ms",
            idle.as_millis()
        ))),
    }
}

/// Receives file chunks up to the trailer (which must end the stream) into `incoming`; every
/// write on a blocking thread.
async fn receive(
    chunks: &mut Streaming<rpb::SnapshotChunk>,
    incoming: &Arc<Mutex<Option<IncomingSnapshot>>>,
    idle: std::time::Duration,
) -> Result<SnapshotHandle, Status> {
    loop {
        let Some(chunk) = next_chunk(chunks, idle).await? else {
            return Err(Status::invalid_argument(
                "snapshot stream ended without a trailer",
            ));
        };
        let receiving = incoming.clone();
        let lock = move || {
            receiving
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take()
        };
        match chunk.kind {
            Some(rpb::snapshot_chunk::Kind::File(file)) => {
                let receiving = incoming.clone();
                tokio::task::spawn_blocking(move || {
                    let mut guard = receiving
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    guard
                        .as_mut()
                        .ok_or_else(|| {
                            SequencerError::Malformed("file chunk after trailer".into())
                        })?
                        .write_chunk(&file)
                })
                .await
                .map_err(|error| Status::internal(error.to_string()))?
                .map_err(Status::from)?;
            }
            Some(rpb::snapshot_chunk::Kind::Trailer(trailer)) => {
                let handle = tokio::task::spawn_blocking(move || match lock() {
                    Some(snapshot) => snapshot.finish(&trailer),
                    None => Err(SequencerError::Malformed("two snapshot trailers".into())),
                })
                .await
                .map_err(|error| Status::internal(error.to_string()))?
                .map_err(Status::from)?;
                let after = match next_chunk(chunks, idle).await {
                    Ok(None) => return Ok(handle),
                    Ok(Some(_)) => Status::invalid_argument("a message after the snapshot trailer"),
                    Err(status) => status,
                };
                let dir = handle.dir;
                let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
                return Err(after);
            }
            _ => {
                return Err(Status::invalid_argument(
                    "unexpected chunk in a snapshot stream",
                ));
            }
        }
    }
}
