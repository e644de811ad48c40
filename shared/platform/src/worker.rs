//! The loop of a background worker that follows the log (the lake relay, the speed
//! consumer): step; after a step that made progress or lost a race, step again at
//! once; when idle, wait the poll interval (right after progress a sixteenth of
//! it, doubling with each idle step); after an error, wait a backoff that
//! doubles up to a maximum, and count the error by the store that failed
//! (`{worker}_errors_total{store}`). It ends at `shutdown`, after the step in
//! progress.
//!
//! A worker that reaches a row of the log it cannot decode stops there, on purpose:
//! skipping the row would make every sum after it wrong. The loop keeps retrying
//! at the maximum backoff (a restart with a newer build gets past it), logs the row
//! once, counts it (`{worker}_undecodable_rows_total`), sets `{worker}_stopped` to
//! 1 and reports the reason through [`Status`], which `/readyz` shows.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What one step did, as far as the loop's pace is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pace {
    /// It made progress: there may be more to do.
    Progress,
    /// Nothing to do until the log grows.
    Idle,
    /// Another instance moved the cursor first.
    Contended,
}

/// A step's error: which store failed, or which row stopped the worker.
pub trait StepError: std::fmt::Display {
    /// `postgres`, `redis`, `s3`, …: the label of `{worker}_errors_total`.
    fn store(&self) -> &'static str;

    /// When the worker cannot get past a row of the log: where, and why (the
    /// position identifies the row, so it is logged and counted once).
    fn stopped_at(&self) -> Option<String> {
        None
    }
}

/// How a worker paces itself.
#[derive(Clone, Copy, Debug)]
pub struct Pacing {
    pub poll_interval: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

/// Why a worker is stopped, if it is: shared between its loop and its readiness
/// check.
#[derive(Clone, Debug)]
pub struct Status(Arc<watch::Sender<Option<String>>>);

impl Default for Status {
    fn default() -> Self {
        Self(Arc::new(watch::Sender::new(None)))
    }
}

impl Status {
    /// `Err(why)` while the worker is stopped at a row it cannot decode.
    pub fn check(&self) -> Result<(), String> {
        match &*self.0.borrow() {
            None => Ok(()),
            Some(why) => Err(why.clone()),
        }
    }

    /// A readiness check ([`crate::health::Readiness::with`]) that fails while the
    /// worker is stopped, naming why.
    pub fn probe(
        &self,
    ) -> impl Fn() -> std::future::Ready<Result<(), String>> + Send + Sync + 'static {
        let status = self.clone();
        move || std::future::ready(status.check())
    }

    fn set(&self, why: Option<String>) {
        self.0.send_if_modified(|current| {
            let changed = *current != why;
            *current = why;
            changed
        });
    }
}

/// Registers the worker's metrics at zero, so that dashboards show 0 before the
/// first error.
fn register(worker: &'static str, stores: &[&'static str]) {
    drop(crate::metrics::handle());
    for store in stores {
        metrics::counter!(format!("{worker}_errors_total"), "store" => *store).increment(0);
    }
    metrics::counter!(format!("{worker}_undecodable_rows_total")).increment(0);
    metrics::gauge!(format!("{worker}_stopped")).set(0.0);
}

/// How many times the wait after an idle step is halved right after progress.
/// Under a steady stream a step finds nothing new mostly because a writer has yet
/// to commit (the log's horizon): it is worth looking again soon. The speed layer
/// at 20,000 orders/s found nothing in about one step of eleven, and each of those
/// waited a whole poll interval while the stream went on.
const IDLE_HALVINGS: u32 = 4;

/// The wait after the `idle`-th idle step in a row (from 1).
fn idle_wait(poll_interval: Duration, idle: u32) -> Duration {
    poll_interval / 2u32.pow(IDLE_HALVINGS + 1 - idle.clamp(1, IDLE_HALVINGS + 1))
}

/// Runs `step` until `shutdown` (see the module documentation). `stores` are the
/// stores the worker's errors name, registered at zero.
pub async fn run<F, Fut, E>(
    worker: &'static str,
    stores: &[&'static str],
    pacing: Pacing,
    status: &Status,
    shutdown: CancellationToken,
    mut step: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Pace, E>>,
    E: StepError,
{
    register(worker, stores);
    let mut backoff = pacing.min_backoff;
    let mut stopped_at: Option<String> = None;
    // Idle steps in a row since the last progress: the first waits a sixteenth
    // of the poll interval, each next one twice as long, up to the interval.
    let mut idle = 0u32;
    while !shutdown.is_cancelled() {
        let outcome = step().await;
        let pause = match outcome {
            Ok(pace) => {
                if stopped_at.take().is_some() {
                    tracing::info!(worker, "Worker moved past the row it was stopped at");
                    metrics::gauge!(format!("{worker}_stopped")).set(0.0);
                    status.set(None);
                }
                backoff = pacing.min_backoff;
                match pace {
                    Pace::Progress | Pace::Contended => {
                        idle = 0;
                        continue;
                    }
                    Pace::Idle => {
                        idle = idle.saturating_add(1);
                        idle_wait(pacing.poll_interval, idle)
                    }
                }
            }
            Err(e) => match e.stopped_at() {
                Some(at) => {
                    if stopped_at.as_deref() != Some(at.as_str()) {
                        tracing::error!(
                            worker,
                            error = %e,
                            "Stopped at a row of the log this build cannot decode; \
                             nothing after it is consumed until it can be"
                        );
                        metrics::counter!(format!("{worker}_undecodable_rows_total")).increment(1);
                        metrics::gauge!(format!("{worker}_stopped")).set(1.0);
                        status.set(Some(e.to_string()));
                        stopped_at = Some(at);
                    }
                    pacing.max_backoff
                }
                None => {
                    metrics::counter!(format!("{worker}_errors_total"), "store" => e.store())
                        .increment(1);
                    tracing::warn!(
                        worker,
                        error = %e,
                        retry_in_ms = backoff.as_millis() as u64,
                        "Worker step failed"
                    );
                    let pause = backoff;
                    backoff = (backoff * 2).min(pacing.max_backoff);
                    pause
                }
            },
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn idle_waits_start_at_a_sixteenth_of_the_poll_interval_and_double_up_to_it() {
        let poll = Duration::from_millis(20);
        let waits: Vec<Duration> = (1..=7).map(|idle| idle_wait(poll, idle)).collect();
        let ms = |n: u64| Duration::from_micros(n * 1_000 / 16);
        assert_eq!(
            waits,
            [ms(20), ms(40), ms(80), ms(160), ms(320), ms(320), ms(320)]
        );
        assert_eq!(idle_wait(poll, 5), poll);
    }

    #[derive(Debug)]
    enum Failure {
        Store,
        Row(u32),
    }

    impl std::fmt::Display for Failure {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Failure::Store => f.write_str("store down"),
                Failure::Row(n) => write!(f, "row {n} cannot be decoded"),
            }
        }
    }

    impl StepError for Failure {
        fn store(&self) -> &'static str {
            "postgres"
        }

        fn stopped_at(&self) -> Option<String> {
            match self {
                Failure::Store => None,
                Failure::Row(n) => Some(n.to_string()),
            }
        }
    }

    /// Runs the loop over a script of step outcomes; returns the status seen after
    /// each step.
    async fn script(outcomes: Vec<Result<Pace, Failure>>) -> Vec<Result<(), String>> {
        let pacing = Pacing {
            poll_interval: Duration::from_millis(1),
            min_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
        };
        let status = Status::default();
        let seen = Mutex::new(Vec::new());
        let shutdown = CancellationToken::new();
        let remaining = Mutex::new(outcomes.into_iter());
        run(
            "test_worker",
            &["postgres"],
            pacing,
            &status,
            shutdown.clone(),
            || {
                seen.lock().unwrap().push(status.check());
                let next = remaining.lock().unwrap().next();
                if next.is_none() {
                    shutdown.cancel();
                }
                async move { next.unwrap_or(Ok(Pace::Idle)) }
            },
        )
        .await;
        // The status before each step is the one the previous step left.
        seen.into_inner().unwrap().into_iter().skip(1).collect()
    }

    #[tokio::test]
    async fn a_row_that_cannot_be_decoded_stops_the_worker_until_a_step_succeeds() {
        let seen = script(vec![
            Ok(Pace::Progress),
            Err(Failure::Store),
            Err(Failure::Row(7)),
            Err(Failure::Row(7)),
            Ok(Pace::Idle),
        ])
        .await;
        assert_eq!(seen[0], Ok(()));
        assert_eq!(seen[1], Ok(()), "a store error is not a stop");
        assert_eq!(seen[2], Err("row 7 cannot be decoded".into()));
        assert_eq!(seen[3], Err("row 7 cannot be decoded".into()));
        assert_eq!(seen[4], Ok(()), "cleared once a step succeeds");
    }
}
