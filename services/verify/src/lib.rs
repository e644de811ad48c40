//! Reconciles a running deployment and reports the drift of each check; any drift
//! other than zero is a failure. It needs only network access to the stores and
//! the serving API (no source tree, no cargo): `tidemark-verify`, which
//! `cargo xtask verify` runs against the `up` stack.
//!
//! 1. Served totals against SQL over Postgres, for the last days, at day and hour
//!    granularity, by every grouping. Each answer names what it covers (the batch
//!    threshold and the speed cursor), so the truth is computed for exactly those
//!    orders; an answer is retried when the stream moved under it.
//! 2. The raw lake's order ids against Postgres, up to the relay's cursor: missing,
//!    extra and repeated ids.
//! 3. The Parquet lake against ClickHouse, below the published watermark, every
//!    cell of every granularity and dimension ([`Compactor::verify_lake`]).
//! 4. A sample of random questions of the query model — one or two dimensions,
//!    filters of several values, a local time zone, a basis, and (when exchange
//!    rates are loaded) a reporting currency — each against its SQL truth
//!    ([`tidemark_orderlog::question`]) as of the answer's position.
//!
//! [`Compactor::verify_lake`]: tidemark_compactor::Compactor::verify_lake

pub mod config;

use std::collections::{BTreeMap, HashSet};

use anyhow::{Context, Result};
use chrono::{DurationRound, TimeDelta, Utc};
use futures::StreamExt;
use secrecy::ExposeSecret;
use serde_json::Value;
use sqlx::PgPool;
use tidemark_orderlog::RawRecordRef;
use tidemark_orderlog::question::{AsOf, Cells, Question};
use tidemark_platform::config::S3Config;

pub use config::Config;

/// Per cell: gross revenue, orders, items; refunded, refunded items, cancelled (on
/// one basis).
type Grid = BTreeMap<(i64, String, String), [i64; 6]>;

/// One check's outcome: what it compared, and how many things differ.
#[derive(Debug)]
pub struct Check {
    pub title: String,
    /// One line per comparison, for people.
    pub lines: Vec<String>,
    pub drift: u64,
}

/// Runs every check; prints each as it finishes. Returns them all.
pub async fn run(config: &Config) -> Result<Vec<Check>> {
    let pool = tidemark_platform::postgres::pool(&config.postgres, "tidemark-verify")?;
    let mut checks = Vec::new();
    for check in [
        served(config, &pool).await?,
        raw_lake_check(config, &pool).await?,
        batch(config).await?,
        questions(config, &pool).await?,
    ] {
        println!("{}", check.title);
        for line in &check.lines {
            println!("   {line}");
        }
        checks.push(check);
    }
    Ok(checks)
}

async fn served(config: &Config, pool: &PgPool) -> Result<Check> {
    let days = config.verify.days;
    let serving = config.verify.serving_url.trim_end_matches('/');
    let read_key = config
        .verify
        .read_key
        .as_ref()
        .context("verify.read_key is required")?
        .expose_secret()
        .to_owned();
    let mut check = Check {
        title: format!("1. served totals against Postgres (last {days} days)"),
        lines: Vec::new(),
        drift: 0,
    };
    let http = reqwest::Client::new();
    let to = Utc::now().duration_trunc(TimeDelta::hours(1))? + TimeDelta::hours(2);
    let from = to.duration_trunc(TimeDelta::days(1))? - TimeDelta::days(days);
    for (granularity, width) in [("day", 86_400), ("hour", 3_600)] {
        let (from, to) = if granularity == "day" {
            (
                from,
                to.duration_trunc(TimeDelta::days(1))? + TimeDelta::days(1),
            )
        } else {
            (from, to)
        };
        for (group_by, basis) in [None, Some("city"), Some("category"), Some("product")]
            .into_iter()
            .flat_map(|g| BASES.map(|b| (g, b)))
        {
            let mut url = format!(
                "{serving}/v1/revenue?from={}&to={}&granularity={granularity}&basis={basis}",
                from.format("%Y-%m-%dT%H:%M:%SZ"),
                to.format("%Y-%m-%dT%H:%M:%SZ")
            );
            if let Some(g) = group_by {
                url.push_str(&format!("&group_by={g}"));
            }
            let mut outcome = (0, 0, 0);
            for _attempt in 0..5 {
                let body: Value = http
                    .get(&url)
                    .bearer_auth(&read_key)
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                let served = served_grid(&body)?;
                let (threshold, cursor) = covered(&body)?;
                let truth = truth(
                    pool,
                    width,
                    group_by,
                    basis,
                    from.timestamp(),
                    to.timestamp(),
                    threshold,
                    cursor,
                )
                .await?;
                outcome = compare(&served, &truth);
                if outcome.1 == 0 {
                    break;
                }
            }
            let (cells, differing, orders) = outcome;
            check.lines.push(format!(
                "{granularity:<4} by {:<8} {basis:<12} {cells:>6} cells, {orders:>8} orders, drift {differing}",
                group_by.unwrap_or("total")
            ));
            check.drift += differing;
        }
    }
    Ok(check)
}

async fn raw_lake_check(config: &Config, pool: &PgPool) -> Result<Check> {
    let drift = raw_lake(&config.s3, pool).await?;
    Ok(Check {
        title: "2. raw lake event ids (orders, adjustments) against Postgres (up to the relay's cursor)"
            .into(),
        lines: vec![format!(
            "{} ids in Postgres, {} in the lake: missing {}, extra {}, repeated {}",
            drift.postgres, drift.lake, drift.missing, drift.extra, drift.repeated
        )],
        drift: (drift.missing + drift.extra + drift.repeated) as u64,
    })
}

async fn batch(config: &Config) -> Result<Check> {
    let compactor = tidemark_compactor::connect(&tidemark_compactor::Config {
        postgres: config.postgres.clone(),
        clickhouse: config.clickhouse.clone(),
        s3: config.s3.clone(),
        ..tidemark_compactor::Config::default()
    })
    .await?;
    let drift = compactor.verify_lake().await?;
    let mut lines = vec![format!(
        "run {}: {} lake orders, {} cells compared, drift {}",
        drift.run_id, drift.lake_orders, drift.cells_compared, drift.cells_differing
    )];
    lines.extend(drift.examples.iter().map(|e| format!("  {e}")));
    Ok(Check {
        title: "3. Parquet lake against ClickHouse (published runs)".into(),
        lines,
        drift: drift.cells_differing,
    })
}

fn served_grid(body: &Value) -> Result<Grid> {
    let points = body["points"]
        .as_array()
        .context("an answer without points")?;
    let mut grid = Grid::new();
    for p in points {
        let bucket =
            chrono::DateTime::parse_from_rfc3339(p["bucket"].as_str().unwrap_or_default())?
                .timestamp();
        let key = (
            bucket,
            p["group"].as_str().unwrap_or_default().to_owned(),
            p["currency"].as_str().unwrap_or_default().to_owned(),
        );
        let n = |k: &str| p[k].as_i64().unwrap_or_default();
        grid.insert(
            key,
            [
                n("revenue_minor"),
                n("orders"),
                n("items"),
                n("refunded_minor"),
                n("refunded_items"),
                n("cancelled_orders"),
            ],
        );
    }
    Ok(grid)
}

/// What an answer covers: orders below the batch threshold, and orders at or
/// before the speed cursor.
fn covered(body: &Value) -> Result<(u64, (i64, i64))> {
    let threshold = body["freshness"]["batch"]["watermark_txid"]
        .as_u64()
        .unwrap_or(0);
    let cursor = match body["freshness"]["speed"]["cursor"].as_str() {
        Some(c) => {
            let (t, s) = c.split_once('_').context("a cursor is txid_seq")?;
            (t.parse()?, s.parse()?)
        }
        None => (0, 0),
    };
    Ok((threshold, cursor))
}

/// The bases every served question is reconciled on.
const BASES: [&str; 2] = ["booking_time", "order_time"];

/// Gross figures and, on `basis`, the corrections, per cell, by SQL over the log
/// as of the answer's position (below the batch threshold or at most the speed
/// cursor).
#[allow(clippy::too_many_arguments)]
async fn truth(
    pool: &PgPool,
    width: i64,
    group_by: Option<&str>,
    basis: &str,
    from: i64,
    to: i64,
    threshold: u64,
    cursor: (i64, i64),
) -> Result<Grid> {
    let value = match group_by {
        Some("city") => "o.city",
        Some("category") => "l.category",
        Some("product") => "l.product_id",
        _ => "''",
    };
    // Revenue and items sum the lines; an order counts once per value it contains.
    let sql = format!(
        "SELECT (floor(extract(epoch FROM o.created_at) / $1) * $1)::int8 AS bucket, \
                {value} AS value, o.currency::text, \
                sum(l.quantity::int8 * l.unit_price_minor)::int8, \
                count(DISTINCT o.order_id)::int8, sum(l.quantity)::int8 \
         FROM orders o JOIN order_lines l USING (order_id) \
         WHERE o.created_at >= to_timestamp($2) AND o.created_at < to_timestamp($3) \
           AND (o.txid < $4::text::xid8 OR (o.txid, o.seq) <= ($5::text::xid8, $6)) \
         GROUP BY 1, 2, 3"
    );
    let rows: Vec<(i64, String, String, i64, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(sql)) // `value` is one of four fixed column names
        .bind(width as f64)
        .bind(from as f64)
        .bind(to as f64)
        .bind(threshold.to_string())
        .bind(cursor.0.to_string())
        .bind(cursor.1)
        .fetch_all(pool)
        .await?;
    let mut grid: Grid = rows
        .into_iter()
        .map(|(b, v, c, r, o, i)| ((b, v, c), [r, o, i, 0, 0, 0]))
        .collect();
    // Corrections: per adjusted line (a cancellation: per line of its order), at
    // the adjustment's time or its order's; a cancellation once per value.
    let value = value.replace("l.", "ol.");
    let at = if basis == "order_time" {
        "o.created_at"
    } else {
        "a.created_at"
    };
    let sql = format!(
        "SELECT (floor(extract(epoch FROM {at}) / $1) * $1)::int8, {value}, o.currency::text, \
                coalesce(sum(al.amount_minor), 0)::int8, coalesce(sum(al.quantity), 0)::int8, \
                count(DISTINCT a.adjustment_id) FILTER (WHERE a.kind = 'cancellation')::int8 \
         FROM adjustments a JOIN orders o ON o.order_id = a.order_id \
         JOIN order_lines ol ON ol.order_id = a.order_id \
         LEFT JOIN adjustment_lines al \
              ON al.adjustment_id = a.adjustment_id AND al.line_no = ol.line_no \
         WHERE {at} >= to_timestamp($2) AND {at} < to_timestamp($3) \
           AND (al.line_no IS NOT NULL OR a.kind = 'cancellation') \
           AND (a.txid < $4::text::xid8 OR (a.txid, a.seq) <= ($5::text::xid8, $6)) \
         GROUP BY 1, 2, 3"
    );
    let rows: Vec<(i64, String, String, i64, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(sql)) // fixed column names only
        .bind(width as f64)
        .bind(from as f64)
        .bind(to as f64)
        .bind(threshold.to_string())
        .bind(cursor.0.to_string())
        .bind(cursor.1)
        .fetch_all(pool)
        .await?;
    for (b, v, c, refunded, items, cancelled) in rows {
        grid.entry((b, v, c)).or_default()[3..].copy_from_slice(&[refunded, items, cancelled]);
    }
    Ok(grid)
}

/// (cells compared, cells differing, orders in the truth)
fn compare(served: &Grid, truth: &Grid) -> (u64, u64, i64) {
    let keys: HashSet<_> = served.keys().chain(truth.keys()).collect();
    let zero = [0; 6];
    let differing = keys
        .iter()
        .filter(|k| served.get(**k).unwrap_or(&zero) != truth.get(**k).unwrap_or(&zero))
        .count();
    let orders = truth.values().map(|t| t[1]).sum();
    (keys.len() as u64, differing as u64, orders)
}

#[derive(Debug)]
struct LakeDrift {
    postgres: usize,
    lake: usize,
    missing: usize,
    extra: usize,
    repeated: usize,
}

async fn raw_lake(config: &S3Config, pool: &PgPool) -> Result<LakeDrift> {
    let cursor: Option<(i64, i64)> = sqlx::query_as(
        "SELECT txid::text::int8, seq FROM consumer_cursors WHERE consumer = 'lake-relay'",
    )
    .fetch_optional(pool)
    .await?;
    let (txid, seq) = cursor.unwrap_or((0, 0));
    let ids: Vec<(String,)> = sqlx::query_as(
        "SELECT order_id::text FROM orders WHERE (txid, seq) <= ($1::text::xid8, $2) \
         UNION ALL \
         SELECT adjustment_id::text FROM adjustments WHERE (txid, seq) <= ($1::text::xid8, $2)",
    )
    .bind(txid.to_string())
    .bind(seq)
    .fetch_all(pool)
    .await?;
    let in_postgres: HashSet<String> = ids.into_iter().map(|(t,)| t).collect();

    let s3 = tidemark_platform::s3::client(config).await;
    let mut keys = Vec::new();
    let mut pages = s3
        .list_objects_v2()
        .bucket(&config.bucket)
        .prefix(config.key("raw/orders/"))
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        keys.extend(
            page?
                .contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_owned)),
        );
    }
    // Many small objects: fetch them sixteen at a time.
    let bodies = futures::stream::iter(keys)
        .map(|key| {
            let request = s3.get_object().bucket(&config.bucket).key(&key).send();
            async move {
                let object = request.await.with_context(|| format!("reading {key}"))?;
                let bytes = object.body.collect().await?.into_bytes();
                anyhow::Ok((key, bytes))
            }
        })
        .buffer_unordered(16);
    let mut bodies = std::pin::pin!(bodies);
    let mut seen = HashSet::new();
    let mut repeated = 0;
    while let Some(fetched) = bodies.next().await {
        let (key, bytes) = fetched?;
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            // Either version of the raw format: files from before baskets stay.
            let record: RawRecordRef<'_> =
                serde_json::from_slice(line).with_context(|| format!("a raw record in {key}"))?;
            if (record.txid as i64, record.seq) > (txid, seq) {
                continue; // written for a batch the relay has not confirmed yet
            }
            // An event's id: an adjustment's own, or the order's.
            let id = record
                .adjustment
                .as_ref()
                .map_or(&record.order_id, |a| &a.adjustment_id);
            if !seen.insert(id.to_string()) {
                repeated += 1;
            }
        }
    }
    Ok(LakeDrift {
        postgres: in_postgres.len(),
        lake: seen.len(),
        missing: in_postgres.difference(&seen).count(),
        extra: seen.difference(&in_postgres).count(),
        repeated,
    })
}

/// Zones the sampled questions ask in: whole-hour, half-hour and 45-minute
/// offsets, and daylight saving on both hemispheres.
const ZONES: [&str; 6] = [
    "UTC",
    "Europe/Berlin",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "America/New_York",
    "Australia/Adelaide",
];

/// A random question over the values of the last days' orders.
fn sample_question(
    rng: &mut rand::rngs::StdRng,
    values: &[(&'static str, Vec<String>)],
    reports: &[String],
) -> Question {
    use rand::Rng;
    let mut group_by: Vec<String> = Vec::new();
    for _ in 0..rng.random_range(0..=2) {
        let (a, _) = &values[rng.random_range(0..values.len())];
        if !group_by.iter().any(|g| g == a) {
            group_by.push((*a).to_owned());
        }
    }
    let mut filters = Vec::new();
    for (a, all) in values {
        if !all.is_empty() && rng.random_bool(0.3) {
            let chosen = (0..rng.random_range(1..=3))
                .map(|_| all[rng.random_range(0..all.len())].clone())
                .collect();
            filters.push(((*a).to_owned(), chosen));
        }
    }
    Question {
        granularity: ["hour", "day"][rng.random_range(0..2)].to_owned(),
        tz: ZONES[rng.random_range(0..ZONES.len())].to_owned(),
        group_by,
        filters,
        currency: None,
        report: (!reports.is_empty() && rng.random_bool(0.4))
            .then(|| reports[rng.random_range(0..reports.len())].clone()),
        order_time: rng.random_bool(0.5),
    }
}

/// How an answer compares with the truth (see [`reconcile`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Cells in the answer or the truth.
    pub cells: u64,
    /// Cells that differ in any metric.
    pub differing: u64,
}

/// How an answer (`body`, as `GET /v1/revenue` gave it) to `question` compares with
/// SQL over the log as of the position the answer states (its batch watermark and
/// speed cursor, within its range).
pub async fn reconcile(pool: &PgPool, question: &Question, body: &Value) -> Result<Reconciled> {
    let served = answer_cells(body, &question.group_by)?;
    let (threshold, cursor) = covered(body)?;
    let instant = |field: &str| -> Result<i64> {
        Ok(
            chrono::DateTime::parse_from_rfc3339(body[field].as_str().unwrap_or_default())?
                .timestamp(),
        )
    };
    let as_of = AsOf {
        threshold,
        cursor: (cursor.0 as u64, cursor.1),
    };
    let truth = question
        .truth(pool, Some(as_of), Some((instant("from")?, instant("to")?)))
        .await?;
    let keys: HashSet<_> = served.keys().chain(truth.keys()).collect();
    let zero = [0; 7];
    let differing = keys
        .iter()
        .filter(|k| served.get(**k).unwrap_or(&zero) != truth.get(**k).unwrap_or(&zero))
        .count();
    Ok(Reconciled {
        cells: keys.len() as u64,
        differing: differing as u64,
    })
}

/// An answer's cells in the truth's shape.
fn answer_cells(body: &Value, group_by: &[String]) -> Result<Cells> {
    let mut cells = Cells::new();
    for p in body["points"]
        .as_array()
        .context("an answer without points")?
    {
        let bucket =
            chrono::DateTime::parse_from_rfc3339(p["bucket"].as_str().unwrap_or_default())?
                .timestamp();
        let values = group_by
            .iter()
            .map(|a| p["dimensions"][a].as_str().unwrap_or_default().to_owned())
            .collect();
        let n = |k: &str| p[k].as_i64().unwrap_or_default();
        cells.insert(
            (
                bucket,
                values,
                p["currency"].as_str().unwrap_or_default().to_owned(),
            ),
            [
                n("revenue_minor"),
                n("orders"),
                n("items"),
                n("refunded_minor"),
                n("refunded_items"),
                n("cancelled_orders"),
                n("buyers"),
            ],
        );
    }
    Ok(cells)
}

async fn questions(config: &Config, pool: &PgPool) -> Result<Check> {
    use rand::SeedableRng;
    let settings = &config.verify;
    let serving = settings.serving_url.trim_end_matches('/');
    let read_key = settings
        .read_key
        .as_ref()
        .context("verify.read_key is required")?
        .expose_secret()
        .to_owned();
    let seed = settings
        .seed
        .unwrap_or_else(|| Utc::now().timestamp() as u64);
    let mut check = Check {
        title: format!(
            "4. {} random questions of the query model against Postgres (last {} days, seed {seed})",
            settings.questions, settings.days
        ),
        lines: Vec::new(),
        drift: 0,
    };
    let to = Utc::now().duration_trunc(TimeDelta::hours(1))? + TimeDelta::hours(2);
    let from = to.duration_trunc(TimeDelta::days(1))? - TimeDelta::days(settings.days);
    // Values to filter by: the commonest of the period, and one that is not there.
    let mut values = Vec::new();
    for (attribute, column) in [
        ("city", "o.city"),
        ("category", "l.category"),
        ("product", "l.product_id"),
    ] {
        let mut common: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT {column} FROM orders o JOIN order_lines l USING (order_id) \
             WHERE o.created_at >= $1 GROUP BY 1 ORDER BY count(*) DESC LIMIT 8"
        ))) // fixed column names only
        .bind(from)
        .fetch_all(pool)
        .await?;
        common.push("no-such-value".into());
        values.push((attribute, common));
    }
    let reports: Vec<String> = {
        let loaded: i64 = sqlx::query_scalar("SELECT count(*) FROM fx_rates")
            .fetch_one(pool)
            .await?;
        if loaded > 0 {
            vec!["EUR".into(), "USD".into()]
        } else {
            check
                .lines
                .push("no exchange rates loaded: no question in a reporting currency".into());
            Vec::new()
        }
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let http = reqwest::Client::new();
    for _ in 0..settings.questions {
        let question = sample_question(&mut rng, &values, &reports);
        let url = format!(
            "{serving}/v1/revenue?from={}&to={}&{}",
            from.format("%Y-%m-%dT%H:%M:%SZ"),
            to.format("%Y-%m-%dT%H:%M:%SZ"),
            question.query()
        );
        let mut outcome = (0, 0);
        let mut failed = None;
        for _attempt in 0..5 {
            let response = http.get(&url).bearer_auth(&read_key).send().await?;
            if response.status() == 422 {
                // Missing rates are reported, not drift.
                failed = Some(response.text().await?);
                break;
            }
            let body: Value = response.error_for_status()?.json().await?;
            let reconciled = reconcile(pool, &question, &body).await?;
            outcome = (reconciled.cells, reconciled.differing);
            if outcome.1 == 0 {
                break;
            }
        }
        let shown = format!(
            "{:<4} {:<18} by {:<22} {}{}{}",
            question.granularity,
            question.tz,
            if question.group_by.is_empty() {
                "total".to_owned()
            } else {
                question.group_by.join(",")
            },
            question
                .filters
                .iter()
                .map(|(a, v)| format!("{a}∈{} ", v.len()))
                .collect::<String>(),
            question
                .report
                .as_ref()
                .map(|r| format!("in {r} "))
                .unwrap_or_default(),
            if question.order_time {
                "order_time"
            } else {
                "booking_time"
            },
        );
        match failed {
            Some(problem) => check.lines.push(format!("{shown}: refused: {problem}")),
            None => {
                check.lines.push(format!(
                    "{shown}: {:>5} cells, drift {}",
                    outcome.0, outcome.1
                ));
                check.drift += outcome.1;
            }
        }
    }
    Ok(check)
}
