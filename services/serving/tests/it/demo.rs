//! The demo's promise: what the generator says it sent is what serving answers.

use chrono::{DurationRound, TimeDelta, Utc};
use tidemark_compactor::Kind;
use tidemark_generator::{BackfillPlan, Format, Sender, Shape, StreamPlan, Tally};
use tokio_util::sync::CancellationToken;

use crate::{Env, full_range};

#[tokio::test(flavor = "multi_thread")]
async fn a_generator_burst_and_a_batch_run_serve_the_generators_totals() {
    // Where the test is, should it ever hang (shown with its output).
    let started = std::time::Instant::now();
    let step = |what: &str| eprintln!("demo: {what} at {:.1} s", started.elapsed().as_secs_f64());
    let env = Env::new().await;
    let (ingest, key) = env.ingest_api().await;
    let small = Shape {
        users: 2_000,
        products: 120,
        late_share: 0.05,
    };

    // Two days of history as Avro, published by a batch run...
    let history = BackfillPlan {
        seed: 11,
        days: 2,
        per_day: 1_500,
        until: Utc::now().duration_trunc(TimeDelta::hours(1)).unwrap(),
        batch: 250,
        concurrency: 4,
        shape: small,
    };
    step("backfill");
    let avro = Sender::new(&ingest.url(""), &key, Format::Avro).unwrap();
    let mut sent = tidemark_generator::backfill(&avro, &history, CancellationToken::new(), false)
        .await
        .unwrap();
    assert_eq!((sent.created, sent.rejected), (3_000, 0), "{sent:?}");
    // Every customer's first version, and the moves during the history.
    assert!(sent.customers_recorded >= 2_000, "{sent:?}");
    assert_eq!(sent.customers_rejected, 0, "{sent:?}");
    let history_customers = sent.customers_recorded;
    // Its refunds and cancellations due by its end (the live burst below may add a
    // few: its late orders can be corrected at once).
    let history_corrections = sent.refunds + sent.cancellations;
    step("batch run");
    let outcome = env.compactor.run_once(Kind::Incremental).await.unwrap();
    assert!(matches!(
        outcome,
        tidemark_compactor::Outcome::Published { .. }
    ));

    // ...then a live burst as JSON, which only the speed layer has seen.
    step("live burst");
    let json = Sender::new(&ingest.url(""), &key, Format::Json).unwrap();
    let burst = StreamPlan {
        seed: 12,
        rate: 2_000.0,
        batch: 100,
        count: Some(1_000),
        duration: None,
        shape: small,
    };
    let live = tidemark_generator::stream(&json, &burst, CancellationToken::new(), false)
        .await
        .unwrap();
    assert_eq!((live.created, live.rejected), (1_000, 0), "{live:?}");
    sent.add(&live);

    // The same backfill again stores nothing new: every order is a duplicate.
    step("backfill again");
    let again = tidemark_generator::backfill(&avro, &history, CancellationToken::new(), false)
        .await
        .unwrap();
    assert_eq!((again.created, again.duplicates), (0, 3_000), "{again:?}");
    assert_eq!(
        (again.customers_recorded, again.customers_unchanged),
        (0, history_customers),
        "the same customers again record nothing: {again:?}"
    );
    // Its refunds and cancellations too: resent, none stored twice.
    assert!(
        sent.refunds > 10 && sent.cancellations > 5,
        "refunds and cancellations: {sent:?}"
    );
    assert_eq!(
        (
            again.refunds,
            again.cancellations,
            again.correction_duplicates
        ),
        (0, 0, history_corrections),
        "{again:?}"
    );
    assert_eq!(sent.corrections_rejected, 0, "{sent:?}");

    step("speed catching up");
    env.speed_caught_up().await;
    let (from, to) = full_range();
    // Every order and every correction lies in the range: both bases agree.
    for basis in ["booking_time", "order_time"] {
        let response = env
            .get(&format!(
                "/v1/revenue/summary?from={from}&to={to}&basis={basis}"
            ))
            .await;
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.unwrap();
        let mut served = Tally::default();
        for t in body["totals"].as_array().unwrap() {
            let currency = t["currency"].as_str().unwrap().to_owned();
            served.created += t["orders"].as_u64().unwrap();
            served.items += t["items"].as_u64().unwrap();
            served.cancellations += t["cancelled_orders"].as_u64().unwrap();
            served
                .revenue_minor
                .insert(currency.clone(), t["revenue_minor"].as_i64().unwrap());
            let refunded = t["refunded_minor"].as_i64().unwrap();
            if refunded != 0 {
                served.refunded_minor.insert(currency, refunded);
            }
        }
        assert_eq!(served.created, sent.created, "orders: {body}");
        assert_eq!(served.items, sent.items, "items: {body}");
        assert_eq!(served.revenue_minor, sent.revenue_minor, "revenue: {body}");
        assert_eq!(
            served.refunded_minor, sent.refunded_minor,
            "{basis} refunds: {body}"
        );
        assert_eq!(
            served.cancellations, sent.cancellations,
            "{basis} cancellations"
        );
    }
    assert!(sent.revenue_minor.len() > 5, "many currencies: {sent:?}");

    // The warehouse (loaded by ingest): revenue by city of residence counts every
    // order, and differs from revenue by the order's city (orders placed away from
    // home, customers who moved).
    step("warehouse catching up");
    env.vault_caught_up().await;
    let by_residence: serde_json::Value = env
        .get(&format!("/v1/revenue/by-residence?from={from}&to={to}"))
        .await
        .json()
        .await
        .unwrap();
    let by_order_city: serde_json::Value = env
        .get(&format!(
            "/v1/revenue/summary?from={from}&to={to}&top_by=city&top=100"
        ))
        .await
        .json()
        .await
        .unwrap();
    let residence: std::collections::BTreeMap<String, u64> = by_residence["rows"]
        .as_array()
        .unwrap()
        .iter()
        .fold(Default::default(), |mut m, r| {
            *m.entry(r["city"].as_str().unwrap_or("-").to_owned())
                .or_default() += r["orders"].as_u64().unwrap();
            m
        });
    let order_city: std::collections::BTreeMap<String, u64> = by_order_city["top"]
        .as_array()
        .unwrap_or_else(|| panic!("{by_order_city}"))
        .iter()
        .map(|t| {
            (
                t["group"].as_str().unwrap().to_owned(),
                t["orders"].as_u64().unwrap(),
            )
        })
        .fold(Default::default(), |mut m, (city, n)| {
            *m.entry(city).or_default() += n;
            m
        });
    assert_eq!(
        residence.values().sum::<u64>(),
        sent.created,
        "{by_residence}"
    );
    assert_eq!(
        order_city.values().sum::<u64>(),
        sent.created,
        "{by_order_city}"
    );
    assert_ne!(residence, order_city);
    assert!(
        !residence.contains_key("-"),
        "every customer has a profile: {residence:?}"
    );
    step("stopping ingest");
    ingest.stop().await.unwrap();
}
