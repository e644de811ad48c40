//! Serving: the revenue query (today, hourly, by city) at 2,000 requests/s over REST
//! and over GraphQL, next to a trivial handler of the same server (`/healthz`).

use std::process::Command;

use anyhow::{Result, bail};
use tidemark_loadtest::Report;
use tidemark_platform::auth::{self, Scope};

use super::{BenchReport, Harness, unlink_prefix};
use crate::proc::run;

pub(super) async fn measure(bench: &mut Harness<'_>) -> Result<BenchReport> {
    const RATE: &str = "2000";
    const SECONDS: &str = "15";
    let db = bench.database("serving").await?;
    let pool = sqlx::PgPool::connect(&db).await?;
    let (_, ingest_key) = auth::create(&pool, "bench", &[Scope::Ingest], None).await?;
    let (_, read_key) = auth::create(&pool, "bench-read", &[Scope::Read], None).await?;
    pool.close().await;
    let prefix = format!("benchserve{}", bench.tag);
    let redis_url = bench.stack.redis_url();
    let mut s3 = bench.stack.s3_config();
    s3.prefix = format!("bench-serving-{}", bench.tag);
    let ch_db = format!("bench_serving_{}", bench.tag);
    let store_env = |extra: &[(&'static str, String)]| -> Vec<(&'static str, String)> {
        let mut env = vec![
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
        ];
        env.extend(extra.iter().cloned());
        env
    };
    eprintln!("xtask bench: loading a day of orders, a batch run, and the speed layer");
    let ingest = bench.service("ingest", &store_env(&[])).await?;
    bench.service("speed", &store_env(&[])).await?;
    bench.ingest_batch(&ingest, &ingest_key, 9, 100_000)?;
    let mut compact = Command::new(bench.bin("tidemark-compactor"));
    compact
        .arg("run-once")
        .env("TIDEMARK_TELEMETRY__LOG_FILTER", "warn");
    for (k, v) in store_env(&[]) {
        compact.env(k, v);
    }
    let out = run(&mut compact)?;
    if !out.contains("Published") {
        bail!("the batch run did not publish: {out}");
    }
    // More orders after the watermark, so the speed part is not empty.
    bench.ingest_batch(&ingest, &ingest_key, 10, 20_000)?;
    let serving = bench.service("serving", &store_env(&[])).await?;

    let today = chrono::Utc::now().format("%Y-%m-%d");
    let (from, to) = (format!("{today}T00:00:00Z"), format!("{today}T23:59:59Z"));
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
    let rate = |name: &str, url: &str, body: Option<&str>| -> Result<Report> {
        let mut args = vec![
            "rate",
            "--name",
            name,
            "--url",
            url,
            "--rate",
            RATE,
            "--seconds",
            SECONDS,
        ];
        if let Some(b) = body {
            args.extend(["--body", b]);
        }
        bench.loadtest(&args, &[("TIDEMARK_READ_KEY", read_key.as_str())])
    };
    eprintln!("xtask bench: {RATE} requests/s for {SECONDS} s each: /healthz, REST, GraphQL");
    let trivial = rate("healthz", &format!("{serving}/healthz"), None)?;
    let rest = rate("rest", &rest_url, None)?;
    let graphql = rate(
        "graphql",
        &format!("{serving}/graphql"),
        Some(&graphql_body),
    )?;
    bench.stop_services().await;
    unlink_prefix(&bench.stack.ports.redis.to_string(), &format!("{prefix}:*"))?;
    bench.drop_batch_stores(&s3, &ch_db).await?;

    let mut report = BenchReport::new(
        "serving",
        format!(
            "release build; one server process; open-loop load at {RATE} requests/s for {SECONDS} s"
        ),
    );
    let figure = |r: &Report| {
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
                format!(" {:?}", r.errors_by_kind)
            }
        )
    };
    let anchor = format!(
        "trivial axum handler (`/healthz`, same middleware): {}",
        figure(&trivial)
    );
    report.row(
        "REST `/v1/revenue` today, hourly, by city".into(),
        figure(&rest),
        anchor.clone(),
        Some(rest.p99_ms / trivial.p99_ms),
        "p99 ≤ 5 ms",
    );
    report.row(
        "GraphQL `revenue` today, hourly, by city".into(),
        figure(&graphql),
        anchor,
        Some(graphql.p99_ms / trivial.p99_ms),
        "p99 ≤ 2× REST",
    );
    report.notes.push(format!(
        "ratios are p99 over the trivial handler's p99; GraphQL p99 / REST p99 = {:.2}",
        graphql.p99_ms / rest.p99_ms
    ));
    Ok(report)
}
