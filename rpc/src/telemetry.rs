//! What every ktd gRPC server and client shares for observability: W3C trace context over gRPC
//! metadata, and one tower layer that gives every served RPC a span and RED metrics.
//!
//! * **Servers** add [`GrpcServerLayer`] to their `tonic::transport::Server`. Each request gets
//!   an `INFO` span (target `ktd::rpc`, OpenTelemetry name `package.Service/Method`, kind
//!   server) whose parent is the caller's `traceparent` header when there is one, and is counted
//!   in `ktd_grpc_server_handled_total{service,method,code}` and timed in
//!   `ktd_grpc_server_handling_seconds{service,method}` (go-grpc-prometheus' names and code
//!   spelling, prefixed). Paths that are not methods of ktd's or the standard health and
//!   reflection services are labelled `unknown`, so garbage requests cannot grow the series.
//! * **Clients** call [`inject_context`] on each outgoing request: the current span's context
//!   goes out as `traceparent` / `tracestate`.
//! * Contexts that travel inside messages rather than headers (an update's trace, carried from
//!   the sequencer's `Append` to the shard that prepares it) use [`current_traceparent`] and
//!   [`context_from_traceparent`].
//!
//! * Structured logs name the process: [`log_context`] holds its role and node id and the Raft
//!   term and epoch it last saw, which servers keep current and the JSON log format adds to
//!   every line.
//!
//! Without an OpenTelemetry layer in the subscriber (no OTLP endpoint configured), spans are
//! plain `tracing` spans, no context is valid and nothing is injected.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, OnceLock};
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C trace-context header (and gRPC metadata key).
pub const TRACEPARENT: &str = "traceparent";

static PROPAGATOR: LazyLock<TraceContextPropagator> = LazyLock::new(TraceContextPropagator::new);

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Adds the current span's trace context to an outgoing request's metadata (nothing when the
/// current span is not part of an OpenTelemetry trace).
pub fn inject_context<T>(request: &mut tonic::Request<T>) {
    let context = tracing::Span::current().context();
    if context.span().span_context().is_valid() {
        PROPAGATOR.inject_context(&context, &mut MetadataInjector(request.metadata_mut()));
    }
}

/// The current span's context as a W3C `traceparent` value, if it belongs to a sampled trace.
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current().context())
}

/// `context` as a W3C `traceparent` value, if it holds a sampled span.
pub fn traceparent_of(context: &Context) -> Option<String> {
    let span_context = context.span().span_context().clone();
    if !span_context.is_valid() || !span_context.is_sampled() {
        return None;
    }
    let mut carrier = HashMap::new();
    PROPAGATOR.inject_context(context, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// The remote span context a `traceparent` value names (`None` if it is malformed).
pub fn context_from_traceparent(traceparent: &str) -> Option<Context> {
    let carrier = HashMap::from([(TRACEPARENT.to_string(), traceparent.to_string())]);
    let context = PROPAGATOR.extract(&carrier);
    context.span().span_context().is_valid().then_some(context)
}

/// The process-wide fields of every structured log line (see the module docs).
#[derive(Debug, Default)]
pub struct LogContext {
    node: OnceLock<(String, String)>,
    term: AtomicU64,
    epoch: AtomicU64,
}

static LOG_CONTEXT: LazyLock<LogContext> = LazyLock::new(LogContext::default);

/// This process's [`LogContext`].
pub fn log_context() -> &'static LogContext {
    &LOG_CONTEXT
}

impl LogContext {
    /// Names the process once: its role (`sequencer`, `shard`, `gateway`, `dev`, `auditor`)
    /// and node id (a sequencer's id, a shard's id, a gateway's address). Later calls are
    /// ignored.
    pub fn set_node(&self, role: &str, node_id: impl Into<String>) {
        let _ = self.node.set((role.to_string(), node_id.into()));
    }

    /// The role and node id, once set.
    pub fn node(&self) -> Option<(&str, &str)> {
        self.node
            .get()
            .map(|(role, node)| (role.as_str(), node.as_str()))
    }

    /// Records the Raft term this process last saw.
    pub fn set_term(&self, term: u64) {
        self.term.store(term, Ordering::Relaxed);
    }

    /// The Raft term this process last saw (0: none).
    pub fn term(&self) -> u64 {
        self.term.load(Ordering::Relaxed)
    }

    /// Records the latest committed epoch this process knows of.
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.fetch_max(epoch, Ordering::Relaxed);
    }

    /// The latest committed epoch this process knows of (0: none).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }
}

/// The `(service, method)` labels of every method a ktd process may serve, by path.
#[derive(Debug)]
struct KnownMethods(HashMap<String, (&'static str, &'static str)>);

static KNOWN_METHODS: LazyLock<KnownMethods> = LazyLock::new(|| {
    use prost::Message;
    let mut paths: Vec<String> = Vec::new();
    if let Ok(set) = prost_types::FileDescriptorSet::decode(ktd_proto::FILE_DESCRIPTOR_SET) {
        for file in set.file {
            for service in &file.service {
                for method in &service.method {
                    paths.push(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
    }
    paths.extend(
        [
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
            "/grpc.health.v1.Health/List",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ]
        .map(String::from),
    );
    // Leaked once: a fixed set of labels that every request then uses without allocating.
    let labels = paths
        .into_iter()
        .filter_map(|path| {
            let (service, method) = path.trim_start_matches('/').split_once('/')?;
            let labels = (
                &*Box::leak(service.to_string().into_boxed_str()),
                &*Box::leak(method.to_string().into_boxed_str()),
            );
            Some((path, labels))
        })
        .collect();
    KnownMethods(labels)
});

impl KnownMethods {
    fn labels(&self, path: &str) -> (&'static str, &'static str) {
        self.0.get(path).copied().unwrap_or(("unknown", "unknown"))
    }
}

/// The gRPC status code of a response: `grpc-status` in the headers (a "trailers-only" error,
/// which is how tonic answers a handler's `Err(Status)`), otherwise OK. An error that a
/// streaming handler sends in the trailers after data is counted as OK here.
fn response_code(headers: &http::HeaderMap) -> tonic::Code {
    headers
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from)
}

/// The tower layer every ktd gRPC server adds (see the module docs).
#[derive(Clone, Debug)]
pub struct GrpcServerLayer {
    component: &'static str,
}

impl GrpcServerLayer {
    /// For a server of `component` (`gateway`, `sequencer`, `shard`, `auditor`), recorded on
    /// every span as `ktd.component`.
    pub fn new(component: &'static str) -> Self {
        LazyLock::force(&KNOWN_METHODS);
        Self { component }
    }
}

impl<S> tower::Layer<S> for GrpcServerLayer {
    type Service = GrpcServerService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcServerService {
            inner,
            component: self.component,
        }
    }
}

/// The service [`GrpcServerLayer`] wraps around a server's routes.
#[derive(Clone, Debug)]
pub struct GrpcServerService<S> {
    inner: S,
    component: &'static str,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for GrpcServerService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The clone is not ready; the one `poll_ready` was called on serves this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (service, method) = KNOWN_METHODS.labels(request.uri().path());
        // Raft traffic (heartbeats many times a second) and health probes are counted, not
        // traced: as root spans they would drown the traces of real work.
        let traced = !service.starts_with("ktd.raft.") && !service.starts_with("grpc.health.");
        let span = if !traced {
            tracing::Span::none()
        } else {
            tracing::info_span!(
                target: "ktd::rpc",
                "grpc",
                otel.name = format!("{service}/{method}"),
                otel.kind = "server",
                otel.status_code = tracing::field::Empty,
                rpc.system = "grpc",
                rpc.service = service,
                rpc.method = method,
                rpc.grpc.status_code = tracing::field::Empty,
                ktd.component = self.component,
            )
        };
        if traced && request.headers().contains_key(TRACEPARENT) {
            let parent = PROPAGATOR.extract(&HeaderExtractor(request.headers()));
            if parent.span().span_context().is_valid() {
                let _ = span.set_parent(parent);
            }
        }
        let started = Instant::now();
        let call_span = span.clone();
        Box::pin(
            async move {
                let result = inner.call(request).await;
                let code = match &result {
                    Ok(response) => response_code(response.headers()),
                    Err(_) => tonic::Code::Unknown,
                };
                call_span.record("rpc.grpc.status_code", code as i64);
                if code != tonic::Code::Ok {
                    call_span.record("otel.status_code", "ERROR");
                }
                metrics::counter!(
                    "ktd_grpc_server_handled_total",
                    "service" => service,
                    "method" => method,
                    "code" => format!("{code:?}"),
                )
                .increment(1);
                metrics::histogram!(
                    "ktd_grpc_server_handling_seconds",
                    "service" => service,
                    "method" => method,
                )
                .record(started.elapsed().as_secs_f64());
                result
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_methods_are_labelled_and_garbage_is_not() {
        assert_eq!(
            KNOWN_METHODS.labels("/ktd.v1.Directory/Publish"),
            ("ktd.v1.Directory", "Publish")
        );
        assert_eq!(
            KNOWN_METHODS.labels("/grpc.health.v1.Health/Check"),
            ("grpc.health.v1.Health", "Check")
        );
        assert_eq!(
            KNOWN_METHODS.labels("/ktd.v1.Directory/NoSuchMethod"),
            ("unknown", "unknown")
        );
        assert_eq!(KNOWN_METHODS.labels("/x"), ("unknown", "unknown"));
    }

    #[test]
    fn grpc_status_in_headers_is_the_code() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(response_code(&headers), tonic::Code::Ok);
        headers.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(response_code(&headers), tonic::Code::NotFound);
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        assert!(context_from_traceparent("garbage").is_none());
        assert!(
            context_from_traceparent("00-00000000000000000000000000000000-0000000000000000-01")
                .is_none()
        );
        let context =
            context_from_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
                .expect("valid");
        assert_eq!(
            traceparent_of(&context).as_deref(),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
    }
}
