//! Distributed tracing end to end: a sequencer, two shard servers and a gateway in this process,
//! talking real gRPC on 127.0.0.x, with ktd's subscriber exporting to an in-memory span collector.
//! One publish must produce one trace that spans the gateway's `Publish`, the sequencer's
//! `Append` (parented over gRPC metadata), the epoch that includes the update, and the shard that
//! prepares it (parented through `PrepareEpochRequest.traces`), and the epoch's own work must be
//! a trace of its own that the update's span links to.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ktd::serve::{GatewaySettings, ShardSettings};
use ktd::telemetry::{LogFormat, TelemetrySettings};
use ktd_core::config::AkdConfig;
use ktd_core::vrf::VrfKey;
use ktd_testkit::eventually;
use ktd_testkit::net::free_addr;
use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use sequencer::config::SequencerConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::support::cluster::connect;

const SEED: [u8; 32] = [0x7c; 32];

/// Keeps every exported span. (opentelemetry_sdk's `InMemorySpanExporter` needs its `testing`
/// feature, which would give the crate different features in `cargo test` than in
/// `cargo build` and rebuild the workspace between the two.)
#[derive(Clone, Debug, Default)]
struct Collector(Arc<Mutex<Vec<SpanData>>>);

impl Collector {
    fn spans(&self) -> Vec<SpanData> {
        self.0.lock().expect("spans").clone()
    }

    fn reset(&self) {
        self.0.lock().expect("spans").clear();
    }
}

impl SpanExporter for Collector {
    async fn export(&self, batch: Vec<SpanData>) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.lock().expect("spans").extend(batch);
        Ok(())
    }
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

fn named<'a>(spans: &'a [SpanData], name: &str, trace: TraceId) -> Vec<&'a SpanData> {
    spans
        .iter()
        .filter(|span| span.name == name && span.span_context.trace_id() == trace)
        .collect()
}

fn parent_of<'a>(spans: &'a [SpanData], child: &SpanData) -> Option<&'a SpanData> {
    (child.parent_span_id != SpanId::INVALID)
        .then(|| {
            spans
                .iter()
                .find(|span| span.span_context.span_id() == child.parent_span_id)
        })
        .flatten()
}

#[test]
fn one_publish_is_one_trace_across_gateway_sequencer_and_shards() {
    let exporter = Collector::default();
    let settings = TelemetrySettings {
        role: "test",
        log_format: LogFormat::Text,
        default_filter: "warn,openraft=error".into(),
        otlp_endpoint: None,
        sample_ratio: 1.0,
    };
    let provider =
        ktd::telemetry::tracer_provider(&settings, exporter.clone(), false).expect("provider");
    let dispatch = tracing::Dispatch::new(ktd::telemetry::subscriber(&settings, Some(&provider)));
    // Every runtime thread (workers and the blocking pool) uses this test's subscriber, so
    // concurrently running tests neither see its spans nor add theirs.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(3)
        .enable_all()
        .on_thread_start(move || {
            std::mem::forget(tracing::dispatcher::set_default(&dispatch));
        })
        .build()
        .expect("runtime");
    let root = tempfile::tempdir().expect("temp dir");
    let spans = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(90), run(root.path(), &exporter))
            .await
            .expect("the traced cluster exceeded its deadline")
    });
    runtime.shutdown_timeout(Duration::from_secs(5));

    // The gateway's Publish span is the trace's root.
    let publish = spans
        .iter()
        .find(|span| span.name == "ktd.v1.Directory/Publish")
        .expect("a Publish span");
    assert_eq!(
        attribute(publish, "ktd.component").as_deref(),
        Some("gateway")
    );
    assert_eq!(
        publish.parent_span_id,
        SpanId::INVALID,
        "Publish is the root"
    );
    let trace = publish.span_context.trace_id();

    // The sequencer's Append, a child of Publish across gRPC.
    let appends = named(&spans, "ktd.sequencer.v1.Sequencer/Append", trace);
    assert_eq!(appends.len(), 1, "one Append in the publish's trace");
    let append = appends[0];
    assert_eq!(
        attribute(append, "ktd.component").as_deref(),
        Some("sequencer")
    );
    assert!(
        append.parent_span_is_remote,
        "Append's parent came over gRPC"
    );
    assert_eq!(
        append.parent_span_id,
        publish.span_context.span_id(),
        "Append is Publish's child"
    );

    // The epoch that included the update, a child of Append, linked to the epoch's span.
    let includes = named(&spans, "ktd.epoch.include", trace);
    assert_eq!(includes.len(), 1, "one include span for the one update");
    let include = includes[0];
    assert_eq!(include.parent_span_id, append.span_context.span_id());
    assert_eq!(attribute(include, "epoch").as_deref(), Some("1"));
    let epoch_span = spans
        .iter()
        .find(|span| span.name == "ktd.epoch.commit")
        .expect("the epoch's span");
    assert_ne!(
        epoch_span.span_context.trace_id(),
        trace,
        "the epoch is its own trace"
    );
    assert!(
        include
            .links
            .iter()
            .any(|link| link.span_context == epoch_span.span_context),
        "the include span links to the epoch's span"
    );

    // Every replica of the user's partition (two shards, replication factor 2) prepared the
    // update inside the publish's trace, parented through its PrepareEpoch request.
    let prepares = named(&spans, "ktd.shard.prepare_update", trace);
    assert_eq!(prepares.len(), 2, "each replica prepared the update once");
    let mut shards = Vec::new();
    for prepare in prepares {
        assert_eq!(prepare.parent_span_id, include.span_context.span_id());
        assert!(prepare.parent_span_is_remote);
        shards.push(attribute(prepare, "shard").expect("shard attribute"));
    }
    shards.sort();
    assert_eq!(shards, ["s1", "s2"]);

    // The epoch's own trace covers both shards' PrepareEpoch and BuildEpoch RPCs.
    let epoch_trace = epoch_span.span_context.trace_id();
    for method in ["PrepareEpoch", "BuildEpoch"] {
        let calls = named(&spans, &format!("ktd.shard.v1.Shard/{method}"), epoch_trace);
        assert_eq!(
            calls.len(),
            2,
            "{method} on both shards in the epoch's trace"
        );
        for call in calls {
            assert_eq!(attribute(call, "ktd.component").as_deref(), Some("shard"));
            assert!(
                parent_of(&spans, call).is_some(),
                "{method} has a parent span"
            );
        }
    }
    for phase in ["ktd.epoch.prepare", "ktd.epoch.build"] {
        assert_eq!(named(&spans, phase, epoch_trace).len(), 1, "{phase}");
    }
}

/// Starts the cluster, publishes one update, seals, and returns the finished spans.
async fn run(root: &std::path::Path, exporter: &Collector) -> Vec<SpanData> {
    let stop = CancellationToken::new();
    let public_key = VrfKey::from_seed(&SEED).expect("seed").public_key();

    let mut shard_addrs = Vec::new();
    let mut tasks = Vec::new();
    for index in 1..=2 {
        let listener = TcpListener::bind(free_addr("127.0.0.31"))
            .await
            .expect("bind");
        shard_addrs.push(format!(
            "s{index}=http://{}",
            listener.local_addr().expect("addr")
        ));
        let settings = ShardSettings {
            id: format!("s{index}"),
            data_dir: root.join(format!("shard-{index}")),
            vrf_seed: SEED,
            partition_bits: 2,
            config: AkdConfig::WhatsAppV1,
            sequencers: Vec::new(),
            orphan_grace: shard::local::DEFAULT_ORPHAN_GRACE,
            prune_interval: shard::local::DEFAULT_PRUNE_INTERVAL,
            lookup_proofs: Default::default(),
            store: Default::default(),
        };
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            ktd::serve::run_shard(settings, listener, stop.cancelled_owned()).await
        }));
    }

    let listener = TcpListener::bind(free_addr("127.0.0.31"))
        .await
        .expect("bind");
    let sequencer_addr = listener.local_addr().expect("addr").to_string();
    let mut config = SequencerConfig {
        id: Some(1),
        listen: sequencer_addr.clone(),
        data_dir: root.join("sequencer"),
        peers: vec![format!("1={sequencer_addr}")],
        init: true,
        ..SequencerConfig::default()
    };
    config.cluster.partition_bits = 2;
    config.cluster.vrf_public_key = hex::encode(public_key);
    config.cluster.shards = shard_addrs;
    config.epoch.interval = Duration::from_secs(3600);
    {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            sequencer::serve::run(config, listener, stop.cancelled_owned())
                .await
                .map_err(anyhow::Error::from)
        }));
    }

    let listener = TcpListener::bind(free_addr("127.0.0.31"))
        .await
        .expect("bind");
    let gateway_addr = listener.local_addr().expect("addr");
    let settings = GatewaySettings {
        sequencers: vec![sequencer_addr.clone()],
        drain: Duration::from_secs(1),
        ..GatewaySettings::default()
    };
    {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            ktd::serve::run_gateway(settings, listener, None, stop.cancelled_owned()).await
        }));
    }

    let client = connect(&gateway_addr.to_string()).await;
    // Spans from start-up (waiting for the cluster) are not what this test is about.
    exporter.reset();
    let published = client
        .publish(vec![(b"alice".to_vec(), b"key-1".to_vec())], None)
        .await
        .expect("publish");
    assert_eq!(published.epoch, 1);
    let root_1 = client.seal().await.expect("seal");
    assert_eq!(root_1.epoch, 1);

    // The include span ends when the coordinator finishes the epoch, just after the commit the
    // seal waited for.
    let spans = eventually(
        "the epoch's include and commit spans",
        Duration::from_secs(30),
        || async {
            let spans = exporter.spans();
            let ended = |name: &str| spans.iter().any(|span| span.name == name);
            (ended("ktd.epoch.include") && ended("ktd.epoch.commit")).then_some(spans)
        },
    )
    .await;
    stop.cancel();
    for task in tasks {
        task.await.expect("task").expect("server");
    }
    spans
}
