//! `ktd admin archive`: the continuous archive of sealed batches that makes a restore
//! point-in-time (ADR 0003, decision 3): a backup at epoch `B` plus the archived epochs
//! `B+1..=T` restore the directory exactly as it was at `T` (`ktd admin restore --to-epoch T`).
//!
//! The archive lives beside the backups, in `DIR/archive/`, one immutable file per committed
//! epoch, `epoch-<E>.seg` (20 digits):
//!
//! ```text
//! "KTDARC1\n" | varint len + cluster id | len-delimited EpochRecord | len-delimited
//! SequencedUpdate x N | BLAKE3 of everything before (32 bytes)
//! ```
//!
//! Each file is written to `.tmp`, fsynced, renamed and its directory fsynced, so a killed
//! archiver leaves whole files only and the next run resumes after the newest. Files are
//! contiguous from the first: the archiver never writes past an epoch it could not read, and a
//! run that finds a gap refuses to go on.
//!
//! A live history pin owned by `archive` ([`sequencer::machine::ARCHIVE_PIN_OWNER`]) at the
//! newest archived epoch keeps every sealed batch after it on the sequencers (within the
//! cluster's bounds on retained bytes and age), so an archiver that was stopped for less than
//! `--pin-for` finds every batch it missed. The pin also holds that epoch's tree history, as any
//! pin; it lapses by itself `--pin-for` after the archiver's last refresh, and the stale-pin
//! alert names it. A batch already dropped ends the run with an error naming the gap: take a new
//! backup and archive from its epoch.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use prost::Message;
use sequencer::machine::ARCHIVE_PIN_OWNER;
use sequencer::{SequencerClient, SequencerError, pb};
use serde::Serialize;

use super::AdminError;
use super::backup::{list as list_backups, write_synced};

/// Magic of an archived epoch file.
const MAGIC: &[u8; 8] = b"KTDARC1\n";
/// The id of the archiver's pin.
pub const PIN_ID: &str = "archive";
/// Replayed updates per `Restore` step (and at most [`STEP_BYTES`] of labels and values).
pub const STEP_UPDATES: usize = sequencer::admin::MAX_REPLAY_UPDATES;
/// Label and value bytes per replay step.
pub const STEP_BYTES: usize = 1 << 20;

/// One archived epoch, as read back and checked.
#[derive(Clone, Debug, PartialEq)]
pub struct ArchivedEpoch {
    /// The archived cluster's id.
    pub cluster_id: Vec<u8>,
    /// The epoch's commit record.
    pub record: pb::EpochRecord,
    /// Its sealed batch.
    pub updates: Vec<pb::SequencedUpdate>,
}

/// The archive directory of backup directory `dir`.
pub fn archive_dir(dir: &Path) -> PathBuf {
    dir.join("archive")
}

fn file_name(epoch: u64) -> String {
    format!("epoch-{epoch:020}.seg")
}

/// The epochs archived in `dir` (its `archive/`), oldest first; refused if they are not
/// contiguous.
pub fn list(dir: &Path) -> Result<Vec<u64>, AdminError> {
    let archive = archive_dir(dir);
    let entries = match std::fs::read_dir(&archive) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => {
            return Err(AdminError::Refused(format!(
                "read {}: {error}",
                archive.display()
            )));
        }
    };
    let mut epochs = Vec::new();
    for entry in entries {
        let entry = entry
            .map_err(|error| AdminError::Refused(format!("read {}: {error}", archive.display())))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(epoch) = name
            .strip_prefix("epoch-")
            .and_then(|rest| rest.strip_suffix(".seg"))
            .and_then(|digits| digits.parse::<u64>().ok())
        {
            epochs.push(epoch);
        }
    }
    epochs.sort_unstable();
    if let Some(pair) = epochs.windows(2).find(|pair| pair[1] != pair[0] + 1) {
        return Err(AdminError::Refused(format!(
            "the archive in {} has a gap: epochs {}..={} are missing (files are never written \
             past a gap; one was removed): take a new backup and archive from its epoch into \
             another directory",
            archive.display(),
            pair[0] + 1,
            pair[1] - 1
        )));
    }
    Ok(epochs)
}

/// Encodes one archived epoch (the file's bytes).
pub fn encode(archived: &ArchivedEpoch) -> Vec<u8> {
    let mut bytes = MAGIC.to_vec();
    prost::encoding::encode_varint(archived.cluster_id.len() as u64, &mut bytes);
    bytes.extend_from_slice(&archived.cluster_id);
    // Encoding into a Vec cannot fail (it grows as needed).
    let _ = archived.record.encode_length_delimited(&mut bytes);
    for update in &archived.updates {
        let _ = update.encode_length_delimited(&mut bytes);
    }
    let checksum = blake3::hash(&bytes);
    bytes.extend_from_slice(checksum.as_bytes());
    bytes
}

/// Decodes and checks one archived epoch file's bytes: magic, checksum, the record's epoch and
/// update count.
pub fn decode(epoch: u64, bytes: &[u8]) -> Result<ArchivedEpoch, String> {
    let body_len = bytes
        .len()
        .checked_sub(32)
        .ok_or("shorter than its checksum")?;
    let (body, checksum) = bytes.split_at(body_len);
    if blake3::hash(body).as_bytes() != checksum {
        return Err("its checksum does not match its contents".into());
    }
    let mut rest = body
        .strip_prefix(MAGIC.as_slice())
        .ok_or("not an archived epoch file")?;
    let id_len = prost::encoding::decode_varint(&mut rest).map_err(|error| error.to_string())?;
    let id_len = usize::try_from(id_len)
        .ok()
        .filter(|len| *len <= rest.len())
        .ok_or("a cluster id longer than the file")?;
    let (cluster_id, mut rest) = rest.split_at(id_len);
    let record =
        pb::EpochRecord::decode_length_delimited(&mut rest).map_err(|error| error.to_string())?;
    if record.epoch != epoch {
        return Err(format!("it holds epoch {}", record.epoch));
    }
    let mut updates = Vec::new();
    while !rest.is_empty() {
        updates.push(
            pb::SequencedUpdate::decode_length_delimited(&mut rest)
                .map_err(|error| error.to_string())?,
        );
    }
    if updates.is_empty() || (record.updates != 0 && record.updates != updates.len() as u64) {
        return Err(format!(
            "its record counts {} updates and it holds {}",
            record.updates,
            updates.len()
        ));
    }
    Ok(ArchivedEpoch {
        cluster_id: cluster_id.to_vec(),
        record,
        updates,
    })
}

/// Reads and checks archived epoch `epoch` of `dir`.
pub fn read(dir: &Path, epoch: u64) -> Result<ArchivedEpoch, AdminError> {
    let path = archive_dir(dir).join(file_name(epoch));
    let bytes = std::fs::read(&path)
        .map_err(|error| AdminError::Refused(format!("read {}: {error}", path.display())))?;
    decode(epoch, &bytes).map_err(|why| AdminError::Refused(format!("{}: {why}", path.display())))
}

/// Reads and checks archived epochs `from..=to` of `dir`, all of cluster `cluster_id`.
pub fn read_range(
    dir: &Path,
    cluster_id: &[u8],
    from: u64,
    to: u64,
) -> Result<Vec<ArchivedEpoch>, AdminError> {
    let archived = list(dir)?;
    let (first, last) = match (archived.first(), archived.last()) {
        (Some(first), Some(last)) => (*first, *last),
        _ => (0, 0),
    };
    if from > to {
        return Ok(Vec::new());
    }
    if archived.is_empty() || from < first || to > last {
        return Err(AdminError::Refused(format!(
            "epochs {from}..={to} are not all archived in {} ({})",
            archive_dir(dir).display(),
            if archived.is_empty() {
                "it holds none".to_string()
            } else {
                format!("it holds {first}..={last}")
            }
        )));
    }
    (from..=to)
        .map(|epoch| {
            let epoch = read(dir, epoch)?;
            if epoch.cluster_id != cluster_id {
                return Err(AdminError::Refused(format!(
                    "archived epoch {} is of cluster {}, the backup of cluster {}",
                    epoch.record.epoch,
                    hex::encode(&epoch.cluster_id),
                    hex::encode(cluster_id)
                )));
            }
            Ok(epoch)
        })
        .collect()
}

/// `ktd admin archive` options.
#[derive(Clone, Debug, clap::Args)]
pub struct ArchiveOptions {
    /// The backup directory; epochs go to its `archive/`.
    #[arg(long)]
    pub to: PathBuf,
    /// The epoch the archive starts after when it is empty (default: the newest backup's epoch
    /// in DIR, else the oldest batch the sequencers still hold).
    #[arg(long)]
    pub after_epoch: Option<u64>,
    /// Stop once this epoch is archived.
    #[arg(long)]
    pub until_epoch: Option<u64>,
    /// Keep following new epochs (until interrupted, or `--until-epoch`).
    #[arg(long)]
    pub follow: bool,
    /// How often `--follow` looks for new epochs.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// How long the archiver's pin holds batches after its last refresh (the archiver may be
    /// stopped this long and still find every batch it missed).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub pin_for: Duration,
    /// Remove the archiver's pin at the end (the sequencers then drop batches as usual).
    #[arg(long)]
    pub release: bool,
}

/// What `ktd admin archive` did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ArchiveReport {
    /// The oldest archived epoch in the directory (0: none).
    pub first_epoch: u64,
    /// The newest archived epoch in the directory (0: none).
    pub last_epoch: u64,
    /// Epochs this run archived.
    pub epochs_written: u64,
    /// Bytes this run wrote.
    pub bytes_written: u64,
    /// Seconds it took.
    pub seconds: f64,
}

/// `ktd admin archive --to DIR`: archives every committed epoch after the newest archived one,
/// once or (`--follow`) continuously.
pub async fn archive(
    client: &SequencerClient,
    sequencers: &[String],
    options: &ArchiveOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<ArchiveReport, AdminError> {
    let started = Instant::now();
    let dir = &options.to;
    let io = |error: std::io::Error| AdminError::Refused(format!("{}: {error}", dir.display()));
    std::fs::create_dir_all(archive_dir(dir)).map_err(io)?;
    let metadata = client
        .cluster_metadata()
        .await?
        .metadata
        .ok_or_else(|| AdminError::Refused("the cluster is not initialised".into()))?;
    let archived = list(dir)?;
    let mut first = archived.first().copied().unwrap_or(0);
    let mut cursor = match archived.last() {
        Some(last) => {
            let newest = read(dir, *last)?;
            if newest.cluster_id != metadata.cluster_id {
                return Err(AdminError::Refused(format!(
                    "{} archives cluster {}; this is cluster {}",
                    archive_dir(dir).display(),
                    hex::encode(&newest.cluster_id),
                    hex::encode(&metadata.cluster_id)
                )));
            }
            *last
        }
        None => match options.after_epoch {
            Some(epoch) => epoch,
            None => match list_backups(dir)?.last() {
                Some(backup) => *backup,
                None => {
                    let status = client.cluster_status().await?;
                    status
                        .retention
                        .map_or(status.last_committed_epoch, |retention| {
                            retention.oldest_epoch.saturating_sub(1)
                        })
                }
            },
        },
    };
    let mut report = ArchiveReport::default();
    tokio::pin!(stop);
    let mut last_pin = None::<Instant>;
    loop {
        let committed = client.get_epoch(None).await?.epoch;
        let target = options
            .until_epoch
            .map_or(committed, |until| until.min(committed));
        if last_pin.is_none_or(|at| at.elapsed() >= options.pin_for / 4) {
            pin(client, dir, cursor, options.pin_for).await?;
            last_pin = Some(Instant::now());
        }
        while cursor < target {
            let epoch = cursor + 1;
            let record = client.get_epoch(Some(epoch)).await?;
            let updates = sealed_batch(client, sequencers, epoch).await?;
            let bytes = encode(&ArchivedEpoch {
                cluster_id: metadata.cluster_id.clone(),
                record,
                updates,
            });
            let path = archive_dir(dir).join(file_name(epoch));
            let written = bytes.len() as u64;
            tokio::task::spawn_blocking(move || write_synced(&path, &bytes))
                .await
                .map_err(|error| AdminError::Refused(format!("write: {error}")))??;
            cursor = epoch;
            if first == 0 {
                first = epoch;
            }
            report.epochs_written += 1;
            report.bytes_written += written;
            if last_pin.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                pin(client, dir, cursor, options.pin_for).await?;
                last_pin = Some(Instant::now());
            }
        }
        let done = options.until_epoch.is_some_and(|until| cursor >= until);
        if !options.follow || done {
            break;
        }
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(options.interval) => {}
        }
    }
    if options.release {
        super::remove_pin(client, PIN_ID).await?;
    } else {
        pin(client, dir, cursor, options.pin_for).await?;
    }
    report.first_epoch = first;
    report.last_epoch = cursor;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Holds the sealed batches after `epoch` (the newest archived) for `pin_for`.
async fn pin(
    client: &SequencerClient,
    dir: &Path,
    epoch: u64,
    pin_for: Duration,
) -> Result<(), AdminError> {
    let safe_epoch = client.retention().await?.safe_epoch;
    super::add_pin(
        client,
        PIN_ID,
        ARCHIVE_PIN_OWNER,
        // A pin below the safe epoch is refused; batches between are then held by nothing
        // (and a missing one ends the run with the gap named).
        epoch.max(safe_epoch),
        pin_for,
        format!("ktd admin archive --to {}", dir.display()),
    )
    .await?;
    Ok(())
}

/// Committed epoch `epoch`'s sealed batch, from the first sequencer that holds it.
async fn sealed_batch(
    client: &SequencerClient,
    sequencers: &[String],
    epoch: u64,
) -> Result<Vec<pb::SequencedUpdate>, AdminError> {
    let mut last_error = None;
    for address in sequencers {
        match client.sealed_batch_at(address, epoch).await {
            Ok(chunks) => {
                let total = chunks.first().map_or(0, |chunk| chunk.total);
                let updates: Vec<_> = chunks.into_iter().flat_map(|chunk| chunk.updates).collect();
                if updates.len() as u64 == total {
                    return Ok(updates);
                }
                last_error = Some(AdminError::Refused(format!(
                    "{address} sent {} of epoch {epoch}'s {total} updates",
                    updates.len()
                )));
            }
            // The epoch is committed (its record was read): not found means released.
            Err(SequencerError::Remote(status)) if status.code() == tonic::Code::NotFound => {
                return Err(AdminError::Refused(format!(
                    "{}: the archive cannot continue past epoch {}; take a new backup (ktd admin \
                     backup) and archive from its epoch into another directory",
                    status.message(),
                    epoch - 1
                )));
            }
            Err(error) => last_error = Some(error.into()),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        AdminError::Refused("no sequencer addresses to read batches from".into())
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archived() -> ArchivedEpoch {
        ArchivedEpoch {
            cluster_id: vec![7; 16],
            record: pb::EpochRecord {
                epoch: 5,
                root_hash: vec![1; 32],
                updates: 2,
                ..pb::EpochRecord::default()
            },
            updates: vec![
                pb::SequencedUpdate {
                    label: b"a".to_vec(),
                    value: b"1".to_vec(),
                    sequence: 10,
                },
                pb::SequencedUpdate {
                    label: b"b".to_vec(),
                    value: b"2".to_vec(),
                    sequence: 11,
                },
            ],
        }
    }

    #[test]
    fn an_archived_epoch_reads_back_as_written_and_any_changed_byte_is_refused() {
        let bytes = encode(&archived());
        assert_eq!(decode(5, &bytes), Ok(archived()));
        assert!(decode(6, &bytes).is_err_and(|why| why.contains("holds epoch 5")));
        for position in 0..bytes.len() {
            let mut changed = bytes.clone();
            changed[position] ^= 1;
            assert!(
                decode(5, &changed).is_err(),
                "byte {position} changed and accepted"
            );
        }
        assert!(decode(5, &bytes[..bytes.len() - 1]).is_err());
        assert!(decode(5, &[]).is_err());
    }

    #[test]
    fn an_archive_with_a_missing_epoch_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(archive_dir(dir.path())).expect("mkdir");
        for epoch in [3, 4, 6] {
            let mut epoch_file = archived();
            epoch_file.record.epoch = epoch;
            std::fs::write(
                archive_dir(dir.path()).join(file_name(epoch)),
                encode(&epoch_file),
            )
            .expect("write");
        }
        let refused = list(dir.path()).expect_err("gap");
        assert!(
            refused.to_string().contains("epochs 5..=5 are missing"),
            "{refused}"
        );
        std::fs::remove_file(archive_dir(dir.path()).join(file_name(6))).expect("rm");
        assert_eq!(list(dir.path()).expect("list"), vec![3, 4]);
        assert_eq!(
            read_range(dir.path(), &[7; 16], 4, 4).expect("read")[0]
                .record
                .epoch,
            4
        );
        assert!(read_range(dir.path(), &[8; 16], 4, 4).is_err());
        assert!(read_range(dir.path(), &[7; 16], 4, 5).is_err());
    }
}
