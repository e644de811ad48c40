//! Waiting for a condition: the one polling loop of the stacks and the tests.

use std::future::Future;
use std::time::Duration;

/// Polls `condition` every `every` until it holds (true) or `timeout` passes
/// (false). The condition is checked once more at the deadline.
pub async fn until<F, Fut>(timeout: Duration, every: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
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
    }
}
