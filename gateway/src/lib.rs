//! ktd's front door (the public `Directory` API arrives with a later issue) and the home of the
//! `ktd` binary (`src/bin/ktd.rs`), whose subcommands start each server.
//!
//! For now the crate only holds the binary: `ktd sequencer` runs a sequencer node
//! ([`sequencer::run`]).
