//! The lake relay: skips nothing, loses nothing, duplicates nothing.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::{PgPool, Postgres, Transaction};
use tidemark_ingest::config::RelaySettings;
use tidemark_ingest::relay::{Relay, Step};
use tidemark_platform::config::S3Config;
use tidemark_testkit::{Straddle, eventually, insert, metric};

use crate::{list_keys, pg_order_ids, random_order, raw_order_ids};

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
        tidemark_platform::lease::Lease::unfenced("lake-relay"),
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
    // The relay's connections are its own: a crashed process closes them. (A step
    // future dropped mid-query can leave a pooled connection inside a transaction,
    // which Postgres ends after `idle_in_transaction_session_timeout`, failing
    // whichever later step picks that connection.)
    let own_pool = || tidemark_platform::postgres::pool(&db.config, "relay").unwrap();
    let mut relay_pool = own_pool();
    let mut relay = relay(&relay_pool, &s3, 40).await;
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
            relay_pool.close().await;
            relay_pool = own_pool();
            relay = self::relay(&relay_pool, &s3, 40).await;
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
            tidemark_testkit::metric(&text, r#"relay_errors_total{store="s3"}"#)
                .is_some_and(|errors| errors > 0.0)
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

/// RELIABILITY.md R19: a row the relay cannot decode stops it right before that
/// row. The rows before it land; nothing after it lands, and its horizon is not
/// recorded (the compactor would take the rows below it as landed); the stop is
/// logged, counted and shown on `/readyz` while intake stays up. Once the row can
/// be decoded, the relay goes on from there and skips nothing.
#[tokio::test(flavor = "multi_thread")]
async fn r19_a_row_the_relay_cannot_decode_stops_it_there_and_nothing_after_is_skipped() {
    let db = tidemark_testkit::postgres().await;
    let s3 = tidemark_testkit::s3();
    let log = Straddle::write(&db.pool, 19, 40).await;
    let mut config = tidemark_ingest::Config {
        postgres: db.config.clone(),
        s3: s3.clone(),
        ..Default::default()
    };
    config.relay.poll_interval = Duration::from_millis(10);
    config.relay.max_backoff = Duration::from_millis(200);
    // The undecodable row falls inside the second batch.
    config.relay.batch_size = 25;
    let svc = tidemark_testkit::start(|l, s| tidemark_ingest::serve(config, l, s)).await;
    eventually(
        Duration::from_secs(30),
        "the relay reports where it stopped",
        || async {
            svc.readyz().await.1["advisories"]["relay"]
                .as_str()
                .is_some_and(|why| why.contains("XYZ"))
        },
    )
    .await;
    let (status, body) = svc.readyz().await;
    assert_eq!(status, 200, "intake stays ready: {body}");
    let why = body["advisories"]["relay"].as_str().unwrap();
    assert!(why.contains(&log.position_text()), "{why}");
    assert!(why.contains(&log.undecodable.order_id.to_string()), "{why}");
    let text = svc.metrics().await;
    assert_eq!(
        metric(&text, "relay_undecodable_rows_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(metric(&text, "relay_stopped"), Some(1.0), "{text}");

    // Exactly the rows before it landed, once each; the horizon stays below it.
    let landed = raw_order_ids(&s3).await;
    let mut expected: Vec<_> = log.before.iter().map(|o| o.order_id).collect();
    expected.sort();
    let mut got: Vec<_> = landed.keys().copied().collect();
    got.sort();
    assert_eq!(
        got, expected,
        "the raw lake holds exactly the rows before the stop"
    );
    assert!(landed.values().all(|n| *n == 1));
    let (cursor_txid, horizon): (i64, i64) = sqlx::query_as(
        "SELECT txid::text::int8, horizon::text::int8 FROM consumer_cursors \
         WHERE consumer = 'lake-relay'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let bad_txid = log.position.0;
    assert!(cursor_txid < bad_txid, "the cursor stays before the row");
    assert!(
        horizon <= bad_txid,
        "horizon {horizon} passed the row's txid {bad_txid}"
    );

    // Once the row can be read, the relay goes on from it and lands everything.
    log.repair(&db.pool).await;
    eventually(
        Duration::from_secs(30),
        "the relay lands the rest",
        || async { raw_order_ids(&s3).await.len() == 81 },
    )
    .await;
    assert_lake_matches_log(&db.pool, &s3).await;
    eventually(Duration::from_secs(10), "the stop is cleared", || async {
        svc.readyz().await.1["advisories"]["relay"] == "ok"
            && metric(&svc.metrics().await, "relay_stopped") == Some(0.0)
    })
    .await;
    svc.stop().await.unwrap();
    tidemark_testkit::figure(
        "R19",
        format!(
            "lake relay: stopped at the undecodable row {} (reported on /readyz, counted once, \
             intake still ready); landed before it {} of {}, after it 0 of {}, horizon kept \
             below it; after the row was made readable all 81 landed once: skipped rows 0",
            log.position_text(),
            got.len(),
            log.before.len(),
            log.after.len(),
        ),
    );
}
