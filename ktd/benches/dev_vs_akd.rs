//! The distributed pipeline in one process (`ktd dev`: sequencer with fsync, coordinator,
//! in-process shard, gateway over loopback gRPC) against a stock in-memory `akd::Directory` fed
//! the same per-epoch batches in the same run.
//!
//! 1. Pre-load `--initial` users through both (epochs of `--epoch-size`).
//! 2. `--epochs` measured epochs of `--epoch-size` updates (half new users, half changed values):
//!    ktd: publish rate through the gateway (`Publish` of 5,000 updates, 4 in flight); the time
//!    the shard needs to pre-compute the epoch's VRF labels from the log (production epochs stay
//!    open for minutes, so this is off the critical path; the bench waits for it); then seal
//!    latency (`Admin.SealEpoch` → committed root); akd: `Directory::publish` time.
//! 3. Lookups at each of `--lookup-clients` (e.g. 1,4,16) concurrent clients for
//!    `--lookup-seconds` each (raw, unverified: server-side cost) → lookups/s and latency
//!    percentiles; then one client measures verified lookups (proof checked with stock akd).
//!
//! After each measured epoch its audit blob is fetched and verified with stock akd (size and
//! time reported). Roots are compared after every epoch. Run: `./x.sh bench dev_vs_akd --initial 1000000`.
//! Prints a human summary and one JSON line (`{"bench":"dev_vs_akd",...}`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use akd::storage::StorageManager;
use akd::storage::memory::AsyncInMemoryDatabase;
use akd::{AkdLabel, AkdValue};
use clap::Parser;
use gateway::service::GatewayOptions;
use ktd::serve::DevSettings;
use ktd_client::Client;
use ktd_core::AkdConfig;
use ktd_core::config::WhatsAppV1;
use ktd_core::vrf::VrfKey;
use ktd_proto::ktd::v1 as api;
use ktd_testkit::stats::{median, quantile};
use shard::lookup_proofs::LookupProofs;

#[path = "common/workload.rs"]
mod workload;
use workload::{batch, label, publish_all, wait_for_precompute};

#[derive(Debug, Parser)]
#[command(about = "ktd dev (distributed pipeline, one process) vs stock akd, same batches")]
struct Args {
    /// Users loaded before measuring.
    #[arg(long, default_value_t = 1_000_000)]
    initial: u64,
    /// Updates per measured epoch.
    #[arg(long, default_value_t = 100_000)]
    epoch_size: u64,
    /// Users per pre-load epoch.
    #[arg(long, default_value_t = 100_000)]
    preload_epoch_size: u64,
    /// Measured epochs.
    #[arg(long, default_value_t = 3)]
    epochs: u64,
    /// Concurrent lookup clients, one measurement per value.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    lookup_clients: Vec<usize>,
    /// Seconds of lookups.
    #[arg(long, default_value_t = 10)]
    lookup_seconds: u64,
    /// Partition bits.
    #[arg(long, default_value_t = 4)]
    bits: u8,
    /// Skip akd (ktd figures only).
    #[arg(long)]
    no_akd: bool,
    /// When lookup proofs are stored: eager, lazy or off.
    #[arg(long, default_value_t = LookupProofs::default())]
    lookup_proofs: LookupProofs,
    /// Idle seconds between the measured epochs and the lookups (with `eager`, the background
    /// filler stores the lookup proofs of the loaded versions meanwhile, as it would between
    /// production epochs).
    #[arg(long, default_value_t = 0)]
    settle_seconds: u64,
    /// The shard's hot tree levels, in MiB (0: none).
    #[arg(long, default_value_t = shard::store::StoreOptions::DEFAULT_HOT_TREE_BYTES >> 20)]
    hot_tree_mib: usize,
    // `cargo bench` passes `--bench`; accept and ignore it.
    #[arg(long, hide = true)]
    bench: bool,
}

type Akd = akd::Directory<WhatsAppV1, AsyncInMemoryDatabase, VrfKey>;

const SEED: [u8; 32] = [0x42; 32];

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(args));
}

async fn run(args: Args) {
    let dir = tempfile::tempdir().expect("temp dir");
    let seed_file = dir.path().join("seed.hex");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&seed_file)
            .expect("seed");
        writeln!(file, "{}", hex::encode(SEED)).expect("seed");
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let settings = DevSettings {
        data_dir: dir.path().join("dev"),
        vrf_seed_file: Some(seed_file),
        // The bench seals every epoch itself.
        epoch_interval: Duration::from_secs(3600),
        heartbeat_interval: None,
        partition_bits: args.bits,
        config: AkdConfig::WhatsAppV1,
        lookup_proofs: args.lookup_proofs,
        store: shard::store::StoreOptions {
            hot_tree_bytes: args.hot_tree_mib << 20,
            ..shard::store::StoreOptions::default()
        },
        options: GatewayOptions::default(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(ktd::serve::run_dev(
        settings,
        listener,
        async {
            let _ = stopped.await;
        },
        |_| {},
    ));
    let client = loop {
        if let Ok(client) = Client::connect(&format!("http://{addr}")).await {
            break client;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let akd = if args.no_akd {
        None
    } else {
        Some(Arc::new(
            Akd::new(
                StorageManager::new_no_cache(AsyncInMemoryDatabase::new()),
                VrfKey::from_seed(&SEED).expect("seed"),
                akd::append_only_zks::AzksParallelismConfig::default(),
            )
            .await
            .expect("akd"),
        ))
    };

    // Pre-load.
    let started = Instant::now();
    let mut users = 0u64;
    let mut epoch = 0u64;
    while users < args.initial {
        let new = args.preload_epoch_size.min(args.initial - users);
        let updates = batch(epoch + 1, users, new, 0);
        publish_all(&client, updates.clone()).await;
        wait_for_precompute(&client, new).await;
        let root = client.seal().await.expect("seal");
        epoch += 1;
        if let Some(akd) = &akd {
            let akd_root = akd.publish(to_akd(&updates)).await.expect("akd publish");
            assert_eq!(root.root_hash, akd_root.1, "epoch {epoch}: roots differ");
        }
        users += new;
        eprintln!(
            "pre-load: {users} users, epoch {epoch}, {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }

    // Measured epochs.
    let (mut publish_rates, mut seal_secs, mut akd_secs) = (Vec::new(), Vec::new(), Vec::new());
    let mut precompute_secs = Vec::new();
    let (mut blob_bytes, mut blob_secs) = (Vec::new(), Vec::new());
    for _ in 0..args.epochs {
        let half = args.epoch_size / 2;
        let updates = batch(epoch + 1, users, half, args.epoch_size - half);
        let count = updates.len() as f64;
        let started = Instant::now();
        publish_all(&client, updates.clone()).await;
        publish_rates.push(count / started.elapsed().as_secs_f64());
        let changed = args.epoch_size - half;
        precompute_secs.push(wait_for_precompute(&client, half + 2 * changed).await);
        let started = Instant::now();
        let root = client.seal().await.expect("seal");
        seal_secs.push(started.elapsed().as_secs_f64());
        epoch += 1;
        users += half;
        if let Some(akd) = &akd {
            let started = Instant::now();
            let akd_root = akd.publish(to_akd(&updates)).await.expect("akd publish");
            akd_secs.push(started.elapsed().as_secs_f64());
            assert_eq!(root.root_hash, akd_root.1, "epoch {epoch}: roots differ");
        }
        // The epoch's audit blob, fetched and verified the way a public auditor would.
        let (names, _) = client.audit_blob_names(epoch, 1).await.expect("blob names");
        let started = Instant::now();
        let blob = client.audit_blob(&names[0]).await.expect("audit blob");
        blob_secs.push(started.elapsed().as_secs_f64());
        blob_bytes.push(blob.bytes.len() as f64);
        eprintln!(
            "epoch {epoch}: audit blob {} bytes, fetched + verified in {:.2} s",
            blob.bytes.len(),
            blob_secs.last().expect("pushed")
        );
        eprintln!(
            "epoch {epoch}: publish {:.0} updates/s, VRF pre-compute {:.2} s, seal {:.2} s, akd publish {:?} s",
            publish_rates.last().expect("pushed"),
            precompute_secs.last().expect("pushed"),
            seal_secs.last().expect("pushed"),
            akd_secs.last()
        );
    }

    if args.settle_seconds > 0 {
        eprintln!("settling for {} s before the lookups", args.settle_seconds);
        tokio::time::sleep(Duration::from_secs(args.settle_seconds)).await;
    }

    // Lookups, at each concurrency.
    let mut lookup_runs = Vec::new();
    for &clients in &args.lookup_clients {
        let deadline = Instant::now() + Duration::from_secs(args.lookup_seconds);
        let tasks: Vec<_> = (0..clients)
            .map(|worker| {
                let mut raw = client.directory();
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut i = worker as u64;
                    while Instant::now() < deadline {
                        let started = Instant::now();
                        raw.lookup(api::LookupRequest {
                            label: label((i * 7919) % users),
                            epoch: None,
                        })
                        .await
                        .expect("lookup");
                        latencies.push(started.elapsed().as_secs_f64() * 1e3);
                        i += clients as u64;
                    }
                    latencies
                })
            })
            .collect();
        let mut latencies = Vec::new();
        for task in tasks {
            latencies.extend(task.await.expect("lookup task"));
        }
        latencies.sort_by(f64::total_cmp);
        lookup_runs.push(serde_json::json!({
            "clients": clients,
            "lookups_per_s": latencies.len() as f64 / args.lookup_seconds as f64,
            "p50_ms": quantile(&latencies, 0.5),
            "p99_ms": quantile(&latencies, 0.99),
            "p999_ms": quantile(&latencies, 0.999),
        }));
    }
    let started = Instant::now();
    let mut verified = 0u64;
    while started.elapsed() < Duration::from_secs(3) {
        client
            .lookup(&label((verified * 104_729) % users), None)
            .await
            .expect("verified lookup");
        verified += 1;
    }
    let verified_ms = started.elapsed().as_secs_f64() * 1e3 / verified as f64;

    let seal = median(&seal_secs);
    let akd_publish = (!akd_secs.is_empty()).then(|| median(&akd_secs));
    println!(
        "ktd dev vs akd: {} users, epochs of {} updates, {} partition bits",
        args.initial, args.epoch_size, args.bits
    );
    println!(
        "  publish rate (gateway → Raft, fsync): median {:.0} updates/s",
        median(&publish_rates)
    );
    println!("  seal latency (SealEpoch → committed root): median {seal:.2} s");
    if let Some(akd_publish) = akd_publish {
        println!(
            "  akd Directory::publish of the same batch: median {akd_publish:.2} s (seal / akd = {:.2})",
            seal / akd_publish
        );
    }
    println!(
        "  VRF pre-compute while open: median {:.2} s",
        median(&precompute_secs)
    );
    println!(
        "  audit blob: median {:.0} bytes ({:.0} bytes per update), fetch + stock-akd verify {:.2} s",
        median(&blob_bytes),
        median(&blob_bytes) / args.epoch_size as f64,
        median(&blob_secs)
    );
    for run in &lookup_runs {
        println!("  lookups, unverified: {run}");
    }
    println!("  verified lookup, one client: {verified_ms:.2} ms each");
    println!(
        "{}",
        serde_json::json!({
            "bench": "dev_vs_akd",
            "initial": args.initial,
            "epoch_size": args.epoch_size,
            "bits": args.bits,
            "lookup_proofs": args.lookup_proofs.to_string(),
            "hot_tree_mib": args.hot_tree_mib,
            "settle_seconds": args.settle_seconds,
            "publish_updates_per_s": publish_rates,
            "seal_seconds": seal_secs,
            "akd_publish_seconds": akd_secs,
            "precompute_seconds": precompute_secs,
            "audit_blob_bytes": blob_bytes,
            "audit_blob_fetch_verify_seconds": blob_secs,
            "lookups": lookup_runs,
            "verified_lookup_ms": verified_ms,
        })
    );
    let _ = stop.send(());
    let _ = server.await;
}

fn to_akd(updates: &[(Vec<u8>, Vec<u8>)]) -> Vec<(AkdLabel, AkdValue)> {
    updates
        .iter()
        .map(|(label, value)| (AkdLabel(label.clone()), AkdValue(value.clone())))
        .collect()
}
