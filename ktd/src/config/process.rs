//! The settings every server process shares — metrics, logs, traces and mutual TLS — with the
//! same keys in every server's file (`metrics_listen`, `log_format`, `otlp_endpoint`,
//! `trace_sample_ratio`, `tls_ca`, `tls_cert`, `tls_key`), the same `KTD_*` variables and the
//! same flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use ktd_rpc::security::{SecurityError, TlsPaths};
use serde::{Deserialize, Serialize};

use crate::telemetry::{LogFormat, TelemetrySettings};

/// Metrics, logs, traces and TLS of one server process. In a server's file its keys sit at the
/// top level beside the server's own (the loader moves them here, see [`super::load`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessConfig {
    /// Serve Prometheus metrics at `http://ADDR/metrics` (off unless set).
    pub metrics_listen: Option<SocketAddr>,
    /// Log lines as `text` or `json` (JSON lines carry role, node_id, term and epoch).
    pub log_format: LogFormat,
    /// Export spans to this OTLP/gRPC collector (e.g. `http://127.0.0.1:4317`); off unless set.
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces to record, 0..=1 (a caller's sampled trace is followed, up to 10 per second).
    pub trace_sample_ratio: f64,
    /// Mutual TLS: the CA bundle peers' certificates must chain to (with `tls_cert` and
    /// `tls_key`; off unless all three are set).
    pub tls_ca: Option<PathBuf>,
    /// Mutual TLS: this process's certificate (PEM); its `urn:ktd:role:*` SAN URIs are its roles.
    pub tls_cert: Option<PathBuf>,
    /// Mutual TLS: this process's private key (PEM, mode 600).
    pub tls_key: Option<PathBuf>,
}

/// The keys of [`ProcessConfig`], as they appear in every server's file.
pub const PROCESS_KEYS: [&str; 7] = [
    "metrics_listen",
    "log_format",
    "otlp_endpoint",
    "trace_sample_ratio",
    "tls_ca",
    "tls_cert",
    "tls_key",
];

impl Default for ProcessConfig {
    fn default() -> Self {
        Self {
            metrics_listen: None,
            log_format: LogFormat::Text,
            otlp_endpoint: None,
            trace_sample_ratio: 0.01,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
        }
    }
}

impl ProcessConfig {
    /// The telemetry settings of a server of `role`.
    pub fn telemetry(&self, role: &'static str) -> TelemetrySettings {
        TelemetrySettings {
            role,
            log_format: self.log_format,
            default_filter: "info,openraft=error".to_string(),
            otlp_endpoint: self.otlp_endpoint.clone(),
            sample_ratio: self.trace_sample_ratio,
        }
    }

    /// The TLS material's paths: `Some` when all three are set, `None` when none is, an error
    /// otherwise.
    pub fn tls_paths(&self) -> Result<Option<TlsPaths>, SecurityError> {
        TlsPaths::from_parts(
            self.tls_ca.clone(),
            self.tls_cert.clone(),
            self.tls_key.clone(),
        )
    }

    /// Serves Prometheus metrics if `metrics_listen` is set.
    pub fn install_metrics(&self) -> anyhow::Result<()> {
        match self.metrics_listen {
            Some(addr) => crate::telemetry::serve_prometheus(addr),
            None => Ok(()),
        }
    }
}
