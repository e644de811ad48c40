//! Waiting for a condition: the one polling loop of the stacks and the tests.

use std::future::Future;
use std::time::Duration;

/// Polls `condition` every `every` until it holds (true) or `timeout` passes
/// (false). The condition is checked once more at the deadline. A check still
/// running a grace (`every`, at least a second) past the deadline — a query stuck
/// on a lock — counts as not holding: the wait ends then, rather than hang with it.
pub async fn until<F, Fut>(timeout: Duration, every: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let cutoff = deadline + every.max(Duration::from_secs(1));
    loop {
        match tokio::time::timeout_at(cutoff, condition()).await {
            Ok(true) => return true,
            Ok(false) => {}
            Err(_) => return false,
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(every.min(deadline - tokio::time::Instant::now())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holds_as_soon_as_the_condition_does_and_gives_up_at_the_deadline() {
        let mut calls = 0;
        let held = until(Duration::from_secs(5), Duration::from_millis(1), || {
            calls += 1;
            let done = calls == 3;
            async move { done }
        })
        .await;
        assert!(held);
        assert_eq!(calls, 3);
        let started = tokio::time::Instant::now();
        let held = until(
            Duration::from_millis(30),
            Duration::from_millis(5),
            || async { false },
        )
        .await;
        assert!(!held);
        assert!(started.elapsed() >= Duration::from_millis(30));

        // A check that never finishes ends the wait at the deadline.
        let started = tokio::time::Instant::now();
        let held = until(Duration::from_millis(30), Duration::from_millis(5), || {
            std::future::pending::<bool>()
        })
        .await;
        assert!(!held);
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}
