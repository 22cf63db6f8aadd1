//! ktd's tree engine: an AKD-exact key directory computed in prefix partitions over RocksDB.
//!
//! Roots and proofs produced here are bit-for-bit what a single-process `akd::Directory`
//! (akd 0.13) produces for the same updates, VRF key and configuration, while the tree is split
//! into `2^k` partitions by the top `k` bits of node labels, built in parallel and stored with
//! every node version tagged by the epoch that wrote it (MVCC: every read is "as of epoch E").
//!
//! # Layout, in reading order
//! - [`label`]: bit arithmetic on `NodeLabel`s (prefixes, common prefixes, partitions).
//! - [`tree`]: pure partition-tree math over the [`tree::TreeStore`] trait: batch insertion
//!   with level-batched reads and parallel hashing, proof walks, append-only slices.
//! - [`stitch`]: pure; the top of the trie above the partition roots: the global root hash and
//!   stitched membership, non-membership and append-only proofs.
//! - [`vrf`]: the directory's ECVRF key (`akd_core`'s implementation) and commitment key.
//! - [`user`]: akd's version rules: which leaves an update inserts, and the user's versions.
//! - [`proof`]: assembles akd's `LookupProof` and `HistoryProof` from VRF proofs and paths.
//! - [`store`]: RocksDB column families, record encodings, and `RocksTreeStore`.
//! - [`node`]: one process's partitions: the two epoch steps (user leaves, partition builds)
//!   and the reads, shared by the in-process directory and the shard server.
//! - [`api`], [`local`], [`server`], [`client`], [`wire`]: the shard as a cluster member —
//!   the `ShardApi` trait, its in-process implementation, the gRPC service and client, and the
//!   conversions between them.
//! - [`directory`]: the in-process directory (all partitions, one RocksDB) that `ktd dev` runs.
//! - [`config`]: the AKD configuration chosen at run time (WhatsApp v1 or experimental).
//! - [`metrics`]: the `ktd_storage_*` Prometheus series (batch-write latency, RocksDB stalls,
//!   disk space) and their sampler.
//!
//! **Architecture invariant:** `label`, `tree`, `stitch`, `proof`, `user` and `vrf` import
//! neither `rocksdb` nor any RPC crate; only `store`, `node`, `directory` and `metrics` touch
//! RocksDB, and only `server`, `client` and `wire` touch tonic/prost.

pub mod api;
pub mod client;
pub mod cluster;
pub mod config;
pub mod directory;
pub mod error;
pub mod label;
pub mod local;
pub mod metrics;
pub mod node;
pub mod proof;
pub mod server;
pub mod stitch;
pub mod store;
pub mod tree;
pub mod user;
pub mod vrf;
pub mod wire;

pub use config::AkdConfig;
pub use directory::{Directory, DirectoryOptions, EpochHash};
pub use error::{Error, Result};

/// Re-exported so dependants name exactly the `akd_core` this crate was built against.
pub use akd_core;

/// Design decisions that shaped this crate, one numbered note each (`shard/docs/`).
pub mod design {
    #[doc = include_str!("../docs/0001-mvcc-by-epoch.md")]
    pub mod mvcc_by_epoch {}
}
