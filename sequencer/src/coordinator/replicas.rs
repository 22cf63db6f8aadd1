//! What the coordinator knows about every shard replica, and the pure decisions it takes from
//! that: who takes part in the next epoch, what to report as each server's durable epoch (the
//! sequencer's batch-retention pins), and which repairs to make ([`plan`]).
//!
//! The [`Tracker`] is fed by the replicas' status (polled by the repair loop) and by the epochs
//! the coordinator runs. [`plan`] turns it into [`Repair`]s — replays, bootstraps and shard-map
//! changes — following `shard/docs/0002-replicated-shards.md`:
//!
//! | replica state | repair |
//! |---|---|
//! | holds no copy (new, wiped), or is behind the oldest retained batch | bootstrap from a healthy voter at the committed epoch |
//! | its stored root differs from the committed one (restart check, or a dissenting build) | quarantine (a voter), then bootstrap |
//! | built, but behind the committed epoch | replay the next epoch |
//! | caught up, root equal to the committed one | promote (a learner), lift the quarantine (a rebuilt voter) |
//! | server unreachable past the failure timeout, not in maintenance | add a learner on another server to replace it |
//!
//! While a backup is being restored (`ktd admin restore`), a partition that no healthy voter
//! holds is copied from the restore's source ([`RESTORE_SOURCE`]) instead.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ktd_core::ShardMap;
use ktd_core::shard_map::{Learner, Role};
use ktd_core::tree::NodeRef;
use shard::api::ShardStatus;
use shard::cluster::{Participation, ReplicaVerdict};

/// The `source` of a [`Repair::Bootstrap`] from the backup being restored (not a server of the
/// map: the coordinator dials the restore's source address).
pub const RESTORE_SOURCE: &str = "(backup)";

/// Bootstraps running at once, cluster-wide.
pub const MAX_PARALLEL_BOOTSTRAPS: usize = 4;

/// One partition as the coordinator last saw it on one server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PartitionProgress {
    /// The server holds a copy.
    pub held: bool,
    /// Its built epoch.
    pub built: u64,
    /// Its root then.
    pub root: Option<NodeRef>,
    /// The server found its stored root disagreeing with the committed one.
    pub mismatch: bool,
    /// The server's estimate of the copy's bytes on disk (0: not known yet).
    pub bytes: u64,
    /// A copy is being taken in (started by this or an earlier coordinator).
    pub copying: bool,
}

/// One server as the coordinator knows it.
#[derive(Clone, Debug, Default)]
pub struct ServerView {
    /// Partitions it reported (status) or built under this coordinator.
    pub partitions: BTreeMap<u32, PartitionProgress>,
    /// The last successful status call.
    pub last_seen: Option<Instant>,
    /// Since when calls to it have failed (`None`: it answered the last one).
    pub unreachable_since: Option<Instant>,
    /// Partitions being copied in → the epoch of the copy.
    pub bootstrapping: BTreeMap<u32, u64>,
    /// A replay is running on it.
    pub replaying: bool,
    /// Whether its status was ever read by this coordinator.
    pub known: bool,
}

/// Every server's view.
#[derive(Clone, Debug, Default)]
pub struct Tracker {
    /// By server id.
    pub servers: BTreeMap<String, ServerView>,
}

impl ServerView {
    /// Partition copies the server reports taking in.
    pub fn copies_reported(&self) -> usize {
        self.partitions
            .values()
            .filter(|progress| progress.copying)
            .count()
    }
}

impl Tracker {
    fn view(&mut self, server: &str) -> &mut ServerView {
        self.servers.entry(server.to_string()).or_default()
    }

    /// Records a status answer from `server`.
    pub fn record_status(&mut self, server: &str, status: &ShardStatus, now: Instant) {
        let view = self.view(server);
        view.known = true;
        view.last_seen = Some(now);
        view.unreachable_since = None;
        view.partitions = status
            .partition_states
            .iter()
            .map(|state| {
                (
                    state.partition,
                    PartitionProgress {
                        held: state.held,
                        built: state.built_epoch,
                        root: state.root,
                        mismatch: state.mismatch,
                        bytes: state.approximate_bytes,
                        copying: state.copying,
                    },
                )
            })
            .collect();
    }

    /// Records that a call to `server` failed.
    pub fn record_unreachable(&mut self, server: &str, now: Instant) {
        let view = self.view(server);
        view.unreachable_since.get_or_insert(now);
    }

    /// Records what an epoch did: replicas that agreed have built it with the epoch's roots.
    pub fn record_epoch(
        &mut self,
        epoch: u64,
        roots: &[Option<NodeRef>],
        verdicts: &[(String, u32, ReplicaVerdict)],
    ) {
        for (server, partition, verdict) in verdicts {
            if *verdict == ReplicaVerdict::Agreed {
                let progress = self.view(server).partitions.entry(*partition).or_default();
                *progress = PartitionProgress {
                    held: true,
                    built: epoch,
                    root: roots[*partition as usize],
                    mismatch: false,
                    bytes: progress.bytes,
                    copying: false,
                };
            }
        }
    }

    /// Records a dissent found in an epoch or a replay: the replica's copy is not the
    /// majority's.
    pub fn record_dissent(&mut self, server: &str, partition: u32) {
        if let Some(progress) = self.view(server).partitions.get_mut(&partition) {
            progress.mismatch = true;
        }
    }

    /// Who takes part in `epoch`: healthy voters and learners whose copy is built to
    /// `epoch - 1` (or to `epoch` itself), plus those whose progress is not known yet (they
    /// refuse if they are behind).
    pub fn participation(&self, map: &ShardMap, epoch: u64) -> Participation {
        Participation {
            by_partition: map
                .partitions()
                .iter()
                .enumerate()
                .map(|(partition, replicas)| {
                    let partition = partition as u32;
                    replicas
                        .healthy_voters()
                        .chain(
                            replicas
                                .learners
                                .iter()
                                .map(|learner| learner.server.as_str()),
                        )
                        .filter(|server| self.ready_for(server, partition, epoch))
                        .map(str::to_string)
                        .collect()
                })
                .collect(),
        }
    }

    fn ready_for(&self, server: &str, partition: u32, epoch: u64) -> bool {
        let Some(view) = self.servers.get(server) else {
            return true;
        };
        if view.bootstrapping.contains_key(&partition) {
            return false;
        }
        if !view.known {
            return true;
        }
        match view.partitions.get(&partition) {
            // A new cluster: every partition starts empty at epoch 0.
            None => epoch == 1,
            Some(progress) => {
                progress.held
                    && !progress.mismatch
                    && (progress.built + 1 == epoch || progress.built == epoch)
            }
        }
    }

    /// Whether `server` holds `partition` built to at least `epoch`, undamaged.
    pub fn up_to_date(&self, server: &str, partition: u32, epoch: u64) -> bool {
        self.servers
            .get(server)
            .and_then(|view| view.partitions.get(&partition))
            .is_some_and(|progress| progress.held && !progress.mismatch && progress.built >= epoch)
    }

    /// Each assigned server's durable epoch — the lowest over its partitions (a partition being
    /// copied in counts as the copy's epoch) — for the servers whose every partition is known.
    pub fn durable_epochs(&self, map: &ShardMap) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for server in map.servers() {
            let assignments = map.assignments(&server.id);
            if assignments.is_empty() {
                continue;
            }
            let Some(view) = self.servers.get(&server.id).filter(|view| view.known) else {
                continue;
            };
            let epochs: Option<Vec<u64>> = assignments
                .iter()
                .map(|(partition, _)| {
                    view.bootstrapping.get(partition).copied().or_else(|| {
                        view.partitions
                            .get(partition)
                            .filter(|progress| progress.held)
                            .map(|progress| progress.built)
                    })
                })
                .collect();
            if let Some(lowest) = epochs.and_then(|epochs| epochs.into_iter().min()) {
                out.push((server.id.clone(), lowest));
            }
        }
        out
    }
}

/// A change to the shard map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapChange {
    /// The voter disagreed with its majority: not counted, not read, rebuilt.
    Quarantine {
        /// The server.
        server: String,
        /// The partition.
        partition: u32,
    },
    /// The rebuilt voter equals the committed state again.
    Unquarantine {
        /// The server.
        server: String,
        /// The partition.
        partition: u32,
    },
    /// The learner caught up: it becomes a voter (replacing the voter it names).
    Promote {
        /// The server.
        server: String,
        /// The partition.
        partition: u32,
    },
    /// A new copy of the partition on `server`, replacing `replaces` once promoted.
    AddLearner {
        /// The server.
        server: String,
        /// The partition.
        partition: u32,
        /// The voter it replaces.
        replaces: String,
    },
}

impl MapChange {
    /// Applies the change to `map` (checked by `ShardMap::new`).
    pub fn apply(&self, map: &ShardMap) -> ktd_core::Result<ShardMap> {
        let mut partitions = map.partitions().to_vec();
        match self {
            MapChange::Quarantine { server, partition } => {
                let replicas = &mut partitions[*partition as usize];
                if !replicas.quarantined.contains(server) {
                    replicas.quarantined.push(server.clone());
                }
            }
            MapChange::Unquarantine { server, partition } => {
                partitions[*partition as usize]
                    .quarantined
                    .retain(|quarantined| quarantined != server);
            }
            MapChange::Promote { server, partition } => {
                let replicas = &mut partitions[*partition as usize];
                let Some(position) = replicas
                    .learners
                    .iter()
                    .position(|learner| learner.server == *server)
                else {
                    return Ok(map.clone());
                };
                let learner = replicas.learners.remove(position);
                if let Some(replaced) = learner.replaces {
                    if let Some(slot) = replicas.voters.iter_mut().find(|voter| **voter == replaced)
                    {
                        *slot = server.clone();
                    }
                    replicas
                        .quarantined
                        .retain(|quarantined| *quarantined != replaced);
                } else {
                    replicas.voters.push(server.clone());
                }
            }
            MapChange::AddLearner {
                server,
                partition,
                replaces,
            } => partitions[*partition as usize].learners.push(Learner {
                server: server.clone(),
                replaces: Some(replaces.clone()),
            }),
        }
        map.with_partitions(partitions)
    }
}

/// A repair the coordinator should make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Repair {
    /// Replay committed `epoch` on `server` for `partitions` (built there to `epoch - 1`).
    Replay {
        /// The server.
        server: String,
        /// Its partitions at `epoch - 1`.
        partitions: Vec<u32>,
        /// The epoch to replay.
        epoch: u64,
    },
    /// Copy `partition` onto `server` from `source` at committed `epoch`.
    Bootstrap {
        /// The receiving server.
        server: String,
        /// The partition.
        partition: u32,
        /// The healthy voter copied from.
        source: String,
        /// The committed epoch copied.
        epoch: u64,
    },
    /// Change the shard map.
    Map(MapChange),
}

/// The committed facts [`plan`] compares replicas with.
pub struct Committed<'a> {
    /// The latest committed epoch.
    pub epoch: u64,
    /// The oldest committed epoch whose batch is retained (`None`: none is).
    pub oldest_retained: Option<u64>,
    /// The committed partition roots of an epoch (`None`: not available).
    pub roots_at: &'a dyn Fn(u64) -> Option<Vec<Option<NodeRef>>>,
    /// A backup is being restored at `epoch` (copies with no healthy voter come from it).
    pub restoring: bool,
}

/// Options of the repair decisions.
#[derive(Clone, Copy, Debug)]
pub struct RepairOptions {
    /// How long a server may be unreachable before its partitions are re-replicated.
    pub failure_timeout: Duration,
}

/// The repairs to make now (see the module docs). Pure: the same inputs give the same repairs.
pub fn plan(
    map: &ShardMap,
    tracker: &Tracker,
    committed: &Committed<'_>,
    now: Instant,
    now_ms: u64,
    options: RepairOptions,
) -> Vec<Repair> {
    let mut repairs = Vec::new();
    // Copies this coordinator started, and copies the servers report that an earlier one did.
    let mut bootstraps_running: usize = tracker
        .servers
        .values()
        .map(|view| view.bootstrapping.len().max(view.copies_reported()))
        .sum();
    for server in map.servers() {
        let Some(view) = tracker.servers.get(&server.id).filter(|view| view.known) else {
            continue;
        };
        if view.unreachable_since.is_some() {
            continue;
        }
        let mut replay_groups: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
        let mut bootstrap_here = !view.bootstrapping.is_empty() || view.copies_reported() > 0;
        for (partition, role) in map.assignments(&server.id) {
            let progress = view.partitions.get(&partition);
            if view.bootstrapping.contains_key(&partition) || progress.is_some_and(|p| p.copying) {
                continue;
            }
            let lost_pin = |built: u64| {
                built < committed.epoch
                    && committed
                        .oldest_retained
                        .is_none_or(|oldest| built + 1 < oldest)
            };
            let root_differs = |progress: &PartitionProgress| {
                progress.built <= committed.epoch
                    && (committed.roots_at)(progress.built).is_some_and(|roots| {
                        roots.get(partition as usize).copied().flatten() != progress.root
                    })
            };
            let damaged = progress.is_some_and(|p| p.held && (p.mismatch || root_differs(p)));
            let needs_copy = match progress {
                // Nothing committed yet: the partition is empty everywhere.
                None if committed.epoch == 0 => false,
                None => true,
                Some(p) => !p.held || damaged || lost_pin(p.built),
            };
            if damaged && role == Role::Voter {
                repairs.push(Repair::Map(MapChange::Quarantine {
                    server: server.id.clone(),
                    partition,
                }));
            }
            if needs_copy {
                if bootstrap_here || bootstraps_running >= MAX_PARALLEL_BOOTSTRAPS {
                    continue;
                }
                let source = map.read_order(partition).into_iter().find(|candidate| {
                    candidate.id != server.id
                        && tracker.up_to_date(&candidate.id, partition, committed.epoch)
                        && tracker
                            .servers
                            .get(&candidate.id)
                            .is_some_and(|view| view.unreachable_since.is_none())
                });
                let source = match source {
                    Some(source) => Some(source.id.clone()),
                    None if committed.restoring => Some(RESTORE_SOURCE.to_owned()),
                    None => None,
                };
                if let Some(source) = source {
                    repairs.push(Repair::Bootstrap {
                        server: server.id.clone(),
                        partition,
                        source,
                        epoch: committed.epoch,
                    });
                    bootstrap_here = true;
                    bootstraps_running += 1;
                }
                continue;
            }
            let Some(progress) = progress else { continue };
            if progress.built < committed.epoch {
                replay_groups
                    .entry(progress.built + 1)
                    .or_default()
                    .push(partition);
                continue;
            }
            match role {
                Role::Learner => repairs.push(Repair::Map(MapChange::Promote {
                    server: server.id.clone(),
                    partition,
                })),
                Role::Quarantined => repairs.push(Repair::Map(MapChange::Unquarantine {
                    server: server.id.clone(),
                    partition,
                })),
                Role::Voter => {}
            }
        }
        if !view.replaying
            && let Some((epoch, partitions)) = replay_groups.into_iter().next()
        {
            repairs.push(Repair::Replay {
                server: server.id.clone(),
                partitions,
                epoch,
            });
        }
    }
    repairs.extend(replacements(map, tracker, now, now_ms, options));
    repairs
}

/// Learners that replace the voters of servers unreachable past the failure timeout (and not
/// in maintenance), on the reachable servers holding the fewest copies among those that do not
/// hold the partition yet.
fn replacements(
    map: &ShardMap,
    tracker: &Tracker,
    now: Instant,
    now_ms: u64,
    options: RepairOptions,
) -> Vec<Repair> {
    let mut load: BTreeMap<&str, usize> = map
        .servers()
        .iter()
        .map(|server| (server.id.as_str(), map.assignments(&server.id).len()))
        .collect();
    let mut repairs = Vec::new();
    for server in map.servers() {
        let dead = tracker
            .servers
            .get(&server.id)
            .and_then(|view| view.unreachable_since)
            .is_some_and(|since| now.duration_since(since) >= options.failure_timeout);
        if !dead || server.maintenance_until_ms > now_ms {
            continue;
        }
        for (partition, role) in map.assignments(&server.id) {
            if role == Role::Learner {
                continue;
            }
            let replicas = map.replicas(partition);
            if replicas
                .learners
                .iter()
                .any(|learner| learner.replaces.as_deref() == Some(server.id.as_str()))
            {
                continue;
            }
            let candidate = map
                .servers()
                .iter()
                .filter(|candidate| {
                    !candidate.draining && replicas.role_of(&candidate.id).is_none()
                })
                .filter(|candidate| {
                    tracker
                        .servers
                        .get(&candidate.id)
                        .is_some_and(|view| view.known && view.unreachable_since.is_none())
                })
                .min_by_key(|candidate| (load[candidate.id.as_str()], candidate.id.clone()));
            if let Some(candidate) = candidate {
                *load.entry(candidate.id.as_str()).or_default() += 1;
                repairs.push(Repair::Map(MapChange::AddLearner {
                    server: candidate.id.clone(),
                    partition,
                    replaces: server.id.clone(),
                }));
            }
        }
    }
    repairs
}

#[cfg(test)]
mod tests {
    use ktd_core::akd_core::{AzksValue, NodeLabel};
    use ktd_core::shard_map::{PartitionReplicas, ShardServer};

    use super::*;

    fn root(byte: u8) -> Option<NodeRef> {
        Some(NodeRef {
            label: NodeLabel::new([byte; 32], 8).get_prefix(8),
            hash: AzksValue([byte; 32]),
            min_epoch: 1,
            max_epoch: 1,
        })
    }

    fn map(servers: &[&str], partitions: Vec<PartitionReplicas>) -> ShardMap {
        ShardMap::new(
            1,
            0,
            partitions[0].voters.len() as u8,
            servers
                .iter()
                .map(|id| ShardServer {
                    id: (*id).into(),
                    address: format!("http://{id}"),
                    maintenance_until_ms: 0,
                    draining: false,
                })
                .collect(),
            partitions,
        )
        .expect("valid map")
    }

    fn voters(ids: &[&str]) -> PartitionReplicas {
        PartitionReplicas {
            voters: ids.iter().map(|id| (*id).to_string()).collect(),
            ..PartitionReplicas::default()
        }
    }

    fn seen(tracker: &mut Tracker, server: &str, built: u64, root: Option<NodeRef>, now: Instant) {
        let view = tracker.servers.entry(server.into()).or_default();
        view.known = true;
        view.last_seen = Some(now);
        view.partitions.insert(
            0,
            PartitionProgress {
                held: true,
                built,
                root,
                ..PartitionProgress::default()
            },
        );
    }

    fn options() -> RepairOptions {
        RepairOptions {
            failure_timeout: Duration::from_secs(300),
        }
    }

    #[test]
    fn behind_replicas_replay_and_empty_ones_bootstrap_from_a_healthy_voter() {
        let now = Instant::now();
        let map = map(&["a", "b", "c"], vec![voters(&["a", "b", "c"])]);
        let mut tracker = Tracker::default();
        seen(&mut tracker, "a", 5, root(5), now);
        seen(&mut tracker, "b", 3, root(3), now);
        let c = tracker.servers.entry("c".into()).or_default();
        c.known = true;
        let roots = |epoch: u64| Some(vec![root(epoch as u8)]);
        let committed = Committed {
            epoch: 5,
            oldest_retained: Some(2),
            roots_at: &roots,
            restoring: false,
        };
        let repairs = plan(&map, &tracker, &committed, now, 0, options());
        assert!(repairs.contains(&Repair::Replay {
            server: "b".into(),
            partitions: vec![0],
            epoch: 4
        }));
        assert!(repairs.contains(&Repair::Bootstrap {
            server: "c".into(),
            partition: 0,
            source: "a".into(),
            epoch: 5
        }));
        assert_eq!(tracker.participation(&map, 6).by_partition[0], ["a"]);
    }

    #[test]
    fn a_replica_past_the_oldest_retained_batch_bootstraps_instead_of_replaying() {
        let now = Instant::now();
        let map = map(&["a", "b", "c"], vec![voters(&["a", "b", "c"])]);
        let mut tracker = Tracker::default();
        seen(&mut tracker, "a", 9, root(9), now);
        seen(&mut tracker, "b", 9, root(9), now);
        seen(&mut tracker, "c", 2, root(2), now);
        let roots = |epoch: u64| Some(vec![root(epoch as u8)]);
        let committed = Committed {
            epoch: 9,
            oldest_retained: Some(6),
            roots_at: &roots,
            restoring: false,
        };
        let repairs = plan(&map, &tracker, &committed, now, 0, options());
        assert!(
            matches!(&repairs[..], [Repair::Bootstrap { server, epoch: 9, .. }] if server == "c"),
            "{repairs:?}"
        );
    }

    #[test]
    fn a_voter_whose_root_differs_is_quarantined_rebuilt_and_released() {
        let now = Instant::now();
        let map = map(&["a", "b", "c"], vec![voters(&["a", "b", "c"])]);
        let mut tracker = Tracker::default();
        seen(&mut tracker, "a", 4, root(4), now);
        seen(&mut tracker, "b", 4, root(4), now);
        seen(&mut tracker, "c", 4, root(99), now);
        let roots = |epoch: u64| Some(vec![root(epoch as u8)]);
        let committed = Committed {
            epoch: 4,
            oldest_retained: Some(1),
            roots_at: &roots,
            restoring: false,
        };
        let repairs = plan(&map, &tracker, &committed, now, 0, options());
        assert!(repairs.contains(&Repair::Map(MapChange::Quarantine {
            server: "c".into(),
            partition: 0
        })));
        assert!(repairs.iter().any(|repair| matches!(
            repair,
            Repair::Bootstrap { server, .. } if server == "c"
        )));

        let quarantined = MapChange::Quarantine {
            server: "c".into(),
            partition: 0,
        }
        .apply(&map)
        .expect("valid");
        assert!(!tracker.participation(&quarantined, 5).by_partition[0].contains(&"c".to_string()));
        seen(&mut tracker, "c", 4, root(4), now);
        let repairs = plan(&quarantined, &tracker, &committed, now, 0, options());
        assert_eq!(
            repairs,
            [Repair::Map(MapChange::Unquarantine {
                server: "c".into(),
                partition: 0
            })]
        );
    }

    #[test]
    fn a_dead_server_is_replaced_by_a_learner_that_is_then_promoted() {
        let start = Instant::now();
        let map = map(&["a", "b", "c", "d"], vec![voters(&["a", "b", "c"])]);
        let mut tracker = Tracker::default();
        for server in ["a", "b", "d"] {
            seen(&mut tracker, server, 7, root(7), start);
        }
        tracker.servers.get_mut("d").expect("d").partitions.clear();
        tracker.record_unreachable("c", start);
        let roots = |epoch: u64| Some(vec![root(epoch as u8)]);
        let committed = Committed {
            epoch: 7,
            oldest_retained: Some(1),
            roots_at: &roots,
            restoring: false,
        };
        assert!(plan(&map, &tracker, &committed, start, 0, options()).is_empty());
        let later = start + Duration::from_secs(301);
        let in_maintenance = map
            .with_servers(
                map.servers()
                    .iter()
                    .map(|server| ShardServer {
                        maintenance_until_ms: if server.id == "c" { 10_000 } else { 0 },
                        draining: false,
                        ..server.clone()
                    })
                    .collect(),
            )
            .expect("valid");
        assert!(
            plan(
                &in_maintenance,
                &tracker,
                &committed,
                later,
                5_000,
                options()
            )
            .is_empty()
        );
        let repairs = plan(&map, &tracker, &committed, later, 5_000, options());
        let add = MapChange::AddLearner {
            server: "d".into(),
            partition: 0,
            replaces: "c".into(),
        };
        assert_eq!(repairs, [Repair::Map(add.clone())]);

        let with_learner = add.apply(&map).expect("valid");
        let repairs = plan(&with_learner, &tracker, &committed, later, 5_000, options());
        assert!(repairs.iter().any(|repair| matches!(
            repair,
            Repair::Bootstrap { server, source, .. } if server == "d" && source != "c"
        )));
        seen(&mut tracker, "d", 7, root(7), later);
        let repairs = plan(&with_learner, &tracker, &committed, later, 5_000, options());
        let promote = MapChange::Promote {
            server: "d".into(),
            partition: 0,
        };
        assert_eq!(repairs, [Repair::Map(promote.clone())]);
        let promoted = promote.apply(&with_learner).expect("valid");
        assert_eq!(promoted.replicas(0).voters, ["a", "b", "d"]);
        assert!(promoted.replicas(0).learners.is_empty());
    }

    #[test]
    fn durable_epochs_are_the_lowest_per_server_and_count_copies_in_progress() {
        let now = Instant::now();
        let map = map(&["a", "b", "c"], vec![voters(&["a", "b", "c"])]);
        let mut tracker = Tracker::default();
        seen(&mut tracker, "a", 8, root(8), now);
        seen(&mut tracker, "b", 6, root(6), now);
        let c = tracker.servers.entry("c".into()).or_default();
        c.known = true;
        c.bootstrapping.insert(0, 5);
        assert_eq!(
            tracker.durable_epochs(&map),
            [("a".into(), 8), ("b".into(), 6), ("c".into(), 5)]
        );
    }
}
