//! Raft transport, client side: openraft's `RaftNetworkV2` over tonic.
//!
//! * **Persistent, pooled connections.** One lazily connected HTTP/2 `Channel` per peer and
//!   purpose (replication, heartbeats and votes, snapshots), shared by every client openraft
//!   creates for that peer, so a snapshot transfer never queues heartbeats behind it. Channels
//!   reconnect by themselves; `TCP_NODELAY` and HTTP/2 keepalive are on.
//! * **Deadlines on every RPC.** Unary calls are bounded by openraft's `RPCOption` TTL (client
//!   side, and as the `grpc-timeout` the server enforces). The StreamAppend stream is bounded by
//!   a setup deadline and a progress deadline: while requests are in flight, a response must
//!   arrive within `stream_progress_timeout`. A snapshot transfer is bounded by a deadline
//!   derived from its size and races openraft's cancel signal.
//! * **Dial overrides.** A peer listed in `peer_overrides` is dialled at that address instead of
//!   its membership address (the chaos harness routes each directed link through a fault proxy).
//! * **Errors drive backoff.** Every failure is reported as `Unreachable`, so openraft backs off
//!   instead of retrying a dead peer in a tight loop.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use ktd_proto::ktd::raft::v1 as rpb;
use ktd_proto::ktd::raft::v1::raft_client::RaftClient;
use openraft::base::{BoxFuture, BoxStream};
use openraft::error::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, RaftNetworkFactory, RaftNetworkV2};
use tonic::transport::{Channel, Endpoint};

use crate::raft::codec;
use crate::raft::snapshot::{self, RaftSnapshot, SnapshotHandle};
use crate::raft::types::{Node, NodeId, TypeConfig, Vote};

/// Bytes per snapshot chunk.
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// Largest Raft transport message: 32 entries (`max_payload_entries`) of at most 16 MiB (the
/// API's Append limit).
pub const MAX_MESSAGE_BYTES: usize = 512 << 20;

/// Timeouts of the peer transport.
#[derive(Clone, Debug)]
pub struct TransportOptions {
    /// Bound on establishing a TCP connection.
    pub connect_timeout: Duration,
    /// With StreamAppend requests in flight, the longest wait for the next response.
    pub stream_progress_timeout: Duration,
    /// The smallest deadline of a snapshot transfer.
    pub snapshot_min_timeout: Duration,
    /// Assumed worst-case transfer rate, for larger snapshots' deadlines.
    pub snapshot_bytes_per_second: u64,
}

impl Default for TransportOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            stream_progress_timeout: Duration::from_secs(3),
            snapshot_min_timeout: Duration::from_secs(30),
            snapshot_bytes_per_second: 20 << 20,
        }
    }
}

/// What a channel is used for; each gets its own connection per peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Purpose {
    Replication,
    Heartbeat,
    Snapshot,
}

/// Builds a lazily connected channel with the transport's socket options (mutual TLS when the
/// process installed it: `ktd_rpc::security::endpoint`).
pub fn endpoint(
    addr: &str,
    connect_timeout: Duration,
) -> Result<Endpoint, ktd_rpc::security::SecurityError> {
    Ok(ktd_rpc::security::endpoint(addr)?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .tcp_keepalive(Some(Duration::from_secs(10)))
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true))
}

/// The pool of peer channels.
#[derive(Debug, Default)]
struct ChannelPool {
    channels: Mutex<HashMap<(String, Purpose), Channel>>,
}

impl ChannelPool {
    fn get(
        &self,
        addr: &str,
        purpose: Purpose,
        connect_timeout: Duration,
    ) -> Result<Channel, String> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(channel) = channels.get(&(addr.to_string(), purpose)) {
            return Ok(channel.clone());
        }
        let channel = endpoint(addr, connect_timeout)
            .map_err(|error| format!("bad peer address {addr:?}: {error}"))?
            .connect_lazy();
        channels.insert((addr.to_string(), purpose), channel.clone());
        Ok(channel)
    }
}

/// Creates per-peer clients for openraft.
#[derive(Clone, Debug)]
pub struct PeerNetwork {
    pool: Arc<ChannelPool>,
    options: TransportOptions,
    /// Dial these addresses instead of the membership's (`peer_overrides` in the config).
    overrides: Arc<BTreeMap<NodeId, String>>,
}

impl PeerNetwork {
    /// A network with its own channel pool.
    pub fn new(options: TransportOptions) -> Self {
        Self {
            pool: Arc::new(ChannelPool::default()),
            options,
            overrides: Arc::default(),
        }
    }

    /// Dials peer `id` at `overrides[id]` instead of its membership address.
    pub fn with_overrides(mut self, overrides: BTreeMap<NodeId, String>) -> Self {
        self.overrides = Arc::new(overrides);
        self
    }

    fn client(&self, target: NodeId, node: &Node, purpose: Purpose) -> PeerClient {
        let addr = self.overrides.get(&target).unwrap_or(&node.addr);
        PeerClient {
            target,
            client: self
                .pool
                .get(addr, purpose, self.options.connect_timeout)
                .map(|channel| {
                    RaftClient::new(channel)
                        .max_decoding_message_size(MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(MAX_MESSAGE_BYTES)
                }),
            options: self.options.clone(),
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerClient {
        self.client(target, node, Purpose::Replication)
    }

    async fn new_heartbeat_client(&mut self, target: NodeId, node: &Node) -> PeerClient {
        self.client(target, node, Purpose::Heartbeat)
    }

    async fn new_snapshot_client(&mut self, target: NodeId, node: &Node) -> PeerClient {
        self.client(target, node, Purpose::Snapshot)
    }
}

/// A client for one peer.
pub struct PeerClient {
    target: NodeId,
    client: Result<RaftClient<Channel>, String>,
    options: TransportOptions,
}

fn unreachable(message: impl ToString) -> Unreachable<TypeConfig> {
    Unreachable::from_string(message)
}

impl PeerClient {
    fn client(&self) -> Result<RaftClient<Channel>, Unreachable<TypeConfig>> {
        self.client.clone().map_err(unreachable)
    }

    /// Runs a unary call under `ttl` (client-side timeout and server-side grpc-timeout).
    async fn unary<Req, Resp, F, Fut>(
        &self,
        what: &str,
        ttl: Duration,
        request: Req,
        call: F,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        F: FnOnce(RaftClient<Channel>, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let client = self.client()?;
        let mut request = tonic::Request::new(request);
        request.set_timeout(ttl);
        match tokio::time::timeout(ttl, call(client, request)).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(RPCError::Unreachable(unreachable(format!(
                "{what} to node {}: {}: {}",
                self.target,
                status.code(),
                status.message()
            )))),
            Err(_) => Err(RPCError::Unreachable(unreachable(format!(
                "{what} to node {} timed out after {ttl:?}",
                self.target
            )))),
        }
    }
}

fn malformed(error: impl ToString) -> RPCError<TypeConfig> {
    RPCError::Unreachable(unreachable(format!(
        "malformed reply: {}",
        error.to_string()
    )))
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotHandle;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let request = codec::append_request_to_pb(&rpc);
        let response = self
            .unary(
                "append entries",
                option.hard_ttl(),
                request,
                |mut client, request| async move { client.append_entries(request).await },
            )
            .await?;
        codec::append_response_from_pb(response).map_err(malformed)
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<
            BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>,
            RPCError<TypeConfig>,
        >,
    >
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + OptionalSend + Unpin + 'static,
    {
        let target = self.target;
        let progress_timeout = self.options.stream_progress_timeout.max(option.soft_ttl());
        let setup_timeout = self.options.connect_timeout.max(option.hard_ttl());
        let client = self.client();
        Box::pin(async move {
            let mut client = client?;
            // Pull the first request before connecting: openraft applies its replication backoff
            // while producing requests, so a peer that refuses connections is retried at the
            // backoff's pace rather than in a tight loop.
            let mut input = input;
            let Some(first) = input.next().await else {
                return Ok(Box::pin(futures::stream::empty()) as BoxStream<'s, _>);
            };
            let in_flight = Arc::new(AtomicUsize::new(1));
            let sent = in_flight.clone();
            let requests =
                futures::stream::once(futures::future::ready(codec::append_request_to_pb(&first)))
                    .chain(input.map(move |request| {
                        sent.fetch_add(1, Ordering::SeqCst);
                        codec::append_request_to_pb(&request)
                    }));
            let responses =
                match tokio::time::timeout(setup_timeout, client.stream_append(requests)).await {
                    Ok(Ok(response)) => response.into_inner(),
                    Ok(Err(status)) => {
                        return Err(RPCError::Unreachable(unreachable(format!(
                            "stream append to node {target}: {}: {}",
                            status.code(),
                            status.message()
                        ))));
                    }
                    Err(_) => {
                        return Err(RPCError::Unreachable(unreachable(format!(
                            "stream append to node {target}: no answer within {setup_timeout:?}"
                        ))));
                    }
                };
            let output = futures::stream::unfold(
                Some((responses, in_flight)),
                move |state| async move {
                    let (mut responses, in_flight) = state?;
                    loop {
                        match tokio::time::timeout(progress_timeout, responses.next()).await {
                            Ok(None) => return None,
                            Ok(Some(Ok(response))) => {
                                in_flight.fetch_sub(1, Ordering::SeqCst);
                                let result =
                                    codec::stream_result_from_pb(response).map_err(malformed);
                                let next = result.is_ok().then_some((responses, in_flight));
                                return Some((result, next));
                            }
                            Ok(Some(Err(status))) => {
                                let error = RPCError::Unreachable(unreachable(format!(
                                    "stream append to node {target}: {}: {}",
                                    status.code(),
                                    status.message()
                                )));
                                return Some((Err(error), None));
                            }
                            // Idle (nothing sent that awaits an answer): keep waiting.
                            Err(_) if in_flight.load(Ordering::SeqCst) == 0 => {}
                            Err(_) => {
                                let error = RPCError::Unreachable(unreachable(format!(
                                    "stream append to node {target}: no progress within {progress_timeout:?}"
                                )));
                                return Some((Err(error), None));
                            }
                        }
                    }
                },
            );
            Ok(Box::pin(output) as BoxStream<'s, _>)
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let request = codec::vote_request_to_pb(&rpc);
        let response = self
            .unary(
                "vote",
                option.hard_ttl(),
                request,
                |mut client, request| async move { client.vote(request).await },
            )
            .await?;
        codec::vote_response_from_pb(&response).map_err(malformed)
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let request = codec::vote_request_to_pb(&rpc);
        let response = self
            .unary(
                "pre-vote",
                option.hard_ttl(),
                request,
                |mut client, request| async move { client.pre_vote(request).await },
            )
            .await?;
        codec::vote_response_from_pb(&response).map_err(malformed)
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: RaftSnapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let mut client = self.client()?;
        let target = self.target;
        let dir = snapshot.snapshot.dir.clone();
        let files = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || snapshot::files(&dir))
                .await
                .map_err(|error| unreachable(format!("list snapshot files: {error}")))?
                .map_err(|error| unreachable(format!("list snapshot files: {error}")))?
        };
        let total_bytes: u64 = files.iter().map(|(_, size)| size).sum();
        let deadline = self.options.snapshot_min_timeout.max(Duration::from_secs(
            total_bytes / self.options.snapshot_bytes_per_second.max(1),
        ));
        let header = rpb::SnapshotChunk {
            kind: Some(rpb::snapshot_chunk::Kind::Header(rpb::SnapshotHeader {
                vote: Some(codec::vote_to_pb(&vote)),
                meta: Some(codec::snapshot_meta_to_pb(&snapshot.meta)),
                total_bytes,
            })),
        };
        // A reader thread produces chunks (blocking file IO) into a bounded channel.
        let (chunks_tx, chunks_rx) = tokio::sync::mpsc::channel::<rpb::SnapshotChunk>(4);
        let reader = tokio::task::spawn_blocking(move || {
            read_snapshot_files(&dir, &files, header, &chunks_tx)
        });
        let transfer = async {
            let mut request =
                tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(chunks_rx));
            request.set_timeout(deadline);
            client.install_snapshot(request).await
        };
        let outcome = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            outcome = tokio::time::timeout(deadline, transfer) => outcome,
        };
        let read_result = reader.await;
        let response = match outcome {
            Err(_) => {
                return Err(StreamingError::Unreachable(unreachable(format!(
                    "snapshot to node {target}: not installed within {deadline:?}"
                ))));
            }
            Ok(Err(status)) => {
                return Err(StreamingError::Unreachable(unreachable(format!(
                    "snapshot to node {target}: {}: {}",
                    status.code(),
                    status.message()
                ))));
            }
            Ok(Ok(response)) => response.into_inner(),
        };
        if let Ok(Err(error)) = read_result {
            return Err(StreamingError::Unreachable(unreachable(format!(
                "snapshot to node {target}: reading files: {error}"
            ))));
        }
        let vote = codec::vote_from_pb(response.vote.as_ref()).map_err(|error| {
            unreachable(format!(
                "snapshot to node {target}: malformed reply: {error}"
            ))
        })?;
        Ok(SnapshotResponse::new(vote))
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let request = codec::transfer_request_to_pb(&req);
        let response = self
            .unary(
                "transfer leader",
                option.hard_ttl(),
                request,
                |mut client, request| async move { client.transfer_leader(request).await },
            )
            .await?;
        codec::transfer_response_from_pb(&response).map_err(malformed)
    }
}

/// Reads every file of a snapshot into chunks: header, file chunks, trailer with digests.
fn read_snapshot_files(
    dir: &std::path::Path,
    files: &[(String, u64)],
    header: rpb::SnapshotChunk,
    chunks: &tokio::sync::mpsc::Sender<rpb::SnapshotChunk>,
) -> Result<(), String> {
    let send = |chunk| {
        chunks
            .blocking_send(chunk)
            .map_err(|_| "receiver gone".to_string())
    };
    send(header)?;
    let mut digests = Vec::with_capacity(files.len());
    for (name, _) in files {
        let mut file =
            std::fs::File::open(dir.join(name)).map_err(|error| format!("open {name}: {error}"))?;
        let mut hasher = blake3::Hasher::new();
        let mut offset = 0u64;
        loop {
            let mut buffer = vec![0u8; SNAPSHOT_CHUNK_BYTES];
            let n = file
                .read(&mut buffer)
                .map_err(|error| format!("read {name}: {error}"))?;
            if n == 0 && offset > 0 {
                break;
            }
            buffer.truncate(n);
            hasher.update(&buffer);
            send(rpb::SnapshotChunk {
                kind: Some(rpb::snapshot_chunk::Kind::File(rpb::FileChunk {
                    file_name: name.clone(),
                    offset,
                    data: buffer,
                })),
            })?;
            offset += n as u64;
            if n == 0 {
                break;
            }
        }
        digests.push(rpb::FileDigest {
            file_name: name.clone(),
            size: offset,
            blake3: hasher.finalize().as_bytes().to_vec(),
        });
    }
    send(rpb::SnapshotChunk {
        kind: Some(rpb::snapshot_chunk::Kind::Trailer(rpb::SnapshotTrailer {
            files: digests,
        })),
    })
}
