//! The shard map: which shard servers hold which partitions, and its one validation.
//!
//! Every partition `p` (the tree partition and the user partition with the same number) is held
//! by a *replica set*: `replication_factor` voting replicas on distinct servers, plus learners
//! being built. A voter that disagreed with its majority is *quarantined*: still a member of the
//! set (it counts in the denominator of the majority), but neither counted nor read until it has
//! been rebuilt. See `shard/docs/0002-replicated-shards.md`.
//!
//! Every component that holds a shard map — the sequencer's state machine when a map is proposed
//! or applied, the epoch coordinator, shard servers receiving one in a fence, gateways routing
//! reads — builds it with [`ShardMap::new`], so a map one of them would refuse is refused by all
//! of them, before it is replicated.
//!
//! **Invariant** (checked by [`ShardMap::new`]): `bits ≤ MAX_PARTITION_BITS`; at least one
//! server, with non-empty unique ids; `1 ≤ replication_factor ≤` servers; one entry per
//! partition, whose voters are exactly `replication_factor` distinct known servers, whose learners
//! are distinct known servers that are not voters (and replace, if anything, one of its voters),
//! and whose quarantined replicas are voters.

use std::collections::{HashMap, HashSet};

use akd_core::NodeLabel;

use crate::error::{Error, Result};
use crate::label::{self, MAX_PARTITION_BITS};

mod changes;

pub use changes::Move;

/// One shard server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardServer {
    /// Stable identity, e.g. `s1`.
    pub id: String,
    /// gRPC address, e.g. `http://127.0.0.1:7101` (empty for the in-process shard of `ktd dev`).
    pub address: String,
    /// Until this wall-clock time (ms since the Unix epoch) the server's absence does not start
    /// re-replication of its partitions (planned work). 0 = not in maintenance.
    pub maintenance_until_ms: u64,
    /// Being decommissioned (`drain`): its copies are moved away, and neither the balancer nor
    /// a repair puts a copy on it.
    pub draining: bool,
}

/// A replica being built, not counted and not read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Learner {
    /// The server building it.
    pub server: String,
    /// The voter it replaces once promoted (`None`: it fills a free voting slot).
    pub replaces: Option<String>,
}

/// The replicas of one partition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionReplicas {
    /// Voting replicas (server ids).
    pub voters: Vec<String>,
    /// Replicas being built.
    pub learners: Vec<Learner>,
    /// Voters that disagreed with their majority (a subset of `voters`).
    pub quarantined: Vec<String>,
}

impl PartitionReplicas {
    /// Voters that count and serve reads: not quarantined.
    pub fn healthy_voters(&self) -> impl Iterator<Item = &str> {
        self.voters
            .iter()
            .map(String::as_str)
            .filter(|voter| !self.is_quarantined(voter))
    }

    /// Whether `server` is a quarantined voter.
    pub fn is_quarantined(&self, server: &str) -> bool {
        self.quarantined
            .iter()
            .any(|quarantined| quarantined == server)
    }

    /// How many voters must agree for an epoch to commit: a majority of all voters (quarantined
    /// ones included, so quarantining never lowers the bar).
    pub fn majority(&self) -> usize {
        self.voters.len() / 2 + 1
    }

    /// Every server that holds or is building a copy: voters, then learners.
    pub fn members(&self) -> impl Iterator<Item = &str> {
        self.voters
            .iter()
            .map(String::as_str)
            .chain(self.learners.iter().map(|learner| learner.server.as_str()))
    }

    /// The role of `server` in this partition, if any.
    pub fn role_of(&self, server: &str) -> Option<Role> {
        if self.voters.iter().any(|voter| voter == server) {
            Some(if self.is_quarantined(server) {
                Role::Quarantined
            } else {
                Role::Voter
            })
        } else if self.learners.iter().any(|learner| learner.server == server) {
            Some(Role::Learner)
        } else {
            None
        }
    }
}

/// What a server is for one partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// A voting replica: counted for commits, read by gateways.
    Voter,
    /// A voter that disagreed with its majority: rebuilt in place, neither counted nor read.
    Quarantined,
    /// Being built: neither counted nor read.
    Learner,
}

/// The first release's form of a map entry: one server and the partitions it alone owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardInfo {
    /// Stable identity, e.g. `shard-1`.
    pub id: String,
    /// gRPC address.
    pub address: String,
    /// The partitions it owns.
    pub partitions: Vec<u32>,
}

/// Which servers hold which partitions. Built only through [`ShardMap::new`] (or the helpers
/// that call it), so every value of this type satisfies the module invariant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardMap {
    version: u64,
    bits: u8,
    replication_factor: u8,
    servers: Vec<ShardServer>,
    partitions: Vec<PartitionReplicas>,
    index: HashMap<String, usize>,
}

fn invalid(message: String) -> Error {
    Error::InvalidConfig(message)
}

/// Checks partition bits against [`MAX_PARTITION_BITS`], from any integer width a caller holds.
pub fn check_partition_bits(bits: u64) -> Result<u8> {
    u8::try_from(bits)
        .ok()
        .filter(|bits| *bits <= MAX_PARTITION_BITS)
        .ok_or_else(|| {
            invalid(format!(
                "partition bits must be at most {MAX_PARTITION_BITS}, got {bits}"
            ))
        })
}

impl ShardMap {
    /// Builds the map and checks the module invariant.
    pub fn new(
        version: u64,
        bits: u8,
        replication_factor: u8,
        servers: Vec<ShardServer>,
        partitions: Vec<PartitionReplicas>,
    ) -> Result<Self> {
        check_partition_bits(u64::from(bits))?;
        if servers.is_empty() {
            return Err(invalid("a shard map needs at least one server".into()));
        }
        let mut index = HashMap::with_capacity(servers.len());
        for (position, server) in servers.iter().enumerate() {
            if server.id.is_empty() || index.insert(server.id.clone(), position).is_some() {
                return Err(invalid(format!(
                    "server ids must be non-empty and unique ({:?})",
                    server.id
                )));
            }
        }
        let rf = usize::from(replication_factor);
        if rf == 0 || rf > servers.len() {
            return Err(invalid(format!(
                "replication factor {replication_factor} needs between 1 and {} servers",
                servers.len()
            )));
        }
        let n_partitions = 1usize << bits;
        if partitions.len() != n_partitions {
            return Err(invalid(format!(
                "the map lists {} partitions; {bits} partition bits make {n_partitions}",
                partitions.len()
            )));
        }
        for (partition, replicas) in partitions.iter().enumerate() {
            let known = |server: &str, what: &str| -> Result<()> {
                if index.contains_key(server) {
                    Ok(())
                } else {
                    Err(invalid(format!(
                        "partition {partition}: {what} {server:?} is not a server of the map"
                    )))
                }
            };
            if replicas.voters.len() != rf {
                return Err(invalid(format!(
                    "partition {partition} has {} voting replicas; the replication factor is {rf}",
                    replicas.voters.len()
                )));
            }
            let mut seen = HashSet::new();
            for voter in &replicas.voters {
                known(voter, "voter")?;
                if !seen.insert(voter.as_str()) {
                    return Err(invalid(format!(
                        "partition {partition} has two replicas on server {voter:?}"
                    )));
                }
            }
            for learner in &replicas.learners {
                known(&learner.server, "learner")?;
                if !seen.insert(learner.server.as_str()) {
                    return Err(invalid(format!(
                        "partition {partition} has two replicas on server {:?}",
                        learner.server
                    )));
                }
                if let Some(replaced) = &learner.replaces
                    && !replicas.voters.contains(replaced)
                {
                    return Err(invalid(format!(
                        "partition {partition}: learner {:?} replaces {replaced:?}, which is not a voter",
                        learner.server
                    )));
                }
            }
            for quarantined in &replicas.quarantined {
                if !replicas.voters.contains(quarantined) {
                    return Err(invalid(format!(
                        "partition {partition}: quarantined {quarantined:?} is not a voter"
                    )));
                }
            }
        }
        Ok(Self {
            version,
            bits,
            replication_factor,
            servers,
            partitions,
            index,
        })
    }

    /// A map whose partition `p` is held by `replication_factor` consecutive servers starting
    /// with the owner of `p` in an even, contiguous split (with `replication_factor = 1`,
    /// server `i` owns the `i`-th contiguous range of partitions).
    pub fn even(bits: u8, replication_factor: u8, servers: Vec<(String, String)>) -> Result<Self> {
        check_partition_bits(u64::from(bits))?;
        let n_partitions = 1usize << bits;
        let n_servers = servers.len();
        if n_servers == 0 || n_servers > n_partitions {
            return Err(invalid(format!(
                "{n_servers} servers cannot split {n_partitions} partitions"
            )));
        }
        if usize::from(replication_factor) > n_servers {
            return Err(invalid(format!(
                "replication factor {replication_factor} needs at least as many servers; there are {n_servers}"
            )));
        }
        let servers: Vec<ShardServer> = servers
            .into_iter()
            .map(|(id, address)| ShardServer {
                id,
                address,
                maintenance_until_ms: 0,
                draining: false,
            })
            .collect();
        let partitions = (0..n_partitions)
            .map(|partition| {
                let first = partition * n_servers / n_partitions;
                PartitionReplicas {
                    voters: (0..usize::from(replication_factor))
                        .map(|offset| servers[(first + offset) % n_servers].id.clone())
                        .collect(),
                    ..PartitionReplicas::default()
                }
            })
            .collect();
        Self::new(0, bits, replication_factor, servers, partitions)
    }

    /// The first release's one-owner-per-partition form as a replication-factor-1 map
    /// (every partition owned exactly once).
    pub fn from_owners(version: u64, bits: u8, shards: Vec<ShardInfo>) -> Result<Self> {
        check_partition_bits(u64::from(bits))?;
        let n_partitions = 1usize << bits;
        let mut owner: Vec<Option<String>> = vec![None; n_partitions];
        for shard in &shards {
            for &partition in &shard.partitions {
                let slot = owner.get_mut(partition as usize).ok_or_else(|| {
                    invalid(format!(
                        "shard {} owns partition {partition}, but there are only {n_partitions}",
                        shard.id
                    ))
                })?;
                if let Some(other) = slot {
                    return Err(invalid(format!(
                        "partition {partition} is owned by both {other} and {}",
                        shard.id
                    )));
                }
                *slot = Some(shard.id.clone());
            }
        }
        let partitions = owner
            .into_iter()
            .enumerate()
            .map(|(partition, owner)| {
                owner
                    .map(|owner| PartitionReplicas {
                        voters: vec![owner],
                        ..PartitionReplicas::default()
                    })
                    .ok_or_else(|| invalid(format!("partition {partition} has no shard")))
            })
            .collect::<Result<_>>()?;
        let servers = shards
            .into_iter()
            .map(|shard| ShardServer {
                id: shard.id,
                address: shard.address,
                maintenance_until_ms: 0,
                draining: false,
            })
            .collect();
        Self::new(version, bits, 1, servers, partitions)
    }

    /// The same map under another version.
    pub fn with_version(mut self, version: u64) -> Self {
        self.version = version;
        self
    }

    /// Version of the map in the sequencer (0 for a map that was never stored).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Partition bits `k`.
    pub fn bits(&self) -> u8 {
        self.bits
    }

    /// Voting replicas per partition.
    pub fn replication_factor(&self) -> u8 {
        self.replication_factor
    }

    /// Number of partitions, `2^k`.
    pub fn partition_count(&self) -> u32 {
        1 << self.bits
    }

    /// The servers.
    pub fn servers(&self) -> &[ShardServer] {
        &self.servers
    }

    /// The server with this id.
    pub fn server(&self, id: &str) -> Option<&ShardServer> {
        self.index.get(id).map(|position| &self.servers[*position])
    }

    /// Every partition's replicas, in partition order.
    pub fn partitions(&self) -> &[PartitionReplicas] {
        &self.partitions
    }

    /// The replicas of `partition`.
    ///
    /// # Panics
    /// If `partition` is not below `2^bits` (callers compute it from the map's own bits).
    pub fn replicas(&self, partition: u32) -> &PartitionReplicas {
        &self.partitions[partition as usize]
    }

    /// The tree partition of a node label.
    pub fn partition_of_label(&self, node_label: &NodeLabel) -> u32 {
        label::partition_of(&node_label.label_val, self.bits)
    }

    /// The user partition of `akd_label` (by `blake3(akd_label)`).
    pub fn user_partition(&self, akd_label: &[u8]) -> u32 {
        label::user_partition(akd_label, self.bits)
    }

    /// The servers a partition may be read from: its healthy voters, rotated by the partition
    /// number so reads spread over the replicas.
    pub fn read_order(&self, partition: u32) -> Vec<&ShardServer> {
        let mut healthy: Vec<&ShardServer> = self
            .replicas(partition)
            .healthy_voters()
            .filter_map(|id| self.server(id))
            .collect();
        if !healthy.is_empty() {
            let turn = partition as usize % healthy.len();
            healthy.rotate_left(turn);
        }
        healthy
    }

    /// The partitions `server` holds or builds, with its role in each.
    pub fn assignments(&self, server: &str) -> Vec<(u32, Role)> {
        self.partitions
            .iter()
            .enumerate()
            .filter_map(|(partition, replicas)| {
                replicas
                    .role_of(server)
                    .map(|role| (partition as u32, role))
            })
            .collect()
    }

    /// The replacement of this map's partitions with `partitions` (same servers and factor),
    /// checked; the version is left for the sequencer to assign.
    pub fn with_partitions(&self, partitions: Vec<PartitionReplicas>) -> Result<Self> {
        Self::new(
            self.version,
            self.bits,
            self.replication_factor,
            self.servers.clone(),
            partitions,
        )
    }

    /// The same map with `servers` (partitions and factor unchanged), checked.
    pub fn with_servers(&self, servers: Vec<ShardServer>) -> Result<Self> {
        Self::new(
            self.version,
            self.bits,
            self.replication_factor,
            servers,
            self.partitions.clone(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(ids: &[&str]) -> Vec<ShardServer> {
        ids.iter()
            .map(|id| ShardServer {
                id: (*id).into(),
                address: format!("http://{id}"),
                maintenance_until_ms: 0,
                draining: false,
            })
            .collect()
    }

    fn voters(ids: &[&str]) -> PartitionReplicas {
        PartitionReplicas {
            voters: ids.iter().map(|id| (*id).to_string()).collect(),
            ..PartitionReplicas::default()
        }
    }

    #[test]
    fn a_map_gives_every_partition_rf_distinct_known_voters() {
        let ok = ShardMap::new(
            1,
            1,
            2,
            servers(&["a", "b", "c"]),
            vec![voters(&["a", "b"]), voters(&["b", "c"])],
        )
        .expect("valid");
        assert_eq!(ok.replicas(1).majority(), 2);
        for (partitions, what) in [
            (vec![voters(&["a", "b"])], "lists 1 partitions"),
            (vec![voters(&["a", "b"]), voters(&["c"])], "has 1 voting"),
            (
                vec![voters(&["a", "b"]), voters(&["c", "c"])],
                "two replicas",
            ),
            (
                vec![voters(&["a", "b"]), voters(&["c", "x"])],
                "not a server",
            ),
        ] {
            let error = ShardMap::new(1, 1, 2, servers(&["a", "b", "c"]), partitions)
                .expect_err(what)
                .to_string();
            assert!(error.contains(what), "{error}");
        }
    }

    #[test]
    fn learners_and_quarantined_replicas_are_checked() {
        let mut partition = voters(&["a", "b"]);
        partition.learners.push(Learner {
            server: "c".into(),
            replaces: Some("b".into()),
        });
        partition.quarantined.push("a".into());
        let map = ShardMap::new(1, 0, 2, servers(&["a", "b", "c"]), vec![partition.clone()])
            .expect("valid");
        assert_eq!(map.replicas(0).healthy_voters().collect::<Vec<_>>(), ["b"]);
        assert_eq!(
            map.replicas(0).majority(),
            2,
            "quarantine never lowers the bar"
        );
        assert_eq!(map.assignments("a"), [(0, Role::Quarantined)]);
        assert_eq!(map.assignments("c"), [(0, Role::Learner)]);
        assert_eq!(map.read_order(0).len(), 1);

        let mut twice = partition.clone();
        twice.learners[0].server = "a".into();
        assert!(ShardMap::new(1, 0, 2, servers(&["a", "b", "c"]), vec![twice]).is_err());
        let mut stranger = partition.clone();
        stranger.learners[0].replaces = Some("c".into());
        assert!(ShardMap::new(1, 0, 2, servers(&["a", "b", "c"]), vec![stranger]).is_err());
        let mut outsider = partition;
        outsider.quarantined = vec!["c".into()];
        assert!(ShardMap::new(1, 0, 2, servers(&["a", "b", "c"]), vec![outsider]).is_err());
    }

    #[test]
    fn a_map_needs_servers_unique_ids_a_sane_factor_and_bits_within_the_limit() {
        let twice = ShardMap::new(1, 0, 1, servers(&["a", "a"]), vec![voters(&["a"])]);
        assert!(twice.unwrap_err().to_string().contains("unique"));
        assert!(ShardMap::new(1, 0, 1, Vec::new(), vec![voters(&["a"])]).is_err());
        assert!(ShardMap::new(1, 0, 0, servers(&["a"]), vec![voters(&[])]).is_err());
        assert!(ShardMap::new(1, 0, 2, servers(&["a"]), vec![voters(&["a", "a"])]).is_err());
        let too_wide = ShardMap::even(MAX_PARTITION_BITS + 1, 1, vec![("a".into(), String::new())]);
        assert!(too_wide.unwrap_err().to_string().contains("at most"));
    }

    #[test]
    fn even_maps_split_contiguously_and_replicate_on_the_next_servers() {
        let two = ShardMap::even(
            4,
            1,
            vec![("a".into(), "x".into()), ("b".into(), "y".into())],
        )
        .expect("valid");
        assert_eq!(two.replicas(7).voters, ["a"]);
        assert_eq!(two.replicas(8).voters, ["b"]);
        let three = ShardMap::even(
            2,
            3,
            ["a", "b", "c"]
                .iter()
                .map(|id| ((*id).to_string(), String::new()))
                .collect(),
        )
        .expect("valid");
        for partition in 0..4 {
            let mut held: Vec<&str> = three
                .replicas(partition)
                .voters
                .iter()
                .map(String::as_str)
                .collect();
            held.sort_unstable();
            assert_eq!(
                held,
                ["a", "b", "c"],
                "RF 3 on 3 servers: everyone holds everything"
            );
        }
        assert!(ShardMap::even(2, 4, vec![("a".into(), String::new())]).is_err());
    }

    #[test]
    fn first_release_maps_become_replication_factor_one() {
        let info = |id: &str, partitions: &[u32]| ShardInfo {
            id: id.into(),
            address: format!("http://{id}"),
            partitions: partitions.to_vec(),
        };
        let map = ShardMap::from_owners(3, 2, vec![info("a", &[0, 1]), info("b", &[2, 3])])
            .expect("valid");
        assert_eq!(map.version(), 3);
        assert_eq!(map.replication_factor(), 1);
        assert_eq!(map.replicas(2).voters, ["b"]);
        let gap = ShardMap::from_owners(1, 2, vec![info("a", &[0, 1]), info("b", &[3])]);
        assert!(
            gap.unwrap_err()
                .to_string()
                .contains("partition 2 has no shard")
        );
        let overlap = ShardMap::from_owners(1, 2, vec![info("a", &[0, 1, 2]), info("b", &[2, 3])]);
        assert!(overlap.unwrap_err().to_string().contains("owned by both"));
    }
}
