//! Faults injected into a running [`Topology`], each recorded with timestamps. Leader-aware: a
//! leader fault finds the current leader first; a follower fault picks a follower at random
//! (seeded). A fault that has no safe target is `skipped` with a reason, never half-applied.

use std::time::{Duration, Instant};

use rand::Rng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use crate::topology::{Topology, TopologyError};

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
}

impl FaultKind {
    /// Whether the fault targets the sequencer leader (so a new leader is expected).
    pub fn moves_leader(self) -> bool {
        matches!(
            self,
            Self::KillLeader | Self::PauseLeader | Self::TransferLeader
        )
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
}

impl FaultRecord {
    /// Whether it was applied.
    pub fn installed(&self) -> bool {
        self.status == FaultStatus::Installed
    }
}

/// Applies `kind`. `now_us` reads the history's clock.
pub async fn inject(
    topology: &mut Topology,
    kind: FaultKind,
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
    };
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
        FaultKind::KillFollower | FaultKind::PauseFollower => match follower(topology, rng) {
            Some(name) if leader_before.is_some() => name,
            _ => return skip(record, "no leader or no healthy follower"),
        },
        FaultKind::KillShard => {
            let index = rng.random_range(0..topology.shards.len());
            topology.shards[index].name.clone()
        }
        FaultKind::KillGateway => topology.gateways[0].name.clone(),
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
    record.injected_us = now_us();
    match kind {
        FaultKind::PauseLeader | FaultKind::PauseFollower => process.pause()?,
        _ => process.kill9()?,
    }
    Ok(record)
}

/// Undoes `record`'s fault (restart or resume) and stamps `healed_us`.
pub fn heal(
    topology: &mut Topology,
    record: &mut FaultRecord,
    now_us: u64,
) -> Result<(), TopologyError> {
    if !record.installed() || record.kind == FaultKind::TransferLeader {
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
    record.healed_us = Some(now_us);
    Ok(())
}

/// Restarts or resumes every process that is down or paused (the final heal).
pub fn heal_all(topology: &mut Topology) -> Result<(), TopologyError> {
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
