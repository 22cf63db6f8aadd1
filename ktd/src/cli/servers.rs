//! The server subcommands: their layered configurations ([`ServerConfig`], from
//! [`super::parse`]), validated once into what each server runs with ([`Resolved`]); then
//! either `--check-config`'s TOML or [`run`]: bind the listeners and hand over to
//! [`crate::serve`] (or `sequencer::run`, `ktd_auditor::server::run`) until SIGTERM or SIGINT.

use anyhow::{Context, bail};
use sequencer::SequencerConfig;

use crate::config::{
    self, AuditorConfig, DevConfig, GatewayConfig, ProcessConfig, ResolvedAuditor, ResolvedDev,
    ResolvedGateway, ResolvedShard, ShardConfig,
};

/// A server subcommand with its configuration layered (defaults < file < environment < flags).
#[derive(Debug)]
pub struct ServerCommand {
    /// The configuration, not validated yet.
    pub config: ServerConfig,
    /// `--check-config`: validate, print the configuration and exit.
    pub check_config: bool,
}

/// A server's layered configuration.
#[derive(Debug)]
pub enum ServerConfig {
    /// `ktd sequencer`: its file holds no process settings, they come from flags and variables.
    Sequencer {
        /// The sequencer's own settings (boxed: the largest configuration).
        config: Box<SequencerConfig>,
        /// Metrics, logs, traces and TLS.
        process: ProcessConfig,
    },
    /// `ktd shard`.
    Shard(ShardConfig),
    /// `ktd gateway`.
    Gateway(GatewayConfig),
    /// `ktd dev`.
    Dev(DevConfig),
    /// `ktd auditor`.
    Auditor(AuditorConfig),
}

/// A server's validated configuration: what it runs with, secrets read (and redacted from
/// `Debug`).
#[derive(Debug)]
pub enum Resolved {
    /// `ktd sequencer`.
    Sequencer(Box<SequencerConfig>),
    /// `ktd shard`.
    Shard(ResolvedShard),
    /// `ktd gateway`.
    Gateway(ResolvedGateway),
    /// `ktd dev`.
    Dev(ResolvedDev),
    /// `ktd auditor`.
    Auditor(ResolvedAuditor),
}

impl ServerConfig {
    /// The server's role (its subcommand), as logs and traces name it.
    pub fn role(&self) -> &'static str {
        match self {
            ServerConfig::Sequencer { .. } => "sequencer",
            ServerConfig::Shard(_) => "shard",
            ServerConfig::Gateway(_) => "gateway",
            ServerConfig::Dev(_) => "dev",
            ServerConfig::Auditor(_) => "auditor",
        }
    }

    /// Metrics, logs, traces and TLS.
    pub fn process(&self) -> &ProcessConfig {
        match self {
            ServerConfig::Sequencer { process, .. } => process,
            ServerConfig::Shard(config) => &config.process,
            ServerConfig::Gateway(config) => &config.process,
            ServerConfig::Dev(config) => &config.process,
            ServerConfig::Auditor(config) => &config.process,
        }
    }

    /// Validates the configuration once, reading the secret files it names.
    pub fn resolve(&self) -> anyhow::Result<Resolved> {
        Ok(match self {
            ServerConfig::Sequencer { config, .. } => {
                config.validate()?;
                Resolved::Sequencer(config.clone())
            }
            ServerConfig::Shard(config) => Resolved::Shard(config.resolve()?),
            ServerConfig::Gateway(config) => Resolved::Gateway(config.resolve()?),
            ServerConfig::Dev(config) => Resolved::Dev(config.resolve()?),
            ServerConfig::Auditor(config) => Resolved::Auditor(config.resolve()?),
        })
    }

    /// `--check-config`'s output: the effective configuration as TOML (secret files are
    /// named, never printed), with what was checked of them as comments.
    pub fn effective_toml(&self, resolved: &Resolved) -> anyhow::Result<String> {
        let notes = match resolved {
            Resolved::Sequencer(_) | Resolved::Gateway(_) => Vec::new(),
            Resolved::Shard(shard) => vec![format!(
                "vrf_seed_file: valid (the seed is never printed); VRF public key {}",
                hex::encode(shard.vrf_public_key)
            )],
            Resolved::Dev(dev) if dev.seed_file_exists => vec![format!(
                "VRF seed file {}: valid (the seed is never printed)",
                dev.seed_file.display()
            )],
            Resolved::Dev(dev) => vec![format!(
                "VRF seed file {}: missing, generated at start",
                dev.seed_file.display()
            )],
            Resolved::Auditor(_) => {
                vec!["signing_key_file: valid (the key is never printed)".to_string()]
            }
        };
        match self {
            ServerConfig::Sequencer { config, .. } => config::effective_toml(&**config, &notes),
            ServerConfig::Shard(config) => config::effective_toml(config, &notes),
            ServerConfig::Gateway(config) => config::effective_toml(config, &notes),
            ServerConfig::Dev(config) => config::effective_toml(config, &notes),
            ServerConfig::Auditor(config) => config::effective_toml(config, &notes),
        }
    }
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
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

/// Runs a server until SIGTERM or SIGINT.
pub async fn run(resolved: Resolved) -> anyhow::Result<()> {
    match resolved {
        Resolved::Sequencer(config) => run_sequencer(*config).await,
        Resolved::Shard(shard) => run_shard(shard).await,
        Resolved::Gateway(gateway) => run_gateway(gateway).await,
        Resolved::Dev(dev) => run_dev(dev).await,
        Resolved::Auditor(auditor) => run_auditor(auditor).await,
    }
}

/// `--insecure-plaintext` (`KTD_INSECURE_PLAINTEXT`), set once from the command line.
static INSECURE_PLAINTEXT: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Records `--insecure-plaintext` for [`bind`].
pub fn allow_insecure_plaintext(allowed: bool) {
    INSECURE_PLAINTEXT.store(allowed, std::sync::atomic::Ordering::Relaxed);
}

/// Binds a gRPC listener. Without mutual TLS every RPC of the server is open to whoever
/// reaches the port, so plaintext is served only on loopback addresses (`ktd dev`, the local
/// cluster, tests), or elsewhere with `--insecure-plaintext` (`KTD_INSECURE_PLAINTEXT=1`): an
/// explicit, loudly logged opt-in for private test networks.
async fn bind(addr: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind {addr}"))?;
    let local = listener.local_addr()?;
    check_plaintext(
        local,
        INSECURE_PLAINTEXT.load(std::sync::atomic::Ordering::Relaxed),
    )?;
    Ok(listener)
}

/// Refuses plaintext on a non-loopback `addr` unless `insecure` (`--insecure-plaintext`).
fn check_plaintext(addr: std::net::SocketAddr, insecure: bool) -> anyhow::Result<()> {
    if ktd_rpc::security::client_tls_installed() || addr.ip().is_loopback() {
        return Ok(());
    }
    match insecure {
        true => {
            tracing::warn!(
                %addr,
                "INSECURE: serving plaintext gRPC on a non-loopback address \
                 (KTD_INSECURE_PLAINTEXT): every RPC, internal ones included, is open to whoever \
                 reaches this port"
            );
            eprintln!(
                "ktd: INSECURE: plaintext gRPC on {addr} (KTD_INSECURE_PLAINTEXT): every RPC is \
                 open to whoever reaches it"
            );
            metrics::gauge!("ktd_insecure_plaintext").set(1.0);
            Ok(())
        }
        false => bail!(
            "refusing to serve plaintext gRPC on {addr}: it is not a loopback address, and \
             without mutual TLS every RPC (internal ones included) is open to whoever reaches the \
             port. Configure --tls-ca/--tls-cert/--tls-key (docs/security.md), or pass \
             --insecure-plaintext (KTD_INSECURE_PLAINTEXT=1) on a private test network"
        ),
    }
}

/// `ktd sequencer`.
async fn run_sequencer(config: SequencerConfig) -> anyhow::Result<()> {
    ktd_rpc::telemetry::log_context().set_node(
        "sequencer",
        config
            .id
            .map_or_else(|| "new".to_string(), |id| id.to_string()),
    );
    let listener = bind(&config.listen).await?;
    sequencer::run(config, listener, shutdown_signal()).await?;
    Ok(())
}

/// `ktd dev`.
async fn run_dev(dev: ResolvedDev) -> anyhow::Result<()> {
    ktd_rpc::telemetry::log_context().set_node("dev", dev.listen.clone());
    let listener = bind(&dev.listen).await?;
    let data_dir = dev.settings.data_dir.clone();
    crate::serve::run_dev(dev.settings, listener, shutdown_signal(), move |addr| {
        println!(
            "ktd dev: serving the Directory API on http://{addr} (data in {})",
            data_dir.display()
        );
        println!(
            "try:     ktd --addr http://{addr} publish alice key-1 --wait && ktd --addr http://{addr} lookup alice --verify"
        );
    })
    .await
}

/// `ktd shard`.
async fn run_shard(shard: ResolvedShard) -> anyhow::Result<()> {
    ktd_rpc::telemetry::log_context().set_node("shard", shard.settings.id.clone());
    let listener = bind(&shard.listen).await?;
    crate::serve::run_shard(shard.settings, listener, shutdown_signal()).await
}

/// `ktd auditor`.
async fn run_auditor(auditor: ResolvedAuditor) -> anyhow::Result<()> {
    ktd_rpc::telemetry::log_context().set_node("auditor", auditor.listen.clone());
    let grpc = bind(&auditor.listen).await?;
    let http = bind(&auditor.http_listen).await?;
    ktd_auditor::server::run(auditor.settings, grpc, http, shutdown_signal()).await
}

/// `ktd gateway`.
async fn run_gateway(gateway: ResolvedGateway) -> anyhow::Result<()> {
    ktd_rpc::telemetry::log_context().set_node("gateway", gateway.listen.clone());
    let listener = bind(&gateway.listen).await?;
    // The admin port goes through the same plaintext check as every listener.
    let admin_listener = match &gateway.settings.options.admin_listen {
        Some(addr) => Some(
            bind(addr)
                .await
                .context("the admin port (--admin-listen)")?,
        ),
        None => None,
    };
    let mut settings = gateway.settings;
    // Deliberately broken mode, test-only: stale latest-epoch lookups (see
    // `GatewayOptions::unsafe_stale_reads`). Refused without --unsafe-test-mode.
    settings.options.unsafe_stale_reads = match std::env::var("KTD_UNSAFE_STALE_READS") {
        Err(std::env::VarError::NotPresent) => None,
        Err(error) => bail!("KTD_UNSAFE_STALE_READS: {error}"),
        Ok(_) if !gateway.unsafe_test_mode => bail!(
            "KTD_UNSAFE_STALE_READS is set: it makes the gateway serve stale reads (a deliberately \
             broken mode for chaos tests); refusing to start without --unsafe-test-mode"
        ),
        Ok(value) => {
            let max_age = humantime::parse_duration(&value).with_context(|| {
                format!("KTD_UNSAFE_STALE_READS={value:?} (a duration, e.g. 3s)")
            })?;
            eprintln!(
                "ktd gateway: UNSAFE TEST MODE: latest-epoch lookups are served from a view up to {value} old (stale reads)"
            );
            Some(max_age)
        }
    };
    crate::serve::run_gateway(settings, listener, admin_listener, shutdown_signal()).await
}

#[cfg(test)]
mod tests {
    use super::check_plaintext;

    #[tokio::test]
    async fn a_plaintext_admin_port_off_loopback_is_refused_like_the_public_one() {
        let config = crate::config::GatewayConfig {
            listen: "127.0.0.1:0".into(),
            admin_listen: Some("0.0.0.0:0".into()),
            sequencers: vec!["http://127.0.0.1:1".into()],
            ..crate::config::GatewayConfig::default()
        };
        let resolved = config.resolve().expect("a valid configuration");
        let refused = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            super::run_gateway(resolved),
        )
        .await
        .expect("refused at start, before the cluster is reached")
        .expect_err("plaintext admin port on 0.0.0.0");
        let message = format!("{refused:#}");
        assert!(message.contains("--admin-listen"), "{message}");
        assert!(
            message.contains("refusing to serve plaintext gRPC"),
            "{message}"
        );
    }

    #[test]
    fn plaintext_is_served_on_loopback_only_unless_explicitly_allowed() {
        let loopback = "127.0.0.7:7001".parse().expect("addr");
        let public = "0.0.0.0:7001".parse().expect("addr");
        assert!(check_plaintext(loopback, false).is_ok());
        let refused = check_plaintext(public, false).expect_err("0.0.0.0 in plaintext");
        assert!(
            refused.to_string().contains("--insecure-plaintext"),
            "{refused}"
        );
        assert!(check_plaintext(public, true).is_ok());
    }
}
