//! The lake manifests in Postgres: `lake_raw_files` (the raw JSON Lines objects the
//! relay confirmed, with the transaction ids they hold) and `lake_files` (the
//! Parquet lake's files, by event date and run), and how far the relay has landed.
//! Every statement about them is here.

use chrono::NaiveDate;
use sqlx::{PgConnection, PgPool};
use tidemark_domain::LogPosition;

/// A Parquet file of the lake.
pub struct LakeFile<'a> {
    pub key: &'a str,
    pub dt: NaiveDate,
    pub run_id: i64,
    pub rows: i64,
    pub bytes: i64,
    /// Written by compaction or a backfill (survives a failed run's clean-up).
    pub compacted: bool,
}

/// The event date of `day` (days since the epoch).
pub fn date_of(day: i64) -> NaiveDate {
    chrono::DateTime::from_timestamp(day * 86_400, 0).map_or(NaiveDate::MIN, |t| t.date_naive())
}

/// Every transaction below this id has been landed in the raw lake (the relay's
/// recorded horizon), if the relay has a cursor.
pub async fn relay_horizon(pool: &PgPool) -> Result<Option<u64>, sqlx::Error> {
    let horizon: Option<i64> = sqlx::query_scalar(
        "SELECT horizon::text::int8 FROM consumer_cursors WHERE consumer = 'lake-relay'",
    )
    .fetch_optional(pool)
    .await?;
    Ok(horizon.map(|h| h as u64))
}

/// A raw object and the relay batch it came from: log rows with positions in
/// `(after, until]` (the batch's objects split its rows by event hour).
#[derive(Clone)]
pub struct RawFile {
    pub key: String,
    pub after: LogPosition,
    pub until: LogPosition,
    /// The event hour of the batch's rows it holds (hours since the epoch).
    pub hour: i64,
}

/// Raw objects holding rows with `from <= txid < to`, in key order.
pub async fn raw_files_between(
    pool: &PgPool,
    from: u64,
    to: u64,
) -> Result<Vec<RawFile>, sqlx::Error> {
    let rows: Vec<(String, i64, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT key, after_txid::text::int8, after_seq, until_txid::text::int8, until_seq, \
           (dt - DATE '1970-01-01')::int8 * 24 + hour \
         FROM lake_raw_files \
         WHERE max_txid >= $1::int8::text::xid8 AND min_txid < $2::int8::text::xid8 \
         ORDER BY key",
    )
    .bind(from as i64)
    .bind(to as i64)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(key, after_txid, after_seq, until_txid, until_seq, hour)| RawFile {
                key,
                after: LogPosition::new(after_txid as u64, after_seq),
                until: LogPosition::new(until_txid as u64, until_seq),
                hour,
            },
        )
        .collect())
}

/// Raw objects of event date `dt` holding rows with `txid < below`, in key order.
pub async fn raw_files_on(
    pool: &PgPool,
    dt: NaiveDate,
    below: u64,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT key FROM lake_raw_files WHERE dt = $1 AND min_txid < $2::int8::text::xid8 \
         ORDER BY key",
    )
    .bind(dt)
    .bind(below as i64)
    .fetch_all(pool)
    .await
}

/// Records a Parquet file (again, after a retry: its size is updated).
pub async fn record(db: impl sqlx::PgExecutor<'_>, file: &LakeFile<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO lake_files (key, dt, run_id, rows, bytes, compacted) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (key) DO UPDATE SET rows = EXCLUDED.rows, bytes = EXCLUDED.bytes",
    )
    .bind(file.key)
    .bind(file.dt)
    .bind(file.run_id)
    .bind(file.rows)
    .bind(file.bytes)
    .bind(file.compacted)
    .execute(db)
    .await?;
    Ok(())
}

/// Every Parquet file of the lake, in key order.
pub async fn lake_files(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT key FROM lake_files ORDER BY key")
        .fetch_all(pool)
        .await
}

/// The Parquet files of event date `dt` and the runs that wrote them, in key order.
pub async fn lake_files_on(
    pool: &PgPool,
    dt: NaiveDate,
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT key, run_id FROM lake_files WHERE dt = $1 ORDER BY key")
        .bind(dt)
        .fetch_all(pool)
        .await
}

/// Forgets the files a failed run wrote (not those compaction merged); returns
/// their keys, for the caller to delete.
pub async fn forget_run(
    db: impl sqlx::PgExecutor<'_>,
    run_id: u64,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("DELETE FROM lake_files WHERE run_id = $1 AND NOT compacted RETURNING key")
        .bind(run_id as i64)
        .fetch_all(db)
        .await
}

/// Replaces `old` files with `new` (compaction), in the caller's transaction.
pub async fn replace(
    tx: &mut PgConnection,
    old: &[String],
    new: &LakeFile<'_>,
) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM lake_files WHERE key = ANY($1) AND key <> $2")
        .bind(old)
        .bind(new.key)
        .execute(&mut *tx)
        .await?;
    record(&mut *tx, new).await
}

/// Makes `new` (or nothing) the only file of its event date `dt`, in the caller's
/// transaction (a backfill's rewrite of a partition).
pub async fn replace_date(
    tx: &mut PgConnection,
    dt: NaiveDate,
    new: Option<&LakeFile<'_>>,
) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM lake_files WHERE dt = $1")
        .bind(dt)
        .execute(&mut *tx)
        .await?;
    if let Some(file) = new {
        record(&mut *tx, file).await?;
    }
    Ok(())
}
