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
use tidemark_launch::servers;
use tidemark_launch::{cargo_bin, is_root, postgres_bin_dir, which};

use crate::proc::{self, alive, read_pid, spawn_detached};

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
    pub alertmanager: u16,
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
                alertmanager: 9093,
            },
            Kind::Test => Ports {
                postgres: 54330,
                redis: 63800,
                clickhouse_http: 18133,
                clickhouse_tcp: 19010,
                clickhouse_interserver: 19019,
                s3: 39010,
                prometheus: 9091,
                alertmanager: 9095,
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
    Alertmanager,
    Prometheus,
}

impl Server {
    pub const ALL: [Server; 6] = [
        Server::Postgres,
        Server::Redis,
        Server::ClickHouse,
        Server::S3,
        Server::Alertmanager,
        Server::Prometheus,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Server::Postgres => "postgres",
            Server::Redis => "redis",
            Server::ClickHouse => "clickhouse",
            Server::S3 => "s3",
            Server::Alertmanager => "alertmanager",
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
            Server::Alertmanager => "alertmanager",
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
        let root = tidemark_launch::workspace_root();
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
        for server in Server::ALL {
            if self.running(server).is_none() {
                self.spawn(server)?;
            }
        }
        for server in Server::ALL {
            self.wait(server).await?;
        }
        if self.kind == Kind::Up {
            self.create_database("tidemark").await?;
        }
        let config = self.s3_config();
        let client = tidemark_platform::s3::client(&config).await;
        tidemark_platform::s3::ensure_bucket(&client, &config.bucket)
            .await
            .context("create the S3 bucket")?;
        Ok(())
    }

    /// Starts `server` detached, its output appended to its log.
    fn spawn(&self, server: Server) -> Result<()> {
        let name = server.name();
        let mut command = match server {
            Server::Postgres => self.postgres_command()?,
            Server::Redis => {
                let dir = self.data("redis");
                fs::create_dir_all(&dir)?;
                let bin = which("redis-server").context("redis-server is not installed")?;
                tidemark_launch::prioritized(servers::redis::server(
                    &bin,
                    self.ports.redis,
                    &dir,
                    self.kind == Kind::Up,
                ))
            }
            Server::ClickHouse => {
                let dir = self.data("clickhouse");
                fs::create_dir_all(&dir)?;
                let bin =
                    which("clickhouse-server").context("clickhouse-server is not installed")?;
                let level = "information";
                let ports = servers::clickhouse::Ports {
                    http: self.ports.clickhouse_http,
                    tcp: self.ports.clickhouse_tcp,
                    interserver: self.ports.clickhouse_interserver,
                };
                servers::clickhouse::server(
                    &bin,
                    Path::new(servers::clickhouse::PACKAGED_CONFIG),
                    &dir,
                    &self.base.join("logs"),
                    level,
                    ports,
                )
            }
            Server::S3 => {
                let dir = self.data("s3");
                fs::create_dir_all(&dir)?;
                let bin = cargo_bin("s3s-fs");
                servers::s3::server(&bin, self.ports.s3, &dir, S3_ACCESS_KEY, S3_SECRET_KEY)
            }
            Server::Alertmanager => self.alertmanager_command()?,
            Server::Prometheus => self.prometheus_command()?,
        };
        let log = match server {
            // ClickHouse writes its own logs; its stdout is kept apart.
            Server::ClickHouse => self.base.join("logs/clickhouse.stdout.log"),
            _ => self.log(name),
        };
        spawn_detached(&mut command, &log, &self.pid_file(name))?;
        Ok(())
    }

    /// Waits until `server` answers, or fails with the end of its log.
    async fn wait(&self, server: Server) -> Result<()> {
        let ports = &self.ports;
        let pg_bin = postgres_bin_dir().context("PostgreSQL is not installed")?;
        let ready =
            tidemark_launch::until(Duration::from_secs(60), Duration::from_millis(100), || {
                let pg_bin = pg_bin.clone();
                async move {
                    match server {
                        Server::Postgres => servers::postgres::ready(&pg_bin, ports.postgres).await,
                        Server::Redis => servers::redis::ready(ports.redis).await,
                        Server::ClickHouse => {
                            servers::clickhouse::ready(ports.clickhouse_http).await
                        }
                        Server::S3 => servers::s3::ready(ports.s3).await,
                        Server::Alertmanager => {
                            servers::alertmanager::ready(ports.alertmanager).await
                        }
                        Server::Prometheus => servers::prometheus::ready(ports.prometheus).await,
                    }
                }
            })
            .await;
        if ready {
            return Ok(());
        }
        bail!(
            "{} did not become ready; last log lines:\n{}",
            server.name(),
            proc::tail(&self.log(server.name()), 30)
        )
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

    /// Postgres's command; initialises the cluster on first use.
    fn postgres_command(&self) -> Result<Command> {
        let bin = postgres_bin_dir().context("PostgreSQL is not installed")?;
        let pg_root = self.postgres_root();
        let data = pg_root.join("data");
        fs::create_dir_all(&pg_root)?;
        servers::postgres::give_to_postgres(&pg_root)?;
        if !data.join("PG_VERSION").exists() {
            proc::run(&mut servers::postgres::initdb(&bin, &data)).context("initdb")?;
        }
        let mut settings = vec!["max_connections=300"];
        if self.kind == Kind::Test {
            // Speed over crash safety of the OS: the test stack is thrown away.
            settings.extend(["fsync=off", "full_page_writes=off", "shared_buffers=256MB"]);
            // A checkpoint every 512 MB of log, not 1 GB: the suite's log took
            // 785 MB of disk at the default (cheap here: fsync is off).
            settings.extend(["max_wal_size=512MB", "min_wal_size=64MB"]);
            // Where the statements' time goes, for the benchmarks (which run on
            // this stack); a database reads it after `CREATE EXTENSION`.
            settings.push("shared_preload_libraries=pg_stat_statements");
        }
        Ok(servers::postgres::server(
            &bin,
            &data,
            self.ports.postgres,
            &settings,
        ))
    }

    async fn create_database(&self, name: &str) -> Result<()> {
        let admin = sqlx::PgPool::connect(&self.postgres_url("postgres")).await?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(name)
                .fetch_one(&admin)
                .await?;
        if !exists {
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&admin)
                .await?;
        }
        admin.close().await;
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

    // ---- Prometheus -----------------------------------------------------------

    /// Prometheus scrapes the targets listed in `prometheus/targets/*.json`:
    /// the `up` stack writes its services there; tests add their own. It
    /// evaluates the repository's alerting rules (`dashboards/alerts`) and sends
    /// alerts to this stack's Alertmanager.
    fn prometheus_command(&self) -> Result<Command> {
        let targets = self.base.join("prometheus/targets");
        fs::create_dir_all(&targets)?;
        let config = self.base.join("prometheus/prometheus.yml");
        let rules = self.root.join("dashboards/alerts/tidemark.rules.yml");
        fs::write(
            &config,
            servers::prometheus::config(&targets, "5s", &rules, self.ports.alertmanager),
        )?;
        let bin = which("prometheus").context("prometheus is not installed")?;
        Ok(servers::prometheus::server(
            &bin,
            &config,
            &self.data("prometheus"),
            self.ports.prometheus,
        ))
    }

    /// Alertmanager, configured by `dashboards/alerts/render.sh` from this
    /// process's environment (Telegram and a webhook when their variables are set;
    /// see README, "Alerts").
    fn alertmanager_command(&self) -> Result<Command> {
        let dir = self.base.join("alertmanager");
        fs::create_dir_all(&dir)?;
        let config = dir.join("alertmanager.yml");
        servers::alertmanager::render(&config, &[])?;
        fs::create_dir_all(self.data("alertmanager"))?;
        let bin =
            which("prometheus-alertmanager").context("prometheus-alertmanager is not installed")?;
        Ok(servers::alertmanager::server(
            &bin,
            &config,
            &self.data("alertmanager"),
            self.ports.alertmanager,
        ))
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
            (Server::Alertmanager, self.ports.alertmanager),
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

/// Whether the `postgres` user can reach and create files under `dir`'s parents.
fn reachable_by_postgres(dir: &Path) -> bool {
    let probe = dir.parent().unwrap_or(dir);
    Command::new("runuser")
        .args(["-u", "postgres", "--", "test", "-x"])
        .arg(probe)
        .status()
        .is_ok_and(|s| s.success())
}
