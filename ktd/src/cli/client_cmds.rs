//! The client subcommands (`publish`, `lookup`, `history`, `audit`, `audit-blobs`, `epoch`,
//! `seal`, `status`, `bench`) and the local ones (`keygen`, `certs`): every answer is verified
//! by [`ktd_client`] before it is printed.

use std::time::Duration;

use anyhow::{Context, bail};
use ktd_client::Client;

use super::args::{Command, LabelQuery};

fn bytes(text: &str, is_hex: bool) -> anyhow::Result<Vec<u8>> {
    if is_hex {
        hex::decode(text).with_context(|| format!("{text:?} is not hex"))
    } else {
        Ok(text.as_bytes().to_vec())
    }
}

fn show(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) if !text.chars().any(char::is_control) => format!("{text:?}"),
        _ => format!("0x{}", hex::encode(bytes)),
    }
}

async fn write_audit_blobs(
    client: &Client,
    target: &str,
    from: Option<u64>,
    follow: bool,
    keep: Option<u64>,
) -> anyhow::Result<()> {
    use crate::blob_store::{BlobStore, Put, epochs_to_prune, first_epoch};
    let store = BlobStore::open(target)?;
    let mut stored = store.inventory().await?;
    if stored.foreign > 0 {
        eprintln!(
            "{target}: {} keys that are not audit blobs (left alone)",
            stored.foreign
        );
    }
    let latest = client.epoch(None).await?.epoch;
    let mut next = first_epoch(&stored, from, latest, keep);
    loop {
        let (names, latest) = client.audit_blob_names(next, 100).await?;
        for name in &names {
            let epoch: u64 = name
                .split('/')
                .next()
                .and_then(|epoch| epoch.parse().ok())
                .with_context(|| format!("the gateway listed {name:?}, not a blob name"))?;
            if !store.check_history(&stored, epoch, name)? {
                let blob = client.audit_blob(name).await?;
                let how = match store.put(&blob.name, &blob.bytes).await? {
                    Put::Created => "verified, stored",
                    Put::AlreadyThere => "verified, already stored",
                };
                println!("{name} ({} bytes, {how})", blob.bytes.len());
                stored.insert(epoch, name.clone());
            }
            next = epoch + 1;
        }
        if let Some(keep) = keep {
            for epoch in epochs_to_prune(&stored, keep) {
                store.delete_epoch(&mut stored, epoch).await?;
                println!("pruned epoch {epoch} (retention: newest {keep})");
            }
        }
        if next <= latest {
            continue;
        }
        if !follow {
            return Ok(());
        }
        // Wait (bounded per call) for the next epoch to commit.
        let _ = tokio::time::timeout(Duration::from_secs(60), client.wait_for_epoch(next)).await;
    }
}

/// Runs a client subcommand against the gateway at `addr`.
pub async fn run_client(addr: &str, command: Command) -> anyhow::Result<()> {
    if let Command::Certs(args) = &command {
        for file in
            crate::certs::write_dev_ca(&args.out, &args.hosts, &args.sequencer_ids, args.valid_for)?
        {
            println!("wrote {}", file.display());
        }
        return Ok(());
    }
    if let Command::Keygen { out, public_key_of } = &command {
        let seed = match (out, public_key_of) {
            (_, Some(existing)) => crate::seed_file::read_vrf_seed(existing)?,
            (Some(out), None) => crate::seed_file::write_new_vrf_seed(out)?,
            (None, None) => bail!("keygen needs --out FILE or --public-key-of FILE"),
        };
        println!("{}", hex::encode(crate::seed_file::vrf_public_key(&seed)?));
        return Ok(());
    }
    let client = Client::connect(addr).await?;
    match command {
        Command::Publish {
            label,
            value,
            hex,
            idempotency_key,
            wait,
        } => {
            let published = client
                .publish(
                    vec![(bytes(&label, hex)?, bytes(&value, hex)?)],
                    idempotency_key,
                )
                .await?;
            println!(
                "published: sealed in epoch {} (sequence {})",
                published.epoch, published.sequence
            );
            if wait {
                let root = client.wait_for_epoch(published.epoch).await?;
                println!(
                    "committed: epoch {} root {}",
                    root.epoch,
                    hex::encode(root.root_hash)
                );
            }
        }
        Command::Lookup(LabelQuery {
            label,
            epoch,
            hex,
            verify,
        }) => {
            let found = match client
                .lookup_or_absence(&bytes(&label, hex)?, epoch)
                .await?
            {
                Ok(found) => found,
                Err(absent) => {
                    println!(
                        "{label}: never published as of epoch {}; absence proof verified against root {} ({} proof bytes)",
                        absent.at.epoch,
                        hex::encode(absent.at.root_hash),
                        absent.proof_bytes
                    );
                    std::process::exit(NOT_FOUND_EXIT);
                }
            };
            // The client library always verifies; --verify makes that explicit in the output.
            let how = if verify {
                "verified with akd + strict checks"
            } else {
                "proof verified"
            };
            println!(
                "{} = {} (version {}, published in epoch {}); {how} against epoch {} root {} ({} proof bytes)",
                label,
                show(&found.value),
                found.version,
                found.epoch,
                found.at.epoch,
                hex::encode(found.at.root_hash),
                found.proof_bytes
            );
        }
        Command::History {
            query:
                LabelQuery {
                    label,
                    epoch,
                    hex,
                    verify,
                },
            most_recent,
        } => {
            let (at, versions) = client
                .history(&bytes(&label, hex)?, most_recent, epoch)
                .await?;
            let how = if verify {
                "verified with akd + strict checks"
            } else {
                "proof verified"
            };
            println!(
                "{label}: {} version(s); {how} against epoch {} root {}",
                versions.len(),
                at.epoch,
                hex::encode(at.root_hash)
            );
            for version in versions {
                println!(
                    "  version {} (epoch {}): {}",
                    version.version,
                    version.epoch,
                    show(&version.value)
                );
            }
        }
        Command::Audit { start, end, verify } => {
            let audit = client.audit(start, end).await?;
            let how = if verify {
                "verified with akd::auditor::audit_verify"
            } else {
                "proof verified"
            };
            println!(
                "epochs {start}..={end} are append-only ({how}; {} proof bytes)",
                audit.proof_bytes
            );
            for root in audit.roots {
                println!(
                    "  epoch {} root {}",
                    root.epoch,
                    hex::encode(root.root_hash)
                );
            }
        }
        Command::AuditBlobs {
            to,
            from,
            follow,
            keep,
        } => {
            write_audit_blobs(&client, &to, from, follow, keep).await?;
        }
        Command::Monitor(args) => match crate::monitor::run(addr, client, args).await {
            Ok(false) => {}
            Ok(true) => std::process::exit(1),
            Err(error) => {
                // Not an alarm: the round could not run.
                eprintln!("error: {error:#}");
                std::process::exit(2);
            }
        },
        Command::Epoch { epoch, wait } => {
            let root = match (epoch, wait) {
                (Some(epoch), true) => client.wait_for_epoch(epoch).await?,
                (epoch, false) => client.epoch(epoch).await?,
                (None, true) => bail!("--wait needs an epoch number"),
            };
            println!("epoch {} root {}", root.epoch, hex::encode(root.root_hash));
        }
        Command::Seal => {
            let root = client.seal().await?;
            println!(
                "sealed and committed epoch {} root {}",
                root.epoch,
                hex::encode(root.root_hash)
            );
        }
        Command::Bench(args) => {
            let settings = crate::bench::BenchSettings {
                rate: args.rate,
                duration: args.duration,
                concurrency: args.concurrency,
                mix: args.mix,
                preload: args.preload,
                batch: args.batch.max(1),
                value_bytes: args.value_bytes,
                seed: args.seed,
                verify: args.verify,
                auditor: args.auditor.clone(),
                servers: {
                    let mut servers = args.server_pid.clone();
                    if let Some(dir) = &args.server_pid_dir {
                        servers.extend(crate::bench::servers::server_pids(dir)?);
                    }
                    servers
                },
            };
            let seed = match &args.vrf_seed_file {
                Some(path) => Some(crate::seed_file::read_vrf_seed(path)?),
                None => None,
            };
            let recording: Option<crate::bench::Recording> =
                args.compare_akd.then(Default::default);
            let users = match args.loaded {
                Some(loaded) => loaded,
                None => crate::bench::preload(&client, &settings, recording.as_ref()).await?,
            };
            let (mut report, timeline) =
                crate::bench::run(&client, &settings, users, recording.clone()).await?;
            if let Some(recording) = recording {
                eprintln!("replaying the same batches through a stock akd directory...");
                let published = recording.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let seal_ms = report
                    .epochs
                    .iter()
                    .map(|epoch| (epoch.epoch, epoch.seal_ms))
                    .collect();
                report.compare_akd = Some(
                    crate::bench::compare_akd::compare(&client, &published, &seal_ms, seed).await?,
                );
            }
            crate::bench::write_report(&args.report, &report, &timeline)?;
            print!("{}", crate::bench::markdown(&report));
            println!("report: {}", args.report.join("report.json").display());
            if let Some(baseline) = &args.baseline {
                let text = std::fs::read_to_string(baseline)
                    .with_context(|| format!("read {}", baseline.display()))?;
                let baseline: crate::bench::Report = serde_json::from_str(&text)
                    .with_context(|| format!("{} is not a ktd bench report", baseline.display()))?;
                let regressions = crate::bench::compare(&report, &baseline, args.max_regression);
                if !regressions.is_empty() {
                    bail!(
                        "regression against the baseline: {}",
                        regressions.join("; ")
                    );
                }
                println!("no regression against {}", args.report.display());
            }
        }
        Command::Status => {
            let status = client.cluster_status().await?;
            if let Some(sequencer) = &status.sequencer {
                println!(
                    "sequencer: leader {} term {}; open epoch {}, last committed epoch {}",
                    sequencer.leader_id,
                    sequencer.term,
                    sequencer.open_epoch,
                    sequencer.last_committed_epoch
                );
                for member in &sequencer.members {
                    let state = match &member.status {
                        Some(node) => format!(
                            "{}, term {}, applied index {}",
                            node.state, node.term, node.applied_index
                        ),
                        None => format!("unreachable: {}", member.error),
                    };
                    let role = if member.voter { "voter" } else { "learner" };
                    println!(
                        "  node {} at {} ({role}): {state}",
                        member.node_id, member.address
                    );
                }
            }
            for shard in &status.shards {
                println!(
                    "shard {} at {}: {} partitions, built epoch {}, {} pre-computed VRF labels, {}",
                    shard.shard_id,
                    shard.address,
                    shard.partitions.len(),
                    shard.built_epoch,
                    shard.precomputed_labels,
                    if shard.reachable {
                        "reachable".to_string()
                    } else {
                        format!("UNREACHABLE: {}", shard.error)
                    }
                );
            }
        }
        server @ (Command::Dev(_)
        | Command::Sequencer(_)
        | Command::Shard(_)
        | Command::Gateway(_)
        | Command::Auditor(_)
        | Command::Admin(_)
        | Command::Certs(_)
        | Command::Keygen { .. }) => bail!("{server:?} is not a client command"),
    }
    Ok(())
}

/// Exit status of `ktd lookup` for a label proven absent.
pub const NOT_FOUND_EXIT: i32 = 3;
