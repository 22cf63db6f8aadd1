//! The `shard` crate's integration tests: one binary, so RocksDB links once.
//!
//! Stock akd 0.13 with its in-memory storage is the oracle: ktd's roots and proofs must equal
//! what `akd::Directory` produces for the same batches, VRF seed and configuration.

mod akd_oracle;
mod bad_input;
mod cluster_pipeline;
mod crash_safety;
mod retention;
mod stitch_props;
mod store_conformance;
mod stored_proofs;
mod support;
mod test_vectors;
mod wire_compat;
mod wire_props;
