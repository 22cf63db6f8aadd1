//! The shard half of `ktd admin`: per-server and per-partition replica status, batch retention,
//! and the shard-map changes an operator makes (add, drain, replace, remove a shard server;
//! maintenance windows).
//!
//! Map changes are compare-and-set on the map version (`SetShardMap{expected_version}`): the
//! command reads the map, applies a pure change from `ktd_core::shard_map` (which never removes
//! a serving copy: it adds learners that replace voters; the coordinator bootstraps, replays and
//! promotes them), and retries on a concurrent change (the coordinator edits the map too:
//! quarantines, promotions). Waiting for the moves is bounded (`--timeout`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ktd_core::ShardMap;
use ktd_core::shard_map::{Role, ShardServer};
use sequencer::{SequencerClient, pb};
use serde::Serialize;

use super::{AdminError, PROBE, health_of, now_ms};

/// Attempts of one compare-and-set map change before giving up.
const CAS_ATTEMPTS: usize = 20;
/// Fraction of a retention bound at which `status --check` warns (the alert uses the same).
pub const RETENTION_WARN_FRACTION: f64 = 0.8;

/// One shard server in `status`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ShardRow {
    /// Server id.
    pub id: String,
    /// Its address in the shard map.
    pub address: String,
    /// Every partition it holds or builds (any role).
    pub partitions: Vec<u32>,
    /// Partitions where it votes (quarantined ones included).
    pub voter_of: Vec<u32>,
    /// Partitions it is building as a learner.
    pub learner_of: Vec<u32>,
    /// Partitions where it is quarantined.
    pub quarantined_in: Vec<u32>,
    /// Until when it is in maintenance (ms since the Unix epoch; 0: not).
    pub maintenance_until_ms: u64,
    /// Being drained: its copies move away and nothing moves onto it.
    pub draining: bool,
    /// Its estimate of the bytes on disk of the copies the map assigns to it.
    pub bytes: u64,
    /// Copies it still holds that the map moved elsewhere (deleted after its grace period).
    pub orphaned: Vec<u32>,
    /// Answered its status call.
    pub reachable: bool,
    /// Its `grpc.health.v1` status.
    pub health: String,
    /// The latest committed epoch it has seen.
    pub caught_up_epoch: u64,
    /// The lowest built epoch over the partitions it holds.
    pub built_epoch: u64,
    /// Committed epoch − `built_epoch` (how far its slowest copy trails).
    pub lag_epochs: u64,
    /// Reads below this epoch are refused here: its tree history may be pruned.
    pub prune_floor: u64,
    /// Node versions it pruned since it started.
    pub pruned_node_versions: u64,
    /// Why it could not be asked.
    pub error: String,
}

/// One replica of one partition in `status`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReplicaCell {
    /// The server.
    pub server: String,
    /// `voter`, `learner` or `quarantined`.
    pub role: String,
    /// Its built epoch (`None`: not reported — unreachable, or holds no copy yet).
    pub built_epoch: Option<u64>,
    /// Committed epoch − built epoch.
    pub lag_epochs: Option<u64>,
}

/// One partition's replica set in `status`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PartitionRow {
    /// The partition.
    pub partition: u32,
    /// Its replicas: voters, then learners.
    pub replicas: Vec<ReplicaCell>,
    /// Healthy voters that are reachable and built to the committed epoch.
    pub up_to_date_voters: usize,
    /// Voters needed to commit.
    pub majority: usize,
}

/// One partition copy moving between servers (a learner that replaces a voter) in `status`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MoveRow {
    /// The partition.
    pub partition: u32,
    /// The server whose copy is replaced.
    pub from: String,
    /// The server building the new copy.
    pub to: String,
    /// `waiting` (not started), `copying`, `catching up` (copied, replaying epochs) or
    /// `promoting` (up to date; the coordinator promotes it at its next check).
    pub state: String,
    /// Bytes of the copy received so far (while copying).
    pub copied_bytes: u64,
    /// The copy's expected size: the source's estimate of its bytes on disk.
    pub expected_bytes: u64,
    /// Bytes per second received so far.
    pub bytes_per_second: Option<f64>,
    /// Seconds left at that rate.
    pub eta_seconds: Option<f64>,
}

/// Batch retention as the sequencer reports it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RetentionRow {
    /// Retained batches.
    pub batches: u64,
    /// Their bytes.
    pub bytes: u64,
    /// The bound on `bytes`.
    pub max_bytes: u64,
    /// Age of the oldest retained batch (seconds; `None`: nothing retained).
    pub oldest_age_seconds: Option<f64>,
    /// The bound on a batch's age (seconds).
    pub max_age_seconds: f64,
    /// The oldest pin: `(server, durable epoch)`.
    pub oldest_pin: Option<(String, u64)>,
}

impl RetentionRow {
    /// From the sequencer's status answer.
    pub fn from_pb(retention: &pb::BatchRetention, now_ms: u64) -> Self {
        Self {
            batches: retention.batches,
            bytes: retention.bytes,
            max_bytes: retention.max_bytes,
            oldest_age_seconds: (retention.oldest_sealed_at_ms > 0)
                .then(|| now_ms.saturating_sub(retention.oldest_sealed_at_ms) as f64 / 1000.0),
            max_age_seconds: retention.max_age_ms as f64 / 1000.0,
            oldest_pin: (!retention.oldest_pin_server.is_empty()).then(|| {
                (
                    retention.oldest_pin_server.clone(),
                    retention.oldest_pin_epoch,
                )
            }),
        }
    }

    /// What `status --check` reports about retention (past 80% of a bound).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let pin = self
            .oldest_pin
            .as_ref()
            .map(|(server, epoch)| format!("; the oldest pin is {server} at epoch {epoch}"))
            .unwrap_or_default();
        if self.max_bytes > 0
            && self.bytes as f64 >= RETENTION_WARN_FRACTION * self.max_bytes as f64
        {
            problems.push(format!(
                "retained batches hold {} of {} bytes{pin}",
                self.bytes, self.max_bytes
            ));
        }
        if let Some(age) = self.oldest_age_seconds
            && self.max_age_seconds > 0.0
            && age >= RETENTION_WARN_FRACTION * self.max_age_seconds
        {
            problems.push(format!(
                "the oldest retained batch is {age:.0} s old (bound {:.0} s){pin}",
                self.max_age_seconds
            ));
        }
        problems
    }
}

/// The shard part of the status report.
#[derive(Clone, Debug, Default)]
pub struct ShardReport {
    /// Every server of the map.
    pub servers: Vec<ShardRow>,
    /// Every partition.
    pub partitions: Vec<PartitionRow>,
    /// Copies moving between servers.
    pub moves: Vec<MoveRow>,
    /// The map's version and replication factor.
    pub version: u64,
    /// Voting replicas per partition.
    pub replication_factor: u8,
}

/// Asks every server of `map` for its status and builds the rows.
pub async fn report(map: &ShardMap, committed: u64) -> ShardReport {
    use shard::cluster::ShardConnector;
    let shard_set = shard::cluster::GrpcConnector::default().connect(map.clone());
    let statuses = futures::future::join_all(map.servers().iter().map(|server| {
        let shard_set = &shard_set;
        async move {
            let health = health_of(&server.address).await;
            let status = match shard_set {
                Ok(shard_set) => match shard_set.api(&server.id) {
                    Ok(api) => tokio::time::timeout(PROBE, api.status())
                        .await
                        .map_err(|_| format!("no answer within {PROBE:?}"))
                        .and_then(|answer| answer.map_err(|error| error.to_string())),
                    Err(error) => Err(error.to_string()),
                },
                Err(error) => Err(error.to_string()),
            };
            (server.clone(), health, status)
        }
    }))
    .await;
    let mut built: BTreeMap<(String, u32), u64> = BTreeMap::new();
    let mut states: BTreeMap<(String, u32), shard::api::PartitionState> = BTreeMap::new();
    let mut servers = Vec::new();
    for (server, health, status) in statuses {
        let assignments = map.assignments(&server.id);
        let pick = |wanted: &[Role]| -> Vec<u32> {
            assignments
                .iter()
                .filter(|(_, role)| wanted.contains(role))
                .map(|(partition, _)| *partition)
                .collect()
        };
        let mut row = ShardRow {
            id: server.id.clone(),
            address: server.address.clone(),
            partitions: assignments
                .iter()
                .map(|(partition, _)| *partition)
                .collect(),
            voter_of: pick(&[Role::Voter, Role::Quarantined]),
            learner_of: pick(&[Role::Learner]),
            quarantined_in: pick(&[Role::Quarantined]),
            maintenance_until_ms: server.maintenance_until_ms,
            draining: server.draining,
            health,
            ..ShardRow::default()
        };
        match status {
            Ok(status) => {
                row.reachable = true;
                row.caught_up_epoch = status.seen_committed_epoch;
                row.prune_floor = status.prune_floor;
                row.pruned_node_versions = status.pruned_node_versions;
                let mut lowest: Option<u64> = None;
                for state in &status.partition_states {
                    states.insert((server.id.clone(), state.partition), state.clone());
                    if state.orphaned {
                        row.orphaned.push(state.partition);
                    } else if state.held && row.partitions.contains(&state.partition) {
                        row.bytes += state.approximate_bytes;
                    }
                    if state.held && row.partitions.contains(&state.partition) {
                        built.insert((server.id.clone(), state.partition), state.built_epoch);
                        lowest = Some(
                            lowest.map_or(state.built_epoch, |low| low.min(state.built_epoch)),
                        );
                    }
                }
                // Nothing committed yet: every partition is the empty tree everywhere.
                if committed == 0 {
                    for partition in &row.partitions {
                        built.entry((server.id.clone(), *partition)).or_insert(0);
                    }
                }
                row.built_epoch = lowest.unwrap_or(0);
                row.lag_epochs = committed.saturating_sub(row.built_epoch);
            }
            Err(error) => row.error = error,
        }
        servers.push(row);
    }
    let partitions = map
        .partitions()
        .iter()
        .enumerate()
        .map(|(partition, replicas)| {
            let partition = partition as u32;
            let cell = |server: &str, role: Role| {
                let built_epoch = built.get(&(server.to_string(), partition)).copied();
                ReplicaCell {
                    server: server.to_string(),
                    role: match role {
                        Role::Voter => "voter",
                        Role::Quarantined => "quarantined",
                        Role::Learner => "learner",
                    }
                    .into(),
                    built_epoch,
                    lag_epochs: built_epoch.map(|epoch| committed.saturating_sub(epoch)),
                }
            };
            let cells: Vec<ReplicaCell> = replicas
                .members()
                .filter_map(|server| replicas.role_of(server).map(|role| cell(server, role)))
                .collect();
            let up_to_date_voters = cells
                .iter()
                .filter(|cell| cell.role == "voter" && cell.lag_epochs == Some(0))
                .count();
            PartitionRow {
                partition,
                replicas: cells,
                up_to_date_voters,
                majority: replicas.majority(),
            }
        })
        .collect();
    let moves = map
        .moves()
        .into_iter()
        .map(
            |ktd_core::shard_map::Move {
                 partition,
                 from,
                 to,
             }| {
                let state_of = |server: &str| states.get(&(server.to_string(), partition));
                let expected_bytes = state_of(&from).map_or(0, |state| state.approximate_bytes);
                let mut row = MoveRow {
                    partition,
                    from: from.clone(),
                    to: to.clone(),
                    expected_bytes,
                    ..MoveRow::default()
                };
                match state_of(&to) {
                    Some(state) if state.copying => {
                        row.state = "copying".into();
                        row.copied_bytes = state.copied_bytes;
                        if state.copy_millis > 0 && state.copied_bytes > 0 {
                            let rate =
                                state.copied_bytes as f64 * 1000.0 / state.copy_millis as f64;
                            row.bytes_per_second = Some(rate);
                            row.eta_seconds = Some(
                                expected_bytes.saturating_sub(state.copied_bytes) as f64 / rate,
                            );
                        }
                    }
                    Some(state) if state.held && state.built_epoch < committed => {
                        row.state = "catching up".into();
                    }
                    Some(state) if state.held => row.state = "promoting".into(),
                    _ => row.state = "waiting".into(),
                }
                row
            },
        )
        .collect();
    ShardReport {
        servers,
        partitions,
        moves,
        version: map.version(),
        replication_factor: map.replication_factor(),
    }
}

/// What `status --check` reports about shards and replicas.
pub fn problems(
    servers: &[ShardRow],
    partitions: &[PartitionRow],
    replication_factor: u8,
) -> Vec<String> {
    let mut problems = Vec::new();
    let now = now_ms();
    for server in servers {
        let maintenance = if server.maintenance_until_ms > now {
            " (in maintenance)"
        } else {
            ""
        };
        if !server.reachable {
            problems.push(format!(
                "shard server {} unreachable{maintenance}: {}",
                server.id, server.error
            ));
        } else if server.health != "SERVING" {
            problems.push(format!(
                "shard server {} is {}{maintenance}",
                server.id, server.health
            ));
        }
        if !server.quarantined_in.is_empty() {
            problems.push(format!(
                "shard server {} is quarantined in partitions {} (its copy disagreed with the \
                 majority; it is being rebuilt)",
                server.id,
                super::ranges(&server.quarantined_in)
            ));
        }
    }
    let rf = usize::from(replication_factor);
    let mut without_majority = Vec::new();
    let mut under_replicated = Vec::new();
    for partition in partitions {
        if partition.up_to_date_voters < partition.majority {
            without_majority.push(partition.partition);
        } else if partition.up_to_date_voters < rf {
            under_replicated.push(partition.partition);
        }
    }
    if !without_majority.is_empty() {
        problems.push(format!(
            "partitions {} have fewer up-to-date voters than a majority: epochs cannot commit",
            super::ranges(&without_majority)
        ));
    }
    if !under_replicated.is_empty() {
        problems.push(format!(
            "partitions {} have fewer than {rf} up-to-date voters (under-replicated)",
            super::ranges(&under_replicated)
        ));
    }
    problems
}

/// A planned change to the shard map.
#[derive(Clone, Debug)]
pub enum MapEdit {
    /// Add a server holding nothing (and, with `rebalance`, move copies onto it).
    Add {
        /// The new server.
        server: ShardServer,
        /// Also move copies from the most-loaded servers.
        rebalance: bool,
    },
    /// Move every copy off a server.
    Drain(String),
    /// Hand every copy of `old` to `new`.
    Replace {
        /// The server leaving.
        old: String,
        /// The server taking over.
        new: ShardServer,
    },
    /// Move one partition's copy from one server to another.
    Move {
        /// The partition.
        partition: u32,
        /// The server whose voting copy moves.
        from: String,
        /// The server that takes it.
        to: String,
    },
    /// Remove a server that holds nothing.
    Remove(String),
    /// Set (or, with 0, end) a server's maintenance window.
    Maintenance {
        /// The server.
        id: String,
        /// Until when (ms since the Unix epoch).
        until_ms: u64,
    },
}

impl MapEdit {
    /// The edited map (pure).
    pub fn apply(&self, map: &ShardMap) -> ktd_core::Result<ShardMap> {
        let now = now_ms();
        let in_maintenance: Vec<&str> = map
            .servers()
            .iter()
            .filter(|server| server.maintenance_until_ms > now)
            .map(|server| server.id.as_str())
            .collect();
        match self {
            MapEdit::Add { server, rebalance } => {
                let added = map.add_server(server.clone())?;
                if *rebalance {
                    added.rebalance(&in_maintenance)
                } else {
                    Ok(added)
                }
            }
            MapEdit::Drain(id) => map.drain(id, &in_maintenance),
            MapEdit::Replace { old, new } => map.replace_server(old, new.clone()),
            MapEdit::Move {
                partition,
                from,
                to,
            } => map.move_copy(*partition, from, to),
            MapEdit::Remove(id) => map.remove_server(id),
            MapEdit::Maintenance { id, until_ms } => map.set_maintenance(id, *until_ms),
        }
    }
}

/// Reads the shard map (with the cluster's partition bits).
pub async fn read_map(client: &SequencerClient) -> Result<ShardMap, AdminError> {
    let answer = client.cluster_metadata().await?;
    let metadata = answer
        .metadata
        .ok_or_else(|| AdminError::Refused("the cluster is not initialised".into()))?;
    let map = answer.shard_map.unwrap_or_default();
    Ok(shard::replicated::shard_map(&metadata, &map)?)
}

/// Applies `edit` to the current map with compare-and-set, re-reading and re-applying on a
/// concurrent change. Returns the stored map.
pub async fn change_map(client: &SequencerClient, edit: &MapEdit) -> Result<ShardMap, AdminError> {
    for _ in 0..CAS_ATTEMPTS {
        let current = read_map(client).await?;
        let edited = edit
            .apply(&current)
            .map_err(|error| AdminError::Refused(error.to_string()))?;
        if edited == current {
            return Ok(current);
        }
        match client
            .set_shard_map(
                shard::replicated::shard_map_to_pb(&edited),
                current.version(),
            )
            .await
        {
            Ok(stored) => {
                let metadata = client
                    .cluster_metadata()
                    .await?
                    .metadata
                    .unwrap_or_default();
                return Ok(shard::replicated::shard_map(&metadata, &stored)?);
            }
            Err(error) if error.code() == tonic::Code::Aborted => continue,
            Err(error) => return Err(error.into()),
        }
    }
    Err(AdminError::Refused(format!(
        "the shard map kept changing; {CAS_ATTEMPTS} attempts to apply the change failed"
    )))
}

/// Waits until `done(map)` holds, polling every second and printing progress every 10 s on
/// stderr, for at most `limit`.
pub async fn wait_for_map(
    client: &SequencerClient,
    what: &str,
    limit: Duration,
    done: impl Fn(&ShardMap) -> bool,
) -> Result<ShardMap, AdminError> {
    let started = Instant::now();
    let mut reported = Instant::now();
    loop {
        let map = read_map(client).await?;
        if done(&map) {
            return Ok(map);
        }
        if started.elapsed() > limit {
            return Err(AdminError::Timeout {
                what: what.to_string(),
                limit,
            });
        }
        if reported.elapsed() >= Duration::from_secs(10) {
            let learners: usize = map
                .partitions()
                .iter()
                .map(|replicas| replicas.learners.len())
                .sum();
            eprintln!(
                "waiting for {what}: {learners} learners still building ({:.0}s)",
                started.elapsed().as_secs_f64()
            );
            reported = Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Whether no learner replaces a voter on `server` and `server` builds nothing.
pub fn moved_off(map: &ShardMap, server: &str) -> bool {
    map.assignments(server).is_empty()
}

/// Whether no partition has a learner left.
pub fn no_learners(map: &ShardMap) -> bool {
    map.partitions()
        .iter()
        .all(|replicas| replicas.learners.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(partition: u32, lags: &[(&str, Option<u64>)]) -> PartitionRow {
        PartitionRow {
            partition,
            replicas: lags
                .iter()
                .map(|(role, lag)| ReplicaCell {
                    server: "s".into(),
                    role: (*role).into(),
                    built_epoch: lag.map(|lag| 10 - lag),
                    lag_epochs: *lag,
                })
                .collect(),
            up_to_date_voters: lags
                .iter()
                .filter(|(role, lag)| *role == "voter" && *lag == Some(0))
                .count(),
            majority: 2,
        }
    }

    #[test]
    fn check_names_partitions_without_a_majority_and_under_replicated_ones() {
        let partitions = vec![
            row(
                0,
                &[("voter", Some(0)), ("voter", Some(0)), ("voter", Some(0))],
            ),
            row(
                1,
                &[("voter", Some(0)), ("voter", Some(0)), ("voter", None)],
            ),
            row(
                2,
                &[
                    ("voter", Some(0)),
                    ("quarantined", Some(0)),
                    ("voter", Some(3)),
                ],
            ),
        ];
        let problems = problems(&[], &partitions, 3);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with("partitions 2 have fewer up-to-date voters than a majority")
        );
        assert!(problems[1].starts_with("partitions 1 have fewer than 3"));
    }

    #[test]
    fn retention_warns_at_eighty_percent_of_a_bound_and_names_the_pin() {
        let mut retention = RetentionRow {
            batches: 10,
            bytes: 79,
            max_bytes: 100,
            oldest_age_seconds: Some(10.0),
            max_age_seconds: 3600.0,
            oldest_pin: Some(("s2".into(), 7)),
        };
        assert!(retention.problems().is_empty());
        retention.bytes = 80;
        let problems = retention.problems();
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("s2 at epoch 7"), "{problems:?}");
        retention.oldest_age_seconds = Some(3000.0);
        assert_eq!(retention.problems().len(), 2);
    }
}
