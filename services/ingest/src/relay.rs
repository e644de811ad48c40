//! The lake relay: tails the orders log and lands raw JSON Lines in S3.
//!
//! Each step plans a batch, writes it, and confirms it:
//!
//! 1. *Plan.* Read the tail after the cursor. Record the batch's end as the
//!    cursor's `pending` position (compare-and-set on the cursor).
//! 2. *Write.* Group the rows by event hour and PUT one object per hour under a key
//!    derived from the batch bounds: `raw/orders/dt=…/hour=…/<after>-<until>.jsonl`.
//! 3. *Confirm.* In one transaction, add the objects to `lake_raw_files` and move
//!    the cursor to the batch end.
//!
//! A crash anywhere redoes the pending batch with exactly the same bounds, hence the
//! same rows and keys: a retried PUT overwrites the object, and the manifest insert
//! is idempotent. Nothing is lost (the cursor moves only after the objects exist)
//! and nothing is duplicated (same key, same content).
//!
//! Several relays may run (one per ingest instance); the one holding the
//! `lake-relay` lease writes, and the plan and the confirmation check its token
//! in their transactions ([`tidemark_platform::lease`]). A former leader's late
//! PUT rewrites a pending batch's objects with the same content.
//!
//! A row this build cannot decode stops the relay right before it: the rows before
//! it land, its horizon is not recorded (the compactor would take the rows below
//! it as landed), and nothing after it is relayed until a build that can decode it
//! runs (see [`tidemark_platform::worker`]).

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use chrono::{Datelike, NaiveDate, Timelike};
use futures::{StreamExt, TryStreamExt};
use sqlx::PgPool;
use tidemark_domain::LogPosition;
use tidemark_orderlog::{LogError, LogRow, RawRecord, TAIL_TRANSACTION, Undecodable};
use tidemark_platform::config::S3Config;
use tidemark_platform::lease::{FenceError, Fenced, Lease};
use tidemark_platform::worker::{self, Pace, Pacing, Status};
use tokio_util::sync::CancellationToken;

use crate::config::RelaySettings;

/// The relay's row in `consumer_cursors`.
pub const CONSUMER: &str = "lake-relay";

/// Objects of one batch put to S3 at the same time.
const PARALLEL_PUTS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("s3: {0}")]
    S3(String),
    #[error(transparent)]
    Undecodable(#[from] Undecodable),
    #[error(transparent)]
    Fenced(#[from] Fenced),
}

impl From<FenceError> for RelayError {
    fn from(e: FenceError) -> Self {
        match e {
            FenceError::Postgres(e) => RelayError::Postgres(e),
            FenceError::Fenced(e) => RelayError::Fenced(e),
        }
    }
}

impl From<LogError> for RelayError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::Postgres(e) => RelayError::Postgres(e),
            LogError::Undecodable(e) => RelayError::Undecodable(e),
        }
    }
}

impl worker::StepError for RelayError {
    fn store(&self) -> &'static str {
        match self {
            RelayError::Postgres(_) | RelayError::Undecodable(_) => "postgres",
            RelayError::S3(_) => "s3",
            RelayError::Fenced(_) => "lease",
        }
    }

    fn stopped_at(&self) -> Option<String> {
        match self {
            RelayError::Undecodable(row) => Some(row.position.to_string()),
            _ => None,
        }
    }
}

/// What one step did.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Landed a batch of this many rows in this many objects.
    Wrote { rows: usize, objects: usize },
    /// Nothing new below the horizon.
    Idle,
    /// Another relay moved the cursor first.
    Contended,
    /// Another instance holds the lease.
    Standby,
}

#[derive(Debug, Clone, Copy)]
struct Cursor {
    position: LogPosition,
    horizon: u64,
    pending: Option<LogPosition>,
}

struct RawObject {
    key: String,
    dt: NaiveDate,
    hour: i16,
    body: Vec<u8>,
    rows: i32,
    min_txid: u64,
    max_txid: u64,
}

#[derive(Clone)]
pub struct Relay {
    pool: PgPool,
    s3: aws_sdk_s3::Client,
    s3_config: S3Config,
    settings: RelaySettings,
    status: Status,
    lease: Lease,
}

impl Relay {
    /// A relay that writes while `lease` leads ([`Lease::unfenced`]: always).
    pub fn new(
        pool: PgPool,
        s3: aws_sdk_s3::Client,
        s3_config: S3Config,
        settings: RelaySettings,
        lease: Lease,
    ) -> Self {
        Self {
            pool,
            s3,
            s3_config,
            settings,
            status: Status::default(),
            lease,
        }
    }

    /// Whether the relay is stopped at a row it cannot decode (for `/readyz`).
    pub fn status(&self) -> Status {
        self.status.clone()
    }

    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Runs steps until `shutdown`, backing off while S3 or Postgres fail.
    /// A step in progress is finished (or fails) before stopping.
    pub async fn run(self, shutdown: CancellationToken) {
        let lag = tokio::spawn(self.clone().report_lag(shutdown.clone()));
        let pacing = Pacing {
            poll_interval: self.settings.poll_interval,
            min_backoff: Duration::from_millis(100),
            max_backoff: self.settings.max_backoff,
        };
        worker::run(
            "relay",
            &["postgres", "s3"],
            pacing,
            &self.status,
            shutdown,
            || async {
                let step = self.step().await?;
                Ok::<_, RelayError>(match step {
                    Step::Wrote { rows, objects } => {
                        metrics::counter!("relay_rows_total").increment(rows as u64);
                        metrics::counter!("relay_objects_total").increment(objects as u64);
                        Pace::Progress
                    }
                    Step::Idle | Step::Standby => Pace::Idle,
                    Step::Contended => Pace::Contended,
                })
            },
        )
        .await;
        lag.abort();
    }

    async fn report_lag(self, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            if let Ok(cursor) = load_cursor(&self.pool).await
                && let Ok(lag) = tidemark_orderlog::lag(&self.pool, cursor.position).await
            {
                metrics::gauge!("relay_lag_rows").set(lag.rows as f64);
                metrics::gauge!("relay_lag_seconds").set(lag.seconds);
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }

    /// Plans, writes and confirms one batch (or redoes the pending one).
    pub async fn step(&self) -> Result<Step, RelayError> {
        let Some(fence) = self.lease.fence() else {
            return Ok(Step::Standby);
        };
        let cursor = load_cursor(&self.pool).await?;
        let (until, rows) = match cursor.pending {
            Some(until) => {
                let rows = tidemark_orderlog::range(&self.pool, cursor.position, until).await?;
                (until, rows)
            }
            None => {
                let mut read = self.pool.begin_with(TAIL_TRANSACTION).await?;
                let tail =
                    tidemark_orderlog::tail(&mut *read, cursor.position, self.settings.batch_size)
                        .await?;
                read.commit().await?;
                let Some(last) = tail.rows.last() else {
                    if let Some(stopped) = tail.stopped {
                        // The horizon is not passed: the row below it is not landed.
                        return Err(stopped.into());
                    }
                    if tail.horizon > cursor.horizon {
                        let mut tx = self.pool.begin().await?;
                        sqlx::query(
                            "UPDATE consumer_cursors SET horizon = $2::int8::text::xid8, \
                             updated_at = now() WHERE consumer = $1 AND pending_txid IS NULL",
                        )
                        .bind(CONSUMER)
                        .bind(tail.horizon as i64)
                        .execute(&mut *tx)
                        .await?;
                        fence.check(&mut tx).await?;
                        tx.commit().await?;
                    }
                    return Ok(Step::Idle);
                };
                let until = last.position;
                let horizon = tail.complete.then_some(tail.horizon);
                let mut tx = self.pool.begin().await?;
                let planned = sqlx::query(
                    "UPDATE consumer_cursors SET pending_txid = $4::int8::text::xid8, \
                       pending_seq = $5, pending_horizon = $6::int8::text::xid8, updated_at = now() \
                     WHERE consumer = $1 AND txid = $2::int8::text::xid8 AND seq = $3 \
                       AND pending_txid IS NULL",
                )
                .bind(CONSUMER)
                .bind(cursor.position.txid as i64)
                .bind(cursor.position.seq)
                .bind(until.txid as i64)
                .bind(until.seq)
                .bind(horizon.map(|h| h as i64))
                .execute(&mut *tx)
                .await?;
                fence.check(&mut tx).await?;
                tx.commit().await?;
                if planned.rows_affected() == 0 {
                    return Ok(Step::Contended);
                }
                (until, tail.rows)
            }
        };

        let objects = objects(cursor.position, until, &rows);
        // A batch spread over many event hours is many objects: they are put a few
        // at a time (catching up after an S3 outage is otherwise one round trip per
        // hour of the backlog). All or none are confirmed: on any failure the pending
        // batch is redone with the same keys.
        let puts: Vec<_> = objects
            .iter()
            .map(|object| {
                self.s3
                    .put_object()
                    .bucket(&self.s3_config.bucket)
                    .key(self.s3_config.key(&object.key))
                    .content_type("application/x-ndjson")
                    .body(ByteStream::from(object.body.clone()))
                    .send()
            })
            .collect();
        futures::stream::iter(puts)
            .buffer_unordered(PARALLEL_PUTS)
            .try_for_each(|_| async { Ok(()) })
            .await
            .map_err(|e| RelayError::S3(aws_sdk_s3::error::DisplayErrorContext(&e).to_string()))?;

        let mut tx = self.pool.begin().await?;
        let column = |f: fn(&RawObject) -> i64| objects.iter().map(f).collect::<Vec<i64>>();
        sqlx::query(
            "INSERT INTO lake_raw_files (key, dt, hour, after_txid, after_seq, until_txid, \
               until_seq, min_txid, max_txid, rows, bytes) \
             SELECT o.key, o.dt, o.hour, $4::int8::text::xid8, $5, $6::int8::text::xid8, $7, \
               o.min_txid::text::xid8, o.max_txid::text::xid8, o.rows, o.bytes \
             FROM UNNEST($1::text[], $2::date[], $3::int2[], $8::int8[], $9::int8[], \
                         $10::int4[], $11::int8[]) \
               AS o(key, dt, hour, min_txid, max_txid, rows, bytes) \
             ON CONFLICT (key) DO NOTHING",
        )
        .bind(objects.iter().map(|o| o.key.as_str()).collect::<Vec<_>>())
        .bind(objects.iter().map(|o| o.dt).collect::<Vec<_>>())
        .bind(objects.iter().map(|o| o.hour).collect::<Vec<_>>())
        .bind(cursor.position.txid as i64)
        .bind(cursor.position.seq)
        .bind(until.txid as i64)
        .bind(until.seq)
        .bind(column(|o| o.min_txid as i64))
        .bind(column(|o| o.max_txid as i64))
        .bind(objects.iter().map(|o| o.rows).collect::<Vec<_>>())
        .bind(column(|o| o.body.len() as i64))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE consumer_cursors SET txid = pending_txid, seq = pending_seq, \
               horizon = GREATEST(horizon, COALESCE(pending_horizon, horizon)), \
               pending_txid = NULL, pending_seq = NULL, pending_horizon = NULL, updated_at = now() \
             WHERE consumer = $1 AND pending_txid = $2::int8::text::xid8 AND pending_seq = $3",
        )
        .bind(CONSUMER)
        .bind(until.txid as i64)
        .bind(until.seq)
        .execute(&mut *tx)
        .await?;
        fence.check(&mut tx).await?;
        tx.commit().await?;
        Ok(Step::Wrote {
            rows: rows.len(),
            objects: objects.len(),
        })
    }
}

/// The relay's cursor, created at the start of the log on first use.
async fn load_cursor(pool: &PgPool) -> Result<Cursor, sqlx::Error> {
    type Row = (i64, i64, i64, Option<i64>, Option<i64>);
    let select = || {
        sqlx::query_as::<_, Row>(
            "SELECT txid::text::int8, seq, horizon::text::int8, pending_txid::text::int8, \
                    pending_seq \
             FROM consumer_cursors WHERE consumer = $1",
        )
        .bind(CONSUMER)
    };
    let row = match select().fetch_optional(pool).await? {
        Some(row) => row,
        None => {
            sqlx::query(
                "INSERT INTO consumer_cursors (consumer) VALUES ($1) ON CONFLICT DO NOTHING",
            )
            .bind(CONSUMER)
            .execute(pool)
            .await?;
            select().fetch_one(pool).await?
        }
    };
    let (txid, seq, horizon, pending_txid, pending_seq) = row;
    Ok(Cursor {
        position: LogPosition::new(txid as u64, seq),
        horizon: horizon as u64,
        pending: pending_txid
            .zip(pending_seq)
            .map(|(t, s)| LogPosition::new(t as u64, s)),
    })
}

/// The batch's rows grouped by event hour (an adjustment's own time), one object each, keyed by the batch bounds.
fn objects(after: LogPosition, until: LogPosition, rows: &[LogRow]) -> Vec<RawObject> {
    let mut by_hour: BTreeMap<(NaiveDate, u32), Vec<&LogRow>> = BTreeMap::new();
    for row in rows {
        let t = row.event.created_at();
        by_hour
            .entry((t.date_naive(), t.hour()))
            .or_default()
            .push(row);
    }
    by_hour
        .into_iter()
        .map(|((dt, hour), rows)| {
            let mut body = Vec::with_capacity(rows.len() * 320);
            for row in &rows {
                RawRecord::from(*row).write_line(&mut body);
            }
            RawObject {
                key: format!(
                    "raw/orders/dt={:04}-{:02}-{:02}/hour={hour:02}/{after}-{until}.jsonl",
                    dt.year(),
                    dt.month(),
                    dt.day()
                ),
                dt,
                hour: hour as i16,
                body,
                rows: rows.len() as i32,
                min_txid: rows.iter().map(|r| r.position.txid).min().unwrap_or(0),
                max_txid: rows.iter().map(|r| r.position.txid).max().unwrap_or(0),
            }
        })
        .collect()
}
