//! Waiting for a condition instead of sleeping.

use std::future::Future;
use std::time::Duration;

/// Polls `condition` every 20 ms until it holds; fails the test, naming `what`,
/// if `timeout` passes first.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let held = tidemark_launch::until(timeout, Duration::from_millis(20), condition).await;
    assert!(held, "timed out after {timeout:?} waiting for: {what}");
}
