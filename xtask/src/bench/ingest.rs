//! Ingest: batched orders/s next to `COPY` of the same rows into the same table, and
//! single-order orders/s at 32 connections next to pgbench single-row inserts at 32
//! clients.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tidemark_loadtest::Report;
use tidemark_platform::auth::{self, Scope};

use super::cpu::{CpuMeter, CpuUse};
use super::{BenchReport, Bound, Figure, Harness, Target, copy_csv, pgbench};

pub(super) async fn measure(bench: &mut Harness<'_>) -> Result<BenchReport> {
    const BATCH_ORDERS: usize = 200_000;
    /// About 15 s at the rates measured here, as long as the pgbench anchor runs.
    const SINGLE_ORDERS: usize = 120_000;
    /// Orders of three lines: the shape of issue 18's target.
    const BASKET_ORDERS: usize = 100_000;
    let api_db = bench.database("api").await?;
    let copy_db = bench.database("copy").await?;
    let pgbench_db = bench.database("pgbench").await?;
    let pool = sqlx::PgPool::connect(&api_db).await?;
    let (_, key) = auth::create(&pool, "bench", &[Scope::Ingest], None).await?;
    let url = bench
        .service(
            "ingest",
            &[
                ("TIDEMARK_POSTGRES__URL", api_db.clone()),
                ("TIDEMARK_POSTGRES__MAX_CONNECTIONS", "32".into()),
                // Intake alone, as the anchors are: the relay and the vault loader
                // (measured in `bench speed`) stay off.
                ("TIDEMARK_RELAY__ENABLED", "false".into()),
                ("TIDEMARK_VAULT__ENABLED", "false".into()),
            ],
        )
        .await?;
    let env = [
        ("TIDEMARK_INGEST_URL", url.as_str()),
        ("TIDEMARK_INGEST_KEY", key.as_str()),
    ];

    eprintln!("xtask bench: batched ingest of {BATCH_ORDERS} orders, then COPY");
    let batch = bench.ingest_batch(&url, &key, 1, BATCH_ORDERS)?;
    let csv = bench.csv(1, BATCH_ORDERS)?;
    let copy_secs = copy_csv(&copy_db, &csv)?;
    let copy_rate = BATCH_ORDERS as f64 / copy_secs;

    eprintln!("xtask bench: batched ingest of {BASKET_ORDERS} three-line orders, then COPY");
    let baskets = bench.ingest_baskets(&url, &key, 3, BASKET_ORDERS, 3)?;
    let basket_csv = bench.basket_csv(3, BASKET_ORDERS, 3)?;
    let basket_copy_rate = BASKET_ORDERS as f64 / copy_csv(&copy_db, &basket_csv)?;

    eprintln!("xtask bench: single-order ingest at 32 connections, then pgbench");
    let single: Report = bench.loadtest(
        &[
            "ingest-single",
            "--seed",
            "2",
            "--count",
            &SINGLE_ORDERS.to_string(),
            "--concurrency",
            "32",
        ],
        &env,
    )?;
    let pgbench_tps = pgbench(bench.stack, &pgbench_db)?;
    bench.stop_services().await;
    eprintln!(
        "xtask bench: the same on a Postgres of its own with durable commits (fsync on), \
         then pgbench there"
    );
    let DurablePair {
        ingest: durable,
        pgbench_tps: durable_tps,
        ingest_cpu: durable_cpu,
        pgbench_cpu: durable_pgbench_cpu,
    } = durable_pair(bench, SINGLE_ORDERS).await?;
    let ingest_rss = bench.peak_rss_mb("ingest").unwrap_or(f64::NAN);

    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&pool)
        .await?;
    pool.close().await;
    let expected = (BATCH_ORDERS + BASKET_ORDERS + SINGLE_ORDERS) as i64;
    if stored != expected
        || batch.errors != 0
        || baskets.errors != 0
        || single.errors != 0
        || durable.errors != 0
    {
        bail!(
            "bench run was not clean: stored {stored} of {expected}; batch {batch:?}; \
             baskets {baskets:?}; single {single:?}"
        );
    }
    let mut report = BenchReport::new(
        "ingest",
        "release build; the test stack's Postgres (fsync off) for every figure but the \
         durable pair, which has a Postgres of its own",
    );
    report.row(
        format!("batched ingest, {BATCH_ORDERS} orders in batches of 1000, 4 connections"),
        format!("{:.0} orders/s", batch.items_per_sec),
        format!("COPY of the same rows: {copy_rate:.0} rows/s"),
        Some(batch.items_per_sec / copy_rate),
        "≥ 1.0×",
    );
    report.row(
        format!("batched ingest, {BASKET_ORDERS} orders of 3 lines in batches of 1000"),
        format!("{:.0} orders/s", baskets.items_per_sec),
        format!("COPY of the same rows (orders and order_lines): {basket_copy_rate:.0} orders/s"),
        Some(baskets.items_per_sec / basket_copy_rate),
        "≥ 1.0×",
    );
    report.row(
        "single-order ingest, 32 connections".into(),
        format!(
            "{:.0} orders/s (p50 {:.1} ms, p99 {:.1} ms)",
            single.items_per_sec, single.p50_ms, single.p99_ms
        ),
        format!("pgbench single-row INSERT, 32 clients: {pgbench_tps:.0} tps"),
        Some(single.items_per_sec / pgbench_tps),
        "≥ 1.5×, p99 ≤ 25 ms",
    );
    report.row(
        "single-order ingest, 32 connections, durable commits (a Postgres of its own, fsync on)"
            .into(),
        format!(
            "{:.0} orders/s (p50 {:.1} ms, p99 {:.1} ms)",
            durable.items_per_sec, durable.p50_ms, durable.p99_ms
        ),
        format!("pgbench single-row INSERT, 32 clients, same server: {durable_tps:.0} tps"),
        Some(durable.items_per_sec / durable_tps),
        "≥ 1.5×, p99 ≤ 25 ms",
    );
    report.row(
        "CPU during the durable pair, by program (core-seconds; the machine's idle share is \
         time spent waiting, for the disk's flushes among others)"
            .into(),
        durable_cpu.text(Some((SINGLE_ORDERS as f64, "order"))),
        format!(
            "pgbench: {}",
            durable_pgbench_cpu.text(Some((durable_tps * durable_pgbench_cpu.seconds, "insert")))
        ),
        None,
        "",
    );
    report.figure(Figure::anchored(
        "batched ingest, 1-line orders",
        batch.items_per_sec,
        ("COPY of the same rows", copy_rate),
        "orders/s",
        Target::Ratio(Bound::AtLeast, 1.0),
    ));
    report.figure(Figure::anchored(
        "batched ingest, 3-line orders",
        baskets.items_per_sec,
        ("COPY of the same rows", basket_copy_rate),
        "orders/s",
        Target::Ratio(Bound::AtLeast, 1.0),
    ));
    report.figure(Figure::anchored(
        "single-order ingest, 32 connections",
        single.items_per_sec,
        ("pgbench single-row INSERT, 32 clients", pgbench_tps),
        "orders/s",
        Target::Ratio(Bound::AtLeast, 1.5),
    ));
    report.figure(Figure::anchored(
        "single-order ingest, 32 connections, durable commits",
        durable.items_per_sec,
        (
            "pgbench single-row INSERT, 32 clients, durable commits",
            durable_tps,
        ),
        "orders/s",
        Target::Ratio(Bound::AtLeast, 1.5),
    ));
    report.figure(Figure::alone(
        "single-order ingest, 32 connections, durable commits, p99",
        durable.p99_ms,
        "ms",
        Target::Ours(Bound::AtMost, 25.0),
    ));
    report.figure(Figure::alone(
        "single-order ingest, 32 connections, p99",
        single.p99_ms,
        "ms",
        Target::Ours(Bound::AtMost, 25.0),
    ));
    report.figure(Figure::alone(
        "ingest peak RSS (batched and single-order runs)",
        ingest_rss,
        "MB",
        Target::Ours(Bound::AtMost, 100.0),
    ));
    report.notes.push(format!(
        "batched request latency p50 {:.0} ms, p99 {:.0} ms; {stored} orders stored, 0 errors",
        batch.p50_ms, batch.p99_ms
    ));
    Ok(report)
}

/// Single-order ingest and pgbench on a Postgres of their own with durable
/// commits: the test stack's server runs with `fsync=off` (given on its command
/// line, which `ALTER SYSTEM` cannot override), where a commit costs no flush and
/// group commit can save only round trips.
async fn durable_pair(bench: &mut Harness<'_>, orders: usize) -> Result<DurablePair> {
    use tidemark_launch::servers::postgres;
    let bin_dir = super::pg_bin("postgres")?
        .parent()
        .context("PostgreSQL's bin folder")?
        .to_path_buf();
    let root = bench
        .stack
        .base
        .join(format!("bench-durable-{}", bench.tag));
    let data = root.join("data");
    std::fs::create_dir_all(&root)?;
    postgres::give_to_postgres(&root)?;
    crate::proc::run(&mut postgres::initdb(&bin_dir, &data)).context("initdb")?;
    let port = tidemark_launch::free_port();
    let pid = crate::proc::spawn_detached(
        &mut postgres::server(
            &bin_dir,
            &data,
            port,
            &["max_connections=300", "shared_buffers=256MB"],
        ),
        &root.join("postgres.log"),
        &root.join("postgres.pid"),
    )?;
    let measured = async {
        let up =
            tidemark_launch::until(Duration::from_secs(30), Duration::from_millis(100), || {
                postgres::ready(&bin_dir, port)
            })
            .await;
        ensure!(up, "the durable Postgres did not start");
        let url = |db: &str| format!("postgres://postgres@127.0.0.1:{port}/{db}");
        let admin = sqlx::PgPool::connect(&url("postgres")).await?;
        let fsync: String = sqlx::query_scalar("SHOW fsync").fetch_one(&admin).await?;
        ensure!(fsync == "on", "the durable Postgres has fsync {fsync}");
        for db in ["api", "pgbench"] {
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
                .execute(&admin)
                .await?;
            let pool = sqlx::PgPool::connect(&url(db)).await?;
            tidemark_platform::postgres::migrate(&pool).await?;
            pool.close().await;
        }
        admin.close().await;
        let pool = sqlx::PgPool::connect(&url("api")).await?;
        let (_, key) = auth::create(&pool, "bench", &[Scope::Ingest], None).await?;
        pool.close().await;
        let ingest = bench
            .service(
                "ingest",
                &[
                    ("TIDEMARK_POSTGRES__URL", url("api")),
                    ("TIDEMARK_POSTGRES__MAX_CONNECTIONS", "32".into()),
                    ("TIDEMARK_RELAY__ENABLED", "false".into()),
                    ("TIDEMARK_VAULT__ENABLED", "false".into()),
                ],
            )
            .await?;
        let meter = CpuMeter::start().await;
        let report: Report = bench.loadtest(
            &[
                "ingest-single",
                "--seed",
                "4",
                "--count",
                &orders.to_string(),
                "--concurrency",
                "32",
            ],
            &[
                ("TIDEMARK_INGEST_URL", ingest.as_str()),
                ("TIDEMARK_INGEST_KEY", key.as_str()),
            ],
        )?;
        let ingest_cpu = meter.finish().await?;
        bench.stop_services().await;
        let meter = CpuMeter::start().await;
        let tps = pgbench(bench.stack, &url("pgbench"))?;
        anyhow::Ok(DurablePair {
            ingest: report,
            pgbench_tps: tps,
            ingest_cpu,
            pgbench_cpu: meter.finish().await?,
        })
    }
    .await;
    bench.stop_services().await;
    drop(crate::proc::stop(pid, "postgres", "INT", Duration::from_secs(30)).await);
    drop(std::fs::remove_dir_all(&root));
    measured
}

/// Single-order ingest and pgbench, each with the CPU it used, on the durable Postgres.
struct DurablePair {
    ingest: Report,
    pgbench_tps: f64,
    ingest_cpu: CpuUse,
    pgbench_cpu: CpuUse,
}
