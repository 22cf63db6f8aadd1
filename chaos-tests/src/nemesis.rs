//! Faults injected into a running [`Topology`], each recorded with timestamps. Leader-aware: a
//! leader fault finds the current leader first; a follower fault picks a follower at random
//! (seeded). A fault that has no safe target is `skipped` with a reason, never half-applied.
//!
//! Process faults kill, pause or restart `ktd` processes. Network faults change the sequencer
//! link proxies ([`crate::proxy`]): `partition` blackholes every link between a set of
//! sequencers and the rest, both directions; `one-way` blackholes the connections one node
//! initiates to another (the reverse ones keep working); `latency` delays the selected links;
//! `heal` puts every link back to pass. Their targets ([`Target`]) are `leader`, `follower`
//! (a random healthy one, seeded), `seq-N` or, for latency, `all`.
//!
//! Replica faults take one shard server out — one replica of every partition it holds:
//! `kill-replica` (SIGKILL, restart at heal), `wipe-replica` (SIGKILL, delete its data
//! directory, restart it empty at heal) and `isolate-shard` (blackhole its [`ShardFence`]: no
//! one reaches it and it reaches no sequencer; pass at heal). The target is `target =
//! "shard-N"` or a seeded random running shard. They take out one shard at a time: if another
//! shard is already down or cut off, the fault is skipped (two out of three replicas would cost
//! a majority). At heal the nemesis waits (bounded) until `ktd admin status -o json` shows the
//! shard SERVING and a voter with lag 0 in every partition it voted in before the fault, and
//! counts the `partition copied` lines for it in the sequencers' logs (a wiped replica's
//! rebuild): [`FaultRecord::replica`].
//!
//! [`ShardFence`]: crate::proxy::ShardFence

use std::collections::BTreeSet;
use std::fmt;
use std::time::{Duration, Instant};

use rand::Rng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use crate::proxy::LinkFault;
use crate::topology::{Process, Topology, TopologyError};

/// The kinds of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// SIGKILL the sequencer leader; restart it at heal.
    KillLeader,
    /// SIGKILL a sequencer follower; restart it at heal.
    KillFollower,
    /// SIGKILL a shard server while epochs are being built; restart it at heal.
    KillShard,
    /// SIGKILL the gateway; restart it at heal.
    KillGateway,
    /// SIGSTOP the leader; SIGCONT at heal.
    PauseLeader,
    /// SIGSTOP a follower; SIGCONT at heal.
    PauseFollower,
    /// Planned failover: transfer leadership to a follower (nothing to heal).
    TransferLeader,
    /// Cut `nodes` off from the other sequencers, both directions (blackhole); pass at heal.
    Partition,
    /// Blackhole the connections `from` initiates to `to` only; pass at heal.
    OneWay,
    /// Delay every chunk on the links `from` → `to` by `delay`, each direction; pass at heal.
    Latency,
    /// Every sequencer link back to pass (nothing to heal).
    Heal,
    /// Snapshot catch-up: SIGKILL a follower; at heal, every other sequencer builds a snapshot
    /// and purges its log up to it, then the follower restarts and must catch up by installing
    /// the leader's snapshot (the log it would replay is gone). Evidence in
    /// [`FaultRecord::snapshot`].
    SnapshotCatchUp,
    /// Membership change under load: start a new sequencer, add it as a learner, promote it to
    /// voter (4 voters); at heal, remove it again and stop it. Timings in
    /// [`FaultRecord::membership`].
    AddVoter,
    /// SIGKILL one shard server (`target`, or a seeded random running one); restart it at heal.
    /// Its recovery in [`FaultRecord::replica`].
    KillReplica,
    /// SIGKILL a shard server and delete its data directory (a lost disk); restart it empty at
    /// heal: the coordinator must rebuild it by partition copies ([`FaultRecord::replica`]).
    WipeReplica,
    /// Cut a shard server off the network (its fence blackholes every connection to it and
    /// every one it opens to a sequencer); restore at heal ([`FaultRecord::replica`]).
    IsolateShard,
    /// Capacity added under load: start a new, empty shard server and add it to the shard map
    /// (nothing to heal); the leader's balancer moves copies onto it while the later faults
    /// run. After the schedule the runner waits (bounded) until no copy is moving and the new
    /// server votes ([`FaultRecord::rebalance`]).
    AddShard,
}

impl FaultKind {
    /// Whether the fault always targets the sequencer leader (so a new leader is expected). A
    /// partition expects one when it isolates the leader (see [`FaultRecord::isolated`]).
    pub fn moves_leader(self) -> bool {
        matches!(
            self,
            Self::KillLeader | Self::PauseLeader | Self::TransferLeader
        )
    }

    /// Whether it takes one shard server (one replica) out.
    pub fn is_replica(self) -> bool {
        matches!(
            self,
            Self::KillReplica | Self::WipeReplica | Self::IsolateShard
        )
    }

    /// Whether it acts on the sequencer link proxies.
    pub fn is_network(self) -> bool {
        matches!(
            self,
            Self::Partition | Self::OneWay | Self::Latency | Self::Heal
        )
    }
}

/// A sequencer named in a network fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Target {
    /// The current leader.
    Leader,
    /// A running, unpaused follower, picked at random (seeded), different from the fault's
    /// other targets.
    Follower,
    /// Every sequencer (`latency` only).
    All,
    /// The sequencer with this node id (`seq-2`).
    Node(u64),
}

impl TryFrom<String> for Target {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        let node = name
            .strip_prefix("seq-")
            .and_then(|id| id.parse::<u64>().ok())
            .filter(|id| *id > 0);
        match (name.as_str(), node) {
            ("leader", _) => Ok(Self::Leader),
            ("follower", _) => Ok(Self::Follower),
            ("all", _) => Ok(Self::All),
            (_, Some(id)) => Ok(Self::Node(id)),
            _ => Err(format!(
                "unknown target {name:?}: expected \"leader\", \"follower\", \"all\" or \"seq-N\""
            )),
        }
    }
}

impl From<Target> for String {
    fn from(target: Target) -> Self {
        target.to_string()
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Leader => f.write_str("leader"),
            Self::Follower => f.write_str("follower"),
            Self::All => f.write_str("all"),
            Self::Node(id) => write!(f, "seq-{id}"),
        }
    }
}

/// The targets of a network fault (empty for process faults).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetTargets {
    /// `partition`: the side cut off from the rest.
    pub nodes: Vec<Target>,
    /// `one-way`, `latency`: where the links start (`latency` default: all).
    pub from: Option<Target>,
    /// `one-way`, `latency`: where they end (`latency` default: all).
    pub to: Option<Target>,
    /// `latency`: the added delay per chunk, each direction.
    #[serde(with = "humantime_serde", default)]
    pub delay: Option<Duration>,
    /// Replica faults: the shard server (`shard-N`); `None`: a seeded random running one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
}

/// `shard-N` → N (≥ 1).
fn shard_index(name: &str) -> Option<u32> {
    name.strip_prefix("shard-")
        .and_then(|index| index.parse::<u32>().ok())
        .filter(|index| *index > 0)
}

impl NetTargets {
    /// Checks the targets against `kind` in a cluster of `shards` shard servers; the message
    /// names the problem.
    pub fn validate(&self, kind: FaultKind, shards: u32) -> Result<(), String> {
        let only = |present: bool, field: &str, kinds: &str| {
            if present {
                Err(format!("`{field}` only applies to {kinds} faults"))
            } else {
                Ok(())
            }
        };
        if kind != FaultKind::Partition {
            only(!self.nodes.is_empty(), "nodes", "partition")?;
        }
        if !matches!(kind, FaultKind::OneWay | FaultKind::Latency) {
            only(self.from.is_some(), "from", "one-way and latency")?;
            only(self.to.is_some(), "to", "one-way and latency")?;
        }
        if kind != FaultKind::Latency {
            only(self.delay.is_some(), "delay", "latency")?;
        }
        if !kind.is_replica() {
            only(
                self.shard.is_some(),
                "target",
                "kill-replica, wipe-replica and isolate-shard",
            )?;
        } else if let Some(name) = &self.shard {
            match shard_index(name) {
                Some(index) if index <= shards => {}
                Some(_) => {
                    return Err(format!(
                        "target {name:?}: the cluster has {shards} shard servers"
                    ));
                }
                None => return Err(format!("target {name:?}: expected \"shard-N\"")),
            }
        }
        match kind {
            FaultKind::Partition => {
                if self.nodes.is_empty() {
                    return Err("a partition needs `nodes` (the side to cut off)".into());
                }
                if self.nodes.contains(&Target::All) {
                    return Err("a partition cannot cut off \"all\" nodes".into());
                }
                if self.nodes.len() >= 3 {
                    return Err(
                        "a partition must leave at least one of the 3 sequencers on the other side"
                            .into(),
                    );
                }
                let distinct: BTreeSet<String> = self
                    .nodes
                    .iter()
                    .filter(|target| **target != Target::Follower)
                    .map(ToString::to_string)
                    .collect();
                let named = self
                    .nodes
                    .iter()
                    .filter(|t| **t != Target::Follower)
                    .count();
                if distinct.len() != named {
                    return Err("a partition names a node twice".into());
                }
            }
            FaultKind::OneWay => {
                let (Some(from), Some(to)) = (self.from, self.to) else {
                    return Err("a one-way fault needs `from` and `to`".into());
                };
                if from == Target::All || to == Target::All {
                    return Err(
                        "a one-way fault cuts one link: `from` and `to` cannot be \"all\"".into(),
                    );
                }
                if from == to && from != Target::Follower {
                    return Err(format!("a one-way fault from {from} to itself"));
                }
            }
            FaultKind::Latency => match self.delay {
                None => return Err("a latency fault needs `delay`".into()),
                Some(delay) if delay.is_zero() => {
                    return Err("a latency fault needs a positive `delay`".into());
                }
                Some(_) => {}
            },
            _ => {}
        }
        Ok(())
    }
}

/// What happened to a fault.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum FaultStatus {
    /// Applied.
    Installed,
    /// Not applied: no safe target.
    Skipped {
        /// Why.
        reason: String,
    },
}

/// How a follower caught up after a [`FaultKind::SnapshotCatchUp`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCatchUp {
    /// The follower's last log index when it was killed.
    pub follower_last_log_before: u64,
    /// `(node, snapshot index, purged index)` of every other sequencer after snapshot + purge.
    pub snapshots: Vec<(u64, u64, u64)>,
    /// How long building the snapshots and purging the logs took, ms.
    pub build_ms: u64,
    /// The leader's commit index when the follower restarted (what it had to reach).
    pub target_index: u64,
    /// The index up to which the leader's log was purged.
    pub leader_purged_index: u64,
    /// The follower's snapshot index once caught up.
    pub follower_snapshot_index: u64,
    /// The follower's applied index once caught up.
    pub follower_applied_index: u64,
    /// Restart → applied index ≥ `target_index`, ms (`None`: not within the bound).
    pub catch_up_ms: Option<u64>,
    /// The follower's log says `installed a snapshot` since the restart.
    pub install_logged: bool,
    /// The evidence holds: the leader purged past the follower's log, and the follower's
    /// snapshot index reached the purged index, so it cannot have caught up by log replay.
    pub via_snapshot: bool,
    /// What went wrong, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Timings of a [`FaultKind::AddVoter`] membership change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipChange {
    /// The node added (and removed at heal).
    pub node: u64,
    /// Start → `AddLearner` (waiting for the learner to catch up) returned, ms.
    pub learner_ms: Option<u64>,
    /// `Promote` (joint consensus, then the new voter set) took, ms.
    pub promote_ms: Option<u64>,
    /// The voter sets after promotion.
    pub voters_after_promote: Vec<Vec<u64>>,
    /// `RemoveNode` at heal took, ms.
    pub remove_ms: Option<u64>,
    /// The voter sets after removal.
    pub voters_after_remove: Vec<Vec<u64>>,
    /// `(epoch, root hex)` of every epoch the added node had committed, read from its own
    /// state just before its removal (compared by `no_fork` with every other observation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roots: Vec<(u64, String)>,
    /// What went wrong, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One fault, as it happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRecord {
    /// The kind.
    pub kind: FaultKind,
    /// The process it hit (empty if skipped).
    pub target: String,
    /// Installed or skipped.
    pub status: FaultStatus,
    /// When it was applied, µs on the history's clock.
    pub injected_us: u64,
    /// When it was healed (restart / resume), µs on the history's clock.
    pub healed_us: Option<u64>,
    /// The sequencer leader before the fault.
    pub leader_before: Option<u64>,
    /// The first different leader seen after it (for leader faults).
    pub new_leader: Option<u64>,
    /// When that leader was first seen, µs on the history's clock.
    pub new_leader_us: Option<u64>,
    /// Network faults: the sequencers cut off (partition).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub isolated: Vec<u64>,
    /// Network faults: the directed links `(from, to)` changed, and to what.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<(u64, u64, LinkFault)>,
    /// `snapshot-catch-up`: how the follower caught up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotCatchUp>,
    /// `add-voter`: the membership change's timings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub membership: Option<MembershipChange>,
    /// Replica faults: how the shard server came back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<ReplicaRecovery>,
    /// `add-shard`: the new server and how long the balancer took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebalance: Option<Rebalance>,
}

/// What an [`FaultKind::AddShard`] fault led to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rebalance {
    /// The new server's id in the shard map (`s4`).
    pub server: String,
    /// Injection → the map had no learner left and the new server voted, ms (`None`: not
    /// within the bound).
    pub balanced_ms: Option<u64>,
    /// The partitions the new server votes in then.
    pub voter_of: Vec<u32>,
    /// Copies per server then (the map's `load`).
    pub copies: Vec<(String, usize)>,
    /// What went wrong, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How a shard server taken out by a replica fault came back, as `ktd admin status -o json`
/// reports it through its shard-map address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecovery {
    /// Its id in the shard map (`s2`).
    pub server: String,
    /// The partitions it voted in just before the fault.
    pub voter_before: Vec<u32>,
    /// Heal → its health `SERVING`, ms (`None`: not within the bound).
    pub serving_ms: Option<u64>,
    /// Heal → a voter with lag 0 in every partition of `voter_before` (and nowhere anything
    /// else), ms (`None`: not within the bound).
    pub caught_up_ms: Option<u64>,
    /// The partitions it votes in once caught up.
    pub voter_after: Vec<u32>,
    /// `partition copied` lines naming it in the sequencers' logs between the fault and the
    /// catch-up (a wiped replica is rebuilt by copies; a killed one replays the log).
    pub partitions_copied: u64,
    /// What went wrong, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Where each sequencer's log ended at the fault (`(name, bytes)`): copies are counted
    /// after it.
    #[serde(skip)]
    log_offsets: Vec<(String, usize)>,
}

impl FaultRecord {
    /// Whether it was applied.
    pub fn installed(&self) -> bool {
        self.status == FaultStatus::Installed
    }

    /// Whether a new leader is expected: the fault hit the leader, or cut it off from the
    /// majority.
    pub fn expects_new_leader(&self) -> bool {
        self.installed()
            && (self.kind.moves_leader()
                || self
                    .leader_before
                    .is_some_and(|leader| self.isolated.contains(&leader)))
    }
}

/// Applies `kind` (with `targets` for network faults). `now_us` reads the history's clock.
pub async fn inject(
    topology: &mut Topology,
    kind: FaultKind,
    targets: &NetTargets,
    rng: &mut StdRng,
    now_us: impl Fn() -> u64,
) -> Result<FaultRecord, TopologyError> {
    let leader_before = topology.leader().await;
    let mut record = FaultRecord {
        kind,
        target: String::new(),
        status: FaultStatus::Installed,
        injected_us: now_us(),
        healed_us: None,
        leader_before,
        new_leader: None,
        new_leader_us: None,
        isolated: Vec::new(),
        links: Vec::new(),
        snapshot: None,
        membership: None,
        replica: None,
        rebalance: None,
    };
    if kind.is_network() {
        return Ok(inject_network(topology, record, targets, rng, now_us));
    }
    let skip = |mut record: FaultRecord, reason: &str| {
        record.status = FaultStatus::Skipped {
            reason: reason.to_string(),
        };
        Ok(record)
    };
    let follower = |topology: &Topology, rng: &mut StdRng| -> Option<String> {
        let candidates: Vec<&str> = topology
            .sequencers
            .iter()
            .filter(|p| p.is_running() && !p.is_paused() && Some(p.id) != leader_before)
            .map(|p| p.name.as_str())
            .collect();
        (!candidates.is_empty())
            .then(|| candidates[rng.random_range(0..candidates.len())].to_string())
    };
    let target = match kind {
        FaultKind::KillLeader | FaultKind::PauseLeader | FaultKind::TransferLeader => {
            match leader_before {
                Some(id) => format!("seq-{id}"),
                None => return skip(record, "no leader"),
            }
        }
        FaultKind::KillFollower | FaultKind::PauseFollower | FaultKind::SnapshotCatchUp => {
            match follower(topology, rng) {
                Some(name) if leader_before.is_some() => name,
                _ => return skip(record, "no leader or no healthy follower"),
            }
        }
        FaultKind::KillShard => {
            if topology.shards.is_empty() {
                return skip(record, "no shard in the topology");
            }
            let index = rng.random_range(0..topology.shards.len());
            topology.shards[index].name.clone()
        }
        FaultKind::KillGateway => match topology.gateways.first() {
            Some(gateway) => gateway.name.clone(),
            None => return skip(record, "no gateway in the topology"),
        },
        FaultKind::AddVoter => {
            if leader_before.is_none() {
                return skip(record, "no leader");
            }
            return Ok(add_voter(topology, record, now_us).await);
        }
        FaultKind::KillReplica | FaultKind::WipeReplica | FaultKind::IsolateShard => {
            return inject_replica(topology, record, targets, rng, now_us).await;
        }
        FaultKind::AddShard => return Ok(add_shard(topology, record, now_us).await),
        FaultKind::Partition | FaultKind::OneWay | FaultKind::Latency | FaultKind::Heal => {
            return Err(TopologyError::State(format!("{kind:?} is a network fault")));
        }
    };
    record.target.clone_from(&target);
    if kind == FaultKind::TransferLeader {
        let Some(to) = follower(topology, rng) else {
            return skip(record, "no healthy follower to transfer to");
        };
        let to_id = topology
            .sequencers
            .iter()
            .find(|p| p.name == to)
            .map(|p| p.id);
        record.target = format!("{target} -> {to}");
        record.injected_us = now_us();
        let client = sequencer::SequencerClient::new(topology.sequencer_addrs());
        if let Err(error) = client.transfer_leader(to_id).await {
            return skip(record, &format!("transfer refused: {error}"));
        }
        return Ok(record);
    }
    let process = topology
        .process_mut(&target)
        .ok_or_else(|| TopologyError::State(format!("no process {target}")))?;
    if !process.is_running() || process.is_paused() {
        return skip(record, "target is already down");
    }
    if kind == FaultKind::SnapshotCatchUp {
        let status = status_of(&process.addr).await;
        record.snapshot = Some(SnapshotCatchUp {
            follower_last_log_before: status.map_or(0, |s| s.last_log_index.max(s.applied_index)),
            ..SnapshotCatchUp::default()
        });
    }
    record.injected_us = now_us();
    match kind {
        FaultKind::PauseLeader | FaultKind::PauseFollower => process.pause()?,
        _ => process.kill9()?,
    }
    Ok(record)
}

/// One node's status, bounded (`None` if it does not answer within 1.5 s).
async fn status_of(addr: &str) -> Option<sequencer::pb::NodeStatus> {
    match tokio::time::timeout(
        Duration::from_millis(1500),
        sequencer::client::node_status_at(addr),
    )
    .await
    {
        Ok(Ok(status)) => Some(status),
        _ => None,
    }
}

/// `(epoch, root hex)` of every epoch the node at `addr` has committed, from its own state
/// (bounded; what cannot be read is left out).
async fn local_roots(addr: &str) -> Vec<(u64, String)> {
    let client = sequencer::SequencerClient::new([addr.to_string()]);
    let read =
        |epoch| tokio::time::timeout(Duration::from_secs(3), client.local_epoch_at(addr, epoch));
    let Ok(Ok(latest)) = read(None).await else {
        return Vec::new();
    };
    let mut roots = Vec::new();
    for epoch in 1..=latest.epoch {
        if let Ok(Ok(record)) = read(Some(epoch)).await {
            roots.push((epoch, hex::encode(&record.root_hash)));
        }
    }
    roots
}

fn ms_since(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A client for admin calls that may wait (a learner catching up): one attempt may take a
/// minute.
fn admin_client(topology: &Topology) -> sequencer::SequencerClient {
    sequencer::SequencerClient::with_options(
        topology.sequencer_addrs(),
        sequencer::ClientOptions {
            attempt_timeout: Duration::from_secs(60),
            total_timeout: Duration::from_secs(90),
            ..sequencer::ClientOptions::default()
        },
    )
}

fn voter_sets(response: &sequencer::pb::MembershipResponse) -> Vec<Vec<u64>> {
    response
        .voter_sets
        .iter()
        .map(|set| set.node_ids.clone())
        .collect()
}

/// [`FaultKind::AddVoter`]'s injection: start a new sequencer, add it as a learner (waiting
/// for it to catch up), promote it. Skipped (and the new process stopped) if no node can be
/// started or the learner is refused; a failed promotion is recorded as an error.
async fn add_voter(
    topology: &mut Topology,
    mut record: FaultRecord,
    now_us: impl Fn() -> u64,
) -> FaultRecord {
    record.injected_us = now_us();
    let id = match topology.spawn_sequencer() {
        Ok(id) => id,
        Err(error) => {
            record.status = FaultStatus::Skipped {
                reason: format!("cannot start a new sequencer: {error}"),
            };
            return record;
        }
    };
    record.target = format!("seq-{id}");
    let addr = topology
        .sequencers
        .iter()
        .find(|p| p.id == id)
        .map(|p| p.addr.clone())
        .unwrap_or_default();
    let client = admin_client(topology);
    let mut change = MembershipChange {
        node: id,
        ..MembershipChange::default()
    };
    let started = Instant::now();
    if let Err(error) = client.add_learner(id, addr, true).await {
        let _ = topology.retire_sequencer(id);
        record.status = FaultStatus::Skipped {
            reason: format!("AddLearner seq-{id} refused: {error}"),
        };
        change.error = Some(format!("add learner: {error}"));
        record.membership = Some(change);
        return record;
    }
    change.learner_ms = Some(ms_since(started));
    let promoting = Instant::now();
    match client.promote(std::collections::BTreeSet::from([id])).await {
        Ok(response) => {
            change.promote_ms = Some(ms_since(promoting));
            change.voters_after_promote = voter_sets(&response);
        }
        Err(error) => change.error = Some(format!("promote: {error}")),
    }
    record.membership = Some(change);
    record
}

/// The shard map as the sequencers hold it.
async fn read_shard_map(client: &sequencer::SequencerClient) -> Result<ktd_core::ShardMap, String> {
    let answer = client
        .cluster_metadata()
        .await
        .map_err(|error| error.to_string())?;
    let metadata = answer.metadata.ok_or("the cluster is not initialised")?;
    shard::replicated::shard_map(&metadata, &answer.shard_map.unwrap_or_default())
        .map_err(|error| error.to_string())
}

/// [`FaultKind::AddShard`]'s injection: start a new shard server and add it to the shard map
/// (compare-and-set, retried on a concurrent change such as a promotion). Skipped if no server
/// can be started or the map change is refused.
async fn add_shard(
    topology: &mut Topology,
    mut record: FaultRecord,
    now_us: impl Fn() -> u64,
) -> FaultRecord {
    record.injected_us = now_us();
    let (id, address) = match topology.spawn_shard() {
        Ok(started) => started,
        Err(error) => {
            record.status = FaultStatus::Skipped {
                reason: format!("cannot start a new shard server: {error}"),
            };
            return record;
        }
    };
    record.target.clone_from(&id);
    let client = admin_client(topology);
    let mut added = Err("no attempt".to_string());
    for _ in 0..20 {
        let map = match read_shard_map(&client).await {
            Ok(map) => map,
            Err(error) => {
                added = Err(error);
                continue;
            }
        };
        let edited = match map.add_server(ktd_core::shard_map::ShardServer {
            id: id.clone(),
            address: format!("http://{address}"),
            maintenance_until_ms: 0,
            draining: false,
        }) {
            Ok(edited) => edited,
            Err(error) => {
                added = Err(error.to_string());
                break;
            }
        };
        match client
            .set_shard_map(shard::replicated::shard_map_to_pb(&edited), map.version())
            .await
        {
            Ok(_) => {
                added = Ok(());
                break;
            }
            Err(error) => added = Err(error.to_string()),
        }
    }
    if let Err(error) = added {
        record.status = FaultStatus::Skipped {
            reason: format!("adding {id} to the shard map failed: {error}"),
        };
    }
    record.rebalance = Some(Rebalance {
        server: id,
        ..Rebalance::default()
    });
    record
}

/// After the schedule: waits (at most `limit`) until an [`FaultKind::AddShard`] fault's moves
/// are done — the new server votes and the map has had no learner for 5 s (the
/// balancer starts the next move a check or two after a promotion, so one look at a map
/// without learners is not enough) — and records it.
pub async fn settle_rebalance(
    topology: &Topology,
    record: &mut FaultRecord,
    limit: Duration,
    now_us: &impl Fn() -> u64,
) {
    let Some(rebalance) = record.rebalance.as_mut() else {
        return;
    };
    if !record.status.eq(&FaultStatus::Installed) {
        return;
    }
    let client = admin_client(topology);
    let started = Instant::now();
    let mut quiet: Option<(Instant, u64)> = None;
    loop {
        match read_shard_map(&client).await {
            Ok(map) => {
                let voter_of: Vec<u32> = map
                    .assignments(&rebalance.server)
                    .into_iter()
                    .filter(|(_, role)| *role == ktd_core::shard_map::Role::Voter)
                    .map(|(partition, _)| partition)
                    .collect();
                let settled =
                    map.partitions().iter().all(|p| p.learners.is_empty()) && !voter_of.is_empty();
                if !settled {
                    quiet = None;
                } else {
                    let (since, at_us) = *quiet.get_or_insert((Instant::now(), now_us()));
                    if since.elapsed() >= SETTLED_FOR {
                        rebalance.balanced_ms =
                            Some(at_us.saturating_sub(record.injected_us) / 1000);
                        rebalance.voter_of = voter_of;
                        rebalance.copies = map
                            .load()
                            .into_iter()
                            .map(|(server, count)| (server.to_string(), count))
                            .collect();
                        rebalance.error = None;
                        return;
                    }
                }
            }
            Err(error) => rebalance.error = Some(error),
        }
        if started.elapsed() >= limit {
            rebalance.error.get_or_insert_with(|| {
                format!(
                    "copies were still moving {} s after the schedule",
                    limit.as_secs()
                )
            });
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How long the map must stay without a learner before a rebalance counts as finished (a few
/// of the coordinator's default 1 s checks).
const SETTLED_FOR: Duration = Duration::from_secs(5);

/// [`FaultKind::SnapshotCatchUp`]'s heal: snapshot + purge on every other running sequencer,
/// restart the follower, wait (bounded) until it has applied the leader's commit index, and
/// record the evidence that it installed a snapshot.
async fn heal_snapshot_catch_up(
    topology: &mut Topology,
    record: &mut FaultRecord,
    now_us: &impl Fn() -> u64,
) -> Result<(), TopologyError> {
    let mut evidence = record.snapshot.take().unwrap_or_default();
    let leader = topology.leader().await;
    let others: Vec<(u64, String)> = topology
        .sequencers
        .iter()
        .filter(|p| p.name != record.target && p.is_running() && !p.is_paused())
        .map(|p| (p.id, p.addr.clone()))
        .collect();
    let client = sequencer::SequencerClient::new(topology.sequencer_addrs());
    let building = Instant::now();
    for (id, addr) in &others {
        match client.trigger_snapshot_at(addr, true).await {
            Ok(done) => {
                evidence
                    .snapshots
                    .push((*id, done.snapshot_index, done.purged_index));
                if Some(*id) == leader {
                    evidence.leader_purged_index = done.purged_index;
                }
            }
            Err(error) => {
                evidence.error = Some(format!("snapshot on seq-{id}: {error}"));
            }
        }
    }
    evidence.build_ms = ms_since(building);
    if let Some(leader) = leader
        && let Some((_, addr)) = others.iter().find(|(id, _)| *id == leader)
    {
        evidence.target_index = status_of(addr).await.map_or(0, |s| s.committed_index);
    }
    let process = topology
        .process_mut(&record.target)
        .ok_or_else(|| TopologyError::State(format!("no process {}", record.target)))?;
    let log_offset = process.log_text().len();
    let addr = process.addr.clone();
    process.restart()?;
    record.healed_us = Some(now_us());
    let restarted = Instant::now();
    let limit = Duration::from_secs(30);
    while restarted.elapsed() < limit {
        if let Some(status) = status_of(&addr).await {
            evidence.follower_snapshot_index = status.snapshot_index;
            evidence.follower_applied_index = status.applied_index;
            if status.applied_index >= evidence.target_index {
                evidence.catch_up_ms = Some(ms_since(restarted));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if evidence.catch_up_ms.is_none() && evidence.error.is_none() {
        evidence.error = Some(format!(
            "the follower had applied {} of {} after {limit:?}",
            evidence.follower_applied_index, evidence.target_index
        ));
    }
    let log = topology
        .process_mut(&record.target)
        .map(|p| p.log_text())
        .unwrap_or_default();
    evidence.install_logged = log
        .get(log_offset..)
        .is_some_and(|tail| tail.contains("installed a snapshot"));
    evidence.via_snapshot = evidence.leader_purged_index > evidence.follower_last_log_before
        && evidence.follower_snapshot_index >= evidence.leader_purged_index;
    record.snapshot = Some(evidence);
    Ok(())
}

/// How long the nemesis waits for a shard server to come back after a replica fault's heal.
const REPLICA_RECOVERY_LIMIT: Duration = Duration::from_secs(40);

/// A shard server that is down, paused or cut off.
fn shard_out(topology: &Topology, name: &str) -> bool {
    topology
        .shards
        .iter()
        .find(|p| p.name == name)
        .is_none_or(|p| !p.is_running() || p.is_paused())
        || topology.shard_isolated(name)
}

/// A replica fault's injection: pick the shard (skipping if it or another shard is already
/// out, or the harness cannot do this fault to it), note where it votes and where the
/// sequencers' logs end, then kill / kill and wipe / isolate it.
async fn inject_replica(
    topology: &mut Topology,
    mut record: FaultRecord,
    targets: &NetTargets,
    rng: &mut StdRng,
    now_us: impl Fn() -> u64,
) -> Result<FaultRecord, TopologyError> {
    let skip = |mut record: FaultRecord, reason: String| {
        record.status = FaultStatus::Skipped { reason };
        Ok(record)
    };
    let names: Vec<String> = topology.shards.iter().map(|p| p.name.clone()).collect();
    if names.is_empty() {
        return skip(record, "no shard in the topology".into());
    }
    let out: Vec<&String> = names.iter().filter(|n| shard_out(topology, n)).collect();
    let target = match &targets.shard {
        Some(name) if !names.contains(name) => {
            return skip(record, format!("there is no {name}"));
        }
        Some(name) => name.clone(),
        None => {
            let up: Vec<&String> = names.iter().filter(|n| !out.contains(n)).collect();
            if up.is_empty() {
                return skip(record, "every shard server is already out".into());
            }
            up[rng.random_range(0..up.len())].clone()
        }
    };
    if out.contains(&&target) {
        return skip(record, format!("{target} is already out"));
    }
    if let Some(other) = out.first() {
        return skip(
            record,
            format!(
                "{other} is already out: taking {target} out too could cost a partition its majority"
            ),
        );
    }
    match record.kind {
        FaultKind::WipeReplica
            if topology
                .shards
                .iter()
                .find(|p| p.name == target)
                .and_then(Process::data_dir)
                .is_none() =>
        {
            return skip(
                record,
                format!(
                    "the data directory of {target} is unknown (a cluster the harness did not start)"
                ),
            );
        }
        FaultKind::IsolateShard if !topology.shard_fences.contains_key(&target) => {
            return skip(
                record,
                format!("{target} has no fence (a cluster the harness did not start)"),
            );
        }
        _ => {}
    }
    record.target.clone_from(&target);
    let server = topology
        .shards
        .iter()
        .find(|p| p.name == target)
        .map(|p| format!("s{}", p.id))
        .unwrap_or_default();
    let voter_before = match admin_status(topology).await {
        Ok(status) => voter_partitions(&status, &server),
        Err(_) => Vec::new(),
    };
    let log_offsets = topology
        .sequencers
        .iter()
        .map(|p| (p.name.clone(), p.log_text().len()))
        .collect();
    record.replica = Some(ReplicaRecovery {
        server,
        voter_before,
        log_offsets,
        ..ReplicaRecovery::default()
    });
    record.injected_us = now_us();
    if record.kind == FaultKind::IsolateShard {
        topology.fence_shard(&target, true)?;
        return Ok(record);
    }
    let process = topology
        .process_mut(&target)
        .ok_or_else(|| TopologyError::State(format!("no process {target}")))?;
    process.kill9()?;
    if record.kind == FaultKind::WipeReplica {
        process.wipe_data()?;
    }
    Ok(record)
}

/// A replica fault's heal: restart or un-isolate the shard, then wait (bounded by
/// [`REPLICA_RECOVERY_LIMIT`]) until it is `SERVING` and a voter with lag 0 wherever it voted
/// before, and count the partition copies made for it.
async fn heal_replica(
    topology: &mut Topology,
    record: &mut FaultRecord,
    now_us: &impl Fn() -> u64,
) -> Result<(), TopologyError> {
    let mut recovery = record.replica.take().unwrap_or_default();
    if record.kind == FaultKind::IsolateShard {
        topology.fence_shard(&record.target, false)?;
    } else {
        let process = topology
            .process_mut(&record.target)
            .ok_or_else(|| TopologyError::State(format!("no process {}", record.target)))?;
        if !process.is_running() {
            process.restart()?;
        }
    }
    record.healed_us = Some(now_us());
    let healed = Instant::now();
    let mut last = String::from("not polled");
    while healed.elapsed() < REPLICA_RECOVERY_LIMIT {
        match admin_status(topology).await {
            Ok(status) => {
                let health = server_health(&status, &recovery.server);
                if recovery.serving_ms.is_none() && health == "SERVING" {
                    recovery.serving_ms = Some(ms_since(healed));
                }
                let (voter, behind) = replica_roles(&status, &recovery.server);
                let caught_up = recovery.serving_ms.is_some()
                    && !voter.is_empty()
                    && behind.is_empty()
                    && recovery.voter_before.iter().all(|p| voter.contains(p));
                recovery.voter_after = voter;
                if caught_up {
                    recovery.caught_up_ms = Some(ms_since(healed));
                    break;
                }
                last = format!(
                    "health {health}; voter in {:?}; not a voter with lag 0 in {behind:?}",
                    recovery.voter_after
                );
            }
            Err(error) => last = error,
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    if recovery.caught_up_ms.is_none() {
        recovery.error = Some(format!(
            "{} ({}) was not back within {REPLICA_RECOVERY_LIMIT:?}: {last}",
            record.target, recovery.server
        ));
    }
    let needle = format!("server={}", recovery.server);
    let quoted = format!("server=\"{}\"", recovery.server);
    recovery.partitions_copied = topology
        .sequencers
        .iter()
        .chain(&topology.retired)
        .map(|process| {
            let offset = recovery
                .log_offsets
                .iter()
                .find(|(name, _)| *name == process.name)
                .map_or(0, |(_, offset)| *offset);
            let text = process.log_text();
            text.get(offset..)
                .unwrap_or_default()
                .lines()
                .map(strip_ansi)
                .filter(|line| {
                    line.contains("partition copied")
                        && line
                            .split_whitespace()
                            .any(|word| word == needle || word == quoted)
                })
                .count() as u64
        })
        .sum();
    record.replica = Some(recovery);
    Ok(())
}

/// `line` without ANSI escape sequences (`ESC [ ... letter`: the text log's colours, which
/// split `server="s2"` into styled pieces).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `ktd admin status -o json` against the cluster's sequencers, bounded to 10 s.
async fn admin_status(topology: &Topology) -> Result<serde_json::Value, String> {
    let binary = match topology.ktd_binary() {
        Some(binary) => binary.to_path_buf(),
        None => crate::topology::find_ktd(None).map_err(|error| error.to_string())?,
    };
    let output = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new(binary)
            .args(["admin", "status", "-o", "json", "--sequencers"])
            .arg(topology.sequencer_addrs().join(","))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| "ktd admin status: no answer within 10 s".to_string())?
    .map_err(|error| format!("run ktd admin status: {error}"))?;
    serde_json::from_slice(&output.stdout).map_err(|error| {
        format!(
            "ktd admin status ({}): not JSON: {error}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )
    })
}

/// `shards[id = server].health` of an admin status (`"unknown"` if absent).
fn server_health(status: &serde_json::Value, server: &str) -> String {
    status["shards"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|row| row["id"] == server)
        .and_then(|row| row["health"].as_str())
        .unwrap_or("unknown")
        .to_string()
}

/// `(partitions where server is a voter with lag 0, partitions where it is a member but not
/// that)` of an admin status.
fn replica_roles(status: &serde_json::Value, server: &str) -> (Vec<u32>, Vec<u32>) {
    let (mut voter, mut behind) = (Vec::new(), Vec::new());
    for row in status["partitions"].as_array().into_iter().flatten() {
        let Some(partition) = row["partition"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
        else {
            continue;
        };
        for cell in row["replicas"].as_array().into_iter().flatten() {
            if cell["server"] != server {
                continue;
            }
            if cell["role"] == "voter" && cell["lag_epochs"].as_u64() == Some(0) {
                voter.push(partition);
            } else {
                behind.push(partition);
            }
        }
    }
    (voter, behind)
}

/// The partitions where `server` is a voter (any lag).
fn voter_partitions(status: &serde_json::Value, server: &str) -> Vec<u32> {
    status["partitions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|row| {
            row["replicas"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|cell| cell["server"] == server && cell["role"] == "voter")
        })
        .filter_map(|row| {
            row["partition"]
                .as_u64()
                .and_then(|p| u32::try_from(p).ok())
        })
        .collect()
}

/// Resolves [`Target`]s to node ids at injection time.
struct Resolver<'a> {
    all: Vec<u64>,
    leader: Option<u64>,
    healthy_followers: Vec<u64>,
    rng: &'a mut StdRng,
}

impl Resolver<'_> {
    /// One target's node ids; `follower` never picks one in `taken`.
    fn resolve(&mut self, target: Target, taken: &[u64]) -> Result<Vec<u64>, String> {
        match target {
            Target::Leader => self
                .leader
                .map(|id| vec![id])
                .ok_or_else(|| "no leader".to_string()),
            Target::Follower => {
                if self.leader.is_none() {
                    return Err("no leader, so no follower".into());
                }
                let free: Vec<u64> = self
                    .healthy_followers
                    .iter()
                    .copied()
                    .filter(|id| !taken.contains(id))
                    .collect();
                if free.is_empty() {
                    return Err("no healthy follower left to pick".into());
                }
                Ok(vec![free[self.rng.random_range(0..free.len())]])
            }
            Target::All => Ok(self.all.clone()),
            Target::Node(id) if self.all.contains(&id) => Ok(vec![id]),
            Target::Node(id) => Err(format!("there is no seq-{id}")),
        }
    }
}

/// What a network fault will do, once its targets are resolved.
struct NetPlan {
    /// For the record: `seq-1 | seq-2, seq-3`, `seq-1 -> seq-2`, ...
    target: String,
    /// The side a partition cuts off.
    isolated: Vec<u64>,
    /// The links to change.
    links: Vec<(u64, u64, LinkFault)>,
}

fn names(ids: &[u64]) -> String {
    ids.iter()
        .map(|id| format!("seq-{id}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn plan_network(
    kind: FaultKind,
    targets: &NetTargets,
    pairs: &[(u64, u64)],
    resolver: &mut Resolver<'_>,
) -> Result<NetPlan, String> {
    match kind {
        FaultKind::Partition => {
            let mut side: Vec<u64> = Vec::new();
            for target in &targets.nodes {
                for id in resolver.resolve(*target, &side)? {
                    if side.contains(&id) {
                        return Err(format!("{target} is already in the partition (seq-{id})"));
                    }
                    side.push(id);
                }
            }
            side.sort_unstable();
            let rest: Vec<u64> = resolver
                .all
                .iter()
                .copied()
                .filter(|id| !side.contains(id))
                .collect();
            if rest.is_empty() {
                return Err("the partition would leave no node on the other side".into());
            }
            let links = pairs
                .iter()
                .filter(|(from, to)| side.contains(from) != side.contains(to))
                .map(|(from, to)| (*from, *to, LinkFault::Blackhole))
                .collect();
            Ok(NetPlan {
                target: format!("{} | {}", names(&side), names(&rest)),
                isolated: side,
                links,
            })
        }
        FaultKind::OneWay => {
            let (Some(from), Some(to)) = (targets.from, targets.to) else {
                return Err("a one-way fault needs from and to".into());
            };
            let from = resolver.resolve(from, &[])?;
            let to = resolver.resolve(to, &from)?;
            match (from.as_slice(), to.as_slice()) {
                ([from], [to]) if from != to => Ok(NetPlan {
                    target: format!("seq-{from} -> seq-{to}"),
                    isolated: Vec::new(),
                    links: vec![(*from, *to, LinkFault::Blackhole)],
                }),
                _ => Err("a one-way fault needs two different single nodes".into()),
            }
        }
        FaultKind::Latency => {
            let delay = targets
                .delay
                .ok_or_else(|| "a latency fault needs a delay".to_string())?;
            let from = resolver.resolve(targets.from.unwrap_or(Target::All), &[])?;
            let to = resolver.resolve(targets.to.unwrap_or(Target::All), &from)?;
            let links: Vec<_> = pairs
                .iter()
                .filter(|(a, b)| from.contains(a) && to.contains(b))
                .map(|(a, b)| (*a, *b, LinkFault::Delay(delay)))
                .collect();
            if links.is_empty() {
                return Err("no link between the selected nodes".into());
            }
            Ok(NetPlan {
                target: format!(
                    "{} -> {} (+{})",
                    names(&from),
                    names(&to),
                    humantime::format_duration(delay)
                ),
                isolated: Vec::new(),
                links,
            })
        }
        FaultKind::Heal => Ok(NetPlan {
            target: "every link".into(),
            isolated: Vec::new(),
            links: Vec::new(),
        }),
        other => Err(format!("{other:?} is not a network fault")),
    }
}

/// Resolves `targets` against the current leader and the healthy followers, then changes the
/// links. Skipped (nothing changed) if a target cannot be resolved.
fn inject_network(
    topology: &Topology,
    mut record: FaultRecord,
    targets: &NetTargets,
    rng: &mut StdRng,
    now_us: impl Fn() -> u64,
) -> FaultRecord {
    let mut resolver = Resolver {
        all: topology.sequencers.iter().map(|p| p.id).collect(),
        leader: record.leader_before,
        healthy_followers: topology
            .sequencers
            .iter()
            .filter(|p| p.is_running() && !p.is_paused() && Some(p.id) != record.leader_before)
            .map(|p| p.id)
            .collect(),
        rng,
    };
    let pairs: Vec<(u64, u64)> = topology.links.pairs().collect();
    if pairs.is_empty() {
        record.status = FaultStatus::Skipped {
            reason: "no link proxies between the sequencers (a cluster the harness did not start)"
                .into(),
        };
        return record;
    }
    match plan_network(record.kind, targets, &pairs, &mut resolver) {
        Ok(plan) => {
            record.target = plan.target;
            record.isolated = plan.isolated;
            record.injected_us = now_us();
            if record.kind == FaultKind::Heal {
                topology.links.heal_all();
            }
            for (from, to, fault) in &plan.links {
                topology.links.set(*from, *to, *fault);
            }
            record.links = plan.links;
        }
        Err(reason) => record.status = FaultStatus::Skipped { reason },
    }
    record
}

/// Undoes `record`'s fault (restart, resume, links back to pass, the added voter removed) and
/// stamps `healed_us`. `now_us` reads the history's clock.
pub async fn heal(
    topology: &mut Topology,
    record: &mut FaultRecord,
    now_us: &impl Fn() -> u64,
) -> Result<(), TopologyError> {
    if !record.installed() || matches!(record.kind, FaultKind::TransferLeader | FaultKind::Heal) {
        return Ok(());
    }
    if record.kind.is_network() {
        for (from, to, _) in &record.links {
            topology.links.set(*from, *to, LinkFault::Pass);
        }
        record.healed_us = Some(now_us());
        return Ok(());
    }
    if record.kind == FaultKind::SnapshotCatchUp {
        return heal_snapshot_catch_up(topology, record, now_us).await;
    }
    if record.kind == FaultKind::AddShard {
        // Nothing to undo: the server stays; the runner waits for its moves after the schedule.
        record.healed_us = Some(now_us());
        return Ok(());
    }
    if record.kind.is_replica() {
        return heal_replica(topology, record, now_us).await;
    }
    if record.kind == FaultKind::AddVoter {
        let mut change = record.membership.take().unwrap_or_default();
        if let Some(addr) = topology
            .sequencers
            .iter()
            .find(|p| p.id == change.node)
            .map(|p| p.addr.clone())
        {
            change.roots = local_roots(&addr).await;
        }
        let removing = Instant::now();
        match admin_client(topology).remove_node(change.node).await {
            Ok(response) => {
                change.remove_ms = Some(ms_since(removing));
                change.voters_after_remove = voter_sets(&response);
                topology.retire_sequencer(change.node)?;
            }
            // Still a member: leave it running rather than break the quorum.
            Err(error) => change.error = Some(format!("remove: {error}")),
        }
        record.healed_us = Some(now_us());
        record.membership = Some(change);
        return Ok(());
    }
    let process = topology
        .process_mut(&record.target)
        .ok_or_else(|| TopologyError::State(format!("no process {}", record.target)))?;
    if process.is_paused() {
        process.resume()?;
    } else if !process.is_running() {
        process.restart()?;
    }
    record.healed_us = Some(now_us());
    Ok(())
}

/// Puts every link back to pass and restarts or resumes every process that is down or paused
/// (the final heal).
pub fn heal_all(topology: &mut Topology) -> Result<(), TopologyError> {
    topology.links.heal_all();
    for fence in topology.shard_fences.values() {
        fence.set(LinkFault::Pass);
    }
    for process in topology
        .sequencers
        .iter_mut()
        .chain(&mut topology.shards)
        .chain(&mut topology.gateways)
    {
        if process.is_paused() {
            process.resume()?;
        } else if !process.is_running() {
            process.restart()?;
        }
    }
    Ok(())
}

/// Polls the sequencers (except `old`) until one reports itself leader; returns its id and when
/// it was first seen, or `None` after `limit`.
pub async fn wait_new_leader(
    addrs: Vec<(u64, String)>,
    old: Option<u64>,
    limit: Duration,
) -> Option<(u64, Instant)> {
    let started = Instant::now();
    while started.elapsed() < limit {
        for (id, addr) in &addrs {
            if Some(*id) == old {
                continue;
            }
            if let Ok(Ok(status)) = tokio::time::timeout(
                Duration::from_millis(300),
                sequencer::client::node_status_at(addr),
            )
            .await
                && status.state == "leader"
                && Some(status.node_id) != old
            {
                return Some((status.node_id, Instant::now()));
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    None
}

/// The sequencers after the heal: one leader that every node follows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Converged {
    /// The leader every node names.
    pub leader: u64,
    /// Its term.
    pub term: u64,
    /// How long the wait took, ms.
    pub waited_ms: u64,
}

/// Waits until every sequencer in `addrs` answers, exactly one says it is the leader, every one
/// names it at the same term, and every follower has applied the leader's commit index as seen
/// at the first such poll: a node cut off during the run (an isolated old leader) has rejoined
/// and caught up. Errors with the last disagreement after `limit`.
pub async fn wait_converged(addrs: &[(u64, String)], limit: Duration) -> Result<Converged, String> {
    let started = Instant::now();
    let mut target_index: Option<(u64, u64, u64)> = None;
    let mut last = String::from("not polled");
    while started.elapsed() < limit {
        let mut statuses = Vec::new();
        for (id, addr) in addrs {
            match tokio::time::timeout(
                Duration::from_millis(1500),
                sequencer::client::node_status_at(addr),
            )
            .await
            {
                Ok(Ok(status)) => statuses.push(status),
                Ok(Err(error)) => last = format!("seq-{id}: {error}"),
                Err(_) => last = format!("seq-{id}: no status within 1.5 s"),
            }
        }
        if statuses.len() == addrs.len() {
            let leaders: Vec<_> = statuses.iter().filter(|s| s.state == "leader").collect();
            match leaders.as_slice() {
                [leader] => {
                    let (id, term) = (leader.node_id, leader.term);
                    // The index to reach is fixed once, so a busy leader cannot outrun it.
                    let (_, _, index) =
                        *target_index.get_or_insert((id, term, leader.committed_index));
                    let behind: Vec<String> = statuses
                        .iter()
                        .filter(|s| s.leader_id != id || s.term != term || s.applied_index < index)
                        .map(|s| {
                            format!(
                                "seq-{} ({}, leader {}, term {}, applied {})",
                                s.node_id, s.state, s.leader_id, s.term, s.applied_index
                            )
                        })
                        .collect();
                    if behind.is_empty() {
                        return Ok(Converged {
                            leader: id,
                            term,
                            waited_ms: u64::try_from(started.elapsed().as_millis())
                                .unwrap_or(u64::MAX),
                        });
                    }
                    last = format!(
                        "leader seq-{id} (term {term}, commit index {index}); not following or not caught up: {}",
                        behind.join(", ")
                    );
                }
                _ => {
                    last = format!(
                        "{} nodes say they lead: {:?}",
                        leaders.len(),
                        leaders.iter().map(|s| s.node_id).collect::<Vec<_>>()
                    );
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const PAIRS: &[(u64, u64)] = &[(1, 2), (1, 3), (2, 1), (2, 3), (3, 1), (3, 2)];

    fn plan(kind: FaultKind, targets: NetTargets, leader: Option<u64>) -> Result<NetPlan, String> {
        let mut rng = StdRng::seed_from_u64(3);
        let mut resolver = Resolver {
            all: vec![1, 2, 3],
            leader,
            healthy_followers: [1, 2, 3]
                .into_iter()
                .filter(|id| Some(*id) != leader)
                .collect(),
            rng: &mut rng,
        };
        plan_network(kind, &targets, PAIRS, &mut resolver)
    }

    #[test]
    fn copies_are_found_in_coloured_and_plain_log_lines() {
        let coloured = "\u{1b}[2m2026-12-02T12:15:44Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m partition copied \u{1b}[3mserver\u{1b}[0m\u{1b}[2m=\u{1b}[0m\"s2\" \u{1b}[3mpartition\u{1b}[0m\u{1b}[2m=\u{1b}[0m0";
        assert_eq!(
            strip_ansi(coloured),
            "2026-12-02T12:15:44Z  INFO partition copied server=\"s2\" partition=0"
        );
        assert_eq!(strip_ansi("plain server=s2"), "plain server=s2");
    }

    #[test]
    fn an_isolated_leader_loses_every_link_both_ways() {
        let targets = NetTargets {
            nodes: vec![Target::Leader],
            ..NetTargets::default()
        };
        let isolated = plan(FaultKind::Partition, targets.clone(), Some(2)).expect("plan");
        assert_eq!(isolated.isolated, [2]);
        assert_eq!(isolated.target, "seq-2 | seq-1, seq-3");
        let cut: Vec<_> = isolated.links.iter().map(|(a, b, _)| (*a, *b)).collect();
        assert_eq!(cut, [(1, 2), (2, 1), (2, 3), (3, 2)]);
        assert!(isolated.links.iter().all(|l| l.2 == LinkFault::Blackhole));
        let skipped = plan(FaultKind::Partition, targets, None).map(|p| p.target);
        assert_eq!(skipped, Err("no leader".to_string()));
    }

    #[test]
    fn one_way_and_latency_pick_their_links() {
        let one_way = NetTargets {
            from: Some(Target::Leader),
            to: Some(Target::Follower),
            ..NetTargets::default()
        };
        let plan_one = plan(FaultKind::OneWay, one_way, Some(1)).expect("plan");
        assert_eq!(plan_one.links.len(), 1);
        let (from, to, fault) = plan_one.links[0];
        assert_eq!((from, fault), (1, LinkFault::Blackhole));
        assert!(to == 2 || to == 3);

        let latency = NetTargets {
            from: Some(Target::Leader),
            delay: Some(Duration::from_millis(50)),
            ..NetTargets::default()
        };
        let plan_latency = plan(FaultKind::Latency, latency, Some(3)).expect("plan");
        let links: Vec<_> = plan_latency
            .links
            .iter()
            .map(|(a, b, _)| (*a, *b))
            .collect();
        assert_eq!(links, [(3, 1), (3, 2)]);
        assert!(
            plan_latency
                .links
                .iter()
                .all(|l| l.2 == LinkFault::Delay(Duration::from_millis(50)))
        );

        let two_followers = NetTargets {
            nodes: vec![Target::Follower, Target::Follower],
            ..NetTargets::default()
        };
        let plan_two = plan(FaultKind::Partition, two_followers, Some(1)).expect("plan");
        assert_eq!(plan_two.target, "seq-2, seq-3 | seq-1");
        let missing = NetTargets {
            nodes: vec![Target::Node(9)],
            ..NetTargets::default()
        };
        assert!(plan(FaultKind::Partition, missing, Some(1)).is_err());
    }
}
