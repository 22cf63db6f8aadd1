//! Driving a directory whose partitions live on replica sets of shard servers, over
//! [`ShardApi`] (see `shard/docs/0002-replicated-shards.md`).
//!
//! - [`epoch`]: the coordinator's [`run_epoch`] — prepare on every up-to-date replica of every
//!   user partition, agree on leaf digests by majority, build on every up-to-date replica of every
//!   tree partition, agree on roots by majority, stitch — and [`replay_epoch`], which brings one
//!   lagging server forward by one committed epoch.
//! - [`read`]: the gateway's reads ([`lookup`], [`absence`], [`key_history`], [`audit_step`]):
//!   each partition is read from one of its healthy voters, failing over (and hedging after a
//!   latency-based delay) to the next.
//! - this module: [`ShardSet`], a map with a client per server, and [`ShardConnector`], how a
//!   process gets one (gRPC in a cluster, the in-process shard in `ktd dev`).
//!
//! Each epoch phase runs in a span (`ktd.epoch.prepare`, `ktd.epoch.build`); updates whose
//! publish was traced carry their trace context to the replicas that prepare them.
//!
//! ```text
//!   sealed batch ──split by user partition──► prepare_epoch (every up-to-date replica, parallel)
//!                                             └─ leaves + digest per user partition ─► majority
//!   base roots (epoch-1) + agreed leaves ────► build_epoch (every up-to-date replica, parallel)
//!                                             └─ root per partition ─► majority
//!   majority roots ──► TopTree::new ──► root hash ──► (coordinator commits through Raft)
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use ktd_core::ShardMap;

use crate::api::ShardApi;
use crate::client::{ClientTimeouts, GrpcPeers};
use crate::error::{Error, Result};
use crate::local::PeerResolver;

pub mod epoch;
pub mod read;

pub use epoch::{
    CommittedEpoch, EpochFailure, EpochOutcome, Participation, ReplayOutcome, ReplicaVerdict,
    replay_epoch, run_epoch,
};
pub use read::{Hedging, absence, audit_step, key_history, lookup, replica_failure};

/// The servers of a shard map and a client for each.
#[derive(Clone)]
pub struct ShardSet {
    map: ShardMap,
    apis: HashMap<String, Arc<dyn ShardApi>>,
    hedging: Arc<Hedging>,
}

impl std::fmt::Debug for ShardSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardSet")
            .field("map", &self.map)
            .finish_non_exhaustive()
    }
}

impl ShardSet {
    /// The servers of `map`, reached through `apis` (one per server id).
    pub fn new(map: ShardMap, apis: HashMap<String, Arc<dyn ShardApi>>) -> Result<Self> {
        if let Some(server) = map
            .servers()
            .iter()
            .find(|server| !apis.contains_key(&server.id))
        {
            return Err(Error::invalid_config(format!(
                "no client for shard server {}",
                server.id
            )));
        }
        Ok(Self {
            map,
            apis,
            hedging: Arc::new(Hedging::default()),
        })
    }

    /// The servers of `map`, reached through `resolver`.
    pub fn resolve(map: ShardMap, resolver: &dyn PeerResolver) -> Result<Self> {
        let apis = map
            .servers()
            .iter()
            .map(|server| Ok((server.id.clone(), resolver.peer(server)?)))
            .collect::<Result<_>>()?;
        Self::new(map, apis)
    }

    /// The same clients under a newer version of the same map (servers unchanged), keeping the
    /// read latency estimate.
    pub fn with_map(&self, map: ShardMap) -> Result<Self> {
        let mut set = Self::new(map, self.apis.clone())?;
        set.hedging = self.hedging.clone();
        Ok(set)
    }

    /// The shard map.
    pub fn map(&self) -> &ShardMap {
        &self.map
    }

    /// The client of server `id`.
    pub fn api(&self, id: &str) -> Result<&Arc<dyn ShardApi>> {
        self.apis
            .get(id)
            .ok_or_else(|| Error::invalid_config(format!("no client for shard server {id}")))
    }

    /// The read latency estimate the hedged reads use.
    pub fn hedging(&self) -> &Hedging {
        &self.hedging
    }
}

/// How a process reaches the servers of a shard map: the coordinator to drive epochs, gateways
/// to read.
pub trait ShardConnector: Send + Sync {
    /// A [`ShardSet`] for `map` (gRPC clients in a cluster, the in-process shard in `ktd dev`).
    fn connect(&self, map: ShardMap) -> Result<ShardSet>;
}

/// Reaches shard servers over gRPC (the production connector): one pooled client per server
/// id and address.
#[derive(Debug, Default)]
pub struct GrpcConnector {
    peers: GrpcPeers,
}

impl GrpcConnector {
    /// A connector whose clients use `timeouts`.
    pub fn new(timeouts: ClientTimeouts) -> Self {
        Self {
            peers: GrpcPeers::new(timeouts),
        }
    }
}

impl ShardConnector for GrpcConnector {
    fn connect(&self, map: ShardMap) -> Result<ShardSet> {
        ShardSet::resolve(map, &self.peers)
    }
}

/// Always the same shard servers (the in-process shard of `ktd dev`, tests); maps whose
/// servers differ from theirs are refused.
#[derive(Debug)]
pub struct FixedShards(pub ShardSet);

impl ShardConnector for FixedShards {
    fn connect(&self, map: ShardMap) -> Result<ShardSet> {
        let endpoints = |map: &ShardMap| -> Vec<(String, String)> {
            map.servers()
                .iter()
                .map(|server| (server.id.clone(), server.address.clone()))
                .collect()
        };
        if endpoints(&map) != endpoints(self.0.map()) {
            return Err(Error::invalid_config(format!(
                "the cluster's shard map (version {}) names servers this process does not serve",
                map.version()
            )));
        }
        self.0.with_map(map)
    }
}
