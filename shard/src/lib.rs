//! ktd's shard server library: the core's AKD-exact tree partitions ([`ktd_core`]) stored on
//! RocksDB with every node version tagged by the epoch that wrote it (MVCC: every read is "as
//! of epoch E"), built in parallel, and served to the rest of the cluster over gRPC.
//!
//! # Layout, in reading order
//! The tree math itself is the pure [`ktd_core`] crate; this crate stores it and serves it.
//! - [`store`]: RocksDB column families, record encodings, and `RocksStore: TreeStore`.
//! - [`node`]: one process's partitions: the two epoch steps (user leaves, partition builds)
//!   and the reads, shared by the in-process directory and the shard server.
//! - [`api`], [`local`], [`server`], [`client`], [`wire`]: the shard as a cluster member —
//!   the `ShardApi` trait, its in-process implementation, the gRPC service and client, and the
//!   conversions between them.
//! - [`cluster`]: the distributed epoch (prepare on every shard, deliveries, builds, stitch),
//!   the distributed reads, and how a process reaches the shards of a shard map
//!   ([`cluster::ShardConnector`]).
//! - [`replicated`]: the sequencer's replicated shard map and epoch records ⇄ the core's types.
//! - [`lookup_proofs`]: the VRF proofs of lookups, stored with the user versions (modes and the
//!   background filler).
//! - [`directory`]: the in-process reference directory (all partitions, one RocksDB): what
//!   the akd oracle tests, the benches and the library example run.
//! - [`metrics`]: the `ktd_storage_*` Prometheus series (batch-write latency, RocksDB stalls,
//!   disk space) and their sampler.
//! - [`error`]: the crate's error, wrapping [`ktd_core::Error`].
//!
//! **Architecture invariant:** this crate adds storage and transport to [`ktd_core`] and never
//! re-implements its math: every root, path and proof comes from the core's functions.

pub mod api;
pub mod backup;
pub mod client;
pub mod cluster;
pub mod directory;
pub mod error;
pub mod local;
pub mod lookup_proofs;
pub mod metrics;
pub mod node;
pub mod replicated;
pub mod server;
pub mod store;
pub mod wire;

pub use directory::{Directory, DirectoryOptions, EpochHash};
pub use error::{Error, Result};

/// Design decisions that shaped this crate, one numbered note each (`shard/docs/`).
pub mod design {
    #[doc = include_str!("../docs/0001-mvcc-by-epoch.md")]
    pub mod mvcc_by_epoch {}
}
