//! `ktd auditor`: an independent auditor of a ktd (or any akd) directory, in the manner of
//! Cloudflare's Plexi auditor for WhatsApp.
//!
//! It follows a directory's audit blobs (over the public gRPC API, or from a blob directory
//! written by `ktd audit-blobs`), verifies every consecutive append-only proof with stock
//! `akd::auditor::verify_consecutive_append_only`, enforces the auditor rules — epochs strictly
//! +1, each blob's previous root is the root it verified for the previous epoch, no epoch
//! re-published with another root, 32-byte digests, the first epoch extends the configured
//! starting root — and signs each verified head with Ed25519 over Plexi's `SignatureMessage`
//! (ciphersuite 1: protobuf + Ed25519). Verified heads and violations are appended to files in
//! its data directory (fsynced before they are served), so a restart resumes where it stopped.
//! A violation stops the auditor at the last good epoch: nothing after it is ever signed.
//! File IO after start-up (appends with their `fsync`, blob-directory scans) runs on the
//! blocking pool, never on a runtime thread.
//!
//! The client side — checking a root against the auditor's signature before trusting it — is
//! [`ktd_client::head::verify_head`].

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow};
use ed25519_dalek::{Signer, SigningKey};
use ktd_client::akd_core::configuration::Configuration;
use ktd_client::head::CIPHERSUITE_PROTOBUF_ED25519;
use ktd_client::{AkdConfig, BlobDir, Client, with_configuration};
use ktd_proto::audit_blob::AuditBlobName;
use ktd_proto::ktd::auditor::v1 as pb;
use ktd_proto::ktd::v1 as api;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// One verified, signed epoch, as persisted and served.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// The epoch.
    pub epoch: u64,
    /// Its root hash, hex.
    pub digest: String,
    /// When it was verified, ms since the Unix epoch.
    pub timestamp: u64,
    /// Ed25519 signature over `signed_bytes`, hex.
    pub signature: String,
    /// The encoded `SignatureMessage`, hex.
    pub signed_bytes: String,
    /// Size of the verified proof, bytes.
    pub proof_bytes: u64,
    /// Time the stock verifier took, microseconds.
    pub verify_us: u64,
    /// When the directory committed the epoch (the sequencer leader's clock, ms since the Unix
    /// epoch; 0: unknown — a blob directory does not say).
    #[serde(default)]
    pub committed_at_ms: u64,
}

/// Where the auditor reads audit blobs from.
#[derive(Clone, Debug)]
pub enum BlobSource {
    /// A gateway's `ListAuditBlobs` / `GetAuditBlob`.
    Gateway(String),
    /// A directory of `E/{hex root E-1}/{hex root E}` files.
    Directory(PathBuf),
}

/// Settings of an auditor. `Debug` never shows the signing key, and dropping the settings
/// zeroes it.
#[derive(Clone)]
pub struct AuditorSettings {
    /// The namespace signed into every head (e.g. `whatsapp.key-transparency.v1`).
    pub namespace: String,
    /// Where heads and violations are kept.
    pub data_dir: PathBuf,
    /// Ed25519 signing key (32 bytes).
    pub signing_key: [u8; 32],
    /// The directory's akd configuration.
    pub config: AkdConfig,
    /// The trusted starting point `(epoch, root)`; `None` = epoch 0, akd's empty directory.
    pub start: Option<(u64, [u8; 32])>,
    /// Where blobs come from.
    pub source: BlobSource,
    /// How often to look for new blobs when caught up.
    pub poll: Duration,
    /// Where the audited log's blobs are served over HTTP (a gateway's `--blob-listen`, or
    /// object storage behind a CDN): the namespace's `log_directory` in the Plexi API.
    pub log_directory: Option<String>,
}

impl std::fmt::Debug for AuditorSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditorSettings")
            .field("namespace", &self.namespace)
            .field("data_dir", &self.data_dir)
            .field("signing_key", &"<redacted>")
            .field("config", &self.config)
            .field(
                "start",
                &self.start.map(|(epoch, root)| (epoch, hex::encode(root))),
            )
            .field("source", &self.source)
            .field("poll", &self.poll)
            .field("log_directory", &self.log_directory)
            .finish()
    }
}

impl Drop for AuditorSettings {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.signing_key);
    }
}

#[derive(Default)]
struct State {
    heads: BTreeMap<u64, Head>,
    violations: Vec<String>,
    /// The last verified `(epoch, root)` (the trusted start before any head).
    latest: (u64, [u8; 32]),
    /// The source's latest epoch when last asked (the gateway's latest committed epoch, or the
    /// highest epoch in the blob directory).
    source_latest: u64,
}

/// A running auditor's state, shared with the servers that publish it.
pub struct Auditor {
    settings: AuditorSettings,
    key: SigningKey,
    state: Mutex<State>,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor")
            .field("namespace", &self.settings.namespace)
            .finish_non_exhaustive()
    }
}

/// The root of the empty directory (epoch 0) in `config`: akd's empty-tree root.
fn empty_root(config: &AkdConfig) -> anyhow::Result<[u8; 32]> {
    fn root<TC: Configuration>() -> anyhow::Result<[u8; 32]> {
        Ok(ktd_core::stitch::TopTree::<TC>::new(0, vec![None])?.root_hash())
    }
    with_configuration!(config, TC => root::<TC>())
}

/// Reads a JSON-lines file. A last line without its newline is what a crash in the middle of
/// [`append_jsonl`] leaves (the record was never acknowledged): it is dropped and the file cut
/// back to its last complete line, with a warning. A damaged complete line is an error.
fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> anyhow::Result<Vec<T>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let complete = text.rfind('\n').map_or(0, |end| end + 1);
            if complete < text.len() {
                tracing::warn!(
                    path = %path.display(),
                    torn_bytes = text.len() - complete,
                    "dropping a torn last line (a crash during an append)"
                );
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .with_context(|| format!("open {}", path.display()))?;
                file.set_len(complete as u64)
                    .and_then(|()| file.sync_all())
                    .with_context(|| format!("cut the torn line of {}", path.display()))?;
            }
            parse_jsonl(path, &text[..complete])
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(error) => Err(error).with_context(|| format!("read {}", path.display())),
    }
}

fn parse_jsonl<T: for<'de> Deserialize<'de>>(path: &Path, text: &str) -> anyhow::Result<Vec<T>> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .enumerate()
        .map(|(index, line)| {
            serde_json::from_str(line)
                .with_context(|| format!("{} line {}: damaged", path.display(), index + 1))
        })
        .collect()
}

fn append_jsonl<T: Serialize>(path: &Path, record: &T) -> anyhow::Result<()> {
    let created = !path.exists();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    writeln!(file, "{}", serde_json::to_string(record)?)?;
    file.sync_all()
        .with_context(|| format!("fsync {}", path.display()))?;
    if created && let Some(dir) = path.parent() {
        // The new file's directory entry must survive a power loss too.
        std::fs::File::open(dir)
            .and_then(|dir| dir.sync_all())
            .with_context(|| format!("fsync {}", dir.display()))?;
    }
    Ok(())
}

/// [`append_jsonl`] on the blocking pool (an `fsync` must not stall a runtime thread).
async fn append_blocking<T: Serialize + Send + 'static>(
    path: std::path::PathBuf,
    record: T,
) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || append_jsonl(&path, &record))
        .await
        .map_err(|error| anyhow!("appending a record: {error}"))?
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

fn digest(hex_text: &str) -> anyhow::Result<[u8; 32]> {
    hex::decode(hex_text)
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or_else(|| anyhow!("{hex_text:?} is not a 32-byte hex digest"))
}

/// A rule the directory broke; the auditor stops before it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("epoch {epoch}: {rule}")]
pub struct Violation {
    /// The epoch the blob claims.
    pub epoch: u64,
    /// What is wrong.
    pub rule: String,
}

impl Auditor {
    /// Opens (or creates) the auditor's data directory and loads its verified heads.
    pub fn open(settings: AuditorSettings) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(&settings.data_dir)
            .with_context(|| format!("create {}", settings.data_dir.display()))?;
        let start = match settings.start {
            Some(start) => start,
            None => (0, empty_root(&settings.config)?),
        };
        let mut state = State {
            latest: start,
            ..State::default()
        };
        for head in read_jsonl::<Head>(&settings.data_dir.join("heads.jsonl"))? {
            state.latest = (head.epoch, digest(&head.digest)?);
            state.heads.insert(head.epoch, head);
        }
        state.violations = read_jsonl(&settings.data_dir.join("violations.jsonl"))?;
        let key = SigningKey::from_bytes(&settings.signing_key);
        Ok(Arc::new(Self {
            settings,
            key,
            state: Mutex::new(state),
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The auditor's public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.settings.namespace
    }

    /// The latest verified head, if any.
    pub fn latest(&self) -> Option<Head> {
        self.state().heads.values().next_back().cloned()
    }

    /// The oldest verified head, if any (the namespace's root in the Plexi API: every later
    /// epoch's head and its predecessor's are served).
    pub fn first(&self) -> Option<Head> {
        self.state().heads.values().next().cloned()
    }

    /// Where the log's blobs are served over HTTP, if configured.
    pub fn log_directory(&self) -> Option<&str> {
        self.settings.log_directory.as_deref()
    }

    /// The trusted start `(epoch, root)`: the configured one, or epoch 0 and akd's empty root.
    pub fn start(&self) -> Option<(u64, [u8; 32])> {
        match self.settings.start {
            Some(start) => Some(start),
            None => empty_root(&self.settings.config).ok().map(|root| (0, root)),
        }
    }

    /// The head of `epoch`, if verified.
    pub fn head(&self, epoch: u64) -> Option<Head> {
        self.state().heads.get(&epoch).cloned()
    }

    /// The most recent `count` heads, newest first.
    pub fn recent(&self, count: usize) -> Vec<Head> {
        self.state()
            .heads
            .values()
            .rev()
            .take(count)
            .cloned()
            .collect()
    }

    /// The source's latest epoch when last asked: with [`Auditor::latest`], how far the
    /// auditor trails the directory.
    pub fn source_latest(&self) -> u64 {
        self.state().source_latest
    }

    /// Every rule violation seen.
    pub fn violations(&self) -> Vec<String> {
        self.state().violations.clone()
    }

    async fn record_violation(&self, violation: &Violation) -> anyhow::Result<()> {
        let text = violation.to_string();
        if self.state().violations.contains(&text) {
            return Ok(());
        }
        tracing::error!(%violation, "audit rule violated; not signing");
        append_blocking(
            self.settings.data_dir.join("violations.jsonl"),
            text.clone(),
        )
        .await?;
        let mut state = self.state();
        if !state.violations.contains(&text) {
            state.violations.push(text);
        }
        Ok(())
    }

    /// Checks one blob against the rules and the stock verifier; signs and persists its head.
    /// `Ok(None)`: the blob is for an epoch already verified with the same root (nothing to do).
    pub async fn accept(&self, name: &str, proof: &[u8]) -> Result<Option<Head>, Violation> {
        self.accept_committed(name, proof, 0).await
    }

    /// [`Auditor::accept`], with the epoch's commit time (ms; 0: unknown) kept in its head.
    pub async fn accept_committed(
        &self,
        name: &str,
        proof: &[u8],
        committed_at_ms: u64,
    ) -> Result<Option<Head>, Violation> {
        let AuditBlobName {
            epoch,
            previous_root: previous,
            root,
        } = name
            .parse()
            .map_err(|error: ktd_proto::audit_blob::BadAuditBlobName| Violation {
                epoch: 0,
                rule: error.to_string(),
            })?;
        let violation = |rule: String| Violation { epoch, rule };
        let (latest_epoch, latest_root) = self.state().latest;
        if epoch <= latest_epoch {
            let known = self
                .state()
                .heads
                .get(&epoch)
                .map(|head| head.digest.clone());
            return match known {
                Some(known) if known == hex::encode(root) => Ok(None),
                Some(known) => Err(violation(format!(
                    "re-published with root {} after the auditor verified {known}",
                    hex::encode(root)
                ))),
                // Before the trusted start: not ours to judge.
                None => Ok(None),
            };
        }
        if epoch != latest_epoch + 1 {
            return Err(violation(format!(
                "gap: the next epoch to verify is {}",
                latest_epoch + 1
            )));
        }
        if previous != latest_root {
            return Err(violation(format!(
                "the blob's previous root {} is not the verified root {} of epoch {latest_epoch}",
                hex::encode(previous),
                hex::encode(latest_root)
            )));
        }
        let message: api::SingleAppendOnlyProof = prost::Message::decode(proof)
            .map_err(|error| violation(format!("not a SingleAppendOnlyProof: {error}")))?;
        let proof_akd: ktd_core::akd_core::SingleAppendOnlyProof = (&message)
            .try_into()
            .map_err(|error| violation(format!("malformed proof: {error}")))?;
        let started = Instant::now();
        let verified = with_configuration!(&self.settings.config, TC => {
            verify::<TC>(proof_akd, previous, root, epoch).await
        });
        verified.map_err(|error| {
            violation(format!("the append-only proof does not verify: {error}"))
        })?;
        let verify_us = started.elapsed().as_micros() as u64;
        let mut head = self.sign(epoch, root, proof.len() as u64, verify_us);
        head.committed_at_ms = committed_at_ms;
        append_blocking(self.settings.data_dir.join("heads.jsonl"), head.clone())
            .await
            .map_err(|error| violation(format!("cannot persist the head: {error:#}")))?;
        let mut state = self.state();
        state.latest = (epoch, root);
        state.heads.insert(epoch, head.clone());
        Ok(Some(head))
    }

    fn sign(&self, epoch: u64, root: [u8; 32], proof_bytes: u64, verify_us: u64) -> Head {
        let timestamp = now_ms();
        let message = pb::SignatureMessage {
            version: Some(CIPHERSUITE_PROTOBUF_ED25519),
            namespace: Some(self.settings.namespace.clone()),
            timestamp: Some(timestamp),
            epoch: Some(pb::PlexiEpoch { inner: Some(epoch) }),
            digest: Some(root.to_vec()),
        };
        let signed_bytes = prost::Message::encode_to_vec(&message);
        let signature = self.key.sign(&signed_bytes);
        Head {
            epoch,
            digest: hex::encode(root),
            timestamp,
            signature: hex::encode(signature.to_bytes()),
            signed_bytes: hex::encode(signed_bytes),
            proof_bytes,
            verify_us,
            committed_at_ms: 0,
        }
    }

    /// Follows the blob source until `shutdown` or a violation (which is recorded; the auditor
    /// then keeps serving what it verified, and reports the violation).
    pub async fn follow(self: Arc<Self>, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut client = None;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let next = self.state().latest.0 + 1;
            let blobs = match &self.settings.source {
                BlobSource::Gateway(addr) => {
                    if client.is_none() {
                        client = Client::connect(addr).await.ok();
                    }
                    match &client {
                        Some(client) => {
                            fetch_from_gateway(client, next)
                                .await
                                .map(|(blobs, latest)| {
                                    let mut state = self.state();
                                    state.source_latest = state.source_latest.max(latest);
                                    blobs
                                })
                        }
                        None => Err(anyhow!("cannot reach the gateway at {addr}")),
                    }
                }
                BlobSource::Directory(dir) => {
                    // A directory scan and file reads: blocking IO, off the runtime threads.
                    let dir = dir.clone();
                    tokio::task::spawn_blocking(move || BlobDir::new(&dir).read_from(next, 16))
                        .await
                        .map_err(|error| anyhow!("reading the blob directory: {error}"))
                        .and_then(|read| read.map_err(anyhow::Error::from))
                        .map(|(blobs, latest)| {
                            let mut state = self.state();
                            state.source_latest = state.source_latest.max(latest);
                            blobs
                                .into_iter()
                                .map(|blob| (blob.name, blob.bytes, 0))
                                .collect()
                        })
                }
            };
            let blobs = match blobs {
                Ok(blobs) => blobs,
                Err(error) => {
                    tracing::warn!(%error, "cannot read audit blobs; retrying");
                    client = None;
                    Vec::new()
                }
            };
            let caught_up = blobs.is_empty();
            for (name, proof, committed_at_ms) in blobs {
                match self.accept_committed(&name, &proof, committed_at_ms).await {
                    Ok(Some(head)) => {
                        tracing::info!(epoch = head.epoch, root = %head.digest, verify_us = head.verify_us, "epoch verified and signed")
                    }
                    Ok(None) => {}
                    Err(violation) => {
                        self.record_violation(&violation).await?;
                        // Nothing after a violation is signed; keep serving, stop following.
                        shutdown.cancelled().await;
                        return Ok(());
                    }
                }
            }
            if caught_up {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(self.settings.poll) => {}
                }
            }
        }
    }
}

async fn verify<TC: Configuration>(
    proof: ktd_core::akd_core::SingleAppendOnlyProof,
    previous: [u8; 32],
    root: [u8; 32],
    epoch: u64,
) -> Result<(), String> {
    // The stock verifier rebuilds an in-memory tree: CPU work, off the async threads.
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        handle.block_on(akd::auditor::verify_consecutive_append_only::<TC>(
            &proof, previous, root, epoch,
        ))
    })
    .await
    .map_err(|error| error.to_string())?
    .map_err(|error| error.to_string())
}

/// Audit blobs as (name, protobuf bytes, commit time in ms or 0).
type Blobs = Vec<(String, Vec<u8>, u64)>;

/// Blobs of epochs `next..` (at most 16) with their commit times, and the gateway's latest
/// committed epoch.
async fn fetch_from_gateway(client: &Client, next: u64) -> anyhow::Result<(Blobs, u64)> {
    let (names, latest) = client.audit_blob_names(next, 16).await?;
    let mut blobs = Vec::new();
    for name in names {
        let bytes = client.raw_audit_blob(&name).await?;
        let epoch: AuditBlobName = name.parse()?;
        // The commit time is for the dashboard only; a gateway that cannot say leaves it 0.
        let committed_at_ms = client
            .directory()
            .get_epoch(api::GetEpochRequest {
                epoch: Some(epoch.epoch),
                wait: false,
            })
            .await
            .map_or(0, |answer| answer.into_inner().committed_at_ms);
        blobs.push((name, bytes, committed_at_ms));
    }
    Ok((blobs, latest))
}

impl Auditor {
    /// `head` as the gRPC message (with Plexi's `key_id`: the public key's last byte).
    pub fn head_message(&self, head: &Head) -> anyhow::Result<pb::SignedHead> {
        let signed_bytes = hex::decode(&head.signed_bytes)?;
        Ok(pb::SignedHead {
            message: Some(prost::Message::decode(signed_bytes.as_slice())?),
            signature: hex::decode(&head.signature)?,
            key_id: u32::from(self.public_key()[31]),
            signed_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_last_line_is_dropped_and_cut_but_a_damaged_complete_line_is_an_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("heads.jsonl");
        append_jsonl(&path, &1u64).expect("append");
        append_jsonl(&path, &2u64).expect("append");
        // A crash in the middle of the third append.
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        write!(file, "3").expect("write");
        drop(file);
        assert_eq!(read_jsonl::<u64>(&path).expect("read"), vec![1, 2]);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "1\n2\n");
        append_jsonl(&path, &4u64).expect("append after the cut");
        assert_eq!(read_jsonl::<u64>(&path).expect("read"), vec![1, 2, 4]);

        std::fs::write(&path, "1\nnot json\n2\n").expect("write");
        let error = read_jsonl::<u64>(&path).expect_err("a damaged complete line");
        assert!(
            format!("{error:#}").contains("line 2: damaged"),
            "{error:#}"
        );
    }
}
