//! `deploy/compose/`: every ktd service runs real flags and `KTD_*` variables, references only
//! declared volumes, networks, secrets and configs, is scraped by Prometheus and matches the
//! shared sequencer configuration (which validates); each service's healthcheck passes against
//! a running server and fails without one.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use ktd_testkit::net::free_addr;
use ktd_testkit::process::KtdNode;
use ktd_testkit::{Poll, with_deadline};

use crate::support::KTD;
use crate::support::cli::{KtdCli, flags_in, ktd_env_names};
use crate::support::deploy::{
    SERVERS, check_sequencer_config, deploy_dir, flag_value, keys, read, sequencer_toml, strings,
    yaml,
};

#[test]
fn compose_services_run_real_flags_with_declared_resources() {
    let cli = KtdCli::load();
    let dir = deploy_dir().join("compose");
    let compose = yaml(&dir.join("docker-compose.yml"));
    let (networks, volumes, secrets, configs) = (
        keys(&compose["networks"]),
        keys(&compose["volumes"]),
        keys(&compose["secrets"]),
        keys(&compose["configs"]),
    );
    for config in configs.iter() {
        let file = compose["configs"][config]["file"].as_str().expect("file");
        assert!(dir.join(file).is_file(), "config {config}: no {file}");
    }
    let subnet = compose["networks"]["ktd"]["ipam"]["config"][0]["subnet"]
        .as_str()
        .expect("subnet");
    let prefix = subnet.trim_end_matches("0/24");
    let services = compose["services"].as_object().expect("services");
    let mut addresses = BTreeSet::new();
    let mut ktd_services = BTreeMap::new();
    let mut metrics_targets = BTreeSet::new();
    for (name, service) in services {
        let context = format!("docker-compose.yml: {name}");
        for volume in strings(&service["volumes"]) {
            let source = volume.split(':').next().expect("source");
            if !source.starts_with('.') && !source.starts_with('/') {
                assert!(volumes.contains(source), "{context}: volume {source}");
            }
        }
        for (network, settings) in service["networks"].as_object().expect("networks") {
            assert!(networks.contains(network), "{context}: network {network}");
            let address = settings["ipv4_address"].as_str().expect("static address");
            assert!(address.starts_with(prefix), "{context}: {address}");
            assert!(
                addresses.insert(address.to_string()),
                "{context}: {address}"
            );
        }
        for secret in service["secrets"].as_array().into_iter().flatten() {
            let secret = secret.as_str().or(secret["source"].as_str()).expect("name");
            assert!(secrets.contains(secret), "{context}: secret {secret}");
        }
        for config in service["configs"].as_array().into_iter().flatten() {
            let config = config["source"].as_str().expect("source");
            assert!(configs.contains(config), "{context}: config {config}");
        }
        for (dependency, condition) in service["depends_on"].as_object().into_iter().flatten() {
            let target = services
                .get(dependency)
                .unwrap_or_else(|| panic!("{context}: depends on unknown {dependency}"));
            match condition["condition"].as_str() {
                Some("service_started") => {}
                Some("service_healthy") => assert!(
                    target["healthcheck"]["test"].is_array(),
                    "{context}: {dependency} has no healthcheck"
                ),
                other => panic!("{context}: condition {other:?} for {dependency}"),
            }
        }
        let healthcheck = strings(&service["healthcheck"]["test"]);
        assert!(
            healthcheck.first() == Some(&"CMD") && healthcheck.len() > 1,
            "{context}: healthcheck {healthcheck:?}"
        );
        if service["image"] != "ktd:local" {
            continue;
        }
        assert_eq!(service["pull_policy"], "never", "{context}");
        assert_eq!(service["init"], true, "{context}");
        assert_eq!(service["stop_grace_period"], "30s", "{context}");
        let command = strings(&service["command"]).join(" ");
        let subcommand = cli.check_command(&context, &command);
        assert!(SERVERS.contains(&subcommand.as_str()), "{context}");
        for (key, value) in service["environment"].as_object().expect("environment") {
            let value = value.as_str().unwrap_or_default();
            for name in ktd_env_names(&format!("{key} {value}")) {
                cli.check_env(&context, &subcommand, &name);
            }
        }
        let healthcheck = healthcheck[1..].join(" ");
        if cli.subcommand_of(&healthcheck).is_some() || !flags_in(&healthcheck).is_empty() {
            cli.check_command(&format!("{context} healthcheck"), &healthcheck);
        }
        let address = service["networks"]["ktd"]["ipv4_address"]
            .as_str()
            .expect("address");
        let metrics = flag_value(&command, "--metrics-listen").expect("--metrics-listen");
        let port = metrics.rsplit(':').next().expect("port");
        metrics_targets.insert(format!("{address}:{port}"));
        ktd_services.insert(name.clone(), (subcommand, address.to_string(), command));
    }
    assert_eq!(
        ktd_services
            .values()
            .filter(|(sub, ..)| sub == "sequencer")
            .count(),
        3
    );
    assert_eq!(
        ktd_services
            .values()
            .filter(|(sub, ..)| sub == "shard")
            .count(),
        3
    );

    // Prometheus scrapes every ktd process.
    let prometheus = yaml(&dir.join("prometheus.yml"));
    let scraped: BTreeSet<String> = prometheus["scrape_configs"]
        .as_array()
        .expect("scrape_configs")
        .iter()
        .flat_map(|job| {
            job["static_configs"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .flat_map(|config| {
            strings(&config["targets"])
                .into_iter()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(scraped, metrics_targets);

    // The shared sequencer file matches the services and validates.
    let toml_path = dir.join("sequencer.toml");
    let settings = sequencer_toml(&read(&toml_path));
    check_sequencer_config(&toml_path);
    assert_eq!(settings.peers.len(), 3);
    for (id, addr) in &settings.peers {
        let (_, address, command) = &ktd_services[&format!("sequencer-{id}")];
        assert_eq!(flag_value(command, "--id"), Some(id.to_string()));
        assert_eq!(flag_value(command, "--advertise").as_ref(), Some(addr));
        assert!(
            addr.starts_with(&format!("{address}:")),
            "{addr} vs {address}"
        );
        assert_eq!(
            command.contains("--init"),
            *id == 1,
            "only node 1 bootstraps"
        );
    }
    for (id, url) in &settings.shards {
        let service = &services[&format!("shard-{id}")];
        let (_, address, command) = &ktd_services[&format!("shard-{id}")];
        assert_eq!(service["environment"]["KTD_SHARD_ID"], id.as_str());
        let port = service["environment"]["KTD_SHARD_LISTEN"]
            .as_str()
            .and_then(|listen| listen.rsplit(':').next())
            .expect("listen port");
        assert_eq!(url, &format!("http://{address}:{port}"));
        assert_eq!(
            flag_value(command, "--partition-bits"),
            Some(settings.partition_bits.to_string())
        );
    }
}

/// Runs `argv` (a compose healthcheck) and reports whether it exited 0.
fn healthcheck_passes(argv: &[String]) -> bool {
    Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .is_ok_and(|output| output.status.success())
}

#[test]
fn compose_healthchecks_pass_against_a_running_server_and_fail_without_one() {
    let compose = yaml(&deploy_dir().join("compose/docker-compose.yml"));
    with_deadline(Duration::from_secs(90), move || async move {
        let root = tempfile::tempdir().expect("temp dir");
        let metrics = free_addr("127.0.0.72");
        let mut dev = KtdNode::dev(
            KTD,
            root.path(),
            "127.0.0.72",
            &["--epoch-interval", "200ms", "--metrics-listen", &metrics],
        );
        dev.spawn(&[]);
        let (dev_host, dev_port) = dev.addr.rsplit_once(':').expect("addr");
        let (metrics_host, metrics_port) = metrics.rsplit_once(':').expect("addr");
        // Each ktd service's healthcheck, with the container's loopback ports mapped onto the
        // `ktd dev` process (one sequencer, shard and gateway in one).
        let checks: Vec<(String, Vec<String>)> = compose["services"]
            .as_object()
            .expect("services")
            .iter()
            .filter(|(_, service)| service["image"] == "ktd:local")
            .map(|(name, service)| {
                let argv = strings(&service["healthcheck"]["test"])[1..]
                    .iter()
                    .map(|word| {
                        let word = word
                            .replace("127.0.0.1/9100", &format!("{metrics_host}/{metrics_port}"))
                            .replace("127.0.0.1/7001", &format!("{dev_host}/{dev_port}"))
                            .replace("127.0.0.1/7101", &format!("{dev_host}/{dev_port}"))
                            .replace("127.0.0.1:8080", &dev.addr);
                        if word == "ktd" { KTD.to_string() } else { word }
                    })
                    .collect();
                (name.clone(), argv)
            })
            .collect();
        assert_eq!(checks.len(), 7);
        for (name, argv) in &checks {
            Poll::new(format!("{name}: {argv:?} to pass"), Duration::from_secs(30))
                .every(Duration::from_millis(200))
                .context(|| format!("log:\n{}", dev.log_text()))
                .until(|| {
                    let attempt = argv.clone();
                    async move {
                        tokio::task::spawn_blocking(move || healthcheck_passes(&attempt))
                            .await
                            .expect("join")
                            .then_some(())
                    }
                })
                .await;
        }
        dev.kill9();
        for (name, argv) in checks {
            let passed = tokio::task::spawn_blocking({
                let argv = argv.clone();
                move || healthcheck_passes(&argv)
            })
            .await
            .expect("join");
            assert!(!passed, "{name}: {argv:?} passes with no server");
        }
    });
}
