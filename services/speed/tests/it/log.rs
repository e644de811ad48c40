//! Reading the log: each order's lines in line order, and lag measured at a
//! bounded cost.

use rand::SeedableRng;
use rand::rngs::StdRng;
use tidemark_domain::{Event, LogPosition};
use tidemark_orderlog::{LAG_COUNTED, lag, range};
use tidemark_testkit::{insert, random_order};

/// Every plan the lines' read may get — custom, generic (a connection's after
/// five executions), and one sorting instead of walking the primary key — gives
/// an order's lines in `line_no` order, however they are stored.
#[tokio::test]
async fn the_log_read_gives_an_orders_lines_in_line_order_whatever_their_storage_order() {
    let db = tidemark_testkit::postgres().await;
    let mut tx = db.pool.begin().await.unwrap();
    let order_id: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO orders (order_id, user_id, city, currency, created_at) \
         VALUES (gen_random_uuid(), 'u1', 'Berlin', 'EUR', now()) RETURNING order_id",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    // Stored last line first, the middle one last.
    for line_no in [3_i16, 1, 2] {
        sqlx::query(
            "INSERT INTO order_lines (order_id, line_no, product_id, category, quantity, \
                                      unit_price_minor) VALUES ($1, $2, $3, 'books', $2, 100)",
        )
        .bind(order_id)
        .bind(line_no)
        .bind(format!("p{line_no}"))
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();

    for setting in [
        ("plan_cache_mode", "auto"),
        ("plan_cache_mode", "force_generic_plan"),
        ("enable_indexscan", "off"),
    ] {
        let pool =
            tidemark_platform::postgres::pool_with(&db.config, "plans", 1, &[setting]).unwrap();
        let rows = range(
            &pool,
            LogPosition::ZERO,
            LogPosition::new(i64::MAX as u64, i64::MAX),
        )
        .await
        .unwrap();
        let [row] = &rows[..] else {
            panic!("one order: {rows:?}")
        };
        let Event::Order(order) = &row.event else {
            panic!("an order: {row:?}")
        };
        let lines: Vec<(&str, i32)> = order
            .lines
            .iter()
            .map(|l| (l.product_id.as_str(), l.quantity))
            .collect();
        assert_eq!(lines, [("p1", 1), ("p2", 2), ("p3", 3)], "{setting:?}");
    }
}

/// The lag measurement reads at most `LAG_COUNTED` rows of each table (its count a
/// floor past that), exact below it, and ages the first row after the cursor.
#[tokio::test]
async fn lag_counts_up_to_its_cap_and_ages_the_oldest_row_behind() {
    let db = tidemark_testkit::postgres().await;
    // The oldest row first (its own transaction), then more than the cap.
    sqlx::query(
        "INSERT INTO orders (order_id, user_id, city, currency, created_at, ingested_at) \
         VALUES (gen_random_uuid(), 'u', 'Berlin', 'EUR', now(), now() - interval '30 s')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let more = LAG_COUNTED + 50;
    sqlx::query(
        "INSERT INTO orders (order_id, user_id, city, currency, created_at) \
         SELECT gen_random_uuid(), 'u' || n, 'Berlin', 'EUR', now() FROM generate_series(1, $1) n",
    )
    .bind(more)
    .execute(&db.pool)
    .await
    .unwrap();

    let all = lag(&db.pool, LogPosition::ZERO).await.unwrap();
    assert_eq!(all.rows, LAG_COUNTED, "counted up to the cap");
    assert!(
        (30.0..60.0).contains(&all.seconds),
        "aged by the oldest row: {}",
        all.seconds
    );

    // Below the cap the count is exact: a cursor 60 rows from the end.
    let (txid, seq): (i64, i64) = sqlx::query_as(
        "SELECT txid::text::int8, seq FROM orders ORDER BY txid, seq OFFSET $1 LIMIT 1",
    )
    .bind(more + 1 - 61)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let near = lag(&db.pool, LogPosition::new(txid as u64, seq))
        .await
        .unwrap();
    assert_eq!(near.rows, 60);
    assert!(near.seconds < 30.0, "{}", near.seconds);
}

/// Longer than any other test holds a transaction open.
const PASSED_WITHIN: std::time::Duration = std::time::Duration::from_secs(120);

/// A transaction registered in `log_horizon_exempt` (the warehouse loader's,
/// which never writes the log) does not hold the tail back; the same transaction
/// unregistered does, and rows it writes are read once it commits.
#[tokio::test]
async fn the_tail_passes_over_a_registered_transaction_and_waits_for_any_other() {
    let db = tidemark_testkit::postgres().await;
    let mut rng = StdRng::seed_from_u64(14);
    let tail = async || {
        let tail = tidemark_orderlog::tail(&db.pool, LogPosition::ZERO, 100)
            .await
            .unwrap();
        assert!(tail.stopped.is_none(), "{:?}", tail.stopped);
        tail.rows.len()
    };
    // An open transaction with an id, then an order committed after it.
    let mut open = db.pool.begin().await.unwrap();
    let xid: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::int8")
        .fetch_one(&mut *open)
        .await
        .unwrap();
    insert(&db.pool, &random_order(&mut rng)).await;
    assert_eq!(tail().await, 0, "held back by the open transaction");
    sqlx::query("INSERT INTO log_horizon_exempt (holder, xid) VALUES ('vault', $1::text::xid8)")
        .bind(xid)
        .execute(&db.pool)
        .await
        .unwrap();
    // Transaction ids are the cluster's: another test's open transaction may hold
    // the horizon a while (R13's for 60 s).
    let read = async |n| {
        tidemark_testkit::wait::eventually(PASSED_WITHIN, "rows read", async || tail().await == n)
            .await;
    };
    read(1).await;
    // Once another transaction is registered instead, this one holds the tail again.
    sqlx::query("UPDATE log_horizon_exempt SET xid = pg_current_xact_id()")
        .execute(&db.pool)
        .await
        .unwrap();
    insert(&db.pool, &random_order(&mut rng)).await;
    assert_eq!(tail().await, 0, "held back again");
    insert(&mut *open, &random_order(&mut rng)).await;
    open.commit().await.unwrap();
    read(3).await;
}

/// The tail computes the horizon once per read, not once per row: `log_horizon()`
/// runs a query, and inlined into the read it ran for every row returned (5,000
/// rows read in 22 ms instead of 1.7 ms; the speed layer fell 16 s behind at
/// 20,000 orders/s).
#[tokio::test]
async fn the_tail_computes_the_horizon_once_per_read() {
    let db = tidemark_testkit::postgres().await;
    let mut rng = StdRng::seed_from_u64(15);
    for _ in 0..50 {
        insert(&db.pool, &random_order(&mut rng)).await;
    }
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL track_functions = 'all'")
        .execute(&mut *tx)
        .await
        .unwrap();
    // Another test's open transaction may hold the horizon: read until the rows
    // are below it, counting the reads.
    let mut reads: i64 = 0;
    while tidemark_orderlog::tail(&mut *tx, LogPosition::ZERO, 100)
        .await
        .unwrap()
        .rows
        .len()
        < 50
    {
        reads += 1;
        assert!(
            reads * 20 < PASSED_WITHIN.as_millis() as i64,
            "the horizon stayed behind the rows"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let calls: i64 =
        sqlx::query_scalar("SELECT pg_stat_get_xact_function_calls('log_horizon'::regproc)")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    assert_eq!(calls, reads + 1, "one call per read");
}

/// Every read of the log by position — the tail, a range, a lag — stays on the
/// log's indexes whatever the planner's estimates (`orderlog::TAIL_TRANSACTION`).
/// Here they are skewed to favour reading the tables whole, on every connection of
/// a pool — as the tail's generic plan was once `ANALYZE` had run in
/// `bench speed`'s 20,000 orders/s minute: it read `adjustments` whole and sorted
/// it at every read.
#[tokio::test]
async fn reads_of_the_log_keep_to_its_indexes_whatever_the_estimates() {
    let db = tidemark_testkit::postgres().await;
    tidemark_testkit::insert_refunded(&db.pool, 3_000).await;
    tidemark_testkit::analyze_log(&db.pool).await;
    // Two pools: a plan a connection keeps is not planned again for another
    // transaction's settings.
    let (plain, ours) = (
        tidemark_testkit::skewed_pool(&db),
        tidemark_testkit::skewed_pool(&db),
    );
    // The last rows of the log, as a consumer that keeps up reads them.
    let (txid, seq): (i64, i64) = sqlx::query_as(
        "SELECT txid::text::int8, seq FROM adjustments ORDER BY txid DESC, seq DESC LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let (after, last) = (
        LogPosition::new(txid as u64, seq - 20),
        LogPosition::new(txid as u64, seq),
    );
    // The statistics are the database's: the setup's connections end first.
    db.close_and_settle(&plain).await;
    let scanned = async |pool| tidemark_testkit::seq_scans(pool, &["orders", "adjustments"]).await;
    // The tail's last 20 rows, in a transaction begun with `begin`.
    let tail = async |pool: &sqlx::PgPool, begin: &'static str| {
        // Another test's open transaction may hold the horizon back.
        let mut waited = 0;
        loop {
            let mut tx = pool.begin_with(begin).await.unwrap();
            let rows = tidemark_orderlog::tail(&mut *tx, after, 5_000)
                .await
                .unwrap()
                .rows
                .len();
            tx.rollback().await.unwrap();
            if rows >= 20 {
                break;
            }
            waited += 1;
            assert!(
                waited * 20 < PASSED_WITHIN.as_millis(),
                "the horizon stayed behind"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };

    let start = scanned(&plain).await;
    tail(&plain, "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY").await;
    assert!(
        scanned(&plain).await > start,
        "with these estimates Postgres reads the tables whole; the test proves nothing"
    );
    let start = scanned(&ours).await;
    tail(&ours, tidemark_orderlog::TAIL_TRANSACTION).await;
    assert_eq!(scanned(&ours).await, start, "the tail");
    assert_eq!(range(&ours, after, last).await.unwrap().len(), 20);
    assert_eq!(scanned(&ours).await, start, "a range");
    assert_eq!(lag(&ours, after).await.unwrap().rows, 20);
    assert_eq!(scanned(&ours).await, start, "a lag");
}
