//! `ktd admin backup`, `ktd admin verify-backup`, `ktd admin restore`: online backups of a
//! serving cluster and restores into a new one (ADR 0003, decisions 3 and 4).
//!
//! A backup directory holds immutable files under `segments/` and one manifest per backup
//! (`backup-<E>.json`, written last). A backup at committed epoch `E`:
//!
//! 1. pins `E` in the history retention record (`backup-<E>`, owner `backup`), so no shard prunes
//!    what `E`'s roots read while the copy runs, and releases the pin at the end, failed or not;
//! 2. copies the epoch records `A+1..=E` (`A`: the newest backup already in the directory of the
//!    same cluster, 0 for a full one) into `epochs-<A>-<E>.seg`;
//! 3. streams every partition from one replica (the map's read order, the next on failure) as of
//!    `E` — only what epochs `A+1..=E` wrote when `A > 0` — into `p<P>-<A>-<E>.seg`
//!    (`shard::backup`);
//! 4. writes the manifest: the cluster's identity (id, akd configuration, partition bits, VRF
//!    key), `E`, its root, every partition root, the safe epoch and window, the next sequence
//!    number, and every file of the chain with its size and BLAKE3.
//!
//! Verification (`verify-backup`, and the first step of every restore) needs no cluster: every
//! file's BLAKE3, the epoch records `1..=E` in order with each one's partition roots stitching
//! to its root, and every partition's chain imported into a scratch store and re-hashed node by
//! node to its root at `E` — a file changed together with its checksums still fails there.
//!
//! A restore goes into a new cluster started with the same akd configuration, partition bits
//! and VRF key, that never took an update (TiKV BR's rule). It serves the segments itself
//! (`shard::backup::BackupSource`), installs the epoch records through Raft (`Restore`), lets the
//! coordinator copy every partition onto its replicas — from the backup while no healthy voter
//! holds it, then from one that does — waits until every replica holds `E` with the committed
//! root, and finishes (updates are taken again, the backup's window and safe epoch apply). With
//! `--auditor` it first refuses a backup older than the newest head the auditor signed, or one
//! whose root differs from a signed head, unless `--force`.
//!
//! Point in time (`--to-epoch T`): before finishing, the archived epochs after the backup's up to
//! `T` (`super::archive`, checked file by file) are replayed one at a time through `Restore`
//! steps; the coordinator computes each as any epoch and the sequencers commit it only with the
//! archived root, so the restored directory is the original's at `T`, epoch boundaries and
//! sequence numbers included.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use ktd_core::ShardMap;
use ktd_core::akd_core::configuration::Configuration;
use ktd_core::config::{AkdConfig, Experimental, WhatsAppV1};
use ktd_core::tree::NodeRef;
use prost::Message;
use sequencer::{SequencerClient, pb};
use serde::{Deserialize, Serialize};
use shard::backup::{BackupSource, SegmentWriter};
use shard::cluster::ShardConnector;

use super::{AdminError, now_ms};

/// Manifest format version.
pub const MANIFEST_FORMAT: u32 = 1;
/// Epoch records per `Restore` step.
const RECORDS_PER_STEP: usize = 256;
/// Magic of an epoch-record file.
const EPOCHS_MAGIC: &[u8; 8] = b"KTDEPO1\n";

/// One immutable file of a backup chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Name under `segments/`.
    pub file: String,
    /// What epochs after this one wrote …
    pub from_epoch: u64,
    /// … up to this one.
    pub to_epoch: u64,
    /// Bytes of the file.
    pub bytes: u64,
    /// Records in it.
    pub records: u64,
    /// BLAKE3 of the file, hex.
    pub blake3: String,
}

/// One partition of a backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionEntry {
    /// The partition.
    pub partition: u32,
    /// Its root at the backup's epoch: `label_len:label_hex:min_epoch:max_epoch:hash_hex`, or
    /// `""` when the partition is empty.
    pub root: String,
    /// Its chain, oldest first.
    pub segments: Vec<FileEntry>,
}

/// `backup-<E>.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// The backed-up cluster's id, hex.
    pub cluster_id: String,
    /// Its akd configuration name.
    pub akd_configuration: String,
    /// Its partition bits.
    pub partition_bits: u32,
    /// Its VRF public key, hex.
    pub vrf_public_key: String,
    /// The backup's committed epoch.
    pub epoch: u64,
    /// The root hash at `epoch`, hex.
    pub root_hash: String,
    /// The oldest epoch readable from this backup (the cluster's safe epoch when it ended).
    pub safe_epoch: u64,
    /// The history window, as `ktd admin retention show` prints it.
    pub window: String,
    /// The history retention record (window and safe epoch), protobuf, hex.
    pub history: String,
    /// The sequence number the next update got when the backup was taken.
    pub next_sequence: u64,
    /// The backup this one extends (`None`: a full backup).
    pub parent_epoch: Option<u64>,
    /// When it was taken (ms since the Unix epoch).
    pub created_at_ms: u64,
    /// Epoch records `1..=epoch`, oldest file first.
    pub epochs: Vec<FileEntry>,
    /// Every partition.
    pub partitions: Vec<PartitionEntry>,
    /// The auditor's signed head for the backup's epoch, or its newest before it (`backup
    /// --auditor`); checked by every verification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auditor_head: Option<AuditorHead>,
}

/// An auditor's signed head kept in a manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditorHead {
    /// The auditor it came from (gRPC URL).
    pub auditor: String,
    /// The auditor's namespace.
    pub namespace: String,
    /// Its Ed25519 public key, hex.
    pub public_key: String,
    /// The epoch the head signs.
    pub epoch: u64,
    /// The `ktd.auditor.v1.SignedHead`, protobuf, hex.
    pub head: String,
}

impl AuditorHead {
    /// Checks the signature and returns the `(epoch, root)` the head vouches for.
    pub fn verify(&self) -> Result<(u64, [u8; 32]), AdminError> {
        use ktd_proto::ktd::auditor::v1 as apb;
        let refused =
            |why: String| AdminError::Refused(format!("the manifest's auditor head: {why}"));
        let key: [u8; 32] = hex::decode(&self.public_key)
            .ok()
            .and_then(|key| key.try_into().ok())
            .ok_or_else(|| refused("the public key is not 32 bytes of hex".into()))?;
        let head = hex::decode(&self.head)
            .ok()
            .and_then(|bytes| apb::SignedHead::decode(bytes.as_slice()).ok())
            .ok_or_else(|| refused("not a signed head".into()))?;
        let signed = ktd_client::head::verify_head(&key, &self.namespace, &head)
            .map_err(|error| refused(error.to_string()))?;
        if signed.0 != self.epoch {
            return Err(refused(format!(
                "it signs epoch {}, the manifest says {}",
                signed.0, self.epoch
            )));
        }
        Ok(signed)
    }
}

/// A gRPC client of the `ktd auditor` at `address`, and its info.
pub(crate) async fn connect_auditor(
    address: &str,
) -> Result<
    (
        ktd_proto::ktd::auditor::v1::auditor_client::AuditorClient<tonic::transport::Channel>,
        ktd_proto::ktd::auditor::v1::AuditorInfo,
    ),
    AdminError,
> {
    use ktd_proto::ktd::auditor::v1 as apb;
    let refused = |message: String| AdminError::Refused(format!("auditor {address}: {message}"));
    let mut auditor = apb::auditor_client::AuditorClient::connect(address.to_owned())
        .await
        .map_err(|error| refused(error.to_string()))?;
    let info = auditor
        .get_info(apb::GetInfoRequest {})
        .await
        .map_err(|status| refused(status.message().to_owned()))?
        .into_inner();
    Ok((auditor, info))
}

/// The auditor at `address`'s signed head for `epoch`, or its newest before it (`None`: it
/// has signed nothing up to `epoch`), checked against the committed root of its epoch.
async fn auditor_head(
    client: &SequencerClient,
    address: &str,
    epoch: u64,
) -> Result<Option<AuditorHead>, AdminError> {
    use ktd_proto::ktd::auditor::v1 as apb;
    let refused = |message: String| AdminError::Refused(format!("auditor {address}: {message}"));
    let (mut auditor, info) = connect_auditor(address).await?;
    let wanted = match info.last_verified_epoch {
        0 => return Ok(None),
        latest => latest.min(epoch),
    };
    let head = auditor
        .get_head(apb::GetHeadRequest {
            epoch: Some(wanted),
        })
        .await
        .map_err(|status| refused(status.message().to_owned()))?
        .into_inner();
    let kept = AuditorHead {
        auditor: address.to_owned(),
        namespace: info.namespace,
        public_key: hex::encode(&info.public_key),
        epoch: wanted,
        head: hex::encode(head.encode_to_vec()),
    };
    let (signed_epoch, signed_root) = kept.verify()?;
    let committed = client.get_epoch(Some(signed_epoch)).await?;
    if committed.root_hash != signed_root {
        return Err(refused(format!(
            "it signed epoch {signed_epoch} with root {}, but the cluster committed {}: the \
             auditor does not follow this directory",
            hex::encode(signed_root),
            hex::encode(&committed.root_hash)
        )));
    }
    Ok(Some(kept))
}

impl Manifest {
    fn file_name(epoch: u64) -> String {
        format!("backup-{epoch:020}.json")
    }

    /// Reads the manifest of the backup at `epoch` in `dir`, or of the newest one.
    pub fn load(dir: &Path, epoch: Option<u64>) -> Result<Self, AdminError> {
        let epoch = match epoch {
            Some(epoch) => epoch,
            None => *list(dir)?
                .last()
                .ok_or_else(|| AdminError::Refused(format!("{} holds no backup", dir.display())))?,
        };
        let path = dir.join(Self::file_name(epoch));
        let text = std::fs::read_to_string(&path)
            .map_err(|error| AdminError::Refused(format!("read {}: {error}", path.display())))?;
        let manifest: Self = serde_json::from_str(&text).map_err(|error| {
            AdminError::Refused(format!(
                "{} is not a backup manifest: {error}",
                path.display()
            ))
        })?;
        if manifest.format != MANIFEST_FORMAT || manifest.epoch != epoch {
            return Err(AdminError::Refused(format!(
                "{}: format {} epoch {} (expected format {MANIFEST_FORMAT}, epoch {epoch})",
                path.display(),
                manifest.format,
                manifest.epoch
            )));
        }
        Ok(manifest)
    }

    fn bits(&self) -> Result<u8, AdminError> {
        u8::try_from(self.partition_bits)
            .ok()
            .filter(|bits| *bits <= 16)
            .ok_or_else(|| AdminError::Refused(format!("partition bits {}", self.partition_bits)))
    }

    /// The bytes of every file of the chain.
    pub fn bytes(&self) -> u64 {
        self.epochs
            .iter()
            .chain(self.partitions.iter().flat_map(|p| &p.segments))
            .map(|file| file.bytes)
            .sum()
    }
}

/// The epochs of the backups in `dir`, ascending.
pub fn list(dir: &Path) -> Result<Vec<u64>, AdminError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => {
            return Err(AdminError::Refused(format!(
                "read {}: {error}",
                dir.display()
            )));
        }
    };
    let mut epochs: Vec<u64> = entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            name.strip_prefix("backup-")?
                .strip_suffix(".json")?
                .parse()
                .ok()
        })
        .collect();
    epochs.sort_unstable();
    Ok(epochs)
}

fn root_text(root: Option<NodeRef>) -> String {
    match root {
        None => String::new(),
        Some(root) => format!(
            "{}:{}:{}:{}:{}",
            root.label.label_len,
            hex::encode(root.label.label_val),
            root.min_epoch,
            root.max_epoch,
            hex::encode(root.hash.0)
        ),
    }
}

fn segments_dir(dir: &Path) -> PathBuf {
    dir.join("segments")
}

fn write_epochs(path: &Path, records: &[pb::EpochRecord]) -> Result<FileEntry, AdminError> {
    let mut bytes = EPOCHS_MAGIC.to_vec();
    for record in records {
        record
            .encode_length_delimited(&mut bytes)
            .map_err(|error| AdminError::Refused(format!("encode an epoch record: {error}")))?;
    }
    write_synced(path, &bytes)?;
    Ok(FileEntry {
        file: file_name(path),
        from_epoch: records.first().map_or(0, |record| record.epoch - 1),
        to_epoch: records.last().map_or(0, |record| record.epoch),
        bytes: bytes.len() as u64,
        records: records.len() as u64,
        blake3: blake3::hash(&bytes).to_hex().to_string(),
    })
}

fn read_epochs(path: &Path, entry: &FileEntry) -> Result<Vec<pb::EpochRecord>, AdminError> {
    let bytes = std::fs::read(path)
        .map_err(|error| AdminError::Refused(format!("read {}: {error}", path.display())))?;
    if blake3::hash(&bytes).to_hex().as_str() != entry.blake3 {
        return Err(AdminError::Refused(format!(
            "{} does not match its checksum in the manifest",
            path.display()
        )));
    }
    let mut rest = bytes
        .strip_prefix(EPOCHS_MAGIC.as_slice())
        .ok_or_else(|| AdminError::Refused(format!("{} is not an epoch file", path.display())))?;
    let mut records = Vec::new();
    while !rest.is_empty() {
        records.push(
            pb::EpochRecord::decode_length_delimited(&mut rest)
                .map_err(|error| AdminError::Refused(format!("{}: {error}", path.display())))?,
        );
    }
    Ok(records)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), AdminError> {
    let io =
        |error: std::io::Error| AdminError::Refused(format!("write {}: {error}", path.display()));
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&temporary).map_err(io)?;
        file.write_all(bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
    }
    std::fs::rename(&temporary, path).map_err(io)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)
            .and_then(|parent| parent.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

/// What `ktd admin backup` did.
#[derive(Clone, Debug, Serialize)]
pub struct BackupReport {
    /// The manifest written.
    pub manifest: String,
    /// The backup's epoch.
    pub epoch: u64,
    /// Its root, hex.
    pub root_hash: String,
    /// The backup it extends.
    pub parent_epoch: Option<u64>,
    /// Bytes written by this backup (new files only).
    pub bytes_written: u64,
    /// Bytes of the whole chain.
    pub chain_bytes: u64,
    /// The epoch of the auditor's signed head kept in the manifest (`--auditor`).
    pub auditor_head_epoch: Option<u64>,
    /// Seconds it took.
    pub seconds: f64,
}

/// `ktd admin backup --to DIR`.
pub async fn backup(
    client: &SequencerClient,
    dir: &Path,
    pin_for: Duration,
    full: bool,
    auditor: Option<&str>,
) -> Result<BackupReport, AdminError> {
    let started = Instant::now();
    let io = |error: std::io::Error| AdminError::Refused(format!("{}: {error}", dir.display()));
    std::fs::create_dir_all(segments_dir(dir)).map_err(io)?;
    let answer = client.cluster_metadata().await?;
    let metadata = answer
        .metadata
        .ok_or_else(|| AdminError::Refused("the cluster is not initialised".into()))?;
    let map = shard::replicated::shard_map(&metadata, &answer.shard_map.unwrap_or_default())?;
    let status = client.cluster_status().await?;
    if status
        .restore
        .as_ref()
        .is_some_and(|restore| restore.active)
    {
        return Err(AdminError::Refused(
            "a restore is in progress; back up once it has finished".into(),
        ));
    }
    let epoch = status.last_committed_epoch;
    if epoch == 0 {
        return Err(AdminError::Refused(
            "nothing is committed yet: there is nothing to back up".into(),
        ));
    }
    let cluster_id = hex::encode(&metadata.cluster_id);
    let parent = if full {
        None
    } else {
        list(dir)?
            .into_iter()
            .rev()
            .filter(|parent| *parent <= epoch)
            .map(|parent| Manifest::load(dir, Some(parent)))
            .find(|parent| {
                parent.as_ref().is_ok_and(|parent| {
                    parent.cluster_id == cluster_id
                        && parent.partition_bits == metadata.partition_bits
                })
            })
            .transpose()?
    };
    if let Some(parent) = &parent
        && parent.epoch == epoch
    {
        return Ok(BackupReport {
            manifest: Manifest::file_name(epoch),
            epoch,
            root_hash: parent.root_hash.clone(),
            parent_epoch: parent.parent_epoch,
            bytes_written: 0,
            chain_bytes: parent.bytes(),
            auditor_head_epoch: parent.auditor_head.as_ref().map(|head| head.epoch),
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    let pin_id = format!("backup-{epoch}");
    super::add_pin(
        client,
        &pin_id,
        "backup",
        epoch,
        pin_for,
        format!("ktd admin backup --to {}", dir.display()),
    )
    .await?;
    let copied = copy(client, dir, &metadata, &map, epoch, parent.as_ref()).await;
    let released = super::remove_pin(client, &pin_id).await;
    let (mut manifest, bytes_written) = copied?;
    released?;
    if let Some(address) = auditor {
        manifest.auditor_head = auditor_head(client, address, epoch).await?;
    }
    write_synced(
        &dir.join(Manifest::file_name(epoch)),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    Ok(BackupReport {
        manifest: Manifest::file_name(epoch),
        epoch,
        root_hash: manifest.root_hash.clone(),
        parent_epoch: manifest.parent_epoch,
        bytes_written,
        chain_bytes: manifest.bytes(),
        auditor_head_epoch: manifest.auditor_head.as_ref().map(|head| head.epoch),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Copies epoch records and partitions for a backup at `epoch` (the pin is held).
async fn copy(
    client: &SequencerClient,
    dir: &Path,
    metadata: &pb::ClusterMetadata,
    map: &ShardMap,
    epoch: u64,
    parent: Option<&Manifest>,
) -> Result<(Manifest, u64), AdminError> {
    let from = parent.map_or(0, |parent| parent.epoch);
    let bits = map.bits();
    let mut records = Vec::new();
    for number in from + 1..=epoch {
        records.push(client.get_epoch(Some(number)).await?);
    }
    let head = records
        .last()
        .cloned()
        .ok_or_else(|| AdminError::Refused("no epoch record to back up".into()))?;
    let roots = shard::replicated::partition_roots(bits, &head)?;
    let mut epochs = parent
        .map(|parent| parent.epochs.clone())
        .unwrap_or_default();
    let epochs_file = segments_dir(dir).join(format!("epochs-{from:020}-{epoch:020}.seg"));
    let entry = write_epochs(&epochs_file, &records)?;
    let mut written = entry.bytes;
    epochs.push(entry);
    let shard_set = shard::cluster::GrpcConnector::default().connect(map.clone())?;
    let mut partitions = Vec::new();
    for partition in 0..(1u32 << bits) {
        let path = segments_dir(dir).join(format!("p{partition:05}-{from:020}-{epoch:020}.seg"));
        let mut last_error = None;
        let mut entry = None;
        for server in map.read_order(partition) {
            let api = match shard_set.api(&server.id) {
                Ok(api) => api.clone(),
                Err(error) => {
                    last_error = Some(format!("{}: {error}", server.id));
                    continue;
                }
            };
            match copy_partition(api.as_ref(), partition, epoch, from, &path).await {
                Ok(copied) => {
                    entry = Some(copied);
                    break;
                }
                Err(error) => last_error = Some(format!("{}: {error}", server.id)),
            }
        }
        let entry = entry.ok_or_else(|| {
            AdminError::Refused(format!(
                "no replica of partition {partition} could stream epoch {epoch}: {}",
                last_error.unwrap_or_else(|| "no replica in the map".into())
            ))
        })?;
        written += entry.bytes;
        let mut segments = parent
            .and_then(|parent| parent.partitions.get(partition as usize))
            .map(|previous| previous.segments.clone())
            .unwrap_or_default();
        segments.push(entry);
        partitions.push(PartitionEntry {
            partition,
            root: root_text(roots[partition as usize]),
            segments,
        });
    }
    // Read after the copy: the safe epoch only rises, so this bounds every prune floor the
    // copies were read under (the pin kept it at or below `epoch`).
    let history = client.retention().await?;
    let status = client.cluster_status().await?;
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        cluster_id: hex::encode(&metadata.cluster_id),
        akd_configuration: metadata.akd_configuration.clone(),
        partition_bits: metadata.partition_bits,
        vrf_public_key: hex::encode(&metadata.vrf_public_key),
        epoch,
        root_hash: hex::encode(&head.root_hash),
        safe_epoch: history.safe_epoch.min(epoch),
        window: super::window_text(history.window.as_ref()),
        history: hex::encode(
            pb::HistoryRetention {
                window: history.window,
                pins: Vec::new(),
                safe_epoch: history.safe_epoch.min(epoch),
            }
            .encode_to_vec(),
        ),
        next_sequence: status.next_sequence,
        parent_epoch: parent.map(|parent| parent.epoch),
        created_at_ms: now_ms(),
        epochs,
        partitions,
        auditor_head: None,
    };
    Ok((manifest, written))
}

async fn copy_partition(
    api: &dyn shard::api::ShardApi,
    partition: u32,
    epoch: u64,
    from: u64,
    path: &Path,
) -> Result<FileEntry, AdminError> {
    let mut chunks = api.stream_partition(partition, epoch, from).await?;
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<shard::api::PartitionChunk>(4);
    let writing = {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || -> shard::Result<_> {
            let mut writer = SegmentWriter::create(&path)?;
            while let Some(chunk) = receiver.blocking_recv() {
                writer.write_chunk(&chunk)?;
            }
            writer.finish()
        })
    };
    let mut total = None;
    let mut records = 0u64;
    let mut streamed = Ok(());
    while let Some(chunk) = chunks.next().await {
        match chunk {
            Ok(chunk) => {
                records += (chunk.nodes.len() + chunk.users.len()) as u64;
                total = total.or(chunk.total_records);
                if sender.send(chunk).await.is_err() {
                    break;
                }
            }
            Err(error) => {
                streamed = Err(error);
                break;
            }
        }
    }
    drop(sender);
    let summary = writing
        .await
        .map_err(|error| AdminError::Refused(format!("segment writer: {error}")))?;
    streamed?;
    let summary = summary?;
    if total != Some(records) || summary.records != records {
        let _ = std::fs::remove_file(path);
        return Err(AdminError::Refused(format!(
            "the stream of partition {partition} ended after {records} records; it announced {total:?}"
        )));
    }
    Ok(FileEntry {
        file: file_name(path),
        from_epoch: from,
        to_epoch: epoch,
        bytes: summary.file_bytes,
        records,
        blake3: hex::encode(summary.blake3),
    })
}

/// What `verify-backup` checked.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    /// The backup's epoch.
    pub epoch: u64,
    /// Its root, hex.
    pub root_hash: String,
    /// Epoch records checked.
    pub epoch_records: u64,
    /// Files checked.
    pub files: u64,
    /// Records imported.
    pub records: u64,
    /// Interior nodes re-hashed.
    pub nodes_checked: u64,
    /// Bytes of the chain.
    pub bytes: u64,
    /// Archived epochs after the backup's checked (`--to-epoch`).
    pub archived_epochs: u64,
    /// Seconds it took.
    pub seconds: f64,
}

/// Checks a backup completely (see the module docs). Blocking: run it off async threads.
pub fn verify(
    dir: &Path,
    manifest: &Manifest,
) -> Result<(VerifyReport, Vec<pb::EpochRecord>), AdminError> {
    let started = Instant::now();
    let bits = manifest.bits()?;
    let akd: AkdConfig = manifest
        .akd_configuration
        .parse()
        .map_err(|error| AdminError::Refused(format!("akd configuration: {error}")))?;
    let mut records = Vec::new();
    for entry in &manifest.epochs {
        records.extend(read_epochs(&segments_dir(dir).join(&entry.file), entry)?);
    }
    for (index, record) in records.iter().enumerate() {
        if record.epoch != index as u64 + 1 {
            return Err(AdminError::Refused(format!(
                "the backup's epoch records are not 1..={} in order (record {index} is epoch {})",
                manifest.epoch, record.epoch
            )));
        }
        shard::replicated::check_commit(
            &akd,
            bits,
            record.epoch,
            &record.root_hash,
            &record.partition_roots,
        )
        .map_err(|error| {
            AdminError::Refused(format!(
                "epoch {}: its partition roots do not stitch to its root: {error}",
                record.epoch
            ))
        })?;
    }
    if let Some(kept) = &manifest.auditor_head {
        let (signed_epoch, signed_root) = kept.verify()?;
        let record = signed_epoch
            .checked_sub(1)
            .and_then(|index| records.get(index as usize))
            .ok_or_else(|| {
                AdminError::Refused(format!(
                    "the manifest's auditor head signs epoch {signed_epoch}, past the backup's"
                ))
            })?;
        if record.root_hash != signed_root {
            return Err(AdminError::Refused(format!(
                "the manifest's auditor head signs root {} for epoch {signed_epoch}; the \
                 backup's root for it is {}",
                hex::encode(signed_root),
                hex::encode(&record.root_hash)
            )));
        }
    }
    let head = records
        .last()
        .filter(|head| head.epoch == manifest.epoch)
        .ok_or_else(|| {
            AdminError::Refused(format!(
                "the backup's epoch records end at {}, not at its epoch {}",
                records.len(),
                manifest.epoch
            ))
        })?;
    if hex::encode(&head.root_hash) != manifest.root_hash {
        return Err(AdminError::Refused(format!(
            "the manifest's root {} is not epoch {}'s committed root {}",
            manifest.root_hash,
            manifest.epoch,
            hex::encode(&head.root_hash)
        )));
    }
    let roots = shard::replicated::partition_roots(bits, head)?;
    if manifest.partitions.len() != roots.len() {
        return Err(AdminError::Refused(format!(
            "the backup has {} partitions; the cluster has {}",
            manifest.partitions.len(),
            roots.len()
        )));
    }
    let mut report = VerifyReport {
        epoch: manifest.epoch,
        root_hash: manifest.root_hash.clone(),
        epoch_records: records.len() as u64,
        files: manifest.epochs.len() as u64,
        records: 0,
        nodes_checked: 0,
        bytes: manifest.bytes(),
        archived_epochs: 0,
        seconds: 0.0,
    };
    for (entry, committed) in manifest.partitions.iter().zip(&roots) {
        if entry.root != root_text(*committed) {
            return Err(AdminError::Refused(format!(
                "partition {}: the manifest's root is not the committed one",
                entry.partition
            )));
        }
        let chain: Vec<PathBuf> = entry
            .segments
            .iter()
            .map(|segment| segments_dir(dir).join(&segment.file))
            .collect();
        report.files += chain.len() as u64;
        let scratch = dir.join(format!(
            ".verify-{}-{}",
            std::process::id(),
            entry.partition
        ));
        let checked = match akd {
            AkdConfig::WhatsAppV1 => verify_chain::<WhatsAppV1>(&chain, entry.partition, manifest.epoch, bits, *committed, &scratch),
            AkdConfig::Experimental { .. } => verify_chain::<Experimental>(&chain, entry.partition, manifest.epoch, bits, *committed, &scratch),
        }
        .map_err(|error| {
            AdminError::Refused(format!(
                "partition {}: the backup's tree does not hash to the committed root of epoch {}: {error}",
                entry.partition, manifest.epoch
            ))
        })?;
        // Each file read once: imported, re-hashed, and its checksum compared here.
        for ((segment, summary), path) in entry.segments.iter().zip(&checked.segments).zip(&chain) {
            if hex::encode(summary.blake3) != segment.blake3 || summary.records != segment.records {
                return Err(AdminError::Refused(format!(
                    "{} does not match its checksum in the manifest",
                    path.display()
                )));
            }
        }
        report.records += checked.records;
        report.nodes_checked += checked.nodes_checked;
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok((report, records))
}

fn verify_chain<TC: Configuration>(
    chain: &[PathBuf],
    partition: u32,
    epoch: u64,
    bits: u8,
    root: Option<NodeRef>,
    scratch: &Path,
) -> shard::Result<shard::backup::ChainCheck> {
    shard::backup::verify_segments::<TC>(chain, partition, epoch, bits, root, scratch)
}

/// `ktd admin verify-backup`.
pub async fn verify_backup(
    dir: &Path,
    epoch: Option<u64>,
    to_epoch: Option<u64>,
) -> Result<VerifyReport, AdminError> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let manifest = Manifest::load(&dir, epoch)?;
        let cluster_id = hex::decode(&manifest.cluster_id).unwrap_or_default();
        let to = to_epoch.unwrap_or(manifest.epoch);
        let archived =
            super::archive::read_range(&dir, &cluster_id, manifest.epoch + 1, to)?.len() as u64;
        let (mut report, _) = verify(&dir, &manifest)?;
        report.archived_epochs = archived;
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    })
    .await
    .map_err(|error| AdminError::Refused(format!("verify: {error}")))?
}

/// `ktd admin restore` options.
#[derive(Clone, Debug, clap::Args)]
pub struct RestoreOptions {
    /// The backup directory.
    #[arg(long)]
    pub from: PathBuf,
    /// The backup's epoch (default: the newest in DIR, at or before `--to-epoch`).
    #[arg(long)]
    pub epoch: Option<u64>,
    /// Restore to this epoch: the backup, then the archived epochs after it up to this one
    /// (`ktd admin archive`, in DIR/archive) replayed and checked against their archived roots
    /// (default: the backup's epoch).
    #[arg(long)]
    pub to_epoch: Option<u64>,
    /// Where this command serves the backup to the shard servers.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// The URL shard servers reach `--listen` on (default: `http://` + the bound address).
    #[arg(long)]
    pub advertise: Option<String>,
    /// A `ktd auditor` (gRPC URL): refuse a backup older than the newest head it signed, or
    /// whose root differs from a head it signed.
    #[arg(long)]
    pub auditor: Option<String>,
    /// Restore even though the auditor signed newer epochs (published epochs go back:
    /// announce it).
    #[arg(long)]
    pub force: bool,
    /// Bound on the whole restore.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// What `ktd admin restore` did.
#[derive(Clone, Debug, Serialize)]
pub struct RestoreReport {
    /// The restored epoch.
    pub epoch: u64,
    /// Its root, hex.
    pub root_hash: String,
    /// The backup's epoch.
    pub backup_epoch: u64,
    /// Archived epochs replayed after it.
    pub replayed_epochs: u64,
    /// Seconds the replay took.
    pub replay_seconds: f64,
    /// The verification before serving.
    pub verified: VerifyReport,
    /// Replicas that hold the restored epoch.
    pub replicas: u64,
    /// Seconds from the start of the copy to every replica holding the epoch.
    pub copy_seconds: f64,
    /// Seconds in all.
    pub seconds: f64,
}

/// `ktd admin restore --from DIR`.
pub async fn restore(
    client: &SequencerClient,
    options: RestoreOptions,
) -> Result<RestoreReport, AdminError> {
    let started = Instant::now();
    let answer = client.cluster_metadata().await?;
    let metadata = answer
        .metadata
        .ok_or_else(|| AdminError::Refused("the cluster is not initialised".into()))?;
    let dir = options.from.clone();
    let (epoch, to_epoch) = (options.epoch, options.to_epoch);
    let (manifest, verified, records, archived) = tokio::task::spawn_blocking(move || {
        let epoch = match (epoch, to_epoch) {
            (None, Some(to)) => Some(list(&dir)?.into_iter().rfind(|epoch| *epoch <= to).ok_or_else(
                || AdminError::Refused(format!("{} holds no backup at or before epoch {to}", dir.display())),
            )?),
            _ => epoch,
        };
        let manifest = Manifest::load(&dir, epoch)?;
        let to = to_epoch.unwrap_or(manifest.epoch);
        if to < manifest.epoch {
            return Err(AdminError::Refused(format!(
                "the backup is of epoch {}, after --to-epoch {to}: pick an earlier backup (--epoch)",
                manifest.epoch
            )));
        }
        let cluster_id = hex::decode(&manifest.cluster_id).unwrap_or_default();
        let archived = super::archive::read_range(&dir, &cluster_id, manifest.epoch + 1, to)?;
        let (report, records) = verify(&dir, &manifest)?;
        Ok::<_, AdminError>((manifest, report, records, archived))
    })
    .await
    .map_err(|error| AdminError::Refused(format!("verify: {error}")))??;
    let target = archived
        .last()
        .map_or_else(|| manifest.epoch, |last| last.record.epoch);
    let target_root = archived.last().map_or_else(
        || manifest.root_hash.clone(),
        |last| hex::encode(&last.record.root_hash),
    );
    let identity = |what: &str, backup: &str, cluster: &str| {
        if backup == cluster {
            Ok(())
        } else {
            Err(AdminError::Refused(format!(
                "the backup's {what} is {backup}; this cluster's is {cluster}: start the new \
                 cluster with the backed-up cluster's settings and VRF seed"
            )))
        }
    };
    identity(
        "akd configuration",
        &manifest.akd_configuration,
        &metadata.akd_configuration,
    )?;
    identity(
        "partition bits",
        &manifest.partition_bits.to_string(),
        &metadata.partition_bits.to_string(),
    )?;
    identity(
        "VRF public key",
        &manifest.vrf_public_key,
        &hex::encode(&metadata.vrf_public_key),
    )?;
    if let Some(auditor) = &options.auditor {
        let all: Vec<pb::EpochRecord> = records
            .iter()
            .cloned()
            .chain(archived.iter().map(|epoch| epoch.record.clone()))
            .collect();
        check_auditor(auditor, target, &all, options.force).await?;
    }
    let map = shard::replicated::shard_map(&metadata, &answer.shard_map.unwrap_or_default())?;
    let bits = map.bits();
    let chains: BTreeMap<u32, Vec<PathBuf>> = manifest
        .partitions
        .iter()
        .map(|entry| {
            (
                entry.partition,
                entry
                    .segments
                    .iter()
                    .map(|segment| segments_dir(&options.from).join(&segment.file))
                    .collect(),
            )
        })
        .collect();
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|error| AdminError::Refused(format!("listen on {}: {error}", options.listen)))?;
    let bound = listener
        .local_addr()
        .map_err(|error| AdminError::Refused(format!("listen: {error}")))?;
    let advertise = options
        .advertise
        .clone()
        .unwrap_or_else(|| format!("http://{bound}"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(BackupSource::new(manifest.epoch, chains).service())
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = stopped.await;
                },
            ),
    );
    let copy_started = Instant::now();
    let restored = install_and_wait(
        client,
        &manifest,
        &records,
        &archived,
        &advertise,
        &map,
        bits,
        started,
        options.timeout,
    )
    .await;
    let _ = stop.send(());
    let _ = server.await;
    let (replicas, replay_seconds) = restored?;
    Ok(RestoreReport {
        epoch: target,
        root_hash: target_root,
        backup_epoch: manifest.epoch,
        replayed_epochs: archived.len() as u64,
        replay_seconds,
        verified,
        replicas,
        copy_seconds: copy_started.elapsed().as_secs_f64() - replay_seconds,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[allow(clippy::too_many_arguments)]
async fn install_and_wait(
    client: &SequencerClient,
    manifest: &Manifest,
    records: &[pb::EpochRecord],
    archived: &[super::archive::ArchivedEpoch],
    advertise: &str,
    map: &ShardMap,
    bits: u8,
    started: Instant,
    timeout: Duration,
) -> Result<(u64, f64), AdminError> {
    let cluster_id = hex::decode(&manifest.cluster_id).unwrap_or_default();
    let history = hex::decode(&manifest.history)
        .ok()
        .and_then(|bytes| pb::HistoryRetention::decode(bytes.as_slice()).ok());
    let step = |records: Vec<pb::EpochRecord>, finish: bool| pb::RestoreCommand {
        records,
        epoch: manifest.epoch,
        source_address: advertise.to_owned(),
        history: history.clone(),
        next_sequence: manifest.next_sequence,
        finish,
        backup_cluster_id: cluster_id.clone(),
        replay: None,
    };
    for chunk in records.chunks(RECORDS_PER_STEP) {
        client.restore(step(chunk.to_vec(), false)).await?;
    }
    let roots = shard::replicated::partition_roots(
        bits,
        records
            .last()
            .ok_or_else(|| AdminError::Refused("the backup has no epoch records".into()))?,
    )?;
    let shard_set = shard::cluster::GrpcConnector::default().connect(map.clone())?;
    let mut last_report = Instant::now();
    // A rerun after the replay began: the backup's epoch was held by every replica then.
    let replaying = client.cluster_status().await?.last_committed_epoch > manifest.epoch;
    let replicas = loop {
        let (held, wanted) = holding(map, &shard_set, manifest.epoch, &roots).await;
        if held == wanted || replaying {
            break held;
        }
        if started.elapsed() > timeout {
            return Err(AdminError::Timeout {
                what: format!(
                    "{held} of {wanted} partition replicas hold epoch {} (the coordinator's log \
                     on the sequencer leader says why; run the restore again to resume)",
                    manifest.epoch
                ),
                limit: timeout,
            });
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            eprintln!(
                "restore: {held} of {wanted} partition replicas hold epoch {}",
                manifest.epoch
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let replay_started = Instant::now();
    for epoch in archived {
        replay(client, manifest.epoch, epoch, started, timeout).await?;
    }
    let replay_seconds = replay_started.elapsed().as_secs_f64();
    client.restore(step(Vec::new(), true)).await?;
    Ok((replicas, replay_seconds))
}

/// Replays one archived epoch onto the restore of backup `backup_epoch` and waits for its
/// commit (the sequencers refuse it unless its root is the archived one).
async fn replay(
    client: &SequencerClient,
    backup_epoch: u64,
    archived: &super::archive::ArchivedEpoch,
    started: Instant,
    timeout: Duration,
) -> Result<(), AdminError> {
    let epoch = archived.record.epoch;
    let committed = |status: &pb::ClusterStatusResponse| -> Result<bool, AdminError> {
        if let Some(restore) = &status.restore
            && !restore.replay_failure.is_empty()
        {
            return Err(AdminError::Refused(format!(
                "the replay stopped: {}",
                restore.replay_failure
            )));
        }
        Ok(status.last_committed_epoch >= epoch)
    };
    if committed(&client.cluster_status().await?)? {
        return Ok(());
    }
    let mut steps: Vec<Vec<pb::SequencedUpdate>> = vec![Vec::new()];
    let mut step_bytes = 0;
    for update in &archived.updates {
        let bytes = update.label.len() + update.value.len();
        let full = steps.last().is_some_and(|step| {
            step.len() >= super::archive::STEP_UPDATES
                || (!step.is_empty() && step_bytes + bytes > super::archive::STEP_BYTES)
        });
        if full {
            steps.push(Vec::new());
            step_bytes = 0;
        }
        step_bytes += bytes;
        if let Some(step) = steps.last_mut() {
            step.push(update.clone());
        }
    }
    let count = steps.len();
    for (position, updates) in steps.into_iter().enumerate() {
        let last = position + 1 == count;
        client
            .restore(pb::RestoreCommand {
                epoch: backup_epoch,
                replay: Some(pb::ReplayEpoch {
                    epoch,
                    updates,
                    last,
                    record: last.then(|| archived.record.clone()),
                }),
                ..pb::RestoreCommand::default()
            })
            .await?;
    }
    loop {
        if committed(&client.cluster_status().await?)? {
            return Ok(());
        }
        if started.elapsed() > timeout {
            return Err(AdminError::Timeout {
                what: format!(
                    "archived epoch {epoch} is replayed but not committed (the coordinator's log \
                     on the sequencer leader says why; run the restore again to resume)"
                ),
                limit: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Replicas of `map` that hold `epoch` with the committed root, and how many there are.
async fn holding(
    map: &ShardMap,
    shard_set: &shard::cluster::ShardSet,
    epoch: u64,
    roots: &[Option<NodeRef>],
) -> (u64, u64) {
    let mut wanted = 0u64;
    let mut held = 0u64;
    for server in map.servers() {
        let assigned: Vec<u32> = map
            .assignments(&server.id)
            .into_iter()
            .map(|(partition, _)| partition)
            .collect();
        wanted += assigned.len() as u64;
        let Ok(api) = shard_set.api(&server.id) else {
            continue;
        };
        let Ok(Ok(status)) = tokio::time::timeout(Duration::from_secs(2), api.status()).await
        else {
            continue;
        };
        held += status
            .partition_states
            .iter()
            .filter(|state| {
                assigned.contains(&state.partition)
                    && state.held
                    && state.built_epoch == epoch
                    && roots.get(state.partition as usize).copied().flatten() == state.root
            })
            .count() as u64;
    }
    (held, wanted)
}

/// Refuses a restore the auditor at `address` contradicts (see the module docs).
async fn check_auditor(
    address: &str,
    epoch: u64,
    records: &[pb::EpochRecord],
    force: bool,
) -> Result<(), AdminError> {
    use ktd_proto::ktd::auditor::v1 as apb;
    let refused = |message: String| AdminError::Refused(format!("auditor {address}: {message}"));
    let (mut auditor, info) = connect_auditor(address).await?;
    let head = match auditor.get_head(apb::GetHeadRequest { epoch: None }).await {
        Ok(head) => head.into_inner(),
        Err(status) if status.code() == tonic::Code::NotFound => return Ok(()),
        Err(status) => return Err(refused(status.message().to_owned())),
    };
    let key: [u8; 32] = info
        .public_key
        .as_slice()
        .try_into()
        .map_err(|_| refused("its public key is not 32 bytes".into()))?;
    let (signed_epoch, signed_root) = ktd_client::head::verify_head(&key, &info.namespace, &head)
        .map_err(|error| refused(error.to_string()))?;
    if let Some(record) = records.iter().find(|record| record.epoch == signed_epoch)
        && record.root_hash != signed_root
    {
        return Err(refused(format!(
            "it signed epoch {signed_epoch} with root {}; the backup's root for that epoch is {}: \
             this backup is not of the directory the auditor follows",
            hex::encode(signed_root),
            hex::encode(&record.root_hash)
        )));
    }
    if signed_epoch > epoch && !force {
        return Err(refused(format!(
            "it has signed epoch {signed_epoch}, newer than the restored epoch {epoch}: restoring \
             rolls published epochs back (clients and auditors will see the directory go back); \
             announce it and pass --force"
        )));
    }
    Ok(())
}
