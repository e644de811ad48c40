//! Revenue by city of residence at the time of each order: customers move between
//! their orders (and one move is recorded late, effective in the past); the served
//! answer, from the warehouse, equals the same question computed from the log and
//! the customers' histories.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, TimeDelta, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tidemark_domain::CustomerChange;
use tidemark_domain::customer::{self, Attributes};
use uuid::Uuid;

use crate::{Env, apply_adjustments, cancellation, partial_refund, random_order};

/// (city or none, currency) → [orders, gross, refunded, cancelled].
type Expected = BTreeMap<(Option<String>, String), [i64; 4]>;

async fn record(env: &Env, user: &str, city: &str, at: DateTime<Utc>) {
    let change = CustomerChange {
        user_id: user.into(),
        attributes: Attributes {
            city: city.into(),
            segment: "retail".into(),
            signed_up_at: at,
        },
        effective_at: at,
    };
    let mut tx = env.db.pool.begin().await.unwrap();
    tidemark_orderlog::customers::record(&mut tx, &change)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn revenue_by_residence_follows_each_customer_as_of_each_order() {
    let env = Env::new().await;
    let now = Utc::now();
    let (t0, t1) = (now - TimeDelta::days(20), now - TimeDelta::days(8));
    // u-0..u-3 move at t1; u-4 never moves; u-5 has no profile. u-0's move to
    // Lisbon at t0 + 4 days is recorded last.
    let homes = ["Berlin", "Paris", "Rome", "Madrid", "Vienna"];
    for (i, home) in homes.iter().enumerate() {
        record(&env, &format!("u-{i}"), home, t0).await;
    }
    for (i, to) in ["Oslo", "Lyon", "Turin", "Porto"].iter().enumerate() {
        record(&env, &format!("u-{i}"), to, t1).await;
    }
    record(&env, "u-0", "Lisbon", t0 + TimeDelta::days(4)).await;

    let mut rng = StdRng::seed_from_u64(7);
    let mut orders = Vec::new();
    for k in 0..90 {
        let mut order = random_order(&mut rng);
        order.user_id = format!("u-{}", k % 6);
        // From two days before the first versions until an hour ago.
        order.created_at = chrono::SubsecRound::trunc_subsecs(
            t0 - TimeDelta::days(2)
                + TimeDelta::seconds(rng.random_range(0..(22 * 86_400 - 3_600))),
            6,
        );
        orders.push(order);
    }
    env.ingest(&orders).await;
    let mut asks = Vec::new();
    for (k, order) in orders.iter().enumerate() {
        match k % 5 {
            0 => asks.push(partial_refund(order, &mut rng)),
            1 => asks.push(cancellation(order)),
            _ => {}
        }
    }
    apply_adjustments(&env.db.pool, &asks).await.unwrap();

    env.vault_caught_up().await;

    // The expectation, from the log: each order's gross, what its adjustments gave
    // back, and its customer's version in effect at its time.
    let adjusted: Vec<(Uuid, i64, bool)> = sqlx::query_as(
        "SELECT a.order_id, sum(al.amount_minor)::int8, bool_or(a.kind = 'cancellation') \
         FROM adjustments a JOIN adjustment_lines al USING (adjustment_id) GROUP BY a.order_id",
    )
    .fetch_all(&env.db.pool)
    .await
    .unwrap();
    let adjusted: HashMap<Uuid, (i64, bool)> = adjusted
        .into_iter()
        .map(|(id, amount, cancelled)| (id, (amount, cancelled)))
        .collect();
    let mut histories = HashMap::new();
    for i in 0..6 {
        let user = format!("u-{i}");
        let changes = tidemark_orderlog::customers::changes(&env.db.pool, &user)
            .await
            .unwrap();
        histories.insert(user, customer::history(&changes));
    }
    let (from, to) = (t0 - TimeDelta::days(3), now);
    let mut expected = Expected::new();
    let mut cities_of_u0 = std::collections::BTreeSet::new();
    for order in &orders {
        let city = customer::as_of(&histories[&order.user_id], order.created_at)
            .map(|v| v.attributes.city.clone());
        if order.user_id == "u-0" {
            cities_of_u0.insert(city.clone());
        }
        let (refunded, cancelled) = adjusted.get(&order.order_id).copied().unwrap_or_default();
        let cell = expected
            .entry((city, order.currency.to_string()))
            .or_default();
        cell[0] += 1;
        cell[1] += order
            .lines
            .iter()
            .map(tidemark_domain::OrderLine::revenue_minor)
            .sum::<i64>();
        cell[2] += refunded;
        cell[3] += i64::from(cancelled);
    }
    // The orders do fall on both sides of the moves, the late one included, and
    // before any version.
    assert!(
        cities_of_u0.contains(&Some("Berlin".into())),
        "{cities_of_u0:?}"
    );
    assert!(
        cities_of_u0.contains(&Some("Lisbon".into())),
        "{cities_of_u0:?}"
    );
    assert!(
        cities_of_u0.contains(&Some("Oslo".into())),
        "{cities_of_u0:?}"
    );
    assert!(expected.keys().any(|(city, _)| city.is_none()));

    let url = format!(
        "/v1/revenue/by-residence?from={}&to={}",
        from.format("%Y-%m-%dT%H:%M:%SZ"),
        (to + TimeDelta::minutes(1)).format("%Y-%m-%dT%H:%M:%SZ")
    );
    let r = env.get(&url).await;
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    let mut served = Expected::new();
    for row in body["rows"].as_array().unwrap() {
        let orders = row["orders"].as_i64().unwrap();
        let net = row["net_revenue_minor"].as_i64().unwrap();
        let gross = row["gross_revenue_minor"].as_i64().unwrap();
        let refunded = row["refunded_minor"].as_i64().unwrap();
        assert_eq!(net, gross - refunded);
        let average = row["average_check_minor"].as_i64().unwrap();
        assert!((average * orders - net).abs() <= orders, "{row}");
        served.insert(
            (
                row["city"].as_str().map(str::to_owned),
                row["currency"].as_str().unwrap().to_owned(),
            ),
            [
                orders,
                gross,
                refunded,
                row["cancelled_orders"].as_i64().unwrap(),
            ],
        );
    }
    assert_eq!(served, expected);
    let cursor = body["freshness"]["cursor"].as_str().unwrap();
    assert_ne!(cursor, "0_0");

    // GraphQL answers the same.
    let graphql = env
        .graphql(&format!(
            "{{ revenueByResidence(from: \"{}\", to: \"{}\") {{ rows {{ city currency orders netRevenueMinor }} }} }}",
            from.format("%Y-%m-%dT%H:%M:%SZ"),
            (to + TimeDelta::minutes(1)).format("%Y-%m-%dT%H:%M:%SZ")
        ))
        .await;
    let rows = graphql["data"]["revenueByResidence"]["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("{graphql}"));
    assert_eq!(rows.len(), expected.len());
    let net: i64 = rows
        .iter()
        .map(|r| r["netRevenueMinor"].as_i64().unwrap())
        .sum();
    assert_eq!(net, expected.values().map(|c| c[1] - c[2]).sum::<i64>());

    // Bad parameters: each named.
    let r = env
        .get("/v1/revenue/by-residence?from=yesterday&to=2026-01-01T00:00:00Z&currency=EUE&city=x")
        .await;
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    let mut pointers: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pointer"].as_str().unwrap())
        .collect();
    pointers.sort();
    assert_eq!(pointers, ["city", "currency", "from"], "{body}");
}
