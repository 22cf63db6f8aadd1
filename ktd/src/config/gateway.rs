//! `ktd gateway`'s configuration ([`GatewayConfig`]) and what it resolves to
//! ([`ResolvedGateway`]): the settings `crate::serve::run_gateway` takes.

use std::time::Duration;

use gateway::rate::RateLimits;
use gateway::service::GatewayOptions;
use serde::{Deserialize, Serialize};

use super::{ProcessConfig, ServerFile, check_address};
use crate::serve::GatewaySettings;

/// Whether a gateway with TLS requires client certificates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// Every client presents a certificate.
    #[default]
    Required,
    /// Clients without a certificate may read, not publish.
    Optional,
}

/// A gateway's configuration (file keys = flag names with `_`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Address to serve the public API on.
    pub listen: String,
    /// Sequencer addresses (any member; the client follows the leader). Required.
    pub sequencers: Vec<String>,
    /// Requests served at once before RESOURCE_EXHAUSTED.
    pub max_in_flight: usize,
    /// Expensive-read budget tokens a caller regains per second (`gateway::rate`).
    pub expensive_reads_per_second: f64,
    /// Expensive-read budget tokens a caller can hold (spend at once).
    pub expensive_reads_burst: f64,
    /// Serve the Admin service (seal, cluster status) on this address instead of `listen`;
    /// with TLS only admin certificates may call it.
    pub admin_listen: Option<String>,
    /// Serve the audit blobs over plain HTTP (S3 `ListObjectsV2` layout, `GET /E/PREV/CUR`) on
    /// this address, for akd's and Plexi's auditor tools.
    pub blob_listen: Option<String>,
    /// With TLS: `required` or `optional` (clients without a certificate may read, not
    /// publish).
    pub tls_client_auth: ClientAuth,
    /// How often the shard map is re-read from the sequencer leader (an epoch naming a newer
    /// map, or a read every replica failed, re-reads it at once).
    #[serde(with = "humantime_serde")]
    pub shard_map_refresh: Duration,
    /// TEST ONLY (`--unsafe-test-mode`, never from a file): allow the deliberately broken
    /// modes named by `KTD_UNSAFE_*` variables.
    #[serde(skip)]
    pub unsafe_test_mode: bool,
    /// Metrics, logs, traces and TLS.
    #[serde(flatten, skip_deserializing)]
    pub process: ProcessConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            sequencers: Vec::new(),
            max_in_flight: 1024,
            expensive_reads_per_second: RateLimits::default().per_second,
            expensive_reads_burst: RateLimits::default().burst,
            admin_listen: None,
            blob_listen: None,
            tls_client_auth: ClientAuth::Required,
            shard_map_refresh: GatewayOptions::default().shard_map_refresh,
            unsafe_test_mode: false,
            process: ProcessConfig::default(),
        }
    }
}

impl ServerFile for GatewayConfig {
    const SERVER: &'static str = "gateway";
    fn process_mut(&mut self) -> Option<&mut ProcessConfig> {
        Some(&mut self.process)
    }
}

/// A gateway's validated configuration.
#[derive(Debug)]
pub struct ResolvedGateway {
    /// Address to serve the public API on.
    pub listen: String,
    /// What the server runs with.
    pub settings: GatewaySettings,
    /// `--unsafe-test-mode` was given.
    pub unsafe_test_mode: bool,
}

/// How long a stopping gateway waits for in-flight requests.
const GATEWAY_DRAIN: Duration = Duration::from_secs(10);

/// The per-caller budget of `per_second` and `burst` (both positive and finite).
pub(crate) fn rate_limits(per_second: f64, burst: f64) -> anyhow::Result<RateLimits> {
    for (key, value) in [
        ("expensive_reads_per_second", per_second),
        ("expensive_reads_burst", burst),
    ] {
        if !(value.is_finite() && value > 0.0) {
            anyhow::bail!("{key}: {value} is not a positive number");
        }
    }
    Ok(RateLimits {
        per_second,
        burst,
        ..RateLimits::default()
    })
}

impl GatewayConfig {
    fn rate_limits(&self) -> anyhow::Result<RateLimits> {
        rate_limits(self.expensive_reads_per_second, self.expensive_reads_burst)
    }

    /// Validates the addresses.
    pub fn resolve(&self) -> anyhow::Result<ResolvedGateway> {
        check_address("listen", &self.listen)?;
        if let Some(admin_listen) = &self.admin_listen {
            check_address("admin_listen", admin_listen)?;
        }
        if let Some(blob_listen) = &self.blob_listen {
            check_address("blob_listen", blob_listen)?;
        }
        if self.sequencers.is_empty() {
            anyhow::bail!(
                "sequencers is not set: give --sequencers, KTD_GATEWAY_SEQUENCERS, or `sequencers` in the --config file"
            );
        }
        for addr in &self.sequencers {
            ktd_rpc::security::endpoint(addr)?;
        }
        Ok(ResolvedGateway {
            listen: self.listen.clone(),
            settings: GatewaySettings {
                sequencers: self.sequencers.clone(),
                options: GatewayOptions {
                    max_in_flight: self.max_in_flight,
                    rate_limits: self.rate_limits()?,
                    admin_listen: self.admin_listen.clone(),
                    blob_listen: self.blob_listen.clone(),
                    tls_client_auth_optional: self.tls_client_auth == ClientAuth::Optional,
                    shard_map_refresh: self.shard_map_refresh,
                    ..GatewayOptions::default()
                },
                drain: GATEWAY_DRAIN,
            },
            unsafe_test_mode: self.unsafe_test_mode,
        })
    }
}
