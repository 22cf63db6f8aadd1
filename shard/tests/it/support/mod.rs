//! What the shard's integration tests share: opening the reference directory with a test seed
//! and comparing its audit steps with akd's (`directory`), and seeded workloads (`workload`).

pub mod directory;
pub mod workload;
