//! A batch run, step by step — Write-Audit-Publish:
//!
//! 1. [`plan`]: resume the run in progress, if any; otherwise cut a new speed epoch
//!    and record the run in the same transaction, so the run's threshold is that
//!    transaction's id. Then wait until the lake relay has landed every row below it.
//! 2. [`write`]: the run's new orders (from the previous published threshold) from
//!    the raw lake into the Parquet lake; a rebuild also re-reads everything older.
//! 3. [`stage`]: aggregates into a staging table of the run's own.
//! 4. [`audit`]: raw ↔ Parquet read back ↔ staging reconcile; or the run fails and
//!    publishes nothing.
//! 5. [`publish`]: attach staging to `revenue_agg`, then flip the published state in
//!    one Postgres transaction (the moment readers see the run).
//!
//! Afterwards [`maintenance`] compacts lake partitions; it also holds `backfill`.
//! [`manifest`] owns the SQL of the lake manifests.
//!
//! Every step is idempotent: files have deterministic names, staging is rebuilt
//! from scratch, publishing attaches each staging partition to `revenue_agg` once
//! (and `FINAL` would fold a row copied twice), and the flip is one Postgres
//! transaction guarded by the run's status. A run killed at any step is resumed by
//! the next invocation and ends in the same state.
//!
//! One run at a time, whichever instance or CLI starts it: [`Compactor::run_once`]
//! holds the `compactor` lease ([`tidemark_platform::lease`]) for the length of
//! the run, and every Postgres write of the run (plan, lake manifest, failure,
//! flip, compaction) checks the lease's token in its transaction. A runner that
//! was paused past its lease finds its writes refused; its ClickHouse staging
//! tables carry its token in their names, so they never mix with its successor's.

mod audit;
mod maintenance;
mod manifest;
mod plan;
mod publish;
mod stage;
mod write;

use std::time::Instant;

use chrono::{DateTime, Utc};
use polars::prelude::PolarsError;
use serde::Serialize;
use sqlx::PgPool;
use tidemark_batchview::PublishedState;
use tidemark_platform::lease::{Fence, FenceError, Fenced, Lease};

use crate::config::CompactorSettings;
use crate::lake::{LakeError, Store};

pub use audit::AuditReport;
pub use write::Written;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error(transparent)]
    Lake(#[from] LakeError),
    #[error("polars: {0}")]
    Polars(#[from] PolarsError),
    #[error("publish: {0}")]
    Publish(String),
    #[error("audit: {0}")]
    ReadBack(String),
    #[error(transparent)]
    Fenced(#[from] Fenced),
}

impl From<FenceError> for RunError {
    fn from(e: FenceError) -> Self {
        match e {
            FenceError::Postgres(e) => RunError::Postgres(e),
            FenceError::Fenced(e) => RunError::Fenced(e),
        }
    }
}

pub type Result<T, E = RunError> = std::result::Result<T, E>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Adds the orders since the last publish.
    Incremental,
    /// Recomputes every aggregate from the lake (after a logic change).
    Rebuild,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Incremental => "incremental",
            Kind::Rebuild => "rebuild",
        }
    }
}

/// A planned run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    pub run_id: u64,
    pub kind: Kind,
    /// The speed epoch this run's cut starts.
    pub epoch: u64,
    /// New orders: `from_threshold <= txid < threshold`.
    pub from_threshold: u64,
    pub threshold: u64,
    pub cut_at: DateTime<Utc>,
    /// The lease token of the runner executing it (0: unfenced).
    pub token: u64,
}

impl Run {
    /// The staging table of the run's aggregates, this runner's own.
    pub fn staging(&self) -> String {
        format!("staging_run_{}_{}", self.run_id, self.token)
    }

    /// The staging table of the run's rows of `buyers`.
    pub fn staging_buyers(&self) -> String {
        format!("staging_buyers_run_{}_{}", self.run_id, self.token)
    }
}

/// The fence of the run in progress, set for as long as this lives (also when the
/// run's future is dropped midway).
struct Held<'a>(&'a std::sync::Mutex<Option<Fence>>);

impl<'a> Held<'a> {
    fn new(slot: &'a std::sync::Mutex<Option<Fence>>, fence: Fence) -> Held<'a> {
        *slot.lock().expect("fence") = Some(fence);
        Held(slot)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        *self.0.lock().expect("fence") = None;
    }
}

/// The run a staging table belongs to, from its name.
fn staging_run_id(table: &str) -> Option<i64> {
    let rest = table
        .strip_prefix("staging_run_")
        .or_else(|| table.strip_prefix("staging_buyers_run_"))?;
    rest.split('_').next()?.parse().ok()
}

/// How a run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Published {
        run_id: u64,
        rows_in: u64,
        rows_out: u64,
        /// Bytes of the run's rows held on local disk between its steps (see
        /// `compactor.hold_memory_bytes`), removed when it ended.
        held_on_disk: u64,
    },
    /// The audit failed: nothing published, staging kept.
    AuditFailed { run_id: u64, problems: Vec<String> },
    /// The relay has not landed every row below the cut yet; the run stays pending.
    RelayBehind { run_id: u64 },
}

pub struct Compactor {
    pub pool: PgPool,
    /// Where readers read (sharded: the `Distributed` tables).
    pub ch: clickhouse::Client,
    /// Each shard's local database (one: `ch`'s, unsharded): where runs are
    /// staged and attached.
    pub shards: Vec<clickhouse::Client>,
    /// For each shard, its replicas besides the writer (empty unreplicated).
    pub replicas: Vec<Vec<clickhouse::Client>>,
    /// Sharded: the writers' `host:port`s and the shards' local database, to
    /// read a run's staging tables across them.
    pub cluster: Option<(String, String)>,
    pub store: Store,
    pub settings: CompactorSettings,
    pub lease: Lease,
    /// The lease held by the run in progress: its writes check it. Unfenced
    /// outside [`Compactor::run_once`] (tests calling single steps).
    pub(crate) fence: std::sync::Mutex<Option<Fence>>,
}

impl Compactor {
    /// A `FROM` for `table` on every shard's writer at once, read through `ch`:
    /// the table itself on one server, `remote(…)` over the writers' copies of
    /// it (staging lives on the writers only; `cluster(…)` might ask a replica).
    pub(crate) fn across(&self, table: &str) -> String {
        match &self.cluster {
            None => table.to_owned(),
            Some((writers, local)) => format!("remote('{writers}', '{local}', '{table}')"),
        }
    }
}

/// `step`'s output, and the milliseconds from `since` to its end.
async fn timed<T>(since: Instant, step: impl Future<Output = T>) -> (T, u64) {
    let output = step.await;
    (output, since.elapsed().as_millis() as u64)
}

/// The process's peak resident memory so far, in MB: logged after each step of a
/// run, it shows which step set the peak (0 where `/proc` cannot tell).
fn peak_resident_mb() -> u64 {
    tidemark_platform::metrics::peak_resident_bytes(None).map_or(0, |b| b / 1_000_000)
}

/// Batch lag: now minus the published watermark's time.
pub(crate) fn set_batch_lag(state: &PublishedState) {
    let lag = (Utc::now() - state.watermark_time)
        .num_milliseconds()
        .max(0);
    metrics::gauge!("compactor_batch_lag_seconds").set(lag as f64 / 1000.0);
}

impl Compactor {
    /// Plans and executes one run of `kind` (finishing a pending run first),
    /// holding the `compactor` lease for its length (waiting for it while another
    /// instance runs).
    pub async fn run_once(&self, kind: Kind) -> Result<Outcome> {
        let started = Instant::now();
        let fence = self.lease.acquire().await?;
        // Renewed while the run lasts; dropped (this future cancelled) it lapses
        // and the next runner takes over after the lease's duration.
        let kept = self.lease.keep();
        let held = Held::new(&self.fence, fence);
        let result = async {
            self.repair().await?;
            if let Some(pending) = self.pending().await? {
                let outcome = self.execute(&pending).await?;
                if !matches!(outcome, Outcome::Published { .. }) || pending.kind == kind {
                    return Ok(outcome);
                }
            }
            let kind = if kind == Kind::Incremental && self.predates_the_view().await? {
                tracing::warn!(
                    "The published runs predate the buyers view or quarter-hour buckets: \
                     rebuilding once so that both cover the whole history"
                );
                Kind::Rebuild
            } else {
                kind
            };
            let run = self.plan(kind).await?;
            self.execute(&run).await
        }
        .await;
        drop(held);
        drop(kept);
        if let Err(e) = self.lease.release().await {
            tracing::warn!(error = %e, "Could not release the compactor lease; it expires");
        }
        metrics::histogram!("compactor_run_seconds").record(started.elapsed().as_secs_f64());
        if let Ok(Outcome::Published { .. }) = &result
            && let Ok(Some(state)) = PublishedState::load(&self.pool).await
        {
            set_batch_lag(&state);
        }
        result
    }

    /// Whether the published runs hold revenue but no buyers or no quarter-hour
    /// cells: they were published before `buyers` or quarter hours existed (an
    /// upgrade), and an incremental run would leave their orders uncounted there.
    async fn predates_the_view(&self) -> Result<bool> {
        let Some(state) = PublishedState::load(&self.pool).await? else {
            return Ok(false);
        };
        // Whether the published runs have a row of `table` where `condition`.
        let any = |table: &str, condition: &str| {
            let sql = format!(
                "SELECT count() FROM (SELECT 1 FROM {table} \
                 WHERE {condition} AND run_id >= ? AND run_id <= ? LIMIT 1)"
            );
            let query = self
                .ch
                .query(&sql)
                .bind(state.base_run_id)
                .bind(state.run_id);
            async move { query.fetch_one::<u64>().await }
        };
        if any("revenue_agg", "1").await? == 0 {
            return Ok(false);
        }
        Ok(any("buyers", "1").await? == 0
            || any("revenue_agg", "granularity = 'quarter_hour'").await? == 0)
    }

    /// Runs every remaining step of `run`.
    pub async fn execute(&self, run: &Run) -> Result<Outcome> {
        if !self.wait_for_relay(run).await? {
            tracing::warn!(
                run_id = run.run_id,
                "The lake relay has not passed the cut yet"
            );
            return Ok(Outcome::RelayBehind { run_id: run.run_id });
        }
        let t = Instant::now();
        let written = self.write_lake(run).await?;
        let lake_ms = t.elapsed().as_millis() as u64;
        let lake_peak_mb = peak_resident_mb();
        let rebuilt;
        let source = match run.kind {
            Kind::Incremental => &written.orders,
            Kind::Rebuild => {
                rebuilt = self.read_lake(run.threshold).await?;
                &rebuilt
            }
        };
        // The lake is written: its read-back, the audit's first half, needs
        // nothing the stage makes, and waits on S3 more than it computes, so it
        // runs beside the stage rather than after it, as a task of its own:
        // nothing it does can then hold up a wake-up of the stage's futures
        // (`lake::read_column_groups`).
        let t = Instant::now();
        let read_back = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(timed(
            t,
            audit::read_back_lake(
                self.store.clone(),
                written.parquet_keys.clone(),
                self.settings.read_back_timeout,
                run.run_id,
            ),
        )));
        let staged = self.stage(run, source).await?;
        let stage_ms = t.elapsed().as_millis() as u64;
        let (parquet, read_back_ms) = read_back.await.expect("the read-back does not panic");
        let parquet = parquet?;
        let stage_peak_mb = peak_resident_mb();
        let t = Instant::now();
        let report = self.audit_read_back(run, &written, source, parquet).await?;
        let audit_ms = t.elapsed().as_millis() as u64;
        let audit_peak_mb = peak_resident_mb();
        if !report.problems.is_empty() {
            return self.fail(run, report).await;
        }
        let t = Instant::now();
        self.publish(run, &report).await?;
        tracing::info!(
            run_id = run.run_id,
            rows = written.orders.height(),
            lake_ms,
            stage_ms,
            read_back_ms,
            audit_ms,
            publish_ms = t.elapsed().as_millis() as u64,
            lake_peak_mb,
            stage_peak_mb,
            audit_peak_mb,
            "Batch run steps"
        );
        if let Err(e) = self.compact(&written.days).await {
            tracing::warn!(error = %e, "Lake compaction failed; it is retried after the next run");
        }
        metrics::counter!("compactor_rows_in_total").increment(written.orders.height() as u64);
        metrics::counter!("compactor_rows_out_total").increment(staged);
        Ok(Outcome::Published {
            run_id: run.run_id,
            rows_in: written.orders.height() as u64,
            rows_out: staged,
            held_on_disk: written.orders.spilled().0,
        })
    }

    /// The lease token of the run in progress (0 outside a run).
    pub(crate) fn token(&self) -> u64 {
        self.fence.lock().expect("fence").map_or(0, |f| f.token)
    }

    /// A transaction for one of the run's writes, bounded by the lease (see
    /// [`Fence::bound`]); end it with [`Compactor::commit`].
    pub(crate) async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        let mut tx = self.pool.begin().await?;
        let fence = *self.fence.lock().expect("fence");
        if let Some(fence) = fence {
            fence.bound(&mut tx).await?;
        }
        Ok(tx)
    }

    /// Commits a write of the run if this runner still holds the lease.
    pub(crate) async fn commit(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
    ) -> Result<()> {
        let fence = *self.fence.lock().expect("fence");
        if let Some(fence) = fence {
            fence.check(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records the step the run has reached: a write of the run like the others, so
    /// a runner that lost the lease stops at its next step at the latest.
    async fn set_step(&self, run: &Run, step: &str) -> Result<()> {
        tracing::info!(run_id = run.run_id, step, "Batch run step");
        let mut tx = self.begin().await?;
        sqlx::query("UPDATE batch_runs SET step = $2 WHERE run_id = $1")
            .bind(run.run_id as i64)
            .bind(step)
            .execute(&mut *tx)
            .await?;
        self.commit(tx).await
    }
}
