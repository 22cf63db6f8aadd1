//! One scenario run, end to end: start a [`Topology`], run the workload, inject the scheduled
//! faults (measuring the time to a new leader for leader faults), heal everything, read the
//! final state, run every checker and build the [`Report`]. Artifacts go to `--out`:
//! `history.jsonl`, `final.json`, `faults.json`, `report.json`, `report.txt` and `logs/`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::checker::check_all;
use crate::history::{FinalState, History};
use crate::nemesis::{self, FaultRecord};
use crate::positive_control::{self, Mutation};
use crate::report::{self, Report};
use crate::scenario::Scenario;
use crate::topology::{Topology, TopologyError, TopologyOptions};
use crate::workload::{self, Recorder, WorkloadOptions};

/// How to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The `ktd` binary.
    pub ktd: PathBuf,
    /// Seed for fault targets, timing jitter, keys and the VRF key.
    pub seed: u64,
    /// Overrides the scenario's duration.
    pub duration: Option<Duration>,
    /// Where to write artifacts.
    pub out: Option<PathBuf>,
    /// Positive control: mutate the history before checking.
    pub mutation: Option<Mutation>,
    /// Prepended to every key the workload uses (empty on a fresh cluster; a drill against a
    /// running cluster uses a unique one so earlier data cannot be mistaken for this run's).
    pub key_prefix: String,
}

/// The harness failed (exit 3).
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// Cluster setup or a process operation failed.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// Writing artifacts failed.
    #[error("write {path}: {source}")]
    Write {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A positive-control mutation found nothing to mutate.
    #[error("the positive control {0:?} found nothing to mutate (run longer)")]
    NothingToMutate(Mutation),
}

/// What a run produced.
pub struct RunOutput {
    /// The report.
    pub report: Report,
    /// The history.
    pub history: History,
    /// The final state.
    pub final_state: FinalState,
}

/// Runs `scenario`.
pub async fn run(scenario: &Scenario, options: &RunOptions) -> Result<RunOutput, HarnessError> {
    let duration = options.duration.unwrap_or(scenario.duration);
    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut vrf_seed = [0u8; 32];
    vrf_seed[..8].copy_from_slice(&options.seed.to_le_bytes());
    vrf_seed[8] = 0x6b;
    let mut topology = Topology::start(&TopologyOptions {
        ktd: options.ktd.clone(),
        epoch_interval: scenario.epoch_interval,
        vrf_seed,
        startup_limit: Duration::from_secs(60),
        gateway_unsafe_env: scenario
            .broken_mode
            .map(|mode| mode.gateway_env())
            .unwrap_or_default(),
        shards: scenario.shards,
        replication_factor: scenario.replication_factor,
        fence_shards: scenario
            .faults
            .iter()
            .any(|fault| fault.kind == nemesis::FaultKind::IsolateShard),
    })
    .await?;
    let result = drive(scenario, options, duration, &mut rng, &mut topology).await;
    save(options, &topology, result)
}

/// Copies the logs and writes the artifacts (if `--out`), whatever the run's result.
fn save(
    options: &RunOptions,
    topology: &Topology,
    result: Result<RunOutput, HarnessError>,
) -> Result<RunOutput, HarnessError> {
    if let Some(out) = &options.out {
        topology.copy_logs(&out.join("logs"))?;
    }
    let output = result?;
    if let Some(out) = &options.out {
        write_artifacts(out, &output)?;
    }
    Ok(output)
}

/// Runs `scenario` against a cluster this harness did not start (`ktd-chaos drill`): faults go
/// through the inventory's hooks; the same workload, checkers and report. The scenario's epoch
/// interval is the cluster's own (only used to count delayed epochs).
pub async fn drill(
    scenario: &Scenario,
    options: &RunOptions,
    mut topology: Topology,
) -> Result<RunOutput, HarnessError> {
    if scenario.broken_mode.is_some() {
        return Err(HarnessError::Topology(TopologyError::State(format!(
            "scenario {} needs a deliberately broken cluster; run it with `ktd-chaos run`",
            scenario.name
        ))));
    }
    let duration = options.duration.unwrap_or(scenario.duration);
    let mut rng = StdRng::seed_from_u64(options.seed);
    topology.wait_healthy(Duration::from_secs(30)).await?;
    let result = drive(scenario, options, duration, &mut rng, &mut topology).await;
    save(options, &topology, result)
}

/// Polls every sequencer's own latest committed epoch (a local read, not through the leader)
/// every 500 ms until `stop`; one `(epoch, root, node)` per node and epoch.
async fn sample_node_roots(
    sequencers: Vec<(u64, String)>,
    stop: Arc<AtomicBool>,
    roots: Arc<std::sync::Mutex<Vec<(u64, String, String)>>>,
) {
    let client = sequencer::SequencerClient::new(sequencers.iter().map(|(_, addr)| addr.clone()));
    let mut seen: std::collections::BTreeSet<(u64, u64)> = std::collections::BTreeSet::new();
    while !stop.load(Ordering::Relaxed) {
        for (id, addr) in &sequencers {
            if let Ok(Ok(record)) = tokio::time::timeout(
                Duration::from_millis(800),
                client.local_epoch_at(addr, None),
            )
            .await
                && record.epoch > 0
                && seen.insert((*id, record.epoch))
            {
                roots
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push((
                        record.epoch,
                        hex::encode(&record.root_hash),
                        format!("seq-{id} (own state, sampled during the run)"),
                    ));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// After convergence: every sequencer's own record of every committed epoch (local reads), so
/// `no_fork` compares one root per epoch across all nodes and the gateway, and each node's last
/// committed epoch (a node missing the final epoch has lost state).
async fn read_node_roots(sequencers: &[(u64, String)], final_state: &mut FinalState) {
    let client = sequencer::SequencerClient::new(sequencers.iter().map(|(_, addr)| addr.clone()));
    for (id, addr) in sequencers {
        let node = format!("seq-{id}");
        let latest =
            match tokio::time::timeout(Duration::from_secs(3), client.local_epoch_at(addr, None))
                .await
            {
                Ok(Ok(record)) => record.epoch,
                Ok(Err(error)) => {
                    final_state
                        .replica_errors
                        .push(format!("{node}: latest epoch unreadable: {error}"));
                    continue;
                }
                Err(_) => {
                    final_state
                        .replica_errors
                        .push(format!("{node}: latest epoch: no answer within 3 s"));
                    continue;
                }
            };
        final_state.replicas.push((node.clone(), latest));
        for epoch in 1..=latest {
            match tokio::time::timeout(
                Duration::from_secs(3),
                client.local_epoch_at(addr, Some(epoch)),
            )
            .await
            {
                Ok(Ok(record)) => final_state.roots.push((
                    epoch,
                    hex::encode(&record.root_hash),
                    format!("{node} (own state, final)"),
                )),
                Ok(Err(error)) => final_state
                    .replica_errors
                    .push(format!("{node}: epoch {epoch} unreadable: {error}")),
                Err(_) => final_state
                    .replica_errors
                    .push(format!("{node}: epoch {epoch}: no answer within 3 s")),
            }
        }
    }
}

async fn drive(
    scenario: &Scenario,
    options: &RunOptions,
    duration: Duration,
    rng: &mut StdRng,
    topology: &mut Topology,
) -> Result<RunOutput, HarnessError> {
    let schedule = scenario.schedule(duration, rng);
    let recorder = Arc::new(Recorder::new());
    let stop = Arc::new(AtomicBool::new(false));
    let run_id = format!(
        "chaos-{}-{}",
        options.seed,
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    );
    let workload_options = WorkloadOptions {
        clients: scenario.clients,
        keys: scenario.keys,
        publish_ratio: scenario.publish_ratio,
        op_timeout: scenario.op_timeout,
        epoch_poll: Duration::from_millis(100),
        seed: options.seed,
        run_id,
        key_prefix: options.key_prefix.clone(),
    };
    let clients = tokio::spawn(workload::run(
        topology.gateway_url(),
        workload_options,
        recorder.clone(),
        stop.clone(),
    ));

    let sequencers: Vec<(u64, String)> = topology
        .sequencers
        .iter()
        .map(|p| (p.id, p.addr.clone()))
        .collect();
    let sampled_roots = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sampler = tokio::spawn(sample_node_roots(
        sequencers.clone(),
        stop.clone(),
        sampled_roots.clone(),
    ));
    let mut faults: Vec<FaultRecord> = Vec::new();
    let mut fault_error = None;
    for scheduled in schedule {
        tokio::time::sleep_until(recorder.instant_at(scheduled.at.as_micros() as u64).into()).await;
        let now = || recorder.now_us();
        let mut record =
            match nemesis::inject(topology, scheduled.kind, &scheduled.targets, rng, now).await {
                Ok(record) => record,
                Err(error) => {
                    fault_error = Some(error);
                    break;
                }
            };
        let watcher = record.expects_new_leader().then(|| {
            tokio::spawn(nemesis::wait_new_leader(
                sequencers.clone(),
                record.leader_before,
                scheduled.heal_after + Duration::from_secs(20),
            ))
        });
        tokio::time::sleep(scheduled.heal_after).await;
        if let Err(error) = nemesis::heal(topology, &mut record, &now).await {
            fault_error = Some(error);
            faults.push(record);
            break;
        }
        if let Some(watcher) = watcher
            && let Ok(Some((leader, at))) = watcher.await
        {
            record.new_leader = Some(leader);
            record.new_leader_us = Some(
                u64::try_from(at.duration_since(recorder.instant_at(0)).as_micros())
                    .unwrap_or(u64::MAX),
            );
        }
        faults.push(record);
    }
    let end = recorder.instant_at(duration.as_micros() as u64);
    if fault_error.is_none() {
        tokio::time::sleep_until(end.into()).await;
    }
    // Capacity added during the run: the moves must finish once the faults are over.
    if fault_error.is_none() {
        let now = || recorder.now_us();
        for record in faults
            .iter_mut()
            .filter(|record| record.kind == nemesis::FaultKind::AddShard)
        {
            nemesis::settle_rebalance(topology, record, Duration::from_secs(120), &now).await;
        }
    }
    // Heal everything, then let the clients see the healed cluster for a moment.
    let healed = nemesis::heal_all(topology);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(scenario.op_timeout + Duration::from_secs(5), clients).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), sampler).await;
    if let Some(error) = fault_error {
        return Err(error.into());
    }
    healed?;

    let mut history = recorder.history();
    let (mut final_state, heal_error) = match topology.wait_healthy(scenario.slo.max_heal).await {
        Ok(client) => {
            match workload::read_final_state(
                &client,
                &history,
                &options.key_prefix,
                scenario.keys,
                scenario.slo.max_heal,
            )
            .await
            {
                Ok(state) => (state, None),
                Err(error) => (FinalState::default(), Some(error.to_string())),
            }
        }
        Err(error) => (FinalState::default(), Some(error.to_string())),
    };
    let mutation = match options.mutation {
        Some(mutation) => Some(
            positive_control::apply(mutation, &mut history, &mut final_state)
                .ok_or(HarnessError::NothingToMutate(mutation))?,
        ),
        None => None,
    };
    let converged = nemesis::wait_converged(&sequencers, scenario.slo.max_heal).await;
    final_state.roots.extend(
        sampled_roots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..),
    );
    if heal_error.is_none() && converged.is_ok() {
        read_node_roots(&sequencers, &mut final_state).await;
    }
    // Sequencers added and removed during the run: their roots as read before removal.
    for change in faults.iter().filter_map(|fault| fault.membership.as_ref()) {
        final_state
            .roots
            .extend(change.roots.iter().map(|(epoch, root)| {
                (
                    *epoch,
                    root.clone(),
                    format!("seq-{} (own state, before its removal)", change.node),
                )
            }));
    }
    let mut verdicts = check_all(&history, &final_state);
    if heal_error.is_some() {
        // Without a final state the final-state checkers have nothing to compare with.
        verdicts.retain(|v| !matches!(v.checker, "no_lost_publish" | "proofs_verified"));
    }
    let figures = report::fault_figures(&history, &faults, scenario.epoch_interval);
    let failed_reads = report::failed_reads(&history);
    let slo = report::slo_checks(
        &figures,
        &scenario.slo,
        failed_reads,
        heal_error.as_deref(),
        &converged,
    );
    let exit = report::exit_code(&verdicts, &slo);
    let report = Report {
        scenario: scenario.name.clone(),
        seed: options.seed,
        duration_s: duration.as_secs_f64(),
        ops: workload::op_counts(&history),
        faults: figures,
        failed_reads,
        verdicts,
        slo,
        heal_error,
        converged,
        mutation,
        broken_mode: scenario.broken_mode.map(|mode| mode.describe()),
        exit,
    };
    Ok(RunOutput {
        report,
        history,
        final_state,
    })
}

fn write(path: &Path, text: &str) -> Result<(), HarnessError> {
    std::fs::write(path, text).map_err(|source| HarnessError::Write {
        path: path.display().to_string(),
        source,
    })
}

fn json(value: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(value)
        .unwrap_or_else(|error| format!("{{\"error\": \"{error}\"}}"))
}

/// Writes `history.jsonl`, `final.json`, `faults.json`, `report.json` and `report.txt`.
pub fn write_artifacts(out: &Path, output: &RunOutput) -> Result<(), HarnessError> {
    std::fs::create_dir_all(out).map_err(|source| HarnessError::Write {
        path: out.display().to_string(),
        source,
    })?;
    write(&out.join("history.jsonl"), &output.history.to_jsonl())?;
    write(&out.join("final.json"), &json(&output.final_state))?;
    let faults: Vec<&FaultRecord> = output.report.faults.iter().map(|f| &f.fault).collect();
    write(&out.join("faults.json"), &json(&faults))?;
    write(&out.join("report.json"), &json(&output.report))?;
    write(&out.join("report.txt"), &output.report.render())?;
    Ok(())
}
