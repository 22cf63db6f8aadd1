//! The shipped scenarios, shortened to CI budgets: each must pass every checker and heal, and
//! the positive control must be caught.

use std::path::PathBuf;
use std::time::Duration;

use chaos_tests::nemesis::FaultKind;
use chaos_tests::positive_control::Mutation;
use chaos_tests::report::Exit;
use chaos_tests::runner::{self, RunOptions, RunOutput};
use chaos_tests::scenario::Scenario;
use chaos_tests::topology::find_ktd;

use crate::support::with_deadline;

/// Runs a shipped scenario for `duration`; artifacts under `$KTD_CHAOS_OUT/<name>` if set.
async fn run(name: &str, duration: Duration, mutation: Option<Mutation>) -> RunOutput {
    let scenario = Scenario::load(name).expect("shipped scenario");
    let ktd = find_ktd(None).unwrap_or_else(|error| panic!("{error}"));
    let out = std::env::var_os("KTD_CHAOS_OUT").map(|dir| PathBuf::from(dir).join(name));
    let options = RunOptions {
        ktd,
        seed: 7,
        duration: Some(duration),
        out,
        mutation,
        key_prefix: String::new(),
    };
    let output = runner::run(&scenario, &options)
        .await
        .unwrap_or_else(|error| panic!("harness error: {error}"));
    eprintln!("{}", output.report.render());
    output
}

/// A correct run: no violation, every fault installed, the cluster healed.
fn assert_clean(output: &RunOutput, kind: FaultKind) {
    let report = &output.report;
    for verdict in &report.verdicts {
        assert!(
            verdict.ok(),
            "{}: {:#?}",
            verdict.checker,
            verdict.violations
        );
    }
    assert!(
        report.heal_error.is_none(),
        "did not heal: {:?}",
        report.heal_error
    );
    assert!(
        report.converged.is_ok(),
        "the sequencers did not converge: {:?}",
        report.converged
    );
    let faults: Vec<_> = report
        .faults
        .iter()
        .filter(|f| f.fault.kind == kind)
        .collect();
    assert!(!faults.is_empty(), "no {kind:?} fault was scheduled");
    for figure in faults {
        assert!(figure.fault.installed(), "{:?}", figure.fault);
        assert!(
            figure.write_unavailable_ms.is_some(),
            "no publish was acknowledged after {:?}",
            figure.fault
        );
    }
    assert!(
        report.ops.get("publish ok").copied().unwrap_or(0) > 20,
        "too few acknowledged publishes: {:?}",
        report.ops
    );
    assert!(
        output.final_state.epoch > 5,
        "too few epochs: {}",
        output.final_state.epoch
    );
}

#[test]
fn leader_kill() {
    with_deadline(Duration::from_secs(90), || async {
        let output = run("leader-kill", Duration::from_secs(16), None).await;
        assert_clean(&output, FaultKind::KillLeader);
        let fault = &output.report.faults[0];
        assert!(fault.fault.new_leader.is_some(), "no new leader: {fault:?}");
        assert_ne!(fault.fault.new_leader, fault.fault.leader_before);
    });
}

/// A minority partition of the leader (network faults through the link proxies): the majority
/// elects a new leader and keeps acknowledging writes, and the old leader rejoins it.
#[test]
fn leader_isolated() {
    with_deadline(Duration::from_secs(90), || async {
        let output = run("leader-isolated", Duration::from_secs(16), None).await;
        assert_clean(&output, FaultKind::Partition);
        let fault = &output.report.faults[0].fault;
        let old = fault.leader_before.expect("a leader before the partition");
        assert_eq!(fault.isolated, [old], "the leader is the isolated side");
        assert_eq!(
            fault.links.len(),
            4,
            "both directions to both peers: {fault:?}"
        );
        let new = fault.new_leader.expect("the majority elects a new leader");
        assert_ne!(new, old);
        let converged = output.report.converged.as_ref().expect("converged");
        assert_ne!(converged.leader, 0);
    });
}

#[test]
fn follower_pause() {
    with_deadline(Duration::from_secs(90), || async {
        let output = run("follower-pause", Duration::from_secs(14), None).await;
        assert_clean(&output, FaultKind::PauseFollower);
    });
}

/// With 2 shards and the default replication factor (2), a killed shard leaves one of two
/// replicas: no majority, so epochs stall until it is back (not checked here), but publishes
/// are still acknowledged and nothing is lost.
#[test]
fn shard_crash_mid_epoch_keeps_acknowledging_publishes() {
    with_deadline(Duration::from_secs(90), || async {
        let output = run("shard-crash-mid-epoch", Duration::from_secs(14), None).await;
        assert_clean(&output, FaultKind::KillShard);
    });
}

/// What replication buys, measured while one replica of every partition is out (3 shards,
/// replication factor 3): epochs keep committing (no gap between committed epochs above the
/// scenario's `max_commit_gap`: 3 s, 5 s for an isolated shard),
/// no lookup goes unanswered, and the shard is back afterwards — `SERVING`, and a voter with
/// lag 0 in every partition it voted in before.
fn assert_replication_held(output: &RunOutput, kind: FaultKind) {
    assert_clean(output, kind);
    let report = &output.report;
    assert_eq!(report.failed_reads, 0, "lookups without an answer");
    let figure = report
        .faults
        .iter()
        .find(|f| f.fault.kind == kind)
        .expect("the fault");
    let limit = Scenario::load(&report.scenario)
        .expect("shipped scenario")
        .slo
        .max_commit_gap
        .expect("the scenario bounds the commit gap");
    let gap = figure.max_commit_gap_ms.expect("epochs were seen");
    assert!(
        u128::from(gap) <= limit.as_millis(),
        "epochs stalled for {gap} ms: {figure:?}"
    );
    let replica = figure.fault.replica.clone().expect("replica recovery");
    assert!(replica.error.is_none(), "{replica:?}");
    assert_eq!(
        replica.voter_before.len(),
        16,
        "a voter of every partition: {replica:?}"
    );
    assert!(replica.serving_ms.is_some(), "{replica:?}");
    assert!(replica.caught_up_ms.is_some(), "{replica:?}");
    assert_eq!(replica.voter_after, replica.voter_before, "{replica:?}");
    assert_eq!(report.exit, Exit::Ok, "{:#?}", report.slo);
}

#[test]
fn replica_kill_keeps_epochs_committing_and_reads_answered() {
    with_deadline(Duration::from_secs(90), || async {
        let output = run("replica-kill", Duration::from_secs(16), None).await;
        assert_replication_held(&output, FaultKind::KillReplica);
    });
}

/// A wiped replica comes back empty and is rebuilt by partition copies from a live voter
/// (`partition copied` in the sequencers' logs), while the majority keeps committing.
#[test]
fn replica_disk_wipe_is_rebuilt_by_partition_copies() {
    with_deadline(Duration::from_secs(90), || async {
        let output = run("replica-disk-wipe", Duration::from_secs(16), None).await;
        assert_replication_held(&output, FaultKind::WipeReplica);
        let replica = output.report.faults[0]
            .fault
            .replica
            .clone()
            .expect("replica recovery");
        assert!(
            replica.partitions_copied > 0,
            "not rebuilt by copies: {replica:?}"
        );
    });
}

/// A shard cut off the network (its fence blackholes every connection to and from it): reads
/// hedge to another voter, the majority commits, and it catches up after the heal.
#[test]
fn shard_isolated_keeps_epochs_committing_and_reads_answered() {
    with_deadline(Duration::from_secs(90), || async {
        let output = run("shard-isolated", Duration::from_secs(16), None).await;
        assert_replication_held(&output, FaultKind::IsolateShard);
    });
}

/// Capacity added under faults: a fourth shard server joins and the balancer moves copies
/// onto it while a shard server (a source of every move) and then the sequencer leader are
/// SIGKILLed; the moves finish after the faults, every checker passes and no read fails.
#[test]
fn rebalance_under_faults_finishes_every_move_with_no_failed_read() {
    with_deadline(Duration::from_secs(240), || async {
        let output = run("rebalance-under-faults", Duration::from_secs(20), None).await;
        assert_clean(&output, FaultKind::AddShard);
        let rebalance = output
            .report
            .faults
            .iter()
            .find_map(|figure| figure.fault.rebalance.clone())
            .expect("the add-shard record");
        assert!(
            rebalance.error.is_none() && rebalance.balanced_ms.is_some(),
            "{rebalance:?}"
        );
        // 16 partitions × 3 copies on 4 servers: 12 each, within the balancer's tolerance.
        assert!(
            (10..=14).contains(&rebalance.voter_of.len()),
            "{rebalance:?}"
        );
        assert_eq!(output.report.exit, Exit::Ok, "{:#?}", output.report.slo);
    });
}

/// The positive control for the three above: the same kill with replication factor 1 must
/// stall commits and fail reads, and the commit-gap and failed-read SLOs must catch it (exit
/// 2), while the correctness checkers still pass (nothing is lost, only unavailable).
#[test]
fn unreplicated_replica_kill_is_caught_by_the_slos() {
    with_deadline(Duration::from_secs(90), || async {
        let output = run("broken-unreplicated-kill", Duration::from_secs(16), None).await;
        let report = &output.report;
        assert_eq!(report.exit, Exit::SloBreach, "{:#?}", report.slo);
        for verdict in &report.verdicts {
            assert!(
                verdict.ok(),
                "{}: {:#?}",
                verdict.checker,
                verdict.violations
            );
        }
        let figure = &report.faults[0];
        assert!(figure.fault.installed(), "{:?}", figure.fault);
        let gap = figure.max_commit_gap_ms.expect("epochs were seen");
        assert!(gap > 3000, "no stall without replication? {gap} ms");
        assert!(
            report.failed_reads > 0,
            "no failed read without replication?"
        );
        let breached: Vec<&str> = report
            .slo
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.what.as_str())
            .collect();
        assert!(
            breached
                .iter()
                .any(|w| w.contains("longest gap between committed epochs")),
            "{breached:?}"
        );
        assert!(
            breached.iter().any(|w| w.contains("failed reads")),
            "{breached:?}"
        );
    });
}

/// A follower that was down while the others snapshotted and purged their logs catches up by
/// installing a snapshot (not by log replay), and every node ends with the same epochs and
/// roots (`no_fork` reads each node's own state).
#[test]
fn snapshot_catch_up() {
    with_deadline(Duration::from_secs(90), || async {
        let output = run("snapshot-catch-up", Duration::from_secs(14), None).await;
        assert_clean(&output, FaultKind::SnapshotCatchUp);
        let snapshot = output.report.faults[0]
            .fault
            .snapshot
            .clone()
            .expect("snapshot evidence");
        assert!(snapshot.error.is_none(), "{snapshot:?}");
        assert!(
            snapshot.leader_purged_index > snapshot.follower_last_log_before,
            "the leader did not purge past the follower: {snapshot:?}"
        );
        assert!(snapshot.via_snapshot, "{snapshot:?}");
        assert!(snapshot.install_logged, "{snapshot:?}");
        assert!(snapshot.catch_up_ms.is_some(), "{snapshot:?}");
        assert_replicas_compared(&output);
    });
}

/// A 4th sequencer joins as a learner, becomes a voter and is removed again, under load.
#[test]
fn membership_change() {
    with_deadline(Duration::from_secs(90), || async {
        let output = run("membership-change", Duration::from_secs(16), None).await;
        assert_clean(&output, FaultKind::AddVoter);
        let change = output.report.faults[0]
            .fault
            .membership
            .clone()
            .expect("membership timings");
        assert!(change.error.is_none(), "{change:?}");
        assert_eq!(change.voters_after_promote, [vec![1, 2, 3, 4]]);
        assert_eq!(change.voters_after_remove, [vec![1, 2, 3]]);
        assert!(
            change.roots.len() > 3,
            "the added voter's roots were not read: {change:?}"
        );
        assert_replicas_compared(&output);
    });
}

/// Every sequencer's own committed epochs were compared (no_fork) up to the final epoch.
fn assert_replicas_compared(output: &RunOutput) {
    let replicas = &output.final_state.replicas;
    assert_eq!(replicas.len(), 3, "{replicas:?}");
    for (node, last) in replicas {
        assert!(*last >= output.final_state.epoch, "{node} at {last}");
        let own = output
            .final_state
            .roots
            .iter()
            .filter(|(_, _, source)| source.starts_with(&format!("{node} (own state, final)")))
            .count() as u64;
        assert_eq!(own, *last, "{node}'s epochs were not all read");
    }
}

/// A real broken mode of the product, end to end: the gateway serving stale latest-epoch
/// lookups (`--unsafe-test-mode`, `KTD_UNSAFE_STALE_READS`) must make the run exit 1.
#[test]
fn broken_stale_reads_are_caught() {
    with_deadline(Duration::from_secs(90), || async {
        let output = run("broken-stale-reads", Duration::from_secs(10), None).await;
        assert_eq!(
            output.report.exit,
            Exit::Violation,
            "stale reads not caught"
        );
        let failed: Vec<_> = output
            .report
            .verdicts
            .iter()
            .filter(|v| !v.ok())
            .map(|v| v.checker)
            .collect();
        assert!(failed.contains(&"monotonic_reads"), "{failed:?}");
        assert!(output.report.broken_mode.is_some());
    });
}

/// The checkers must fail on a broken cluster: the same run with an acknowledged publish lost
/// and a stale read injected exits 1.
#[test]
fn positive_control_is_caught() {
    with_deadline(Duration::from_secs(90), || async {
        let output = run(
            "leader-kill",
            Duration::from_secs(12),
            Some(Mutation::LoseAckedPublish),
        )
        .await;
        assert_eq!(
            output.report.exit,
            Exit::Violation,
            "lost publish not caught"
        );
        let failed: Vec<_> = output
            .report
            .verdicts
            .iter()
            .filter(|v| !v.ok())
            .map(|v| v.checker)
            .collect();
        assert!(failed.contains(&"no_lost_publish"), "{failed:?}");

        // The same history, healthy, then with a stale read: only the mutation makes it fail.
        let mut history = output.history.clone();
        let mut final_state = output.final_state.clone();
        chaos_tests::positive_control::apply(Mutation::StaleRead, &mut history, &mut final_state)
            .expect("a lookup to make stale");
        let verdicts = chaos_tests::checker::check_all(&history, &final_state);
        let failed: Vec<_> = verdicts
            .iter()
            .filter(|v| !v.ok())
            .map(|v| v.checker)
            .collect();
        assert!(
            failed.contains(&"reads_follow_the_log"),
            "stale read not caught: {failed:?}"
        );
    });
}
