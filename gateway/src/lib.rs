//! ktd's front door and the home of the `ktd` binary (`src/bin/ktd.rs`).
//!
//! - [`service`]: the public `ktd.v1.Directory` and `ktd.v1.Admin` services over a
//!   [`service::Gateway`]: publishes go to the sequencer, reads resolve a committed epoch
//!   ([`epochs`]) and fan out to the shards, whose answers [`shard::cluster`] stitches.
//! - [`sequencing`]: how the gateway reaches the sequencer (gRPC, or in process for `ktd dev`).
//! - [`server`]: serving a gateway (health, reflection, `TCP_NODELAY`, draining shutdown).
//! - [`run`]: starting each process kind: shard server, gateway, and `ktd dev`.
//! - [`readiness`]: what SERVING means for shards and gateways ("caught up"), health names.
//! - [`admin_cli`]: `ktd admin ...`, the operator CLI (status table, leader transfer,
//!   membership, seal, snapshots) talking to the sequencers' admin service directly.
//! - [`tail`]: shards tail the sequencer's log to pre-compute VRF labels while an epoch is open.
//! - [`strict`]: the strict proof verifier (stock akd plus the structural checks akd skips).
//! - [`client`]: the Rust client library, verifying every proof with stock akd.
//! - [`auditor`], [`auditor_server`]: `ktd auditor`, an independent auditor that verifies every
//!   audit blob with stock akd and signs the heads it verified (Plexi's signature format).
//! - [`loadgen`]: `ktd bench`, the open-loop load generator and its reports.
//! - [`error`]: the gateway's errors and their gRPC status codes.

pub mod admin_cli;
pub mod auditor;
pub mod auditor_server;
pub mod certs;
pub mod client;
pub mod compare_akd;
pub mod epochs;
pub mod error;
pub mod loadgen;
pub mod readiness;
pub mod run;
pub mod sequencing;
pub mod server;
pub mod service;
pub mod strict;
pub mod tail;
pub mod telemetry;
