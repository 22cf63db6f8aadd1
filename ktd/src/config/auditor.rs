//! `ktd auditor`'s configuration ([`AuditorConfig`]) and what it resolves to
//! ([`ResolvedAuditor`]): the signing key read from its file, the trusted start and the blob
//! source, as `ktd_auditor::server::run` takes them.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use ktd_auditor::{AuditorSettings, BlobSource};
use ktd_core::AkdConfig;
use serde::{Deserialize, Serialize};

use super::{ProcessConfig, ServerFile, check_address, required};

/// An auditor's configuration (file keys = flag names with `_`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditorConfig {
    /// The namespace signed into every head.
    pub namespace: String,
    /// Where verified heads and violations are kept (a restart resumes from it). Required.
    pub data_dir: Option<PathBuf>,
    /// Ed25519 signing key file, 64 hex digits, mode 600. Required.
    pub signing_key_file: Option<PathBuf>,
    /// Follow this gateway's audit blobs (`http://HOST:PORT`); this or `blob_dir`.
    pub gateway: Option<String>,
    /// Or read blobs from a directory written by `ktd audit-blobs`.
    pub blob_dir: Option<PathBuf>,
    /// The directory's akd configuration.
    #[serde(with = "super::akd_configuration")]
    pub configuration: AkdConfig,
    /// The trusted start, `EPOCH/HEX_ROOT` (default: epoch 0, the empty directory).
    pub start: Option<String>,
    /// gRPC address (`ktd.auditor.v1.Auditor`).
    pub listen: String,
    /// HTTP address (dashboard at /, JSON API).
    pub http_listen: String,
    /// How often to look for new blobs when caught up.
    #[serde(with = "humantime_serde")]
    pub poll: Duration,
    /// Where the audited log's blobs are served over HTTP (a gateway's `blob_listen` URL):
    /// published as the namespace's `log_directory` in the Plexi API.
    pub log_directory: Option<String>,
    /// Metrics, logs, traces and TLS.
    #[serde(flatten, skip_deserializing)]
    pub process: ProcessConfig,
}

impl Default for AuditorConfig {
    fn default() -> Self {
        Self {
            namespace: "ktd.key-transparency.v1".into(),
            data_dir: None,
            signing_key_file: None,
            gateway: None,
            blob_dir: None,
            configuration: AkdConfig::WhatsAppV1,
            start: None,
            listen: "127.0.0.1:9090".into(),
            http_listen: "127.0.0.1:9091".into(),
            poll: Duration::from_millis(500),
            log_directory: None,
            process: ProcessConfig::default(),
        }
    }
}

impl ServerFile for AuditorConfig {
    const SERVER: &'static str = "auditor";
    fn process_mut(&mut self) -> Option<&mut ProcessConfig> {
        Some(&mut self.process)
    }
}

/// An auditor's validated configuration, with its signing key.
#[derive(Debug)]
pub struct ResolvedAuditor {
    /// gRPC address.
    pub listen: String,
    /// HTTP address.
    pub http_listen: String,
    /// What the auditor runs with (the key is redacted from `Debug` and zeroed on drop).
    pub settings: AuditorSettings,
}

impl AuditorConfig {
    /// Validates the configuration and reads the signing key file (its length and
    /// permissions).
    pub fn resolve(&self) -> anyhow::Result<ResolvedAuditor> {
        let data_dir = required(&self.data_dir, "data_dir", "--data-dir")?;
        let key_file = required(
            &self.signing_key_file,
            "signing_key_file",
            "--signing-key-file",
        )?;
        check_address("listen", &self.listen)?;
        check_address("http_listen", &self.http_listen)?;
        let start = match &self.start {
            None => None,
            Some(text) => {
                let (epoch, root) = text
                    .split_once('/')
                    .context("start must be EPOCH/HEX_ROOT")?;
                let root: [u8; 32] = hex::decode(root)
                    .ok()
                    .and_then(|bytes| bytes.try_into().ok())
                    .context("start: the root must be 64 hex digits")?;
                Some((epoch.parse().context("start: bad epoch")?, root))
            }
        };
        let source = match (&self.gateway, &self.blob_dir) {
            (Some(_), Some(_)) => bail!("gateway and blob_dir: give one, not both"),
            (Some(gateway), None) => BlobSource::Gateway(gateway.clone()),
            (None, Some(dir)) => BlobSource::Directory(dir.clone()),
            (None, None) => bail!("give --gateway URL or --blob-dir DIR"),
        };
        Ok(ResolvedAuditor {
            listen: self.listen.clone(),
            http_listen: self.http_listen.clone(),
            settings: AuditorSettings {
                namespace: self.namespace.clone(),
                data_dir: data_dir.clone(),
                signing_key: crate::seed_file::read_secret_file(key_file, "signing key file")?,
                config: self.configuration.clone(),
                start,
                source,
                poll: self.poll,
                log_directory: self.log_directory.clone(),
            },
        })
    }
}
