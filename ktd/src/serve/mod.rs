//! Starting each kind of ktd process from settings the CLI resolved: a shard server
//! ([`shard_server`]), a gateway ([`gateway_server`]) and `ktd dev` ([`dev`]), with what they share — the
//! shard's tail of the sequencer log ([`tail`]) and its readiness ([`readiness`]). The sequencer
//! starts with `sequencer::run`; the auditor with `ktd_auditor::server::run`.
//!
//! Each `run_*` takes its listener already bound and a shutdown future, and returns when it
//! has drained.

use std::time::Duration;

use anyhow::bail;
use gateway::sequencing::Sequencing;
use sequencer::pb;

pub mod dev;
pub mod gateway_server;
pub mod readiness;
pub mod shard_server;
pub mod tail;

pub use dev::{DevSettings, run_dev};
pub use gateway_server::{GatewaySettings, run_gateway};
pub use shard_server::{ShardSettings, run_shard};

/// The shard id of `ktd dev`'s in-process shard.
pub const DEV_SHARD: &str = "dev";

/// Waits until the sequencer cluster has metadata and a shard map.
pub(crate) async fn cluster_metadata(
    sequencing: &dyn Sequencing,
    shutdown: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<pb::ClusterMetadata> {
    let mut logged = false;
    loop {
        match sequencing.cluster_metadata().await {
            Ok(pb::ClusterMetadataResponse {
                metadata: Some(metadata),
                shard_map: Some(map),
                ..
            }) if map.version > 0 => return Ok(metadata),
            Ok(_) => {
                if !logged {
                    tracing::info!("waiting for the cluster's metadata and shard map");
                    logged = true;
                }
            }
            Err(error) => {
                if !logged {
                    tracing::info!(%error, "waiting for the sequencer");
                    logged = true;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => bail!("stopped before the cluster was ready"),
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}
