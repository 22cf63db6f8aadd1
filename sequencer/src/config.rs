//! One typed configuration per sequencer node: defaults < TOML file < environment < flags (the
//! file, the environment and the flags are read by the `ktd` binary, as for every server:
//! `ktd::config`), validated once at start-up.
//!
//! Settings under `[cluster]` are used only with `--init`: they become the replicated cluster
//! metadata, so every replica applies the same epoch limits; changing them in a file later has
//! no effect on an existing cluster.
//!
//! ```toml
//! id = 1
//! listen = "127.0.0.1:7001"
//! data_dir = "/var/lib/ktd/sequencer-1"
//! peers = ["1=127.0.0.1:7001", "2=127.0.0.2:7001", "3=127.0.0.3:7001"]
//! # Optional: dial node 2 at another address than the membership's (a proxy, a tunnel).
//! peer_overrides = ["2=127.0.0.9:17002"]
//!
//! [cluster]
//! vrf_public_key = "…64 hex digits…"
//!
//! [epoch]
//! interval = "120s"
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Result, SequencerError};
use crate::raft::NodeId;

/// A sequencer node's configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SequencerConfig {
    /// This node's id. Required for a new data directory; read from an existing one otherwise.
    pub id: Option<NodeId>,
    /// Address the gRPC server binds (Raft transport, API, admin and health share it).
    pub listen: String,
    /// Address peers and clients use to reach this node (default: `listen`).
    pub advertise: Option<String>,
    /// The data directory.
    pub data_dir: PathBuf,
    /// Initial members as `ID=HOST:PORT`, used only with `--init`.
    pub peers: Vec<String>,
    /// `ID=HOST:PORT` entries: when this node dials peer `ID` for Raft, it connects to
    /// `HOST:PORT` instead of the address in the membership (which other nodes, clients and
    /// leader hints keep using). For fault proxies and tunnels; local to this node, never
    /// replicated. Flag: `--peer-override` (repeatable or comma-separated).
    pub peer_overrides: Vec<String>,
    /// Bootstrap a new cluster from `peers` (flag only; ignored for an initialised data dir).
    #[serde(skip)]
    pub init: bool,
    /// Start as a new member with an empty data directory (flag only; ignored for an
    /// initialised data dir): one of the `peers` of a cluster `--init` bootstraps, or a node
    /// `ktd admin add-sequencer` adds. Without `--init` or `--join` an empty data directory is
    /// refused: a member that lost its data must never rejoin under its old id.
    #[serde(skip)]
    pub join: bool,
    /// Cluster metadata written at `--init`.
    pub cluster: ClusterOptions,
    /// Epoch sealing and input limits.
    pub epoch: EpochOptions,
    /// Raft timing and transport.
    pub raft: RaftOptions,
    /// Graceful shutdown.
    pub shutdown: ShutdownOptions,
    /// How the leader's coordinator looks after shard replicas.
    pub replicas: ReplicaOptions,
    /// Bounds on `WatchLog` subscribers.
    pub watch: WatchOptions,
}

impl Default for SequencerConfig {
    fn default() -> Self {
        Self {
            id: None,
            listen: "127.0.0.1:7001".into(),
            advertise: None,
            data_dir: PathBuf::from("ktd-sequencer-data"),
            peers: Vec::new(),
            peer_overrides: Vec::new(),
            init: false,
            join: false,
            cluster: ClusterOptions::default(),
            epoch: EpochOptions::default(),
            raft: RaftOptions::default(),
            shutdown: ShutdownOptions::default(),
            replicas: ReplicaOptions::default(),
            watch: WatchOptions::default(),
        }
    }
}

/// Cluster metadata chosen at `--init`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterOptions {
    /// Tree partition bits `k` (2^k partitions).
    pub partition_bits: u32,
    /// `whatsapp_v1` or `experimental:<domain label>`.
    pub akd_configuration: String,
    /// The directory's VRF public key, 64 hex digits. Required with `--init`.
    pub vrf_public_key: String,
    /// An epoch never holds more distinct labels than this.
    pub max_epoch_updates: u64,
    /// Appends keyed by a client library for its own retries remembered for deduplication.
    pub idempotency_window: u64,
    /// A caller's idempotency key is remembered at least this long: a retry within it is never
    /// applied twice.
    #[serde(with = "humantime_serde")]
    pub idempotency_retention: Duration,
    /// At most this many caller keys are remembered at once; while that many are younger than
    /// `idempotency_retention`, keyed publishes are refused with `RESOURCE_EXHAUSTED`. Size it
    /// at least peak keyed publishes per second × the retention in seconds.
    pub max_idempotency_keys: u64,
    /// Sealed batches of this many latest committed epochs stay retrievable whatever the
    /// replicas' progress.
    pub retained_committed_batches: u64,
    /// Older committed batches stay while a shard replica has not built them, up to this many
    /// bytes in all (then the oldest go, and replicas that still needed them must bootstrap).
    pub batch_retention_max_bytes: u64,
    /// ... and for at most this long after they were sealed.
    #[serde(with = "humantime_serde")]
    pub batch_retention_max_age: Duration,
    /// The initial shard map as `ID=URL` entries (`s1=http://10.0.0.5:7100`): partition `p` is
    /// held by `replication_factor` consecutive servers starting with its owner in an even,
    /// contiguous split, in the order given. Written once, at `--init`.
    pub shards: Vec<String>,
    /// Voting replicas per partition in the initial shard map (default: 3, or the number of
    /// shards if fewer).
    pub replication_factor: Option<u32>,
    /// Longest label, in bytes (at most 1024, the shards' limit).
    pub max_label_bytes: u64,
    /// Largest value, in bytes (at most 65536, the shards' limit).
    pub max_value_bytes: u64,
    /// An epoch never holds more label + value bytes than this (at most 128 MiB).
    pub max_epoch_bytes: u64,
    /// While this many sealed epochs wait for their commit, appends are refused with
    /// `RESOURCE_EXHAUSTED` (backpressure) and no heartbeat epoch is sealed.
    pub max_uncommitted_epochs: u64,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            partition_bits: 4,
            akd_configuration: "whatsapp_v1".into(),
            vrf_public_key: String::new(),
            max_epoch_updates: 100_000,
            idempotency_window: 262_144,
            idempotency_retention: Duration::from_millis(
                crate::machine::DEFAULT_IDEMPOTENCY_RETENTION_MS,
            ),
            max_idempotency_keys: crate::machine::DEFAULT_MAX_IDEMPOTENCY_KEYS,
            retained_committed_batches: 8,
            batch_retention_max_bytes: crate::machine::DEFAULT_RETENTION_MAX_BYTES,
            batch_retention_max_age: Duration::from_millis(
                crate::machine::DEFAULT_RETENTION_MAX_AGE_MS,
            ),
            shards: Vec::new(),
            replication_factor: None,
            max_label_bytes: 1024,
            max_value_bytes: 64 * 1024,
            max_epoch_bytes: crate::machine::DEFAULT_MAX_EPOCH_BYTES,
            max_uncommitted_epochs: crate::machine::DEFAULT_MAX_UNCOMMITTED_EPOCHS,
        }
    }
}

/// Sealing and input limits (checked by the leader before proposing).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EpochOptions {
    /// The leader seals a non-empty open epoch this long after it opened.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// If set, the leader seals an *empty* epoch this long after it opened (a heartbeat epoch:
    /// same root, new epoch number, so clients and auditors see the directory is alive even
    /// when nobody publishes). Off by default, as in akd, which never makes an empty epoch.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Option<Duration>,
    /// Most updates in one Append.
    pub max_batch_updates: usize,
    /// Longest idempotency key, in bytes.
    pub max_idempotency_key_bytes: usize,
}

impl Default for EpochOptions {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(120),
            heartbeat_interval: None,
            max_batch_updates: 10_000,
            max_idempotency_key_bytes: 256,
        }
    }
}

/// Raft timing and transport.
///
/// Defaults: heartbeat 50 ms, election timeout 200–400 ms, pre-vote on. The lower bound is ~7×
/// the p99 fsync latency measured on the 2-core CI machine (≈30 ms), so slow disks do not look
/// like a dead leader; the upper bound is also openraft's leader lease, which followers wait out
/// before electing a new leader, so failover (lease + a vote round + the new leader's first
/// commit + the client finding it) stays under a second. With 100 ms / 300–600 ms it measured
/// 1.12 s (median of 12 leader kills). Pre-vote keeps a node that was cut off from disturbing a
/// healthy leader when it comes back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftOptions {
    /// Leader heartbeat period.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Lower bound of the randomised election timeout.
    #[serde(with = "humantime_serde")]
    pub election_timeout_min: Duration,
    /// Upper bound of the randomised election timeout (also the leader lease).
    #[serde(with = "humantime_serde")]
    pub election_timeout_max: Duration,
    /// Enable pre-vote.
    pub pre_vote: bool,
    /// Build a snapshot after this many applied entries; a follower further behind gets one.
    pub snapshot_logs_since_last: u64,
    /// Log entries kept behind a snapshot for followers that are only a little behind.
    pub max_in_snapshot_log_to_keep: u64,
    /// Bound on establishing a peer connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// With replication requests in flight, the longest wait for the next answer.
    #[serde(with = "humantime_serde")]
    pub stream_progress_timeout: Duration,
    /// Smallest deadline of a snapshot transfer (larger ones scale at 20 MiB/s).
    #[serde(with = "humantime_serde")]
    pub snapshot_min_timeout: Duration,
    /// Health reports NOT_SERVING while applied lags committed by more entries than this.
    pub max_apply_lag: u64,
    /// A received snapshot larger than this in all is refused (`RESOURCE_EXHAUSTED`) and
    /// removed. Keep it below the data disk's free space and above the largest state machine
    /// (retained and uncommitted batches, the open epoch, idempotency records).
    pub snapshot_max_bytes: u64,
    /// A received snapshot with more files than this is refused.
    pub snapshot_max_files: u64,
    /// A received snapshot with a file larger than this is refused.
    pub snapshot_max_file_bytes: u64,
}

impl Default for RaftOptions {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(50),
            election_timeout_min: Duration::from_millis(200),
            election_timeout_max: Duration::from_millis(400),
            pre_vote: true,
            snapshot_logs_since_last: 10_000,
            max_in_snapshot_log_to_keep: 1_000,
            connect_timeout: Duration::from_secs(1),
            stream_progress_timeout: Duration::from_secs(3),
            snapshot_min_timeout: Duration::from_secs(30),
            max_apply_lag: 1_000,
            snapshot_max_bytes: crate::raft::snapshot::SnapshotLimits::default().max_bytes,
            snapshot_max_files: crate::raft::snapshot::SnapshotLimits::default().max_files,
            snapshot_max_file_bytes: crate::raft::snapshot::SnapshotLimits::default()
                .max_file_bytes,
        }
    }
}

impl RaftOptions {
    /// The bounds on one received snapshot.
    pub fn snapshot_limits(&self) -> crate::raft::snapshot::SnapshotLimits {
        crate::raft::snapshot::SnapshotLimits {
            max_bytes: self.snapshot_max_bytes,
            max_files: self.snapshot_max_files,
            max_file_bytes: self.snapshot_max_file_bytes,
        }
    }
}

/// Bounds on `WatchLog` subscribers (node-local).
///
/// Each subscriber's undelivered events take at most `buffer_bytes` of memory (an event larger
/// than that, up to one 16 MiB `Append`, is buffered alone), so stalled subscribers hold at most
/// `max_subscribers × max(buffer_bytes, 16 MiB)`: 1 GiB with the defaults. The subscribers are
/// the shard servers' log tails (one each) and operators' tools, far fewer than 64.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchOptions {
    /// Most `WatchLog` streams open at once on this node; more get `RESOURCE_EXHAUSTED`.
    pub max_subscribers: usize,
    /// Bytes of events buffered for one subscriber that has not read them yet.
    pub buffer_bytes: usize,
    /// A subscriber whose buffer stays full this long is dropped; its stream ends with
    /// `RESOURCE_EXHAUSTED` after the events already buffered.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            max_subscribers: 64,
            buffer_bytes: 8 << 20,
            stall_timeout: Duration::from_secs(60),
        }
    }
}

/// Graceful shutdown budget.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownOptions {
    /// How long a leader waits for leadership to move before it stops anyway.
    #[serde(with = "humantime_serde")]
    pub transfer_timeout: Duration,
    /// How long in-flight requests may take to finish.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for ShutdownOptions {
    fn default() -> Self {
        Self {
            transfer_timeout: Duration::from_secs(3),
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// How the leader's coordinator looks after shard replicas (node-local: they steer repairs,
/// not the replicated state).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicaOptions {
    /// A shard server unreachable this long (and not in maintenance) has its partitions
    /// re-replicated on servers that do not hold them, if there are any.
    #[serde(with = "humantime_serde")]
    pub failure_timeout: Duration,
    /// How often replicas' progress is checked (status polls, replays, bootstraps).
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
    /// Rate limit of one partition copy into a new or repaired replica, bytes per second.
    pub bootstrap_max_bytes_per_second: u64,
    /// Move copies between servers until every server's bytes are within `balance_tolerance`
    /// of the mean (new servers fill up; nothing moves onto a server being drained).
    pub balance: bool,
    /// How far (a fraction of the mean bytes per server) the fullest and the emptiest server
    /// may differ before copies move.
    pub balance_tolerance: f64,
    /// Moves (learners replacing a voter) in flight at once, cluster-wide.
    pub max_moves: u32,
    /// Moves in flight at once out of one server, and into one server.
    pub max_moves_per_server: u32,
}

impl Default for ReplicaOptions {
    fn default() -> Self {
        Self {
            failure_timeout: Duration::from_secs(300),
            check_interval: Duration::from_secs(1),
            bootstrap_max_bytes_per_second: 64 << 20,
            balance: true,
            balance_tolerance: 0.1,
            max_moves: 2,
            max_moves_per_server: 1,
        }
    }
}

fn invalid(message: impl Into<String>) -> SequencerError {
    SequencerError::InvalidConfig(message.into())
}

impl SequencerConfig {
    /// Parses a TOML configuration file (unknown keys are errors).
    /// The error is one line: "line L, column C (`the line`): what is wrong".
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|error| {
            let place = error.span().map(|span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let line_start = before.rfind('\n').map_or(0, |at| at + 1);
                let column = before.len() - line_start + 1;
                let source = text[line_start..].lines().next().unwrap_or("").trim();
                format!("line {line}, column {column} (`{source}`): ")
            });
            invalid(format!(
                "{}{}",
                place.unwrap_or_default(),
                error.message().trim().replace('\n', "; ")
            ))
        })
    }

    /// The address peers and clients use.
    pub fn advertise_addr(&self) -> &str {
        self.advertise.as_deref().unwrap_or(&self.listen)
    }

    /// The initial members, `id → address`.
    pub fn initial_members(&self) -> Result<BTreeMap<NodeId, String>> {
        parse_peers(&self.peers)
    }

    /// The Raft dial-address overrides, `id → HOST:PORT` (see `peer_overrides`).
    pub fn peer_overrides(&self) -> Result<BTreeMap<NodeId, String>> {
        let overrides = parse_peers(&self.peer_overrides).map_err(|error| match error {
            SequencerError::InvalidConfig(message) => invalid(format!("peer_overrides: {message}")),
            other => other,
        })?;
        for (id, addr) in &overrides {
            let port = addr
                .rsplit_once(':')
                .map(|(host, port)| (host, port.parse::<u16>()));
            if !matches!(port, Some((host, Ok(_))) if !host.is_empty() && !host.contains('/')) {
                return Err(invalid(format!(
                    "peer_overrides: node {id}: {addr:?} must be HOST:PORT"
                )));
            }
        }
        Ok(overrides)
    }

    /// The VRF public key for `--init`.
    pub fn vrf_public_key(&self) -> Result<[u8; 32]> {
        let hex = self.cluster.vrf_public_key.trim();
        if hex.len() != 64 {
            return Err(invalid(
                "cluster.vrf_public_key must be 64 hex digits (32 bytes); it is required with --init",
            ));
        }
        let mut key = [0u8; 32];
        for (index, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * index..2 * index + 2], 16)
                .map_err(|_| invalid("cluster.vrf_public_key is not hexadecimal"))?;
        }
        Ok(key)
    }

    /// Checks everything that can be checked without the data directory.
    pub fn validate(&self) -> Result<()> {
        self.listen
            .parse::<SocketAddr>()
            .map_err(|error| invalid(format!("listen {:?}: {error}", self.listen)))?;
        if self.advertise_addr().is_empty() || self.advertise_addr().contains('/') {
            return Err(invalid(format!(
                "advertise {:?} must be HOST:PORT",
                self.advertise_addr()
            )));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir must be set"));
        }
        let raft = &self.raft;
        if raft.heartbeat_interval.is_zero()
            || raft.heartbeat_interval * 2 >= raft.election_timeout_min
        {
            return Err(invalid(
                "raft.heartbeat_interval must be positive and below half of raft.election_timeout_min",
            ));
        }
        if raft.election_timeout_min >= raft.election_timeout_max {
            return Err(invalid(
                "raft.election_timeout_min must be below raft.election_timeout_max",
            ));
        }
        if self.epoch.interval.is_zero() {
            return Err(invalid("epoch.interval must be positive"));
        }
        let replicas = &self.replicas;
        if !(replicas.balance_tolerance > 0.0 && replicas.balance_tolerance <= 10.0) {
            return Err(invalid(
                "replicas.balance_tolerance must be above 0 and at most 10 (a fraction of the mean)",
            ));
        }
        if replicas.max_moves == 0 || replicas.max_moves_per_server == 0 {
            return Err(invalid(
                "replicas.max_moves and replicas.max_moves_per_server must be positive",
            ));
        }
        if self
            .epoch
            .heartbeat_interval
            .is_some_and(|interval| interval.is_zero())
        {
            return Err(invalid(
                "epoch.heartbeat_interval must be positive when set",
            ));
        }
        if self.epoch.max_batch_updates == 0 {
            return Err(invalid("epoch.max_batch_updates must be positive"));
        }
        if raft.snapshot_max_bytes == 0
            || raft.snapshot_max_files == 0
            || raft.snapshot_max_file_bytes == 0
        {
            return Err(invalid(
                "raft.snapshot_max_bytes, raft.snapshot_max_files and \
                 raft.snapshot_max_file_bytes must be positive",
            ));
        }
        if self.watch.max_subscribers == 0
            || self.watch.buffer_bytes == 0
            || self.watch.stall_timeout.is_zero()
        {
            return Err(invalid(
                "watch.max_subscribers, watch.buffer_bytes and watch.stall_timeout must be positive",
            ));
        }
        let members = self.initial_members()?;
        self.peer_overrides()?;
        if self.init {
            let id = self.id.ok_or_else(|| invalid("--init needs --id"))?;
            if !members.contains_key(&id) {
                return Err(invalid(format!(
                    "--init: peers must include this node ({id}={})",
                    self.advertise_addr()
                )));
            }
            self.vrf_public_key()?;
            self.initial_shard_map()?;
            if self.epoch.max_batch_updates as u64 > self.cluster.max_epoch_updates {
                return Err(invalid(
                    "epoch.max_batch_updates must not exceed cluster.max_epoch_updates",
                ));
            }
        }
        Ok(())
    }
}

impl SequencerConfig {
    /// The shard map written at `--init` (`cluster.shards`, partitions split evenly, each held
    /// by `cluster.replication_factor` servers); `None` if no shards are configured.
    pub fn initial_shard_map(&self) -> Result<Option<ktd_core::ShardMap>> {
        if self.cluster.shards.is_empty() {
            return Ok(None);
        }
        let bits =
            ktd_core::shard_map::check_partition_bits(u64::from(self.cluster.partition_bits))
                .map_err(|error| invalid(format!("cluster.partition_bits: {error}")))?;
        let entries = self
            .cluster
            .shards
            .iter()
            .map(|entry| {
                let (id, url) = entry.split_once('=').ok_or_else(|| {
                    invalid(format!(
                        "shard {entry:?}: expected ID=URL (s1=http://HOST:PORT)"
                    ))
                })?;
                Ok((id.trim().to_string(), url.trim().to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let replication_factor = match self.cluster.replication_factor {
            Some(factor) => u8::try_from(factor).map_err(|_| {
                invalid(format!("cluster.replication_factor {factor} is too large"))
            })?,
            None => entries.len().min(3) as u8,
        };
        let map = ktd_core::ShardMap::even(bits, replication_factor, entries)
            .map_err(|error| invalid(format!("cluster.shards: {error}")))?;
        Ok(Some(map))
    }
}

/// Parses `ID=HOST:PORT` entries (also accepts one comma-separated entry).
pub fn parse_peers(peers: &[String]) -> Result<BTreeMap<NodeId, String>> {
    let mut members = BTreeMap::new();
    for entry in peers.iter().flat_map(|peer| peer.split(',')) {
        let entry = entry.trim();
        if entry.is_empty() {
            continue;
        }
        let (id, addr) = entry
            .split_once('=')
            .ok_or_else(|| invalid(format!("peer {entry:?} must be ID=HOST:PORT")))?;
        let id: NodeId = id
            .trim()
            .parse()
            .map_err(|_| invalid(format!("peer {entry:?}: {id:?} is not a node id")))?;
        if id == 0 {
            return Err(invalid("node id 0 is reserved"));
        }
        if members.insert(id, addr.trim().to_string()).is_some() {
            return Err(invalid(format!("peer {id} is listed twice")));
        }
    }
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_files_round_trip() {
        let config = SequencerConfig::default();
        config.validate().expect("defaults are valid");
        let text = toml::to_string(&config).expect("serialise");
        assert_eq!(SequencerConfig::from_toml(&text).expect("parse"), config);
    }

    #[test]
    fn unknown_keys_and_bad_timing_are_refused() {
        assert!(SequencerConfig::from_toml("bogus = 1").is_err());
        let config = SequencerConfig::from_toml(
            "[raft]\nheartbeat_interval = \"200ms\"\nelection_timeout_min = \"300ms\"\n",
        )
        .expect("parse");
        assert!(config.validate().is_err());
    }

    #[test]
    fn init_needs_self_in_peers_and_a_key() {
        let mut config = SequencerConfig {
            id: Some(2),
            init: true,
            peers: vec!["1=127.0.0.1:1,2=127.0.0.1:2".into()],
            ..SequencerConfig::default()
        };
        assert!(config.validate().is_err(), "no VRF key");
        config.cluster.vrf_public_key = "ab".repeat(32);
        config.validate().expect("valid");
        config.id = Some(3);
        assert!(config.validate().is_err(), "not a peer");
        assert!(parse_peers(&["1=a".into(), "1=b".into()]).is_err());
    }

    #[test]
    fn peer_overrides_are_validated() {
        let with = |entries: &[&str]| SequencerConfig {
            peer_overrides: entries.iter().map(|entry| entry.to_string()).collect(),
            ..SequencerConfig::default()
        };
        let config = with(&["2=127.0.0.9:17002,3=proxy.local:7003"]);
        config.validate().expect("valid");
        let overrides = config.peer_overrides().expect("parse");
        assert_eq!(overrides[&2], "127.0.0.9:17002");
        assert_eq!(overrides[&3], "proxy.local:7003");
        for bad in [
            "2",
            "x=127.0.0.1:1",
            "0=127.0.0.1:1",
            "2=127.0.0.1",
            "2=:7001",
            "2=http://a:1",
            "2=127.0.0.1:99999",
        ] {
            let error = with(&[bad]).validate().expect_err(bad).to_string();
            assert!(error.contains("peer_overrides"), "{bad}: {error}");
        }
        assert!(
            with(&["2=a:1", "2=b:1"]).validate().is_err(),
            "listed twice"
        );
        let parsed =
            SequencerConfig::from_toml("peer_overrides = [\"2=127.0.0.9:1\"]\n").expect("toml");
        assert_eq!(parsed.peer_overrides, ["2=127.0.0.9:1"]);
    }
}
