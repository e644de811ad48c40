//! Crashes of the consumer, FLUSHALL and a Redis restart mid-stream still end exact.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tidemark_domain::{Dimension, Granularity};
use tidemark_orderlog::epochs;

use crate::{assert_exact, consumer, drain, insert, orders_in_view, random_order, speed_grid};

#[tokio::test(flavor = "multi_thread")]
async fn aborted_steps_flushall_and_restart_end_exact() {
    // Its own cluster: it holds transactions open or cuts steps short (the log
    // horizon is cluster-wide).
    let pg = tidemark_testkit::PrivatePostgres::start().await;
    let db = pg.test_db();
    let redis_server = tidemark_testkit::PrivateRedis::start().await;
    let (consumer, view) = consumer(&db.pool, &redis_server.config(), 25);
    let writer = {
        let pool = db.pool.clone();
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(31);
            for i in 0..200 {
                let mut tx = pool.begin().await.unwrap();
                for _ in 0..rng.random_range(1..6) {
                    insert(&mut *tx, &random_order(&mut rng)).await;
                }
                if i % 50 == 25 {
                    epochs::cut(&mut *tx).await.unwrap();
                }
                // Now and then a transaction commits late.
                if rng.random_bool(0.1) {
                    tokio::time::sleep(Duration::from_millis(15)).await;
                }
                tx.commit().await.unwrap();
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..3))).await;
            }
        })
    };
    let seed: u64 = rand::rng().random();
    eprintln!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut aborted, mut flushed, mut restarted) = (0, 0, false);
    while !writer.is_finished() || aborted < 150 {
        let budget = Duration::from_micros(rng.random_range(0..8_000));
        // A step cut short is a consumer killed at whatever await it reached.
        // An error (Redis down during the restart) is retried by the next step.
        if tokio::time::timeout(budget, consumer.step()).await.is_err() {
            aborted += 1;
        }
        // Random FLUSHALLs, and surely one by the 40th aborted step.
        let due = flushed == 0 && aborted >= 40;
        if (due || rng.random_bool(0.01)) && flushed < 4 {
            redis_server.flushall();
            flushed += 1;
        }
        if !restarted && aborted == 80 {
            redis_server.stop();
            redis_server.resume().await;
            restarted = true;
        }
    }
    writer.await.unwrap();
    drain(&consumer, &db.pool, &view).await;
    eprintln!("{aborted} steps aborted, {flushed} FLUSHALLs, restarted: {restarted}");
    assert!(flushed > 0 && restarted);
    assert_exact(&db.pool, &view, 0, 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_view_is_rebuilt_from_the_published_batch_watermark() {
    let db = tidemark_testkit::postgres().await;
    let redis_server = tidemark_testkit::PrivateRedis::start().await;
    let (consumer, view) = consumer(&db.pool, &redis_server.config(), 50);
    let mut rng = StdRng::seed_from_u64(32);
    for _ in 0..100 {
        insert(&db.pool, &random_order(&mut rng)).await;
    }
    let (epoch, threshold) = epochs::cut(&db.pool).await.unwrap();
    for _ in 0..100 {
        insert(&db.pool, &random_order(&mut rng)).await;
    }
    drain(&consumer, &db.pool, &view).await;
    assert_exact(&db.pool, &view, 0, 0).await;

    // The batch layer publishes everything before the cut; then Redis loses all.
    sqlx::query(
        "INSERT INTO batch_state (run_id, base_run_id, epoch, threshold, watermark_time, published_at) \
         VALUES (1, 1, $1, $2::int8::text::xid8, now(), now())",
    )
    .bind(epoch as i64)
    .bind(threshold as i64)
    .execute(&db.pool)
    .await
    .unwrap();
    redis_server.flushall();
    drain(&consumer, &db.pool, &view).await;
    assert_eq!(
        view.epochs().await.unwrap(),
        vec![epoch],
        "only epochs after the watermark"
    );
    assert_exact(&db.pool, &view, epoch, threshold).await;
    let before = speed_grid(&view, 0, Granularity::Day, Dimension::Total, Some(0)).await;
    assert!(
        before.is_empty(),
        "nothing the batch view covers is replayed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_service_consumes_and_reports_lag_in_metrics() {
    let db = tidemark_testkit::postgres().await;
    let redis = tidemark_testkit::redis();
    let mut config = tidemark_speed::Config {
        postgres: db.config.clone(),
        redis: redis.clone(),
        ..Default::default()
    };
    config.speed.poll_interval = Duration::from_millis(10);
    let svc = tidemark_testkit::start(|l, s| tidemark_speed::serve(config, l, s)).await;
    let mut rng = StdRng::seed_from_u64(33);
    for _ in 0..50 {
        insert(&db.pool, &random_order(&mut rng)).await;
    }
    let (_, view) = consumer(&db.pool, &redis, 1);
    tidemark_testkit::eventually(Duration::from_secs(10), "the service caught up", || {
        let view = view.clone();
        async move { orders_in_view(&view).await == 50 }
    })
    .await;
    assert_exact(&db.pool, &view, 0, 0).await;
    let http = reqwest::Client::new();
    let url = svc.url("/metrics");
    tidemark_testkit::eventually(Duration::from_secs(10), "lag metrics", || {
        let request = http.get(&url).send();
        async move {
            let text = request.await.unwrap().text().await.unwrap();
            text.contains("speed_lag_seconds") && text.contains("speed_applied_rows_total")
        }
    })
    .await;
    svc.stop().await.unwrap();
}
