//! Serving an [`Auditor`]: the `ktd.auditor.v1.Auditor` gRPC service, Plexi's public read API
//! over HTTP (what Cloudflare's `plexi` CLI reads), and the dashboard page.
//!
//! HTTP: `GET /` (dashboard), `GET /info`, `GET /namespaces`, `GET /namespaces/{ns}`,
//! `GET /namespaces/{ns}/last-verified-epoch`, `GET /namespaces/{ns}/audits/{epoch}`. The JSON
//! is the shape `plexi-core` 0.1 deserializes (`Configuration`, `Namespaces`, `NamespaceInfo`,
//! `LastVerifiedEpoch`, `SignatureResponse`: snake_case fields, ciphersuite and epoch as numbers,
//! digests and signatures as lowercase hex, times in ms) with ktd's own fields beside them. A
//! namespace's `root` is its oldest signed head (`E/hex`): `plexi audit` reads the head of
//! `E - 1` for every later epoch, and that one is always served; its `log_directory` is the
//! configured blob URL (a gateway's `--blob-listen`), where `plexi audit` fetches `/E/PREV/CUR`.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::get;
use ktd_proto::ktd::auditor::v1 as pb;
use tokio::net::TcpListener;
use tonic::{Request, Status};

use ktd_client::head::CIPHERSUITE_PROTOBUF_ED25519;

use crate::auditor::{Auditor, Head};

struct AuditorService(Arc<Auditor>);

#[tonic::async_trait]
impl pb::auditor_server::Auditor for AuditorService {
    async fn get_info(
        &self,
        _request: Request<pb::GetInfoRequest>,
    ) -> Result<tonic::Response<pb::AuditorInfo>, Status> {
        Ok(tonic::Response::new(pb::AuditorInfo {
            namespace: self.0.namespace().to_string(),
            public_key: self.0.public_key().to_vec(),
            ciphersuite: CIPHERSUITE_PROTOBUF_ED25519,
            last_verified_epoch: self.0.latest().map_or(0, |head| head.epoch),
            violations: self.0.violations(),
        }))
    }

    async fn get_head(
        &self,
        request: Request<pb::GetHeadRequest>,
    ) -> Result<tonic::Response<pb::SignedHead>, Status> {
        let head = match request.into_inner().epoch {
            Some(epoch) => self
                .0
                .head(epoch)
                .ok_or_else(|| Status::not_found(format!("epoch {epoch} has not been verified")))?,
            None => self
                .0
                .latest()
                .ok_or_else(|| Status::not_found("no epoch has been verified yet"))?,
        };
        self.0
            .head_message(&head)
            .map(tonic::Response::new)
            .map_err(|error| Status::data_loss(format!("stored head: {error}")))
    }
}

fn not_found(message: String) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(serde_json::json!({ "error": message })),
    )
        .into_response()
}

async fn info(State(auditor): State<Arc<Auditor>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        // Plexi's `Configuration`.
        "keys": [{
            "public_key": hex::encode(auditor.public_key()),
            "not_before": auditor.first().map_or(0, |head| head.timestamp),
        }],
        "logs": [auditor.namespace()],
        // ktd's.
        "namespace": auditor.namespace(),
        "public_key": hex::encode(auditor.public_key()),
        "ciphersuite": CIPHERSUITE_PROTOBUF_ED25519,
        "last_verified_epoch": auditor.latest().map(|head| head.epoch),
        "source_latest_epoch": auditor.source_latest(),
        "violations": auditor.violations(),
    }))
}

/// Plexi's key id of an Ed25519 key: its last byte.
fn key_id(public_key: &[u8; 32]) -> u8 {
    public_key[31]
}

/// Plexi's `NamespaceInfo` of the auditor's one namespace.
fn namespace_info(auditor: &Auditor) -> serde_json::Value {
    let namespace = auditor.namespace();
    let latest = auditor.latest();
    let mut info = serde_json::json!({
        "name": namespace,
        "log_directory": auditor.log_directory(),
        "root": auditor.first().map(|head| format!("{}/{}", head.epoch, head.digest)),
        "status": if latest.is_some() { "Online" } else { "Initialization" },
        "reports_uri": format!("/namespaces/{namespace}/reports"),
        "audits_uri": format!("/namespaces/{namespace}/audits"),
        "signature_version": CIPHERSUITE_PROTOBUF_ED25519,
        "ciphersuite": CIPHERSUITE_PROTOBUF_ED25519,
    });
    if let (Some(latest), Some(object)) = (latest, info.as_object_mut()) {
        object.insert("last_verified_epoch".into(), latest.epoch.into());
    }
    info
}

/// Plexi's `SignatureResponse` of `head`, with ktd's head fields beside it.
fn signature_response(auditor: &Auditor, head: &Head) -> serde_json::Value {
    serde_json::json!({
        "version": CIPHERSUITE_PROTOBUF_ED25519,
        "ciphersuite": CIPHERSUITE_PROTOBUF_ED25519,
        "namespace": auditor.namespace(),
        "timestamp": head.timestamp,
        "epoch": head.epoch,
        "digest": head.digest,
        "signature": head.signature,
        "key_id": key_id(&auditor.public_key()),
        "serialized_message": head.signed_bytes,
        "signed_bytes": head.signed_bytes,
        "proof_bytes": head.proof_bytes,
        "verify_us": head.verify_us,
    })
}

/// A stable UUID-shaped id of the verification of `epoch` (Plexi's `job_id`).
fn job_id(namespace: &str, epoch: u64) -> String {
    let hash = blake3::hash(format!("{namespace}/{epoch}").as_bytes());
    let hex = hex::encode(&hash.as_bytes()[..16]);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

async fn namespaces(State(auditor): State<Arc<Auditor>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "namespaces": [namespace_info(&auditor)] }))
}

async fn namespace(State(auditor): State<Arc<Auditor>>, Path(namespace): Path<String>) -> Response {
    if namespace != auditor.namespace() {
        return not_found(format!("unknown namespace {namespace:?}"));
    }
    Json(namespace_info(&auditor)).into_response()
}

async fn last_verified(
    State(auditor): State<Arc<Auditor>>,
    Path(namespace): Path<String>,
) -> Response {
    if namespace != auditor.namespace() {
        return not_found(format!("unknown namespace {namespace:?}"));
    }
    let Some(head) = auditor.latest() else {
        return not_found("no epoch has been verified yet".into());
    };
    let start_hash = match auditor.head(head.epoch.saturating_sub(1)) {
        Some(previous) => previous.digest,
        None => auditor
            .start()
            .filter(|(epoch, _)| *epoch + 1 == head.epoch)
            .map(|(_, root)| hex::encode(root))
            .unwrap_or_default(),
    };
    Json(serde_json::json!({
        "job_id": job_id(auditor.namespace(), head.epoch),
        "epoch": head.epoch,
        "start_hash": start_hash,
        "end_hash": head.digest,
        "timestamp": head.timestamp,
        "digest": head.digest,
        "signature": head.signature,
        "signed_bytes": head.signed_bytes,
        "proof_bytes": head.proof_bytes,
        "verify_us": head.verify_us,
    }))
    .into_response()
}

async fn audit(
    State(auditor): State<Arc<Auditor>>,
    Path((namespace, epoch)): Path<(String, u64)>,
) -> Response {
    if namespace != auditor.namespace() {
        return not_found(format!("unknown namespace {namespace:?}"));
    }
    match auditor.head(epoch) {
        Some(head) => Json(signature_response(&auditor, &head)).into_response(),
        None => not_found(format!("epoch {epoch} has not been verified")),
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The dashboard: latest verified epoch, root, signature, lag, recent epochs, violations.
pub fn dashboard(auditor: &Auditor, now_ms: u64) -> String {
    let latest = auditor.latest();
    let violations = auditor.violations();
    let mut page = String::new();
    let _ = write!(
        page,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>ktd auditor: {ns}</title>\
         <meta http-equiv=\"refresh\" content=\"5\"><style>body{{font-family:sans-serif;margin:2em}}\
         td,th{{padding:2px 8px;text-align:left}} code{{word-break:break-all}} .bad{{color:#b00}}\
         .ok{{color:#070}}</style></head><body><h1>Key transparency auditor</h1>\
         <p>Namespace <code id=\"namespace\">{ns}</code>; auditor key <code>{key}</code></p>",
        ns = escape(auditor.namespace()),
        key = hex::encode(auditor.public_key()),
    );
    match &latest {
        Some(head) => {
            let _ = write!(
                page,
                "<h2>Latest verified epoch <span id=\"latest-epoch\">{}</span></h2>\
                 <p>Root <code id=\"latest-root\">{}</code></p><p>Signature <code>{}</code></p>\
                 <p>Verified {:.1} s ago; the directory is at epoch <span id=\"source-epoch\">{}</span>: \
                 verification lag <span id=\"lag-epochs\">{}</span> epoch(s)</p>",
                head.epoch,
                head.digest,
                head.signature,
                now_ms.saturating_sub(head.timestamp) as f64 / 1e3,
                auditor.source_latest().max(head.epoch),
                auditor.source_latest().saturating_sub(head.epoch)
            );
        }
        None => page.push_str("<h2>No epoch verified yet</h2>"),
    }
    if violations.is_empty() {
        page.push_str("<p class=\"ok\" id=\"status\">No rule violations.</p>");
    } else {
        page.push_str("<h2 class=\"bad\" id=\"status\">Rule violations</h2><ul id=\"violations\">");
        for violation in &violations {
            let _ = write!(page, "<li class=\"bad\">{}</li>", escape(violation));
        }
        page.push_str("</ul>");
    }
    page.push_str(
        "<h2>Recent epochs</h2><table><tr><th>epoch</th><th>root</th><th>proof bytes</th>\
         <th>verify ms</th></tr>",
    );
    for head in auditor.recent(50) {
        let Head {
            epoch,
            digest,
            proof_bytes,
            verify_us,
            ..
        } = head;
        let _ = write!(
            page,
            "<tr><td>{epoch}</td><td><code>{digest}</code></td><td>{proof_bytes}</td><td>{:.1}</td></tr>",
            verify_us as f64 / 1e3
        );
    }
    page.push_str("</table></body></html>");
    page
}

async fn dashboard_page(State(auditor): State<Arc<Auditor>>) -> Html<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64);
    Html(dashboard(&auditor, now))
}

/// Serves `auditor` over gRPC on `grpc` and HTTP on `http` until `shutdown`.
pub async fn serve(
    auditor: Arc<Auditor>,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (stop, _) = tokio::sync::watch::channel(false);
    let stopped = |mut receiver: tokio::sync::watch::Receiver<bool>| async move {
        let _ = receiver.wait_for(|stop| *stop).await;
    };
    let app = axum::Router::new()
        .route("/", get(dashboard_page))
        .route("/info", get(info))
        .route("/namespaces", get(namespaces))
        .route("/namespaces/{namespace}", get(namespace))
        .route(
            "/namespaces/{namespace}/last-verified-epoch",
            get(last_verified),
        )
        .route("/namespaces/{namespace}/audits/{epoch}", get(audit))
        .with_state(auditor.clone());
    let http_server = tokio::spawn(
        axum::serve(http, app)
            .with_graceful_shutdown(stopped(stop.subscribe()))
            .into_future(),
    );
    let incoming = ktd_rpc::limits::incoming(
        grpc,
        "auditor",
        ktd_rpc::limits::ConnectionLimits::default(),
    );
    let grpc_server = tokio::spawn(
        ktd_rpc::limits::bounded(ktd_rpc::security::server_builder(true)?)
            .tcp_nodelay(true)
            .layer(ktd_rpc::telemetry::GrpcServerLayer::new("auditor"))
            .layer(ktd_rpc::security::AuthorizeLayer::new(
                ktd_rpc::security::auditor_policy,
            ))
            .layer(ktd_rpc::limits::RequestLimitLayer::new(|_| 5 + (64 << 10)))
            .add_service(pb::auditor_server::AuditorServer::new(AuditorService(
                auditor,
            )))
            .serve_with_incoming_shutdown(incoming, stopped(stop.subscribe())),
    );
    shutdown.await;
    let _ = stop.send(true);
    http_server.await??;
    grpc_server.await??;
    Ok(())
}

/// Opens the auditor, follows its source and serves it until `shutdown`.
pub async fn run(
    settings: crate::auditor::AuditorSettings,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    settings.config.install()?;
    let auditor = Auditor::open(settings)?;
    tracing::info!(
        namespace = auditor.namespace(),
        public_key = %hex::encode(auditor.public_key()),
        grpc = ?grpc.local_addr().ok(),
        http = ?http.local_addr().ok(),
        "auditor serving"
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let follower = tokio::spawn(auditor.clone().follow(stop.clone()));
    let result = serve(auditor, grpc, http, shutdown).await;
    stop.cancel();
    follower.await??;
    result
}
