//! A multi-process cluster on loopback under a steady load: one `ktd sequencer` (fsync on),
//! `--shards` `ktd shard` servers holding 2^`--bits` partitions with `--replication-factor`
//! copies each, one gateway. It is preloaded with `--initial` users (epochs of
//! `--preload-epoch-size`), then runs a load: verified lookups of preloaded users at
//! `--lookup-rate` per second (open loop: each lookup's latency counts from its due time, so a
//! stall shows as latency), and an epoch of `--epoch-updates` updates (half new users, half
//! changed values) published and sealed every `--epoch-every` seconds.
//!
//! 1. **Baseline**, `--baseline-seconds`: lookup latency, seal latency (`SealEpoch` → committed
//!    root), and the CPU seconds of every process (from `/proc`), per update sealed.
//! 2. With `--add N`: N empty shard servers join (`ktd admin add-shard`, the balancer does the
//!    rest) while the load continues, until no copy has moved for 5 s. Reported: time from the
//!    join to the last move, each copy's MiB/s (the sequencer leader's `partition copied` log
//!    lines), MiB/s into each new server, and lookup and seal latency while copies moved beside
//!    the baseline's — the extra p99 is the difference, same run.
//!
//! 3. With `--backup`: `ktd admin backup` (full) while the load continues, a second, incremental
//!    one after `--backup-epochs` more epochs, `ktd admin verify-backup` of the chain; then the
//!    load stops, the cluster is terminated, a new one (same seed and shape, empty) is started
//!    and `ktd admin restore` rebuilds it. Reported: each step's seconds and MiB/s, the
//!    incremental backup's bytes beside the full one's, and the restored cluster's root at the
//!    backup's epoch against the original's (they must be equal).
//!
//! Without `--add` the run is the baseline alone: `--shards 8` against `--shards 1` with the same
//! workload is the capacity model's simulation (`docs/capacity.md`).
//!
//! Run: `./x.sh bench cluster --initial 1000000 --add 1`. Prints a human summary and one JSON
//! line (`{"bench":"cluster",...}`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use ktd_client::Client;
use ktd_core::vrf::VrfKey;
use ktd_testkit::net::free_addr;
use ktd_testkit::process::KtdNode;
use ktd_testkit::seed::write_vrf_seed;
use ktd_testkit::stats::quantile;
use serde_json::{Value, json};

#[path = "common/workload.rs"]
mod workload;
use workload::{batch, label, publish_all, wait_for_precompute};

const KTD: &str = env!("CARGO_BIN_EXE_ktd");
const SEED: [u8; 32] = [0x5e; 32];

#[derive(Debug, Parser)]
#[command(
    about = "ktd multi-process cluster: load, rebalance onto new shard servers, CPU per update"
)]
struct Args {
    /// Shard servers at the start.
    #[arg(long, default_value_t = 3)]
    shards: u64,
    /// Copies of each partition.
    #[arg(long, default_value_t = 3)]
    replication_factor: u32,
    /// Partition bits (2^bits partitions).
    #[arg(long, default_value_t = 4)]
    bits: u8,
    /// Users loaded before measuring.
    #[arg(long, default_value_t = 1_000_000)]
    initial: u64,
    /// Users per pre-load epoch.
    #[arg(long, default_value_t = 100_000)]
    preload_epoch_size: u64,
    /// Verified lookups per second during the measured phases (0: none).
    #[arg(long, default_value_t = 40.0)]
    lookup_rate: f64,
    /// Updates per epoch during the measured phases.
    #[arg(long, default_value_t = 5_000)]
    epoch_updates: u64,
    /// Seconds between seals during the measured phases.
    #[arg(long, default_value_t = 5.0)]
    epoch_every: f64,
    /// Seconds of the baseline phase.
    #[arg(long, default_value_t = 60)]
    baseline_seconds: u64,
    /// Empty shard servers added after the baseline (0: baseline only).
    #[arg(long, default_value_t = 0)]
    add: u64,
    /// Longest the rebalance may take, in seconds.
    #[arg(long, default_value_t = 1800)]
    rebalance_limit: u64,
    /// Back up under load, verify, and restore into a new cluster (see the module docs).
    #[arg(long)]
    backup: bool,
    /// Epochs between the full and the incremental backup.
    #[arg(long, default_value_t = 6)]
    backup_epochs: u64,
    /// With `--backup`: after the incremental backup, this many more epochs under load are
    /// archived in one `ktd admin archive` run, and the restore replays them
    /// (`--to-epoch`): archive MiB/s and replay epochs/s and updates/s are reported (0: off).
    #[arg(long, default_value_t = 0)]
    archive_epochs: u64,
    /// History retention window set after the pre-load (`ktd admin retention set-window`,
    /// e.g. `10e`; default: the cluster's, 30 days): the shard servers prune during the
    /// baseline, whose disk growth and CPU per update then include pruning.
    #[arg(long)]
    retention_window: Option<String>,
    /// Sample the shard servers' disk bytes and the committed epoch every this many seconds
    /// during the baseline (0: only before and after): the `disk_timeline` of a long run, where
    /// a retention window's plateau shows (growth in the second half vs the first).
    #[arg(long, default_value_t = 0)]
    disk_sample_seconds: u64,
    /// Keep the cluster's directory (data and logs) here instead of a temporary one.
    #[arg(long)]
    keep: Option<std::path::PathBuf>,
    // `cargo bench` passes `--bench`; accept and ignore it.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The processes of the cluster.
struct Cluster {
    root: std::path::PathBuf,
    seed_file: String,
    sequencer: KtdNode,
    shards: Vec<KtdNode>,
    gateway: KtdNode,
    bits: u8,
}

impl Cluster {
    fn shard(&self, index: u64) -> KtdNode {
        let addr = free_addr("127.0.0.1");
        let args = [
            "shard",
            "--id",
            &format!("s{index}"),
            "--listen",
            &addr,
            "--data-dir",
            &self
                .root
                .join(format!("shard-{index}"))
                .display()
                .to_string(),
            "--vrf-seed-file",
            &self.seed_file,
            "--partition-bits",
            &self.bits.to_string(),
            "--sequencers",
            &self.sequencer.addr,
        ]
        .map(String::from)
        .to_vec();
        KtdNode::new(
            KTD,
            &self.root,
            &format!("shard-{index}"),
            index,
            addr,
            args,
        )
    }

    fn start(root: &Path, args: &Args) -> Self {
        let seed_file = write_vrf_seed(root, &SEED);
        let sequencer_addr = free_addr("127.0.0.1");
        let sequencer = KtdNode::sequencer(
            KTD,
            root,
            1,
            sequencer_addr.clone(),
            &root.join("node-1"),
            &["--epoch-interval".to_string(), "1h".to_string()],
        );
        let gateway_addr = free_addr("127.0.0.1");
        let gateway = KtdNode::new(
            KTD,
            root,
            "gateway-1",
            1,
            gateway_addr.clone(),
            [
                "gateway",
                "--listen",
                &gateway_addr,
                "--sequencers",
                &sequencer_addr,
            ]
            .map(String::from)
            .to_vec(),
        );
        let mut cluster = Self {
            root: root.to_path_buf(),
            seed_file,
            sequencer,
            shards: Vec::new(),
            gateway,
            bits: args.bits,
        };
        for index in 1..=args.shards {
            let mut shard = cluster.shard(index);
            shard.spawn(&[]);
            cluster.shards.push(shard);
        }
        let map = cluster
            .shards
            .iter()
            .map(|shard| format!("s{}=http://{}", shard.id, shard.addr))
            .collect::<Vec<_>>()
            .join(",");
        let public_key = hex::encode(VrfKey::from_seed(&SEED).expect("seed").public_key());
        cluster.sequencer.spawn(
            &[
                "--id",
                "1",
                "--peers",
                &format!("1={sequencer_addr}"),
                "--init",
                "--vrf-public-key",
                &public_key,
                "--shards",
                &map,
                "--partition-bits",
                &args.bits.to_string(),
                "--replication-factor",
                &args.replication_factor.to_string(),
            ]
            .map(String::from),
        );
        cluster.gateway.spawn(&[]);
        cluster
    }

    /// Every process by name, with its pid.
    fn pids(&self) -> Vec<(String, u32)> {
        std::iter::once(&self.sequencer)
            .chain(&self.shards)
            .chain(std::iter::once(&self.gateway))
            .filter_map(|node| node.pid().map(|pid| (node.name.clone(), pid)))
            .collect()
    }

    /// `ktd admin status -o json` against the sequencer.
    async fn status(&self) -> Option<Value> {
        let output = tokio::process::Command::new(KTD)
            .args(["admin", "status", "-o", "json"])
            .env("KTD_SEQUENCERS", &self.sequencer.addr)
            .env("RUST_LOG", "off")
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(Duration::from_secs(20), output)
            .await
            .ok()?
            .ok()?;
        serde_json::from_slice(&output.stdout).ok()
    }

    /// Waits until epoch `until` has committed.
    async fn wait_committed(&self, until: u64) {
        while self
            .status()
            .await
            .and_then(|status| status["epochs"]["last_committed_epoch"].as_u64())
            .unwrap_or(0)
            < until
        {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// `ktd <args> -o json` against the sequencer, parsed; panics on failure.
    fn admin_json(&self, args: &[&str]) -> Value {
        let mut with_json = args.to_vec();
        with_json.extend(["-o", "json"]);
        serde_json::from_slice(&self.admin(&with_json)).expect("JSON")
    }

    /// `ktd <args>` against the sequencer; its stdout. Panics on failure.
    fn admin(&self, args: &[&str]) -> Vec<u8> {
        let output = std::process::Command::new(KTD)
            .args(args)
            .env("KTD_SEQUENCERS", &self.sequencer.addr)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run ktd admin");
        assert!(
            output.status.success(),
            "ktd {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output.stdout
    }
}

/// CPU seconds (user + system) of process `pid` so far.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command name (which may hold spaces) start at field 3.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return f64::NAN;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |index: usize| fields.get(index).and_then(|f| f.parse::<f64>().ok());
    // utime and stime are fields 14 and 15 (1-based), 12 and 13 here.
    match (ticks(11), ticks(12)) {
        (Some(user), Some(system)) => (user + system) / 100.0,
        _ => f64::NAN,
    }
}

fn cpu_snapshot(cluster: &Cluster) -> BTreeMap<String, f64> {
    let mut cpu: BTreeMap<String, f64> = cluster
        .pids()
        .into_iter()
        .map(|(name, pid)| (name, cpu_seconds(pid)))
        .collect();
    cpu.insert("bench".into(), cpu_seconds(std::process::id()));
    cpu
}

/// What the load saw: (time, latency ms) of each lookup and each seal, and failures.
#[derive(Default)]
struct Samples {
    lookups: Vec<(Instant, f64)>,
    lookup_errors: Vec<(Instant, String)>,
    seals: Vec<(Instant, f64, u64)>,
    late: u64,
}

/// Runs the lookups and the epochs until `stop`; `users` preloaded users to look up.
fn start_load(
    client: Client,
    args: &Args,
    users: u64,
    first_epoch: u64,
    samples: Arc<Mutex<Samples>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    use std::sync::atomic::Ordering;
    let mut tasks = Vec::new();
    if args.lookup_rate > 0.0 {
        let (client, samples, stop) = (client.clone(), samples.clone(), stop.clone());
        let rate = args.lookup_rate;
        tasks.push(tokio::spawn(async move {
            let permits = Arc::new(tokio::sync::Semaphore::new(64));
            let started = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let due = started + Duration::from_secs_f64(n as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                n += 1;
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    samples.lock().expect("lock").late += 1;
                    continue;
                };
                let id = rand::random::<u64>() % users;
                let (client, samples) = (client.clone(), samples.clone());
                tokio::spawn(async move {
                    let answer = client.lookup(&label(id), None).await;
                    let mut samples = samples.lock().expect("lock");
                    match answer {
                        Ok(_) => samples
                            .lookups
                            .push((due, due.elapsed().as_secs_f64() * 1e3)),
                        Err(error) => samples.lookup_errors.push((due, format!("{error:#}"))),
                    }
                    drop(permit);
                });
            }
        }));
    }
    let (epoch_updates, every) = (
        args.epoch_updates,
        Duration::from_secs_f64(args.epoch_every),
    );
    tasks.push(tokio::spawn(async move {
        let (mut epoch, mut next_new) = (first_epoch, users);
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            let half = epoch_updates / 2;
            publish_all(
                &client,
                batch(epoch + 1, next_new, half, epoch_updates - half),
            )
            .await;
            next_new += half;
            tokio::time::sleep_until((started + every).into()).await;
            let sealing = Instant::now();
            match client.seal().await {
                Ok(root) => {
                    epoch = root.epoch;
                    samples.lock().expect("lock").seals.push((
                        sealing,
                        sealing.elapsed().as_secs_f64() * 1e3,
                        epoch_updates,
                    ));
                }
                Err(error) => eprintln!("seal failed: {error:#}"),
            }
        }
    }));
    tasks
}

/// Lookup and seal figures of the samples taken in `[from, to)`.
fn phase(samples: &Samples, from: Instant, to: Instant) -> Value {
    let within = |at: &Instant| *at >= from && *at < to;
    let lookups: Vec<f64> = samples
        .lookups
        .iter()
        .filter(|(at, _)| within(at))
        .map(|(_, ms)| *ms)
        .collect();
    let errors = samples
        .lookup_errors
        .iter()
        .filter(|(at, _)| within(at))
        .count();
    let seals: Vec<f64> = samples
        .seals
        .iter()
        .filter(|(at, _, _)| within(at))
        .map(|(_, ms, _)| *ms)
        .collect();
    let updates: u64 = samples
        .seals
        .iter()
        .filter(|(at, _, _)| within(at))
        .map(|(_, _, updates)| updates)
        .sum();
    json!({
        "seconds": to.duration_since(from).as_secs_f64(),
        "lookups": lookups.len(),
        "lookup_errors": errors,
        "lookup_p50_ms": quantile(&lookups, 0.5),
        "lookup_p99_ms": quantile(&lookups, 0.99),
        "seals": seals.len(),
        "updates_sealed": updates,
        "seal_p50_ms": quantile(&seals, 0.5),
        "seal_max_ms": seals.iter().copied().fold(f64::NAN, f64::max),
    })
}

/// CPU seconds per process between two snapshots, and per update sealed in between.
fn cpu_phase(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, updates: u64) -> Value {
    let mut per_process = serde_json::Map::new();
    let mut shards = 0.0;
    for (name, end) in after {
        let used = end - before.get(name).copied().unwrap_or(0.0);
        if name.starts_with("shard-") {
            shards += used;
        }
        per_process.insert(name.clone(), json!(used));
    }
    json!({
        "cpu_seconds": per_process,
        "shard_cpu_seconds": shards,
        "shard_cpu_us_per_update": shards * 1e6 / updates.max(1) as f64,
    })
}

/// `line` without terminal colour sequences (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `partition copied` lines of the sequencer log: (server, bytes, seconds).
fn copies(log: &str) -> Vec<(String, u64, f64)> {
    log.lines()
        .filter(|line| line.contains("partition copied"))
        .map(strip_ansi)
        .filter_map(|line| {
            let field = |key: &str| {
                line.split_whitespace()
                    .find_map(|token| token.strip_prefix(&format!("{key}=")))
                    .map(|value| value.trim_matches('"').to_string())
            };
            Some((
                field("server")?,
                field("bytes")?.parse().ok()?,
                field("seconds")?.parse().ok()?,
            ))
        })
        .collect()
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(args));
}

async fn run(args: Args) {
    let temp = tempfile::tempdir().expect("temp dir");
    let root = match &args.keep {
        Some(dir) => {
            std::fs::create_dir_all(dir).expect("--keep directory");
            dir.clone()
        }
        None => temp.path().to_path_buf(),
    };
    let mut cluster = Cluster::start(&root, &args);
    let gateway = format!("http://{}", cluster.gateway.addr);
    let client = {
        let started = Instant::now();
        loop {
            if let Ok(client) = Client::connect(&gateway).await
                && client.epoch(None).await.is_ok()
            {
                break client;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the cluster did not start; logs under {}",
                root.display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let rf = u64::from(args.replication_factor).min(args.shards);

    // Pre-load.
    let started = Instant::now();
    let (mut users, mut epoch) = (0u64, 0u64);
    let mut preload_seals = Vec::new();
    while users < args.initial {
        let new = args.preload_epoch_size.min(args.initial - users);
        publish_all(&client, batch(epoch + 1, users, new, 0)).await;
        wait_for_precompute(&client, new * rf).await;
        let sealing = Instant::now();
        epoch = client.seal().await.expect("seal").epoch;
        preload_seals.push(sealing.elapsed().as_secs_f64());
        users += new;
        eprintln!(
            "pre-load: {users} users, epoch {epoch}, seal {:.2} s, {:.0} s",
            preload_seals.last().expect("pushed"),
            started.elapsed().as_secs_f64()
        );
    }
    let preload_seconds = started.elapsed().as_secs_f64();
    let shard_dirs = |servers: u64| -> u64 {
        (1..=servers)
            .map(|index| dir_bytes(&root.join(format!("shard-{index}"))))
            .sum()
    };
    if let Some(window) = &args.retention_window {
        let _ = cluster.admin(&["admin", "retention", "set-window", window]);
    }
    let disk_after_preload = shard_dirs(args.shards);

    // Baseline.
    let samples = Arc::new(Mutex::new(Samples::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks = start_load(
        client.clone(),
        &args,
        users,
        epoch,
        samples.clone(),
        stop.clone(),
    );
    let baseline_from = Instant::now();
    let cpu_before = cpu_snapshot(&cluster);
    let mut disk_timeline = Vec::new();
    if args.disk_sample_seconds > 0 {
        let end = baseline_from + Duration::from_secs(args.baseline_seconds);
        loop {
            let now = Instant::now();
            let epoch = cluster
                .status()
                .await
                .and_then(|status| status["epochs"]["last_committed_epoch"].as_u64());
            let bytes = shard_dirs(args.shards);
            disk_timeline.push(json!({
                "seconds": now.duration_since(baseline_from).as_secs_f64(),
                "epoch": epoch,
                "shard_disk_bytes": bytes,
            }));
            eprintln!(
                "disk: {:.0} s, epoch {epoch:?}, {:.1} MiB",
                now.duration_since(baseline_from).as_secs_f64(),
                bytes as f64 / f64::from(1 << 20)
            );
            if now >= end {
                break;
            }
            tokio::time::sleep(Duration::from_secs(args.disk_sample_seconds).min(end - now)).await;
        }
    } else {
        tokio::time::sleep(Duration::from_secs(args.baseline_seconds)).await;
    }
    let baseline_to = Instant::now();
    let cpu_after = cpu_snapshot(&cluster);
    let disk_after_baseline = shard_dirs(args.shards);
    let status = cluster.status().await.unwrap_or(Value::Null);
    let baseline = {
        let samples = samples.lock().expect("lock");
        let mut figures = phase(&samples, baseline_from, baseline_to);
        let updates = figures["updates_sealed"].as_u64().unwrap_or(0);
        figures["cpu"] = cpu_phase(&cpu_before, &cpu_after, updates);
        // What the sealed epochs added on disk (every copy), per update: history growth.
        figures["disk_bytes_added"] = json!(disk_after_baseline as i64 - disk_after_preload as i64);
        figures["disk_bytes_per_update_copy"] = json!(
            (disk_after_baseline as f64 - disk_after_preload as f64) / (updates.max(1) * rf) as f64
        );
        figures["safe_epoch"] =
            cluster.admin_json(&["admin", "retention", "show"])["safe_epoch"].clone();
        if let (Some(first), Some(last)) = (disk_timeline.first(), disk_timeline.last()) {
            // Growth over the second half of the run against the first: about 1 when disk
            // grows linearly, near 0 on a plateau.
            let middle = &disk_timeline[disk_timeline.len() / 2];
            let bytes = |sample: &Value| sample["shard_disk_bytes"].as_f64().unwrap_or(0.0);
            figures["disk_second_half_growth_ratio"] =
                json!((bytes(last) - bytes(middle)) / (bytes(middle) - bytes(first)).max(1.0));
            figures["disk_timeline"] = json!(disk_timeline);
        }
        figures["pruned_node_versions"] = json!(
            status["shards"]
                .as_array()
                .map(|servers| servers
                    .iter()
                    .filter_map(|server| server["pruned_node_versions"].as_u64())
                    .sum::<u64>())
                .unwrap_or(0)
        );
        figures
    };
    eprintln!("baseline: {baseline}");

    // Add capacity; the balancer moves copies until none has moved for 5 s.
    let mut rebalance = Value::Null;
    if args.add > 0 {
        let added_at = Instant::now();
        let cpu_before = cpu_snapshot(&cluster);
        let mut new_ids = Vec::new();
        for index in args.shards + 1..=args.shards + args.add {
            let mut shard = cluster.shard(index);
            shard.spawn(&[]);
            let address = format!("http://{}", shard.addr);
            cluster.shards.push(shard);
            let id = format!("s{index}");
            let _ = cluster.admin(&["admin", "add-shard", "--id", &id, "--address", &address]);
            new_ids.push(id);
        }
        let (mut last_move, mut seen_move) = (added_at, false);
        loop {
            assert!(
                added_at.elapsed() < Duration::from_secs(args.rebalance_limit),
                "no balance within {} s; logs under {}",
                args.rebalance_limit,
                root.display()
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
            let Some(status) = cluster.status().await else {
                continue;
            };
            let moving = status["moves"].as_array().is_some_and(|m| !m.is_empty())
                || status["shards"].as_array().is_some_and(|rows| {
                    rows.iter()
                        .any(|row| row["learner_of"].as_array().is_some_and(|l| !l.is_empty()))
                });
            if moving {
                (last_move, seen_move) = (Instant::now(), true);
            } else if seen_move && last_move.elapsed() > Duration::from_secs(5) {
                break;
            }
        }
        let cpu_after = cpu_snapshot(&cluster);
        let status = cluster.status().await.unwrap_or(Value::Null);
        let copied = copies(&cluster.sequencer.log_text());
        let mut destinations = serde_json::Map::new();
        for id in &new_ids {
            let into: Vec<&(String, u64, f64)> = copied
                .iter()
                .filter(|(server, _, _)| server == id)
                .collect();
            let bytes: u64 = into.iter().map(|(_, bytes, _)| bytes).sum();
            let seconds: f64 = into.iter().map(|(_, _, seconds)| seconds).sum();
            let voter_of = status["shards"]
                .as_array()
                .and_then(|rows| rows.iter().find(|row| row["id"] == id.as_str()))
                .and_then(|row| row["voter_of"].as_array().map(Vec::len));
            destinations.insert(
                id.clone(),
                json!({
                    "copies": into.len(),
                    "bytes": bytes,
                    "copy_seconds": seconds,
                    "mib_per_second_while_copying": bytes as f64 / (1 << 20) as f64 / seconds.max(1e-9),
                    "mib_per_second_wall": bytes as f64 / (1 << 20) as f64
                        / last_move.duration_since(added_at).as_secs_f64(),
                    "voter_of": voter_of,
                }),
            );
        }
        let per_copy: Vec<f64> = copied
            .iter()
            .map(|(_, bytes, seconds)| *bytes as f64 / (1 << 20) as f64 / seconds.max(1e-9))
            .collect();
        let during = {
            let samples = samples.lock().expect("lock");
            let mut figures = phase(&samples, added_at, last_move);
            let updates = figures["updates_sealed"].as_u64().unwrap_or(0);
            figures["cpu"] = cpu_phase(&cpu_before, &cpu_after, updates);
            figures
        };
        rebalance = json!({
            "added": new_ids,
            "seconds_to_balance": last_move.duration_since(added_at).as_secs_f64(),
            "copies": copied.len(),
            "bytes_copied": copied.iter().map(|(_, bytes, _)| bytes).sum::<u64>(),
            "copy_mib_per_second_p50": quantile(&per_copy, 0.5),
            "copy_mib_per_second_min": per_copy.iter().copied().fold(f64::NAN, f64::min),
            "destinations": destinations,
            "during": during,
            "extra_lookup_p99_ms": during["lookup_p99_ms"].as_f64().unwrap_or(f64::NAN)
                - baseline["lookup_p99_ms"].as_f64().unwrap_or(f64::NAN),
            "extra_seal_p50_ms": during["seal_p50_ms"].as_f64().unwrap_or(f64::NAN)
                - baseline["seal_p50_ms"].as_f64().unwrap_or(f64::NAN),
            "extra_seal_max_ms": during["seal_max_ms"].as_f64().unwrap_or(f64::NAN)
                - baseline["seal_max_ms"].as_f64().unwrap_or(f64::NAN),
        });
        eprintln!("rebalance: {rebalance}");
    }
    // Back up under load, verify, restore into a new cluster.
    let mut backup = Value::Null;
    let backup_dir = root.join("backup");
    if args.backup {
        let dir = backup_dir.display().to_string();
        let full = cluster.admin_json(&["admin", "backup", "--to", &dir]);
        eprintln!("full backup: {full}");
        let first = full["epoch"].as_u64().expect("epoch");
        let until = first + args.backup_epochs;
        cluster.wait_committed(until).await;
        let incremental = cluster.admin_json(&["admin", "backup", "--to", &dir]);
        eprintln!("incremental backup: {incremental}");
        backup = json!({"full": full, "incremental": incremental});
        if args.archive_epochs > 0 {
            // As a timer runs it: a first run right after the backup archives what is committed
            // already and pins the batches after it (sequencers release a batch once it is
            // committed and no pin holds it); the measured run archives the next epochs.
            let started = cluster.admin_json(&["admin", "archive", "--to", &dir]);
            eprintln!("archive (first run, pins): {started}");
            let until = started["last_epoch"]
                .as_u64()
                .filter(|last| *last > 0)
                .unwrap_or_else(|| incremental["epoch"].as_u64().expect("epoch"))
                + args.archive_epochs;
            cluster.wait_committed(until).await;
            let archived = cluster.admin_json(&[
                "admin",
                "archive",
                "--to",
                &dir,
                "--until-epoch",
                &until.to_string(),
                "--release",
            ]);
            eprintln!("archive: {archived}");
            backup["archive"] = archived;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    let late = samples.lock().expect("lock").late;
    let disk = shard_dirs(args.shards + args.add);
    if args.backup {
        let dir = backup_dir.display().to_string();
        let verified = cluster.admin_json(&["admin", "verify-backup", "--from", &dir]);
        eprintln!("verify: {verified}");
        // The epoch the restore ends at: the archive's newest, or the backup's.
        let to_epoch = backup["archive"]["last_epoch"].as_u64();
        let epoch = to_epoch.unwrap_or_else(|| verified["epoch"].as_u64().expect("epoch"));
        let root_hash = client.epoch(Some(epoch)).await.expect("root").root_hash;
        for node in std::iter::once(&mut cluster.gateway)
            .chain(std::iter::once(&mut cluster.sequencer))
            .chain(cluster.shards.iter_mut())
        {
            node.terminate(Duration::from_secs(20));
        }
        let new_root = root.join("restored");
        std::fs::create_dir_all(&new_root).expect("restored dir");
        let restored = Cluster::start(&new_root, &args);
        let started = Instant::now();
        while restored
            .status()
            .await
            .and_then(|status| status["leader_id"].as_u64())
            .unwrap_or(0)
            == 0
        {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the new cluster did not start"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let to_epoch_text = to_epoch.map(|epoch| epoch.to_string());
        let mut restore_args = vec!["admin", "restore", "--from", &dir, "--timeout", "2h"];
        if let Some(to_epoch) = &to_epoch_text {
            restore_args.extend(["--to-epoch", to_epoch.as_str()]);
        }
        let report = restored.admin_json(&restore_args);
        eprintln!("restore: {report}");
        let gateway = format!("http://{}", restored.gateway.addr);
        let client = Client::connect(&gateway).await.expect("connect");
        let restored_root = client
            .epoch(Some(epoch))
            .await
            .expect("restored root")
            .root_hash;
        assert_eq!(restored_root, root_hash, "the restored root differs");
        let chain = verified["bytes"].as_f64().unwrap_or(0.0);
        let mib = |bytes: f64, seconds: f64| bytes / f64::from(1 << 20) / seconds.max(1e-9);
        backup["verify"] = verified.clone();
        backup["restore"] = report.clone();
        backup["chain_bytes"] = json!(chain);
        backup["full_mib_per_second"] = json!(mib(
            backup["full"]["bytes_written"].as_f64().unwrap_or(0.0),
            backup["full"]["seconds"].as_f64().unwrap_or(0.0)
        ));
        backup["verify_mib_per_second"] =
            json!(mib(chain, verified["seconds"].as_f64().unwrap_or(0.0)));
        backup["restore_mib_per_second"] =
            json!(mib(chain, report["seconds"].as_f64().unwrap_or(0.0)));
        backup["restored_root_equal"] = json!(true);
        if !backup["archive"].is_null() {
            let archive = backup["archive"].clone();
            let epochs = report["replayed_epochs"].as_f64().unwrap_or(0.0);
            let replay_seconds = report["replay_seconds"].as_f64().unwrap_or(0.0);
            backup["archive_mib_per_second"] = json!(mib(
                archive["bytes_written"].as_f64().unwrap_or(0.0),
                archive["seconds"].as_f64().unwrap_or(0.0)
            ));
            backup["replay_epochs_per_second"] = json!(epochs / replay_seconds.max(1e-9));
            backup["replay_updates_per_second"] =
                json!(epochs * args.epoch_updates as f64 / replay_seconds.max(1e-9));
            println!(
                "archive: {} epochs, {:.1} MiB in {:.2} s ({:.1} MiB/s); restore --to-epoch {epoch}: {} epochs replayed in {:.1} s ({:.2} epochs/s, ~{:.0} updates/s), root equal",
                archive["epochs_written"],
                archive["bytes_written"].as_f64().unwrap_or(0.0) / f64::from(1 << 20),
                archive["seconds"].as_f64().unwrap_or(0.0),
                backup["archive_mib_per_second"].as_f64().unwrap_or(0.0),
                report["replayed_epochs"],
                replay_seconds,
                backup["replay_epochs_per_second"].as_f64().unwrap_or(0.0),
                backup["replay_updates_per_second"].as_f64().unwrap_or(0.0),
            );
        }
        println!(
            "backup: full {:.0} MiB in {:.1} s ({:.1} MiB/s) at epoch {}; incremental {:.1} MiB in {:.1} s after {} epochs; verify {:.1} s ({:.1} MiB/s); restore into a new cluster {:.1} s ({:.1} MiB/s of backup), {} replicas, root equal",
            backup["full"]["bytes_written"].as_f64().unwrap_or(0.0) / f64::from(1 << 20),
            backup["full"]["seconds"].as_f64().unwrap_or(0.0),
            backup["full_mib_per_second"].as_f64().unwrap_or(0.0),
            backup["full"]["epoch"],
            backup["incremental"]["bytes_written"]
                .as_f64()
                .unwrap_or(0.0)
                / f64::from(1 << 20),
            backup["incremental"]["seconds"].as_f64().unwrap_or(0.0),
            args.backup_epochs,
            verified["seconds"].as_f64().unwrap_or(0.0),
            backup["verify_mib_per_second"].as_f64().unwrap_or(0.0),
            report["seconds"].as_f64().unwrap_or(0.0),
            backup["restore_mib_per_second"].as_f64().unwrap_or(0.0),
            report["replicas"],
        );
        cluster = restored;
    }

    println!(
        "cluster: {} shard servers, RF {}, {} partitions, {} users (pre-load {:.0} s)",
        args.shards,
        rf,
        1u32 << args.bits,
        users,
        preload_seconds
    );
    let line = |name: &str, figures: &Value| {
        println!(
            "{name}: lookups {} ({} errors) p50 {:.1} ms p99 {:.1} ms; seals {} p50 {:.0} ms max {:.0} ms; shard CPU {:.1} µs/update",
            figures["lookups"],
            figures["lookup_errors"],
            figures["lookup_p50_ms"].as_f64().unwrap_or(f64::NAN),
            figures["lookup_p99_ms"].as_f64().unwrap_or(f64::NAN),
            figures["seals"],
            figures["seal_p50_ms"].as_f64().unwrap_or(f64::NAN),
            figures["seal_max_ms"].as_f64().unwrap_or(f64::NAN),
            figures["cpu"]["shard_cpu_us_per_update"]
                .as_f64()
                .unwrap_or(f64::NAN),
        );
    };
    line("baseline", &baseline);
    if !rebalance.is_null() {
        line("during moves", &rebalance["during"]);
        println!(
            "rebalance: {:.1} s to balance, {} copies, {:.0} MiB, per copy p50 {:.1} MiB/s; extra lookup p99 {:+.1} ms, extra seal p50 {:+.0} ms",
            rebalance["seconds_to_balance"].as_f64().unwrap_or(f64::NAN),
            rebalance["copies"],
            rebalance["bytes_copied"].as_f64().unwrap_or(f64::NAN) / (1 << 20) as f64,
            rebalance["copy_mib_per_second_p50"]
                .as_f64()
                .unwrap_or(f64::NAN),
            rebalance["extra_lookup_p99_ms"]
                .as_f64()
                .unwrap_or(f64::NAN),
            rebalance["extra_seal_p50_ms"].as_f64().unwrap_or(f64::NAN),
        );
    }
    let report = json!({
        "bench": "cluster",
        "shards": args.shards,
        "replication_factor": rf,
        "partitions": 1u32 << args.bits,
        "users": users,
        "preload_seconds": preload_seconds,
        "preload_seal_seconds": preload_seals,
        "lookup_rate": args.lookup_rate,
        "late_lookups": late,
        "epoch_updates": args.epoch_updates,
        "epoch_every_seconds": args.epoch_every,
        "retention_window": args.retention_window,
        "baseline": baseline,
        "rebalance": rebalance,
        "backup": backup,
        "shard_disk_bytes_after_preload": disk_after_preload,
        "shard_disk_bytes": disk,
    });
    println!("{report}");
    for node in std::iter::once(&mut cluster.gateway)
        .chain(std::iter::once(&mut cluster.sequencer))
        .chain(cluster.shards.iter_mut())
    {
        node.terminate(Duration::from_secs(20));
    }
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_bytes(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}
