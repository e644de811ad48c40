//! Reading the log in log order.
//!
//! The log is two tables with one order: `orders` and `adjustments` draw `seq`
//! from one sequence and record their writing transaction's id, so `(txid, seq)`
//! orders their rows as one stream. Each read takes the next rows of both (by
//! their log index) and merges them.
//!
//! [`tail`] is the only way Tidemark's consumers read new rows. It returns rows
//! after a cursor whose transaction id is below the horizon `log_horizon()` taken
//! in the *same statement* — `pg_snapshot_xmin(pg_current_snapshot())`, the
//! oldest transaction still running, passing over those registered as never
//! writing the log (the warehouse loader's; migration `0014_log_horizon.sql`):
//! every transaction below the horizon has finished or never writes the log, and
//! any transaction that writes later gets a larger id, so a row below the horizon
//! can never appear after the tail has passed it. A transaction that commits late
//! holds the horizon back; consumers wait for it instead of skipping its rows.
//!
//! A row this build cannot decode ends the read at that row ([`Tail::stopped`]):
//! the rows before it are returned, nothing after it is.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{FromRow, PgExecutor, PgPool, Row};
use tidemark_domain::LogPosition;

use crate::row::{EventRow, LogRow, Undecodable};

/// The columns of an event row (see [`EventRow`]) for an order.
macro_rules! order_events {
    () => {
        concat!(
            "SELECT ",
            crate::order_columns!(),
            ", NULL::uuid AS adjustment_id, NULL::text AS adjustment_kind, \
             NULL::timestamptz AS adjusted_at, NULL::int2[] AS adjusted_line_nos, \
             NULL::int4[] AS adjusted_quantities, NULL::int8[] AS adjusted_amounts FROM ",
            crate::order_from!()
        )
    };
}

/// The columns of an event row for an adjustment, `a`, with its order `o`.
macro_rules! adjustment_events {
    () => {
        concat!(
            "SELECT a.txid::text::int8 AS log_txid, a.seq, o.order_id, o.user_id, o.city, \
                    o.currency, o.created_at, a.ingested_at, l.line_products, \
                    l.line_categories, l.line_quantities, l.line_prices, a.adjustment_id, \
                    a.kind AS adjustment_kind, a.created_at AS adjusted_at, \
                    al.adjusted_line_nos, al.adjusted_quantities, al.adjusted_amounts \
             FROM adjustments a JOIN orders o ON o.order_id = a.order_id ",
            crate::order_lines!(),
            " CROSS JOIN LATERAL ( \
                 SELECT array_agg(line_no ORDER BY line_no) AS adjusted_line_nos, \
                        array_agg(quantity ORDER BY line_no) AS adjusted_quantities, \
                        array_agg(amount_minor ORDER BY line_no) AS adjusted_amounts \
                 FROM adjustment_lines WHERE adjustment_lines.adjustment_id = a.adjustment_id \
             ) al"
        )
    };
}

/// One read of the tail.
#[derive(Debug)]
pub struct Tail {
    /// Rows after the cursor and below the horizon, in log order, up to the first
    /// row that cannot be decoded.
    pub rows: Vec<LogRow>,
    /// The horizon the rows were read under: every transaction with a smaller id
    /// has finished.
    pub horizon: u64,
    /// True when every row below `horizon` has been read once these are consumed
    /// (fewer rows than asked, none undecodable).
    pub complete: bool,
    /// The row right after `rows` when this build cannot decode it: a consumer
    /// stops there, and must not treat the horizon as passed.
    pub stopped: Option<Undecodable>,
}

/// Reading a range of the log failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error(transparent)]
    Undecodable(#[from] Undecodable),
}

/// The horizon, and the row of the tail beside it (none when the tail is empty).
struct TailRow {
    horizon: i64,
    row: Option<EventRow>,
}

impl<'r> FromRow<'r, PgRow> for TailRow {
    fn from_row(row: &'r PgRow) -> Result<Self, sqlx::Error> {
        let horizon = row.try_get("horizon")?;
        let present: Option<i64> = row.try_get("seq")?;
        Ok(TailRow {
            horizon,
            row: present.map(|_| EventRow::from_row(row)).transpose()?,
        })
    }
}

/// Decodes rows in log order up to the first one this build cannot decode.
fn decode_until_stopped(
    rows: impl IntoIterator<Item = EventRow>,
) -> (Vec<LogRow>, Option<Undecodable>) {
    let mut decoded = Vec::new();
    for row in rows {
        match row.decode() {
            Ok(row) => decoded.push(row),
            Err(stopped) => return (decoded, Some(stopped)),
        }
    }
    (decoded, None)
}

/// The transaction every read of the log by position runs in — the tail, a range,
/// a lag: one snapshot, and index range scans only. Postgres keeps a generic plan
/// for a read after five executions, and without the cursor's values it guesses a
/// third of each table after it: once `ANALYZE` had run on the log in
/// `bench speed`'s 20,000 orders/s minute (autovacuum, 20 s in), the tail's generic
/// plan read `adjustments` whole and sorted it at every read (27,000 rows then,
/// 40-50 ms a read and growing, `auto_explain`), where the index gives the few rows
/// after the cursor in order. Bitmap scans are off too, so each order's lines come
/// from the primary key's index in line order: the generic plan otherwise gathered
/// them by a bitmap scan of the `(order_id, product_id)` key and sorted them, a
/// read of 5,000 log rows taking ~115 ms instead of ~90 (here, `EXPLAIN ANALYZE`
/// alternating the two plans, before and after `ANALYZE`). [`range`] and [`lag`]
/// begin it themselves; a consumer begins it for [`tail`], which it reads in one
/// snapshot with more.
pub const TAIL_TRANSACTION: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; \
     SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off";

/// Reads up to `limit` rows after `after`, below the current horizon (in a
/// transaction begun with [`TAIL_TRANSACTION`]).
pub async fn tail<'e>(
    db: impl PgExecutor<'e>,
    after: LogPosition,
    limit: i64,
) -> Result<Tail, sqlx::Error> {
    // The horizon and the rows come from one statement, so one snapshot. Each
    // table gives its first `limit` rows (an index range scan), the merge the first
    // `limit` of both.
    let read: Vec<TailRow> = sqlx::query_as(concat!(
        "WITH h AS MATERIALIZED (SELECT log_horizon() AS xmin) \
         SELECT h.xmin::text::int8 AS horizon, t.* \
         FROM h LEFT JOIN LATERAL ( \
             SELECT * FROM ((",
        order_events!(),
        " WHERE (o.txid, o.seq) > ($1::int8::text::xid8, $2) AND o.txid < h.xmin \
             ORDER BY o.txid, o.seq LIMIT $3) UNION ALL (",
        adjustment_events!(),
        " WHERE (a.txid, a.seq) > ($1::int8::text::xid8, $2) AND a.txid < h.xmin \
             ORDER BY a.txid, a.seq LIMIT $3)) e ORDER BY log_txid, seq LIMIT $3 \
         ) t ON true"
    ))
    .bind(after.txid as i64)
    .bind(after.seq)
    .bind(limit)
    .fetch_all(db)
    .await?;
    let horizon = read.first().map_or(0, |r| r.horizon) as u64;
    let fetched = read.iter().filter(|r| r.row.is_some()).count() as i64;
    let (rows, stopped) = decode_until_stopped(read.into_iter().filter_map(|r| r.row));
    Ok(Tail {
        complete: fetched < limit && stopped.is_none(),
        rows,
        horizon,
        stopped,
    })
}

/// Reads every row in `(after, until]` in log order, regardless of the horizon
/// (the caller read them below a horizon before, so they are final). A row that
/// cannot be decoded fails the read. Reads in a [`TAIL_TRANSACTION`].
pub async fn range(
    pool: &PgPool,
    after: LogPosition,
    until: LogPosition,
) -> Result<Vec<LogRow>, LogError> {
    let mut read = pool.begin_with(TAIL_TRANSACTION).await?;
    let rows: Vec<EventRow> = sqlx::query_as(concat!(
        "SELECT * FROM (",
        order_events!(),
        " WHERE (o.txid, o.seq) > ($1::int8::text::xid8, $2) \
           AND (o.txid, o.seq) <= ($3::int8::text::xid8, $4) UNION ALL ",
        adjustment_events!(),
        " WHERE (a.txid, a.seq) > ($1::int8::text::xid8, $2) \
           AND (a.txid, a.seq) <= ($3::int8::text::xid8, $4) \
         ) e ORDER BY log_txid, seq"
    ))
    .bind(after.txid as i64)
    .bind(after.seq)
    .bind(until.txid as i64)
    .bind(until.seq)
    .fetch_all(&mut *read)
    .await?;
    read.commit().await?;
    match decode_until_stopped(rows) {
        (rows, None) => Ok(rows),
        (_, Some(stopped)) => Err(stopped.into()),
    }
}

/// How many rows after a cursor a lag measurement counts in each table of the
/// log. Counting reads every row it counts: counted up to a million, a consumer
/// 40–50 s behind at 20,000 orders/s had its lag measured by a Postgres backend
/// busy all the time (`bench speed`, `pg_stat_statements`: 61 s of the minute's
/// ~400 s of statement time), taken from the consumer it measured. Past the cap the
/// count is a floor; the age, which alerts and readiness use, is that of the
/// oldest row counted: the first rows in log order, whose transactions wrote
/// first.
pub const LAG_COUNTED: i64 = 10_000;

/// How far a consumer is behind the log.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lag {
    /// Rows after the cursor (visible, committed), counted up to [`LAG_COUNTED`]
    /// per table.
    pub rows: i64,
    /// Seconds since the oldest of those rows was ingested; 0 when none.
    pub seconds: f64,
}

/// Measures a consumer's lag from its cursor, reading at most [`LAG_COUNTED`]
/// rows of each table (in a [`TAIL_TRANSACTION`]).
pub async fn lag(pool: &PgPool, cursor: LogPosition) -> Result<Lag, sqlx::Error> {
    let mut read = pool.begin_with(TAIL_TRANSACTION).await?;
    let (rows, oldest): (i64, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT count(*), min(ingested_at) FROM (( \
             SELECT ingested_at FROM orders \
             WHERE (txid, seq) > ($1::int8::text::xid8, $2) \
             ORDER BY txid, seq LIMIT $3 \
         ) UNION ALL ( \
             SELECT ingested_at FROM adjustments \
             WHERE (txid, seq) > ($1::int8::text::xid8, $2) \
             ORDER BY txid, seq LIMIT $3 \
         )) behind",
    )
    .bind(cursor.txid as i64)
    .bind(cursor.seq)
    .bind(LAG_COUNTED)
    .fetch_one(&mut *read)
    .await?;
    read.commit().await?;
    let seconds = oldest.map_or(0.0, |t| {
        (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0
    });
    Ok(Lag { rows, seconds })
}
