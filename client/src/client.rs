//! [`Client`]: typed calls to a gateway's public API, every proof checked locally before
//! anything is returned — lookups, absences and histories with the strict verifier
//! ([`crate::strict`]: stock `akd_core::verify` plus the structural checks akd skips), audits
//! and audit blobs with stock `akd::auditor`.

use std::time::Duration;

use ktd_core::akd_core::hash::Digest;
use ktd_core::akd_core::verify::history::{HistoryParams, HistoryVerificationParams};
use ktd_core::akd_core::{self as akd_core, AkdLabel};
use ktd_core::proof::AbsenceProof;
use ktd_core::{AkdConfig, with_configuration};
use ktd_proto::audit_blob::AuditBlobName;
use ktd_proto::ktd::v1 as api;
use tonic::transport::Channel;

use crate::error::{ClientError, Result};

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
    /// The gateway answered with the remembered result of an earlier publish with the same
    /// idempotency key and updates (nothing was applied this time).
    pub duplicate: bool,
}

/// A fresh idempotency key (128 random bits, hex): one per logical publish, reused for its
/// retries.
pub fn new_idempotency_key() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
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

/// A verified audit blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedBlob {
    /// `"{epoch}/{hex root of epoch - 1}/{hex root of epoch}"` ([`AuditBlobName`]).
    pub name: String,
    /// The end epoch.
    pub epoch: u64,
    /// The protobuf `SingleAppendOnlyProof`, exactly as served.
    pub bytes: Vec<u8>,
}

/// The history versions a `most_recent` count asks for (0 = all).
pub fn history_params(most_recent: u64) -> HistoryParams {
    match most_recent {
        0 => HistoryParams::Complete,
        n => HistoryParams::MostRecent(usize::try_from(n).unwrap_or(usize::MAX)),
    }
}

impl Client {
    /// Connects to the gateway at `addr` (`http://host:port`, or `https://` once
    /// `ktd_rpc::security::install` has set up mutual TLS) and reads its VRF public key and akd
    /// configuration (on a gateway's admin port, which has none, the client can make admin
    /// calls only).
    ///
    /// An experimental configuration's domain label is installed process-wide
    /// ([`AkdConfig::install`]): one process can hold clients of one experimental directory (and
    /// any number of `whatsapp_v1` ones); connecting to a second label fails with
    /// [`ClientError::Configuration`].
    pub async fn connect(addr: &str) -> Result<Self> {
        let connect_error = |message: String| ClientError::Connect {
            addr: addr.to_string(),
            message,
        };
        let endpoint = ktd_rpc::security::endpoint(addr)
            .map_err(|error| connect_error(error.to_string()))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60));
        let channel = endpoint
            .connect()
            .await
            .map_err(|error| connect_error(error_chain(&error)))?;
        let mut directory = api::directory_client::DirectoryClient::new(channel.clone())
            .max_decoding_message_size(ktd_proto::MAX_MESSAGE_BYTES);
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
            Err(status) => return Err(ClientError::refused("GetPublicKey")(status)),
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

    /// Publishes `(label, value)` updates; they are durable when this returns. Without an
    /// `idempotency_key` one is generated, so that a retry of this call (by the caller, with the
    /// key from [`new_idempotency_key`]) is applied once; the gateway binds a key to the caller
    /// and to these updates.
    pub async fn publish(
        &self,
        updates: Vec<(Vec<u8>, Vec<u8>)>,
        idempotency_key: Option<String>,
    ) -> Result<Published> {
        let request = api::PublishRequest {
            updates: updates
                .into_iter()
                .map(|(label, value)| api::Update { label, value })
                .collect(),
            idempotency_key: idempotency_key.unwrap_or_else(new_idempotency_key),
        };
        let answer = self
            .directory
            .clone()
            .publish(request)
            .await
            .map_err(ClientError::refused("Publish"))?
            .into_inner();
        Ok(Published {
            epoch: answer.epoch,
            sequence: answer.sequence,
            duplicate: answer.duplicate,
        })
    }

    /// The latest committed epoch, or `epoch`.
    pub async fn epoch(&self, epoch: Option<u64>) -> Result<EpochRoot> {
        let answer = self
            .directory
            .clone()
            .get_epoch(api::GetEpochRequest { epoch, wait: false })
            .await
            .map_err(ClientError::refused("GetEpoch"))?
            .into_inner();
        epoch_root("GetEpoch", Some(answer))
    }

    /// Waits until `epoch` is committed.
    pub async fn wait_for_epoch(&self, epoch: u64) -> Result<EpochRoot> {
        let answer = self
            .directory
            .clone()
            .get_epoch(api::GetEpochRequest {
                epoch: Some(epoch),
                wait: true,
            })
            .await
            .map_err(ClientError::refused("GetEpoch"))?
            .into_inner();
        epoch_root("GetEpoch", Some(answer))
    }

    /// Seals the open epoch and waits for its root (admin).
    pub async fn seal(&self) -> Result<EpochRoot> {
        let answer = self
            .admin
            .clone()
            .seal_epoch(api::SealEpochRequest {})
            .await
            .map_err(ClientError::refused("SealEpoch"))?
            .into_inner();
        epoch_root("SealEpoch", Some(answer))
    }

    /// The cluster's status (admin).
    pub async fn cluster_status(&self) -> Result<api::ClusterStatusResponse> {
        Ok(self
            .admin
            .clone()
            .cluster_status(api::ClusterStatusRequest {})
            .await
            .map_err(ClientError::refused("ClusterStatus"))?
            .into_inner())
    }

    /// Looks `label` up as of `epoch` (latest if `None`) and checks the proof with the strict
    /// verifier.
    pub async fn lookup(&self, label: &[u8], epoch: Option<u64>) -> Result<VerifiedLookup> {
        const CALL: &str = "Lookup";
        let answer = self
            .directory
            .clone()
            .lookup(api::LookupRequest {
                label: label.to_vec(),
                epoch,
            })
            .await
            .map_err(ClientError::refused(CALL))?
            .into_inner();
        let proof_bytes = prost::Message::encoded_len(&answer);
        let at = epoch_root(CALL, answer.epoch_hash)?;
        let proof: akd_core::LookupProof = decode_proof(CALL, answer.proof.as_ref())?;
        let label = AkdLabel(label.to_vec());
        let result = with_configuration!(&self.config, TC => crate::strict::lookup_verify::<TC>(
            &self.vrf_public_key,
            at.root_hash,
            at.epoch,
            label,
            proof,
        ))
        .map_err(verification("lookup proof"))?;
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
    pub async fn prove_absence(&self, label: &[u8], epoch: Option<u64>) -> Result<VerifiedAbsence> {
        const CALL: &str = "ProveAbsence";
        let answer = self
            .directory
            .clone()
            .prove_absence(api::ProveAbsenceRequest {
                label: label.to_vec(),
                epoch,
            })
            .await
            .map_err(ClientError::refused(CALL))?
            .into_inner();
        let proof_bytes = prost::Message::encoded_len(&answer);
        let at = epoch_root(CALL, answer.epoch_hash)?;
        let proof = answer
            .proof
            .ok_or_else(|| ClientError::malformed(CALL, "the answer has no proof"))?;
        let proof = AbsenceProof {
            vrf_proof: proof.vrf_proof,
            non_membership: decode_proof(CALL, proof.non_membership_proof.as_ref())?,
        };
        let label = AkdLabel(label.to_vec());
        with_configuration!(&self.config, TC => crate::strict::absence_verify::<TC>(
            &self.vrf_public_key,
            at.root_hash,
            &label,
            &proof,
        ))
        .map_err(verification("absence proof"))?;
        Ok(VerifiedAbsence { at, proof_bytes })
    }

    /// Looks `label` up; if the gateway says it has no version, asks for an absence proof and
    /// verifies it, so both answers are proven.
    pub async fn lookup_or_absence(
        &self,
        label: &[u8],
        epoch: Option<u64>,
    ) -> Result<std::result::Result<VerifiedLookup, VerifiedAbsence>> {
        match self.lookup(label, epoch).await {
            Ok(found) => Ok(Ok(found)),
            Err(error) if error.is_not_found() => {
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
    ) -> Result<(EpochRoot, Vec<VerifiedVersion>)> {
        const CALL: &str = "KeyHistory";
        let answer = self
            .directory
            .clone()
            .key_history(api::KeyHistoryRequest {
                label: label.to_vec(),
                most_recent,
                epoch,
            })
            .await
            .map_err(ClientError::refused(CALL))?
            .into_inner();
        let at = epoch_root(CALL, answer.epoch_hash)?;
        let proof: akd_core::HistoryProof = decode_proof(CALL, answer.proof.as_ref())?;
        let params = HistoryVerificationParams::Default {
            history_params: history_params(most_recent),
        };
        let label = AkdLabel(label.to_vec());
        let results =
            with_configuration!(&self.config, TC => crate::strict::key_history_verify::<TC>(
                &self.vrf_public_key,
                at.root_hash,
                at.epoch,
                label,
                proof,
                params,
            ))
            .map_err(verification("history proof"))?;
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
    pub async fn audit(&self, start: u64, end: u64) -> Result<VerifiedAudit> {
        const CALL: &str = "Audit";
        let answer = self
            .directory
            .clone()
            .audit(api::AuditRequest {
                start_epoch: start,
                end_epoch: end,
            })
            .await
            .map_err(ClientError::refused(CALL))?
            .into_inner();
        let proof_bytes = prost::Message::encoded_len(&answer);
        let proof: akd_core::AppendOnlyProof = decode_proof(CALL, answer.proof.as_ref())?;
        let hashes = answer
            .root_hashes
            .iter()
            .map(|hash| digest(CALL, hash))
            .collect::<Result<Vec<Digest>>>()?;
        if hashes.len() as u64 != end.saturating_sub(start) + 1 {
            return Err(ClientError::malformed(
                CALL,
                format!(
                    "asked for the roots of {start}..={end}, got {} roots",
                    hashes.len()
                ),
            ));
        }
        if proof.epochs != (start..end).collect::<Vec<_>>() {
            return Err(ClientError::malformed(
                CALL,
                format!(
                    "the proof covers epochs {:?}, not {start}..{end}",
                    proof.epochs
                ),
            ));
        }
        with_configuration!(&self.config, TC => akd::auditor::audit_verify::<TC>(hashes.clone(), proof).await)
            .map_err(verification("append-only proof"))?;
        Ok(VerifiedAudit {
            roots: (start..=end)
                .zip(hashes)
                .map(|(epoch, root_hash)| EpochRoot { epoch, root_hash })
                .collect(),
            proof_bytes,
        })
    }

    /// Names of the audit blobs of end epochs `start..` (at most `limit`), and the latest
    /// committed epoch.
    pub async fn audit_blob_names(&self, start: u64, limit: u32) -> Result<(Vec<String>, u64)> {
        let answer = self
            .directory
            .clone()
            .list_audit_blobs(api::ListAuditBlobsRequest {
                start_epoch: start,
                limit,
            })
            .await
            .map_err(ClientError::refused("ListAuditBlobs"))?
            .into_inner();
        Ok((answer.names, answer.latest_epoch))
    }

    /// Audit blob `name`, exactly as served and not verified (an auditor judges it itself).
    pub async fn raw_audit_blob(&self, name: &str) -> Result<Vec<u8>> {
        Ok(self
            .directory
            .clone()
            .get_audit_blob(api::GetAuditBlobRequest {
                name: name.to_string(),
            })
            .await
            .map_err(ClientError::refused("GetAuditBlob"))?
            .into_inner()
            .proof)
    }

    /// Fetches audit blob `name` and verifies it with stock
    /// `akd::auditor::verify_consecutive_append_only` against the roots its name carries (which
    /// the caller should check against roots it trusts, e.g. an auditor's signed heads).
    pub async fn audit_blob(&self, name: &str) -> Result<VerifiedBlob> {
        const CALL: &str = "GetAuditBlob";
        let AuditBlobName {
            epoch,
            previous_root,
            root,
        } = name
            .parse()
            .map_err(|error: ktd_proto::audit_blob::BadAuditBlobName| {
                ClientError::malformed(CALL, error.to_string())
            })?;
        let bytes = self.raw_audit_blob(name).await?;
        let message: api::SingleAppendOnlyProof = prost::Message::decode(bytes.as_slice())
            .map_err(|error| {
                ClientError::malformed(
                    CALL,
                    format!("audit blob {name}: not a SingleAppendOnlyProof ({error})"),
                )
            })?;
        let proof: akd_core::SingleAppendOnlyProof =
            (&message)
                .try_into()
                .map_err(|error: ktd_proto::akd::ProofDecodeError| {
                    ClientError::malformed(CALL, error.to_string())
                })?;
        with_configuration!(&self.config, TC => akd::auditor::verify_consecutive_append_only::<TC>(
            &proof,
            previous_root,
            root,
            epoch,
        )
        .await)
        .map_err(verification("audit blob"))?;
        Ok(VerifiedBlob {
            name: name.to_string(),
            epoch,
            bytes,
        })
    }
}

/// Maps a verifier's error to [`ClientError::Verification`].
fn verification<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> ClientError {
    move |error| ClientError::Verification {
        what,
        reason: error.to_string(),
    }
}

/// The proof an answer carries, converted to akd's type.
fn decode_proof<'a, M, P>(call: &'static str, proof: Option<&'a M>) -> Result<P>
where
    P: TryFrom<&'a M>,
    P::Error: std::fmt::Display,
{
    proof
        .ok_or_else(|| ClientError::malformed(call, "the answer has no proof"))?
        .try_into()
        .map_err(|error: P::Error| ClientError::malformed(call, error.to_string()))
}

fn digest(call: &'static str, bytes: &[u8]) -> Result<Digest> {
    bytes.try_into().map_err(|_| {
        ClientError::malformed(
            call,
            format!("a root hash must be 32 bytes, got {}", bytes.len()),
        )
    })
}

fn epoch_root(call: &'static str, hash: Option<api::EpochHash>) -> Result<EpochRoot> {
    let hash = hash.ok_or_else(|| ClientError::malformed(call, "the answer names no epoch"))?;
    Ok(EpochRoot {
        epoch: hash.epoch,
        root_hash: digest(call, &hash.root_hash)?,
    })
}

/// An error and its sources, one line (tonic's transport errors hide the cause in `source`).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
