//! Logging, tracing and metrics set-up for every `ktd` server process: text or JSON logs on stderr
//! (JSON lines carry the node's role, id, Raft term and epoch from
//! [`ktd_rpc::telemetry::log_context`]), and, when an OTLP endpoint is configured, spans exported
//! with OpenTelemetry (`tracing-opentelemetry` + OTLP over gRPC), sampled per trace.
//!
//! The span sources are `ktd_rpc::telemetry::GrpcServerLayer` (every RPC, parented on the
//! caller's `traceparent`), the epoch phases in the sequencer's coordinator and
//! `shard::cluster`, and the per-update spans that carry a publish's trace from the sequencer
//! to the shard that prepares it. Metrics are served for Prometheus by [`serve_prometheus`].

use std::fmt;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanExporter};
use tracing_subscriber::fmt::format::{Format, Json, JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// How log lines are written.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Deserialize,
    serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with `role`, `node_id`, `term` and `epoch`.
    Json,
}

/// What [`init`] sets up.
#[derive(Clone, Debug)]
pub struct TelemetrySettings {
    /// The process's role: `sequencer`, `shard`, `gateway`, `dev`, `auditor`; OpenTelemetry's
    /// `service.name` is `ktd-<role>`.
    pub role: &'static str,
    /// Log line format.
    pub log_format: LogFormat,
    /// The `RUST_LOG`-style filter used when `RUST_LOG` is unset.
    pub default_filter: String,
    /// OTLP/gRPC collector endpoint (`http://HOST:4317`); `None`: no export, no trace context.
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces recorded (a caller's sampled `traceparent` is followed, up to [`FORCED_TRACES_PER_SECOND`] per second).
    pub sample_ratio: f64,
}

/// Errors setting up telemetry.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built (bad endpoint).
    #[error("OTLP exporter for {endpoint:?}: {message}")]
    Exporter {
        /// The configured endpoint.
        endpoint: String,
        /// Why.
        message: String,
    },
    /// The sample ratio is not in [0, 1].
    #[error("trace sample ratio {0} is not between 0 and 1")]
    SampleRatio(f64),
    /// A subscriber was already installed.
    #[error("a tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Keeps the exporter alive; dropping it flushes and shuts down the span export.
#[must_use = "dropping the guard stops span export"]
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(error) = provider.force_flush() {
                eprintln!("warning: flushing spans failed: {error}");
            }
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global subscriber. Must be called inside the Tokio runtime when an OTLP
/// endpoint is configured (the exporter's gRPC channel lives on it).
pub fn init(settings: &TelemetrySettings) -> Result<TelemetryGuard, TelemetryError> {
    let provider = match &settings.otlp_endpoint {
        None => None,
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .with_timeout(Duration::from_secs(5))
                .build()
                .map_err(|error| TelemetryError::Exporter {
                    endpoint: endpoint.clone(),
                    message: error.to_string(),
                })?;
            Some(tracer_provider(settings, exporter, true)?)
        }
    };
    let subscriber = subscriber(settings, provider.as_ref());
    tracing::subscriber::set_global_default(subscriber)
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(TelemetryGuard { provider })
}

/// Traces a caller may force per second in one process (a sampled `traceparent` the ratio
/// would not have sampled); past it, the ratio decides.
pub const FORCED_TRACES_PER_SECOND: u32 = 10;

/// `ParentBased(TraceIdRatioBased(ratio))`, except that a *remote* sampled parent — a caller's
/// `traceparent` — forces a trace only within [`FORCED_TRACES_PER_SECOND`]; past that budget the
/// ratio decides. Traces the ratio samples anyway (by trace id, so every process of a trace
/// decides alike) never use the budget, so ktd's own sampled traces stay whole across hops and
/// no client can make a server record every request.
#[derive(Clone, Debug)]
struct CallerSampler {
    parent_based: Sampler,
    ratio: Sampler,
    forced: std::sync::Arc<std::sync::Mutex<(std::time::Instant, u32)>>,
}

impl CallerSampler {
    fn new(ratio: f64) -> Self {
        Self {
            parent_based: Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))),
            ratio: Sampler::TraceIdRatioBased(ratio),
            forced: std::sync::Arc::new(std::sync::Mutex::new((std::time::Instant::now(), 0))),
        }
    }

    /// Takes one forced trace from this second's budget.
    fn take_forced(&self) -> bool {
        let mut budget = self
            .forced
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = std::time::Instant::now();
        if now.duration_since(budget.0) >= Duration::from_secs(1) {
            *budget = (now, 0);
        }
        if budget.1 < FORCED_TRACES_PER_SECOND {
            budget.1 += 1;
            true
        } else {
            false
        }
    }
}

impl opentelemetry_sdk::trace::ShouldSample for CallerSampler {
    fn should_sample(
        &self,
        parent_context: Option<&opentelemetry::Context>,
        trace_id: opentelemetry::trace::TraceId,
        name: &str,
        span_kind: &opentelemetry::trace::SpanKind,
        attributes: &[opentelemetry::KeyValue],
        links: &[opentelemetry::trace::Link],
    ) -> opentelemetry_sdk::trace::SamplingResult {
        use opentelemetry::trace::TraceContextExt;
        use opentelemetry_sdk::trace::SamplingDecision;
        let remote_sampled = parent_context
            .filter(|context| context.has_active_span())
            .is_some_and(|context| {
                let span = context.span();
                let parent = span.span_context();
                parent.is_remote() && parent.is_sampled()
            });
        let ask = |sampler: &Sampler| {
            sampler.should_sample(parent_context, trace_id, name, span_kind, attributes, links)
        };
        if remote_sampled {
            let by_ratio = ask(&self.ratio);
            if by_ratio.decision == SamplingDecision::RecordAndSample || !self.take_forced() {
                return by_ratio;
            }
        }
        ask(&self.parent_based)
    }
}

/// A tracer provider exporting to `exporter`: batched in production, one span at a time when
/// `batch` is false (tests read an in-memory exporter right after the work).
pub fn tracer_provider(
    settings: &TelemetrySettings,
    exporter: impl SpanExporter + 'static,
    batch: bool,
) -> Result<SdkTracerProvider, TelemetryError> {
    if !(0.0..=1.0).contains(&settings.sample_ratio) {
        return Err(TelemetryError::SampleRatio(settings.sample_ratio));
    }
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(format!("ktd-{}", settings.role))
        .build();
    let builder = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_sampler(CallerSampler::new(settings.sample_ratio));
    let builder = if batch {
        builder.with_batch_exporter(exporter)
    } else {
        builder.with_simple_exporter(exporter)
    };
    Ok(builder.build())
}

/// The subscriber [`init`] installs: logs filtered by `RUST_LOG` (or the default filter), and
/// spans to `provider` filtered separately (ktd's own spans at INFO; dependencies' at WARN), so
/// a quiet log level never hides traces.
pub fn subscriber(
    settings: &TelemetrySettings,
    provider: Option<&SdkTracerProvider>,
) -> impl tracing::Subscriber + Send + Sync + 'static {
    let log_filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(&settings.default_filter));
    let logs = match settings.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(log_filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .fmt_fields(JsonFields::new())
            .event_format(NodeJson {
                inner: tracing_subscriber::fmt::format()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false),
            })
            .with_filter(log_filter)
            .boxed(),
    };
    let spans = provider.map(|provider| {
        let tracer = provider.tracer(format!("ktd-{}", settings.role));
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_default(tracing::Level::WARN)
                    .with_target("ktd", tracing::Level::INFO)
                    .with_target("gateway", tracing::Level::INFO)
                    .with_target("sequencer", tracing::Level::INFO)
                    .with_target("shard", tracing::Level::INFO),
            )
    });
    Registry::default().with(logs).with(spans)
}

/// tracing-subscriber's JSON lines plus `role`, `node_id`, `term` and `epoch`.
struct NodeJson {
    inner: Format<Json>,
}

impl<S, N> FormatEvent<S, N> for NodeJson
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let mut object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(line.trim_end()).map_err(|_| fmt::Error)?;
        let context = ktd_rpc::telemetry::log_context();
        if let Some((role, node_id)) = context.node() {
            object.insert("role".into(), role.into());
            object.insert("node_id".into(), node_id.into());
        }
        if context.term() > 0 {
            object.insert("term".into(), context.term().into());
        }
        if context.epoch() > 0 {
            object.insert("epoch".into(), context.epoch().into());
        }
        writeln!(writer, "{}", serde_json::Value::Object(object))
    }
}

/// Bucket bounds of every `*_seconds` histogram: 100 µs (a WAL fsync on NVMe) to 10 minutes (an
/// epoch seal far past its interval).
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Bucket bounds of `ktd_epoch_updates`: 1 to the 100,000-update default epoch limit and past it.
const UPDATES_BUCKETS: &[f64] = &[
    1.0,
    10.0,
    100.0,
    1_000.0,
    10_000.0,
    50_000.0,
    100_000.0,
    1_000_000.0,
];

/// Serves Prometheus metrics at `http://addr/metrics`, with histogram buckets for every
/// `*_seconds` series and for `ktd_epoch_updates`.
pub fn serve_prometheus(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    use anyhow::Context;
    use metrics_exporter_prometheus::Matcher;
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        // Histograms, not summaries, so alerts and dashboards can aggregate quantiles across
        // processes (`histogram_quantile` over `_bucket`).
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .context("histogram buckets")?
        .set_buckets_for_metric(Matcher::Full("ktd_epoch_updates".into()), UPDATES_BUCKETS)
        .context("histogram buckets")?
        .install()
        .with_context(|| format!("serve metrics on {addr}"))?;
    tracing::info!(%addr, "Prometheus metrics at /metrics");
    Ok(())
}

#[cfg(test)]
mod sampler_tests {
    use super::*;
    use opentelemetry::trace::{
        SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry_sdk::trace::{SamplingDecision, ShouldSample};

    fn decide(sampler: &CallerSampler, parent: Option<SpanContext>, trace: u128) -> bool {
        let context =
            parent.map(|parent| opentelemetry::Context::new().with_remote_span_context(parent));
        sampler
            .should_sample(
                context.as_ref(),
                TraceId::from(trace),
                "span",
                &SpanKind::Server,
                &[],
                &[],
            )
            .decision
            == SamplingDecision::RecordAndSample
    }

    fn parent(trace: u128, sampled: bool) -> SpanContext {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanContext::new(
            TraceId::from(trace),
            SpanId::from(7u64),
            flags,
            true,
            TraceState::default(),
        )
    }

    #[test]
    fn a_caller_forces_at_most_the_budget_of_traces_per_second_and_the_ratio_decides_the_rest() {
        let never = CallerSampler::new(0.0);
        let forced = (1..=100u128)
            .filter(|trace| decide(&never, Some(parent(*trace, true)), *trace))
            .count();
        assert_eq!(forced, FORCED_TRACES_PER_SECOND as usize);
        // An unsampled caller parent, or none, follows the ratio (0 here).
        assert!(!decide(&never, Some(parent(1, false)), 1));
        assert!(!decide(&never, None, 1));

        // Traces the ratio samples anyway are followed without using the budget.
        let always = CallerSampler::new(1.0);
        let followed = (1..=100u128)
            .filter(|trace| decide(&always, Some(parent(*trace, true)), *trace))
            .count();
        assert_eq!(followed, 100);
        assert!(always.take_forced(), "the budget was not used");
    }
}
