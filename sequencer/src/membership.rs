//! Raft membership safety at start-up: a node with an empty data directory is a *new* node, and
//! a new node never takes an id the cluster already used.
//!
//! Raft's safety rests on every voter remembering its vote and its log. A voter whose disk was
//! wiped and that comes back under its old id can vote twice in a term or help elect a leader
//! that lacks committed entries (lost acknowledged appends, possibly two roots for an epoch).
//! So:
//!
//! * an empty (or missing) data directory is opened only with `--init` (bootstrap a new
//!   cluster) or `--join` (a new member), never silently — a service manager that restarts a
//!   node whose disk was replaced gets a refusal, not a fresh node under a used id;
//! * with either flag, the configured `peers` are asked first (best effort: unreachable peers
//!   are the normal case of a first bootstrap). `--init` is refused if they already form a
//!   cluster; `--join` is refused if the leader has already replicated log entries to this
//!   node's id (it had state, and lost it). The leader keeps that progress while a member is
//!   down; a leader elected since then has not replicated to it and cannot tell, so the flags
//!   stay the primary guard and the shipped deployments pass them only on a first start.
//!
//! The cure is the documented one: `ktd admin remove-sequencer --id N`, then start the
//! replacement with `--join` under a new id and `ktd admin add-sequencer`.

use std::time::Duration;

use crate::client::{ClientOptions, SequencerClient};
use crate::config::SequencerConfig;
use crate::error::{Result, SequencerError};

/// Refuses to create a new node from `config` unless it is one (see the module docs).
pub async fn check_new_node(config: &SequencerConfig) -> Result<()> {
    let dir = config.data_dir.display();
    if !config.init && !config.join {
        return Err(SequencerError::InvalidConfig(format!(
            "{dir} holds no sequencer data. A new node needs --init (bootstrap a new cluster) or \
             --join (a new member). If this node was a member before, its data is lost: never \
             restart it under the same id — remove it (ktd admin remove-sequencer --id N) and \
             join a replacement under a new id (docs/operations.md, \"Replace a failed \
             sequencer\")"
        )));
    }
    let Some(id) = config.id else {
        return Ok(()); // `validate` asks for an id for a new directory.
    };
    let peers: Vec<String> = config
        .initial_members()?
        .into_iter()
        .filter(|(peer, _)| *peer != id)
        .map(|(_, addr)| addr)
        .collect();
    if peers.is_empty() {
        return Ok(());
    }
    let client = SequencerClient::with_options(
        peers.clone(),
        ClientOptions {
            max_attempts: 2 * peers.len() as u32,
            // The leader's status asks every member, this node's old self included, so it can
            // take its peer connect timeout; refused connections (a first bootstrap) fail fast.
            total_timeout: Duration::from_secs(15),
            attempt_timeout: Duration::from_secs(6),
            connect_timeout: Duration::from_secs(1),
            ..ClientOptions::default()
        },
    );
    let status = match client.cluster_status().await {
        Ok(status) => status,
        Err(error) => {
            tracing::info!(%error, "no peer answered: creating a new node");
            return Ok(());
        }
    };
    if config.init && status.leader_id != 0 {
        return Err(SequencerError::InvalidConfig(format!(
            "--init with an empty data directory ({dir}), but the peers already form a cluster \
             (leader {}, term {}): this node lost its data; bootstrapping again would start a \
             second cluster. Remove it (ktd admin remove-sequencer --id {id}) and join a \
             replacement under a new id",
            status.leader_id, status.term
        )));
    }
    if let Some(member) = status
        .members
        .iter()
        .find(|member| member.node_id == id && member.matched_index > 0)
    {
        return Err(SequencerError::InvalidConfig(format!(
            "node {id} is a member of the running cluster and the leader replicated its log up \
             to index {} to it, but {dir} is empty: this node lost its state and must not \
             rejoin under id {id}. Remove it (ktd admin remove-sequencer --id {id}) and join a \
             replacement under a new id",
            member.matched_index
        )));
    }
    Ok(())
}
