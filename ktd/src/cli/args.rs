//! The `ktd` command line as clap types: every subcommand and its flags. Parsing (with
//! `--config` files) is [`super::parse`]; what each subcommand does is [`super::servers`] and
//! [`super::client_cmds`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ktd_core::AkdConfig;
use shard::lookup_proofs::LookupProofs;

/// The `ktd` command line.
#[derive(Debug, Parser)]
#[command(
    name = "ktd",
    version,
    about = "ktd: a sharded, Raft-sequenced key-transparency directory"
)]
pub struct Cli {
    /// The gateway the client subcommands call.
    #[arg(
        long,
        global = true,
        env = "KTD_ADDR",
        default_value = "http://127.0.0.1:8080"
    )]
    pub addr: String,
    /// Mutual TLS: the CA bundle peers' certificates must chain to (with --tls-cert and
    /// --tls-key; servers then require client certificates, clients verify servers).
    #[arg(long, global = true, env = "KTD_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Mutual TLS: this process's certificate (PEM); its `urn:ktd:role:*` SAN URIs are its roles.
    #[arg(long, global = true, env = "KTD_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Mutual TLS: this process's private key (PEM, mode 600).
    #[arg(long, global = true, env = "KTD_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Servers: serve plaintext gRPC on a non-loopback address (private test networks only;
    /// logged as a warning and exported as `ktd_insecure_plaintext`). Without it, a server
    /// without TLS refuses any address but loopback.
    #[arg(long, global = true, env = "KTD_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// Every `ktd` subcommand.
#[derive(Debug, Subcommand)]
pub enum Command {
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
    /// Write every epoch's audit blob (verified) into a directory or a bucket, as public
    /// auditors read them: {E}/{hex root E-1}/{hex root E} holds the protobuf
    /// SingleAppendOnlyProof of E-1 → E. Create-once and resumable: a rerun uploads only what is
    /// missing, and refuses a store that holds another history.
    AuditBlobs {
        /// Where: a directory (created if missing; `file:///dir` too), or `s3://bucket[/prefix]`,
        /// `gs://bucket[/prefix]`, `az://container[/prefix]` with credentials from the
        /// environment (AWS_*, GOOGLE_*, AZURE_*).
        #[arg(long, visible_alias = "out", value_name = "DIR|URL")]
        to: String,
        /// First end epoch (default: the oldest blob already stored — stored epochs are
        /// skipped — else 1).
        #[arg(long)]
        from: Option<u64>,
        /// Keep following new epochs until interrupted.
        #[arg(long)]
        follow: bool,
        /// Retention: keep only the blobs of the newest N epochs in --to (default: all). An
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
    /// Watch labels you own: every new epoch's history proofs verified, and any version you did
    /// not expect, a rewritten history, a missing epoch or a fork reported (log, metric,
    /// webhook, exit status with --once).
    Monitor(crate::monitor::MonitorArgs),
    /// Operator commands against the sequencers' admin service: status table, leader transfer,
    /// add/remove sequencer, seal, snapshot (`ktd admin --help`).
    Admin(crate::admin::AdminArgs),
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

/// `ktd certs`.
#[derive(Debug, Args)]
pub struct CertsArgs {
    /// Directory to write into (created; existing files are never overwritten).
    #[arg(long)]
    pub out: PathBuf,
    /// Host names and IP addresses the sequencer, shard and gateway certificates are valid
    /// for, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
    pub hosts: Vec<String>,
    /// Sequencer node ids: one `sequencer-<id>` certificate each, bound to its id.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub sequencer_ids: Vec<u64>,
    /// Validity of every certificate (e.g. 90d).
    #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
    pub valid_for: Duration,
}

/// `ktd bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Operations per second offered (all call types together).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// How long to offer them (e.g. 30s, 5m).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Most operations in flight.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// `publish-only`, `lookup-only`, `90/10` (lookups/publishes) or
    /// `publish=W,lookup=W,history=W,audit=W`.
    #[arg(long, default_value = "90/10")]
    pub mix: crate::bench::Mix,
    /// Users to load before measuring (batches of 5,000, then one seal).
    #[arg(long, default_value_t = 10_000)]
    pub preload: u64,
    /// Skip the pre-load: this many users were loaded by an earlier run with the same --seed
    /// (its --preload); lookups and histories pick among them.
    #[arg(long, conflicts_with_all = ["preload", "compare_akd"])]
    pub loaded: Option<u64>,
    /// Verify every lookup's proof as a client would (`ktd-client`: stock akd plus its strict
    /// checks) instead of only fetching it; the verification runs in this process.
    #[arg(long)]
    pub verify: bool,
    /// Updates per publish in the measured phase.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Value size, bytes.
    #[arg(long, default_value_t = 32)]
    pub value_bytes: usize,
    /// Random seed (labels and the mix); also names the users, so runs with different seeds
    /// do not collide.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Directory for report.json, report.md and timeline.svg.
    #[arg(long, default_value = "ktd-bench-report")]
    pub report: PathBuf,
    /// An earlier report.json to compare with; a regression beyond --max-regression fails.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// Allowed regression against the baseline, as a fraction (0.2 = 20%).
    #[arg(long, default_value_t = 0.2)]
    pub max_regression: f64,
    /// A `ktd auditor`'s gRPC address (http://HOST:PORT) following the same directory: the
    /// report then includes how far the auditor trails the commits (commit → signed head).
    #[arg(long)]
    pub auditor: Option<String>,
    /// After the run, replay the same per-epoch batches through a stock in-process
    /// `akd::Directory` and report ktd vs akd side by side (epoch processing, lookups).
    #[arg(long)]
    pub compare_akd: bool,
    /// The directory's VRF seed file: with --compare-akd on a directory that was empty at the
    /// start, every epoch's root is also checked against akd's.
    #[arg(long)]
    pub vrf_seed_file: Option<PathBuf>,
    /// A local server process to sample for CPU and RSS, NAME=PID (repeatable).
    #[arg(long, value_parser = crate::bench::servers::parse_server_pid)]
    pub server_pid: Vec<(String, i32)>,
    /// Sample every server whose pid file (NAME.pid) is in DIR, e.g. /tmp/ktd-local (the
    /// local cluster's).
    #[arg(long)]
    pub server_pid_dir: Option<PathBuf>,
}

/// The Prometheus endpoint of a server process (`ProcessConfig::metrics_listen`).
#[derive(Debug, Args)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics (off unless given).
    #[arg(long, env = "KTD_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Logs and traces of a server process (`ProcessConfig`'s keys of the same names).
#[derive(Debug, Args)]
pub struct TelemetryArgs {
    /// Log lines as `text` or `json` (JSON lines carry role, node_id, term and epoch).
    #[arg(long, env = "KTD_LOG_FORMAT", value_enum)]
    pub log_format: Option<crate::telemetry::LogFormat>,
    /// Export spans to this OTLP/gRPC collector (e.g. http://127.0.0.1:4317); off unless given.
    #[arg(long, env = "KTD_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces to record, 0..=1 (a caller's sampled trace is followed, up to 10 per second).
    #[arg(long, env = "KTD_TRACE_SAMPLE_RATIO")]
    pub trace_sample_ratio: Option<f64>,
}

/// A read of one label.
#[derive(Debug, Args)]
pub struct LabelQuery {
    /// The label.
    pub label: String,
    /// As of this epoch.
    #[arg(long)]
    pub epoch: Option<u64>,
    /// The label is hex.
    #[arg(long)]
    pub hex: bool,
    /// Check the proof with stock akd and print the verified result.
    #[arg(long)]
    pub verify: bool,
}

// The servers' flags. A setting that a `--config` file may also hold is an `Option` here
// (`None`: not given as a flag or variable), so the file can sit between the defaults
// (`crate::config`'s `Default`s, shown by `--help`) and the environment; `super::parse` layers
// them into the server's configuration.

/// `ktd dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// TOML file of these flags' settings (keys = flag names with `_`; in a file of server
    /// tables, its [dev] table); the environment and flags override it.
    #[arg(long, env = "KTD_DEV_CONFIG")]
    pub config: Option<PathBuf>,
    /// Validate the configuration (file < environment < flags; an existing VRF seed file's
    /// length and permissions), print it as TOML and exit: 0 if valid, 1 with one error line
    /// if not.
    #[arg(long)]
    pub check_config: bool,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// Address to serve the public API on.
    #[arg(long, env = "KTD_DEV_LISTEN")]
    pub listen: Option<String>,
    /// Data directory (created if missing; restart resumes from it).
    #[arg(long, env = "KTD_DEV_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// VRF seed file, 64 hex digits (default: DATA_DIR/vrf-seed.hex, generated if missing).
    #[arg(long, env = "KTD_DEV_VRF_SEED_FILE")]
    pub vrf_seed_file: Option<PathBuf>,
    /// Seal a non-empty epoch this often (e.g. 1s, 500ms, 2m).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub epoch_interval: Option<Duration>,
    /// Seal an empty "heartbeat" epoch after this long without updates (off by default).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Option<Duration>,
    /// Tree partition bits (2^k partitions).
    #[arg(long)]
    pub partition_bits: Option<u8>,
    /// `whatsapp_v1` or `experimental:<domain label>`.
    #[arg(long)]
    pub configuration: Option<AkdConfig>,
    /// Requests served at once before RESOURCE_EXHAUSTED.
    #[arg(long)]
    pub max_in_flight: Option<usize>,
    /// Expensive-read budget per caller (client certificate, else IP): tokens regained per
    /// second. Complete or long histories and GetEpoch waits cost 1, an audit 1 + 1 per 64
    /// epochs; past the budget: RESOURCE_EXHAUSTED with a retry hint.
    #[arg(long)]
    pub expensive_reads_per_second: Option<f64>,
    /// Expensive-read budget per caller: tokens it can hold (spend at once).
    #[arg(long)]
    pub expensive_reads_burst: Option<f64>,
    /// Serve the audit blobs over plain HTTP on this address (S3 ListObjectsV2 listing at `/`,
    /// blobs at `/E/PREV/CUR`), for akd's and Plexi's auditor tools.
    #[arg(long, env = "KTD_DEV_BLOB_LISTEN")]
    pub blob_listen: Option<String>,
    /// When the VRF proofs of lookups are stored with the user versions: `eager` (default:
    /// proved in the background at the lowest CPU priority as versions are written), `lazy` (by
    /// a version's first lookup) or `off` (every lookup proves).
    #[arg(long)]
    pub lookup_proofs: Option<LookupProofs>,
    /// RocksDB's block cache of the shard, in MiB (default 512).
    #[arg(long)]
    pub block_cache_mib: Option<usize>,
    /// Memory for the shard's hot tree levels, in MiB (default 256; 0: none): the node versions
    /// of the top trie levels that fit are held in memory, so epoch builds and lookups do not
    /// read them from RocksDB.
    #[arg(long)]
    pub hot_tree_mib: Option<usize>,
}

/// `ktd shard`.
#[derive(Debug, Args)]
pub struct ShardArgs {
    /// TOML file of these flags' settings (keys = flag names with `_`; in a file of server
    /// tables, its [shard] table); the environment and flags override it.
    #[arg(long, env = "KTD_SHARD_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// This shard's id in the shard map.
    #[arg(long, env = "KTD_SHARD_ID", required_unless_present = "config")]
    pub id: Option<String>,
    /// Address to listen on.
    #[arg(long, env = "KTD_SHARD_LISTEN", required_unless_present = "config")]
    pub listen: Option<String>,
    /// The data directory.
    #[arg(long, env = "KTD_SHARD_DATA_DIR", required_unless_present = "config")]
    pub data_dir: Option<PathBuf>,
    /// The directory's VRF seed file (64 hex digits, mode 600).
    #[arg(
        long,
        env = "KTD_SHARD_VRF_SEED_FILE",
        required_unless_present = "config"
    )]
    pub vrf_seed_file: Option<PathBuf>,
    /// Tree partition bits (must match the cluster's).
    #[arg(long)]
    pub partition_bits: Option<u8>,
    /// `whatsapp_v1` or `experimental:<domain label>` (must match the cluster's).
    #[arg(long)]
    pub configuration: Option<AkdConfig>,
    /// Sequencer addresses, comma-separated: the shard tails their log to evaluate VRF labels
    /// while epochs are open (without it, labels are evaluated when an epoch is built).
    #[arg(long, env = "KTD_SHARD_SEQUENCERS", value_delimiter = ',')]
    pub sequencers: Vec<String>,
    /// How long a partition copy the shard map moved to other servers keeps serving reads
    /// before this server deletes it (default 10m).
    #[arg(long, env = "KTD_SHARD_ORPHAN_GRACE", value_parser = humantime::parse_duration)]
    pub orphan_grace: Option<Duration>,
    /// How often the server deletes tree history below the cluster's safe epoch (history
    /// retention; default 30s).
    #[arg(long, env = "KTD_SHARD_PRUNE_INTERVAL", value_parser = humantime::parse_duration)]
    pub prune_interval: Option<Duration>,
    /// When the VRF proofs of lookups are stored with the user versions: `eager` (default:
    /// proved in the background at the lowest CPU priority as versions are written), `lazy` (by
    /// a version's first lookup) or `off` (every lookup proves).
    #[arg(long, env = "KTD_SHARD_LOOKUP_PROOFS")]
    pub lookup_proofs: Option<LookupProofs>,
    /// RocksDB's block cache, in MiB (default 512).
    #[arg(long, env = "KTD_SHARD_BLOCK_CACHE_MIB")]
    pub block_cache_mib: Option<usize>,
    /// Memory for the hot tree levels, in MiB (default 256; 0: none): the node versions of the
    /// top trie levels that fit are held in memory, so epoch builds and lookups do not read
    /// them from RocksDB.
    #[arg(long, env = "KTD_SHARD_HOT_TREE_MIB")]
    pub hot_tree_mib: Option<usize>,
    /// Validate the settings (listen address, partition bits, the VRF seed file's length and
    /// permissions), print them as TOML with the seed redacted and exit: 0 if valid, 1 if not.
    #[arg(long)]
    pub check_config: bool,
}

/// `ktd auditor`.
#[derive(Debug, Args)]
pub struct AuditorArgs {
    /// TOML file of these flags' settings (keys = flag names with `_`; in a file of server
    /// tables, its [auditor] table); the environment and flags override it.
    #[arg(long, env = "KTD_AUDITOR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Validate the configuration (file < environment < flags; the signing key file's length
    /// and permissions), print it as TOML and exit: 0 if valid, 1 with one error line if not.
    #[arg(long)]
    pub check_config: bool,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// The namespace signed into every head.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Where verified heads and violations are kept (a restart resumes from it).
    #[arg(long, required_unless_present = "config")]
    pub data_dir: Option<PathBuf>,
    /// Ed25519 signing key file, 64 hex digits, mode 600 (`ktd keygen --out FILE` makes one).
    #[arg(long, required_unless_present = "config")]
    pub signing_key_file: Option<PathBuf>,
    /// Follow this gateway's audit blobs (http://HOST:PORT).
    #[arg(
        long,
        conflicts_with = "blob_dir",
        required_unless_present_any = ["blob_dir", "config"]
    )]
    pub gateway: Option<String>,
    /// Or read blobs from a directory written by `ktd audit-blobs`.
    #[arg(long)]
    pub blob_dir: Option<PathBuf>,
    /// The directory's akd configuration.
    #[arg(long)]
    pub configuration: Option<AkdConfig>,
    /// The trusted start, EPOCH/HEX_ROOT (default: epoch 0, the empty directory).
    #[arg(long)]
    pub start: Option<String>,
    /// gRPC address (ktd.auditor.v1.Auditor).
    #[arg(long)]
    pub listen: Option<String>,
    /// HTTP address (dashboard at /, JSON API).
    #[arg(long)]
    pub http_listen: Option<String>,
    /// How often to look for new blobs when caught up.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub poll: Option<Duration>,
    /// Where the audited log's blobs are served over HTTP (a gateway's --blob-listen URL):
    /// published as the namespace's `log_directory` in the Plexi API.
    #[arg(long, env = "KTD_AUDITOR_LOG_DIRECTORY")]
    pub log_directory: Option<String>,
}

/// `ktd gateway`.
#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// TOML file of these flags' settings (keys = flag names with `_`; in a file of server
    /// tables, its [gateway] table); the environment and flags override it.
    #[arg(long, env = "KTD_GATEWAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Validate the settings (file < environment < flags), print them as TOML and exit: 0 if
    /// valid, 1 with one error line if not.
    #[arg(long)]
    pub check_config: bool,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// Address to serve the public API on.
    #[arg(long, env = "KTD_GATEWAY_LISTEN")]
    pub listen: Option<String>,
    /// Sequencer addresses, comma-separated (any member; the client follows the leader).
    #[arg(
        long,
        env = "KTD_GATEWAY_SEQUENCERS",
        value_delimiter = ',',
        required_unless_present = "config"
    )]
    pub sequencers: Vec<String>,
    /// Requests served at once before RESOURCE_EXHAUSTED.
    #[arg(long)]
    pub max_in_flight: Option<usize>,
    /// Expensive-read budget per caller (client certificate, else IP): tokens regained per
    /// second. Complete or long histories and GetEpoch waits cost 1, an audit 1 + 1 per 64
    /// epochs; past the budget: RESOURCE_EXHAUSTED with a retry hint.
    #[arg(long)]
    pub expensive_reads_per_second: Option<f64>,
    /// Expensive-read budget per caller: tokens it can hold (spend at once).
    #[arg(long)]
    pub expensive_reads_burst: Option<f64>,
    /// Serve the Admin service (seal, cluster status) on this address instead of --listen;
    /// with TLS only admin certificates may call it.
    #[arg(long, env = "KTD_GATEWAY_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Serve the audit blobs over plain HTTP on this address (S3 ListObjectsV2 listing at `/`,
    /// blobs at `/E/PREV/CUR`), for akd's and Plexi's auditor tools.
    #[arg(long, env = "KTD_GATEWAY_BLOB_LISTEN")]
    pub blob_listen: Option<String>,
    /// With TLS: `required` (default) or `optional` (clients without a certificate may read,
    /// not publish).
    #[arg(long, env = "KTD_GATEWAY_TLS_CLIENT_AUTH", value_enum)]
    pub tls_client_auth: Option<crate::config::ClientAuth>,
    /// How often the shard map is re-read from the sequencer leader (default 5s). An epoch
    /// whose record names a newer map, or a read every replica failed, re-reads it at once.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub shard_map_refresh: Option<Duration>,
    /// TEST ONLY: allow the deliberately broken modes named by KTD_UNSAFE_* variables (the
    /// chaos positive controls). Without it, any such variable is refused. A flag only: no
    /// config file can set it.
    #[arg(long, hide = true)]
    pub unsafe_test_mode: bool,
}

/// `ktd sequencer`.
#[derive(Debug, Args)]
pub struct SequencerArgs {
    #[command(flatten)]
    pub metrics: MetricsArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// TOML configuration file (in a file of server tables, its [sequencer] table); flags and
    /// environment variables override it.
    #[arg(long, env = "KTD_SEQUENCER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Validate the configuration (file < environment < flags), print the effective
    /// configuration as TOML and exit: 0 if valid, 1 with one error line if not.
    #[arg(long)]
    pub check_config: bool,
    /// This node's id (required for a new data directory; must match an existing one).
    #[arg(long, env = "KTD_SEQUENCER_ID")]
    pub id: Option<u64>,
    /// Address to listen on (Raft, API, admin and health share it).
    #[arg(long, env = "KTD_SEQUENCER_LISTEN")]
    pub listen: Option<String>,
    /// Address peers and clients use to reach this node (default: --listen).
    #[arg(long, env = "KTD_SEQUENCER_ADVERTISE")]
    pub advertise: Option<String>,
    /// The data directory.
    #[arg(long, env = "KTD_SEQUENCER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Initial members, ID=HOST:PORT, comma-separated (used with --init).
    #[arg(long, env = "KTD_SEQUENCER_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// Dial peer ID at HOST:PORT instead of its membership address, ID=HOST:PORT,
    /// comma-separated or repeated (fault proxies, tunnels; this node only).
    #[arg(long, env = "KTD_SEQUENCER_PEER_OVERRIDES", value_delimiter = ',')]
    pub peer_override: Vec<String>,
    /// Bootstrap a new cluster from --peers (ignored if the data directory is initialised).
    #[arg(long, conflicts_with = "join")]
    pub init: bool,
    /// Start as a new member with an empty data directory (one of the --peers of a cluster
    /// being bootstrapped, or a node `ktd admin add-sequencer` adds); ignored if the data
    /// directory is initialised. Without --init or --join an empty data directory is refused.
    #[arg(long)]
    pub join: bool,
    /// The directory's VRF public key, 64 hex digits (recorded at --init).
    #[arg(long, env = "KTD_SEQUENCER_VRF_PUBLIC_KEY")]
    pub vrf_public_key: Option<String>,
    /// Initial shard map, ID=URL comma-separated (recorded at --init).
    #[arg(long, env = "KTD_SEQUENCER_SHARDS", value_delimiter = ',')]
    pub shards: Vec<String>,
    /// Voting replicas per partition in the initial shard map (recorded at --init; default 3,
    /// or the number of shards if fewer).
    #[arg(long)]
    pub replication_factor: Option<u32>,
    /// Tree partition bits (recorded at --init).
    #[arg(long)]
    pub partition_bits: Option<u32>,
    /// `whatsapp_v1` or `experimental:<domain label>` (recorded at --init).
    #[arg(long)]
    pub configuration: Option<AkdConfig>,
    /// Seal a non-empty open epoch this often (e.g. 1s, 2m).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub epoch_interval: Option<Duration>,
    /// Seal an empty "heartbeat" epoch after this long without updates (default: never).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Option<Duration>,
    /// Seal when the open epoch holds this many updates (recorded at --init).
    #[arg(long)]
    pub max_epoch_updates: Option<u64>,
    /// Seal when the open epoch holds this many label + value bytes (recorded at --init; at
    /// most 128 MiB).
    #[arg(long)]
    pub max_epoch_bytes: Option<u64>,
    /// Refuse appends while this many sealed epochs wait for their commit (recorded at --init).
    #[arg(long)]
    pub max_uncommitted_epochs: Option<u64>,
}
