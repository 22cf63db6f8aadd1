//! `ktd dev` as a user meets it: the README's flow (`ktd publish`, `ktd lookup --verify`) as
//! real processes; audit blobs written by `ktd audit-blobs` and verified; bad input over gRPC answered with the documented status while the server
//! keeps serving; overload answered `RESOURCE_EXHAUSTED`; each caller's budget of expensive
//! reads its own; a clean SIGTERM and a restart from the
//! data directory that still serves what was published.

use std::time::Duration;

use ktd_proto::ktd::v1 as api;
use ktd_testkit::grpc::code;
use ktd_testkit::net::{free_addr, http_get};
use ktd_testkit::process::KtdNode;
use ktd_testkit::with_deadline;
use tonic::Code;

use crate::support::KTD;
use crate::support::cli::ktd_at;
use crate::support::cluster::{connect, publish_epochs};

fn dev_node(root: &std::path::Path, metrics: &str) -> KtdNode {
    let extra = [
        "--epoch-interval",
        "200ms",
        "--max-in-flight",
        "4",
        "--metrics-listen",
        metrics,
    ];
    KtdNode::dev(KTD, root, "127.0.0.41", &extra)
}

/// A few more epochs, then `ktd audit-blobs` writes one verified blob per epoch, named by its
/// end epoch; bad names are refused.
async fn audit_blobs_verify(client: &ktd_client::Client, addr: &str) {
    let latest = publish_epochs(client, "blob-user", 3, 1).await;
    let out = tempfile::tempdir().expect("temp dir");
    let (blob_addr, dir) = (addr.to_string(), out.path().to_path_buf());
    let written = tokio::task::spawn_blocking(move || {
        ktd_at(
            &blob_addr,
            &["audit-blobs", "--out", &dir.display().to_string()],
        )
    })
    .await
    .expect("ktd audit-blobs");
    assert!(written.status.success(), "{written:?}");
    let (names, listed_latest) = client.audit_blob_names(1, 0).await.expect("list");
    assert_eq!(listed_latest, latest);
    assert_eq!(names.len() as u64, latest, "one blob per epoch 1..=latest");
    for (index, name) in names.iter().enumerate() {
        let epoch = index as u64 + 1;
        let previous = client.epoch(Some(epoch - 1)).await.expect("epoch");
        let root = client.epoch(Some(epoch)).await.expect("epoch");
        assert_eq!(
            name,
            &format!(
                "{epoch}/{}/{}",
                hex::encode(previous.root_hash),
                hex::encode(root.root_hash)
            )
        );
        let blob = client.audit_blob(name).await.expect("a blob verifies");
        let on_disk = std::fs::read(out.path().join(name)).expect("blob file");
        assert_eq!(on_disk, blob.bytes);
    }
    // Retention: only the newest two epochs' blobs stay in the directory.
    let kept = tempfile::tempdir().expect("temp dir");
    let (addr_copy, dir) = (addr.to_string(), kept.path().to_path_buf());
    let written = tokio::task::spawn_blocking(move || {
        ktd_at(
            &addr_copy,
            &[
                "audit-blobs",
                "--out",
                &dir.display().to_string(),
                "--keep",
                "2",
            ],
        )
    })
    .await
    .expect("ktd audit-blobs --keep");
    assert!(written.status.success(), "{written:?}");
    let mut epochs: Vec<u64> = std::fs::read_dir(kept.path())
        .expect("read")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    epochs.sort_unstable();
    assert_eq!(epochs, vec![latest - 1, latest]);
    let mut raw = client.directory();
    let forged = names[0].replace('/', "/00");
    for (name, expected) in [
        (forged.as_str(), Code::InvalidArgument),
        ("0/aa/bb", Code::InvalidArgument),
        (
            &format!("{}/{}/{}", latest + 5, "00".repeat(32), "11".repeat(32))[..],
            Code::NotFound,
        ),
    ] {
        let status = raw
            .get_audit_blob(api::GetAuditBlobRequest {
                name: name.to_string(),
            })
            .await
            .expect_err("a bad name");
        assert_eq!(status.code(), expected, "{name}: {status:?}");
    }
}

/// `ktd audit-blobs --to file://DIR --follow` is killed (SIGKILL) while epochs are published; a
/// staging file is left where a kill mid-put leaves one; a rerun uploads exactly the epochs that
/// are missing, every epoch 1..=latest is stored once with the bytes the gateway serves, and the
/// staging file is never taken for a blob. A store holding another history for an epoch is
/// refused, and nothing in it is changed.
async fn audit_blobs_resume_after_a_kill(client: &ktd_client::Client, addr: &str) {
    use std::io::BufRead;
    let out = tempfile::tempdir().expect("temp dir");
    let target = format!("file://{}", out.path().display());
    let mut follower = crate::support::cli::command()
        .arg("--addr")
        .arg(format!("http://{addr}"))
        .args(["audit-blobs", "--to", &target, "--follow"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn ktd audit-blobs --follow");
    let stdout = follower.stdout.take().expect("piped");
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    let first = tokio::task::spawn_blocking(move || {
        let first = received.recv_timeout(Duration::from_secs(30));
        (first, received)
    });
    let (first, received) = first.await.expect("reader");
    let first = first.expect("a first blob stored").expect("utf-8");
    assert!(first.contains("verified, stored"), "{first}");
    // The follower is busy with new epochs when it is killed.
    publish_epochs(client, "follow-kill", 3, 1).await;
    follower.kill().expect("SIGKILL");
    follower.wait().expect("reaped");
    drop(received);
    let stored_before = ktd_client::BlobDir::new(out.path())
        .read_from(1, usize::MAX)
        .expect("read")
        .0
        .len() as u64;
    let latest = publish_epochs(client, "after-kill", 2, 1).await;
    let (names, _) = client.audit_blob_names(1, 0).await.expect("list");
    assert_eq!(names.len() as u64, latest);
    let newest = &names[names.len() - 1];
    let staging = out.path().join(format!("{newest}#4"));
    std::fs::create_dir_all(staging.parent().expect("nested")).expect("dirs");
    std::fs::write(&staging, b"half a blob").expect("staging file");

    let (rerun_addr, rerun_target) = (addr.to_string(), target.clone());
    let rerun = tokio::task::spawn_blocking(move || {
        ktd_at(&rerun_addr, &["audit-blobs", "--to", &rerun_target])
    })
    .await
    .expect("rerun");
    assert!(rerun.status.success(), "{rerun:?}");
    let text = String::from_utf8_lossy(&rerun.stdout);
    let uploaded = text
        .lines()
        .filter(|line| line.contains(", stored"))
        .count() as u64;
    assert_eq!(
        uploaded,
        latest - stored_before,
        "the rerun uploads what is missing and nothing else:\n{text}"
    );
    assert!(
        !text.contains("already stored"),
        "stored epochs are skipped from the listing, not fetched again:\n{text}"
    );
    for name in &names {
        let blob = client.audit_blob(name).await.expect("a blob verifies");
        let stored = std::fs::read(out.path().join(name)).expect("stored blob");
        assert_eq!(stored, blob.bytes, "{name}");
    }
    let (read, highest) = ktd_client::BlobDir::new(out.path())
        .read_from(1, usize::MAX)
        .expect("read");
    assert_eq!((read.len() as u64, highest), (latest, latest));

    // Another history for epoch 1 (as after a restore to an earlier epoch): refused.
    let moved = out.path().join(&names[0]).with_file_name("ff".repeat(32));
    std::fs::rename(out.path().join(&names[0]), &moved).expect("rename");
    let refused = tokio::task::spawn_blocking({
        let (addr, target) = (addr.to_string(), target.clone());
        move || ktd_at(&addr, &["audit-blobs", "--to", &target])
    })
    .await
    .expect("refused run");
    assert!(!refused.status.success(), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("epoch 1 is stored as") && stderr.contains("no longer serves"),
        "{stderr}"
    );
    assert!(moved.exists() && !out.path().join(&names[0]).exists());
}

#[test]
fn ktd_bench_compare_akd_replays_the_same_batches_with_equal_roots() {
    with_deadline(Duration::from_secs(180), || async {
        let root = tempfile::tempdir().expect("temp dir");
        let mut dev = KtdNode::dev(
            KTD,
            root.path(),
            "127.0.0.44",
            &["--epoch-interval", "300ms"],
        );
        dev.spawn(&[]);
        connect(&dev.addr).await;
        let seed = root.path().join("dev").join("vrf-seed.hex");
        let report_dir = root.path().join("report");
        let (addr, seed_arg, dir) = (
            dev.addr.clone(),
            seed.display().to_string(),
            report_dir.display().to_string(),
        );
        let output = tokio::task::spawn_blocking(move || {
            ktd_at(
                &addr,
                &[
                    "bench",
                    "--rate",
                    "100",
                    "--duration",
                    "3s",
                    "--preload",
                    "2000",
                    "--mix",
                    "publish=1,lookup=1",
                    "--batch",
                    "5",
                    "--report",
                    &dir,
                    "--compare-akd",
                    "--vrf-seed-file",
                    &seed_arg,
                ],
            )
        })
        .await
        .expect("ktd bench");
        assert!(output.status.success(), "{output:?}");
        let text = std::fs::read_to_string(report_dir.join("report.json")).expect("report");
        let report: ktd::bench::Report = serde_json::from_str(&text).expect("a report");
        let comparison = report.compare_akd.expect("a comparison");
        assert!(comparison.roots_compared >= 3, "{comparison:?}");
        assert_eq!(
            comparison.roots_equal, comparison.roots_compared,
            "{comparison:?}"
        );
        assert!(
            comparison.epochs >= 1 && comparison.seal_ratio > 0.0,
            "{comparison:?}"
        );
        assert!(comparison.ktd_lookup_median_ms > 0.0 && comparison.akd_lookup_median_ms > 0.0);
        let markdown = std::fs::read_to_string(report_dir.join("report.md")).expect("md");
        assert!(markdown.contains("ktd vs stock akd"), "{markdown}");
    })
}

/// `ktd bench` against the instance: a report with no errors, and a baseline comparison with
/// itself passes while an impossible baseline fails the command.
async fn bench_reports(addr: &str, pid: u32, root: &std::path::Path) {
    let report_dir = root.join("bench-report");
    let (addr, dir) = (addr.to_string(), report_dir.clone());
    let server = format!("dev={pid}");
    let run = move |extra: Vec<String>| {
        let mut args = vec![
            "bench",
            "--rate",
            "100",
            "--duration",
            "2s",
            "--preload",
            "300",
            "--concurrency",
            "2",
            "--mix",
            "publish=1,lookup=6,history=2,audit=1",
            "--report",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        args.push(dir.display().to_string());
        args.extend(["--server-pid".to_string(), server.clone()]);
        args.extend(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ktd_at(&addr, &args)
    };
    let first = tokio::task::spawn_blocking({
        let run = run.clone();
        move || run(Vec::new())
    })
    .await
    .expect("ktd bench");
    assert!(first.status.success(), "{first:?}");
    let text = std::fs::read_to_string(report_dir.join("report.json")).expect("report.json");
    let report: ktd::bench::Report = serde_json::from_str(&text).expect("a report");
    assert!(report.calls.contains_key("lookup") && report.calls.contains_key("publish"));
    for (name, call) in &report.calls {
        assert!(call.errors.is_empty(), "{name}: {:?}", call.errors);
    }
    assert!(report_dir.join("timeline.svg").exists() && report_dir.join("report.md").exists());
    // Epochs committed during the run, with their size and seal latency from the sequencer.
    assert!(
        report
            .epochs
            .iter()
            .any(|epoch| epoch.updates > 0 && epoch.seal_ms > 0.0),
        "{:?}",
        report.epochs
    );
    assert!(report.seal_p50_ms > 0.0 && report.seal_max_ms >= report.seal_p99_ms);
    let usage = &report.servers["dev"];
    assert!(
        usage.samples >= 1 && usage.rss_max_mib > 1.0 && usage.cpu_percent_max > 0.0,
        "{usage:?}"
    );

    let mut impossible = report.clone();
    impossible.ok_per_second *= 100.0;
    let baseline = root.join("impossible.json");
    std::fs::write(&baseline, serde_json::to_string(&impossible).expect("json")).expect("write");
    let compared = tokio::task::spawn_blocking(move || {
        run(vec!["--baseline".into(), baseline.display().to_string()])
    })
    .await
    .expect("ktd bench");
    assert!(
        !compared.status.success(),
        "a 100x baseline must fail the run"
    );
    assert!(String::from_utf8_lossy(&compared.stderr).contains("regression"));
}

/// Every status a bad request gets, and the server still answers afterwards.
async fn bad_input_is_refused(
    addr: &str,
    client: &mut api::directory_client::DirectoryClient<tonic::transport::Channel>,
) {
    let publish = |label: Vec<u8>, value: Vec<u8>| api::PublishRequest {
        updates: vec![api::Update { label, value }],
        idempotency_key: String::new(),
    };
    assert_eq!(
        code(&client.publish(publish(Vec::new(), b"v".to_vec())).await),
        Some(Code::InvalidArgument),
        "empty label"
    );
    assert_eq!(
        code(
            &client
                .publish(publish(b"big".to_vec(), vec![7; 64 * 1024 + 1]))
                .await
        ),
        Some(Code::InvalidArgument),
        "a value over 64 KiB"
    );
    assert_eq!(
        code(&client.publish(api::PublishRequest::default()).await),
        Some(Code::InvalidArgument),
        "no updates"
    );
    let future = client
        .get_epoch(api::GetEpochRequest {
            epoch: Some(1_000_000),
            wait: false,
        })
        .await
        .expect_err("an epoch in the future");
    assert_eq!(future.code(), Code::NotFound);
    assert!(
        future
            .metadata()
            .get(gateway::error::LATEST_EPOCH_METADATA)
            .is_some()
    );
    assert_eq!(
        code(
            &client
                .lookup(api::LookupRequest {
                    label: Vec::new(),
                    epoch: None
                })
                .await
        ),
        Some(Code::InvalidArgument),
        "lookup of an empty label"
    );
    assert_eq!(
        code(
            &client
                .lookup(api::LookupRequest {
                    label: b"nobody".to_vec(),
                    epoch: None
                })
                .await
        ),
        Some(Code::NotFound),
        "a label never published"
    );
    assert_eq!(
        code(
            &client
                .audit(api::AuditRequest {
                    start_epoch: 5,
                    end_epoch: 2
                })
                .await
        ),
        Some(Code::InvalidArgument),
        "start > end"
    );
    // A deadline shorter than the wait: DEADLINE_EXCEEDED, not a hang.
    let mut waiting = tonic::Request::new(api::GetEpochRequest {
        epoch: Some(1_000_000),
        wait: true,
    });
    waiting.set_timeout(Duration::from_millis(300));
    let status = client
        .get_epoch(waiting)
        .await
        .expect_err("cannot be committed in time");
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    // Garbage bytes where a LookupRequest belongs: gRPC's code for an unparseable message.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut raw = tonic::client::Grpc::new(channel);
    raw.ready().await.expect("ready");
    let garbage = raw
        .unary::<Garbage, api::LookupResponse, _>(
            tonic::Request::new(Garbage {
                not_bytes: 0xdead_beef,
            }),
            "/ktd.v1.Directory/Lookup".parse().expect("path"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .expect_err("garbage");
    assert_eq!(garbage.code(), Code::Internal, "{garbage:?}");
}

/// Field 1 of `LookupRequest` is `bytes`; this sends a fixed64 there.
#[derive(Clone, PartialEq, prost::Message)]
struct Garbage {
    #[prost(fixed64, tag = "1")]
    not_bytes: u64,
}

#[test]
fn ktd_dev_serves_the_readme_flow_and_refuses_bad_input() {
    with_deadline(Duration::from_secs(180), || async {
        let root = tempfile::tempdir().expect("temp dir");
        let metrics_addr = free_addr("127.0.0.41");
        let mut dev = dev_node(root.path(), &metrics_addr);
        dev.spawn(&[]);
        let client = connect(&dev.addr).await;

        let addr = dev.addr.clone();
        let published = tokio::task::spawn_blocking(move || {
            let publish = ktd_at(&addr, &["publish", "alice", "key-1", "--wait"]);
            let lookup = ktd_at(&addr, &["lookup", "alice", "--verify"]);
            (publish, lookup)
        })
        .await
        .expect("client processes");
        let (publish, lookup) = published;
        assert!(publish.status.success(), "{publish:?}\n{}", dev.log_text());
        let lookup_text = String::from_utf8_lossy(&lookup.stdout);
        assert!(lookup.status.success(), "{lookup:?}");
        assert!(
            lookup_text.contains("alice = \"key-1\"") && lookup_text.contains("verified with akd"),
            "{lookup_text}"
        );

        audit_blobs_verify(&client, &dev.addr).await;
        audit_blobs_resume_after_a_kill(&client, &dev.addr).await;

        let mut raw = client.directory();
        bad_input_is_refused(&dev.addr, &mut raw).await;

        bench_reports(&dev.addr, dev.pid().expect("running"), root.path()).await;

        // Overload: more concurrent requests than in-flight permits (4).
        let answers = futures::future::join_all((0..64).map(|_| {
            let mut raw = client.directory();
            async move {
                raw.key_history(api::KeyHistoryRequest {
                    label: b"alice".to_vec(),
                    most_recent: 0,
                    epoch: None,
                })
                .await
            }
        }))
        .await;
        let exhausted = answers
            .iter()
            .filter(
                |answer| matches!(answer, Err(status) if status.code() == Code::ResourceExhausted),
            )
            .count();
        assert!(
            answers.iter().all(|answer| match answer {
                Ok(_) => true,
                Err(status) => status.code() == Code::ResourceExhausted,
            }),
            "only RESOURCE_EXHAUSTED may fail: {answers:?}"
        );
        assert!(
            exhausted > 0,
            "64 concurrent requests never exceeded 4 permits"
        );

        // Prometheus metrics: gRPC calls by method and code, Raft, epochs, pre-computation.
        let metrics = http_get(metrics_addr.parse().expect("addr"), "/metrics").await;
        for name in [
            "ktd_grpc_server_handled_total{service=\"ktd.v1.Directory\",method=\"Lookup\",code=\"Ok\"}",
            "ktd_grpc_server_handled_total{service=\"ktd.v1.Directory\",method=\"Publish\",code=\"InvalidArgument\"}",
            "code=\"ResourceExhausted\"}",
            "ktd_grpc_server_handling_seconds",
            "ktd_raft_term",
            "ktd_raft_is_leader 1",
            "ktd_epoch_last_committed",
            "ktd_epoch_pending_updates",
            "ktd_epoch_latest_seen_timestamp_seconds",
            "ktd_epochs_committed_total",
            "ktd_epoch_commit_duration_seconds",
            "ktd_shard_precomputed_labels_total",
        ] {
            assert!(
                metrics.contains(name),
                "{name} missing from /metrics:\n{metrics}"
            );
        }

        // Still serving after all of that; then a clean stop and a restart from the data dir.
        let before = client.lookup(b"alice", None).await.expect("lookup");
        let status = dev.terminate(Duration::from_secs(30));
        assert!(
            status.success(),
            "ktd dev exited with {status:?}\n{}",
            dev.log_text()
        );
        dev.spawn(&[]);
        let client = connect(&dev.addr).await;
        let after = client
            .lookup(b"alice", None)
            .await
            .expect("lookup after restart");
        assert_eq!(after, before);
    });
}

/// A Directory client whose connection comes from `local_ip` (a caller of its own, by IP).
async fn directory_from(
    addr: &str,
    local_ip: &str,
) -> api::directory_client::DirectoryClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .local_address(Some(local_ip.parse().expect("ip")))
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(20))
        .connect()
        .await
        .expect("connect");
    api::directory_client::DirectoryClient::new(channel)
}

#[test]
fn a_caller_past_its_budget_of_complete_histories_is_refused_with_a_retry_hint_while_another_is_served()
 {
    with_deadline(Duration::from_secs(120), || async {
        let dir = tempfile::tempdir().expect("temp dir");
        let extra = [
            "--epoch-interval",
            "200ms",
            "--expensive-reads-per-second",
            "0.001",
            "--expensive-reads-burst",
            "3",
        ];
        let mut dev = KtdNode::dev(KTD, dir.path(), "127.0.0.47", &extra);
        dev.spawn(&[]);
        let addr = dev.addr.clone();
        let client = connect(&addr).await;
        publish_epochs(&client, "budget", 1, 1).await;
        let history = || api::KeyHistoryRequest {
            label: b"budget-0-0".to_vec(),
            most_recent: 0,
            epoch: None,
        };
        let mut greedy = directory_from(&addr, "127.0.0.48").await;
        for call in 0..3 {
            greedy
                .key_history(history())
                .await
                .unwrap_or_else(|status| panic!("call {call} is within the burst: {status:?}"));
        }
        let refused = greedy
            .key_history(history())
            .await
            .expect_err("the fourth complete history is past the budget");
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        assert!(refused.message().contains("retry in"), "{refused:?}");
        let retry_after: u64 = refused
            .metadata()
            .get("ktd-retry-after-ms")
            .expect("a retry hint")
            .to_str()
            .expect("ascii")
            .parse()
            .expect("milliseconds");
        assert!(retry_after > 1000, "{retry_after} ms");
        // Another caller has its own budget; cheap reads of the greedy one still pass.
        let mut other = directory_from(&addr, "127.0.0.49").await;
        other
            .key_history(history())
            .await
            .expect("another caller is served");
        greedy
            .key_history(api::KeyHistoryRequest {
                most_recent: 1,
                ..history()
            })
            .await
            .expect("a short history costs no budget");
    });
}
