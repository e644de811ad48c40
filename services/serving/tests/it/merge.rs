//! The served answer is the exact merge: equal to SQL over Postgres once quiet,
//! never above it while a publish is in progress.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use tidemark_compactor::Kind;

use crate::{Env, full_range, grid_of, random_order};

const GROUPINGS: [(Option<&str>, &str); 4] = [
    (None, "total"),
    (Some("city"), "city"),
    (Some("category"), "category"),
    (Some("product"), "product"),
];

async fn rest_grid(
    env: &Env,
    granularity: &str,
    group_by: Option<&str>,
) -> std::collections::BTreeMap<(i64, String, String), [i64; 3]> {
    let (from, to) = full_range();
    let mut path = format!("/v1/revenue?from={from}&to={to}&granularity={granularity}");
    if let Some(g) = group_by {
        path += &format!("&group_by={g}");
    }
    let response = env.get(&path).await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(body["freshness"]["as_of"].is_string(), "{body}");
    grid_of(&body["points"])
}

#[tokio::test(flavor = "multi_thread")]
async fn rest_and_graphql_equal_sql_with_ingest_and_batch_runs_interleaved() {
    let env = Env::new().await;
    let mut rng = StdRng::seed_from_u64(61);
    let mut sent = Vec::new();
    for round in 0..4 {
        let mut orders: Vec<_> = (0..150).map(|_| random_order(&mut rng)).collect();
        orders.extend(sent.iter().take(10).cloned()); // resent: duplicates
        sent.extend(orders.iter().take(150).cloned());
        env.ingest(&orders).await;
        if round % 2 == 1 {
            let outcome = env.compactor.run_once(Kind::Incremental).await.unwrap();
            assert!(matches!(
                outcome,
                tidemark_compactor::Outcome::Published { .. }
            ));
        }
        env.speed_caught_up().await;
        for granularity in ["minute", "hour", "day"] {
            let secs = match granularity {
                "minute" => 60,
                "hour" => 3600,
                _ => 86_400,
            };
            for (group_by, dimension) in GROUPINGS {
                let truth =
                    tidemark_testkit::ground_truth(&env.db.pool, secs, dimension, 0, u64::MAX)
                        .await;
                let truth: std::collections::BTreeMap<_, _> = truth
                    .into_iter()
                    .map(|((b, v, c), t)| {
                        (
                            (b, if group_by.is_some() { v } else { String::new() }, c),
                            t,
                        )
                    })
                    .collect();
                let served = rest_grid(&env, granularity, group_by).await;
                assert_eq!(served, truth, "round {round}: {granularity} by {dimension}");
            }
        }
    }
    // GraphQL answers the same as REST.
    let (from, to) = full_range();
    let body = env
        .graphql(&format!(
            "{{ revenue(from: \"{from}\", to: \"{to}\", granularity: HOUR, groupBy: CITY) \
               {{ points {{ bucket group currency revenue_minor: revenueMinor orders items }} \
                  freshness {{ batch {{ runId watermarkTxid }} speed {{ cursor }} asOf }} }} }}"
        ))
        .await;
    assert!(body["errors"].is_null(), "{body}");
    let graphql = grid_of(&body["data"]["revenue"]["points"]);
    assert_eq!(graphql, rest_grid(&env, "hour", Some("city")).await);
    assert!(
        body["data"]["revenue"]["freshness"]["batch"]["runId"]
            .as_u64()
            .unwrap()
            >= 2
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn never_above_ground_truth_while_publishing() {
    let env = Env::new().await;
    let mut rng = StdRng::seed_from_u64(62);
    env.ingest(&(0..300).map(|_| random_order(&mut rng)).collect::<Vec<_>>())
        .await;
    env.speed_caught_up().await;
    let (mut checks, mut max_over, mut max_over_minor, mut equal_after) = (0, 0, 0, 0);
    for round in 0..3 {
        env.ingest(&(0..200).map(|_| random_order(&mut rng)).collect::<Vec<_>>())
            .await;
        // Orders keep arriving while the run writes, audits and publishes.
        let ingesting = Arc::new(AtomicBool::new(true));
        let writer = {
            let (pool, ingesting) = (env.db.pool.clone(), ingesting.clone());
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(620 + round);
                // At most 300 orders a round: on a busy machine a slower run must
                // not mean ever more orders to compact.
                for _ in 0..60 {
                    if !ingesting.load(Ordering::Relaxed) {
                        break;
                    }
                    let orders: Vec<_> = (0..5).map(|_| random_order(&mut rng)).collect();
                    tidemark_ingest::store::store(&pool, &orders).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            })
        };
        // The run and the checks proceed side by side (joined, not raced: the run
        // is never paused while an answer is checked).
        let published = AtomicBool::new(false);
        let run = async {
            let outcome = env.compactor.run_once(Kind::Incremental).await;
            published.store(true, Ordering::Relaxed);
            ingesting.store(false, Ordering::Relaxed);
            outcome
        };
        let check = async {
            while !published.load(Ordering::Relaxed) {
                let served = rest_grid(&env, "day", Some("city")).await;
                let truth =
                    tidemark_testkit::ground_truth(&env.db.pool, 86_400, "city", 0, u64::MAX).await;
                for (cell, s) in &served {
                    let t = truth.get(cell).copied().unwrap_or([0; 3]);
                    max_over = max_over.max(s[1] - t[1]).max(s[2] - t[2]);
                    max_over_minor = max_over_minor.max(s[0] - t[0]);
                    assert!(
                        s[0] <= t[0] && s[1] <= t[1] && s[2] <= t[2],
                        "over-count at {cell:?}: served {s:?}, truth {t:?}"
                    );
                }
                checks += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let (outcome, ()) = tokio::join!(run, check);
        outcome.unwrap();
        writer.await.unwrap();
        env.speed_caught_up().await;
        let truth = tidemark_testkit::ground_truth(&env.db.pool, 86_400, "city", 0, u64::MAX).await;
        assert_eq!(
            rest_grid(&env, "day", Some("city")).await,
            truth,
            "equal once quiet"
        );
        equal_after += 1;
    }
    tidemark_testkit::figure(
        "R15",
        format!(
            "{checks} served answers (day × city) checked against SQL during 3 publishes under \
             ingest: max over-count {max_over} orders/items, {max_over_minor} minor units; \
             equal after each publish {equal_after} of 3"
        ),
    );
    assert!(
        checks >= 10,
        "answers were checked during publishes ({checks})"
    );
}

/// R20 (issue 22, Redis failover) for serving: the speed view's Redis is a primary,
/// a replica and a Sentinel, followed by both the speed layer and serving. The
/// primary is SIGKILLed while orders keep arriving: while the Sentinel switches,
/// every answer is a 503 with Retry-After or never above the truth; once it has,
/// answers are exact again without any operator action.
#[tokio::test(flavor = "multi_thread")]
async fn r20_the_redis_primary_killed_answers_stay_never_wrong_then_exact() {
    let redis = tidemark_testkit::PrivateRedisFailover::start().await;
    let env = Env::with(redis.config(), |_| {}).await;
    let mut rng = StdRng::seed_from_u64(20);
    env.ingest(&(0..300).map(|_| random_order(&mut rng)).collect::<Vec<_>>())
        .await;
    env.speed_caught_up().await;
    let (from, to) = full_range();
    let path = format!("/v1/revenue?from={from}&to={to}&granularity=day&group_by=city");

    redis.primary.stop(); // SIGKILL
    let killed = std::time::Instant::now();
    let (mut ok, mut unavailable) = (0, 0);
    let exact_after = loop {
        // Orders keep arriving through the switch.
        env.ingest(&(0..5).map(|_| random_order(&mut rng)).collect::<Vec<_>>())
            .await;
        let response = env.get(&path).await;
        let truth = tidemark_testkit::ground_truth(&env.db.pool, 86_400, "city", 0, u64::MAX).await;
        match response.status().as_u16() {
            503 => {
                assert!(response.headers().contains_key("retry-after"));
                unavailable += 1;
            }
            200 => {
                ok += 1;
                let body: serde_json::Value = response.json().await.unwrap();
                let served = grid_of(&body["points"]);
                for (cell, s) in &served {
                    let t = truth.get(cell).copied().unwrap_or([0; 3]);
                    assert!(
                        s[0] <= t[0] && s[1] <= t[1] && s[2] <= t[2],
                        "over-count at {cell:?} during the failover: served {s:?}, truth {t:?}"
                    );
                }
                if served == truth && redis.named_primary() == Some(redis.replica.port) {
                    break killed.elapsed().as_secs_f64();
                }
            }
            other => panic!("status {other} during the failover"),
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "answers were not exact again within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tidemark_testkit::figure(
        "R20",
        format!(
            "serving with the Redis primary SIGKILLed under ingest (Sentinel, down after {} \
             ms): {unavailable} answers 503 + Retry-After, {ok} answered, none above the \
             truth; exact again {exact_after:.1} s after the kill",
            tidemark_testkit::PrivateRedisFailover::DOWN_AFTER_MS
        ),
    );
}

/// A counter of serving's, from its `/metrics`.
async fn serving_metric(env: &Env, series: &str) -> u64 {
    let text = env.get("/metrics").await.text().await.unwrap();
    tidemark_testkit::metric(&text, series).unwrap_or(0.0) as u64
}

/// The served hourly grid by `group_by` from `days` after the full range's start,
/// and the truth by SQL over the same buckets.
async fn served_and_true(
    env: &Env,
    days: i64,
    (group_by, dimension): (Option<&str>, &str),
) -> (Grid, Grid) {
    let (from, to) = full_range();
    let from =
        chrono::DateTime::parse_from_rfc3339(&from).unwrap() + chrono::Days::new(days as u64);
    let path = format!(
        "/v1/revenue?from={}&to={to}&granularity=hour{}",
        from.format("%Y-%m-%dT%H:%M:%SZ"),
        group_by.map_or(String::new(), |g| format!("&group_by={g}"))
    );
    let response = env.get(&path).await;
    assert_eq!(response.status(), 200);
    let served = grid_of(&response.json::<serde_json::Value>().await.unwrap()["points"]);
    let truth = tidemark_testkit::ground_truth(&env.db.pool, 3600, dimension, 0, u64::MAX)
        .await
        .into_iter()
        .filter(|((b, _, _), _)| *b >= from.timestamp())
        .map(|((b, v, c), t)| {
            (
                (b, if group_by.is_some() { v } else { String::new() }, c),
                t,
            )
        })
        .collect();
    (served, truth)
}

type Grid = std::collections::BTreeMap<(i64, String, String), [i64; 3]>;

/// Batch reads go without `FINAL` once the view is counted clean; a published
/// run attached a second time (the fault `FINAL` folds) is counted, reads fold
/// again, and every answer stays exact.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_attached_twice_makes_batch_reads_fold_and_answers_stay_exact() {
    let env = Env::new().await;
    let mut rng = StdRng::seed_from_u64(67);
    let orders: Vec<_> = (0..300).map(|_| random_order(&mut rng)).collect();
    env.ingest(&orders).await;
    let run_id = match env.compactor.run_once(Kind::Incremental).await.unwrap() {
        tidemark_compactor::Outcome::Published { run_id, .. } => run_id,
        other => panic!("expected a publish, got {other:?}"),
    };
    env.speed_caught_up().await;
    let unfolded = r#"serving_batch_reads_total{fold="none"}"#;
    let clean = r#"serving_batch_generations_total{result="clean"}"#;
    let twice = r#"serving_batch_generations_total{result="rows twice"}"#;

    // The first read folds and has the view counted; then reads go without FINAL.
    let (served, truth) = served_and_true(&env, 0, GROUPINGS[1]).await;
    assert_eq!(served, truth);
    tidemark_testkit::eventually(
        Duration::from_secs(10),
        "the view counted clean",
        || async { serving_metric(&env, clean).await >= 1 },
    )
    .await;
    for grouping in &GROUPINGS[2..] {
        let (served, truth) = served_and_true(&env, 0, *grouping).await;
        assert_eq!(served, truth, "{grouping:?}");
    }
    assert_eq!(
        serving_metric(&env, unfolded).await,
        2,
        "two reads without FINAL"
    );

    // The published run's partitions attached a second time.
    let ch = tidemark_platform::clickhouse::client(&env.clickhouse);
    for sql in [
        "CREATE TABLE again AS revenue_agg".to_owned(),
        format!("INSERT INTO again SELECT * FROM revenue_agg WHERE run_id = {run_id}"),
    ] {
        ch.query(&sql).execute().await.unwrap();
    }
    let partitions: Vec<String> = ch
        .query(
            "SELECT DISTINCT partition_id FROM system.parts \
             WHERE database = currentDatabase() AND table = 'again' AND active",
        )
        .fetch_all()
        .await
        .unwrap();
    for partition in &partitions {
        ch.query(&format!(
            "ALTER TABLE revenue_agg ATTACH PARTITION ID '{partition}' FROM again"
        ))
        .execute()
        .await
        .unwrap();
    }
    let count = |sql: &'static str| {
        let ch = ch.clone();
        async move { ch.query(sql).bind(run_id).fetch_one::<u64>().await.unwrap() }
    };
    assert_eq!(
        count("SELECT count() FROM revenue_agg WHERE run_id = ?").await,
        2 * count("SELECT count() FROM revenue_agg FINAL WHERE run_id = ?").await,
        "every row of the run is there twice"
    );

    // Questions not read before (a day later in the range): counted, folded, exact.
    let (served, truth) = served_and_true(&env, 1, GROUPINGS[1]).await;
    assert_eq!(served, truth);
    tidemark_testkit::eventually(
        Duration::from_secs(10),
        "the rows counted twice",
        || async { serving_metric(&env, twice).await >= 1 },
    )
    .await;
    for grouping in GROUPINGS {
        let (served, truth) = served_and_true(&env, 2, grouping).await;
        assert_eq!(served, truth, "{grouping:?}");
    }
    assert_eq!(
        serving_metric(&env, unfolded).await,
        2,
        "no read without FINAL since the run was attached twice"
    );
}
