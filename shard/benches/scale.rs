//! How the in-process directory's cost grows with its size.
//!
//! Grows one directory (RocksDB, `--bits` partitions) with epochs of `--epoch-size` new users;
//! at each checkpoint (`--checkpoints`, in entries) it runs `--measure-epochs` epochs of
//! `--epoch-size` updates (half new users, half value changes) and records the per-update cost
//! split into VRF and tree + storage, the disk footprint per entry and RocksDB's write
//! amplification.
//!
//! ```sh
//! ./x.sh bench scale --entries 10000000 --checkpoints 1000000,10000000 --bits 4
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use akd_core::{AkdLabel, AkdValue};
use ktd_core::AkdConfig;
use ktd_testkit::stats::median;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
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

fn value(id: u64, version: u64) -> AkdValue {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&id.to_be_bytes());
    hasher.update(&version.to_be_bytes());
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

fn main() {
    let args = parse_args();
    let temp = tempfile::tempdir().expect("temp dir");
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    let options = DirectoryOptions {
        config: AkdConfig::WhatsAppV1,
        partition_bits: args.bits,
        store: StoreOptions {
            statistics: true,
            block_cache_bytes: args.block_cache_mb << 20,
            ..StoreOptions::default()
        },
        ..DirectoryOptions::default()
    };
    let directory =
        Directory::open(&dir, options, blake3::hash(b"scale").as_bytes()).expect("open");
    let mut rng = StdRng::seed_from_u64(SEED);
    let mut entries = 0u64;
    let mut versions: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    let mut checkpoints = args.checkpoints.clone();
    checkpoints.sort_unstable();
    let mut results = Vec::new();
    let started = Instant::now();

    for checkpoint in checkpoints
        .into_iter()
        .filter(|checkpoint| *checkpoint <= args.entries)
    {
        while entries < checkpoint {
            let end = (entries + args.epoch_size).min(checkpoint);
            let batch = (entries..end).map(|id| (label(id), value(id, 1))).collect();
            directory.publish(batch).expect("grow");
            entries = end;
            if entries.is_multiple_of(1_000_000) {
                eprintln!(
                    "{entries} entries after {:.0} s",
                    started.elapsed().as_secs_f64()
                );
            }
        }
        let io_before = directory.store().io_stats();
        let mut per_update = Vec::new();
        let mut vrf = Vec::new();
        let mut tree_storage = Vec::new();
        let mut seal = Vec::new();
        let mut phases: Vec<Value> = Vec::new();
        for _ in 0..args.measure_epochs {
            let mut batch = Vec::new();
            let mut changed = std::collections::HashSet::new();
            while (changed.len() as u64) < args.epoch_size / 2 {
                let id = rng.random_range(0..entries);
                if changed.insert(id) {
                    let version = versions.entry(id).or_insert(1);
                    *version += 1;
                    batch.push((label(id), value(id, *version)));
                }
            }
            for id in entries..entries + (args.epoch_size - args.epoch_size / 2) {
                batch.push((label(id), value(id, 1)));
            }
            entries += args.epoch_size - args.epoch_size / 2;
            let updates = batch.len() as f64;
            let began = Instant::now();
            let (_, stats) = directory.publish_with_stats(batch).expect("measured epoch");
            let total = began.elapsed().as_secs_f64() * 1e6 / updates;
            let vrf_us = stats.vrf.as_secs_f64() * 1e6 / updates;
            per_update.push(total);
            vrf.push(vrf_us);
            tree_storage.push(total - vrf_us);
            seal.push((began.elapsed() - stats.vrf).as_secs_f64());
            let per = |duration: std::time::Duration| duration.as_secs_f64() * 1e6 / updates;
            phases.push(json!({
                "read_users_us": per(stats.read_users),
                "vrf_us": per(stats.vrf),
                "tree_us": per(stats.tree),
                "node_reads_us_thread_sum": per(stats.node_reads),
                "write_nodes_us": per(stats.write_nodes),
                "commit_us": per(stats.commit),
                "nodes_written": stats.nodes_written,
            }));
        }
        let io = directory.store().io_stats();
        directory.store().flush().expect("flush");
        let sst = directory.store().sst_bytes().expect("sst bytes");
        let on_disk = dir_bytes(&dir);
        let user_bytes = io.user_bytes - io_before.user_bytes;
        let lsm_bytes = (io.flush_bytes + io.compaction_bytes)
            - (io_before.flush_bytes + io_before.compaction_bytes);
        let result = json!({
            "entries": entries,
            "us_per_update_median": median(&per_update),
            "vrf_us_median": median(&vrf),
            "tree_storage_us_median": median(&tree_storage),
            "seal_seconds_without_vrf_median": median(&seal),
            "sst_bytes": sst,
            "dir_bytes": on_disk,
            "sst_bytes_per_entry": sst as f64 / entries as f64,
            "lsm_write_amp_measured_epochs": lsm_bytes as f64 / user_bytes.max(1) as f64,
            "lsm_write_amp_lifetime": io.lsm_write_amplification(),
            "per_update_runs": per_update,
            "phases": phases,
        });
        eprintln!("checkpoint: {result}");
        results.push(result);
    }

    println!();
    println!(
        "| entries | µs/update (median) | VRF | tree + storage | seal w/o VRF (per epoch) | SST bytes/entry | LSM write amp (measured epochs / lifetime) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for result in &results {
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.2} s | {:.0} | {:.2} / {:.2} |",
            result["entries"],
            result["us_per_update_median"].as_f64().unwrap_or(f64::NAN),
            result["vrf_us_median"].as_f64().unwrap_or(f64::NAN),
            result["tree_storage_us_median"]
                .as_f64()
                .unwrap_or(f64::NAN),
            result["seal_seconds_without_vrf_median"]
                .as_f64()
                .unwrap_or(f64::NAN),
            result["sst_bytes_per_entry"].as_f64().unwrap_or(f64::NAN),
            result["lsm_write_amp_measured_epochs"]
                .as_f64()
                .unwrap_or(f64::NAN),
            result["lsm_write_amp_lifetime"]
                .as_f64()
                .unwrap_or(f64::NAN),
        );
    }
    if let (Some(first), Some(last)) = (results.first(), results.last()) {
        let ratio = |field: &str| {
            last[field].as_f64().unwrap_or(f64::NAN) / first[field].as_f64().unwrap_or(f64::NAN)
        };
        println!(
            "cost growth {} → {} entries: total {:.2}x, tree+storage {:.2}x",
            first["entries"],
            last["entries"],
            ratio("us_per_update_median"),
            ratio("tree_storage_us_median")
        );
    }
    let report: Value = json!({ "bits": args.bits, "epoch_size": args.epoch_size, "checkpoints": results, "total_seconds": started.elapsed().as_secs_f64() });
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
