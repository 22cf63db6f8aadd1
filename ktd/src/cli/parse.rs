//! Parsing the command line into what `ktd` runs: for a server subcommand, its typed
//! configuration layered defaults < TOML file (`--config`, `KTD_<SERVER>_CONFIG`) < environment
//! < flags (clap merges the last two: a flag beats its variable); for the others, the clap
//! types as they are. `--help` shows each setting's default from the configuration's `Default`,
//! so there is one source of defaults.

use std::path::{Path, PathBuf};

use clap::{CommandFactory, FromArgMatches};
use sequencer::SequencerConfig;

use super::args::{
    AuditorArgs, Cli, Command, DevArgs, GatewayArgs, MetricsArgs, SequencerArgs, ShardArgs,
    TelemetryArgs,
};
use super::servers::{ServerCommand, ServerConfig};
use crate::config::{
    self, AuditorConfig, DevConfig, GatewayConfig, ProcessConfig, ServerFile, ShardConfig,
};

/// What the command line asks for.
#[derive(Debug)]
pub enum Invocation {
    /// A server subcommand with its configuration layered.
    Server(ServerCommand),
    /// A client, operator or local subcommand.
    Other {
        /// The gateway the client subcommands call (`--addr`).
        addr: String,
        /// The global TLS flags.
        tls: TlsFlags,
        /// The subcommand.
        command: Command,
    },
}

/// The global mutual-TLS flags (`--tls-ca`, `--tls-cert`, `--tls-key`).
#[derive(Debug)]
pub struct TlsFlags {
    /// `--tls-ca`.
    pub ca: Option<PathBuf>,
    /// `--tls-cert`.
    pub cert: Option<PathBuf>,
    /// `--tls-key`.
    pub key: Option<PathBuf>,
}

/// Parses the command line (clap's own output and exit status for `--help`, `--version` and
/// usage errors); a server's `--config` file and settings become its configuration. Errors
/// are one line.
pub fn parse_cli() -> Result<Invocation, String> {
    let matches = command_with_defaults().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    let Cli {
        addr,
        tls_ca,
        tls_cert,
        tls_key,
        insecure_plaintext,
        command,
    } = cli;
    super::servers::allow_insecure_plaintext(insecure_plaintext);
    let tls = TlsFlags {
        ca: tls_ca,
        cert: tls_cert,
        key: tls_key,
    };
    let server = match command {
        Command::Sequencer(args) => sequencer(args, &tls),
        Command::Shard(args) => shard(args, &tls),
        Command::Gateway(args) => gateway(args, &tls),
        Command::Dev(args) => dev(args, &tls),
        Command::Auditor(args) => auditor(args, &tls),
        command => return Ok(Invocation::Other { addr, tls, command }),
    };
    server
        .map(Invocation::Server)
        .map_err(|error| format!("{error:#}"))
}

/// The clap command, each server's flags annotated with their defaults.
fn command_with_defaults() -> clap::Command {
    let mut sequencer = defaults_of(&SequencerConfig::default());
    sequencer.extend(defaults_of(&ProcessConfig::default()));
    let servers = [
        ("sequencer", sequencer),
        ("shard", defaults_of(&ShardConfig::default())),
        ("gateway", defaults_of(&GatewayConfig::default())),
        ("dev", defaults_of(&DevConfig::default())),
        ("auditor", defaults_of(&AuditorConfig::default())),
    ];
    let mut command = Cli::command();
    for (name, defaults) in servers {
        command = command.mut_subcommand(name, |sub| with_defaults(sub, &defaults));
    }
    command
}

/// `sub` with `[default: …]` after the help of every flag named like a key of `defaults`.
fn with_defaults(mut sub: clap::Command, defaults: &toml::Table) -> clap::Command {
    let ids: Vec<String> = sub
        .get_arguments()
        .map(|arg| arg.get_id().to_string())
        .collect();
    for id in ids {
        let Some(shown) = defaults.get(&id).and_then(shown_default) else {
            continue;
        };
        sub = sub.mut_arg(id, |arg| {
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            let long_help = arg.get_long_help().map(ToString::to_string);
            let arg = arg.help(format!("{help} [default: {shown}]"));
            match long_help {
                Some(long_help) => arg.long_help(format!("{long_help}\n\n[default: {shown}]")),
                None => arg,
            }
        });
    }
    sub
}

/// A configuration's top-level settings as TOML values.
fn defaults_of(config: &impl serde::Serialize) -> toml::Table {
    toml::Table::try_from(config).unwrap_or_default()
}

/// A default as `--help` shows it; `None` for empty lists and tables.
fn shown_default(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(text) => Some(text.clone()),
        toml::Value::Array(items) if items.is_empty() => None,
        toml::Value::Array(items) => Some(
            items
                .iter()
                .filter_map(shown_default)
                .collect::<Vec<_>>()
                .join(","),
        ),
        toml::Value::Table(_) => None,
        other => Some(other.to_string()),
    }
}

/// The configuration file's settings, or the defaults without one.
fn from_file<T: ServerFile>(path: Option<&Path>) -> anyhow::Result<T> {
    path.map_or_else(|| Ok(T::default()), config::load)
}

/// A given flag or variable replaces the setting.
fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *slot = value;
    }
}

/// A given flag or variable replaces an optional setting.
fn set_some<T>(slot: &mut Option<T>, value: Option<T>) {
    if value.is_some() {
        *slot = value;
    }
}

/// A non-empty list from flags or a variable replaces the setting.
fn set_list<T>(slot: &mut Vec<T>, values: Vec<T>) {
    if !values.is_empty() {
        *slot = values;
    }
}

/// Metrics, telemetry and TLS flags over a process's settings.
fn overlay_process(
    process: &mut ProcessConfig,
    metrics: MetricsArgs,
    telemetry: TelemetryArgs,
    tls: &TlsFlags,
) {
    set_some(&mut process.metrics_listen, metrics.metrics_listen);
    set(&mut process.log_format, telemetry.log_format);
    set_some(&mut process.otlp_endpoint, telemetry.otlp_endpoint);
    set(
        &mut process.trace_sample_ratio,
        telemetry.trace_sample_ratio,
    );
    set_some(&mut process.tls_ca, tls.ca.clone());
    set_some(&mut process.tls_cert, tls.cert.clone());
    set_some(&mut process.tls_key, tls.key.clone());
}

fn sequencer(args: SequencerArgs, tls: &TlsFlags) -> anyhow::Result<ServerCommand> {
    let mut config: SequencerConfig = from_file(args.config.as_deref())?;
    set_some(&mut config.id, args.id);
    set(&mut config.listen, args.listen);
    set_some(&mut config.advertise, args.advertise);
    set(&mut config.data_dir, args.data_dir);
    set_list(&mut config.peers, args.peers);
    set_list(&mut config.peer_overrides, args.peer_override);
    set(&mut config.cluster.vrf_public_key, args.vrf_public_key);
    set_list(&mut config.cluster.shards, args.shards);
    set(&mut config.cluster.partition_bits, args.partition_bits);
    set_some(
        &mut config.cluster.replication_factor,
        args.replication_factor,
    );
    set(
        &mut config.cluster.akd_configuration,
        args.configuration
            .map(|configuration| configuration.to_string()),
    );
    set(&mut config.epoch.interval, args.epoch_interval);
    set_some(
        &mut config.epoch.heartbeat_interval,
        args.heartbeat_interval,
    );
    if let Some(max) = args.max_epoch_updates {
        config.cluster.max_epoch_updates = max;
        config.epoch.max_batch_updates = config.epoch.max_batch_updates.min(max as usize);
    }
    set(&mut config.cluster.max_epoch_bytes, args.max_epoch_bytes);
    set(
        &mut config.cluster.max_uncommitted_epochs,
        args.max_uncommitted_epochs,
    );
    config.init = args.init;
    config.join = args.join;
    // The sequencer's file holds no process settings: they are flags and variables only.
    let mut process = ProcessConfig::default();
    overlay_process(&mut process, args.metrics, args.telemetry, tls);
    Ok(ServerCommand {
        config: ServerConfig::Sequencer {
            config: Box::new(config),
            process,
        },
        check_config: args.check_config,
    })
}

fn shard(args: ShardArgs, tls: &TlsFlags) -> anyhow::Result<ServerCommand> {
    let mut config: ShardConfig = from_file(args.config.as_deref())?;
    set_some(&mut config.id, args.id);
    set_some(&mut config.listen, args.listen);
    set_some(&mut config.data_dir, args.data_dir);
    set_some(&mut config.vrf_seed_file, args.vrf_seed_file);
    set(&mut config.partition_bits, args.partition_bits);
    set(&mut config.configuration, args.configuration);
    set_list(&mut config.sequencers, args.sequencers);
    set(&mut config.orphan_grace, args.orphan_grace);
    set(&mut config.prune_interval, args.prune_interval);
    set(&mut config.lookup_proofs, args.lookup_proofs);
    set(&mut config.block_cache_mib, args.block_cache_mib);
    set(&mut config.hot_tree_mib, args.hot_tree_mib);
    overlay_process(&mut config.process, args.metrics, args.telemetry, tls);
    Ok(ServerCommand {
        config: ServerConfig::Shard(config),
        check_config: args.check_config,
    })
}

fn gateway(args: GatewayArgs, tls: &TlsFlags) -> anyhow::Result<ServerCommand> {
    let mut config: GatewayConfig = from_file(args.config.as_deref())?;
    set(&mut config.listen, args.listen);
    set_list(&mut config.sequencers, args.sequencers);
    set(&mut config.max_in_flight, args.max_in_flight);
    set(
        &mut config.expensive_reads_per_second,
        args.expensive_reads_per_second,
    );
    set(
        &mut config.expensive_reads_burst,
        args.expensive_reads_burst,
    );
    set_some(&mut config.admin_listen, args.admin_listen);
    set_some(&mut config.blob_listen, args.blob_listen);
    set(&mut config.tls_client_auth, args.tls_client_auth);
    set(&mut config.shard_map_refresh, args.shard_map_refresh);
    config.unsafe_test_mode = args.unsafe_test_mode;
    overlay_process(&mut config.process, args.metrics, args.telemetry, tls);
    Ok(ServerCommand {
        config: ServerConfig::Gateway(config),
        check_config: args.check_config,
    })
}

fn dev(args: DevArgs, tls: &TlsFlags) -> anyhow::Result<ServerCommand> {
    let mut config: DevConfig = from_file(args.config.as_deref())?;
    set(&mut config.listen, args.listen);
    set(&mut config.data_dir, args.data_dir);
    set_some(&mut config.vrf_seed_file, args.vrf_seed_file);
    set(&mut config.epoch_interval, args.epoch_interval);
    set_some(&mut config.heartbeat_interval, args.heartbeat_interval);
    set(&mut config.partition_bits, args.partition_bits);
    set(&mut config.configuration, args.configuration);
    set(&mut config.max_in_flight, args.max_in_flight);
    set(
        &mut config.expensive_reads_per_second,
        args.expensive_reads_per_second,
    );
    set(
        &mut config.expensive_reads_burst,
        args.expensive_reads_burst,
    );
    set_some(&mut config.blob_listen, args.blob_listen);
    set(&mut config.lookup_proofs, args.lookup_proofs);
    set(&mut config.block_cache_mib, args.block_cache_mib);
    set(&mut config.hot_tree_mib, args.hot_tree_mib);
    overlay_process(&mut config.process, args.metrics, args.telemetry, tls);
    Ok(ServerCommand {
        config: ServerConfig::Dev(config),
        check_config: args.check_config,
    })
}

fn auditor(args: AuditorArgs, tls: &TlsFlags) -> anyhow::Result<ServerCommand> {
    let mut config: AuditorConfig = from_file(args.config.as_deref())?;
    set(&mut config.namespace, args.namespace);
    set_some(&mut config.data_dir, args.data_dir);
    set_some(&mut config.signing_key_file, args.signing_key_file);
    // The blob source is one setting spelled two ways: a flag for either replaces the file's.
    if args.gateway.is_some() || args.blob_dir.is_some() {
        config.gateway = args.gateway;
        config.blob_dir = args.blob_dir;
    }
    set(&mut config.configuration, args.configuration);
    set_some(&mut config.start, args.start);
    set(&mut config.listen, args.listen);
    set(&mut config.http_listen, args.http_listen);
    set(&mut config.poll, args.poll);
    set_some(&mut config.log_directory, args.log_directory);
    overlay_process(&mut config.process, args.metrics, args.telemetry, tls);
    Ok(ServerCommand {
        config: ServerConfig::Auditor(config),
        check_config: args.check_config,
    })
}
