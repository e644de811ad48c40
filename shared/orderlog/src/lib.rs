//! The orders log: Postgres `orders`, read in log order by consumers.
//!
//! [`tail`] is the only way Tidemark reads the log. It returns rows after a cursor
//! whose transaction id is below the horizon `pg_snapshot_xmin(pg_current_snapshot())`
//! taken in the *same statement*: every transaction below the horizon has finished,
//! and any transaction that writes later gets a larger id, so a row below the horizon
//! can never appear after the tail has passed it. A transaction that commits late
//! holds the horizon back; consumers wait for it instead of skipping its rows.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgExecutor;
use tidemark_domain::{Currency, LogPosition, Order};
use uuid::Uuid;

/// An order as stored in the log, with its position and ingest time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRow {
    pub position: LogPosition,
    pub order: Order,
    pub ingested_at: DateTime<Utc>,
}

/// One read of the tail.
#[derive(Debug)]
pub struct Tail {
    /// Rows after the cursor and below the horizon, in log order.
    pub rows: Vec<LogRow>,
    /// The horizon the rows were read under: every transaction with a smaller id
    /// has finished.
    pub horizon: u64,
    /// True when fewer rows than asked were returned: then every row below
    /// `horizon` has been read once these are consumed.
    pub complete: bool,
}

type Row = (
    i64,
    Option<i64>,
    Option<i64>,
    Option<Uuid>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i32>,
    Option<i64>,
    Option<String>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
);

/// Reads up to `limit` rows after `after`, below the current horizon.
pub async fn tail<'e>(
    db: impl PgExecutor<'e>,
    after: LogPosition,
    limit: i64,
) -> Result<Tail, sqlx::Error> {
    // The horizon and the rows come from one statement, so one snapshot.
    let rows: Vec<Row> = sqlx::query_as(
        "WITH h AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin) \
         SELECT h.xmin::text::int8, o.txid::text::int8, o.seq, o.order_id, o.user_id, o.city, \
                o.product_id, o.category, o.quantity, o.unit_price_minor, o.currency, \
                o.created_at, o.ingested_at \
         FROM h LEFT JOIN LATERAL ( \
             SELECT * FROM orders \
             WHERE (txid, seq) > ($1::int8::text::xid8, $2) AND txid < h.xmin \
             ORDER BY txid, seq LIMIT $3 \
         ) o ON true",
    )
    .bind(after.txid as i64)
    .bind(after.seq)
    .bind(limit)
    .fetch_all(db)
    .await?;
    let horizon = rows.first().map_or(0, |r| r.0) as u64;
    let rows: Vec<LogRow> = rows.into_iter().filter_map(decode).collect();
    Ok(Tail {
        complete: (rows.len() as i64) < limit,
        rows,
        horizon,
    })
}

/// Reads every row in `(after, until]` in log order, regardless of the horizon
/// (the caller read them below a horizon before, so they are final).
pub async fn range<'e>(
    db: impl PgExecutor<'e>,
    after: LogPosition,
    until: LogPosition,
) -> Result<Vec<LogRow>, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT 0::int8, txid::text::int8, seq, order_id, user_id, city, product_id, category, \
                quantity, unit_price_minor, currency, created_at, ingested_at \
         FROM orders \
         WHERE (txid, seq) > ($1::int8::text::xid8, $2) \
           AND (txid, seq) <= ($3::int8::text::xid8, $4) \
         ORDER BY txid, seq",
    )
    .bind(after.txid as i64)
    .bind(after.seq)
    .bind(until.txid as i64)
    .bind(until.seq)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().filter_map(decode).collect())
}

fn decode(row: Row) -> Option<LogRow> {
    let (
        _,
        txid,
        seq,
        order_id,
        user_id,
        city,
        product_id,
        category,
        quantity,
        price,
        currency,
        created_at,
        ingested_at,
    ) = row;
    let currency: Currency = currency?.trim().parse().ok()?;
    Some(LogRow {
        position: LogPosition::new(txid? as u64, seq?),
        order: Order {
            order_id: order_id?,
            user_id: user_id?,
            city: city?,
            product_id: product_id?,
            category: category?,
            quantity: quantity?,
            unit_price_minor: price?,
            currency,
            created_at: created_at?,
        },
        ingested_at: ingested_at?,
    })
}

/// How far a consumer is behind the log.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lag {
    /// Rows after the cursor (visible, committed), capped at 1,000,000.
    pub rows: i64,
    /// Seconds since the oldest row after the cursor was ingested; 0 when none.
    pub seconds: f64,
}

/// Measures a consumer's lag from its cursor.
pub async fn lag<'e>(db: impl PgExecutor<'e>, cursor: LogPosition) -> Result<Lag, sqlx::Error> {
    let (rows, oldest): (i64, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT count(*), min(ingested_at) FROM ( \
             SELECT ingested_at FROM orders \
             WHERE (txid, seq) > ($1::int8::text::xid8, $2) \
             ORDER BY txid, seq LIMIT 1000000 \
         ) behind",
    )
    .bind(cursor.txid as i64)
    .bind(cursor.seq)
    .fetch_one(db)
    .await?;
    let seconds = oldest.map_or(0.0, |t| {
        (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0
    });
    Ok(Lag { rows, seconds })
}

/// One line of a raw-lake file: the order, when it was ingested, and its log
/// position. Written by the lake relay, read by the compactor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawRecord {
    pub order_id: Uuid,
    pub user_id: String,
    pub city: String,
    pub product_id: String,
    pub category: String,
    pub quantity: i32,
    pub unit_price_minor: i64,
    pub currency: String,
    /// RFC 3339 UTC with exactly six fractional digits, e.g. `2026-11-21T10:15:00.000000Z`.
    pub created_at: String,
    pub ingested_at: String,
    pub txid: u64,
    pub seq: i64,
}

/// The fixed timestamp format of raw records: RFC 3339 in UTC with exactly six
/// fractional digits (`2026-11-21T14:46:34.184267Z`). Spelled `.%6f` rather than
/// chrono's equivalent `%.6f` because polars parses only the former with its fast
/// fixed-width parser (the other falls back to chrono, several times slower).
pub const RAW_TIME_FORMAT: &str = "%Y-%m-%dT%H:%M:%S.%6fZ";

impl From<&LogRow> for RawRecord {
    fn from(row: &LogRow) -> Self {
        let o = &row.order;
        RawRecord {
            order_id: o.order_id,
            user_id: o.user_id.clone(),
            city: o.city.clone(),
            product_id: o.product_id.clone(),
            category: o.category.clone(),
            quantity: o.quantity,
            unit_price_minor: o.unit_price_minor,
            currency: o.currency.to_string(),
            created_at: o.created_at.format(RAW_TIME_FORMAT).to_string(),
            ingested_at: row.ingested_at.format(RAW_TIME_FORMAT).to_string(),
            txid: row.position.txid,
            seq: row.position.seq,
        }
    }
}

/// Speed-layer epochs, cut by transaction id.
///
/// Epoch `k` holds the rows with `threshold(k) <= txid < threshold(k + 1)`; epoch 0
/// starts at the beginning of the log. A cut's threshold is the id of the
/// transaction inserting it. A reader whose snapshot cannot see a cut has a horizon
/// at or below that id (the cut's transaction was running, or had no id yet), and
/// reads only rows below its horizon, so no row it reads belongs after the cut. A
/// row's epoch therefore never changes once a consumer has read it, and a replay
/// from any position assigns the same epochs.
pub mod epochs {
    use sqlx::PgExecutor;

    /// `(epoch, threshold)`, ascending.
    pub type Cuts = Vec<(u64, u64)>;

    /// The epoch of a row written by transaction `txid`.
    pub fn epoch_of(txid: u64, cuts: &Cuts) -> u64 {
        cuts.iter()
            .take_while(|(_, threshold)| *threshold <= txid)
            .last()
            .map_or(0, |(epoch, _)| *epoch)
    }

    /// Every cut. Read it in the same snapshot as the rows it classifies.
    pub async fn load(db: impl PgExecutor<'_>) -> Result<Cuts, sqlx::Error> {
        let rows: Vec<(i64, i64)> =
            sqlx::query_as("SELECT epoch, threshold::text::int8 FROM speed_cuts ORDER BY epoch")
                .fetch_all(db)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(e, t)| (e as u64, t as u64))
            .collect())
    }

    /// Starts a new epoch at this transaction's id; returns `(epoch, threshold)`.
    pub async fn cut(db: impl PgExecutor<'_>) -> Result<(u64, u64), sqlx::Error> {
        let (epoch, threshold): (i64, i64) = sqlx::query_as(
            "INSERT INTO speed_cuts (epoch, threshold) \
             SELECT COALESCE(max(epoch), 0) + 1, pg_current_xact_id() FROM speed_cuts \
             RETURNING epoch, threshold::text::int8",
        )
        .fetch_one(db)
        .await?;
        Ok((epoch as u64, threshold as u64))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn rows_fall_in_the_epoch_of_the_last_cut_at_or_below_their_txid() {
            let cuts = vec![(1, 100), (2, 250)];
            assert_eq!(epoch_of(5, &cuts), 0);
            assert_eq!(epoch_of(99, &cuts), 0);
            assert_eq!(epoch_of(100, &cuts), 1);
            assert_eq!(epoch_of(249, &cuts), 1);
            assert_eq!(epoch_of(250, &cuts), 2);
            assert_eq!(epoch_of(10_000, &cuts), 2);
            assert_eq!(epoch_of(7, &Vec::new()), 0);
        }
    }
}
