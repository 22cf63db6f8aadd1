//! `ktd dev`'s configuration ([`DevConfig`]) and what it resolves to ([`ResolvedDev`]): the
//! settings `crate::serve::run_dev` takes.

use std::path::PathBuf;
use std::time::Duration;

use gateway::rate::RateLimits;
use gateway::service::GatewayOptions;
use ktd_core::AkdConfig;
use serde::{Deserialize, Serialize};
use shard::lookup_proofs::LookupProofs;

use super::{ProcessConfig, ServerFile, check_address, check_partition_bits};
use crate::serve::DevSettings;

/// `ktd dev`'s configuration (file keys = flag names with `_`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DevConfig {
    /// Address to serve the public API on.
    pub listen: String,
    /// Data directory (created if missing; restart resumes from it).
    pub data_dir: PathBuf,
    /// VRF seed file, 64 hex digits (default: `data_dir/vrf-seed.hex`, generated if missing).
    pub vrf_seed_file: Option<PathBuf>,
    /// Seal a non-empty epoch this often.
    #[serde(with = "humantime_serde")]
    pub epoch_interval: Duration,
    /// Seal an empty "heartbeat" epoch after this long without updates (off unless set).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Option<Duration>,
    /// Tree partition bits (2^k partitions).
    pub partition_bits: u8,
    /// `whatsapp_v1` or `experimental:<domain label>`.
    #[serde(with = "super::akd_configuration")]
    pub configuration: AkdConfig,
    /// Requests served at once before RESOURCE_EXHAUSTED.
    pub max_in_flight: usize,
    /// Expensive-read budget tokens a caller regains per second (`gateway::rate`).
    pub expensive_reads_per_second: f64,
    /// Expensive-read budget tokens a caller can hold (spend at once).
    pub expensive_reads_burst: f64,
    /// Serve the audit blobs over plain HTTP (S3 `ListObjectsV2` layout, `GET /E/PREV/CUR`) on
    /// this address, for akd's and Plexi's auditor tools.
    pub blob_listen: Option<String>,
    /// When lookups' VRF proofs are stored: `eager`, `lazy` or `off`.
    #[serde(with = "super::as_text")]
    pub lookup_proofs: LookupProofs,
    /// RocksDB's block cache, in MiB.
    pub block_cache_mib: usize,
    /// Memory for the top tree levels held in memory, in MiB (0: none).
    pub hot_tree_mib: usize,
    /// Metrics, logs, traces and TLS.
    #[serde(flatten, skip_deserializing)]
    pub process: ProcessConfig,
}

impl Default for DevConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            data_dir: PathBuf::from("ktd-dev"),
            vrf_seed_file: None,
            epoch_interval: Duration::from_secs(1),
            heartbeat_interval: None,
            partition_bits: 4,
            configuration: AkdConfig::WhatsAppV1,
            max_in_flight: 1024,
            expensive_reads_per_second: RateLimits::default().per_second,
            expensive_reads_burst: RateLimits::default().burst,
            blob_listen: None,
            lookup_proofs: LookupProofs::default(),
            block_cache_mib: super::shard::DEFAULT_BLOCK_CACHE_MIB,
            hot_tree_mib: super::shard::DEFAULT_HOT_TREE_MIB,
            process: ProcessConfig::default(),
        }
    }
}

impl ServerFile for DevConfig {
    const SERVER: &'static str = "dev";
    fn process_mut(&mut self) -> Option<&mut ProcessConfig> {
        Some(&mut self.process)
    }
}

/// `ktd dev`'s validated configuration.
#[derive(Debug)]
pub struct ResolvedDev {
    /// Address to serve the public API on.
    pub listen: String,
    /// What the process runs with.
    pub settings: DevSettings,
    /// The VRF seed file.
    pub seed_file: PathBuf,
    /// Whether it exists yet (if not, it is generated at start).
    pub seed_file_exists: bool,
}

impl DevConfig {
    fn rate_limits(&self) -> anyhow::Result<RateLimits> {
        super::gateway::rate_limits(self.expensive_reads_per_second, self.expensive_reads_burst)
    }

    /// Validates the configuration; an existing VRF seed file is read (its length and
    /// permissions), a missing one is generated when the directory starts.
    pub fn resolve(&self) -> anyhow::Result<ResolvedDev> {
        check_address("listen", &self.listen)?;
        if let Some(blob_listen) = &self.blob_listen {
            check_address("blob_listen", blob_listen)?;
        }
        check_partition_bits(self.partition_bits)?;
        if self.epoch_interval.is_zero() {
            anyhow::bail!("epoch_interval must be positive");
        }
        if self
            .heartbeat_interval
            .is_some_and(|interval| interval.is_zero())
        {
            anyhow::bail!("heartbeat_interval must be positive when set");
        }
        let seed_file = self
            .vrf_seed_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("vrf-seed.hex"));
        let seed_file_exists = seed_file.exists();
        if seed_file_exists {
            let mut seed = crate::seed_file::read_vrf_seed(&seed_file)?;
            zeroize::Zeroize::zeroize(&mut seed);
        }
        Ok(ResolvedDev {
            listen: self.listen.clone(),
            settings: DevSettings {
                data_dir: self.data_dir.clone(),
                vrf_seed_file: self.vrf_seed_file.clone(),
                epoch_interval: self.epoch_interval,
                heartbeat_interval: self.heartbeat_interval,
                partition_bits: self.partition_bits,
                config: self.configuration.clone(),
                lookup_proofs: self.lookup_proofs,
                store: super::shard::store_options(self.block_cache_mib, self.hot_tree_mib)?,
                options: GatewayOptions {
                    max_in_flight: self.max_in_flight,
                    rate_limits: self.rate_limits()?,
                    blob_listen: self.blob_listen.clone(),
                    ..GatewayOptions::default()
                },
            },
            seed_file,
            seed_file_exists,
        })
    }
}
