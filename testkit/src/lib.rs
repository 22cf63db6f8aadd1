//! `ktd-testkit`: the helpers ktd's test binaries, benches and drills share, so that each one
//! exists once.
//!
//! | module | what |
//! |---|---|
//! | [`deadline`] | every test body runs under a deadline (async, with options, or blocking) |
//! | [`poll`] | wait for a condition with a deadline and a message, never for a fixed time |
//! | [`process`] | `ktd` child processes: spawn (logs captured, one default `RUST_LOG`), SIGKILL, SIGTERM, SIGSTOP/SIGCONT, restart; a bootstrapped sequencer cluster |
//! | [`net`] | free `ip:port`s, a plain HTTP GET |
//! | [`grpc`] | status codes of answers, `grpc.health.v1` checks |
//! | [`seed`] | the test VRF-seed file and public key |
//! | [`logging`] | a test log writer |
//! | [`stats`] | percentiles and medians of measured samples |
//! | [`fs`] | copying directories, finding Rust files, the workspace root |
//!
//! Used only as a dev-dependency (chaos-tests, a test tool, uses it as a normal one). It names
//! no product crate: what it knows of `ktd` is its command line, so the binary under test is
//! always an argument (`env!("CARGO_BIN_EXE_ktd")` in the `ktd` crate's tests and benches).

pub mod deadline;
pub mod fs;
pub mod grpc;
pub mod logging;
pub mod net;
pub mod poll;
pub mod process;
pub mod seed;
pub mod stats;

pub use deadline::{Deadline, with_deadline, with_deadline_blocking};
pub use poll::{Poll, eventually};
