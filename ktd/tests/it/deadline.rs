//! Every test runs under a deadline: a hung cluster fails the test instead of the CI job.

use std::future::Future;
use std::sync::mpsc;
use std::time::Duration;

/// Runs `body` on a fresh runtime on its own thread and fails if it has not finished within
/// `limit`.
pub fn with_deadline<F, Fut>(limit: Duration, body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::Builder::new()
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
            runtime.shutdown_timeout(Duration::from_secs(5));
            let _ = done_tx.send(result);
        })
        .expect("spawn test thread");
    match done_rx.recv_timeout(limit + Duration::from_secs(30)) {
        Ok(Ok(())) => {}
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("test exceeded its deadline of {limit:?} and did not stop"),
    }
}
