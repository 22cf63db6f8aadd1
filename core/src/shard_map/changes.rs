//! Planned changes to a shard map, as pure functions: add, drain, replace and remove a server,
//! maintenance windows, and rebalancing onto a new server.
//!
//! None of them removes a copy that serves: a voter is moved by adding a *learner* that
//! `replaces` it; the coordinator bootstraps the learner, replays it to the committed epoch and
//! promotes it, and only that promotion takes the old voter out (`MapChange::Promote` in the
//! sequencer's coordinator). A server leaves the map only once it holds nothing
//! ([`ShardMap::remove_server`] refuses otherwise). Every result is checked by [`ShardMap::new`].

use std::collections::BTreeMap;

use super::{Learner, ShardMap, ShardServer};
use crate::error::{Error, Result};

fn refused(message: String) -> Error {
    Error::InvalidConfig(message)
}

/// A copy moving between servers: a learner that replaces a voter once promoted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    /// The partition.
    pub partition: u32,
    /// The server whose voting copy is replaced.
    pub from: String,
    /// The server building the new copy.
    pub to: String,
}

impl ShardMap {
    /// Every move in flight (learners that replace a voter), in partition order.
    pub fn moves(&self) -> Vec<Move> {
        self.partitions
            .iter()
            .enumerate()
            .flat_map(|(partition, replicas)| {
                replicas.learners.iter().filter_map(move |learner| {
                    learner.replaces.as_ref().map(|from| Move {
                        partition: partition as u32,
                        from: from.clone(),
                        to: learner.server.clone(),
                    })
                })
            })
            .collect()
    }

    /// Copies (voters and learners) held or being built by each server.
    pub fn load(&self) -> BTreeMap<&str, usize> {
        let mut load: BTreeMap<&str, usize> = self
            .servers
            .iter()
            .map(|server| (server.id.as_str(), 0))
            .collect();
        for replicas in &self.partitions {
            for member in replicas.members() {
                if let Some(count) = load.get_mut(member) {
                    *count += 1;
                }
            }
        }
        load
    }

    /// Whether some learner of some partition replaces `server` (it is being moved away).
    fn being_replaced(&self, partition: usize, server: &str) -> bool {
        self.partitions[partition]
            .learners
            .iter()
            .any(|learner| learner.replaces.as_deref() == Some(server))
    }

    /// The map with a new server that holds nothing yet.
    pub fn add_server(&self, server: ShardServer) -> Result<Self> {
        if self.server(&server.id).is_some() {
            return Err(refused(format!(
                "server {:?} is already in the shard map",
                server.id
            )));
        }
        let mut servers = self.servers.clone();
        servers.push(server);
        self.with_servers(servers)
    }

    /// The map without `id`, which must hold nothing (drain it first).
    pub fn remove_server(&self, id: &str) -> Result<Self> {
        self.server(id)
            .ok_or_else(|| refused(format!("server {id:?} is not in the shard map")))?;
        let held = self.assignments(id);
        if !held.is_empty() {
            return Err(refused(format!(
                "server {id:?} still holds {} partition replicas; drain it first",
                held.len()
            )));
        }
        let servers = self
            .servers
            .iter()
            .filter(|server| server.id != id)
            .cloned()
            .collect();
        self.with_servers(servers)
    }

    /// The map with `id` in maintenance until `until_ms` (ms since the Unix epoch; 0 ends it):
    /// while it lasts, the server's absence does not start re-replication.
    pub fn set_maintenance(&self, id: &str, until_ms: u64) -> Result<Self> {
        let mut servers = self.servers.clone();
        let server = servers
            .iter_mut()
            .find(|server| server.id == id)
            .ok_or_else(|| refused(format!("server {id:?} is not in the shard map")))?;
        server.maintenance_until_ms = until_ms;
        self.with_servers(servers)
    }

    /// The map with every copy on `id` being moved elsewhere: each voting slot gets a learner
    /// that replaces it, on the least-loaded server that holds no copy of the partition (and is
    /// not in `avoid`); learners on `id` are dropped. Refused when some partition has no other
    /// server to go to.
    pub fn drain(&self, id: &str, avoid: &[&str]) -> Result<Self> {
        self.server(id)
            .ok_or_else(|| refused(format!("server {id:?} is not in the shard map")))?;
        let marked = self.with_draining(id)?;
        let mut load = self.load();
        let mut partitions = self.partitions.clone();
        for (partition, replicas) in partitions.iter_mut().enumerate() {
            replicas.learners.retain(|learner| learner.server != id);
            if !replicas.voters.iter().any(|voter| voter == id)
                || self.being_replaced(partition, id)
            {
                continue;
            }
            let target = self
                .servers
                .iter()
                .map(|server| server.id.as_str())
                .filter(|candidate| {
                    *candidate != id
                        && !avoid.contains(candidate)
                        && !self.is_draining(candidate)
                        && replicas.role_of(candidate).is_none()
                })
                .min_by_key(|candidate| (load[candidate], *candidate))
                .ok_or_else(|| {
                    refused(format!(
                        "partition {partition} has no server left to move its replica on {id:?} \
                         to; add a server first"
                    ))
                })?;
            *load.get_mut(target).expect("a server of the map") += 1;
            replicas.learners.push(Learner {
                server: target.to_string(),
                replaces: Some(id.to_string()),
            });
        }
        marked.with_partitions(partitions)
    }

    /// The map with `partition`'s voting copy on `from` being moved to `to` (a hot or full
    /// partition moved by hand): a learner on `to` that replaces `from` once promoted. Refused
    /// unless `from` votes in the partition and is not being replaced already, and `to` is a
    /// server that holds no copy of it and is not being drained.
    pub fn move_copy(&self, partition: u32, from: &str, to: &str) -> Result<Self> {
        let replicas = self.partitions.get(partition as usize).ok_or_else(|| {
            refused(format!(
                "partition {partition} does not exist; there are {}",
                self.partitions.len()
            ))
        })?;
        if !replicas.voters.iter().any(|voter| voter == from) {
            return Err(refused(format!(
                "{from:?} holds no voting copy of partition {partition}"
            )));
        }
        if self.being_replaced(partition as usize, from) {
            return Err(refused(format!(
                "the copy of partition {partition} on {from:?} is already being moved"
            )));
        }
        if self.server(to).is_none() {
            return Err(refused(format!("server {to:?} is not in the shard map")));
        }
        if self.is_draining(to) {
            return Err(refused(format!(
                "server {to:?} is being drained; it cannot take copies"
            )));
        }
        if replicas.role_of(to).is_some() {
            return Err(refused(format!(
                "{to:?} already holds a copy of partition {partition}"
            )));
        }
        let mut partitions = self.partitions.clone();
        partitions[partition as usize].learners.push(Learner {
            server: to.to_string(),
            replaces: Some(from.to_string()),
        });
        self.with_partitions(partitions)
    }

    /// Whether `id` is a server being drained.
    pub fn is_draining(&self, id: &str) -> bool {
        self.server(id).is_some_and(|server| server.draining)
    }

    /// The map with `id` marked draining (nothing moved yet).
    fn with_draining(&self, id: &str) -> Result<Self> {
        let mut servers = self.servers.clone();
        for server in &mut servers {
            if server.id == id {
                server.draining = true;
            }
        }
        self.with_servers(servers)
    }

    /// The map with `new` (added if it is not a server yet) taking over every copy on `old`:
    /// learners replacing `old`'s voting slots, and `old`'s learner slots handed over.
    pub fn replace_server(&self, old: &str, new: ShardServer) -> Result<Self> {
        self.server(old)
            .ok_or_else(|| refused(format!("server {old:?} is not in the shard map")))?;
        if old == new.id {
            return Err(refused(format!("server {old:?} cannot replace itself")));
        }
        if self.is_draining(&new.id) {
            return Err(refused(format!(
                "server {:?} is being drained; it cannot take copies",
                new.id
            )));
        }
        let map = match self.server(&new.id) {
            Some(_) => self.with_draining(old)?,
            None => self.add_server(new.clone())?.with_draining(old)?,
        };
        let mut partitions = map.partitions.clone();
        for (partition, replicas) in partitions.iter_mut().enumerate() {
            if replicas.role_of(old).is_none() {
                continue;
            }
            if replicas.role_of(&new.id).is_some() {
                return Err(refused(format!(
                    "partition {partition} already has a replica on {:?}; drain {old:?} instead",
                    new.id
                )));
            }
            for learner in &mut replicas.learners {
                if learner.server == old {
                    learner.server = new.id.clone();
                }
            }
            if replicas.voters.iter().any(|voter| voter == old)
                && !map.being_replaced(partition, old)
            {
                replicas.learners.push(Learner {
                    server: new.id.clone(),
                    replaces: Some(old.to_string()),
                });
            }
        }
        map.with_partitions(partitions)
    }

    /// The map with voting slots moved (as learners that replace them) from the most-loaded
    /// servers to the least-loaded ones until no server holds more than one copy above another
    /// (servers in `avoid`, e.g. in maintenance, neither give nor take). Copies already being
    /// moved are left alone.
    pub fn rebalance(&self, avoid: &[&str]) -> Result<Self> {
        let mut load = self.load();
        for server in avoid {
            load.remove(server);
        }
        load.retain(|server, _| !self.is_draining(server));
        let mut partitions = self.partitions.clone();
        while let Some((&heaviest, &most)) = load.iter().max_by_key(|(id, count)| (**count, **id)) {
            let Some((&lightest, &least)) = load.iter().min_by_key(|(id, count)| (**count, **id))
            else {
                break;
            };
            if most <= least + 1 {
                break;
            }
            let movable = partitions
                .iter()
                .enumerate()
                .position(|(partition, replicas)| {
                    replicas.voters.iter().any(|voter| voter == heaviest)
                        && !replicas.is_quarantined(heaviest)
                        && replicas.role_of(lightest).is_none()
                        && !self.being_replaced(partition, heaviest)
                        && !replicas
                            .learners
                            .iter()
                            .any(|learner| learner.replaces.as_deref() == Some(heaviest))
                });
            let Some(partition) = movable else {
                break;
            };
            partitions[partition].learners.push(Learner {
                server: lightest.to_string(),
                replaces: Some(heaviest.to_string()),
            });
            *load.get_mut(heaviest).expect("in the load map") -= 1;
            *load.get_mut(lightest).expect("in the load map") += 1;
        }
        self.with_partitions(partitions)
    }
}

#[cfg(test)]
mod tests {
    use super::super::PartitionReplicas;
    use super::*;

    fn server(id: &str) -> ShardServer {
        ShardServer {
            id: id.into(),
            address: format!("http://{id}"),
            maintenance_until_ms: 0,
            draining: false,
        }
    }

    fn three() -> ShardMap {
        ShardMap::even(
            3,
            3,
            ["a", "b", "c"]
                .iter()
                .map(|id| ((*id).to_string(), format!("http://{id}")))
                .collect(),
        )
        .expect("map")
    }

    /// Promotes every learner (what the coordinator does once each has caught up).
    fn promote_all(map: &ShardMap) -> ShardMap {
        let partitions = map
            .partitions()
            .iter()
            .map(|replicas| {
                let mut voters = replicas.voters.clone();
                for learner in &replicas.learners {
                    match &learner.replaces {
                        Some(old) => {
                            let slot = voters
                                .iter_mut()
                                .find(|voter| *voter == old)
                                .expect("voter");
                            *slot = learner.server.clone();
                        }
                        None => voters.push(learner.server.clone()),
                    }
                }
                PartitionReplicas {
                    voters,
                    ..PartitionReplicas::default()
                }
            })
            .collect();
        map.with_partitions(partitions).expect("promoted map")
    }

    #[test]
    fn a_drained_server_ends_up_holding_nothing_and_can_then_be_removed() {
        let map = three().add_server(server("d")).expect("add d");
        assert!(map.remove_server("d").is_ok(), "an empty server can leave");
        let drained = map.drain("a", &[]).expect("drain a");
        // Nothing is taken away before the learners are promoted.
        for replicas in drained.partitions() {
            assert!(replicas.voters.contains(&"a".to_string()));
            assert_eq!(replicas.learners.len(), 1);
            assert_eq!(replicas.learners[0].server, "d");
        }
        assert!(drained.remove_server("a").is_err(), "a still holds copies");
        let moved = promote_all(&drained);
        assert!(moved.assignments("a").is_empty());
        let removed = moved.remove_server("a").expect("remove a");
        assert_eq!(removed.servers().len(), 3);
    }

    #[test]
    fn draining_with_nowhere_to_go_is_refused() {
        let error = three().drain("a", &[]).expect_err("RF 3 on 3 servers");
        assert!(error.to_string().contains("add a server first"), "{error}");
    }

    #[test]
    fn draining_twice_does_not_add_a_second_learner() {
        let map = three().add_server(server("d")).expect("add d");
        let once = map.drain("a", &[]).expect("drain");
        let twice = once.drain("a", &[]).expect("drain again");
        assert_eq!(once, twice);
    }

    #[test]
    fn replacing_a_server_hands_every_slot_to_the_new_one() {
        let map = three();
        let replaced = map.replace_server("b", server("e")).expect("replace");
        for (partition, replicas) in replaced.partitions().iter().enumerate() {
            assert_eq!(
                replicas.learners,
                vec![Learner {
                    server: "e".into(),
                    replaces: Some("b".into()),
                }],
                "partition {partition}"
            );
        }
        let moved = promote_all(&replaced);
        assert!(moved.assignments("b").is_empty());
        assert_eq!(moved.assignments("e").len(), 8);
    }

    #[test]
    fn rebalancing_onto_a_new_server_evens_the_load() {
        let map = three().add_server(server("d")).expect("add d");
        let planned = map.rebalance(&[]).expect("rebalance");
        let moved = promote_all(&planned);
        let load = moved.load();
        let (min, max) = (load.values().min().unwrap(), load.values().max().unwrap());
        assert!(max - min <= 1, "{load:?}");
        assert_eq!(load.values().sum::<usize>(), 8 * 3);
        // And a balanced map stays as it is.
        assert_eq!(moved.rebalance(&[]).expect("again"), moved);
    }

    #[test]
    fn a_server_being_drained_is_marked_and_never_chosen_to_take_copies() {
        let map = three()
            .add_server(server("d"))
            .and_then(|map| map.add_server(server("e")))
            .expect("five servers");
        let draining = map.drain("d", &[]).expect("drain the empty d");
        assert!(draining.is_draining("d") && !draining.is_draining("a"));
        // Rebalancing onto the two empty servers puts nothing on the one being drained.
        let planned = draining.rebalance(&[]).expect("rebalance");
        assert!(planned.assignments("d").is_empty(), "{planned:?}");
        assert!(!planned.assignments("e").is_empty());
        // Nor does draining another server, or replacing one by it.
        let moved = draining.drain("a", &[]).expect("drain a");
        assert!(moved.assignments("d").is_empty());
        let refused = draining
            .replace_server("b", server("d"))
            .expect_err("d is leaving");
        assert!(refused.to_string().contains("being drained"), "{refused}");
        // The replaced server is marked too.
        let replaced = map.replace_server("b", server("f")).expect("replace");
        assert!(replaced.is_draining("b"));
    }

    #[test]
    fn one_copy_is_moved_by_hand_only_from_a_voter_to_a_server_without_a_copy() {
        let map = three().add_server(server("d")).expect("add d");
        let moved = map.move_copy(2, "b", "d").expect("move");
        assert_eq!(
            moved.moves(),
            vec![Move {
                partition: 2,
                from: "b".into(),
                to: "d".into()
            }]
        );
        assert_eq!(promote_all(&moved).replicas(2).voters, ["a", "d", "c"]);
        for (partition, from, to, why) in [
            (2, "b", "d", "already being moved"),
            (3, "d", "a", "no voting copy"),
            (3, "a", "b", "already holds a copy"),
            (3, "a", "z", "not in the shard map"),
            (99, "a", "d", "does not exist"),
        ] {
            let error = moved.move_copy(partition, from, to).expect_err("refused");
            assert!(error.to_string().contains(why), "{error}");
        }
    }

    #[test]
    fn maintenance_is_set_and_lifted_on_one_server() {
        let map = three().set_maintenance("b", 1_000).expect("set");
        assert_eq!(map.server("b").unwrap().maintenance_until_ms, 1_000);
        assert_eq!(map.server("a").unwrap().maintenance_until_ms, 0);
        let lifted = map.set_maintenance("b", 0).expect("lift");
        assert_eq!(lifted.server("b").unwrap().maintenance_until_ms, 0);
        assert!(map.set_maintenance("z", 1).is_err());
    }
}
