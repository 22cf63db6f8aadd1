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
        log_directory: None,
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
        plexi_api_answers_as_plexi_reads_it(http_addr, &auditor, latest).await;
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
        // The charts are drawn from the live epochs: one point per verified epoch (cadence:
        // one per consecutive pair), commit times from the gateway.
        for (chart, points) in [
            ("chart-proof-bytes", newer),
            ("chart-verify", newer),
            ("chart-lag", newer),
            ("chart-cadence", newer - 1),
        ] {
            assert!(
                dom.contains(&format!("id=\"{chart}\" data-points=\"{points}\"")),
                "{chart} with {points} points: {dom}"
            );
        }
        assert_eq!(
            dom.matches("<polyline").count(),
            4,
            "four charts with lines: {dom}"
        );
        assert!(dom.contains("id=\"anchor-epoch\">0<"), "{dom}");
        // Any epoch's signed head, by number.
        let first = auditor.head(1).expect("epoch 1 signed");
        let dom = chromium_dom(
            &format!("http://{http_addr}/?epoch=1"),
            &root.path().join("chromium-head"),
        )
        .await;
        assert!(dom.contains("id=\"head-epoch\">1<"), "{dom}");
        assert!(
            dom.contains(&first.signature),
            "the head's signature: {dom}"
        );
        assert!(dom.contains(&first.digest), "the head's root: {dom}");
        let dom = chromium_dom(
            &format!("http://{http_addr}/?epoch={}", newer + 100),
            &root.path().join("chromium-missing"),
        )
        .await;
        assert!(dom.contains("id=\"head-missing\""), "{dom}");
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

/// The body of `path` at `addr`, parsed as JSON (status 200 required).
async fn json_at(addr: std::net::SocketAddr, path: &str) -> serde_json::Value {
    let response = http_get(addr, path).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{path}: {response}");
    let body = response.split_once("\r\n\r\n").expect("a body").1;
    serde_json::from_str(body).unwrap_or_else(|error| panic!("{path}: {error}: {body}"))
}

/// Plexi's signed message for ciphersuite 1 (`ProtobufEd25519`), encoded by hand as
/// `plexi_core` encodes its proto2 `SignatureMessage`: ciphersuite, namespace, timestamp,
/// `Epoch { inner }`, digest — every field present, in tag order.
fn plexi_message(namespace: &str, timestamp: u64, epoch: u64, digest: &[u8]) -> Vec<u8> {
    fn varint(mut value: u64, out: &mut Vec<u8>) {
        while value >= 0x80 {
            out.push((value as u8) | 0x80);
            value >>= 7;
        }
        out.push(value as u8);
    }
    let mut epoch_message = vec![0x08];
    varint(epoch, &mut epoch_message);
    let mut out = vec![0x08, 0x01, 0x12];
    varint(namespace.len() as u64, &mut out);
    out.extend_from_slice(namespace.as_bytes());
    out.push(0x18);
    varint(timestamp, &mut out);
    out.push(0x22);
    varint(epoch_message.len() as u64, &mut out);
    out.extend_from_slice(&epoch_message);
    out.push(0x2a);
    varint(digest.len() as u64, &mut out);
    out.extend_from_slice(digest);
    out
}

/// Verifies a Plexi `SignatureResponse` the way `plexi_core` does: rebuild the message from
/// its fields, Ed25519 `verify_strict` with the key whose id is `key_id`.
fn plexi_verify(response: &serde_json::Value, public_key: &[u8; 32]) {
    use ed25519_dalek::{Signature, VerifyingKey};
    assert_eq!(
        response["key_id"].as_u64(),
        Some(u64::from(public_key[31])),
        "{response}"
    );
    assert!(
        response["version"] == 1 || response["ciphersuite"] == 1,
        "{response}"
    );
    let digest = hex::decode(response["digest"].as_str().expect("digest")).expect("hex");
    let message = plexi_message(
        response["namespace"].as_str().expect("namespace"),
        response["timestamp"].as_u64().expect("timestamp"),
        response["epoch"].as_u64().expect("epoch"),
        &digest,
    );
    let signature: [u8; 64] = hex::decode(response["signature"].as_str().expect("signature"))
        .expect("hex")
        .try_into()
        .expect("64 bytes");
    VerifyingKey::from_bytes(public_key)
        .expect("key")
        .verify_strict(&message, &Signature::from_bytes(&signature))
        .unwrap_or_else(|error| panic!("{error}: {response}"));
}

/// The Plexi read API (`/info`, `/namespaces`, `/namespaces/{ns}`, `.../audits/{E}`,
/// `.../last-verified-epoch`) answers in the JSON shapes `plexi-core` 0.1 deserializes, and its
/// signatures verify as `plexi audit` verifies them.
async fn plexi_api_answers_as_plexi_reads_it(
    addr: std::net::SocketAddr,
    auditor: &Auditor,
    latest: u64,
) {
    // The message encoding first, on Plexi's own published test vector
    // (cloudflare/plexi, plexi_core/tests/test-vectors.json, the ciphersuite 1 entry).
    let vector = plexi_message("log1.example.com", 1_717_084_639_921, 1, &[0x11; 32]);
    assert_eq!(
        hex::encode(&vector),
        format!(
            "080112106c6f67312e6578616d706c652e636f6d18b1a5e1d1fc31220208012a20{}",
            "11".repeat(32)
        )
    );
    let vector_response = serde_json::json!({
        "version": 1, "namespace": "log1.example.com", "timestamp": 1_717_084_639_921u64,
        "epoch": 1, "digest": "11".repeat(32), "key_id": 188,
        "signature": "769d1ae73792dd8da1515793ba29f2f33f2fca84ba7386f9a01d8272e67c4379bdcfd91ea4fa49eafd8f243ac36fe3a7aae90ae92f1729c3c468ddf4e6d2a309",
    });
    let vector_key: [u8; 32] =
        hex::decode("606a878700158d92b3a14a0fd37ec82e0f05f92fcf23146abfda2e3a2f10a9bc")
            .expect("hex")
            .try_into()
            .expect("32 bytes");
    plexi_verify(&vector_response, &vector_key);

    let key = auditor.public_key();
    let info = json_at(addr, "/info").await;
    assert_eq!(info["keys"][0]["public_key"], hex::encode(key), "{info}");
    assert!(info["keys"][0]["not_before"].is_u64(), "{info}");
    assert_eq!(info["logs"][0], NAMESPACE, "{info}");
    let listed = json_at(addr, "/namespaces").await;
    let one = json_at(addr, &format!("/namespaces/{NAMESPACE}")).await;
    assert_eq!(listed["namespaces"][0], one, "{listed}");
    assert_eq!(one["name"], NAMESPACE);
    assert_eq!(one["status"], "Online");
    assert_eq!(one["ciphersuite"], 1);
    assert_eq!(one["signature_version"], 1);
    assert_eq!(one["last_verified_epoch"].as_u64(), Some(latest));
    assert_eq!(one["audits_uri"], format!("/namespaces/{NAMESPACE}/audits"));
    assert_eq!(
        one["reports_uri"],
        format!("/namespaces/{NAMESPACE}/reports")
    );
    let first = auditor.head(1).expect("head 1");
    assert_eq!(one["root"], format!("1/{}", first.digest), "{one}");
    assert!(one["log_directory"].is_null(), "not configured here: {one}");
    let unknown = http_get(addr, "/namespaces/other").await;
    assert!(unknown.starts_with("HTTP/1.1 404"), "{unknown}");
    for epoch in 1..=latest {
        let response = json_at(addr, &format!("/namespaces/{NAMESPACE}/audits/{epoch}")).await;
        assert_eq!(response["epoch"].as_u64(), Some(epoch));
        assert_eq!(response["namespace"], NAMESPACE);
        assert_eq!(
            response["serialized_message"], response["signed_bytes"],
            "the bytes Plexi's message encodes to: {response}"
        );
        assert_eq!(
            hex::decode(response["serialized_message"].as_str().expect("hex")).expect("hex"),
            plexi_message(
                NAMESPACE,
                response["timestamp"].as_u64().expect("timestamp"),
                epoch,
                &hex::decode(response["digest"].as_str().expect("digest")).expect("hex"),
            )
        );
        plexi_verify(&response, &key);
    }
    let last = json_at(
        addr,
        &format!("/namespaces/{NAMESPACE}/last-verified-epoch"),
    )
    .await;
    assert_eq!(last["epoch"].as_u64(), Some(latest));
    assert_eq!(last["end_hash"], auditor.head(latest).expect("head").digest);
    assert_eq!(
        last["start_hash"],
        auditor.head(latest - 1).expect("head").digest,
        "{last}"
    );
    let job_id = last["job_id"].as_str().expect("job_id");
    assert_eq!(
        job_id.split('-').map(str::len).collect::<Vec<_>>(),
        [8, 4, 4, 4, 12],
        "a UUID: {job_id}"
    );
}
