//! The server subcommands: resolve their settings, bind their listeners, install metrics, and
//! hand over to [`crate::serve`] (or `sequencer::run`, `ktd_auditor::server::run`) until
//! SIGTERM or SIGINT.

use std::time::Duration;

use anyhow::{Context, bail};
use gateway::service::GatewayOptions;

use super::args::{AuditorArgs, DevArgs, GatewayArgs, SequencerArgs, ShardArgs};
use crate::serve::{DevSettings, GatewaySettings, ShardSettings};

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

/// `ktd sequencer`.
pub async fn run_sequencer(args: SequencerArgs) -> anyhow::Result<()> {
    if args.check_config {
        let config = args.resolve()?;
        print!(
            "# effective configuration (valid)\n{}",
            toml::to_string(&config).context("print the configuration")?
        );
        return Ok(());
    }
    args.metrics.install()?;
    let config = args.resolve()?;
    ktd_rpc::telemetry::log_context().set_node(
        "sequencer",
        config
            .id
            .map_or_else(|| "new".to_string(), |id| id.to_string()),
    );
    tracing::info!(config = ?config, "effective configuration");
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("bind {}", config.listen))?;
    sequencer::run(config, listener, shutdown_signal()).await?;
    Ok(())
}

/// `ktd dev`.
pub async fn run_dev(args: DevArgs) -> anyhow::Result<()> {
    args.metrics.install()?;
    ktd_rpc::telemetry::log_context().set_node("dev", args.listen.clone());
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    let settings = DevSettings {
        data_dir: args.data_dir.clone(),
        vrf_seed_file: args.vrf_seed_file,
        epoch_interval: args.epoch_interval,
        heartbeat_interval: args.heartbeat_interval,
        partition_bits: args.partition_bits,
        config: args.configuration,
        options: GatewayOptions {
            max_in_flight: args.max_in_flight,
            ..GatewayOptions::default()
        },
    };
    let data_dir = args.data_dir;
    crate::serve::run_dev(settings, listener, shutdown_signal(), move |addr| {
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
pub async fn run_shard(args: ShardArgs) -> anyhow::Result<()> {
    if args.check_config {
        let seed = crate::seed_file::read_vrf_seed(&args.vrf_seed_file)?;
        args.listen
            .parse::<std::net::SocketAddr>()
            .with_context(|| format!("--listen {:?}", args.listen))?;
        ktd_core::shard_map::check_partition_bits(u64::from(args.partition_bits))
            .context("--partition-bits")?;
        println!(
            "# effective settings (valid)\nid = {:?}\nlisten = {:?}\ndata_dir = {:?}\n\
             vrf_seed_file = {:?} # seed redacted; public key {}\npartition_bits = {}\n\
             configuration = {:?}\nsequencers = {:?}",
            args.id,
            args.listen,
            args.data_dir.display().to_string(),
            args.vrf_seed_file.display().to_string(),
            hex::encode(crate::seed_file::vrf_public_key(&seed)?),
            args.partition_bits,
            args.configuration.to_string(),
            args.sequencers,
        );
        return Ok(());
    }
    args.metrics.install()?;
    ktd_rpc::telemetry::log_context().set_node("shard", args.id.clone());
    let settings = ShardSettings {
        vrf_seed: crate::seed_file::read_vrf_seed(&args.vrf_seed_file)?,
        id: args.id,
        data_dir: args.data_dir,
        partition_bits: args.partition_bits,
        config: args.configuration,
        sequencers: args.sequencers,
    };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    crate::serve::run_shard(settings, listener, shutdown_signal()).await
}

/// `ktd auditor`.
pub async fn run_auditor(args: AuditorArgs) -> anyhow::Result<()> {
    args.metrics.install()?;
    ktd_rpc::telemetry::log_context().set_node("auditor", args.listen.clone());
    let start = match &args.start {
        None => None,
        Some(text) => {
            let (epoch, root) = text
                .split_once('/')
                .context("--start must be EPOCH/HEX_ROOT")?;
            let root: [u8; 32] = hex::decode(root)
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
                .context("--start: the root must be 64 hex digits")?;
            Some((epoch.parse().context("--start: bad epoch")?, root))
        }
    };
    let source = match (args.gateway, args.blob_dir) {
        (Some(gateway), _) => ktd_auditor::BlobSource::Gateway(gateway),
        (None, Some(dir)) => ktd_auditor::BlobSource::Directory(dir),
        (None, None) => bail!("give --gateway URL or --blob-dir DIR"),
    };
    let settings = ktd_auditor::AuditorSettings {
        namespace: args.namespace,
        data_dir: args.data_dir,
        signing_key: crate::seed_file::read_secret_file(
            &args.signing_key_file,
            "signing key file",
        )?,
        config: args.configuration,
        start,
        source,
        poll: args.poll,
    };
    let grpc = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    let http = tokio::net::TcpListener::bind(&args.http_listen)
        .await
        .with_context(|| format!("bind {}", args.http_listen))?;
    ktd_auditor::server::run(settings, grpc, http, shutdown_signal()).await
}

/// `ktd gateway`.
pub async fn run_gateway(args: GatewayArgs) -> anyhow::Result<()> {
    if args.check_config {
        for addr in std::iter::once(&args.listen).chain(args.admin_listen.as_ref()) {
            addr.parse::<std::net::SocketAddr>()
                .with_context(|| format!("listen address {addr:?}"))?;
        }
        for addr in &args.sequencers {
            ktd_rpc::security::endpoint(addr)?;
        }
        println!(
            "# effective settings (valid)\nlisten = {:?}\nadmin_listen = {:?}\nsequencers = {:?}\n\
             max_in_flight = {}\ntls_client_auth = {:?}",
            args.listen,
            args.admin_listen,
            args.sequencers,
            args.max_in_flight,
            args.tls_client_auth,
        );
        return Ok(());
    }
    args.metrics.install()?;
    ktd_rpc::telemetry::log_context().set_node("gateway", args.listen.clone());
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    // Deliberately broken mode, test-only: stale latest-epoch lookups (see
    // `GatewayOptions::unsafe_stale_reads`). Refused without --unsafe-test-mode.
    let unsafe_stale_reads = match std::env::var("KTD_UNSAFE_STALE_READS") {
        Err(std::env::VarError::NotPresent) => None,
        Err(error) => bail!("KTD_UNSAFE_STALE_READS: {error}"),
        Ok(_) if !args.unsafe_test_mode => bail!(
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
    let settings = GatewaySettings {
        sequencers: args.sequencers,
        options: GatewayOptions {
            max_in_flight: args.max_in_flight,
            unsafe_stale_reads,
            admin_listen: args.admin_listen,
            tls_client_auth_optional: args.tls_client_auth == "optional",
            ..GatewayOptions::default()
        },
        drain: Duration::from_secs(10),
    };
    crate::serve::run_gateway(settings, listener, shutdown_signal()).await
}
