//! Wait for a condition, not for time: poll it until it holds, and fail after a deadline with
//! a message that says what was awaited (STYLE §9, "Control time; don't wait for it").
//!
//! [`eventually`] covers the common case (a check returning `Option`, every 50 ms);
//! [`Poll`] sets the interval, adds context to the failure (process logs) and accepts checks
//! returning `Result`, whose last error the failure names.

use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant};

/// How often [`eventually`] checks.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(50);

/// Polls `check` every [`DEFAULT_INTERVAL`] until it returns `Some`, and returns that; fails
/// with "timed out after `limit` waiting for `what`".
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    Poll::new(what, limit).until(check).await
}

/// A poll with options: interval, failure context.
#[must_use = "a Poll does nothing until `until` or `until_ok` is awaited"]
pub struct Poll<'a> {
    what: String,
    limit: Duration,
    every: Duration,
    context: Option<Box<dyn FnOnce() -> String + Send + 'a>>,
}

impl<'a> Poll<'a> {
    /// Waits at most `limit` for `what` (the failure message names it), checking every
    /// [`DEFAULT_INTERVAL`].
    pub fn new(what: impl Into<String>, limit: Duration) -> Self {
        Self {
            what: what.into(),
            limit,
            every: DEFAULT_INTERVAL,
            context: None,
        }
    }

    /// Checks every `interval` instead (a check that starts a process should not run 20 times
    /// a second).
    pub fn every(mut self, interval: Duration) -> Self {
        self.every = interval;
        self
    }

    /// Appends `context()` (e.g. the process logs) to the failure message; called only on
    /// failure.
    pub fn context(mut self, context: impl FnOnce() -> String + Send + 'a) -> Self {
        self.context = Some(Box::new(context));
        self
    }

    /// Polls `check` until it returns `Some`, and returns that.
    pub async fn until<T, F, Fut>(self, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        self.until_ok(move || {
            let attempt = check();
            async move { attempt.await.ok_or(NotYet) }
        })
        .await
    }

    /// Polls `check` until it returns `Ok`, and returns that; the failure names the last
    /// error.
    pub async fn until_ok<T, E, F, Fut>(self, mut check: F) -> T
    where
        E: Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let started = Instant::now();
        loop {
            let error = match check().await {
                Ok(value) => return value,
                Err(error) => error,
            };
            if started.elapsed() >= self.limit {
                self.fail(&error);
            }
            tokio::time::sleep(self.every).await;
        }
    }

    fn fail(self, last: &dyn Display) -> ! {
        let Self {
            what,
            limit,
            context,
            ..
        } = self;
        let last = last.to_string();
        let last = if last.is_empty() {
            String::new()
        } else {
            format!("; last: {last}")
        };
        let context = context
            .map(|context| format!("\n{}", context()))
            .unwrap_or_default();
        panic!("timed out after {limit:?} waiting for {what}{last}{context}");
    }
}

/// The "error" of an `Option` check: nothing to report.
struct NotYet;

impl Display for NotYet {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deadline::with_deadline;

    #[test]
    fn a_condition_that_comes_true_is_returned() {
        with_deadline(Duration::from_secs(10), || async {
            let mut calls = 0;
            let value = eventually("the third call", Duration::from_secs(5), || {
                calls += 1;
                let calls = calls;
                async move { (calls == 3).then_some(calls) }
            })
            .await;
            assert_eq!(value, 3);
            let value = Poll::new("ok", Duration::from_secs(5))
                .every(Duration::from_millis(1))
                .until_ok(|| async { Ok::<_, String>(5) })
                .await;
            assert_eq!(value, 5);
        });
    }

    #[test]
    #[should_panic(expected = "waiting for the impossible; last: still 1\nlogs here")]
    fn a_condition_that_never_holds_fails_with_the_last_error_and_context() {
        with_deadline(Duration::from_secs(10), || async {
            Poll::new("the impossible", Duration::from_millis(100))
                .every(Duration::from_millis(10))
                .context(|| "logs here".to_string())
                .until_ok(|| async { Err::<(), _>("still 1") })
                .await;
        });
    }

    #[test]
    #[should_panic(expected = "timed out after 100ms waiting for nothing")]
    fn an_option_check_fails_naming_what_it_awaited() {
        with_deadline(Duration::from_secs(10), || async {
            eventually("nothing", Duration::from_millis(100), || async {
                None::<()>
            })
            .await;
        });
    }
}
