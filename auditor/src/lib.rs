//! `ktd auditor` as a library: an independent auditor of a ktd (or any akd) directory, in the
//! manner of Cloudflare's Plexi auditor for WhatsApp.
//!
//! - [`auditor`]: follows audit blobs (a gateway's public API, or a blob directory), enforces
//!   the auditor rules, verifies every step with stock akd and signs the heads it verified.
//! - [`server`]: the `ktd.auditor.v1.Auditor` gRPC service, the JSON HTTP API and the dashboard.
//!
//! **Architecture invariant:** the auditor trusts nothing of the directory it audits: it builds
//! on the public API (through `ktd-client`), the wire definitions, the pure core and stock akd
//! only — Cargo refuses it the shard, sequencer and gateway crates.

pub mod auditor;
pub mod server;

pub use auditor::{Auditor, AuditorSettings, BlobSource, Head};
