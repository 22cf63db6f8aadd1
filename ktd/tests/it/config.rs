//! `--check-config`: a valid configuration prints the effective settings as TOML and exits 0;
//! each invalid one (unknown key, bad value, bad duration, wrong-length key, missing or short
//! seed file, bad flag) exits non-zero with one clear error line, before anything binds or
//! writes. For every server: the file over the defaults, the environment over the file, flags
//! over the environment; test-only switches are not file keys; `deploy/ktd.example.toml`
//! configures every server.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Output;

use crate::support::cli::{KtdCli, command, ktd};

fn write(path: &Path, text: &str, mode: u32) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .expect("create");
    file.write_all(text.as_bytes()).expect("write");
}

/// Asserts `output` failed with exactly one stderr line that mentions every word in `words`.
fn refused(output: &Output, words: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "must fail: {stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "one error line, got: {stderr}");
    for word in words {
        assert!(
            lines[0].contains(word),
            "{word:?} missing from: {}",
            lines[0]
        );
    }
}

#[test]
fn check_config_accepts_valid_and_refuses_invalid_configuration() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    let key = "ab".repeat(32);
    let valid = root.join("valid.toml");
    write(
        &valid,
        &format!(
            "id = 1\nlisten = \"127.0.0.1:7001\"\ndata_dir = \"{}\"\npeers = [\"1=127.0.0.1:7001\"]\n\n\
             [cluster]\nvrf_public_key = \"{key}\"\n\n[epoch]\ninterval = \"2s\"\nheartbeat_interval = \"30s\"\n",
            root.join("seq").display()
        ),
        0o644,
    );
    let ok = ktd(&[
        "sequencer",
        "--config",
        valid.to_str().expect("utf-8"),
        "--init",
        "--check-config",
    ]);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{ok:?}");
    assert!(
        stdout.contains("heartbeat_interval = \"30s\"") && stdout.contains(&key),
        "{stdout}"
    );
    assert!(
        !root.join("seq").exists(),
        "--check-config must not create the data directory"
    );

    let cases = [
        (
            "unknown-key.toml",
            "id = 1\nlisten = \"127.0.0.1:7001\"\nlisten_addr = \"x\"\n",
            vec!["unknown-key.toml", "listen_addr"],
        ),
        (
            "bad-duration.toml",
            "id = 1\n[epoch]\ninterval = \"two seconds\"\n",
            vec!["bad-duration.toml", "interval"],
        ),
        (
            "bad-raft.toml",
            "id = 1\n[raft]\nheartbeat_interval = \"300ms\"\nelection_timeout_min = \"400ms\"\n",
            vec!["heartbeat_interval"],
        ),
        (
            "short-key.toml",
            "id = 1\npeers = [\"1=127.0.0.1:7001\"]\n[cluster]\nvrf_public_key = \"abcd\"\n",
            vec!["vrf_public_key", "64 hex digits"],
        ),
    ];
    for (name, text, words) in cases {
        let path = root.join(name);
        write(&path, text, 0o644);
        let output = ktd(&[
            "sequencer",
            "--config",
            path.to_str().expect("utf-8"),
            "--init",
            "--check-config",
        ]);
        refused(&output, &words);
    }
    refused(
        &ktd(&[
            "sequencer",
            "--config",
            root.join("missing.toml").to_str().expect("utf-8"),
            "--check-config",
        ]),
        &["missing.toml"],
    );

    // Shard: the VRF seed file must exist, be private and hold 32 bytes.
    let seed = root.join("seed.hex");
    write(&seed, &format!("{}\n", "5a".repeat(32)), 0o600);
    let shard = |seed: &Path, extra: &[&str]| {
        let mut args = vec![
            "shard",
            "--id",
            "s1",
            "--listen",
            "127.0.0.1:7101",
            "--data-dir",
            "/nonexistent/shard",
            "--vrf-seed-file",
            seed.to_str().expect("utf-8"),
            "--check-config",
        ];
        args.extend(extra);
        ktd(&args)
    };
    let ok = shard(&seed, &[]);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{ok:?}");
    assert!(
        !stdout.contains(&"5a".repeat(32)),
        "the seed is never printed: {stdout}"
    );
    refused(&shard(&root.join("no-seed.hex"), &[]), &["no-seed.hex"]);
    let short = root.join("short-seed.hex");
    write(&short, &"5a".repeat(31), 0o600);
    refused(&shard(&short, &[]), &["short-seed.hex"]);
    let open = root.join("open-seed.hex");
    write(&open, &"5a".repeat(32), 0o644);
    refused(&shard(&open, &[]), &["open-seed.hex"]);
    refused(
        &shard(&seed, &["--partition-bits", "13"]),
        &["partition_bits", "12"],
    );
}

#[test]
fn systemd_units_and_samples_name_existing_flags_and_validate() {
    let cli = KtdCli::load();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd");
    let mut units = 0;
    for entry in std::fs::read_dir(&dir).expect("deploy/systemd") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read");
        let name = path
            .file_name()
            .and_then(|name| name.to_str())
            .expect("name");
        if name.ends_with(".service") {
            units += 1;
            let commands: Vec<&str> = text
                .lines()
                .filter_map(|line| {
                    line.strip_prefix("ExecStart=")
                        .or_else(|| line.strip_prefix("ExecStartPre="))
                })
                .collect();
            assert!(!commands.is_empty(), "{name}: no ExecStart");
            for command in commands {
                assert!(
                    command.starts_with("/usr/local/bin/ktd "),
                    "{name}: {command}"
                );
                cli.check_command(name, command);
            }
        } else if let Some(subcommand) = name.strip_suffix(".env") {
            for line in text
                .lines()
                .filter(|line| !line.starts_with('#') && line.contains('='))
            {
                let key = line.split('=').next().expect("key");
                cli.check_env(name, subcommand, key);
            }
        }
    }
    assert_eq!(units, 3, "sequencer, shard and gateway units");
    let sample = dir.join("sequencer.toml");
    let checked = ktd(&[
        "sequencer",
        "--config",
        sample.to_str().expect("utf-8"),
        "--check-config",
    ]);
    assert!(checked.status.success(), "{checked:?}");
}

/// `ktd gateway --check-config` with `extra` flags and `env`.
fn gateway_check(config: &Path, env: &[(&str, &str)], extra: &[&str]) -> Output {
    let mut command = command();
    command
        .args([
            "gateway",
            "--config",
            &config.display().to_string(),
            "--check-config",
        ])
        .args(extra);
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("run ktd")
}

#[test]
fn config_files_of_shard_and_gateway_layer_under_environment_and_flags() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    let gateway = root.join("gateway.toml");
    write(
        &gateway,
        "listen = \"127.0.0.1:18080\"\nadmin_listen = \"127.0.0.1:18090\"\n\
         sequencers = [\"10.0.0.11:7001\", \"10.0.0.12:7001\"]\nmax_in_flight = 7\n\
         log_format = \"json\"\n",
        0o644,
    );
    // The file over the defaults.
    let output = gateway_check(&gateway, &[], &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "listen = \"127.0.0.1:18080\"",
        "admin_listen = \"127.0.0.1:18090\"",
        "sequencers = [\"10.0.0.11:7001\", \"10.0.0.12:7001\"]",
        "max_in_flight = 7",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected} missing from {stdout}"
        );
    }
    // The environment over the file, flags over the environment.
    let output = gateway_check(&gateway, &[("KTD_GATEWAY_LISTEN", "127.0.0.1:18081")], &[]);
    assert!(String::from_utf8_lossy(&output.stdout).contains("listen = \"127.0.0.1:18081\""));
    let output = gateway_check(
        &gateway,
        &[("KTD_GATEWAY_LISTEN", "127.0.0.1:18081")],
        &[
            "--listen",
            "127.0.0.1:18082",
            "--sequencers",
            "10.0.0.13:7001",
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("listen = \"127.0.0.1:18082\""), "{stdout}");
    assert!(
        stdout.contains("sequencers = [\"10.0.0.13:7001\"]"),
        "{stdout}"
    );

    // Invalid files: one error line naming the file and the problem.
    let unknown = root.join("unknown.toml");
    write(
        &unknown,
        "listen = \"127.0.0.1:1\"\nlisten_port = 5\n",
        0o644,
    );
    refused(
        &gateway_check(&unknown, &[], &[]),
        &["unknown.toml", "unknown key", "listen_port"],
    );
    let bad_number = root.join("bad-number.toml");
    write(
        &bad_number,
        "sequencers = [\"a:1\"]\nmax_in_flight = \"lots\"\n",
        0o644,
    );
    refused(
        &gateway_check(&bad_number, &[], &[]),
        &["bad-number.toml", "lots", "max_in_flight"],
    );
    let bad_toml = root.join("bad.toml");
    write(&bad_toml, "listen = \n", 0o644);
    refused(&gateway_check(&bad_toml, &[], &[]), &["bad.toml"]);
    let bad_address = root.join("bad-address.toml");
    write(
        &bad_address,
        "listen = \"not an address\"\nsequencers = [\"a:1\"]\n",
        0o644,
    );
    refused(&gateway_check(&bad_address, &[], &[]), &["not an address"]);

    // TLS settings in the file: a missing key file is one clear line.
    let certs = root.join("certs");
    assert!(
        ktd(&["certs", "--out", &certs.display().to_string()])
            .status
            .success()
    );
    let tls = root.join("tls.toml");
    write(
        &tls,
        &format!(
            "listen = \"127.0.0.1:18080\"\nsequencers = [\"a:1\"]\ntls_ca = \"{}\"\n\
             tls_cert = \"{}\"\ntls_key = \"{}\"\n",
            certs.join("ca.pem").display(),
            certs.join("gateway.pem").display(),
            certs.join("missing.key").display()
        ),
        0o644,
    );
    refused(&gateway_check(&tls, &[], &[]), &["TLS key", "missing.key"]);

    // A shard's file: its seed file is checked as with flags.
    let seed = root.join("seed.hex");
    write(&seed, &"ab".repeat(32), 0o600);
    let shard = root.join("shard.toml");
    write(
        &shard,
        &format!(
            "id = \"s1\"\nlisten = \"127.0.0.1:7101\"\ndata_dir = \"{}\"\nvrf_seed_file = \"{}\"\n\
             partition_bits = 6\n",
            root.join("shard").display(),
            seed.display()
        ),
        0o644,
    );
    let output = ktd(&[
        "shard",
        "--config",
        &shard.display().to_string(),
        "--check-config",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("partition_bits = 6") && stdout.contains("\"s1\""),
        "{stdout}"
    );
    let short_seed = root.join("short.hex");
    write(&short_seed, "abcd", 0o600);
    let shard_bad = root.join("shard-bad.toml");
    write(
        &shard_bad,
        &format!(
            "id = \"s1\"\nlisten = \"127.0.0.1:7101\"\ndata_dir = \"{}\"\nvrf_seed_file = \"{}\"\n",
            root.join("shard").display(),
            short_seed.display()
        ),
        0o644,
    );
    let output = ktd(&[
        "shard",
        "--config",
        &shard_bad.display().to_string(),
        "--check-config",
    ]);
    refused(&output, &["short.hex"]);
}

/// `ktd SERVER --config FILE --check-config ARGS` with `env`.
fn check(server: &str, config: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut command = crate::support::cli::command();
    command
        .args([server, "--config"])
        .arg(config)
        .arg("--check-config")
        .args(args);
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("run ktd")
}

/// Asserts `output` succeeded and printed `line`.
fn prints(output: &Output, line: &str) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.lines().any(|printed| printed == line),
        "{line} missing from {stdout}"
    );
}

/// One server's file (its required settings) and a setting to layer: its key, environment
/// variable and flag, and a value for each layer.
struct Layering<'a> {
    server: &'a str,
    file: String,
    key: &'a str,
    env: &'a str,
    flag: &'a str,
    values: [&'a str; 3],
}

#[test]
fn every_server_layers_file_under_environment_under_flags() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    let seed = root.join("seed.hex");
    write(&seed, &"ab".repeat(32), 0o600);
    let key = root.join("auditor.key");
    write(&key, &"cd".repeat(32), 0o600);
    let quoted = |value: &str| format!("{value:?}");
    let servers = [
        Layering {
            server: "sequencer",
            file: format!(
                "data_dir = {}\n",
                quoted(&root.join("seq").display().to_string())
            ),
            key: "listen",
            env: "KTD_SEQUENCER_LISTEN",
            flag: "--listen",
            values: ["127.0.0.1:17001", "127.0.0.1:17002", "127.0.0.1:17003"],
        },
        Layering {
            server: "shard",
            file: format!(
                "id = \"s1\"\ndata_dir = \"/nonexistent/shard\"\nvrf_seed_file = {}\n",
                quoted(&seed.display().to_string())
            ),
            key: "listen",
            env: "KTD_SHARD_LISTEN",
            flag: "--listen",
            values: ["127.0.0.1:17101", "127.0.0.1:17102", "127.0.0.1:17103"],
        },
        Layering {
            server: "gateway",
            file: "sequencers = [\"10.0.0.11:7001\"]\n".to_string(),
            key: "admin_listen",
            env: "KTD_GATEWAY_ADMIN_LISTEN",
            flag: "--admin-listen",
            values: ["127.0.0.1:18091", "127.0.0.1:18092", "127.0.0.1:18093"],
        },
        Layering {
            server: "dev",
            file: format!(
                "data_dir = {}\n",
                quoted(&root.join("dev").display().to_string())
            ),
            key: "listen",
            env: "KTD_DEV_LISTEN",
            flag: "--listen",
            values: ["127.0.0.1:18081", "127.0.0.1:18082", "127.0.0.1:18083"],
        },
        Layering {
            server: "auditor",
            file: format!(
                "data_dir = \"/nonexistent/auditor\"\nsigning_key_file = {}\nblob_dir = \"/srv/blobs\"\n",
                quoted(&key.display().to_string())
            ),
            key: "trace_sample_ratio",
            env: "KTD_TRACE_SAMPLE_RATIO",
            flag: "--trace-sample-ratio",
            values: ["0.5", "0.25", "0.125"],
        },
    ];
    for layering in servers {
        let Layering {
            server,
            file,
            key,
            env,
            flag,
            values,
        } = layering;
        let value = |value: &str| match value.parse::<f64>() {
            Ok(_) => value.to_string(),
            Err(_) => quoted(value),
        };
        let path = root.join(format!("{server}.toml"));
        write(
            &path,
            &format!("{file}{key} = {}\n", value(values[0])),
            0o644,
        );
        let line = |index: usize| format!("{key} = {}", value(values[index]));
        prints(&check(server, &path, &[], &[]), &line(0));
        prints(&check(server, &path, &[(env, values[1])], &[]), &line(1));
        prints(
            &check(server, &path, &[(env, values[1])], &[flag, values[2]]),
            &line(2),
        );
    }
    assert!(
        !root.join("seq").exists() && !root.join("dev").exists(),
        "nothing written"
    );
}

#[test]
fn every_server_refuses_unknown_keys_and_bad_values_in_one_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    let cases: [(&str, &str, &[&str]); 10] = [
        (
            "sequencer",
            "data_directory = \"x\"\n",
            &["unknown key", "data_directory"],
        ),
        (
            "sequencer",
            "[raft]\npre_vote = \"yes\"\n",
            &["raft.pre_vote", "yes"],
        ),
        (
            "shard",
            "id = \"s1\"\nlisten_addr = \"x\"\n",
            &["unknown key", "listen_addr"],
        ),
        (
            "shard",
            "partition_bits = \"four\"\n",
            &["partition_bits", "four"],
        ),
        (
            "gateway",
            "sequencer = [\"a:1\"]\n",
            &["unknown key", "sequencer"],
        ),
        (
            "gateway",
            "tls_client_auth = \"sometimes\"\n",
            &["tls_client_auth", "sometimes"],
        ),
        (
            "dev",
            "data_directory = \"x\"\n",
            &["unknown key", "data_directory"],
        ),
        (
            "dev",
            "epoch_interval = \"soon\"\n",
            &["epoch_interval", "soon"],
        ),
        (
            "auditor",
            "gateway_url = \"x\"\n",
            &["unknown key", "gateway_url"],
        ),
        ("auditor", "poll = 5\n", &["poll"]),
    ];
    for (index, (server, text, words)) in cases.into_iter().enumerate() {
        let name = format!("{server}-{index}.toml");
        let path = root.join(&name);
        write(&path, text, 0o644);
        let mut words = words.to_vec();
        words.push(&name);
        refused(&check(server, &path, &[], &[]), &words);
    }
    // A test-only switch is a flag, never a file key.
    let path = root.join("unsafe.toml");
    write(
        &path,
        "sequencers = [\"a:1\"]\nunsafe_test_mode = true\n",
        0o644,
    );
    refused(
        &check("gateway", &path, &[], &[]),
        &["unsafe.toml", "unknown key", "unsafe_test_mode"],
    );
    // A required setting missing from the file, the environment and the flags.
    let path = root.join("no-seed.toml");
    write(
        &path,
        "id = \"s1\"\nlisten = \"127.0.0.1:1\"\ndata_dir = \"d\"\n",
        0o644,
    );
    refused(
        &check("shard", &path, &[], &[]),
        &[
            "vrf_seed_file",
            "--vrf-seed-file",
            "KTD_SHARD_VRF_SEED_FILE",
        ],
    );
}

#[test]
fn dev_and_auditor_check_their_configuration() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    let data = root.join("dev");
    let dev = |args: &[&str]| {
        let mut all = vec![
            "dev",
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--check-config",
        ];
        all.extend(args);
        ktd(&all)
    };
    let output = dev(&["--epoch-interval", "250ms", "--partition-bits", "2"]);
    prints(&output, "epoch_interval = \"250ms\"");
    prints(&output, "partition_bits = 2");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("generated at start"),
        "{output:?}"
    );
    assert!(
        !data.exists(),
        "--check-config must not create the data directory"
    );
    let short = root.join("short-seed.hex");
    write(&short, &"5a".repeat(31), 0o600);
    refused(
        &dev(&["--vrf-seed-file", short.to_str().expect("utf-8")]),
        &["short-seed.hex"],
    );
    refused(&dev(&["--partition-bits", "13"]), &["partition_bits", "12"]);
    refused(&dev(&["--listen", "nowhere"]), &["listen", "nowhere"]);

    let key = root.join("auditor.key");
    write(&key, &"cd".repeat(32), 0o600);
    let auditor = |key: &Path, args: &[&str]| {
        let mut all = vec![
            "auditor",
            "--data-dir",
            "/nonexistent/auditor",
            "--signing-key-file",
            key.to_str().expect("utf-8"),
            "--check-config",
        ];
        all.extend(args);
        ktd(&all)
    };
    let output = auditor(&key, &["--blob-dir", "/srv/blobs", "--poll", "2s"]);
    prints(&output, "poll = \"2s\"");
    prints(&output, "blob_dir = \"/srv/blobs\"");
    assert!(
        !String::from_utf8_lossy(&output.stdout).contains(&"cd".repeat(32)),
        "the signing key is never printed: {output:?}"
    );
    let open = root.join("open.key");
    write(&open, &"cd".repeat(32), 0o644);
    refused(
        &auditor(&open, &["--blob-dir", "/srv/blobs"]),
        &["open.key"],
    );
    refused(
        &auditor(&key, &["--gateway", "http://127.0.0.1:1", "--start", "7"]),
        &["start", "EPOCH/HEX_ROOT"],
    );
}

#[test]
fn every_server_reads_its_table_of_the_example_file() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/ktd.example.toml");
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    let seed = root.join("seed.hex");
    write(&seed, &"ab".repeat(32), 0o600);
    let seed = seed.to_str().expect("utf-8");
    let data = root.join("data");
    let data = data.to_str().expect("utf-8");
    let runs: [(&str, Vec<&str>, &str); 5] = [
        (
            "sequencer",
            vec!["--data-dir", data],
            "listen = \"127.0.0.1:7001\"",
        ),
        (
            "shard",
            vec![
                "--id",
                "s1",
                "--listen",
                "127.0.0.1:7101",
                "--data-dir",
                data,
                "--vrf-seed-file",
                seed,
            ],
            "partition_bits = 4",
        ),
        (
            "gateway",
            vec!["--sequencers", "127.0.0.1:7001"],
            "max_in_flight = 1024",
        ),
        ("dev", vec!["--data-dir", data], "epoch_interval = \"1s\""),
        (
            "auditor",
            vec![
                "--data-dir",
                data,
                "--signing-key-file",
                seed,
                "--blob-dir",
                data,
            ],
            "poll = \"500ms\"",
        ),
    ];
    for (server, args, line) in runs {
        prints(&check(server, &example, &[], &args), line);
    }
}
