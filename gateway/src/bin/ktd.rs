//! `ktd`: the product binary. Thin: parse flags, resolve the configuration (defaults < TOML file
//! < environment < flags), bind the listener, then hand over to the server's `run`.
//!
//! ```text
//! ktd sequencer --id 1 --listen 127.0.0.1:7001 --data-dir /var/lib/ktd/seq1 \
//!     --peers 1=127.0.0.1:7001,2=127.0.0.2:7001,3=127.0.0.3:7001 --init --vrf-public-key HEX
//! ktd sequencer --listen 127.0.0.1:7001 --data-dir /var/lib/ktd/seq1      # restart
//! ```
//!
//! Exit status: 0 after a clean shutdown (SIGTERM or SIGINT), 1 on any error, with the reason
//! on stderr (for example a data directory that belongs to another node or is damaged).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use sequencer::SequencerConfig;

#[derive(Debug, Parser)]
#[command(
    name = "ktd",
    version,
    about = "ktd: a sharded, Raft-sequenced key-transparency directory"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a sequencer node (Raft-replicated ordering of key updates into epochs).
    Sequencer(SequencerArgs),
}

#[derive(Debug, Args)]
struct SequencerArgs {
    /// TOML configuration file; flags and environment variables override it.
    #[arg(long, env = "KTD_SEQUENCER_CONFIG")]
    config: Option<PathBuf>,
    /// This node's id (required for a new data directory; must match an existing one).
    #[arg(long, env = "KTD_SEQUENCER_ID")]
    id: Option<u64>,
    /// Address to listen on (Raft, API, admin and health share it).
    #[arg(long, env = "KTD_SEQUENCER_LISTEN")]
    listen: Option<String>,
    /// Address peers and clients use to reach this node (default: --listen).
    #[arg(long, env = "KTD_SEQUENCER_ADVERTISE")]
    advertise: Option<String>,
    /// The data directory.
    #[arg(long, env = "KTD_SEQUENCER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Initial members, ID=HOST:PORT, comma-separated (used with --init).
    #[arg(long, env = "KTD_SEQUENCER_PEERS", value_delimiter = ',')]
    peers: Vec<String>,
    /// Bootstrap a new cluster from --peers (ignored if the data directory is initialised).
    #[arg(long)]
    init: bool,
    /// The directory's VRF public key, 64 hex digits (recorded at --init).
    #[arg(long, env = "KTD_SEQUENCER_VRF_PUBLIC_KEY")]
    vrf_public_key: Option<String>,
}

impl SequencerArgs {
    fn resolve(self) -> anyhow::Result<SequencerConfig> {
        let mut config = match &self.config {
            Some(path) => SequencerConfig::from_file(path)?,
            None => SequencerConfig::default(),
        };
        if let Some(id) = self.id {
            config.id = Some(id);
        }
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(advertise) = self.advertise {
            config.advertise = Some(advertise);
        }
        if let Some(data_dir) = self.data_dir {
            config.data_dir = data_dir;
        }
        if !self.peers.is_empty() {
            config.peers = self.peers;
        }
        if let Some(key) = self.vrf_public_key {
            config.cluster.vrf_public_key = key;
        }
        config.init = self.init;
        config.validate()?;
        Ok(config)
    }
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = interrupt.recv() => tracing::info!("SIGINT received"),
    }
}

async fn run_sequencer(args: SequencerArgs) -> anyhow::Result<()> {
    let config = args.resolve()?;
    tracing::info!(config = ?config, "effective configuration");
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("bind {}", config.listen))?;
    sequencer::run(config, listener, shutdown_signal()).await?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=error")),
        )
        .init();
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
        match cli.command {
            Command::Sequencer(args) => run_sequencer(args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
