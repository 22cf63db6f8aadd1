//! Backup segments: a partition's stored records as of an epoch — or only what a range of epochs
//! wrote — kept in a file, in the checksummed chunks partition copies stream (ADR 0003,
//! `ktd admin backup` and `ktd admin restore`).
//!
//! A segment file is the magic [`SEGMENT_MAGIC`], then one `be32(len) ‖ ktd.shard.v1.PartitionChunk`
//! per chunk; the last chunk carries the number of records in the file. Segments of one
//! partition chain: `0 → A`, then `A → B` (what epochs `A+1..=B` wrote, from
//! `StreamPartition.from_epoch`), and their union holds every node version the roots of epochs
//! from the backup's safe epoch to `B` reach (a version at most `A` that such a root reaches was
//! reachable at `A` too, so the `0 → A` segment has it).
//!
//! Invariants:
//! * A segment is written to `NAME.tmp`, fsynced, renamed and its directory fsynced: a segment
//!   name that exists is complete.
//! * Reading checks the magic, every chunk's checksum and the announced record count; a reader
//!   never trusts a length beyond [`MAX_CHUNK_BYTES`].
//! * [`verify_segments`] accepts a chain only if the tree it stores re-hashes, node by node, to
//!   the expected partition root — the check that refuses a tampered backup whose file
//!   checksums were forged along with it.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use ktd_core::akd_core::configuration::Configuration;
use ktd_core::tree::{self, NodeRef};
use ktd_proto::ktd::shard::v1 as pb;
use prost::Message;

use crate::api::{PartitionChunk, chunk_checksum};
use crate::error::{Error, Result};
use crate::store::{RocksStore, StoreOptions};
use crate::wire;

/// The first bytes of every segment file (format version 1).
pub const SEGMENT_MAGIC: &[u8; 8] = b"KTDSEG1\n";
/// The largest chunk a segment may hold (a stream's chunks are about 1 MiB).
pub const MAX_CHUNK_BYTES: usize = 64 << 20;

/// What a written or read segment holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentSummary {
    /// Bytes of the file.
    pub file_bytes: u64,
    /// Records (node and user versions) in it.
    pub records: u64,
    /// BLAKE3 of the file's bytes.
    pub blake3: [u8; 32],
}

fn io_error<'a>(context: &'static str, path: &'a Path) -> impl Fn(std::io::Error) -> Error + 'a {
    move |error| {
        Error::Core(ktd_core::Error::Storage {
            context,
            message: format!("{}: {error}", path.display()),
        })
    }
}

/// Writes one segment file (see the module docs).
pub struct SegmentWriter {
    path: PathBuf,
    temporary: PathBuf,
    file: BufWriter<File>,
    hasher: blake3::Hasher,
    file_bytes: u64,
    records: u64,
}

impl SegmentWriter {
    /// Starts `path` (written as `path.tmp` until [`SegmentWriter::finish`]).
    pub fn create(path: &Path) -> Result<Self> {
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(".tmp");
        let temporary = PathBuf::from(temporary);
        let file = File::create(&temporary).map_err(io_error("create a segment", &temporary))?;
        let mut writer = Self {
            path: path.to_owned(),
            temporary,
            file: BufWriter::with_capacity(1 << 20, file),
            hasher: blake3::Hasher::new(),
            file_bytes: 0,
            records: 0,
        };
        writer.write_bytes(SEGMENT_MAGIC)?;
        Ok(writer)
    }

    fn write_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all(bytes)
            .map_err(io_error("write a segment", &self.temporary))?;
        self.hasher.update(bytes);
        self.file_bytes += bytes.len() as u64;
        Ok(())
    }

    /// Appends a chunk as streamed (its checksum is checked first; the stream's final,
    /// count-only chunk is not written: [`SegmentWriter::finish`] writes this file's own).
    pub fn write_chunk(&mut self, chunk: &PartitionChunk) -> Result<()> {
        if chunk_checksum(&chunk.nodes, &chunk.users) != chunk.checksum {
            return Err(Error::corrupt("a streamed chunk failed its checksum"));
        }
        if chunk.nodes.is_empty() && chunk.users.is_empty() {
            return Ok(());
        }
        self.records += (chunk.nodes.len() + chunk.users.len()) as u64;
        let mut message = wire::chunk(chunk);
        (message.last, message.total_records) = (false, 0);
        self.write_message(&message)
    }

    fn write_message(&mut self, message: &pb::PartitionChunk) -> Result<()> {
        let bytes = message.encode_to_vec();
        if bytes.len() > MAX_CHUNK_BYTES {
            return Err(Error::corrupt(format!(
                "a chunk of {} bytes is over the segment limit of {MAX_CHUNK_BYTES}",
                bytes.len()
            )));
        }
        self.write_bytes(&(bytes.len() as u32).to_be_bytes())?;
        self.write_bytes(&bytes)
    }

    /// Writes the record count, syncs, renames into place and syncs the directory.
    pub fn finish(mut self) -> Result<SegmentSummary> {
        let last = PartitionChunk {
            nodes: Vec::new(),
            users: Vec::new(),
            checksum: chunk_checksum(&[], &[]),
            total_records: Some(self.records),
        };
        self.write_message(&wire::chunk(&last))?;
        let file = self
            .file
            .into_inner()
            .map_err(|error| error.into_error())
            .map_err(io_error("write a segment", &self.temporary))?;
        file.sync_all()
            .map_err(io_error("sync a segment", &self.temporary))?;
        drop(file);
        std::fs::rename(&self.temporary, &self.path)
            .map_err(io_error("rename a segment into place", &self.path))?;
        if let Some(directory) = self.path.parent() {
            File::open(directory)
                .and_then(|directory| directory.sync_all())
                .map_err(io_error("sync the backup directory", directory))?;
        }
        Ok(SegmentSummary {
            file_bytes: self.file_bytes,
            records: self.records,
            blake3: *self.hasher.finalize().as_bytes(),
        })
    }
}

/// Reads a segment, checking it (see the module docs), and calls `visit` with every chunk that
/// holds records. Blocking.
pub fn read_segment(
    path: &Path,
    mut visit: impl FnMut(PartitionChunk) -> Result<()>,
) -> Result<SegmentSummary> {
    let file = File::open(path).map_err(io_error("open a segment", path))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut hasher = blake3::Hasher::new();
    let mut magic = [0u8; 8];
    reader
        .read_exact(&mut magic)
        .map_err(io_error("read a segment", path))?;
    if &magic != SEGMENT_MAGIC {
        return Err(Error::corrupt(format!(
            "{} is not a ktd backup segment (bad magic)",
            path.display()
        )));
    }
    hasher.update(&magic);
    let mut file_bytes = magic.len() as u64;
    let mut records = 0u64;
    let peer = path.display().to_string();
    let decoder = wire::Decoder { peer: &peer };
    let mut buffer = Vec::new();
    loop {
        let mut length = [0u8; 4];
        match reader.read_exact(&mut length) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(Error::corrupt(format!(
                    "{} ends without its record count (truncated)",
                    path.display()
                )));
            }
            Err(error) => return Err(io_error("read a segment", path)(error)),
        }
        let length_value = u32::from_be_bytes(length) as usize;
        if length_value > MAX_CHUNK_BYTES {
            return Err(Error::corrupt(format!(
                "{} announces a chunk of {length_value} bytes (limit {MAX_CHUNK_BYTES})",
                path.display()
            )));
        }
        buffer.resize(length_value, 0);
        reader.read_exact(&mut buffer).map_err(|error| {
            if error.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::corrupt(format!(
                    "{} ends inside a chunk (truncated)",
                    path.display()
                ))
            } else {
                io_error("read a segment", path)(error)
            }
        })?;
        hasher.update(&length);
        hasher.update(&buffer);
        file_bytes += 4 + length_value as u64;
        let message = pb::PartitionChunk::decode(buffer.as_slice()).map_err(|error| {
            Error::corrupt(format!(
                "{}: a chunk does not decode: {error}",
                path.display()
            ))
        })?;
        let chunk = decoder.chunk(message)?;
        if chunk_checksum(&chunk.nodes, &chunk.users) != chunk.checksum {
            return Err(Error::corrupt(format!(
                "{}: a chunk failed its checksum",
                path.display()
            )));
        }
        if let Some(total) = chunk.total_records {
            if total != records {
                return Err(Error::corrupt(format!(
                    "{} holds {records} records; it announces {total}",
                    path.display()
                )));
            }
            let mut rest = [0u8; 1];
            if reader
                .read(&mut rest)
                .map_err(io_error("read a segment", path))?
                != 0
            {
                return Err(Error::corrupt(format!(
                    "{} has bytes after its record count",
                    path.display()
                )));
            }
            return Ok(SegmentSummary {
                file_bytes,
                records,
                blake3: *hasher.finalize().as_bytes(),
            });
        }
        records += (chunk.nodes.len() + chunk.users.len()) as u64;
        visit(chunk)?;
    }
}

/// What [`verify_segments`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainCheck {
    /// Each segment as read, in chain order (for the caller's checksums).
    pub segments: Vec<SegmentSummary>,
    /// Records imported from the chain.
    pub records: u64,
    /// Interior nodes re-hashed.
    pub nodes_checked: u64,
}

/// Imports the chain `segments` of `partition` as of `epoch` into a new store at `scratch` (an
/// absent or empty directory, removed afterwards) with the checks a partition copy makes, then
/// re-hashes the stored tree under `expected_root` node by node. Blocking.
pub fn verify_segments<TC: Configuration>(
    segments: &[PathBuf],
    partition: u32,
    epoch: u64,
    bits: u8,
    expected_root: Option<NodeRef>,
    scratch: &Path,
) -> Result<ChainCheck> {
    let checked = (|| {
        let (store, _) = RocksStore::open(scratch, StoreOptions::default())?;
        let mut records = 0u64;
        let mut summaries = Vec::with_capacity(segments.len());
        for segment in segments {
            summaries.push(read_segment(segment, |chunk| {
                records += (chunk.nodes.len() + chunk.users.len()) as u64;
                Ok(store.import_records(partition, epoch, bits, &chunk.nodes, &chunk.users)?)
            })?);
        }
        let nodes_checked = tree::verify_partition::<TC, _>(&*store, expected_root)?;
        Ok(ChainCheck {
            segments: summaries,
            records,
            nodes_checked,
        })
    })();
    let _ = std::fs::remove_dir_all(scratch);
    checked
}

/// A `ktd.shard.v1.Shard` service that serves a backup's partitions from segment files — the
/// source shard servers copy from while a backup is restored. It answers `StreamPartition` at
/// the backup's epoch (every partition's chain, from epoch 0) and nothing else.
#[derive(Clone, Debug)]
pub struct BackupSource {
    epoch: u64,
    chains: std::sync::Arc<std::collections::BTreeMap<u32, Vec<PathBuf>>>,
}

impl BackupSource {
    /// Serves `chains` (partition → its segments, oldest first) as of `epoch`.
    pub fn new(epoch: u64, chains: std::collections::BTreeMap<u32, Vec<PathBuf>>) -> Self {
        Self {
            epoch,
            chains: std::sync::Arc::new(chains),
        }
    }

    /// The tonic service.
    pub fn service(self) -> pb::shard_server::ShardServer<Self> {
        pb::shard_server::ShardServer::new(self)
            .max_decoding_message_size(1 << 20)
            .max_encoding_message_size(crate::server::MAX_MESSAGE_BYTES)
    }
}

fn not_served() -> tonic::Status {
    tonic::Status::unimplemented("a backup source serves StreamPartition only")
}

type Reply<T> = std::result::Result<tonic::Response<T>, tonic::Status>;

#[tonic::async_trait]
impl pb::shard_server::Shard for BackupSource {
    async fn prepare_epoch(
        &self,
        _request: tonic::Request<pb::PrepareEpochRequest>,
    ) -> Reply<pb::PrepareEpochResponse> {
        Err(not_served())
    }

    async fn compute_leaves(
        &self,
        _request: tonic::Request<pb::ComputeLeavesRequest>,
    ) -> Reply<pb::ComputeLeavesResponse> {
        Err(not_served())
    }

    async fn build_epoch(
        &self,
        _request: tonic::Request<tonic::Streaming<pb::BuildEpochRequest>>,
    ) -> Reply<pb::BuildEpochResponse> {
        Err(not_served())
    }

    async fn bootstrap(
        &self,
        _request: tonic::Request<pb::BootstrapRequest>,
    ) -> Reply<pb::BootstrapResponse> {
        Err(not_served())
    }

    type StreamPartitionStream =
        futures::stream::BoxStream<'static, std::result::Result<pb::PartitionChunk, tonic::Status>>;

    async fn stream_partition(
        &self,
        request: tonic::Request<pb::StreamPartitionRequest>,
    ) -> Reply<Self::StreamPartitionStream> {
        use futures::StreamExt;
        let request = request.into_inner();
        if request.epoch != self.epoch || request.from_epoch != 0 {
            return Err(tonic::Status::failed_precondition(format!(
                "this backup holds epoch {} from epoch 0; asked for {} from {}",
                self.epoch, request.epoch, request.from_epoch
            )));
        }
        let Some(chain) = self.chains.get(&request.partition).cloned() else {
            return Err(tonic::Status::not_found(format!(
                "this backup has no partition {}",
                request.partition
            )));
        };
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let mut records = 0u64;
            for segment in &chain {
                let read = read_segment(segment, |chunk| {
                    records += (chunk.nodes.len() + chunk.users.len()) as u64;
                    sender
                        .blocking_send(Ok(wire::chunk(&chunk)))
                        .map_err(|_| Error::corrupt("the receiver went away"))
                });
                if let Err(error) = read {
                    let _ = sender.blocking_send(Err(tonic::Status::data_loss(format!(
                        "backup segment {}: {error}",
                        segment.display()
                    ))));
                    return;
                }
            }
            let last = PartitionChunk {
                nodes: Vec::new(),
                users: Vec::new(),
                checksum: chunk_checksum(&[], &[]),
                total_records: Some(records),
            };
            let _ = sender.blocking_send(Ok(wire::chunk(&last)));
        });
        Ok(tonic::Response::new(
            tokio_stream::wrappers::ReceiverStream::new(receiver).boxed(),
        ))
    }

    async fn walk(&self, _request: tonic::Request<pb::WalkRequest>) -> Reply<pb::WalkResponse> {
        Err(not_served())
    }

    async fn append_only_slice(
        &self,
        _request: tonic::Request<pb::AppendOnlySliceRequest>,
    ) -> Reply<pb::AppendOnlySliceResponse> {
        Err(not_served())
    }

    async fn lookup_plan(
        &self,
        _request: tonic::Request<pb::LookupPlanRequest>,
    ) -> Reply<pb::LookupPlanResponse> {
        Err(not_served())
    }

    async fn history_plan(
        &self,
        _request: tonic::Request<pb::HistoryPlanRequest>,
    ) -> Reply<pb::HistoryPlanResponse> {
        Err(not_served())
    }

    async fn absence_plan(
        &self,
        _request: tonic::Request<pb::AbsencePlanRequest>,
    ) -> Reply<pb::AbsencePlanResponse> {
        Err(not_served())
    }

    async fn status(
        &self,
        _request: tonic::Request<pb::StatusRequest>,
    ) -> Reply<pb::StatusResponse> {
        Err(not_served())
    }
}
