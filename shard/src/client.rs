//! [`GrpcShard`]: [`ShardApi`] over gRPC to a remote shard server, and [`GrpcPeers`], the pool
//! of such clients a shard or a gateway keeps.
//!
//! One persistent HTTP/2 channel per peer (tonic multiplexes calls on it), `TCP_NODELAY` on, a
//! connect timeout, and a deadline on every call. A failed call is `Error::Remote` with the
//! peer's status code; transport failures arrive as `UNAVAILABLE`.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
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
use crate::server::{MAX_MESSAGE_BYTES, MAX_REQUEST_MESSAGE_BYTES};
use crate::wire::{self, Decoder};
use ktd_core::Error as CoreError;
use ktd_core::proof::{AbsencePlan, HistoryPlan, LookupPlan};
use ktd_core::shard_map::ShardServer;
use ktd_core::tree::audit::AppendOnlySlice;
use ktd_core::tree::{
    LeavesByPartition, NewLeaf, NodeRef, PartitionWalk, SortedLeaves, WalkRequest,
};

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

/// Most update or leaf bytes the client puts in one request message of an epoch step.
pub const TRANSFER_CHUNK_BYTES: usize = 4 << 20;
/// Most updates in one `PrepareEpoch` or `ComputeLeaves` part, which bounds its answer too (at
/// most two leaves, about 150 bytes, per update).
pub const TRANSFER_CHUNK_UPDATES: usize = 25_000;

/// How a client splits an epoch step's share into messages: a part holds at most `bytes` of
/// updates or leaves (plus one update or leaf past it) and at most `updates` updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransferChunks {
    /// Bytes of updates (label + value) or leaves per part.
    pub bytes: usize,
    /// Updates per part.
    pub updates: usize,
}

impl Default for TransferChunks {
    fn default() -> Self {
        Self {
            bytes: TRANSFER_CHUNK_BYTES,
            updates: TRANSFER_CHUNK_UPDATES,
        }
    }
}

/// A client of one remote shard.
#[derive(Clone, Debug)]
pub struct GrpcShard {
    id: String,
    client: ShardClient<Channel>,
    timeouts: ClientTimeouts,
    chunks: TransferChunks,
}

impl GrpcShard {
    /// A client of `info`'s server; connects on first use and reconnects as needed.
    pub fn connect_lazy(info: &ShardServer, timeouts: ClientTimeouts) -> Result<Self> {
        Self::connect_lazy_with(info, timeouts, TransferChunks::default())
    }

    /// [`GrpcShard::connect_lazy`], splitting epoch steps into parts of `chunks`.
    pub fn connect_lazy_with(
        info: &ShardServer,
        timeouts: ClientTimeouts,
        chunks: TransferChunks,
    ) -> Result<Self> {
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
            .max_encoding_message_size(MAX_REQUEST_MESSAGE_BYTES);
        Ok(Self {
            id: info.id.clone(),
            client,
            timeouts,
            chunks,
        })
    }

    fn request<T>(&self, message: T, timeout: Duration) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        ktd_rpc::telemetry::inject_context(&mut request);
        request.set_timeout(timeout);
        request
    }

    fn remote(&self, status: tonic::Status) -> Error {
        if let Some(pruned) = crate::server::pruned_of(&status) {
            return Error::Core(pruned);
        }
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
        // Parts of the share, each with the same user partitions: a label's leaves depend only
        // on its own versions, so the parts' leaves together are the whole share's.
        let mut traces_by_index: BTreeMap<u32, String> = traces
            .into_iter()
            .map(|trace| (trace.index, trace.traceparent))
            .collect();
        let mut summary = PrepareSummary::default();
        let mut parts: BTreeMap<u32, Vec<LeavesByPartition>> = BTreeMap::new();
        let ranges = update_chunks(&updates, self.chunks);
        let single = ranges.len() == 1;
        for range in ranges {
            let start = range.start as u32;
            let end = range.end as u32;
            let mut part_traces = Vec::new();
            while let Some(entry) = traces_by_index.first_entry() {
                if *entry.key() >= end {
                    break;
                }
                let (index, traceparent) = entry.remove_entry();
                if index >= start {
                    part_traces.push(pb::UpdateTrace {
                        index: index - start,
                        traceparent,
                    });
                }
            }
            let request = pb::PrepareEpochRequest {
                epoch,
                updates: wire::updates(&updates[range]),
                traces: part_traces,
                fence: Some(wire::fence(fence)),
                user_partitions: user_partitions.clone(),
            };
            let response = self
                .client
                .clone()
                .prepare_epoch(self.request(request, self.timeouts.epoch_step))
                .await
                .map_err(|status| self.remote(status))?
                .into_inner();
            let decoder = self.decoder();
            summary.updates += response.updates;
            summary.changed += response.changed;
            summary.leaves += response.leaves;
            for leaves in &response.user_partitions {
                let leaves = decoder.user_partition_leaves(leaves)?;
                if single {
                    summary.user_partitions.push(leaves);
                } else {
                    parts
                        .entry(leaves.user_partition)
                        .or_default()
                        .push(leaves.leaves);
                }
            }
        }
        for (user_partition, parts) in parts {
            summary
                .user_partitions
                .push(merge_parts(user_partition, parts)?);
        }
        Ok(summary)
    }

    async fn compute_leaves(
        &self,
        epoch: u64,
        user_partition: u32,
        updates: Vec<(AkdLabel, AkdValue)>,
    ) -> Result<UserPartitionLeaves> {
        let ranges = update_chunks(&updates, self.chunks);
        let single = ranges.len() == 1;
        let mut parts = Vec::with_capacity(ranges.len());
        for range in ranges {
            let request = pb::ComputeLeavesRequest {
                epoch,
                user_partition,
                updates: wire::updates(&updates[range]),
            };
            let response = self
                .client
                .clone()
                .compute_leaves(self.request(request, self.timeouts.epoch_step))
                .await
                .map_err(|status| self.remote(status))?
                .into_inner();
            let leaves = response.leaves.ok_or_else(|| Error::BadMessage {
                peer: self.id.clone(),
                message: "ComputeLeavesResponse.leaves is missing".into(),
            })?;
            let leaves = self.decoder().user_partition_leaves(&leaves)?;
            if leaves.user_partition != user_partition {
                return Err(Error::BadMessage {
                    peer: self.id.clone(),
                    message: format!(
                        "ComputeLeaves for user partition {user_partition} answered for {}",
                        leaves.user_partition
                    ),
                });
            }
            if single {
                return Ok(leaves);
            }
            parts.push(leaves.leaves);
        }
        merge_parts(user_partition, parts)
    }

    async fn build_epoch(
        &self,
        epoch: u64,
        fence: &Fence,
        base_roots: Vec<(u32, Option<NodeRef>)>,
        leaves: LeavesByPartition,
        sources: Vec<u32>,
    ) -> Result<BuildSummary> {
        // One stream: the first message names the build, every message carries a part of the
        // leaves.
        let mut messages = vec![pb::BuildEpochRequest {
            epoch,
            base_roots: wire::partition_roots(&base_roots),
            fence: Some(wire::fence(fence)),
            leaves: Vec::new(),
            sources,
        }];
        for part in leaf_chunks(&leaves, self.chunks) {
            let last = messages.len() - 1;
            if messages[last].leaves.is_empty() {
                messages[last].leaves = part;
            } else {
                messages.push(pb::BuildEpochRequest {
                    leaves: part,
                    ..Default::default()
                });
            }
        }
        let response = self
            .client
            .clone()
            .build_epoch(self.request(futures::stream::iter(messages), self.timeouts.epoch_step))
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
        from_epoch: u64,
    ) -> Result<BoxStream<'static, Result<PartitionChunk>>> {
        let request = pb::StreamPartitionRequest {
            partition,
            epoch,
            from_epoch,
        };
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
            prune_floor: response.prune_floor,
            safe_epoch: response.safe_epoch,
            pruned_node_versions: response.pruned_node_versions,
        })
    }
}

/// Bytes one leaf takes on the wire (label and commitment, 32 bytes each, with their tags).
const LEAF_WIRE_BYTES: usize = 70;

/// Splits `updates` into consecutive parts of at most `chunks` (at least one part, maybe empty).
fn update_chunks(updates: &[(AkdLabel, AkdValue)], chunks: TransferChunks) -> Vec<Range<usize>> {
    let mut parts = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (index, (label, value)) in updates.iter().enumerate() {
        let size = label.0.len() + value.0.len() + 8;
        if index > start && (bytes + size > chunks.bytes || index - start >= chunks.updates) {
            parts.push(start..index);
            (start, bytes) = (index, 0);
        }
        bytes += size;
    }
    parts.push(start..updates.len());
    parts
}

/// Splits `leaves` into messages of at most `chunks.bytes` of leaves each (plus one leaf); a
/// partition's leaves may continue in the next message. No message for no leaves.
fn leaf_chunks(
    leaves: &LeavesByPartition,
    chunks: TransferChunks,
) -> Vec<Vec<pb::PartitionLeaves>> {
    let per_part = (chunks.bytes / LEAF_WIRE_BYTES).max(1);
    let mut parts: Vec<Vec<pb::PartitionLeaves>> = Vec::new();
    let mut room = 0;
    for (partition, group) in leaves {
        let mut rest = group.as_slice();
        loop {
            if room == 0 {
                parts.push(Vec::new());
                room = per_part;
            }
            let take = rest.len().min(room);
            let (now, later) = rest.split_at(take);
            if let Some(part) = parts.last_mut() {
                part.extend(wire::partition_leaves(&[(*partition, now.to_vec())]));
            }
            room -= take;
            rest = later;
            if rest.is_empty() {
                break;
            }
        }
    }
    parts
}

/// One user partition's leaves from the parts of a split request: every part's leaves together,
/// sorted and checked distinct per tree partition, and the digest of them all — what one request
/// for the whole share would have answered.
fn merge_parts(user_partition: u32, parts: Vec<LeavesByPartition>) -> Result<UserPartitionLeaves> {
    let mut by_partition: BTreeMap<u32, Vec<NewLeaf>> = BTreeMap::new();
    for part in parts {
        for (partition, leaves) in part {
            by_partition.entry(partition).or_default().extend(leaves);
        }
    }
    let mut all = Vec::new();
    let mut leaves = Vec::with_capacity(by_partition.len());
    for (partition, group) in by_partition {
        if group.is_empty() {
            continue;
        }
        let sorted = SortedLeaves::new(group)?.into_vec();
        all.extend_from_slice(&sorted);
        leaves.push((partition, sorted));
    }
    // Tree partitions are label prefixes, so partition order then label order is label order.
    let digest = SortedLeaves::new(all)?.digest();
    Ok(UserPartitionLeaves {
        user_partition,
        digest,
        leaves,
    })
}

/// A pool of [`GrpcShard`] clients, one per shard id and address.
#[derive(Debug, Default)]
pub struct GrpcPeers {
    timeouts: ClientTimeouts,
    chunks: TransferChunks,
    clients: Mutex<HashMap<(String, String), Arc<GrpcShard>>>,
}

impl GrpcPeers {
    /// An empty pool whose clients use `timeouts`.
    pub fn new(timeouts: ClientTimeouts) -> Self {
        Self {
            timeouts,
            chunks: TransferChunks::default(),
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// The pool, its clients splitting epoch steps into parts of `chunks`.
    pub fn with_transfer_chunks(mut self, chunks: TransferChunks) -> Self {
        self.chunks = chunks;
        self
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
        let client = Arc::new(GrpcShard::connect_lazy_with(
            info,
            self.timeouts,
            self.chunks,
        )?);
        clients.insert(key, client.clone());
        Ok(client)
    }
}

impl PeerResolver for GrpcPeers {
    fn peer(&self, info: &ShardServer) -> Result<Arc<dyn ShardApi>> {
        Ok(self.client(info)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use akd_core::{AzksValue, NodeLabel};

    fn update(i: usize, value_len: usize) -> (AkdLabel, AkdValue) {
        (
            AkdLabel(format!("user-{i}").into_bytes()),
            AkdValue(vec![7; value_len]),
        )
    }

    fn leaf(i: u32) -> NewLeaf {
        let mut label = [0u8; 32];
        label[..4].copy_from_slice(&i.to_be_bytes());
        NewLeaf {
            label: NodeLabel::new(label, 256),
            commitment: AzksValue([i as u8; 32]),
        }
    }

    #[test]
    fn update_parts_cover_every_update_once_and_respect_both_bounds() {
        let chunks = TransferChunks {
            bytes: 1000,
            updates: 10,
        };
        let updates: Vec<_> = (0..95).map(|i| update(i, (i * 37) % 300)).collect();
        let parts = update_chunks(&updates, chunks);
        assert_eq!(parts.first().map(|part| part.start), Some(0));
        assert_eq!(parts.last().map(|part| part.end), Some(updates.len()));
        for pair in parts.windows(2) {
            assert_eq!(pair[0].end, pair[1].start, "consecutive, no gap or overlap");
        }
        for part in &parts {
            assert!(!part.is_empty() && part.len() <= chunks.updates);
            let bytes: usize = updates[part.clone()]
                .iter()
                .map(|(label, value)| label.0.len() + value.0.len() + 8)
                .sum();
            let last = &updates[part.end - 1];
            assert!(bytes - (last.0.0.len() + last.1.0.len() + 8) < chunks.bytes);
        }
        assert!(
            parts.len() > 95 / 10,
            "the byte bound split some parts early"
        );
        assert_eq!(update_chunks(&[], chunks), vec![0..0], "one empty part");
    }

    #[test]
    fn leaf_parts_carry_every_leaf_once_and_split_large_partitions() {
        let chunks = TransferChunks {
            bytes: 10 * LEAF_WIRE_BYTES,
            updates: 1,
        };
        let leaves: LeavesByPartition = vec![
            (0, (0..3).map(leaf).collect()),
            (1, Vec::new()),
            (2, (100..135).map(leaf).collect()),
        ];
        let parts = leaf_chunks(&leaves, chunks);
        assert!(
            parts
                .iter()
                .all(|part| { part.iter().map(|group| group.leaves.len()).sum::<usize>() <= 10 })
        );
        let decoder = Decoder { peer: "test" };
        let mut merged: BTreeMap<u32, Vec<NewLeaf>> = BTreeMap::new();
        for part in &parts {
            for (partition, group) in decoder.partition_leaves(part).expect("decode") {
                merged.entry(partition).or_default().extend(group);
            }
        }
        let expected: BTreeMap<u32, Vec<NewLeaf>> = leaves.into_iter().collect();
        assert_eq!(merged, expected);
        assert_eq!(parts.len(), 4, "38 leaves in parts of 10");
        assert!(leaf_chunks(&Vec::new(), chunks).is_empty());
    }

    #[test]
    fn merged_parts_have_the_leaves_and_digest_of_the_whole() {
        let all: Vec<NewLeaf> = (0..40).map(|i| leaf(i * 0x0100_0000 + i)).collect();
        let whole = SortedLeaves::new(all.clone()).expect("sorted");
        let digest = whole.digest();
        let by_partition = whole.split_by_partition(2);
        let parts: Vec<LeavesByPartition> = all
            .chunks(7)
            .rev()
            .map(|part| {
                SortedLeaves::new(part.to_vec())
                    .expect("sorted")
                    .split_by_partition(2)
                    .into_iter()
                    .map(|(partition, leaves)| (partition, leaves.into_vec()))
                    .collect()
            })
            .collect();
        let merged = merge_parts(3, parts).expect("merge");
        assert_eq!(merged.user_partition, 3);
        assert_eq!(merged.digest, digest);
        let expected: LeavesByPartition = by_partition
            .into_iter()
            .map(|(partition, leaves)| (partition, leaves.into_vec()))
            .collect();
        assert_eq!(merged.leaves, expected);
        let twice = vec![vec![(0, vec![leaf(1)])], vec![(0, vec![leaf(1)])]];
        assert!(
            merge_parts(0, twice).is_err(),
            "a leaf in two parts is refused"
        );
    }
}
