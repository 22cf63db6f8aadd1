//! The `ktd` program as a library: the command line, process wiring, the operator CLI and the
//! load generator. The binary (`src/main.rs`) only calls [`cli::main`].
//!
//! # Layout, in reading order
//! - [`cli`]: the command line — clap types, layering flags, environment and `--config` files,
//!   what each subcommand does.
//! - [`config`]: one typed configuration per server (shard, gateway, dev, auditor; the
//!   sequencer's is `sequencer::SequencerConfig`), its file format, and its validation into
//!   what the server runs with.
//! - [`serve`]: starting each process kind from resolved settings — `ktd shard` (with its tail
//!   of the sequencer log and its readiness), `ktd gateway`, `ktd dev`.
//! - [`seed_file`]: the VRF seed and other 32-byte secret files (mode 600).
//! - [`admin`]: `ktd admin`, the operator CLI over the sequencers' admin service and the shards.
//! - [`mod@bench`]: `ktd bench`, the open-loop load generator, its reports and the stock-akd
//!   comparison.
//! - [`monitor`]: `ktd monitor`, a key owner's watch over its own labels.
//! - [`blob_store`]: `ktd audit-blobs --to`, audit blobs into a directory or a bucket.
//! - [`certs`]: `ktd certs`, a development CA and role certificates.
//! - [`telemetry`]: logs, traces and Prometheus metrics of a server process.
//!
//! This crate sits on top of every other: it may depend on all of them, and none depends on
//! it. Its tests (`tests/it`) run the real `ktd` binary as processes.

pub mod admin;
pub mod bench;
pub mod blob_store;
pub mod certs;
pub mod cli;
pub mod config;
pub mod monitor;
pub mod seed_file;
pub mod serve;
pub mod telemetry;
