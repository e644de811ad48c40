//! A stack of real servers on loopback: Postgres, Redis, ClickHouse, an
//! S3-compatible store (s3s-fs) and Prometheus, each on a non-standard port with
//! its data, logs and pid file under `.tidemark/` (the `up` stack) or
//! `.tidemark/test/` (the `test` stack). The two never share ports or data.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::install::{self, cargo_bin, which};
use crate::proc::{self, alive, is_root, read_pid, run, spawn_detached};

/// Static credentials of the local S3 server (loopback only).
pub const S3_ACCESS_KEY: &str = "tidemark";
pub const S3_SECRET_KEY: &str = "tidemark-local-secret";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `cargo xtask up`: the platform, for people.
    Up,
    /// `cargo xtask test`: wiped at every start.
    Test,
}

pub struct Ports {
    pub postgres: u16,
    pub redis: u16,
    pub clickhouse_http: u16,
    pub clickhouse_tcp: u16,
    pub clickhouse_interserver: u16,
    pub s3: u16,
    pub prometheus: u16,
}

impl Kind {
    pub fn ports(self) -> Ports {
        match self {
            Kind::Up => Ports {
                postgres: 54320,
                redis: 63790,
                clickhouse_http: 18123,
                clickhouse_tcp: 19000,
                clickhouse_interserver: 19009,
                s3: 39000,
                prometheus: 9090,
            },
            Kind::Test => Ports {
                postgres: 54330,
                redis: 63800,
                clickhouse_http: 18133,
                clickhouse_tcp: 19010,
                clickhouse_interserver: 19019,
                s3: 39010,
                prometheus: 9091,
            },
        }
    }
}

/// The servers, in start order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    Postgres,
    Redis,
    ClickHouse,
    S3,
    Prometheus,
}

impl Server {
    pub const ALL: [Server; 5] = [
        Server::Postgres,
        Server::Redis,
        Server::ClickHouse,
        Server::S3,
        Server::Prometheus,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Server::Postgres => "postgres",
            Server::Redis => "redis",
            Server::ClickHouse => "clickhouse",
            Server::S3 => "s3",
            Server::Prometheus => "prometheus",
        }
    }

    /// A word in the process's command line, to recognise it by pid.
    pub fn process_name(self) -> &'static str {
        match self {
            Server::Postgres => "postgres",
            Server::Redis => "redis-server",
            Server::ClickHouse => "clickhouse",
            Server::S3 => "s3s-fs",
            Server::Prometheus => "prometheus",
        }
    }
}

pub struct Stack {
    pub kind: Kind,
    pub root: PathBuf,
    pub base: PathBuf,
    pub ports: Ports,
}

impl Stack {
    pub fn new(kind: Kind) -> Stack {
        let root = workspace_root();
        let base = match kind {
            Kind::Up => root.join(".tidemark"),
            Kind::Test => root.join(".tidemark/test"),
        };
        Stack {
            kind,
            root,
            base,
            ports: kind.ports(),
        }
    }

    pub fn data(&self, name: &str) -> PathBuf {
        self.base.join("data").join(name)
    }

    pub fn log(&self, name: &str) -> PathBuf {
        if name == "postgres" {
            // Written by the postgres user, so it lives beside its data.
            return self.postgres_root().join("postgres.log");
        }
        self.base.join("logs").join(format!("{name}.log"))
    }

    pub fn pid_file(&self, name: &str) -> PathBuf {
        self.base.join("pids").join(format!("{name}.pid"))
    }

    pub fn env_file(&self) -> PathBuf {
        self.base.join("stack.env")
    }

    pub fn bucket(&self) -> &'static str {
        match self.kind {
            Kind::Up => "tidemark",
            Kind::Test => "tidemark-test",
        }
    }

    pub fn postgres_url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}",
            self.ports.postgres
        )
    }

    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.ports.redis)
    }

    pub fn clickhouse_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.clickhouse_http)
    }

    pub fn s3_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.s3)
    }

    pub fn prometheus_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.prometheus)
    }

    fn make_dirs(&self) -> Result<()> {
        for dir in ["data", "logs", "pids"] {
            fs::create_dir_all(self.base.join(dir))?;
        }
        Ok(())
    }

    /// Removes the stack's data (the test stack starts clean every time).
    pub fn wipe(&self) -> Result<()> {
        for dir in ["data", "logs", "pids"] {
            let path = self.base.join(dir);
            if path.exists() {
                fs::remove_dir_all(&path).with_context(|| format!("remove {}", path.display()))?;
            }
        }
        let pg = self.postgres_root();
        if pg.exists() {
            fs::remove_dir_all(&pg)?;
        }
        Ok(())
    }

    /// Starts every server not already running and waits until each answers.
    pub async fn start_servers(&self) -> Result<()> {
        self.make_dirs()?;
        // Spawn the slow starters first, then Postgres (pg_ctl waits), then wait.
        self.spawn_clickhouse()?;
        self.spawn_s3()?;
        self.spawn_redis()?;
        self.spawn_prometheus()?;
        self.start_postgres().await?;
        self.wait_clickhouse().await?;
        self.wait_s3().await?;
        self.wait_redis().await?;
        self.wait_prometheus().await?;
        Ok(())
    }

    pub fn is_running(&self, server: Server) -> bool {
        self.running(server).is_some()
    }

    fn running(&self, server: Server) -> Option<u32> {
        read_pid(&self.pid_file(server.name())).filter(|&pid| alive(pid, server.process_name()))
    }

    // ---- Postgres -------------------------------------------------------------

    /// Where Postgres keeps its data and log. It must be writable by the `postgres`
    /// user when we run as root; if the checkout is not reachable for that user
    /// (e.g. under a private home), a folder under /var/lib/postgresql is used.
    pub fn postgres_root(&self) -> PathBuf {
        let local = self.data("postgres");
        if !is_root() || reachable_by_postgres(&self.base) {
            return local;
        }
        let tag = self.root.display().to_string().replace('/', "_");
        let kind = match self.kind {
            Kind::Up => "up",
            Kind::Test => "test",
        };
        PathBuf::from(format!("/var/lib/postgresql/tidemark/{kind}{tag}"))
    }

    async fn start_postgres(&self) -> Result<()> {
        if self.running(Server::Postgres).is_some() {
            return Ok(());
        }
        let bin = install::postgres_bin_dir().context("PostgreSQL is not installed")?;
        let pg_root = self.postgres_root();
        let data = pg_root.join("data");
        fs::create_dir_all(&pg_root)?;
        if is_root() {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&pg_root))?;
        }
        if !data.join("PG_VERSION").exists() {
            run(pg_command(&bin.join("initdb"))
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                ])
                .arg("--no-sync")
                .arg("-D")
                .arg(&data))
            .context("initdb")?;
        }
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c timezone=UTC -c max_connections=300",
            self.ports.postgres,
            data.display()
        );
        if self.kind == Kind::Test {
            // Speed over crash safety of the OS: the test stack is thrown away.
            options += " -c fsync=off -c full_page_writes=off -c shared_buffers=256MB";
        }
        let log = pg_root.join("postgres.log");
        run(pg_command(&bin.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "-o", &options, "start"]))
        .with_context(|| format!("pg_ctl start; log:\n{}", proc::tail(&log, 20)))?;
        let pid = fs::read_to_string(data.join("postmaster.pid"))?
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        fs::write(self.pid_file("postgres"), format!("{pid}\n"))?;
        if self.kind == Kind::Up {
            let admin = sqlx::PgPool::connect(&self.postgres_url("postgres")).await?;
            let exists: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'tidemark')",
            )
            .fetch_one(&admin)
            .await?;
            if !exists {
                sqlx::query("CREATE DATABASE tidemark")
                    .execute(&admin)
                    .await?;
            }
            admin.close().await;
        }
        Ok(())
    }

    // ---- Redis ----------------------------------------------------------------

    fn spawn_redis(&self) -> Result<()> {
        if self.running(Server::Redis).is_some() {
            return Ok(());
        }
        let dir = self.data("redis");
        fs::create_dir_all(&dir)?;
        let bin = which("redis-server").context("redis-server is not installed")?;
        let appendonly = if self.kind == Kind::Up { "yes" } else { "no" };
        run(Command::new(bin)
            .args(["--port", &self.ports.redis.to_string()])
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                appendonly,
            ])
            .arg("--dir")
            .arg(&dir)
            .arg("--logfile")
            .arg(self.log("redis"))
            .arg("--pidfile")
            .arg(self.pid_file("redis"))
            .args(["--daemonize", "yes"]))?;
        Ok(())
    }

    async fn wait_redis(&self) -> Result<()> {
        let url = self.redis_url();
        let ok = wait_async(Duration::from_secs(20), || {
            let url = url.clone();
            async move {
                let Ok(client) = redis::Client::open(url) else {
                    return false;
                };
                let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
                    return false;
                };
                redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            }
        })
        .await;
        self.ready_or_bail(ok, Server::Redis)
    }

    // ---- ClickHouse -----------------------------------------------------------

    fn spawn_clickhouse(&self) -> Result<()> {
        if self.running(Server::ClickHouse).is_some() {
            return Ok(());
        }
        let dir = self.data("clickhouse");
        fs::create_dir_all(&dir)?;
        let bin = which("clickhouse-server").context("clickhouse-server is not installed")?;
        let logs = self.base.join("logs");
        let p = |s: &str| format!("{}/{s}", dir.display());
        let mut cmd = Command::new(bin);
        cmd.arg("--config-file=/etc/clickhouse-server/config.xml")
            .arg("--")
            .arg(format!("--path={}/", dir.display()))
            .arg(format!("--tmp_path={}", p("tmp/")))
            .arg(format!("--user_files_path={}", p("user_files/")))
            .arg(format!("--format_schema_path={}", p("format_schemas/")))
            .arg(format!(
                "--logger.log={}",
                logs.join("clickhouse.log").display()
            ))
            .arg(format!(
                "--logger.errorlog={}",
                logs.join("clickhouse.err.log").display()
            ))
            .arg("--logger.level=information")
            .arg(format!("--http_port={}", self.ports.clickhouse_http))
            .arg(format!("--tcp_port={}", self.ports.clickhouse_tcp))
            .arg(format!(
                "--interserver_http_port={}",
                self.ports.clickhouse_interserver
            ))
            .arg("--listen_host=127.0.0.1")
            .arg("--timezone=UTC")
            .arg("--mark_cache_size=268435456");
        spawn_detached(
            &mut cmd,
            &logs.join("clickhouse.stdout.log"),
            &self.pid_file("clickhouse"),
        )?;
        Ok(())
    }

    async fn wait_clickhouse(&self) -> Result<()> {
        let url = format!("{}/?query=SELECT%201", self.clickhouse_url());
        let client = reqwest::Client::new();
        let ok = wait_async(Duration::from_secs(60), || {
            let request = client.get(&url).send();
            async move {
                match request.await {
                    Ok(r) => r.text().await.is_ok_and(|t| t.trim() == "1"),
                    Err(_) => false,
                }
            }
        })
        .await;
        self.ready_or_bail(ok, Server::ClickHouse)
    }

    // ---- S3 -------------------------------------------------------------------

    fn spawn_s3(&self) -> Result<()> {
        if self.running(Server::S3).is_some() {
            return Ok(());
        }
        let dir = self.data("s3");
        fs::create_dir_all(&dir)?;
        let mut cmd = Command::new(cargo_bin("s3s-fs"));
        cmd.args(["--host", "127.0.0.1", "--port", &self.ports.s3.to_string()])
            .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
            .arg(&dir);
        spawn_detached(&mut cmd, &self.log("s3"), &self.pid_file("s3"))?;
        Ok(())
    }

    pub fn s3_config(&self) -> tidemark_platform::config::S3Config {
        tidemark_platform::config::S3Config {
            endpoint: self.s3_endpoint(),
            bucket: self.bucket().to_owned(),
            access_key_id: Some(S3_ACCESS_KEY.to_owned()),
            secret_access_key: Some(S3_SECRET_KEY.into()),
            ..Default::default()
        }
    }

    async fn wait_s3(&self) -> Result<()> {
        let config = self.s3_config();
        let client = tidemark_platform::s3::client(&config).await;
        let ok = wait_async(Duration::from_secs(20), || {
            let client = client.clone();
            let bucket = config.bucket.clone();
            async move {
                tidemark_platform::s3::ensure_bucket(&client, &bucket)
                    .await
                    .is_ok()
            }
        })
        .await;
        self.ready_or_bail(ok, Server::S3)
    }

    // ---- Prometheus -----------------------------------------------------------

    /// Prometheus scrapes the targets listed in `prometheus/targets/*.json`:
    /// the `up` stack writes its services there; tests add their own.
    fn spawn_prometheus(&self) -> Result<()> {
        if self.running(Server::Prometheus).is_some() {
            return Ok(());
        }
        let targets = self.base.join("prometheus/targets");
        fs::create_dir_all(&targets)?;
        let config = self.base.join("prometheus/prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 5s\n  evaluation_interval: 5s\n\
                 scrape_configs:\n  - job_name: tidemark\n    file_sd_configs:\n\
                 \x20     - files: ['{}/*.json']\n        refresh_interval: 1s\n",
                targets.display()
            ),
        )?;
        let bin = which("prometheus").context("prometheus is not installed")?;
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                self.data("prometheus").display()
            ))
            .arg(format!(
                "--web.listen-address=127.0.0.1:{}",
                self.ports.prometheus
            ))
            .arg("--web.enable-lifecycle");
        spawn_detached(
            &mut cmd,
            &self.log("prometheus"),
            &self.pid_file("prometheus"),
        )?;
        Ok(())
    }

    async fn wait_prometheus(&self) -> Result<()> {
        let url = format!("{}/-/ready", self.prometheus_url());
        let client = reqwest::Client::new();
        let ok = wait_async(Duration::from_secs(30), || {
            let request = client.get(&url).send();
            async move { request.await.is_ok_and(|r| r.status().is_success()) }
        })
        .await;
        self.ready_or_bail(ok, Server::Prometheus)
    }

    /// Writes the file Prometheus discovers scrape targets from.
    pub fn write_prometheus_targets(&self, name: &str, targets: &[(String, String)]) -> Result<()> {
        let entries: Vec<serde_json::Value> = targets
            .iter()
            .map(|(service, addr)| {
                serde_json::json!({ "targets": [addr], "labels": { "service": service } })
            })
            .collect();
        let dir = self.base.join("prometheus/targets");
        fs::create_dir_all(&dir)?;
        fs::write(
            dir.join(format!("{name}.json")),
            serde_json::to_vec_pretty(&entries)?,
        )?;
        Ok(())
    }

    fn ready_or_bail(&self, ok: bool, server: Server) -> Result<()> {
        if ok {
            return Ok(());
        }
        bail!(
            "{} did not become ready; last log lines:\n{}",
            server.name(),
            proc::tail(&self.log(server.name()), 30)
        )
    }

    // ---- Stop and status -------------------------------------------------------

    /// Stops every process of this stack that has a pid file: services first.
    pub async fn stop(&self, services: &[&str]) -> Result<()> {
        for name in services {
            let file = self.pid_file(name);
            if let Some(pid) = read_pid(&file) {
                proc::stop(
                    pid,
                    &format!("tidemark-{name}"),
                    "TERM",
                    Duration::from_secs(30),
                )
                .await?;
            }
            drop(fs::remove_file(file));
        }
        for server in Server::ALL.iter().rev() {
            let file = self.pid_file(server.name());
            if let Some(pid) = read_pid(&file) {
                // SIGINT is Postgres's fast shutdown; the others exit on TERM.
                let sig = if *server == Server::Postgres {
                    "INT"
                } else {
                    "TERM"
                };
                proc::stop(pid, server.process_name(), sig, Duration::from_secs(30)).await?;
            }
            drop(fs::remove_file(file));
        }
        Ok(())
    }

    /// One line per component: name, pid or `stopped`, address.
    pub fn status_lines(&self, services: &[(&str, u16)]) -> String {
        let mut out = String::new();
        let addr = |port: u16| format!("127.0.0.1:{port}");
        let rows = [
            (Server::Postgres, self.ports.postgres),
            (Server::Redis, self.ports.redis),
            (Server::ClickHouse, self.ports.clickhouse_http),
            (Server::S3, self.ports.s3),
            (Server::Prometheus, self.ports.prometheus),
        ];
        for (server, port) in rows {
            let state = self
                .running(server)
                .map_or_else(|| "stopped".to_owned(), |pid| format!("pid {pid}"));
            writeln!(out, "{:<12} {:<12} {}", server.name(), state, addr(port)).unwrap();
        }
        for (name, port) in services {
            let state = read_pid(&self.pid_file(name))
                .filter(|&pid| alive(pid, &format!("tidemark-{name}")))
                .map_or_else(|| "stopped".to_owned(), |pid| format!("pid {pid}"));
            writeln!(out, "{name:<12} {state:<12} {}", addr(*port)).unwrap();
        }
        out
    }

    /// Writes `KEY=VALUE` lines for scripts to source.
    pub fn write_env(&self, vars: &[(String, String)]) -> Result<()> {
        let mut text = String::from("# Written by cargo xtask; source it from a shell.\n");
        for (k, v) in vars {
            writeln!(text, "{k}={v}").unwrap();
        }
        fs::create_dir_all(&self.base)?;
        fs::write(self.env_file(), text)?;
        Ok(())
    }

    /// Reads back `KEY=VALUE` lines written earlier.
    pub fn read_env(&self) -> Vec<(String, String)> {
        fs::read_to_string(self.env_file())
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a Postgres binary as the `postgres` user when we are root.
fn pg_command(bin: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

/// Whether the `postgres` user can reach and create files under `dir`'s parents.
fn reachable_by_postgres(dir: &Path) -> bool {
    let probe = dir.parent().unwrap_or(dir);
    Command::new("runuser")
        .args(["-u", "postgres", "--", "test", "-x"])
        .arg(probe)
        .status()
        .is_ok_and(|s| s.success())
}

/// Polls an async condition every 100 ms; true if it held before `timeout`.
pub async fn wait_async<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
