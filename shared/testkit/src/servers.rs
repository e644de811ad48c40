//! Servers of one test's own, for tests that stop, flush or restart one (or hold
//! transactions open: the log horizon is cluster-wide, so on the shared Postgres
//! an open transaction would pause every other test's consumers).
//!
//! One type, [`PrivateServer`], runs any of them as a child process with its data
//! in a temporary folder; its command line and readiness probe come from
//! `tidemark-launch`, as the stacks' do. The four named types add what a test
//! needs of each (a URL, a config, FLUSHALL).

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use sqlx::PgPool;
use tidemark_launch::servers;
use tidemark_platform::config::{ClickHouseConfig, PostgresConfig, RedisConfig, S3Config};

use crate::isolate::{TestDb, unique};
use crate::stack::stack;

/// Which server, and what its command and probe need.
enum Kind {
    Postgres {
        bin_dir: PathBuf,
    },
    /// Requiring the password, if any.
    Redis {
        password: Option<&'static str>,
    },
    /// A replica of the Redis server on the port.
    RedisReplica {
        primary: u16,
        password: Option<&'static str>,
    },
    /// A Sentinel watching the Redis server on the port as `tidemark`.
    Sentinel {
        primary: u16,
        password: Option<&'static str>,
    },
    S3,
    /// HAProxy balancing over services on these ports.
    HaProxy {
        backends: Vec<u16>,
    },
    /// A member of the cluster `tidemark` whose shards' replicas listen on the
    /// TCP ports of `cluster` (empty: a server on its own, packaged
    /// configuration); `replica`: its place in a replicated cluster.
    ClickHouse {
        ports: servers::clickhouse::Ports,
        cluster: Vec<Vec<u16>>,
        replica: Option<ClickHouseReplica>,
    },
    /// A standalone ZooKeeper.
    ZooKeeper,
    /// Scraping `targets/*.json` in its folder every second, with the
    /// repository's alerting rules, alerting the Alertmanager on the port.
    Prometheus {
        alertmanager: u16,
    },
    /// Sending every alert to the webhook, a second after it fires.
    Alertmanager {
        webhook: String,
    },
}

/// A server run as a child process of the test, on a port of its own, with its
/// data in a temporary folder that outlives restarts. Stopped when dropped.
pub struct PrivateServer {
    kind: Kind,
    dir: tempfile::TempDir,
    pub port: u16,
    child: Mutex<Option<Child>>,
}

impl PrivateServer {
    async fn start(kind: Kind, port: u16) -> PrivateServer {
        let dir = tempfile::Builder::new()
            .prefix("tidemark-private-")
            .tempdir()
            .expect("tempdir");
        let server = PrivateServer {
            kind,
            dir,
            port,
            child: Mutex::new(None),
        };
        server.prepare();
        server.resume().await;
        server
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// What the server needs in its folder before its first start.
    fn prepare(&self) {
        match &self.kind {
            Kind::Postgres { bin_dir } => {
                servers::postgres::give_to_postgres(self.path()).expect("chown");
                let status = servers::postgres::initdb(bin_dir, &self.path().join("data"))
                    .stdout(Stdio::null())
                    .status()
                    .expect("initdb runs");
                assert!(status.success(), "initdb failed");
            }
            Kind::S3 => {
                std::fs::create_dir(self.path().join(PrivateS3::BUCKET)).expect("bucket folder");
            }
            Kind::Prometheus { alertmanager } => {
                std::fs::create_dir(self.path().join("targets")).expect("targets folder");
                let rules =
                    tidemark_launch::workspace_root().join("dashboards/alerts/tidemark.rules.yml");
                let config = servers::prometheus::config(
                    &self.path().join("targets"),
                    "1s",
                    &rules,
                    *alertmanager,
                );
                std::fs::write(self.path().join("prometheus.yml"), config).expect("config");
            }
            Kind::Alertmanager { webhook } => servers::alertmanager::render(
                &self.path().join("alertmanager.yml"),
                &[
                    ("TIDEMARK_ALERT_WEBHOOK_URL", webhook),
                    ("TIDEMARK_ALERT_GROUP_WAIT", "1s"),
                ],
            )
            .expect("alertmanager.yml"),
            Kind::Sentinel { primary, password } => std::fs::write(
                self.path().join("sentinel.conf"),
                servers::redis::sentinel_config(
                    self.port,
                    PrivateRedisFailover::NAME,
                    *primary,
                    PrivateRedisFailover::DOWN_AFTER_MS,
                    *password,
                ),
            )
            .expect("sentinel.conf"),
            Kind::HaProxy { backends } => std::fs::write(
                self.path().join("haproxy.cfg"),
                servers::haproxy::config(self.port, backends),
            )
            .expect("haproxy.cfg"),
            Kind::ClickHouse {
                cluster, replica, ..
            } if !cluster.is_empty() => {
                let shards: Vec<Vec<(&str, u16)>> = cluster
                    .iter()
                    .map(|replicas| replicas.iter().map(|p| ("127.0.0.1", *p)).collect())
                    .collect();
                servers::clickhouse::cluster_config(
                    &self.path().join("etc"),
                    PrivateClickHouseCluster::NAME,
                    &shards,
                    replica.map(|r| servers::clickhouse::Replica {
                        shard: r.shard,
                        replica: r.replica,
                        zookeeper: ("127.0.0.1", r.zookeeper),
                    }),
                )
                .expect("cluster configuration");
            }
            Kind::ZooKeeper => {
                std::fs::create_dir(self.path().join("data")).expect("data folder");
                std::fs::write(
                    self.path().join("zoo.cfg"),
                    servers::zookeeper::config(&self.path().join("data"), self.port),
                )
                .expect("zoo.cfg");
            }
            Kind::Redis { .. } | Kind::RedisReplica { .. } | Kind::ClickHouse { .. } => {}
        }
    }

    fn command(&self) -> Command {
        let stack = stack();
        let dir = self.path();
        match &self.kind {
            Kind::Postgres { bin_dir } => {
                servers::postgres::server(bin_dir, &dir.join("data"), self.port, &["fsync=off"])
            }
            Kind::Redis { password } => {
                let server = servers::redis::server(
                    stack.redis_server_bin().as_ref(),
                    self.port,
                    dir,
                    false,
                );
                match password {
                    Some(p) => servers::redis::with_password(server, p),
                    None => server,
                }
            }
            Kind::RedisReplica { primary, password } => {
                let replica = servers::redis::replica(
                    stack.redis_server_bin().as_ref(),
                    self.port,
                    dir,
                    *primary,
                );
                match password {
                    Some(p) => servers::redis::with_password(replica, p),
                    None => replica,
                }
            }
            Kind::HaProxy { .. } => servers::haproxy::server(
                &tidemark_launch::which("haproxy").expect("haproxy is installed"),
                &dir.join("haproxy.cfg"),
            ),
            Kind::Sentinel { .. } => servers::redis::sentinel(
                stack.redis_server_bin().as_ref(),
                &dir.join("sentinel.conf"),
            ),
            Kind::S3 => servers::s3::server(
                stack.s3_server_bin().as_ref(),
                self.port,
                dir,
                PrivateS3::ACCESS_KEY,
                PrivateS3::SECRET_KEY,
            ),
            Kind::ZooKeeper => servers::zookeeper::server(&dir.join("zoo.cfg")),
            Kind::ClickHouse { ports, cluster, .. } => servers::clickhouse::server(
                stack.clickhouse_server_bin().as_ref(),
                &if cluster.is_empty() {
                    Path::new(servers::clickhouse::PACKAGED_CONFIG).to_owned()
                } else {
                    dir.join("etc/config.xml")
                },
                dir,
                dir,
                "warning",
                *ports,
            ),
            Kind::Prometheus { .. } => servers::prometheus::server(
                &tidemark_launch::which("prometheus").expect("prometheus is installed"),
                &dir.join("prometheus.yml"),
                &dir.join("data"),
                self.port,
            ),
            Kind::Alertmanager { .. } => servers::alertmanager::server(
                &tidemark_launch::which("prometheus-alertmanager")
                    .expect("prometheus-alertmanager is installed"),
                &dir.join("alertmanager.yml"),
                &dir.join("data"),
                self.port,
            ),
        }
    }

    async fn ready(&self) -> bool {
        match &self.kind {
            Kind::Postgres { bin_dir } => servers::postgres::ready(bin_dir, self.port).await,
            Kind::Redis { password }
            | Kind::RedisReplica { password, .. }
            | Kind::Sentinel { password, .. } => {
                servers::redis::ready_as(self.port, *password).await
            }
            Kind::S3 => servers::s3::ready(self.port).await,
            Kind::HaProxy { .. } => servers::haproxy::ready(self.port).await,
            Kind::ClickHouse { ports, .. } => servers::clickhouse::ready(ports.http).await,
            Kind::ZooKeeper => servers::zookeeper::ready(self.port).await,
            Kind::Prometheus { .. } => servers::prometheus::ready(self.port).await,
            Kind::Alertmanager { .. } => servers::alertmanager::ready(self.port).await,
        }
    }

    /// Starts (or restarts, with its data; Redis starts empty) the server and
    /// waits until it answers.
    pub async fn resume(&self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.path().join("server.log"))
            .expect("server log");
        let child = self
            .command()
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("the private server starts");
        *self.child.lock().unwrap() = Some(child);
        // Generous: a cold ClickHouse creates its system tables first, and while the
        // suite starts two cores are shared by dozens of tests (once seen at 60 s).
        // A server that exits instead (a port taken, a bad config) ends the wait.
        let answered = tidemark_launch::until(
            Duration::from_secs(180),
            Duration::from_millis(20),
            || async { self.exited().is_some() || self.ready().await },
        )
        .await;
        if let Some(status) = self.exited() {
            panic!("the private server exited ({status}); {}", self.logs());
        }
        assert!(
            answered,
            "the private server did not answer within 180 s; {}",
            self.logs()
        );
    }

    /// How the server's process ended, if it has.
    fn exited(&self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.lock().unwrap();
        child.as_mut()?.try_wait().ok().flatten()
    }

    /// Its output and the end of each error log in its folder (ClickHouse writes
    /// why it stopped there, not to its output).
    fn logs(&self) -> String {
        let mut logs = format!("its output:\n{}", self.log());
        let errors = std::fs::read_dir(self.path())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| entry.file_name().to_string_lossy().ends_with(".err.log"));
        for entry in errors {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            logs += &format!(
                "\n{}:\n{}",
                entry.file_name().to_string_lossy(),
                tail.join("\n")
            );
        }
        logs
    }

    /// What the server has printed since it first started (HAProxy: its servers
    /// going down and up).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path().join("server.log")).unwrap_or_default()
    }

    /// Stops the server and waits until it is gone: Postgres shuts down fast
    /// (cleanly), the others are killed (Redis loses its data).
    pub fn stop(&self) {
        let signal = match self.kind {
            Kind::Postgres { .. } => "INT",
            _ => "KILL",
        };
        self.end(signal);
    }

    /// Freezes the server (SIGSTOP): it keeps its connections and accepts new
    /// ones (the kernel does) but answers nothing — a hung server.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn unpause(&self) {
        self.signal("CONT");
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = self.child.lock().unwrap().as_ref() {
            let status = Command::new("kill")
                .args([&format!("-{signal}"), &child.id().to_string()])
                .status()
                .expect("kill runs");
            assert!(status.success(), "kill -{signal} failed");
        }
    }

    fn end(&self, signal: &str) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            drop(
                Command::new("kill")
                    .args([&format!("-{signal}"), &child.id().to_string()])
                    .status(),
            );
            drop(child.wait());
        }
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        // Postgres: immediate shutdown (its backends exit with it).
        let signal = match self.kind {
            Kind::Postgres { .. } => "QUIT",
            _ => "KILL",
        };
        self.end(signal);
    }
}

/// A Postgres server of one test's own, migrated.
pub struct PrivatePostgres(PrivateServer);

impl Deref for PrivatePostgres {
    type Target = PrivateServer;

    fn deref(&self) -> &PrivateServer {
        &self.0
    }
}

impl PrivatePostgres {
    /// Initialises and starts a server with the migrations applied to `postgres`.
    pub async fn start() -> PrivatePostgres {
        crate::log::init();
        let kind = Kind::Postgres {
            bin_dir: stack().postgres_bin_dir(),
        };
        let pg = PrivatePostgres(PrivateServer::start(kind, tidemark_launch::free_port()).await);
        let pool = PgPool::connect(&pg.url())
            .await
            .expect("private postgres up");
        tidemark_platform::postgres::migrate(&pool)
            .await
            .expect("migrations apply");
        pool.close().await;
        pg
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A config that fails fast while the server is down.
    pub fn config(&self) -> PostgresConfig {
        PostgresConfig {
            url: self.url().into(),
            acquire_timeout: Duration::from_millis(500),
            ..PostgresConfig::default()
        }
    }

    /// The server's migrated database as a [`TestDb`].
    pub fn test_db(&self) -> TestDb {
        TestDb::at("postgres", self.url())
    }
}

/// A Redis server of one test's own, without persistence.
pub struct PrivateRedis(PrivateServer);

impl Deref for PrivateRedis {
    type Target = PrivateServer;

    fn deref(&self) -> &PrivateServer {
        &self.0
    }
}

impl PrivateRedis {
    pub async fn start() -> PrivateRedis {
        PrivateRedis(
            PrivateServer::start(Kind::Redis { password: None }, tidemark_launch::free_port())
                .await,
        )
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn config(&self) -> RedisConfig {
        RedisConfig {
            url: self.url().into(),
            key_prefix: unique("t"),
            timeout: Duration::from_millis(500),
            ..RedisConfig::default()
        }
    }

    /// FLUSHALL.
    pub fn flushall(&self) {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "FLUSHALL"])
            .output()
            .expect("redis-cli runs");
        assert!(out.status.success(), "FLUSHALL failed");
    }
}

/// A Redis primary, a replica of it, and a Sentinel watching them, of one test's
/// own: the primary can be killed and the Sentinel promotes the replica.
pub struct PrivateRedisFailover {
    pub primary: PrivateServer,
    pub replica: PrivateServer,
    pub sentinel: PrivateServer,
}

impl PrivateRedisFailover {
    /// The primary's name at the Sentinel.
    pub const NAME: &str = "tidemark";
    /// How long the Sentinel waits for an answer before it fails the primary over.
    pub const DOWN_AFTER_MS: u64 = 1_000;
    /// Required by the servers and the Sentinel alike, as in production.
    pub const PASSWORD: &str = "tidemark-failover-secret";

    pub async fn start() -> PrivateRedisFailover {
        let password = Some(Self::PASSWORD);
        let primary =
            PrivateServer::start(Kind::Redis { password }, tidemark_launch::free_port()).await;
        let replica = PrivateServer::start(
            Kind::RedisReplica {
                primary: primary.port,
                password,
            },
            tidemark_launch::free_port(),
        )
        .await;
        let sentinel = PrivateServer::start(
            Kind::Sentinel {
                primary: primary.port,
                password,
            },
            tidemark_launch::free_port(),
        )
        .await;
        PrivateRedisFailover {
            primary,
            replica,
            sentinel,
        }
    }

    /// A config that follows the Sentinel, failing fast while the primary is gone.
    /// The password authenticates at the Sentinel (its URL) and at the primary it
    /// names (`url`'s credentials).
    pub fn config(&self) -> RedisConfig {
        RedisConfig {
            url: format!(
                "redis://:{}@127.0.0.1:{}",
                Self::PASSWORD,
                self.primary.port
            )
            .into(),
            key_prefix: unique("t"),
            timeout: Duration::from_millis(500),
            sentinels: format!(
                "redis://:{}@127.0.0.1:{}",
                Self::PASSWORD,
                self.sentinel.port
            ),
            sentinel_master: Self::NAME.into(),
        }
    }

    /// The port of the server the Sentinel names as primary, if it answers.
    pub fn named_primary(&self) -> Option<u16> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.sentinel.port.to_string()])
            .args(["-a", Self::PASSWORD, "--no-auth-warning"])
            .args(["SENTINEL", "get-master-addr-by-name", Self::NAME])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)?
            .trim()
            .parse()
            .ok()
    }
}

/// HAProxy of one test's own, in front of service instances on loopback.
pub struct PrivateHaProxy(PrivateServer);

impl Deref for PrivateHaProxy {
    type Target = PrivateServer;

    fn deref(&self) -> &PrivateServer {
        &self.0
    }
}

impl PrivateHaProxy {
    /// Balancing over the services listening on `backends` (health-checked on
    /// `/readyz`; see `tidemark_launch::servers::haproxy::config`).
    pub async fn start(backends: &[u16]) -> PrivateHaProxy {
        let kind = Kind::HaProxy {
            backends: backends.to_vec(),
        };
        PrivateHaProxy(PrivateServer::start(kind, tidemark_launch::free_port()).await)
    }
}

/// An S3 server (s3s-fs) of one test's own, with one bucket.
pub struct PrivateS3(PrivateServer);

impl Deref for PrivateS3 {
    type Target = PrivateServer;

    fn deref(&self) -> &PrivateServer {
        &self.0
    }
}

impl PrivateS3 {
    pub const ACCESS_KEY: &str = "private";
    pub const SECRET_KEY: &str = "private-secret";
    pub const BUCKET: &str = "private";

    pub async fn start() -> PrivateS3 {
        PrivateS3(PrivateServer::start(Kind::S3, tidemark_launch::free_port()).await)
    }

    pub fn config(&self) -> S3Config {
        S3Config {
            endpoint: format!("http://127.0.0.1:{}", self.port),
            bucket: Self::BUCKET.into(),
            access_key_id: Some(Self::ACCESS_KEY.into()),
            secret_access_key: Some(Self::SECRET_KEY.into()),
            timeout: Duration::from_secs(2),
            ..S3Config::default()
        }
    }
}

/// A ClickHouse server of one test's own; `port` is its HTTP port.
pub struct PrivateClickHouse(PrivateServer);

impl Deref for PrivateClickHouse {
    type Target = PrivateServer;

    fn deref(&self) -> &PrivateServer {
        &self.0
    }
}

fn clickhouse_ports() -> servers::clickhouse::Ports {
    servers::clickhouse::Ports {
        http: tidemark_launch::free_port(),
        tcp: tidemark_launch::free_port(),
        interserver: tidemark_launch::free_port(),
    }
}

impl PrivateClickHouse {
    pub async fn start() -> PrivateClickHouse {
        let ports = clickhouse_ports();
        let kind = Kind::ClickHouse {
            ports,
            cluster: Vec::new(),
            replica: None,
        };
        PrivateClickHouse(PrivateServer::start(kind, ports.http).await)
    }

    /// A config naming a database of its own on this server.
    pub fn config(&self) -> ClickHouseConfig {
        ClickHouseConfig {
            url: format!("http://127.0.0.1:{}", self.port),
            database: unique("t_"),
            ..ClickHouseConfig::default()
        }
    }
}

/// A ClickHouse server's place in a replicated cluster, and its ZooKeeper's port.
#[derive(Clone, Copy, Debug)]
pub struct ClickHouseReplica {
    pub shard: usize,
    pub replica: usize,
    pub zookeeper: u16,
}

/// ClickHouse servers of one test's own forming the cluster `tidemark`: shards of
/// one server each, or of several replicas coordinated by a ZooKeeper of the
/// test's own.
pub struct PrivateClickHouseCluster {
    /// Each shard's servers, the writer first.
    pub replicas: Vec<Vec<PrivateServer>>,
    pub zookeeper: Option<PrivateServer>,
}

impl PrivateClickHouseCluster {
    pub const NAME: &str = "tidemark";

    /// `n` shards of one server each.
    pub async fn start(n: usize) -> PrivateClickHouseCluster {
        Self::launch(n, 1).await
    }

    /// `shards` shards of `replicas` servers each, and their ZooKeeper.
    pub async fn start_replicated(shards: usize, replicas: usize) -> PrivateClickHouseCluster {
        assert!(replicas > 1, "a replicated cluster has replicas");
        Self::launch(shards, replicas).await
    }

    async fn launch(shards: usize, replicas: usize) -> PrivateClickHouseCluster {
        let zookeeper = if replicas > 1 {
            Some(PrivateServer::start(Kind::ZooKeeper, tidemark_launch::free_port()).await)
        } else {
            None
        };
        let ports: Vec<Vec<_>> = (0..shards)
            .map(|_| (0..replicas).map(|_| clickhouse_ports()).collect())
            .collect();
        let tcp: Vec<Vec<u16>> = ports
            .iter()
            .map(|replicas| replicas.iter().map(|p| p.tcp).collect())
            .collect();
        let mut servers = Vec::new();
        for (shard, replicas) in ports.into_iter().enumerate() {
            let mut started = Vec::new();
            for (replica, ports) in replicas.into_iter().enumerate() {
                let kind = Kind::ClickHouse {
                    ports,
                    cluster: tcp.clone(),
                    replica: zookeeper.as_ref().map(|zk| ClickHouseReplica {
                        shard,
                        replica,
                        zookeeper: zk.port,
                    }),
                };
                started.push(PrivateServer::start(kind, ports.http).await);
            }
            servers.push(started);
        }
        PrivateClickHouseCluster {
            replicas: servers,
            zookeeper,
        }
    }

    /// A sharded config naming a database of its own, read through the first
    /// shard's writer.
    pub fn config(&self) -> ClickHouseConfig {
        let url = |s: &PrivateServer| format!("http://127.0.0.1:{}", s.port);
        ClickHouseConfig {
            url: url(&self.replicas[0][0]),
            database: unique("t_"),
            shards: self
                .replicas
                .iter()
                .map(|r| r.iter().map(url).collect::<Vec<_>>().join("|"))
                .collect::<Vec<_>>()
                .join(","),
            cluster: Self::NAME.into(),
            ..ClickHouseConfig::default()
        }
    }
}

/// Prometheus with the repository's alerting rules and an Alertmanager that sends
/// every alert to `webhook`, both of one test's own (scraping and evaluating every
/// second, grouping for a second).
pub struct PrivateAlerting {
    pub alertmanager: PrivateServer,
    pub prometheus: PrivateServer,
}

impl PrivateAlerting {
    pub async fn start(webhook: &str) -> PrivateAlerting {
        let alertmanager = PrivateServer::start(
            Kind::Alertmanager {
                webhook: webhook.to_owned(),
            },
            tidemark_launch::free_port(),
        )
        .await;
        let prometheus = PrivateServer::start(
            Kind::Prometheus {
                alertmanager: alertmanager.port,
            },
            tidemark_launch::free_port(),
        )
        .await;
        PrivateAlerting {
            alertmanager,
            prometheus,
        }
    }

    /// Scrapes `url`'s `/metrics` as the service `service`.
    pub fn scrape(&self, service: &str, url: &str) {
        let target = url.trim_start_matches("http://").trim_end_matches('/');
        let body = serde_json::json!([{ "targets": [target], "labels": { "service": service } }]);
        std::fs::write(
            self.prometheus
                .path()
                .join(format!("targets/{service}.json")),
            body.to_string(),
        )
        .expect("targets file");
    }

    pub fn prometheus_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.prometheus.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_server_that_exits_while_starting_fails_at_once_with_its_logs() {
        let port = tidemark_launch::free_port();
        let _taken = std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
        let start = tokio::spawn(PrivateServer::start(Kind::Redis { password: None }, port));
        let Err(panic) = start.await else {
            panic!("Redis started on a taken port");
        };
        let message = panic.into_panic();
        let message = message
            .downcast_ref::<String>()
            .expect("a formatted panic message");
        assert!(message.contains("the private server exited"), "{message}");
        assert!(message.contains("Address already in use"), "{message}");
    }
}
