//! Parameters, limits, history, outages and the live subscription.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio_tungstenite::tungstenite::Message;

use crate::{Env, full_range, random_order};

#[tokio::test(flavor = "multi_thread")]
async fn bad_parameters_get_400_with_field_details_and_limits_hold() {
    let env = Env::new().await;
    let (from, to) = full_range();
    let cases: Vec<(String, Vec<&str>)> = vec![
        ("/v1/revenue".into(), vec!["from", "to"]),
        (format!("/v1/revenue?from=yesterday&to={to}"), vec!["from"]),
        (
            format!("/v1/revenue?from={from}&to={to}&granularity=week"),
            vec!["granularity"],
        ),
        (
            format!("/v1/revenue?from={from}&to={to}&group_by=colour"),
            vec!["group_by"],
        ),
        (
            format!("/v1/revenue?from={from}&to={to}&currency=EUE"),
            vec!["currency"],
        ),
        (
            format!("/v1/revenue?from={from}&to={to}&citty=Berlin"),
            vec!["citty"],
        ),
        (
            format!("/v1/revenue?from={from}&to={to}&group_by=city,category,product"),
            vec!["group_by"],
        ),
        (
            format!("/v1/revenue?from={from}&to={to}&group_by=city,city"),
            vec!["group_by"],
        ),
        (
            format!("/v1/revenue?from={from}&to={to}&tz=Mars/Olympus_Mons"),
            vec!["tz"],
        ),
        (
            format!("/v1/revenue?from={from}&to={to}&report_currency=EUE"),
            vec!["report_currency"],
        ),
        (
            format!("/v1/revenue/summary?from={from}&to={to}&report_currency=XAU&tz=Nowhere"),
            vec!["report_currency", "tz"],
        ),
        (
            format!("/v1/revenue?from={from}&to={to}&city={}", "x".repeat(65)),
            vec!["city"],
        ),
        (
            format!("/v1/revenue?from={from}&to={to}&category=books,,games"),
            vec!["category"],
        ),
        (
            format!(
                "/v1/revenue?from={from}&to={to}&product={}",
                vec!["p"; 101].join(",")
            ),
            vec!["product"],
        ),
        (
            "/v1/revenue?from=2026-13-01&to=2026-11-02&tz=Asia/Kolkata".into(),
            vec!["from"],
        ),
        (
            format!("/v1/revenue/summary?from={from}&to={to}&top_by=city,colour"),
            vec!["top_by"],
        ),
        (format!("/v1/revenue?from={to}&to={from}"), vec!["to"]),
        // Eight days of minutes is more than 10,000 points.
        (
            "/v1/revenue?from=2026-01-01T00:00:00Z&to=2026-01-09T00:00:00Z&granularity=minute"
                .into(),
            vec!["granularity"],
        ),
        (
            "/v1/revenue?from=2020-01-01T00:00:00Z&to=2026-01-01T00:00:00Z&granularity=day".into(),
            vec!["to"],
        ),
        (
            format!("/v1/revenue/summary?from={from}&to={to}&top=1000"),
            vec!["top"],
        ),
        ("/v1/users/u-1/orders?limit=0".into(), vec!["limit"]),
    ];
    // Each twice: a question refused is refused again (only questions that pass
    // are kept validated, `rest::validated`).
    for (path, fields) in cases.iter().chain(&cases) {
        let r = env.get(path).await;
        assert_eq!(r.status(), 400, "{path}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        let body: serde_json::Value = r.json().await.unwrap();
        let pointers: Vec<&str> = body["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("{path}: {body}"))
            .iter()
            .map(|e| e["pointer"].as_str().unwrap())
            .collect();
        for field in fields {
            assert!(
                pointers.contains(field),
                "{path}: {field} not in {pointers:?}"
            );
        }
    }
    let r = env.get("/v1/orders/not-a-uuid").await;
    assert_eq!(r.status(), 400);
    let r = env
        .get("/v1/orders/0193a1b2-7c3d-7e4f-8a9b-0c1d2e3f4a5b")
        .await;
    assert_eq!(r.status(), 404);
    let r = env
        .http
        .get(env.serving.url("/v1/revenue"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "a read key is required");

    // GraphQL: depth, complexity (aliases count) and validation errors.
    let nested = "{ a: revenue(from: \"2026-01-01T00:00:00Z\", to: \"2026-01-02T00:00:00Z\") { freshness { batch { runId } speed { cursor } } } }";
    assert!(env.graphql(nested).await["errors"].is_null());
    let aliases: String = (0..100)
        .map(|i| format!("a{i}: revenue(from: \"2026-01-01T00:00:00Z\", to: \"2026-01-02T00:00:00Z\") {{ points {{ orders }} }} "))
        .collect();
    let started = Instant::now();
    let body = env.graphql(&format!("{{ {aliases} }}")).await;
    let rejected_in = started.elapsed();
    let message = body["errors"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        message.contains("complex"),
        "100 aliases are refused: {body}"
    );
    assert!(
        rejected_in < Duration::from_secs(1),
        "refused fast, took {rejected_in:?}"
    );
    let body = env
        .graphql("{ revenue(from: \"2026-01-02T00:00:00Z\", to: \"2026-01-01T00:00:00Z\") { points { orders } } }")
        .await;
    assert_eq!(
        body["errors"][0]["extensions"]["code"], "validation",
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn introspection_can_be_switched_off_and_depth_is_limited() {
    let env = Env::with(tidemark_testkit::redis(), |c| {
        c.serving.graphql_introspection = false;
        c.serving.graphql_max_depth = 3;
    })
    .await;
    let body = env.graphql("{ __schema { types { name } } }").await;
    assert!(
        body["data"]["__schema"].is_null(),
        "introspection is off: {body}"
    );
    assert!(
        !body.to_string().contains("RevenueSeries"),
        "no schema leaks: {body}"
    );
    let body = env
        .graphql("{ revenue(from: \"2026-01-01T00:00:00Z\", to: \"2026-01-02T00:00:00Z\") { freshness { batch { runId } } } }")
        .await;
    let message = body["errors"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        message.contains("nested") || message.contains("depth"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn history_pages_through_a_users_orders_newest_first() {
    let env = Env::new().await;
    let mut rng = StdRng::seed_from_u64(63);
    let mut orders: Vec<_> = (0..25).map(|_| random_order(&mut rng)).collect();
    for o in &mut orders {
        o.user_id = "pager".into();
    }
    env.ingest(&orders).await;
    env.vault_caught_up().await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/users/pager/orders?limit=10&cursor={c}"),
            None => "/v1/users/pager/orders?limit=10".into(),
        };
        let body: serde_json::Value = env.get(&path).await.json().await.unwrap();
        for o in body["orders"].as_array().unwrap() {
            seen.push((
                o["created_at"].as_str().unwrap().to_owned(),
                o["order_id"].as_str().unwrap().to_owned(),
            ));
        }
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 25);
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "newest first, no repeats");
    let one: serde_json::Value = env
        .get(&format!("/v1/orders/{}", orders[0].order_id))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(one["revenue_minor"], orders[0].revenue_minor());
    // Each order with its lines, as sent.
    let basket = orders.iter().find(|o| o.lines.len() > 1).expect("a basket");
    let served: serde_json::Value = env
        .get(&format!("/v1/orders/{}", basket.order_id))
        .await
        .json()
        .await
        .unwrap();
    let lines: Vec<(String, i64, i64)> = served["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["product_id"].as_str().unwrap().to_owned(),
                l["quantity"].as_i64().unwrap(),
                l["revenue_minor"].as_i64().unwrap(),
            )
        })
        .collect();
    let sent: Vec<(String, i64, i64)> = basket
        .lines
        .iter()
        .map(|l| {
            (
                l.product_id.clone(),
                i64::from(l.quantity),
                l.revenue_minor(),
            )
        })
        .collect();
    assert_eq!(lines, sent);
    assert_eq!(served["revenue_minor"], basket.revenue_minor());
    let graphql = env
        .graphql(&format!(
            "{{ order(orderId: \"{}\") {{ revenueMinor lines {{ productId quantity }} }} }}",
            basket.order_id
        ))
        .await;
    assert_eq!(
        graphql["data"]["order"]["lines"].as_array().map(Vec::len),
        Some(basket.lines.len()),
        "{graphql}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_down_is_503_or_a_flagged_partial_answer() {
    let redis = tidemark_testkit::PrivateRedis::start().await;
    let env = Env::with(redis.config(), |_| {}).await;
    let (from, to) = full_range();
    let path = format!("/v1/revenue?from={from}&to={to}&granularity=day");
    assert_eq!(env.get(&path).await.status(), 200);
    redis.stop();
    let r = env.get(&path).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("speed view"),
        "{body}"
    );
    let r = env.get(&format!("{path}&allow_partial=true")).await;
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["partial"], true);
    assert_eq!(body["missing"][0], "speed");
    redis.resume().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_subscription_delivers_an_order_within_a_second_of_its_2xx() {
    let env = Env::isolated().await;
    // An ingest service, so the order's 2xx is real.
    let ingest_config = tidemark_ingest::Config {
        postgres: env.db.config.clone(),
        relay: tidemark_ingest::config::RelaySettings {
            enabled: false,
            ..Default::default()
        },
        ..Default::default()
    };
    let ingest = tidemark_testkit::start(|l, s| tidemark_ingest::serve(ingest_config, l, s)).await;
    let (_, ingest_key) = tidemark_platform::auth::create(
        &env.db.pool,
        "writer",
        &[tidemark_platform::auth::Scope::Ingest],
        None,
    )
    .await
    .unwrap();

    let request = crate::subscription_request(env.serving.addr, Some(&env.key));
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    ws.send(Message::text(r#"{"type":"connection_init","payload":{}}"#))
        .await
        .unwrap();
    let subscribe = serde_json::json!({
        "id": "1",
        "type": "subscribe",
        "payload": { "query": "subscription { revenue(granularity: MINUTE, basis: ORDER_TIME) \
                                { points { orders refundedMinor netRevenueMinor } } }" }
    });
    ws.send(Message::text(subscribe.to_string())).await.unwrap();
    let orders_in = |m: &serde_json::Value| -> i64 {
        m["payload"]["data"]["revenue"]["points"]
            .as_array()
            .map_or(0, |p| {
                p.iter().map(|x| x["orders"].as_i64().unwrap_or(0)).sum()
            })
    };
    let mut next = async || loop {
        let message = ws.next().await.expect("open").expect("frame");
        if let Message::Text(text) = message {
            let value: serde_json::Value = serde_json::from_str(&text).unwrap();
            if value["type"] == "next" {
                return value;
            }
            assert!(value["type"] != "error", "{value}");
        }
    };
    let first = next().await;
    assert_eq!(orders_in(&first), 0);

    let mut rng = StdRng::seed_from_u64(64);
    let mut order = random_order(&mut rng);
    order.created_at = chrono::Utc::now();
    let response = reqwest::Client::new()
        .post(ingest.url("/v1/orders"))
        .bearer_auth(&ingest_key)
        .json(&tidemark_generator::send::order_json(&order))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let acked = Instant::now();
    {
        let head = tidemark_testkit::log_head(&env.db.pool).await;
        let view = tidemark_speedview::SpeedView::new(std::sync::Arc::new(
            tidemark_platform::redis::Redis::new(&env.redis).unwrap(),
        ));
        loop {
            let cursor = view
                .meta()
                .await
                .ok()
                .flatten()
                .map(|m| (m.cursor.txid, m.cursor.seq));
            if cursor >= head {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        eprintln!(
            "in the speed view {} ms after the 2xx",
            acked.elapsed().as_millis()
        );
    }
    let pushed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if orders_in(&next().await) == 1 {
                return acked.elapsed();
            }
        }
    })
    .await
    .expect("the order was pushed");
    eprintln!(
        "subscription update {} ms after the 2xx",
        pushed.as_millis()
    );
    assert!(pushed < Duration::from_secs(1), "took {pushed:?}");

    // A refund of it is pushed too, restating the order's minute (order time).
    let line = &order.lines[0];
    let response = reqwest::Client::new()
        .post(ingest.url(&format!("/v1/orders/{}/refunds", order.order_id)))
        .bearer_auth(&ingest_key)
        .json(&serde_json::json!({
            "refund_id": uuid::Uuid::new_v4(),
            "created_at": chrono::Utc::now().to_rfc3339(),
            "items": [{"product_id": line.product_id, "quantity": 1}],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let sum = |m: &serde_json::Value, field: &str| -> i64 {
        m["payload"]["data"]["revenue"]["points"]
            .as_array()
            .map_or(0, |p| {
                p.iter().map(|x| x[field].as_i64().unwrap_or(0)).sum()
            })
    };
    let refunded = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let update = next().await;
            if sum(&update, "refundedMinor") > 0 {
                return update;
            }
        }
    })
    .await
    .expect("the refund was pushed");
    assert_eq!(sum(&refunded, "refundedMinor"), line.unit_price_minor);
    assert_eq!(
        sum(&refunded, "netRevenueMinor"),
        order.revenue_minor() - line.unit_price_minor
    );
}

/// Any active ISO 4217 currency is taken and served with its exponent: roubles
/// (2 decimals), Kuwaiti dinars (3) and yen (0); a typo and "no currency" are not.
#[tokio::test(flavor = "multi_thread")]
async fn orders_in_rub_kwd_and_jpy_are_served_with_their_exponents_and_typos_are_refused() {
    let env = Env::new().await;
    let (ingest, key) = env.ingest_api().await;
    let http = reqwest::Client::new();
    let post = async |currency: &str, unit_price_minor: i64, quantity: i32| {
        let mut order = random_order(&mut StdRng::seed_from_u64(unit_price_minor as u64));
        order.created_at = chrono::Utc::now() - chrono::TimeDelta::minutes(5);
        // One line, sent with its fields at the top level.
        order.lines.truncate(1);
        let mut body = tidemark_generator::send::order_json(&order);
        body["currency"] = currency.into();
        body["unit_price_minor"] = unit_price_minor.into();
        body["quantity"] = quantity.into();
        let r = http
            .post(ingest.url("/v1/orders"))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.text().await.unwrap())
    };
    for (currency, price, quantity) in [("RUB", 124_899, 2), ("KWD", 3_990, 1), ("JPY", 1_990, 3)] {
        let (status, body) = post(currency, price, quantity).await;
        assert_eq!(status, 201, "{currency}: {body}");
    }
    for refused in ["EUE", "XXX", "XTS", "rub"] {
        let (status, body) = post(refused, 100, 1).await;
        assert_eq!(status, 400, "{refused}: {body}");
        assert!(body.contains("/currency"), "{refused}: {body}");
    }
    env.speed_caught_up().await;

    let (from, to) = full_range();
    let summary: serde_json::Value = env
        .get(&format!("/v1/revenue/summary?from={from}&to={to}"))
        .await
        .json()
        .await
        .unwrap();
    let total = |code: &str| {
        summary["totals"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["currency"] == code)
            .unwrap_or_else(|| panic!("no {code} total in {summary}"))
            .clone()
    };
    assert_eq!(total("RUB")["revenue_minor"], 249_798);
    assert_eq!(total("RUB")["revenue"], "2497.98");
    assert_eq!(total("KWD")["revenue_minor"], 3_990);
    assert_eq!(total("KWD")["revenue"], "3.990");
    assert_eq!(total("JPY")["revenue"], "5970");
    let exponents: Vec<(String, u64)> = summary["currencies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["code"].as_str().unwrap().to_owned(),
                c["exponent"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        exponents,
        [("JPY".into(), 0), ("KWD".into(), 3), ("RUB".into(), 2)]
    );

    let series: serde_json::Value = env
        .get(&format!(
            "/v1/revenue?from={from}&to={to}&granularity=day&currency=KWD"
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(series["points"][0]["revenue"], "3.990", "{series}");
    assert_eq!(
        series["currencies"],
        serde_json::json!([{"code": "KWD", "exponent": 3}])
    );

    let graphql = env
        .graphql(&format!(
            "{{ summary(from: \"{from}\", to: \"{to}\", currency: \"KWD\") \
               {{ totals {{ currency revenueMinor revenue }} currencies {{ code exponent }} }} }}"
        ))
        .await;
    assert_eq!(
        graphql["data"]["summary"],
        serde_json::json!({
            "totals": [{"currency": "KWD", "revenueMinor": 3990, "revenue": "3.990"}],
            "currencies": [{"code": "KWD", "exponent": 3}]
        }),
        "{graphql}"
    );
    ingest.stop().await.unwrap();
}

/// Order history shows each order's refunds and cancellation and its net amount.
#[tokio::test(flavor = "multi_thread")]
async fn history_shows_adjustments_and_the_net_amount() {
    let env = Env::new().await;
    let (ingest, key) = env.ingest_api().await;
    let http = reqwest::Client::new();
    let mut order = random_order(&mut StdRng::seed_from_u64(808));
    order.created_at = chrono::Utc::now() - chrono::TimeDelta::hours(1);
    order.lines = vec![
        tidemark_domain::OrderLine {
            product_id: "p-1".into(),
            category: "books".into(),
            quantity: 2,
            unit_price_minor: 1_000,
        },
        tidemark_domain::OrderLine {
            product_id: "p-2".into(),
            category: "games".into(),
            quantity: 1,
            unit_price_minor: 990,
        },
    ];
    order.currency = "KWD".parse().unwrap();
    let send = async |path: String, body: serde_json::Value| {
        let r = http
            .post(ingest.url(&path))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await
            .unwrap();
        r.status().as_u16()
    };
    let body = tidemark_generator::send::order_json(&order);
    assert_eq!(send("/v1/orders".into(), body).await, 201);
    let now = chrono::Utc::now().to_rfc3339();
    let refund = serde_json::json!({
        "refund_id": uuid::Uuid::from_u128(5), "created_at": now,
        "items": [{"product_id": "p-1", "quantity": 1}]
    });
    let refunds = format!("/v1/orders/{}/refunds", order.order_id);
    assert_eq!(send(refunds, refund).await, 201);
    let cancel = format!("/v1/orders/{}/cancellation", order.order_id);
    assert_eq!(
        send(cancel, serde_json::json!({ "created_at": now })).await,
        201
    );

    env.vault_caught_up().await;
    let served: serde_json::Value = env
        .get(&format!("/v1/orders/{}", order.order_id))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(served["revenue_minor"], 2_990);
    assert_eq!(served["refunded_minor"], 2_990);
    assert_eq!(
        (served["net_minor"].as_i64(), served["net"].as_str()),
        (Some(0), Some("0.000"))
    );
    assert_eq!(served["cancelled"], true);
    let kinds: Vec<&str> = served["adjustments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["refund", "cancellation"]);
    assert_eq!(
        served["adjustments"][1]["lines"],
        serde_json::json!([
            {"product_id": "p-1", "quantity": 1, "amount_minor": 1_000},
            {"product_id": "p-2", "quantity": 1, "amount_minor": 990}
        ])
    );
    let page: serde_json::Value = env
        .get(&format!("/v1/users/{}/orders", order.user_id))
        .await
        .json()
        .await
        .unwrap();
    let listed = page["orders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["order_id"] == order.order_id.to_string())
        .unwrap();
    assert_eq!(listed["net_minor"], 0);
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_customer_is_served_with_every_version() {
    use tidemark_domain::CustomerChange;
    use tidemark_domain::customer::Attributes;

    let env = Env::new().await;
    let at = |s: &str| s.parse::<chrono::DateTime<chrono::Utc>>().unwrap();
    let mut tx = env.db.pool.begin().await.unwrap();
    for (city, from) in [
        ("Berlin", "2026-02-01T00:00:00Z"),
        ("Paris", "2026-06-01T00:00:00Z"),
        ("Rome", "2026-04-01T00:00:00Z"),
    ] {
        let change = CustomerChange {
            user_id: "u-1".into(),
            attributes: Attributes {
                city: city.into(),
                segment: "retail".into(),
                signed_up_at: at("2026-01-15T10:00:00Z"),
            },
            effective_at: at(from),
        };
        tidemark_orderlog::customers::record(&mut tx, &change)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();

    let r = env.get("/v1/customers/u-1").await;
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["current"]["city"], "Paris");
    let shown: Vec<(&str, &str, Option<&str>)> = body["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["city"].as_str().unwrap(),
                v["valid_from"].as_str().unwrap(),
                v["valid_to"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        shown,
        [
            (
                "Berlin",
                "2026-02-01T00:00:00Z",
                Some("2026-04-01T00:00:00Z")
            ),
            ("Rome", "2026-04-01T00:00:00Z", Some("2026-06-01T00:00:00Z")),
            ("Paris", "2026-06-01T00:00:00Z", None),
        ]
    );

    let r = env.get("/v1/customers/u-404").await;
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let r = env.get(&format!("/v1/customers/{}", "x".repeat(65))).await;
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["pointer"], "user_id");
}

/// What the subscription endpoint answers a browser-like client (no header on
/// the upgrade) whose `connection_init` carries `payload`: the first message
/// after a subscribe, or how the connection ended.
async fn subscribe_with_init(env: &Env, payload: serde_json::Value) -> String {
    let request = crate::subscription_request(env.serving.addr, None);
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let init = serde_json::json!({ "type": "connection_init", "payload": payload });
    ws.send(Message::text(init.to_string())).await.unwrap();
    let subscribe = serde_json::json!({
        "id": "1",
        "type": "subscribe",
        "payload": { "query": "subscription { revenue { points { orders } } }" }
    });
    drop(ws.send(Message::text(subscribe.to_string())).await);
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(message) = ws.next().await {
            match message {
                Ok(Message::Text(text)) => {
                    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
                    if value["type"] == "next" || value["type"] == "error" {
                        return format!("{}", value["type"]);
                    }
                }
                Ok(Message::Close(frame)) => {
                    return frame.map_or("closed".to_owned(), |f| {
                        format!("closed {}: {}", u16::from(f.code), f.reason)
                    });
                }
                Ok(_) => {}
                Err(e) => return format!("ended: {e}"),
            }
        }
        "ended".to_owned()
    })
    .await;
    answer.expect("an answer within 10 s")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_subscription_takes_the_key_in_connection_init_as_browsers_must() {
    let env = Env::new().await;
    let bearer = format!("Bearer {}", env.key);
    for accepted in [
        serde_json::json!({ "Authorization": bearer }),
        serde_json::json!({ "authorization": bearer }),
        serde_json::json!({ "apiKey": env.key }),
    ] {
        assert_eq!(
            subscribe_with_init(&env, accepted.clone()).await,
            "\"next\"",
            "{accepted}"
        );
    }
    let (_, ingest_only) = tidemark_platform::auth::create(
        &env.db.pool,
        "writer",
        &[tidemark_platform::auth::Scope::Ingest],
        None,
    )
    .await
    .unwrap();
    for refused in [
        serde_json::json!({}),
        serde_json::json!({ "apiKey": "tdm_not_a_key" }),
        serde_json::json!({ "apiKey": ingest_only }),
    ] {
        let answer = subscribe_with_init(&env, refused.clone()).await;
        assert!(
            answer.starts_with("closed 1002: ") && answer.contains("API key"),
            "{refused}: {answer}"
        );
    }
}

/// A large answer goes gzip-compressed to a client whose `Accept-Encoding` takes
/// it (made once and kept with the answer), the same JSON inflated; a client that
/// does not take gzip, or refuses it with `q=0`, and any small answer get plain
/// JSON. Both doors.
#[tokio::test(flavor = "multi_thread")]
async fn a_large_answer_is_sent_gzip_compressed_to_a_client_that_takes_it() {
    use std::io::Read;
    let env = Env::new().await;
    let mut rng = StdRng::seed_from_u64(41);
    let orders: Vec<_> = (0..150).map(|_| random_order(&mut rng)).collect();
    env.ingest(&orders).await;
    env.speed_caught_up().await;
    let (from, to) = full_range();
    let ask = async |path: &str, accept: Option<&str>, graphql: Option<&str>| {
        let request = match graphql {
            Some(query) => env
                .http
                .post(env.serving.url(path))
                .json(&serde_json::json!({ "query": query })),
            None => env.http.get(env.serving.url(path)),
        };
        let request = match accept {
            Some(accept) => request.header("accept-encoding", accept),
            None => request,
        };
        let r = request.bearer_auth(&env.key).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let header = |name: &str| {
            r.headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        let (encoding, vary) = (header("content-encoding"), header("vary"));
        (encoding, vary, r.bytes().await.unwrap().to_vec())
    };
    let inflate = |body: &[u8]| {
        let mut json = Vec::new();
        flate2::read::GzDecoder::new(body)
            .read_to_end(&mut json)
            .unwrap();
        json
    };

    let series =
        format!("/v1/revenue?from={from}&to={to}&granularity=minute&group_by=city,category");
    let (encoding, vary, plain) = ask(&series, None, None).await;
    assert_eq!(encoding, None);
    assert_eq!(vary.as_deref(), Some("accept-encoding"));
    assert!(
        plain.len() >= tidemark_serving::answers::GZIP_FROM,
        "the answer is large: {} bytes",
        plain.len()
    );
    let (encoding, vary, gzip) = ask(&series, Some("br;q=1.0, gzip;q=0.8, *;q=0.1"), None).await;
    assert_eq!(encoding.as_deref(), Some("gzip"));
    assert_eq!(vary.as_deref(), Some("accept-encoding"));
    assert!(
        gzip.len() * 4 < plain.len(),
        "{} of {} bytes",
        gzip.len(),
        plain.len()
    );
    assert_eq!(inflate(&gzip), plain, "the same answer");
    let (encoding, _, refused) = ask(&series, Some("gzip;q=0, identity"), None).await;
    assert_eq!((encoding, refused), (None, plain));

    let small = format!("/v1/revenue/summary?from={from}&to={to}");
    let (encoding, _, body) = ask(&small, Some("gzip"), None).await;
    assert_eq!(encoding, None, "a small answer stays plain");
    assert!(body.len() < tidemark_serving::answers::GZIP_FROM);

    let query = format!(
        "{{ revenue(from: \"{from}\", to: \"{to}\", granularity: MINUTE, \
           groupBy: [CITY, CATEGORY]) {{ points {{ bucket dimensions {{ city category }} \
           currency revenueMinor orders items }} }} }}"
    );
    let (_, _, plain) = ask("/graphql", None, Some(&query)).await;
    let (encoding, _, gzip) = ask("/graphql", Some("gzip"), Some(&query)).await;
    assert!(plain.len() >= tidemark_serving::answers::GZIP_FROM);
    assert_eq!(encoding.as_deref(), Some("gzip"));
    assert_eq!(inflate(&gzip), plain);
}

/// REST's `fields` keeps only the named fields of each point, in the whole
/// answer's order and with its values; unique buyers are counted only when asked
/// (REST's `fields`, GraphQL's selection of a series or a summary); a field that
/// is not one is a 400 naming the fields.
#[tokio::test(flavor = "multi_thread")]
async fn an_answer_holds_the_fields_asked_and_counts_buyers_only_when_asked() {
    let env = Env::new().await;
    let mut rng = StdRng::seed_from_u64(43);
    let orders: Vec<_> = (0..40).map(|_| random_order(&mut rng)).collect();
    env.ingest(&orders[..30]).await;
    env.speed_caught_up().await;
    let published = env
        .compactor
        .run_once(tidemark_compactor::Kind::Incremental)
        .await
        .unwrap();
    assert!(matches!(
        published,
        tidemark_compactor::Outcome::Published { .. }
    ));
    env.ingest(&orders[30..]).await;
    env.speed_caught_up().await;
    let (from, to) = full_range();
    let series = |granularity: &str, fields: Option<&str>| {
        let fields = fields.map_or_else(String::new, |f| format!("&fields={f}"));
        format!(
            "/v1/revenue?from={from}&to={to}&granularity={granularity}&group_by=city,category{fields}"
        )
    };
    let json = async |path: String| -> serde_json::Value {
        let r = env.get(&path).await;
        assert_eq!(r.status(), 200, "{path}");
        r.json().await.unwrap()
    };
    // How many times the batch view's buyers were counted so far.
    let counted = async || {
        let text = env.serving.metrics().await;
        tidemark_testkit::metric(&text, r#"serving_read_seconds_count{part="batch_buyers"}"#)
            .map_or(0, |count| count as u64)
    };

    let whole = json(series("hour", None)).await;
    let points = whole["points"].as_array().unwrap();
    assert!(points.len() > 5, "{whole}");
    assert!(points.iter().all(|p| p["buyers"].as_i64().unwrap() >= 1));
    let after_whole = counted().await;
    assert!(after_whole >= 1, "the whole answer counted buyers");

    let asked = ["bucket", "dimensions", "currency", "net_revenue_minor"];
    // A question not asked before (the batch's buyers are kept per question).
    let minutes = json(series("minute", Some(&asked.join(",")))).await;
    assert!(!minutes["points"].as_array().unwrap().is_empty());
    assert_eq!(
        counted().await,
        after_whole,
        "no buyers asked, none counted"
    );
    let some = json(series("hour", Some(&asked.join(",")))).await;
    let keys =
        |v: &serde_json::Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
    assert_eq!(
        keys(&some),
        keys(&whole),
        "the answer's other parts stay whole"
    );
    let some_points = some["points"].as_array().unwrap();
    assert_eq!(some_points.len(), points.len());
    for (part, point) in some_points.iter().zip(points) {
        let mut expected = serde_json::Map::new();
        for name in asked {
            expected.insert(name.to_owned(), point[name].clone());
        }
        assert_eq!(part, &serde_json::Value::Object(expected));
    }
    // The text keeps the whole answer's order of fields.
    let text = env
        .get(&series("hour", Some("net_revenue_minor,bucket")))
        .await
        .text()
        .await
        .unwrap();
    assert!(text.contains(r#"{"bucket":"#), "{text}");

    let with_buyers = json(series("day", Some("bucket,dimensions,buyers"))).await;
    assert!(counted().await > after_whole, "buyers asked, counted");
    assert!(
        with_buyers["points"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["buyers"].as_i64().unwrap() >= 1)
    );

    let graphql = |granularity: &str, fields: &str| {
        format!(
            "{{ revenue(from: \"{from}\", to: \"{to}\", granularity: {granularity}, \
               groupBy: [CITY]) {{ points {{ {fields} }} }} }}"
        )
    };
    // Asks a GraphQL query (it must succeed): its answer, and whether it counted
    // buyers (the counter only grows).
    let ask = async |query: String| {
        let before = counted().await;
        let answer = env.graphql(&query).await;
        assert!(answer["errors"].is_null(), "{answer}");
        (counted().await > before, answer)
    };
    let (counts, _) = ask(graphql("QUARTER_HOUR", "bucket group revenueMinor")).await;
    assert!(!counts, "GraphQL without buyers counts none");
    let (counts, answer) = ask(format!(
        "{} fragment F on Point {{ buyers }}",
        graphql("MINUTE", "bucket ...F")
    ))
    .await;
    assert!(counts, "GraphQL with buyers (in a fragment) counts them");
    let points = answer["data"]["revenue"]["points"].as_array().unwrap();
    assert!(!points.is_empty());
    assert!(points.iter().all(|p| p["buyers"].as_i64().unwrap() >= 1));

    // The summary likewise: its totals and top groups count buyers when shown.
    let summary = |top_by: &str, fields: &str| {
        format!(
            "{{ summary(from: \"{from}\", to: \"{to}\", topBy: [{top_by}]) \
               {{ totals {{ currency revenueMinor }} top {{ group {fields} }} }} }}"
        )
    };
    let (counts, _) = ask(summary("CATEGORY", "orders")).await;
    assert!(!counts, "a summary without buyers counts none");
    let (counts, answer) = ask(summary("PRODUCT", "orders buyers")).await;
    assert!(counts, "a summary showing buyers counts them");
    let top = answer["data"]["summary"]["top"].as_array().unwrap();
    assert!(!top.is_empty());
    assert!(top.iter().all(|t| t["buyers"].as_i64().unwrap() >= 1));

    for (fields, code) in [("bucket,nope", "invalid"), ("bucket,bucket", "duplicate")] {
        let r = env.get(&series("hour", Some(fields))).await;
        assert_eq!(r.status(), 400, "{fields}");
        assert_eq!(
            r.headers()["content-type"].to_str().unwrap(),
            "application/problem+json"
        );
        let problem: serde_json::Value = r.json().await.unwrap();
        let error = &problem["errors"][0];
        assert_eq!(error["pointer"], "fields", "{problem}");
        assert_eq!(error["code"], code, "{problem}");
        if code == "invalid" {
            let detail = error["detail"].as_str().unwrap();
            assert!(
                detail.contains("`nope`") && detail.contains("buyers"),
                "{detail}"
            );
        }
    }
}
