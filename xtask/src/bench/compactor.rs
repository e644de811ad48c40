//! Compactor: rows/s from raw JSON Lines in S3 to Parquet plus published ClickHouse
//! aggregates, next to DuckDB converting the same files to Parquet; 1M and 10M orders,
//! one in twenty of them refunded (an adjustment record in the same files).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};

use super::{BenchReport, Bound, Figure, Harness, Target};
use crate::proc::{run, run_measured};
use crate::stack::Stack;

pub(super) async fn measure(bench: &mut Harness<'_>) -> Result<BenchReport> {
    let python = duckdb_python(bench.stack)?;
    let mut rounds = Vec::new();
    // TIDEMARK_BENCH_SIZES=a,b overrides the sizes (for quick iterations); two,
    // since the scaling figure compares them.
    let sizes: Vec<usize> = match std::env::var("TIDEMARK_BENCH_SIZES") {
        Ok(text) => {
            let sizes: Vec<usize> = text
                .split(',')
                .map(|n| n.trim().replace('_', "").parse())
                .collect::<Result<_, _>>()
                .ok()
                .filter(|v: &Vec<usize>| v.len() == 2 && v.iter().all(|&n| n > 0))
                .with_context(|| {
                    format!("TIDEMARK_BENCH_SIZES={text}: two order counts, e.g. 100000,1000000")
                })?;
            sizes
        }
        Err(_) => vec![1_000_000, 10_000_000],
    };
    for orders in sizes {
        eprintln!("xtask bench: compaction of {orders} orders");
        rounds.push((orders, compaction_round(bench, &python, orders).await?));
    }
    let mut report = BenchReport::new(
        "compactor",
        "release build; raw JSON Lines in the same S3 store",
    );
    let mb = |b: u64| b as f64 / 1e6;
    for (orders, r) in &rounds {
        report.row(
            format!(
                "{orders} orders (+{} refunds): JSON in S3 → Parquet + audited, published ClickHouse aggregates",
                orders.div_ceil(20)
            ),
            format!(
                "{:.1} s = {:.0} rows/s; peak RSS {:.0} MB",
                r.ours,
                *orders as f64 / r.ours,
                mb(r.ours_rss)
            ),
            format!(
                "DuckDB JSON → Parquet, same files: {:.1} s = {:.0} rows/s; peak RSS {:.0} MB",
                r.duck,
                *orders as f64 / r.duck,
                mb(r.duck_rss)
            ),
            Some(r.duck / r.ours),
            "≥ 1.0×; memory ≤ 1.5× DuckDB's",
        );
    }
    for (orders, r) in &rounds {
        report.figure(Figure::anchored(
            &format!("compaction of {orders} orders"),
            *orders as f64 / r.ours,
            ("DuckDB JSON → Parquet, same files", *orders as f64 / r.duck),
            "rows/s",
            Target::Ratio(Bound::AtLeast, 1.0),
        ));
        report.figure(Figure::anchored(
            &format!("compaction of {orders} orders, peak RSS"),
            mb(r.ours_rss),
            ("DuckDB on the same files", mb(r.duck_rss)),
            "MB",
            Target::Ratio(Bound::AtMost, 1.5),
        ));
    }
    let (small, large) = (&rounds[0], &rounds[1]);
    let factor = large.0 as f64 / small.0 as f64;
    let (ours_growth, duck_growth) = (large.1.ours / small.1.ours, large.1.duck / small.1.duck);
    report.figure(Figure::anchored(
        &format!("time for {factor:.0}× the orders"),
        ours_growth,
        ("DuckDB", duck_growth),
        "× the time",
        Target::Ours(Bound::AtMost, factor),
    ));
    report.notes.push(format!(
        "scaling: {factor:.0}× the orders took {ours_growth:.1}× the time (DuckDB {duck_growth:.1}×); \
         linear is {factor:.0}×"
    ));
    Ok(report)
}

/// Python with DuckDB from PyPI (pinned), in a virtualenv of the test stack.
fn duckdb_python(stack: &Stack) -> Result<std::path::PathBuf> {
    const DUCKDB: &str = "duckdb==1.1.3";
    let venv = stack.base.join("bench-venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    if run(Command::new(&python).args(["-c", "import duckdb"])).is_err() {
        eprintln!("xtask bench: installing {DUCKDB} from PyPI");
        run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", DUCKDB]))?;
    }
    Ok(python)
}

/// One size's compaction next to DuckDB's conversion of the same files.
struct Round {
    /// Seconds.
    ours: f64,
    duck: f64,
    /// Peak resident memory, bytes.
    ours_rss: u64,
    duck_rss: u64,
}

async fn compaction_round(bench: &mut Harness<'_>, python: &Path, orders: usize) -> Result<Round> {
    const PER_FILE: usize = 50_000;
    let db = bench.database(&format!("compact{orders}")).await?;
    let mut s3 = bench.stack.s3_config();
    s3.prefix = format!("bench-{}-{orders}", bench.tag);
    let client = tidemark_platform::s3::client(&s3).await;
    let pool = sqlx::PgPool::connect(&db).await?;
    let files = orders.div_ceil(PER_FILE);
    let uploads = futures::stream::iter(0..files).map(|i| {
        let (client, s3, pool) = (client.clone(), s3.clone(), pool.clone());
        async move {
            let count = PER_FILE.min(orders - i * PER_FILE);
            let mut body = Vec::with_capacity(count * 330);
            let mut records = 0;
            for (j, order) in tidemark_loadtest::orders(1_000 + i as u64, count)
                .into_iter()
                .enumerate()
            {
                let n = i * PER_FILE + j;
                // One order in twenty is refunded (a unit of its line) an hour later,
                // a later event of the log.
                let refund = n.is_multiple_of(20).then(|| {
                    let line = &order.lines[0];
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
                    // Below any real cut: these rows predate the benchmark's run.
                    position: tidemark_domain::LogPosition::new(3, (2 * n + 1) as i64),
                    ingested_at: order.created_at,
                    event: tidemark_domain::Event::Order(order),
                };
                tidemark_orderlog::RawRecord::from(&row).write_line(&mut body);
                records += 1;
                if let Some(event) = refund {
                    records += 1;
                    let row = tidemark_orderlog::LogRow {
                        position: tidemark_domain::LogPosition::new(3, (2 * n + 2) as i64),
                        ingested_at: row.ingested_at,
                        event,
                    };
                    tidemark_orderlog::RawRecord::from(&row).write_line(&mut body);
                }
            }
            let key = format!("raw/orders/bench/part-{i:05}.jsonl");
            let bytes = body.len() as i64;
            client
                .put_object()
                .bucket(&s3.bucket)
                .key(s3.key(&key))
                .body(aws_sdk_s3::primitives::ByteStream::from(body))
                .send()
                .await?;
            // Each file a relay batch of its own: log rows (3, 2n] of its orders'
            // n, as the relay records them.
            let first = i * PER_FILE;
            sqlx::query(
                "INSERT INTO lake_raw_files (key, dt, hour, after_txid, after_seq, until_txid, \
                   until_seq, min_txid, max_txid, rows, bytes) \
                 VALUES ($1, current_date, 0, '3', $4, '3', $5, '3', '3', $2, $3)",
            )
            .bind(&key)
            .bind(records)
            .bind(bytes)
            .bind((2 * first) as i64)
            .bind((2 * (first + count)) as i64)
            .execute(&pool)
            .await?;
            anyhow::Ok(())
        }
    });
    uploads.buffer_unordered(4).try_collect::<Vec<()>>().await?;
    // The relay has "landed" everything: its horizon is past any cut.
    sqlx::query(
        "INSERT INTO consumer_cursors (consumer, horizon) VALUES ('lake-relay', '1099511627776') \
         ON CONFLICT (consumer) DO UPDATE SET horizon = EXCLUDED.horizon",
    )
    .execute(&pool)
    .await?;
    pool.close().await;

    let ch_db = format!("bench_{}_{orders}", bench.tag);
    let started = Instant::now();
    let mut compactor = Command::new(bench.bin("tidemark-compactor"));
    compactor
        .arg("run-once")
        .env(
            "TIDEMARK_TELEMETRY__LOG_FILTER",
            "warn,tidemark_compactor=info",
        )
        .env("TIDEMARK_TELEMETRY__LOG_FORMAT", "json")
        .env("TIDEMARK_POSTGRES__URL", &db)
        .env("TIDEMARK_CLICKHOUSE__URL", bench.stack.clickhouse_url())
        .env("TIDEMARK_CLICKHOUSE__DATABASE", &ch_db)
        .env("TIDEMARK_S3__ENDPOINT", &s3.endpoint)
        .env("TIDEMARK_S3__BUCKET", &s3.bucket)
        .env("TIDEMARK_S3__PREFIX", &s3.prefix)
        .env("TIDEMARK_S3__ACCESS_KEY_ID", crate::stack::S3_ACCESS_KEY)
        .env(
            "TIDEMARK_S3__SECRET_ACCESS_KEY",
            crate::stack::S3_SECRET_KEY,
        );
    let (out, ours_rss) = run_measured(compactor).await?;
    let ours = started.elapsed().as_secs_f64();
    for line in out.lines().filter(|l| {
        [
            "Connected",
            "Planned",
            "Lake written",
            "Staged",
            "Audit read back",
            "Batch run steps",
            "Published",
        ]
        .iter()
        .any(|m| l.contains(m))
    }) {
        eprintln!("xtask bench: {line}");
    }
    // Lake rows: one per (one-line) order and one per refund.
    let rows_in = orders + orders.div_ceil(20);
    if !out.contains("Published") || !out.contains(&format!("rows_in: {rows_in}")) {
        bail!("the compactor run did not publish all {orders} orders and their refunds: {out}");
    }

    // The published tables' merges would run beside DuckDB (in one run they took
    // a core of the machine through its whole conversion): the run is measured,
    // its output no longer needed.
    bench.drop_clickhouse(&ch_db).await?;
    let raw_dir = bench
        .stack
        .data("s3")
        .join(&s3.bucket)
        .join(&s3.prefix)
        .join("raw/orders/bench");
    let parquet = bench
        .stack
        .base
        .join(format!("bench-duckdb-{orders}.parquet"));
    let script = format!(
        "import duckdb, resource, time\n\
         duckdb.sql('SET enable_progress_bar = false')\n\
         t = time.time()\n\
         duckdb.sql(\"COPY (SELECT * FROM read_json('{}/*.jsonl', format='newline_delimited')) \
         TO '{}' (FORMAT parquet, COMPRESSION zstd)\")\n\
         print(time.time() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n",
        raw_dir.display(),
        parquet.display()
    );
    let printed = run(Command::new(python).args(["-c", &script]))?;
    let (duck, duck_rss_kb) = printed
        .split_once(' ')
        .context("DuckDB's script printed no time and peak memory")?;
    let (duck, duck_rss) = (
        duck.trim().parse::<f64>()?,
        duck_rss_kb.trim().parse::<u64>()? * 1024,
    );
    drop(std::fs::remove_file(&parquet));
    bench.drop_batch_stores(&s3, &ch_db).await?;
    Ok(Round {
        ours,
        duck,
        ours_rss,
        duck_rss,
    })
}
