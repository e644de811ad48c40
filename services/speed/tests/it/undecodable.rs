//! RELIABILITY.md R19: a row of the log this build cannot decode stops the
//! consumer right before it; nothing after it is applied, and nothing is skipped.

use std::time::Duration;

use tidemark_testkit::{Straddle, eventually, metric};

use crate::{assert_exact, assert_exact_in, consumer, orders_in_view};

#[tokio::test(flavor = "multi_thread")]
async fn r19_a_row_the_speed_layer_cannot_decode_stops_it_there_and_nothing_after_is_skipped() {
    let db = tidemark_testkit::postgres().await;
    let redis = tidemark_testkit::redis();
    let log = Straddle::write(&db.pool, 191, 40).await;
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
    eventually(
        Duration::from_secs(30),
        "the consumer reports where it stopped",
        || async {
            svc.readyz().await.1["checks"]["log"]
                .as_str()
                .is_some_and(|why| why.contains("XYZ"))
        },
    )
    .await;
    let (status, body) = svc.readyz().await;
    assert_eq!(status, 503, "not ready while stopped: {body}");
    let why = body["checks"]["log"].as_str().unwrap();
    assert!(why.contains(&log.position_text()), "{why}");
    assert!(why.contains(&log.undecodable.order_id.to_string()), "{why}");
    let text = svc.metrics().await;
    assert_eq!(
        metric(&text, "speed_undecodable_rows_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(metric(&text, "speed_stopped"), Some(1.0), "{text}");

    // The view holds exactly the rows before it: SQL over the transactions below
    // the undecodable row's, in every granularity and dimension.
    let bad_txid = log.position.0 as u64;
    let (_, view) = consumer(&db.pool, &redis, 1);
    let meta = view.meta().await.unwrap().expect("a cursor");
    assert!(
        meta.cursor.txid < bad_txid,
        "the cursor stays before the row"
    );
    assert_exact_in(&db.pool, &view, 0, 0..bad_txid).await;
    let applied = orders_in_view(&view).await;
    assert_eq!(applied, 40);

    // Once the row can be read, the consumer goes on from it and applies everything.
    log.repair(&db.pool).await;
    eventually(
        Duration::from_secs(30),
        "the consumer applies the rest",
        || async { orders_in_view(&view).await == 81 },
    )
    .await;
    assert_exact(&db.pool, &view, 0, 0).await;
    eventually(Duration::from_secs(10), "the stop is cleared", || async {
        svc.readyz().await.1["checks"]["log"] == "ok"
            && metric(&svc.metrics().await, "speed_stopped") == Some(0.0)
    })
    .await;
    svc.stop().await.unwrap();
    tidemark_testkit::figure(
        "R19",
        format!(
            "speed layer: stopped at the undecodable row {} (/readyz 503 naming it, counted \
             once); applied before it {applied} of {} orders, none after it; after the row was \
             made readable the view equals SQL over all 81: skipped rows 0",
            log.position_text(),
            log.before.len(),
        ),
    );
}
