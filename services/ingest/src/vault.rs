//! The vault loader: tails the log (orders, adjustments, customer changes) into the
//! Data Vault 2.0 warehouse in Postgres' `vault` schema (see
//! `migrations/postgres/0009_vault.sql` and ARCHITECTURE.md, "The warehouse").
//!
//! Each step, in one transaction:
//!
//! 1. locks the loader's cursor (`consumer_cursors`, `vault`), so a second loader
//!    waits rather than loads the same rows;
//! 2. finds the end of the next batch: the first `batch_size` rows after the
//!    cursor whose transaction ids are below the horizon taken in the same
//!    statement (the log-tailing rule: nothing can commit below it later);
//! 3. loads the rows in `(cursor, end]` with `INSERT … SELECT` — hubs, then
//!    links, then satellites, each `ON CONFLICT DO NOTHING`;
//! 4. moves the cursor to the end, and commits.
//!
//! Several loaders may run (one per ingest instance); the one holding the `vault`
//! lease loads, and each step checks its token in the step's transaction
//! ([`tidemark_platform::lease`]).
//!
//! The warehouse and the log are one database, so a step's rows and its cursor
//! move commit together: a crash anywhere loads the batch again from scratch, and
//! nothing is loaded twice. Every row is a function of the log (its `load_date` is
//! when the row reached the log), so [`rebuild`] — truncate and reset the cursor —
//! yields the same warehouse.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use tidemark_domain::LogPosition;
use tidemark_orderlog::TAIL_TRANSACTION;
use tidemark_platform::lease::{FenceError, Fenced, Lease};
use tidemark_platform::worker::{self, Pace, Pacing, Status};
use tokio_util::sync::CancellationToken;

use crate::config::VaultSettings;

/// The loader's row in `consumer_cursors`.
pub const CONSUMER: &str = "vault";

/// The vault's tables, hubs first (the order a load fills them in).
pub const TABLES: [&str; 10] = [
    "hub_customer",
    "hub_product",
    "hub_order",
    "link_order_customer",
    "link_order_line",
    "sat_customer",
    "sat_order",
    "sat_order_line",
    "sat_order_adjustment",
    "sat_line_adjustment",
];

/// Rows of `t` in the batch: after `($1, $2)`, up to and including `($3, $4)`.
///
/// The transaction ids' range is also stated alone: Postgres estimates a row
/// comparison blindly (a seventh of the table), so a load's statements joined a
/// batch of 20 orders to every order line by a sequential scan (10 ms at 60,000
/// lines, growing with the log); on the column alone its statistics see the
/// batch's few transactions and the lines are looked up by order (0.2 ms).
macro_rules! in_batch {
    ($t:literal) => {
        concat!(
            "(",
            $t,
            ".txid, ",
            $t,
            ".seq) > ($1::int8::text::xid8, $2) AND (",
            $t,
            ".txid, ",
            $t,
            ".seq) <= ($3::int8::text::xid8, $4) AND ",
            $t,
            ".txid BETWEEN $1::int8::text::xid8 AND $3::int8::text::xid8"
        )
    };
}

/// A timestamp as hashed: microseconds since the epoch (independent of the
/// session's time zone and of formatting).
macro_rules! micros {
    ($c:literal) => {
        concat!("(extract(epoch FROM ", $c, ") * 1000000)::int8::text")
    };
}

/// The statements of one load, in order (parameters: the batch's bounds, see
/// `in_batch!`), run in a [`LOAD_TRANSACTION`].
pub const LOAD: [&str; 10] = [
    concat!(
        "INSERT INTO vault.hub_customer (customer_hk, user_id, load_date, record_source) \
         SELECT DISTINCT ON (user_id) vault.hash_key(user_id), user_id, load_date, source \
         FROM (SELECT o.user_id, o.ingested_at AS load_date, 'tidemark.orders' AS source, \
                      o.txid, o.seq FROM orders o WHERE ",
        in_batch!("o"),
        "       UNION ALL \
               SELECT c.user_id, c.recorded_at, 'tidemark.customer_changes', c.txid, c.seq \
               FROM customer_changes c WHERE ",
        in_batch!("c"),
        ") s ORDER BY user_id, txid, seq ON CONFLICT DO NOTHING"
    ),
    concat!(
        "INSERT INTO vault.hub_product (product_hk, product_id, load_date, record_source) \
         SELECT DISTINCT ON (l.product_id) vault.hash_key(l.product_id), l.product_id, \
                o.ingested_at, 'tidemark.order_lines' \
         FROM orders o JOIN order_lines l ON l.order_id = o.order_id WHERE ",
        in_batch!("o"),
        " ORDER BY l.product_id, o.txid, o.seq ON CONFLICT DO NOTHING"
    ),
    concat!(
        "INSERT INTO vault.hub_order (order_hk, order_id, load_date, record_source) \
         SELECT vault.hash_key(o.order_id::text), o.order_id, o.ingested_at, 'tidemark.orders' \
         FROM orders o WHERE ",
        in_batch!("o"),
        " ON CONFLICT DO NOTHING"
    ),
    concat!(
        "INSERT INTO vault.link_order_customer \
           (order_customer_hk, order_hk, customer_hk, load_date, record_source) \
         SELECT vault.hash_key(o.order_id::text, o.user_id), vault.hash_key(o.order_id::text), \
                vault.hash_key(o.user_id), o.ingested_at, 'tidemark.orders' \
         FROM orders o WHERE ",
        in_batch!("o"),
        " ON CONFLICT DO NOTHING"
    ),
    concat!(
        "INSERT INTO vault.link_order_line \
           (order_line_hk, order_hk, product_hk, line_no, load_date, record_source) \
         SELECT vault.hash_key(o.order_id::text, l.product_id, l.line_no::text), \
                vault.hash_key(o.order_id::text), vault.hash_key(l.product_id), l.line_no, \
                o.ingested_at, 'tidemark.order_lines' \
         FROM orders o JOIN order_lines l ON l.order_id = o.order_id WHERE ",
        in_batch!("o"),
        " ON CONFLICT DO NOTHING"
    ),
    concat!(
        "INSERT INTO vault.sat_customer (customer_hk, load_date, log_seq, effective_at, \
           hash_diff, city, segment, signed_up_at, record_source) \
         SELECT vault.hash_key(c.user_id), c.recorded_at, c.seq, c.effective_at, \
                vault.hash_key(c.city, c.segment, ",
        micros!("c.signed_up_at"),
        ", ",
        micros!("c.effective_at"),
        "), c.city, c.segment, c.signed_up_at, 'tidemark.customer_changes' \
         FROM customer_changes c WHERE ",
        in_batch!("c"),
        " ON CONFLICT DO NOTHING"
    ),
    concat!(
        "INSERT INTO vault.sat_order (order_hk, load_date, hash_diff, created_at, city, \
           currency, record_source) \
         SELECT vault.hash_key(o.order_id::text), o.ingested_at, \
                vault.hash_key(",
        micros!("o.created_at"),
        ", o.city, o.currency), o.created_at, o.city, o.currency, 'tidemark.orders' \
         FROM orders o WHERE ",
        in_batch!("o"),
        " ON CONFLICT DO NOTHING"
    ),
    concat!(
        "INSERT INTO vault.sat_order_line (order_line_hk, load_date, hash_diff, category, \
           quantity, unit_price_minor, record_source) \
         SELECT vault.hash_key(o.order_id::text, l.product_id, l.line_no::text), o.ingested_at, \
                vault.hash_key(l.category, l.quantity::text, l.unit_price_minor::text), \
                l.category, l.quantity, l.unit_price_minor, 'tidemark.order_lines' \
         FROM orders o JOIN order_lines l ON l.order_id = o.order_id WHERE ",
        in_batch!("o"),
        " ON CONFLICT DO NOTHING"
    ),
    concat!(
        "INSERT INTO vault.sat_order_adjustment (order_hk, adjustment_id, load_date, hash_diff, \
           kind, created_at, record_source) \
         SELECT vault.hash_key(a.order_id::text), a.adjustment_id, a.ingested_at, \
                vault.hash_key(a.kind, ",
        micros!("a.created_at"),
        "), a.kind, a.created_at, 'tidemark.adjustments' \
         FROM adjustments a WHERE ",
        in_batch!("a"),
        " ON CONFLICT DO NOTHING"
    ),
    concat!(
        "INSERT INTO vault.sat_line_adjustment (order_line_hk, adjustment_id, load_date, \
           hash_diff, kind, created_at, quantity, amount_minor, record_source) \
         SELECT vault.hash_key(o.order_id::text, l.product_id, l.line_no::text), \
                a.adjustment_id, a.ingested_at, \
                vault.hash_key(a.kind, ",
        micros!("a.created_at"),
        ", al.quantity::text, al.amount_minor::text), \
                a.kind, a.created_at, al.quantity, al.amount_minor, 'tidemark.adjustments' \
         FROM adjustments a \
         JOIN adjustment_lines al ON al.adjustment_id = a.adjustment_id \
         JOIN orders o ON o.order_id = a.order_id \
         JOIN order_lines l ON l.order_id = a.order_id AND l.line_no = al.line_no WHERE ",
        in_batch!("a"),
        " ON CONFLICT DO NOTHING"
    ),
];

/// How a load's transaction begins: each statement planned for its own batch's
/// bounds (see `in_batch!`); a plan made once for any bounds assumes the
/// default share of the table.
pub const LOAD_TRANSACTION: &str = "BEGIN; SET LOCAL plan_cache_mode = force_custom_plan";

/// The end of the next batch: the horizon, and the last of the first `$3` rows
/// after `($1, $2)` below it with how many they are (none: no row).
const NEXT_BATCH: &str = "\
    WITH h AS MATERIALIZED (SELECT log_horizon() AS xmin), \
    e AS ( \
        SELECT txid, seq FROM ( \
            (SELECT txid, seq FROM orders, h \
             WHERE (txid, seq) > ($1::int8::text::xid8, $2) AND txid < h.xmin \
             ORDER BY txid, seq LIMIT $3) \
            UNION ALL \
            (SELECT txid, seq FROM adjustments, h \
             WHERE (txid, seq) > ($1::int8::text::xid8, $2) AND txid < h.xmin \
             ORDER BY txid, seq LIMIT $3) \
            UNION ALL \
            (SELECT txid, seq FROM customer_changes, h \
             WHERE (txid, seq) > ($1::int8::text::xid8, $2) AND txid < h.xmin \
             ORDER BY txid, seq LIMIT $3) \
        ) x ORDER BY txid, seq LIMIT $3 \
    ) \
    SELECT h.xmin::text::int8, \
           (SELECT count(*) FROM e), \
           (SELECT txid::text::int8 FROM e ORDER BY txid DESC, seq DESC LIMIT 1), \
           (SELECT seq FROM e ORDER BY txid DESC, seq DESC LIMIT 1) \
    FROM h";

/// What one step did.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Loaded this many rows of the log.
    Loaded { rows: i64 },
    /// Nothing new below the horizon.
    Idle,
    /// Another instance holds the lease.
    Standby,
}

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error(transparent)]
    Fenced(#[from] Fenced),
}

impl From<FenceError> for VaultError {
    fn from(e: FenceError) -> Self {
        match e {
            FenceError::Postgres(e) => VaultError::Postgres(e),
            FenceError::Fenced(e) => VaultError::Fenced(e),
        }
    }
}

impl worker::StepError for VaultError {
    fn store(&self) -> &'static str {
        match self {
            VaultError::Postgres(_) => "postgres",
            VaultError::Fenced(_) => "lease",
        }
    }

    fn stopped_at(&self) -> Option<String> {
        None
    }
}

#[derive(Clone)]
pub struct Loader {
    pool: PgPool,
    settings: VaultSettings,
    status: Status,
    lease: Lease,
}

impl Loader {
    /// A loader that loads while `lease` leads ([`Lease::unfenced`]: always).
    pub fn new(pool: PgPool, settings: VaultSettings, lease: Lease) -> Self {
        Self {
            pool,
            settings,
            status: Status::default(),
            lease,
        }
    }

    /// Runs steps until `shutdown`, backing off while Postgres fails.
    pub async fn run(self, shutdown: CancellationToken) {
        let lag = tokio::spawn(self.clone().report_lag(shutdown.clone()));
        let pacing = Pacing {
            poll_interval: self.settings.poll_interval,
            min_backoff: Duration::from_millis(100),
            max_backoff: self.settings.max_backoff,
        };
        worker::run(
            "vault",
            &["postgres"],
            pacing,
            &self.status,
            shutdown,
            || async {
                Ok::<_, VaultError>(match self.step().await? {
                    Step::Loaded { rows } => {
                        metrics::counter!("vault_rows_total").increment(rows as u64);
                        Pace::Progress
                    }
                    Step::Idle | Step::Standby => Pace::Idle,
                })
            },
        )
        .await;
        lag.abort();
    }

    async fn report_lag(self, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            if let Ok(lag) = lag(&self.pool).await {
                metrics::gauge!("vault_lag_rows").set(lag.rows as f64);
                metrics::gauge!("vault_lag_seconds").set(lag.seconds);
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }

    /// Loads the next batch, if any (see the module documentation). An idle poll
    /// writes nothing: it looks for rows past the cursor first, and takes the
    /// cursor's lock only when there are some.
    pub async fn step(&self) -> Result<Step, VaultError> {
        let Some(fence) = self.lease.fence() else {
            return Ok(Step::Standby);
        };
        let cursor: Option<(i64, i64)> = sqlx::query_as(
            "SELECT txid::text::int8, seq FROM consumer_cursors WHERE consumer = $1",
        )
        .bind(CONSUMER)
        .fetch_optional(&self.pool)
        .await?;
        if let Some((txid, seq)) = cursor {
            // The poll, on the log's indexes as every read of it. The load's
            // statements are left to the planner: forced to the indexes too
            // (sequential scans, or also hash and merge joins, off), a loader
            // catching up loaded 4,100-4,700 rows/s instead of 7,800 (`bench
            // speed`, its batches of thousands of orders joined to their lines).
            let mut read = self.pool.begin_with(TAIL_TRANSACTION).await?;
            let (_, rows, _, _) = self.next_batch(&mut *read, txid, seq).await?;
            read.commit().await?;
            if rows == 0 {
                return Ok(Step::Idle);
            }
        }
        let mut tx = self.pool.begin_with(LOAD_TRANSACTION).await?;
        fence.bound(&mut tx).await?;
        let after = lock_cursor(&mut tx).await?;
        self.pass_over(&mut tx).await?;
        let (horizon, rows, until_txid, until_seq) = self
            .next_batch(&mut *tx, after.txid as i64, after.seq)
            .await?;
        let Some((until_txid, until_seq)) = until_txid.zip(until_seq) else {
            // Another loader took the rows meanwhile.
            tx.commit().await?;
            return Ok(Step::Idle);
        };
        for statement in LOAD {
            sqlx::query(statement)
                .bind(after.txid as i64)
                .bind(after.seq)
                .bind(until_txid)
                .bind(until_seq)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "UPDATE consumer_cursors SET txid = $2::int8::text::xid8, seq = $3, \
               horizon = GREATEST(horizon, CASE WHEN $5 THEN $4::int8::text::xid8 \
                                                ELSE horizon END), \
               updated_at = now() \
             WHERE consumer = $1",
        )
        .bind(CONSUMER)
        .bind(until_txid)
        .bind(until_seq)
        .bind(horizon)
        .bind(rows < self.settings.batch_size)
        .execute(&mut *tx)
        .await?;
        fence.check(&mut tx).await?;
        tx.commit().await?;
        Ok(Step::Loaded { rows })
    }

    /// Registers `tx`'s transaction id in `log_horizon_exempt`, committed on a
    /// connection of its own, so the log's consumers pass over it: the load writes
    /// only the warehouse, and held every consumer of the log behind it for its
    /// duration (the speed layer's freshness p99 at 5,000 orders/s: 109 ms with the
    /// loader running, 16 ms without). Not durable (`synchronous_commit` off): a
    /// registration lost in a crash only holds the horizon as before. Skipped, with
    /// the same effect, when the pool has no connection free at once (a pool of one
    /// would otherwise wait for itself).
    async fn pass_over(&self, tx: &mut PgConnection) -> Result<(), sqlx::Error> {
        let Some(mut other) = self.pool.try_acquire() else {
            return Ok(());
        };
        let xid: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::int8")
            .fetch_one(&mut *tx)
            .await?;
        let mut other = sqlx::Connection::begin(&mut *other).await?;
        sqlx::query("SET LOCAL synchronous_commit = off")
            .execute(&mut *other)
            .await?;
        sqlx::query(
            "INSERT INTO log_horizon_exempt (holder, xid) VALUES ($1, $2::text::xid8) \
             ON CONFLICT (holder) DO UPDATE SET xid = EXCLUDED.xid",
        )
        .bind(CONSUMER)
        .bind(xid)
        .execute(&mut *other)
        .await?;
        other.commit().await
    }

    /// The horizon, and how many of the first `batch_size` rows after `(txid, seq)`
    /// lie below it, with the last of them.
    async fn next_batch<'e>(
        &self,
        db: impl sqlx::PgExecutor<'e>,
        txid: i64,
        seq: i64,
    ) -> Result<(i64, i64, Option<i64>, Option<i64>), sqlx::Error> {
        sqlx::query_as(NEXT_BATCH)
            .bind(txid)
            .bind(seq)
            .bind(self.settings.batch_size)
            .fetch_one(db)
            .await
    }
}

/// The loader's cursor, locked until the end of `tx` (created on first use).
async fn lock_cursor(tx: &mut PgConnection) -> Result<LogPosition, sqlx::Error> {
    sqlx::query("INSERT INTO consumer_cursors (consumer) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(CONSUMER)
        .execute(&mut *tx)
        .await?;
    let (txid, seq): (i64, i64) = sqlx::query_as(
        "SELECT txid::text::int8, seq FROM consumer_cursors WHERE consumer = $1 FOR UPDATE",
    )
    .bind(CONSUMER)
    .fetch_one(&mut *tx)
    .await?;
    Ok(LogPosition::new(txid as u64, seq))
}

/// How far the loader is behind the log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lag {
    /// Rows of the log after its cursor, counted up to
    /// [`tidemark_orderlog::LAG_COUNTED`] per table (as the other consumers' lag).
    pub rows: i64,
    /// Age of the oldest of them.
    pub seconds: f64,
}

/// Measures the loader's lag, reading at most [`tidemark_orderlog::LAG_COUNTED`]
/// rows of each table of the log, on their indexes
/// ([`TAIL_TRANSACTION`]: its cursor is read in the statement, so
/// every plan of it guesses a third of each table after it).
pub async fn lag(pool: &PgPool) -> Result<Lag, sqlx::Error> {
    let mut read = pool.begin_with(TAIL_TRANSACTION).await?;
    let (rows, oldest): (i64, Option<DateTime<Utc>>) = sqlx::query_as(
        "WITH c AS (SELECT coalesce(max(txid), '0') AS txid, coalesce(max(seq), 0) AS seq \
                    FROM consumer_cursors WHERE consumer = $1) \
         SELECT count(*), min(at) FROM c, LATERAL (( \
             SELECT ingested_at AS at FROM orders o WHERE (o.txid, o.seq) > (c.txid, c.seq) \
             ORDER BY o.txid, o.seq LIMIT $2 \
         ) UNION ALL ( \
             SELECT ingested_at FROM adjustments a WHERE (a.txid, a.seq) > (c.txid, c.seq) \
             ORDER BY a.txid, a.seq LIMIT $2 \
         ) UNION ALL ( \
             SELECT recorded_at FROM customer_changes k WHERE (k.txid, k.seq) > (c.txid, c.seq) \
             ORDER BY k.txid, k.seq LIMIT $2 \
         )) behind",
    )
    .bind(CONSUMER)
    .bind(tidemark_orderlog::LAG_COUNTED)
    .fetch_one(&mut *read)
    .await?;
    read.commit().await?;
    let seconds = oldest.map_or(0.0, |t| {
        (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0
    });
    Ok(Lag { rows, seconds })
}

/// The readiness advisory: `Err` naming the lag when the oldest row not loaded
/// is older than `max_lag`.
pub async fn lag_check(pool: &PgPool, max_lag: Duration) -> Result<(), String> {
    let lag = lag(pool).await.map_err(|e| format!("lag unknown: {e}"))?;
    if lag.seconds > max_lag.as_secs_f64() {
        return Err(format!(
            "{} rows of the log not loaded, the oldest {:.1} s old",
            lag.rows, lag.seconds
        ));
    }
    Ok(())
}

/// Empties the warehouse and resets the loader's cursor, in one transaction: the
/// loader then loads the whole log again, to the same rows.
pub async fn rebuild(pool: &PgPool) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    lock_cursor(&mut tx).await?;
    let tables: Vec<String> = TABLES.iter().map(|t| format!("vault.{t}")).collect();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "TRUNCATE {} RESTRICT",
        tables.join(", ")
    )))
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE consumer_cursors SET txid = '0', seq = 0, horizon = '0', updated_at = now() \
         WHERE consumer = $1",
    )
    .bind(CONSUMER)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}
