//! Every test runs under a deadline: a hung cluster or engine fails the test instead of the CI
//! job.
//!
//! [`with_deadline`] runs an async body on a fresh runtime; [`Deadline`] adds what some test
//! binaries want on top (one test at a time, a test log writer, joining the body's thread);
//! [`with_deadline_blocking`] runs a synchronous body.

use std::future::Future;
use std::sync::{Mutex, PoisonError, mpsc};
use std::time::Duration;

/// Held by a test that runs [`Deadline::one_at_a_time`].
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// How long the body's runtime may take to shut down after the body finished.
const SHUTDOWN: Duration = Duration::from_secs(5);

/// How long past its limit a body may take to stop before the test gives up on its thread.
const GRACE: Duration = Duration::from_secs(30);

/// A deadline for an async test body, with options.
#[derive(Clone, Copy, Debug)]
#[must_use = "a Deadline does nothing until `run`"]
pub struct Deadline {
    limit: Duration,
    alone: bool,
    logging: bool,
    join: bool,
}

impl Deadline {
    /// The body must finish within `limit`.
    pub fn new(limit: Duration) -> Self {
        Self {
            limit,
            alone: false,
            logging: false,
            join: false,
        }
    }

    /// Runs the body alone: no other test of this binary that asks for the same runs at the
    /// same time (six processes on two cores is already a lot). Waiting for the turn does not
    /// count against the limit.
    pub fn one_at_a_time(mut self) -> Self {
        self.alone = true;
        self
    }

    /// Installs the test log writer ([`crate::logging::init_logging`]) first.
    pub fn init_logging(mut self) -> Self {
        self.logging = true;
        self
    }

    /// After the body succeeded, waits until its thread has exited too.
    pub fn join_thread(mut self) -> Self {
        self.join = true;
        self
    }

    /// Runs `body` on a fresh multi-threaded runtime on its own thread and fails if it has not
    /// finished within the limit; a panic in the body is re-raised here.
    pub fn run<F, Fut>(self, body: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let _alone = self
            .alone
            .then(|| ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner));
        if self.logging {
            crate::logging::init_logging();
        }
        let limit = self.limit;
        let (done_tx, done_rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("test-body".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(4)
                    .enable_all()
                    .build()
                    .expect("runtime");
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    runtime.block_on(async move {
                        tokio::time::timeout(limit, body())
                            .await
                            .expect("test exceeded its deadline");
                    });
                }));
                runtime.shutdown_timeout(SHUTDOWN);
                let _ = done_tx.send(result);
            })
            .expect("spawn test thread");
        match done_rx.recv_timeout(limit + GRACE) {
            Ok(Ok(())) => {
                if self.join {
                    let _ = handle.join();
                }
            }
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(_) => panic!("test exceeded its deadline of {limit:?} and did not stop"),
        }
    }
}

/// Runs `body` on a fresh multi-threaded runtime on its own thread and fails if it has not
/// finished within `limit` ([`Deadline::new`] with no options).
pub fn with_deadline<F, Fut>(limit: Duration, body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    Deadline::new(limit).run(body);
}

/// Runs the synchronous `body` on its own thread and fails if it has not finished within
/// `limit`; returns what it returned, or re-raises its panic.
pub fn with_deadline_blocking<T: Send + 'static>(
    limit: Duration,
    body: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (done_tx, done_rx) = mpsc::channel();
    let handle = std::thread::Builder::new()
        .name("test-body".into())
        .spawn(move || {
            let _ = done_tx.send(body());
        })
        .expect("spawn test thread");
    match done_rx.recv_timeout(limit) {
        Ok(value) => {
            handle.join().expect("test thread finished");
            value
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // The body panicked: re-raise its panic here.
            match handle.join() {
                Err(panic) => std::panic::resume_unwind(panic),
                Ok(()) => unreachable!("the body sends before finishing"),
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("test exceeded its deadline of {limit:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_that_finishes_in_time_passes_and_returns_its_value() {
        with_deadline(Duration::from_secs(5), || async {});
        Deadline::new(Duration::from_secs(5))
            .one_at_a_time()
            .init_logging()
            .join_thread()
            .run(|| async {});
        assert_eq!(with_deadline_blocking(Duration::from_secs(5), || 7), 7);
    }

    #[test]
    #[should_panic(expected = "test exceeded its deadline")]
    fn a_body_past_its_deadline_fails() {
        with_deadline(Duration::from_millis(50), || async {
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
    }

    #[test]
    #[should_panic(expected = "test exceeded its deadline of")]
    fn a_blocking_body_past_its_deadline_fails() {
        with_deadline_blocking(Duration::from_millis(50), || {
            std::thread::sleep(Duration::from_secs(1));
        });
    }

    #[test]
    #[should_panic(expected = "the body's own failure")]
    fn a_panic_in_the_body_is_re_raised() {
        with_deadline(Duration::from_secs(5), || async {
            panic!("the body's own failure");
        });
    }
}
