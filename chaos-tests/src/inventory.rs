//! Inventories: a cluster that is already running (started by `deploy/local-cluster.sh`,
//! systemd, Kubernetes...), described for `ktd-chaos drill`. Each node has a role, an address
//! and shell hooks for the process faults; the drill runs the same workload, nemesis, checkers
//! and report as `ktd-chaos run`, with the faults going through the hooks.
//!
//! ```toml
//! [[nodes]]
//! name = "seq-1"
//! role = "sequencer"
//! id = 1                                   # the Raft node id (sequencers only)
//! addr = "127.0.0.1:7001"                  # host:port (a gateway may use http://host:port)
//! kill = "kill -9 $(cat /tmp/ktd-local/sequencer-1.pid)"
//! start = "deploy/local-cluster.sh relaunch sequencer-1"
//! pause = "kill -STOP $(cat /tmp/ktd-local/sequencer-1.pid)"
//! resume = "kill -CONT $(cat /tmp/ktd-local/sequencer-1.pid)"
//! log = "/tmp/ktd-local/sequencer-1.log"   # optional: copied into the artifacts
//! ```
//!
//! Hooks run with `sh -c` (from the directory `ktd-chaos` runs in) with `KTD_NODE`,
//! `KTD_NODE_ID` and `KTD_NODE_ADDR` set, and must return within 30 s (`start` launches the
//! process in the background). Unknown keys, duplicate names or ids, and a scenario whose
//! faults need a hook some node lacks (or need what a running cluster cannot offer: link
//! proxies, a spare sequencer) are refused before anything is touched.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::nemesis::FaultKind;
use crate::scenario::Scenario;
use crate::topology::{Hooks, Process, Role, Topology};

/// A running cluster.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    /// Its nodes.
    pub nodes: Vec<NodeEntry>,
}

/// One node.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    /// A unique name (used in the report and as `KTD_NODE`).
    pub name: String,
    /// `sequencer`, `shard` or `gateway`.
    pub role: Role,
    /// Sequencers: the Raft node id.
    pub id: Option<u64>,
    /// `host:port` (sequencers, shards) or `[http://]host:port` (gateways).
    pub addr: String,
    /// Kill the process abruptly.
    pub kill: Option<String>,
    /// Start it again (in the background).
    pub start: Option<String>,
    /// Freeze it.
    pub pause: Option<String>,
    /// Unfreeze it.
    pub resume: Option<String>,
    /// Its log file, copied into the artifacts.
    pub log: Option<PathBuf>,
}

/// Why an inventory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// The file could not be read.
    #[error("read {path}: {source}")]
    Read {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The TOML is invalid (unknown keys included).
    #[error("inventory {path}: {message}")]
    Parse {
        /// The path.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The inventory cannot run this scenario.
    #[error("inventory {path}: {message}")]
    Invalid {
        /// The path.
        path: String,
        /// What is wrong.
        message: String,
    },
}

impl Inventory {
    /// Reads and validates an inventory file.
    pub fn load(path: &Path) -> Result<Self, InventoryError> {
        let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// Parses and validates inventory TOML (`path` names it in errors).
    pub fn parse(path: &str, text: &str) -> Result<Self, InventoryError> {
        let inventory: Self = toml::from_str(text).map_err(|error| InventoryError::Parse {
            path: path.to_string(),
            message: error.to_string(),
        })?;
        inventory
            .validate()
            .map_err(|message| InventoryError::Invalid {
                path: path.to_string(),
                message,
            })?;
        Ok(inventory)
    }

    fn validate(&self) -> Result<(), String> {
        let mut names = BTreeSet::new();
        let mut ids = BTreeSet::new();
        for node in &self.nodes {
            if node.name.trim().is_empty() {
                return Err("a node has an empty name".into());
            }
            if !names.insert(node.name.as_str()) {
                return Err(format!("node name {:?} appears twice", node.name));
            }
            if node.addr.trim().is_empty() {
                return Err(format!("{}: empty addr", node.name));
            }
            match node.role {
                Role::Sequencer => {
                    let id = node.id.filter(|id| *id > 0).ok_or_else(|| {
                        format!(
                            "{}: a sequencer needs its Raft node id (`id = N`, N > 0)",
                            node.name
                        )
                    })?;
                    if !ids.insert(id) {
                        return Err(format!("sequencer id {id} appears twice"));
                    }
                    if node.addr.contains("://") {
                        return Err(format!(
                            "{}: a sequencer's addr is host:port, without a scheme",
                            node.name
                        ));
                    }
                }
                Role::Shard | Role::Gateway => {}
            }
        }
        let count = |role: Role| self.nodes.iter().filter(|n| n.role == role).count();
        if count(Role::Sequencer) == 0 {
            return Err("no node with role = \"sequencer\"".into());
        }
        if count(Role::Gateway) == 0 {
            return Err("no node with role = \"gateway\" (the workload goes through it)".into());
        }
        Ok(())
    }

    /// Checks that every fault of `scenario` can be injected through these nodes' hooks.
    pub fn check_scenario(&self, path: &str, scenario: &Scenario) -> Result<(), InventoryError> {
        let invalid = |message: String| InventoryError::Invalid {
            path: path.to_string(),
            message: format!("scenario {}: {message}", scenario.name),
        };
        let need = |role: Role, hooks: &[&str], kind: FaultKind| -> Result<(), InventoryError> {
            let nodes: Vec<&NodeEntry> = self.nodes.iter().filter(|n| n.role == role).collect();
            if nodes.is_empty() {
                return Err(invalid(format!("{kind:?} needs a {role:?} node")));
            }
            for node in nodes {
                for hook in hooks {
                    let present = match *hook {
                        "kill" => node.kill.is_some(),
                        "start" => node.start.is_some(),
                        "pause" => node.pause.is_some(),
                        _ => node.resume.is_some(),
                    };
                    if !present {
                        return Err(invalid(format!(
                            "{kind:?} needs a `{hook}` hook on {} (any {role:?} may be picked)",
                            node.name
                        )));
                    }
                }
            }
            Ok(())
        };
        for fault in &scenario.faults {
            let kind = fault.kind;
            match kind {
                FaultKind::KillLeader | FaultKind::KillFollower | FaultKind::SnapshotCatchUp => {
                    need(Role::Sequencer, &["kill", "start"], kind)?;
                }
                FaultKind::PauseLeader | FaultKind::PauseFollower => {
                    need(Role::Sequencer, &["pause", "resume"], kind)?;
                }
                FaultKind::KillShard | FaultKind::KillReplica => {
                    need(Role::Shard, &["kill", "start"], kind)?;
                }
                FaultKind::WipeReplica => {
                    return Err(invalid(
                        "WipeReplica deletes a shard's data directory, which only a cluster the \
                         harness starts exposes; use `ktd-chaos run`"
                            .into(),
                    ));
                }
                FaultKind::IsolateShard => {
                    return Err(invalid(
                        "IsolateShard needs the harness's proxies in front of the shards; a \
                         running cluster has none (use `ktd-chaos run`)"
                            .into(),
                    ));
                }
                FaultKind::KillGateway => need(Role::Gateway, &["kill", "start"], kind)?,
                FaultKind::TransferLeader => {}
                FaultKind::Partition | FaultKind::OneWay | FaultKind::Latency | FaultKind::Heal => {
                    return Err(invalid(format!(
                        "{kind:?} needs the harness's link proxies between the sequencers; \
                         a running cluster has none (use `ktd-chaos run`)"
                    )));
                }
                FaultKind::AddVoter => {
                    return Err(invalid(
                        "AddVoter needs a spare sequencer the harness can start; use `ktd-chaos run`"
                            .into(),
                    ));
                }
                FaultKind::AddShard => {
                    return Err(invalid(
                        "AddShard needs a spare shard server the harness can start; use `ktd-chaos run`"
                            .into(),
                    ));
                }
            }
        }
        if scenario.broken_mode.is_some() {
            return Err(invalid(
                "a broken-mode positive control needs a cluster the harness starts".into(),
            ));
        }
        Ok(())
    }

    /// The topology the nemesis drives (through the hooks).
    pub fn topology(&self) -> Topology {
        let mut shard_index = 0;
        let processes = self
            .nodes
            .iter()
            .map(|node| {
                let id = match node.role {
                    Role::Sequencer => node.id.unwrap_or(0),
                    _ => {
                        shard_index += 1;
                        node.id.unwrap_or(shard_index)
                    }
                };
                Process::external(
                    node.name.clone(),
                    node.role,
                    id,
                    node.addr.clone(),
                    Hooks {
                        kill: node.kill.clone(),
                        start: node.start.clone(),
                        pause: node.pause.clone(),
                        resume: node.resume.clone(),
                    },
                    node.log.clone(),
                )
            })
            .collect();
        Topology::external(processes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[nodes]]
name = "seq-1"
role = "sequencer"
id = 1
addr = "127.0.0.1:7001"
kill = "true"
start = "true"

[[nodes]]
name = "gw"
role = "gateway"
addr = "http://127.0.0.1:8080"
"#;

    #[test]
    fn a_good_inventory_parses_and_bad_ones_are_refused_clearly() {
        let inventory = Inventory::parse("inv", GOOD).expect("valid");
        let topology = inventory.topology();
        assert_eq!(topology.sequencers.len(), 1);
        assert_eq!(topology.gateway_url(), "http://127.0.0.1:8080");
        for (text, expected) in [
            (GOOD.replace("kill =", "kil ="), "unknown field `kil`"),
            (GOOD.replace("id = 1\n", ""), "needs its Raft node id"),
            (
                GOOD.replace("\"sequencer\"", "\"sequenser\""),
                "unknown variant",
            ),
            (
                GOOD.replace("name = \"gw\"", "name = \"seq-1\""),
                "appears twice",
            ),
            (
                GOOD.replace("addr = \"127.0.0.1:7001\"", "addr = \"http://x:1\""),
                "without a scheme",
            ),
            (
                GOOD.replace("role = \"gateway\"", "role = \"shard\""),
                "no node with role = \"gateway\"",
            ),
        ] {
            let error = Inventory::parse("inv", &text)
                .expect_err(expected)
                .to_string();
            assert!(error.contains(expected), "{error}");
        }
    }

    #[test]
    fn the_shipped_local_inventory_runs_the_process_fault_scenarios() {
        let path = "../deploy/drill-inventory.local.toml";
        let text = include_str!("../../deploy/drill-inventory.local.toml");
        let inventory = Inventory::parse(path, text).expect("valid");
        assert_eq!(inventory.topology().sequencers.len(), 3);
        for name in [
            "leader-kill",
            "follower-kill",
            "leader-pause",
            "follower-pause",
            "snapshot-catch-up",
            "shard-crash-mid-epoch",
            "gateway-restart",
            "leader-transfer",
        ] {
            let scenario = Scenario::load(name).expect("shipped");
            inventory
                .check_scenario(path, &scenario)
                .unwrap_or_else(|error| panic!("{name}: {error}"));
        }
    }

    #[test]
    fn a_scenario_needing_a_missing_hook_is_refused() {
        let inventory = Inventory::parse("inv", GOOD).expect("valid");
        let kill = Scenario::load("leader-kill").expect("shipped");
        inventory
            .check_scenario("inv", &kill)
            .expect("kill + start exist");
        let pause = Scenario::load("leader-pause").expect("shipped");
        let error = inventory
            .check_scenario("inv", &pause)
            .expect_err("no pause hook")
            .to_string();
        assert!(error.contains("`pause` hook on seq-1"), "{error}");
        let network = Scenario::load("leader-isolated").expect("shipped");
        let error = inventory
            .check_scenario("inv", &network)
            .expect_err("no proxies")
            .to_string();
        assert!(error.contains("link proxies"), "{error}");
    }
}
