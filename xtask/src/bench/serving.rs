//! Serving at scale: 50 million orders over 90 days (the batch view built by the
//! compactor in five chronological runs, as a backfill would) plus a live stream
//! through ingest and the speed layer, then the dashboard question — 30 days,
//! hourly, `group_by=city,category`, three cities, `tz=Asia/Kolkata`,
//! `report_currency=EUR`, net revenue and buyers in every point, asked as the
//! business dashboard's panel asks it (`fields=` what it draws):
//!
//! - distinct questions (ranges varied, so no cache of Tidemark's holds them) at
//!   50 questions/s, and one question repeated at 2,000/s, both asked as a
//!   browser asks (`Accept-Encoding: gzip, deflate, br, zstd`: the 30-day
//!   answer travels compressed);
//! - one at a time, next to the same question as one SQL statement over a plain
//!   table of the orders' lines (and their refunds) in ClickHouse, sorted by city
//!   and time, and in Postgres — the anchors a team would build instead;
//! - the time and disk the batch view takes, next to the raw and Parquet lakes;
//! - a cross-check: orders and buyers of every cell equal the ClickHouse anchor's,
//!   and net revenue in euros within rounding of its (per-line, floating) figure.
//!
//! And REST and GraphQL at 2,000 requests/s on a small question (the last 24
//! hours, hourly, by city) next to `/healthz` — measured first, and each throughput phase starts
//! when ClickHouse runs nothing (a request the overloaded distinct phase gave up
//! leaves its statements running). `TIDEMARK_BENCH_ORDERS` scales the backfill;
//! `TIDEMARK_BENCH_KEEP_CLICKHOUSE=1` leaves the run's ClickHouse databases (the
//! batch view and the anchor's lines table) and its lakes in the test stack, for
//! trying statements on them afterwards (drop them by hand).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolCopyExt;
use tidemark_loadtest::Report;
use tidemark_platform::auth::{self, Scope};

use super::cpu::{CpuMeter, Statements, statements_text};
use super::{BenchReport, Bound, Figure, Harness, Target, median, scrape, unlink_prefix};
use crate::proc::run;

const DAYS: i64 = 90;
/// Distinct questions asked one after another, their CPU metered.
const CALM: i64 = 50;
const RUNS: usize = 5;
const PER_FILE: usize = 50_000;
const CITIES: &str = "Berlin,Lisbon,Paris";
/// The dashboard phases ask as a browser does: compressed answers welcome.
const BROWSER: Option<&str> = Some("gzip, deflate, br, zstd");
/// The fields of a point the business dashboard's panel of this question
/// draws (`dashboards/business.json`), which it asks for.
const DASHBOARD_FIELDS: &str = "bucket,dimensions,net_revenue,buyers";
/// Kolkata is UTC+05:30 all year.
const KOLKATA: i64 = 19_800;

/// A line of the anchors' plain table: an order line (`kind` 0) or a refund of
/// it (`kind` 1, at the refund's time).
#[derive(clickhouse::Row, Serialize)]
struct Line {
    at: u32,
    city: String,
    category: String,
    product: String,
    currency: String,
    user_id: String,
    amount: i64,
    quantity: u32,
    kind: u8,
}

pub(super) async fn measure(bench: &mut Harness<'_>) -> Result<BenchReport> {
    let orders: usize = std::env::var("TIDEMARK_BENCH_ORDERS")
        .ok()
        .and_then(|n| n.replace('_', "").parse().ok())
        .unwrap_or(50_000_000);
    let db = bench.database("serving").await?;
    let pool = sqlx::PgPool::connect(&db).await?;
    let (_, ingest_key) = auth::create(&pool, "bench", &[Scope::Ingest], None).await?;
    let (_, read_key) = auth::create(&pool, "bench-read", &[Scope::Read], None).await?;
    let prefix = format!("benchserve{}", bench.tag);
    let redis_url = bench.stack.redis_url();
    let mut s3 = bench.stack.s3_config();
    s3.prefix = format!("bench-serving-{}", bench.tag);
    let ch_db = format!("bench_serving_{}", bench.tag);
    let anchor_db = format!("bench_anchor_{}", bench.tag);
    let store_env = || -> Vec<(&'static str, String)> {
        vec![
            ("TIDEMARK_POSTGRES__URL", db.clone()),
            ("TIDEMARK_REDIS__URL", redis_url.clone()),
            ("TIDEMARK_REDIS__KEY_PREFIX", prefix.clone()),
            ("TIDEMARK_CLICKHOUSE__URL", bench.stack.clickhouse_url()),
            ("TIDEMARK_CLICKHOUSE__DATABASE", ch_db.clone()),
            ("TIDEMARK_S3__ENDPOINT", s3.endpoint.clone()),
            ("TIDEMARK_S3__BUCKET", s3.bucket.clone()),
            ("TIDEMARK_S3__PREFIX", s3.prefix.clone()),
            (
                "TIDEMARK_S3__ACCESS_KEY_ID",
                crate::stack::S3_ACCESS_KEY.to_owned(),
            ),
            (
                "TIDEMARK_S3__SECRET_ACCESS_KEY",
                crate::stack::S3_SECRET_KEY.to_owned(),
            ),
        ]
    };
    let ch = clickhouse::Client::default()
        .with_url(bench.stack.clickhouse_url())
        .with_validation(false);
    ch.query(&format!("CREATE DATABASE IF NOT EXISTS {anchor_db}"))
        .execute()
        .await?;
    let anchor = ch.clone().with_database(&anchor_db);
    anchor
        .query(
            "CREATE TABLE lines (at DateTime, city String, category String, product String, \
               currency String, user_id String, amount Int64, quantity UInt32, kind UInt8) \
             ENGINE = MergeTree PARTITION BY toYYYYMM(at) ORDER BY (city, at)",
        )
        .execute()
        .await?;
    sqlx::query(
        "CREATE TABLE anchor_lines (at timestamptz, city text, category text, product text, \
           currency text, user_id text, amount int8, quantity int4, kind int2)",
    )
    .execute(&pool)
    .await?;

    // The backfill ends two hours ago; the live stream is after it, so questions
    // inside the backfill can be checked against the anchors.
    let now = Utc::now().timestamp();
    let end = now - now.rem_euclid(3_600) - 2 * 3_600;
    let start = end - DAYS * 86_400;
    let s3_client = tidemark_platform::s3::client(&s3).await;
    let files = orders.div_ceil(PER_FILE);
    let mut raw_bytes = 0u64;
    let mut batch_seconds = 0.0;
    let mut load_seconds = 0.0;
    for run_no in 0..RUNS {
        let files_of_run = (files * run_no / RUNS)..(files * (run_no + 1) / RUNS);
        // A transaction id of its own, below the next run's cut.
        let xid: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::int8")
            .fetch_one(&pool)
            .await?;
        eprintln!(
            "xtask bench: backfill {}/{RUNS}: files {files_of_run:?} of {files}",
            run_no + 1
        );
        let loaded = Instant::now();
        let uploads = futures::stream::iter(files_of_run).map(|i| {
            let (s3_client, s3, pool, anchor) =
                (s3_client.clone(), s3.clone(), pool.clone(), anchor.clone());
            let count = PER_FILE.min(orders - i * PER_FILE);
            let window = (DAYS * 86_400) / files as i64;
            let from = start + window * i as i64;
            async move {
                let (body, lines) = tokio::task::spawn_blocking(move || {
                    backfill_file(i, count, xid, (from, from + window))
                })
                .await?;
                let bytes = body.len() as u64;
                let key = format!("raw/orders/bench/run{run_no}/part-{i:05}.jsonl");
                s3_client
                    .put_object()
                    .bucket(&s3.bucket)
                    .key(s3.key(&key))
                    .body(aws_sdk_s3::primitives::ByteStream::from(body))
                    .send()
                    .await?;
                // Each file a relay batch of its own: log rows (xid, 2n] of its
                // orders' n (`backfill_file`), as the relay records them.
                let first = i * PER_FILE;
                sqlx::query(
                    "INSERT INTO lake_raw_files (key, dt, hour, after_txid, after_seq, until_txid, \
                       until_seq, min_txid, max_txid, rows, bytes) \
                     VALUES ($1, current_date, 0, $2::text::xid8, $5, $2::text::xid8, $6, \
                             $2::text::xid8, $2::text::xid8, $3, $4)",
                )
                .bind(&key)
                .bind(xid)
                .bind(lines.len() as i64)
                .bind(bytes as i64)
                .bind((2 * first) as i64)
                .bind((2 * (first + count)) as i64)
                .execute(&pool)
                .await?;
                let mut insert = anchor.insert::<Line>("lines").await?;
                let mut copy = String::with_capacity(lines.len() * 100);
                for line in &lines {
                    insert.write(line).await?;
                    use std::fmt::Write;
                    writeln!(
                        copy,
                        "{},{},{},{},{},{},{},{},{}",
                        DateTime::from_timestamp(i64::from(line.at), 0).unwrap_or_default(),
                        line.city,
                        line.category,
                        line.product,
                        line.currency,
                        line.user_id,
                        line.amount,
                        line.quantity,
                        line.kind
                    )?;
                }
                insert.end().await?;
                let mut pg = pool
                    .copy_in_raw("COPY anchor_lines FROM STDIN (FORMAT csv)")
                    .await?;
                pg.send(copy.into_bytes()).await?;
                pg.finish().await?;
                anyhow::Ok(bytes)
            }
        });
        let sizes: Vec<u64> = uploads.buffer_unordered(3).try_collect().await?;
        raw_bytes += sizes.iter().sum::<u64>();
        load_seconds += loaded.elapsed().as_secs_f64();
        // The relay has "landed" everything: its horizon is past any cut.
        sqlx::query(
            "INSERT INTO consumer_cursors (consumer, horizon) VALUES ('lake-relay', '1099511627776') \
             ON CONFLICT (consumer) DO UPDATE SET horizon = EXCLUDED.horizon",
        )
        .execute(&pool)
        .await?;
        let compacted = Instant::now();
        let mut compact = Command::new(bench.bin("tidemark-compactor"));
        compact
            .arg("run-once")
            .env("TIDEMARK_TELEMETRY__LOG_FILTER", "warn");
        for (k, v) in store_env() {
            compact.env(k, v);
        }
        let out = run(&mut compact)?;
        if !out.contains("Published") {
            bail!("batch run {} did not publish: {out}", run_no + 1);
        }
        batch_seconds += compacted.elapsed().as_secs_f64();
        // The raw objects are in the Parquet lake now; their disk is needed.
        drop(std::fs::remove_dir_all(
            s3_dir(bench, &s3).join(format!("raw/orders/bench/run{run_no}")),
        ));
    }
    let lake_bytes = dir_bytes(&s3_dir(bench, &s3));
    let ch_bytes = |database: String| {
        let ch = ch.clone();
        async move {
            let rows: Vec<(String, u64)> = ch
                .query(
                    "SELECT table, toUInt64(sum(bytes)) FROM system.parts \
                     WHERE database = ? AND active GROUP BY table",
                )
                .bind(database)
                .fetch_all()
                .await?;
            anyhow::Ok(rows.into_iter().collect::<BTreeMap<String, u64>>())
        }
    };
    let view = ch_bytes(ch_db.clone()).await?;
    let view_bytes = view.get("revenue_agg").copied().unwrap_or(0);
    let buyers_bytes = view.get("buyers").copied().unwrap_or(0);
    let anchor_ch_bytes = ch_bytes(anchor_db.clone())
        .await?
        .get("lines")
        .copied()
        .unwrap_or(0);
    sqlx::query("CREATE INDEX ON anchor_lines USING brin (at)")
        .execute(&pool)
        .await?;
    sqlx::query("VACUUM ANALYZE anchor_lines")
        .execute(&pool)
        .await?;
    let anchor_pg_bytes: i64 = sqlx::query_scalar("SELECT pg_total_relation_size('anchor_lines')")
        .fetch_one(&pool)
        .await?;

    // Daily rates (weekdays, as the ECB publishes) for Tidemark; every day's
    // factor (the last rate carried over a weekend) for the anchors.
    let mut factors: Vec<(NaiveDate, &str, f64)> = Vec::new();
    let mut last: Option<(f64, f64)> = None;
    let (mut usd, mut gbp) = (1.0842_f64, 0.8571_f64);
    let mut day = date(start) - chrono::Days::new(10);
    while day <= date(now) {
        let wobble =
            |k: i64| ((i64::from(day.num_days_from_ce()) * k).rem_euclid(11) - 5) as f64 / 2_000.0;
        usd = ((usd * (1.0 + wobble(7_919))) * 10_000.0).round() / 10_000.0;
        gbp = ((gbp * (1.0 + wobble(104_729))) * 10_000.0).round() / 10_000.0;
        if day.weekday().num_days_from_monday() < 5 {
            sqlx::query(
                "INSERT INTO fx_rates (currency, day, per_eur) \
                 VALUES ('USD', $1, $2::text::numeric), ('GBP', $1, $3::text::numeric)",
            )
            .bind(day)
            .bind(format!("{usd:.4}"))
            .bind(format!("{gbp:.4}"))
            .execute(&pool)
            .await?;
            last = Some((usd, gbp));
        }
        if let Some((u, g)) = last {
            factors.extend([
                (day, "USD", 1.0 / u),
                (day, "GBP", 1.0 / g),
                (day, "EUR", 1.0),
            ]);
        }
        day = day.succ_opt().context("a next day")?;
    }
    sqlx::query("CREATE TABLE anchor_rates (day date, currency text, f float8)")
        .execute(&pool)
        .await?;
    anchor
        .query("CREATE TABLE rates (d Date, currency String, f Float64) ENGINE = Memory")
        .execute()
        .await?;
    for (day, currency, f) in &factors {
        sqlx::query("INSERT INTO anchor_rates VALUES ($1, $2, $3)")
            .bind(day)
            .bind(currency)
            .bind(f)
            .execute(&pool)
            .await?;
    }
    let values: Vec<String> = factors
        .iter()
        .map(|(day, currency, f)| format!("('{day}', '{currency}', {f:e})"))
        .collect();
    anchor
        .query(&format!("INSERT INTO rates VALUES {}", values.join(", ")))
        .execute()
        .await?;

    eprintln!("xtask bench: the services, and a live stream of 200 orders/s");
    let ingest = bench.service("ingest", &store_env()).await?;
    bench.service("speed", &store_env()).await?;
    let serving = bench.service("serving", &store_env()).await?;
    let streamed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stream = tokio::spawn(live_stream(
        ingest.clone(),
        ingest_key.clone(),
        streamed.clone(),
    ));

    // Questions: 30 days from a Kolkata hour (UTC :30), each starting an hour
    // after the last, all inside the backfill.
    let first_from = start + 86_400 - KOLKATA.rem_euclid(3_600) + 3_600;
    let window = 30 * 86_400;
    // With every field of a point: what the cross-check reads.
    let whole = |from: i64| {
        format!(
            "{serving}/v1/revenue?from={}&to={}&granularity=hour&group_by=city,category\
             &city={CITIES}&tz=Asia/Kolkata&report_currency=EUR",
            rfc3339(from),
            rfc3339(from + window)
        )
    };
    // As the business dashboard's panel asks it: the fields it draws.
    let question = |from: i64| format!("{}&fields={DASHBOARD_FIELDS}", whole(from));
    let hours = (end - window - first_from) / 3_600;
    ensure!(
        hours > 1_100 + 6 * CALM,
        "the backfill is too short for 1,000 distinct questions and {CALM} more"
    );
    let urls: Vec<String> = (0..1_001)
        .map(|i| question(first_from + i * 3_600))
        .collect();
    let url_file = bench.stack.base.join("bench-serving-urls.txt");
    std::fs::write(&url_file, urls.join("\n"))?;
    let http = reqwest::Client::new();

    // One at a time: Tidemark cold (questions asked nowhere else), the anchors.
    let singles: Vec<i64> = (0..10)
        .map(|i| first_from + (1_050 + i * 5) * 3_600)
        .collect();
    let mut ours = Vec::new();
    let mut parsed_ms = Vec::new();
    let mut answers = Vec::new();
    let mut drawn = Vec::new();
    // What a question costs each program when asked one after another (the
    // distinct phase's CPU is a saturated machine's, given-up questions
    // included): only the live stream and the background work beside it.
    let calm: Vec<i64> = (0..CALM)
        .map(|i| first_from + (1_100 + i * 6) * 3_600)
        .collect();
    let meter = CpuMeter::start().await;
    for from in &calm {
        let r = http
            .get(question(*from))
            .bearer_auth(&read_key)
            .send()
            .await?;
        ensure!(r.status().is_success(), "{}", r.text().await?);
        r.bytes().await?;
    }
    let calm_cpu = meter.finish().await?;
    // The same time with no question asked: the stream and background work alone.
    let meter = CpuMeter::start().await;
    tokio::time::sleep(Duration::from_secs_f64(calm_cpu.seconds)).await;
    let calm_cpu = calm_cpu.beyond(&meter.finish().await?);
    let before_singles = scrape(&serving).await?;
    for from in &singles {
        let t = Instant::now();
        let r = http
            .get(question(*from))
            .bearer_auth(&read_key)
            .send()
            .await?;
        ensure!(
            r.status().is_success(),
            "the dashboard question: {}",
            r.text().await?
        );
        // Timed to the answer's last byte, as the load phases time theirs: the
        // client's parsing (this debug build's serde_json) is not Tidemark's.
        let bytes = r.bytes().await?;
        ours.push(t.elapsed().as_secs_f64() * 1e3);
        let parsing = Instant::now();
        drawn.push(serde_json::from_slice::<serde_json::Value>(&bytes)?);
        parsed_ms.push(parsing.elapsed().as_secs_f64() * 1e3);
    }
    let singles_steps = [
        steps("one at a time", &before_singles, &scrape(&serving).await?),
        format!(
            "CPU of {CALM} distinct questions asked one after another, beyond what the \
             machine used as long without them: {}",
            calm_cpu.text(Some((CALM as f64, "question")))
        ),
    ];
    // Every field, orders too, for the cross-check; not timed.
    for from in &singles {
        let r = http.get(whole(*from)).bearer_auth(&read_key).send().await?;
        answers.push(r.error_for_status()?.json::<serde_json::Value>().await?);
    }
    // The size a browser receives (the bodies above were asked for plain).
    let gzip_bytes = http
        .get(question(singles[0]))
        .bearer_auth(&read_key)
        .header("accept-encoding", BROWSER.unwrap_or_default())
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?
        .len();
    let mut on_clickhouse = Vec::new();
    let mut anchor_cells = Vec::new();
    for from in &singles {
        let t = Instant::now();
        let rows: Vec<AnchorCell> = anchor
            .query(&clickhouse_anchor(*from, *from + window))
            .fetch_all()
            .await?;
        on_clickhouse.push(t.elapsed().as_secs_f64() * 1e3);
        anchor_cells.push(rows);
    }
    let mut on_postgres = Vec::new();
    let pool = sqlx::PgPool::connect(&db).await?;
    for from in singles.iter().take(3) {
        let t = Instant::now();
        let rows: Vec<(i64, String, String, f64, i64, i64)> =
            sqlx::query_as(sqlx::AssertSqlSafe(postgres_anchor(*from, *from + window)))
                .fetch_all(&pool)
                .await?;
        on_postgres.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(!rows.is_empty(), "the Postgres anchor found nothing");
    }
    let (cells_checked, worst_cents) = cross_check(&answers, &anchor_cells)?;
    // Where Tidemark's time goes: its two ClickHouse statements for the same
    // questions, timed alone (serving runs them at once).
    let state = tidemark_batchview::PublishedState::load(&pool)
        .await?
        .context("a published state")?;
    let view = ch.clone().with_database(&ch_db);
    let (group_by, filters) = (
        [
            tidemark_domain::Attribute::City,
            tidemark_domain::Attribute::Category,
        ],
        [(
            tidemark_domain::Attribute::City,
            CITIES.split(',').map(str::to_owned).collect::<Vec<_>>(),
        )],
    );
    let hour_key = format!("{{t}} - modulo({{t}} + {KOLKATA}, 3600)");
    let (mut revenue_ms, mut buyers_ms) = (Vec::new(), Vec::new());
    for from in &singles {
        let day = from - from.rem_euclid(86_400);
        let t = Instant::now();
        tidemark_batchview::cells(
            &view,
            &state,
            &tidemark_batchview::CellsQuery {
                granularity: tidemark_domain::Granularity::QuarterHour,
                from: day,
                to: from + window,
                shape: tidemark_domain::Dimension::CityCategory,
                key: &hour_key,
                dated: true,
                group_by: &group_by,
                filters: &filters,
                currency: None,
                fold: true,
            },
            usize::MAX / 4,
            0,
        )
        .await?;
        revenue_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        tidemark_batchview::buyers(
            &view,
            &state,
            &tidemark_batchview::BuyersQuery {
                from: *from,
                to: from + window,
                key: &hour_key,
                group_by: &group_by,
                filters: &filters,
                currency: None,
                per_currency: false,
            },
        )
        .await?;
        buyers_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }

    // The small question's phases first, each phase on a settled machine: a
    // request given up (the distinct phase overloads on two cores) leaves its
    // ClickHouse statements running, which took the CPU of the phases after it.
    let mut settled = vec![("before the small question", settle(&ch).await?)];
    let doors = doors(bench, &serving, &read_key).await?;
    settled.push(("before the distinct questions", settle(&ch).await?));
    eprintln!("xtask bench: 1,000 distinct questions at 50/s, then one at 2,000/s");
    let url_list = format!("@{}", url_file.display());
    let before_distinct = scrape(&serving).await?;
    let meter = CpuMeter::start().await;
    let distinct = rate(
        bench,
        &read_key,
        ("distinct", &url_list, None),
        BROWSER,
        "50",
        "20",
    )?;
    // Where a distinct question's CPU goes, per question answered (the phase is
    // saturated: what is answered is what the machine could do).
    let distinct_cpu = meter.finish().await?;
    let distinct_steps = [
        steps("distinct", &before_distinct, &scrape(&serving).await?),
        format!(
            "CPU while distinct questions were asked 50/s: {}",
            distinct_cpu.text(Some((
                distinct.requests.saturating_sub(distinct.errors) as f64,
                "question answered"
            )))
        ),
    ];
    settled.push(("after the distinct questions", settle(&ch).await?));
    let before_repeated = scrape(&serving).await?;
    let meter = CpuMeter::start().await;
    let statements = Statements::start(&db).await?;
    let (per_second, seconds) = ("2000", "15");
    let repeated = rate(
        bench,
        &read_key,
        ("repeated", &urls[0], None),
        BROWSER,
        per_second,
        seconds,
    )?;
    let repeated_cpu = meter.finish().await?;
    let repeated_statements = statements.top(5).await?;
    let after_repeated = scrape(&serving).await?;
    let repeated_inside = [
        inside(
            "repeated",
            &before_repeated,
            &after_repeated,
            "/v1/revenue",
            "serving_answers_total",
        ),
        steps("repeated", &before_repeated, &after_repeated),
        format!(
            "CPU while the dashboard question was repeated {per_second}/s: {}",
            repeated_cpu.text(Some((
                per_second.parse::<f64>()? * seconds.parse::<f64>()?,
                "request"
            )))
        ),
        format!(
            "Postgres's statements while the dashboard question was repeated (the live \
             stream and serving's reads), by time: {}",
            statements_text(&repeated_statements)
        ),
    ];
    stream.abort();
    let streamed = streamed.load(std::sync::atomic::Ordering::Relaxed);

    bench.stop_services().await;
    let serving_rss = bench.peak_rss_mb("serving").unwrap_or(f64::NAN);
    pool.close().await;
    unlink_prefix(&bench.stack.ports.redis.to_string(), &format!("{prefix}:*"))?;
    if std::env::var("TIDEMARK_BENCH_KEEP_CLICKHOUSE").as_deref() == Ok("1") {
        eprintln!(
            "xtask bench: ClickHouse databases {ch_db} and {anchor_db} kept, and S3 prefix {}",
            s3.prefix
        );
    } else {
        bench.drop_batch_stores(&s3, &ch_db).await?;
        ch.query(&format!("DROP DATABASE IF EXISTS {anchor_db}"))
            .execute()
            .await?;
    }
    drop(std::fs::remove_file(&url_file));

    let mut report = BenchReport::new(
        "serving",
        format!(
            "release build; {orders} one-line orders over {DAYS} days (+1 in 20 refunded), \
             built by {RUNS} batch runs, plus a live stream; the dashboard question: 30 days, \
             hourly, group_by=city,category, {CITIES}, tz=Asia/Kolkata, report_currency=EUR, \
             net revenue and buyers (fields={DASHBOARD_FIELDS}, as the business dashboard asks)"
        ),
    );
    let (ours_ms, ch_ms, pg_ms) = (median(&ours), median(&on_clickhouse), median(&on_postgres));
    report.row(
        "distinct questions (ranges varied), 50/s for 20 s, gzip accepted".into(),
        figure(&distinct),
        format!(
            "one at a time: Tidemark median {ours_ms:.0} ms (max {:.0} ms)",
            max(&ours)
        ),
        None,
        "p99 ≤ 100 ms",
    );
    report.row(
        "one question repeated, 2,000/s for 15 s, gzip accepted".into(),
        figure(&repeated),
        "—".into(),
        None,
        "p99 ≤ 5 ms",
    );
    report.row(
        "the question one at a time (10 distinct), median".into(),
        format!("{ours_ms:.0} ms"),
        format!("one SQL statement on ClickHouse over a plain lines table (ORDER BY city, at): median {ch_ms:.0} ms"),
        Some(ours_ms / ch_ms),
        "≤ 1.0×",
    );
    report.row(
        "the question one at a time, median".into(),
        format!("{ours_ms:.0} ms"),
        format!("one SQL statement on Postgres over a plain lines table (BRIN on time), 3 asked: median {pg_ms:.0} ms"),
        Some(ours_ms / pg_ms),
        "print the ratio",
    );
    let gb = |b: u64| b as f64 / 1e9;
    report.row(
        format!("the batch view of {orders} orders: time and disk"),
        format!(
            "{batch_seconds:.0} s over {RUNS} runs (raw → Parquet → audited, published aggregates); \
             {:.2} GB (revenue_agg {:.2} GB + buyers {:.2} GB)",
            gb(view_bytes + buyers_bytes),
            gb(view_bytes),
            gb(buyers_bytes)
        ),
        format!(
            "raw JSON Lines {:.2} GB, Parquet lake {:.2} GB; anchors' lines tables: ClickHouse {:.2} GB, \
             Postgres {:.2} GB (loading all four: {load_seconds:.0} s)",
            gb(raw_bytes),
            gb(lake_bytes),
            gb(anchor_ch_bytes),
            gb(anchor_pg_bytes as u64)
        ),
        Some((view_bytes + buyers_bytes) as f64 / raw_bytes as f64),
        "ratio: view disk / raw",
    );
    for (name, r) in &doors.rows {
        report.row(
            format!("{name} last 24 hours, hourly, by city, 2,000/s"),
            figure(r),
            format!("trivial handler (`/healthz`): {}", figure(&doors.trivial)),
            Some(r.p99_ms / doors.trivial.p99_ms),
            if name.starts_with("REST") {
                "p99 ≤ 2 ms and ≤ 1.5× GraphQL's, 0 errors"
            } else {
                "p99 ≤ 5 ms, 0 errors"
            },
        );
    }
    report.figure(Figure::alone(
        "dashboard question, distinct, 50/s, p99",
        distinct.p99_ms,
        "ms",
        Target::Ours(Bound::AtMost, 100.0),
    ));
    report.figure(Figure::alone(
        "dashboard question, distinct, 50/s, errors",
        distinct.errors as f64,
        "requests",
        Target::Ours(Bound::AtMost, 0.0),
    ));
    report.figure(Figure::alone(
        "dashboard question, repeated, 2,000/s, p99",
        repeated.p99_ms,
        "ms",
        Target::Ours(Bound::AtMost, 5.0),
    ));
    report.figure(Figure::anchored(
        "dashboard question, one at a time, median",
        ours_ms,
        (
            "one statement on ClickHouse over a plain lines table",
            ch_ms,
        ),
        "ms",
        Target::Ratio(Bound::AtMost, 1.0),
    ));
    report.figure(Figure::anchored(
        "dashboard question, one at a time, median (Postgres anchor)",
        ours_ms,
        ("one statement on Postgres over a plain lines table", pg_ms),
        "ms",
        Target::None,
    ));
    report.figure(Figure::anchored(
        "batch view on disk",
        gb(view_bytes + buyers_bytes),
        ("raw JSON Lines", gb(raw_bytes)),
        "GB",
        Target::None,
    ));
    for (name, r) in &doors.rows {
        report.figure(Figure::anchored(
            &format!("{name} last 24 hours by city, 2,000/s, p99"),
            r.p99_ms,
            ("trivial handler", doors.trivial.p99_ms),
            "ms",
            Target::Ours(
                Bound::AtMost,
                if name.starts_with("REST") { 2.0 } else { 5.0 },
            ),
        ));
        report.figure(Figure::alone(
            &format!("{name} last 24 hours by city, 2,000/s, errors"),
            r.errors as f64,
            "requests",
            Target::Ours(Bound::AtMost, 0.0),
        ));
    }
    report.figure(Figure::alone(
        "serving peak RSS (distinct, repeated and 2,000/s phases)",
        serving_rss,
        "MB",
        Target::None,
    ));
    if let [(_, rest), (_, graphql), _, (_, rest_fields)] = &doors.rows[..] {
        for (name, ours) in [
            ("REST p99 next to GraphQL's, same question", rest),
            (
                "REST p99 next to GraphQL's, same question and fields",
                rest_fields,
            ),
        ] {
            report.figure(Figure::anchored(
                name,
                ours.p99_ms,
                ("GraphQL", graphql.p99_ms),
                "ms",
                Target::Ratio(Bound::AtMost, 1.5),
            ));
        }
    }
    report.notes.push(format!(
        "cross-check on the 10 single questions: {cells_checked} cells, orders and buyers equal to \
         the ClickHouse anchor's; net revenue in EUR within {worst_cents:.2} minor units of its \
         per-line floating conversion"
    ));
    report.notes.push(format!(
        "serving's peak resident memory over the question phases: {serving_rss:.0} MB"
    ));
    report.notes.extend(doors.inside.iter().cloned());
    report.notes.extend(singles_steps);
    report.notes.extend(distinct_steps);
    report.notes.extend(repeated_inside);
    report.notes.push(format!(
        "waited for ClickHouse to run no statement: {}",
        settled
            .iter()
            .map(|(when, waited)| format!("{when} {:.1} s", waited.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    report.notes.push(format!(
        "live stream: {streamed} orders ingested at 200/s while the questions ran"
    ));
    report.notes.push(format!(
        "Tidemark's two ClickHouse statements for the 10 single questions, timed alone \
         (serving runs them at once) from this client, whose debug build decodes the rows \
         more slowly than serving: revenue cells (quarter hours, FINAL) median {:.0} ms, \
         buyers (uniqExact) median {:.0} ms; the whole answer took {ours_ms:.0} ms to its last \
         byte: both statements, the speed view, conversion and the answer's JSON ({} points, \
         {:.1} MB; {:.2} MB gzip-compressed, as the dashboard phases receive it); parsing it \
         here took a median {:.0} ms more, not counted",
        median(&revenue_ms),
        median(&buyers_ms),
        drawn[0]["points"].as_array().map_or(0, Vec::len),
        drawn[0].to_string().len() as f64 / 1e6,
        gzip_bytes as f64 / 1e6,
        median(&parsed_ms)
    ));
    Ok(report)
}

fn rfc3339(secs: i64) -> String {
    DateTime::from_timestamp(secs, 0)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

fn figure(r: &Report) -> String {
    format!(
        "{:.0}/s, p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms, {} errors{}",
        r.requests_per_sec,
        r.p50_ms,
        r.p99_ms,
        r.max_ms,
        r.errors,
        if r.errors_by_kind.is_empty() {
            String::new()
        } else {
            let causes: Vec<String> = r
                .errors_by_kind
                .iter()
                .map(|(why, n)| format!("{why} {n}"))
                .collect();
            format!(" ({})", causes.join(", "))
        }
    )
}

/// An answer cell of the anchors: Kolkata hour (UTC start), city, category, net
/// revenue in euro cents, orders, buyers.
#[derive(clickhouse::Row, Deserialize)]
struct AnchorCell {
    h: i64,
    city: String,
    category: String,
    net: f64,
    orders: u64,
    buyers: u64,
}

/// The dashboard question as one ClickHouse statement over the plain table.
fn clickhouse_anchor(from: i64, to: i64) -> String {
    format!(
        "SELECT h, city, category, \
                sum(if(kind = 0, amount, -amount) * f) AS net, \
                toUInt64(countIf(kind = 0)) AS orders, \
                toUInt64(uniqExactIf(user_id, kind = 0)) AS buyers \
         FROM (SELECT toInt64(intDiv(toUInt32(at) + {KOLKATA}, 3600) * 3600 - {KOLKATA}) AS h, \
                      toDate(at) AS d, city, category, currency, user_id, amount, kind \
               FROM lines \
               WHERE city IN ('Berlin', 'Lisbon', 'Paris') \
                 AND at >= toDateTime({from}) AND at < toDateTime({to})) \
         ANY LEFT JOIN rates USING (d, currency) \
         GROUP BY h, city, category"
    )
}

/// The same in Postgres.
fn postgres_anchor(from: i64, to: i64) -> String {
    format!(
        "SELECT extract(epoch FROM date_trunc('hour', l.at AT TIME ZONE 'Asia/Kolkata') \
                  AT TIME ZONE 'Asia/Kolkata')::int8 AS h, city, category, \
                sum(CASE WHEN kind = 0 THEN amount ELSE -amount END * r.f) AS net, \
                count(*) FILTER (WHERE kind = 0) AS orders, \
                count(DISTINCT user_id) FILTER (WHERE kind = 0) AS buyers \
         FROM anchor_lines l \
         JOIN anchor_rates r ON r.day = (l.at AT TIME ZONE 'UTC')::date AND r.currency = l.currency \
         WHERE city IN ('Berlin', 'Lisbon', 'Paris') \
           AND l.at >= to_timestamp({from}) AND l.at < to_timestamp({to}) \
         GROUP BY 1, 2, 3"
    )
}

/// Every cell of Tidemark's answers against the ClickHouse anchor's: orders and
/// buyers equal, net revenue within rounding. Returns the cells compared and
/// the largest difference in minor units.
fn cross_check(answers: &[serde_json::Value], anchors: &[Vec<AnchorCell>]) -> Result<(usize, f64)> {
    let mut cells = 0;
    let mut worst = 0.0_f64;
    for (answer, anchor) in answers.iter().zip(anchors) {
        let mut expected: BTreeMap<(i64, &str, &str), &AnchorCell> = anchor
            .iter()
            .map(|c| ((c.h, c.city.as_str(), c.category.as_str()), c))
            .collect();
        let points = answer["points"].as_array().context("points")?;
        for p in points {
            let bucket =
                DateTime::parse_from_rfc3339(p["bucket"].as_str().context("bucket")?)?.timestamp();
            let city = p["dimensions"]["city"].as_str().context("city")?;
            let category = p["dimensions"]["category"].as_str().context("category")?;
            let Some(cell) = expected.remove(&(bucket, city, category)) else {
                bail!("Tidemark has a cell the anchor has not: {p}");
            };
            ensure!(
                p["orders"].as_i64() == Some(cell.orders as i64)
                    && p["buyers"].as_i64() == Some(cell.buyers as i64),
                "orders or buyers differ from the anchor's ({} orders, {} buyers): {p}",
                cell.orders,
                cell.buyers
            );
            let net = p["net_revenue_minor"].as_i64().context("net")? as f64;
            worst = worst.max((net - cell.net).abs());
            cells += 1;
        }
        ensure!(
            expected
                .values()
                .all(|c| c.orders == 0 && c.net.abs() < 0.5),
            "the anchor has cells Tidemark has not"
        );
    }
    // Tidemark rounds gross and refunds apart, per original currency (USD, GBP)
    // and UTC date an hour spans (one or two), each at most half a unit at each
    // end of its stretch: at most 2 × 2 × 2 units from the exact figure.
    ensure!(worst <= 8.0, "net revenue differs by {worst} minor units");
    Ok((cells, worst))
}

/// Waits until ClickHouse runs no statement but this one; returns how long.
async fn settle(ch: &clickhouse::Client) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let running: u64 = ch
            .query("SELECT count() FROM system.processes WHERE query NOT LIKE '%system.processes%'")
            .fetch_one()
            .await?;
        if running == 0 {
            return Ok(started.elapsed());
        }
        ensure!(
            started.elapsed() < Duration::from_secs(600),
            "ClickHouse still runs {running} statements after 600 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The load test's open-loop `rate` scenario: `(name, url or @FILE, body)`.
fn rate(
    bench: &Harness<'_>,
    read_key: &str,
    (name, url, body): (&str, &str, Option<&str>),
    accept_encoding: Option<&str>,
    per_sec: &str,
    seconds: &str,
) -> Result<Report> {
    let mut args = vec![
        "rate",
        "--name",
        name,
        "--url",
        url,
        "--rate",
        per_sec,
        "--seconds",
        seconds,
    ];
    if let Some(b) = body {
        args.extend(["--body", b]);
    }
    if let Some(accept) = accept_encoding {
        args.extend(["--accept-encoding", accept]);
    }
    bench.loadtest(&args, &[("TIDEMARK_READ_KEY", read_key)])
}

/// Posts 20 new orders every 100 ms until aborted, counting those taken.
async fn live_stream(
    ingest: String,
    key: String,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    let http = reqwest::Client::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for seed in 0.. {
        tick.tick().await;
        let now = Utc::now().timestamp();
        let orders = tidemark_loadtest::orders_between(90_000 + seed, 20, 1, (now - 1, now));
        let items: Vec<_> = orders.iter().map(tidemark_loadtest::order_json).collect();
        let ok = http
            .post(format!("{ingest}/v1/orders"))
            .bearer_auth(&key)
            .json(&items)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            sent.fetch_add(20, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

struct Doors {
    trivial: Report,
    rows: Vec<(&'static str, Report)>,
    /// Per door, what serving's metrics say of the phase.
    inside: Vec<String>,
}

/// REST and GraphQL on a small question (the last 24 hours, hourly, by city) at
/// 2,000/s, next to `/healthz`; for each door, serving's own account of the phase.
async fn doors(bench: &Harness<'_>, serving: &str, read_key: &str) -> Result<Doors> {
    const RATE: &str = "2000";
    const SECONDS: &str = "15";
    // The 24 hours up to the end of this one: the same size at any time of day
    // (asked as "today" it was 8.5 KB just after midnight UTC and 157 KB just
    // before, and the doors' figures with it).
    let now = Utc::now().timestamp();
    let end = now - now.rem_euclid(3_600) + 3_600;
    let (from, to) = (rfc3339(end - 86_400), rfc3339(end));
    let rest_url =
        format!("{serving}/v1/revenue?from={from}&to={to}&granularity=hour&group_by=city");
    let graphql_body = serde_json::json!({
        "query": format!(
            "{{ revenue(from: \"{from}\", to: \"{to}\", granularity: HOUR, groupBy: CITY) \
               {{ points {{ bucket group currency revenueMinor orders items }} \
                  freshness {{ asOf }} }} }}"
        )
    })
    .to_string();
    eprintln!(
        "xtask bench: {RATE} requests/s for {SECONDS} s each: /healthz, REST, GraphQL, REST with gzip, REST with GraphQL's fields"
    );
    let ask = |name: &str, url: &str, body: Option<&str>| {
        rate(bench, read_key, (name, url, body), None, RATE, SECONDS)
    };
    // Where the machine's CPU went in each phase (the load generator's included).
    let mut cpu = Vec::new();
    let requests = RATE.parse::<f64>()? * SECONDS.parse::<f64>()?;
    let meter = CpuMeter::start().await;
    let trivial = ask("healthz", &format!("{serving}/healthz"), None)?;
    cpu.push(("/healthz", meter.finish().await?));
    let before = scrape(serving).await?;
    let meter = CpuMeter::start().await;
    let rest = ask("rest", &rest_url, None)?;
    cpu.push(("REST", meter.finish().await?));
    let between = scrape(serving).await?;
    let meter = CpuMeter::start().await;
    let graphql = ask(
        "graphql",
        &format!("{serving}/graphql"),
        Some(&graphql_body),
    )?;
    cpu.push(("GraphQL", meter.finish().await?));
    let after = scrape(serving).await?;
    // As most apps' HTTP clients ask: compressed answers welcome.
    let rest_gzip = rate(
        bench,
        read_key,
        ("rest-gzip", &rest_url, None),
        BROWSER,
        RATE,
        SECONDS,
    )?;
    let after_gzip = scrape(serving).await?;
    // REST asked for the fields the GraphQL query selects: the same answer.
    let rest_fields_url =
        format!("{rest_url}&fields=bucket,group,currency,revenue_minor,orders,items");
    let meter = CpuMeter::start().await;
    let rest_fields = ask("rest-fields", &rest_fields_url, None)?;
    cpu.push(("REST with GraphQL's fields", meter.finish().await?));
    let after_fields = scrape(serving).await?;
    // What each door's answer weighs, plain and as a browser receives it.
    let http = reqwest::Client::new();
    let mut sizes = Vec::new();
    for (door, accept) in [
        ("REST", None),
        ("REST", BROWSER),
        ("GraphQL", None),
        ("GraphQL", BROWSER),
        ("REST with GraphQL's fields", None),
    ] {
        let mut request = match door {
            "REST" => http.get(&rest_url),
            "REST with GraphQL's fields" => http.get(&rest_fields_url),
            _ => http
                .post(format!("{serving}/graphql"))
                .header("content-type", "application/json")
                .body(graphql_body.clone()),
        };
        if let Some(accept) = accept {
            request = request.header("accept-encoding", accept);
        }
        let answer = request
            .bearer_auth(read_key)
            .send()
            .await?
            .error_for_status()?;
        let encoding = answer
            .headers()
            .get("content-encoding")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("identity")
            .to_owned();
        let bytes = answer.bytes().await?.len();
        sizes.push(format!("{door} {:.1} KB ({encoding})", bytes as f64 / 1e3));
    }
    let mut inside = vec![
        format!("the small question's answer: {}", sizes.join(", ")),
        inside(
            "REST",
            &before,
            &between,
            "/v1/revenue",
            "serving_answers_total",
        ),
        steps("REST", &before, &between),
        inside(
            "GraphQL",
            &between,
            &after,
            "graphql",
            "serving_graphql_cache_total",
        ),
        steps("GraphQL", &between, &after),
        inside(
            "REST (gzip accepted)",
            &after,
            &after_gzip,
            "/v1/revenue",
            "serving_answers_total",
        ),
        inside(
            "REST (GraphQL's fields)",
            &after_gzip,
            &after_fields,
            "/v1/revenue",
            "serving_answers_total",
        ),
    ];
    inside.extend(cpu.iter().map(|(phase, used)| {
        format!(
            "CPU while {phase} was asked {RATE}/s: {}",
            used.text(Some((requests, "request")))
        )
    }));
    Ok(Doors {
        trivial,
        rows: vec![
            ("REST `/v1/revenue`", rest),
            ("GraphQL `revenue`", graphql),
            ("REST `/v1/revenue` (gzip accepted)", rest_gzip),
            ("REST `/v1/revenue` (GraphQL's fields)", rest_fields),
        ],
        inside,
    })
}

/// The samples of `name` (with the label `with` among its labels, if given) in
/// a `/metrics` text, by the value of `label`.
fn samples(
    text: &str,
    name: &str,
    with: Option<(&str, &str)>,
    label: &str,
) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name).and_then(|r| r.strip_prefix('{')) else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        if with.is_some_and(|(l, v)| !labels.contains(&format!("{l}=\"{v}\""))) {
            continue;
        }
        let Some(key) = labels
            .split(',')
            .find_map(|l| l.strip_prefix(&format!("{label}=\"")))
            .map(|v| v.trim_end_matches('"').to_owned())
        else {
            continue;
        };
        *out.entry(key).or_default() += value.trim().parse::<f64>().unwrap_or(0.0);
    }
    out
}

/// `q` of a histogram's observations between two scrapes, as the bound of the
/// bucket it falls in (ms).
fn quantile(before: &str, after: &str, name: &str, with: (&str, &str), q: f64) -> Option<f64> {
    let bucket = format!("{name}_bucket");
    let (b, a) = (
        samples(before, &bucket, Some(with), "le"),
        samples(after, &bucket, Some(with), "le"),
    );
    let mut counts: Vec<(f64, f64)> = a
        .iter()
        .filter_map(|(le, n)| {
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, n - b.get(le).copied().unwrap_or(0.0)))
        })
        .collect();
    counts.sort_by(|x, y| x.0.total_cmp(&y.0));
    let total = counts.last()?.1;
    (total > 0.0)
        .then(|| {
            counts
                .iter()
                .find(|(_, n)| *n >= q * total)
                .map(|(le, _)| le * 1e3)
        })
        .flatten()
}

/// What serving's metrics say of one door's phase: how its answers were had,
/// how long reading the data version and computing took.
fn inside(door: &str, before: &str, after: &str, route: &str, counter: &str) -> String {
    let route_label = (counter == "serving_answers_total").then_some(("route", route));
    let (b, a) = (
        samples(before, counter, route_label, "result"),
        samples(after, counter, route_label, "result"),
    );
    let results = a
        .iter()
        .map(|(result, n)| format!("{result} {:.0}", n - b.get(result).copied().unwrap_or(0.0)))
        .collect::<Vec<_>>()
        .join(", ");
    let ms = |name: &str, q: f64| {
        quantile(before, after, name, ("route", route), q)
            .map_or("—".to_owned(), |v| format!("≤ {v} ms"))
    };
    let computations = {
        let bucket = "serving_answer_compute_seconds_bucket";
        let n = |t: &str| {
            samples(t, bucket, Some(("route", route)), "le")
                .get("+Inf")
                .copied()
                .unwrap_or(0.0)
        };
        n(after) - n(before)
    };
    format!(
        "{door} phase inside serving: answers {results}; data-version read p50 {}, p99 {}; \
         {computations:.0} computations, p50 {}, p99 {}",
        ms("serving_data_version_seconds", 0.5),
        ms("serving_data_version_seconds", 0.99),
        ms("serving_answer_compute_seconds", 0.5),
        ms("serving_answer_compute_seconds", 0.99),
    )
}

/// Where the answers' time went in one phase, by serving's
/// `serving_read_seconds{part}`: how often each step ran, its p50 and p99.
fn steps(phase: &str, before: &str, after: &str) -> String {
    let name = "serving_read_seconds";
    let (b, a) = (
        samples(before, &format!("{name}_count"), None, "part"),
        samples(after, &format!("{name}_count"), None, "part"),
    );
    // The mean from the sums: the buckets' bounds alone cannot tell 6 ms from 9.
    let (b_sum, a_sum) = (
        samples(before, &format!("{name}_sum"), None, "part"),
        samples(after, &format!("{name}_sum"), None, "part"),
    );
    let parts: Vec<String> = a
        .iter()
        .filter_map(|(part, n)| {
            let n = n - b.get(part).copied().unwrap_or(0.0);
            let q = |q| {
                quantile(before, after, name, ("part", part), q)
                    .map_or("—".to_owned(), |v| format!("≤ {v}"))
            };
            let sum =
                a_sum.get(part).copied().unwrap_or(0.0) - b_sum.get(part).copied().unwrap_or(0.0);
            let mean = sum / n * 1e3;
            (n > 0.0).then(|| {
                format!(
                    "{part} {n:.0}× mean {mean:.2} p50 {} p99 {} ms",
                    q(0.5),
                    q(0.99)
                )
            })
        })
        .collect();
    // Batch reads with and without `FINAL` (serving's `unfolding`).
    let folds: Vec<String> = {
        let name = "serving_batch_reads_total";
        let (b, a) = (
            samples(before, name, None, "fold"),
            samples(after, name, None, "fold"),
        );
        a.iter()
            .map(|(fold, n)| format!("{fold} {:.0}", n - b.get(fold).copied().unwrap_or(0.0)))
            .collect()
    };
    let folds = if folds.is_empty() {
        String::new()
    } else {
        format!("; batch reads by fold: {}", folds.join(", "))
    };
    format!(
        "{phase} phase, steps inside serving: {}{folds}",
        parts.join("; ")
    )
}

/// The raw JSON Lines of backfill file `i` (one-line orders in `window`, one in
/// twenty refunded a unit an hour later) and its lines for the anchors.
fn backfill_file(i: usize, count: usize, xid: i64, window: (i64, i64)) -> (Vec<u8>, Vec<Line>) {
    let mut body = Vec::with_capacity(count * 360);
    let mut lines = Vec::with_capacity(count + count / 20 + 1);
    for (j, order) in tidemark_loadtest::orders_between(1_000 + i as u64, count, 1, window)
        .into_iter()
        .enumerate()
    {
        let n = i * PER_FILE + j;
        let line = &order.lines[0];
        let at = order.created_at.timestamp() as u32;
        let anchor_line = |at: u32, amount: i64, quantity: u32, kind: u8| Line {
            at,
            city: order.city.clone(),
            category: line.category.clone(),
            product: line.product_id.clone(),
            currency: order.currency.to_string(),
            user_id: order.user_id.clone(),
            amount,
            quantity,
            kind,
        };
        lines.push(anchor_line(
            at,
            i64::from(line.quantity) * line.unit_price_minor,
            line.quantity.unsigned_abs(),
            0,
        ));
        let refund = n.is_multiple_of(20).then(|| {
            lines.push(anchor_line(at + 3_600, line.unit_price_minor, 1, 1));
            tidemark_domain::Event::Adjustment(tidemark_domain::AdjustmentEvent {
                adjustment: tidemark_domain::Adjustment {
                    adjustment_id: uuid::Uuid::from_u128(n as u128 + 1),
                    order_id: order.order_id,
                    kind: tidemark_domain::AdjustmentKind::Refund,
                    created_at: order.created_at + chrono::TimeDelta::hours(1),
                    lines: vec![tidemark_domain::AdjustedLine {
                        line_no: 1,
                        quantity: 1,
                        amount_minor: line.unit_price_minor,
                    }],
                },
                order: order.clone(),
            })
        });
        let row = tidemark_orderlog::LogRow {
            position: tidemark_domain::LogPosition::new(xid as u64, (2 * n + 1) as i64),
            ingested_at: order.created_at,
            event: tidemark_domain::Event::Order(order),
        };
        tidemark_orderlog::RawRecord::from(&row).write_line(&mut body);
        if let Some(event) = refund {
            let row = tidemark_orderlog::LogRow {
                position: tidemark_domain::LogPosition::new(xid as u64, (2 * n + 2) as i64),
                ingested_at: row.ingested_at,
                event,
            };
            tidemark_orderlog::RawRecord::from(&row).write_line(&mut body);
        }
    }
    (body, lines)
}

fn date(secs: i64) -> NaiveDate {
    DateTime::from_timestamp(secs, 0)
        .unwrap_or_default()
        .date_naive()
}

fn s3_dir(bench: &Harness<'_>, s3: &tidemark_platform::config::S3Config) -> std::path::PathBuf {
    bench.stack.data("s3").join(&s3.bucket).join(&s3.prefix)
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            _ => e.metadata().map_or(0, |m| m.len()),
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_metrics_between_two_scrapes_are_read_by_route_and_bucket() {
        let before = "\
serving_answers_total{route=\"/v1/revenue\",result=\"hit\"} 10
serving_answers_total{route=\"/v1/revenue/summary\",result=\"hit\"} 7
serving_data_version_seconds_bucket{route=\"/v1/revenue\",le=\"0.001\"} 10
serving_data_version_seconds_bucket{route=\"/v1/revenue\",le=\"0.025\"} 10
serving_data_version_seconds_bucket{route=\"/v1/revenue\",le=\"+Inf\"} 10
";
        let after = "\
serving_answers_total{route=\"/v1/revenue\",result=\"hit\"} 60
serving_answers_total{route=\"/v1/revenue\",result=\"recent\"} 50
serving_answers_total{route=\"/v1/revenue/summary\",result=\"hit\"} 9
serving_data_version_seconds_bucket{route=\"/v1/revenue\",le=\"0.001\"} 108
serving_data_version_seconds_bucket{route=\"/v1/revenue\",le=\"0.025\"} 110
serving_data_version_seconds_bucket{route=\"/v1/revenue\",le=\"+Inf\"} 110
";
        let name = "serving_data_version_seconds";
        assert_eq!(
            quantile(before, after, name, ("route", "/v1/revenue"), 0.5),
            Some(1.0)
        );
        assert_eq!(
            quantile(before, after, name, ("route", "/v1/revenue"), 0.99),
            Some(25.0)
        );
        assert_eq!(
            quantile(before, after, name, ("route", "/v1/revenue/summary"), 0.5),
            None
        );
        let said = inside(
            "REST",
            before,
            after,
            "/v1/revenue",
            "serving_answers_total",
        );
        assert!(said.contains("answers hit 50, recent 50;"), "{said}");
        assert!(said.contains("p50 ≤ 1 ms, p99 ≤ 25 ms"), "{said}");
    }

    #[test]
    fn the_steps_of_a_phase_are_counted_between_two_scrapes() {
        let before = "\
serving_read_seconds_bucket{part=\"batch_cells\",le=\"0.01\"} 1
serving_read_seconds_bucket{part=\"batch_cells\",le=\"0.1\"} 2
serving_read_seconds_bucket{part=\"batch_cells\",le=\"+Inf\"} 2
serving_read_seconds_sum{part=\"batch_cells\"} 0.06
serving_read_seconds_count{part=\"batch_cells\"} 2
serving_read_seconds_count{part=\"fx_rates\"} 4
";
        let after = "\
serving_read_seconds_bucket{part=\"batch_cells\",le=\"0.01\"} 1
serving_read_seconds_bucket{part=\"batch_cells\",le=\"0.1\"} 11
serving_read_seconds_bucket{part=\"batch_cells\",le=\"+Inf\"} 12
serving_read_seconds_sum{part=\"batch_cells\"} 0.9
serving_read_seconds_count{part=\"batch_cells\"} 12
serving_read_seconds_count{part=\"fx_rates\"} 4
";
        assert_eq!(
            steps("one", before, after),
            "one phase, steps inside serving: batch_cells 10× mean 84.00 p50 ≤ 100 p99 ≤ inf ms"
        );
        // With serving's batch reads by fold: those of the phase.
        let before = format!("{before}serving_batch_reads_total{{fold=\"final\"}} 1\n");
        let after = format!(
            "{after}serving_batch_reads_total{{fold=\"final\"}} 2\n\
             serving_batch_reads_total{{fold=\"none\"}} 9\n"
        );
        assert_eq!(
            steps("one", &before, &after),
            "one phase, steps inside serving: batch_cells 10× mean 84.00 p50 ≤ 100 p99 ≤ inf \
             ms; batch reads by fold: final 1, none 9"
        );
    }
}
