//! The speed view equals SQL over Postgres, exactly, epoch by epoch.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tidemark_domain::{Dimension, Granularity};
use tidemark_orderlog::epochs;

use crate::{assert_exact, consumer, drain, random_order, speed_grid};

#[tokio::test(flavor = "multi_thread")]
async fn the_view_equals_sql_for_every_bucket_dimension_and_epoch() {
    let db = tidemark_testkit::postgres().await;
    let redis = tidemark_testkit::redis();
    let (consumer, view) = consumer(&db.pool, &redis, 97);
    let seed: u64 = rand::rng().random();
    eprintln!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sent: Vec<tidemark_domain::Order> = Vec::new();
    for round in 0..12 {
        // Batches through ingest's store, with duplicates of earlier orders resent.
        let mut batch: Vec<_> = (0..rng.random_range(20..120))
            .map(|_| random_order(&mut rng))
            .collect();
        for _ in 0..rng.random_range(0..10) {
            if !sent.is_empty() {
                batch.push(sent[rng.random_range(0..sent.len())].clone());
            }
        }
        let fresh: Vec<_> = batch
            .iter()
            .filter(|o| !sent.contains(*o))
            .cloned()
            .collect();
        tidemark_ingest::store::store(&db.pool, &batch)
            .await
            .unwrap();
        sent.extend(fresh);
        if rng.random_bool(0.5) {
            consumer.step().await.unwrap();
        }
        if round % 3 == 2 {
            epochs::cut(&db.pool).await.unwrap();
        }
    }
    drain(&consumer, &db.pool, &view).await;
    assert_exact(&db.pool, &view, 0, 0).await;

    // Each epoch holds exactly the rows between its cut and the next.
    let cuts = epochs::load(&db.pool).await.unwrap();
    assert_eq!(cuts.len(), 4);
    let mut bounds = vec![(0, 0)];
    bounds.extend(cuts.iter().copied());
    for (i, (epoch, from)) in bounds.iter().enumerate() {
        let to = bounds.get(i + 1).map_or(u64::MAX, |(_, t)| *t);
        let truth = tidemark_testkit::ground_truth(&db.pool, 3600, "city", *from, to).await;
        let speed = speed_grid(&view, 0, Granularity::Hour, Dimension::City, Some(*epoch)).await;
        assert_eq!(speed, truth, "epoch {epoch}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_committing_transaction_is_not_skipped() {
    // Its own cluster: it holds transactions open or cuts steps short (the log
    // horizon is cluster-wide).
    let pg = tidemark_testkit::PrivatePostgres::start().await;
    let db = pg.test_db();
    let redis = tidemark_testkit::redis();
    let (consumer, view) = consumer(&db.pool, &redis, 10);
    let mut rng = StdRng::seed_from_u64(5);
    crate::insert(&db.pool, &random_order(&mut rng)).await;
    // Held open while later transactions commit and the consumer moves on.
    let mut late = db.pool.begin().await.unwrap();
    crate::insert(&mut *late, &random_order(&mut rng)).await;
    for _ in 0..30 {
        crate::insert(&db.pool, &random_order(&mut rng)).await;
    }
    // Step until idle: the open transaction holds the consumer back.
    while consumer.step().await.unwrap() != tidemark_speed::consumer::Step::Idle {}
    let before = speed_grid(&view, 0, Granularity::Day, Dimension::Total, None).await;
    let orders: i64 = before.values().map(|v| v[1]).sum();
    // Only the row before the open transaction may be in (other tests' transactions
    // in the cluster may hold the horizon further back still).
    assert!(
        orders <= 1,
        "the consumer passed an open transaction: {orders} orders"
    );
    late.commit().await.unwrap();
    drain(&consumer, &db.pool, &view).await;
    assert_exact(&db.pool, &view, 0, 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_random_schedule_of_late_commits_skips_nothing() {
    // Its own cluster: it holds transactions open or cuts steps short (the log
    // horizon is cluster-wide).
    let pg = tidemark_testkit::PrivatePostgres::start().await;
    let db = pg.test_db();
    let redis = tidemark_testkit::redis();
    let (consumer, view) = consumer(&db.pool, &redis, 3);
    let seed: u64 = rand::rng().random();
    eprintln!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut open: Vec<sqlx::Transaction<'static, sqlx::Postgres>> = Vec::new();
    let (mut steps_with_open, mut late_commits) = (0, 0);
    for _ in 0..1_500 {
        match rng.random_range(0..10) {
            0..=2 if open.len() < 6 => {
                let mut tx = db.pool.begin().await.unwrap();
                crate::insert(&mut *tx, &random_order(&mut rng)).await;
                open.push(tx);
            }
            3 | 4 if !open.is_empty() => {
                let tx = open.swap_remove(rng.random_range(0..open.len()));
                if rng.random_bool(0.9) {
                    tx.commit().await.unwrap();
                    late_commits += 1;
                } else {
                    tx.rollback().await.unwrap();
                }
            }
            5 | 6 => crate::insert(&db.pool, &random_order(&mut rng)).await,
            _ => {
                steps_with_open += usize::from(!open.is_empty());
                consumer.step().await.unwrap();
            }
        }
    }
    for tx in open {
        tx.commit().await.unwrap();
    }
    drain(&consumer, &db.pool, &view).await;
    assert!(steps_with_open > 100, "transactions were open across steps");
    let truth = tidemark_testkit::ground_truth(&db.pool, 86_400, "total", 0, u64::MAX).await;
    let seen = speed_grid(&view, 0, Granularity::Day, Dimension::Total, None).await;
    let orders = |grid: &std::collections::BTreeMap<_, [i64; 3]>| -> i64 {
        grid.values().map(|v| v[1]).sum()
    };
    tidemark_testkit::figure(
        "R3",
        format!(
            "speed layer, 1,500-step random schedule ({late_commits} transactions committed \
             late, {steps_with_open} steps past an open one): skipped rows {} of {}",
            orders(&truth) - orders(&seen),
            orders(&truth)
        ),
    );
    assert_exact(&db.pool, &view, 0, 0).await;
}
