//! ktd's public API: the `ktd.v1.Directory` and `ktd.v1.Admin` services a gateway serves.
//!
//! - [`service`]: [`service::Gateway`]: publishes go to the sequencer, reads resolve a committed
//!   epoch ([`epochs`]) and fan out to the shards, whose answers `shard::cluster` stitches.
//! - [`epochs`]: the latest committed epoch (linearizable, shared by concurrent requests) and a
//!   cache of decoded top trees.
//! - [`sequencing`]: how the gateway reaches the sequencer (gRPC, or in process for `ktd dev`).
//! - [`server`]: serving a gateway (health, reflection, `TCP_NODELAY`, draining shutdown).
//! - [`readiness`]: what SERVING means for a gateway ("caught up").
//! - [`rate`]: per-caller budgets for the expensive reads (histories, audits, waits).
//! - [`error`]: the gateway's errors and their one mapping to gRPC status codes.
//! - [`blob_http`]: audit blobs over HTTP in the S3 `ListObjectsV2` layout akd's and Plexi's
//!   auditor tools read.
//!
//! The `ktd gateway` process around it (flags, configuration, listeners) is the `ktd` crate's.
//!
//! **Architecture invariant:** the gateway holds no state that is not derived from committed
//! Raft entries; any two gateways give the same bytes for the same epoch. (The per-caller
//! budgets of [`rate`] decide only *whether* a request is served, never what it answers.)

pub mod blob_http;
pub mod epochs;
pub mod error;
pub mod rate;
pub mod readiness;
pub mod sequencing;
pub mod server;
pub mod service;
