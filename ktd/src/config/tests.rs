//! The file format of every server's configuration, and `deploy/ktd.example.toml` against it
//! (as TiKV tests its template): the example parses with every key set, lists every key of
//! every server exactly once and no other, and shows each key at its default.

use std::collections::BTreeSet;

use sequencer::SequencerConfig;
use sequencer::config::{
    ClusterOptions, EpochOptions, RaftOptions, ReplicaOptions, ShutdownOptions, WatchOptions,
};
use serde::de::{DeserializeOwned, Deserializer, Visitor};

use super::*;

const EXAMPLE: &str = include_str!("../../../deploy/ktd.example.toml");

/// The keys serde reads for a struct (its `deserialize_struct` field list).
fn fields_of<T: DeserializeOwned>() -> Vec<&'static str> {
    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("stop")
        }
    }
    impl std::error::Error for Stop {}
    impl serde::de::Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Stop
        }
    }
    struct Probe<'a>(&'a mut Vec<&'static str>);
    impl<'de> Deserializer<'de> for Probe<'_> {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            self.0.extend(fields);
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut fields = Vec::new();
    let _ = T::deserialize(Probe(&mut fields));
    assert!(
        !fields.is_empty(),
        "{} is not a struct",
        std::any::type_name::<T>()
    );
    fields
}

/// Every key of every server, as `table.key` (the sequencer's nested tables included).
fn expected_keys() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut add = |table: &str, fields: Vec<&'static str>| {
        keys.extend(fields.into_iter().map(|key| format!("{table}.{key}")));
    };
    let nested = ["cluster", "epoch", "raft", "shutdown", "replicas", "watch"];
    add(
        "sequencer",
        fields_of::<SequencerConfig>()
            .into_iter()
            .filter(|key| !nested.contains(key))
            .collect(),
    );
    add("sequencer.cluster", fields_of::<ClusterOptions>());
    add("sequencer.epoch", fields_of::<EpochOptions>());
    add("sequencer.raft", fields_of::<RaftOptions>());
    add("sequencer.shutdown", fields_of::<ShutdownOptions>());
    add("sequencer.replicas", fields_of::<ReplicaOptions>());
    add("sequencer.watch", fields_of::<WatchOptions>());
    add("shard", fields_of::<ShardConfig>());
    add("gateway", fields_of::<GatewayConfig>());
    add("dev", fields_of::<DevConfig>());
    add("auditor", fields_of::<AuditorConfig>());
    for table in ["shard", "gateway", "dev", "auditor"] {
        add(table, PROCESS_KEYS.to_vec());
    }
    keys
}

/// A `# key = value` line of the example.
struct ExampleKey {
    /// `table.key`.
    path: String,
    /// The line's index.
    line: usize,
    /// Its `##` description says "(no default".
    no_default: bool,
}

/// The example's commented-out keys.
fn example_keys() -> Vec<ExampleKey> {
    let mut table = String::new();
    let mut description: Vec<&str> = Vec::new();
    let mut keys = Vec::new();
    for (line, text) in EXAMPLE.lines().enumerate() {
        if let Some(name) = text
            .strip_prefix('[')
            .and_then(|rest| rest.strip_suffix(']'))
        {
            table = name.to_string();
            description.clear();
        } else if text.starts_with("##") {
            description.push(text);
        } else if let Some(key) = commented_key(text) {
            keys.push(ExampleKey {
                path: format!("{table}.{key}"),
                line,
                no_default: description.iter().any(|text| text.contains("(no default")),
            });
            description.clear();
        } else {
            description.clear();
        }
    }
    keys
}

/// `key` of a `# key = value` line.
fn commented_key(text: &str) -> Option<&str> {
    let (key, _) = text.strip_prefix("# ")?.split_once(" = ")?;
    key.chars()
        .all(|c| c.is_ascii_lowercase() || c == '_')
        .then_some(key)
}

/// The example with the chosen key lines uncommented.
fn uncommented(keep: impl Fn(&ExampleKey) -> bool) -> String {
    let chosen: BTreeSet<usize> = example_keys()
        .iter()
        .filter(|key| keep(key))
        .map(|key| key.line)
        .collect();
    EXAMPLE
        .lines()
        .enumerate()
        .map(|(line, text)| match chosen.contains(&line) {
            true => &text[2..],
            false => text,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Each server's configuration from a combined file's text.
fn parse_all(text: &str) -> Result<(), String> {
    from_toml::<SequencerConfig>(text)?;
    from_toml::<ShardConfig>(text)?;
    from_toml::<GatewayConfig>(text)?;
    from_toml::<DevConfig>(text)?;
    from_toml::<AuditorConfig>(text)?;
    Ok(())
}

/// `T::default()` as a TOML table (unset options absent).
fn default_table<T: ServerFile>() -> toml::Table {
    toml::Table::try_from(T::default()).expect("defaults serialise")
}

#[test]
fn example_parses_with_every_key_set() {
    parse_all(&uncommented(|_| true)).expect("every key of the example is valid");
    parse_all(EXAMPLE).expect("the example as shipped is valid");
}

#[test]
fn example_lists_every_key_once_and_no_other() {
    let listed: Vec<String> = example_keys().into_iter().map(|key| key.path).collect();
    let unique: BTreeSet<String> = listed.iter().cloned().collect();
    assert_eq!(
        unique.len(),
        listed.len(),
        "a key is listed twice: {listed:?}"
    );
    let expected = expected_keys();
    let missing: Vec<_> = expected.difference(&unique).collect();
    let superfluous: Vec<_> = unique.difference(&expected).collect();
    assert!(missing.is_empty(), "missing from the example: {missing:?}");
    assert!(
        superfluous.is_empty(),
        "not configuration keys: {superfluous:?}"
    );
}

#[test]
fn example_shows_the_defaults() {
    // Commented out, the example is all defaults; so is every key shown at its value, except
    // those marked "(no default", whose lines show examples.
    let defaults = uncommented(|key| !key.no_default);
    for text in [EXAMPLE, defaults.as_str()] {
        assert_eq!(
            from_toml::<SequencerConfig>(text),
            Ok(SequencerConfig::default())
        );
        assert_eq!(from_toml::<ShardConfig>(text), Ok(ShardConfig::default()));
        assert_eq!(
            from_toml::<GatewayConfig>(text),
            Ok(GatewayConfig::default())
        );
        assert_eq!(from_toml::<DevConfig>(text), Ok(DevConfig::default()));
        assert_eq!(
            from_toml::<AuditorConfig>(text),
            Ok(AuditorConfig::default())
        );
    }
    // "(no default" marks exactly the keys that are unset by default.
    let mut sequencer_defaults = BTreeSet::new();
    for (table, value) in default_table::<SequencerConfig>() {
        match value {
            toml::Value::Table(nested) => {
                sequencer_defaults
                    .extend(nested.keys().map(|key| format!("sequencer.{table}.{key}")));
            }
            _ => {
                sequencer_defaults.insert(format!("sequencer.{table}"));
            }
        }
    }
    let mut with_default = sequencer_defaults;
    for (server, table) in [
        ("shard", default_table::<ShardConfig>()),
        ("gateway", default_table::<GatewayConfig>()),
        ("dev", default_table::<DevConfig>()),
        ("auditor", default_table::<AuditorConfig>()),
    ] {
        with_default.extend(table.keys().map(|key| format!("{server}.{key}")));
    }
    for key in example_keys() {
        assert_eq!(
            !key.no_default,
            with_default.contains(&key.path),
            "{}: marked (no default) if and only if unset by default",
            key.path
        );
    }
}

#[test]
fn process_keys_are_the_process_configs_fields() {
    assert_eq!(fields_of::<ProcessConfig>(), PROCESS_KEYS.to_vec());
}

/// `--check-config` prints a configuration its server reads back unchanged.
#[test]
fn printed_configurations_read_back() {
    fn round_trip<T: ServerFile + PartialEq + std::fmt::Debug>(config: T) {
        let text = toml::to_string(&config).expect("serialise");
        assert_eq!(from_toml::<T>(&text), Ok(config), "{text}");
    }
    let process = ProcessConfig {
        metrics_listen: Some("127.0.0.1:9100".parse().expect("address")),
        log_format: crate::telemetry::LogFormat::Json,
        otlp_endpoint: Some("http://127.0.0.1:4317".into()),
        trace_sample_ratio: 0.5,
        tls_ca: Some("ca.pem".into()),
        tls_cert: Some("node.pem".into()),
        tls_key: Some("node.key".into()),
    };
    round_trip(SequencerConfig::default());
    round_trip(ShardConfig {
        id: Some("s1".into()),
        listen: Some("127.0.0.1:7101".into()),
        data_dir: Some("shard".into()),
        vrf_seed_file: Some("seed.hex".into()),
        partition_bits: 6,
        configuration: ktd_core::AkdConfig::Experimental {
            domain_label: "test".into(),
        },
        sequencers: vec!["127.0.0.1:7001".into()],
        orphan_grace: std::time::Duration::from_secs(90),
        prune_interval: std::time::Duration::from_secs(7),
        lookup_proofs: ::shard::lookup_proofs::LookupProofs::Lazy,
        block_cache_mib: 64,
        hot_tree_mib: 0,
        process: process.clone(),
    });
    round_trip(GatewayConfig {
        admin_listen: Some("127.0.0.1:8081".into()),
        tls_client_auth: ClientAuth::Optional,
        sequencers: vec!["a:1".into(), "b:1".into()],
        shard_map_refresh: std::time::Duration::from_secs(2),
        process: process.clone(),
        ..GatewayConfig::default()
    });
    round_trip(DevConfig {
        vrf_seed_file: Some("seed.hex".into()),
        heartbeat_interval: Some(std::time::Duration::from_millis(1500)),
        lookup_proofs: ::shard::lookup_proofs::LookupProofs::Off,
        block_cache_mib: 128,
        hot_tree_mib: 1024,
        process: process.clone(),
        ..DevConfig::default()
    });
    round_trip(AuditorConfig {
        data_dir: Some("auditor".into()),
        signing_key_file: Some("auditor.key".into()),
        gateway: Some("http://127.0.0.1:8080".into()),
        start: Some(format!("3/{}", "ab".repeat(32))),
        process,
        ..AuditorConfig::default()
    });
}

#[test]
fn errors_are_one_line_naming_the_key() {
    let error = |text: &str| from_toml::<GatewayConfig>(text).expect_err(text);
    assert_eq!(error("listen_port = 5"), "unknown key \"listen_port\"");
    assert_eq!(
        error("max_in_flight = \"lots\""),
        "max_in_flight: invalid type: string \"lots\", expected usize"
    );
    assert!(error("log_format = \"xml\"").starts_with("log_format: unknown variant `xml`"));
    assert!(error("listen = ").starts_with("line 1, column 10: "));
    // Test-only switches are flags, never file keys.
    assert_eq!(
        error("unsafe_test_mode = true"),
        "unknown key \"unsafe_test_mode\""
    );
    assert_eq!(
        from_toml::<SequencerConfig>("[epoch]\nbogus = 1\n"),
        Err("unknown key \"epoch.bogus\"".to_string())
    );
    assert!(
        from_toml::<SequencerConfig>("[epoch]\ninterval = \"two seconds\"\n")
            .expect_err("bad duration")
            .starts_with("epoch.interval: ")
    );
    // The sequencer takes its process settings as flags and variables only.
    assert_eq!(
        from_toml::<SequencerConfig>("log_format = \"json\""),
        Err("unknown key \"log_format\"".to_string())
    );
    for text in ["partition_bits = 300", "init = true"] {
        assert!(from_toml::<ShardConfig>(text).is_err(), "{text}");
    }
    assert!(from_toml::<SequencerConfig>("init = true").is_err());
}

#[test]
fn store_memory_settings_are_checked_and_become_store_options() {
    let store = super::shard::store_options(64, 0).expect("valid");
    assert_eq!(
        (store.block_cache_bytes, store.hot_tree_bytes),
        (64 << 20, 0)
    );
    for (block_cache_mib, hot_tree_mib, key) in [
        (4, 256, "block_cache_mib"),
        (usize::MAX, 256, "block_cache_mib"),
        (512, usize::MAX, "hot_tree_mib"),
    ] {
        let error = super::shard::store_options(block_cache_mib, hot_tree_mib)
            .expect_err("out of range")
            .to_string();
        assert!(error.starts_with(key), "{error}");
    }
    let defaults = super::shard::store_options(
        super::shard::DEFAULT_BLOCK_CACHE_MIB,
        super::shard::DEFAULT_HOT_TREE_MIB,
    )
    .expect("defaults are valid");
    assert_eq!(defaults, ::shard::store::StoreOptions::default());
}

#[test]
fn a_server_reads_its_own_table_of_a_combined_file() {
    let text = "[shard]\nid = \"s1\"\nlog_format = \"json\"\n\n[gateway]\nmax_in_flight = 7\n\n\
                [sequencer.epoch]\ninterval = \"5s\"\n";
    let shard: ShardConfig = from_toml(text).expect("shard");
    assert_eq!(shard.id.as_deref(), Some("s1"));
    assert_eq!(shard.process.log_format, crate::telemetry::LogFormat::Json);
    let gateway: GatewayConfig = from_toml(text).expect("gateway");
    assert_eq!(gateway.max_in_flight, 7);
    assert_eq!(gateway.process, ProcessConfig::default());
    let sequencer: SequencerConfig = from_toml(text).expect("sequencer");
    assert_eq!(sequencer.epoch.interval, std::time::Duration::from_secs(5));
    assert_eq!(from_toml::<DevConfig>(text), Ok(DevConfig::default()));
    assert_eq!(
        from_toml::<GatewayConfig>("[gateway]\nlisten_port = 1\n"),
        Err("unknown key \"gateway.listen_port\"".to_string())
    );
    assert!(
        from_toml::<GatewayConfig>("[gateway]\nmax_in_flight = \"x\"\n")
            .expect_err("bad value")
            .starts_with("gateway.max_in_flight: ")
    );
    // Beside server tables, only server tables.
    let stray = from_toml::<ShardConfig>("listen = \"x:1\"\n[shard]\nid = \"s1\"\n");
    assert!(
        stray
            .expect_err("stray key")
            .starts_with("unknown key \"listen\"")
    );
    // An auditor's `gateway` is a string, not the gateway's table: a file of auditor keys.
    let auditor: AuditorConfig =
        from_toml("gateway = \"http://127.0.0.1:8080\"\n").expect("auditor");
    assert_eq!(auditor.gateway.as_deref(), Some("http://127.0.0.1:8080"));
}

#[test]
fn secrets_are_redacted_from_debug() {
    let shard = crate::serve::ShardSettings {
        id: "s1".into(),
        data_dir: "shard".into(),
        vrf_seed: [0x5a; 32],
        partition_bits: 4,
        config: ktd_core::AkdConfig::WhatsAppV1,
        sequencers: Vec::new(),
        orphan_grace: ::shard::local::DEFAULT_ORPHAN_GRACE,
        prune_interval: ::shard::local::DEFAULT_PRUNE_INTERVAL,
        lookup_proofs: Default::default(),
        store: Default::default(),
    };
    let auditor = ktd_auditor::AuditorSettings {
        namespace: "test".into(),
        data_dir: "auditor".into(),
        signing_key: [0x5a; 32],
        config: ktd_core::AkdConfig::WhatsAppV1,
        start: None,
        source: ktd_auditor::BlobSource::Directory("blobs".into()),
        poll: std::time::Duration::from_secs(1),
        log_directory: None,
    };
    for debug in [format!("{shard:?}"), format!("{auditor:?}")] {
        assert!(debug.contains("<redacted>"), "{debug}");
        assert!(
            !debug.contains("90, 90") && !debug.contains("5a5a"),
            "{debug}"
        );
    }
}
