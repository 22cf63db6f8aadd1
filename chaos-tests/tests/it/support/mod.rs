//! What the chaos tier's tests share: the deadline every test runs under, one test at a time.

use std::future::Future;
use std::time::Duration;

/// Runs `body` under a deadline ([`ktd_testkit::Deadline`]), alone: six processes on two cores
/// is already a lot.
pub fn with_deadline<F, Fut>(limit: Duration, body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    ktd_testkit::Deadline::new(limit).one_at_a_time().run(body);
}
