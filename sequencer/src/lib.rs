//! ktd's sequencer: an openraft cluster on RocksDB that orders key updates into epochs, seals
//! epochs, and records each epoch's committed root — never two roots for one epoch, never an
//! acknowledged update lost.
//!
//! # Layout (reading order)
//!
//! * [`machine`] — the replicated state machine as a pure transition function: appends with
//!   last-writer-wins and idempotency keys, sealing (timer, size limit), epoch commits, cluster
//!   metadata.
//! * [`raft`] — the thin layer over openraft: RocksDB log and state machine, checkpoint
//!   snapshots, the gRPC transport.
//! * [`node`] — [`Sequencer`], one node as a library: what the services and an in-process
//!   coordinator call.
//! * [`leader`] — leader duties (the seal timer).
//! * [`coordinator`] — the epoch coordinator: drives sealed epochs through the shards
//!   (`shard::cluster`) and commits their roots; active on the leader only.
//! * [`api`], [`admin`] — the `ktd.sequencer.v1.Sequencer` and `ktd.sequencer.v1.SequencerAdmin` gRPC services.
//! * [`mod@serve`] — [`run`]: one listener, health, graceful shutdown.
//! * [`client`] — [`SequencerClient`], which finds the leader and retries safely.
//! * [`metrics`] — Prometheus series beyond the status gauges: follower lag, Raft log fsync,
//!   seal and publish-to-inclusion latency, epoch age.
//! * [`config`], [`error`].
//!
//! # Guarantees
//!
//! * An `Append` is acknowledged only after its entry is committed on a quorum and applied; the
//!   log, the vote and the applied state are fsynced before they are acknowledged.
//! * Every update gets a cluster-wide, gap-free sequence number, and all nodes apply the same
//!   entries in the same order.
//! * A retried `Append` with the same idempotency key returns the original answer and is
//!   applied once (within the configured window).
//! * `CommitEpoch(E)` succeeds once per epoch, in epoch order, for sealed epochs only; a second,
//!   different root for `E` is refused.

pub mod admin;
pub mod api;
pub mod client;
pub mod config;
pub mod coordinator;
pub mod error;
pub mod history;
pub mod leader;
pub mod machine;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod raft;
pub mod serve;
pub mod traces;

pub use client::{ClientOptions, SequencerClient};
pub use config::SequencerConfig;
pub use error::{Result, SequencerError};
pub use ktd_proto::ktd::sequencer::v1 as pb;
pub use node::{LeaderState, Sequencer};
pub use raft::NodeId;
pub use raft::state_machine::{BatchRead, SmView};
pub use serve::{HEALTH_SERVICE, run, serve};
