//! The service's operational endpoints, started on port 0 against real servers.

#[tokio::test(flavor = "multi_thread")]
async fn healthz_readyz_and_metrics_answer() {
    let db = tidemark_testkit::postgres().await;
    let config = tidemark_speed::Config {
        postgres: db.config.clone(),
        redis: tidemark_testkit::redis(),
        ..Default::default()
    };
    let svc = tidemark_testkit::start(|l, s| tidemark_speed::serve(config, l, s)).await;
    tidemark_testkit::assert_operational(&svc).await;
    svc.stop().await.expect("clean shutdown");
}

/// The lag measurement reads at most `LAG_COUNTED` rows of each table (its count a
/// floor past that), exact below it, and ages the first row after the cursor.
#[tokio::test]
async fn lag_counts_up_to_its_cap_and_ages_the_oldest_row_behind() {
    use tidemark_domain::LogPosition;
    use tidemark_orderlog::{LAG_COUNTED, lag};
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
