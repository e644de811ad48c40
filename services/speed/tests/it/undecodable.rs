//! RELIABILITY.md R19: a row of the log this build cannot decode stops the
//! consumer right before it; nothing after it is applied, and nothing is skipped.

use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use tidemark_domain::{Dimension, Granularity, Order};
use tidemark_testkit::orders::insert_as;
use tidemark_testkit::{eventually, metric};

use crate::{assert_exact, consumer, random_order, speed_grid};

#[tokio::test(flavor = "multi_thread")]
async fn r19_a_row_the_speed_layer_cannot_decode_stops_it_there_and_nothing_after_is_skipped() {
    let db = tidemark_testkit::postgres().await;
    let redis = tidemark_testkit::redis();
    let mut rng = StdRng::seed_from_u64(191);
    let mut orders = |n: usize| -> Vec<Order> { (0..n).map(|_| random_order(&mut rng)).collect() };
    let (before, bad, after) = (orders(40), orders(1).remove(0), orders(40));
    // Three transactions, in log order: before, the undecodable row, after.
    for (batch, currency) in [
        (&before, None),
        (&vec![bad.clone()], Some("XYZ")),
        (&after, None),
    ] {
        let mut tx = db.pool.begin().await.unwrap();
        for order in batch {
            insert_as(&mut *tx, order, currency.unwrap_or(order.currency.as_str())).await;
        }
        tx.commit().await.unwrap();
    }
    let (bad_txid, bad_seq): (i64, i64) =
        sqlx::query_as("SELECT txid::text::int8, seq FROM orders WHERE order_id = $1")
            .bind(bad.order_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();

    let mut config = tidemark_speed::Config {
        postgres: db.config.clone(),
        redis: redis.clone(),
        ..Default::default()
    };
    config.speed.poll_interval = Duration::from_millis(10);
    config.speed.max_backoff = Duration::from_millis(200);
    // The undecodable row falls inside the second batch.
    config.speed.batch_size = 25;
    let svc = tidemark_testkit::start(|l, s| tidemark_speed::serve(config, l, s)).await;
    let http = reqwest::Client::new();
    let readyz = async || -> (u16, serde_json::Value) {
        let r = http.get(svc.url("/readyz")).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    };
    let metrics = async || -> String {
        let r = http.get(svc.url("/metrics")).send().await.unwrap();
        r.text().await.unwrap()
    };
    eventually(
        Duration::from_secs(30),
        "the consumer reports where it stopped",
        || async {
            readyz().await.1["checks"]["log"]
                .as_str()
                .is_some_and(|why| why.contains("XYZ"))
        },
    )
    .await;
    let (status, body) = readyz().await;
    assert_eq!(status, 503, "not ready while stopped: {body}");
    let why = body["checks"]["log"].as_str().unwrap();
    assert!(why.contains(&format!("{bad_txid}_{bad_seq}")), "{why}");
    assert!(why.contains(&bad.order_id.to_string()), "{why}");
    let text = metrics().await;
    assert_eq!(
        metric(&text, "speed_undecodable_rows_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(metric(&text, "speed_stopped"), Some(1.0), "{text}");

    // The view holds exactly the rows before it: SQL over the transactions below
    // the undecodable row's, in every granularity and dimension.
    let (_, view) = consumer(&db.pool, &redis, 1);
    let meta = view.meta().await.unwrap().expect("a cursor");
    assert!(
        meta.cursor.txid < bad_txid as u64,
        "the cursor stays before the row"
    );
    for granularity in Granularity::ALL {
        for dimension in Dimension::ALL {
            let truth = tidemark_testkit::ground_truth(
                &db.pool,
                granularity.seconds(),
                dimension.as_str(),
                0,
                bad_txid as u64,
            )
            .await;
            let speed = speed_grid(&view, 0, granularity, dimension, None).await;
            assert_eq!(speed, truth, "{granularity} by {dimension}");
        }
    }
    let applied: i64 = speed_grid(&view, 0, Granularity::Day, Dimension::Total, None)
        .await
        .values()
        .map(|v| v[1])
        .sum();
    assert_eq!(applied, 40);

    // The row becomes decodable (here it is corrected; a newer build would read it
    // as it is): the consumer goes on from the row and applies everything.
    sqlx::query("UPDATE orders SET currency = 'EUR' WHERE order_id = $1")
        .bind(bad.order_id)
        .execute(&db.pool)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the consumer applies the rest",
        || async {
            let grid = speed_grid(&view, 0, Granularity::Day, Dimension::Total, None).await;
            grid.values().map(|v| v[1]).sum::<i64>() == 81
        },
    )
    .await;
    assert_exact(&db.pool, &view, 0, 0).await;
    eventually(Duration::from_secs(10), "the stop is cleared", || async {
        readyz().await.1["checks"]["log"] == "ok"
            && metric(&metrics().await, "speed_stopped") == Some(0.0)
    })
    .await;
    svc.stop().await.unwrap();
    tidemark_testkit::figure(
        "R19",
        format!(
            "speed layer: stopped at the undecodable row {bad_txid}_{bad_seq} (/readyz 503 naming \
             it, counted once); applied before it {applied} of 40 orders, none after it; after \
             the row was made readable the view equals SQL over all 81: skipped rows 0"
        ),
    );
}
