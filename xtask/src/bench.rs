//! `cargo xtask bench <name>`: benchmarks that print their figure next to an anchor
//! measured in the same run, on the same servers (the test stack's), because the
//! machines are shared and noisy.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tidemark_platform::auth::{self, Scope};

use crate::install;
use crate::proc::{self, run, spawn_detached};
use crate::stack::{Kind, Server, Stack, wait_async};

pub async fn run_bench(name: &str) -> Result<()> {
    match name {
        "ingest" => ingest().await,
        other => bail!("unknown benchmark `{other}`; known: ingest"),
    }
}

/// Ingest: batched orders/s next to `COPY` of the same rows into the same table, and
/// single-order orders/s at 32 connections next to pgbench single-row inserts at 32
/// clients.
async fn ingest() -> Result<()> {
    install::ensure()?;
    let stack = Stack::new(Kind::Test);
    let was_running = stack.is_running(Server::Postgres);
    stack.start_servers().await?;
    let result = ingest_on(&stack).await;
    if !was_running {
        stack.stop(&[]).await?;
    }
    result
}

async fn ingest_on(stack: &Stack) -> Result<()> {
    cargo_release(&["tidemark-ingest", "tidemark-loadtest"])?;
    let bin = |name: &str| stack.root.join("target/release").join(name);
    let tag = chrono_free_tag();
    let (db_api, db_copy, db_pgbench) = (
        format!("bench_api_{tag}"),
        format!("bench_copy_{tag}"),
        format!("bench_pgbench_{tag}"),
    );
    let admin = sqlx::PgPool::connect(&stack.postgres_url("postgres")).await?;
    for db in [&db_api, &db_copy, &db_pgbench] {
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
            .execute(&admin)
            .await?;
        let pool = sqlx::PgPool::connect(&stack.postgres_url(db)).await?;
        tidemark_platform::postgres::migrate(&pool).await?;
        pool.close().await;
    }
    let pool = sqlx::PgPool::connect(&stack.postgres_url(&db_api)).await?;
    let (_, key) = auth::create(&pool, "bench", &[Scope::Ingest], None).await?;

    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let log = stack.base.join("logs/bench-ingest.log");
    let pid_file = stack.base.join("pids/bench-ingest.pid");
    let mut cmd = Command::new(bin("tidemark-ingest"));
    cmd.arg("serve")
        .env("TIDEMARK_HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .env("TIDEMARK_POSTGRES__URL", stack.postgres_url(&db_api))
        .env("TIDEMARK_POSTGRES__MAX_CONNECTIONS", "32")
        .env("TIDEMARK_RELAY__ENABLED", "false")
        .env("TIDEMARK_TELEMETRY__LOG_FILTER", "warn");
    let pid = spawn_detached(&mut cmd, &log, &pid_file)?;
    let client = reqwest::Client::new();
    let ready = wait_async(Duration::from_secs(30), || {
        let r = client.get(format!("{url}/readyz")).send();
        async move { r.await.is_ok_and(|r| r.status().is_success()) }
    })
    .await;
    if !ready {
        bail!("ingest did not start:\n{}", proc::tail(&log, 20));
    }

    const BATCH_ORDERS: usize = 200_000;
    const SINGLE_ORDERS: usize = 30_000;
    let loadtest = |args: &[&str]| -> Result<Value> {
        let out = run(Command::new(bin("tidemark-loadtest"))
            .args(args)
            .env("TIDEMARK_INGEST_URL", &url)
            .env("TIDEMARK_INGEST_KEY", &key))?;
        Ok(serde_json::from_str(out.trim())?)
    };

    // 1. Batched ingest vs COPY of the same rows.
    let batch = loadtest(&[
        "ingest-batch",
        "--seed",
        "1",
        "--count",
        &BATCH_ORDERS.to_string(),
        "--batch",
        "1000",
        "--concurrency",
        "4",
    ])?;
    let csv = stack.base.join("bench-orders.csv");
    let rows = run(Command::new(bin("tidemark-loadtest")).args([
        "csv",
        "--seed",
        "1",
        "--count",
        &BATCH_ORDERS.to_string(),
    ]))?;
    std::fs::write(&csv, rows)?;
    let copy_secs = copy_csv(stack, &db_copy, &csv)?;
    let copy_rate = BATCH_ORDERS as f64 / copy_secs;

    // 2. Single orders at 32 connections vs pgbench single-row inserts at 32 clients.
    let single = loadtest(&[
        "ingest-single",
        "--seed",
        "2",
        "--count",
        &SINGLE_ORDERS.to_string(),
        "--concurrency",
        "32",
    ])?;
    let pgbench_tps = pgbench(stack, &db_pgbench)?;

    proc::stop(pid, "tidemark-ingest", "TERM", Duration::from_secs(30)).await?;
    drop(std::fs::remove_file(pid_file));
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&pool)
        .await?;
    pool.close().await;
    for db in [&db_api, &db_copy, &db_pgbench] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE {db} WITH (FORCE)"
        )))
        .execute(&admin)
        .await?;
    }
    drop(std::fs::remove_file(&csv));

    let expected = (BATCH_ORDERS + SINGLE_ORDERS) as i64;
    if stored != expected || batch["errors"] != 0 || single["errors"] != 0 {
        bail!(
            "bench run was not clean: stored {stored} of {expected}; batch {batch}; single {single}"
        );
    }
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let batch_rate = f(&batch, "items_per_sec");
    let single_rate = f(&single, "items_per_sec");
    println!("\ningest benchmark (release build, same Postgres for every figure)\n");
    println!("| measure | Tidemark | anchor | ratio | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| batched ingest, {BATCH_ORDERS} orders in batches of 1000, 4 connections | {batch_rate:.0} orders/s | COPY of the same rows: {copy_rate:.0} rows/s | {:.2}× | ≥ 0.5× |",
        batch_rate / copy_rate
    );
    println!(
        "| single-order ingest, 32 connections | {single_rate:.0} orders/s (p50 {:.1} ms, p99 {:.1} ms) | pgbench single-row INSERT, 32 clients: {pgbench_tps:.0} tps | {:.2}× | ≥ 0.5× |",
        f(&single, "p50_ms"),
        f(&single, "p99_ms"),
        single_rate / pgbench_tps
    );
    println!(
        "\nbatched request latency p50 {:.0} ms, p99 {:.0} ms; {stored} orders stored, 0 errors",
        f(&batch, "p50_ms"),
        f(&batch, "p99_ms")
    );
    Ok(())
}

fn cargo_release(packages: &[&str]) -> Result<()> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "--release", "--quiet"]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    let status = cmd.current_dir(crate::stack::workspace_root()).status()?;
    if !status.success() {
        bail!("release build failed");
    }
    Ok(())
}

fn pg_bin(name: &str) -> Result<std::path::PathBuf> {
    Ok(install::postgres_bin_dir()
        .context("PostgreSQL is not installed")?
        .join(name))
}

/// Seconds `COPY orders FROM` takes for the CSV file.
fn copy_csv(stack: &Stack, db: &str, csv: &Path) -> Result<f64> {
    let started = Instant::now();
    run(Command::new(pg_bin("psql")?)
        .arg(stack.postgres_url(db))
        .args(["-v", "ON_ERROR_STOP=1", "-c"])
        .arg(format!(
            "\\copy orders (order_id, user_id, city, product_id, category, quantity, \
             unit_price_minor, currency, created_at) FROM '{}' WITH (FORMAT csv)",
            csv.display()
        )))?;
    Ok(started.elapsed().as_secs_f64())
}

/// pgbench: single-row inserts into `orders`, 32 clients, 15 s; returns tps.
fn pgbench(stack: &Stack, db: &str) -> Result<f64> {
    let script = stack.base.join("bench-insert.sql");
    std::fs::write(
        &script,
        "\\set u random(1, 100000)\n\
         INSERT INTO orders (order_id, user_id, city, product_id, category, quantity, \
         unit_price_minor, currency, created_at) VALUES (gen_random_uuid(), 'user-' || :u, \
         'Berlin', 'sku-1', 'books', 2, 1299, 'EUR', now());\n",
    )?;
    let out = run(Command::new(pg_bin("pgbench")?)
        .args(["-n", "-c", "32", "-j", "2", "-T", "15", "-f"])
        .arg(&script)
        .arg(stack.postgres_url(db)))?;
    drop(std::fs::remove_file(script));
    out.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no tps in pgbench output:\n{out}"))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn chrono_free_tag() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs().to_string())
        .unwrap_or_default()
}
