//! `cargo xtask bench <name>`: benchmarks that print their figure next to an anchor
//! measured in the same run, on the same servers (the test stack's), because the
//! machines are shared and noisy. Each writes its report to
//! `target/bench/<name>.json` as well.
//!
//! One module per benchmark; the harness here starts release-built services on
//! databases of their own and reads the load test's reports as the load test's own
//! types.

mod compactor;
mod cpu;
mod ingest;
mod serving;
mod speed;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::install;
use crate::proc::{self, run, spawn_detached};
use crate::stack::{Kind, Server, Stack};

/// The benchmarks in the order `all` runs them: the cheap ones first, the one
/// that backfills millions of orders last.
pub const ALL: [&str; 4] = ["ingest", "speed", "compactor", "serving"];

pub async fn run_bench(name: &str) -> Result<()> {
    if name == "all" {
        let mut figures = Vec::new();
        for name in ALL {
            eprintln!("xtask bench: {name}");
            figures.extend(run_one(name).await?.figures);
        }
        println!("\nall benchmarks\n");
        print_figures(&figures);
        let missed = figures.iter().filter(|f| f.met == Some(false)).count();
        eprintln!(
            "xtask bench: {} figures, {} with a target, {missed} missed",
            figures.len(),
            figures.iter().filter(|f| f.met.is_some()).count()
        );
        return Ok(());
    }
    run_one(name).await.map(drop)
}

async fn run_one(name: &str) -> Result<BenchReport> {
    install::ensure()?;
    // The release binaries each benchmark runs (a release build of the compactor,
    // with polars, takes long on two cores: only the benchmarks that need it build it).
    let services: &[&str] = match name {
        "ingest" => &["ingest"],
        "speed" => &["ingest", "speed"],
        "compactor" => &["compactor"],
        "serving" => &["ingest", "speed", "compactor", "serving"],
        other => bail!(
            "unknown benchmark `{other}`; known: {}, all",
            ALL.join(", ")
        ),
    };
    let stack = Stack::new(Kind::Test);
    let was_running = stack.is_running(Server::Postgres);
    stack.start_servers().await?;
    let mut bench = Harness::new(&stack, services).await?;
    let report = match name {
        "ingest" => ingest::measure(&mut bench).await,
        "speed" => speed::measure(&mut bench).await,
        "compactor" => compactor::measure(&mut bench).await,
        _ => serving::measure(&mut bench).await,
    };
    bench.cleanup().await;
    if !was_running {
        stack.stop(&[]).await?;
    }
    let mut report = report?;
    let path = report_path(&stack.root, report.benchmark);
    report.compare_with(&path);
    report.print();
    report.write(&path)?;
    eprintln!("xtask bench: report written to {}", path.display());
    Ok(report)
}

/// `target/bench/<benchmark>.json` (under `CARGO_TARGET_DIR` when set).
fn report_path(root: &Path, benchmark: &str) -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), std::path::PathBuf::from)
        .join("bench")
        .join(format!("{benchmark}.json"))
}

/// Which way a target points.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Bound {
    AtMost,
    AtLeast,
}

/// What a figure is held to: its own value, or its ratio to the anchor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    Ours(Bound, f64),
    Ratio(Bound, f64),
    /// Reported only (the ratio is printed, nothing is promised).
    None,
}

impl Target {
    fn met(self, ours: f64, ratio: Option<f64>) -> Option<bool> {
        let within = |bound: Bound, value: f64, limit: f64| match bound {
            Bound::AtMost => value <= limit,
            Bound::AtLeast => value >= limit,
        };
        match self {
            Target::Ours(bound, limit) => Some(within(bound, ours, limit)),
            Target::Ratio(bound, limit) => Some(ratio.is_some_and(|r| within(bound, r, limit))),
            Target::None => None,
        }
    }

    fn describe(self, unit: &str) -> String {
        let sign = |bound| match bound {
            Bound::AtMost => "≤",
            Bound::AtLeast => "≥",
        };
        match self {
            Target::Ours(bound, limit) => format!("{} {limit} {unit}", sign(bound)),
            Target::Ratio(bound, limit) => format!("{} {limit}× the anchor", sign(bound)),
            Target::None => "—".to_owned(),
        }
    }
}

/// One figure as a record: ours next to the anchor measured in the same run,
/// `ratio` = ours / anchor, and whether the target is met (`null`: no target).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Figure {
    pub metric: String,
    pub ours: f64,
    pub anchor: Option<f64>,
    pub anchor_name: Option<String>,
    pub unit: String,
    pub ratio: Option<f64>,
    pub target: String,
    pub met: Option<bool>,
    /// `ours` of the same metric in the previous report, if there was one.
    #[serde(default)]
    pub last: Option<f64>,
}

impl Figure {
    /// A figure without an anchor.
    pub fn alone(metric: &str, ours: f64, unit: &str, target: Target) -> Figure {
        Figure::build(metric, ours, None, unit, target)
    }

    /// A figure next to its anchor (the same unit).
    pub fn anchored(
        metric: &str,
        ours: f64,
        (anchor_name, anchor): (&str, f64),
        unit: &str,
        target: Target,
    ) -> Figure {
        Figure::build(metric, ours, Some((anchor_name, anchor)), unit, target)
    }

    fn build(
        metric: &str,
        ours: f64,
        anchor: Option<(&str, f64)>,
        unit: &str,
        target: Target,
    ) -> Figure {
        let ratio = anchor.map(|(_, a)| ours / a).filter(|r| r.is_finite());
        Figure {
            metric: metric.to_owned(),
            ours,
            anchor: anchor.map(|(_, a)| a),
            anchor_name: anchor.map(|(n, _)| n.to_owned()),
            unit: unit.to_owned(),
            ratio,
            target: target.describe(unit),
            met: target.met(ours, ratio),
            last: None,
        }
    }
}

/// A number as printed: three significant digits at least, no exponent.
fn number(v: f64) -> String {
    if v.abs() >= 100.0 || v.fract().abs() < 1e-9 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn print_figures(figures: &[Figure]) {
    println!("| metric | ours | anchor | ratio | target | met | last run |");
    println!("|---|---|---|---|---|---|---|");
    for f in figures {
        let anchor = match (&f.anchor_name, f.anchor) {
            (Some(name), Some(a)) => format!("{name}: {} {}", number(a), f.unit),
            _ => String::new(),
        };
        let ratio = f.ratio.map_or_else(String::new, |r| format!("{r:.2}×"));
        let met = match f.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        let last = f
            .last
            .map_or_else(String::new, |l| format!("{} {}", number(l), f.unit));
        println!(
            "| {} | {} {} | {anchor} | {ratio} | {} | {met} | {last} |",
            f.metric,
            number(f.ours),
            f.unit,
            f.target
        );
    }
}

/// What a benchmark measured: a table of figures next to their anchors, and notes.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub benchmark: &'static str,
    pub title: String,
    pub measured_at: chrono::DateTime<chrono::Utc>,
    pub rows: Vec<Row>,
    /// The same measurements as records, each with its target and whether it
    /// was met (what `bench all` and a later run compare).
    pub figures: Vec<Figure>,
    pub notes: Vec<String>,
}

/// One figure, its anchor from the same run, and the target.
#[derive(Debug, Serialize)]
pub struct Row {
    pub measure: String,
    pub tidemark: String,
    pub anchor: String,
    /// Tidemark's figure over the anchor's, where they measure the same thing.
    pub ratio: Option<f64>,
    pub target: String,
}

impl BenchReport {
    fn new(benchmark: &'static str, title: impl Into<String>) -> BenchReport {
        BenchReport {
            benchmark,
            title: title.into(),
            measured_at: chrono::Utc::now(),
            rows: Vec::new(),
            figures: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn row(
        &mut self,
        measure: String,
        tidemark: String,
        anchor: String,
        ratio: Option<f64>,
        target: &str,
    ) {
        self.rows.push(Row {
            measure,
            tidemark,
            anchor,
            ratio,
            target: target.to_owned(),
        });
    }

    fn figure(&mut self, figure: Figure) {
        self.figures.push(figure);
    }

    /// Notes each figure's value in the report at `path` (the last run's).
    fn compare_with(&mut self, path: &Path) {
        #[derive(Deserialize)]
        struct Last {
            #[serde(default)]
            figures: Vec<Figure>,
        }
        let Some(last) = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Last>(&b).ok())
        else {
            return;
        };
        for f in &mut self.figures {
            f.last = last
                .figures
                .iter()
                .find(|l| l.metric == f.metric && l.unit == f.unit)
                .map(|l| l.ours);
        }
    }

    fn print(&self) {
        println!("\n{} benchmark ({})\n", self.benchmark, self.title);
        println!("| measure | Tidemark | anchor | ratio | target |");
        println!("|---|---|---|---|---|");
        for row in &self.rows {
            let ratio = row.ratio.map_or_else(String::new, |r| format!("{r:.2}×"));
            println!(
                "| {} | {} | {} | {ratio} | {} |",
                row.measure, row.tidemark, row.anchor, row.target
            );
        }
        if !self.notes.is_empty() {
            println!();
        }
        for note in &self.notes {
            println!("{note}");
        }
        println!(
            "\nfigures (written to target/bench/{}.json)\n",
            self.benchmark
        );
        print_figures(&self.figures);
    }

    fn write(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_vec_pretty(self)?)?;
        Ok(())
    }
}

/// Bench databases and release-built service processes, cleaned up afterwards.
pub(super) struct Harness<'a> {
    pub(super) stack: &'a Stack,
    pub(super) tag: String,
    admin: sqlx::PgPool,
    databases: Vec<String>,
    processes: Vec<(u32, String, std::path::PathBuf)>,
    /// Peak resident memory (bytes) of each service stopped so far, by process name.
    peaks: std::collections::HashMap<String, u64>,
}

impl<'a> Harness<'a> {
    /// Builds the load test and `services` in release mode.
    pub(super) async fn new(stack: &'a Stack, services: &[&str]) -> Result<Harness<'a>> {
        let mut packages: Vec<String> = services.iter().map(|s| format!("tidemark-{s}")).collect();
        packages.push("tidemark-loadtest".into());
        cargo_release(&packages)?;
        Ok(Harness {
            stack,
            tag: chrono::Utc::now().timestamp().to_string(),
            admin: sqlx::PgPool::connect(&stack.postgres_url("postgres")).await?,
            databases: Vec::new(),
            processes: Vec::new(),
            peaks: std::collections::HashMap::new(),
        })
    }

    /// `count` deterministic orders from `seed` through ingest's API, in batches of
    /// 1,000 on four connections.
    pub(super) fn ingest_batch(
        &self,
        ingest_url: &str,
        key: &str,
        seed: u64,
        count: usize,
    ) -> Result<tidemark_loadtest::Report> {
        self.ingest_baskets(ingest_url, key, seed, count, 1)
    }

    /// Batched ingest of `count` orders of `lines` lines each.
    pub(super) fn ingest_baskets(
        &self,
        ingest_url: &str,
        key: &str,
        seed: u64,
        count: usize,
        lines: usize,
    ) -> Result<tidemark_loadtest::Report> {
        self.loadtest(
            &[
                "ingest-batch",
                "--seed",
                &seed.to_string(),
                "--count",
                &count.to_string(),
                "--batch",
                "1000",
                "--concurrency",
                "4",
                "--basket",
                &lines.to_string(),
            ],
            &[
                ("TIDEMARK_INGEST_URL", ingest_url),
                ("TIDEMARK_INGEST_KEY", key),
            ],
        )
    }

    /// Removes a benchmark's S3 prefix (from the test stack's s3s-fs folder) and
    /// its ClickHouse database.
    pub(super) async fn drop_batch_stores(
        &self,
        s3: &tidemark_platform::config::S3Config,
        clickhouse_db: &str,
    ) -> Result<()> {
        drop(std::fs::remove_dir_all(
            self.stack.data("s3").join(&s3.bucket).join(&s3.prefix),
        ));
        self.drop_clickhouse(clickhouse_db).await
    }

    /// Drops a benchmark's ClickHouse database (its background merges with it).
    pub(super) async fn drop_clickhouse(&self, clickhouse_db: &str) -> Result<()> {
        clickhouse::Client::default()
            .with_url(self.stack.clickhouse_url())
            .with_validation(false)
            .query(&format!("DROP DATABASE IF EXISTS {clickhouse_db}"))
            .execute()
            .await?;
        Ok(())
    }

    pub(super) fn bin(&self, name: &str) -> std::path::PathBuf {
        self.stack.root.join("target/release").join(name)
    }

    /// A fresh, migrated database; returns its URL.
    pub(super) async fn database(&mut self, name: &str) -> Result<String> {
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
    pub(super) async fn service(&mut self, name: &str, env: &[(&str, String)]) -> Result<String> {
        let port = tidemark_launch::free_port();
        let url = format!("http://127.0.0.1:{port}");
        let log = self.stack.base.join(format!("logs/bench-{name}.log"));
        let pid_file = self.stack.base.join(format!("pids/bench-{name}.pid"));
        let mut cmd = Command::new(self.bin(&format!("tidemark-{name}")));
        cmd.arg("serve")
            .env("TIDEMARK_HTTP__LISTEN", format!("127.0.0.1:{port}"))
            .env("TIDEMARK_TELEMETRY__LOG_FILTER", "warn")
            .envs(env.iter().map(|(k, v)| (*k, v)));
        let mut cmd = tidemark_launch::at_service_priority(name, cmd);
        let pid = spawn_detached(&mut cmd, &log, &pid_file)?;
        self.processes
            .push((pid, format!("tidemark-{name}"), pid_file));
        let client = reqwest::Client::new();
        let ready =
            tidemark_launch::until(Duration::from_secs(30), Duration::from_millis(100), || {
                let r = client.get(format!("{url}/healthz")).send();
                async move { r.await.is_ok_and(|r| r.status().is_success()) }
            })
            .await;
        if !ready {
            bail!("{name} did not start:\n{}", proc::tail(&log, 20));
        }
        Ok(url)
    }

    /// The peak resident memory of `service` (`ingest`, …) in MB: of the running
    /// process, or the highest of those stopped so far.
    pub(super) fn peak_rss_mb(&self, service: &str) -> Option<f64> {
        let name = format!("tidemark-{service}");
        let running = self
            .processes
            .iter()
            .filter(|(_, n, _)| *n == name)
            .filter_map(|(pid, _, _)| proc::peak_rss(*pid))
            .max();
        running
            .max(self.peaks.get(&name).copied())
            .map(|b| b as f64 / 1e6)
    }

    pub(super) async fn stop_services(&mut self) {
        for (pid, name, _) in &self.processes {
            if let Some(peak) = proc::peak_rss(*pid) {
                let kept = self.peaks.entry(name.clone()).or_default();
                *kept = (*kept).max(peak);
            }
        }
        for (pid, name, pid_file) in self.processes.drain(..) {
            drop(proc::stop(pid, &name, "TERM", Duration::from_secs(30)).await);
            drop(std::fs::remove_file(pid_file));
        }
    }

    pub(super) async fn cleanup(&mut self) {
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

    /// Runs a load-test scenario and reads back its report.
    pub(super) fn loadtest<T: DeserializeOwned>(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<T> {
        let out = run(Command::new(self.bin("tidemark-loadtest"))
            .args(args)
            .envs(env.iter().copied()))?;
        serde_json::from_str(out.trim())
            .with_context(|| format!("a load-test report from `{}`: {out}", args.join(" ")))
    }

    /// Writes `count` deterministic orders as CSV and returns the file.
    /// Writes `count` deterministic orders as CSV files of `orders` and
    /// `order_lines` rows.
    pub(super) fn csv(&self, seed: u64, count: usize) -> Result<CsvFiles> {
        self.basket_csv(seed, count, 1)
    }

    /// As [`Harness::csv`], for orders of `basket` lines each.
    pub(super) fn basket_csv(&self, seed: u64, count: usize, basket: usize) -> Result<CsvFiles> {
        let write = |lines: bool, name: &str| -> Result<std::path::PathBuf> {
            let mut cmd = Command::new(self.bin("tidemark-loadtest"));
            cmd.args([
                "csv",
                "--seed",
                &seed.to_string(),
                "--count",
                &count.to_string(),
                "--basket",
                &basket.to_string(),
            ]);
            if lines {
                cmd.arg("--lines");
            }
            let path = self.stack.base.join(format!("bench-{name}-{seed}.csv"));
            std::fs::write(&path, run(&mut cmd)?)?;
            Ok(path)
        };
        Ok(CsvFiles {
            orders: write(false, "orders")?,
            lines: write(true, "order-lines")?,
        })
    }
}

/// Orders as CSV, for `COPY`: the `orders` rows and the `order_lines` rows.
pub(super) struct CsvFiles {
    orders: std::path::PathBuf,
    lines: std::path::PathBuf,
}

impl Drop for CsvFiles {
    fn drop(&mut self) {
        drop(std::fs::remove_file(&self.orders));
        drop(std::fs::remove_file(&self.lines));
    }
}

/// Removes a benchmark's Redis keys without one huge blocking reply.
pub(super) fn unlink_prefix(port: &str, pattern: &str) -> Result<()> {
    let keys = run(Command::new("redis-cli").args(["-p", port, "--scan", "--pattern", pattern]))?;
    let keys: Vec<&str> = keys.lines().collect();
    for chunk in keys.chunks(1000) {
        run(Command::new("redis-cli")
            .args(["-p", port, "UNLINK"])
            .args(chunk))?;
    }
    Ok(())
}

fn cargo_release(packages: &[String]) -> Result<()> {
    let mut cmd = crate::proc::cargo();
    cmd.args(["build", "--release", "--quiet"]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    let status = cmd
        .current_dir(tidemark_launch::workspace_root())
        .status()?;
    if !status.success() {
        bail!("release build failed");
    }
    Ok(())
}

pub(super) fn pg_bin(name: &str) -> Result<std::path::PathBuf> {
    Ok(tidemark_launch::postgres_bin_dir()
        .context("PostgreSQL is not installed")?
        .join(name))
}

/// Seconds `COPY orders FROM` takes for the CSV file.
pub(super) fn copy_csv(db_url: &str, csv: &CsvFiles) -> Result<f64> {
    let started = Instant::now();
    run(Command::new(pg_bin("psql")?)
        .arg(db_url)
        .args(["-v", "ON_ERROR_STOP=1", "-c"])
        .arg(format!(
            "\\copy orders (order_id, user_id, city, currency, created_at) FROM '{}' \
             WITH (FORMAT csv)",
            csv.orders.display()
        ))
        .arg("-c")
        .arg(format!(
            "\\copy order_lines (order_id, line_no, product_id, category, quantity, \
             unit_price_minor) FROM '{}' WITH (FORMAT csv)",
            csv.lines.display()
        )))?;
    Ok(started.elapsed().as_secs_f64())
}

/// A service's `/metrics` text.
pub(super) async fn scrape(service: &str) -> Result<String> {
    Ok(reqwest::get(format!("{service}/metrics"))
        .await?
        .error_for_status()?
        .text()
        .await?)
}

/// The sum of the samples of `series` in a `/metrics` text: a metric's name (all
/// its labelled series), or a name with its labels (that one series); 0 when
/// absent (a metric appears with its first sample).
pub(super) fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(series)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The middle value (the upper one of an even count); NaN for none.
pub(super) fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// pgbench: single-order inserts (an `orders` row and its one line, one statement),
/// 32 clients, 15 s; returns tps.
pub(super) fn pgbench(stack: &Stack, db_url: &str) -> Result<f64> {
    let script = stack.base.join("bench-insert.sql");
    std::fs::write(
        &script,
        "\\set u random(1, 100000)\n\
         WITH o AS (INSERT INTO orders (order_id, user_id, city, currency, created_at) \
         VALUES (gen_random_uuid(), 'user-' || :u, 'Berlin', 'EUR', now()) RETURNING order_id) \
         INSERT INTO order_lines (order_id, line_no, product_id, category, quantity, \
         unit_price_minor) SELECT order_id, 1, 'sku-1', 'books', 2, 1299 FROM o;\n",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[expect(
        clippy::float_cmp,
        reason = "the samples and their sums are exact in binary"
    )]
    fn a_metric_is_read_by_its_name_or_one_labelled_series() {
        let text = "# TYPE g summary\n\
                    g_count 12\n\
                    g_count_total 99\n\
                    p_sum{phase=\"read\"} 1.5\n\
                    p_sum{phase=\"apply\"} 2.25\n";
        assert_eq!(metric(text, "g_count"), 12.0, "not g_count_total");
        assert_eq!(metric(text, "p_sum"), 3.75, "every series of the name");
        assert_eq!(metric(text, "p_sum{phase=\"apply\"}"), 2.25);
        assert_eq!(metric(text, "absent"), 0.0);
    }

    #[test]
    fn a_figure_is_judged_by_its_own_value_or_its_ratio_to_the_anchor() {
        let fast = Figure::anchored(
            "single",
            1_500.0,
            ("pgbench", 1_000.0),
            "orders/s",
            Target::Ratio(Bound::AtLeast, 1.5),
        );
        assert_eq!(fast.ratio, Some(1.5));
        assert_eq!(fast.met, Some(true));
        assert_eq!(fast.target, "≥ 1.5× the anchor");
        let slow = Figure::anchored(
            "single",
            1_499.0,
            ("pgbench", 1_000.0),
            "orders/s",
            Target::Ratio(Bound::AtLeast, 1.5),
        );
        assert_eq!(slow.met, Some(false));
        let p99 = Figure::alone("p99", 5.01, "ms", Target::Ours(Bound::AtMost, 5.0));
        assert_eq!(
            (p99.met, p99.ratio, p99.target.as_str()),
            (Some(false), None, "≤ 5 ms")
        );
        let reported = Figure::anchored("disk", 2.0, ("raw", 0.0), "GB", Target::None);
        // No target: `met` is null; a zero anchor gives no ratio rather than ∞.
        assert_eq!((reported.met, reported.ratio), (None, None));
        let unanchored = Figure::alone("x", 1.0, "ms", Target::Ratio(Bound::AtMost, 1.0));
        assert_eq!(
            unanchored.met,
            Some(false),
            "a ratio target without an anchor is not met"
        );
    }

    #[test]
    fn a_report_notes_the_last_run_of_each_metric_and_writes_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bench").join("x.json");
        let mut first = BenchReport::new("x", "t");
        first.figure(Figure::alone(
            "p99",
            7.0,
            "ms",
            Target::Ours(Bound::AtMost, 5.0),
        ));
        first.compare_with(&path);
        assert_eq!(first.figures[0].last, None, "no earlier report");
        first.write(&path).unwrap();

        let mut second = BenchReport::new("x", "t");
        second.figure(Figure::alone(
            "p99",
            4.0,
            "ms",
            Target::Ours(Bound::AtMost, 5.0),
        ));
        second.figure(Figure::alone("new", 1.0, "ms", Target::None));
        second.compare_with(&path);
        assert_eq!(second.figures[0].last, Some(7.0));
        assert_eq!(second.figures[1].last, None);
        second.write(&path).unwrap();

        let written: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let record = &written["figures"][0];
        for field in [
            "metric",
            "ours",
            "anchor",
            "anchor_name",
            "unit",
            "ratio",
            "target",
            "met",
        ] {
            assert!(record.get(field).is_some(), "{field} missing: {record}");
        }
        assert_eq!(record["met"], serde_json::json!(true));
        assert_eq!(record["last"], serde_json::json!(7.0));
    }
}
