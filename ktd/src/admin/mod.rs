//! `ktd admin ...`: the operator CLI. It talks to the sequencers' `ktd.sequencer.v1.SequencerAdmin`
//! service directly (`--sequencers`, or `KTD_SEQUENCERS`; it finds the leader itself), and to the
//! shards named in the replicated shard map, so it works when the gateway is down.
//!
//! ```text
//! ktd admin status [-o table|json] [--check]   # ≈ etcdctl endpoint status --cluster -w table
//! ktd admin transfer-leader [--to ID]          # waits until the new leader leads (bounded)
//! ktd admin add-sequencer --id N --address HOST:PORT   # learner, catch up, promote
//! ktd admin remove-sequencer --id N            # never reuse N afterwards
//! ktd admin seal                               # seal the open epoch, wait for its root
//! ktd admin snapshot [--node ID] [--purge]     # build a snapshot now (every member by default)
//! ktd admin add-shard --id S --address URL [--rebalance] [--wait]
//! ktd admin drain-shard --id S [--wait]        # copies move off; with --wait, S leaves the map
//! ktd admin replace-shard --id OLD --with NEW [--address URL] [--wait]
//! ktd admin remove-shard --id S                # only once S holds nothing
//! ktd admin maintenance --id S --for 30m | --off   # no re-replication while S is away
//! ktd admin retention show|set-window|hold|release # history retention (shard/docs/0003)
//! ktd admin backup --to DIR [--full]           # online; incremental over DIR's newest backup
//! ktd admin verify-backup --from DIR [--epoch E] [--to-epoch T]   # offline: every root, node by node
//! ktd admin archive --to DIR [--follow]        # sealed batches after the backup: point in time
//! ktd admin restore --from DIR [--epoch E] [--to-epoch T]   # into a new, empty cluster
//! ktd admin force-new-cluster --data-dir DIR --confirm-quorum-lost   # offline: lost quorum
//! ```
//!
//! Exit status: 0 done, 1 failed (one error line on stderr; `status --check` also fails when it
//! finds a problem), 2 usage error. Every wait is bounded.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand, ValueEnum};
use sequencer::{ClientOptions, SequencerClient, SequencerError, pb};
use serde::Serialize;
pub use shards::{PartitionRow, ReplicaCell, RetentionRow, ShardRow};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub mod archive;
pub mod auditor_pin;
pub mod backup;
mod shards;

/// Most entries a member's applied index may trail the leader's commit index before `status
/// --check` calls it lagging (the sequencer's readiness uses the same default).
pub const DEFAULT_MAX_LAG: u64 = 1_000;
/// Bound on each wait (leader transfer, learner catch-up, epoch commit).
const WAIT: Duration = Duration::from_secs(30);
/// Bound on one status call to one process.
const PROBE: Duration = Duration::from_secs(2);

/// What can go wrong in `ktd admin`.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// A sequencer call failed.
    #[error("{0}")]
    Sequencer(#[from] SequencerError),
    /// A shard could not be asked.
    #[error(transparent)]
    Shard(#[from] shard::Error),
    /// The request cannot be carried out as asked.
    #[error("{0}")]
    Refused(String),
    /// A bounded wait ran out.
    #[error("timed out after {limit:?}: {what}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// The bound.
        limit: Duration,
    },
    /// `status --check` found problems.
    #[error("unhealthy: {0}")]
    Unhealthy(String),
    /// Printing JSON failed.
    #[error("encode JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// `ktd admin` flags.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Sequencer admin addresses, HOST:PORT comma-separated (any members; the leader is found).
    #[arg(long, env = "KTD_SEQUENCERS", value_delimiter = ',', global = true)]
    pub sequencers: Vec<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// Output format of `ktd admin status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned tables.
    #[default]
    Table,
    /// One JSON document.
    Json,
}

/// `ktd admin` subcommands.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Per sequencer: role, term, last log, commit, applied, lag, readiness; epochs and epoch age;
    /// per shard: partitions, reachability, readiness, caught-up epoch.
    Status {
        /// `table` or `json`.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Exit 1 if anything is wrong: no leader, a member unreachable, not ready or lagging, a
        /// joint configuration, a shard unreachable or not ready.
        #[arg(long)]
        check: bool,
        /// Largest lag (leader commit − member applied, entries) `--check` accepts.
        #[arg(long, default_value_t = DEFAULT_MAX_LAG)]
        max_lag: u64,
        /// `--check` fails when sealed epochs wait and the last commit is older than this
        /// (epochs are stuck: a shard cannot build them; the leader's log says why).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        max_commit_delay: std::time::Duration,
    },
    /// Move leadership to node ID (default: the most caught-up other voter) and wait until it
    /// leads.
    TransferLeader {
        /// The node to hand leadership to.
        #[arg(long)]
        to: Option<u64>,
    },
    /// Add a sequencer started with `--id N` and an empty data directory and `--join`: as a
    /// learner, wait until it has caught up, then promote it to voter. N must be new.
    AddSequencer {
        /// Its node id (never one used before in this cluster).
        #[arg(long)]
        id: u64,
        /// Its address, HOST:PORT (as peers and clients reach it).
        #[arg(long)]
        address: String,
    },
    /// Remove node ID from the cluster (leadership is moved away first if it leads). Then stop it
    /// and delete its data directory; never reuse the id.
    RemoveSequencer {
        /// The node to remove.
        #[arg(long)]
        id: u64,
    },
    /// Seal the open epoch now and wait until its root is committed.
    Seal,
    /// Offline, on a stopped sequencer's data directory, after the cluster lost its quorum for
    /// good: make this node the only voter (every entry its log holds is kept and committed once
    /// it leads; the other members are removed and must never start on their old data). Start
    /// it, then add new members with `add-sequencer`. Runbook "Lost quorum".
    ForceNewCluster {
        /// The surviving node's data directory (the node must be stopped).
        #[arg(long)]
        data_dir: std::path::PathBuf,
        /// Required to write: the other members are gone and will not come back.
        #[arg(long, required_unless_present = "dry_run")]
        confirm_quorum_lost: bool,
        /// Print what would be done (the node's last log id, to pick the most complete
        /// survivor) without writing.
        #[arg(long)]
        dry_run: bool,
        /// `table` or `json`.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// History retention: show the window, the pins and the oldest readable epoch (`show`),
    /// change the window, or hold and release history (shard/docs/0003).
    #[command(subcommand)]
    Retention(RetentionCommand),
    /// Back up the serving cluster at its latest committed epoch into DIR: incremental over the
    /// newest backup of this cluster already in DIR (only what later epochs wrote is copied),
    /// with a pin holding that epoch's history while it runs (shard/docs/0003).
    Backup {
        /// The backup directory (created if missing).
        #[arg(long)]
        to: std::path::PathBuf,
        /// Copy everything, even if DIR holds an earlier backup.
        #[arg(long)]
        full: bool,
        /// How long the backup's pin may hold history if this command dies half-way.
        #[arg(long, default_value = "6h", value_parser = humantime::parse_duration)]
        pin_for: Duration,
        /// A `ktd auditor` (gRPC URL): keep its signed head for the backup's epoch (or its
        /// newest before it) in the manifest, checked against the committed root.
        #[arg(long)]
        auditor: Option<String>,
        /// `table` or `json`.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Check a backup without a cluster: every file's checksum, the epoch records in order with
    /// each one's partition roots stitching to its root, and every partition's tree re-hashed
    /// node by node to its committed root.
    VerifyBackup {
        /// The backup directory.
        #[arg(long)]
        from: std::path::PathBuf,
        /// The backup's epoch (default: the newest in DIR).
        #[arg(long)]
        epoch: Option<u64>,
        /// Also check the archived epochs after the backup's up to this one (checksums, epochs,
        /// cluster id), as a restore to it would.
        #[arg(long)]
        to_epoch: Option<u64>,
        /// `table` or `json`.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Archive every committed epoch's sealed batch into DIR/archive (after the newest backup in
    /// DIR, or the newest archived epoch), once or continuously: a restore can then replay them
    /// onto a backup to any later epoch (`restore --to-epoch`). A pin holds the batches it has
    /// not read yet for `--pin-for`.
    Archive {
        /// Where, and how long.
        #[command(flatten)]
        options: archive::ArchiveOptions,
        /// `table` or `json`.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Restore a backup into a new cluster (same akd configuration, partition bits and VRF seed,
    /// never written to): verify it, serve it to the shard servers, install its epochs, wait
    /// until every replica holds its epoch with the committed root, then take updates again.
    Restore {
        /// What to restore, and how.
        #[command(flatten)]
        options: backup::RestoreOptions,
        /// `table` or `json`.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Add a shard server (started with an empty data directory) to the shard map. The
    /// balancer then moves copies onto it a few at a time (`replicas.balance`); `--rebalance`
    /// moves a share of copies onto it at once instead.
    AddShard {
        /// Its server id (`--id` it was started with).
        #[arg(long)]
        id: String,
        /// Its gRPC address as the coordinator and gateways reach it (`http://HOST:PORT`).
        #[arg(long)]
        address: String,
        /// Move copies from the most-loaded servers onto it (as learners, promoted once built).
        #[arg(long)]
        rebalance: bool,
        /// Wait until every moved copy is built and promoted.
        #[arg(long)]
        wait: bool,
        /// Bound on `--wait`.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Move every copy off a shard server (learners elsewhere, promoted once built), then —
    /// with `--wait` — remove it from the map. Stop it and delete its data directory afterwards.
    DrainShard {
        /// The server to empty.
        #[arg(long)]
        id: String,
        /// Wait until it holds nothing, then remove it from the map.
        #[arg(long)]
        wait: bool,
        /// Bound on `--wait`.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Hand every copy of one shard server to another (added if new; started with an empty
    /// data directory), then — with `--wait` — remove the old one from the map.
    ReplaceShard {
        /// The server leaving.
        #[arg(long)]
        id: String,
        /// The server taking over.
        #[arg(long = "with")]
        with: String,
        /// The new server's address (`http://HOST:PORT`; needed if it is not in the map yet).
        #[arg(long)]
        address: Option<String>,
        /// Wait until the old server holds nothing, then remove it from the map.
        #[arg(long)]
        wait: bool,
        /// Bound on `--wait`.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Move one partition's copy from one shard server to another (a hot or full partition):
    /// a learner on the destination, promoted in the source's place once it is built and caught
    /// up; the source deletes its copy after its orphan grace period.
    MovePartition {
        /// The partition.
        #[arg(long)]
        partition: u32,
        /// The server whose voting copy moves.
        #[arg(long)]
        from: String,
        /// The server that takes it (in the map, holding no copy of the partition).
        #[arg(long)]
        to: String,
        /// Wait until the destination votes in the partition.
        #[arg(long)]
        wait: bool,
        /// Bound on `--wait`.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Remove a shard server that holds nothing (drain it first).
    RemoveShard {
        /// The server to remove.
        #[arg(long)]
        id: String,
    },
    /// Put a shard server in maintenance (its absence does not start re-replication until the
    /// window ends), or end the window with `--off`.
    Maintenance {
        /// The server.
        #[arg(long)]
        id: String,
        /// How long (e.g. `30m`, `2h`).
        #[arg(long = "for", value_parser = humantime::parse_duration, required_unless_present = "off")]
        duration: Option<Duration>,
        /// End the window now.
        #[arg(long, conflicts_with = "duration")]
        off: bool,
    },
    /// Build a snapshot of the state machine now (every member, or --node).
    Snapshot {
        /// Only this node.
        #[arg(long)]
        node: Option<u64>,
        /// Also purge the Raft log up to the snapshot (lagging followers then install it).
        #[arg(long)]
        purge: bool,
    },
}

/// One sequencer node in `status`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SequencerRow {
    /// Raft node id.
    pub id: u64,
    /// Its address.
    pub address: String,
    /// `leader`, `follower`, `learner`, `candidate`, or `unreachable`.
    pub role: String,
    /// Voter (false: learner).
    pub voter: bool,
    /// Answered its status call.
    pub reachable: bool,
    /// Its `grpc.health.v1` status: `SERVING`, `NOT_SERVING` or `unknown`.
    pub health: String,
    /// Its current term.
    pub term: u64,
    /// Its last log index.
    pub last_log_index: u64,
    /// Its commit index.
    pub committed_index: u64,
    /// Its applied index.
    pub applied_index: u64,
    /// The leader's commit index minus this node's applied index.
    pub lag: u64,
    /// Its latest snapshot's index.
    pub snapshot_index: u64,
    /// Why it could not be asked.
    pub error: String,
}

/// The epochs in `status`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EpochRow {
    /// The epoch appends go to.
    pub open_epoch: u64,
    /// Distinct labels in it so far.
    pub open_epoch_updates: u64,
    /// The latest sealed epoch.
    pub last_sealed_epoch: u64,
    /// The latest committed epoch.
    pub last_committed_epoch: u64,
    /// Seconds since the latest committed epoch was committed (leader clock), if known.
    pub last_commit_age_seconds: Option<f64>,
    /// The epoch the leader's coordinator keeps failing to commit, if any.
    pub commit_stall: Option<CommitStallRow>,
}

/// An epoch the coordinator keeps failing to commit (`coordinator::stall` in the sequencer).
#[derive(Clone, Debug, Default, Serialize)]
pub struct CommitStallRow {
    /// The epoch.
    pub epoch: u64,
    /// Failed attempts so far.
    pub attempts: u64,
    /// Seconds since the first of them (leader clock).
    pub seconds: f64,
    /// Every replica refuses the epoch: retrying will not help.
    pub poisoned: bool,
    /// Why the latest attempt failed.
    pub last_error: String,
}

impl CommitStallRow {
    fn from_pb(stall: &pb::CommitStall, now_ms: u64) -> Self {
        Self {
            epoch: stall.epoch,
            attempts: stall.attempts,
            seconds: now_ms.saturating_sub(stall.since_ms) as f64 / 1000.0,
            poisoned: stall.poisoned,
            last_error: stall.last_error.clone(),
        }
    }
}

/// Everything `ktd admin status` shows.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ClusterReport {
    /// The leader (0: none known).
    pub leader_id: u64,
    /// The leader's term.
    pub term: u64,
    /// Voter sets: two while a membership change is in joint consensus.
    pub voter_sets: Vec<Vec<u64>>,
    /// Every member.
    pub sequencers: Vec<SequencerRow>,
    /// Epochs as the leader applied them.
    pub epochs: EpochRow,
    /// The shard map's version.
    pub shard_map_version: u64,
    /// Voting replicas per partition.
    pub replication_factor: u8,
    /// Every shard server in the shard map.
    pub shards: Vec<ShardRow>,
    /// Every partition's replica set.
    pub partitions: Vec<PartitionRow>,
    /// Partition copies moving between servers (balancer, drain, replace, repair).
    pub moves: Vec<shards::MoveRow>,
    /// Sealed batches the sequencer retains for lagging replicas.
    pub retention: Option<RetentionRow>,
    /// Why the cluster status is incomplete (no leader, no shard map).
    pub errors: Vec<String>,
}

impl ClusterReport {
    /// What `status --check` fails on.
    pub fn problems(&self, max_lag: u64, max_commit_delay: std::time::Duration) -> Vec<String> {
        let mut problems = self.errors.clone();
        let epochs = &self.epochs;
        if let Some(stall) = &epochs.commit_stall
            && stall.poisoned
        {
            problems.push(format!(
                "epoch {} is poisoned: every shard replica refuses it ({} attempts over {:.0} s; \
                 runbook \"An epoch does not commit\"): {}",
                stall.epoch, stall.attempts, stall.seconds, stall.last_error
            ));
        }
        if epochs.last_sealed_epoch > epochs.last_committed_epoch
            && let Some(age) = epochs.last_commit_age_seconds
            && age > max_commit_delay.as_secs_f64()
        {
            problems.push(format!(
                "epochs {}..={} are sealed but not committed, and the last commit was {age:.0} s ago \
                 (a shard cannot build them; see the sequencer leader's log)",
                epochs.last_committed_epoch + 1,
                epochs.last_sealed_epoch
            ));
        }
        if self.leader_id == 0 {
            problems.push("no sequencer leader".into());
        }
        if self.voter_sets.len() > 1 {
            problems.push(format!(
                "membership in joint consensus: {:?}",
                self.voter_sets
            ));
        }
        for node in &self.sequencers {
            if !node.reachable {
                problems.push(format!("sequencer {} unreachable: {}", node.id, node.error));
            } else if node.health != "SERVING" {
                problems.push(format!("sequencer {} is {}", node.id, node.health));
            } else if node.lag > max_lag {
                problems.push(format!(
                    "sequencer {} lags {} entries behind the leader",
                    node.id, node.lag
                ));
            }
        }
        problems.extend(shards::problems(
            &self.shards,
            &self.partitions,
            self.replication_factor,
        ));
        if let Some(retention) = &self.retention {
            problems.extend(retention.problems());
        }
        problems
    }
}

/// `ktd admin retention …`.
#[derive(Debug, clap::Subcommand)]
pub enum RetentionCommand {
    /// The window, the pins and the safe epoch (the oldest readable epoch).
    Show {
        /// `table` or `json`.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Keep history for `forever`, `N` epochs (`500e`) or a duration (`30d`, `12h`). A shorter
    /// window lets the safe epoch move up at once; a longer one never brings pruned epochs back.
    SetWindow {
        /// `forever`, `<N>e` or a duration.
        window: String,
    },
    /// Keep epoch `--epoch` and everything after it readable until released or `--for` passes
    /// (an operator hold: an investigation, a slow auditor, a manual backup).
    Hold {
        /// The pin's id (reusing an id replaces that pin).
        #[arg(long)]
        id: String,
        /// The oldest epoch to keep readable (default: the safe epoch now).
        #[arg(long)]
        epoch: Option<u64>,
        /// How long the hold lasts.
        #[arg(long = "for", default_value = "24h", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Why (shown by `show` and in the stale-pin alert's runbook).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Remove a hold (or any pin) by id.
    Release {
        /// The pin's id.
        #[arg(long)]
        id: String,
    },
    /// Register an auditor: keep its newest verified epoch readable (pin `auditor-<name>`),
    /// renewed every `--interval` while this runs, so pruning never outruns it. The pin moves
    /// only on a signed head with the committed root; a fork or a reported violation leaves
    /// it where it was and is reported.
    FollowAuditor {
        /// Which auditor, how often, for how long.
        #[command(flatten)]
        options: auditor_pin::FollowOptions,
        /// `table` or `json` (one object per round).
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

/// Parses a retention window: `forever`, `<N>e` (epochs) or a duration.
pub fn parse_window(text: &str) -> Result<pb::RetentionWindow, AdminError> {
    use pb::retention_window::Kind;
    let text = text.trim();
    let kind = if text == "forever" {
        Kind::Forever(true)
    } else if let Some(epochs) = text.strip_suffix('e') {
        Kind::Epochs(epochs.parse().map_err(|_| {
            AdminError::Refused(format!("{text:?}: expected N epochs as `<N>e`, e.g. 500e"))
        })?)
    } else {
        let duration = humantime::parse_duration(text).map_err(|error| {
            AdminError::Refused(format!(
                "{text:?} is not `forever`, `<N>e` or a duration ({error})"
            ))
        })?;
        Kind::Millis(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
    };
    Ok(pb::RetentionWindow { kind: Some(kind) })
}

/// A window as `ktd admin retention show` prints it.
pub fn window_text(window: Option<&pb::RetentionWindow>) -> String {
    use pb::retention_window::Kind;
    match window.and_then(|window| window.kind) {
        Some(Kind::Forever(_)) => "forever".into(),
        Some(Kind::Epochs(epochs)) => format!("{epochs} epochs"),
        Some(Kind::Millis(millis)) => {
            humantime::format_duration(Duration::from_millis(millis)).to_string()
        }
        None => "default (30 days)".into(),
    }
}

async fn retention(admin: &Admin, command: RetentionCommand) -> Result<(), AdminError> {
    use pb::retention_command::Kind;
    let (history, output) = match command {
        RetentionCommand::FollowAuditor { options, output } => {
            return follow_auditor(admin, &options, output).await;
        }
        RetentionCommand::Show { output } => (admin.client.retention().await?, output),
        RetentionCommand::SetWindow { window } => {
            let window = parse_window(&window)?;
            let command = pb::RetentionCommand {
                kind: Some(Kind::SetWindow(window)),
                now_ms: 0,
            };
            (admin.client.update_retention(command).await?, Output::Table)
        }
        RetentionCommand::Hold {
            id,
            epoch,
            duration,
            reason,
        } => {
            let epoch = match epoch {
                Some(epoch) => epoch,
                None => admin.client.retention().await?.safe_epoch,
            };
            let history = add_pin(&admin.client, &id, "operator", epoch, duration, reason).await?;
            (history, Output::Table)
        }
        RetentionCommand::Release { id } => (remove_pin(&admin.client, &id).await?, Output::Table),
    };
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&RetentionReport::of(&history))?
        ),
        Output::Table => {
            let report = RetentionReport::of(&history);
            println!(
                "window {}; safe epoch {} (the oldest readable epoch)",
                report.window, report.safe_epoch
            );
            let rows: Vec<Vec<String>> = report
                .pins
                .iter()
                .map(|pin| {
                    vec![
                        pin.id.clone(),
                        pin.owner.clone(),
                        pin.epoch.to_string(),
                        pin.expires_at_ms.to_string(),
                        pin.reason.clone(),
                    ]
                })
                .collect();
            if !rows.is_empty() {
                print!(
                    "{}",
                    table(&["PIN", "OWNER", "EPOCH", "EXPIRES (ms)", "REASON"], &rows)
                );
            }
        }
    }
    Ok(())
}

async fn follow_auditor(
    admin: &Admin,
    options: &auditor_pin::FollowOptions,
    output: Output,
) -> Result<(), AdminError> {
    if options.release {
        let id = auditor_pin::release(&admin.client, options).await?;
        println!("released {id}");
        return Ok(());
    }
    let stop = crate::cli::servers::shutdown_signal();
    auditor_pin::follow(&admin.client, options, stop, |report| match output {
        Output::Json => match serde_json::to_string(report) {
            Ok(line) => println!("{line}"),
            Err(error) => eprintln!("encode JSON: {error}"),
        },
        Output::Table => println!(
            "{}: auditor {} verified epoch {}; pinned epoch {} (safe epoch {}){}",
            report.id,
            report.namespace,
            report.last_verified_epoch,
            report.pin_epoch,
            report.safe_epoch,
            if report.behind_window {
                "; BEHIND THE WINDOW: its next blobs must come from a blob archive"
            } else {
                ""
            }
        ),
    })
    .await
}

/// `ktd admin retention show -o json`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct RetentionReport {
    /// The window, as text.
    pub window: String,
    /// The oldest readable epoch.
    pub safe_epoch: u64,
    /// The pins.
    pub pins: Vec<PinReport>,
}

/// One pin of a [`RetentionReport`].
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct PinReport {
    /// Its id.
    pub id: String,
    /// Who holds it.
    pub owner: String,
    /// The epoch it holds.
    pub epoch: u64,
    /// When it lapses (ms since the Unix epoch).
    pub expires_at_ms: u64,
    /// When it was added (ms since the Unix epoch).
    pub created_at_ms: u64,
    /// Why.
    pub reason: String,
}

impl RetentionReport {
    fn of(history: &pb::HistoryRetention) -> Self {
        Self {
            window: window_text(history.window.as_ref()),
            safe_epoch: history.safe_epoch,
            pins: history
                .pins
                .iter()
                .map(|pin| PinReport {
                    id: pin.id.clone(),
                    owner: pin.owner.clone(),
                    epoch: pin.epoch,
                    expires_at_ms: pin.expires_at_ms,
                    created_at_ms: pin.created_at_ms,
                    reason: pin.reason.clone(),
                })
                .collect(),
        }
    }
}

/// `force-new-cluster`'s report (`-o json`).
#[derive(Debug, Serialize)]
pub struct ForceReport {
    /// Whether the data directory was rewritten (false: `--dry-run`).
    pub written: bool,
    /// What was (or would be) done.
    #[serde(flatten)]
    pub plan: sequencer::raft::force::ForcePlan,
    /// Entries past the last commit the node knew: kept, committed once it leads.
    pub entries_past_known_commit: u64,
}

async fn force_new_cluster(
    data_dir: std::path::PathBuf,
    dry_run: bool,
    output: Output,
) -> Result<(), AdminError> {
    let plan = tokio::task::spawn_blocking(move || {
        sequencer::raft::force::force_new_cluster(&data_dir, dry_run)
    })
    .await
    .map_err(|error| AdminError::Refused(format!("the rewrite task failed: {error}")))??;
    let report = ForceReport {
        written: !dry_run,
        entries_past_known_commit: plan.entries_past_known_commit(),
        plan,
    };
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => println!(
            "{} node {} ({}) the only voter: removed {:?} for good; last log entry {} (term {}),              {} past the last commit it knew (kept, committed once it leads); membership entry              {} at term {}.{}",
            if dry_run { "would make" } else { "made" },
            report.plan.node_id,
            report.plan.address,
            report.plan.removed,
            report.plan.last_log_index,
            report.plan.last_log_term,
            report.entries_past_known_commit,
            report.plan.index,
            report.plan.term,
            if dry_run {
                ""
            } else {
                " Start the node, then add members with `ktd admin add-sequencer`; never start \
                 the removed ones on their old data"
            }
        ),
    }
    Ok(())
}

/// Runs one `ktd admin` command, printing its result on stdout.
pub async fn run(args: AdminArgs) -> Result<(), AdminError> {
    if let AdminCommand::VerifyBackup {
        from,
        epoch,
        to_epoch,
        output,
    } = &args.command
    {
        let report = backup::verify_backup(from, *epoch, *to_epoch).await?;
        match output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            Output::Table => println!(
                "backup of epoch {} verified: root {}; {} epoch records, {} files, {} records, {} \
                 interior nodes re-hashed, {:.1} MiB, {} archived epochs after it, in {:.1} s",
                report.epoch,
                report.root_hash,
                report.epoch_records,
                report.files,
                report.records,
                report.nodes_checked,
                report.bytes as f64 / f64::from(1 << 20),
                report.archived_epochs,
                report.seconds
            ),
        }
        return Ok(());
    }
    if let AdminCommand::ForceNewCluster {
        data_dir,
        dry_run,
        output,
        ..
    } = &args.command
    {
        return force_new_cluster(data_dir.clone(), *dry_run, *output).await;
    }
    let sequencers: Vec<String> = args
        .sequencers
        .iter()
        .map(|addr| sequencer_addr(addr))
        .filter(|addr| !addr.is_empty())
        .collect();
    if sequencers.is_empty() {
        return Err(AdminError::Refused(
            "no sequencer addresses (--sequencers or KTD_SEQUENCERS)".into(),
        ));
    }
    let admin = Admin::new(sequencers);
    match args.command {
        AdminCommand::Status {
            output,
            check,
            max_lag,
            max_commit_delay,
        } => {
            let report = admin.status().await;
            match output {
                Output::Table => print!("{}", render_table(&report)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
            let problems = report.problems(max_lag, max_commit_delay);
            if check && !problems.is_empty() {
                return Err(AdminError::Unhealthy(problems.join("; ")));
            }
        }
        AdminCommand::TransferLeader { to } => {
            let (from, to) = admin.transfer_leader(to).await?;
            println!("leader: node {from} -> node {to}");
        }
        AdminCommand::AddSequencer { id, address } => {
            let voters = admin.add_sequencer(id, &sequencer_addr(&address)).await?;
            println!("node {id} added as a voter; voters {voters:?}");
        }
        AdminCommand::RemoveSequencer { id } => {
            let voters = admin.remove_sequencer(id).await?;
            println!(
                "node {id} removed; voters {voters:?}. Stop it and delete its data directory; never reuse id {id}"
            );
        }
        AdminCommand::Seal => match admin.seal().await? {
            Some(record) => println!(
                "sealed and committed epoch {} ({} updates) root {}",
                record.epoch,
                record.updates,
                hex::encode(&record.root_hash)
            ),
            None => println!("nothing to seal: the open epoch has no updates"),
        },
        AdminCommand::Retention(command) => retention(&admin, command).await?,
        // Answered above, before any sequencer address is needed.
        AdminCommand::VerifyBackup { .. } | AdminCommand::ForceNewCluster { .. } => {}
        AdminCommand::Backup {
            to,
            full,
            pin_for,
            auditor,
            output,
        } => {
            let report =
                backup::backup(&admin.client, &to, pin_for, full, auditor.as_deref()).await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Output::Table => println!(
                    "backup of epoch {} written to {} ({}): root {}; {:.1} MiB new, {:.1} MiB in \
                     the chain, {:.1} s",
                    report.epoch,
                    to.display(),
                    match report.parent_epoch {
                        Some(parent) => format!("incremental over epoch {parent}"),
                        None => "full".into(),
                    },
                    report.root_hash,
                    report.bytes_written as f64 / f64::from(1 << 20),
                    report.chain_bytes as f64 / f64::from(1 << 20),
                    report.seconds
                ),
            }
        }
        AdminCommand::Archive { options, output } => {
            let stop = crate::cli::servers::shutdown_signal();
            let report = archive::archive(&admin.client, &admin.sequencers, &options, stop).await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Output::Table => println!(
                    "archived epochs {}..={} in {}: {} new ({:.1} MiB) in {:.1} s",
                    report.first_epoch,
                    report.last_epoch,
                    archive::archive_dir(&options.to).display(),
                    report.epochs_written,
                    report.bytes_written as f64 / f64::from(1 << 20),
                    report.seconds
                ),
            }
        }
        AdminCommand::Restore { options, output } => {
            let report = backup::restore(&admin.client, options).await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Output::Table => println!(
                    "restored epoch {} (root {}): backup of epoch {} and {} archived epochs \
                     replayed; {} partition replicas hold the backup's epoch; verified {} records \
                     in {:.1} s, copied in {:.1} s, replayed in {:.1} s, {:.1} s in all",
                    report.epoch,
                    report.root_hash,
                    report.backup_epoch,
                    report.replayed_epochs,
                    report.replicas,
                    report.verified.records,
                    report.verified.seconds,
                    report.copy_seconds,
                    report.replay_seconds,
                    report.seconds
                ),
            }
        }
        AdminCommand::AddShard {
            id,
            address,
            rebalance,
            wait,
            timeout,
        } => {
            let edit = shards::MapEdit::Add {
                server: shard_server(&id, &address),
                rebalance,
            };
            let map = admin.change_map(&edit).await?;
            if rebalance {
                println!(
                    "shard server {id} added (map version {}); {} copies moving onto it",
                    map.version(),
                    map.assignments(&id).len()
                );
            } else {
                println!(
                    "shard server {id} added (map version {}); the balancer moves copies onto \
                     it (`ktd admin status` shows the moves)",
                    map.version()
                );
            }
            if wait {
                let map = admin
                    .wait_for_map(
                        "the moved copies to be promoted",
                        timeout,
                        shards::no_learners,
                    )
                    .await?;
                println!(
                    "{id} votes in partitions {} (map version {})",
                    ranges(
                        &map.assignments(&id)
                            .iter()
                            .map(|(p, _)| *p)
                            .collect::<Vec<_>>()
                    ),
                    map.version()
                );
            }
        }
        AdminCommand::DrainShard { id, wait, timeout } => {
            let map = admin
                .change_map(&shards::MapEdit::Drain(id.clone()))
                .await?;
            println!(
                "draining {id} (map version {}): {} copies moving off it",
                map.version(),
                map.assignments(&id).len()
            );
            if wait {
                finish_move(&admin, &id, timeout).await?;
            }
        }
        AdminCommand::ReplaceShard {
            id,
            with,
            address,
            wait,
            timeout,
        } => {
            let current = shards::read_map(&admin.client).await?;
            let new = match (current.server(&with), address) {
                (Some(server), None) => server.clone(),
                (_, Some(address)) => shard_server(&with, &address),
                (None, None) => {
                    return Err(AdminError::Refused(format!(
                        "{with} is not in the shard map; give its --address"
                    )));
                }
            };
            let edit = shards::MapEdit::Replace {
                old: id.clone(),
                new,
            };
            let map = admin.change_map(&edit).await?;
            println!(
                "replacing {id} with {with} (map version {}): {} copies moving",
                map.version(),
                map.assignments(&with).len()
            );
            if wait {
                finish_move(&admin, &id, timeout).await?;
            }
        }
        AdminCommand::MovePartition {
            partition,
            from,
            to,
            wait,
            timeout,
        } => {
            let edit = shards::MapEdit::Move {
                partition,
                from: from.clone(),
                to: to.clone(),
            };
            let map = admin.change_map(&edit).await?;
            println!(
                "moving partition {partition} from {from} to {to} (map version {})",
                map.version()
            );
            if wait {
                let map = admin
                    .wait_for_map(
                        &format!("{to} to vote in partition {partition}"),
                        timeout,
                        |map: &ktd_core::ShardMap| {
                            map.replicas(partition).role_of(&to)
                                == Some(ktd_core::shard_map::Role::Voter)
                        },
                    )
                    .await?;
                println!(
                    "partition {partition} moved: voters {} (map version {})",
                    map.replicas(partition).voters.join(","),
                    map.version()
                );
            }
        }
        AdminCommand::RemoveShard { id } => {
            let map = admin
                .change_map(&shards::MapEdit::Remove(id.clone()))
                .await?;
            println!(
                "shard server {id} removed (map version {}); stop it and delete its data directory",
                map.version()
            );
        }
        AdminCommand::Maintenance { id, duration, off } => {
            let until_ms = match (off, duration) {
                (true, _) | (false, None) => 0,
                (false, Some(duration)) => now_ms() + duration.as_millis() as u64,
            };
            let map = admin
                .change_map(&shards::MapEdit::Maintenance {
                    id: id.clone(),
                    until_ms,
                })
                .await?;
            if until_ms == 0 {
                println!("{id}: maintenance ended (map version {})", map.version());
            } else {
                println!(
                    "{id}: in maintenance for {} (map version {}); its absence does not start \
                     re-replication until then",
                    humantime::format_duration(Duration::from_secs((until_ms - now_ms()) / 1000)),
                    map.version()
                );
            }
        }
        AdminCommand::Snapshot { node, purge } => {
            for (id, address, answer) in admin.snapshot(node, purge).await? {
                println!(
                    "node {id} ({address}): snapshot at log index {}, log purged to {}",
                    answer.snapshot_index, answer.purged_index
                );
            }
        }
    }
    Ok(())
}

/// A shard server entry for the map (`HOST:PORT` gets `http://`).
fn shard_server(id: &str, address: &str) -> ktd_core::shard_map::ShardServer {
    let address = address.trim();
    ktd_core::shard_map::ShardServer {
        id: id.to_string(),
        address: if address.contains("://") {
            address.to_string()
        } else {
            format!("http://{address}")
        },
        maintenance_until_ms: 0,
        draining: false,
    }
}

/// Waits until `id` holds nothing, then removes it from the map.
async fn finish_move(admin: &Admin, id: &str, timeout: Duration) -> Result<(), AdminError> {
    admin
        .wait_for_map(&format!("every copy on {id} to move"), timeout, |map| {
            shards::moved_off(map, id)
        })
        .await?;
    let map = admin
        .change_map(&shards::MapEdit::Remove(id.to_string()))
        .await?;
    println!(
        "{id} holds nothing and left the map (version {}); stop it and delete its data directory",
        map.version()
    );
    Ok(())
}

/// `http://host:port` or `host:port` → `host:port` (the sequencer client adds the scheme).
fn sequencer_addr(addr: &str) -> String {
    let addr = addr.trim();
    addr.strip_prefix("http://").unwrap_or(addr).to_string()
}

/// Adds (or renews) history pin `id`: `epoch` stays readable for `hold_for` from now (a
/// renewal at the same epoch keeps the pin's age). The record as it is afterwards.
pub(crate) async fn add_pin(
    client: &SequencerClient,
    id: &str,
    owner: &str,
    epoch: u64,
    hold_for: Duration,
    reason: String,
) -> Result<pb::HistoryRetention, AdminError> {
    let pin = pb::HistoryPin {
        id: id.to_owned(),
        owner: owner.to_owned(),
        epoch,
        expires_at_ms: now_ms()
            .saturating_add(u64::try_from(hold_for.as_millis()).unwrap_or(u64::MAX)),
        reason,
        created_at_ms: 0,
    };
    Ok(client
        .update_retention(pb::RetentionCommand {
            kind: Some(pb::retention_command::Kind::AddPin(pin)),
            now_ms: 0,
        })
        .await?)
}

/// Removes history pin `id` (nothing if there is none). The record as it is afterwards.
pub(crate) async fn remove_pin(
    client: &SequencerClient,
    id: &str,
) -> Result<pb::HistoryRetention, AdminError> {
    Ok(client
        .update_retention(pb::RetentionCommand {
            kind: Some(pb::retention_command::Kind::RemovePin(id.to_owned())),
            now_ms: 0,
        })
        .await?)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// The `grpc.health.v1` status of the whole server at `addr` (`""`).
async fn health_of(addr: &str) -> String {
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let check = async {
        let channel = ktd_rpc::security::endpoint(&url)
            .map_err(|error| error.to_string())?
            .connect_timeout(PROBE)
            .connect()
            .await
            .map_err(|error| error.to_string())?;
        let answer = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|status| status.message().to_string())?;
        Ok::<_, String>(answer.into_inner().status())
    };
    match tokio::time::timeout(PROBE, check).await {
        Ok(Ok(ServingStatus::Serving)) => "SERVING".into(),
        Ok(Ok(ServingStatus::NotServing)) => "NOT_SERVING".into(),
        Ok(Ok(_)) | Ok(Err(_)) | Err(_) => "unknown".into(),
    }
}

/// A client of one cluster's admin surface.
#[derive(Clone, Debug)]
pub struct Admin {
    client: SequencerClient,
    sequencers: Vec<String>,
}

impl Admin {
    /// An admin client for the cluster whose sequencers include `sequencers` (`HOST:PORT`).
    pub fn new(sequencers: Vec<String>) -> Self {
        let client = SequencerClient::with_options(
            sequencers.clone(),
            ClientOptions {
                total_timeout: Duration::from_secs(10),
                attempt_timeout: Duration::from_secs(3),
                ..ClientOptions::default()
            },
        );
        Self { client, sequencers }
    }

    /// The whole cluster's status. Never fails: what could not be learnt is in `errors` and in
    /// the rows' `error` fields.
    pub async fn status(&self) -> ClusterReport {
        let mut report = ClusterReport::default();
        match self.client.cluster_status().await {
            Ok(cluster) => self.fill_from_leader(&mut report, cluster).await,
            Err(error) => {
                report.errors.push(format!("no leader answered: {error}"));
                for addr in &self.sequencers {
                    report.sequencers.push(self.row_without_leader(addr).await);
                }
            }
        }
        self.fill_shards(&mut report).await;
        report
    }

    async fn fill_from_leader(
        &self,
        report: &mut ClusterReport,
        cluster: pb::ClusterStatusResponse,
    ) {
        report.leader_id = cluster.leader_id;
        report.term = cluster.term;
        report.voter_sets = cluster
            .voter_sets
            .iter()
            .map(|set| set.node_ids.clone())
            .collect();
        let leader_status = cluster
            .members
            .iter()
            .find(|member| member.node_id == cluster.leader_id)
            .and_then(|member| member.status.clone())
            .unwrap_or_default();
        let healths = futures::future::join_all(
            cluster
                .members
                .iter()
                .map(|member| health_of(&member.address)),
        )
        .await;
        for (member, health) in cluster.members.iter().zip(healths) {
            let mut row = SequencerRow {
                id: member.node_id,
                address: member.address.clone(),
                voter: member.voter,
                health,
                error: member.error.clone(),
                ..SequencerRow::default()
            };
            match &member.status {
                Some(status) => {
                    row.reachable = true;
                    row.role = if member.node_id == cluster.leader_id {
                        "leader".into()
                    } else if !member.voter {
                        "learner".into()
                    } else {
                        status.state.clone()
                    };
                    row.term = status.term;
                    row.last_log_index = status.last_log_index;
                    row.committed_index = status.committed_index;
                    row.applied_index = status.applied_index;
                    row.snapshot_index = status.snapshot_index;
                    row.lag = leader_status
                        .committed_index
                        .saturating_sub(status.applied_index);
                }
                None => row.role = "unreachable".into(),
            }
            report.sequencers.push(row);
        }
        report.epochs = EpochRow {
            open_epoch: leader_status.open_epoch,
            open_epoch_updates: leader_status.open_epoch_updates,
            last_sealed_epoch: leader_status.last_sealed_epoch,
            last_committed_epoch: leader_status.last_committed_epoch,
            last_commit_age_seconds: None,
            commit_stall: leader_status
                .commit_stall
                .as_ref()
                .map(|stall| CommitStallRow::from_pb(stall, now_ms())),
        };
        report.retention = cluster
            .retention
            .as_ref()
            .map(|retention| RetentionRow::from_pb(retention, now_ms()));
        match self.client.get_epoch(None).await {
            Ok(record) if record.committed_at_ms > 0 => {
                report.epochs.last_commit_age_seconds =
                    Some(now_ms().saturating_sub(record.committed_at_ms) as f64 / 1000.0);
            }
            Ok(_) => {}
            Err(error) => report
                .errors
                .push(format!("latest committed epoch: {error}")),
        }
    }

    async fn row_without_leader(&self, addr: &str) -> SequencerRow {
        let mut row = SequencerRow {
            address: addr.to_string(),
            health: health_of(addr).await,
            ..SequencerRow::default()
        };
        match tokio::time::timeout(PROBE, self.client.node_status_at(addr)).await {
            Ok(Ok(status)) => {
                row.id = status.node_id;
                row.reachable = true;
                row.role = status.state;
                row.term = status.term;
                row.last_log_index = status.last_log_index;
                row.committed_index = status.committed_index;
                row.applied_index = status.applied_index;
                row.snapshot_index = status.snapshot_index;
            }
            Ok(Err(error)) => {
                row.role = "unreachable".into();
                row.error = error.to_string();
            }
            Err(_) => {
                row.role = "unreachable".into();
                row.error = format!("no answer within {PROBE:?}");
            }
        }
        row
    }

    async fn fill_shards(&self, report: &mut ClusterReport) {
        let map = match shards::read_map(&self.client).await {
            Ok(map) => map,
            Err(error) => {
                report.errors.push(format!("shard map: {error}"));
                return;
            }
        };
        let shards = shards::report(&map, report.epochs.last_committed_epoch).await;
        report.shard_map_version = shards.version;
        report.replication_factor = shards.replication_factor;
        report.shards = shards.servers;
        report.partitions = shards.partitions;
        report.moves = shards.moves;
    }

    /// Applies a shard-map change (compare-and-set, retried on concurrent changes).
    pub async fn change_map(
        &self,
        edit: &shards::MapEdit,
    ) -> Result<ktd_core::ShardMap, AdminError> {
        shards::change_map(&self.client, edit).await
    }

    /// Waits, at most `limit`, until `done` holds for the shard map.
    pub async fn wait_for_map(
        &self,
        what: &str,
        limit: Duration,
        done: impl Fn(&ktd_core::ShardMap) -> bool,
    ) -> Result<ktd_core::ShardMap, AdminError> {
        shards::wait_for_map(&self.client, what, limit, done).await
    }

    /// Hands leadership to `to` (or the most caught-up other voter) and waits, bounded, until
    /// that node leads. Returns (old leader, new leader).
    pub async fn transfer_leader(&self, to: Option<u64>) -> Result<(u64, u64), AdminError> {
        let before = self.client.cluster_status().await?;
        if to == Some(before.leader_id) {
            return Ok((before.leader_id, before.leader_id));
        }
        if let Some(to) = to
            && !before
                .members
                .iter()
                .any(|member| member.node_id == to && member.voter)
        {
            return Err(AdminError::Refused(format!("node {to} is not a voter")));
        }
        let new_leader = self.client.transfer_leader(to).await?;
        let expected = to.unwrap_or(new_leader);
        self.wait_for(&format!("node {expected} to lead"), || async {
            let status = self.client.cluster_status().await.ok()?;
            (status.leader_id == expected).then_some(())
        })
        .await?;
        Ok((before.leader_id, expected))
    }

    /// Adds node `id` at `address` as a learner, waits until it has caught up, promotes it.
    /// Returns the voters afterwards.
    pub async fn add_sequencer(&self, id: u64, address: &str) -> Result<Vec<u64>, AdminError> {
        let before = self.client.cluster_status().await?;
        if before.members.iter().any(|member| member.node_id == id) {
            return Err(AdminError::Refused(format!(
                "node {id} is already a member; a new node needs a new id"
            )));
        }
        let status = tokio::time::timeout(PROBE, self.client.node_status_at(address))
            .await
            .map_err(|_| AdminError::Timeout {
                what: format!("the node at {address} to answer"),
                limit: PROBE,
            })??;
        if status.node_id != id {
            return Err(AdminError::Refused(format!(
                "the node at {address} is node {}, not node {id}",
                status.node_id
            )));
        }
        if status.initialized {
            return Err(AdminError::Refused(format!(
                "the node at {address} already belongs to a cluster; start it with an empty data directory and no --init"
            )));
        }
        self.client
            .add_learner(id, address.to_string(), true)
            .await?;
        // `wait` returned once the learner had the membership entry; wait until it has applied
        // what the leader had committed, so the promotion does not stall on it.
        self.wait_for(&format!("learner {id} to catch up"), || async {
            let status = self.client.cluster_status().await.ok()?;
            let leader_commit = status
                .members
                .iter()
                .find(|member| member.node_id == status.leader_id)?
                .status
                .as_ref()?
                .committed_index;
            let learner = status
                .members
                .iter()
                .find(|member| member.node_id == id)?
                .status
                .as_ref()?
                .applied_index;
            (leader_commit.saturating_sub(learner) <= DEFAULT_MAX_LAG).then_some(())
        })
        .await?;
        let response = self.client.promote(BTreeSet::from([id])).await?;
        Ok(voters(&response.voter_sets))
    }

    /// Removes node `id` (moving leadership away first if it leads). Returns the voters after.
    pub async fn remove_sequencer(&self, id: u64) -> Result<Vec<u64>, AdminError> {
        let before = self.client.cluster_status().await?;
        if !before.members.iter().any(|member| member.node_id == id) {
            return Err(AdminError::Refused(format!("node {id} is not a member")));
        }
        if before.leader_id == id {
            self.transfer_leader(None).await?;
        }
        let response = self.client.remove_node(id).await?;
        Ok(voters(&response.voter_sets))
    }

    /// Seals the open epoch and waits until it commits; `None` if it had no updates.
    pub async fn seal(&self) -> Result<Option<pb::EpochRecord>, AdminError> {
        let sealed = match self.client.seal(None).await {
            Ok(sealed) => sealed,
            Err(error) if error.code() == tonic::Code::FailedPrecondition => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        self.wait_for(&format!("epoch {} to commit", sealed.epoch), || async {
            let record = self.client.get_epoch(None).await.ok()?;
            (record.epoch >= sealed.epoch).then_some(())
        })
        .await?;
        Ok(Some(self.client.get_epoch(Some(sealed.epoch)).await?))
    }

    /// Builds a snapshot on node `node` (or on every reachable member). Returns each node's id,
    /// address and answer.
    pub async fn snapshot(
        &self,
        node: Option<u64>,
        purge: bool,
    ) -> Result<Vec<(u64, String, pb::TriggerSnapshotResponse)>, AdminError> {
        let status = self.client.cluster_status().await?;
        let targets: Vec<(u64, String)> = status
            .members
            .iter()
            .filter(|member| node.is_none_or(|node| node == member.node_id))
            .filter(|member| node.is_some() || member.status.is_some())
            .map(|member| (member.node_id, member.address.clone()))
            .collect();
        if targets.is_empty() {
            return Err(AdminError::Refused(match node {
                Some(node) => format!("node {node} is not a member"),
                None => "no member answered".into(),
            }));
        }
        let mut answers = Vec::new();
        for (id, address) in targets {
            let answer = self.client.trigger_snapshot_at(&address, purge).await?;
            answers.push((id, address, answer));
        }
        Ok(answers)
    }

    /// Polls `check` every 100 ms until it gives a value, for at most [`WAIT`].
    async fn wait_for<T, F, Fut>(&self, what: &str, mut check: F) -> Result<T, AdminError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let started = Instant::now();
        loop {
            if let Some(value) = check().await {
                return Ok(value);
            }
            if started.elapsed() > WAIT {
                return Err(AdminError::Timeout {
                    what: what.to_string(),
                    limit: WAIT,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn voters(voter_sets: &[pb::VoterSet]) -> Vec<u64> {
    let set: BTreeSet<u64> = voter_sets
        .iter()
        .flat_map(|set| set.node_ids.iter().copied())
        .collect();
    set.into_iter().collect()
}

/// `[0,1,2,3,5]` → `0-3,5`.
/// Bytes as MiB with one decimal (`-` for none).
fn mib(bytes: u64) -> String {
    if bytes == 0 {
        "-".into()
    } else {
        format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
    }
}

fn ranges(partitions: &[u32]) -> String {
    let mut sorted = partitions.to_vec();
    sorted.sort_unstable();
    let mut parts: Vec<String> = Vec::new();
    let mut index = 0;
    while index < sorted.len() {
        let start = sorted[index];
        let mut end = start;
        while index + 1 < sorted.len() && sorted[index + 1] == end + 1 {
            index += 1;
            end = sorted[index];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        index += 1;
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(",")
    }
}

/// Left-aligned columns separated by two spaces.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|header| header.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        format!("{}\n", text.join("  ").trim_end())
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// The status report as aligned tables (sequencers, epochs, shards, then any errors).
pub fn render_table(report: &ClusterReport) -> String {
    let mut out = String::new();
    let leader = if report.leader_id == 0 {
        "none".to_string()
    } else {
        report.leader_id.to_string()
    };
    out.push_str(&format!(
        "SEQUENCERS  leader {leader}, term {}, voters {:?}{}\n",
        report.term,
        report.voter_sets,
        if report.voter_sets.len() > 1 {
            " (JOINT)"
        } else {
            ""
        }
    ));
    let rows: Vec<Vec<String>> = report
        .sequencers
        .iter()
        .map(|node| {
            vec![
                node.id.to_string(),
                node.address.clone(),
                node.role.clone(),
                node.health.clone(),
                node.term.to_string(),
                node.last_log_index.to_string(),
                node.committed_index.to_string(),
                node.applied_index.to_string(),
                node.lag.to_string(),
                node.snapshot_index.to_string(),
                node.error.clone(),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "ID", "ADDRESS", "ROLE", "HEALTH", "TERM", "LAST-LOG", "COMMIT", "APPLIED", "LAG",
            "SNAPSHOT", "ERROR",
        ],
        &rows,
    ));
    let epochs = &report.epochs;
    out.push_str(&format!(
        "\nEPOCHS  open {} ({} updates), last sealed {}, last committed {}, last commit {}\n",
        epochs.open_epoch,
        epochs.open_epoch_updates,
        epochs.last_sealed_epoch,
        epochs.last_committed_epoch,
        match epochs.last_commit_age_seconds {
            Some(age) => format!("{age:.1}s ago"),
            None => "age unknown".into(),
        }
    ));
    if let Some(stall) = &epochs.commit_stall {
        out.push_str(&format!(
            "        COMMIT {} epoch {}: {} failed attempts over {:.0}s; last error: {}\n",
            if stall.poisoned {
                "POISONED"
            } else {
                "RETRYING"
            },
            stall.epoch,
            stall.attempts,
            stall.seconds,
            stall.last_error
        ));
    }
    out.push_str(&format!(
        "\nSHARD SERVERS  map version {}, replication factor {}\n",
        report.shard_map_version, report.replication_factor
    ));
    let now = now_ms();
    let rows: Vec<Vec<String>> = report
        .shards
        .iter()
        .map(|shard| {
            vec![
                shard.id.clone(),
                shard.address.clone(),
                ranges(&shard.voter_of),
                ranges(&shard.learner_of),
                ranges(&shard.quarantined_in),
                if shard.reachable { "yes" } else { "NO" }.into(),
                shard.health.clone(),
                shard.built_epoch.to_string(),
                shard.lag_epochs.to_string(),
                if shard.maintenance_until_ms > now {
                    format!("{}s", (shard.maintenance_until_ms - now) / 1000)
                } else {
                    "-".into()
                },
                mib(shard.bytes),
                if shard.draining { "yes" } else { "-" }.into(),
                ranges(&shard.orphaned),
                shard.error.clone(),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "ID",
            "ADDRESS",
            "VOTER",
            "LEARNER",
            "QUARANTINED",
            "REACHABLE",
            "HEALTH",
            "BUILT",
            "LAG",
            "MAINTENANCE",
            "BYTES",
            "DRAINING",
            "MOVED-AWAY",
            "ERROR",
        ],
        &rows,
    ));
    out.push_str("\nPARTITIONS  replicas (server:role:lag; ? = not reported)\n");
    let rows: Vec<Vec<String>> = report
        .partitions
        .iter()
        .map(|partition| {
            let replicas: Vec<String> = partition
                .replicas
                .iter()
                .map(|cell| {
                    format!(
                        "{}:{}:{}",
                        cell.server,
                        cell.role,
                        cell.lag_epochs
                            .map_or_else(|| "?".to_string(), |lag| lag.to_string())
                    )
                })
                .collect();
            vec![
                partition.partition.to_string(),
                format!("{}/{}", partition.up_to_date_voters, partition.majority),
                replicas.join(" "),
            ]
        })
        .collect();
    out.push_str(&table(&["P", "UP-TO-DATE/MAJORITY", "REPLICAS"], &rows));
    if !report.moves.is_empty() {
        out.push_str(&format!(
            "\nMOVES  {} in flight (copy, catch up, promote; the source deletes its copy after its grace period)\n",
            report.moves.len()
        ));
        let rows: Vec<Vec<String>> = report
            .moves
            .iter()
            .map(|step| {
                vec![
                    step.partition.to_string(),
                    step.from.clone(),
                    step.to.clone(),
                    step.state.clone(),
                    format!(
                        "{} of ~{}",
                        mib(step.copied_bytes),
                        mib(step.expected_bytes)
                    ),
                    step.bytes_per_second
                        .map_or_else(|| "-".to_string(), |rate| format!("{}/s", mib(rate as u64))),
                    step.eta_seconds
                        .map_or_else(|| "-".to_string(), |eta| format!("{eta:.0}s")),
                ]
            })
            .collect();
        out.push_str(&table(
            &["P", "FROM", "TO", "STATE", "COPIED", "RATE", "ETA"],
            &rows,
        ));
    }
    if let Some(retention) = &report.retention {
        out.push_str(&format!(
            "\nBATCH RETENTION  {} batches, {} of {} bytes, oldest {} (bound {:.0}s), oldest pin {}\n",
            retention.batches,
            retention.bytes,
            retention.max_bytes,
            retention
                .oldest_age_seconds
                .map_or_else(|| "-".to_string(), |age| format!("{age:.0}s")),
            retention.max_age_seconds,
            retention
                .oldest_pin
                .as_ref()
                .map_or_else(|| "-".to_string(), |(server, epoch)| format!("{server} at epoch {epoch}")),
        ));
    }
    for error in &report.errors {
        out.push_str(&format!("error: {error}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_fails_on_epochs_stuck_behind_a_failing_shard() {
        let mut report = ClusterReport {
            leader_id: 1,
            epochs: EpochRow {
                open_epoch: 64,
                last_sealed_epoch: 63,
                last_committed_epoch: 2,
                last_commit_age_seconds: Some(172.0),
                ..EpochRow::default()
            },
            ..ClusterReport::default()
        };
        let limit = std::time::Duration::from_secs(60);
        let problems = report.problems(DEFAULT_MAX_LAG, limit);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("epochs 3..=63"), "{problems:?}");
        // Recent commits, or nothing sealed: fine.
        report.epochs.last_commit_age_seconds = Some(5.0);
        assert!(report.problems(DEFAULT_MAX_LAG, limit).is_empty());
        report.epochs.last_commit_age_seconds = Some(500.0);
        report.epochs.last_sealed_epoch = 2;
        assert!(report.problems(DEFAULT_MAX_LAG, limit).is_empty());
    }

    #[test]
    fn check_fails_on_a_poisoned_epoch_and_status_names_it_with_the_replicas_error() {
        let stall = |poisoned| CommitStallRow {
            epoch: 3,
            attempts: 7,
            seconds: 12.0,
            poisoned,
            last_error: "shard s1 answered OutOfRange: message too large".into(),
        };
        let mut report = ClusterReport {
            leader_id: 1,
            epochs: EpochRow {
                open_epoch: 4,
                last_sealed_epoch: 3,
                last_committed_epoch: 2,
                last_commit_age_seconds: Some(12.0),
                commit_stall: Some(stall(false)),
                ..EpochRow::default()
            },
            ..ClusterReport::default()
        };
        let limit = std::time::Duration::from_secs(60);
        // Retrying for a short while is not a problem yet; the text still says so.
        assert!(report.problems(DEFAULT_MAX_LAG, limit).is_empty());
        assert!(render_table(&report).contains("COMMIT RETRYING epoch 3: 7 failed attempts"));
        report.epochs.commit_stall = Some(stall(true));
        let problems = report.problems(DEFAULT_MAX_LAG, limit);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("epoch 3 is poisoned"), "{problems:?}");
        assert!(problems[0].contains("message too large"), "{problems:?}");
        assert!(render_table(&report).contains("COMMIT POISONED epoch 3"));
    }
}
