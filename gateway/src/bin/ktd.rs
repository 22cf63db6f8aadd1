//! `ktd`: the product binary. Thin: parse flags, resolve the configuration (defaults < TOML file
//! < environment < flags), bind the listener, then hand over to the server's `run`; or, for the
//! client subcommands, call the gateway through [`gateway::client`].
//!
//! ```text
//! ktd dev                                   # a whole directory on 127.0.0.1:8080, data in ./ktd-dev
//! ktd publish alice key-1 && ktd lookup alice --verify
//! ktd sequencer --id 1 --listen 127.0.0.1:7001 --data-dir /var/lib/ktd/seq1 \
//!     --peers 1=127.0.0.1:7001,2=127.0.0.2:7001,3=127.0.0.3:7001 --init --vrf-public-key HEX \
//!     --shards s1=http://127.0.0.1:7101,s2=http://127.0.0.1:7102
//! ktd shard --id s1 --listen 127.0.0.1:7101 --data-dir /var/lib/ktd/s1 --vrf-seed-file seed.hex
//! ktd gateway --listen 127.0.0.1:8080 --sequencers http://127.0.0.1:7001,http://127.0.0.2:7001
//! KTD_SEQUENCERS=127.0.0.1:7001,127.0.0.2:7001 ktd admin status   # operator CLI (admin_cli)
//! ```
//!
//! Exit status: 0 after a clean shutdown (SIGTERM or SIGINT) or a successful client call, 1 on
//! any error, with the reason on stderr, 2 on a usage error.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use gateway::client::Client;
use gateway::run::{DevSettings, GatewaySettings, ShardSettings};
use gateway::service::GatewayOptions;
use sequencer::SequencerConfig;
use shard::AkdConfig;

#[derive(Debug, Parser)]
#[command(
    name = "ktd",
    version,
    about = "ktd: a sharded, Raft-sequenced key-transparency directory"
)]
struct Cli {
    /// The gateway the client subcommands call.
    #[arg(
        long,
        global = true,
        env = "KTD_ADDR",
        default_value = "http://127.0.0.1:8080"
    )]
    addr: String,
    /// Mutual TLS: the CA bundle peers' certificates must chain to (with --tls-cert and
    /// --tls-key; servers then require client certificates, clients verify servers).
    #[arg(long, global = true, env = "KTD_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Mutual TLS: this process's certificate (PEM); its `urn:ktd:role:*` SAN URIs are its roles.
    #[arg(long, global = true, env = "KTD_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Mutual TLS: this process's private key (PEM, mode 600).
    #[arg(long, global = true, env = "KTD_TLS_KEY")]
    tls_key: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a complete single-machine directory (sequencer, in-process shard, gateway).
    Dev(DevArgs),
    /// Run a sequencer node (Raft-replicated ordering of key updates into epochs).
    Sequencer(SequencerArgs),
    /// Run a shard server (tree partitions and user histories on RocksDB).
    Shard(ShardArgs),
    /// Run a gateway (the public Directory API).
    Gateway(GatewayArgs),
    /// Run an independent auditor: verify every audit blob with stock akd, sign verified heads.
    Auditor(AuditorArgs),
    /// Publish LABEL = VALUE (durable when this returns; visible once its epoch commits).
    Publish {
        /// The label (UTF-8 text; use --hex for bytes).
        label: String,
        /// The value.
        value: String,
        /// Label and value are hex.
        #[arg(long)]
        hex: bool,
        /// Idempotency key: a retry with the same key is applied once.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Wait until the epoch holding the update is committed.
        #[arg(long)]
        wait: bool,
    },
    /// Look LABEL up (latest committed epoch, or --epoch). A label that was never published
    /// is proven absent (exit status 3).
    Lookup(LabelQuery),
    /// The version history of LABEL.
    History {
        #[command(flatten)]
        query: LabelQuery,
        /// Only the N most recent versions (0 = all).
        #[arg(long, default_value_t = 0)]
        most_recent: u64,
    },
    /// The append-only proof from epoch START to END.
    Audit {
        /// First epoch.
        start: u64,
        /// Last epoch.
        end: u64,
        /// Check the proof with stock akd's auditor.
        #[arg(long)]
        verify: bool,
    },
    /// Write every epoch's audit blob (verified) into a directory, as public auditors read them:
    /// DIR/{E}/{hex root E-1}/{hex root E} holds the protobuf SingleAppendOnlyProof of E-1 → E.
    AuditBlobs {
        /// The directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// First end epoch (default: after the newest blob already in --out, else 1).
        #[arg(long)]
        from: Option<u64>,
        /// Keep following new epochs until interrupted.
        #[arg(long)]
        follow: bool,
        /// Retention: keep only the blobs of the newest N epochs in --out (default: all). An
        /// auditor reading the directory must stay less than N epochs behind, or it sees a gap.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        keep: Option<u64>,
    },
    /// The latest committed epoch and root, or epoch N's.
    Epoch {
        /// The epoch.
        epoch: Option<u64>,
        /// Wait until epoch N is committed.
        #[arg(long)]
        wait: bool,
    },
    /// Seal the open epoch now and wait for its root (admin).
    Seal,
    /// Load-test a running directory: open-loop constant-rate publishes and reads, HDR
    /// latency histograms, report (JSON, Markdown, SVG) and an optional baseline comparison.
    Bench(BenchArgs),
    /// Cluster status: sequencer members and leader, epochs, shards (admin).
    Status,
    /// Operator commands against the sequencers' admin service: status table, leader transfer,
    /// add/remove sequencer, seal, snapshot (`ktd admin --help`).
    Admin(gateway::admin_cli::AdminArgs),
    /// Make a development CA and certificates for mutual TLS (ca.pem; node, admin, auditor
    /// and client certificates with their roles; keys mode 600).
    Certs(CertsArgs),
    /// Make a VRF seed: writes 64 hex digits to --out (mode 600), prints the public key.
    Keygen {
        /// Where to write the new seed (never overwrites).
        #[arg(
            long,
            required_unless_present = "public_key_of",
            conflicts_with = "public_key_of"
        )]
        out: Option<PathBuf>,
        /// Print the public key of an existing seed file instead.
        #[arg(long)]
        public_key_of: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
struct CertsArgs {
    /// Directory to write into (created; existing files are never overwritten).
    #[arg(long)]
    out: PathBuf,
    /// Host names and IP addresses the node certificate is valid for, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
    hosts: Vec<String>,
    /// Validity of every certificate (e.g. 90d).
    #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
    valid_for: Duration,
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Operations per second offered (all call types together).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// How long to offer them (e.g. 30s, 5m).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Most operations in flight.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// `publish-only`, `lookup-only`, `90/10` (lookups/publishes) or
    /// `publish=W,lookup=W,history=W,audit=W`.
    #[arg(long, default_value = "90/10")]
    mix: gateway::loadgen::Mix,
    /// Users to load before measuring (batches of 5,000, then one seal).
    #[arg(long, default_value_t = 10_000)]
    preload: u64,
    /// Updates per publish in the measured phase.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Value size, bytes.
    #[arg(long, default_value_t = 32)]
    value_bytes: usize,
    /// Random seed (labels and the mix); also names the users, so runs with different seeds
    /// do not collide.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Directory for report.json, report.md and timeline.svg.
    #[arg(long, default_value = "ktd-bench-report")]
    report: PathBuf,
    /// An earlier report.json to compare with; a regression beyond --max-regression fails.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Allowed regression against the baseline, as a fraction (0.2 = 20%).
    #[arg(long, default_value_t = 0.2)]
    max_regression: f64,
    /// A `ktd auditor`'s gRPC address (http://HOST:PORT) following the same directory: the
    /// report then includes how far the auditor trails the commits (commit → signed head).
    #[arg(long)]
    auditor: Option<String>,
    /// After the run, replay the same per-epoch batches through a stock in-process
    /// `akd::Directory` and report ktd vs akd side by side (epoch processing, lookups).
    #[arg(long)]
    compare_akd: bool,
    /// The directory's VRF seed file: with --compare-akd on a directory that was empty at the
    /// start, every epoch's root is also checked against akd's.
    #[arg(long)]
    vrf_seed_file: Option<PathBuf>,
    /// A local server process to sample for CPU and RSS, NAME=PID (repeatable).
    #[arg(long, value_parser = parse_server_pid)]
    server_pid: Vec<(String, i32)>,
    /// Sample every server whose pid file (NAME.pid) is in DIR, e.g. /tmp/ktd-local (the
    /// local cluster's).
    #[arg(long)]
    server_pid_dir: Option<PathBuf>,
}

fn parse_server_pid(text: &str) -> Result<(String, i32), String> {
    let (name, pid) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected NAME=PID"))?;
    let pid = pid
        .parse::<i32>()
        .ok()
        .filter(|pid| *pid > 0)
        .ok_or_else(|| format!("{text:?}: {pid:?} is not a process id"))?;
    Ok((name.to_string(), pid))
}

/// `NAME.pid` files in `dir` → (NAME, pid).
fn server_pids(dir: &std::path::Path) -> anyhow::Result<Vec<(String, i32)>> {
    let mut servers = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        let Some(name) = path
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.strip_suffix(".pid"))
        else {
            continue;
        };
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        let pid = text
            .trim()
            .parse::<i32>()
            .with_context(|| format!("{}: not a process id", path.display()))?;
        servers.push((name.to_string(), pid));
    }
    servers.sort();
    Ok(servers)
}

/// The Prometheus endpoint of a server process.
#[derive(Debug, Args)]
struct MetricsArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics (off unless given).
    #[arg(long, env = "KTD_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
}

/// Bucket bounds of every `*_seconds` histogram: 100 µs (a WAL fsync on NVMe) to 10 minutes (an
/// epoch seal far past its interval).
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Bucket bounds of `ktd_epoch_updates`: 1 to the 100,000-update default epoch limit and past it.
const UPDATES_BUCKETS: &[f64] = &[
    1.0,
    10.0,
    100.0,
    1_000.0,
    10_000.0,
    50_000.0,
    100_000.0,
    1_000_000.0,
];

impl MetricsArgs {
    fn install(&self) -> anyhow::Result<()> {
        if let Some(addr) = self.metrics_listen {
            use metrics_exporter_prometheus::Matcher;
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(addr)
                // Histograms, not summaries, so alerts and dashboards can aggregate quantiles
                // across processes (`histogram_quantile` over `_bucket`).
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .context("histogram buckets")?
                .set_buckets_for_metric(Matcher::Full("ktd_epoch_updates".into()), UPDATES_BUCKETS)
                .context("histogram buckets")?
                .install()
                .with_context(|| format!("serve metrics on {addr}"))?;
            tracing::info!(%addr, "Prometheus metrics at /metrics");
        }
        Ok(())
    }
}

/// Logs and traces of a server process.
#[derive(Debug, Args)]
struct TelemetryArgs {
    /// Log lines as `text` or `json` (JSON lines carry role, node_id, term and epoch).
    #[arg(long, env = "KTD_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: gateway::telemetry::LogFormat,
    /// Export spans to this OTLP/gRPC collector (e.g. http://127.0.0.1:4317); off unless given.
    #[arg(long, env = "KTD_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Fraction of new traces to record, 0..=1 (a caller's sampled trace is always followed).
    #[arg(long, env = "KTD_TRACE_SAMPLE_RATIO", default_value_t = 0.01)]
    trace_sample_ratio: f64,
}

impl TelemetryArgs {
    fn settings(&self, role: &'static str) -> gateway::telemetry::TelemetrySettings {
        gateway::telemetry::TelemetrySettings {
            role,
            log_format: self.log_format,
            default_filter: "info,openraft=error".to_string(),
            otlp_endpoint: self.otlp_endpoint.clone(),
            sample_ratio: self.trace_sample_ratio,
        }
    }
}

/// A read of one label.
#[derive(Debug, Args)]
struct LabelQuery {
    /// The label.
    label: String,
    /// As of this epoch.
    #[arg(long)]
    epoch: Option<u64>,
    /// The label is hex.
    #[arg(long)]
    hex: bool,
    /// Check the proof with stock akd and print the verified result.
    #[arg(long)]
    verify: bool,
}

#[derive(Debug, Args)]
struct DevArgs {
    /// TOML file of these flags' settings (keys = flag names with `_`); the environment and
    /// flags override it.
    #[arg(long, env = "KTD_DEV_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    metrics: MetricsArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
    /// Address to serve the public API on.
    #[arg(long, env = "KTD_DEV_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// Data directory (created if missing; restart resumes from it).
    #[arg(long, env = "KTD_DEV_DATA_DIR", default_value = "ktd-dev")]
    data_dir: PathBuf,
    /// VRF seed file, 64 hex digits (default: DATA_DIR/vrf-seed.hex, generated if missing).
    #[arg(long, env = "KTD_DEV_VRF_SEED_FILE")]
    vrf_seed_file: Option<PathBuf>,
    /// Seal a non-empty epoch this often (e.g. 1s, 500ms, 2m).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    epoch_interval: Duration,
    /// Seal an empty "heartbeat" epoch after this long without updates (off by default).
    #[arg(long, value_parser = humantime::parse_duration)]
    heartbeat_interval: Option<Duration>,
    /// Tree partition bits (2^k partitions).
    #[arg(long, default_value_t = 4)]
    partition_bits: u8,
    /// `whatsapp_v1` or `experimental:<domain label>`.
    #[arg(long, default_value = "whatsapp_v1")]
    configuration: AkdConfig,
    /// Requests served at once before RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 1024)]
    max_in_flight: usize,
}

#[derive(Debug, Args)]
struct ShardArgs {
    /// TOML file of these flags' settings (keys = flag names with `_`); the environment and
    /// flags override it.
    #[arg(long, env = "KTD_SHARD_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    metrics: MetricsArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
    /// This shard's id in the shard map.
    #[arg(long, env = "KTD_SHARD_ID")]
    id: String,
    /// Address to listen on.
    #[arg(long, env = "KTD_SHARD_LISTEN")]
    listen: String,
    /// The data directory.
    #[arg(long, env = "KTD_SHARD_DATA_DIR")]
    data_dir: PathBuf,
    /// The directory's VRF seed file (64 hex digits, mode 600).
    #[arg(long, env = "KTD_SHARD_VRF_SEED_FILE")]
    vrf_seed_file: PathBuf,
    /// Tree partition bits (must match the cluster's).
    #[arg(long, default_value_t = 4)]
    partition_bits: u8,
    /// `whatsapp_v1` or `experimental:<domain label>` (must match the cluster's).
    #[arg(long, default_value = "whatsapp_v1")]
    configuration: AkdConfig,
    /// Sequencer addresses, comma-separated: the shard tails their log to evaluate VRF labels
    /// while epochs are open (without it, labels are evaluated when an epoch is built).
    #[arg(long, env = "KTD_SHARD_SEQUENCERS", value_delimiter = ',')]
    sequencers: Vec<String>,
    /// Validate the settings (listen address, partition bits, the VRF seed file's length and
    /// permissions), print them with the seed redacted and exit: 0 if valid, 1 if not.
    #[arg(long)]
    check_config: bool,
}

#[derive(Debug, Args)]
struct AuditorArgs {
    /// TOML file of these flags' settings (keys = flag names with `_`); the environment and
    /// flags override it.
    #[arg(long, env = "KTD_AUDITOR_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    metrics: MetricsArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
    /// The namespace signed into every head.
    #[arg(long, default_value = "ktd.key-transparency.v1")]
    namespace: String,
    /// Where verified heads and violations are kept (a restart resumes from it).
    #[arg(long)]
    data_dir: PathBuf,
    /// Ed25519 signing key file, 64 hex digits, mode 600 (`ktd keygen --out FILE` makes one).
    #[arg(long)]
    signing_key_file: PathBuf,
    /// Follow this gateway's audit blobs (http://HOST:PORT).
    #[arg(
        long,
        conflicts_with = "blob_dir",
        required_unless_present = "blob_dir"
    )]
    gateway: Option<String>,
    /// Or read blobs from a directory written by `ktd audit-blobs`.
    #[arg(long)]
    blob_dir: Option<PathBuf>,
    /// The directory's akd configuration.
    #[arg(long, default_value = "whatsapp_v1")]
    configuration: AkdConfig,
    /// The trusted start, EPOCH/HEX_ROOT (default: epoch 0, the empty directory).
    #[arg(long)]
    start: Option<String>,
    /// gRPC address (ktd.auditor.v1.Auditor).
    #[arg(long, default_value = "127.0.0.1:9090")]
    listen: String,
    /// HTTP address (dashboard at /, JSON API).
    #[arg(long, default_value = "127.0.0.1:9091")]
    http_listen: String,
    /// How often to look for new blobs when caught up.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    poll: Duration,
}

#[derive(Debug, Args)]
struct GatewayArgs {
    /// TOML file of these flags' settings (keys = flag names with `_`); the environment and
    /// flags override it.
    #[arg(long, env = "KTD_GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the settings (file < environment < flags), print them and exit: 0 if valid,
    /// 1 with one error line if not.
    #[arg(long)]
    check_config: bool,
    #[command(flatten)]
    metrics: MetricsArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
    /// Address to serve the public API on.
    #[arg(long, env = "KTD_GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// Sequencer addresses, comma-separated (any member; the client follows the leader).
    #[arg(
        long,
        env = "KTD_GATEWAY_SEQUENCERS",
        value_delimiter = ',',
        required = true
    )]
    sequencers: Vec<String>,
    /// Requests served at once before RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 1024)]
    max_in_flight: usize,
    /// Serve the Admin service (seal, cluster status) on this address instead of --listen;
    /// with TLS only admin certificates may call it.
    #[arg(long, env = "KTD_GATEWAY_ADMIN_LISTEN")]
    admin_listen: Option<String>,
    /// With TLS: `required` (default) or `optional` (clients without a certificate may read,
    /// not publish).
    #[arg(long, env = "KTD_GATEWAY_TLS_CLIENT_AUTH", default_value = "required", value_parser = ["required", "optional"])]
    tls_client_auth: String,
    /// TEST ONLY: allow the deliberately broken modes named by KTD_UNSAFE_* variables (the
    /// chaos positive controls). Without it, any such variable is refused.
    #[arg(long, hide = true)]
    unsafe_test_mode: bool,
}

#[derive(Debug, Args)]
struct SequencerArgs {
    #[command(flatten)]
    metrics: MetricsArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
    /// TOML configuration file; flags and environment variables override it.
    #[arg(long, env = "KTD_SEQUENCER_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration (file < environment < flags), print the effective
    /// configuration as TOML and exit: 0 if valid, 1 with one error line if not.
    #[arg(long)]
    check_config: bool,
    /// This node's id (required for a new data directory; must match an existing one).
    #[arg(long, env = "KTD_SEQUENCER_ID")]
    id: Option<u64>,
    /// Address to listen on (Raft, API, admin and health share it).
    #[arg(long, env = "KTD_SEQUENCER_LISTEN")]
    listen: Option<String>,
    /// Address peers and clients use to reach this node (default: --listen).
    #[arg(long, env = "KTD_SEQUENCER_ADVERTISE")]
    advertise: Option<String>,
    /// The data directory.
    #[arg(long, env = "KTD_SEQUENCER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Initial members, ID=HOST:PORT, comma-separated (used with --init).
    #[arg(long, env = "KTD_SEQUENCER_PEERS", value_delimiter = ',')]
    peers: Vec<String>,
    /// Dial peer ID at HOST:PORT instead of its membership address, ID=HOST:PORT,
    /// comma-separated or repeated (fault proxies, tunnels; this node only).
    #[arg(long, env = "KTD_SEQUENCER_PEER_OVERRIDES", value_delimiter = ',')]
    peer_override: Vec<String>,
    /// Bootstrap a new cluster from --peers (ignored if the data directory is initialised).
    #[arg(long)]
    init: bool,
    /// The directory's VRF public key, 64 hex digits (recorded at --init).
    #[arg(long, env = "KTD_SEQUENCER_VRF_PUBLIC_KEY")]
    vrf_public_key: Option<String>,
    /// Initial shard map, ID=URL comma-separated (recorded at --init).
    #[arg(long, env = "KTD_SEQUENCER_SHARDS", value_delimiter = ',')]
    shards: Vec<String>,
    /// Tree partition bits (recorded at --init).
    #[arg(long)]
    partition_bits: Option<u32>,
    /// `whatsapp_v1` or `experimental:<domain label>` (recorded at --init).
    #[arg(long)]
    configuration: Option<AkdConfig>,
    /// Seal a non-empty open epoch this often (e.g. 1s, 2m).
    #[arg(long, value_parser = humantime::parse_duration)]
    epoch_interval: Option<Duration>,
    /// Seal an empty "heartbeat" epoch after this long without updates (default: never).
    #[arg(long, value_parser = humantime::parse_duration)]
    heartbeat_interval: Option<Duration>,
    /// Seal when the open epoch holds this many updates (recorded at --init).
    #[arg(long)]
    max_epoch_updates: Option<u64>,
}

impl SequencerArgs {
    fn resolve(self) -> anyhow::Result<SequencerConfig> {
        let mut config = match &self.config {
            Some(path) => SequencerConfig::from_file(path)?,
            None => SequencerConfig::default(),
        };
        if let Some(id) = self.id {
            config.id = Some(id);
        }
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(advertise) = self.advertise {
            config.advertise = Some(advertise);
        }
        if let Some(data_dir) = self.data_dir {
            config.data_dir = data_dir;
        }
        if !self.peers.is_empty() {
            config.peers = self.peers;
        }
        if !self.peer_override.is_empty() {
            config.peer_overrides = self.peer_override;
        }
        if let Some(key) = self.vrf_public_key {
            config.cluster.vrf_public_key = key;
        }
        if !self.shards.is_empty() {
            config.cluster.shards = self.shards;
        }
        if let Some(bits) = self.partition_bits {
            config.cluster.partition_bits = bits;
        }
        if let Some(configuration) = self.configuration {
            config.cluster.akd_configuration = configuration.to_string();
        }
        if let Some(interval) = self.epoch_interval {
            config.epoch.interval = interval;
        }
        if let Some(interval) = self.heartbeat_interval {
            config.epoch.heartbeat_interval = Some(interval);
        }
        if let Some(max) = self.max_epoch_updates {
            config.cluster.max_epoch_updates = max;
            config.epoch.max_batch_updates = config.epoch.max_batch_updates.min(max as usize);
        }
        config.init = self.init;
        config.validate()?;
        Ok(config)
    }
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = interrupt.recv() => tracing::info!("SIGINT received"),
    }
}

async fn run_sequencer(args: SequencerArgs) -> anyhow::Result<()> {
    if args.check_config {
        let config = args.resolve()?;
        print!(
            "# effective configuration (valid)\n{}",
            toml::to_string(&config).context("print the configuration")?
        );
        return Ok(());
    }
    args.metrics.install()?;
    let config = args.resolve()?;
    proto::telemetry::log_context().set_node(
        "sequencer",
        config
            .id
            .map_or_else(|| "new".to_string(), |id| id.to_string()),
    );
    tracing::info!(config = ?config, "effective configuration");
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("bind {}", config.listen))?;
    sequencer::run(config, listener, shutdown_signal()).await?;
    Ok(())
}

async fn run_dev(args: DevArgs) -> anyhow::Result<()> {
    args.metrics.install()?;
    proto::telemetry::log_context().set_node("dev", args.listen.clone());
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    let settings = DevSettings {
        data_dir: args.data_dir.clone(),
        vrf_seed_file: args.vrf_seed_file,
        epoch_interval: args.epoch_interval,
        heartbeat_interval: args.heartbeat_interval,
        partition_bits: args.partition_bits,
        config: args.configuration,
        options: GatewayOptions {
            max_in_flight: args.max_in_flight,
            ..GatewayOptions::default()
        },
    };
    let data_dir = args.data_dir;
    gateway::run::run_dev(settings, listener, shutdown_signal(), move |addr| {
        println!(
            "ktd dev: serving the Directory API on http://{addr} (data in {})",
            data_dir.display()
        );
        println!(
            "try:     ktd --addr http://{addr} publish alice key-1 --wait && ktd --addr http://{addr} lookup alice --verify"
        );
    })
    .await
}

async fn run_shard(args: ShardArgs) -> anyhow::Result<()> {
    if args.check_config {
        let seed = gateway::run::read_vrf_seed(&args.vrf_seed_file)?;
        args.listen
            .parse::<std::net::SocketAddr>()
            .with_context(|| format!("--listen {:?}", args.listen))?;
        anyhow::ensure!(
            args.partition_bits <= shard::directory::MAX_PARTITION_BITS,
            "--partition-bits {} is above the maximum of {}",
            args.partition_bits,
            shard::directory::MAX_PARTITION_BITS
        );
        println!(
            "# effective settings (valid)\nid = {:?}\nlisten = {:?}\ndata_dir = {:?}\n\
             vrf_seed_file = {:?} # seed redacted; public key {}\npartition_bits = {}\n\
             configuration = {:?}\nsequencers = {:?}",
            args.id,
            args.listen,
            args.data_dir.display().to_string(),
            args.vrf_seed_file.display().to_string(),
            hex::encode(gateway::run::vrf_public_key(&seed)?),
            args.partition_bits,
            args.configuration.to_string(),
            args.sequencers,
        );
        return Ok(());
    }
    args.metrics.install()?;
    proto::telemetry::log_context().set_node("shard", args.id.clone());
    let settings = ShardSettings {
        vrf_seed: gateway::run::read_vrf_seed(&args.vrf_seed_file)?,
        id: args.id,
        data_dir: args.data_dir,
        partition_bits: args.partition_bits,
        config: args.configuration,
        sequencers: args.sequencers,
    };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    gateway::run::run_shard(settings, listener, shutdown_signal()).await
}

async fn run_auditor(args: AuditorArgs) -> anyhow::Result<()> {
    args.metrics.install()?;
    proto::telemetry::log_context().set_node("auditor", args.listen.clone());
    let start = match &args.start {
        None => None,
        Some(text) => {
            let (epoch, root) = text
                .split_once('/')
                .context("--start must be EPOCH/HEX_ROOT")?;
            let root: [u8; 32] = hex::decode(root)
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
                .context("--start: the root must be 64 hex digits")?;
            Some((epoch.parse().context("--start: bad epoch")?, root))
        }
    };
    let source = match (args.gateway, args.blob_dir) {
        (Some(gateway), _) => gateway::auditor::BlobSource::Gateway(gateway),
        (None, Some(dir)) => gateway::auditor::BlobSource::Directory(dir),
        (None, None) => bail!("give --gateway URL or --blob-dir DIR"),
    };
    let settings = gateway::auditor::AuditorSettings {
        namespace: args.namespace,
        data_dir: args.data_dir,
        signing_key: gateway::run::read_secret_file(&args.signing_key_file, "signing key file")?,
        config: args.configuration,
        start,
        source,
        poll: args.poll,
    };
    let grpc = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    let http = tokio::net::TcpListener::bind(&args.http_listen)
        .await
        .with_context(|| format!("bind {}", args.http_listen))?;
    gateway::auditor_server::run(settings, grpc, http, shutdown_signal()).await
}

async fn run_gateway(args: GatewayArgs) -> anyhow::Result<()> {
    if args.check_config {
        for addr in std::iter::once(&args.listen).chain(args.admin_listen.as_ref()) {
            addr.parse::<std::net::SocketAddr>()
                .with_context(|| format!("listen address {addr:?}"))?;
        }
        for addr in &args.sequencers {
            proto::security::endpoint(addr)?;
        }
        println!(
            "# effective settings (valid)\nlisten = {:?}\nadmin_listen = {:?}\nsequencers = {:?}\n\
             max_in_flight = {}\ntls_client_auth = {:?}",
            args.listen,
            args.admin_listen,
            args.sequencers,
            args.max_in_flight,
            args.tls_client_auth,
        );
        return Ok(());
    }
    args.metrics.install()?;
    proto::telemetry::log_context().set_node("gateway", args.listen.clone());
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    // Deliberately broken mode, test-only: stale latest-epoch lookups (see
    // `GatewayOptions::unsafe_stale_reads`). Refused without --unsafe-test-mode.
    let unsafe_stale_reads = match std::env::var("KTD_UNSAFE_STALE_READS") {
        Err(std::env::VarError::NotPresent) => None,
        Err(error) => bail!("KTD_UNSAFE_STALE_READS: {error}"),
        Ok(_) if !args.unsafe_test_mode => bail!(
            "KTD_UNSAFE_STALE_READS is set: it makes the gateway serve stale reads (a deliberately \
             broken mode for chaos tests); refusing to start without --unsafe-test-mode"
        ),
        Ok(value) => {
            let max_age = humantime::parse_duration(&value).with_context(|| {
                format!("KTD_UNSAFE_STALE_READS={value:?} (a duration, e.g. 3s)")
            })?;
            eprintln!(
                "ktd gateway: UNSAFE TEST MODE: latest-epoch lookups are served from a view up to {value} old (stale reads)"
            );
            Some(max_age)
        }
    };
    let settings = GatewaySettings {
        sequencers: args.sequencers,
        options: GatewayOptions {
            max_in_flight: args.max_in_flight,
            unsafe_stale_reads,
            admin_listen: args.admin_listen,
            tls_client_auth_optional: args.tls_client_auth == "optional",
            ..GatewayOptions::default()
        },
        drain: Duration::from_secs(10),
    };
    gateway::run::run_gateway(settings, listener, shutdown_signal()).await
}

fn bytes(text: &str, is_hex: bool) -> anyhow::Result<Vec<u8>> {
    if is_hex {
        hex::decode(text).with_context(|| format!("{text:?} is not hex"))
    } else {
        Ok(text.as_bytes().to_vec())
    }
}

fn show(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) if !text.chars().any(char::is_control) => format!("{text:?}"),
        _ => format!("0x{}", hex::encode(bytes)),
    }
}

/// The newest end epoch among the blobs already in `out` (names `E/…/…`).
fn newest_blob(out: &std::path::Path) -> Option<u64> {
    std::fs::read_dir(out)
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
}

/// Deletes the blob directories of all but the newest `keep` epochs in `out` (only directories
/// named by an epoch number; anything else is left alone).
fn prune_blobs(out: &std::path::Path, keep: u64) -> anyhow::Result<()> {
    let mut epochs: Vec<u64> = std::fs::read_dir(out)
        .with_context(|| format!("read {}", out.display()))?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            entry.file_type().ok()?.is_dir().then_some(())?;
            entry.file_name().to_str()?.parse().ok()
        })
        .collect();
    epochs.sort_unstable();
    let excess = epochs.len().saturating_sub(keep as usize);
    for epoch in &epochs[..excess] {
        let dir = out.join(epoch.to_string());
        std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
        println!("pruned epoch {epoch} (retention: newest {keep})");
    }
    Ok(())
}

async fn write_audit_blobs(
    client: &Client,
    out: &std::path::Path,
    from: Option<u64>,
    follow: bool,
    keep: Option<u64>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let mut next = from.unwrap_or_else(|| newest_blob(out).map_or(1, |newest| newest + 1));
    loop {
        let (names, latest) = client.audit_blob_names(next, 100).await?;
        for name in &names {
            let blob = client.audit_blob(name).await?;
            let path = out.join(name);
            let parent = path.parent().context("blob path")?;
            std::fs::create_dir_all(parent)
                .with_context(|| format!("create {}", parent.display()))?;
            // Write-then-rename, so a reader never sees half a blob.
            let partial = parent.join(".partial");
            std::fs::write(&partial, &blob.bytes)
                .with_context(|| format!("write {}", partial.display()))?;
            std::fs::rename(&partial, &path)
                .with_context(|| format!("rename to {}", path.display()))?;
            println!("{name} ({} bytes, verified)", blob.bytes.len());
            next = blob.epoch + 1;
        }
        if let Some(keep) = keep {
            prune_blobs(out, keep)?;
        }
        if next <= latest {
            continue;
        }
        if !follow {
            return Ok(());
        }
        // Wait (bounded per call) for the next epoch to commit.
        let _ = tokio::time::timeout(Duration::from_secs(60), client.wait_for_epoch(next)).await;
    }
}

async fn run_client(addr: &str, command: Command) -> anyhow::Result<()> {
    if let Command::Certs(args) = &command {
        for file in gateway::certs::write_dev_ca(&args.out, &args.hosts, args.valid_for)? {
            println!("wrote {}", file.display());
        }
        return Ok(());
    }
    if let Command::Keygen { out, public_key_of } = &command {
        let seed = match (out, public_key_of) {
            (_, Some(existing)) => gateway::run::read_vrf_seed(existing)?,
            (Some(out), None) => gateway::run::write_new_vrf_seed(out)?,
            (None, None) => bail!("keygen needs --out FILE or --public-key-of FILE"),
        };
        println!("{}", hex::encode(gateway::run::vrf_public_key(&seed)?));
        return Ok(());
    }
    let client = Client::connect(addr).await?;
    match command {
        Command::Publish {
            label,
            value,
            hex,
            idempotency_key,
            wait,
        } => {
            let published = client
                .publish(
                    vec![(bytes(&label, hex)?, bytes(&value, hex)?)],
                    idempotency_key,
                )
                .await?;
            println!(
                "published: sealed in epoch {} (sequence {})",
                published.epoch, published.sequence
            );
            if wait {
                let root = client.wait_for_epoch(published.epoch).await?;
                println!(
                    "committed: epoch {} root {}",
                    root.epoch,
                    hex::encode(root.root_hash)
                );
            }
        }
        Command::Lookup(LabelQuery {
            label,
            epoch,
            hex,
            verify,
        }) => {
            let found = match client
                .lookup_or_absence(&bytes(&label, hex)?, epoch)
                .await?
            {
                Ok(found) => found,
                Err(absent) => {
                    println!(
                        "{label}: never published as of epoch {}; absence proof verified against root {} ({} proof bytes)",
                        absent.at.epoch,
                        hex::encode(absent.at.root_hash),
                        absent.proof_bytes
                    );
                    std::process::exit(NOT_FOUND_EXIT);
                }
            };
            // The client library always verifies; --verify makes that explicit in the output.
            let how = if verify {
                "verified with akd + strict checks"
            } else {
                "proof verified"
            };
            println!(
                "{} = {} (version {}, published in epoch {}); {how} against epoch {} root {} ({} proof bytes)",
                label,
                show(&found.value),
                found.version,
                found.epoch,
                found.at.epoch,
                hex::encode(found.at.root_hash),
                found.proof_bytes
            );
        }
        Command::History {
            query:
                LabelQuery {
                    label,
                    epoch,
                    hex,
                    verify,
                },
            most_recent,
        } => {
            let (at, versions) = client
                .history(&bytes(&label, hex)?, most_recent, epoch)
                .await?;
            let how = if verify {
                "verified with akd + strict checks"
            } else {
                "proof verified"
            };
            println!(
                "{label}: {} version(s); {how} against epoch {} root {}",
                versions.len(),
                at.epoch,
                hex::encode(at.root_hash)
            );
            for version in versions {
                println!(
                    "  version {} (epoch {}): {}",
                    version.version,
                    version.epoch,
                    show(&version.value)
                );
            }
        }
        Command::Audit { start, end, verify } => {
            let audit = client.audit(start, end).await?;
            let how = if verify {
                "verified with akd::auditor::audit_verify"
            } else {
                "proof verified"
            };
            println!(
                "epochs {start}..={end} are append-only ({how}; {} proof bytes)",
                audit.proof_bytes
            );
            for root in audit.roots {
                println!(
                    "  epoch {} root {}",
                    root.epoch,
                    hex::encode(root.root_hash)
                );
            }
        }
        Command::AuditBlobs {
            out,
            from,
            follow,
            keep,
        } => {
            write_audit_blobs(&client, &out, from, follow, keep).await?;
        }
        Command::Epoch { epoch, wait } => {
            let root = match (epoch, wait) {
                (Some(epoch), true) => client.wait_for_epoch(epoch).await?,
                (epoch, false) => client.epoch(epoch).await?,
                (None, true) => bail!("--wait needs an epoch number"),
            };
            println!("epoch {} root {}", root.epoch, hex::encode(root.root_hash));
        }
        Command::Seal => {
            let root = client.seal().await?;
            println!(
                "sealed and committed epoch {} root {}",
                root.epoch,
                hex::encode(root.root_hash)
            );
        }
        Command::Bench(args) => {
            let settings = gateway::loadgen::BenchSettings {
                rate: args.rate,
                duration: args.duration,
                concurrency: args.concurrency,
                mix: args.mix,
                preload: args.preload,
                batch: args.batch.max(1),
                value_bytes: args.value_bytes,
                seed: args.seed,
                auditor: args.auditor.clone(),
                servers: {
                    let mut servers = args.server_pid.clone();
                    if let Some(dir) = &args.server_pid_dir {
                        servers.extend(server_pids(dir)?);
                    }
                    servers
                },
            };
            let seed = match &args.vrf_seed_file {
                Some(path) => Some(gateway::run::read_vrf_seed(path)?),
                None => None,
            };
            let recording: Option<gateway::loadgen::Recording> =
                args.compare_akd.then(Default::default);
            let users = gateway::loadgen::preload(&client, &settings, recording.as_ref()).await?;
            let (mut report, timeline) =
                gateway::loadgen::run(&client, &settings, users, recording.clone()).await?;
            if let Some(recording) = recording {
                eprintln!("replaying the same batches through a stock akd directory...");
                let published = recording.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let seal_ms = report
                    .epochs
                    .iter()
                    .map(|epoch| (epoch.epoch, epoch.seal_ms))
                    .collect();
                report.compare_akd =
                    Some(gateway::compare_akd::compare(&client, &published, &seal_ms, seed).await?);
            }
            gateway::loadgen::write_report(&args.report, &report, &timeline)?;
            print!("{}", gateway::loadgen::markdown(&report));
            println!("report: {}", args.report.join("report.json").display());
            if let Some(baseline) = &args.baseline {
                let text = std::fs::read_to_string(baseline)
                    .with_context(|| format!("read {}", baseline.display()))?;
                let baseline: gateway::loadgen::Report = serde_json::from_str(&text)
                    .with_context(|| format!("{} is not a ktd bench report", baseline.display()))?;
                let regressions =
                    gateway::loadgen::compare(&report, &baseline, args.max_regression);
                if !regressions.is_empty() {
                    bail!(
                        "regression against the baseline: {}",
                        regressions.join("; ")
                    );
                }
                println!("no regression against {}", args.report.display());
            }
        }
        Command::Status => {
            let status = client.cluster_status().await?;
            if let Some(sequencer) = &status.sequencer {
                println!(
                    "sequencer: leader {} term {}; open epoch {}, last committed epoch {}",
                    sequencer.leader_id,
                    sequencer.term,
                    sequencer.open_epoch,
                    sequencer.last_committed_epoch
                );
                for member in &sequencer.members {
                    let state = match &member.status {
                        Some(node) => format!(
                            "{}, term {}, applied index {}",
                            node.state, node.term, node.applied_index
                        ),
                        None => format!("unreachable: {}", member.error),
                    };
                    let role = if member.voter { "voter" } else { "learner" };
                    println!(
                        "  node {} at {} ({role}): {state}",
                        member.node_id, member.address
                    );
                }
            }
            for shard in &status.shards {
                println!(
                    "shard {} at {}: {} partitions, built epoch {}, {} pre-computed VRF labels, {}",
                    shard.shard_id,
                    shard.address,
                    shard.partitions.len(),
                    shard.built_epoch,
                    shard.precomputed_labels,
                    if shard.reachable {
                        "reachable".to_string()
                    } else {
                        format!("UNREACHABLE: {}", shard.error)
                    }
                );
            }
        }
        server @ (Command::Dev(_)
        | Command::Sequencer(_)
        | Command::Shard(_)
        | Command::Gateway(_)
        | Command::Auditor(_)
        | Command::Admin(_)
        | Command::Certs(_)
        | Command::Keygen { .. }) => bail!("{server:?} is not a client command"),
    }
    Ok(())
}

/// Exit status of `ktd lookup` for a label proven absent.
const NOT_FOUND_EXIT: i32 = 3;

/// Subcommands whose settings may also come from a `--config` TOML file.
const CONFIG_FILE_SUBCOMMANDS: [&str; 4] = ["shard", "gateway", "dev", "auditor"];

/// Parses the command line; a `--config` file's keys become flags wherever neither the command
/// line nor the environment set them (defaults < file < environment < flags). Errors are one
/// line.
fn parse_cli() -> Result<Cli, String> {
    use clap::{CommandFactory, parser::ValueSource};
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // A lenient first pass finds the file (required flags may be in it); without one, the
    // normal parse (with --help, usage errors and exit codes).
    let Ok(matches) = Cli::command()
        .ignore_errors(true)
        .try_get_matches_from(&argv)
    else {
        // --help, --version and usage errors: clap's own output and exit status.
        return Ok(Cli::parse_from(argv));
    };
    let config = matches.subcommand().and_then(|(name, sub)| {
        CONFIG_FILE_SUBCOMMANDS
            .iter()
            .find(|candidate| **candidate == name)
            .zip(sub.try_get_one::<PathBuf>("config").ok().flatten())
    });
    let Some((name, path)) = config else {
        return Ok(Cli::parse_from(argv));
    };
    let (name, path) = (*name, path.as_path());
    let text = std::fs::read_to_string(path)
        .map_err(|error| format!("config file {}: {error}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|error: toml::de::Error| format!("{}: {}", path.display(), error.message()))?;
    let mut command = Cli::command();
    // Propagates the global flags (TLS) into the subcommand, so the file may set them too.
    command.build();
    let subcommand = command
        .find_subcommand(name)
        .ok_or_else(|| format!("no subcommand {name}"))?;
    let sub_matches = matches
        .subcommand_matches(name)
        .ok_or_else(|| format!("no subcommand {name}"))?;
    let mut extra: Vec<String> = Vec::new();
    for (key, value) in &table {
        let arg = subcommand
            .get_arguments()
            .find(|arg| arg.get_id() == key.as_str() && arg.get_long().is_some())
            .filter(|_| !matches!(key.as_str(), "config" | "check_config"))
            .ok_or_else(|| format!("{}: unknown key {key:?}", path.display()))?;
        if matches!(
            sub_matches.value_source(key),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let flag = format!("--{}", arg.get_long().unwrap_or(key));
        let takes_value = arg.get_action().takes_values();
        let scalar = |value: &toml::Value| match value {
            toml::Value::String(text) => Ok(text.clone()),
            toml::Value::Integer(number) => Ok(number.to_string()),
            toml::Value::Float(number) => Ok(number.to_string()),
            other => Err(format!(
                "{}: {key}: expected a string or number, got {}",
                path.display(),
                other.type_str()
            )),
        };
        match value {
            toml::Value::Boolean(set) if !takes_value => {
                if *set {
                    extra.push(flag);
                }
            }
            toml::Value::Array(items) if takes_value => {
                for item in items {
                    extra.push(flag.clone());
                    extra.push(scalar(item)?);
                }
            }
            value if takes_value => {
                extra.push(flag);
                extra.push(scalar(value)?);
            }
            other => {
                return Err(format!(
                    "{}: {key}: expected true or false, got {}",
                    path.display(),
                    other.type_str()
                ));
            }
        }
    }
    let argv = argv.into_iter().chain(extra.into_iter().map(Into::into));
    Cli::try_parse_from(argv).map_err(|error| {
        let rendered = error.to_string();
        let first = rendered.lines().next().unwrap_or_default();
        format!(
            "{}: {}",
            path.display(),
            first.trim_start_matches("error: ")
        )
    })
}

fn main() -> std::process::ExitCode {
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(error) => {
            eprintln!("error: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // Servers log their progress (and may export traces); client commands print results and
    // only log problems.
    let telemetry = match &cli.command {
        Command::Dev(args) => Some(args.telemetry.settings("dev")),
        Command::Sequencer(args) => Some(args.telemetry.settings("sequencer")),
        Command::Shard(args) => Some(args.telemetry.settings("shard")),
        Command::Gateway(args) => Some(args.telemetry.settings("gateway")),
        Command::Auditor(args) => Some(args.telemetry.settings("auditor")),
        _ => {
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
                )
                .init();
            None
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // Inside the runtime: the OTLP exporter's channel lives on it.
        let _telemetry = match telemetry.as_ref().map(gateway::telemetry::init) {
            Some(Ok(guard)) => Some(guard),
            Some(Err(error)) => return Err(anyhow::anyhow!("telemetry: {error}")),
            None => None,
        };
        if let Some(paths) = proto::security::TlsPaths::from_parts(
            cli.tls_ca.clone(),
            cli.tls_cert.clone(),
            cli.tls_key.clone(),
        )? {
            let material = proto::security::TlsMaterial::load(&paths)?;
            proto::security::install(&material);
            tracing::info!(roles = ?material.roles(), "mutual TLS on");
        }
        match cli.command {
            Command::Dev(args) => run_dev(args).await,
            Command::Sequencer(args) => run_sequencer(args).await,
            Command::Shard(args) => run_shard(args).await,
            Command::Gateway(args) => run_gateway(args).await,
            Command::Auditor(args) => run_auditor(args).await,
            Command::Admin(args) => {
                if args.sequencers.is_empty() {
                    use clap::CommandFactory;
                    Cli::command()
                        .error(
                            clap::error::ErrorKind::MissingRequiredArgument,
                            "ktd admin needs the sequencers: --sequencers HOST:PORT,... or KTD_SEQUENCERS",
                        )
                        .exit();
                }
                gateway::admin_cli::run(args).await.map_err(anyhow::Error::from)
            }
            command => run_client(&cli.addr, command).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            match error.downcast_ref::<tonic::Status>() {
                Some(status) => eprintln!("error: {:?}: {}", status.code(), status.message()),
                None => eprintln!("error: {error:#}"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}
