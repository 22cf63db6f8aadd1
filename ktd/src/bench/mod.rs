//! `ktd bench`: a load generator for capacity testing a running directory over gRPC.
//!
//! Open-loop, constant arrival rate: operation `i` is due at `start + i / rate`, whether or not
//! earlier ones have finished, and its latency is measured from that due time — so a stalled
//! server shows up as latency instead of silently lowering the offered load (no coordinated
//! omission). At most `concurrency` operations are in flight; an operation that waits for a slot
//! waits on the clock. Latencies go into HDR histograms per call type; errors are counted by
//! gRPC code. A watcher polls the latest epoch to measure publish-to-inclusion latency (publish
//! acknowledged → its epoch committed) and updates per epoch.
//!
//! The report is JSON (stable field names, see [`Report`]) plus Markdown and an SVG plot of
//! latency and throughput over time with epoch commits marked; `--baseline FILE` compares with
//! an earlier JSON report and fails on a regression.

pub mod compare_akd;
pub mod servers;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use ktd_proto::ktd::v1 as api;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use ktd_client::Client;

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchSettings {
    /// Operations per second offered (all kinds together).
    pub rate: f64,
    /// How long to offer them.
    pub duration: Duration,
    /// Most operations in flight.
    pub concurrency: usize,
    /// Weights of publish, lookup, history, audit.
    pub mix: Mix,
    /// Users to load first (fast: batches of 5,000, then one seal).
    pub preload: u64,
    /// Updates per publish in the measured phase.
    pub batch: usize,
    /// Value size, bytes.
    pub value_bytes: usize,
    /// Random seed (labels, mix).
    pub seed: u64,
    /// Verify each lookup's proof (client-side, in this process) instead of only fetching it.
    pub verify: bool,
    /// A `ktd auditor`'s gRPC address to follow: the report then has the auditor's lag.
    pub auditor: Option<String>,
    /// Local server processes to sample (name, pid): CPU and RSS go into the report.
    pub servers: Vec<(String, i32)>,
}

/// Relative weights of the call types.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mix {
    /// `Publish`.
    pub publish: u32,
    /// `Lookup`.
    pub lookup: u32,
    /// `KeyHistory`.
    pub history: u32,
    /// `Audit` of the latest step.
    pub audit: u32,
}

impl std::str::FromStr for Mix {
    type Err = anyhow::Error;

    /// `publish-only`, `lookup-only`, `90/10` (lookup/publish), or `publish=1,lookup=9,...`.
    fn from_str(text: &str) -> anyhow::Result<Self> {
        let mut mix = Mix {
            publish: 0,
            lookup: 0,
            history: 0,
            audit: 0,
        };
        match text {
            "publish-only" => mix.publish = 1,
            "lookup-only" => mix.lookup = 1,
            "90/10" => (mix.lookup, mix.publish) = (90, 10),
            _ => {
                for part in text.split(',') {
                    let (name, weight) = part
                        .split_once('=')
                        .with_context(|| format!("mix entry {part:?}: expected NAME=WEIGHT"))?;
                    let weight: u32 = weight
                        .parse()
                        .with_context(|| format!("mix weight {weight:?}"))?;
                    match name.trim() {
                        "publish" => mix.publish = weight,
                        "lookup" => mix.lookup = weight,
                        "history" => mix.history = weight,
                        "audit" => mix.audit = weight,
                        other => bail!("unknown call type {other:?} in the mix"),
                    }
                }
            }
        }
        if mix.publish + mix.lookup + mix.history + mix.audit == 0 {
            bail!("the mix has no operations");
        }
        Ok(mix)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Publish,
    Lookup,
    History,
    Audit,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Publish => "publish",
            Kind::Lookup => "lookup",
            Kind::History => "history",
            Kind::Audit => "audit",
        }
    }
}

/// Latency summary of one call type, milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Completed calls (ok or error).
    pub count: u64,
    /// Successful calls per second over the run.
    pub ok_per_second: f64,
    /// Percentiles, ms.
    pub p50_ms: f64,
    /// 95th percentile, ms.
    pub p95_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 99.9th percentile, ms.
    pub p999_ms: f64,
    /// Errors by gRPC code name.
    pub errors: BTreeMap<String, u64>,
}

/// The machine-readable report (`report.json`). Field names are stable.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Offered operations per second.
    pub offered_rate: f64,
    /// Run length, seconds.
    pub duration_seconds: f64,
    /// Operations per second completed successfully.
    pub ok_per_second: f64,
    /// Updates acknowledged per second.
    pub updates_per_second: f64,
    /// Per call type.
    pub calls: BTreeMap<String, Latency>,
    /// Publish acknowledged → its epoch committed, ms.
    pub inclusion_p50_ms: f64,
    /// 99th percentile of the same.
    pub inclusion_p99_ms: f64,
    /// Acknowledged updates per epoch that committed during the run.
    pub updates_per_epoch: BTreeMap<u64, u64>,
    /// Lookup proof size (encoded response), median bytes.
    pub lookup_proof_bytes_p50: f64,
    /// Operations that started more than 10 ms after their due time (client saturated).
    pub late_starts: u64,
    /// With `--auditor`: epoch committed (seen at the gateway) → signed head (seen at the
    /// auditor), ms; both polled every 50 ms. Absent without an auditor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auditor_lag: Option<AuditorLag>,
    /// Epochs committed during the run, as the sequencer recorded them.
    #[serde(default)]
    pub epochs: Vec<EpochStats>,
    /// Seal latency (leader's seal → committed root) over those epochs, ms.
    #[serde(default)]
    pub seal_p50_ms: f64,
    /// 99th percentile of the same.
    #[serde(default)]
    pub seal_p99_ms: f64,
    /// Worst of the same.
    #[serde(default)]
    pub seal_max_ms: f64,
    /// Sampled server processes (`--server-pid`, `--server-pid-dir`), by name.
    #[serde(default)]
    pub servers: BTreeMap<String, ServerUsage>,
    /// With `--compare-akd`: the same batches through a stock in-process akd directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compare_akd: Option<compare_akd::AkdComparison>,
}

/// One committed epoch.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochStats {
    /// The epoch.
    pub epoch: u64,
    /// Distinct labels updated in it.
    pub updates: u64,
    /// Seal → committed root, ms (leader wall clock; 0 if unknown).
    pub seal_ms: f64,
}

/// CPU and memory of one server process over the run (sampled once per second from /proc).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerUsage {
    /// Mean CPU use, percent of one core.
    pub cpu_percent_mean: f64,
    /// Highest one-second CPU use, percent of one core.
    pub cpu_percent_max: f64,
    /// Highest resident set size, MiB.
    pub rss_max_mib: f64,
    /// Samples taken (0 = the process could not be read).
    pub samples: u64,
}

/// How far a `ktd auditor` trails the directory during a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditorLag {
    /// Epochs committed during the run that the auditor signed before the report.
    pub epochs_signed: u64,
    /// Epochs committed during the run that it had not signed by then.
    pub epochs_unsigned: u64,
    /// Commit → signed, median ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Worst, ms.
    pub max_ms: f64,
    /// Rule violations the auditor reported.
    pub violations: Vec<String>,
}

struct Recorder {
    started: Instant,
    histograms: BTreeMap<Kind, Histogram<u64>>,
    errors: BTreeMap<Kind, BTreeMap<String, u64>>,
    /// Per second: (completed ok, latency sum ms, max latency ms).
    timeline: Vec<(u64, f64, f64)>,
    acked: Vec<(u64, Instant, u64)>,
    proof_bytes: Histogram<u64>,
    late_starts: u64,
}

impl Recorder {
    fn new() -> anyhow::Result<Self> {
        let histogram = || Histogram::<u64>::new_with_bounds(1, 600_000_000, 3);
        let mut histograms = BTreeMap::new();
        for kind in [Kind::Publish, Kind::Lookup, Kind::History, Kind::Audit] {
            histograms.insert(kind, histogram()?);
        }
        Ok(Self {
            started: Instant::now(),
            histograms,
            errors: BTreeMap::new(),
            timeline: Vec::new(),
            acked: Vec::new(),
            proof_bytes: Histogram::new_with_bounds(1, 1 << 30, 3)?,
            late_starts: 0,
        })
    }

    fn record(&mut self, kind: Kind, due: Instant, result: Result<(), tonic::Code>) {
        let now = Instant::now();
        let micros = now.duration_since(due).as_micros().max(1) as u64;
        if let Some(histogram) = self.histograms.get_mut(&kind) {
            let _ = histogram.record(micros);
        }
        match result {
            Ok(()) => {
                let second = now.duration_since(self.started).as_secs() as usize;
                if self.timeline.len() <= second {
                    self.timeline.resize(second + 1, (0, 0.0, 0.0));
                }
                let slot = &mut self.timeline[second];
                let ms = micros as f64 / 1e3;
                *slot = (slot.0 + 1, slot.1 + ms, slot.2.max(ms));
            }
            Err(code) => {
                *self
                    .errors
                    .entry(kind)
                    .or_default()
                    .entry(format!("{code:?}"))
                    .or_default() += 1;
            }
        }
    }
}

fn label(seed: u64, id: u64) -> Vec<u8> {
    format!("bench-{seed}-{id:010}").into_bytes()
}

/// The gRPC code of a failed call (`UNKNOWN` for failures that have none: a proof that did not
/// verify, a malformed answer, no connection).
fn code_of(error: &ktd_client::ClientError) -> tonic::Code {
    error.code().unwrap_or(tonic::Code::Unknown)
}

/// How long the pre-load waits for its last epoch to commit.
const PRELOAD_COMMIT_WAIT: Duration = Duration::from_secs(3600);

/// Every acknowledged publish's updates, for `--compare-akd`.
pub type Recording = Arc<Mutex<compare_akd::Published>>;

fn record_published(recording: Option<&Recording>, epoch: u64, updates: Vec<(Vec<u8>, Vec<u8>)>) {
    if let Some(recording) = recording {
        recording
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(epoch, updates);
    }
}

/// Loads `count` users fast (batches of 5,000, 4 in flight), then seals and waits for the
/// commit. Returns the number of users.
pub async fn preload(
    client: &Client,
    settings: &BenchSettings,
    recording: Option<&Recording>,
) -> anyhow::Result<u64> {
    use futures::StreamExt;
    if let Some(recording) = recording {
        recording
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .start_epoch = client.epoch(None).await?.epoch;
    }
    if settings.preload == 0 {
        return Ok(0);
    }
    let started = Instant::now();
    let chunks: Vec<(u64, u64)> = (0..settings.preload)
        .step_by(5_000)
        .map(|first| (first, (first + 5_000).min(settings.preload)))
        .collect();
    let value = vec![b'p'; settings.value_bytes];
    let results: Vec<anyhow::Result<u64>> = futures::stream::iter(chunks)
        .map(|(first, end)| {
            let value = value.clone();
            async move {
                let updates: Vec<(Vec<u8>, Vec<u8>)> = (first..end)
                    .map(|id| (label(settings.seed, id), value.clone()))
                    .collect();
                let epoch = client.publish(updates.clone(), None).await?.epoch;
                record_published(recording, epoch, updates);
                Ok(epoch)
            }
        })
        .buffer_unordered(4)
        .collect()
        .await;
    let mut last_epoch = 0;
    for result in results {
        last_epoch = last_epoch.max(result?);
    }
    match client.seal().await {
        Ok(_) => {}
        // Sealed on its own (timer or size) in the meantime.
        Err(error) if code_of(&error) == tonic::Code::FailedPrecondition => {}
        // Sealed, but its root did not come within the call's deadline: waited for below.
        Err(error)
            if matches!(
                code_of(&error),
                tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
            ) => {}
        Err(error) => return Err(error.into()),
    }
    // Commits may trail the acknowledged pre-load by minutes (a 1M pre-load is ten
    // 100,000-update epochs), longer than one waiting call's deadline: wait in steps.
    loop {
        match client.wait_for_epoch(last_epoch).await {
            Ok(_) => break,
            Err(error)
                if matches!(
                    code_of(&error),
                    tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
                ) && started.elapsed() < PRELOAD_COMMIT_WAIT => {}
            Err(error) => return Err(error.into()),
        }
    }
    eprintln!(
        "pre-load: {} users in {:.1} s (through epoch {last_epoch})",
        settings.preload,
        started.elapsed().as_secs_f64()
    );
    Ok(settings.preload)
}

/// Runs the measured phase and returns the report (and the per-second timeline for plots).
pub async fn run(
    client: &Client,
    settings: &BenchSettings,
    users: u64,
    recording: Option<Recording>,
) -> anyhow::Result<(Report, Timeline)> {
    let recorder = Arc::new(Mutex::new(Recorder::new()?));
    let slots = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    let next_user = Arc::new(std::sync::atomic::AtomicU64::new(users));
    let commits: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let epochs: Arc<Mutex<Vec<EpochStats>>> = Arc::default();
    let watcher = tokio::spawn(watch_epochs(
        client.clone(),
        commits.clone(),
        epochs.clone(),
        stop.clone(),
    ));
    let usage: Arc<Mutex<BTreeMap<String, ServerUsage>>> = Arc::default();
    let server_watcher = tokio::spawn(watch_servers(
        settings.servers.clone(),
        usage.clone(),
        stop.clone(),
    ));
    let signed: Arc<Mutex<AuditorSeen>> = Arc::default();
    let auditor_watcher = match &settings.auditor {
        Some(addr) => {
            let channel = ktd_rpc::security::endpoint(addr)
                .with_context(|| format!("bad auditor address {addr}"))?
                .connect()
                .await
                .with_context(|| format!("connect to the auditor at {addr}"))?;
            Some(tokio::spawn(watch_auditor(
                channel,
                signed.clone(),
                stop.clone(),
            )))
        }
        None => None,
    };
    let progress = tokio::spawn(print_progress(
        recorder.clone(),
        commits.clone(),
        stop.clone(),
    ));

    let mut rng = StdRng::seed_from_u64(settings.seed);
    let mix = settings.mix;
    let total_weight = mix.publish + mix.lookup + mix.history + mix.audit;
    let interval = Duration::from_secs_f64(1.0 / settings.rate.max(0.001));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut index: u64 = 0;
    loop {
        let due = start + interval.mul_f64(index as f64);
        if due.duration_since(start) >= settings.duration {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let pick = rng.random_range(0..total_weight);
        let kind = if pick < mix.publish {
            Kind::Publish
        } else if pick < mix.publish + mix.lookup {
            Kind::Lookup
        } else if pick < mix.publish + mix.lookup + mix.history {
            Kind::History
        } else {
            Kind::Audit
        };
        let target = if users > 0 {
            rng.random_range(0..users)
        } else {
            0
        };
        let permit = slots.clone().acquire_owned().await?;
        if due.elapsed() > Duration::from_millis(10) {
            recorder
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .late_starts += 1;
        }
        let (client, recorder, next_user) = (client.clone(), recorder.clone(), next_user.clone());
        let (batch, value_bytes, seed) = (settings.batch, settings.value_bytes, settings.seed);
        let verify = settings.verify;
        let recording = recording.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let outcome = match kind {
                Kind::Publish => {
                    let first =
                        next_user.fetch_add(batch as u64, std::sync::atomic::Ordering::Relaxed);
                    let updates: Vec<(Vec<u8>, Vec<u8>)> = (first..first + batch as u64)
                        .map(|id| (label(seed, id), vec![b'v'; value_bytes]))
                        .collect();
                    let copy = recording.is_some().then(|| updates.clone());
                    client
                        .publish(updates, None)
                        .await
                        .map(|published| {
                            if let Some(copy) = copy {
                                record_published(recording.as_ref(), published.epoch, copy);
                            }
                            Some((published.epoch, batch as u64))
                        })
                        .map_err(|error| code_of(&error))
                }
                Kind::Lookup if verify => client
                    .lookup(&label(seed, target), None)
                    .await
                    .map(|_| None)
                    .map_err(|error| code_of(&error)),
                Kind::Lookup => client
                    .directory()
                    .lookup(api::LookupRequest {
                        label: label(seed, target),
                        epoch: None,
                    })
                    .await
                    .map(|answer| {
                        let bytes = prost::Message::encoded_len(answer.get_ref()) as u64;
                        let mut recorder = recorder.lock().unwrap_or_else(|p| p.into_inner());
                        let _ = recorder.proof_bytes.record(bytes.max(1));
                        None
                    })
                    .map_err(|status| status.code()),
                Kind::History => client
                    .directory()
                    .key_history(api::KeyHistoryRequest {
                        label: label(seed, target),
                        most_recent: 0,
                        epoch: None,
                    })
                    .await
                    .map(|_| None)
                    .map_err(|status| status.code()),
                Kind::Audit => match client.epoch(None).await {
                    Ok(latest) if latest.epoch > 0 => client
                        .directory()
                        .audit(api::AuditRequest {
                            start_epoch: latest.epoch - 1,
                            end_epoch: latest.epoch,
                        })
                        .await
                        .map(|_| None)
                        .map_err(|status| status.code()),
                    Ok(_) => Ok(None),
                    Err(error) => Err(code_of(&error)),
                },
            };
            let mut recorder = recorder.lock().unwrap_or_else(|p| p.into_inner());
            if let Ok(Some((epoch, updates))) = outcome {
                recorder.acked.push((epoch, Instant::now(), updates));
            }
            recorder.record(kind, due, outcome.map(|_| ()));
        });
        index += 1;
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed().as_secs_f64();
    // Give the last publishes a chance to be included before the report.
    let last_acked = recorder
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .acked
        .iter()
        .map(|(epoch, _, _)| *epoch)
        .max();
    if let Some(epoch) = last_acked {
        let _ = tokio::time::timeout(Duration::from_secs(30), client.wait_for_epoch(epoch)).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if settings.auditor.is_some() {
        // Let the auditor catch up with the last commit (bounded).
        let last = commits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .map_or(0, |(epoch, _)| *epoch);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline
            && signed.lock().unwrap_or_else(|p| p.into_inner()).latest < last
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    stop.cancel();
    let _ = watcher.await;
    let _ = progress.await;
    let _ = server_watcher.await;
    if let Some(auditor_watcher) = auditor_watcher {
        let _ = auditor_watcher.await;
    }
    let recorder = recorder.lock().unwrap_or_else(|p| p.into_inner());
    let commits = commits.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let (mut report, mut timeline) = summarise(settings, &recorder, &commits, elapsed);
    report.epochs = epochs.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut seals: Vec<f64> = report
        .epochs
        .iter()
        .map(|epoch| epoch.seal_ms)
        .filter(|ms| *ms > 0.0)
        .collect();
    if let Some([p50, p99, max]) = quantiles(&mut seals) {
        (report.seal_p50_ms, report.seal_p99_ms, report.seal_max_ms) = (p50, p99, max);
    }
    report.servers = usage.lock().unwrap_or_else(|p| p.into_inner()).clone();
    // Seal latency per epoch, plotted at its commit.
    timeline.seals = report
        .epochs
        .iter()
        .filter_map(|stats| {
            let at = timeline
                .commits
                .iter()
                .find(|(epoch, _)| *epoch >= stats.epoch)?
                .1;
            Some((at, stats.seal_ms))
        })
        .collect();
    if settings.auditor.is_some() {
        let signed = signed.lock().unwrap_or_else(|p| p.into_inner());
        report.auditor_lag = Some(auditor_lag(&commits, &signed));
    }
    Ok((report, timeline))
}

/// What the bench saw of the auditor: when each epoch's signed head first appeared.
#[derive(Debug, Default)]
struct AuditorSeen {
    latest: u64,
    signed_at: BTreeMap<u64, Instant>,
    violations: Vec<String>,
}

async fn watch_auditor(
    channel: tonic::transport::Channel,
    seen: Arc<Mutex<AuditorSeen>>,
    stop: tokio_util::sync::CancellationToken,
) {
    use ktd_proto::ktd::auditor::v1 as auditor;
    let mut client = auditor::auditor_client::AuditorClient::new(channel);
    while !stop.is_cancelled() {
        if let Ok(info) = client.get_info(auditor::GetInfoRequest {}).await {
            let info = info.into_inner();
            let now = Instant::now();
            let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
            for epoch in seen.latest + 1..=info.last_verified_epoch {
                seen.signed_at.insert(epoch, now);
            }
            seen.latest = seen.latest.max(info.last_verified_epoch);
            seen.violations = info.violations;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Median, 99th percentile and maximum of a small sample (sorted in place); `None` if empty.
pub(crate) fn quantiles(values: &mut [f64]) -> Option<[f64; 3]> {
    values.sort_by(f64::total_cmp);
    let at = |quantile: f64| values[((values.len() - 1) as f64 * quantile).round() as usize];
    let max = *values.last()?;
    Some([at(0.5), at(0.99), max])
}

fn auditor_lag(commits: &[(u64, Instant)], seen: &AuditorSeen) -> AuditorLag {
    let mut lag = AuditorLag {
        violations: seen.violations.clone(),
        ..AuditorLag::default()
    };
    // The first commit seen may predate the run; only epochs seen committing are measured.
    let mut millis = Vec::new();
    for window in commits.windows(2) {
        let (previous, _) = window[0];
        let (epoch, committed_at) = window[1];
        for epoch in previous + 1..=epoch {
            match seen.signed_at.get(&epoch) {
                Some(signed_at) => {
                    millis.push(
                        signed_at
                            .saturating_duration_since(committed_at)
                            .as_secs_f64()
                            * 1e3,
                    );
                    lag.epochs_signed += 1;
                }
                None => lag.epochs_unsigned += 1,
            }
        }
    }
    if let Some([p50, p99, max]) = quantiles(&mut millis) {
        (lag.p50_ms, lag.p99_ms, lag.max_ms) = (p50, p99, max);
    }
    lag
}

/// Per-second series for the plot, and the epoch commit times (seconds since start).
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    /// (second, ok ops, mean latency ms, max latency ms).
    pub seconds: Vec<(f64, u64, f64, f64)>,
    /// (epoch, committed at second).
    pub commits: Vec<(u64, f64)>,
    /// (committed at second, seal latency ms) per epoch.
    pub seals: Vec<(f64, f64)>,
}

fn summarise(
    settings: &BenchSettings,
    recorder: &Recorder,
    commits: &[(u64, Instant)],
    elapsed: f64,
) -> (Report, Timeline) {
    let mut report = Report {
        offered_rate: settings.rate,
        duration_seconds: elapsed,
        late_starts: recorder.late_starts,
        ..Report::default()
    };
    let mut ok_total = 0;
    for (kind, histogram) in &recorder.histograms {
        let errors = recorder.errors.get(kind).cloned().unwrap_or_default();
        let failed: u64 = errors.values().sum();
        if histogram.is_empty() {
            continue;
        }
        let ok = histogram.len().saturating_sub(failed);
        ok_total += ok;
        let ms = |quantile: f64| histogram.value_at_quantile(quantile) as f64 / 1e3;
        report.calls.insert(
            kind.name().to_string(),
            Latency {
                count: histogram.len(),
                ok_per_second: ok as f64 / elapsed,
                p50_ms: ms(0.5),
                p95_ms: ms(0.95),
                p99_ms: ms(0.99),
                p999_ms: ms(0.999),
                errors,
            },
        );
    }
    report.ok_per_second = ok_total as f64 / elapsed;
    let mut inclusion = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).ok();
    let mut updates = 0;
    for (epoch, acked_at, count) in &recorder.acked {
        updates += count;
        if let Some((_, committed_at)) = commits.iter().find(|(committed, _)| committed >= epoch) {
            *report.updates_per_epoch.entry(*epoch).or_default() += count;
            let micros = committed_at
                .saturating_duration_since(*acked_at)
                .as_micros()
                .max(1);
            if let Some(histogram) = inclusion.as_mut() {
                let _ = histogram.record(micros as u64);
            }
        }
    }
    report.updates_per_second = updates as f64 / elapsed;
    if let Some(histogram) = inclusion.filter(|histogram| !histogram.is_empty()) {
        report.inclusion_p50_ms = histogram.value_at_quantile(0.5) as f64 / 1e3;
        report.inclusion_p99_ms = histogram.value_at_quantile(0.99) as f64 / 1e3;
    }
    if !recorder.proof_bytes.is_empty() {
        report.lookup_proof_bytes_p50 = recorder.proof_bytes.value_at_quantile(0.5) as f64;
    }
    let timeline = Timeline {
        seconds: recorder
            .timeline
            .iter()
            .enumerate()
            .map(|(second, (ok, sum, max))| {
                let mean = if *ok > 0 { sum / *ok as f64 } else { 0.0 };
                (second as f64, *ok, mean, *max)
            })
            .collect(),
        commits: commits
            .iter()
            .map(|(epoch, at)| {
                (
                    *epoch,
                    at.saturating_duration_since(recorder.started).as_secs_f64(),
                )
            })
            .collect(),
        seals: Vec::new(),
    };
    (report, timeline)
}

async fn watch_epochs(
    client: Client,
    commits: Arc<Mutex<Vec<(u64, Instant)>>>,
    epochs: Arc<Mutex<Vec<EpochStats>>>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut last = None;
    while !stop.is_cancelled() {
        if let Ok(root) = client.epoch(None).await
            && last != Some(root.epoch)
        {
            // Every epoch committed since the previous sight (the first sight only marks the
            // start), with the sequencer's record of its size and seal/commit times.
            if let Some(previous) = last {
                for epoch in previous + 1..=root.epoch {
                    let request = api::GetEpochRequest {
                        epoch: Some(epoch),
                        wait: false,
                    };
                    if let Ok(hash) = client.directory().get_epoch(request).await {
                        let hash = hash.into_inner();
                        let seal_ms = if hash.sealed_at_ms > 0 && hash.committed_at_ms > 0 {
                            hash.committed_at_ms.saturating_sub(hash.sealed_at_ms) as f64
                        } else {
                            0.0
                        };
                        epochs
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(EpochStats {
                                epoch,
                                updates: hash.updates,
                                seal_ms,
                            });
                    }
                }
            }
            last = Some(root.epoch);
            commits
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((root.epoch, Instant::now()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Samples each server's CPU time and RSS from /proc once per second.
async fn watch_servers(
    servers: Vec<(String, i32)>,
    usage: Arc<Mutex<BTreeMap<String, ServerUsage>>>,
    stop: tokio_util::sync::CancellationToken,
) {
    let ticks = procfs::ticks_per_second() as f64;
    let page = procfs::page_size() as f64;
    let read = |pid: i32| -> Option<(f64, f64)> {
        let stat = procfs::process::Process::new(pid).ok()?.stat().ok()?;
        Some((
            (stat.utime + stat.stime) as f64 / ticks,
            stat.rss as f64 * page / (1024.0 * 1024.0),
        ))
    };
    let mut previous: BTreeMap<String, (f64, Instant)> = BTreeMap::new();
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    while !stop.is_cancelled() {
        for (name, pid) in &servers {
            let Some((cpu_seconds, rss_mib)) = read(*pid) else {
                continue;
            };
            let now = Instant::now();
            let mut usage = usage.lock().unwrap_or_else(|p| p.into_inner());
            let entry = usage.entry(name.clone()).or_default();
            entry.rss_max_mib = entry.rss_max_mib.max(rss_mib);
            if let Some((before, at)) = previous.insert(name.clone(), (cpu_seconds, now)) {
                let percent = (cpu_seconds - before) / now.duration_since(at).as_secs_f64() * 100.0;
                entry.samples += 1;
                entry.cpu_percent_max = entry.cpu_percent_max.max(percent);
                let sum = sums.entry(name.clone()).or_default();
                *sum += percent;
                entry.cpu_percent_mean = *sum / entry.samples as f64;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn print_progress(
    recorder: Arc<Mutex<Recorder>>,
    commits: Arc<Mutex<Vec<(u64, Instant)>>>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut last_count = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => { eprintln!(); return; }
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let (count, errors, p99) = {
            let recorder = recorder.lock().unwrap_or_else(|p| p.into_inner());
            let count: u64 = recorder.histograms.values().map(Histogram::len).sum();
            let errors: u64 = recorder
                .errors
                .values()
                .flat_map(|codes| codes.values())
                .sum();
            let p99 = recorder
                .histograms
                .values()
                .filter(|histogram| !histogram.is_empty())
                .map(|histogram| histogram.value_at_quantile(0.99) as f64 / 1e3)
                .fold(0.0, f64::max);
            (count, errors, p99)
        };
        let epoch = commits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .map_or(0, |(epoch, _)| *epoch);
        eprint!(
            "\r{:>8} ops/s   errors {errors:>6}   epoch {epoch:>6}   p99 {p99:>8.2} ms   ",
            count - last_count
        );
        last_count = count;
    }
}

/// Markdown summary of `report`.
pub fn markdown(report: &Report) -> String {
    let mut text = format!(
        "# ktd bench\n\nOffered {:.0} ops/s for {:.1} s: {:.0} ok ops/s, {:.0} updates/s acknowledged; \
         publish-to-inclusion p50 {:.0} ms, p99 {:.0} ms; lookup proof median {:.0} bytes; {} late starts.\n\n\
         | call | count | ok/s | p50 ms | p95 ms | p99 ms | p99.9 ms | errors |\n|---|---|---|---|---|---|---|---|\n",
        report.offered_rate,
        report.duration_seconds,
        report.ok_per_second,
        report.updates_per_second,
        report.inclusion_p50_ms,
        report.inclusion_p99_ms,
        report.lookup_proof_bytes_p50,
        report.late_starts,
    );
    for (name, call) in &report.calls {
        text.push_str(&format!(
            "| {name} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:?} |\n",
            call.count,
            call.ok_per_second,
            call.p50_ms,
            call.p95_ms,
            call.p99_ms,
            call.p999_ms,
            call.errors
        ));
    }
    if !report.epochs.is_empty() {
        text.push_str(&format!(
            "\nSeal latency (seal → committed root) over {} epochs: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms.\n",
            report.epochs.len(),
            report.seal_p50_ms,
            report.seal_p99_ms,
            report.seal_max_ms
        ));
    }
    if !report.servers.is_empty() {
        text.push_str("\n| server | CPU mean % | CPU max % | RSS max MiB |\n|---|---|---|---|\n");
        for (name, usage) in &report.servers {
            text.push_str(&format!(
                "| {name} | {:.0} | {:.0} | {:.0} |\n",
                usage.cpu_percent_mean, usage.cpu_percent_max, usage.rss_max_mib
            ));
        }
    }
    if let Some(comparison) = &report.compare_akd {
        text.push_str(&compare_akd::markdown(comparison));
    }
    if let Some(lag) = &report.auditor_lag {
        text.push_str(&format!(
            "\nAuditor: {} epochs signed, {} not yet; commit → signed p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; violations: {:?}\n",
            lag.epochs_signed, lag.epochs_unsigned, lag.p50_ms, lag.p99_ms, lag.max_ms, lag.violations
        ));
    }
    text.push_str(
        "\n| epoch | updates acknowledged by this run | updates in the epoch | seal ms |\n|---|---|---|---|\n",
    );
    for stats in &report.epochs {
        text.push_str(&format!(
            "| {} | {} | {} | {:.0} |\n",
            stats.epoch,
            report
                .updates_per_epoch
                .get(&stats.epoch)
                .copied()
                .unwrap_or(0),
            stats.updates,
            stats.seal_ms
        ));
    }
    text.push_str("\n![latency and throughput over time](timeline.svg)\n");
    text
}

/// Plots throughput and latency per second, with epoch commits marked, as SVG.
pub fn plot(timeline: &Timeline, path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (960, 810)).into_drawing_area();
    root.fill(&WHITE)?;
    let (upper, rest) = root.split_vertically(270);
    let (lower, bottom) = rest.split_vertically(270);
    let end = timeline.seconds.len().max(1) as f64;
    let max_ops = timeline
        .seconds
        .iter()
        .map(|s| s.1)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let max_ms = timeline.seconds.iter().map(|s| s.3).fold(1.0, f64::max);
    let mut ops = ChartBuilder::on(&upper)
        .caption("ok operations per second", ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(24)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..end, 0.0..max_ops * 1.1)?;
    ops.configure_mesh().x_desc("seconds").draw()?;
    ops.draw_series(LineSeries::new(
        timeline.seconds.iter().map(|s| (s.0, s.1 as f64)),
        &BLUE,
    ))?;
    let mut latency = ChartBuilder::on(&lower)
        .caption(
            "latency per second (mean, max), ms; epoch commits in grey",
            ("sans-serif", 16),
        )
        .margin(8)
        .x_label_area_size(24)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..end, 0.0..max_ms * 1.1)?;
    latency.configure_mesh().x_desc("seconds").draw()?;
    for (_, at) in &timeline.commits {
        latency.draw_series(LineSeries::new(
            [(*at, 0.0), (*at, max_ms * 1.1)],
            &RGBColor(200, 200, 200),
        ))?;
    }
    latency.draw_series(LineSeries::new(
        timeline.seconds.iter().map(|s| (s.0, s.2)),
        &GREEN,
    ))?;
    latency.draw_series(LineSeries::new(
        timeline.seconds.iter().map(|s| (s.0, s.3)),
        &RED,
    ))?;
    let max_seal = timeline.seals.iter().map(|s| s.1).fold(1.0, f64::max);
    let mut seals = ChartBuilder::on(&bottom)
        .caption(
            "seal latency per epoch (seal → committed root), ms, at its commit",
            ("sans-serif", 16),
        )
        .margin(8)
        .x_label_area_size(24)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..end, 0.0..max_seal * 1.1)?;
    seals.configure_mesh().x_desc("seconds").draw()?;
    for (at, ms) in &timeline.seals {
        seals.draw_series(LineSeries::new([(*at, 0.0), (*at, *ms)], &MAGENTA))?;
    }
    root.present()?;
    Ok(())
}

/// Compares `report` with `baseline`: fails if ok throughput fell, or any call's p99 rose, by
/// more than `tolerance` (a fraction).
pub fn compare(report: &Report, baseline: &Report, tolerance: f64) -> Vec<String> {
    let mut regressions = Vec::new();
    if report.ok_per_second < baseline.ok_per_second * (1.0 - tolerance) {
        regressions.push(format!(
            "throughput {:.0} ok ops/s < baseline {:.0}",
            report.ok_per_second, baseline.ok_per_second
        ));
    }
    for (name, call) in &report.calls {
        if let Some(before) = baseline.calls.get(name)
            && call.p99_ms > before.p99_ms * (1.0 + tolerance)
        {
            regressions.push(format!(
                "{name} p99 {:.2} ms > baseline {:.2} ms",
                call.p99_ms, before.p99_ms
            ));
        }
    }
    regressions
}

/// Writes `report.json`, `report.md` and `timeline.svg` into `dir`.
pub fn write_report(dir: &Path, report: &Report, timeline: &Timeline) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    std::fs::write(dir.join("report.md"), markdown(report))?;
    plot(timeline, &dir.join("timeline.svg"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixes_parse() {
        assert_eq!("90/10".parse::<Mix>().expect("mix").lookup, 90);
        let mix: Mix = "publish=1,lookup=8,history=1".parse().expect("mix");
        assert_eq!(
            (mix.publish, mix.lookup, mix.history, mix.audit),
            (1, 8, 1, 0)
        );
        assert!("publish=0".parse::<Mix>().is_err());
        assert!("reads=3".parse::<Mix>().is_err());
    }

    #[test]
    fn regressions_are_caught_and_noise_is_not() {
        let mut baseline = Report {
            ok_per_second: 1000.0,
            ..Report::default()
        };
        baseline.calls.insert(
            "lookup".into(),
            Latency {
                p99_ms: 10.0,
                ..Latency::default()
            },
        );
        let mut same = baseline.clone();
        same.ok_per_second = 950.0;
        assert!(compare(&same, &baseline, 0.1).is_empty());
        let mut slower = baseline.clone();
        slower.calls.get_mut("lookup").expect("lookup").p99_ms = 20.0;
        slower.ok_per_second = 500.0;
        assert_eq!(compare(&slower, &baseline, 0.1).len(), 2);
    }
}
