//! R13: an unrelated transaction left idle for a minute holds the cluster's log
//! horizon. Both log consumers (the lake relay and the speed layer) must pause
//! rather than skip past it, report their lag rising, and skip nothing after.

use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;
use sqlx::Connection;
use tidemark_domain::{Dimension, Granularity};

use crate::{consumer, orders_in_view, random_order, speed_grid};

/// A gauge's value in a Prometheus text exposition.
fn gauge(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn r13_an_idle_transaction_pauses_the_consumers_and_nothing_is_skipped() {
    let idle_for = Duration::from_secs(60);
    // The horizon is cluster-wide: a cluster of its own keeps other tests out.
    let pg = tidemark_testkit::PrivatePostgres::start().await;
    let pool = tidemark_platform::postgres::pool(&pg.config(), "r13").unwrap();
    let redis = tidemark_testkit::redis();
    let s3 = tidemark_testkit::s3();
    let mut speed_config = tidemark_speed::Config {
        postgres: pg.config(),
        redis: redis.clone(),
        ..Default::default()
    };
    speed_config.speed.poll_interval = Duration::from_millis(20);
    let speed = tidemark_testkit::start(|l, s| tidemark_speed::serve(speed_config, l, s)).await;
    let mut ingest_config = tidemark_ingest::Config {
        postgres: pg.config(),
        s3: s3.clone(),
        ..Default::default()
    };
    ingest_config.relay.poll_interval = Duration::from_millis(20);
    let ingest = tidemark_testkit::start(|l, s| tidemark_ingest::serve(ingest_config, l, s)).await;
    let http = reqwest::Client::new();
    let metrics = || {
        let request = http.get(speed.url("/metrics")).send();
        async move { request.await.unwrap().text().await.unwrap() }
    };
    let mut rng = StdRng::seed_from_u64(13);
    let mut store = async |n: usize| {
        let orders: Vec<_> = (0..n).map(|_| random_order(&mut rng)).collect();
        tidemark_ingest::store::store(&pool, &orders).await.unwrap();
    };
    store(100).await;
    let (_, view) = consumer(&pool, &redis, 1);
    let applied = async || -> i64 { orders_in_view(&view).await };
    tidemark_testkit::eventually(
        Duration::from_secs(20),
        "the speed layer applies",
        || async { applied().await == 100 },
    )
    .await;

    // An unrelated session takes a transaction id and then sits idle.
    let mut idle = sqlx::PgConnection::connect(&pg.url()).await.unwrap();
    sqlx::query("BEGIN").execute(&mut idle).await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut idle)
        .await
        .unwrap();
    let held = Instant::now();
    let mut first_lag = None;
    while held.elapsed() < idle_for {
        store(10).await;
        if first_lag.is_none() && held.elapsed() > Duration::from_secs(2) {
            first_lag = Some(gauge(&metrics().await, "speed_lag_seconds"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = metrics().await;
    let (speed_lag, relay_lag) = (
        gauge(&text, "speed_lag_seconds"),
        gauge(&text, "relay_lag_seconds"),
    );
    let speed_lag_rows = gauge(&text, "speed_lag_rows");
    let paused_at = applied().await;
    let landed_during: i64 =
        sqlx::query_scalar("SELECT COALESCE(sum(rows), 0)::int8 FROM lake_raw_files")
            .fetch_one(&pool)
            .await
            .unwrap();
    let total_during: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&pool)
        .await
        .unwrap();
    sqlx::query("COMMIT").execute(&mut idle).await.unwrap();
    let released = Instant::now();

    // Released, both catch up with everything, skipping nothing.
    tidemark_testkit::eventually(
        Duration::from_secs(30),
        "the consumers catch up",
        || async {
            let landed: i64 =
                sqlx::query_scalar("SELECT COALESCE(sum(rows), 0)::int8 FROM lake_raw_files")
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            landed == total_during && applied().await == total_during
        },
    )
    .await;
    let caught_up = released.elapsed().as_secs_f64();
    let truth = tidemark_testkit::ground_truth(&pool, 86_400, "total", 0, u64::MAX).await;
    let seen = speed_grid(&view, 0, Granularity::Day, Dimension::Total, None).await;
    let speed_skipped: i64 = truth.values().map(|v| v[1]).sum::<i64>() - applied().await;
    // The relay's manifest counts each landed row once (the relay tests check it
    // against the objects themselves).
    let landed: i64 = sqlx::query_scalar("SELECT COALESCE(sum(rows), 0)::int8 FROM lake_raw_files")
        .fetch_one(&pool)
        .await
        .unwrap();
    let relay_skipped = total_during - landed;
    tidemark_testkit::figure(
        "R13",
        format!(
            "a transaction idle {:.0} s in the cluster under 50 orders/s: consumers paused \
             (speed view at {paused_at} orders, lake at {landed_during}, of {total_during}); \
             lag reported: speed {:.1} s after 2 s → {speed_lag:.1} s ({speed_lag_rows} rows), \
             relay {relay_lag:.1} s; after release both caught up in {caught_up:.1} s; \
             skipped rows: speed {speed_skipped}, relay {relay_skipped}",
            idle_for.as_secs_f64(),
            first_lag.unwrap_or_default()
        ),
    );
    assert!(paused_at <= 100, "the speed layer passed the held horizon");
    assert!(landed_during <= 100, "the relay passed the held horizon");
    assert!(
        speed_lag >= idle_for.as_secs_f64() - 5.0,
        "speed lag rose: {speed_lag}"
    );
    assert!(
        relay_lag >= idle_for.as_secs_f64() - 5.0,
        "relay lag rose: {relay_lag}"
    );
    assert_eq!(seen, truth);
    assert_eq!((speed_skipped, relay_skipped), (0, 0));
    ingest.stop().await.unwrap();
    speed.stop().await.unwrap();
}
