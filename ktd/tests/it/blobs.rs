//! Audit blobs over HTTP in the S3 `ListObjectsV2` layout WhatsApp publishes its audit proofs
//! in, read by a client that speaks that protocol exactly as akd's WhatsApp auditor
//! (`examples/src/whatsapp_kt_auditor` in facebook/akd) does: `list-type=2`, pages followed with
//! `start-after` = the previous page's last `Key`, only `Key` and `IsTruncated` read, one epoch
//! found with `prefix=E/`, each blob fetched at `/KEY`, decoded with
//! `akd::local_auditing::AuditBlob` and checked with `akd::auditor::audit_verify`.

use std::net::SocketAddr;
use std::time::Duration;

use akd::local_auditing::{AuditBlob, AuditBlobName};
use ktd_testkit::net::{free_addr, http_get_bytes};
use ktd_testkit::process::KtdNode;
use ktd_testkit::with_deadline;

use crate::support::KTD;
use crate::support::cluster::{connect, publish_epochs};

/// The text of every `<element>` in `xml`, in order (what the auditor's `xml-rs` loop reads:
/// element names matched anywhere, namespaces ignored).
fn elements(xml: &str, element: &str) -> Vec<String> {
    let (open, close) = (format!("<{element}>"), format!("</{element}>"));
    let mut found = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        rest = &rest[start + open.len()..];
        let end = rest.find(&close).expect("a closed element");
        found.push(rest[..end].to_string());
        rest = &rest[end..];
    }
    found
}

/// One listing page: the keys parsed as blob names (a key that is not one fails the listing,
/// as in the tool) and whether the page is truncated.
async fn list(addr: SocketAddr, query: &str) -> (Vec<String>, bool) {
    let response = http_get_bytes(addr, &format!("/?list-type=2{query}"), &[]).await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.header("content-type"), Some("application/xml"));
    let xml = String::from_utf8(response.body).expect("UTF-8 XML");
    let keys = elements(&xml, "Key");
    for key in &keys {
        AuditBlobName::try_from(key.as_str()).unwrap_or_else(|error| panic!("{key}: {error:?}"));
    }
    let truncated = elements(&xml, "IsTruncated") == ["true"];
    assert!(
        !truncated || !keys.is_empty(),
        "a truncated page names a key: {xml}"
    );
    (keys, truncated)
}

/// `list_proofs`: every key, page by page with `start-after`.
async fn list_all(addr: SocketAddr, extra: &str) -> Vec<String> {
    let (mut keys, mut truncated) = list(addr, extra).await;
    while truncated {
        let last = keys.last().expect("a key").clone();
        let (more, again) = list(
            addr,
            &format!("{extra}&start-after={}", last.replace('/', "%2F")),
        )
        .await;
        keys.extend(more);
        truncated = again;
    }
    keys
}

/// `audit_epoch`: fetch, decode, verify.
async fn audit(addr: SocketAddr, key: &str) -> u64 {
    let response = http_get_bytes(addr, &format!("/{key}"), &[]).await;
    assert_eq!(response.status, 200, "{key}: {response:?}");
    let blob = AuditBlob {
        name: AuditBlobName::try_from(key).expect("a blob name"),
        data: response.body,
    };
    let (end_epoch, previous, current, proof) = blob.decode().expect("an akd audit blob");
    akd::auditor::audit_verify::<akd::WhatsAppV1Configuration>(
        vec![previous, current],
        akd::AppendOnlyProof {
            proofs: vec![proof],
            epochs: vec![end_epoch - 1],
        },
    )
    .await
    .unwrap_or_else(|error| panic!("epoch {end_epoch}: {error:?}"));
    end_epoch
}

#[test]
fn every_epoch_of_a_live_directory_is_listed_fetched_and_verified_as_akds_whatsapp_auditor_does() {
    with_deadline(Duration::from_secs(180), || async {
        let root = tempfile::tempdir().expect("temp dir");
        let blob_addr = free_addr("127.0.0.45");
        let mut dev = KtdNode::dev(
            KTD,
            root.path(),
            "127.0.0.45",
            &["--epoch-interval", "100ms", "--blob-listen", &blob_addr],
        );
        dev.spawn(&[]);
        let client = connect(&dev.addr).await;
        // More than ten epochs: key order is S3's, "10/…" before "2/…".
        let latest = publish_epochs(&client, "blob-http", 12, 2).await;
        assert!(latest >= 12, "{latest}");
        let addr: SocketAddr = blob_addr.parse().expect("address");

        // The tool's listing (S3 pages of up to 1000), and the same in pages of 5.
        let keys = list_all(addr, "").await;
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted, "keys in byte order");
        assert_eq!(keys, list_all(addr, "&max-keys=5").await, "paged alike");
        let mut epochs: Vec<u64> = keys
            .iter()
            .map(|key| AuditBlobName::try_from(key.as_str()).expect("name").epoch)
            .collect();
        epochs.sort_unstable();
        assert_eq!(
            epochs,
            (1..=epochs.len() as u64).collect::<Vec<_>>(),
            "contiguous"
        );
        assert!(
            epochs.len() as u64 >= latest,
            "{} keys for {latest} epochs",
            epochs.len()
        );

        // Every epoch audits; each key equals the gateway's own name for that step.
        for key in &keys {
            let epoch = audit(addr, key).await;
            let previous = client.epoch(Some(epoch - 1)).await.expect("epoch");
            let current = client.epoch(Some(epoch)).await.expect("epoch");
            assert_eq!(
                key,
                &format!(
                    "{epoch}/{}/{}",
                    hex::encode(previous.root_hash),
                    hex::encode(current.root_hash)
                )
            );
        }

        // `get_proof_from_epoch`: one epoch by prefix (the trailing '/' keeps 1 from 10..=19).
        let (one, truncated) = list(addr, "&prefix=1%2F").await;
        assert!(!truncated);
        assert_eq!(one.len(), 1, "{one:?}");
        assert!(one[0].starts_with("1/"));
        let (tens, _) = list(addr, "&prefix=1").await;
        assert!(tens.len() >= 4, "1/ and 10/ to 12/: {tens:?}");
        assert!(tens.iter().all(|key| key.starts_with('1')), "{tens:?}");
        let (none, truncated) = list(addr, "&prefix=999%2F").await;
        assert!(none.is_empty() && !truncated);

        // Blobs are immutable: cached for a year, revalidated by ETag.
        let first = http_get_bytes(addr, &format!("/{}", keys[0]), &[]).await;
        assert!(
            first
                .header("cache-control")
                .is_some_and(|value| value.contains("immutable")),
            "{first:?}"
        );
        let etag = first.header("etag").expect("an ETag").to_string();
        let again =
            http_get_bytes(addr, &format!("/{}", keys[0]), &[("If-None-Match", &etag)]).await;
        assert_eq!(again.status, 304);

        // Bad requests get S3's XML errors, and the server keeps serving.
        let zeros = "0".repeat(64);
        for (path, status) in [
            ("/?list-type=1".to_string(), 400),
            ("/?list-type=2&max-keys=many".to_string(), 400),
            (format!("/3/{zeros}/{zeros}"), 400),
            ("/3/not-hex/0".to_string(), 400),
            (format!("/100000/{zeros}/{zeros}"), 404),
        ] {
            let response = http_get_bytes(addr, &path, &[]).await;
            assert_eq!(response.status, status, "{path}: {response:?}");
            let body = String::from_utf8_lossy(&response.body);
            assert!(body.contains("<Error><Code>"), "{path}: {body}");
        }
        assert_eq!(list_all(addr, "").await.len(), keys.len());
        dev.terminate(Duration::from_secs(10));
    })
}
