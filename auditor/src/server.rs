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

/// Epochs the dashboard's charts cover.
const CHART_EPOCHS: usize = 100;

/// ms since the Unix epoch as `YYYY-MM-DD HH:MM:SS.mmm UTC`.
fn utc(ms: u64) -> String {
    let seconds = (ms / 1000) as i64;
    match time::OffsetDateTime::from_unix_timestamp(seconds) {
        Ok(at) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:03} UTC",
            at.year(),
            u8::from(at.month()),
            at.day(),
            at.hour(),
            at.minute(),
            at.second(),
            ms % 1000
        ),
        Err(_) => format!("{ms} ms"),
    }
}

/// A line chart as inline SVG: `points` are (epoch, value) in epoch order. The element carries
/// `id`, and `data-points` = how many points it draws (checked by the browser test).
fn chart(id: &str, title: &str, unit: &str, points: &[(u64, f64)]) -> String {
    const WIDTH: f64 = 560.0;
    const HEIGHT: f64 = 140.0;
    const LEFT: f64 = 70.0;
    const BOTTOM: f64 = 20.0;
    const TOP: f64 = 22.0;
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<figure><svg id=\"{id}\" data-points=\"{}\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" aria-label=\"{title}\">\
         <text x=\"{LEFT}\" y=\"14\" font-size=\"13\">{title}</text>",
        points.len()
    );
    if points.is_empty() {
        svg.push_str("<text x=\"70\" y=\"70\" font-size=\"12\">no data yet</text></svg></figure>");
        return svg;
    }
    let (first, last) = (points[0].0, points[points.len() - 1].0);
    let max = points.iter().map(|point| point.1).fold(0.0_f64, f64::max);
    let top = if max > 0.0 { max } else { 1.0 };
    let span = (last - first).max(1) as f64;
    let x = |epoch: u64| LEFT + (epoch - first) as f64 / span * (WIDTH - LEFT - 10.0);
    let y = |value: f64| TOP + (1.0 - value / top) * (HEIGHT - TOP - BOTTOM);
    let _ = write!(
        svg,
        "<line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{b}\" stroke=\"#999\"/>\
         <line x1=\"{LEFT}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"#999\"/>\
         <text x=\"{tx}\" y=\"{ty}\" font-size=\"11\" text-anchor=\"end\">{top:.1} {unit}</text>\
         <text x=\"{tx}\" y=\"{b}\" font-size=\"11\" text-anchor=\"end\">0</text>\
         <text x=\"{LEFT}\" y=\"{HEIGHT}\" font-size=\"11\">epoch {first}</text>\
         <text x=\"{r}\" y=\"{HEIGHT}\" font-size=\"11\" text-anchor=\"end\">epoch {last}</text>",
        b = HEIGHT - BOTTOM,
        r = WIDTH - 10.0,
        tx = LEFT - 4.0,
        ty = TOP + 4.0,
    );
    let line: Vec<String> = points
        .iter()
        .map(|&(epoch, value)| format!("{:.1},{:.1}", x(epoch), y(value)))
        .collect();
    let _ = write!(
        svg,
        "<polyline fill=\"none\" stroke=\"#1565c0\" stroke-width=\"1.5\" points=\"{}\"/>",
        line.join(" ")
    );
    for &(epoch, value) in points {
        let _ = write!(
            svg,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2\" fill=\"#1565c0\"><title>epoch {epoch}: {value:.1} {unit}</title></circle>",
            x(epoch),
            y(value)
        );
    }
    svg.push_str("</svg></figure>");
    svg
}

/// The charts over the newest [`CHART_EPOCHS`] heads (oldest first): epoch cadence (time
/// between consecutive commits, or verifications where the commit time is unknown), commit →
/// signed lag, proof bytes and verify time.
fn charts(heads: &[Head]) -> String {
    let when = |head: &Head| {
        if head.committed_at_ms > 0 {
            head.committed_at_ms
        } else {
            head.timestamp
        }
    };
    let cadence: Vec<(u64, f64)> = heads
        .windows(2)
        .filter(|pair| pair[1].epoch == pair[0].epoch + 1)
        .map(|pair| {
            (
                pair[1].epoch,
                when(&pair[1]).saturating_sub(when(&pair[0])) as f64 / 1e3,
            )
        })
        .collect();
    let lag: Vec<(u64, f64)> = heads
        .iter()
        .filter(|head| head.committed_at_ms > 0)
        .map(|head| {
            (
                head.epoch,
                head.timestamp.saturating_sub(head.committed_at_ms) as f64,
            )
        })
        .collect();
    let bytes: Vec<(u64, f64)> = heads
        .iter()
        .map(|head| (head.epoch, head.proof_bytes as f64 / 1024.0))
        .collect();
    let verify: Vec<(u64, f64)> = heads
        .iter()
        .map(|head| (head.epoch, head.verify_us as f64 / 1e3))
        .collect();
    [
        chart("chart-cadence", "Epoch cadence", "s", &cadence),
        chart("chart-lag", "Commit → signed lag", "ms", &lag),
        chart("chart-proof-bytes", "Proof size", "KiB", &bytes),
        chart("chart-verify", "Verify time", "ms", &verify),
    ]
    .concat()
}

/// One head in full: what `?epoch=N` shows.
fn head_section(auditor: &Auditor, head: &Head) -> String {
    let committed = match head.committed_at_ms {
        0 => "unknown".to_string(),
        at => utc(at),
    };
    format!(
        "<section id=\"head\"><h2>Signed head of epoch <span id=\"head-epoch\">{epoch}</span></h2>\
         <table><tr><th>root</th><td><code id=\"head-root\">{root}</code></td></tr>\
         <tr><th>committed</th><td>{committed}</td></tr>\
         <tr><th>signed</th><td id=\"head-timestamp\">{signed} ({timestamp} ms)</td></tr>\
         <tr><th>signature (Ed25519)</th><td><code id=\"head-signature\">{signature}</code></td></tr>\
         <tr><th>signed bytes (Plexi SignatureMessage, protobuf)</th><td><code>{bytes}</code></td></tr>\
         <tr><th>proof</th><td>{proof} bytes, verified in {verify:.1} ms</td></tr></table>\
         <p>JSON: <a href=\"/namespaces/{ns}/audits/{epoch}\">/namespaces/{ns}/audits/{epoch}</a></p></section>",
        epoch = head.epoch,
        root = head.digest,
        signed = utc(head.timestamp),
        timestamp = head.timestamp,
        signature = head.signature,
        bytes = head.signed_bytes,
        proof = head.proof_bytes,
        verify = head.verify_us as f64 / 1e3,
        ns = escape(auditor.namespace()),
    )
}

/// The dashboard: latest verified epoch, root, signature, lag, the trust anchor, charts over the
/// recent epochs, recent epochs with their times, violations.
pub fn dashboard(auditor: &Auditor, now_ms: u64) -> String {
    dashboard_page_for(auditor, now_ms, None)
}

/// The dashboard, with epoch `lookup`'s signed head first (`GET /?epoch=N`).
pub fn dashboard_page_for(auditor: &Auditor, now_ms: u64, lookup: Option<u64>) -> String {
    let latest = auditor.latest();
    let violations = auditor.violations();
    let mut page = String::new();
    // The live page refreshes itself; a looked-up head stays put.
    let refresh = if lookup.is_none() {
        "<meta http-equiv=\"refresh\" content=\"5\">"
    } else {
        ""
    };
    let _ = write!(
        page,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>ktd auditor: {ns}</title>\
         {refresh}<style>body{{font-family:sans-serif;margin:2em}}\
         td,th{{padding:2px 8px;text-align:left}} code{{word-break:break-all}} .bad{{color:#b00}}\
         .ok{{color:#070}} figure{{display:inline-block;margin:0 1em 1em 0}}</style></head><body>\
         <h1>Key transparency auditor</h1>\
         <p>Namespace <code id=\"namespace\">{ns}</code>; auditor key (Ed25519) <code id=\"auditor-key\">{key}</code></p>\
         <form method=\"get\" action=\"/\"><label>Signed head of epoch \
         <input name=\"epoch\" type=\"number\" min=\"1\" value=\"{value}\"></label> \
         <button type=\"submit\">Show</button></form>",
        ns = escape(auditor.namespace()),
        key = hex::encode(auditor.public_key()),
        value = lookup.map(|epoch| epoch.to_string()).unwrap_or_default(),
    );
    if let Some(epoch) = lookup {
        match auditor.head(epoch) {
            Some(head) => page.push_str(&head_section(auditor, &head)),
            None => {
                let _ = write!(
                    page,
                    "<p class=\"bad\" id=\"head-missing\">Epoch {epoch} has not been verified by this auditor.</p>"
                );
            }
        }
    }
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
    if let Some((epoch, root)) = auditor.start() {
        let _ = write!(
            page,
            "<h2>Trust anchor</h2><p>Verification starts from epoch <span id=\"anchor-epoch\">{epoch}</span> \
             with root <code id=\"anchor-root\">{}</code>{}; every later root is verified from it, one \
             append-only proof per epoch.</p>",
            hex::encode(root),
            if epoch == 0 {
                " (akd's empty directory)"
            } else {
                ""
            }
        );
    }
    let mut recent = auditor.recent(CHART_EPOCHS);
    recent.reverse();
    let _ = write!(
        page,
        "<h2>The last {} epochs</h2>{}",
        recent.len(),
        charts(&recent)
    );
    page.push_str(
        "<h2>Recent epochs</h2><table id=\"recent\"><tr><th>epoch</th><th>committed (UTC)</th>\
         <th>signed (UTC)</th><th>root</th><th>proof bytes</th><th>verify ms</th></tr>",
    );
    for head in recent.iter().rev().take(50) {
        let Head {
            epoch,
            digest,
            proof_bytes,
            verify_us,
            timestamp,
            committed_at_ms,
            ..
        } = head;
        let committed = match committed_at_ms {
            0 => "—".to_string(),
            at => utc(*at),
        };
        let _ = write!(
            page,
            "<tr><td><a href=\"/?epoch={epoch}\">{epoch}</a></td><td>{committed}</td><td>{}</td>\
             <td><code>{digest}</code></td><td>{proof_bytes}</td><td>{:.1}</td></tr>",
            utc(*timestamp),
            *verify_us as f64 / 1e3
        );
    }
    page.push_str("</table></body></html>");
    page
}

/// `GET /?epoch=N`.
#[derive(serde::Deserialize)]
struct DashboardQuery {
    epoch: Option<u64>,
}

async fn dashboard_page(
    State(auditor): State<Arc<Auditor>>,
    axum::extract::Query(query): axum::extract::Query<DashboardQuery>,
) -> Html<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64);
    Html(dashboard_page_for(&auditor, now, query.epoch))
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
