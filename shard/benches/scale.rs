//! How the in-process directory's cost grows with its size.
//!
//! Grows one directory (RocksDB, `--bits` partitions) with epochs of `--epoch-size` new users;
//! at each checkpoint (`--checkpoints`, in entries) it runs `--measure-epochs` epochs of
//! `--epoch-size` updates (half new users, half value changes) and records the per-update cost
//! split into VRF and tree + storage, the node reads per update by label length (bands of 4
//! bits) and the hot tree levels' hits and misses, the disk footprint per entry, RocksDB's write
//! amplification and the peak RSS.
//!
//! Lookup proofs are `--lookup-proofs off` by default: the bench measures the epoch pipeline,
//! and the eager filler's background proving would share its two cores (`eager` measures that).
//!
//! `--lookups N` times N lookups of random users after each measurement, twice (the second pass
//! reads the VRF proofs the first stored, unless `--lookup-proofs off`).
//!
//! `--dir D` keeps the directory (and its entry count); `--resume` continues growing one kept
//! with `--dir` (a checkpoint at or below its size measures it as it is), e.g. to profile or
//! measure at 10M without growing it again.
//!
//! `--hot-tree-mb 0,256` measures each checkpoint once per hot-tree size, in the same run: the
//! directory is reopened with that size, `--warmup-epochs` epochs run unmeasured (the caches
//! fill), then the measured ones. Each variant adds its epochs' entries to the directory.
//!
//! ```sh
//! ./x.sh bench scale --entries 10000000 --checkpoints 1000000,10000000 --bits 4
//! ./x.sh bench scale --entries 10000000 --checkpoints 1000000,10000000 --hot-tree-mb 0,256
//! ```

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use akd_core::{AkdLabel, AkdValue};
use ktd_core::AkdConfig;
use ktd_testkit::stats::median;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use shard::lookup_proofs::LookupProofs;
use shard::store::StoreOptions;
use shard::{Directory, DirectoryOptions};

const SEED: u64 = 7;

struct Args {
    entries: u64,
    epoch_size: u64,
    checkpoints: Vec<u64>,
    measure_epochs: u64,
    bits: u8,
    block_cache_mb: usize,
    node_block_kb: usize,
    hot_tree_mb: Vec<usize>,
    warmup_epochs: u64,
    resume: bool,
    lookups: u64,
    lookup_proofs: LookupProofs,
    dir: Option<PathBuf>,
    out: PathBuf,
}

fn parse_args() -> Args {
    let mut args = Args {
        entries: 10_000_000,
        epoch_size: 100_000,
        checkpoints: vec![1_000_000, 10_000_000],
        measure_epochs: 3,
        bits: 4,
        block_cache_mb: 512,
        node_block_kb: StoreOptions::default().node_block_bytes >> 10,
        hot_tree_mb: vec![StoreOptions::DEFAULT_HOT_TREE_BYTES >> 20],
        warmup_epochs: 1,
        resume: false,
        lookups: 0,
        lookup_proofs: LookupProofs::Off,
        dir: None,
        out: Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench-results/scale.json"),
    };
    let mut iter = std::env::args().skip(1);
    while let Some(flag) = iter.next() {
        let mut value = || {
            iter.next()
                .unwrap_or_else(|| panic!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--entries" => args.entries = value().parse().expect("--entries N"),
            "--epoch-size" => args.epoch_size = value().parse().expect("--epoch-size N"),
            "--checkpoints" => {
                args.checkpoints = value()
                    .split(',')
                    .map(|n| n.parse().expect("--checkpoints a,b"))
                    .collect()
            }
            "--measure-epochs" => {
                args.measure_epochs = value().parse().expect("--measure-epochs N")
            }
            "--bits" => args.bits = value().parse().expect("--bits K"),
            "--block-cache-mb" => {
                args.block_cache_mb = value().parse().expect("--block-cache-mb N")
            }
            "--node-block-kb" => args.node_block_kb = value().parse().expect("--node-block-kb N"),
            "--hot-tree-mb" => {
                args.hot_tree_mb = value()
                    .split(',')
                    .map(|n| n.parse().expect("--hot-tree-mb a,b"))
                    .collect()
            }
            "--warmup-epochs" => args.warmup_epochs = value().parse().expect("--warmup-epochs N"),
            "--lookup-proofs" => {
                args.lookup_proofs = value().parse().expect("--lookup-proofs eager|lazy|off")
            }
            "--resume" => args.resume = true,
            "--lookups" => args.lookups = value().parse().expect("--lookups N"),
            "--dir" => args.dir = Some(PathBuf::from(value())),
            "--out" => args.out = PathBuf::from(value()),
            "--bench" => {}
            other => panic!("unknown flag {other}"),
        }
    }
    args
}

fn label(id: u64) -> AkdLabel {
    AkdLabel(format!("user-{id:010}").into_bytes())
}

fn value(id: u64, version: u64, salt: u64) -> AkdValue {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&id.to_be_bytes());
    hasher.update(&version.to_be_bytes());
    if salt != 0 {
        hasher.update(&salt.to_be_bytes());
    }
    AkdValue(hasher.finalize().as_bytes().to_vec())
}

fn dir_bytes(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|entry| entry.metadata().ok())
                .map(|meta| meta.len())
                .sum()
        })
        .unwrap_or(0)
}

struct Grower {
    rng: StdRng,
    entries: u64,
    versions: HashMap<u64, u64>,
    /// Non-zero after `--resume`: the value changes of this run differ from any before it.
    salt: u64,
}

/// Where a kept directory (`--dir`) records its entries, for `--resume`.
const STATE_FILE: &str = "scale-bench-entries";

impl Grower {
    fn save(&self, dir: &Path) {
        std::fs::write(dir.join(STATE_FILE), self.entries.to_string())
            .expect("write the bench state");
    }
}

impl Grower {
    /// One measured-kind epoch: half value changes of random existing users, half new users.
    fn mixed_epoch(&mut self, size: u64) -> Vec<(AkdLabel, AkdValue)> {
        let mut batch = Vec::new();
        let mut changed = HashSet::new();
        while (changed.len() as u64) < size / 2 {
            let id = self.rng.random_range(0..self.entries);
            if changed.insert(id) {
                let version = self.versions.entry(id).or_insert(1);
                *version += 1;
                batch.push((label(id), value(id, *version, self.salt)));
            }
        }
        for id in self.entries..self.entries + (size - size / 2) {
            batch.push((label(id), value(id, 1, 0)));
        }
        self.entries += size - size / 2;
        batch
    }
}

fn open(dir: &Path, args: &Args, hot_tree_mb: usize) -> Directory {
    let options = DirectoryOptions {
        config: AkdConfig::WhatsAppV1,
        partition_bits: args.bits,
        store: StoreOptions {
            statistics: true,
            block_cache_bytes: args.block_cache_mb << 20,
            hot_tree_bytes: hot_tree_mb << 20,
            node_block_bytes: args.node_block_kb << 10,
            ..StoreOptions::default()
        },
        lookup_proofs: args.lookup_proofs,
        ..DirectoryOptions::default()
    };
    Directory::open(dir, options, blake3::hash(b"scale").as_bytes()).expect("open")
}

/// Warm-up and measured epochs at one checkpoint, with one hot-tree size.
fn measure(
    directory: &Directory,
    dir: &Path,
    args: &Args,
    grower: &mut Grower,
    hot_tree_mb: usize,
) -> Value {
    for _ in 0..args.warmup_epochs {
        let batch = grower.mixed_epoch(args.epoch_size);
        directory.publish(batch).expect("warm-up epoch");
    }
    let io_before = directory.store().io_stats();
    let mut per_update = Vec::new();
    let mut vrf = Vec::new();
    let mut tree_storage = Vec::new();
    let mut seal = Vec::new();
    let mut reads = Vec::new();
    let mut phases: Vec<Value> = Vec::new();
    for _ in 0..args.measure_epochs {
        let batch = grower.mixed_epoch(args.epoch_size);
        let updates = batch.len() as f64;
        let hot_before = directory.store().hot_stats();
        let began = Instant::now();
        let (_, stats) = directory.publish_with_stats(batch).expect("measured epoch");
        let total = began.elapsed().as_secs_f64() * 1e6 / updates;
        let hot = directory.store().hot_stats();
        let vrf_us = stats.vrf.as_secs_f64() * 1e6 / updates;
        per_update.push(total);
        vrf.push(vrf_us);
        tree_storage.push(total - vrf_us);
        seal.push((began.elapsed() - stats.vrf).as_secs_f64());
        let node_reads = stats.reads_by_label_len.iter().sum::<u64>() as f64 / updates;
        reads.push(node_reads);
        let per = |duration: std::time::Duration| duration.as_secs_f64() * 1e6 / updates;
        phases.push(json!({
            "read_users_us": per(stats.read_users),
            "vrf_us": per(stats.vrf),
            "tree_us": per(stats.tree),
            "node_reads_us_thread_sum": per(stats.node_reads),
            "write_nodes_us": per(stats.write_nodes),
            "commit_us": per(stats.commit),
            "nodes_written": stats.nodes_written,
            "node_reads_per_update": node_reads,
            "node_reads_per_update_by_label_len": ktd_testkit::stats::per_band(&stats.reads_by_label_len, 4, updates)
                .into_iter()
                .map(|(band, reads)| (band, Value::from(reads)))
                .collect::<serde_json::Map<_, _>>(),
            "hot_hits_per_update": (hot.hits - hot_before.hits) as f64 / updates,
            "hot_misses_per_update": (hot.misses - hot_before.misses) as f64 / updates,
        }));
    }
    let io = directory.store().io_stats();
    directory.store().flush().expect("flush");
    let sst = directory.store().sst_bytes().expect("sst bytes");
    let user_bytes = io.user_bytes - io_before.user_bytes;
    let lsm_bytes = (io.flush_bytes + io.compaction_bytes)
        - (io_before.flush_bytes + io_before.compaction_bytes);
    // Lookups of random users, twice: the first pass proves the VRF proofs (and stores them
    // unless `--lookup-proofs off`), the second reads them where stored.
    let lookup_ids: Vec<u64> = (0..args.lookups)
        .map(|_| grower.rng.random_range(0..grower.entries))
        .collect();
    let mut lookup_passes = Vec::new();
    for _ in 0..2 {
        let mut micros = Vec::new();
        for &id in &lookup_ids {
            let began = Instant::now();
            directory.lookup(&label(id), None).expect("lookup");
            micros.push(began.elapsed().as_secs_f64() * 1e6);
        }
        lookup_passes.push(json!({
            "median_us": median(&micros),
            "p99_us": ktd_testkit::stats::quantile(&micros, 0.99),
        }));
    }
    let hot = directory.store().hot_stats();
    json!({
        "lookups": args.lookups,
        "lookup_first_pass": lookup_passes[0],
        "lookup_second_pass": lookup_passes[1],
        "entries": grower.entries,
        "hot_tree_mb": hot_tree_mb,
        "hot_tree_levels": hot.levels,
        "hot_tree_allocated_bytes": hot.allocated_bytes,
        "us_per_update_median": median(&per_update),
        "vrf_us_median": median(&vrf),
        "tree_storage_us_median": median(&tree_storage),
        "seal_seconds_without_vrf_median": median(&seal),
        "node_reads_per_update_median": median(&reads),
        "sst_bytes": sst,
        "dir_bytes": dir_bytes(dir),
        "sst_bytes_per_entry": sst as f64 / grower.entries as f64,
        "lsm_write_amp_measured_epochs": lsm_bytes as f64 / user_bytes.max(1) as f64,
        "lsm_write_amp_lifetime": io.lsm_write_amplification(),
        "peak_rss_bytes": ktd_testkit::process::peak_rss_bytes(None).unwrap_or(0),
        "per_update_runs": per_update,
        "phases": phases,
    })
}

fn main() {
    let args = parse_args();
    let temp = tempfile::tempdir().expect("temp dir");
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    let mut directory = Some(open(&dir, &args, args.hot_tree_mb[0]));
    let resumed = args
        .resume
        .then(|| std::fs::read_to_string(dir.join(STATE_FILE)).ok())
        .flatten()
        .map(|text| {
            text.trim()
                .parse::<u64>()
                .expect("bench state: an entry count")
        });
    let entries = resumed.unwrap_or(0);
    if args.resume {
        eprintln!("resuming {} at {entries} entries", dir.display());
    }
    let mut grower = Grower {
        rng: StdRng::seed_from_u64(SEED ^ entries),
        entries,
        versions: HashMap::new(),
        salt: entries,
    };
    let mut checkpoints = args.checkpoints.clone();
    checkpoints.sort_unstable();
    let mut results = Vec::new();
    let started = Instant::now();

    for checkpoint in checkpoints
        .into_iter()
        .filter(|checkpoint| *checkpoint <= args.entries)
    {
        while grower.entries < checkpoint {
            let end = (grower.entries + args.epoch_size).min(checkpoint);
            let batch = (grower.entries..end)
                .map(|id| (label(id), value(id, 1, 0)))
                .collect();
            directory
                .as_ref()
                .expect("open")
                .publish(batch)
                .expect("grow");
            grower.entries = end;
            grower.save(&dir);
            if grower.entries.is_multiple_of(1_000_000) {
                eprintln!(
                    "{} entries after {:.0} s",
                    grower.entries,
                    started.elapsed().as_secs_f64()
                );
            }
        }
        for &hot_tree_mb in &args.hot_tree_mb {
            if args.hot_tree_mb.len() > 1 {
                drop(directory.take()); // closes the database before it is reopened
                directory = Some(open(&dir, &args, hot_tree_mb));
            }
            let result = measure(
                directory.as_ref().expect("open"),
                &dir,
                &args,
                &mut grower,
                hot_tree_mb,
            );
            grower.save(&dir);
            eprintln!("checkpoint: {result}");
            results.push(result);
        }
    }

    println!();
    println!(
        "| entries | hot tree MiB (levels) | µs/update (median) | VRF | tree + storage | seal w/o VRF (per epoch) | node reads/update | SST bytes/entry | LSM write amp (measured epochs / lifetime) | peak RSS |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let number = |result: &Value, field: &str| result[field].as_f64().unwrap_or(f64::NAN);
    for result in &results {
        println!(
            "| {} | {} ({}) | {:.1} | {:.1} | {:.1} | {:.2} s | {:.2} | {:.0} | {:.2} / {:.2} | {:.2} GiB |",
            result["entries"],
            result["hot_tree_mb"],
            result["hot_tree_levels"],
            number(result, "us_per_update_median"),
            number(result, "vrf_us_median"),
            number(result, "tree_storage_us_median"),
            number(result, "seal_seconds_without_vrf_median"),
            number(result, "node_reads_per_update_median"),
            number(result, "sst_bytes_per_entry"),
            number(result, "lsm_write_amp_measured_epochs"),
            number(result, "lsm_write_amp_lifetime"),
            number(result, "peak_rss_bytes") / f64::from(1u32 << 30),
        );
    }
    for &hot_tree_mb in &args.hot_tree_mb {
        let variant: Vec<&Value> = results
            .iter()
            .filter(|result| result["hot_tree_mb"] == json!(hot_tree_mb))
            .collect();
        if let (Some(first), Some(last)) = (variant.first(), variant.last()) {
            let ratio = |field: &str| number(last, field) / number(first, field);
            println!(
                "hot tree {hot_tree_mb} MiB, cost growth {} → {} entries: total {:.2}x, tree+storage {:.2}x, node reads {:.2}x",
                first["entries"],
                last["entries"],
                ratio("us_per_update_median"),
                ratio("tree_storage_us_median"),
                ratio("node_reads_per_update_median"),
            );
        }
    }
    let report: Value = json!({
        "bits": args.bits,
        "epoch_size": args.epoch_size,
        "block_cache_mb": args.block_cache_mb,
        "node_block_kb": args.node_block_kb,
        "hot_tree_mb": args.hot_tree_mb,
        "warmup_epochs": args.warmup_epochs,
        "lookup_proofs": args.lookup_proofs.to_string(),
        "checkpoints": results,
        "total_seconds": started.elapsed().as_secs_f64(),
    });
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent).expect("output dir");
    }
    std::fs::write(
        &args.out,
        serde_json::to_string_pretty(&report).expect("json"),
    )
    .expect("write");
    eprintln!("wrote {}", args.out.display());
}
