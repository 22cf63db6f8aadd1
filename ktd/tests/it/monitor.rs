//! `ktd monitor` against a live `ktd dev`, as a key owner runs it: an expected new key passes
//! quietly, an unexpected one is reported within one epoch, and forged answers from a proxy in
//! front of the gateway (a wrong root, another label's history) are verification failures, never
//! key changes; a second gateway serving another root is a fork.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use ktd_proto::ktd::v1 as api;
use ktd_proto::ktd::v1::directory_client::DirectoryClient;
use ktd_proto::ktd::v1::directory_server::{Directory, DirectoryServer};
use ktd_testkit::process::KtdNode;
use ktd_testkit::with_deadline;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::support::KTD;
use crate::support::cli::ktd_at;
use crate::support::cluster::connect;

/// What the proxy does to answers.
const HONEST: u8 = 0;
/// Every root it passes on (epochs, histories, lookups) has its first byte flipped.
const WRONG_ROOT: u8 = 1;
/// A history is answered with another label's (real, verifying) history.
const OTHER_HISTORY: u8 = 2;

/// A `ktd.v1.Directory` in front of a real gateway that forges on demand.
struct ForgingProxy {
    upstream: DirectoryClient<Channel>,
    mode: Arc<AtomicU8>,
    other_label: Vec<u8>,
}

fn flip(hash: &mut Option<api::EpochHash>) {
    if let Some(hash) = hash
        && let Some(byte) = hash.root_hash.first_mut()
    {
        *byte ^= 0xff;
    }
}

impl ForgingProxy {
    fn mode(&self) -> u8 {
        self.mode.load(Ordering::SeqCst)
    }
}

#[tonic::async_trait]
impl Directory for ForgingProxy {
    async fn publish(
        &self,
        request: Request<api::PublishRequest>,
    ) -> Result<Response<api::PublishResponse>, Status> {
        self.upstream.clone().publish(request.into_inner()).await
    }
    async fn get_epoch(
        &self,
        request: Request<api::GetEpochRequest>,
    ) -> Result<Response<api::EpochHash>, Status> {
        let mut answer = self
            .upstream
            .clone()
            .get_epoch(request.into_inner())
            .await?;
        if self.mode() == WRONG_ROOT {
            let mut hash = Some(answer.get_ref().clone());
            flip(&mut hash);
            *answer.get_mut() = hash.unwrap_or_default();
        }
        Ok(answer)
    }
    async fn lookup(
        &self,
        request: Request<api::LookupRequest>,
    ) -> Result<Response<api::LookupResponse>, Status> {
        let mut answer = self.upstream.clone().lookup(request.into_inner()).await?;
        if self.mode() == WRONG_ROOT {
            flip(&mut answer.get_mut().epoch_hash);
        }
        Ok(answer)
    }
    async fn prove_absence(
        &self,
        request: Request<api::ProveAbsenceRequest>,
    ) -> Result<Response<api::ProveAbsenceResponse>, Status> {
        self.upstream
            .clone()
            .prove_absence(request.into_inner())
            .await
    }
    async fn key_history(
        &self,
        request: Request<api::KeyHistoryRequest>,
    ) -> Result<Response<api::KeyHistoryResponse>, Status> {
        let mut request = request.into_inner();
        if self.mode() == OTHER_HISTORY {
            request.label = self.other_label.clone();
        }
        let mut answer = self.upstream.clone().key_history(request).await?;
        if self.mode() == WRONG_ROOT {
            flip(&mut answer.get_mut().epoch_hash);
        }
        Ok(answer)
    }
    async fn audit(
        &self,
        request: Request<api::AuditRequest>,
    ) -> Result<Response<api::AuditResponse>, Status> {
        self.upstream.clone().audit(request.into_inner()).await
    }
    async fn list_audit_blobs(
        &self,
        request: Request<api::ListAuditBlobsRequest>,
    ) -> Result<Response<api::ListAuditBlobsResponse>, Status> {
        self.upstream
            .clone()
            .list_audit_blobs(request.into_inner())
            .await
    }
    async fn get_audit_blob(
        &self,
        request: Request<api::GetAuditBlobRequest>,
    ) -> Result<Response<api::AuditBlob>, Status> {
        self.upstream
            .clone()
            .get_audit_blob(request.into_inner())
            .await
    }
    async fn get_public_key(
        &self,
        request: Request<api::GetPublicKeyRequest>,
    ) -> Result<Response<api::PublicKeyResponse>, Status> {
        self.upstream
            .clone()
            .get_public_key(request.into_inner())
            .await
    }
}

/// Starts a forging proxy for the gateway at `upstream` on 127.0.0.x; returns its address and
/// its mode switch.
async fn start_proxy(upstream: &str, ip: &str, other_label: &[u8]) -> (String, Arc<AtomicU8>) {
    let channel = Channel::from_shared(format!("http://{upstream}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect upstream");
    let mode = Arc::new(AtomicU8::new(HONEST));
    let proxy = ForgingProxy {
        upstream: DirectoryClient::new(channel),
        mode: mode.clone(),
        other_label: other_label.to_vec(),
    };
    let listener = tokio::net::TcpListener::bind(format!("{ip}:0"))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DirectoryServer::new(proxy))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (addr, mode)
}

/// `ktd --addr http://ADDR monitor ARGS --once`, off the runtime.
async fn monitor_once(addr: &str, args: Vec<String>) -> std::process::Output {
    let addr = addr.to_string();
    tokio::task::spawn_blocking(move || {
        let mut full = vec!["monitor".to_string()];
        full.extend(args);
        full.push("--once".into());
        ktd_at(&addr, &full)
    })
    .await
    .expect("ktd monitor")
}

fn text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn a_key_owners_monitor_passes_expected_keys_reports_unexpected_ones_and_tells_forgeries_from_key_changes()
 {
    with_deadline(Duration::from_secs(150), || async {
        let root = tempfile::tempdir().expect("temp dir");
        let mut dev = KtdNode::dev(
            KTD,
            root.path(),
            "127.0.0.54",
            &["--epoch-interval", "200ms"],
        );
        dev.spawn(&[]);
        let client = connect(&dev.addr).await;
        let publish = |label: &'static str, value: &'static str| {
            let client = client.clone();
            async move {
                let published = client
                    .publish(
                        vec![(label.as_bytes().to_vec(), value.as_bytes().to_vec())],
                        None,
                    )
                    .await
                    .expect("publish");
                client
                    .wait_for_epoch(published.epoch)
                    .await
                    .expect("commit")
                    .epoch
            }
        };
        publish("alice", "alice-key-1").await;
        publish("mallory", "mallory-key-1").await;

        let state = root.path().join("monitor/state.json");
        let expect = root.path().join("expected.txt");
        std::fs::write(&expect, "alice alice-key-1\n").expect("expectations");
        let args = vec![
            "--label".to_string(),
            "alice".into(),
            "--label".into(),
            "bob".into(),
            "--state".into(),
            state.display().to_string(),
            "--expect".into(),
            expect.display().to_string(),
        ];
        // First round: alice's key is the baseline, bob was never published (verified absence).
        let first = monitor_once(&dev.addr, args.clone()).await;
        assert!(first.status.success(), "{}", text(&first));
        assert!(
            text(&first).contains("2 labels verified, no alarm"),
            "{}",
            text(&first)
        );

        // The key owner announces alice's next key, then publishes it: quiet.
        std::fs::write(&expect, "alice alice-key-1\nalice alice-key-2\n").expect("expectations");
        publish("alice", "alice-key-2").await;
        let expected = monitor_once(&dev.addr, args.clone()).await;
        assert!(expected.status.success(), "{}", text(&expected));

        // Someone else publishes a key for alice: reported at the next epoch's round, also to
        // the webhook.
        let received = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let hook = tokio::net::TcpListener::bind("127.0.0.54:0")
            .await
            .expect("bind");
        let hook_addr = hook.local_addr().expect("addr");
        let sink = received.clone();
        tokio::spawn(async move {
            let app = axum::Router::new().route(
                "/hook",
                axum::routing::post(move |body: String| async move {
                    sink.lock().expect("lock").push(body);
                    "ok"
                }),
            );
            axum::serve(hook, app).await
        });
        let epoch = publish("alice", "attacker-key").await;
        let mut with_hook = args.clone();
        with_hook.extend(["--webhook".to_string(), format!("http://{hook_addr}/hook")]);
        let unexpected = monitor_once(&dev.addr, with_hook).await;
        let report = text(&unexpected);
        assert_eq!(unexpected.status.code(), Some(1), "{report}");
        assert!(
            report.contains(&format!(
                "UNEXPECTED KEY CHANGE: alice version 3 (epoch {epoch}) = {}",
                hex::encode("attacker-key")
            )),
            "{report}"
        );
        let posted = received.lock().expect("lock").clone();
        assert_eq!(posted.len(), 1, "{posted:?}");
        let alarm: serde_json::Value = serde_json::from_str(&posted[0]).expect("json");
        assert_eq!(alarm["kind"], "key_change");
        assert_eq!(alarm["label"], "alice");
        // Reported once: the next round is clean again.
        let after = monitor_once(&dev.addr, args.clone()).await;
        assert!(after.status.success(), "{}", text(&after));

        // Forged answers through a proxy: verification failures, not key changes.
        let (proxy, mode) = start_proxy(&dev.addr, "127.0.0.54", b"mallory").await;
        for (forgery, what) in [
            (WRONG_ROOT, "a wrong root"),
            (OTHER_HISTORY, "another label's history"),
        ] {
            mode.store(forgery, Ordering::SeqCst);
            publish("carol", "carol-key").await;
            let forged = monitor_once(&proxy, args.clone()).await;
            let report = text(&forged);
            assert_eq!(forged.status.code(), Some(1), "{what}: {report}");
            assert!(report.contains("VERIFICATION FAILED"), "{what}: {report}");
            assert!(!report.contains("KEY CHANGE"), "{what}: {report}");
        }
        mode.store(HONEST, Ordering::SeqCst);
        let honest = monitor_once(&proxy, args.clone()).await;
        assert!(honest.status.success(), "{}", text(&honest));
        let seen: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&state).expect("state")).expect("json");
        assert_eq!(
            seen["labels"]["alice"].as_array().map(Vec::len),
            Some(3),
            "forged rounds taught the monitor nothing: {seen}"
        );

        // A second gateway that serves another root: a fork.
        mode.store(WRONG_ROOT, Ordering::SeqCst);
        let mut with_other = args.clone();
        with_other.extend(["--also-gateway".to_string(), format!("http://{proxy}")]);
        let fork = monitor_once(&dev.addr, with_other).await;
        let report = text(&fork);
        assert_eq!(fork.status.code(), Some(1), "{report}");
        assert!(report.contains("FORK at epoch"), "{report}");
        dev.terminate(Duration::from_secs(10));
    });
}
