//! The lake relay: skips nothing, loses nothing, duplicates nothing.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::{PgPool, Postgres, Transaction};
use tidemark_domain::Order;
use tidemark_ingest::config::RelaySettings;
use tidemark_ingest::relay::{Relay, Step};
use tidemark_platform::config::S3Config;

use crate::{list_keys, pg_order_ids, random_order, raw_order_ids};

async fn insert(db: impl sqlx::PgExecutor<'_>, order: &Order) {
    sqlx::query(
        "INSERT INTO orders (order_id, user_id, city, product_id, category, quantity, \
           unit_price_minor, currency, created_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)",
    )
    .bind(order.order_id)
    .bind(&order.user_id)
    .bind(&order.city)
    .bind(&order.product_id)
    .bind(&order.category)
    .bind(order.quantity)
    .bind(order.unit_price_minor)
    .bind(order.currency.as_str())
    .bind(order.created_at)
    .execute(db)
    .await
    .unwrap();
}

async fn relay(pool: &PgPool, s3: &S3Config, batch_size: i64) -> Relay {
    let settings = RelaySettings {
        batch_size,
        ..RelaySettings::default()
    };
    Relay::new(
        pool.clone(),
        tidemark_platform::s3::client(s3).await,
        s3.clone(),
        settings,
    )
}

/// Steps until the relay has landed the newest committed row.
async fn drain(relay: &Relay, pool: &PgPool) {
    let head = tidemark_testkit::log_head(pool).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if relay.step().await.expect("relay step") == Step::Idle {
            let cursor: (i64, i64) = sqlx::query_as(
                "SELECT txid::text::int8, seq FROM consumer_cursors WHERE consumer = 'lake-relay'",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            if head.is_none_or(|(t, s)| (cursor.0 as u64, cursor.1) >= (t, s)) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "relay never caught up"
            );
            // Another transaction in the cluster holds the horizon; wait for it.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Raw lake == Postgres, each order exactly once, and every object is in the manifest.
async fn assert_lake_matches_log(pool: &PgPool, s3: &S3Config) {
    let mut expected = pg_order_ids(pool).await;
    expected.sort();
    let raw = raw_order_ids(s3).await;
    let dupes: Vec<_> = raw.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dupes.is_empty(), "duplicated in the raw lake: {dupes:?}");
    let mut landed: Vec<_> = raw.into_keys().collect();
    landed.sort();
    assert_eq!(
        landed.len(),
        expected.len(),
        "raw lake and log differ in size"
    );
    assert_eq!(landed, expected);
    let client = tidemark_platform::s3::client(s3).await;
    let mut objects = list_keys(&client, s3, "raw/").await;
    objects.sort();
    let mut manifest: Vec<String> = sqlx::query_scalar("SELECT key FROM lake_raw_files")
        .fetch_all(pool)
        .await
        .unwrap();
    let mut manifest: Vec<String> = manifest.drain(..).map(|k| s3.key(&k)).collect();
    manifest.sort();
    assert_eq!(
        objects, manifest,
        "every object is confirmed, none orphaned"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn late_committing_transactions_are_never_skipped() {
    // Its own cluster: it holds transactions open or cuts steps short (the log
    // horizon is cluster-wide).
    let pg = tidemark_testkit::PrivatePostgres::start().await;
    let db = pg.test_db();
    let s3 = tidemark_testkit::s3();
    let relay = relay(&db.pool, &s3, 3).await;
    let seed: u64 = rand::rng().random();
    eprintln!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut open: Vec<Transaction<'static, Postgres>> = Vec::new();
    let (mut steps_with_open, mut late_commits) = (0, 0);
    for _ in 0..1_500 {
        match rng.random_range(0..10) {
            // A transaction that writes and stays open.
            0..=2 if open.len() < 6 => {
                let mut tx = db.pool.begin().await.unwrap();
                insert(&mut *tx, &random_order(&mut rng)).await;
                open.push(tx);
            }
            // Commit (or now and then roll back) a random open transaction.
            3 | 4 if !open.is_empty() => {
                let tx = open.swap_remove(rng.random_range(0..open.len()));
                if rng.random_bool(0.9) {
                    tx.commit().await.unwrap();
                    late_commits += 1;
                } else {
                    tx.rollback().await.unwrap();
                }
            }
            // Autocommitted writes, later in the log than the open ones.
            5 | 6 => insert(&db.pool, &random_order(&mut rng)).await,
            _ => {
                steps_with_open += usize::from(!open.is_empty());
                relay.step().await.unwrap();
            }
        }
    }
    for tx in open {
        tx.commit().await.unwrap();
    }
    drain(&relay, &db.pool).await;
    assert!(
        steps_with_open > 100,
        "the schedule held transactions open across relay steps"
    );
    let landed = raw_order_ids(&s3).await;
    let logged = pg_order_ids(&db.pool).await;
    let skipped = logged.iter().filter(|id| !landed.contains_key(id)).count();
    tidemark_testkit::figure(
        "R3",
        format!(
            "lake relay, 1,500-step random schedule ({late_commits} transactions committed \
             late, {steps_with_open} relay steps past an open one): skipped rows {skipped} \
             of {}",
            logged.len()
        ),
    );
    assert_lake_matches_log(&db.pool, &s3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_stopped_at_random_points_loses_and_duplicates_nothing() {
    // Its own cluster: it holds transactions open or cuts steps short (the log
    // horizon is cluster-wide).
    let pg = tidemark_testkit::PrivatePostgres::start().await;
    let db = pg.test_db();
    let s3 = tidemark_testkit::s3();
    let relay = relay(&db.pool, &s3, 40).await;
    let writer = {
        let pool = db.pool.clone();
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(21);
            for _ in 0..150 {
                let mut tx = pool.begin().await.unwrap();
                for _ in 0..rng.random_range(1..8) {
                    insert(&mut *tx, &random_order(&mut rng)).await;
                }
                tx.commit().await.unwrap();
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..4))).await;
            }
        })
    };
    let seed: u64 = rand::rng().random();
    eprintln!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut interrupted = 0;
    while !writer.is_finished() || interrupted < 200 {
        // Dropping the step future mid-way is a crash at whatever await it reached.
        let budget = Duration::from_micros(rng.random_range(0..20_000));
        if tokio::time::timeout(budget, relay.step()).await.is_err() {
            interrupted += 1;
        }
    }
    writer.await.unwrap();
    drain(&relay, &db.pool).await;
    eprintln!("{interrupted} steps interrupted");
    assert!(interrupted >= 200);
    assert_lake_matches_log(&db.pool, &s3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ingest_keeps_accepting_while_s3_is_down_and_the_relay_catches_up() {
    let s3_server = tidemark_testkit::PrivateS3::start().await;
    let s3 = s3_server.config();
    let h = crate::Harness::with(|c| {
        c.s3 = s3.clone();
        c.relay.poll_interval = Duration::from_millis(20);
        c.relay.max_backoff = Duration::from_millis(500);
    })
    .await;
    let mut rng = StdRng::seed_from_u64(22);
    s3_server.stop();
    for _ in 0..20 {
        let batch: Vec<_> = (0..5)
            .map(|_| crate::order_json(&random_order(&mut rng)))
            .collect();
        let r = h.post_json(&serde_json::Value::Array(batch)).await;
        assert_eq!(r.status(), 201, "ingest answers while S3 is down");
    }
    let http = h.http.clone();
    let metrics_url = h.svc.url("/metrics");
    tidemark_testkit::eventually(Duration::from_secs(20), "S3 errors are counted", || {
        let request = http.get(&metrics_url).send();
        async move {
            let text = request.await.unwrap().text().await.unwrap();
            text.contains("relay_s3_errors_total")
        }
    })
    .await;
    assert_eq!(
        h.count().await,
        100,
        "every order was accepted while S3 was down"
    );
    s3_server.resume().await;
    let pool = h.db.pool.clone();
    tidemark_testkit::eventually(Duration::from_secs(20), "the relay catches up", || {
        let pool = pool.clone();
        async move {
            let (landed, total): (i64, i64) = sqlx::query_as(
                "SELECT (SELECT COALESCE(sum(rows), 0)::int8 FROM lake_raw_files), \
                        (SELECT count(*) FROM orders)",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            landed == total
        }
    })
    .await;
    assert_lake_matches_log(&h.db.pool, &s3).await;
}
