//! The bounded chaos tier: real ktd processes under faults, judged by the checkers. Each test
//! runs under a deadline and the tests run one at a time (six processes on two cores is
//! already a lot). They need the `ktd` binary: `cargo test --release --workspace` builds it (the
//! `ktd` crate's integration tests depend on it); with `-p chaos-tests` alone, run
//! `cargo build --release -p ktd --bin ktd` first or set `KTD_BIN`.

mod scenarios;
mod support;
