//! ktd's in-process directory against stock `akd::Directory`, same workload, same run.
//!
//! Workload: an initial tree of `--initial` users (loaded in batches of `--epoch-size`), then
//! `--epochs` measured epochs of `--epoch-size` updates, half new users and half value changes.
//! Every system runs in its own child process, so peak RSS is its own: akd (in-memory storage,
//! 2 worker threads), then ktd at each `--bits` (RocksDB in a temp dir; the measured epochs run
//! in a fresh process that reopens the loaded directory, so its peak RSS is the epoch's).
//!
//! ```sh
//! ./x.sh bench directory_vs_akd --initial 1000000 --epoch-size 100000 --epochs 3 --bits 0,4
//! ```
//!
//! Prints a Markdown table (medians over the measured epochs, µs per update) and writes the raw
//! figures as JSON (`--out`, default `bench-results/directory_vs_akd.json`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use akd::append_only_zks::AzksParallelismConfig;
use akd::storage::StorageManager;
use akd::storage::memory::AsyncInMemoryDatabase;
use akd_core::configuration::WhatsAppV1Configuration;
use akd_core::{AkdLabel, AkdValue, VersionFreshness};
use ktd_core::AkdConfig;
use ktd_core::vrf::VrfKey;
use ktd_testkit::stats::{midpoint_median, quantile};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use shard::lookup_proofs::LookupProofs;
use shard::{Directory, DirectoryOptions};

const SEED: u64 = 2026;
const LOOKUPS: usize = 500;

#[derive(Clone, Debug)]
struct Args {
    initial: u64,
    epoch_size: u64,
    epochs: u64,
    bits: Vec<u8>,
    skip_akd: bool,
    lookup_proofs: LookupProofs,
    out: PathBuf,
    child: Option<String>,
    dir: Option<PathBuf>,
}

fn parse_args() -> Args {
    let mut args = Args {
        initial: 1_000_000,
        epoch_size: 100_000,
        epochs: 3,
        bits: vec![0, 4],
        skip_akd: false,
        lookup_proofs: LookupProofs::default(),
        out: Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench-results/directory_vs_akd.json"),
        child: None,
        dir: None,
    };
    let mut iter = std::env::args().skip(1);
    while let Some(flag) = iter.next() {
        let mut value = || {
            iter.next()
                .unwrap_or_else(|| panic!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--initial" => args.initial = value().parse().expect("--initial N"),
            "--epoch-size" => args.epoch_size = value().parse().expect("--epoch-size N"),
            "--epochs" => args.epochs = value().parse().expect("--epochs N"),
            "--bits" => {
                args.bits = value()
                    .split(',')
                    .map(|bits| bits.parse().expect("--bits a,b"))
                    .collect()
            }
            "--skip-akd" => args.skip_akd = true,
            "--lookup-proofs" => {
                args.lookup_proofs = value().parse().expect("--lookup-proofs eager|lazy|off")
            }
            "--out" => args.out = PathBuf::from(value()),
            "--child" => args.child = Some(value()),
            "--dir" => args.dir = Some(PathBuf::from(value())),
            "--bench" => {}
            other => panic!("unknown flag {other}"),
        }
    }
    args
}

/// One publish batch.
type Batch = Vec<(AkdLabel, AkdValue)>;

/// The value of user `id` at `version` (deterministic, 32 bytes like a public key).
fn value(id: u64, version: u64) -> AkdValue {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&SEED.to_be_bytes());
    hasher.update(&id.to_be_bytes());
    hasher.update(&version.to_be_bytes());
    AkdValue(hasher.finalize().as_bytes().to_vec())
}

fn label(id: u64) -> AkdLabel {
    AkdLabel(format!("user-{id:010}").into_bytes())
}

/// Batches: the initial load, then the measured epochs (half new, half changed users).
fn batches(args: &Args) -> (Vec<Batch>, Vec<Batch>) {
    let mut load = Vec::new();
    let mut start = 0;
    while start < args.initial {
        let end = (start + args.epoch_size).min(args.initial);
        load.push((start..end).map(|id| (label(id), value(id, 1))).collect());
        start = end;
    }
    let mut rng = StdRng::seed_from_u64(SEED);
    let mut next_id = args.initial;
    let mut measured = Vec::new();
    for epoch in 0..args.epochs {
        let mut batch = Vec::with_capacity(args.epoch_size as usize);
        let mut changed = std::collections::HashSet::new();
        while (changed.len() as u64) < args.epoch_size / 2 {
            let id = rng.random_range(0..args.initial);
            if changed.insert(id) {
                batch.push((label(id), value(id, 2 + epoch)));
            }
        }
        for _ in 0..args.epoch_size - args.epoch_size / 2 {
            batch.push((label(next_id), value(next_id, 1)));
            next_id += 1;
        }
        measured.push(batch);
    }
    (load, measured)
}

fn lookup_labels(args: &Args) -> Vec<AkdLabel> {
    let mut rng = StdRng::seed_from_u64(SEED + 1);
    (0..LOOKUPS)
        .map(|_| label(rng.random_range(0..args.initial)))
        .collect()
}

fn vrf_seed() -> [u8; 32] {
    *blake3::hash(b"ktd benchmark vrf seed").as_bytes()
}

fn peak_rss_bytes() -> u64 {
    ktd_testkit::process::peak_rss_bytes(None).unwrap_or(0)
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

/// Child: stock akd, whole workload.
fn run_akd(args: &Args) -> Value {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let vrf = VrfKey::from_seed(&vrf_seed()).expect("seed");
    let directory = runtime
        .block_on(akd::Directory::<WhatsAppV1Configuration, _, _>::new(
            StorageManager::new_no_cache(AsyncInMemoryDatabase::new()),
            vrf,
            AzksParallelismConfig::default(),
        ))
        .expect("akd");
    let (load, measured) = batches(args);
    let started = Instant::now();
    for batch in load {
        runtime
            .block_on(directory.publish(batch))
            .expect("akd load");
    }
    let load_seconds = started.elapsed().as_secs_f64();
    let mut epochs = Vec::new();
    let mut root = None;
    for batch in measured {
        let updates = batch.len();
        let started = Instant::now();
        let epoch_hash = runtime
            .block_on(directory.publish(batch))
            .expect("akd publish");
        let seconds = started.elapsed().as_secs_f64();
        root = Some(hex(&epoch_hash.hash()));
        epochs.push(json!({ "updates": updates, "seconds": seconds, "us_per_update": seconds * 1e6 / updates as f64 }));
    }
    let mut lookup_us = Vec::new();
    for akd_label in lookup_labels(args) {
        let started = Instant::now();
        runtime
            .block_on(directory.lookup(akd_label))
            .expect("akd lookup");
        lookup_us.push(micros(started.elapsed()));
    }
    json!({
        "system": "akd",
        "load_seconds": load_seconds,
        "epochs": epochs,
        "lookup_us_median": midpoint_median(&lookup_us),
        "lookup_us_p99": quantile(&lookup_us, 0.99),
        "final_root": root,
        "peak_rss_bytes": peak_rss_bytes(),
    })
}

fn open_ktd(args: &Args, dir: &Path, bits: u8) -> Directory {
    let options = DirectoryOptions {
        config: AkdConfig::WhatsAppV1,
        partition_bits: bits,
        lookup_proofs: args.lookup_proofs,
        ..DirectoryOptions::default()
    };
    Directory::open(dir, options, &vrf_seed()).expect("open ktd")
}

/// Child: load the initial tree into `dir`.
fn run_ktd_load(args: &Args, bits: u8, dir: &Path) -> Value {
    // The load stores no lookup proofs, so the first lookup pass measures proving them.
    let load_args = Args {
        lookup_proofs: LookupProofs::Off,
        ..args.clone()
    };
    let directory = open_ktd(&load_args, dir, bits);
    let (load, _) = batches(args);
    let started = Instant::now();
    for batch in load {
        directory.publish(batch).expect("ktd load");
    }
    json!({ "load_seconds": started.elapsed().as_secs_f64(), "load_peak_rss_bytes": peak_rss_bytes() })
}

/// Child: reopen the loaded directory and run the measured epochs and lookups.
fn run_ktd_epochs(args: &Args, bits: u8, dir: &Path) -> Value {
    let directory = open_ktd(args, dir, bits);
    let (_, measured) = batches(args);
    let mut epochs = Vec::new();
    let mut root = None;
    for batch in measured {
        let updates = batch.len() as f64;
        let started = Instant::now();
        let (epoch_hash, stats) = directory.publish_with_stats(batch).expect("ktd publish");
        let seconds = started.elapsed().as_secs_f64();
        root = Some(hex(&epoch_hash.root_hash));
        let per = |duration: Duration| micros(duration) / updates;
        epochs.push(json!({
            "updates": stats.updates,
            "leaves": stats.leaves,
            "nodes_written": stats.nodes_written,
            "seconds": seconds,
            "us_per_update": seconds * 1e6 / updates,
            "vrf_us": per(stats.vrf),
            "tree_us": per(stats.tree),
            "node_reads_us_thread_sum": per(stats.node_reads),
            "read_users_us": per(stats.read_users),
            "write_nodes_us": per(stats.write_nodes),
            "commit_us": per(stats.commit),
            "node_reads_per_update_by_label_len": reads_by_level(&stats.reads_by_label_len, updates),
        }));
    }
    // First pass: the loaded versions have no stored lookup proofs (the load ran in another
    // process, whose background filler stopped with it), so each lookup proves and stores them;
    // the second pass reads them (no ECVRF work).
    // Eager mode: wait for the background filler to store the measured epochs' lookup proofs,
    // so it does not compete with the timed lookups (its drain time is its throughput).
    let started = Instant::now();
    let drained = directory.flush_lookup_proofs();
    let filler_drain_seconds = drained.then(|| started.elapsed().as_secs_f64());
    let mut lookup_us = Vec::new();
    let mut lookup_stored_us = Vec::new();
    for pass in [&mut lookup_us, &mut lookup_stored_us] {
        for akd_label in lookup_labels(args) {
            let started = Instant::now();
            directory.lookup(&akd_label, None).expect("ktd lookup");
            pass.push(micros(started.elapsed()));
        }
    }
    directory.store().flush().expect("flush");
    json!({
        "epochs": epochs,
        "lookup_us_median": midpoint_median(&lookup_us),
        "lookup_us_p99": quantile(&lookup_us, 0.99),
        "lookup_stored_us_median": midpoint_median(&lookup_stored_us),
        "lookup_stored_us_p99": quantile(&lookup_stored_us, 0.99),
        "lookup_proofs": args.lookup_proofs.to_string(),
        "filler_drain_seconds": filler_drain_seconds,
        "final_root": root,
        "peak_rss_bytes": peak_rss_bytes(),
        "sst_bytes": directory.store().sst_bytes().expect("sst bytes"),
    })
}

/// Node reads per update in bands of 8 label bits (`"0-7"`, `"8-15"`, …), bands with reads only.
fn reads_by_level(by_label_len: &[u64], updates: f64) -> Value {
    Value::Object(
        ktd_testkit::stats::per_band(by_label_len, 8, updates)
            .into_iter()
            .map(|(band, reads)| (band, json!(reads)))
            .collect(),
    )
}

/// Child: the VRF floor — ECVRF evaluations on the rayon pool, best of three runs (a floor is a
/// lower bound, so the least disturbed run is the right one).
fn run_vrf_floor() -> Value {
    use rayon::prelude::*;
    let vrf = VrfKey::from_seed(&vrf_seed()).expect("seed");
    let n = 20_000u64;
    let mut runs = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        (0..n).into_par_iter().for_each(|id| {
            std::hint::black_box(vrf.node_label::<WhatsAppV1Configuration>(
                &label(id),
                VersionFreshness::Fresh,
                1,
            ));
        });
        runs.push(micros(started.elapsed()) / n as f64);
    }
    let wall_us = runs.iter().copied().fold(f64::INFINITY, f64::min);
    json!({ "vrf_eval_us_wall_parallel": wall_us, "runs": runs, "threads": rayon::current_num_threads() })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn child(args: &Args, role: &str, bits: Option<u8>, dir: Option<&Path>) -> Value {
    let mut command = Command::new(std::env::current_exe().expect("current exe"));
    command
        .arg("--initial")
        .arg(args.initial.to_string())
        .arg("--epoch-size")
        .arg(args.epoch_size.to_string())
        .arg("--epochs")
        .arg(args.epochs.to_string())
        .arg("--lookup-proofs")
        .arg(args.lookup_proofs.to_string())
        .arg("--child")
        .arg(role);
    if let Some(bits) = bits {
        command.arg("--bits").arg(bits.to_string());
    }
    if let Some(dir) = dir {
        command.arg("--dir").arg(dir);
    }
    let output = command.output().expect("run child");
    assert!(
        output.status.success(),
        "child {role} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|line| line.starts_with('{'))
        .expect("child prints JSON");
    serde_json::from_str(line).expect("child JSON")
}

fn epoch_median(result: &Value, field: &str) -> f64 {
    let values: Vec<f64> = result["epochs"]
        .as_array()
        .map(|epochs| {
            epochs
                .iter()
                .filter_map(|epoch| epoch[field].as_f64())
                .collect()
        })
        .unwrap_or_default();
    midpoint_median(&values)
}

fn main() {
    let args = parse_args();
    if let Some(role) = args.child.clone() {
        let bits = args.bits.first().copied().unwrap_or(0);
        let result = match role.as_str() {
            "akd" => run_akd(&args),
            "ktd-load" => run_ktd_load(&args, bits, args.dir.as_deref().expect("--dir")),
            "ktd-epochs" => run_ktd_epochs(&args, bits, args.dir.as_deref().expect("--dir")),
            "vrf" => run_vrf_floor(),
            other => panic!("unknown child role {other}"),
        };
        println!("{result}");
        return;
    }

    eprintln!(
        "workload: {} initial users (batches of {}), then {} epochs of {} updates (half new, half changed)",
        args.initial, args.epoch_size, args.epochs, args.epoch_size
    );
    let vrf = child(&args, "vrf", None, None);
    eprintln!("vrf floor: {vrf}");
    let akd = (!args.skip_akd).then(|| {
        eprintln!("running stock akd ...");
        let result = child(&args, "akd", None, None);
        eprintln!("akd: {result}");
        result
    });
    let mut ktd = Vec::new();
    for &bits in &args.bits {
        let dir = tempfile::tempdir().expect("temp dir");
        eprintln!("running ktd k={bits}: load ...");
        let load = child(&args, "ktd-load", Some(bits), Some(dir.path()));
        eprintln!("running ktd k={bits}: measured epochs ...");
        let epochs = child(&args, "ktd-epochs", Some(bits), Some(dir.path()));
        eprintln!("ktd k={bits}: {load} {epochs}");
        ktd.push((bits, load, epochs));
    }

    // Summary table.
    let vrf_floor = vrf["vrf_eval_us_wall_parallel"]
        .as_f64()
        .unwrap_or(f64::NAN);
    let akd_us = akd.as_ref().map(|akd| epoch_median(akd, "us_per_update"));
    println!();
    println!(
        "| system | µs/update (median) | VRF | tree (of which node reads, thread-sum) | storage (user reads + node writes + commit) | tree+storage | lookup gen median / p99 | lookup gen, stored proofs | peak RSS (epochs) | load time |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    if let Some(akd) = &akd {
        println!(
            "| akd 0.13 (in-memory) | {:.1} | – | – | – | – | {:.0} / {:.0} µs | – | {:.2} GiB | {:.1} s |",
            akd_us.unwrap_or(f64::NAN),
            akd["lookup_us_median"].as_f64().unwrap_or(f64::NAN),
            akd["lookup_us_p99"].as_f64().unwrap_or(f64::NAN),
            akd["peak_rss_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 30) as f64,
            akd["load_seconds"].as_f64().unwrap_or(f64::NAN),
        );
    }
    for (bits, load, epochs) in &ktd {
        let storage = epoch_median(epochs, "read_users_us")
            + epoch_median(epochs, "write_nodes_us")
            + epoch_median(epochs, "commit_us");
        let tree = epoch_median(epochs, "tree_us");
        println!(
            "| ktd k={bits} (RocksDB, lookup proofs {}) | {:.1} | {:.1} | {:.1} ({:.1}) | {:.1} | {:.1} | {:.0} / {:.0} µs | {:.0} / {:.0} µs | {:.2} GiB | {:.1} s |",
            args.lookup_proofs,
            epoch_median(epochs, "us_per_update"),
            epoch_median(epochs, "vrf_us"),
            tree,
            epoch_median(epochs, "node_reads_us_thread_sum"),
            storage,
            tree + storage,
            epochs["lookup_us_median"].as_f64().unwrap_or(f64::NAN),
            epochs["lookup_us_p99"].as_f64().unwrap_or(f64::NAN),
            epochs["lookup_stored_us_median"]
                .as_f64()
                .unwrap_or(f64::NAN),
            epochs["lookup_stored_us_p99"].as_f64().unwrap_or(f64::NAN),
            epochs["peak_rss_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 30) as f64,
            load["load_seconds"].as_f64().unwrap_or(f64::NAN),
        );
    }
    println!();
    println!(
        "VRF floor: {vrf_floor:.1} µs per evaluation (wall, all threads); a half-new batch needs 1.5 evaluations per update = {:.1} µs/update",
        vrf_floor * 1.5
    );
    if let Some(akd_us) = akd_us {
        for (bits, _, epochs) in &ktd {
            let ours = epoch_median(epochs, "us_per_update");
            let tree_storage = ours - epoch_median(epochs, "vrf_us");
            println!(
                "k={bits}: throughput ktd/akd = {:.2}x; (tree+storage)/akd = 1/{:.1}; ktd/VRF floor = {:.2}x",
                akd_us / ours,
                akd_us / tree_storage,
                ours / (vrf_floor * 1.5)
            );
        }
        if let (Some(akd), Some((_, _, first))) = (&akd, ktd.first()) {
            println!(
                "final roots equal: {}",
                akd["final_root"] == first["final_root"]
            );
        }
    }

    let report = json!({
        "args": { "initial": args.initial, "epoch_size": args.epoch_size, "epochs": args.epochs, "bits": args.bits },
        "machine": { "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0) },
        "vrf": vrf,
        "akd": akd,
        "ktd": ktd.iter().map(|(bits, load, epochs)| json!({ "bits": bits, "load": load, "epochs": epochs })).collect::<Vec<_>>(),
    });
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent).expect("create output dir");
    }
    std::fs::write(
        &args.out,
        serde_json::to_string_pretty(&report).expect("json"),
    )
    .expect("write report");
    eprintln!("wrote {}", args.out.display());
}
