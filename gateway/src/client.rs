//! A Rust client of the public API: typed calls, and proofs checked locally against the root the
//! gateway named before anything is returned — lookups and histories with the strict verifier
//! ([`crate::strict`]: stock `akd_core::verify` plus the structural checks akd skips), audits with
//! stock `akd::auditor::audit_verify`. Internal Rust services depend on this instead of the raw gRPC stubs.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! let client = gateway::client::Client::connect("http://127.0.0.1:8080").await?;
//! let published = client.publish(vec![(b"alice".to_vec(), b"key-1".to_vec())], None).await?;
//! client.wait_for_epoch(published.epoch).await?;
//! let found = client.lookup(b"alice", None).await?;
//! assert_eq!(found.value, b"key-1");
//! # Ok(()) }
//! ```

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use proto::ktd::v1 as api;
use shard::AkdConfig;
use shard::akd_core::AkdLabel;
use shard::akd_core::configuration::Configuration;
use shard::akd_core::hash::Digest;
use shard::akd_core::verify::history::{HistoryParams, HistoryVerificationParams};
use shard::config::{Experimental, WhatsAppV1};
use shard::proof::AbsenceProof;
use tonic::transport::Channel;

/// A connection to a gateway.
#[derive(Clone, Debug)]
pub struct Client {
    directory: api::directory_client::DirectoryClient<Channel>,
    admin: api::admin_client::AdminClient<Channel>,
    vrf_public_key: Vec<u8>,
    config: AkdConfig,
}

/// A published batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Published {
    /// The epoch the updates will be sealed in.
    pub epoch: u64,
    /// The sequence number of the first update.
    pub sequence: u64,
}

/// A committed epoch and its root hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochRoot {
    /// The epoch.
    pub epoch: u64,
    /// Its root hash.
    pub root_hash: [u8; 32],
}

/// A verified proof that a label was never published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifiedAbsence {
    /// The epoch (and root) the proof was checked against.
    pub at: EpochRoot,
    /// Size of the answer on the wire.
    pub proof_bytes: usize,
}

/// A verified lookup answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedLookup {
    /// The epoch (and root) the proof was checked against.
    pub at: EpochRoot,
    /// The label's current value.
    pub value: Vec<u8>,
    /// Its version.
    pub version: u64,
    /// The epoch that version was published in.
    pub epoch: u64,
    /// The proof's size on the wire, in bytes.
    pub proof_bytes: usize,
}

/// One verified version of a label's history (newest first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedVersion {
    /// The version number.
    pub version: u64,
    /// The epoch it was published in.
    pub epoch: u64,
    /// Its value.
    pub value: Vec<u8>,
}

/// A verified audit of `start..=end`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedAudit {
    /// The root hashes of `start..=end`, each verified to extend the previous append-only.
    pub roots: Vec<EpochRoot>,
    /// The proof's size on the wire, in bytes.
    pub proof_bytes: usize,
}

impl Client {
    /// Connects to the gateway at `addr` (`http://host:port`) and reads its public key (on a
    /// gateway's admin port, which has none, the client can make admin calls only).
    pub async fn connect(addr: &str) -> anyhow::Result<Self> {
        let endpoint = proto::security::endpoint(addr)
            .with_context(|| format!("gateway address {addr:?}"))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60));
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("connect to {addr}"))?;
        let mut directory = api::directory_client::DirectoryClient::new(channel.clone())
            .max_decoding_message_size(crate::server::MAX_MESSAGE_BYTES);
        let admin = api::admin_client::AdminClient::new(channel);
        let key = match directory.get_public_key(api::GetPublicKeyRequest {}).await {
            Ok(key) => key.into_inner(),
            // A gateway's admin port (`--admin-listen`) serves only the Admin service: an
            // admin-only client, whose directory calls fail with UNIMPLEMENTED.
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                return Ok(Self {
                    directory,
                    admin,
                    vrf_public_key: Vec::new(),
                    config: AkdConfig::WhatsAppV1,
                });
            }
            Err(status) => return Err(anyhow::Error::new(status).context("GetPublicKey")),
        };
        let config: AkdConfig = key.configuration.parse()?;
        config.install()?;
        Ok(Self {
            directory,
            admin,
            vrf_public_key: key.vrf_public_key,
            config,
        })
    }

    /// The directory's VRF public key.
    pub fn vrf_public_key(&self) -> &[u8] {
        &self.vrf_public_key
    }

    /// The directory's akd configuration.
    pub fn configuration(&self) -> &AkdConfig {
        &self.config
    }

    /// The raw gRPC client, for calls this library does not wrap.
    pub fn directory(&self) -> api::directory_client::DirectoryClient<Channel> {
        self.directory.clone()
    }

    /// Publishes `(label, value)` updates; they are durable when this returns.
    pub async fn publish(
        &self,
        updates: Vec<(Vec<u8>, Vec<u8>)>,
        idempotency_key: Option<String>,
    ) -> Result<Published, tonic::Status> {
        let request = api::PublishRequest {
            updates: updates
                .into_iter()
                .map(|(label, value)| api::Update { label, value })
                .collect(),
            idempotency_key: idempotency_key.unwrap_or_default(),
        };
        let answer = self.directory.clone().publish(request).await?.into_inner();
        Ok(Published {
            epoch: answer.epoch,
            sequence: answer.sequence,
        })
    }

    /// The latest committed epoch, or `epoch`.
    pub async fn epoch(&self, epoch: Option<u64>) -> anyhow::Result<EpochRoot> {
        let answer = self
            .directory
            .clone()
            .get_epoch(api::GetEpochRequest { epoch, wait: false })
            .await?
            .into_inner();
        epoch_root(Some(answer))
    }

    /// Waits until `epoch` is committed.
    pub async fn wait_for_epoch(&self, epoch: u64) -> anyhow::Result<EpochRoot> {
        let answer = self
            .directory
            .clone()
            .get_epoch(api::GetEpochRequest {
                epoch: Some(epoch),
                wait: true,
            })
            .await?
            .into_inner();
        epoch_root(Some(answer))
    }

    /// Seals the open epoch and waits for its root (admin).
    pub async fn seal(&self) -> anyhow::Result<EpochRoot> {
        let answer = self
            .admin
            .clone()
            .seal_epoch(api::SealEpochRequest {})
            .await?
            .into_inner();
        epoch_root(Some(answer))
    }

    /// The cluster's status (admin).
    pub async fn cluster_status(&self) -> anyhow::Result<api::ClusterStatusResponse> {
        Ok(self
            .admin
            .clone()
            .cluster_status(api::ClusterStatusRequest {})
            .await?
            .into_inner())
    }

    /// Looks `label` up as of `epoch` (latest if `None`) and checks the proof with the strict
    /// verifier.
    pub async fn lookup(&self, label: &[u8], epoch: Option<u64>) -> anyhow::Result<VerifiedLookup> {
        let answer = self
            .directory
            .clone()
            .lookup(api::LookupRequest {
                label: label.to_vec(),
                epoch,
            })
            .await?
            .into_inner();
        let proof_bytes = prost::Message::encoded_len(&answer);
        let at = epoch_root(answer.epoch_hash)?;
        let proof: shard::akd_core::LookupProof = decode_proof(answer.proof.as_ref())?;
        let label = AkdLabel(label.to_vec());
        let result = match self.config {
            AkdConfig::WhatsAppV1 => {
                verify_lookup::<WhatsAppV1>(&self.vrf_public_key, at, label, proof)
            }
            AkdConfig::Experimental { .. } => {
                verify_lookup::<Experimental>(&self.vrf_public_key, at, label, proof)
            }
        }?;
        Ok(VerifiedLookup {
            at,
            value: result.value.0,
            version: result.version,
            epoch: result.epoch,
            proof_bytes,
        })
    }

    /// A proof that `label` was never published as of `epoch` (latest if `None`), checked with
    /// [`crate::strict::absence_verify`]. Fails with `FAILED_PRECONDITION` if it was.
    pub async fn prove_absence(
        &self,
        label: &[u8],
        epoch: Option<u64>,
    ) -> anyhow::Result<VerifiedAbsence> {
        let answer = self
            .directory
            .clone()
            .prove_absence(api::ProveAbsenceRequest {
                label: label.to_vec(),
                epoch,
            })
            .await?
            .into_inner();
        let proof_bytes = prost::Message::encoded_len(&answer);
        let at = epoch_root(answer.epoch_hash)?;
        let proof = answer
            .proof
            .ok_or_else(|| anyhow!("the answer has no proof"))?;
        let proof = AbsenceProof {
            vrf_proof: proof.vrf_proof,
            non_membership: decode_proof(proof.non_membership_proof.as_ref())?,
        };
        let label = AkdLabel(label.to_vec());
        let key = &self.vrf_public_key;
        match self.config {
            AkdConfig::WhatsAppV1 => {
                crate::strict::absence_verify::<WhatsAppV1>(key, at.root_hash, &label, &proof)
            }
            AkdConfig::Experimental { .. } => {
                crate::strict::absence_verify::<Experimental>(key, at.root_hash, &label, &proof)
            }
        }
        .map_err(|error| anyhow!("the absence proof does not verify: {error}"))?;
        Ok(VerifiedAbsence { at, proof_bytes })
    }

    /// Looks `label` up; if the gateway says it has no version, asks for an absence proof and
    /// verifies it, so both answers are proven.
    pub async fn lookup_or_absence(
        &self,
        label: &[u8],
        epoch: Option<u64>,
    ) -> anyhow::Result<Result<VerifiedLookup, VerifiedAbsence>> {
        match self.lookup(label, epoch).await {
            Ok(found) => Ok(Ok(found)),
            Err(error)
                if error
                    .downcast_ref::<tonic::Status>()
                    .is_some_and(|status| status.code() == tonic::Code::NotFound) =>
            {
                // NOT_FOUND is either "no such version" or "no such epoch"; only a verified
                // absence proof tells them apart.
                match self.prove_absence(label, epoch).await {
                    Ok(absent) => Ok(Err(absent)),
                    Err(_) => Err(error),
                }
            }
            Err(error) => Err(error),
        }
    }

    /// The history of `label` (the `most_recent` versions; 0 = all) as of `epoch`, verified.
    pub async fn history(
        &self,
        label: &[u8],
        most_recent: u64,
        epoch: Option<u64>,
    ) -> anyhow::Result<(EpochRoot, Vec<VerifiedVersion>)> {
        let answer = self
            .directory
            .clone()
            .key_history(api::KeyHistoryRequest {
                label: label.to_vec(),
                most_recent,
                epoch,
            })
            .await?
            .into_inner();
        let at = epoch_root(answer.epoch_hash)?;
        let proof: shard::akd_core::HistoryProof = decode_proof(answer.proof.as_ref())?;
        let params = match most_recent {
            0 => HistoryParams::Complete,
            n => HistoryParams::MostRecent(usize::try_from(n).unwrap_or(usize::MAX)),
        };
        let params = HistoryVerificationParams::Default {
            history_params: params,
        };
        let label = AkdLabel(label.to_vec());
        let key = &self.vrf_public_key;
        let results = match self.config {
            AkdConfig::WhatsAppV1 => crate::strict::key_history_verify::<WhatsAppV1>(
                key,
                at.root_hash,
                at.epoch,
                label,
                proof,
                params,
            ),
            AkdConfig::Experimental { .. } => crate::strict::key_history_verify::<Experimental>(
                key,
                at.root_hash,
                at.epoch,
                label,
                proof,
                params,
            ),
        }
        .map_err(|error| anyhow!("the history proof does not verify: {error}"))?;
        Ok((
            at,
            results
                .into_iter()
                .map(|result| VerifiedVersion {
                    version: result.version,
                    epoch: result.epoch,
                    value: result.value.0,
                })
                .collect(),
        ))
    }

    /// The append-only proof of `start..=end`, verified with `akd::auditor::audit_verify`.
    pub async fn audit(&self, start: u64, end: u64) -> anyhow::Result<VerifiedAudit> {
        let answer = self
            .directory
            .clone()
            .audit(api::AuditRequest {
                start_epoch: start,
                end_epoch: end,
            })
            .await?
            .into_inner();
        let proof_bytes = prost::Message::encoded_len(&answer);
        let proof: shard::akd_core::AppendOnlyProof = decode_proof(answer.proof.as_ref())?;
        let hashes = answer
            .root_hashes
            .iter()
            .map(|hash| digest(hash))
            .collect::<anyhow::Result<Vec<Digest>>>()?;
        if hashes.len() as u64 != end - start + 1 {
            bail!(
                "asked for the roots of {start}..={end}, got {} roots",
                hashes.len()
            );
        }
        if proof.epochs != (start..end).collect::<Vec<_>>() {
            bail!(
                "the proof covers epochs {:?}, not {start}..{end}",
                proof.epochs
            );
        }
        match self.config {
            AkdConfig::WhatsAppV1 => {
                akd::auditor::audit_verify::<WhatsAppV1>(hashes.clone(), proof).await
            }
            AkdConfig::Experimental { .. } => {
                akd::auditor::audit_verify::<Experimental>(hashes.clone(), proof).await
            }
        }
        .map_err(|error| anyhow!("the append-only proof does not verify: {error}"))?;
        Ok(VerifiedAudit {
            roots: (start..=end)
                .zip(hashes)
                .map(|(epoch, root_hash)| EpochRoot { epoch, root_hash })
                .collect(),
            proof_bytes,
        })
    }
}

/// A verified audit blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedBlob {
    /// `"{epoch}/{hex root of epoch - 1}/{hex root of epoch}"`.
    pub name: String,
    /// The end epoch.
    pub epoch: u64,
    /// The protobuf `SingleAppendOnlyProof`, exactly as served.
    pub bytes: Vec<u8>,
}

impl Client {
    /// Names of the audit blobs of end epochs `start..` (at most `limit`), and the latest
    /// committed epoch.
    pub async fn audit_blob_names(
        &self,
        start: u64,
        limit: u32,
    ) -> anyhow::Result<(Vec<String>, u64)> {
        let answer = self
            .directory
            .clone()
            .list_audit_blobs(api::ListAuditBlobsRequest {
                start_epoch: start,
                limit,
            })
            .await?
            .into_inner();
        Ok((answer.names, answer.latest_epoch))
    }

    /// Fetches audit blob `name` and verifies it with stock
    /// `akd::auditor::verify_consecutive_append_only` against the roots its name carries (which
    /// the caller should check against roots it trusts, e.g. an auditor's signed heads).
    pub async fn audit_blob(&self, name: &str) -> anyhow::Result<VerifiedBlob> {
        let (epoch, previous, root) = crate::service::parse_audit_blob_name(name)?;
        let blob = self
            .directory
            .clone()
            .get_audit_blob(api::GetAuditBlobRequest {
                name: name.to_string(),
            })
            .await?
            .into_inner();
        let message: api::SingleAppendOnlyProof = prost::Message::decode(blob.proof.as_slice())
            .map_err(|error| anyhow!("audit blob {name}: not a SingleAppendOnlyProof ({error})"))?;
        let proof: shard::akd_core::SingleAppendOnlyProof = (&message).try_into()?;
        match self.config {
            AkdConfig::WhatsAppV1 => {
                akd::auditor::verify_consecutive_append_only::<WhatsAppV1>(
                    &proof, previous, root, epoch,
                )
                .await
            }
            AkdConfig::Experimental { .. } => {
                akd::auditor::verify_consecutive_append_only::<Experimental>(
                    &proof, previous, root, epoch,
                )
                .await
            }
        }
        .map_err(|error| anyhow!("audit blob {name} does not verify: {error}"))?;
        Ok(VerifiedBlob {
            name: name.to_string(),
            epoch,
            bytes: blob.proof,
        })
    }
}

fn verify_lookup<TC: Configuration>(
    vrf_public_key: &[u8],
    at: EpochRoot,
    label: AkdLabel,
    proof: shard::akd_core::LookupProof,
) -> anyhow::Result<shard::akd_core::VerifyResult> {
    crate::strict::lookup_verify::<TC>(vrf_public_key, at.root_hash, at.epoch, label, proof)
        .map_err(|error| anyhow!("the lookup proof does not verify: {error}"))
}

/// The proof an answer carries, converted to akd's type.
fn decode_proof<'a, M, P>(proof: Option<&'a M>) -> anyhow::Result<P>
where
    P: TryFrom<&'a M>,
    P::Error: std::error::Error + Send + Sync + 'static,
{
    Ok(proof
        .ok_or_else(|| anyhow!("the answer has no proof"))?
        .try_into()?)
}

fn digest(bytes: &[u8]) -> anyhow::Result<Digest> {
    bytes
        .try_into()
        .map_err(|_| anyhow!("a root hash must be 32 bytes, got {}", bytes.len()))
}

fn epoch_root(hash: Option<api::EpochHash>) -> anyhow::Result<EpochRoot> {
    let hash = hash.ok_or_else(|| anyhow!("the answer names no epoch"))?;
    Ok(EpochRoot {
        epoch: hash.epoch,
        root_hash: digest(&hash.root_hash)?,
    })
}
