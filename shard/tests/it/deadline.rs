//! Every test runs under a deadline: a hung engine fails the test instead of the CI job.

use std::sync::mpsc;
use std::time::Duration;

/// Runs `body` on its own thread and fails if it has not finished within `limit`.
pub fn with_deadline<T: Send + 'static>(
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
