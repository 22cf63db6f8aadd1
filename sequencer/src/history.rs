//! History retention in the sequencer (`shard/docs/0003-retention-backup-recovery.md`): the
//! replicated record's wire form, its one transition ([`apply`], called by the state machine),
//! and the leader's loop that drops expired pins and moves `safe_epoch` up ([`run`]).
//!
//! The record itself and its rules are [`ktd_core::retention`]: pure, shared with the gateway
//! and the shards. What reaches the shards is `safe_epoch` in every fence the coordinator
//! sends; what reaches gateways is `safe_epoch` in `GetClusterMetadata`.
//!
//! **Bounded input.** A pin id is at most 128 bytes, its owner 64 and its reason 256, and the
//! record holds at most [`MAX_PINS`] pins: an operator or a buggy tool cannot grow the
//! replicated state without bound.

use std::time::Duration;

use ktd_core::retention::{Pin, Retention, Window};
use tokio_util::sync::CancellationToken;

use crate::node::{Sequencer, unix_ms};
use crate::pb;

/// The most pins the record holds at once (the record is re-encoded with the state machine's
/// metadata on every apply: 64 pins of the largest size are about 45 KiB).
pub const MAX_PINS: usize = 64;
/// How often the leader re-checks pins and the window.
pub const ADVANCE_PERIOD: Duration = Duration::from_secs(1);
/// The smallest time window (a shorter one is refused).
pub const MIN_WINDOW_MS: u64 = 1_000;

/// The wire form of a window.
pub fn window_to_pb(window: Window) -> pb::RetentionWindow {
    use pb::retention_window::Kind;
    pb::RetentionWindow {
        kind: Some(match window {
            Window::Forever => Kind::Forever(true),
            Window::Epochs(epochs) => Kind::Epochs(epochs),
            Window::Millis(millis) => Kind::Millis(millis),
        }),
    }
}

/// A window from its wire form; refuses an empty one, a window of 0 epochs and one shorter
/// than a second.
pub fn window_from_pb(window: &pb::RetentionWindow) -> Result<Window, String> {
    use pb::retention_window::Kind;
    match window.kind {
        Some(Kind::Forever(true)) => Ok(Window::Forever),
        Some(Kind::Epochs(epochs)) if epochs >= 1 => Ok(Window::Epochs(epochs)),
        Some(Kind::Epochs(_)) => Err("a window keeps at least 1 epoch".into()),
        Some(Kind::Millis(millis)) if millis >= MIN_WINDOW_MS => Ok(Window::Millis(millis)),
        Some(Kind::Millis(millis)) => Err(format!(
            "a time window of {millis} ms is shorter than the minimum {MIN_WINDOW_MS} ms"
        )),
        Some(Kind::Forever(false)) | None => Err("the window is empty".into()),
    }
}

/// The wire form of the record.
pub fn to_pb(retention: &Retention) -> pb::HistoryRetention {
    pb::HistoryRetention {
        window: Some(window_to_pb(retention.window)),
        pins: retention
            .pins
            .iter()
            .map(|(id, pin)| pb::HistoryPin {
                id: id.clone(),
                owner: pin.owner.clone(),
                epoch: pin.epoch,
                expires_at_ms: pin.expires_at_ms,
                reason: pin.reason.clone(),
                created_at_ms: pin.created_at_ms,
            })
            .collect(),
        safe_epoch: retention.safe_epoch,
    }
}

/// The record from its wire form (the state machine's own metadata: an absent or malformed
/// window is the default).
pub fn from_pb(history: Option<&pb::HistoryRetention>) -> Retention {
    let Some(history) = history else {
        return Retention::default();
    };
    Retention {
        window: history
            .window
            .as_ref()
            .and_then(|window| window_from_pb(window).ok())
            .unwrap_or(ktd_core::retention::DEFAULT_WINDOW),
        pins: history
            .pins
            .iter()
            .map(|pin| {
                (
                    pin.id.clone(),
                    Pin {
                        owner: pin.owner.clone(),
                        epoch: pin.epoch,
                        expires_at_ms: pin.expires_at_ms,
                        reason: pin.reason.clone(),
                        created_at_ms: pin.created_at_ms,
                    },
                )
            })
            .collect(),
        safe_epoch: history.safe_epoch,
    }
}

/// Applies one retention command to `retention` under head `head` (the latest committed
/// epoch). `Err` is the refusal's message; nothing changed then.
pub fn apply(
    retention: &mut Retention,
    head: u64,
    command: &pb::RetentionCommand,
) -> Result<(), String> {
    use pb::retention_command::Kind;
    let now = command.now_ms;
    match &command.kind {
        Some(Kind::SetWindow(window)) => {
            retention.window = window_from_pb(window)?;
            Ok(())
        }
        Some(Kind::AddPin(pin)) => {
            check_text("pin id", &pin.id, 1, 128)?;
            check_text("pin owner", &pin.owner, 1, 64)?;
            check_text("pin reason", &pin.reason, 0, 256)?;
            if !retention.pins.contains_key(&pin.id) && retention.pins.len() >= MAX_PINS {
                return Err(format!(
                    "{MAX_PINS} pins already hold history; release one first"
                ));
            }
            if pin.epoch > head {
                return Err(format!(
                    "pin epoch {} is not committed (the latest committed epoch is {head})",
                    pin.epoch
                ));
            }
            retention
                .add_pin(
                    &pin.id,
                    Pin {
                        owner: pin.owner.clone(),
                        epoch: pin.epoch,
                        expires_at_ms: pin.expires_at_ms,
                        reason: pin.reason.clone(),
                        created_at_ms: now,
                    },
                    now,
                )
                .map_err(|error| error.to_string())
        }
        Some(Kind::RemovePin(id)) => {
            retention.remove_pin(id);
            Ok(())
        }
        Some(Kind::AdvanceSafeEpoch(epoch)) => retention
            .advance(*epoch, head, now)
            .map_err(|error| error.to_string()),
        None => Err("empty retention command".into()),
    }
}

fn check_text(what: &str, text: &str, min: usize, max: usize) -> Result<(), String> {
    if text.len() < min {
        return Err(format!("the {what} is empty"));
    }
    if text.len() > max {
        return Err(format!(
            "the {what} is {} bytes, more than {max}",
            text.len()
        ));
    }
    Ok(())
}

/// The leader's retention loop: every [`ADVANCE_PERIOD`] while this node leads, proposes the
/// removal of expired pins and moves `safe_epoch` to where the window and the live pins allow.
/// The state machine checks the same rules again on every replica.
pub async fn run(sequencer: Sequencer, shutdown: CancellationToken) {
    let leader = sequencer.leader_changes();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(ADVANCE_PERIOD) => {}
        }
        if !leader.borrow().is_self {
            continue;
        }
        if let Err(error) = advance_once(&sequencer).await {
            tracing::debug!(%error, "history retention not advanced this round");
        }
    }
}

/// One round of [`run`].
async fn advance_once(sequencer: &Sequencer) -> crate::error::Result<()> {
    let epochs = sequencer.state().borrow().epochs();
    if epochs.metadata.is_none() {
        return Ok(());
    }
    let retention = &epochs.history;
    let now = unix_ms();
    for id in retention.expired_pins(now) {
        tracing::info!(pin = %id, "a history pin expired; removing it");
        metrics::counter!("ktd_retention_pins_expired_total").increment(1);
        sequencer
            .update_retention(pb::RetentionCommand {
                kind: Some(pb::retention_command::Kind::RemovePin(id)),
                now_ms: now,
            })
            .await?;
    }
    let head = epochs.last_committed_epoch;
    let committed_before = match retention.window {
        Window::Millis(keep) => {
            newest_committed_before(
                sequencer,
                retention.safe_epoch,
                head,
                now.saturating_sub(keep),
            )
            .await?
        }
        _ => 0,
    };
    let target = retention.target(head, now, |_| committed_before);
    if target > retention.safe_epoch {
        sequencer
            .update_retention(pb::RetentionCommand {
                kind: Some(pb::retention_command::Kind::AdvanceSafeEpoch(target)),
                now_ms: now,
            })
            .await?;
        tracing::info!(safe_epoch = target, head, "history retention advanced");
    }
    Ok(())
}

/// The newest epoch in `from..=head` committed at or before `cutoff_ms` (by its record's
/// `committed_at_ms`; leader clocks, so nearly monotonic), or `from` if none is: a binary
/// search over this node's committed records.
async fn newest_committed_before(
    sequencer: &Sequencer,
    from: u64,
    head: u64,
    cutoff_ms: u64,
) -> crate::error::Result<u64> {
    let (mut low, mut high) = (from, head);
    while low < high {
        let middle = low + (high - low).div_ceil(2);
        let record = sequencer.get_local_epoch(Some(middle)).await?;
        if record.committed_at_ms <= cutoff_ms {
            low = middle;
        } else {
            high = middle - 1;
        }
    }
    Ok(low)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(kind: pb::retention_command::Kind, now_ms: u64) -> pb::RetentionCommand {
        pb::RetentionCommand {
            kind: Some(kind),
            now_ms,
        }
    }

    #[test]
    fn the_record_survives_its_wire_form() {
        let mut retention = Retention {
            window: Window::Epochs(20),
            ..Retention::default()
        };
        apply(
            &mut retention,
            10,
            &command(
                pb::retention_command::Kind::AddPin(pb::HistoryPin {
                    id: "backup-1".into(),
                    owner: "backup".into(),
                    epoch: 4,
                    expires_at_ms: 9_000,
                    reason: "nightly".into(),
                    created_at_ms: 0,
                }),
                1_000,
            ),
        )
        .expect("pin");
        assert_eq!(from_pb(Some(&to_pb(&retention))), retention);
        assert_eq!(retention.pins["backup-1"].created_at_ms, 1_000);
        assert_eq!(from_pb(None), Retention::default());
    }

    #[test]
    fn bad_windows_and_pins_are_refused_with_a_reason() {
        let mut retention = Retention::default();
        use pb::retention_command::Kind;
        let refused = |retention: &mut Retention, kind: Kind| {
            apply(retention, 10, &command(kind, 1_000)).expect_err("refused")
        };
        for window in [
            pb::retention_window::Kind::Epochs(0),
            pb::retention_window::Kind::Millis(10),
            pb::retention_window::Kind::Forever(false),
        ] {
            let message = refused(
                &mut retention,
                Kind::SetWindow(pb::RetentionWindow { kind: Some(window) }),
            );
            assert!(!message.is_empty());
        }
        let pin = |id: &str, epoch: u64| pb::HistoryPin {
            id: id.into(),
            owner: "operator".into(),
            epoch,
            expires_at_ms: 60_000,
            reason: String::new(),
            created_at_ms: 0,
        };
        assert!(refused(&mut retention, Kind::AddPin(pin("", 1))).contains("empty"));
        assert!(refused(&mut retention, Kind::AddPin(pin(&"x".repeat(129), 1))).contains("128"));
        assert!(refused(&mut retention, Kind::AddPin(pin("future", 11))).contains("not committed"));
        for index in 0..MAX_PINS {
            apply(
                &mut retention,
                10,
                &command(Kind::AddPin(pin(&format!("p{index}"), 1)), 1_000),
            )
            .expect("room for a pin");
        }
        assert!(refused(&mut retention, Kind::AddPin(pin("one-more", 1))).contains("release"));
        assert_eq!(retention, from_pb(Some(&to_pb(&retention))));
    }
}
