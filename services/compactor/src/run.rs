//! A batch run, step by step: plan → wait for the relay → write the lake → stage →
//! audit → publish.
//!
//! *Plan* resumes the run in progress, if any; otherwise it cuts a new speed epoch
//! and records the run in the same transaction, so the run's threshold is that
//! transaction's id. The run covers the orders with `txid` below the threshold:
//! the new ones (from the previous published threshold) come from the raw lake,
//! and a rebuild re-reads everything older from the Parquet lake.
//!
//! Every step is idempotent: files have deterministic names, staging is rebuilt
//! from scratch, publishing attaches each staging partition to `revenue_agg` once
//! (and `FINAL` would fold a row copied twice), and the flip is one Postgres
//! transaction guarded by the run's status. A run killed at
//! any step is resumed by the next invocation and ends in the same state.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use polars::prelude::*;
use serde::Serialize;
use sqlx::PgPool;
use tidemark_batchview::PublishedState;
use tidemark_domain::{Currency, Dimension, Granularity};
use tidemark_orderlog::epochs;

use crate::aggregate::{self, CurrencyTotals};
use crate::config::CompactorSettings;
use crate::lake::{self, LakeError, Store};

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
}

impl Run {
    fn staging(&self) -> String {
        format!("staging_run_{}", self.run_id)
    }
}

/// How a run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Published {
        run_id: u64,
        rows_in: u64,
        rows_out: u64,
    },
    /// The audit failed: nothing published, staging kept.
    AuditFailed { run_id: u64, problems: Vec<String> },
    /// The relay has not landed every row below the cut yet; the run stays pending.
    RelayBehind { run_id: u64 },
}

/// The new orders a run read from the raw lake and wrote to the Parquet lake.
pub struct Written {
    /// Orders with `created_us` and `revenue`.
    pub orders: DataFrame,
    /// Raw records in the run's range, before de-duplication.
    pub raw_records: u64,
    pub raw_totals: CurrencyTotals,
    /// The run's Parquet files.
    pub parquet_keys: Vec<String>,
    pub days: BTreeSet<i64>,
}

/// The audit's findings (stored with the run).
#[derive(Debug, Default, Serialize)]
pub struct AuditReport {
    pub raw_records: u64,
    pub raw: CurrencyTotals,
    pub parquet: CurrencyTotals,
    pub source: CurrencyTotals,
    pub staging_rows: u64,
    pub problems: Vec<String>,
}

pub struct Compactor {
    pub pool: PgPool,
    pub ch: clickhouse::Client,
    pub store: Store,
    pub settings: CompactorSettings,
}

/// Batch lag: now minus the published watermark's time.
pub(crate) fn set_batch_lag(state: &PublishedState) {
    let lag = (Utc::now() - state.watermark_time)
        .num_milliseconds()
        .max(0);
    metrics::gauge!("compactor_batch_lag_seconds").set(lag as f64 / 1000.0);
}

/// An arbitrary, fixed key for the compactor's advisory lock.
const LOCK_KEY: i64 = 0x7469_6465_6d61_726b; // "tidemark"

impl Compactor {
    /// Plans and executes one run of `kind` (finishing a pending run first).
    pub async fn run_once(&self, kind: Kind) -> Result<Outcome> {
        let started = Instant::now();
        // A connection of its own, out of the pool: if this future is dropped
        // mid-run, closing it releases the session lock (a pooled connection would
        // go back to the pool still holding it).
        let mut lock = self.pool.acquire().await?.detach();
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(LOCK_KEY)
            .execute(&mut lock)
            .await?;
        let result = async {
            self.repair().await?;
            if let Some(pending) = self.pending().await? {
                let outcome = self.execute(&pending).await?;
                if !matches!(outcome, Outcome::Published { .. }) || pending.kind == kind {
                    return Ok(outcome);
                }
            }
            let run = self.plan(kind).await?;
            self.execute(&run).await
        }
        .await;
        // Closing the session releases its lock.
        drop(sqlx::Connection::close(lock).await);
        metrics::histogram!("compactor_run_seconds").record(started.elapsed().as_secs_f64());
        if let Ok(Outcome::Published { .. }) = &result
            && let Ok(Some(state)) = PublishedState::load(&self.pool).await
        {
            set_batch_lag(&state);
        }
        result
    }

    /// The run in progress, if any.
    pub async fn pending(&self) -> Result<Option<Run>> {
        let row: Option<(i64, String, i64, i64, i64, DateTime<Utc>)> = sqlx::query_as(
            "SELECT r.run_id, r.kind, r.epoch, r.from_threshold::text::int8, \
                    r.threshold::text::int8, c.created_at \
             FROM batch_runs r JOIN speed_cuts c USING (epoch) WHERE r.status = 'running'",
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(
            row.map(|(run_id, kind, epoch, from, threshold, cut_at)| Run {
                run_id: run_id as u64,
                kind: if kind == "rebuild" {
                    Kind::Rebuild
                } else {
                    Kind::Incremental
                },
                epoch: epoch as u64,
                from_threshold: from as u64,
                threshold: threshold as u64,
                cut_at,
            }),
        )
    }

    /// Cuts a new epoch and records the run, in one transaction.
    pub async fn plan(&self, kind: Kind) -> Result<Run> {
        let mut tx = self.pool.begin().await?;
        let published = PublishedState::load(&mut *tx).await?;
        let from_threshold = published.map_or(0, |p| p.threshold);
        let (epoch, threshold) = epochs::cut(&mut *tx).await?;
        let (run_id, cut_at): (i64, DateTime<Utc>) = sqlx::query_as(
            "INSERT INTO batch_runs (run_id, kind, epoch, from_threshold, threshold, status) \
             SELECT COALESCE(max(run_id), 0) + 1, $1, $2, $3::int8::text::xid8, \
                    $4::int8::text::xid8, 'running' FROM batch_runs \
             RETURNING run_id, (SELECT created_at FROM speed_cuts WHERE epoch = $2)",
        )
        .bind(kind.as_str())
        .bind(epoch as i64)
        .bind(from_threshold as i64)
        .bind(threshold as i64)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(
            run_id,
            kind = kind.as_str(),
            epoch,
            threshold,
            "Planned a batch run"
        );
        Ok(Run {
            run_id: run_id as u64,
            kind,
            epoch,
            from_threshold,
            threshold,
            cut_at,
        })
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
        let source = match run.kind {
            Kind::Incremental => written.orders.clone(),
            Kind::Rebuild => self.read_lake(run.threshold).await?,
        };
        let t = Instant::now();
        let staged = self.stage(run, &source).await?;
        let stage_ms = t.elapsed().as_millis() as u64;
        let t = Instant::now();
        let report = self.audit(run, &written, &source).await?;
        let audit_ms = t.elapsed().as_millis() as u64;
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
            audit_ms,
            publish_ms = t.elapsed().as_millis() as u64,
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
        })
    }

    async fn set_step(&self, run: &Run, step: &str) -> Result<()> {
        sqlx::query("UPDATE batch_runs SET step = $2 WHERE run_id = $1")
            .bind(run.run_id as i64)
            .bind(step)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// True once the relay has landed every row below the run's threshold.
    pub async fn wait_for_relay(&self, run: &Run) -> Result<bool> {
        self.set_step(run, "wait_for_relay").await?;
        let deadline = Instant::now() + self.settings.relay_wait;
        loop {
            let horizon: Option<i64> = sqlx::query_scalar(
                "SELECT horizon::text::int8 FROM consumer_cursors WHERE consumer = 'lake-relay'",
            )
            .fetch_optional(&self.pool)
            .await?;
            if horizon.is_some_and(|h| h as u64 >= run.threshold) {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Reads the run's new orders from the raw lake and writes them to the Parquet
    /// lake, one file per event date.
    ///
    /// A task downloads the raw objects (eight at a time) and parses them (two at a
    /// time, on blocking threads), keeping only the run's range; meanwhile this one
    /// types, de-duplicates and encodes them in groups of about [`GROUP_ROWS`]
    /// records. Memory holds a group of raw records and the Parquet files being
    /// written, not the whole run as text or as full frames.
    pub async fn write_lake(&self, run: &Run) -> Result<Written> {
        /// Records per group (each a Parquet row group per date): large enough
        /// for good row groups (DuckDB writes 122,880 rows), small enough that the
        /// first group's encoding starts early and overlaps the rest's parsing.
        const GROUP_ROWS: usize = 250_000;
        self.set_step(run, "write_lake").await?;
        let keys: Vec<String> = sqlx::query_scalar(
            "SELECT key FROM lake_raw_files \
             WHERE max_txid >= $1::int8::text::xid8 AND min_txid < $2::int8::text::xid8 \
             ORDER BY key",
        )
        .bind(run.from_threshold as i64)
        .bind(run.threshold as i64)
        .fetch_all(&self.pool)
        .await?;
        let raw_files = keys.len();
        let (from, to) = (run.from_threshold, run.threshold);
        let (tx, mut parsed) = tokio::sync::mpsc::channel::<Result<DataFrame>>(4);
        let store = self.store.clone();
        let reader = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            let mut frames = futures::stream::iter(keys)
                .map(move |key| {
                    let store = store.clone();
                    async move { store.get(&key).await }
                })
                .buffered(8)
                .map(|body| async move {
                    let body = body?;
                    tokio::task::spawn_blocking(move || {
                        lake::in_range(lake::parse_raw(&body)?, from, to)
                    })
                    .await
                    .expect("the parse task does not panic")
                    .map_err(RunError::from)
                })
                .buffered(2);
            while let Some(frame) = frames.next().await {
                let failed = frame.is_err();
                if tx.send(frame).await.is_err() || failed {
                    return;
                }
            }
        }));
        let (mut writer, mut group, mut rows) = (lake::LakeWriter::default(), Vec::new(), 0);
        let (mut wait_ms, mut encode_ms) = (0, 0);
        loop {
            let t = Instant::now();
            let next = parsed.recv().await.transpose()?;
            wait_ms += t.elapsed().as_millis() as u64;
            let done = next.is_none();
            if let Some(frame) = next {
                rows += frame.height();
                group.push(frame);
            }
            if rows >= GROUP_ROWS || (done && !group.is_empty()) {
                let t = Instant::now();
                let frames = std::mem::take(&mut group);
                writer = tokio::task::spawn_blocking(move || writer.add(frames).map(|()| writer))
                    .await
                    .expect("the lake task does not panic")?;
                encode_ms += t.elapsed().as_millis() as u64;
                rows = 0;
            }
            if done {
                break;
            }
        }
        // The channel also closes if the reader died: only its clean end means that
        // every object was read.
        reader.await.expect("the raw reader does not panic");
        let t = Instant::now();
        let (raw_records, raw_totals) = (writer.raw_records, writer.raw_totals.clone());
        let (files, orders) = tokio::task::spawn_blocking(move || writer.finish())
            .await
            .expect("the lake task does not panic")?;
        let mut written = Written {
            orders,
            raw_records,
            raw_totals,
            parquet_keys: Vec::new(),
            days: BTreeSet::new(),
        };
        let run_id = run.run_id;
        for file in files {
            let key = lake::lake_key(file.day, &format!("part-{run_id:012}"));
            let bytes = file.body.len() as i64;
            self.store.put(&key, file.body).await?;
            sqlx::query(
                "INSERT INTO lake_files (key, dt, run_id, rows, bytes) \
                 VALUES ($1, to_timestamp($2 * 86400)::date, $3, $4, $5) \
                 ON CONFLICT (key) DO UPDATE SET rows = EXCLUDED.rows, bytes = EXCLUDED.bytes",
            )
            .bind(&key)
            .bind(file.day as f64)
            .bind(run_id as i64)
            .bind(file.rows as i64)
            .bind(bytes)
            .execute(&self.pool)
            .await?;
            written.parquet_keys.push(key);
            written.days.insert(file.day);
        }
        tracing::info!(
            run_id = run.run_id,
            raw_files,
            raw_records = written.raw_records,
            orders = written.orders.height(),
            parquet_files = written.parquet_keys.len(),
            wait_ms,
            encode_ms,
            upload_ms = t.elapsed().as_millis() as u64,
            "Lake written"
        );
        Ok(written)
    }

    /// Every order in the Parquet lake with `txid < threshold`.
    pub async fn read_lake(&self, threshold: u64) -> Result<DataFrame> {
        let keys: Vec<String> = sqlx::query_scalar("SELECT key FROM lake_files ORDER BY key")
            .fetch_all(&self.pool)
            .await?;
        let frames = self.read_parquet(&keys).await?;
        if frames.is_empty() {
            return Ok(DataFrame::empty());
        }
        let all = concat(
            frames.into_iter().map(IntoLazy::lazy).collect::<Vec<_>>(),
            UnionArgs::default(),
        )?
        .filter(col("txid").lt(lit(threshold.min(i64::MAX as u64) as i64)));
        Ok(lake::with_measures(all).collect()?)
    }

    /// Downloads objects, eight at a time, in order.
    async fn fetch(&self, keys: &[String]) -> Result<Vec<bytes::Bytes>> {
        let bodies: Vec<bytes::Bytes> = futures::stream::iter(keys.to_vec())
            .map(|key| {
                let store = self.store.clone();
                async move { store.get(&key).await }
            })
            .buffered(8)
            .try_collect()
            .await?;
        Ok(bodies)
    }

    async fn read_parquet(&self, keys: &[String]) -> Result<Vec<DataFrame>> {
        let bodies = self.fetch(keys).await?;
        let mut frames = Vec::with_capacity(bodies.len());
        for body in bodies {
            frames.push(lake::from_parquet(&body)?);
        }
        Ok(frames)
    }

    /// Writes the run's aggregates to a staging table of its own (rebuilt from
    /// scratch on every attempt), shaped like `revenue_agg` so that publishing can
    /// attach its partitions. Returns the rows staged.
    pub async fn stage(&self, run: &Run, source: &DataFrame) -> Result<u64> {
        /// Inserts running at once: ClickHouse parses and writes each on threads of
        /// its own while this process serialises the next.
        const INSERTS: usize = 3;
        self.set_step(run, "stage").await?;
        let t = Instant::now();
        let orders = source.clone();
        let aggregates = tokio::task::spawn_blocking(move || aggregate::grids(&orders))
            .await
            .expect("the aggregation task does not panic")?;
        let aggregate_ms = t.elapsed().as_millis() as u64;
        let t = Instant::now();
        let staging = run.staging();
        self.ch
            .query(&format!("DROP TABLE IF EXISTS {staging}"))
            .execute()
            .await?;
        self.ch
            .query(&format!("CREATE TABLE {staging} AS revenue_agg"))
            .execute()
            .await?;
        // Staging is written once and attached whole: merging its parts would only
        // spend CPU during the run (revenue_agg merges them later).
        self.ch
            .query(&format!("SYSTEM STOP MERGES {staging}"))
            .execute()
            .await?;
        let staged: usize = aggregates.grids.iter().map(|g| g.cells.height()).sum();
        // The grids in batches of about a third of the rows each (ClickHouse writes
        // each INSERT as a few parts, so few large ones), as zero-copy slices. The
        // grids come in revenue_agg's order and each is sorted by its key, so every
        // batch is sorted as the table is and ClickHouse does not sort it again.
        let batch_rows = staged.div_ceil(INSERTS).max(50_000);
        let mut batches: Vec<Vec<(usize, DataFrame)>> = vec![Vec::new()];
        let mut filled = 0;
        for (index, grid) in aggregates.grids.iter().enumerate() {
            let mut offset = 0;
            while offset < grid.cells.height() {
                let take = (batch_rows - filled).min(grid.cells.height() - offset);
                let slice = grid.cells.slice(offset as i64, take);
                batches
                    .last_mut()
                    .expect("never empty")
                    .push((index, slice));
                (offset, filled) = (offset + take, filled + take);
                if filled == batch_rows {
                    batches.push(Vec::new());
                    filled = 0;
                }
            }
        }
        let (ch, run_id) = (self.ch.clone(), run.run_id);
        let (table, aggregates) = (staging.clone(), std::sync::Arc::new(aggregates));
        futures::stream::iter(batches.into_iter().filter(|b| !b.is_empty()))
            .map(move |batch| {
                let (ch, staging, aggregates) = (ch.clone(), table.clone(), aggregates.clone());
                async move {
                    let mut insert = ch.insert::<aggregate::StagedRow<'_>>(&staging).await?;
                    for (index, cells) in &batch {
                        let grid = &aggregates.grids[*index];
                        for row in &aggregates.staged_rows(grid, cells, run_id)? {
                            insert.write(row).await?;
                        }
                    }
                    insert.end().await?;
                    Ok::<_, RunError>(())
                }
            })
            .buffer_unordered(INSERTS)
            .try_collect::<Vec<()>>()
            .await?;
        tracing::info!(
            run_id = run.run_id,
            rows = staged,
            aggregate_ms,
            insert_ms = t.elapsed().as_millis() as u64,
            "Staged"
        );
        Ok(staged as u64)
    }

    /// Reconciles raw JSON ↔ Parquet ↔ staging and checks keys, amounts and
    /// currencies.
    pub async fn audit(
        &self,
        run: &Run,
        written: &Written,
        source: &DataFrame,
    ) -> Result<AuditReport> {
        self.set_step(run, "audit").await?;
        let mut report = AuditReport {
            raw_records: written.raw_records,
            raw: written.raw_totals.clone(),
            ..AuditReport::default()
        };
        let deduped = aggregate::currency_totals(&written.orders)?;
        let duplicates = written.raw_records - written.orders.height() as u64;
        if duplicates > 0 {
            tracing::warn!(
                duplicates,
                run_id = run.run_id,
                "Raw records repeated an order id; kept the first"
            );
        } else if deduped != report.raw {
            report
                .problems
                .push("raw totals changed by de-duplication without duplicates".into());
        }

        #[derive(clickhouse::Row, serde::Deserialize)]
        struct Sums {
            granularity: String,
            dimension: String,
            currency: String,
            revenue: i64,
            orders: u64,
            items: u64,
            empty_values: u64,
            empty_orders: u64,
            negative: u64,
            rows: u64,
        }
        // The Parquet files, read back from S3 (only the columns the totals need,
        // fetched by range), and staging's sums in ClickHouse, both at once.
        let t = Instant::now();
        let parquet = async {
            const COLUMNS: [&str; 3] = ["currency", "quantity", "unit_price_minor"];
            let mut totals = CurrencyTotals::new();
            let mut frames = futures::stream::iter(written.parquet_keys.clone())
                .map(|key| {
                    let store = self.store.clone();
                    async move { lake::read_columns(&store, &key, &COLUMNS).await }
                })
                .buffered(2);
            while let Some(frame) = frames.try_next().await? {
                aggregate::add_totals(&mut totals, aggregate::currency_totals(&frame)?);
            }
            Ok::<_, RunError>((totals, t.elapsed().as_millis() as u64))
        };
        let sums = async {
            Ok::<_, RunError>((
                self.ch
                    .query(&format!(
                        "SELECT toString(granularity) AS g, toString(dimension) AS d, currency AS c, \
                                sum(revenue_minor) AS s_revenue, sum(orders) AS s_orders, \
                                sum(items) AS s_items, \
                                countIf(value = '' AND dimension != 'total') AS s_empty_values, \
                                countIf(orders = 0) AS s_empty_orders, \
                                countIf(revenue_minor < 0) AS s_negative, count() AS s_rows \
                         FROM {} GROUP BY granularity, dimension, currency",
                        run.staging()
                    ))
                    .fetch_all::<Sums>()
                    .await?,
                t.elapsed().as_millis() as u64,
            ))
        };
        let ((parquet_totals, parquet_ms), (sums, staging_ms)) = tokio::try_join!(parquet, sums)?;
        tracing::info!(
            run_id = run.run_id,
            parquet_ms,
            staging_ms,
            "Audit read back"
        );
        if parquet_totals != deduped {
            report.problems.push(format!(
                "parquet totals {parquet_totals:?} differ from raw {deduped:?}"
            ));
        }
        report.parquet = parquet_totals;

        // Staging: every granularity × dimension adds up to the source, per currency.
        report.source = match run.kind {
            Kind::Incremental => deduped.clone(),
            Kind::Rebuild => aggregate::currency_totals(source)?,
        };
        let mut seen: BTreeMap<(String, String), CurrencyTotals> = BTreeMap::new();
        for s in &sums {
            report.staging_rows += s.rows;
            if s.currency.parse::<Currency>().is_err() {
                report
                    .problems
                    .push(format!("unknown currency `{}` in staging", s.currency));
            }
            if s.empty_values > 0 {
                report.problems.push(format!(
                    "{} rows of {} by {} have an empty key",
                    s.empty_values, s.granularity, s.dimension
                ));
            }
            if s.empty_orders > 0 || s.negative > 0 {
                report.problems.push(format!(
                    "{} by {} has rows without orders or with negative revenue",
                    s.granularity, s.dimension
                ));
            }
            seen.entry((s.granularity.clone(), s.dimension.clone()))
                .or_default()
                .insert(
                    s.currency.clone(),
                    [s.revenue, s.orders as i64, s.items as i64],
                );
        }
        for granularity in Granularity::ALL {
            for dimension in Dimension::ALL {
                let key = (
                    granularity.as_str().to_owned(),
                    dimension.as_str().to_owned(),
                );
                let staged = seen.remove(&key).unwrap_or_default();
                if staged != report.source {
                    report.problems.push(format!(
                        "staging {granularity} by {dimension} sums to {staged:?}, the orders to {:?}",
                        report.source
                    ));
                }
            }
        }
        for (granularity, dimension) in seen.keys() {
            report.problems.push(format!(
                "unexpected staging rows for {granularity} by {dimension}"
            ));
        }
        Ok(report)
    }

    /// Records a failed audit. The run's lake files leave the manifest (the next run
    /// rewrites those orders), its staging table stays for inspection.
    pub async fn fail(&self, run: &Run, report: AuditReport) -> Result<Outcome> {
        metrics::counter!("compactor_audit_failures_total").increment(1);
        let files: Vec<String> = sqlx::query_scalar(
            "DELETE FROM lake_files WHERE run_id = $1 AND NOT compacted RETURNING key",
        )
        .bind(run.run_id as i64)
        .fetch_all(&self.pool)
        .await?;
        for key in files {
            self.store.delete(&key).await?;
        }
        tracing::error!(
            run_id = run.run_id,
            problems = ?report.problems,
            staging = run.staging(),
            "Audit failed; nothing published, staging kept for inspection"
        );
        sqlx::query(
            "UPDATE batch_runs SET status = 'failed', step = 'audit', audit = $2, error = $3, \
               finished_at = now() WHERE run_id = $1 AND status = 'running'",
        )
        .bind(run.run_id as i64)
        .bind(sqlx::types::Json(&report))
        .bind(report.problems.join("; "))
        .execute(&self.pool)
        .await?;
        Ok(Outcome::AuditFailed {
            run_id: run.run_id,
            problems: report.problems,
        })
    }

    /// Copies staging into `revenue_agg`, then switches the published state in one
    /// Postgres transaction: the moment readers see the run.
    pub async fn publish(&self, run: &Run, report: &AuditReport) -> Result<()> {
        let staged = self.copy(run).await?;
        self.flip(run, report, staged).await
    }

    /// Attaches the run's staging partitions to `revenue_agg` (invisible to readers
    /// until the flip: they read published runs only). ClickHouse attaches all parts
    /// of a partition at once, sharing their files; a partition already holding the
    /// run's rows (an attempt that died between partitions) is skipped, so a rerun
    /// adds no row twice. Returns the rows staged.
    pub async fn copy(&self, run: &Run) -> Result<u64> {
        self.set_step(run, "publish").await?;
        let staging = run.staging();
        let partitions: Vec<String> = self
            .ch
            .query(
                "SELECT DISTINCT partition_id FROM system.parts \
                 WHERE database = currentDatabase() AND table = ? AND active",
            )
            .bind(&staging)
            .fetch_all()
            .await?;
        // `revenue_agg` is partitioned by toYYYYMM(bucket) (migrations/clickhouse):
        // a partition's id is that number.
        let attached: Vec<String> = self
            .ch
            .query("SELECT DISTINCT toString(toYYYYMM(bucket)) FROM revenue_agg WHERE run_id = ?")
            .bind(run.run_id)
            .fetch_all()
            .await?;
        for partition in partitions.iter().filter(|p| !attached.contains(p)) {
            if !partition
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return Err(RunError::Publish(format!(
                    "unexpected partition id `{partition}` in {staging}"
                )));
            }
            self.ch
                .query(&format!(
                    "ALTER TABLE revenue_agg ATTACH PARTITION ID '{partition}' FROM {staging}"
                ))
                .execute()
                .await?;
        }
        let staged: u64 = self
            .ch
            .query(&format!("SELECT count() FROM {staging}"))
            .fetch_one()
            .await?;
        Ok(staged)
    }

    /// Makes the run the published state, with its watermark and epoch.
    pub async fn flip(&self, run: &Run, report: &AuditReport, staged: u64) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let base = match run.kind {
            Kind::Rebuild => run.run_id as i64,
            Kind::Incremental => PublishedState::load(&mut *tx)
                .await?
                .map_or(run.run_id, |p| p.base_run_id) as i64,
        };
        let claimed = sqlx::query(
            "UPDATE batch_runs SET status = 'published', step = 'published', rows_in = $2, \
               rows_out = $3, audit = $4, finished_at = now() \
             WHERE run_id = $1 AND status = 'running'",
        )
        .bind(run.run_id as i64)
        .bind(report.source.values().map(|t| t[1]).sum::<i64>())
        .bind(staged as i64)
        .bind(sqlx::types::Json(report))
        .execute(&mut *tx)
        .await?;
        if claimed.rows_affected() == 1 {
            sqlx::query(
                "INSERT INTO batch_state (run_id, base_run_id, epoch, threshold, watermark_time, published_at) \
                 VALUES ($1, $2, $3, $4::int8::text::xid8, $5, now()) \
                 ON CONFLICT (singleton) DO UPDATE SET run_id = EXCLUDED.run_id, \
                   base_run_id = EXCLUDED.base_run_id, epoch = EXCLUDED.epoch, \
                   threshold = EXCLUDED.threshold, watermark_time = EXCLUDED.watermark_time, \
                   published_at = EXCLUDED.published_at",
            )
            .bind(run.run_id as i64)
            .bind(base)
            .bind(run.epoch as i64)
            .bind(run.threshold as i64)
            .bind(run.cut_at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        tracing::info!(run_id = run.run_id, rows = staged, "Published a batch run");
        self.repair().await
    }

    /// Brings ClickHouse in line with the published state after a crash between
    /// the publish and its follow-ups: mirrors the publication, drops staging
    /// tables of published runs.
    pub async fn repair(&self) -> Result<()> {
        let Some(state) = PublishedState::load(&self.pool).await? else {
            return Ok(());
        };
        self.ch
            .query(
                "INSERT INTO batch_publications (run_id, base_run_id, watermark_txid, \
                   watermark_time, published_at) VALUES (?, ?, ?, ?, ?)",
            )
            .bind(state.run_id)
            .bind(state.base_run_id)
            .bind(state.threshold)
            .bind(state.watermark_time.timestamp().max(0) as u32)
            .bind(state.published_at.timestamp().max(0) as u32)
            .execute()
            .await?;
        let tables: Vec<String> = self
            .ch
            .query("SELECT name FROM system.tables WHERE database = currentDatabase() AND name LIKE 'staging_run_%'")
            .fetch_all()
            .await?;
        for table in tables {
            let Some(run_id) = table
                .strip_prefix("staging_run_")
                .and_then(|r| r.parse::<i64>().ok())
            else {
                continue;
            };
            let status: Option<String> =
                sqlx::query_scalar("SELECT status FROM batch_runs WHERE run_id = $1")
                    .bind(run_id)
                    .fetch_optional(&self.pool)
                    .await?;
            if status.as_deref() == Some("published") {
                self.ch
                    .query(&format!("DROP TABLE IF EXISTS {table}"))
                    .execute()
                    .await?;
            }
        }
        Ok(())
    }

    /// Merges a date partition's files into one once it holds too many.
    pub async fn compact(&self, days: &BTreeSet<i64>) -> Result<()> {
        for day in days {
            let files: Vec<(String, i64)> = sqlx::query_as(
                "SELECT key, run_id FROM lake_files WHERE dt = to_timestamp($1 * 86400)::date ORDER BY key",
            )
            .bind(*day as f64)
            .fetch_all(&self.pool)
            .await?;
            if files.len() <= self.settings.max_files_per_partition {
                continue;
            }
            let keys: Vec<String> = files.iter().map(|(k, _)| k.clone()).collect();
            let newest = files.iter().map(|(_, r)| *r).max().unwrap_or(0);
            let frames = self.read_parquet(&keys).await?;
            let mut merged = concat(
                frames.into_iter().map(IntoLazy::lazy).collect::<Vec<_>>(),
                UnionArgs::default(),
            )?
            .sort(["txid", "seq"], SortMultipleOptions::default())
            .collect()?;
            let key = lake::lake_key(*day, &format!("compact-{newest:012}"));
            let rows = merged.height() as i64;
            let body = lake::to_parquet(&mut merged)?;
            let bytes = body.len() as i64;
            self.store.put(&key, body).await?;
            let mut tx = self.pool.begin().await?;
            sqlx::query("DELETE FROM lake_files WHERE key = ANY($1) AND key <> $2")
                .bind(&keys)
                .bind(&key)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO lake_files (key, dt, run_id, rows, bytes, compacted) \
                 VALUES ($1, to_timestamp($2 * 86400)::date, $3, $4, $5, true) \
                 ON CONFLICT (key) DO UPDATE SET rows = EXCLUDED.rows, bytes = EXCLUDED.bytes",
            )
            .bind(&key)
            .bind(*day as f64)
            .bind(newest)
            .bind(rows)
            .bind(bytes)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            // Objects in the partition that the manifest no longer lists.
            let listed: BTreeSet<String> = sqlx::query_scalar(
                "SELECT key FROM lake_files WHERE dt = to_timestamp($1 * 86400)::date",
            )
            .bind(*day as f64)
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .collect();
            let prefix = key.rsplit_once('/').map_or("", |(p, _)| p).to_owned() + "/";
            for object in self.store.list(&prefix).await? {
                if !listed.contains(&object) {
                    self.store.delete(&object).await?;
                }
            }
            tracing::info!(key, files = keys.len(), rows, "Compacted a lake partition");
        }
        Ok(())
    }
}

impl Compactor {
    /// Re-derives the lake's date partitions in `[from, to]` from the raw JSON
    /// (everything the published batch view covers), then rebuilds the aggregates.
    pub async fn backfill(
        &self,
        from: chrono::NaiveDate,
        to: chrono::NaiveDate,
    ) -> Result<Outcome> {
        if let Some(state) = PublishedState::load(&self.pool).await? {
            let mut day = from;
            while day <= to {
                self.rewrite_partition(day, &state).await?;
                day = day.succ_opt().unwrap_or(to);
                if day == to && day == from {
                    break;
                }
            }
        }
        self.run_once(Kind::Rebuild).await
    }

    async fn rewrite_partition(&self, dt: chrono::NaiveDate, state: &PublishedState) -> Result<()> {
        let keys: Vec<String> = sqlx::query_scalar(
            "SELECT key FROM lake_raw_files WHERE dt = $1 AND min_txid < $2::int8::text::xid8 ORDER BY key",
        )
        .bind(dt)
        .bind(state.threshold as i64)
        .fetch_all(&self.pool)
        .await?;
        let mut raw_bytes = Vec::new();
        for key in &keys {
            let body = self.store.get(key).await?;
            raw_bytes.extend_from_slice(&body);
            if !body.ends_with(b"\n") {
                raw_bytes.push(b'\n');
            }
        }
        let day = dt
            .and_hms_opt(0, 0, 0)
            .map_or(0, |t| t.and_utc().timestamp() / 86_400);
        let key = lake::lake_key(day, &format!("backfill-{:012}", state.run_id));
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM lake_files WHERE dt = $1")
            .bind(dt)
            .execute(&mut *tx)
            .await?;
        if !raw_bytes.is_empty() {
            let raw = lake::parse_raw(&raw_bytes)?;
            let mut orders = lake::orders_from_raw(raw, 0, state.threshold)?;
            if orders.height() > 0 {
                let rows = orders.height() as i64;
                let body = lake::to_parquet(&mut orders)?;
                let bytes = body.len() as i64;
                self.store.put(&key, body).await?;
                sqlx::query(
                    "INSERT INTO lake_files (key, dt, run_id, rows, bytes, compacted) \
                     VALUES ($1, $2, $3, $4, $5, true)",
                )
                .bind(&key)
                .bind(dt)
                .bind(state.run_id as i64)
                .bind(rows)
                .bind(bytes)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        let prefix = lake::lake_key(day, "x");
        let prefix = prefix.rsplit_once('/').map_or("", |(p, _)| p).to_owned() + "/";
        let listed: BTreeSet<String> =
            sqlx::query_scalar("SELECT key FROM lake_files WHERE dt = $1")
                .bind(dt)
                .fetch_all(&self.pool)
                .await?
                .into_iter()
                .collect();
        for object in self.store.list(&prefix).await? {
            if !listed.contains(&object) {
                self.store.delete(&object).await?;
            }
        }
        tracing::info!(%dt, raw_files = keys.len(), "Rewrote a lake partition from the raw lake");
        Ok(())
    }
}
