//! The query model (issue 19): one or two dimensions, filters on any dimension
//! whatever the grouping, local time zones (half-hour and 45-minute offsets, days
//! of 23 and 25 hours), on both bases — served == SQL over Postgres for random
//! questions, with the answer split between the batch and the speed view, through
//! REST and GraphQL; and a summary's top groups plus `other` add up.

use chrono::{DateTime, TimeDelta, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tidemark_compactor::{Kind, Outcome};
use tidemark_domain::Order;
use tidemark_ingest::adjust::Ask;
use tidemark_testkit::{Slice, SliceCells};

use crate::{Env, apply_adjustments, cancellation, partial_refund, random_order, served_slice};

/// Days on which clocks change in the zones of [`tidemark_testkit::slice::ZONES`]
/// (Berlin and New York in March, Adelaide in April and October, Berlin in
/// October, New York in November), each with orders placed around it.
const CLOCK_CHANGES: [&str; 6] = [
    "2026-03-08T12:00:00Z",
    "2026-03-29T01:00:00Z",
    "2026-04-04T16:30:00Z",
    "2026-10-03T16:30:00Z",
    "2026-10-25T01:00:00Z",
    "2026-11-01T06:00:00Z",
];

fn at(rfc3339: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(rfc3339).unwrap().to_utc()
}

/// Orders of the last days, and some within a day and a half of each clock change.
fn orders(rng: &mut StdRng, recent: usize) -> Vec<Order> {
    let mut orders: Vec<Order> = (0..recent).map(|_| random_order(rng)).collect();
    for change in CLOCK_CHANGES {
        for _ in 0..12 {
            let mut order = random_order(rng);
            order.created_at =
                at(change) + TimeDelta::seconds(rng.random_range(-36 * 3_600..36 * 3_600));
            orders.push(order);
        }
    }
    orders
}

fn corrections(orders: &[Order], rng: &mut StdRng) -> Vec<Ask> {
    let mut asks: Vec<Ask> = orders
        .iter()
        .step_by(5)
        .map(|o| partial_refund(o, rng))
        .collect();
    asks.extend(orders.iter().skip(2).step_by(11).map(cancellation));
    asks
}

/// The range of a question: minutes over the last days (within `max_points`),
/// hours and days from before the first clock change to tomorrow.
fn range(slice: &Slice) -> (String, String) {
    if matches!(slice.granularity, "minute" | "quarter_hour") {
        crate::full_range()
    } else {
        let tomorrow = (Utc::now() + TimeDelta::days(1)).date_naive();
        // A local date: the zone's own midnight.
        (
            "2026-03-01".to_owned(),
            tomorrow.format("%Y-%m-%d").to_string(),
        )
    }
}

async fn assert_random_slices_exact(env: &Env, rng: &mut StdRng, questions: usize, stage: &str) {
    env.speed_caught_up().await;
    let mut nonempty = 0;
    for _ in 0..questions {
        let slice = Slice::random(rng);
        let (from, to) = range(&slice);
        let served = served_slice(env, &slice, &from, &to).await.unwrap();
        let truth: SliceCells = slice
            .truth(&env.db.pool)
            .await
            .into_iter()
            .filter(|((bucket, _, _), _)| {
                // The truth covers every order; the question its range.
                let start = tidemark_serving::local::parse_time(&from, slice.tz.parse().unwrap());
                let end = tidemark_serving::local::parse_time(&to, slice.tz.parse().unwrap());
                start.is_some_and(|s| *bucket >= s) && end.is_some_and(|e| *bucket < e)
            })
            .collect();
        if served != truth {
            let differing: Vec<_> = truth
                .keys()
                .chain(served.keys())
                .filter(|k| truth.get(*k) != served.get(*k))
                .take(3)
                .map(|k| {
                    format!(
                        "{k:?}: served {:?}, truth {:?}",
                        served.get(k),
                        truth.get(k)
                    )
                })
                .collect();
            panic!(
                "{stage}: {slice:?} over {from}..{to}: {}",
                differing.join("; ")
            );
        }
        nonempty += usize::from(!served.is_empty());
    }
    assert!(
        nonempty * 2 >= questions,
        "{stage}: most questions have an answer ({nonempty} of {questions})"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn random_slices_in_local_time_equal_sql_across_the_handoff() {
    let env = Env::new().await;
    let mut rng = StdRng::seed_from_u64(19);
    let old = orders(&mut rng, 150);
    env.ingest(&old).await;
    apply_adjustments(&env.db.pool, &corrections(&old, &mut rng))
        .await
        .unwrap();
    let published = env.compactor.run_once(Kind::Incremental).await.unwrap();
    assert!(
        matches!(published, Outcome::Published { .. }),
        "{published:?}"
    );
    assert_random_slices_exact(&env, &mut rng, 40, "all in the batch view").await;

    // More orders and corrections of old and new ones: the speed view holds them.
    let new = orders(&mut rng, 100);
    env.ingest(&new).await;
    let mut asks = corrections(&new, &mut rng);
    // Orders the first corrections left alone.
    let untouched = old
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 7 == 1 && i % 5 != 0 && i % 11 != 2);
    asks.extend(untouched.map(|(_, o)| partial_refund(o, &mut rng)));
    apply_adjustments(&env.db.pool, &asks).await.unwrap();
    assert_random_slices_exact(&env, &mut rng, 60, "split between batch and speed").await;
}

/// GraphQL takes the same question as REST (lists for groupings and filters, a
/// zone) and answers the same cells.
async fn assert_graphql_equals_rest(env: &Env) {
    let slice = Slice {
        granularity: "day",
        tz: "Asia/Kathmandu",
        group_by: vec!["city", "category"],
        filters: vec![("city", vec!["Berlin".into(), "São Paulo".into()])],
        currency: None,
        report: None,
        order_time: true,
    };
    let (from, to) = range(&slice);
    let body = env
        .graphql(&format!(
            "{{ revenue(from: \"{from}\", to: \"{to}\", granularity: DAY, groupBy: [CITY, CATEGORY], \
               city: [\"Berlin\", \"São Paulo\"], tz: \"Asia/Kathmandu\", basis: ORDER_TIME) \
               {{ tz points {{ bucket localBucket dimensions {{ city category }} currency \
               revenueMinor orders items refundedMinor refundedItems cancelledOrders buyers }} }} }}"
        ))
        .await;
    assert_eq!(body["data"]["revenue"]["tz"], "Asia/Kathmandu", "{body}");
    let points = &body["data"]["revenue"]["points"];
    assert!(
        points[0]["localBucket"]
            .as_str()
            .unwrap()
            .ends_with("T00:00:00+05:45"),
        "{points}"
    );
    let graphql = crate::slice_cells(points, &slice.group_by);
    assert!(!graphql.is_empty());
    assert_eq!(
        graphql,
        served_slice(env, &slice, &from, &to).await.unwrap()
    );
}

/// A summary's top groups and `other` add up to the sum over all groups, and its
/// totals to the question's total; both equal SQL.
async fn assert_summary_adds_up(env: &Env) {
    let tomorrow = (Utc::now() + TimeDelta::days(1)).date_naive();
    let (from, to) = ("2026-03-01T00:00:00Z", format!("{tomorrow}T00:00:00Z"));
    let filters = vec![("category", vec!["books".to_owned(), "garden".to_owned()])];
    let body: serde_json::Value = env
        .get(&format!(
            "/v1/revenue/summary?from={from}&to={to}&top_by=city,category&top=2&category=books,garden"
        ))
        .await
        .json()
        .await
        .unwrap();
    let sum = |group_by: Vec<&'static str>| {
        let slice = Slice {
            granularity: "day",
            tz: "UTC",
            group_by,
            filters: filters.clone(),
            currency: None,
            report: None,
            order_time: false,
        };
        async move {
            let mut per_currency = std::collections::BTreeMap::<String, [i64; 3]>::new();
            for ((_, _, currency), c) in slice.truth(&env.db.pool).await {
                let s = per_currency.entry(currency).or_default();
                for k in 0..3 {
                    s[k] += [c[0], c[1], c[3]][k];
                }
            }
            per_currency
        }
    };
    let pick = |e: &serde_json::Value| {
        [
            e["revenue_minor"].as_i64().unwrap(),
            e["orders"].as_i64().unwrap(),
            e["refunded_minor"].as_i64().unwrap(),
        ]
    };
    let mut parts = std::collections::BTreeMap::<String, [i64; 3]>::new();
    let entries = body["top"].as_array().unwrap().iter();
    for e in entries.chain(body["other"].as_array().unwrap()) {
        let s = parts
            .entry(e["currency"].as_str().unwrap().to_owned())
            .or_default();
        for (k, v) in pick(e).into_iter().enumerate() {
            s[k] += v;
        }
    }
    assert!(
        !body["other"].as_array().unwrap().is_empty(),
        "more than two groups per currency: {body}"
    );
    assert_eq!(parts, sum(vec!["city", "category"]).await, "{body}");
    let totals: std::collections::BTreeMap<String, [i64; 3]> = body["totals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["currency"].as_str().unwrap().to_owned(), pick(t)))
        .collect();
    assert_eq!(totals, sum(vec![]).await, "{body}");
    let top = &body["top"][0];
    assert_eq!(
        top["group"].as_str().unwrap(),
        format!(
            "{},{}",
            top["dimensions"]["city"].as_str().unwrap(),
            top["dimensions"]["category"].as_str().unwrap()
        )
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn graphql_and_the_summary_share_the_query_model() {
    let env = Env::new().await;
    let mut rng = StdRng::seed_from_u64(1919);
    let old = orders(&mut rng, 100);
    env.ingest(&old).await;
    apply_adjustments(&env.db.pool, &corrections(&old, &mut rng))
        .await
        .unwrap();
    let published = env.compactor.run_once(Kind::Incremental).await.unwrap();
    assert!(matches!(published, Outcome::Published { .. }));
    env.ingest(&orders(&mut rng, 50)).await;
    env.speed_caught_up().await;
    assert_graphql_equals_rest(&env).await;
    assert_summary_adds_up(&env).await;
}

/// A rates file in the ECB's format: weekdays from March 2026 to today (weekends
/// take Friday's rate), USD, JPY and KWD drifting day by day.
fn rates_file() -> String {
    let mut file = "Date,USD,JPY,KWD,CYP,\n".to_owned();
    let mut day = chrono::NaiveDate::from_ymd_opt(2026, 3, 1).unwrap();
    let today = Utc::now().date_naive();
    let mut i = 0_i64;
    while day <= today {
        use chrono::Datelike;
        if day.weekday().num_days_from_monday() < 5 {
            file += &format!(
                "{day},{}.{:04},{}.{:02},0.{:04},N/A,\n",
                1 + i % 2,
                (537 * i) % 10_000,
                150 + i % 20,
                (7 * i) % 100,
                3_000 + (13 * i) % 500
            );
        }
        day = day.succ_opt().unwrap();
        i += 1;
    }
    file
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reporting_currency_converts_at_each_days_rate_and_days_add_up() {
    let env = Env::new().await;
    let mut rng = StdRng::seed_from_u64(4217);
    let old = orders(&mut rng, 120);
    env.ingest(&old).await;
    apply_adjustments(&env.db.pool, &corrections(&old, &mut rng))
        .await
        .unwrap();
    let published = env.compactor.run_once(Kind::Incremental).await.unwrap();
    assert!(matches!(published, Outcome::Published { .. }));
    env.ingest(&orders(&mut rng, 60)).await;
    env.speed_caught_up().await;

    // Without rates the answer is refused, naming what is missing.
    let (from, to) = crate::full_range();
    let r = env
        .get(&format!(
            "/v1/revenue?from={from}&to={to}&report_currency=EUR"
        ))
        .await;
    assert_eq!(r.status(), 422);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let body: serde_json::Value = r.json().await.unwrap();
    let details = body["errors"].to_string();
    assert!(
        details.contains("USD") && details.contains("KWD") && details.contains("days before"),
        "{body}"
    );

    let file = tidemark_ingest::fx::parse(&rates_file()).unwrap();
    assert_eq!(file.ignored_columns, ["CYP"]);
    tidemark_ingest::fx::store(&env.db.pool, &file)
        .await
        .unwrap();

    // Random questions in a reporting currency equal the rule in SQL.
    for _ in 0..30 {
        let mut slice = Slice::random(&mut rng);
        slice.report = Some(["EUR", "USD", "JPY", "KWD"][rng.random_range(0..4)]);
        let (from, to) = range(&slice);
        let served = served_slice(&env, &slice, &from, &to).await.unwrap();
        let truth: SliceCells = slice
            .truth(&env.db.pool)
            .await
            .into_iter()
            .filter(|((bucket, _, _), _)| {
                let zone = slice.tz.parse().unwrap();
                let start = tidemark_serving::local::parse_time(&from, zone).unwrap();
                let end = tidemark_serving::local::parse_time(&to, zone).unwrap();
                *bucket >= start && *bucket < end
            })
            .collect();
        assert_eq!(served, truth, "{slice:?} over {from}..{to}");
        assert!(
            served
                .keys()
                .all(|(_, _, c)| Some(c.as_str()) == slice.report),
            "one currency"
        );
    }

    // A summary in a reporting currency: its totals equal the converted days
    // summed, and its buyers are distinct users over the range.
    let tomorrow = (Utc::now() + TimeDelta::days(1)).date_naive();
    let body: serde_json::Value = env
        .get(&format!(
            "/v1/revenue/summary?from=2026-03-01T00:00:00Z&to={tomorrow}T00:00:00Z\
             &top_by=city&top=2&report_currency=USD&category=books,games"
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["report_currency"], "USD", "{body}");
    let days = Slice {
        granularity: "day",
        tz: "UTC",
        group_by: vec![],
        filters: vec![("category", vec!["books".into(), "games".into()])],
        currency: None,
        report: Some("USD"),
        order_time: false,
    };
    let mut gross = 0;
    for (_, cell) in days.truth(&env.db.pool).await {
        gross += cell[0];
    }
    let totals = body["totals"].as_array().unwrap();
    assert_eq!(totals.len(), 1, "one currency: {body}");
    assert_eq!(
        totals[0]["revenue_minor"].as_i64().unwrap(),
        gross,
        "{body}"
    );
    let distinct = |city: Option<&str>| {
        let city = city.map(str::to_owned);
        let pool = env.db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(DISTINCT o.user_id) FROM orders o JOIN order_lines l USING (order_id) \
                 WHERE l.category IN ('books', 'games') AND ($1::text IS NULL OR o.city = $1)",
            )
            .bind(city)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(totals[0]["buyers"].as_i64().unwrap(), distinct(None).await);
    for entry in body["top"].as_array().unwrap() {
        let city = entry["group"].as_str().unwrap();
        assert_eq!(
            entry["buyers"].as_i64().unwrap(),
            distinct(Some(city)).await,
            "{entry}"
        );
    }

    // Additive: each local day is the sum of its local hours, in every zone.
    for tz in tidemark_testkit::slice::ZONES {
        let ask = |granularity: &'static str| Slice {
            granularity,
            tz,
            group_by: vec!["city"],
            filters: vec![],
            currency: None,
            report: Some("EUR"),
            order_time: false,
        };
        let (from, to) = range(&ask("day"));
        let days = served_slice(&env, &ask("day"), &from, &to).await.unwrap();
        let hours = served_slice(&env, &ask("hour"), &from, &to).await.unwrap();
        let zone: chrono_tz::Tz = tz.parse().unwrap();
        let day_of = |bucket: i64| {
            tidemark_serving::local::LocalBuckets::new(zone, tidemark_domain::Granularity::Day)
                .start(bucket)
        };
        // Every metric but buyers (distinct users do not add up over hours).
        let additive = |cells: SliceCells| -> std::collections::BTreeMap<_, [i64; 6]> {
            let mut out = std::collections::BTreeMap::new();
            for ((bucket, group, currency), cell) in cells {
                let sum: &mut [i64; 6] = out.entry((day_of(bucket), group, currency)).or_default();
                for (s, c) in sum.iter_mut().zip(cell) {
                    *s += c;
                }
            }
            out.retain(|_, c: &mut [i64; 6]| c.iter().any(|v| *v != 0));
            out
        };
        assert_eq!(additive(days.clone()), additive(hours), "{tz}");
        assert!(!days.is_empty());
    }
}

/// A question in a reporting currency asked again after the data moved: its
/// conversion is kept while the pieces it was made of and the rates are the
/// same, and made again when either changes. Its points (and those of the same
/// question per currency, whose cells are compared by value) likewise, while
/// its cells and buyers are the same — the answer equal to SQL each time.
#[tokio::test(flavor = "multi_thread")]
async fn kept_conversions_and_points_serve_only_while_what_they_are_made_of_is_the_same() {
    let env = Env::new().await;
    let mut rng = StdRng::seed_from_u64(4218);
    // Orders around the clock changes (March to November), none recent.
    env.ingest(&orders(&mut rng, 0)).await;
    let published = env.compactor.run_once(Kind::Incremental).await.unwrap();
    assert!(matches!(published, Outcome::Published { .. }));
    let file = tidemark_ingest::fx::parse(&rates_file()).unwrap();
    tidemark_ingest::fx::store(&env.db.pool, &file)
        .await
        .unwrap();
    env.speed_caught_up().await;

    let in_euros = Slice {
        granularity: "hour",
        tz: "Europe/Berlin",
        group_by: vec!["city"],
        filters: vec![],
        currency: None,
        report: Some("EUR"),
        order_time: false,
    };
    let per_currency = Slice {
        report: None,
        ..in_euros.clone()
    };
    let (from, to) = ("2026-03-01", "2026-05-01");
    let exact = async |slice: &Slice| {
        let served = served_slice(&env, slice, from, to).await?;
        let zone = slice.tz.parse().unwrap();
        let start = tidemark_serving::local::parse_time(from, zone).unwrap();
        let end = tidemark_serving::local::parse_time(to, zone).unwrap();
        let truth: SliceCells = slice
            .truth(&env.db.pool)
            .await
            .into_iter()
            .filter(|((bucket, _, _), _)| *bucket >= start && *bucket < end)
            .collect();
        assert!(!truth.is_empty());
        if served == truth {
            Ok(())
        } else {
            Err(format!("served {served:?}\nSQL {truth:?}"))
        }
    };
    let both_exact = async || {
        exact(&in_euros).await.unwrap();
        exact(&per_currency).await.unwrap();
    };
    // (made, kept) of `serving_{what}_total`.
    let counts = async |what: &str| {
        let text = env.serving.metrics().await;
        let count = |result: &str| {
            let series = format!("serving_{what}_total{{result=\"{result}\"}}");
            tidemark_testkit::metric(&text, &series).map_or(0, |n| n as u64)
        };
        (count("made"), count("kept"))
    };

    both_exact().await;
    assert_eq!(counts("conversions").await, (1, 0));
    assert_eq!(counts("points").await, (2, 0));

    // The stream moves on outside the question (an order of today): the speed
    // cursor moved, so the answer is computed again, of the same pieces.
    env.ingest(&[random_order(&mut rng)]).await;
    env.speed_caught_up().await;
    both_exact().await;
    assert_eq!(
        counts("conversions").await,
        (1, 1),
        "the conversion kept served"
    );
    assert_eq!(
        counts("points").await,
        (2, 2),
        "both questions' points kept"
    );

    // A late order inside the question's range: its pieces changed.
    let mut late = random_order(&mut rng);
    late.created_at = at("2026-03-15T12:00:00Z");
    env.ingest(&[late]).await;
    env.speed_caught_up().await;
    both_exact().await;
    assert_eq!(
        counts("conversions").await,
        (2, 1),
        "made again of the new pieces"
    );
    assert_eq!(
        counts("points").await,
        (4, 2),
        "made again of the new cells"
    );

    // A later rates file corrects every rate: made again with the new rates
    // (read again within `state_ttl`); the points per currency stay.
    let corrected = rates_file().replacen(",1.", ",3.", usize::MAX);
    let file = tidemark_ingest::fx::parse(&corrected).unwrap();
    tidemark_ingest::fx::store(&env.db.pool, &file)
        .await
        .unwrap();
    tidemark_testkit::eventually(
        std::time::Duration::from_secs(10),
        "the answer converted at the corrected rates",
        || async { exact(&in_euros).await.is_ok() },
    )
    .await;
    let (made, kept) = counts("conversions").await;
    assert!(made >= 3 && kept >= 1, "made {made}, kept {kept}");
    assert!(counts("points").await.0 >= 5, "made of the converted cells");
    exact(&per_currency).await.unwrap();
}

/// Buyers in both views, more of them than one question to ClickHouse may name:
/// each counted once.
#[tokio::test(flavor = "multi_thread")]
async fn buyers_in_both_views_count_once_however_many() {
    let env = Env::new().await;
    let mut rng = StdRng::seed_from_u64(6_000);
    let hour = Utc::now()
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc()
        - TimeDelta::hours(20);
    let mut order_of = |user: usize| {
        let mut order = random_order(&mut rng);
        order.user_id = format!("buyer-{user:05}-{}", "x".repeat(40));
        order.city = "Berlin".into();
        order.currency = "EUR".parse().unwrap();
        order.created_at = hour + TimeDelta::seconds(rng.random_range(0..3_600));
        order
    };
    let batch: Vec<Order> = (0..3_000).map(&mut order_of).collect();
    env.ingest(&batch).await;
    let published = env.compactor.run_once(Kind::Incremental).await.unwrap();
    assert!(matches!(published, Outcome::Published { .. }));
    // The speed view: 5,000 more, 2,000 of them by users the batch holds.
    let speed: Vec<Order> = (1_000..6_000).map(&mut order_of).collect();
    env.ingest(&speed).await;
    env.speed_caught_up().await;
    let from = hour.format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let to = (hour + TimeDelta::hours(1))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let response = env
        .get(&format!(
            "/v1/revenue?from={from}&to={to}&granularity=hour&group_by=city"
        ))
        .await;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    let points = body["points"].as_array().unwrap();
    assert_eq!(points.len(), 1, "{body}");
    assert_eq!(points[0]["orders"], 8_000);
    assert_eq!(points[0]["buyers"], 6_000, "users of both views count once");
}

/// A deployment upgraded from before the buyers view or quarter-hour buckets: its
/// published runs hold revenue but no buyers, or no quarter hours. The next batch
/// run rebuilds once, and both cover the whole history.
#[tokio::test(flavor = "multi_thread")]
async fn runs_published_before_the_buyers_view_or_quarter_hours_are_rebuilt_once() {
    for before in ["buyers", "quarter hours"] {
        Box::pin(rebuilt_once_after_an_upgrade(before)).await;
    }
}

async fn rebuilt_once_after_an_upgrade(before: &str) {
    let env = Env::new().await;
    let mut rng = StdRng::seed_from_u64(1_919);
    env.ingest(&orders(&mut rng, 80)).await;
    let published = env.compactor.run_once(Kind::Incremental).await.unwrap();
    assert!(matches!(published, Outcome::Published { .. }));
    // As before the upgrade: no buyers, or no quarter hours, in ClickHouse.
    let ch = tidemark_platform::clickhouse::client(&env.clickhouse);
    if before == "buyers" {
        ch.query("TRUNCATE TABLE buyers").execute().await.unwrap();
    } else {
        ch.query("ALTER TABLE revenue_agg DELETE WHERE granularity = 'quarter_hour'")
            .execute()
            .await
            .unwrap();
        // A mutation runs in the background: wait until it has.
        tidemark_testkit::wait::eventually(
            std::time::Duration::from_secs(60),
            "the quarter hours deleted",
            || {
                let query =
                    ch.query("SELECT count() FROM revenue_agg WHERE granularity = 'quarter_hour'");
                async move { query.fetch_one::<u64>().await.is_ok_and(|n| n == 0) }
            },
        )
        .await;
    }
    env.ingest(&orders(&mut rng, 20)).await;
    let rebuilt = env.compactor.run_once(Kind::Incremental).await.unwrap();
    let Outcome::Published { run_id, .. } = rebuilt else {
        panic!("{rebuilt:?}")
    };
    let (kind, base): (String, i64) = sqlx::query_as(
        "SELECT r.kind, s.base_run_id FROM batch_runs r, batch_state s WHERE r.run_id = $1",
    )
    .bind(run_id as i64)
    .fetch_one(&env.db.pool)
    .await
    .unwrap();
    assert_eq!(
        (kind.as_str(), base),
        ("rebuild", run_id as i64),
        "{before}"
    );
    assert_random_slices_exact(&env, &mut rng, 10, "after the upgrade's rebuild").await;
    // Once is enough: the next run is incremental again.
    env.ingest(&orders(&mut rng, 10)).await;
    let next = env.compactor.run_once(Kind::Incremental).await.unwrap();
    let Outcome::Published { run_id, .. } = next else {
        panic!("{next:?}")
    };
    let kind: String = sqlx::query_scalar("SELECT kind FROM batch_runs WHERE run_id = $1")
        .bind(run_id as i64)
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(kind, "incremental", "{before}");
}

/// A question too wide for the reader is a 400 naming the limit, before its cells
/// are held: not a 5xx, not a server out of memory.
#[tokio::test(flavor = "multi_thread")]
async fn a_question_reading_too_many_stored_cells_is_refused() {
    let env = Env::with(tidemark_testkit::redis(), |c| c.serving.max_cells = 50).await;
    let mut rng = StdRng::seed_from_u64(500);
    let recent: Vec<Order> = (0..300).map(|_| random_order(&mut rng)).collect();
    env.ingest(&recent).await;
    let published = env.compactor.run_once(Kind::Incremental).await.unwrap();
    assert!(matches!(published, Outcome::Published { .. }));
    env.speed_caught_up().await;
    let (from, to) = crate::full_range();
    // Small answers still come.
    let r = env
        .get(&format!("/v1/revenue?from={from}&to={to}&granularity=day"))
        .await;
    assert_eq!(r.status(), 200);
    // City × product by minute reads the cube's minutes: more than 10 × 50.
    let r = env
        .get(&format!(
            "/v1/revenue?from={from}&to={to}&granularity=minute&group_by=city,product"
        ))
        .await;
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "too_many_cells", "{body}");
    assert!(
        body["errors"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("more than 500 stored cells"),
        "{body}"
    );
}
