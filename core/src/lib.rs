//! ktd's pure core: the tree math that makes ktd's roots and proofs bit-for-bit those of Meta's
//! `akd` 0.13, and the small shared records every component agrees on.
//!
//! Nothing here does IO: this crate cannot depend on RocksDB, tonic, prost or tokio (a CI check
//! runs `cargo tree` on it), so the shard server, the sequencer, the gateway and the light
//! verifying client all build on the same arithmetic. Storage is reached only through the
//! [`tree::TreeStore`] trait (reads) and [`tree::PartitionDelta`] (what to write).
//!
//! # Layout, in reading order
//! - [`label`]: bit arithmetic on `NodeLabel`s (prefixes, common prefixes), tree and user
//!   partitions, and the one partition-bit limit.
//! - [`tree`]: one partition: batch insertion with level-batched reads and parallel hashing,
//!   proof walks, append-only slices, and the in-memory [`tree::MemTreeStore`].
//! - [`stitch`]: the top of the trie above the partition roots: the global root hash and
//!   stitched membership, non-membership and append-only proofs.
//! - [`vrf`]: the directory's ECVRF key (`akd_core`'s implementation) and commitment key.
//! - [`user`]: akd's version rules: which leaves an update inserts, and the user's versions.
//! - [`proof`]: assembles akd's `LookupProof` and `HistoryProof` (and ktd's absence proof) from
//!   VRF proofs and paths.
//! - [`config`]: the AKD configuration chosen at run time (WhatsApp v1 or experimental).
//! - [`shard_map`]: which shard owns which partitions, validated in one place.
//! - [`epoch_record`]: an epoch's root and partition roots, and their replicated encoding.
//! - [`retention`]: the history window, its pins and `safe_epoch`, the oldest readable epoch.
//! - [`codec`]: the byte primitives of every fixed-layout record.
//! - [`error`]: the one error enum of the tree and proofs (the retention record has its own).
//!
//! **Architecture invariant:** every root and proof this crate computes equals stock akd's for
//! the same updates, VRF key and configuration; the akd oracle tests in `shard/tests/it` and
//! this crate's own tests hold that.

pub mod codec;
pub mod config;
pub mod epoch_record;
pub mod error;
pub mod label;
pub mod proof;
pub mod retention;
pub mod shard_map;
pub mod stitch;
pub mod tree;
pub mod user;
pub mod vrf;

pub use config::AkdConfig;
pub use epoch_record::EpochRecord;
pub use error::{Error, Result};
pub use shard_map::{Learner, PartitionReplicas, Role, ShardInfo, ShardMap, ShardServer};

/// Re-exported so dependants name exactly the `akd_core` this crate was built against.
pub use akd_core;
