//! Failover drills and chaos tests for ktd: start real clusters, inject faults, record what
//! clients saw, and judge the history.
//!
//! # Layout, in reading order
//! - [`history`]: what clients did and saw, one event per operation (invoke / ok / fail /
//!   unknown), serialised as JSON lines.
//! - [`checker`]: pure functions over histories that return verdicts — per-key consistency
//!   against the sequencer's order, no lost acknowledged publish, no fork, monotonic epochs,
//!   audit chain and proof verification. Each one is tested on crafted bad histories.

pub mod checker;
pub mod history;
