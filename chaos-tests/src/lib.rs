//! Failover drills and chaos tests for ktd: start real clusters, inject faults, record what
//! clients saw, and judge the history.
//!
//! # Layout, in reading order
//! - [`topology`]: a real cluster of `ktd` processes (3 sequencers, 2 shards, 1 gateway) on
//!   `127.0.0.x`, with kill -9 / restart and SIGSTOP / SIGCONT per process.
//! - [`workload`]: concurrent clients publishing unique values and doing verified lookups,
//!   recorded as a [`history::History`]; the final-state reads after healing.
//! - [`proxy`]: a userspace TCP fault proxy per directed sequencer link (pass, blackhole,
//!   reject, delay), which the sequencers dial instead of each other.
//! - [`nemesis`]: leader-aware faults (process and network), each recorded with timestamps.
//! - [`scenario`]: the reviewable TOML scenarios under `chaos-tests/scenarios/`.
//! - [`history`]: what clients did and saw, one event per operation (invoke / ok / fail /
//!   unknown), serialised as JSON lines.
//! - [`checker`]: pure functions over histories that return verdicts — per-key consistency
//!   against the sequencer's order, no lost acknowledged publish, no fork, monotonic epochs,
//!   audit chain and proof verification. Each one is tested on crafted bad histories.
//! - [`positive_control`]: deliberate bugs the checkers must catch.
//! - [`report`]: per-fault figures, SLO checks, exit codes, text and JSON.
//! - [`runner`]: one scenario run end to end (used by `ktd-chaos run` and the tests), or a
//!   drill against a running cluster (`ktd-chaos drill`).
//! - [`inventory`]: a running cluster's nodes and their fault hooks, for drills.
//! - [`cli`]: the `ktd-chaos` command line.

pub mod checker;
pub mod cli;
pub mod history;
pub mod inventory;
pub mod nemesis;
pub mod positive_control;
pub mod proxy;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod topology;
pub mod workload;
