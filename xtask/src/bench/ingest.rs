//! Ingest: batched orders/s next to `COPY` of the same rows into the same table, and
//! single-order orders/s at 32 connections next to pgbench single-row inserts at 32
//! clients.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tidemark_loadtest::Report;
use tidemark_platform::auth::{self, Scope};

use super::cpu::{CpuMeter, CpuUse};
use super::{
    BenchReport, Bound, Figure, Harness, Target, copy_csv, median, metric, pg_bin, pgbench, scrape,
};
use crate::proc::run;
use std::process::Command;

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
    // Rounds of a few seconds each, ours and the anchor's in turn (which goes first
    // alternating), their medians compared: one round of each moved the ratio by a
    // quarter from run to run on this shared machine, the anchor as much as ours.
    let batch = interleaved(
        bench,
        ("1-line", 10),
        BATCH_ORDERS,
        &[api_db.as_str(), copy_db.as_str()],
        |bench, seed| {
            let ours = bench.ingest_batch(&url, &key, seed, BATCH_ORDERS)?;
            ensure!(ours.errors == 0, "batched ingest had errors: {ours:?}");
            Ok(ours.items_per_sec)
        },
        |bench, seed| {
            let csv = bench.csv(seed, BATCH_ORDERS)?;
            Ok(BATCH_ORDERS as f64 / copy_csv(&copy_db, &csv)?)
        },
    )?;
    let baskets = interleaved(
        bench,
        ("3-line", 20),
        BASKET_ORDERS,
        &[api_db.as_str(), copy_db.as_str()],
        |bench, seed| {
            let ours = bench.ingest_baskets(&url, &key, seed, BASKET_ORDERS, 3)?;
            ensure!(ours.errors == 0, "batched ingest had errors: {ours:?}");
            Ok(ours.items_per_sec)
        },
        |bench, seed| {
            let csv = bench.basket_csv(seed, BASKET_ORDERS, 3)?;
            Ok(BASKET_ORDERS as f64 / copy_csv(&copy_db, &csv)?)
        },
    )?;

    eprintln!("xtask bench: single-order ingest at 32 connections, then pgbench");
    let fsync_off = single_pair(bench, (&url, &key), 2, SINGLE_ORDERS, &pgbench_db).await?;
    eprintln!(
        "xtask bench: the same on a Postgres of its own with durable commits (fsync on), \
         then pgbench there"
    );
    let durable = durable_pair(bench, SINGLE_ORDERS).await?;
    let ingest_rss = bench.peak_rss_mb("ingest").unwrap_or(f64::NAN);

    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&pool)
        .await?;
    pool.close().await;
    let expected = (ROUNDS * (BATCH_ORDERS + BASKET_ORDERS) + SINGLE_ORDERS) as i64;
    if stored != expected || fsync_off.ingest.errors != 0 || durable.ingest.errors != 0 {
        bail!(
            "bench run was not clean: stored {stored} of {expected}; single {:?}; durable {:?}",
            fsync_off.ingest,
            durable.ingest
        );
    }
    let mut report = BenchReport::new(
        "ingest",
        "release build; the test stack's Postgres (fsync off) for every figure but the \
         durable pair, which has a Postgres of its own",
    );
    batch.row(
        &mut report,
        format!(
            "batched ingest, {ROUNDS} rounds of {BATCH_ORDERS} orders in batches of 1000, \
             4 connections (median)"
        ),
        "COPY of the same rows",
    );
    baskets.row(
        &mut report,
        format!(
            "batched ingest, {ROUNDS} rounds of {BASKET_ORDERS} orders of 3 lines in batches \
             of 1000 (median)"
        ),
        "COPY of the same rows (orders and order_lines)",
    );
    fsync_off.rows(
        &mut report,
        "single-order ingest, 32 connections",
        "pgbench single-row INSERT, 32 clients",
        "CPU during the single-order pair, by program (core-seconds)",
    );
    durable.rows(
        &mut report,
        "single-order ingest, 32 connections, durable commits (a Postgres of its own, fsync on)",
        "pgbench single-row INSERT, 32 clients, same server",
        "CPU during the durable pair, by program (core-seconds; the machine's idle share is \
         time spent waiting, for the disk's flushes among others)",
    );
    report.figure(Figure::anchored(
        "batched ingest, 1-line orders (median of the rounds)",
        batch.ours,
        ("COPY of the same rows", batch.anchor),
        "orders/s",
        Target::Ratio(Bound::AtLeast, 1.0),
    ));
    report.figure(Figure::anchored(
        "batched ingest, 3-line orders (median of the rounds)",
        baskets.ours,
        ("COPY of the same rows", baskets.anchor),
        "orders/s",
        Target::Ratio(Bound::AtLeast, 1.0),
    ));
    report.figure(Figure::anchored(
        "single-order ingest, 32 connections",
        fsync_off.ingest.items_per_sec,
        (
            "pgbench single-row INSERT, 32 clients",
            fsync_off.pgbench_tps,
        ),
        "orders/s",
        Target::Ratio(Bound::AtLeast, 1.5),
    ));
    report.figure(Figure::anchored(
        "single-order ingest, 32 connections, durable commits",
        durable.ingest.items_per_sec,
        (
            "pgbench single-row INSERT, 32 clients, durable commits",
            durable.pgbench_tps,
        ),
        "orders/s",
        Target::Ratio(Bound::AtLeast, 1.5),
    ));
    report.figure(Figure::alone(
        "single-order ingest, 32 connections, durable commits, p99",
        durable.ingest.p99_ms,
        "ms",
        Target::Ours(Bound::AtMost, 25.0),
    ));
    report.figure(Figure::alone(
        "single-order ingest, 32 connections, p99",
        fsync_off.ingest.p99_ms,
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
        "single-order runs' group commits: {} (fsync off); {} (durable)",
        fsync_off.groups.text(fsync_off.ingest.seconds),
        durable.groups.text(durable.ingest.seconds)
    ));
    report
        .notes
        .push(format!("{stored} orders stored, 0 errors"));
    Ok(report)
}

/// Rounds of batched ingest and of the anchor's `COPY`, in turn.
const ROUNDS: usize = 3;

/// Medians of [`ROUNDS`] rounds of ours and the anchor, each round's pair kept.
struct Paired {
    ours: f64,
    anchor: f64,
    rounds: Vec<(f64, f64)>,
}

impl Paired {
    /// The report's row: each side's median and its rounds' rates.
    fn row(&self, report: &mut BenchReport, measure: String, anchor: &str) {
        let rates = |side: fn(&(f64, f64)) -> f64| {
            self.rounds
                .iter()
                .map(|r| format!("{:.0}k", side(r) / 1_000.0))
                .collect::<Vec<_>>()
                .join(", ")
        };
        report.row(
            measure,
            format!("{:.0} orders/s ({})", self.ours, rates(|r| r.0)),
            format!("{anchor}: {:.0} orders/s ({})", self.anchor, rates(|r| r.1)),
            Some(self.ours / self.anchor),
            "≥ 1.0×",
        );
    }
}

/// Runs `ours` and `anchor` (each returning a rate) [`ROUNDS`] times in turn, the
/// anchor first in every other round, each round with fresh orders (seeds
/// `first_seed`, `first_seed + 1`, …: none another phase uses).
fn interleaved(
    bench: &Harness<'_>,
    (kind, first_seed): (&str, u64),
    orders: usize,
    databases: &[&str],
    ours: impl Fn(&Harness<'_>, u64) -> Result<f64>,
    anchor: impl Fn(&Harness<'_>, u64) -> Result<f64>,
) -> Result<Paired> {
    let mut rounds = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        let seed = first_seed + round as u64;
        eprintln!(
            "xtask bench: batched ingest of {orders} {kind} orders and COPY, round {}",
            round + 1
        );
        let ours = || settle(databases).and_then(|()| ours(bench, seed));
        let anchor = || settle(databases).and_then(|()| anchor(bench, seed));
        let pair = if round % 2 == 0 {
            let o = ours()?;
            (o, anchor()?)
        } else {
            let a = anchor()?;
            (ours()?, a)
        };
        rounds.push(pair);
    }
    Ok(Paired {
        ours: median(&rounds.iter().map(|r| r.0).collect::<Vec<_>>()),
        anchor: median(&rounds.iter().map(|r| r.1).collect::<Vec<_>>()),
        rounds,
    })
}

/// Leaves nothing owed for the next phase to pay: the orders' tables vacuumed and
/// analysed in each database and a checkpoint taken, so that neither side pays
/// autovacuum's insert-triggered runs or a checkpoint for the other's rows.
fn settle(databases: &[&str]) -> Result<()> {
    for db in databases {
        run(Command::new(pg_bin("psql")?)
            .arg(db)
            .args(["-q", "-v", "ON_ERROR_STOP=1", "-c"])
            .arg("VACUUM (ANALYZE) orders, order_lines"))?;
    }
    if let Some(db) = databases.first() {
        run(Command::new(pg_bin("psql")?)
            .arg(db)
            .args(["-q", "-c", "CHECKPOINT"]))?;
    }
    Ok(())
}

/// Single-order ingest and pgbench on a Postgres of their own with durable
/// commits: the test stack's server runs with `fsync=off` (given on its command
/// line, which `ALTER SYSTEM` cannot override), where a commit costs no flush and
/// group commit can save only round trips.
async fn durable_pair(bench: &mut Harness<'_>, orders: usize) -> Result<SinglePair> {
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
        single_pair(bench, (&ingest, &key), 4, orders, &url("pgbench")).await
    }
    .await;
    bench.stop_services().await;
    drop(crate::proc::stop(pid, "postgres", "INT", Duration::from_secs(30)).await);
    drop(std::fs::remove_dir_all(&root));
    measured
}

/// Single-order ingest at 32 connections to `ingest` (its URL and key; stopped
/// after), orders of `seed`, then pgbench's single-row INSERTs on `pgbench_db`:
/// each with the CPU it used, and ingest's group commits during its run.
async fn single_pair(
    bench: &mut Harness<'_>,
    (ingest, key): (&str, &str),
    seed: u64,
    orders: usize,
    pgbench_db: &str,
) -> Result<SinglePair> {
    let groups_before = Groups::read(ingest).await?;
    let meter = CpuMeter::start().await;
    let report: Report = bench.loadtest(
        &[
            "ingest-single",
            "--seed",
            &seed.to_string(),
            "--count",
            &orders.to_string(),
            "--concurrency",
            "32",
        ],
        &[
            ("TIDEMARK_INGEST_URL", ingest),
            ("TIDEMARK_INGEST_KEY", key),
        ],
    )?;
    let ingest_cpu = meter.finish().await?;
    let groups = Groups::read(ingest).await?.since(groups_before);
    bench.stop_services().await;
    let meter = CpuMeter::start().await;
    let pgbench_tps = pgbench(bench.stack, pgbench_db)?;
    Ok(SinglePair {
        ingest: report,
        pgbench_tps,
        ingest_cpu,
        pgbench_cpu: meter.finish().await?,
        groups,
    })
}

/// Single-order ingest and pgbench on one server ([`single_pair`]).
struct SinglePair {
    ingest: Report,
    pgbench_tps: f64,
    ingest_cpu: CpuUse,
    pgbench_cpu: CpuUse,
    groups: Groups,
}

impl SinglePair {
    /// The report's rows: the rates side by side, then the CPU each used.
    fn rows(&self, report: &mut BenchReport, measure: &str, anchor: &str, cpu: &str) {
        let ingest = &self.ingest;
        report.row(
            measure.into(),
            format!(
                "{:.0} orders/s (p50 {:.1} ms, p99 {:.1} ms)",
                ingest.items_per_sec, ingest.p50_ms, ingest.p99_ms
            ),
            format!("{anchor}: {:.0} tps", self.pgbench_tps),
            Some(ingest.items_per_sec / self.pgbench_tps),
            "≥ 1.5×, p99 ≤ 25 ms",
        );
        report.row(
            cpu.into(),
            self.ingest_cpu.text(Some((ingest.items as f64, "order"))),
            format!(
                "pgbench: {}",
                self.pgbench_cpu.text(Some((
                    self.pgbench_tps * self.pgbench_cpu.seconds,
                    "insert"
                )))
            ),
            None,
            "",
        );
    }
}

/// Ingest's group commits (`ingest::group`) as its `/metrics` counts them.
#[derive(Debug, Clone, Copy)]
struct Groups {
    commits: f64,
    orders: f64,
    /// Time spent committing groups, from a group's start to its last answer.
    seconds: f64,
}

impl Groups {
    async fn read(ingest: &str) -> Result<Groups> {
        let text = scrape(ingest).await?;
        Ok(Groups {
            commits: metric(&text, "ingest_group_commit_orders_count"),
            orders: metric(&text, "ingest_group_commit_orders_sum"),
            seconds: metric(&text, "ingest_group_commit_seconds_sum"),
        })
    }

    fn since(self, before: Groups) -> Groups {
        Groups {
            commits: self.commits - before.commits,
            orders: self.orders - before.orders,
            seconds: self.seconds - before.seconds,
        }
    }

    /// `7480 groups of 16.0 orders, 0.81 ms each, committing 98 % of the run's 6.2 s`
    fn text(&self, run_seconds: f64) -> String {
        format!(
            "{:.0} groups of {:.1} orders, {:.2} ms each, committing {:.0} % of the run's {:.1} s",
            self.commits,
            self.orders / self.commits.max(1.0),
            1_000.0 * self.seconds / self.commits.max(1.0),
            100.0 * self.seconds / run_seconds.max(f64::EPSILON),
            run_seconds
        )
    }
}
