//! The deployment files under `deploy/` as the deploy tests read them: YAML and TOML access,
//! the sequencer configuration checks, and the Kubernetes workloads' checks (shared by the
//! manifest test and the local-cluster test, which probes the same health services).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use ktd_testkit::fs::workspace_root;
use ktd_testkit::seed::TEST_VRF_KEY;
use serde_json::Value;

use super::cli::{KtdCli, command, ktd_env_names};

/// The server subcommands a deployment runs.
pub const SERVERS: [&str; 3] = ["sequencer", "shard", "gateway"];

/// The `deploy/` folder.
pub fn deploy_dir() -> PathBuf {
    workspace_root().join("deploy")
}

/// The text of `path` (failing the test if it cannot be read).
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// The YAML file `path` as JSON values.
pub fn yaml(path: &Path) -> Value {
    serde_saphyr::from_str(&read(path))
        .unwrap_or_else(|error| panic!("{} is not valid YAML: {error}", path.display()))
}

/// The strings of a YAML sequence (none if it is not one).
pub fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .map(|items| items.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The keys of a YAML mapping (none if it is not one).
pub fn keys(value: &Value) -> BTreeSet<String> {
    value
        .as_object()
        .map(|map| map.keys().cloned().collect())
        .unwrap_or_default()
}

/// The word after `flag` in a command line or script (quotes and brackets removed).
pub fn flag_value(command: &str, flag: &str) -> Option<String> {
    let unquote = |word: &str| word.trim_matches(|c: char| "\"'()".contains(c)).to_string();
    let mut words = command.split_whitespace();
    words.find(|word| unquote(word) == flag)?;
    words.next().map(unquote)
}

/// `ktd sequencer --config PATH --init --id 1 --vrf-public-key K --check-config`: the whole
/// file as a bootstrapping node reads it.
pub fn check_sequencer_config(path: &Path) {
    let output = command()
        .args(["sequencer", "--config"])
        .arg(path)
        .args(["--init", "--id", "1", "--vrf-public-key", TEST_VRF_KEY])
        .arg("--check-config")
        .output()
        .expect("run ktd");
    assert!(output.status.success(), "{}: {output:?}", path.display());
}

/// The `[cluster]` and top-level settings of a sequencer TOML the checks compare with.
pub struct SequencerToml {
    /// `peers`: node id and address.
    pub peers: Vec<(u64, String)>,
    /// `[cluster] shards`: shard id and URL.
    pub shards: Vec<(String, String)>,
    /// `[cluster] partition_bits`.
    pub partition_bits: i64,
}

/// Reads a sequencer TOML's peers, shards and partition bits.
pub fn sequencer_toml(text: &str) -> SequencerToml {
    let table: toml::Table = text.parse().expect("sequencer TOML");
    let list = |value: Option<&toml::Value>| -> Vec<(String, String)> {
        value
            .and_then(toml::Value::as_array)
            .expect("a list")
            .iter()
            .map(|entry| {
                let (id, addr) = entry
                    .as_str()
                    .and_then(|entry| entry.split_once('='))
                    .expect("ID=ADDRESS");
                (id.to_string(), addr.to_string())
            })
            .collect()
    };
    let cluster = table.get("cluster").expect("[cluster]");
    SequencerToml {
        peers: list(table.get("peers"))
            .into_iter()
            .map(|(id, addr)| (id.parse().expect("numeric id"), addr))
            .collect(),
        shards: list(cluster.get("shards")),
        partition_bits: cluster
            .get("partition_bits")
            .and_then(toml::Value::as_integer)
            .expect("partition_bits"),
    }
}

/// A gRPC probe of a Kubernetes container: which server, which health service.
#[derive(Debug)]
pub struct GrpcProbe {
    /// The server subcommand.
    pub server: String,
    /// The health service it asks for.
    pub service: String,
}

/// The health services a server registers as SERVING (`""` is the whole server). The shard
/// server (`ktd::serve::run_shard`) sets only the whole-server status.
pub fn registered_health_services(server: &str) -> Vec<&'static str> {
    match server {
        "sequencer" => vec!["", sequencer::HEALTH_SERVICE],
        "gateway" => vec!["", gateway::server::HEALTH_SERVICE],
        "shard" => vec![""],
        other => panic!("not a server: {other}"),
    }
}

/// The kustomization's resources, parsed; every manifest in the directory is listed.
pub fn kubernetes_objects() -> Vec<(String, Value)> {
    let dir = deploy_dir().join("k8s");
    let kustomization = yaml(&dir.join("kustomization.yaml"));
    let listed: BTreeSet<String> = strings(&kustomization["resources"])
        .into_iter()
        .map(str::to_string)
        .collect();
    let present: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("deploy/k8s")
        .flatten()
        .filter_map(|entry| entry.file_name().to_str().map(str::to_string))
        .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present, "kustomization resources vs files");
    listed
        .into_iter()
        .map(|file| {
            let object = yaml(&dir.join(&file));
            (file, object)
        })
        .collect()
}

/// Checks every workload's containers (flags, variables, ports, probes, volumes) and returns
/// their gRPC probes.
pub fn check_workloads(cli: &KtdCli, objects: &[(String, Value)]) -> Vec<GrpcProbe> {
    let config_map = objects
        .iter()
        .find(|(_, object)| object["kind"] == "ConfigMap")
        .map(|(_, object)| object)
        .expect("a ConfigMap");
    let config_name = config_map["metadata"]["name"].as_str().expect("name");
    let config_keys = keys(&config_map["data"]);
    let mut probes = Vec::new();
    for (file, object) in objects {
        let kind = object["kind"].as_str().expect("kind");
        if kind != "StatefulSet" && kind != "Deployment" {
            continue;
        }
        let template = &object["spec"]["template"];
        assert_eq!(
            template["spec"]["terminationGracePeriodSeconds"], 30,
            "{file}"
        );
        let annotations = &template["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true", "{file}");
        let metrics_port = annotations["prometheus.io/port"].as_str().expect("port");
        let mut mountable: BTreeSet<&str> = template["spec"]["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|volume| volume["name"].as_str())
            .collect();
        for claim in object["spec"]["volumeClaimTemplates"]
            .as_array()
            .into_iter()
            .flatten()
        {
            mountable.insert(claim["metadata"]["name"].as_str().expect("name"));
        }
        for container in template["spec"]["containers"]
            .as_array()
            .expect("containers")
        {
            let context = format!("{file}: {}", container["name"]);
            let command = [strings(&container["command"]), strings(&container["args"])]
                .concat()
                .join(" ");
            let server = cli.check_command(&context, &command);
            assert!(SERVERS.contains(&server.as_str()), "{context}: {server}");
            assert_eq!(
                flag_value(&command, "--metrics-listen"),
                Some(format!("0.0.0.0:{metrics_port}")),
                "{context}: metrics port vs annotation"
            );
            for env in container["env"].as_array().into_iter().flatten() {
                let name = env["name"].as_str().expect("name");
                if name.starts_with("KTD_") {
                    cli.check_env(&context, &server, name);
                }
                let config_ref = &env["valueFrom"]["configMapKeyRef"];
                if config_ref.is_object() {
                    assert_eq!(config_ref["name"], config_name, "{context}: {name}");
                    let key = config_ref["key"].as_str().expect("key");
                    assert!(config_keys.contains(key), "{context}: no key {key}");
                }
                let secret_ref = &env["valueFrom"]["secretKeyRef"];
                if secret_ref.is_object() {
                    assert_eq!(secret_ref["name"], "ktd-vrf", "{context}: {name}");
                }
            }
            for variable in ktd_env_names(&command) {
                cli.check_env(&context, &server, &variable);
            }
            let ports: BTreeSet<u64> = container["ports"]
                .as_array()
                .expect("ports")
                .iter()
                .filter_map(|port| port["containerPort"].as_u64())
                .collect();
            assert!(
                ports.contains(&metrics_port.parse().expect("number")),
                "{context}"
            );
            for probe_kind in ["readinessProbe", "livenessProbe", "startupProbe"] {
                let probe = &container[probe_kind];
                if probe.is_null() {
                    assert_eq!(probe_kind, "startupProbe", "{context}: no {probe_kind}");
                    continue;
                }
                assert_eq!(
                    keys(probe)
                        .iter()
                        .filter(
                            |key| ["grpc", "exec", "httpGet", "tcpSocket"].contains(&key.as_str())
                        )
                        .collect::<Vec<_>>(),
                    ["grpc"],
                    "{context}: {probe_kind} must be a gRPC probe"
                );
                let port = probe["grpc"]["port"].as_u64().expect("numeric port");
                assert!(ports.contains(&port), "{context}: {probe_kind} port {port}");
                let service = probe["grpc"]["service"].as_str().unwrap_or_default();
                assert!(
                    registered_health_services(&server).contains(&service),
                    "{context}: {probe_kind}: ktd {server} registers no health service {service:?}"
                );
                probes.push(GrpcProbe {
                    server: server.clone(),
                    service: service.to_string(),
                });
            }
            for mount in container["volumeMounts"].as_array().into_iter().flatten() {
                let name = mount["name"].as_str().expect("name");
                assert!(mountable.contains(name), "{context}: volume {name}");
            }
        }
    }
    probes
}
