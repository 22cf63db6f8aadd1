//! `ktd auditor` against a live `ktd dev`: it verifies and signs every epoch, its signatures
//! verify with its public key and match the directory's roots, its HTTP API and dashboard show
//! the latest epoch, and a restart resumes without re-signing. Against doctored blob directories
//! (a forged proof, a gap, an epoch re-published with another root) it records the violation and
//! signs nothing over bad data.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ktd_auditor::{Auditor, AuditorSettings, BlobSource};
use ktd_client::Client;
use ktd_core::AkdConfig;
use ktd_testkit::fs::copy_dir;
use ktd_testkit::net::http_get;
use ktd_testkit::process::KtdNode;
use ktd_testkit::{eventually, with_deadline};
use tokio_util::sync::CancellationToken;

use crate::support;
use crate::support::KTD;
use crate::support::cli::ktd_at;
use crate::support::cluster::connect;

const NAMESPACE: &str = "test.key-transparency.v1";
const KEY: [u8; 32] = [0x33; 32];

fn settings(data_dir: &Path, source: BlobSource) -> AuditorSettings {
    AuditorSettings {
        namespace: NAMESPACE.into(),
        data_dir: data_dir.to_path_buf(),
        signing_key: KEY,
        config: AkdConfig::WhatsAppV1,
        start: None,
        source,
        poll: Duration::from_millis(50),
    }
}

/// Runs an auditor until `done` holds of it (`what`, within 30 s), then stops it.
async fn audit_until(
    settings: AuditorSettings,
    what: &str,
    done: impl Fn(&Auditor) -> bool,
) -> Arc<Auditor> {
    let auditor = Auditor::open(settings).expect("open auditor");
    let stop = CancellationToken::new();
    let follower = tokio::spawn(auditor.clone().follow(stop.clone()));
    eventually(what, Duration::from_secs(30), || async {
        done(&auditor).then_some(())
    })
    .await;
    stop.cancel();
    follower.await.expect("follower").expect("follow");
    auditor
}

/// `count` committed epochs of 5 updates (`audited-{round}-{i}`); the last epoch.
async fn publish_epochs(client: &Client, count: usize) -> u64 {
    support::cluster::publish_epochs(client, "audited", count, 5).await
}

#[test]
fn heartbeat_epochs_verify_with_stock_akd_and_get_signed() {
    with_deadline(Duration::from_secs(120), || async {
        let root = tempfile::tempdir().expect("temp dir");
        let mut dev = KtdNode::dev(
            KTD,
            root.path(),
            "127.0.0.43",
            &["--epoch-interval", "100ms", "--heartbeat-interval", "150ms"],
        );
        dev.spawn(&[]);
        let client = connect(&dev.addr).await;
        // No heartbeat before the first epoch with updates: an absence, so there is no
        // condition to poll for; 600 ms are four heartbeat intervals.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(client.epoch(None).await.expect("epoch").epoch, 0);
        let published = publish_epochs(&client, 1).await;
        // Nobody publishes: the leader seals heartbeat epochs, each with the same root.
        let last = client
            .wait_for_epoch(published + 3)
            .await
            .expect("heartbeat epochs commit");
        let first = client.epoch(Some(published)).await.expect("epoch");
        assert_eq!(
            last.root_hash, first.root_hash,
            "a heartbeat keeps the root"
        );
        // Their append-only steps verify with stock akd (audit_verify and the blob verifier).
        let audit = client
            .audit(published, last.epoch)
            .await
            .expect("stock audit_verify accepts heartbeat steps");
        assert_eq!(audit.roots.len() as u64, last.epoch - published + 1);
        let (names, _) = client
            .audit_blob_names(published + 1, 10)
            .await
            .expect("blob names");
        let blob = client.audit_blob(&names[0]).await.expect("verified blob");
        assert_eq!(blob.epoch, published + 1);
        // Lookups at a heartbeat epoch verify against its root.
        let found = client
            .lookup(b"audited-0-0", Some(last.epoch))
            .await
            .expect("lookup at a heartbeat epoch");
        assert_eq!((found.epoch, found.at), (published, last));
        // The auditor signs heartbeat epochs like any other.
        let source = BlobSource::Gateway(format!("http://{}", dev.addr));
        let auditor = audit_until(
            settings(&root.path().join("auditor"), source),
            "the heartbeat epochs to be signed",
            |auditor| {
                auditor
                    .latest()
                    .is_some_and(|head| head.epoch >= last.epoch)
            },
        )
        .await;
        assert!(
            auditor.violations().is_empty(),
            "{:?}",
            auditor.violations()
        );
        assert!(auditor.head(last.epoch).is_some(), "heartbeat epoch signed");
    })
}

fn start_dev(root: &Path) -> KtdNode {
    let mut dev = KtdNode::dev(KTD, root, "127.0.0.42", &["--epoch-interval", "100ms"]);
    dev.spawn(&[]);
    dev
}

#[test]
fn the_auditor_signs_every_epoch_of_a_live_directory_and_resumes() {
    with_deadline(Duration::from_secs(180), || async {
        let root = tempfile::tempdir().expect("temp dir");
        let dev = start_dev(root.path());
        let client = connect(&dev.addr).await;
        let latest = publish_epochs(&client, 3).await;
        let source = BlobSource::Gateway(format!("http://{}", dev.addr));
        let data_dir = root.path().join("auditor");
        let auditor = audit_until(
            settings(&data_dir, source.clone()),
            "every epoch to be signed",
            |auditor| auditor.latest().is_some_and(|head| head.epoch == latest),
        )
        .await;
        assert!(
            auditor.violations().is_empty(),
            "{:?}",
            auditor.violations()
        );
        for epoch in 1..=latest {
            let head = auditor.head(epoch).expect("every epoch signed");
            let message = auditor.head_message(&head).expect("message");
            let (signed_epoch, signed_root) =
                ktd_client::head::verify_head(&auditor.public_key(), NAMESPACE, &message)
                    .expect("the signature verifies");
            let root = client.epoch(Some(epoch)).await.expect("epoch");
            assert_eq!((signed_epoch, signed_root), (epoch, root.root_hash));
            assert!(
                ktd_client::head::verify_head(&auditor.public_key(), "other.namespace", &message)
                    .is_err()
            );
            let mut tampered = message.clone();
            tampered.signed_bytes[3] ^= 1;
            assert!(
                ktd_client::head::verify_head(&auditor.public_key(), NAMESPACE, &tampered).is_err()
            );
        }

        // HTTP API and dashboard.
        let (http_addr, stop, server) = serve_auditor(auditor.clone()).await;
        let last = http_get(
            http_addr,
            &format!("/namespaces/{NAMESPACE}/last-verified-epoch"),
        )
        .await;
        assert!(last.starts_with("HTTP/1.1 200"), "{last}");
        assert!(last.contains(&format!("\"epoch\":{latest}")), "{last}");
        let page = http_get(http_addr, "/").await;
        assert!(
            page.contains(&format!("id=\"latest-epoch\">{latest}<")),
            "{page}"
        );
        assert!(page.contains("No rule violations"), "{page}");
        let missing = http_get(http_addr, &format!("/namespaces/{NAMESPACE}/audits/999")).await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let _ = stop.send(());
        server.await.expect("server").expect("serve");

        // A restart resumes from the data directory: earlier heads are kept, not re-signed.
        let signed_before = auditor.head(1).expect("head 1");
        drop(auditor);
        let latest = publish_epochs(&client, 1).await;
        let auditor = audit_until(
            settings(&data_dir, source),
            "the new epoch to be signed after the restart",
            |auditor| auditor.latest().is_some_and(|head| head.epoch == latest),
        )
        .await;
        assert_eq!(auditor.head(1), Some(signed_before));
        let lines = std::fs::read_to_string(data_dir.join("heads.jsonl")).expect("heads");
        assert_eq!(
            lines.lines().count() as u64,
            latest,
            "one persisted head per epoch"
        );
    });
}

/// The DOM of `url` after Chromium (Debian's `chromium`, headless) loaded it. `./x.sh test`
/// installs Chromium; `KTD_CHROMIUM` names another binary.
async fn chromium_dom(url: &str, profile: &Path) -> String {
    let binary = std::env::var("KTD_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&binary).exists(),
        "{binary} is missing: the dashboard test needs Debian's chromium (./x.sh test installs it; \
         or set KTD_CHROMIUM)"
    );
    let mut command = tokio::process::Command::new(&binary);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=2000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(url)
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("chromium finished within 60 s")
        .expect("run chromium");
    assert!(output.status.success(), "chromium failed: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Serves `auditor` on ephemeral ports; the HTTP address and a stop handle.
async fn serve_auditor(
    auditor: Arc<Auditor>,
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let http = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let http_addr = http.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(ktd_auditor::server::serve(auditor, grpc, http, async {
        let _ = stopped.await;
    }));
    (http_addr, stop, server)
}

#[test]
fn the_dashboard_renders_in_headless_chromium() {
    with_deadline(Duration::from_secs(240), || async {
        let root = tempfile::tempdir().expect("temp dir");
        let dev = start_dev(root.path());
        let client = connect(&dev.addr).await;
        let latest = publish_epochs(&client, 2).await;

        // A live auditor following the directory, served while it follows.
        let source = BlobSource::Gateway(format!("http://{}", dev.addr));
        let auditor =
            Auditor::open(settings(&root.path().join("auditor"), source)).expect("open auditor");
        let stop_following = CancellationToken::new();
        let follower = tokio::spawn(auditor.clone().follow(stop_following.clone()));
        let (http_addr, stop, server) = serve_auditor(auditor.clone()).await;
        let signed = |epoch: u64| {
            let auditor = auditor.clone();
            async move {
                eventually(
                    &format!("epoch {epoch} to be signed"),
                    Duration::from_secs(30),
                    || async {
                        auditor
                            .latest()
                            .is_some_and(|head| head.epoch >= epoch)
                            .then_some(())
                    },
                )
                .await;
            }
        };
        signed(latest).await;
        let url = format!("http://{http_addr}/");
        let dom = chromium_dom(&url, &root.path().join("chromium-1")).await;
        assert!(
            dom.contains(&format!("id=\"latest-epoch\">{latest}<")),
            "{dom}"
        );
        assert!(dom.contains("No rule violations"), "{dom}");
        let root_hex = hex::encode(client.epoch(Some(latest)).await.expect("epoch").root_hash);
        assert!(
            dom.contains(&root_hex),
            "the page shows the verified root: {dom}"
        );

        // After a publish, the page shows the new epoch.
        let newer = publish_epochs(&client, 1).await;
        assert!(newer > latest);
        signed(newer).await;
        let dom = chromium_dom(&url, &root.path().join("chromium-2")).await;
        assert!(
            dom.contains(&format!("id=\"latest-epoch\">{newer}<")),
            "{dom}"
        );
        stop_following.cancel();
        follower.await.expect("follower").expect("follow");
        let _ = stop.send(());
        server.await.expect("server").expect("serve");

        // Fed a forged history, it shows the violation.
        let blobs = root.path().join("blobs");
        write_blobs(&dev.addr, &blobs).await;
        forge_blob(&blobs, 2);
        let forged = audit_until(
            settings(
                &root.path().join("auditor-forged"),
                BlobSource::Directory(blobs),
            ),
            "a violation of the forged history",
            |auditor| !auditor.violations().is_empty(),
        )
        .await;
        let (http_addr, stop, server) = serve_auditor(forged).await;
        let dom = chromium_dom(
            &format!("http://{http_addr}/"),
            &root.path().join("chromium-3"),
        )
        .await;
        assert!(dom.contains("id=\"status\">Rule violations<"), "{dom}");
        assert!(dom.contains("epoch 2:"), "{dom}");
        assert!(dom.contains("id=\"latest-epoch\">1<"), "{dom}");
        let _ = stop.send(());
        server.await.expect("server").expect("serve");
    })
}

/// `ktd audit-blobs --out dir` against the directory at `addr` (all committed epochs).
async fn write_blobs(addr: &str, dir: &Path) {
    let (addr, out) = (addr.to_string(), dir.to_path_buf());
    let written = tokio::task::spawn_blocking(move || {
        ktd_at(
            &addr,
            &["audit-blobs".as_ref(), "--out".as_ref(), out.as_os_str()],
        )
    })
    .await
    .expect("blocking");
    assert!(written.status.success(), "{written:?}");
}

/// Flips bits in the last byte of epoch `epoch`'s blob in `dir`: a proof that cannot verify.
fn forge_blob(dir: &Path, epoch: u64) {
    let blob = blob_of(dir, epoch);
    let mut bytes = std::fs::read(&blob).expect("blob");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&blob, bytes).expect("write");
}

/// The only blob file of epoch `epoch` in `dir`.
fn blob_of(dir: &Path, epoch: u64) -> PathBuf {
    let epoch_dir = dir.join(epoch.to_string());
    let previous = std::fs::read_dir(&epoch_dir)
        .expect("epoch dir")
        .next()
        .expect("one")
        .expect("entry");
    std::fs::read_dir(previous.path())
        .expect("dir")
        .next()
        .expect("one")
        .expect("entry")
        .path()
}

#[test]
fn the_auditor_refuses_forged_gapped_and_republished_histories() {
    with_deadline(Duration::from_secs(180), || async {
        let root = tempfile::tempdir().expect("temp dir");
        let dev = start_dev(root.path());
        let client = connect(&dev.addr).await;
        publish_epochs(&client, 3).await;
        let blobs = root.path().join("blobs");
        write_blobs(&dev.addr, &blobs).await;

        let case = |name: &str| {
            let dir = root.path().join(name);
            copy_dir(&blobs, &dir);
            dir
        };
        let run = |dir: PathBuf, name: &str| {
            let data_dir = root.path().join(format!("auditor-{name}"));
            audit_until(
                settings(&data_dir, BlobSource::Directory(dir)),
                "a violation",
                |auditor| !auditor.violations().is_empty(),
            )
        };

        // A forged proof for epoch 2: epoch 1 is signed, 2 and later are not.
        let forged = case("forged");
        forge_blob(&forged, 2);
        let auditor = run(forged, "forged").await;
        assert!(
            auditor.head(1).is_some() && auditor.head(2).is_none() && auditor.head(3).is_none()
        );
        assert!(
            auditor.violations()[0].starts_with("epoch 2:"),
            "{:?}",
            auditor.violations()
        );

        // A gap: epoch 2 missing.
        let gapped = case("gapped");
        std::fs::remove_dir_all(gapped.join("2")).expect("remove");
        let auditor = run(gapped, "gapped").await;
        assert!(auditor.head(1).is_some() && auditor.head(3).is_none());
        assert!(
            auditor.violations()[0].contains("gap"),
            "{:?}",
            auditor.violations()
        );

        // Epoch 2 published again with another root (a fork): no signature over it.
        let forked = case("forked");
        let genuine = blob_of(&forked, 2);
        let previous_dir = genuine.parent().expect("parent");
        std::fs::copy(&genuine, previous_dir.join("ff".repeat(32))).expect("fork");
        let auditor = run(forked, "forked").await;
        let signed_roots: Vec<String> = (1..=3)
            .filter_map(|epoch| auditor.head(epoch))
            .map(|head| head.digest)
            .collect();
        assert!(
            !signed_roots.contains(&"ff".repeat(32)),
            "signed the forged root"
        );
        assert!(!auditor.violations().is_empty());
        let page = ktd_auditor::server::dashboard(&auditor, 0);
        assert!(page.contains("Rule violations"), "{page}");
    });
}
