//! The `ktd-testkit` crate's integration tests: the workspace's tidy rules, which no compiler
//! checks (one binary).

mod tidy;
