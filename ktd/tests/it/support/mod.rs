//! What the `ktd` crate's integration tests share (topic files name only these modules, never
//! each other): running the CLI and reading its `--help` (`cli`), the cluster topologies and
//! clients (`cluster`), the deployment files (`deploy`), and the exported metrics and scrapes
//! (`metrics`). The generic pieces (deadlines, polls, the process harness, ports, seeds) come
//! from `ktd-testkit`.

pub mod cli;
pub mod cluster;
pub mod deploy;
pub mod metrics;

/// The `ktd` binary under test.
pub const KTD: &str = env!("CARGO_BIN_EXE_ktd");
