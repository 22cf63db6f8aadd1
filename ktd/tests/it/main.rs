//! The `ktd` crate's integration tests: real `ktd` processes (via `CARGO_BIN_EXE_ktd`) on
//! `127.0.0.x` ports, each with its own data directory, under a deadline.

mod auditor;
mod cluster;
mod config;
mod deadline;
mod deploy;
mod dev;
mod docs;
mod exported_metrics;
mod ktd_cli;
mod leader_kill;
mod metrics;
mod process;
mod runbooks;
mod tls;
mod tracing;
