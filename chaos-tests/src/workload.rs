//! The workload: concurrent clients publishing unique values (each with its own idempotency
//! key) and doing verified lookups through a gateway, plus one epoch poller; every operation is
//! recorded as an [`Event`] with invoke and complete times on one monotonic clock. After the
//! run, [`read_final_state`] reads what the cluster holds for the checkers.
//!
//! Classification (Jepsen's rule: a timeout is an outcome, not an error): a publish refused with
//! `INVALID_ARGUMENT` or `RESOURCE_EXHAUSTED` is [`Outcome::Failed`] (the gateway rejected it
//! before it reached the sequencer); any other error or a timeout is [`Outcome::Unknown`]. A
//! lookup answer whose proof does not verify is [`Outcome::Unverified`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ktd_client::{Client, ClientError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::Code;

use crate::history::{Event, FinalState, History, Op, Outcome};

/// Workload shape.
#[derive(Clone, Debug)]
pub struct WorkloadOptions {
    /// Concurrent clients (each has one outstanding operation).
    pub clients: u32,
    /// Size of the key space (`key-0` ... `key-(n-1)`).
    pub keys: u32,
    /// Fraction of operations that are publishes (the rest are lookups).
    pub publish_ratio: f64,
    /// A client gives up on an operation after this long (outcome unknown).
    pub op_timeout: Duration,
    /// How often the epoch poller calls `GetEpoch`.
    pub epoch_poll: Duration,
    /// Seed for key choice.
    pub seed: u64,
    /// Distinguishes idempotency keys across runs.
    pub run_id: String,
    /// Prepended to every key (empty for a fresh cluster; unique per drill on a running one).
    pub key_prefix: String,
}

/// Records events against one clock.
#[derive(Debug)]
pub struct Recorder {
    origin: Instant,
    next_id: AtomicU64,
    events: Mutex<Vec<Event>>,
}

impl Recorder {
    /// A recorder whose clock starts now.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
            next_id: AtomicU64::new(1),
            events: Mutex::new(Vec::new()),
        }
    }

    /// Microseconds since the run started.
    pub fn now_us(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// The instant `us` after the origin.
    pub fn instant_at(&self, us: u64) -> Instant {
        self.origin + Duration::from_micros(us)
    }

    fn record(&self, client: u32, gateway: &str, invoke_us: u64, op: Op, outcome: Outcome) {
        let event = Event {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            client,
            gateway: gateway.to_string(),
            invoke_us,
            complete_us: self.now_us(),
            op,
            outcome,
        };
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(event);
    }

    /// The history so far, in completion order.
    pub fn history(&self) -> History {
        let mut events = self
            .events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        events.sort_by_key(|event| (event.complete_us, event.id));
        History { events }
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

/// The label of key `index` (`prefix` keeps drills on a shared cluster apart from earlier data).
pub fn key_name(prefix: &str, index: u32) -> String {
    format!("{prefix}key-{index}")
}

fn publish_outcome(result: Result<ktd_client::Published, ClientError>) -> Outcome {
    let result = result.map_err(|error| match error {
        ClientError::Refused { status, .. } => status,
        other => tonic::Status::unknown(other.to_string()),
    });
    match result {
        Ok(published) => Outcome::Published {
            epoch: published.epoch,
            sequence: published.sequence,
        },
        Err(status)
            if matches!(
                status.code(),
                Code::InvalidArgument | Code::ResourceExhausted
            ) =>
        {
            Outcome::Failed {
                code: format!("{:?}", status.code()),
                message: status.message().to_string(),
            }
        }
        Err(status) => Outcome::Unknown {
            reason: format!("{:?}: {}", status.code(), status.message()),
        },
    }
}

fn lookup_outcome(result: Result<ktd_client::VerifiedLookup, ClientError>) -> Outcome {
    match result {
        Ok(found) => Outcome::Found {
            epoch: found.at.epoch,
            root: hex::encode(found.at.root_hash),
            value: hex::encode(&found.value),
            version: found.version,
            value_epoch: found.epoch,
            verified: true,
        },
        Err(ClientError::Refused { status, .. }) if status.code() == Code::NotFound => {
            Outcome::Absent { epoch: None }
        }
        Err(ClientError::Refused { status, .. }) => Outcome::Unknown {
            reason: format!("{:?}: {}", status.code(), status.message()),
        },
        // A proof that does not verify, or an answer that is not one.
        Err(error) => Outcome::Unverified {
            reason: error.to_string(),
        },
    }
}

fn timed_out(limit: Duration) -> Outcome {
    Outcome::Unknown {
        reason: format!("no answer within {limit:?}"),
    }
}

/// Runs the clients and the epoch poller against the gateway at `url` until `stop` is set.
/// Connection failures are retried (the gateway may be down); they are not operations.
pub async fn run(
    url: String,
    options: WorkloadOptions,
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
) {
    let mut tasks = Vec::new();
    for client_id in 0..=options.clients {
        let url = url.clone();
        let options = options.clone();
        let recorder = recorder.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let Some(client) = connect(&url, &stop).await else {
                return;
            };
            if client_id == 0 {
                poll_epochs(&client, &options, &recorder, &stop).await;
            } else {
                client_loop(client_id, &client, &options, &recorder, &stop).await;
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}

async fn connect(url: &str, stop: &AtomicBool) -> Option<Client> {
    while !stop.load(Ordering::Relaxed) {
        if let Ok(Ok(client)) =
            tokio::time::timeout(Duration::from_secs(3), Client::connect(url)).await
        {
            return Some(client);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

async fn poll_epochs(
    client: &Client,
    options: &WorkloadOptions,
    recorder: &Recorder,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Relaxed) {
        let invoke_us = recorder.now_us();
        let outcome = match tokio::time::timeout(options.op_timeout, client.epoch(None)).await {
            Ok(Ok(root)) => Outcome::Epoch {
                epoch: root.epoch,
                root: hex::encode(root.root_hash),
            },
            Ok(Err(error)) => Outcome::Unknown {
                reason: format!("{error:#}"),
            },
            Err(_) => timed_out(options.op_timeout),
        };
        recorder.record(0, "gateway-1", invoke_us, Op::GetEpoch, outcome);
        tokio::time::sleep(options.epoch_poll).await;
    }
}

async fn client_loop(
    client_id: u32,
    client: &Client,
    options: &WorkloadOptions,
    recorder: &Recorder,
    stop: &AtomicBool,
) {
    let mut rng = StdRng::seed_from_u64(options.seed ^ (u64::from(client_id) << 32));
    let mut counter = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let key = key_name(
            &options.key_prefix,
            rng.random_range(0..options.keys.max(1)),
        );
        let invoke_us = recorder.now_us();
        let unknown = if rng.random_bool(options.publish_ratio.clamp(0.0, 1.0)) {
            counter += 1;
            let value = format!("c{client_id}-n{counter}").into_bytes();
            let idempotency_key = format!("{}-c{client_id}-n{counter}", options.run_id);
            let call = client.publish(
                vec![(key.clone().into_bytes(), value.clone())],
                Some(idempotency_key.clone()),
            );
            let outcome = match tokio::time::timeout(options.op_timeout, call).await {
                Ok(result) => publish_outcome(result),
                Err(_) => timed_out(options.op_timeout),
            };
            let op = Op::Publish {
                key,
                value: hex::encode(&value),
                idempotency_key,
            };
            let unknown = matches!(outcome, Outcome::Unknown { .. });
            recorder.record(client_id, "gateway-1", invoke_us, op, outcome);
            unknown
        } else {
            let call = client.lookup(key.as_bytes(), None);
            let outcome = match tokio::time::timeout(options.op_timeout, call).await {
                Ok(result) => lookup_outcome(result),
                Err(_) => timed_out(options.op_timeout),
            };
            let unknown = matches!(outcome, Outcome::Unknown { .. });
            recorder.record(
                client_id,
                "gateway-1",
                invoke_us,
                Op::Lookup { key },
                outcome,
            );
            unknown
        };
        // Back off a little after failures so that a down cluster is not hammered.
        if unknown {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Why the final state could not be read (the cluster did not heal in time, or the harness
/// could not talk to it).
#[derive(Debug, thiserror::Error)]
pub enum FinalStateError {
    /// The cluster did not commit the last acknowledged epoch within the bound.
    #[error("epoch {epoch} (the last acknowledged one) was not committed within {limit:?}: {last}")]
    NotHealed {
        /// The epoch waited for.
        epoch: u64,
        /// The bound.
        limit: Duration,
        /// The last error.
        last: String,
    },
    /// A final read failed with a transport or server error.
    #[error("final read {what}: {error}")]
    Read {
        /// Which read.
        what: String,
        /// The error.
        error: String,
    },
}

/// Reads the final state through `client` after healing: waits (bounded by `limit`) until the
/// highest acknowledged epoch is committed, then reads the latest epoch, every key's complete
/// verified history, every epoch's root and the append-only proofs of every step.
pub async fn read_final_state(
    client: &Client,
    history: &History,
    key_prefix: &str,
    keys: u32,
    limit: Duration,
) -> Result<FinalState, FinalStateError> {
    let target = history
        .events
        .iter()
        .filter_map(|event| match event.outcome {
            Outcome::Published { epoch, .. } => Some(epoch),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let started = Instant::now();
    let latest = loop {
        let last = match tokio::time::timeout(Duration::from_secs(5), client.epoch(None)).await {
            Ok(Ok(root)) if root.epoch >= target => break root.epoch,
            Ok(Ok(root)) => format!("latest committed epoch is {}", root.epoch),
            Ok(Err(error)) => format!("{error:#}"),
            Err(_) => "GetEpoch timed out".into(),
        };
        if started.elapsed() > limit {
            return Err(FinalStateError::NotHealed {
                epoch: target,
                limit,
                last,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let read_error = |what: String| {
        move |error: ClientError| FinalStateError::Read {
            what,
            error: error.to_string(),
        }
    };
    let mut state = FinalState {
        epoch: latest,
        ..FinalState::default()
    };
    for index in 0..keys {
        let key = key_name(key_prefix, index);
        match client.history(key.as_bytes(), 0, Some(latest)).await {
            Ok((_, versions)) => {
                state.histories.insert(
                    key,
                    versions
                        .into_iter()
                        .map(|v| (hex::encode(&v.value), v.version, v.epoch))
                        .collect(),
                );
            }
            Err(error) if error.is_not_found() => {}
            Err(error @ ClientError::Refused { .. }) => {
                return Err(read_error(format!("history of {key}"))(error));
            }
            // A proof that does not verify, or an answer that is not one.
            Err(error) => state.unverified.push(format!("history of {key}: {error}")),
        }
    }
    for epoch in 1..=latest {
        let root = client
            .epoch(Some(epoch))
            .await
            .map_err(read_error(format!("root of epoch {epoch}")))?;
        state.roots.push((
            epoch,
            hex::encode(root.root_hash),
            "gateway-1 (final GetEpoch)".into(),
        ));
    }
    if latest > 0 {
        match client.audit(0, latest).await {
            Ok(audit) => {
                state.audits = (0..latest).map(|epoch| (epoch, true)).collect();
                for root in audit.roots {
                    state.roots.push((
                        root.epoch,
                        hex::encode(root.root_hash),
                        "gateway-1 (final audit)".into(),
                    ));
                }
            }
            Err(error @ ClientError::Refused { .. }) => {
                return Err(read_error(format!("audit 0..{latest}"))(error));
            }
            // Find the step that breaks.
            Err(_) => {
                for epoch in 0..latest {
                    let ok = client.audit(epoch, epoch + 1).await.is_ok();
                    state.audits.push((epoch, ok));
                }
            }
        }
    }
    Ok(state)
}

/// Counts of what the clients did, for reports.
pub fn op_counts(history: &History) -> BTreeMap<&'static str, u64> {
    let mut counts = BTreeMap::new();
    for event in &history.events {
        let name = match (&event.op, &event.outcome) {
            (Op::Publish { .. }, Outcome::Published { .. }) => "publish ok",
            (Op::Publish { .. }, Outcome::Failed { .. }) => "publish failed",
            (Op::Publish { .. }, _) => "publish unknown",
            (Op::Lookup { .. }, Outcome::Found { .. }) => "lookup found",
            (Op::Lookup { .. }, Outcome::Absent { .. }) => "lookup absent",
            (Op::Lookup { .. }, Outcome::Unverified { .. }) => "lookup unverified",
            (Op::Lookup { .. }, _) => "lookup unknown",
            (Op::GetEpoch, Outcome::Epoch { .. }) => "get-epoch ok",
            (Op::GetEpoch, _) => "get-epoch unknown",
        };
        *counts.entry(name).or_default() += 1;
    }
    counts
}
