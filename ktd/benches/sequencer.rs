//! Sequencer benchmark on a real 3-node cluster of `ktd sequencer` processes on loopback, with
//! every write fsynced (the shipped configuration):
//!
//! 1. **Append throughput**: `--clients` concurrent clients each append batches of `--batch`
//!    updates back to back for `--seconds`; reports updates/s and append latency percentiles.
//! 2. **Write unavailability after a leader kill**: `--kills` times, a writer appends
//!    continuously, the leader is killed with SIGKILL, and the time from the kill to the first
//!    acknowledged append is recorded; the killed node is restarted from its data directory and
//!    the cluster settles before the next round. Reports the median and p99.
//!
//! Run: `./x.sh bench sequencer` (or `cargo bench -p ktd --bench sequencer -- --help`).
//! Prints a human summary and one JSON line (`{"bench":"sequencer",...}`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use ktd_testkit::Poll;
use ktd_testkit::process::KtdCluster;
use ktd_testkit::stats::quantile;
use sequencer::{ClientOptions, SequencerClient, pb};

#[derive(Debug, Parser)]
#[command(about = "ktd sequencer benchmark: append throughput and failover time")]
struct Args {
    /// Concurrent clients in the throughput phase.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Updates per append.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Duration of the throughput phase, in seconds.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Leader kills in the failover phase.
    #[arg(long, default_value_t = 12)]
    kills: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 32)]
    value_bytes: usize,
    /// Instead of one throughput phase, alternate this many rounds of appends keyed by the
    /// client library (`retry_key`, kept by a count window) with as many keyed by the caller
    /// (kept for the idempotency retention), `--seconds` each, and report the medians and
    /// their ratio: the cost of remembering caller keys by time.
    #[arg(long, default_value_t = 0)]
    key_rounds: usize,
    // `cargo bench` passes `--bench`; accept and ignore it.
    #[arg(long, hide = true)]
    bench: bool,
}

fn fast_client(cluster: &KtdCluster) -> SequencerClient {
    SequencerClient::with_options(
        cluster.addrs(),
        ClientOptions {
            total_timeout: Duration::from_secs(30),
            max_attempts: 10_000,
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(50),
            ..ClientOptions::default()
        },
    )
}

/// Waits until every node follows one leader and has applied (to within 10 entries) what it
/// committed; returns the leader.
async fn wait_ready(cluster: &KtdCluster, client: &SequencerClient) -> u64 {
    Poll::new("the cluster to be ready", Duration::from_secs(60))
        .context(|| cluster.logs())
        .until(|| async {
            let status = client.cluster_status().await.ok()?;
            let leader = status.leader_id;
            let committed = status
                .members
                .iter()
                .find(|member| member.node_id == leader)
                .and_then(|member| member.status.as_ref())
                .map(|status| status.committed_index);
            let all_caught_up = committed.is_some_and(|committed| {
                status.members.len() == 3
                    && status.members.iter().all(|member| {
                        member.status.as_ref().is_some_and(|status| {
                            status.applied_index + 10 >= committed && status.leader_id == leader
                        })
                    })
            });
            all_caught_up.then_some(leader)
        })
        .await
}

fn updates(prefix: &str, count: usize, value_bytes: usize) -> Vec<pb::Update> {
    (0..count)
        .map(|i| pb::Update {
            label: format!("{prefix}-{i}").into_bytes(),
            value: vec![7u8; value_bytes],
        })
        .collect()
}

async fn throughput(cluster: &KtdCluster, args: &Args, caller_keys: bool) -> serde_json::Value {
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let started = Instant::now();
    for client_idx in 0..args.clients {
        let client = fast_client(cluster);
        let stop = stop.clone();
        let acked = acked.clone();
        let (batch, value_bytes) = (args.batch, args.value_bytes);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let request = updates(&format!("t{client_idx}-{round}"), batch, value_bytes);
                let key = caller_keys.then(|| rand::random::<[u8; 16]>().to_vec());
                let sent = Instant::now();
                if client.append(request, key).await.is_ok() {
                    latencies.push(sent.elapsed().as_secs_f64() * 1e3);
                    acked.fetch_add(batch as u64, Ordering::Relaxed);
                }
                round += 1;
            }
            latencies
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let total = acked.load(Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("client task"));
    }
    latencies.sort_by(f64::total_cmp);
    let rate = total as f64 / elapsed;
    println!(
        "throughput ({} keys): {rate:.0} updates/s ({:.0} appends/s of {}), append latency p50 {:.1} ms, p99 {:.1} ms, \
         {} clients, {elapsed:.1} s",
        if caller_keys { "caller" } else { "retry" },
        latencies.len() as f64 / elapsed,
        args.batch,
        quantile(&latencies, 0.5),
        quantile(&latencies, 0.99),
        args.clients
    );
    serde_json::json!({
        "updates_per_second": rate,
        "appends_per_second": latencies.len() as f64 / elapsed,
        "append_latency_ms_p50": quantile(&latencies, 0.5),
        "append_latency_ms_p99": quantile(&latencies, 0.99),
        "clients": args.clients,
        "batch": args.batch,
        "value_bytes": args.value_bytes,
        "seconds": elapsed,
        "caller_keys": caller_keys,
    })
}

/// Alternating rounds of retry-keyed and caller-keyed appends (see `--key-rounds`).
async fn key_rounds(cluster: &KtdCluster, args: &Args) -> serde_json::Value {
    let (mut retry, mut caller) = (Vec::new(), Vec::new());
    for _ in 0..args.key_rounds {
        for caller_keys in [false, true] {
            let round = throughput(cluster, args, caller_keys).await;
            let rate = round["appends_per_second"].as_f64().unwrap_or(f64::NAN);
            if caller_keys {
                caller.push(rate);
            } else {
                retry.push(rate);
            }
        }
    }
    retry.sort_by(f64::total_cmp);
    caller.sort_by(f64::total_cmp);
    let (retry_median, caller_median) = (quantile(&retry, 0.5), quantile(&caller, 0.5));
    println!(
        "keyed appends/s, median of {} rounds: retry keys {retry_median:.0}, caller keys \
         {caller_median:.0}, ratio caller/retry {:.3}",
        args.key_rounds,
        caller_median / retry_median
    );
    serde_json::json!({
        "rounds": args.key_rounds,
        "retry_key_appends_per_second": retry,
        "caller_key_appends_per_second": caller,
        "retry_median": retry_median,
        "caller_median": caller_median,
        "ratio_caller_over_retry": caller_median / retry_median,
    })
}

async fn failover(cluster: &mut KtdCluster, args: &Args) -> serde_json::Value {
    let client = fast_client(cluster);
    let mut unavailability = Vec::new();
    for kill in 0..args.kills {
        let leader = wait_ready(cluster, &client).await;
        // Let the restarted node settle into a normal follower (fresh lease) first.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stop = Arc::new(AtomicBool::new(false));
        let last_ack = Arc::new(std::sync::Mutex::new(None::<Instant>));
        let writer = {
            let client = fast_client(cluster);
            let stop = stop.clone();
            let last_ack = last_ack.clone();
            tokio::spawn(async move {
                let mut acks = Vec::new();
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if client
                        .append(updates(&format!("f{kill}-{round}"), 10, 32), None)
                        .await
                        .is_ok()
                    {
                        let now = Instant::now();
                        acks.push(now);
                        *last_ack.lock().expect("lock") = Some(now);
                    }
                    round += 1;
                }
                acks
            })
        };
        // Steady state first: the first acknowledgement (if any within 10 s), then 300 ms of
        // writes before the kill.
        let warm = Instant::now();
        while last_ack.lock().expect("lock").is_none() && warm.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Measured from the moment the process is gone (SIGKILL delivered and reaped): an
        // acknowledgement that raced with the kill would otherwise count as "resumed at 0 ms".
        cluster.nodes.get_mut(&leader).expect("leader").kill9();
        let killed_at = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(30);
        let first_ack = loop {
            let ack = *last_ack.lock().expect("lock");
            if let Some(ack) = ack
                && ack > killed_at
            {
                break ack;
            }
            assert!(
                Instant::now() < deadline,
                "no append acknowledged within 30 s of the kill\n{}",
                cluster.logs()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.store(true, Ordering::Relaxed);
        let acks = writer.await.expect("writer");
        let first = acks
            .iter()
            .copied()
            .find(|ack| *ack > killed_at)
            .unwrap_or(first_ack);
        let seconds = first.duration_since(killed_at).as_secs_f64();
        println!(
            "kill {}: leader {leader} killed, writes resumed after {:.0} ms",
            kill + 1,
            seconds * 1e3
        );
        unavailability.push(seconds);
        cluster.nodes.get_mut(&leader).expect("node").restart();
    }
    wait_ready(cluster, &client).await;
    let mut sorted = unavailability.clone();
    sorted.sort_by(f64::total_cmp);
    let median = quantile(&sorted, 0.5);
    let p99 = quantile(&sorted, 0.99);
    println!(
        "failover: write unavailability after a leader kill: median {:.0} ms, p99 {:.0} ms, max {:.0} ms over {} kills",
        median * 1e3,
        p99 * 1e3,
        sorted.last().copied().unwrap_or(f64::NAN) * 1e3,
        sorted.len()
    );
    serde_json::json!({
        "kills": sorted.len(),
        "unavailability_ms_median": median * 1e3,
        "unavailability_ms_p99": p99 * 1e3,
        "unavailability_ms_max": sorted.last().copied().unwrap_or(f64::NAN) * 1e3,
        "unavailability_ms": unavailability.iter().map(|s| s * 1e3).collect::<Vec<_>>(),
    })
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut cluster = KtdCluster::start(env!("CARGO_BIN_EXE_ktd"), 3);
        let client = fast_client(&cluster);
        wait_ready(&cluster, &client).await;
        // The cluster metadata is written right after the first election.
        ktd_testkit::eventually("the cluster metadata", Duration::from_secs(30), || async {
            client.cluster_metadata().await.ok()?.metadata
        })
        .await;
        println!(
            "3 ktd sequencer processes on loopback, fsync on, default raft timing (heartbeat 50 ms, \
             election 200-400 ms, pre-vote); {} cores",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let throughput = if args.key_rounds > 0 {
            key_rounds(&cluster, &args).await
        } else if args.seconds > 0 {
            throughput(&cluster, &args, false).await
        } else {
            serde_json::Value::Null
        };
        let failover = if args.kills > 0 {
            failover(&mut cluster, &args).await
        } else {
            serde_json::Value::Null
        };
        println!(
            "{}",
            serde_json::json!({"bench": "sequencer", "throughput": throughput, "failover": failover})
        );
        for node in cluster.nodes.values_mut() {
            node.terminate(Duration::from_secs(20));
        }
        if std::env::var_os("KTD_KEEP_LOGS").is_some() {
            println!("node logs kept in {}", cluster.keep_files().display());
        }
    });
}
