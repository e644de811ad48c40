//! `cargo xtask bench <name>`: benchmarks that print their figure next to an anchor
//! measured in the same run, on the same servers (the test stack's), because the
//! machines are shared and noisy.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use serde_json::Value;
use tidemark_platform::auth::{self, Scope};

use crate::install;
use crate::proc::{self, run, spawn_detached};
use crate::stack::{Kind, Server, Stack, wait_async};

pub async fn run_bench(name: &str) -> Result<()> {
    install::ensure()?;
    let stack = Stack::new(Kind::Test);
    let was_running = stack.is_running(Server::Postgres);
    stack.start_servers().await?;
    let mut bench = Harness::new(&stack).await?;
    let result = match name {
        "ingest" => ingest(&mut bench).await,
        "speed" => speed(&mut bench).await,
        "compactor" => compactor(&mut bench).await,
        "serving" => serving(&mut bench).await,
        other => Err(anyhow::anyhow!(
            "unknown benchmark `{other}`; known: ingest, speed, compactor, serving"
        )),
    };
    bench.cleanup().await;
    if !was_running {
        stack.stop(&[]).await?;
    }
    result
}

/// Bench databases and release-built service processes, cleaned up afterwards.
struct Harness<'a> {
    stack: &'a Stack,
    tag: String,
    admin: sqlx::PgPool,
    databases: Vec<String>,
    processes: Vec<(u32, String, std::path::PathBuf)>,
}

impl<'a> Harness<'a> {
    async fn new(stack: &'a Stack) -> Result<Harness<'a>> {
        cargo_release(&[
            "tidemark-ingest",
            "tidemark-speed",
            "tidemark-compactor",
            "tidemark-serving",
            "tidemark-loadtest",
        ])?;
        Ok(Harness {
            stack,
            tag: chrono_free_tag(),
            admin: sqlx::PgPool::connect(&stack.postgres_url("postgres")).await?,
            databases: Vec::new(),
            processes: Vec::new(),
        })
    }

    fn admin_clickhouse(&self) -> clickhouse::Client {
        clickhouse::Client::default()
            .with_url(self.stack.clickhouse_url())
            .with_validation(false)
    }

    fn bin(&self, name: &str) -> std::path::PathBuf {
        self.stack.root.join("target/release").join(name)
    }

    /// A fresh, migrated database; returns its URL.
    async fn database(&mut self, name: &str) -> Result<String> {
        let db = format!("bench_{name}_{}", self.tag);
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
            .execute(&self.admin)
            .await?;
        self.databases.push(db.clone());
        let url = self.stack.postgres_url(&db);
        let pool = sqlx::PgPool::connect(&url).await?;
        tidemark_platform::postgres::migrate(&pool).await?;
        pool.close().await;
        Ok(url)
    }

    /// Starts a release binary serving on a free port; returns its base URL.
    async fn service(&mut self, name: &str, env: &[(&str, String)]) -> Result<String> {
        let port = free_port()?;
        let url = format!("http://127.0.0.1:{port}");
        let log = self.stack.base.join(format!("logs/bench-{name}.log"));
        let pid_file = self.stack.base.join(format!("pids/bench-{name}.pid"));
        let mut cmd = Command::new(self.bin(&format!("tidemark-{name}")));
        cmd.arg("serve")
            .env("TIDEMARK_HTTP__LISTEN", format!("127.0.0.1:{port}"))
            .env("TIDEMARK_TELEMETRY__LOG_FILTER", "warn")
            .envs(env.iter().map(|(k, v)| (*k, v)));
        let pid = spawn_detached(&mut cmd, &log, &pid_file)?;
        self.processes
            .push((pid, format!("tidemark-{name}"), pid_file));
        let client = reqwest::Client::new();
        let ready = wait_async(Duration::from_secs(30), || {
            let r = client.get(format!("{url}/healthz")).send();
            async move { r.await.is_ok_and(|r| r.status().is_success()) }
        })
        .await;
        if !ready {
            bail!("{name} did not start:\n{}", proc::tail(&log, 20));
        }
        Ok(url)
    }

    async fn stop_services(&mut self) {
        for (pid, name, pid_file) in self.processes.drain(..) {
            drop(proc::stop(pid, &name, "TERM", Duration::from_secs(30)).await);
            drop(std::fs::remove_file(pid_file));
        }
    }

    async fn cleanup(&mut self) {
        self.stop_services().await;
        for db in self.databases.drain(..) {
            drop(
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE {db} WITH (FORCE)"
                )))
                .execute(&self.admin)
                .await,
            );
        }
    }

    fn loadtest(&self, args: &[&str], env: &[(&str, &str)]) -> Result<Value> {
        let out = run(Command::new(self.bin("tidemark-loadtest"))
            .args(args)
            .envs(env.iter().copied()))?;
        Ok(serde_json::from_str(out.trim())?)
    }

    /// Writes `count` deterministic orders as CSV and returns the file.
    fn csv(&self, seed: u64, count: usize) -> Result<std::path::PathBuf> {
        let rows = run(Command::new(self.bin("tidemark-loadtest")).args([
            "csv",
            "--seed",
            &seed.to_string(),
            "--count",
            &count.to_string(),
        ]))?;
        let path = self.stack.base.join(format!("bench-orders-{seed}.csv"));
        std::fs::write(&path, rows)?;
        Ok(path)
    }
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

/// Ingest: batched orders/s next to `COPY` of the same rows into the same table, and
/// single-order orders/s at 32 connections next to pgbench single-row inserts at 32
/// clients.
async fn ingest(bench: &mut Harness<'_>) -> Result<()> {
    const BATCH_ORDERS: usize = 200_000;
    const SINGLE_ORDERS: usize = 30_000;
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
                ("TIDEMARK_RELAY__ENABLED", "false".into()),
            ],
        )
        .await?;
    let env = [
        ("TIDEMARK_INGEST_URL", url.as_str()),
        ("TIDEMARK_INGEST_KEY", key.as_str()),
    ];

    eprintln!("xtask bench: batched ingest of {BATCH_ORDERS} orders, then COPY");
    let batch = bench.loadtest(
        &[
            "ingest-batch",
            "--seed",
            "1",
            "--count",
            &BATCH_ORDERS.to_string(),
            "--batch",
            "1000",
            "--concurrency",
            "4",
        ],
        &env,
    )?;
    let csv = bench.csv(1, BATCH_ORDERS)?;
    let copy_secs = copy_csv(&copy_db, &csv)?;
    drop(std::fs::remove_file(&csv));
    let copy_rate = BATCH_ORDERS as f64 / copy_secs;

    eprintln!("xtask bench: single-order ingest at 32 connections, then pgbench");
    let single = bench.loadtest(
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

    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&pool)
        .await?;
    pool.close().await;
    let expected = (BATCH_ORDERS + SINGLE_ORDERS) as i64;
    if stored != expected || batch["errors"] != 0 || single["errors"] != 0 {
        bail!(
            "bench run was not clean: stored {stored} of {expected}; batch {batch}; single {single}"
        );
    }
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

/// Speed: freshness (ingest 2xx → visible in the speed view) at 5,000 orders/s, and
/// applied rows/s at saturation next to redis-benchmark for the same command mix.
async fn speed(bench: &mut Harness<'_>) -> Result<()> {
    const RATE: u64 = 5_000;
    const SECONDS: u64 = 30;
    const SATURATION_ROWS: usize = 300_000;
    let redis_url = bench.stack.redis_url();

    eprintln!("xtask bench: freshness at {RATE} orders/s for {SECONDS} s");
    let db = bench.database("fresh").await?;
    let pool = sqlx::PgPool::connect(&db).await?;
    let (_, key) = auth::create(&pool, "bench", &[Scope::Ingest], None).await?;
    pool.close().await;
    let prefix = format!("bench{}", bench.tag);
    let ingest = bench
        .service(
            "ingest",
            &[
                ("TIDEMARK_POSTGRES__URL", db.clone()),
                ("TIDEMARK_RELAY__ENABLED", "false".into()),
            ],
        )
        .await?;
    bench
        .service(
            "speed",
            &[
                ("TIDEMARK_POSTGRES__URL", db.clone()),
                ("TIDEMARK_REDIS__URL", redis_url.clone()),
                ("TIDEMARK_REDIS__KEY_PREFIX", prefix.clone()),
                ("TIDEMARK_SPEED__POLL_INTERVAL", "10".into()),
            ],
        )
        .await?;
    let fresh = bench.loadtest(
        &[
            "freshness",
            "--redis-url",
            &redis_url,
            "--prefix",
            &prefix,
            "--postgres-url",
            &db,
            "--rate",
            &RATE.to_string(),
            "--batch",
            "50",
            "--seconds",
            &SECONDS.to_string(),
        ],
        &[
            ("TIDEMARK_INGEST_URL", ingest.as_str()),
            ("TIDEMARK_INGEST_KEY", key.as_str()),
        ],
    )?;
    bench.stop_services().await;

    eprintln!("xtask bench: saturation over {SATURATION_ROWS} preloaded rows");
    let db = bench.database("saturate").await?;
    let csv = bench.csv(4, SATURATION_ROWS)?;
    copy_csv(&db, &csv)?;
    drop(std::fs::remove_file(&csv));
    let prefix = format!("benchsat{}", bench.tag);
    let client = redis::Client::open(redis_url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async::<()>(&mut conn)
        .await?;
    let started = Instant::now();
    bench
        .service(
            "speed",
            &[
                ("TIDEMARK_POSTGRES__URL", db.clone()),
                ("TIDEMARK_REDIS__URL", redis_url.clone()),
                ("TIDEMARK_REDIS__KEY_PREFIX", prefix.clone()),
            ],
        )
        .await?;
    let pool = sqlx::PgPool::connect(&db).await?;
    let head: (i64, i64) = sqlx::query_as(
        "SELECT txid::text::int8, seq FROM orders ORDER BY txid DESC, seq DESC LIMIT 1",
    )
    .fetch_one(&pool)
    .await?;
    pool.close().await;
    let caught_up = wait_async(Duration::from_secs(600), || {
        let mut conn = conn.clone();
        let meta = format!("{prefix}:meta");
        async move {
            let cur: (Option<i64>, Option<i64>) = redis::cmd("HMGET")
                .arg(meta)
                .arg(&["txid", "seq"])
                .query_async(&mut conn)
                .await
                .unwrap_or((None, None));
            matches!(cur, (Some(t), Some(s)) if (t, s) >= head)
        }
    })
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    if !caught_up {
        bail!("the speed layer did not consume the preloaded log");
    }
    bench.stop_services().await;
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await?;
    let calls = |cmd: &str| -> f64 {
        stats
            .lines()
            .find(|l| l.starts_with(&format!("cmdstat_{cmd}:")))
            .and_then(|l| l.split("calls=").nth(1))
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let (hincrby, zadd) = (calls("hincrby"), calls("zadd"));
    let rows_per_sec = SATURATION_ROWS as f64 / elapsed;
    let ops_per_row = (hincrby + zadd) / SATURATION_ROWS as f64;

    eprintln!("xtask bench: redis-benchmark for the same command mix");
    let port = bench.stack.ports.redis.to_string();
    let rb = |args: &[&str]| -> Result<f64> {
        let out = run(Command::new("redis-benchmark")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-c",
                "4",
                "-n",
                "2000000",
                "-P",
                "100",
                "-r",
                "100000",
                "-q",
            ])
            .args(args))?;
        out.split_whitespace()
            .zip(out.split_whitespace().skip(1))
            .find(|(_, next)| *next == "requests")
            .and_then(|(v, _)| v.parse().ok())
            .with_context(|| format!("no rate in redis-benchmark output: {out}"))
    };
    let hincrby_rate = rb(&["hincrby", "benchmix:h:__rand_int__", "f:__rand_int__", "3"])?;
    let zadd_rate = rb(&[
        "zadd",
        "benchmix:z:__rand_int__",
        "__rand_int__",
        "__rand_int__",
    ])?;
    let share = hincrby / (hincrby + zadd);
    let mix_rate = 1.0 / (share / hincrby_rate + (1.0 - share) / zadd_rate);
    let anchor_rows = mix_rate / ops_per_row;
    // Remove the benchmark's keys without one huge blocking reply.
    let keys =
        run(Command::new("redis-cli").args(["-p", &port, "--scan", "--pattern", "benchmix:*"]))?;
    let keys: Vec<&str> = keys.lines().collect();
    for chunk in keys.chunks(1000) {
        run(Command::new("redis-cli")
            .args(["-p", &port, "UNLINK"])
            .args(chunk))?;
    }

    for prefix in [
        format!("bench{}", bench.tag),
        format!("benchsat{}", bench.tag),
    ] {
        unlink_prefix(&port, &format!("{prefix}:*"))?;
    }
    println!("\nspeed benchmark (release build; same Redis and Postgres for every figure)\n");
    println!("| measure | Tidemark | anchor | target |");
    println!("|---|---|---|---|");
    println!(
        "| freshness, ingest 2xx → visible in the speed view, at {RATE} orders/s for {SECONDS} s (achieved {:.0}/s, {} orders, {} errors) | p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms | | p99 ≤ 500 ms |",
        f(&fresh, "achieved_rate"),
        fresh["orders"],
        fresh["errors"],
        f(&fresh, "p50_ms"),
        f(&fresh, "p90_ms"),
        f(&fresh, "p99_ms"),
        f(&fresh, "max_ms")
    );
    println!(
        "| applied rows/s at saturation ({SATURATION_ROWS} preloaded rows, {ops_per_row:.1} Redis writes per row) | {rows_per_sec:.0} rows/s | redis-benchmark, same HINCRBY/ZADD mix, pipelined: {mix_rate:.0} ops/s = {anchor_rows:.0} rows/s | {:.2}× of raw Redis |",
        rows_per_sec / anchor_rows
    );
    Ok(())
}

/// Compactor: rows/s from raw JSON Lines in S3 to Parquet plus published ClickHouse
/// aggregates, next to DuckDB converting the same files to Parquet; 1M and 10M orders.
async fn compactor(bench: &mut Harness<'_>) -> Result<()> {
    let python = duckdb_python(bench.stack)?;
    let mut rounds = Vec::new();
    // TIDEMARK_BENCH_SIZES=a,b overrides the sizes (for quick iterations).
    let sizes: Vec<usize> = std::env::var("TIDEMARK_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| v.len() == 2)
        .unwrap_or_else(|| vec![1_000_000, 10_000_000]);
    for orders in sizes {
        eprintln!("xtask bench: compaction of {orders} orders");
        rounds.push((orders, compaction_round(bench, &python, orders).await?));
    }
    println!("\ncompactor benchmark (release build; raw JSON Lines in the same S3 store)\n");
    println!(
        "| orders | Tidemark run (JSON → Parquet + audited ClickHouse aggregates) | DuckDB JSON → Parquet, same files | ratio | target |"
    );
    println!("|---|---|---|---|---|");
    for (orders, (ours, duck)) in &rounds {
        println!(
            "| {orders} | {ours:.1} s = {:.0} rows/s | {duck:.1} s = {:.0} rows/s | {:.2}× | ≥ 0.5× |",
            *orders as f64 / ours,
            *orders as f64 / duck,
            duck / ours
        );
    }
    let (small, large) = (&rounds[0], &rounds[1]);
    let factor = large.0 as f64 / small.0 as f64;
    println!(
        "\nscaling: {factor:.0}× the orders took {:.1}× the time (DuckDB {:.1}×); linear is {factor:.0}×",
        large.1.0 / small.1.0,
        large.1.1 / small.1.1
    );
    Ok(())
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

/// Returns (Tidemark seconds, DuckDB seconds).
async fn compaction_round(
    bench: &mut Harness<'_>,
    python: &Path,
    orders: usize,
) -> Result<(f64, f64)> {
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
            for (j, order) in tidemark_loadtest::orders(1_000 + i as u64, count)
                .iter()
                .enumerate()
            {
                let record = tidemark_orderlog::RawRecord {
                    order_id: order.order_id,
                    user_id: order.user_id.clone(),
                    city: order.city.clone(),
                    product_id: order.product_id.clone(),
                    category: order.category.clone(),
                    quantity: order.quantity,
                    unit_price_minor: order.unit_price_minor,
                    currency: order.currency.to_string(),
                    created_at: order
                        .created_at
                        .format(tidemark_orderlog::RAW_TIME_FORMAT)
                        .to_string(),
                    ingested_at: order
                        .created_at
                        .format(tidemark_orderlog::RAW_TIME_FORMAT)
                        .to_string(),
                    // Below any real cut: these rows predate the benchmark's run.
                    txid: 3,
                    seq: (i * PER_FILE + j + 1) as i64,
                };
                serde_json::to_writer(&mut body, &record)?;
                body.push(b'\n');
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
            sqlx::query(
                "INSERT INTO lake_raw_files (key, dt, hour, after_txid, after_seq, until_txid, \
                   until_seq, min_txid, max_txid, rows, bytes) \
                 VALUES ($1, current_date, 0, '3', 0, '3', 0, '3', '3', $2, $3)",
            )
            .bind(&key)
            .bind(count as i32)
            .bind(bytes)
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
    let out = run(Command::new(bench.bin("tidemark-compactor"))
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
        ))?;
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
    if !out.contains("Published") || !out.contains(&format!("rows_in: {orders}")) {
        bail!("the compactor run did not publish all {orders} orders: {out}");
    }

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
        "import duckdb, time\n\
         duckdb.sql('SET enable_progress_bar = false')\n\
         t = time.time()\n\
         duckdb.sql(\"COPY (SELECT * FROM read_json('{}/*.jsonl', format='newline_delimited')) \
         TO '{}' (FORMAT parquet, COMPRESSION zstd)\")\n\
         print(time.time() - t)\n",
        raw_dir.display(),
        parquet.display()
    );
    let duck: f64 = run(Command::new(python).args(["-c", &script]))?
        .trim()
        .parse()?;
    drop(std::fs::remove_file(&parquet));
    drop(std::fs::remove_dir_all(
        bench.stack.data("s3").join(&s3.bucket).join(&s3.prefix),
    ));
    bench
        .admin_clickhouse()
        .query(&format!("DROP DATABASE IF EXISTS {ch_db}"))
        .execute()
        .await?;
    Ok((ours, duck))
}

/// Serving: the revenue query (today, hourly, by city) at 2,000 requests/s over REST
/// and over GraphQL, next to a trivial handler of the same server (`/healthz`).
async fn serving(bench: &mut Harness<'_>) -> Result<()> {
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
    bench.loadtest(
        &[
            "ingest-batch",
            "--seed",
            "9",
            "--count",
            "100000",
            "--batch",
            "1000",
            "--concurrency",
            "4",
        ],
        &[
            ("TIDEMARK_INGEST_URL", ingest.as_str()),
            ("TIDEMARK_INGEST_KEY", ingest_key.as_str()),
        ],
    )?;
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
    bench.loadtest(
        &[
            "ingest-batch",
            "--seed",
            "10",
            "--count",
            "20000",
            "--batch",
            "1000",
            "--concurrency",
            "4",
        ],
        &[
            ("TIDEMARK_INGEST_URL", ingest.as_str()),
            ("TIDEMARK_INGEST_KEY", ingest_key.as_str()),
        ],
    )?;
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
    let rate = |name: &str, url: &str, body: Option<&str>| -> Result<Value> {
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
    drop(std::fs::remove_dir_all(
        bench.stack.data("s3").join(&s3.bucket).join(&s3.prefix),
    ));
    bench
        .admin_clickhouse()
        .query(&format!("DROP DATABASE IF EXISTS {ch_db}"))
        .execute()
        .await?;

    println!(
        "\nserving benchmark (release build; one server process; open-loop load at {RATE} requests/s for {SECONDS} s)\n"
    );
    println!("| request | throughput | p50 | p99 | max | errors | target |");
    println!("|---|---|---|---|---|---|---|");
    for (label, r, target) in [
        (
            "trivial axum handler (`/healthz`, same middleware)",
            &trivial,
            "anchor",
        ),
        (
            "REST `/v1/revenue` today, hourly, by city",
            &rest,
            "p99 ≤ 5 ms",
        ),
        (
            "GraphQL `revenue` today, hourly, by city",
            &graphql,
            "p99 ≤ 2× REST",
        ),
    ] {
        println!(
            "| {label} | {:.0}/s | {:.2} ms | {:.2} ms | {:.1} ms | {} | {target} |",
            f(r, "requests_per_sec"),
            f(r, "p50_ms"),
            f(r, "p99_ms"),
            f(r, "max_ms"),
            r["errors"]
        );
    }
    println!(
        "\nGraphQL p99 / REST p99 = {:.2}",
        f(&graphql, "p99_ms") / f(&rest, "p99_ms")
    );
    Ok(())
}

/// Removes a benchmark's Redis keys without one huge blocking reply.
fn unlink_prefix(port: &str, pattern: &str) -> Result<()> {
    let keys = run(Command::new("redis-cli").args(["-p", port, "--scan", "--pattern", pattern]))?;
    let keys: Vec<&str> = keys.lines().collect();
    for chunk in keys.chunks(1000) {
        run(Command::new("redis-cli")
            .args(["-p", port, "UNLINK"])
            .args(chunk))?;
    }
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
fn copy_csv(db_url: &str, csv: &Path) -> Result<f64> {
    let started = Instant::now();
    run(Command::new(pg_bin("psql")?)
        .arg(db_url)
        .args(["-v", "ON_ERROR_STOP=1", "-c"])
        .arg(format!(
            "\\copy orders (order_id, user_id, city, product_id, category, quantity, \
             unit_price_minor, currency, created_at) FROM '{}' WITH (FORMAT csv)",
            csv.display()
        )))?;
    Ok(started.elapsed().as_secs_f64())
}

/// pgbench: single-row inserts into `orders`, 32 clients, 15 s; returns tps.
fn pgbench(stack: &Stack, db_url: &str) -> Result<f64> {
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
        .arg(db_url))?;
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
