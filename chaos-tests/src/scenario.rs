//! Scenarios: reviewable TOML files under `chaos-tests/scenarios/` naming a workload, a fault
//! schedule and SLOs. The shipped ones are compiled in (so `ktd-chaos list` works from any
//! directory); `--scenario PATH.toml` loads another one.
//!
//! ```toml
//! name = "leader-kill"
//! description = "SIGKILL the sequencer leader, restart it 3 s later"
//! duration = "40s"
//! epoch_interval = "1s"
//! clients = 4
//! keys = 16
//!
//! [[faults]]
//! kind = "kill-leader"
//! at = "6s"            # after the workload starts
//! heal_after = "3s"    # restart / resume after this long
//! repeat_every = "12s" # optional: again every 12 s (± 20 %, seeded) while time is left
//!
//! # Network faults act on the proxies between sequencers; targets are "leader", "follower",
//! # "seq-N" and (latency only) "all".
//! [[faults]]
//! kind = "partition"   # cut these nodes off from the rest, both directions
//! nodes = ["leader"]
//! at = "20s"
//! heal_after = "6s"
//!
//! [[faults]]
//! kind = "one-way"     # blackhole the connections `from` opens to `to` only
//! from = "leader"
//! to = "follower"
//! at = "30s"
//!
//! [[faults]]
//! kind = "latency"     # delay every chunk on the links from → to (default all → all)
//! from = "leader"
//! delay = "100ms"
//! at = "35s"
//!
//! # Shard faults take out one shard server (one replica of the partitions it holds):
//! # `kill-replica` (SIGKILL, restart at heal), `wipe-replica` (SIGKILL and delete its data
//! # directory, restart it empty at heal), `isolate-shard` (blackhole every connection to and
//! # from it, restore at heal). `target = "shard-N"`, or a seeded random running shard.
//! [[faults]]
//! kind = "kill-replica"
//! target = "shard-2"
//! at = "40s"
//!
//! # Capacity: start a new, empty shard server and add it to the shard map; the balancer moves
//! # copies onto it while the later faults run, and after the schedule the run waits (≤ 120 s)
//! # until no copy is moving (an SLO check fails otherwise).
//! [[faults]]
//! kind = "add-shard"
//! at = "45s"
//! heal_after = "1s"
//!
//! [slo]
//! max_write_unavailable = "10s"
//! max_p99_publish = "8s"
//! max_commit_gap = "3s"  # optional: longest gap between committed epochs around a fault
//! max_failed_reads = 0   # optional: lookups without an answer over the whole run
//! ```
//!
//! The cluster has 3 sequencers, `shards` shard servers (default 2) and 1 gateway; every
//! partition is held by `replication_factor` of the shard servers (default: the sequencer's,
//! min(3, shards)). `replication_factor` must not exceed `shards`.

use std::path::Path;
use std::time::Duration;

use rand::Rng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use crate::nemesis::{FaultKind, NetTargets, Target};
use crate::positive_control::BrokenMode;

/// A scenario file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Its name (the file stem).
    pub name: String,
    /// What it does, one line.
    pub description: String,
    /// Default run length (the fault window; `--duration` overrides it).
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// The sequencer's epoch interval.
    #[serde(with = "humantime_serde", default = "default_epoch_interval")]
    pub epoch_interval: Duration,
    /// Shard servers in the cluster (at least 1).
    #[serde(default = "default_shards")]
    pub shards: u32,
    /// Voting replicas per partition (`--replication-factor` at `--init`; `None`: the
    /// sequencer's default, min(3, shards)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_factor: Option<u32>,
    /// Concurrent clients.
    #[serde(default = "default_clients")]
    pub clients: u32,
    /// Key space size.
    #[serde(default = "default_keys")]
    pub keys: u32,
    /// Fraction of operations that are publishes.
    #[serde(default = "default_publish_ratio")]
    pub publish_ratio: f64,
    /// Per-operation client timeout.
    #[serde(with = "humantime_serde", default = "default_op_timeout")]
    pub op_timeout: Duration,
    /// The fault schedule.
    #[serde(default)]
    pub faults: Vec<FaultSpec>,
    /// Service-level objectives (breach: exit 2).
    #[serde(default)]
    pub slo: Slo,
    /// Positive control: run the cluster in a deliberately broken mode; the run must exit 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broken_mode: Option<BrokenMode>,
}

fn default_epoch_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_shards() -> u32 {
    2
}
fn default_clients() -> u32 {
    4
}
fn default_keys() -> u32 {
    16
}
fn default_publish_ratio() -> f64 {
    0.6
}
fn default_op_timeout() -> Duration {
    Duration::from_secs(3)
}

/// One scheduled fault (possibly repeated).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// What to do.
    pub kind: FaultKind,
    /// When, after the workload starts.
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    /// Heal (restart / resume) this long after injecting.
    #[serde(with = "humantime_serde", default = "default_heal_after")]
    pub heal_after: Duration,
    /// Repeat with this period (± 20 %, seeded) while the run has time left.
    #[serde(with = "humantime_serde", default)]
    pub repeat_every: Option<Duration>,
    /// `partition`: the sequencers to cut off from the rest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<Target>,
    /// `one-way`, `latency`: where the links start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Target>,
    /// `one-way`, `latency`: where the links end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Target>,
    /// `latency`: delay added per chunk, each direction.
    #[serde(
        with = "humantime_serde",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub delay: Option<Duration>,
    /// `kill-replica`, `wipe-replica`, `isolate-shard`: the shard server (`shard-N`); default a
    /// seeded random running one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl FaultSpec {
    /// The network targets.
    pub fn targets(&self) -> NetTargets {
        NetTargets {
            nodes: self.nodes.clone(),
            from: self.from,
            to: self.to,
            delay: self.delay,
            shard: self.target.clone(),
        }
    }
}

fn default_heal_after() -> Duration {
    Duration::from_secs(3)
}

/// SLOs measured per fault.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slo {
    /// Longest acceptable write unavailability after a fault.
    #[serde(with = "humantime_serde", default = "default_unavailable")]
    pub max_write_unavailable: Duration,
    /// Acceptable p99 latency of acknowledged publishes during fault windows.
    #[serde(with = "humantime_serde", default = "default_p99")]
    pub max_p99_publish: Duration,
    /// Bound on healing: the last acknowledged epoch must commit within this after the run.
    #[serde(with = "humantime_serde", default = "default_heal")]
    pub max_heal: Duration,
    /// Longest acceptable gap between two consecutive committed epochs from a fault until 5 s
    /// after its heal (including the stall up to the first commit after that window). `None`:
    /// not checked (a fault that is allowed to stall epochs).
    #[serde(
        with = "humantime_serde",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub max_commit_gap: Option<Duration>,
    /// Most lookups that may end without an answer (timeout, `UNAVAILABLE`, any refusal) over
    /// the whole run. `None`: not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failed_reads: Option<u64>,
}

fn default_unavailable() -> Duration {
    Duration::from_secs(10)
}
fn default_p99() -> Duration {
    Duration::from_secs(8)
}
fn default_heal() -> Duration {
    Duration::from_secs(30)
}

impl Default for Slo {
    fn default() -> Self {
        Self {
            max_write_unavailable: default_unavailable(),
            max_p99_publish: default_p99(),
            max_heal: default_heal(),
            max_commit_gap: None,
            max_failed_reads: None,
        }
    }
}

impl Slo {
    /// Applies `--slo` overrides: comma-separated `NAME=DURATION` with NAME one of
    /// `write_unavailability` (or `max_write_unavailable`), `p99_publish` (`max_p99_publish`),
    /// `heal` (`max_heal`), `commit_gap` (`max_commit_gap`), and `failed_reads`
    /// (`max_failed_reads`, a count). Unknown names and bad values are errors.
    pub fn apply_overrides(&mut self, overrides: &str) -> Result<(), String> {
        for entry in overrides
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            let (name, value) = entry
                .split_once('=')
                .ok_or_else(|| format!("--slo entry {entry:?} is not NAME=DURATION"))?;
            if matches!(name.trim(), "failed_reads" | "max_failed_reads") {
                let count = value
                    .trim()
                    .parse::<u64>()
                    .map_err(|error| format!("--slo {name}: {value:?}: {error}"))?;
                self.max_failed_reads = Some(count);
                continue;
            }
            let value = humantime::parse_duration(value.trim())
                .map_err(|error| format!("--slo {name}: {value:?}: {error}"))?;
            match name.trim() {
                "write_unavailability" | "max_write_unavailable" => {
                    self.max_write_unavailable = value;
                }
                "p99_publish" | "max_p99_publish" => self.max_p99_publish = value,
                "heal" | "max_heal" => self.max_heal = value,
                "commit_gap" | "max_commit_gap" => self.max_commit_gap = Some(value),
                other => {
                    return Err(format!(
                        "unknown SLO {other:?}: expected write_unavailability, p99_publish, heal, \
                         commit_gap or failed_reads"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A fault at a concrete time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scheduled {
    /// What.
    pub kind: FaultKind,
    /// When, after the workload starts.
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    /// How long it holds.
    #[serde(with = "humantime_serde")]
    pub heal_after: Duration,
    /// Network faults' targets.
    #[serde(default)]
    pub targets: NetTargets,
}

/// Why a scenario could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// No shipped scenario has that name, and it is not a file.
    #[error("no scenario named {0:?} (see `ktd-chaos list`)")]
    Unknown(String),
    /// The file could not be read.
    #[error("read {path}: {source}")]
    Read {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The TOML is invalid.
    #[error("scenario {name}: {source}")]
    Parse {
        /// Which scenario.
        name: String,
        /// The error.
        source: toml::de::Error,
    },
    /// The cluster shape is impossible (`shards`, `replication_factor`).
    #[error("scenario {name}: {message}")]
    Topology {
        /// Which scenario.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// A fault's fields do not fit its kind.
    #[error("scenario {name}: fault {index} ({kind}): {message}")]
    Invalid {
        /// Which scenario.
        name: String,
        /// The fault's position, from 1.
        index: usize,
        /// Its kind.
        kind: String,
        /// What is wrong.
        message: String,
    },
}

/// Most shard servers a scenario may ask for (each gets its own `127.0.0.x`).
pub const MAX_SHARDS: u32 = 9;

/// The shipped scenarios: `(name, TOML)`.
pub const BUILTIN: &[(&str, &str)] = &[
    ("leader-kill", include_str!("../scenarios/leader-kill.toml")),
    (
        "leader-isolated",
        include_str!("../scenarios/leader-isolated.toml"),
    ),
    (
        "one-way-partition",
        include_str!("../scenarios/one-way-partition.toml"),
    ),
    ("latency", include_str!("../scenarios/latency.toml")),
    (
        "follower-kill",
        include_str!("../scenarios/follower-kill.toml"),
    ),
    (
        "follower-pause",
        include_str!("../scenarios/follower-pause.toml"),
    ),
    (
        "leader-pause",
        include_str!("../scenarios/leader-pause.toml"),
    ),
    (
        "leader-transfer",
        include_str!("../scenarios/leader-transfer.toml"),
    ),
    (
        "shard-crash-mid-epoch",
        include_str!("../scenarios/shard-crash-mid-epoch.toml"),
    ),
    (
        "gateway-restart",
        include_str!("../scenarios/gateway-restart.toml"),
    ),
    (
        "leader-kill-loop",
        include_str!("../scenarios/leader-kill-loop.toml"),
    ),
    (
        "snapshot-catch-up",
        include_str!("../scenarios/snapshot-catch-up.toml"),
    ),
    (
        "membership-change",
        include_str!("../scenarios/membership-change.toml"),
    ),
    (
        "broken-stale-reads",
        include_str!("../scenarios/broken-stale-reads.toml"),
    ),
    (
        "replica-kill",
        include_str!("../scenarios/replica-kill.toml"),
    ),
    (
        "replica-disk-wipe",
        include_str!("../scenarios/replica-disk-wipe.toml"),
    ),
    (
        "shard-isolated",
        include_str!("../scenarios/shard-isolated.toml"),
    ),
    (
        "broken-unreplicated-kill",
        include_str!("../scenarios/broken-unreplicated-kill.toml"),
    ),
    (
        "rebalance-under-faults",
        include_str!("../scenarios/rebalance-under-faults.toml"),
    ),
];

impl Scenario {
    /// Parses TOML and checks every fault's fields against its kind.
    pub fn parse(name: &str, text: &str) -> Result<Self, ScenarioError> {
        let scenario: Self = toml::from_str(text).map_err(|source| ScenarioError::Parse {
            name: name.to_string(),
            source,
        })?;
        let shape = |message: String| ScenarioError::Topology {
            name: name.to_string(),
            message,
        };
        if scenario.shards == 0 || scenario.shards > MAX_SHARDS {
            return Err(shape(format!(
                "shards = {} (expected 1 to {MAX_SHARDS})",
                scenario.shards
            )));
        }
        match scenario.replication_factor {
            Some(0) => return Err(shape("replication_factor = 0 (expected at least 1)".into())),
            Some(factor) if factor > scenario.shards => {
                return Err(shape(format!(
                    "replication_factor = {factor} exceeds shards = {}: a partition cannot have \
                     more replicas than there are shard servers",
                    scenario.shards
                )));
            }
            _ => {}
        }
        for (index, fault) in scenario.faults.iter().enumerate() {
            fault
                .targets()
                .validate(fault.kind, scenario.shards)
                .map_err(|message| ScenarioError::Invalid {
                    name: name.to_string(),
                    index: index + 1,
                    kind: serde_json::to_value(fault.kind)
                        .ok()
                        .and_then(|value| value.as_str().map(str::to_string))
                        .unwrap_or_else(|| format!("{:?}", fault.kind)),
                    message,
                })?;
        }
        Ok(scenario)
    }

    /// A shipped scenario by name, or a TOML file by path.
    pub fn load(name_or_path: &str) -> Result<Self, ScenarioError> {
        if let Some((name, text)) = BUILTIN.iter().find(|(name, _)| *name == name_or_path) {
            return Self::parse(name, text);
        }
        let path = Path::new(name_or_path);
        if path.extension().is_some_and(|ext| ext == "toml") {
            let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
                path: name_or_path.to_string(),
                source,
            })?;
            return Self::parse(name_or_path, &text);
        }
        Err(ScenarioError::Unknown(name_or_path.to_string()))
    }

    /// The concrete fault times for a run of `duration`: every fault and its repeats, leaving
    /// the fault's hold plus 2 s before the end; sorted by time.
    pub fn schedule(&self, duration: Duration, rng: &mut StdRng) -> Vec<Scheduled> {
        let mut out = Vec::new();
        for spec in &self.faults {
            let mut at = spec.at;
            loop {
                if at + spec.heal_after + Duration::from_secs(2) > duration {
                    break;
                }
                out.push(Scheduled {
                    kind: spec.kind,
                    at,
                    heal_after: spec.heal_after,
                    targets: spec.targets(),
                });
                let Some(period) = spec.repeat_every else {
                    break;
                };
                // Next one after this one has healed, with ± 20 % jitter.
                let jitter = rng.random_range(0.8..1.2);
                at += period
                    .mul_f64(jitter)
                    .max(spec.heal_after + Duration::from_secs(1));
            }
        }
        out.sort_by_key(|scheduled| scheduled.at);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn shipped_scenarios_parse_and_schedule() {
        for (name, text) in BUILTIN {
            let scenario = Scenario::parse(name, text).expect("parses");
            assert_eq!(scenario.name, *name);
            let schedule = scenario.schedule(scenario.duration, &mut StdRng::seed_from_u64(7));
            assert!(!schedule.is_empty(), "{name} schedules no fault");
        }
    }

    #[test]
    fn slo_overrides_apply_and_bad_ones_are_refused() {
        let mut slo = Slo::default();
        slo.apply_overrides("write_unavailability=5s, p99_publish=2s,heal=1m")
            .expect("valid");
        assert_eq!(slo.max_write_unavailable, Duration::from_secs(5));
        assert_eq!(slo.max_p99_publish, Duration::from_secs(2));
        assert_eq!(slo.max_heal, Duration::from_secs(60));
        for (bad, expected) in [
            ("latency=5s", "unknown SLO"),
            ("heal", "not NAME=DURATION"),
            ("heal=soon", "heal"),
        ] {
            let error = slo.apply_overrides(bad).expect_err(bad);
            assert!(error.contains(expected), "{error}");
        }
    }

    #[test]
    fn network_targets_parse_and_bad_ones_are_refused() {
        let scenario = Scenario::load("leader-isolated").expect("shipped");
        assert_eq!(scenario.faults[0].kind, FaultKind::Partition);
        assert_eq!(scenario.faults[0].nodes, [Target::Leader]);
        let with = |fault: &str| {
            let text = format!(
                "name = \"t\"\ndescription = \"t\"\nduration = \"10s\"\n[[faults]]\nat = \"1s\"\n{fault}\n"
            );
            Scenario::parse("t", &text).map_err(|error| error.to_string())
        };
        let ok = with("kind = \"one-way\"\nfrom = \"seq-1\"\nto = \"follower\"").expect("valid");
        assert_eq!(ok.faults[0].from, Some(Target::Node(1)));
        with("kind = \"latency\"\ndelay = \"50ms\"").expect("latency all -> all");
        for (fault, expected) in [
            (
                "kind = \"partition\"\nnodes = [\"leadr\"]",
                "unknown target \"leadr\"",
            ),
            (
                "kind = \"partition\"\nnodes = [\"seq-0\"]",
                "unknown target",
            ),
            ("kind = \"partition\"", "needs `nodes`"),
            ("kind = \"partition\"\nnodes = [\"all\"]", "cannot cut off"),
            (
                "kind = \"partition\"\nnodes = [\"leader\", \"leader\"]",
                "twice",
            ),
            (
                "kind = \"partition\"\nnodes = [\"seq-1\", \"seq-2\", \"seq-3\"]",
                "at least one",
            ),
            (
                "kind = \"one-way\"\nfrom = \"leader\"",
                "needs `from` and `to`",
            ),
            (
                "kind = \"one-way\"\nfrom = \"leader\"\nto = \"leader\"",
                "to itself",
            ),
            (
                "kind = \"one-way\"\nfrom = \"all\"\nto = \"leader\"",
                "cannot be \"all\"",
            ),
            ("kind = \"latency\"", "needs `delay`"),
            ("kind = \"latency\"\ndelay = \"0s\"", "positive"),
            (
                "kind = \"kill-leader\"\nnodes = [\"leader\"]",
                "`nodes` only applies",
            ),
            (
                "kind = \"partition\"\nnodes = [\"leader\"]\ndelay = \"1s\"",
                "`delay` only applies",
            ),
            ("kind = \"cut-wire\"", "unknown variant"),
        ] {
            let error = with(fault).expect_err(fault);
            assert!(error.contains(expected), "{fault}: {error}");
        }
    }

    #[test]
    fn a_scenario_chooses_its_shards_and_replication_factor_within_bounds() {
        let old = Scenario::load("shard-crash-mid-epoch").expect("shipped");
        assert_eq!((old.shards, old.replication_factor), (2, None));
        let replicated = Scenario::load("replica-kill").expect("shipped");
        assert_eq!(
            (replicated.shards, replicated.replication_factor),
            (3, Some(3))
        );
        assert_eq!(replicated.slo.max_failed_reads, Some(0));
        assert_eq!(replicated.slo.max_commit_gap, Some(Duration::from_secs(3)));
        let with = |head: &str, fault: &str| {
            let text = format!(
                "name = \"t\"\ndescription = \"t\"\nduration = \"10s\"\n{head}\n[[faults]]\nat = \"1s\"\n{fault}\n"
            );
            Scenario::parse("t", &text).map_err(|error| error.to_string())
        };
        let ok = with(
            "shards = 3",
            "kind = \"wipe-replica\"\ntarget = \"shard-3\"",
        )
        .expect("valid");
        assert_eq!(ok.faults[0].targets().shard.as_deref(), Some("shard-3"));
        with(
            "shards = 1\nreplication_factor = 1",
            "kind = \"kill-replica\"",
        )
        .expect("valid");
        for (head, fault, expected) in [
            ("shards = 0", "kind = \"kill-shard\"", "shards = 0"),
            ("shards = 10", "kind = \"kill-shard\"", "expected 1 to 9"),
            (
                "shards = 2\nreplication_factor = 3",
                "kind = \"kill-shard\"",
                "exceeds shards",
            ),
            (
                "replication_factor = 0",
                "kind = \"kill-shard\"",
                "at least 1",
            ),
            (
                "shards = 3",
                "kind = \"isolate-shard\"\ntarget = \"shard-4\"",
                "has 3 shard servers",
            ),
            (
                "",
                "kind = \"kill-replica\"\ntarget = \"seq-1\"",
                "expected \"shard-N\"",
            ),
            (
                "",
                "kind = \"kill-leader\"\ntarget = \"shard-1\"",
                "`target` only applies",
            ),
        ] {
            let error = with(head, fault).expect_err(fault);
            assert!(error.contains(expected), "{head} {fault}: {error}");
        }
    }

    #[test]
    fn count_slo_overrides_apply() {
        let mut slo = Slo::default();
        slo.apply_overrides("failed_reads=2,commit_gap=1500ms")
            .expect("valid");
        assert_eq!(slo.max_failed_reads, Some(2));
        assert_eq!(slo.max_commit_gap, Some(Duration::from_millis(1500)));
        let error = slo
            .apply_overrides("failed_reads=many")
            .expect_err("not a count");
        assert!(error.contains("failed_reads"), "{error}");
    }

    #[test]
    fn repeats_stay_inside_the_run() {
        let scenario = Scenario::load("leader-kill-loop").expect("shipped");
        let duration = Duration::from_secs(120);
        let schedule = scenario.schedule(duration, &mut StdRng::seed_from_u64(1));
        assert!(schedule.len() > 3);
        for pair in schedule.windows(2) {
            assert!(pair[1].at >= pair[0].at + pair[0].heal_after);
        }
        let last = schedule.last().expect("some");
        assert!(last.at + last.heal_after < duration);
    }
}
