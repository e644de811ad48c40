//! The speed consumer: tails the orders log into the speed view, exactly once.
//!
//! Each step reads, in one REPEATABLE READ snapshot, the epoch cuts and the log
//! tail after the view's cursor; assigns every row to its epoch by transaction id;
//! and applies the batch together with the new cursor in one atomic Redis script
//! that only succeeds if the cursor has not moved. A crash anywhere repeats the
//! step from the cursor Redis holds.
//!
//! When Redis has lost the view (no cursor), the consumer rebuilds it from the
//! published batch watermark: the batch view covers everything before it, and the
//! epochs after it are replayed from the log. Because epochs are a function of the
//! transaction id and the durable cut list, the replay lands in the same epochs.
//!
//! A row this build cannot decode stops the consumer right before it: the rows
//! before it are applied, nothing after it is (see [`tidemark_platform::worker`]);
//! `/readyz` says why.
//!
//! Several consumers may run; the one holding the `speed` lease applies, the
//! others stand by (see [`tidemark_platform::lease`]). Each step carries the
//! lease's token into Redis, where the view's fence refuses a former leader's
//! late apply.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use sqlx::PgPool;
use tidemark_domain::LogPosition;
use tidemark_orderlog::epochs::{self, epoch_of};
use tidemark_orderlog::{Tail, Undecodable};
use tidemark_platform::lease::{Fence, Fenced, Lease};
use tidemark_platform::worker::{self, Pace, Pacing, Status};
use tidemark_speedview::{Applied, Delta, SpeedView};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::SpeedSettings;

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error(transparent)]
    Redis(#[from] tidemark_speedview::Error),
    #[error(transparent)]
    Undecodable(#[from] Undecodable),
    #[error(transparent)]
    Fenced(#[from] Fenced),
}

impl worker::StepError for StepError {
    fn store(&self) -> &'static str {
        match self {
            StepError::Postgres(_) | StepError::Undecodable(_) => "postgres",
            StepError::Redis(_) => "redis",
            StepError::Fenced(_) => "lease",
        }
    }

    fn stopped_at(&self) -> Option<String> {
        match self {
            StepError::Undecodable(row) => Some(row.position.to_string()),
            _ => None,
        }
    }
}

/// Records the time since `started` as a phase of a step: `read` (waiting for the
/// log read, which ran while the last batch was applied), `delta` (summing the
/// batch per cell), `apply` (the Redis script).
fn phase(name: &'static str, started: Instant) {
    metrics::histogram!("speed_step_phase_seconds", "phase" => name)
        .record(started.elapsed().as_secs_f64());
}

/// What one step did.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Applied(usize),
    Idle,
    /// The view was lost (or never built) and was started afresh.
    Rebuilt {
        from: LogPosition,
        base_epoch: u64,
    },
    /// Another consumer moved the cursor first.
    Contended,
    /// Another instance holds the lease.
    Standby,
}

#[derive(Clone)]
pub struct Consumer {
    pool: PgPool,
    view: SpeedView,
    settings: SpeedSettings,
    lag: Arc<watch::Sender<f64>>,
    status: Status,
    /// The read of the next batch, started while the last one was applied.
    ahead: Arc<tokio::sync::Mutex<Option<Ahead>>>,
    lease: Lease,
    /// The lease token the view's fence was last raised to by this instance.
    raised: Arc<std::sync::atomic::AtomicU64>,
}

/// A log read in flight, from `from`.
struct Ahead {
    from: LogPosition,
    read: JoinHandle<Result<(epochs::Cuts, Tail), StepError>>,
    /// This instance's last apply moved the view's cursor to `from`.
    applied: bool,
}

impl Consumer {
    /// A consumer that writes while `lease` leads ([`Lease::unfenced`]: always).
    pub fn new(pool: PgPool, view: SpeedView, settings: SpeedSettings, lease: Lease) -> Self {
        Self {
            pool,
            view,
            settings,
            lag: Arc::new(watch::Sender::new(0.0)),
            status: Status::default(),
            ahead: Arc::default(),
            lease,
            raised: Arc::default(),
        }
    }

    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Whether the consumer is stopped at a row it cannot decode (for `/readyz`).
    pub fn status(&self) -> Status {
        self.status.clone()
    }

    /// The last measured lag in seconds.
    pub fn lag_seconds(&self) -> f64 {
        *self.lag.borrow()
    }

    /// Runs steps until `shutdown`, with backoff on errors, plus the lag and
    /// epoch-expiry housekeeping.
    pub async fn run(self, shutdown: CancellationToken) {
        let housekeeping = tokio::spawn(self.clone().housekeeping(shutdown.clone()));
        let pacing = Pacing {
            poll_interval: self.settings.poll_interval,
            min_backoff: Duration::from_millis(50),
            max_backoff: self.settings.max_backoff,
        };
        worker::run(
            "speed",
            &["postgres", "redis"],
            pacing,
            &self.status,
            shutdown,
            || async {
                let started = Instant::now();
                Ok::<_, StepError>(match self.step().await? {
                    Step::Applied(rows) => {
                        metrics::counter!("speed_applied_rows_total").increment(rows as u64);
                        metrics::histogram!("speed_step_seconds")
                            .record(started.elapsed().as_secs_f64());
                        Pace::Progress
                    }
                    Step::Rebuilt { from, base_epoch } => {
                        tracing::warn!(%from, base_epoch, "Speed view was empty; rebuilding from the batch watermark");
                        metrics::counter!("speed_rebuilds_total").increment(1);
                        Pace::Progress
                    }
                    Step::Contended => Pace::Contended,
                    Step::Idle | Step::Standby => Pace::Idle,
                })
            },
        )
        .await;
        housekeeping.abort();
    }

    /// Reads a batch and applies it atomically with the cursor.
    ///
    /// While a batch is applied, the read of the next one (from where this one
    /// ends) already runs, so Postgres and Redis work at the same time. That read
    /// is used only if the next step finds the cursor where it started; it is the
    /// read that step would make, only earlier: the epoch of a row is fixed by its
    /// position and the durable cut list, whichever snapshot reads it. After an
    /// apply of its own the step does not read the cursor from the view: the
    /// apply checks it (one Redis round trip fewer per step, about a millisecond of
    /// each ~8 ms step at 20,000 orders/s).
    pub async fn step(&self) -> Result<Step, StepError> {
        let Some(fence) = self.lease.fence() else {
            return Ok(Step::Standby);
        };
        self.raise(fence).await?;
        let mut ahead = self.ahead.lock().await;
        let (cursor, read) = match ahead.take() {
            // Where this instance's last apply left the cursor: no need to ask the
            // view. The apply checks the cursor itself (and that the view is there,
            // in this layout): if another writer moved it or Redis lost it, the
            // apply says so and the next step asks.
            Some(next) if next.applied => (next.from, next.read),
            next => {
                let Some(meta) = self.view.meta().await? else {
                    return self.rebuild(fence).await;
                };
                let read = match next {
                    Some(next) if next.from == meta.cursor => next.read,
                    _ => self.read_after(meta.cursor),
                };
                (meta.cursor, read)
            }
        };
        let waited = Instant::now();
        let (cuts, tail) = read.await.expect("the log read does not panic")?;
        phase("read", waited);
        let Some(last) = tail.rows.last() else {
            return match tail.stopped {
                Some(stopped) => Err(stopped.into()),
                None => Ok(Step::Idle),
            };
        };
        let to = last.position;
        *ahead = Some(Ahead {
            from: to,
            read: self.read_after(to),
            applied: false,
        });
        let built = Instant::now();
        let mut delta = Delta::default();
        for row in &tail.rows {
            delta.add(epoch_of(row.position.txid, &cuts), &row.event);
        }
        phase("delta", built);
        let now_ms = Utc::now().timestamp_millis();
        let applying = Instant::now();
        let applied = self
            .view
            .apply(cursor, to, now_ms, fence.token, &delta)
            .await?;
        phase("apply", applying);
        match applied {
            Applied::Done => {
                if let Some(next) = ahead.as_mut() {
                    next.applied = true;
                }
                if let Some(newest) = tail.rows.iter().map(|r| r.ingested_at).max() {
                    let age = (Utc::now() - newest).num_milliseconds().max(0);
                    metrics::histogram!("speed_freshness_seconds").record(age as f64 / 1000.0);
                }
                Ok(Step::Applied(tail.rows.len()))
            }
            Applied::Lost => self.rebuild(fence).await,
            Applied::Moved => Ok(Step::Contended),
            Applied::Fenced(current) => Err(fence.refused(current).into()),
        }
    }

    /// On the first step under a new lease token: raises the view's fence to it,
    /// so a former leader's late apply is refused from now on.
    async fn raise(&self, fence: Fence) -> Result<(), StepError> {
        use std::sync::atomic::Ordering;
        if fence.token == 0 || self.raised.load(Ordering::Relaxed) == fence.token {
            return Ok(());
        }
        match self.view.raise_fence(fence.token).await? {
            Applied::Fenced(current) => Err(fence.refused(current).into()),
            _ => {
                self.raised.store(fence.token, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// Reads the epoch cuts and the log tail after `cursor` in one snapshot, on a
    /// task of its own: if the step waiting for it is cancelled (a shutdown, a
    /// caller's timeout) or drops it, the transaction still ends and its connection
    /// goes back to the pool clean. Cancelled mid-BEGIN in place, the connection
    /// would return with a read-only transaction open on the server that sqlx does
    /// not know of (found by the model test).
    fn read_after(
        &self,
        cursor: LogPosition,
    ) -> JoinHandle<Result<(epochs::Cuts, Tail), StepError>> {
        let (pool, batch_size) = (self.pool.clone(), self.settings.batch_size);
        tokio::spawn(async move {
            let mut tx = pool.begin_with(tidemark_orderlog::TAIL_TRANSACTION).await?;
            let cuts = epochs::load(&mut *tx).await?;
            let tail = tidemark_orderlog::tail(&mut *tx, cursor, batch_size).await?;
            tx.commit().await?;
            Ok((cuts, tail))
        })
    }

    /// Starts the view at the published batch watermark (or the start of the log).
    async fn rebuild(&self, fence: Fence) -> Result<Step, StepError> {
        let published: Option<(i64, i64)> =
            sqlx::query_as("SELECT epoch, threshold::text::int8 FROM batch_state")
                .fetch_optional(&self.pool)
                .await?;
        let (base_epoch, from) = match published {
            Some((epoch, threshold)) => (epoch as u64, LogPosition::before_txid(threshold as u64)),
            None => (0, LogPosition::ZERO),
        };
        let now_ms = Utc::now().timestamp_millis();
        match self
            .view
            .reset(from, base_epoch, now_ms, fence.token)
            .await?
        {
            Applied::Done => Ok(Step::Rebuilt { from, base_epoch }),
            Applied::Fenced(current) => Err(fence.refused(current).into()),
            Applied::Lost | Applied::Moved => Ok(Step::Contended),
        }
    }

    /// Every few seconds: measure lag; drop epochs the batch view has covered for
    /// longer than the grace period.
    async fn housekeeping(self, shutdown: CancellationToken) {
        let mut covered_since: BTreeMap<u64, Instant> = BTreeMap::new();
        while !shutdown.is_cancelled() {
            if let Err(e) = self.housekeep(&mut covered_since).await {
                tracing::debug!(error = %e, "Speed housekeeping failed");
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    }

    async fn housekeep(&self, covered_since: &mut BTreeMap<u64, Instant>) -> Result<(), StepError> {
        if let Some(meta) = self.view.meta().await? {
            let lag = tidemark_orderlog::lag(&self.pool, meta.cursor).await?;
            metrics::gauge!("speed_lag_rows").set(lag.rows as f64);
            metrics::gauge!("speed_lag_seconds").set(lag.seconds);
            self.lag.send_replace(lag.seconds);
            self.view.set_lag((lag.seconds * 1000.0) as i64).await?;
        }
        if self.lease.fence().is_none() {
            // Dropping epochs is the leader's work.
            return Ok(());
        }
        let published: Option<i64> = sqlx::query_scalar("SELECT epoch FROM batch_state")
            .fetch_optional(&self.pool)
            .await?;
        let Some(published) = published.map(|e| e as u64) else {
            return Ok(());
        };
        covered_since.entry(published).or_insert_with(Instant::now);
        for epoch in self.view.epochs().await? {
            // Epochs below a published epoch are covered by the batch view since that
            // publish was first seen here.
            let since = covered_since.range(epoch + 1..).next().map(|(_, t)| *t);
            if since.is_some_and(|t| t.elapsed() >= self.settings.epoch_grace) {
                self.view.drop_epoch(epoch).await?;
                tracing::info!(epoch, "Dropped a speed epoch covered by the batch view");
            }
        }
        Ok(())
    }
}
