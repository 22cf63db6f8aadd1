//! The balancer: which partition copies to move so that every shard server holds about the same
//! bytes — a new server fills up, nothing piles onto one server — as a pure function of the
//! shard map and what the servers last reported ([`plan_moves`]).
//!
//! A move is the same map change a repair makes: a *learner* on the destination that replaces a
//! voter on the source ([`MapChange::AddLearner`]). The repair loop then copies the partition
//! (bootstrap from a healthy voter, rate-limited), replays it to the committed epoch and
//! promotes it, and only that promotion takes the source's copy out of the replica set; the
//! source deletes its copy after its orphan grace period (`shard::local::LocalShard::drop_orphans`).
//! So every commit during a move still needs a majority of the partition's voters, and the
//! source keeps voting until the destination is as up to date as it — a move that is cut short
//! (leader, source or destination dies) leaves the learner in the replicated map, and the next
//! leader resumes it; nothing is ever lost by abandoning one.
//!
//! Rules (FoundationDB's data distributor and TiKV PD's balance scheduler are the models):
//! - only servers that answer, are not in maintenance and are not being drained give or take;
//! - only partitions whose replica set is settled (no learner, no quarantined voter) move, at
//!   most one move per partition;
//! - at most `max_moves` moves in flight cluster-wide, `max_moves_per_server` out of and into
//!   any one server (learners already in the map count, whoever added them);
//! - a move happens only while the fullest and the emptiest eligible server differ by more than
//!   `tolerance` × the mean, and only if it narrows that gap (the copy weighs less than the gap),
//!   so the balancer never oscillates.
//!
//! A partition weighs its bytes on disk as its voters report them (the median), or — while any
//! partition's size is not known, e.g. everything is still in memtables — one copy each:
//! labels are VRF outputs, so partitions have the same expected size.

use std::collections::BTreeMap;

use ktd_core::ShardMap;

use super::replicas::{MapChange, Tracker};

/// Limits of the balancer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BalanceOptions {
    /// The fullest and emptiest eligible server may differ by this fraction of the mean.
    pub tolerance: f64,
    /// Moves in flight at once, cluster-wide.
    pub max_moves: usize,
    /// Moves in flight at once out of one server, and into one server.
    pub max_moves_per_server: usize,
}

/// Each partition's size as its healthy voters report it: the median of their estimates
/// (`None`: no voter reported a size yet).
pub fn partition_bytes(map: &ShardMap, tracker: &Tracker) -> Vec<Option<u64>> {
    map.partitions()
        .iter()
        .enumerate()
        .map(|(partition, replicas)| {
            let mut sizes: Vec<u64> = replicas
                .healthy_voters()
                .filter_map(|voter| {
                    tracker
                        .servers
                        .get(voter)
                        .and_then(|view| view.partitions.get(&(partition as u32)))
                        .filter(|progress| progress.held && progress.bytes > 0)
                        .map(|progress| progress.bytes)
                })
                .collect();
            sizes.sort_unstable();
            sizes.get(sizes.len() / 2).copied()
        })
        .collect()
}

/// What each partition weighs: its bytes when every partition's size is known, else 1.
fn weights(sizes: &[Option<u64>]) -> Vec<u64> {
    if sizes.iter().all(Option::is_some) {
        sizes.iter().map(|size| size.unwrap_or(1).max(1)).collect()
    } else {
        vec![1; sizes.len()]
    }
}

/// Each eligible server's load (the weights of the copies it will hold once the moves in
/// flight finish), by id.
fn loads(map: &ShardMap, eligible: &[&str], weights: &[u64]) -> BTreeMap<String, u64> {
    let mut loads: BTreeMap<String, u64> =
        eligible.iter().map(|id| ((*id).to_string(), 0)).collect();
    for (partition, replicas) in map.partitions().iter().enumerate() {
        let leaving: Vec<&str> = replicas
            .learners
            .iter()
            .filter_map(|learner| learner.replaces.as_deref())
            .collect();
        for member in replicas.members() {
            if leaving.contains(&member) {
                continue;
            }
            if let Some(load) = loads.get_mut(member) {
                *load += weights[partition];
            }
        }
    }
    loads
}

/// The moves to start now (see the module docs). `reachable(id)`: the server answered its last
/// status call. Pure: the same inputs give the same moves.
pub fn plan_moves(
    map: &ShardMap,
    tracker: &Tracker,
    reachable: &dyn Fn(&str) -> bool,
    now_ms: u64,
    options: BalanceOptions,
) -> Vec<MapChange> {
    let eligible: Vec<&str> = map
        .servers()
        .iter()
        .filter(|server| {
            !server.draining && server.maintenance_until_ms <= now_ms && reachable(&server.id)
        })
        .map(|server| server.id.as_str())
        .collect();
    if eligible.len() < 2 {
        return Vec::new();
    }
    let weights = weights(&partition_bytes(map, tracker));
    let mut loads = loads(map, &eligible, &weights);
    let in_flight = map.moves();
    let mut moving = in_flight.len();
    let mut out_of: BTreeMap<String, usize> = BTreeMap::new();
    let mut into: BTreeMap<String, usize> = BTreeMap::new();
    for step in &in_flight {
        *out_of.entry(step.from.clone()).or_default() += 1;
        *into.entry(step.to.clone()).or_default() += 1;
    }
    let mut settled: Vec<bool> = map
        .partitions()
        .iter()
        .map(|replicas| replicas.learners.is_empty() && replicas.quarantined.is_empty())
        .collect();
    let mut voters: Vec<Vec<String>> = map
        .partitions()
        .iter()
        .map(|replicas| replicas.voters.clone())
        .collect();
    let mut changes = Vec::new();
    while moving < options.max_moves {
        let total: u64 = loads.values().sum();
        let mean = total as f64 / loads.len() as f64;
        let threshold = options.tolerance * mean;
        let mut by_load: Vec<(&String, u64)> = loads.iter().map(|(id, load)| (id, *load)).collect();
        by_load.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        let sources = by_load
            .iter()
            .filter(|(id, _)| out_of.get(*id).copied().unwrap_or(0) < options.max_moves_per_server);
        let mut chosen = None;
        'pairs: for (from, from_load) in sources {
            for (to, to_load) in by_load.iter().rev() {
                if into.get(*to).copied().unwrap_or(0) >= options.max_moves_per_server {
                    continue;
                }
                let gap = from_load.saturating_sub(*to_load);
                if gap == 0 || (gap as f64) <= threshold {
                    // Sorted: every later destination is fuller, the gap only narrows.
                    break;
                }
                // The copy that best halves the gap, and narrows it.
                let best = (0..voters.len())
                    .filter(|partition| settled[*partition])
                    .filter(|partition| voters[*partition].iter().any(|voter| voter == *from))
                    .filter(|partition| !voters[*partition].iter().any(|voter| voter == *to))
                    .filter(|partition| weights[*partition] < gap)
                    .min_by_key(|partition| (gap.abs_diff(2 * weights[*partition]), *partition));
                if let Some(partition) = best {
                    chosen = Some(((*from).clone(), (*to).clone(), partition));
                    break 'pairs;
                }
            }
        }
        let Some((from, to, partition)) = chosen else {
            break;
        };
        let weight = weights[partition];
        *loads.get_mut(&from).expect("an eligible server") -= weight;
        *loads.get_mut(&to).expect("an eligible server") += weight;
        *out_of.entry(from.clone()).or_default() += 1;
        *into.entry(to.clone()).or_default() += 1;
        settled[partition] = false;
        for voter in &mut voters[partition] {
            if *voter == from {
                voter.clone_from(&to);
            }
        }
        moving += 1;
        changes.push(MapChange::AddLearner {
            server: to,
            partition: partition as u32,
            replaces: from,
        });
    }
    changes
}

#[cfg(test)]
mod tests {
    use ktd_core::shard_map::{Learner, PartitionReplicas, ShardServer};

    use super::super::replicas::{PartitionProgress, ServerView};
    use super::*;

    const OPTIONS: BalanceOptions = BalanceOptions {
        tolerance: 0.1,
        max_moves: 100,
        max_moves_per_server: 100,
    };

    fn server(id: &str) -> ShardServer {
        ShardServer {
            id: id.into(),
            address: format!("http://{id}"),
            maintenance_until_ms: 0,
            draining: false,
        }
    }

    /// 16 partitions, replication factor 3, every copy on `a`, `b`, `c`; plus `extra` servers
    /// holding nothing.
    fn three_full(extra: &[&str]) -> ShardMap {
        let mut servers: Vec<ShardServer> = ["a", "b", "c"].iter().map(|id| server(id)).collect();
        servers.extend(extra.iter().map(|id| server(id)));
        let partitions = (0..16)
            .map(|_| PartitionReplicas {
                voters: vec!["a".into(), "b".into(), "c".into()],
                ..PartitionReplicas::default()
            })
            .collect();
        ShardMap::new(1, 4, 3, servers, partitions).expect("map")
    }

    /// A tracker where every server answered and each held copy reports `bytes(partition)`.
    fn tracker(map: &ShardMap, bytes: &dyn Fn(u32) -> u64) -> Tracker {
        let mut tracker = Tracker::default();
        for server in map.servers() {
            let mut view = ServerView {
                known: true,
                ..ServerView::default()
            };
            for (partition, _) in map.assignments(&server.id) {
                view.partitions.insert(
                    partition,
                    PartitionProgress {
                        held: true,
                        built: 5,
                        bytes: bytes(partition),
                        ..PartitionProgress::default()
                    },
                );
            }
            tracker.servers.insert(server.id.clone(), view);
        }
        tracker
    }

    fn apply(map: &ShardMap, changes: &[MapChange]) -> ShardMap {
        changes.iter().fold(map.clone(), |map, change| {
            change.apply(&map).expect("valid change")
        })
    }

    /// Promotes every learner, as the repair loop does once each caught up.
    fn finish(map: &ShardMap) -> ShardMap {
        let mut map = map.clone();
        for (partition, replicas) in map.clone().partitions().iter().enumerate() {
            for learner in &replicas.learners {
                map = MapChange::Promote {
                    server: learner.server.clone(),
                    partition: partition as u32,
                }
                .apply(&map)
                .expect("promote");
            }
        }
        map
    }

    fn everyone(_: &str) -> bool {
        true
    }

    /// Runs the balancer to a fixed point, finishing each round's moves.
    fn settle(mut map: ShardMap, bytes: &dyn Fn(u32) -> u64, options: BalanceOptions) -> ShardMap {
        for _ in 0..100 {
            let changes = plan_moves(&map, &tracker(&map, bytes), &everyone, 0, options);
            if changes.is_empty() {
                return map;
            }
            map = finish(&apply(&map, &changes));
        }
        panic!("the balancer did not settle: {map:?}");
    }

    fn load_of(map: &ShardMap, bytes: &dyn Fn(u32) -> u64) -> BTreeMap<String, u64> {
        map.servers()
            .iter()
            .map(|server| {
                let load = map
                    .assignments(&server.id)
                    .iter()
                    .map(|(partition, _)| bytes(*partition))
                    .sum();
                (server.id.clone(), load)
            })
            .collect()
    }

    #[test]
    fn a_new_server_fills_until_every_server_holds_the_same_bytes_within_the_tolerance() {
        let map = three_full(&["d"]);
        let size = |_: u32| 1_000_000;
        let settled = settle(map, &size, OPTIONS);
        let loads = load_of(&settled, &size);
        // 48 copies on 4 servers: 12 each.
        assert!(loads.values().all(|load| *load == 12_000_000), "{loads:?}");
        for replicas in settled.partitions() {
            assert_eq!(replicas.voters.len(), 3);
        }
    }

    #[test]
    fn unequal_partitions_are_balanced_by_bytes_not_by_copies() {
        // Partition 0 is as large as the other fifteen together.
        let size = |partition: u32| if partition == 0 { 15_000 } else { 1_000 };
        let settled = settle(three_full(&["d", "e"]), &size, OPTIONS);
        let loads = load_of(&settled, &size);
        let (min, max) = (
            *loads.values().min().expect("servers"),
            *loads.values().max().expect("servers"),
        );
        let mean = loads.values().sum::<u64>() as f64 / loads.len() as f64;
        assert!(
            (max - min) as f64 <= 0.1 * mean + 15_000.0,
            "no move can do better than one large copy: {loads:?}"
        );
        // The servers holding the large partition hold fewer copies.
        let copies = settled.load();
        for voter in &settled.replicas(0).voters {
            assert!(copies[voter.as_str()] < 10, "{copies:?}");
        }
    }

    #[test]
    fn a_balanced_cluster_moves_nothing() {
        let size = |_: u32| 1_000;
        assert!(
            plan_moves(
                &three_full(&[]),
                &tracker(&three_full(&[]), &size),
                &everyone,
                0,
                OPTIONS
            )
            .is_empty()
        );
        let settled = settle(three_full(&["d"]), &size, OPTIONS);
        assert!(plan_moves(&settled, &tracker(&settled, &size), &everyone, 0, OPTIONS).is_empty());
    }

    #[test]
    fn moves_in_flight_are_capped_cluster_wide_and_per_server() {
        let map = three_full(&["d", "e"]);
        let size = |_: u32| 1_000;
        let options = BalanceOptions {
            max_moves: 3,
            max_moves_per_server: 1,
            ..OPTIONS
        };
        let first = plan_moves(&map, &tracker(&map, &size), &everyone, 0, options);
        // One move into each of d and e (one per destination), each out of a different source.
        assert_eq!(first.len(), 2, "{first:?}");
        let started = apply(&map, &first);
        assert_eq!(started.moves().len(), 2);
        let mut sources: Vec<_> = started.moves().into_iter().map(|step| step.from).collect();
        sources.dedup();
        assert_eq!(sources.len(), 2, "one move out of any one server");
        // While they run, no destination takes a second move.
        let more = plan_moves(&started, &tracker(&started, &size), &everyone, 0, options);
        assert!(more.is_empty(), "{more:?}");
        // Learners added by someone else (a drain, a repair) count too.
        let cluster_cap = BalanceOptions {
            max_moves: 2,
            max_moves_per_server: 10,
            ..OPTIONS
        };
        assert!(
            plan_moves(
                &started,
                &tracker(&started, &size),
                &everyone,
                0,
                cluster_cap
            )
            .is_empty()
        );
    }

    #[test]
    fn servers_that_are_draining_in_maintenance_or_unreachable_neither_give_nor_take() {
        let size = |_: u32| 1_000;
        let draining = three_full(&["d"])
            .drain("d", &[])
            .expect("drain the empty d");
        assert!(
            plan_moves(&draining, &tracker(&draining, &size), &everyone, 0, OPTIONS).is_empty()
        );
        let resting = three_full(&["d"])
            .set_maintenance("d", 5_000)
            .expect("maintenance");
        assert!(
            plan_moves(
                &resting,
                &tracker(&resting, &size),
                &everyone,
                1_000,
                OPTIONS
            )
            .is_empty()
        );
        assert!(
            !plan_moves(
                &resting,
                &tracker(&resting, &size),
                &everyone,
                6_000,
                OPTIONS
            )
            .is_empty()
        );
        let map = three_full(&["d"]);
        let down = |id: &str| id != "d";
        assert!(plan_moves(&map, &tracker(&map, &size), &down, 0, OPTIONS).is_empty());
    }

    #[test]
    fn partitions_with_a_learner_or_a_quarantined_voter_are_left_alone() {
        let map = three_full(&["d"]);
        let mut partitions = map.partitions().to_vec();
        for (partition, replicas) in partitions.iter_mut().enumerate() {
            if partition % 2 == 0 {
                replicas.quarantined.push("a".into());
            } else {
                replicas.learners.push(Learner {
                    server: "d".into(),
                    replaces: None,
                });
            }
        }
        let busy = map.with_partitions(partitions).expect("map");
        let size = |_: u32| 1_000;
        assert!(plan_moves(&busy, &tracker(&busy, &size), &everyone, 0, OPTIONS).is_empty());
    }

    #[test]
    fn sizes_not_known_everywhere_weigh_every_copy_the_same() {
        let map = three_full(&["d"]);
        // Only partition 3 has reached disk: the others' sizes are unknown.
        let size = |partition: u32| if partition == 3 { 1 << 30 } else { 0 };
        let changes = plan_moves(&map, &tracker(&map, &size), &everyone, 0, OPTIONS);
        let settled = finish(&apply(&map, &changes));
        let copies = settled.load();
        assert!(copies.values().all(|count| *count >= 11), "{copies:?}");
    }
}
