//! R6: the S3 server stopped for a minute, then slow, under ingest load. Ingest
//! keeps answering 2xx (Postgres is the log), the lake relay catches up, and after
//! a batch run no order is lost or counted twice.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;
use tidemark_compactor::{Kind, Outcome};
use tidemark_platform::auth::{self, Scope};
use uuid::Uuid;

use crate::{Env, random_order};

/// Landed raw rows (per the relay's manifest) and orders in the log.
async fn landed_and_logged(env: &Env) -> (i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT COALESCE(sum(rows), 0)::int8 FROM lake_raw_files), \
                (SELECT count(*) FROM orders)",
    )
    .fetch_one(&env.db.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn r6_s3_down_for_a_minute_then_slow_loses_and_duplicates_nothing() {
    let outage = Duration::from_secs(60);
    let slow = Duration::from_secs(10);
    let s3_server = tidemark_testkit::PrivateS3::start().await;
    let proxy = tidemark_testkit::SlowProxy::start(s3_server.port).await;
    let mut s3 = s3_server.config();
    s3.endpoint = format!("http://127.0.0.1:{}", proxy.port);
    let env = Env::on(tidemark_testkit::clickhouse(), s3.clone(), 8).await;

    let mut config = tidemark_ingest::Config {
        postgres: env.db.config.clone(),
        s3,
        ..Default::default()
    };
    config.relay.enabled = false; // the environment runs the relay
    let ingest = tidemark_testkit::start(|l, s| tidemark_ingest::serve(config, l, s)).await;
    let (_, key) = auth::create(&env.db.pool, "r6", &[Scope::Ingest], None)
        .await
        .unwrap();

    // Four clients, a batch of five orders each every 100 ms (~200 orders/s).
    let acked = Arc::new(Mutex::new(Vec::<Uuid>::new()));
    let failures = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let (acked, failures, stop) = (acked.clone(), failures.clone(), stop.clone());
            let (url, key) = (ingest.url("/v1/orders"), key.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut rng = StdRng::seed_from_u64(60 + i);
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let orders: Vec<_> = (0..5).map(|_| random_order(&mut rng)).collect();
                    let body: Vec<_> = orders
                        .iter()
                        .map(|o| serde_json::to_value(o).unwrap())
                        .collect();
                    let response = http.post(&url).bearer_auth(&key).json(&body).send().await;
                    match response {
                        Ok(r) if r.status().is_success() => acked
                            .lock()
                            .unwrap()
                            .extend(orders.iter().map(|o| o.order_id)),
                        _ => {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();

    let load_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    s3_server.stop();
    tokio::time::sleep(outage).await;
    let (landed_during, logged_during) = landed_and_logged(&env).await;
    assert!(
        landed_during < logged_during,
        "the relay fell behind while S3 was down"
    );
    s3_server.resume().await;
    proxy.set_delay(Duration::from_millis(50));
    tokio::time::sleep(slow).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    let load_secs = load_started.elapsed().as_secs_f64();
    proxy.set_delay(Duration::ZERO);
    let fast_again = Instant::now();
    tidemark_testkit::eventually(Duration::from_secs(60), "the relay catches up", || {
        let env = &env;
        async move {
            let (landed, logged) = landed_and_logged(env).await;
            landed == logged
        }
    })
    .await;
    let catch_up = fast_again.elapsed().as_secs_f64();
    let acked = Arc::try_unwrap(acked).unwrap().into_inner().unwrap();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE order_id = ANY($1)")
        .bind(&acked)
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    let lost = acked.len() as i64 - stored;

    let outcome = env.compactor.run_once(Kind::Incremental).await.unwrap();
    assert!(matches!(outcome, Outcome::Published { .. }), "{outcome:?}");
    let (drift, cells) = env.drift().await;
    // The lake holds a row per order line.
    let (lake_rows, logged): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT COALESCE(sum(rows), 0)::int8 FROM lake_files), \
                (SELECT count(*) FROM order_lines)",
    )
    .fetch_one(&env.db.pool)
    .await
    .unwrap();
    let failures = failures.load(Ordering::Relaxed);
    tidemark_testkit::figure(
        "R6",
        format!(
            "S3 stopped {:.0} s then slow (+50 ms per chunk) for {} s under {:.0} orders/s: \
             {} orders acked, non-2xx answers {failures}; relay {} rows behind at the \
             outage's end, caught up {catch_up:.1} s after S3 was fast again; lost orders \
             {lost}; duplicate raw records after compaction {} (lake {lake_rows} rows, log \
             {logged} order lines); batch drift {drift} of {cells} cells",
            outage.as_secs_f64(),
            slow.as_secs(),
            acked.len() as f64 / load_secs,
            acked.len(),
            logged_during - landed_during,
            lake_rows - logged,
        ),
    );
    assert_eq!(failures, 0, "ingest answered 2xx throughout");
    assert_eq!(lost, 0);
    assert_eq!(lake_rows, logged, "each order line once in the lake");
    assert_eq!(drift, 0);
    env.assert_lake_consistent().await;
}
