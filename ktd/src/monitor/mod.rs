//! `ktd monitor`: a key owner watches its own labels.
//!
//! Every round (each new epoch, or `--interval`) the monitor:
//! 1. reads the directory's newest epoch from the gateway (`--addr`), and the root of every
//!    epoch since its last round, and re-reads the root it recorded last: a recorded epoch with
//!    another root is a **history rewrite**, an epoch the directory no longer serves between
//!    two it does is a **missing epoch**;
//! 2. compares that root with every other gateway (`--also-gateway`) at the newest epoch both
//!    serve, and with the auditor's newest signed head (`--auditor`, the signature checked with
//!    its key): a different root is a **fork**;
//! 3. fetches each watched label's complete history at that epoch, verified by the strict
//!    verifier against that root (an absent label by a verified absence proof): a proof that
//!    does not verify is a **verification failure** — a forged or broken answer, never read as
//!    a key change;
//! 4. compares each history with what it saw before ([`check::judge_history`]): a version seen
//!    before that is gone or changed is a **history rewrite**; a new version is checked against
//!    the key owner's expectations (`--expect FILE`, re-read every round, or
//!    `--expect-command`), and one not expected is an **unexpected key change**;
//! 5. fsyncs its state (`--state FILE`: each label's versions, the recorded roots) before it
//!    reports, so a restart neither forgets nor repeats.
//!
//! Reports: a log line per alarm (`ERROR`), `ktd_monitor_alarms_total{kind}` on
//! `--metrics-listen`, a JSON POST to `--webhook`, and with `--once` the exit status (0 clean,
//! 1 an alarm). With nothing recorded yet, the first round takes what it finds as the baseline
//! (trust on first use) unless `--strict-first-round`.

pub mod check;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use ktd_client::{Client, ClientError};
use serde::{Deserialize, Serialize};

use check::{Alarm, SeenVersion};

/// How many recorded roots the state keeps (the newest).
pub const ROOTS_KEPT: usize = 4096;
/// At most this many epochs' roots are read in one round (a monitor far behind catches up
/// over several rounds, epoch by epoch).
const EPOCHS_PER_ROUND: u64 = 256;

/// `ktd monitor` options.
#[derive(Clone, Debug, clap::Args)]
pub struct MonitorArgs {
    /// A label to watch (repeatable; UTF-8, or `hex:…`).
    #[arg(long = "label", value_name = "LABEL")]
    pub labels: Vec<String>,
    /// A file of labels to watch, one per line (`#` comments; UTF-8 or `hex:…`).
    #[arg(long)]
    pub labels_file: Option<PathBuf>,
    /// Where the monitor keeps what it has seen (a JSON file, written atomically with fsync).
    #[arg(long)]
    pub state: PathBuf,
    /// Expected values: lines `LABEL VALUE` (UTF-8 or `hex:…`), re-read every round; a new
    /// version whose value is listed for its label is expected.
    #[arg(long)]
    pub expect: Option<PathBuf>,
    /// A command asked about each new version: run as `CMD LABEL VERSION VALUE_HEX`; exit 0
    /// means expected.
    #[arg(long)]
    pub expect_command: Option<String>,
    /// Another gateway to compare roots with (repeatable).
    #[arg(long = "also-gateway", value_name = "URL")]
    pub also_gateways: Vec<String>,
    /// A `ktd auditor` (gRPC) whose signed heads must match the directory's roots.
    #[arg(long)]
    pub auditor: Option<String>,
    /// The auditor's Ed25519 public key (hex) the monitor trusts (default: the one it
    /// announces).
    #[arg(long, requires = "auditor")]
    pub auditor_key: Option<String>,
    /// POST each alarm as JSON to this URL.
    #[arg(long)]
    pub webhook: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Longest wait between rounds (a round also starts when a new epoch commits).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// One round, then exit: 0 clean, 1 an alarm.
    #[arg(long)]
    pub once: bool,
    /// With nothing recorded for a label, report its versions instead of taking them as the
    /// baseline.
    #[arg(long)]
    pub strict_first_round: bool,
}

/// What the monitor keeps between rounds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorState {
    /// The newest epoch checked.
    pub epoch: u64,
    /// Recorded roots (hex), the newest [`ROOTS_KEPT`].
    pub roots: BTreeMap<u64, String>,
    /// Each label's versions, as seen verified.
    pub labels: BTreeMap<String, Vec<SeenVersion>>,
}

impl MonitorState {
    /// Reads the state file (a missing file is a fresh state).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a ktd monitor state file", path.display())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(error) => Err(error).with_context(|| format!("read {}", path.display())),
        }
    }

    /// Writes the state file atomically and durably (temp file, fsync, rename, fsync dir).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        use std::io::Write;
        let bytes = serde_json::to_vec_pretty(self)?;
        let dir = path
            .parent()
            .filter(|dir| !dir.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let temp = path.with_extension("tmp");
        let mut file =
            std::fs::File::create(&temp).with_context(|| format!("create {}", temp.display()))?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path).with_context(|| format!("rename to {}", path.display()))?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    }
}

/// A label or value as written on the command line or in a file: UTF-8, or `hex:…`.
pub fn parse_bytes(text: &str) -> anyhow::Result<Vec<u8>> {
    match text.strip_prefix("hex:") {
        Some(hex) => hex::decode(hex).with_context(|| format!("{text:?} is not hex")),
        None => Ok(text.as_bytes().to_vec()),
    }
}

/// Reads the expectations file: `LABEL VALUE` lines → label bytes → allowed values.
pub fn parse_expectations(text: &str) -> anyhow::Result<BTreeMap<Vec<u8>, Vec<Vec<u8>>>> {
    let mut expected: BTreeMap<Vec<u8>, Vec<Vec<u8>>> = BTreeMap::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (label, value) = line
            .split_once(char::is_whitespace)
            .with_context(|| format!("line {}: expected `LABEL VALUE`", number + 1))?;
        expected
            .entry(parse_bytes(label)?)
            .or_default()
            .push(parse_bytes(value.trim())?);
    }
    Ok(expected)
}

fn watched_labels(args: &MonitorArgs) -> anyhow::Result<Vec<String>> {
    let mut labels = args.labels.clone();
    if let Some(path) = &args.labels_file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        labels.extend(
            text.lines()
                .map(str::trim)
                .filter(|line| !line.is_empty() && !line.starts_with('#'))
                .map(String::from),
        );
    }
    labels.sort();
    labels.dedup();
    if labels.is_empty() {
        anyhow::bail!("nothing to watch: give --label LABEL or --labels-file FILE");
    }
    for label in &labels {
        parse_bytes(label)?;
    }
    Ok(labels)
}

/// A client error that is the answer's fault (a forged or broken proof), not the network's.
fn is_verification(error: &ClientError) -> bool {
    matches!(
        error,
        ClientError::Verification { .. } | ClientError::Malformed { .. }
    )
}

/// The monitor's connections and settings.
pub struct Monitor {
    addr: String,
    client: Client,
    others: Vec<(String, Client)>,
    auditor: Option<String>,
    labels: Vec<String>,
    args: MonitorArgs,
    http: Option<reqwest::Client>,
}

impl Monitor {
    /// Connects to the gateways.
    pub async fn connect(addr: &str, client: Client, args: MonitorArgs) -> anyhow::Result<Self> {
        let labels = watched_labels(&args)?;
        let mut others = Vec::new();
        for addr in &args.also_gateways {
            others.push((addr.clone(), Client::connect(addr).await?));
        }
        let http = match &args.webhook {
            Some(_) => Some(
                reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .context("webhook client")?,
            ),
            None => None,
        };
        Ok(Self {
            addr: addr.to_string(),
            client,
            others,
            auditor: args.auditor.clone(),
            labels,
            args,
            http,
        })
    }

    async fn expectation(
        &self,
        label: &str,
        expected: &BTreeMap<Vec<u8>, Vec<Vec<u8>>>,
        version: &SeenVersion,
    ) -> anyhow::Result<bool> {
        let value = hex::decode(&version.value)?;
        if expected
            .get(&parse_bytes(label)?)
            .is_some_and(|values| values.contains(&value))
        {
            return Ok(true);
        }
        let Some(command) = &self.args.expect_command else {
            return Ok(false);
        };
        let status = tokio::process::Command::new(command)
            .arg(label)
            .arg(version.version.to_string())
            .arg(&version.value)
            .stdin(std::process::Stdio::null())
            .status()
            .await
            .with_context(|| format!("run --expect-command {command}"))?;
        Ok(status.success())
    }

    /// One round: every check, the state saved, the alarms returned (not yet reported).
    pub async fn round(&self, state: &mut MonitorState) -> anyhow::Result<Vec<Alarm>> {
        let mut alarms = Vec::new();
        let head = self.client.epoch(None).await?;
        let head_root = hex::encode(head.root_hash);
        // 1. The directory's own epochs since the last round, and the last one recorded.
        let mut served = BTreeMap::new();
        let (to_read, checked) = check::epochs_to_read(state.epoch, head.epoch, EPOCHS_PER_ROUND);
        for epoch in to_read {
            let answer = match self.client.epoch(Some(epoch)).await {
                Ok(root) => Ok(hex::encode(root.root_hash)),
                Err(ClientError::Refused { status, .. })
                    if status.code() == tonic::Code::NotFound =>
                {
                    Err(format!(
                        "the directory does not serve it: {}",
                        status.message()
                    ))
                }
                Err(ClientError::Refused { status, .. })
                    if status.code() == tonic::Code::OutOfRange =>
                {
                    continue; // older than the directory's retention window
                }
                Err(error) => return Err(error.into()),
            };
            served.insert(epoch, answer);
        }
        served.insert(head.epoch, Ok(head_root.clone()));
        if head.epoch < state.epoch {
            alarms.push(Alarm::HistoryRewrite {
                label: "-".into(),
                detail: format!(
                    "the directory's newest epoch is {}, but epoch {} was checked before",
                    head.epoch, state.epoch
                ),
            });
        }
        alarms.extend(check::judge_roots(&state.roots, &served));
        // 2. Other gateways and the auditor.
        for (addr, other) in &self.others {
            match self.compare_gateway(other, head.epoch, &head_root).await {
                Ok(Some(alarm)) => alarms.push(Alarm::Fork {
                    epoch: alarm.0,
                    detail: format!(
                        "gateway {addr} serves {}, {} serves {}",
                        alarm.1, self.addr, alarm.2
                    ),
                }),
                Ok(None) => {}
                Err(error) if is_verification(&error) => alarms.push(Alarm::Verification {
                    label: "-".into(),
                    detail: format!("gateway {addr}: {error}"),
                }),
                Err(error) => tracing::warn!(%addr, %error, "another gateway is unreachable"),
            }
        }
        if let Some(auditor) = &self.auditor {
            match self.compare_auditor(auditor, head.epoch).await {
                Ok(Some(alarm)) => alarms.push(alarm),
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(%auditor, error = %error, "the auditor is unreachable")
                }
            }
        }
        let directory_sound = alarms.is_empty();
        // 3–4. The labels, at the head.
        let expected = match &self.args.expect {
            Some(path) => parse_expectations(
                &std::fs::read_to_string(path)
                    .with_context(|| format!("read {}", path.display()))?,
            )?,
            None => BTreeMap::new(),
        };
        for label in &self.labels {
            let bytes = parse_bytes(label)?;
            let served = match self.history(&bytes, head.epoch, head.root_hash).await {
                Ok(served) => served,
                Err(error) if is_verification(&error) => {
                    alarms.push(Alarm::Verification {
                        label: label.clone(),
                        detail: error.to_string(),
                    });
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            let seen = state.labels.get(label).cloned().unwrap_or_default();
            let first_sight = !state.labels.contains_key(label) && !self.args.strict_first_round;
            let mut answers = Vec::new();
            for version in &served {
                answers.push(self.expectation(label, &expected, version).await?);
            }
            let mut answer = answers.into_iter();
            let verdict = check::judge_history(label, &seen, &served, first_sight, |_| {
                answer.next().unwrap_or(false)
            });
            for version in &verdict.expected {
                tracing::info!(
                    label,
                    version = version.version,
                    epoch = version.epoch,
                    "an expected new version"
                );
            }
            alarms.extend(verdict.alarms);
            state.labels.insert(label.clone(), verdict.seen);
        }
        // 5. Record what was checked (roots only when the directory's own history held).
        if directory_sound {
            for (epoch, answer) in served {
                if let Ok(root) = answer {
                    state.roots.insert(epoch, root);
                }
            }
            while state.roots.len() > ROOTS_KEPT {
                state.roots.pop_first();
            }
            state.epoch = checked;
        }
        let path = self.args.state.clone();
        let snapshot = state.clone();
        tokio::task::spawn_blocking(move || snapshot.save(&path)).await??;
        Ok(alarms)
    }

    /// A label's verified versions at `epoch` (whose root must be `root`).
    async fn history(
        &self,
        label: &[u8],
        epoch: u64,
        root: [u8; 32],
    ) -> Result<Vec<SeenVersion>, ClientError> {
        let wrong_root = |at: &ktd_client::EpochRoot| ClientError::Verification {
            what: "history proof",
            reason: format!(
                "asked at epoch {epoch} root {}, answered at epoch {} root {}",
                hex::encode(root),
                at.epoch,
                hex::encode(at.root_hash)
            ),
        };
        match self.client.history(label, 0, Some(epoch)).await {
            Ok((at, versions)) => {
                if at.epoch != epoch || at.root_hash != root {
                    return Err(wrong_root(&at));
                }
                Ok(versions
                    .into_iter()
                    .map(|version| SeenVersion {
                        version: version.version,
                        epoch: version.epoch,
                        value: hex::encode(version.value),
                    })
                    .collect())
            }
            Err(ClientError::Refused { status, .. }) if status.code() == tonic::Code::NotFound => {
                // Never published? Only a verified absence proof says so.
                match self.client.lookup_or_absence(label, Some(epoch)).await? {
                    Err(absent) if absent.at.epoch == epoch && absent.at.root_hash == root => {
                        Ok(Vec::new())
                    }
                    Err(absent) => Err(wrong_root(&absent.at)),
                    Ok(found) => Err(ClientError::Verification {
                        what: "history proof",
                        reason: format!(
                            "the history was refused as not found, but a lookup proves version {}",
                            found.version
                        ),
                    }),
                }
            }
            Err(error) => Err(error),
        }
    }

    /// `Some((epoch, theirs, ours))` if `other` serves another root at the newest epoch both
    /// serve.
    async fn compare_gateway(
        &self,
        other: &Client,
        epoch: u64,
        root: &str,
    ) -> Result<Option<(u64, String, String)>, ClientError> {
        let their_head = other.epoch(None).await?;
        let common = their_head.epoch.min(epoch);
        let theirs = hex::encode(other.epoch(Some(common)).await?.root_hash);
        let ours = if common == epoch {
            root.to_string()
        } else {
            hex::encode(self.client.epoch(Some(common)).await?.root_hash)
        };
        Ok((theirs != ours).then_some((common, theirs, ours)))
    }

    async fn compare_auditor(&self, address: &str, epoch: u64) -> anyhow::Result<Option<Alarm>> {
        use ktd_proto::ktd::auditor::v1 as apb;
        let (mut auditor, info) = crate::admin::backup::connect_auditor(address).await?;
        let wanted = match info.last_verified_epoch {
            0 => return Ok(None),
            latest => latest.min(epoch),
        };
        let key: [u8; 32] =
            info.public_key.as_slice().try_into().map_err(|_| {
                anyhow::anyhow!("auditor {address}: its public key is not 32 bytes")
            })?;
        if let Some(pinned) = &self.args.auditor_key
            && hex::decode(pinned).ok().as_deref() != Some(key.as_slice())
        {
            return Ok(Some(Alarm::Fork {
                epoch: wanted,
                detail: format!(
                    "auditor {address} announces key {}, not the --auditor-key given",
                    hex::encode(key)
                ),
            }));
        }
        let head = auditor
            .get_head(apb::GetHeadRequest {
                epoch: Some(wanted),
            })
            .await
            .map_err(|status| anyhow::anyhow!("auditor {address}: {}", status.message()))?
            .into_inner();
        let (signed_epoch, signed_root) =
            ktd_client::head::verify_head(&key, &info.namespace, &head)
                .map_err(|error| anyhow::anyhow!("auditor {address}: {error}"))?;
        let ours = self.client.epoch(Some(signed_epoch)).await?.root_hash;
        Ok((ours != signed_root).then(|| Alarm::Fork {
            epoch: signed_epoch,
            detail: format!(
                "auditor {address} signed root {}, the directory serves {}",
                hex::encode(signed_root),
                hex::encode(ours)
            ),
        }))
    }

    /// Reports alarms: a log line each, the metric, the webhook.
    pub async fn report(&self, alarms: &[Alarm]) {
        for alarm in alarms {
            tracing::error!(kind = alarm.kind(), label = alarm.label(), "{alarm}");
            println!("{alarm}");
            metrics::counter!("ktd_monitor_alarms_total", "kind" => alarm.kind()).increment(1);
            if let (Some(url), Some(http)) = (&self.args.webhook, &self.http) {
                let body = serde_json::json!({
                    "kind": alarm.kind(),
                    "label": alarm.label(),
                    "message": alarm.to_string(),
                });
                let sent = http
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
                    .await
                    .and_then(reqwest::Response::error_for_status);
                if let Err(error) = sent {
                    tracing::warn!(%url, %error, "the webhook did not take the alarm");
                    metrics::counter!("ktd_monitor_webhook_failures_total").increment(1);
                }
            }
        }
    }
}

/// `ktd monitor`: rounds until interrupted (or one with `--once`). Returns whether the last
/// round raised an alarm.
pub async fn run(addr: &str, client: Client, args: MonitorArgs) -> anyhow::Result<bool> {
    if let Some(addr) = args.metrics_listen {
        crate::telemetry::serve_prometheus(addr)?;
    }
    let monitor = Monitor::connect(addr, client, args.clone()).await?;
    let path = args.state.clone();
    let mut state = tokio::task::spawn_blocking(move || MonitorState::load(&path)).await??;
    loop {
        let alarmed = match monitor.round(&mut state).await {
            Ok(alarms) => {
                monitor.report(&alarms).await;
                metrics::gauge!("ktd_monitor_epoch").set(state.epoch as f64);
                metrics::counter!("ktd_monitor_rounds_total").increment(1);
                if alarms.is_empty() {
                    println!(
                        "epoch {}: {} labels verified, no alarm",
                        state.epoch,
                        monitor.labels.len()
                    );
                }
                !alarms.is_empty()
            }
            Err(error) if !args.once => {
                metrics::counter!("ktd_monitor_round_failures_total").increment(1);
                tracing::warn!(error = %format!("{error:#}"), "monitor round failed; retrying");
                false
            }
            Err(error) => return Err(error),
        };
        if args.once {
            return Ok(alarmed);
        }
        let next = state.epoch + 1;
        let _ = tokio::time::timeout(args.interval, monitor.client.wait_for_epoch(next)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations_and_labels_read_utf8_or_hex() {
        let expected =
            parse_expectations("# comment\nalice key-2\nhex:626f62 hex:00ff\n\nalice key-3\n")
                .expect("parse");
        assert_eq!(
            expected.get(b"alice".as_slice()),
            Some(&vec![b"key-2".to_vec(), b"key-3".to_vec()])
        );
        assert_eq!(expected.get(b"bob".as_slice()), Some(&vec![vec![0, 255]]));
        assert!(parse_expectations("lonely\n").is_err());
        assert!(parse_bytes("hex:zz").is_err());
    }

    #[test]
    fn the_state_file_round_trips_and_a_missing_one_is_fresh() {
        let temp = tempfile::tempdir().expect("temp dir");
        let path = temp.path().join("nested/state.json");
        assert_eq!(
            MonitorState::load(&path).expect("fresh"),
            MonitorState::default()
        );
        let mut state = MonitorState {
            epoch: 7,
            ..Default::default()
        };
        state.roots.insert(7, "ab".into());
        state.labels.insert(
            "alice".into(),
            vec![SeenVersion {
                version: 1,
                epoch: 3,
                value: "00".into(),
            }],
        );
        state.save(&path).expect("save");
        assert_eq!(MonitorState::load(&path).expect("load"), state);
        std::fs::write(&path, b"{").expect("corrupt");
        assert!(
            MonitorState::load(&path).is_err(),
            "a corrupt state is refused, not reset"
        );
    }
}
