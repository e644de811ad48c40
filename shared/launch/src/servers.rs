//! Each server's command line and its readiness probe. The commands run in the
//! foreground (the caller decides whether as a child or detached, and where the
//! output goes); every server listens on 127.0.0.1 only.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// How long a readiness probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub mod postgres {
    use std::os::unix::process::CommandExt;

    use super::*;

    /// Runs a Postgres binary as the `postgres` user when we are root (Postgres
    /// refuses to run as root).
    pub fn command(bin: &Path) -> Command {
        let mut command = Command::new(bin);
        if crate::is_root()
            && let Some((uid, gid)) = crate::host::user_ids("postgres")
        {
            command.uid(uid).gid(gid);
        }
        command
    }

    /// Makes `dir` (and what is in it) the `postgres` user's when we are root.
    pub fn give_to_postgres(dir: &Path) -> std::io::Result<()> {
        if !crate::is_root() {
            return Ok(());
        }
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir)
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "chown postgres {} failed",
                dir.display()
            )))
        }
    }

    /// `initdb` of a cluster with trust authentication for `postgres`, UTF-8.
    pub fn initdb(bin_dir: &Path, data: &Path) -> Command {
        let mut command = command(&bin_dir.join("initdb"));
        command
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
            .arg(data);
        command
    }

    /// The server on `port`, its socket in `data`, in UTC, with `settings` added
    /// as `-c name=value`. SIGINT stops it fast (clean); SIGQUIT immediately.
    pub fn server(bin_dir: &Path, data: &Path, port: u16, settings: &[&str]) -> Command {
        let mut command = command(&bin_dir.join("postgres"));
        command
            .arg("-D")
            .arg(data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(data)
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "timezone=UTC"]);
        for setting in settings {
            command.args(["-c", setting]);
        }
        command
    }

    /// Whether the server accepts connections (`pg_isready`).
    pub async fn ready(bin_dir: &Path, port: u16) -> bool {
        tokio::process::Command::new(bin_dir.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string(), "-t", "2"])
            .status()
            .await
            .is_ok_and(|s| s.success())
    }
}

pub mod redis {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// `redis-server` on `port` with its files in `dir`; with `persist`, an
    /// append-only file keeps the data across restarts.
    pub fn server(bin: &Path, port: u16, dir: &Path, persist: bool) -> Command {
        let mut command = Command::new(bin);
        command
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", if persist { "yes" } else { "no" }])
            .args(["--hash-max-listpack-entries", "16"])
            .arg("--dir")
            .arg(dir);
        command
    }

    /// A replica of the server on `primary`, otherwise like [`server`] (no
    /// persistence).
    pub fn replica(bin: &Path, port: u16, dir: &Path, primary: u16) -> Command {
        let mut command = server(bin, port, dir, false);
        command.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
        command
    }

    /// Requires `password` of clients (`--requirepass`) and gives it to a primary
    /// (`--masterauth`): after a failover the old primary, back as a replica,
    /// authenticates to the new one with it.
    pub fn with_password(mut command: Command, password: &str) -> Command {
        command.args(["--requirepass", password, "--masterauth", password]);
        command
    }

    /// The configuration of a Sentinel on `port` watching the primary on `primary`
    /// as `name`: it is judged down after `down_after_ms` without an answer, and
    /// one Sentinel suffices to fail it over (quorum 1).
    ///
    /// With `password`, the Sentinel requires it of its clients and gives it to the
    /// servers it watches (`sentinel auth-pass`).
    pub fn sentinel_config(
        port: u16,
        name: &str,
        primary: u16,
        down_after_ms: u64,
        password: Option<&str>,
    ) -> String {
        let auth = password.map_or_else(String::new, |p| {
            format!("requirepass {p}\nsentinel auth-pass {name} {p}\n")
        });
        format!(
            "port {port}\nbind 127.0.0.1\n\
             sentinel monitor {name} 127.0.0.1 {primary} 1\n\
             sentinel down-after-milliseconds {name} {down_after_ms}\n\
             sentinel failover-timeout {name} {}\n{auth}",
            down_after_ms * 5
        )
    }

    /// `redis-server <config> --sentinel` (the config file must be writable: a
    /// Sentinel records what it learns in it).
    pub fn sentinel(bin: &Path, config: &Path) -> Command {
        let mut command = Command::new(bin);
        command.arg(config).arg("--sentinel");
        command
    }

    /// Whether the server answers `PING`.
    pub async fn ready(port: u16) -> bool {
        ready_as(port, None).await
    }

    /// Whether the server answers `PING`, after `AUTH` with `password` if given.
    pub async fn ready_as(port: u16, password: Option<&str>) -> bool {
        let (request, expected): (String, &[u8]) = match password {
            Some(p) => (format!("AUTH {p}\r\nPING\r\n"), b"+OK\r\n+PONG\r\n"),
            None => ("PING\r\n".to_owned(), b"+PONG\r\n"),
        };
        let ping = async {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            stream.write_all(request.as_bytes()).await?;
            let mut reply = vec![0u8; expected.len()];
            stream.read_exact(&mut reply).await?;
            Ok::<_, std::io::Error>(reply == expected)
        };
        matches!(
            tokio::time::timeout(PROBE_TIMEOUT, ping).await,
            Ok(Ok(true))
        )
    }
}

pub mod clickhouse {
    use super::*;

    /// The ports a ClickHouse server listens on.
    #[derive(Clone, Copy, Debug)]
    pub struct Ports {
        pub http: u16,
        pub tcp: u16,
        pub interserver: u16,
    }

    /// The packaged server's configuration (Debian's `clickhouse-server`).
    pub const PACKAGED_CONFIG: &str = "/etc/clickhouse-server/config.xml";

    /// Where a server stands in a replicated cluster: its shard and replica
    /// (ClickHouse's `{shard}` and `{replica}` macros, which name its tables'
    /// paths in ZooKeeper) and the ZooKeeper coordinating the replicas.
    #[derive(Clone, Copy, Debug)]
    pub struct Replica<'a> {
        pub shard: usize,
        pub replica: usize,
        pub zookeeper: (&'a str, u16),
    }

    /// Writes a configuration for a member of the cluster `name` into `dir`: the
    /// packaged one (with its `users.xml`) and, in `config.d`, `remote_servers`
    /// naming each shard of `shards`, in order, by the `(host, tcp port)` of its
    /// replicas. A member of a replicated cluster (`replica`) also gets its macros,
    /// the ZooKeeper and `interserver_http_host` 127.0.0.1 (its replicas fetch
    /// parts from it there). Returns the path to pass to [`server`].
    pub fn cluster_config(
        dir: &Path,
        name: &str,
        shards: &[Vec<(&str, u16)>],
        replica: Option<Replica<'_>>,
    ) -> std::io::Result<std::path::PathBuf> {
        std::fs::create_dir_all(dir.join("config.d"))?;
        let packaged = Path::new(PACKAGED_CONFIG);
        std::fs::copy(packaged, dir.join("config.xml"))?;
        std::fs::copy(packaged.with_file_name("users.xml"), dir.join("users.xml"))?;
        let internal = if replica.is_some() {
            "<internal_replication>true</internal_replication>"
        } else {
            ""
        };
        let shards: String = shards
            .iter()
            .map(|replicas| {
                let replicas: String = replicas
                    .iter()
                    .map(|(host, port)| {
                        format!("<replica><host>{host}</host><port>{port}</port></replica>")
                    })
                    .collect();
                format!("      <shard>{internal}{replicas}</shard>\n")
            })
            .collect();
        let replication = match replica {
            None => String::new(),
            Some(Replica {
                shard,
                replica,
                zookeeper: (host, port),
            }) => format!(
                "  <zookeeper><node><host>{host}</host><port>{port}</port></node></zookeeper>\n  \
                 <macros><shard>{shard}</shard><replica>{replica}</replica></macros>\n  \
                 <interserver_http_host>127.0.0.1</interserver_http_host>\n"
            ),
        };
        std::fs::write(
            dir.join("config.d/cluster.xml"),
            format!(
                "<yandex>\n  <remote_servers replace=\"replace\">\n    <{name}>\n{shards}    </{name}>\n  \
                 </remote_servers>\n{replication}</yandex>\n"
            ),
        )?;
        Ok(dir.join("config.xml"))
    }

    /// `clickhouse-server` configured by `config` (usually [`PACKAGED_CONFIG`])
    /// with its data in `dir` (a path ending in `/` is not needed) and its logs in
    /// `logs`, at `level` (`warning`, `information`).
    pub fn server(
        bin: &Path,
        config: &Path,
        dir: &Path,
        logs: &Path,
        level: &str,
        ports: Ports,
    ) -> Command {
        let p = |s: &str| format!("{}/{s}", dir.display());
        let mut command = Command::new(bin);
        command
            .arg(format!("--config-file={}", config.display()))
            .arg("--")
            .arg(format!("--path={}", p("")))
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
            .arg(format!("--logger.level={level}"))
            .arg(format!("--http_port={}", ports.http))
            .arg(format!("--tcp_port={}", ports.tcp))
            .arg(format!("--interserver_http_port={}", ports.interserver))
            .arg("--listen_host=127.0.0.1")
            .arg("--timezone=UTC")
            .arg("--mark_cache_size=268435456");
        command
    }

    /// Whether `SELECT 1` over HTTP answers `1`.
    pub async fn ready(http_port: u16) -> bool {
        let url = format!("http://127.0.0.1:{http_port}/?query=SELECT%201");
        let answer = async { reqwest::get(url).await?.text().await };
        matches!(
            tokio::time::timeout(PROBE_TIMEOUT, answer).await,
            Ok(Ok(text)) if text.trim() == "1"
        )
    }
}

pub mod zookeeper {
    use super::*;

    /// Debian's `zookeeper` package: the server's classes.
    pub const CLASSPATH: &str = "/etc/zookeeper/conf:/usr/share/java/zookeeper.jar";

    /// A standalone server's configuration: clients on `port` (loopback), data in
    /// `dir`, a 500 ms tick (sessions of a killed ClickHouse expire in seconds).
    pub fn config(dir: &Path, port: u16) -> String {
        format!(
            "tickTime=500\ndataDir={}\nclientPort={port}\nclientPortAddress=127.0.0.1\n\
             admin.enableServer=false\n4lw.commands.whitelist=srvr\n",
            dir.display()
        )
    }

    /// The server (`java`, in the foreground) with the configuration file `config`.
    pub fn server(config: &Path) -> Command {
        let mut command = Command::new("java");
        command
            .arg("-Xmx256m")
            .arg("-cp")
            .arg(CLASSPATH)
            .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
            .arg(config);
        command
    }

    /// Whether it serves clients: `srvr` names its mode, or says it is "not
    /// currently serving requests". (`ruok` answers `imok` once the process has
    /// bound the port, serving or not; likely why a test's first DDL once failed
    /// under the suite's load, ClickHouse finding its ZooKeeper connections
    /// closed: "All connection tries failed".)
    pub async fn ready(port: u16) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let ask = async {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            stream.write_all(b"srvr").await?;
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        };
        matches!(
            tokio::time::timeout(PROBE_TIMEOUT, ask).await,
            Ok(Ok(answer)) if String::from_utf8_lossy(&answer).contains("Mode: ")
        )
    }
}

pub mod s3 {
    use super::*;

    /// `s3s-fs` serving the folder `dir` (each sub-folder a bucket) with one key.
    pub fn server(
        bin: &Path,
        port: u16,
        dir: &Path,
        access_key: &str,
        secret_key: &str,
    ) -> Command {
        let mut command = Command::new(bin);
        command
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", access_key, "--secret-key", secret_key])
            .arg(dir);
        command
    }

    /// Whether the server accepts connections.
    pub async fn ready(port: u16) -> bool {
        let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
        matches!(
            tokio::time::timeout(PROBE_TIMEOUT, connect).await,
            Ok(Ok(_))
        )
    }
}

pub mod prometheus {
    use super::*;

    /// The configuration of a Prometheus that scrapes the targets listed in
    /// `targets/*.json` (file discovery) every `interval`, evaluates
    /// `rules` at the same pace and sends alerts to the Alertmanager on
    /// `alertmanager_port`.
    pub fn config(targets: &Path, interval: &str, rules: &Path, alertmanager_port: u16) -> String {
        format!(
            "global:\n  scrape_interval: {interval}\n  evaluation_interval: {interval}\n\
             rule_files: ['{rules}']\n\
             alerting:\n  alertmanagers:\n    - static_configs:\n\
             \x20       - targets: ['127.0.0.1:{alertmanager_port}']\n\
             scrape_configs:\n  - job_name: tidemark\n    file_sd_configs:\n\
             \x20     - files: ['{targets}/*.json']\n        refresh_interval: 1s\n",
            rules = rules.display(),
            targets = targets.display(),
        )
    }

    /// Prometheus with its configuration file and data folder.
    pub fn server(bin: &Path, config: &Path, data: &Path, port: u16) -> Command {
        let mut command = Command::new(bin);
        command
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--web.enable-lifecycle");
        command
    }

    /// Whether `/-/ready` answers 2xx.
    pub async fn ready(port: u16) -> bool {
        let url = format!("http://127.0.0.1:{port}/-/ready");
        matches!(
            tokio::time::timeout(PROBE_TIMEOUT, reqwest::get(url)).await,
            Ok(Ok(r)) if r.status().is_success()
        )
    }
}

pub mod alertmanager {
    use super::*;

    /// Writes Alertmanager's configuration to `out` with the repository's
    /// `dashboards/alerts/render.sh` (the one rendering docker-compose uses too),
    /// from `env`: `TIDEMARK_ALERT_WEBHOOK_URL`, `TIDEMARK_TELEGRAM_BOT_TOKEN` and
    /// `TIDEMARK_TELEGRAM_CHAT_ID` (Telegram off when unset),
    /// `TIDEMARK_ALERT_GROUP_WAIT`.
    pub fn render(out: &Path, env: &[(&str, &str)]) -> std::io::Result<()> {
        let script = crate::workspace_root().join("dashboards/alerts/render.sh");
        let mut command = Command::new("sh");
        command.arg(script).arg(out);
        for (key, value) in env {
            command.env(key, value);
        }
        let status = command.status()?;
        if status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("render.sh failed: {status}")))
        }
    }

    /// Alertmanager alone (no cluster), with its configuration and data folder.
    pub fn server(bin: &Path, config: &Path, data: &Path, port: u16) -> Command {
        let mut command = Command::new(bin);
        command
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", data.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=");
        command
    }

    /// Whether `/-/ready` answers 2xx (the same probe as Prometheus's).
    pub async fn ready(port: u16) -> bool {
        super::prometheus::ready(port).await
    }
}

pub mod haproxy {
    use super::*;

    /// The `defaults` section every Tidemark HAProxy uses (the compose profile's
    /// too; its test holds it to these lines).
    ///
    /// Round robin over the instances, each health-checked on `/readyz` every
    /// 500 ms: out after 3 failures, back after 2 passes. A check may take 3 s,
    /// more than the 2 s a readiness probe allows each dependency, so a slow but
    /// honest "not ready" arrives as such; a dead server fails it at once,
    /// refusing the connection, and is out within 1.5 s. A request whose server
    /// refuses the connection, closes it without an answer or times out is retried
    /// on another server: Tidemark's writes are idempotent (an order or a refund
    /// carries its id), so a retry of a request the killed server had already
    /// committed answers 200 (duplicate) instead of failing. A WebSocket (the live
    /// subscription) may stay quiet for up to an hour (`timeout tunnel`); when its
    /// server dies, the client reconnects and is sent to a live one.
    ///
    /// HAProxy's own errors are problem+json like the services' (503 and 504 with
    /// `Retry-After`), never its HTML pages.
    pub const DEFAULTS: &str = "\
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout http-request 10s
    timeout tunnel 1h
    retries 2
    option redispatch 1
    option http-buffer-request
    retry-on conn-failure empty-response response-timeout
    option httpchk GET /readyz
    http-check expect status 200
    timeout check 3s
    option allbackups
    http-error status 400 content-type application/problem+json string '{\"type\":\"about:blank\",\"title\":\"Bad Request\",\"status\":400,\"detail\":\"The proxy could not read the request.\"}'
    http-error status 408 content-type application/problem+json string '{\"type\":\"about:blank\",\"title\":\"Request Timeout\",\"status\":408,\"detail\":\"The request did not arrive in time.\"}'
    http-error status 502 content-type application/problem+json hdr Retry-After 1 string '{\"type\":\"about:blank\",\"title\":\"Bad Gateway\",\"status\":502,\"detail\":\"An instance failed to answer; retry shortly.\"}'
    http-error status 503 content-type application/problem+json hdr Retry-After 1 string '{\"type\":\"about:blank\",\"title\":\"Service Unavailable\",\"status\":503,\"detail\":\"No instance is reachable; retry shortly.\"}'
    http-error status 504 content-type application/problem+json hdr Retry-After 1 string '{\"type\":\"about:blank\",\"title\":\"Gateway Timeout\",\"status\":504,\"detail\":\"No instance answered in time; retry shortly.\"}'
    default-server inter 500ms fall 3 rise 2
";

    /// The two lines naming one instance at `address`: checked, and again as a
    /// backup without checks. The backups make the proxy fail open: when every
    /// instance fails its check at once (two cores starved by a neighbour, a
    /// dependency down for all), requests still go to them, and the instances,
    /// which answer an outage honestly (503 problem+json with `Retry-After`, or a
    /// partial answer where asked), speak for themselves instead of the proxy
    /// refusing everything. A dead backup refuses the connection and the request
    /// is retried on the other.
    pub fn server_lines(name: &str, address: &str) -> String {
        format!("    server {name} {address} check\n    server {name}-open {address} backup\n")
    }

    /// HAProxy's configuration: HTTP on `port` over the services on `backends`
    /// (ports on loopback), with [`DEFAULTS`].
    pub fn config(port: u16, backends: &[u16]) -> String {
        let mut out = format!(
            "global\n    maxconn 4096\n\n{DEFAULTS}\n\
             frontend tidemark\n    bind 127.0.0.1:{port}\n    default_backend services\n\n\
             backend services\n    balance roundrobin\n"
        );
        for (i, backend) in backends.iter().enumerate() {
            out += &server_lines(&format!("s{i}"), &format!("127.0.0.1:{backend}"));
        }
        out
    }

    /// `haproxy` in the foreground with `config`.
    pub fn server(bin: &Path, config: &Path) -> Command {
        let mut command = Command::new(bin);
        command.arg("-db").arg("-f").arg(config);
        command
    }

    /// Whether it accepts connections on `port`.
    pub async fn ready(port: u16) -> bool {
        matches!(
            tokio::time::timeout(
                PROBE_TIMEOUT,
                tokio::net::TcpStream::connect(("127.0.0.1", port))
            )
            .await,
            Ok(Ok(_))
        )
    }
}
