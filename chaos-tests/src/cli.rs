//! The `ktd-chaos` command line: its subcommands and flags. The binary
//! (`src/bin/ktd-chaos.rs`) runs them; the `ktd` crate's docs test parses the documented
//! `ktd-chaos` and `./x.sh chaos` commands with it, so a documented command cannot drift from
//! the real flags.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::positive_control::Mutation;

/// `ktd-chaos`: failover drills and chaos tests for ktd.
#[derive(Debug, Parser)]
#[command(
    name = "ktd-chaos",
    about = "Failover drills and chaos tests for ktd",
    long_about = None
)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands of [`Cli`].
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the shipped scenarios.
    List,
    /// Start a local cluster, run a scenario, check the history, report.
    Run {
        /// A shipped scenario's name, or a path to a scenario `.toml`.
        #[arg(long)]
        scenario: String,
        /// Seed (fault targets, jitter, keys, VRF key).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Fault window length (default: the scenario's).
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// Artifact directory (history, final state, report, logs).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The ktd binary (default: $KTD_BIN, next to this binary, or $CARGO_TARGET_DIR/release/ktd).
        #[arg(long)]
        ktd: Option<PathBuf>,
        /// Positive control: mutate the history before checking; the run must exit 1.
        #[arg(long, value_enum)]
        inject_violation: Option<Mutation>,
        /// Print the JSON report instead of the text one.
        #[arg(long)]
        json: bool,
        /// SLO overrides: `write_unavailability=5s,p99_publish=2s,heal=30s`.
        #[arg(long)]
        slo: Option<String>,
    },
    /// Run a scenario against an already running cluster described by an inventory: the
    /// workload and the faults (through the inventory's hooks), then the same checkers and
    /// report.
    Drill {
        /// The inventory TOML (nodes, roles, addresses, kill/start/pause/resume hooks).
        #[arg(long)]
        inventory: PathBuf,
        /// A shipped scenario's name, or a path to a scenario `.toml`.
        #[arg(long)]
        scenario: String,
        /// SLO overrides: `write_unavailability=5s,p99_publish=2s,heal=30s`.
        #[arg(long)]
        slo: Option<String>,
        /// Seed (fault targets, jitter, keys).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Fault window length (default: the scenario's).
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// Artifact directory (history, final state, report, copied logs).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print the JSON report instead of the text one.
        #[arg(long)]
        json: bool,
    },
    /// Re-run the checkers on a saved run (a directory with history.jsonl and final.json, or
    /// the history.jsonl file itself).
    Replay {
        /// The run directory or history file.
        path: PathBuf,
        /// Positive control: mutate the history before checking.
        #[arg(long, value_enum)]
        inject_violation: Option<Mutation>,
    },
}
