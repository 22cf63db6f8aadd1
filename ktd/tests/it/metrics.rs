//! `/metrics` after a short workload: every series the metrics catalogue (`docs/metrics.md`)
//! lists is exported with sane values — by `ktd dev` (Raft, epochs, storage, latency
//! histograms) and by the leader of a three-node `ktd sequencer` cluster (per-follower lag and
//! heartbeat age, before and after a follower is killed).
//!
//! The Prometheus text is read with a small strict parser (`support::metrics::Scrape`): a line
//! that is neither a comment nor `name{labels} value` fails the test.

use std::collections::BTreeMap;
use std::time::Duration;

use ktd_proto::ktd::sequencer::v1 as pb;
use ktd_testkit::net::free_addr;
use ktd_testkit::process::{KtdCluster, KtdNode};
use ktd_testkit::{Poll, with_deadline};

use crate::support::KTD;
use crate::support::cluster::{connect, publish_epochs, sequencer_client};
use crate::support::metrics::{Scrape, check_value, scrape_until};

const PUBLISH_ROUNDS: usize = 4;
const UPDATES_PER_ROUND: usize = 5;

/// What `ktd dev` must export after [`PUBLISH_ROUNDS`] committed epochs of distinct updates.
fn dev_problems(scrape: &Scrape, data_dir: &std::path::Path) -> Vec<String> {
    let mut problems = Vec::new();
    let mut gauge = |name: &str, labels: &[(&str, &str)], sane: &dyn Fn(f64) -> bool| {
        check_value(
            &mut problems,
            &format!("{name}{labels:?}"),
            scrape.value(name, labels),
            sane,
        )
    };
    let published = (PUBLISH_ROUNDS * UPDATES_PER_ROUND) as f64;
    // Raft.
    gauge("ktd_raft_term", &[], &|term| term >= 1.0);
    gauge("ktd_raft_leader_id", &[], &|id| id == 1.0);
    gauge("ktd_raft_is_leader", &[], &|is_leader| is_leader == 1.0);
    gauge("ktd_raft_membership_joint", &[], &|joint| joint == 0.0);
    gauge("ktd_raft_purged_index", &[], &|index| index >= 0.0);
    gauge("ktd_raft_snapshot_index", &[], &|index| index >= 0.0);
    let index = |name| scrape.value(name, &[]).unwrap_or(f64::NAN);
    let (last_log, commit, applied) = (
        index("ktd_raft_last_log_index"),
        index("ktd_raft_commit_index"),
        index("ktd_raft_applied_index"),
    );
    if !(last_log >= commit && commit >= applied && applied >= 1.0) {
        problems.push(format!(
            "raft indexes: last log {last_log} ≥ commit {commit} ≥ applied {applied} ≥ 1 fails"
        ));
    }
    // Epochs.
    let mut gauge = |name: &str, labels: &[(&str, &str)], sane: &dyn Fn(f64) -> bool| {
        check_value(
            &mut problems,
            &format!("{name}{labels:?}"),
            scrape.value(name, labels),
            sane,
        )
    };
    gauge("ktd_epoch_last_committed", &[], &|epoch| {
        epoch >= PUBLISH_ROUNDS as f64
    });
    gauge("ktd_epoch_last_sealed", &[], &|epoch| {
        epoch >= PUBLISH_ROUNDS as f64
    });
    gauge("ktd_epoch_open", &[], &|epoch| {
        epoch > PUBLISH_ROUNDS as f64
    });
    gauge("ktd_epoch_pending_updates", &[], &|pending| pending >= 0.0);
    // Every epoch committed: no stall, nothing poisoned; no test mode.
    gauge("ktd_epoch_commit_stall_seconds", &[], &|seconds| {
        seconds == 0.0
    });
    gauge("ktd_epoch_poisoned", &[], &|poisoned| poisoned == 0.0);
    gauge("ktd_gateway_unsafe_test_mode", &[], &|on| on == 0.0);
    gauge("ktd_epoch_age_seconds", &[], &|age| {
        (0.0..60.0).contains(&age)
    });
    gauge("ktd_epochs_committed_total", &[], &|count| {
        count >= PUBLISH_ROUNDS as f64
    });
    gauge("ktd_epoch_commit_duration_seconds_count", &[], &|count| {
        count >= PUBLISH_ROUNDS as f64
    });
    gauge("ktd_epoch_seal_duration_seconds_count", &[], &|count| {
        count >= PUBLISH_ROUNDS as f64
    });
    gauge("ktd_epoch_seal_duration_seconds_sum", &[], &|sum| {
        (0.0..600.0).contains(&sum)
    });
    // Every published update is in exactly one committed epoch and is observed once.
    gauge("ktd_epoch_updates_sum", &[], &|sum| sum == published);
    gauge("ktd_publish_to_inclusion_seconds_count", &[], &|count| {
        count == published
    });
    gauge("ktd_publish_to_inclusion_seconds_sum", &[], &|sum| {
        sum > 0.0 && sum / published < 60.0
    });
    gauge("ktd_epoch_latest_seen_timestamp_seconds", &[], &|seconds| {
        seconds > 1.7e9
    });
    // Storage: latency histograms filled by the workload.
    gauge("ktd_storage_raft_log_fsync_seconds_count", &[], &|count| {
        count >= 1.0
    });
    gauge("ktd_storage_raft_log_append_seconds_count", &[], &|count| {
        count >= 1.0
    });
    for (store, batch) in [
        ("sequencer", "apply"),
        ("shard", "nodes"),
        ("shard", "user_versions"),
    ] {
        gauge(
            "ktd_storage_batch_write_seconds_count",
            &[("store", store), ("batch", batch)],
            &|count| count >= 1.0,
        );
    }
    // Storage: sampled gauges of both data directories.
    for dir in ["sequencer", "shard"] {
        let dir = data_dir.join(dir).display().to_string();
        let labels = [("dir", dir.as_str())];
        let total = scrape
            .value("ktd_storage_disk_total_bytes", &labels)
            .unwrap_or(f64::NAN);
        gauge("ktd_storage_disk_total_bytes", &labels, &|bytes| {
            bytes > 0.0
        });
        gauge("ktd_storage_disk_free_bytes", &labels, &|bytes| {
            bytes > 0.0 && bytes <= total
        });
        gauge("ktd_storage_rocksdb_write_stopped", &labels, &|stopped| {
            stopped == 0.0
        });
        gauge(
            "ktd_storage_rocksdb_delayed_write_rate_bytes",
            &labels,
            &|rate| rate == 0.0,
        );
        gauge(
            "ktd_storage_rocksdb_pending_compaction_bytes",
            &labels,
            &|bytes| bytes >= 0.0,
        );
    }
    // The gateway's own series.
    let lookups = scrape
        .matching(
            "ktd_grpc_server_handled_total",
            &[
                ("service", "ktd.v1.Directory"),
                ("method", "Lookup"),
                ("code", "Ok"),
            ],
        )
        .map(|sample| sample.value)
        .sum::<f64>();
    if lookups < PUBLISH_ROUNDS as f64 {
        problems.push(format!("{lookups} successful lookups counted"));
    }
    // Stored lookup proofs (eager by default): every lookup counted, the filler at work.
    let proofs = |outcome| {
        scrape
            .value("ktd_shard_lookup_proofs_total", &[("outcome", outcome)])
            .unwrap_or(0.0)
    };
    if proofs("stored") + proofs("computed") < PUBLISH_ROUNDS as f64 || proofs("filled") < 1.0 {
        problems.push(format!(
            "lookup proofs: stored {} + computed {} < {PUBLISH_ROUNDS} lookups, or filled {} < 1",
            proofs("stored"),
            proofs("computed"),
            proofs("filled")
        ));
    }
    // A single node has no followers.
    if scrape
        .matching("ktd_raft_follower_lag_entries", &[])
        .next()
        .is_some()
    {
        problems.push("a one-node sequencer exports follower lag".into());
    }
    problems
}

#[test]
fn ktd_dev_exports_every_catalogued_series_with_sane_values() {
    with_deadline(Duration::from_secs(120), || async {
        let root = tempfile::tempdir().expect("temp dir");
        let metrics_addr = free_addr("127.0.0.46");
        let mut dev = KtdNode::dev(
            KTD,
            root.path(),
            "127.0.0.46",
            &[
                "--epoch-interval",
                "200ms",
                "--metrics-listen",
                &metrics_addr,
            ],
        );
        dev.spawn(&[]);
        let client = connect(&dev.addr).await;

        tracing::info!("--- publish {PUBLISH_ROUNDS} epochs of distinct updates, look them up");
        publish_epochs(&client, "metrics", PUBLISH_ROUNDS, UPDATES_PER_ROUND).await;
        for round in 0..PUBLISH_ROUNDS {
            client
                .lookup(format!("metrics-{round}-0").as_bytes(), None)
                .await
                .expect("lookup");
        }

        tracing::info!("--- scrape until the sampled gauges are in");
        let data_dir = root.path().join("dev");
        let scrape = scrape_until(&metrics_addr, Duration::from_secs(30), |scrape| {
            dev_problems(scrape, &data_dir)
        })
        .await;
        for histogram in [
            "ktd_storage_raft_log_fsync_seconds",
            "ktd_epoch_seal_duration_seconds",
            "ktd_epoch_updates",
        ] {
            assert!(
                scrape
                    .matching(&format!("{histogram}_bucket"), &[("le", "+Inf")])
                    .next()
                    .is_some(),
                "{histogram} is not exported as a histogram:\n{}",
                scrape.text
            );
        }
    });
}

#[test]
fn a_sequencer_leader_exports_follower_lag_and_heartbeat_age() {
    with_deadline(Duration::from_secs(120), || async {
        let metrics_addrs: BTreeMap<u64, String> = (1..=3)
            .map(|id| (id, free_addr(&format!("127.0.0.{}", 50 + id))))
            .collect();
        let mut cluster = KtdCluster::start_with(KTD, 3, |id| {
            vec!["--metrics-listen".into(), metrics_addrs[&id].clone()]
        });
        let client = sequencer_client(&cluster);
        let append = |round: usize| {
            let client = client.clone();
            async move {
                client
                    .append(
                        vec![pb::Update {
                            label: format!("lag-{round}").into_bytes(),
                            value: b"v".to_vec(),
                        }],
                        None,
                    )
                    .await
            }
        };
        Poll::new("an accepted append", Duration::from_secs(30))
            .every(Duration::from_millis(100))
            .context(|| cluster.logs())
            .until_ok(|| append(0))
            .await;
        let leader = client
            .cluster_status()
            .await
            .expect("cluster status")
            .leader_id;
        let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();

        tracing::info!("--- all followers caught up and acknowledging");
        let leader_metrics = metrics_addrs[&leader].clone();
        scrape_until(&leader_metrics, Duration::from_secs(30), |scrape| {
            let mut problems = Vec::new();
            check_value(
                &mut problems,
                "is_leader",
                scrape.value("ktd_raft_is_leader", &[]),
                |v| v == 1.0,
            );
            check_value(
                &mut problems,
                "joint",
                scrape.value("ktd_raft_membership_joint", &[]),
                |v| v == 0.0,
            );
            for follower in &followers {
                let follower = follower.to_string();
                let labels = [("follower", follower.as_str())];
                check_value(
                    &mut problems,
                    &format!("lag of {follower}"),
                    scrape.value("ktd_raft_follower_lag_entries", &labels),
                    |lag| lag == 0.0,
                );
                check_value(
                    &mut problems,
                    &format!("heartbeat ack age of {follower}"),
                    scrape.value("ktd_raft_heartbeat_ack_age_seconds", &labels),
                    |age| (0.0..2.0).contains(&age),
                );
            }
            if scrape
                .matching("ktd_raft_follower_lag_entries", &[])
                .count()
                != 2
            {
                problems.push("follower lag of other than the two followers".into());
            }
            problems
        })
        .await;

        tracing::info!("--- kill a follower, append: its lag and ack age grow");
        let (dead, alive) = (followers[0], followers[1]);
        cluster.nodes.get_mut(&dead).expect("node").kill9();
        const APPENDS: usize = 20;
        for round in 1..=APPENDS {
            append(round).await.expect("append with one follower down");
        }
        scrape_until(&leader_metrics, Duration::from_secs(30), |scrape| {
            let mut problems = Vec::new();
            let value = |name: &str, follower: u64| {
                scrape.value(name, &[("follower", follower.to_string().as_str())])
            };
            check_value(
                &mut problems,
                "dead lag",
                value("ktd_raft_follower_lag_entries", dead),
                |lag| lag >= APPENDS as f64,
            );
            check_value(
                &mut problems,
                "dead ack age",
                value("ktd_raft_heartbeat_ack_age_seconds", dead),
                |age| age >= 1.0,
            );
            check_value(
                &mut problems,
                "live ack age",
                value("ktd_raft_heartbeat_ack_age_seconds", alive),
                |age| (0.0..2.0).contains(&age),
            );
            problems
        })
        .await;
    });
}
