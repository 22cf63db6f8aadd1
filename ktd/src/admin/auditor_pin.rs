//! `ktd admin retention follow-auditor`: the history pin of a registered auditor, so that
//! pruning never outruns the slowest auditor the operator registered (issue 17, ADR 0003).
//!
//! An auditor that has verified epoch `E` next fetches the audit blob `E → E + 1`, which is
//! built from the trees of both epochs: the pin `auditor-<name>` (owner
//! [`AUDITOR_PIN_OWNER`]) keeps `E` readable. One process per registered auditor (a systemd
//! unit or a sidecar) asks it every `--interval` and renews the pin for `--hold-for`; the
//! safe epoch is then at most the smallest of those pins — the slowest auditor.
//!
//! **Invariants.**
//! - The pin moves only on a head that verifies: signed by the key the auditor announces, for
//!   its namespace and the epoch it names, with the root the cluster committed at that epoch. A
//!   different root is a fork (the auditor follows another directory, or one side is lying) and
//!   an auditor that reports violations has found one: in both cases the pin stays where it was,
//!   holding the history the dispute is about, and the round fails loudly.
//! - The pin never asks for an epoch below the safe epoch (the sequencer refuses that); an
//!   auditor already behind the window is pinned at the safe epoch and reported as
//!   `behind_window` — its missing blobs must come from a blob archive (`ktd audit-blobs`).
//! - An auditor that cannot be reached leaves the pin where it is until `--hold-for` passes
//!   after the last good round; a renewal at the same epoch keeps the pin's `created_at_ms`
//!   ([`ktd_core::retention::Retention::add_pin`]), so a stuck auditor's pin ages into the
//!   stale-pin alert instead of looking new.
//!
//! The decision is pure ([`pin_epoch`]); [`round`] is the IO around it.

use std::time::Duration;

use ktd_proto::ktd::auditor::v1 as apb;
use sequencer::SequencerClient;
use serde::Serialize;

use super::AdminError;

/// The owner of an auditor's pin.
pub const AUDITOR_PIN_OWNER: &str = "auditor";

/// What `follow-auditor` does.
#[derive(Debug, clap::Args)]
pub struct FollowOptions {
    /// The auditor's gRPC address (`ktd auditor --listen`), `http://HOST:PORT`.
    #[arg(long)]
    pub auditor: String,
    /// The name in the pin's id (`auditor-<name>`); default: the auditor's namespace.
    #[arg(long)]
    pub name: Option<String>,
    /// How often to ask the auditor.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// How long the pin lasts after the last good round (an auditor gone for longer stops
    /// holding history: the pin expires and is counted in `ktd_retention_pins_expired_total`).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub hold_for: Duration,
    /// One round, then exit (non-zero if it failed): for cron or a check.
    #[arg(long)]
    pub once: bool,
    /// Remove the auditor's pin and exit (the auditor is no longer registered).
    #[arg(long, conflicts_with = "once")]
    pub release: bool,
}

/// What the auditor told us, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// Its newest verified epoch (0: none yet).
    pub last_verified_epoch: u64,
    /// The violations it reports having found.
    pub violations: Vec<String>,
    /// The root its signed head for `last_verified_epoch` names, and the root the cluster
    /// committed at that epoch (`None` when nothing is verified yet).
    pub roots: Option<([u8; 32], Vec<u8>)>,
}

/// Why a round leaves the pin where it is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Hold {
    /// The auditor signed a different root than the cluster committed.
    #[error(
        "FORK: the auditor signed epoch {epoch} with root {signed}, the cluster committed \
         {committed}; the pin stays where it is and holds the history in dispute"
    )]
    Fork {
        /// The epoch.
        epoch: u64,
        /// The auditor's root, hex.
        signed: String,
        /// The cluster's root, hex.
        committed: String,
    },
    /// The auditor reports violations.
    #[error(
        "the auditor reports {} violations (the first: {}); the pin stays where it is and \
         holds the history they concern",
        .0.len(),
        .0.first().map_or("", String::as_str)
    )]
    Violations(Vec<String>),
}

/// Where the auditor's pin goes when the safe epoch is `safe_epoch`: its newest verified epoch,
/// never below the safe epoch; the safe epoch when it has verified nothing yet.
pub fn pin_epoch(observed: &Observed, safe_epoch: u64) -> Result<u64, Hold> {
    if !observed.violations.is_empty() {
        return Err(Hold::Violations(observed.violations.clone()));
    }
    if let Some((signed, committed)) = &observed.roots
        && signed.as_slice() != committed.as_slice()
    {
        return Err(Hold::Fork {
            epoch: observed.last_verified_epoch,
            signed: hex::encode(signed),
            committed: hex::encode(committed),
        });
    }
    Ok(observed.last_verified_epoch.max(safe_epoch))
}

/// One round's outcome (`-o json`: one object per line).
#[derive(Clone, Debug, Serialize)]
pub struct PinReport {
    /// The pin's id.
    pub id: String,
    /// The auditor's address.
    pub auditor: String,
    /// Its namespace.
    pub namespace: String,
    /// Its newest verified epoch (0: none).
    pub last_verified_epoch: u64,
    /// The epoch the pin now holds.
    pub pin_epoch: u64,
    /// The cluster's safe epoch before the round.
    pub safe_epoch: u64,
    /// Whether the auditor's next epoch was already pruned when it was pinned.
    pub behind_window: bool,
    /// When the pin lapses unless renewed (ms since the Unix epoch).
    pub expires_at_ms: u64,
}

/// The pin id for an auditor called `name`.
pub fn pin_id(name: &str) -> String {
    format!("auditor-{name}")
}

/// Asks the auditor, checks its head against the cluster and renews its pin.
pub async fn round(
    client: &SequencerClient,
    options: &FollowOptions,
) -> Result<PinReport, AdminError> {
    let address = options.auditor.as_str();
    let refused = |message: String| AdminError::Refused(format!("auditor {address}: {message}"));
    let (mut auditor, info) = super::backup::connect_auditor(address).await?;
    let id = pin_id(options.name.as_deref().unwrap_or(&info.namespace));
    let mut observed = Observed {
        last_verified_epoch: info.last_verified_epoch,
        violations: info.violations.clone(),
        roots: None,
    };
    if info.violations.is_empty() && info.last_verified_epoch > 0 {
        let epoch = info.last_verified_epoch;
        let head = auditor
            .get_head(apb::GetHeadRequest { epoch: Some(epoch) })
            .await
            .map_err(|status| refused(status.message().to_owned()))?
            .into_inner();
        let key: [u8; 32] = info
            .public_key
            .as_slice()
            .try_into()
            .map_err(|_| refused("its public key is not 32 bytes".into()))?;
        let (signed_epoch, signed_root) =
            ktd_client::head::verify_head(&key, &info.namespace, &head)
                .map_err(|error| refused(format!("its head for epoch {epoch}: {error}")))?;
        if signed_epoch != epoch {
            return Err(refused(format!(
                "asked for its head of epoch {epoch}, it sent one of epoch {signed_epoch}"
            )));
        }
        let committed = client.get_epoch(Some(epoch)).await?;
        observed.roots = Some((signed_root, committed.root_hash));
    }
    let safe_epoch = client.retention().await?.safe_epoch;
    let epoch = pin_epoch(&observed, safe_epoch).map_err(|hold| refused(hold.to_string()))?;
    let history = super::add_pin(
        client,
        &id,
        AUDITOR_PIN_OWNER,
        epoch,
        options.hold_for,
        format!(
            "auditor {} at {address} verified epoch {}",
            info.namespace, info.last_verified_epoch
        ),
    )
    .await?;
    let expires_at_ms = history
        .pins
        .iter()
        .find(|pin| pin.id == id)
        .map_or(0, |pin| pin.expires_at_ms);
    Ok(PinReport {
        id,
        auditor: address.to_owned(),
        namespace: info.namespace,
        last_verified_epoch: info.last_verified_epoch,
        pin_epoch: epoch,
        safe_epoch,
        behind_window: info.last_verified_epoch > 0 && info.last_verified_epoch < safe_epoch,
        expires_at_ms,
    })
}

/// Removes the auditor's pin; its id.
pub async fn release(
    client: &SequencerClient,
    options: &FollowOptions,
) -> Result<String, AdminError> {
    let id = match &options.name {
        Some(name) => pin_id(name),
        None => pin_id(
            &super::backup::connect_auditor(&options.auditor)
                .await?
                .1
                .namespace,
        ),
    };
    super::remove_pin(client, &id).await?;
    Ok(id)
}

/// Rounds every `--interval` until `stop` (or one with `--once`), each printed by `print`. A
/// failed round is reported and the next one tried; with `--once` it is the result.
pub async fn follow(
    client: &SequencerClient,
    options: &FollowOptions,
    stop: impl std::future::Future<Output = ()>,
    mut print: impl FnMut(&PinReport),
) -> Result<(), AdminError> {
    if options.once {
        let report = round(client, options).await?;
        print(&report);
        return Ok(());
    }
    tokio::pin!(stop);
    let mut last_epoch = None;
    loop {
        match round(client, options).await {
            Ok(report) => {
                if last_epoch != Some(report.pin_epoch) {
                    tracing::info!(
                        pin = %report.id,
                        epoch = report.pin_epoch,
                        behind_window = report.behind_window,
                        "auditor pin moved"
                    );
                }
                last_epoch = Some(report.pin_epoch);
                print(&report);
            }
            Err(error) => {
                tracing::error!(auditor = %options.auditor, %error, "auditor pin not renewed");
                eprintln!("{error}");
            }
        }
        tokio::select! {
            () = &mut stop => return Ok(()),
            () = tokio::time::sleep(options.interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(epoch: u64, violations: usize, signed: u8, committed: u8) -> Observed {
        Observed {
            last_verified_epoch: epoch,
            violations: vec!["epoch 7 is not append-only".into(); violations],
            roots: (epoch > 0).then(|| ([signed; 32], vec![committed; 32])),
        }
    }

    #[test]
    fn the_pin_holds_the_newest_verified_epoch_never_below_the_safe_epoch() {
        assert_eq!(pin_epoch(&observed(40, 0, 1, 1), 10), Ok(40));
        assert_eq!(
            pin_epoch(&observed(4, 0, 1, 1), 10),
            Ok(10),
            "behind the window"
        );
        assert_eq!(
            pin_epoch(&observed(0, 0, 0, 0), 10),
            Ok(10),
            "nothing verified yet"
        );
    }

    #[test]
    fn a_fork_or_a_violation_leaves_the_pin_where_it_is() {
        let fork = pin_epoch(&observed(40, 0, 1, 2), 10).expect_err("a fork");
        assert!(matches!(&fork, Hold::Fork { epoch: 40, .. }), "{fork}");
        assert!(fork.to_string().starts_with("FORK"), "{fork}");
        let violations = pin_epoch(&observed(40, 3, 1, 1), 10).expect_err("violations");
        assert!(
            violations.to_string().starts_with(
                "the auditor reports 3 violations (the first: epoch 7 is not append-only)"
            ),
            "{violations}"
        );
    }
}
