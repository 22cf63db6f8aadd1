//! `deploy/k8s/`: the manifests run real flags with gRPC probes of registered health services,
//! StatefulSets get their identity from the pod ordinal behind headless Services, disruption
//! budgets and autoscalers select what exists, the sequencer TOML validates and names the pods;
//! the wrapper scripts derive node ids from the ordinal and pass `--init` only where they
//! should.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use ktd_testkit::seed::TEST_VRF_KEY;
use serde_json::Value;

use crate::support::KTD;
use crate::support::cli::{KtdCli, command};
use crate::support::deploy::{
    SERVERS, check_sequencer_config, check_workloads, deploy_dir, flag_value, kubernetes_objects,
    sequencer_toml, strings,
};

#[test]
fn kubernetes_manifests_run_real_flags_with_grpc_probes_and_stable_identity() {
    let cli = KtdCli::load();
    let objects = kubernetes_objects();
    let of_kind = |kind: &str| -> Vec<&Value> {
        objects
            .iter()
            .filter(|(_, object)| object["kind"] == kind)
            .map(|(_, object)| object)
            .collect()
    };
    assert!(
        of_kind("Secret").is_empty(),
        "the VRF seed is never in the manifests"
    );
    let probes = check_workloads(&cli, &objects);
    for server in SERVERS {
        assert!(
            probes.iter().any(|probe| probe.server == server),
            "no probe for {server}"
        );
    }

    // StatefulSets: headless Services published before ready, volumes, identity from the ordinal.
    let services = of_kind("Service");
    let mut statefulsets = BTreeMap::new();
    for set in of_kind("StatefulSet") {
        let name = set["metadata"]["name"].as_str().expect("name");
        assert_eq!(set["spec"]["podManagementPolicy"], "Parallel", "{name}");
        assert!(
            set["spec"]["volumeClaimTemplates"]
                .as_array()
                .is_some_and(|claims| !claims.is_empty()),
            "{name}: volumeClaimTemplates"
        );
        let service_name = &set["spec"]["serviceName"];
        let service = services
            .iter()
            .find(|service| &service["metadata"]["name"] == service_name)
            .unwrap_or_else(|| panic!("{name}: no Service {service_name}"));
        assert_eq!(service["spec"]["clusterIP"], "None", "{name}: headless");
        assert_eq!(service["spec"]["publishNotReadyAddresses"], true, "{name}");
        let labels = &set["spec"]["template"]["metadata"]["labels"];
        for (key, value) in service["spec"]["selector"].as_object().expect("selector") {
            assert_eq!(&labels[key], value, "{name}: Service selector");
        }
        let container = &set["spec"]["template"]["spec"]["containers"][0];
        let script = strings(&container["command"]).join(" ");
        assert!(
            script.contains("${POD_NAME##*-}"),
            "{name}: id from ordinal"
        );
        assert!(
            container["env"]
                .as_array()
                .expect("env")
                .iter()
                .any(|env| env["name"] == "POD_NAME"
                    && env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"),
            "{name}: POD_NAME"
        );
        statefulsets.insert(
            cli.subcommand_of(&script).expect("server"),
            (name.to_string(), set),
        );
    }

    // PodDisruptionBudgets select pods that exist; sequencers lose at most one at a time.
    let templates: Vec<&Value> = of_kind("StatefulSet")
        .into_iter()
        .chain(of_kind("Deployment"))
        .map(|workload| &workload["spec"]["template"]["metadata"]["labels"])
        .collect();
    for budget in of_kind("PodDisruptionBudget") {
        let selector = budget["spec"]["selector"]["matchLabels"]
            .as_object()
            .expect("matchLabels");
        assert!(
            templates
                .iter()
                .any(|labels| selector.iter().all(|(key, value)| &labels[key] == value)),
            "PDB {} selects no pods",
            budget["metadata"]["name"]
        );
    }
    let sequencer_labels = &statefulsets["sequencer"].1["spec"]["template"]["metadata"]["labels"];
    assert!(
        of_kind("PodDisruptionBudget").iter().any(|budget| {
            budget["spec"]["maxUnavailable"] == 1
                && budget["spec"]["selector"]["matchLabels"]
                    .as_object()
                    .is_some_and(|selector| {
                        selector
                            .iter()
                            .all(|(key, value)| &sequencer_labels[key] == value)
                    })
        }),
        "sequencers need a PDB with maxUnavailable: 1"
    );
    for autoscaler in of_kind("HorizontalPodAutoscaler") {
        let target = &autoscaler["spec"]["scaleTargetRef"];
        assert!(
            of_kind(target["kind"].as_str().expect("kind"))
                .iter()
                .any(|workload| workload["metadata"]["name"] == target["name"]),
            "HPA target {target}"
        );
    }

    // The sequencer TOML validates and its addresses are the StatefulSets' pod names.
    let config_map = of_kind("ConfigMap")[0];
    let text = config_map["data"]["sequencer.toml"].as_str().expect("toml");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("sequencer.toml");
    std::fs::write(&path, text).expect("write");
    check_sequencer_config(&path);
    let settings = sequencer_toml(text);
    let (sequencer_set, sequencer_object) = &statefulsets["sequencer"];
    assert_eq!(
        sequencer_object["spec"]["replicas"].as_u64(),
        Some(settings.peers.len() as u64)
    );
    let sequencer_script =
        strings(&sequencer_object["spec"]["template"]["spec"]["containers"][0]["command"])
            .join(" ");
    for (id, addr) in &settings.peers {
        let service = sequencer_object["spec"]["serviceName"]
            .as_str()
            .expect("name");
        assert_eq!(addr, &format!("{sequencer_set}-{}.{service}:7001", id - 1));
        assert!(sequencer_script.contains(&format!("\"$POD_NAME.{service}:7001\"")));
    }
    let peers: Vec<&str> = settings
        .peers
        .iter()
        .map(|(_, addr)| addr.as_str())
        .collect();
    assert_eq!(config_map["data"]["sequencers"], peers.join(","));
    let (shard_set, shard_object) = &statefulsets["shard"];
    assert_eq!(
        shard_object["spec"]["replicas"].as_u64(),
        Some(settings.shards.len() as u64)
    );
    let shard_script =
        strings(&shard_object["spec"]["template"]["spec"]["containers"][0]["command"]).join(" ");
    for (index, (id, url)) in settings.shards.iter().enumerate() {
        let service = shard_object["spec"]["serviceName"].as_str().expect("name");
        assert_eq!(id, &format!("s{}", index + 1));
        assert_eq!(url, &format!("http://{shard_set}-{index}.{service}:7101"));
    }
    assert!(shard_script.contains("--id \"s$((ordinal + 1))\""));
    assert_eq!(
        flag_value(&shard_script, "--partition-bits"),
        Some(settings.partition_bits.to_string())
    );

    // Rendered by kustomize, where kubectl is installed (it is optional on CI machines).
    match Command::new("kubectl")
        .arg("kustomize")
        .arg(deploy_dir().join("k8s"))
        .output()
    {
        Ok(output) => {
            assert!(output.status.success(), "kubectl kustomize: {output:?}");
            let rendered = String::from_utf8_lossy(&output.stdout);
            assert_eq!(
                rendered.matches("\nkind: ").count() + usize::from(rendered.starts_with("kind: ")),
                objects.len(),
                "{rendered}"
            );
            assert_eq!(
                rendered.matches("  namespace: ktd\n").count(),
                objects.len() - 1,
                "every namespaced object lands in the namespace"
            );
        }
        Err(error) => println!("kubectl kustomize skipped: kubectl not runnable ({error})"),
    }
}

/// Runs a Kubernetes wrapper script with its paths moved under `root` (`replacements`), the
/// real binary for `/usr/local/bin/ktd`, and `--check-config` appended to the ktd command line.
fn run_wrapper(script: &str, replacements: &[(&str, &Path)], env: &[(&str, &str)]) -> Output {
    let mut script = script.replace(
        "exec /usr/local/bin/ktd \"${args[@]}\"",
        "exec /usr/local/bin/ktd \"${args[@]}\" --check-config",
    );
    if !script.contains("--check-config") {
        script = script.replace(
            "--metrics-listen 0.0.0.0:9100",
            "--metrics-listen 0.0.0.0:9100 --check-config",
        );
    }
    assert!(script.contains("--check-config"), "{script}");
    let mut script = script.replace("/usr/local/bin/ktd", KTD);
    for (from, to) in replacements {
        script = script.replace(from, to.to_str().expect("utf-8"));
    }
    Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .output()
        .expect("run bash")
}

#[test]
fn kubernetes_wrappers_derive_identity_and_bootstrap_only_ordinal_zero_on_a_new_volume() {
    let objects = kubernetes_objects();
    let script_of = |name: &str| -> String {
        let set = objects
            .iter()
            .find(|(_, object)| {
                object["kind"] == "StatefulSet" && object["metadata"]["name"] == name
            })
            .map(|(_, object)| object)
            .unwrap_or_else(|| panic!("no StatefulSet {name}"));
        strings(&set["spec"]["template"]["spec"]["containers"][0]["command"])[2].to_string()
    };
    let config_map = objects
        .iter()
        .find(|(_, object)| object["kind"] == "ConfigMap")
        .map(|(_, object)| object)
        .expect("ConfigMap");
    let root = tempfile::tempdir().expect("temp dir");
    let toml = root.path().join("sequencer.toml");
    std::fs::write(
        &toml,
        config_map["data"]["sequencer.toml"].as_str().expect("toml"),
    )
    .expect("write");
    let data = root.path().join("sequencer-data");
    let sequencer = script_of("ktd-sequencer");
    let run = |ordinal: u64, state: &str, key: Option<&str>| {
        let pod = format!("ktd-sequencer-{ordinal}");
        let mut env = vec![("POD_NAME", pod.as_str()), ("INITIAL_CLUSTER_STATE", state)];
        if let Some(key) = key {
            env.push(("KTD_SEQUENCER_VRF_PUBLIC_KEY", key));
        }
        run_wrapper(
            &sequencer,
            &[
                ("/etc/ktd/sequencer.toml", &toml),
                ("/var/lib/ktd/sequencer", &data),
            ],
            &env,
        )
    };
    let stdout = |output: &Output| String::from_utf8_lossy(&output.stdout).into_owned();

    // A new volume: ordinal 0 bootstraps (--init needs the VRF key), the others do not.
    let first = run(0, "new", Some(TEST_VRF_KEY));
    assert!(first.status.success(), "{first:?}");
    assert!(stdout(&first).contains("id = 1\n"), "{first:?}");
    assert!(
        stdout(&first).contains("advertise = \"ktd-sequencer-0.ktd-sequencer:7001\""),
        "{first:?}"
    );
    let no_key = run(0, "new", None);
    assert!(
        !no_key.status.success()
            && String::from_utf8_lossy(&no_key.stderr).contains("vrf_public_key"),
        "ordinal 0 on a new volume passes --init: {no_key:?}"
    );
    let third = run(2, "new", None);
    assert!(third.status.success(), "no --init on ordinal 2: {third:?}");
    assert!(stdout(&third).contains("id = 3\n"), "{third:?}");

    // An initialised volume: no --init, whatever the cluster state.
    std::fs::create_dir(&data).expect("data dir");
    let restarted = run(0, "existing", None);
    assert!(restarted.status.success(), "{restarted:?}");
    std::fs::remove_dir(&data).expect("remove");

    // An empty volume in an existing cluster: refused before ktd starts.
    let lost = run(1, "existing", Some(TEST_VRF_KEY));
    assert!(!lost.status.success(), "{lost:?}");
    assert!(
        String::from_utf8_lossy(&lost.stderr).contains("refusing to rejoin"),
        "{lost:?}"
    );
    assert!(lost.stdout.is_empty(), "ktd did not run: {lost:?}");

    // The shard: id from the ordinal, and the seed copied out of a group-readable Secret file
    // (what fsGroup makes of defaultMode 0400) into a private one that ktd accepts.
    let secret = root.path().join("secret-seed.hex");
    std::fs::write(&secret, format!("{}\n", "5a".repeat(32))).expect("seed");
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o440))
        .expect("chmod");
    let run_dir = root.path().join("run");
    std::fs::create_dir(&run_dir).expect("run dir");
    let shard = run_wrapper(
        &script_of("ktd-shard"),
        &[
            ("/etc/ktd/vrf/vrf-seed.hex", &secret),
            ("/run/ktd", &run_dir),
            ("/var/lib/ktd/shard", &root.path().join("shard-data")),
        ],
        &[
            ("POD_NAME", "ktd-shard-1"),
            (
                "KTD_SHARD_SEQUENCERS",
                config_map["data"]["sequencers"].as_str().expect("list"),
            ),
        ],
    );
    assert!(shard.status.success(), "{shard:?}");
    assert!(stdout(&shard).contains("id = \"s2\""), "{shard:?}");
    assert!(
        stdout(&shard).contains("ktd-sequencer-2.ktd-sequencer:7001"),
        "KTD_SHARD_SEQUENCERS read: {shard:?}"
    );
    let direct = command()
        .args([
            "shard",
            "--id",
            "s1",
            "--listen",
            "0.0.0.0:7101",
            "--data-dir",
        ])
        .arg(root.path().join("x"))
        .arg("--vrf-seed-file")
        .arg(&secret)
        .arg("--check-config")
        .output()
        .expect("run ktd");
    assert!(
        !direct.status.success(),
        "ktd refuses the Secret file as mounted, hence the copy: {direct:?}"
    );
}
