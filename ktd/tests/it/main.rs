//! The `ktd` crate's integration tests: real `ktd` processes (via `CARGO_BIN_EXE_ktd`) on
//! `127.0.0.x` ports, each with its own data directory, under a deadline. One file (or folder)
//! per topic; what topics share is in `support/`.

mod adversarial;
mod auditor;
mod blobs;
mod cluster;
mod config;
mod deploy;
mod dev;
mod docs;
mod leader_kill;
mod metrics;
mod monitor;
mod replicas;
mod runbooks;
mod support;
mod tls;
mod tracing;
mod trust;
