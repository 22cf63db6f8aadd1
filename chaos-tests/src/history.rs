//! What clients did and saw: one [`Event`] per operation, Jepsen style.
//!
//! Times are microseconds on one monotonic clock (`Instant` since the run started), never wall
//! time. An operation whose outcome the client cannot know (a timeout, a dropped connection, an
//! `UNAVAILABLE` after the request may have reached the leader) is [`Outcome::Unknown`]: the
//! checkers allow it to have taken effect or not. Every publish writes a unique value, so a value
//! seen later names the publish that wrote it.

use serde::{Deserialize, Serialize};

/// One client operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "f", rename_all = "snake_case")]
pub enum Op {
    /// `Publish(key, value)` with an idempotency key.
    Publish {
        /// The label.
        key: String,
        /// The value, hex (unique per publish).
        value: String,
        /// The idempotency key sent with it.
        idempotency_key: String,
    },
    /// `Lookup(key)` at the latest epoch (a linearizable read).
    Lookup {
        /// The label.
        key: String,
    },
    /// `GetEpoch()` (latest; linearizable).
    GetEpoch,
}

/// What the client saw.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Outcome {
    /// The publish was acknowledged: durable in the sequencer, sealed in `epoch`.
    Published {
        /// Epoch it will be sealed in.
        epoch: u64,
        /// Its sequence number in the sequencer's total order.
        sequence: u64,
    },
    /// The lookup found the key.
    Found {
        /// The epoch the answer is for.
        epoch: u64,
        /// That epoch's root hash, hex.
        root: String,
        /// The value, hex.
        value: String,
        /// Its version.
        version: u64,
        /// The epoch the version was published in.
        value_epoch: u64,
        /// Whether the proof verified against the root with stock akd (and the strict checks).
        verified: bool,
    },
    /// The lookup found no version of the key.
    Absent {
        /// The epoch the answer is for, if the server said.
        epoch: Option<u64>,
    },
    /// `GetEpoch` answered.
    Epoch {
        /// The latest committed epoch.
        epoch: u64,
        /// Its root hash, hex.
        root: String,
    },
    /// An answer arrived but its proof did not verify or could not be decoded: the server (or
    /// something between it and the client) lied. Always a violation.
    Unverified {
        /// What failed.
        reason: String,
    },
    /// The operation definitely did not take effect (e.g. rejected as invalid or overloaded).
    Failed {
        /// gRPC code.
        code: String,
        /// Message.
        message: String,
    },
    /// The client cannot tell whether the operation took effect.
    Unknown {
        /// Why (timeout, connection reset, unavailable...).
        reason: String,
    },
}

/// One operation, from invocation to completion.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unique id within the history.
    pub id: u64,
    /// The client (one outstanding operation per client).
    pub client: u32,
    /// The gateway it talked to.
    pub gateway: String,
    /// When it was sent, µs since the run started.
    pub invoke_us: u64,
    /// When the answer (or the timeout) came.
    pub complete_us: u64,
    /// The operation.
    pub op: Op,
    /// What came back.
    pub outcome: Outcome,
}

/// A run's operations.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// All events, in completion order.
    pub events: Vec<Event>,
}

impl History {
    /// Writes the history as JSON lines.
    pub fn to_jsonl(&self) -> String {
        let mut out = String::new();
        for event in &self.events {
            out.push_str(&serde_json::to_string(event).expect("events serialise"));
            out.push('\n');
        }
        out
    }

    /// Reads a history written by [`History::to_jsonl`].
    pub fn from_jsonl(text: &str) -> Result<Self, serde_json::Error> {
        let events = text
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        Ok(Self { events })
    }
}

/// What the cluster holds at the end of a run, read after healing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalState {
    /// The final committed epoch.
    pub epoch: u64,
    /// Per key, its complete history as of `epoch`: `(value hex, version, epoch)`, newest first.
    pub histories: std::collections::BTreeMap<String, Vec<(String, u64, u64)>>,
    /// `(epoch, root hex, where it was seen)` observed outside client operations (every gateway,
    /// every sequencer node).
    pub roots: Vec<(u64, String, String)>,
    /// `(start epoch, whether the append-only proof start → start + 1 verified)`.
    pub audits: Vec<(u64, bool)>,
    /// Final reads (history proofs, roots) whose proofs did not verify.
    #[serde(default)]
    pub unverified: Vec<String>,
    /// `(node, its last committed epoch)` of every sequencer, read from its own state after
    /// the cluster converged (empty if it did not).
    #[serde(default)]
    pub replicas: Vec<(String, u64)>,
    /// Sequencers whose own state could not be read after convergence.
    #[serde(default)]
    pub replica_errors: Vec<String>,
}
