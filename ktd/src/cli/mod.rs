//! The `ktd` command line: `args` (clap types), `parse` (flags, environment and `--config`
//! files into a server's typed configuration, `crate::config`), `servers` (the server
//! subcommands: validate once, `--check-config`, run), `client_cmds` (the client and local
//! subcommands), and [`main`], which the binary calls.
//!
//! ```text
//! ktd dev                                   # a whole directory on 127.0.0.1:8080, data in ./ktd-dev
//! ktd publish alice key-1 && ktd lookup alice --verify
//! ktd sequencer --id 1 --listen 127.0.0.1:7001 --data-dir /var/lib/ktd/seq1 \
//!     --peers 1=127.0.0.1:7001,2=127.0.0.2:7001,3=127.0.0.3:7001 --init --vrf-public-key HEX \
//!     --shards s1=http://127.0.0.1:7101,s2=http://127.0.0.1:7102
//! ktd shard --id s1 --listen 127.0.0.1:7101 --data-dir /var/lib/ktd/s1 --vrf-seed-file seed.hex
//! ktd gateway --listen 127.0.0.1:8080 --sequencers http://127.0.0.1:7001,http://127.0.0.2:7001
//! KTD_SEQUENCERS=127.0.0.1:7001,127.0.0.2:7001 ktd admin status   # operator CLI
//! ```
//!
//! Exit status: 0 after a clean shutdown (SIGTERM or SIGINT) or a successful client call, 1 on
//! any error, with the reason on stderr, 2 on a usage error, 3 for `ktd lookup` of a label
//! proven absent.

pub(crate) mod args;
pub(crate) mod client_cmds;
pub(crate) mod parse;
pub(crate) mod servers;

use std::future::Future;

use args::{Cli, Command};
use parse::Invocation;

/// The whole `ktd` program: parse, start telemetry and the runtime, run the subcommand, and
/// turn its outcome into an exit status.
pub fn main() -> std::process::ExitCode {
    let invocation = match parse::parse_cli() {
        Ok(invocation) => invocation,
        Err(error) => {
            eprintln!("error: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match invocation {
        Invocation::Server(command) => run_server(command),
        Invocation::Other { addr, tls, command } => {
            // Client commands print results and only log problems.
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
                )
                .init();
            let tls = ktd_rpc::security::TlsPaths::from_parts(tls.ca, tls.cert, tls.key);
            in_runtime(None, tls, async move {
                match command {
                    Command::Admin(args) => {
                        if args.sequencers.is_empty() {
                            use clap::CommandFactory;
                            Cli::command()
                                .error(
                                    clap::error::ErrorKind::MissingRequiredArgument,
                                    "ktd admin needs the sequencers: --sequencers HOST:PORT,... or KTD_SEQUENCERS",
                                )
                                .exit();
                        }
                        crate::admin::run(args).await.map_err(anyhow::Error::from)
                    }
                    command => client_cmds::run_client(&addr, command).await,
                }
            })
        }
    }
}

/// A server: its configuration validated once (before anything logs, binds or writes), then
/// `--check-config`'s output, or the server with its logs, traces and metrics.
fn run_server(command: servers::ServerCommand) -> std::process::ExitCode {
    let config = command.config;
    let resolved = match config.resolve() {
        Ok(resolved) => resolved,
        Err(error) => {
            eprintln!("error: {error:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let process = config.process();
    let telemetry = process.telemetry(config.role());
    let tls = process.tls_paths();
    in_runtime(Some(telemetry), tls, async move {
        if command.check_config {
            print!("{}", config.effective_toml(&resolved)?);
            return Ok(());
        }
        tracing::info!(config = ?config, "effective configuration");
        config.process().install_metrics()?;
        servers::run(resolved).await
    })
}

/// Runs `job` on a new runtime after installing telemetry (servers) and mutual TLS (when
/// configured); its outcome becomes the exit status, an error one line on stderr.
fn in_runtime(
    telemetry: Option<crate::telemetry::TelemetrySettings>,
    tls: Result<Option<ktd_rpc::security::TlsPaths>, ktd_rpc::security::SecurityError>,
    job: impl Future<Output = anyhow::Result<()>>,
) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // Inside the runtime: the OTLP exporter's channel lives on it.
        let _telemetry = match telemetry.as_ref().map(crate::telemetry::init) {
            Some(Ok(guard)) => Some(guard),
            Some(Err(error)) => return Err(anyhow::anyhow!("telemetry: {error}")),
            None => None,
        };
        if let Some(paths) = tls? {
            let material = ktd_rpc::security::TlsMaterial::load(&paths)?;
            ktd_rpc::security::install(&material);
            tracing::info!(roles = ?material.roles(), "mutual TLS on");
        }
        job.await
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            let status = error.downcast_ref::<tonic::Status>().or_else(|| {
                match error.downcast_ref::<ktd_client::ClientError>() {
                    Some(ktd_client::ClientError::Refused { status, .. }) => Some(status),
                    _ => None,
                }
            });
            match status {
                Some(status) => eprintln!("error: {:?}: {}", status.code(), status.message()),
                None => eprintln!("error: {error:#}"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}
