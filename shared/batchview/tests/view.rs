//! The batch view against real ClickHouse and Postgres: the published state, and
//! reads that count exactly the published runs' rows, once each.

use chrono::{TimeZone, Utc};
use tidemark_batchview::{AggRow, Error, PublishedState, dimension_code, granularity_code};
use tidemark_domain::{Currency, Dimension, Granularity};

fn row(
    run_id: u64,
    granularity: Granularity,
    dimension: Dimension,
    bucket: u32,
    value: &str,
    currency: &str,
    revenue: i64,
) -> AggRow {
    AggRow {
        granularity: granularity_code(granularity),
        dimension: dimension_code(dimension),
        bucket,
        value: value.into(),
        currency: currency.into(),
        run_id,
        revenue_minor: revenue,
        orders: 1,
        items: 2,
        booked_refunded_minor: 5,
        restated_cancelled_orders: 1,
        ..AggRow::default()
    }
}

async fn insert(ch: &clickhouse::Client, rows: &[AggRow]) {
    let mut insert = ch.insert::<AggRow>("revenue_agg").await.unwrap();
    for r in rows {
        insert.write(r).await.unwrap();
    }
    insert.end().await.unwrap();
}

/// A migrated ClickHouse database of the test's own.
async fn clickhouse() -> clickhouse::Client {
    let config = tidemark_testkit::clickhouse();
    tidemark_platform::clickhouse::migrate(&config)
        .await
        .unwrap();
    tidemark_platform::clickhouse::client(&config)
}

/// The hour the tests' rows fall in, as a bucket start.
fn hour() -> u32 {
    Utc.with_ymd_and_hms(2026, 11, 29, 10, 0, 0)
        .unwrap()
        .timestamp() as u32
}

fn state(base_run_id: u64, run_id: u64) -> PublishedState {
    let at = Utc.with_ymd_and_hms(2026, 11, 29, 12, 0, 0).unwrap();
    PublishedState {
        run_id,
        base_run_id,
        epoch: 3,
        threshold: 900,
        watermark_time: at,
        published_at: at,
    }
}

#[tokio::test]
async fn the_published_state_is_none_before_the_first_publish_then_the_row() {
    let db = tidemark_testkit::postgres().await;
    assert_eq!(PublishedState::load(&db.pool).await.unwrap(), None);
    let expected = state(2, 5);
    sqlx::query(
        "INSERT INTO batch_state (run_id, base_run_id, epoch, threshold, watermark_time, published_at) \
         VALUES ($1, $2, $3, $4::int8::text::xid8, $5, $6)",
    )
    .bind(5_i64)
    .bind(2_i64)
    .bind(3_i64)
    .bind(900_i64)
    .bind(expected.watermark_time)
    .bind(expected.published_at)
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        PublishedState::load(&db.pool).await.unwrap(),
        Some(expected)
    );
}

#[tokio::test]
async fn reads_sum_exactly_the_published_runs_each_row_once() {
    let ch = clickhouse().await;
    let hour = hour();
    let (g, d) = (Granularity::Hour, Dimension::City);
    insert(
        &ch,
        &[
            row(1, g, d, hour, "Oslo", "EUR", 1_000), // before the base: superseded
            row(2, g, d, hour, "Oslo", "EUR", 100),
            row(3, g, d, hour, "Oslo", "EUR", 20),
            row(3, g, d, hour, "Zürich", "KWD", 3_990),
            row(4, g, d, hour, "Oslo", "EUR", 5_000), // not published yet
            row(3, Granularity::Day, d, hour, "Oslo", "EUR", 7),
            row(3, g, Dimension::Product, hour, "Oslo", "EUR", 7),
            row(3, g, d, hour + 3_600, "Oslo", "EUR", 9), // outside the range
        ],
    )
    .await;
    // A run copied twice (a publish retried after a crash) counts once.
    insert(&ch, &[row(3, g, d, hour, "Oslo", "EUR", 20)]).await;

    let grid = tidemark_batchview::read(
        &ch,
        &state(2, 3),
        g,
        d,
        i64::from(hour),
        i64::from(hour) + 3_600,
    )
    .await
    .unwrap();
    let eur: Currency = "EUR".parse().unwrap();
    let kwd: Currency = "KWD".parse().unwrap();
    let oslo = grid[&(i64::from(hour), "Oslo".to_owned(), eur)];
    assert_eq!((oslo.revenue_minor, oslo.orders, oslo.items), (120, 2, 4));
    // Corrections read back with their cells, both bases.
    assert_eq!(oslo.booked.refunded_minor, 10);
    assert_eq!(oslo.restated.cancelled_orders, 2);
    assert_eq!(
        grid[&(i64::from(hour), "Zürich".to_owned(), kwd)].revenue_minor,
        3_990
    );
    assert_eq!(grid.len(), 2, "{grid:?}");
}

#[tokio::test]
async fn a_published_row_in_a_currency_this_build_does_not_know_is_an_error() {
    let ch = clickhouse().await;
    let hour = hour();
    let (g, d) = (Granularity::Hour, Dimension::Total);
    insert(
        &ch,
        &[
            row(1, g, d, hour, "", "EUR", 10),
            row(1, g, d, hour, "", "XYZ", 10),
        ],
    )
    .await;
    let read = tidemark_batchview::read(
        &ch,
        &state(1, 1),
        g,
        d,
        i64::from(hour),
        i64::from(hour) + 3_600,
    )
    .await;
    match read {
        Err(Error::Corrupt(why)) => assert!(why.contains("XYZ"), "{why}"),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct Sum {
    s: u64,
}

/// Statements on the server whose text holds `marker`.
async fn running(ch: &clickhouse::Client, marker: &str) -> u64 {
    ch.query(
        "SELECT count() FROM system.processes \
         WHERE position(query, ?) > 0 AND position(query, 'system.processes') = 0",
    )
    .bind(marker)
    .fetch_one()
    .await
    .unwrap()
}

#[tokio::test]
async fn a_read_its_caller_gives_up_is_killed_on_the_server() {
    let ch = clickhouse().await;
    let marker = format!(
        "given_up_{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    // Tens of seconds of work (bounded at 60 s should the kill fail).
    let sql = format!("SELECT sum(number) AS s FROM numbers(100000000000) WHERE '{marker}' != ''");
    let reader = tokio::spawn({
        let ch = ch.clone();
        async move {
            let query = ch.query(&sql).with_setting("max_execution_time", "60");
            tidemark_batchview::fetch_all::<Sum>(&ch, query)
                .await
                .map(|rows| rows.iter().map(|r| r.s).sum::<u64>())
        }
    });
    let started = std::time::Instant::now();
    while running(&ch, &marker).await == 0 {
        assert!(
            started.elapsed().as_secs() < 10,
            "the statement never started"
        );
        assert!(
            !reader.is_finished(),
            "the statement ended: {:?}",
            reader.await
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    reader.abort();
    assert!(reader.await.unwrap_err().is_cancelled());
    let given_up = std::time::Instant::now();
    while running(&ch, &marker).await > 0 {
        assert!(
            given_up.elapsed().as_secs() < 10,
            "the abandoned statement still runs on the server"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    eprintln!(
        "abandoned statement gone from the server {:.0} ms after its reader was dropped",
        given_up.elapsed().as_secs_f64() * 1e3
    );
}
