//! Refunds and cancellations served exactly on both bases, across the batch/speed
//! handoff: a correction of an order the batch view already holds, a refund in the
//! same speed epoch as its order, a cancellation of a partly refunded order, a
//! resent refund; each compared with SQL over Postgres, before and after the batch
//! takes the corrections over.

use std::collections::BTreeMap;

use chrono::{TimeDelta, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tidemark_compactor::{Kind, Outcome};
use tidemark_domain::{Order, RefundItem, RefundRequest};
use tidemark_ingest::adjust::{self, Ask};
use uuid::Uuid;

use crate::{Env, full_range, random_order};

type Cells = BTreeMap<(i64, String, String), [i64; 6]>;

/// A refund of part of each of the order's first lines (units of the first, an
/// amount of the second, if any).
fn partial_refund(order: &Order, rng: &mut StdRng) -> Ask {
    let mut items = vec![RefundItem::Units {
        product_id: order.lines[0].product_id.clone(),
        quantity: 1,
    }];
    if let Some(line) = order.lines.get(1) {
        items.push(RefundItem::Amount {
            product_id: line.product_id.clone(),
            amount_minor: rng.random_range(1..=line.revenue_minor().max(1)),
        });
    }
    Ask::Refund {
        order_id: order.order_id,
        request: RefundRequest {
            refund_id: Uuid::new_v4(),
            // Minutes to days after the order, never in the future.
            created_at: (order.created_at + TimeDelta::minutes(rng.random_range(1..3_000)))
                .min(Utc::now()),
            items,
        },
    }
}

fn cancellation(order: &Order) -> Ask {
    Ask::Cancellation {
        order_id: order.order_id,
        created_at: Utc::now(),
    }
}

async fn apply(env: &Env, asks: &[Ask]) {
    adjust::apply(&env.db.pool, asks, Utc::now(), TimeDelta::minutes(5))
        .await
        .unwrap();
}

/// Served cells on `basis`: gross, orders, items, refunded, refunded items,
/// cancelled (cells with nothing on that basis left out).
async fn served(env: &Env, granularity: &str, group_by: Option<&str>, basis: &str) -> Cells {
    let (from, to) = full_range();
    let mut path =
        format!("/v1/revenue?from={from}&to={to}&granularity={granularity}&basis={basis}");
    if let Some(g) = group_by {
        path += &format!("&group_by={g}");
    }
    let response = env.get(&path).await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    body["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let bucket = chrono::DateTime::parse_from_rfc3339(p["bucket"].as_str().unwrap())
                .unwrap()
                .timestamp();
            let n = |k: &str| p[k].as_i64().unwrap();
            assert_eq!(
                n("net_revenue_minor"),
                n("revenue_minor") - n("refunded_minor")
            );
            assert_eq!(n("gross_revenue_minor"), n("revenue_minor"));
            (
                (
                    bucket,
                    p["group"].as_str().unwrap_or("").to_owned(),
                    p["currency"].as_str().unwrap().to_owned(),
                ),
                [
                    n("revenue_minor"),
                    n("orders"),
                    n("items"),
                    n("refunded_minor"),
                    n("refunded_items"),
                    n("cancelled_orders"),
                ],
            )
        })
        .collect()
}

/// The same cells by SQL over Postgres.
async fn truth(env: &Env, secs: i64, dimension: &str, grouped: bool, order_time: bool) -> Cells {
    let key = |(b, v, c): (i64, String, String)| (b, if grouped { v } else { String::new() }, c);
    let mut cells = Cells::new();
    for (k, [r, o, i]) in
        tidemark_testkit::ground_truth(&env.db.pool, secs, dimension, 0, u64::MAX).await
    {
        cells.entry(key(k)).or_default()[..3].copy_from_slice(&[r, o, i]);
    }
    let corrections = tidemark_testkit::ground_truth_corrections(
        &env.db.pool,
        secs,
        dimension,
        order_time,
        0,
        u64::MAX,
    )
    .await;
    for (k, [f, fi, c]) in corrections {
        cells.entry(key(k)).or_default()[3..].copy_from_slice(&[f, fi, c]);
    }
    cells
}

async fn assert_exact(env: &Env, stage: &str) {
    env.speed_caught_up().await;
    for (granularity, secs) in [("minute", 60), ("hour", 3_600), ("day", 86_400)] {
        for (group_by, dimension) in [
            (None, "total"),
            (Some("city"), "city"),
            (Some("category"), "category"),
            (Some("product"), "product"),
        ] {
            for (basis, order_time) in [("booking_time", false), ("order_time", true)] {
                let expected = truth(env, secs, dimension, group_by.is_some(), order_time).await;
                assert!(
                    expected.values().any(|c| c[3] > 0) && expected.values().any(|c| c[5] > 0),
                    "{stage}: the truth holds refunds and cancellations"
                );
                let got = served(env, granularity, group_by, basis).await;
                assert_eq!(
                    got, expected,
                    "{stage}: {granularity} by {dimension}, {basis}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn refunds_and_cancellations_are_exact_on_both_bases_across_the_handoff() {
    let env = Env::new().await;
    let mut rng = StdRng::seed_from_u64(18);
    let old: Vec<Order> = (0..120).map(|_| random_order(&mut rng)).collect();
    env.ingest(&old).await;
    let published = env.compactor.run_once(Kind::Incremental).await.unwrap();
    assert!(
        matches!(published, Outcome::Published { .. }),
        "{published:?}"
    );

    // Corrections of orders the batch view holds (published a run ago): refunds,
    // then a cancellation of some refunded ones and of some untouched ones.
    let refunds: Vec<Ask> = old[..40]
        .iter()
        .map(|o| partial_refund(o, &mut rng))
        .collect();
    apply(&env, &refunds).await;
    // Resent: the same refunds again change nothing.
    apply(&env, &refunds).await;
    let cancellations: Vec<Ask> = old[30..50].iter().map(cancellation).collect();
    apply(&env, &cancellations).await;
    // New orders refunded in the same speed epoch as they were placed.
    let new: Vec<Order> = (0..60).map(|_| random_order(&mut rng)).collect();
    env.ingest(&new).await;
    let same_epoch: Vec<Ask> = new[..20]
        .iter()
        .map(|o| partial_refund(o, &mut rng))
        .collect();
    apply(&env, &same_epoch).await;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM adjustments")
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(stored, 40 + 20 + 20);
    assert_exact(&env, "corrections in the speed view").await;

    // The batch takes them over (the speed epochs holding them are dropped).
    let published = env.compactor.run_once(Kind::Incremental).await.unwrap();
    assert!(
        matches!(published, Outcome::Published { .. }),
        "{published:?}"
    );
    assert_exact(&env, "corrections in the batch view").await;

    // A cancellation of a partly refunded order after that run, and a rebuild
    // from the lake must agree too.
    apply(&env, &[cancellation(&new[0])]).await;
    assert_exact(&env, "a cancellation after the run").await;
    let rebuilt = env.compactor.run_once(Kind::Rebuild).await.unwrap();
    assert!(matches!(rebuilt, Outcome::Published { .. }), "{rebuilt:?}");
    assert_exact(&env, "after a rebuild").await;

    // `tidemark-verify` reconciles the same: net metrics on both bases, the raw
    // lake's events, Parquet against ClickHouse.
    let (read_key, serving_url) = (env.key.clone(), env.serving.url(""));
    let config = tidemark_verify::Config {
        postgres: env.db.config.clone(),
        clickhouse: env.clickhouse.clone(),
        s3: env.s3.clone(),
        verify: tidemark_verify::config::VerifySettings {
            serving_url,
            read_key: Some(read_key.into()),
            days: 5,
        },
        ..tidemark_verify::Config::default()
    };
    let checks = tidemark_verify::run(&config).await.unwrap();
    assert_eq!(checks.len(), 3);
    for check in &checks {
        assert_eq!(check.drift, 0, "{}: {:?}", check.title, check.lines);
    }
    assert!(
        checks[0].lines.iter().any(|l| l.contains("order_time")),
        "{:?}",
        checks[0].lines
    );
}
