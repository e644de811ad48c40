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

/// R20 (issue 22, Redis failover) for the speed layer: a Redis primary, a replica
/// and a Sentinel; the consumer follows the Sentinel. The primary is SIGKILLed
/// under a stream of orders: the Sentinel promotes the replica, the consumer
/// follows it and goes on from the cursor the replica holds (its data and cursor
/// replicated together, one script at a time). Every read of the view during the
/// switch either fails (serving answers 503 or a flagged partial) or is exact as of
/// the cursor it states; after catch-up the view equals SQL.
#[tokio::test(flavor = "multi_thread")]
async fn r20_the_redis_primary_killed_the_speed_layer_follows_the_sentinel_and_stays_exact() {
    let db = tidemark_testkit::postgres().await;
    let redis = tidemark_testkit::PrivateRedisFailover::start().await;
    let config = redis.config();
    let (consumer, view) = consumer(&db.pool, &config, 50);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(consumer.run(shutdown.clone()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (pool, stop) = (db.pool.clone(), stop.clone());
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(20);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut tx = pool.begin().await.unwrap();
                for _ in 0..rng.random_range(1..4) {
                    insert(&mut *tx, &random_order(&mut rng)).await;
                }
                tx.commit().await.unwrap();
                tokio::time::sleep(Duration::from_millis(rng.random_range(1..10))).await;
            }
        })
    };
    // Orders in the view and in SQL at the cursor the view states, read together.
    let check = || async {
        let snapshot = view
            .read(0, Granularity::Day, Dimension::Total, 0, 4_000_000_000)
            .await
            .ok()?;
        let cursor = snapshot.meta?.cursor;
        let served: i64 = snapshot.total().values().map(|t| t.orders).sum();
        let truth: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM orders WHERE (txid, seq) <= ($1::int8::text::xid8, $2)",
        )
        .bind(cursor.txid as i64)
        .bind(cursor.seq)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        Some((cursor, served, truth))
    };
    tidemark_testkit::eventually(Duration::from_secs(30), "the view fills", || async {
        check().await.is_some_and(|(_, served, _)| served > 200)
    })
    .await;

    let (before, _, _) = check().await.unwrap();
    redis.primary.stop(); // SIGKILL
    let killed = std::time::Instant::now();
    let (mut answered, mut failed, mut inexact) = (0, 0, 0);
    let mut promoted = None;
    let resumed = loop {
        match check().await {
            Some((cursor, served, truth)) => {
                answered += 1;
                if served != truth {
                    inexact += 1;
                }
                if cursor > before && redis.named_primary() == Some(redis.replica.port) {
                    break killed.elapsed().as_secs_f64();
                }
            }
            None => failed += 1,
        }
        if promoted.is_none() && redis.named_primary() == Some(redis.replica.port) {
            promoted = Some(killed.elapsed().as_secs_f64());
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "the speed layer did not resume on the promoted replica"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let promoted = promoted.unwrap_or(resumed);

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    let head = tidemark_testkit::log_head(&db.pool).await;
    tidemark_testkit::eventually(Duration::from_secs(30), "the view catches up", || async {
        let cursor = view.meta().await.ok().flatten();
        cursor.map(|m| (m.cursor.txid, m.cursor.seq)) >= head
    })
    .await;
    let mut drift = 0;
    let mut cells = 0;
    for dimension in [Dimension::City, Dimension::Product] {
        let truth =
            tidemark_testkit::ground_truth(&db.pool, 60, dimension.as_str(), 0, u64::MAX).await;
        let seen = speed_grid(&view, 0, Granularity::Minute, dimension, None).await;
        cells += truth.len();
        drift += tidemark_testkit::differing(&truth, &seen);
    }
    shutdown.cancel();
    running.await.unwrap();
    tidemark_testkit::figure(
        "R20",
        format!(
            "Redis primary SIGKILLed under a stream (Sentinel, down after {} ms): replica \
             promoted {promoted:.1} s after the kill, the speed layer applying on it after \
             {resumed:.1} s; reads meanwhile: {answered} answered, {inexact} of them not \
             exact as of their cursor, {failed} failed; drift after catch-up {drift} of \
             {cells} cells",
            tidemark_testkit::PrivateRedisFailover::DOWN_AFTER_MS
        ),
    );
    assert_eq!((inexact, drift), (0, 0));
}
