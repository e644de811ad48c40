//! Layered configuration: compiled defaults → optional TOML file → `TIDEMARK_*`
//! environment variables, validated at start-up.
//!
//! Nested keys are separated by a double underscore in the environment:
//! `TIDEMARK_POSTGRES__URL` sets `postgres.url`. Secrets are [`SecretString`]s and
//! print as `[REDACTED]`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// The environment variable prefix of every setting.
pub const ENV_PREFIX: &str = "TIDEMARK_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(String),
    #[error("configuration could not be read: {0}")]
    Parse(#[from] Box<figment::Error>),
    #[error("invalid configuration: {}", .0.join("; "))]
    Invalid(Vec<String>),
}

/// A configuration that can check itself once loaded.
pub trait Validate {
    /// Pushes one sentence per problem found.
    fn validate(&self, problems: &mut Vec<String>);
}

/// Loads `T` from its defaults, the optional file and the environment, then validates it.
pub fn load<T>(file: Option<&Path>) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Validate,
{
    let mut figment = Figment::new();
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError::MissingFile(path.display().to_string()));
        }
        figment = figment.merge(Toml::file(path));
    }
    let config: T = figment
        .merge(Env::prefixed(ENV_PREFIX).split("__"))
        .extract()
        .map_err(Box::new)?;
    let mut problems = Vec::new();
    config.validate(&mut problems);
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

/// Where a service listens and how it treats requests.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Whole-request deadline; a request over it gets 503 problem+json.
    #[serde(with = "millis")]
    pub request_timeout: Duration,
    /// Requests handled at once before new ones are shed with 503.
    pub max_concurrency: usize,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[serde(with = "millis")]
    pub shutdown_grace: Duration,
}

impl HttpConfig {
    pub fn on_port(port: u16) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            request_timeout: Duration::from_secs(30),
            max_concurrency: 1024,
            shutdown_grace: Duration::from_secs(25),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self::on_port(8080)
    }
}

impl Validate for HttpConfig {
    fn validate(&self, problems: &mut Vec<String>) {
        if self.max_concurrency == 0 {
            problems.push("http.max_concurrency must be at least 1".into());
        }
        if self.request_timeout.is_zero() {
            problems.push("http.request_timeout must be positive".into());
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-friendly, for a terminal.
    Pretty,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    /// A `tracing` env-filter directive, e.g. `info,tidemark_ingest=debug`.
    pub log_filter: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Pretty,
            log_filter: "info".into(),
        }
    }
}

impl Validate for TelemetryConfig {
    fn validate(&self, problems: &mut Vec<String>) {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_filter) {
            problems.push(format!("telemetry.log_filter is not a valid filter: {e}"));
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/database`
    pub url: SecretString,
    pub max_connections: u32,
    /// How long a request waits for a pooled connection before 503.
    #[serde(with = "millis")]
    pub acquire_timeout: Duration,
    /// Apply the migrations in `migrations/postgres` at start-up.
    pub migrate: bool,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:54320/tidemark".into(),
            max_connections: 16,
            acquire_timeout: Duration::from_secs(3),
            migrate: true,
        }
    }
}

impl Validate for PostgresConfig {
    fn validate(&self, problems: &mut Vec<String>) {
        let url = self.url.expose_secret();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            problems.push("postgres.url must start with postgres://".into());
        }
        if self.max_connections == 0 {
            problems.push("postgres.max_connections must be at least 1".into());
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RedisConfig {
    /// `redis://[[user]:password@]host:port[/db]`. With `sentinels`, its host and
    /// port are unused; its credentials and database are those of the primary the
    /// Sentinels name.
    pub url: SecretString,
    /// Every key this deployment writes starts with this prefix and a colon.
    pub key_prefix: String,
    #[serde(with = "millis")]
    pub timeout: Duration,
    /// Redis Sentinels to ask for the primary, comma-separated
    /// `redis://[:password@]host:port` (a Sentinel's own `requirepass`);
    /// empty: `url` is the server. With sentinels, the primary is looked up again
    /// at most every second while it fails, so a failover is followed.
    pub sentinels: String,
    /// The primary's name at the sentinels (`sentinel monitor <name> …`).
    pub sentinel_master: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:63790".into(),
            key_prefix: "tidemark".into(),
            timeout: Duration::from_secs(2),
            sentinels: String::new(),
            sentinel_master: "tidemark".into(),
        }
    }
}

impl RedisConfig {
    /// The sentinels' URLs (none: connect to `url`).
    pub fn sentinel_urls(&self) -> Vec<&str> {
        comma_separated(&self.sentinels)
    }
}

/// The non-blank items of a comma-separated setting, trimmed.
fn comma_separated(setting: &str) -> Vec<&str> {
    setting
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

impl Validate for RedisConfig {
    fn validate(&self, problems: &mut Vec<String>) {
        if !self.url.expose_secret().starts_with("redis://") {
            problems.push("redis.url must start with redis://".into());
        }
        if self
            .sentinel_urls()
            .iter()
            .any(|s| !s.starts_with("redis://"))
        {
            problems.push("redis.sentinels must be redis:// URLs, comma-separated".into());
        }
        if self.sentinel_master.trim().is_empty() {
            problems.push("redis.sentinel_master must not be blank".into());
        }
        if self.key_prefix.is_empty() || self.key_prefix.contains(char::is_whitespace) {
            problems.push("redis.key_prefix must be non-empty without whitespace".into());
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClickHouseConfig {
    /// HTTP interface, e.g. `http://127.0.0.1:8123`.
    pub url: String,
    pub database: String,
    pub user: String,
    pub password: SecretString,
    /// Apply the migrations in `migrations/clickhouse` at start-up.
    pub migrate: bool,
    /// The batch view on several shards: each shard's HTTP interface,
    /// comma-separated, in the order of the cluster's `<shard>`s in the servers'
    /// `remote_servers`. Empty (the default): one server, `url`, holds everything.
    /// With shards, each holds its part of the tables in the database
    /// `<database>_local`, and `database` on `url` (any server that knows the
    /// cluster, usually the first shard) holds `Distributed` tables of the same
    /// names over them, which readers query.
    ///
    /// A shard of several replicas lists them separated by `|`, in the order of
    /// its `<replica>`s (`http://a:8123|http://b:8123,http://c:8123|http://d:8123`):
    /// its tables are then `Replicated…MergeTree`s, coordinated by the servers'
    /// ZooKeeper, and the first replica is the one the compactor writes to.
    pub shards: String,
    /// The cluster's name in the servers' `remote_servers` (with `shards`).
    pub cluster: String,
    /// The longest a request may wait for ClickHouse without a byte moving
    /// (connecting, sending, or reading the answer): a server that hangs fails
    /// the request instead of holding its caller forever.
    #[serde(with = "millis")]
    pub timeout: Duration,
    /// How requests and answers are compressed on the wire: `lz4`, `none`, or
    /// `auto` (the default): none when every server is on this machine (a
    /// loopback address or `localhost`, where compressing only spends the CPU
    /// both ends share: a tenth of a compactor run's), LZ4 otherwise.
    pub compression: Compression,
}

/// How the ClickHouse client compresses what it sends and asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Auto,
    Lz4,
    None,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:18123".into(),
            database: "tidemark".into(),
            user: "default".into(),
            password: "".into(),
            migrate: true,
            shards: String::new(),
            cluster: "tidemark".into(),
            timeout: Duration::from_secs(120),
            compression: Compression::Auto,
        }
    }
}

impl ClickHouseConfig {
    /// Whether the client compresses: `compression`, `auto` resolved by
    /// whether `url` and every shard's are on this machine.
    pub fn compresses(&self) -> bool {
        match self.compression {
            Compression::Lz4 => true,
            Compression::None => false,
            Compression::Auto => !std::iter::once(self.url.as_str())
                .chain(self.replica_urls().into_iter().flatten())
                .all(is_loopback),
        }
    }

    /// Each shard's replicas' URLs, the writer first (none: one server).
    pub fn replica_urls(&self) -> Vec<Vec<&str>> {
        comma_separated(&self.shards)
            .into_iter()
            .map(|shard| shard.split('|').map(str::trim).collect())
            .collect()
    }

    /// Each shard's writer: its first replica (none: one server).
    pub fn shard_urls(&self) -> Vec<&str> {
        self.replica_urls().into_iter().map(|r| r[0]).collect()
    }

    /// Whether a shard has replicas (its tables are `Replicated…MergeTree`s).
    pub fn replicated(&self) -> bool {
        self.replica_urls().iter().any(|r| r.len() > 1)
    }

    /// Whether the batch view is split over shards.
    pub fn sharded(&self) -> bool {
        !self.shard_urls().is_empty()
    }

    /// The database holding each server's own rows: `<database>_local` on every
    /// shard, or `database` itself on a single server.
    pub fn local_database(&self) -> String {
        if self.sharded() {
            format!("{}_local", self.database)
        } else {
            self.database.clone()
        }
    }

    /// A config per shard's writer, each on its local database (one, `self`,
    /// unsharded).
    pub fn shard_configs(&self) -> Vec<ClickHouseConfig> {
        self.replica_configs()
            .into_iter()
            .map(|mut replicas| replicas.remove(0))
            .collect()
    }

    /// Configs per shard for each of its replicas, the writer first, each on its
    /// local database (one shard of one replica, `self`, unsharded).
    pub fn replica_configs(&self) -> Vec<Vec<ClickHouseConfig>> {
        if !self.sharded() {
            return vec![vec![self.clone()]];
        }
        self.replica_urls()
            .into_iter()
            .map(|replicas| {
                replicas
                    .into_iter()
                    .map(|url| ClickHouseConfig {
                        url: url.to_owned(),
                        database: self.local_database(),
                        shards: String::new(),
                        ..self.clone()
                    })
                    .collect()
            })
            .collect()
    }
}

/// Whether an http(s) URL names this machine: `localhost` or a loopback address.
fn is_loopback(url: &str) -> bool {
    let Ok(uri) = url.parse::<axum::http::Uri>() else {
        return false;
    };
    match uri.host() {
        Some("localhost") => true,
        Some(host) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

impl Validate for ClickHouseConfig {
    fn validate(&self, problems: &mut Vec<String>) {
        if !self.url.starts_with("http://") && !self.url.starts_with("https://") {
            problems.push("clickhouse.url must be an http(s) URL".into());
        }
        if self.database.is_empty()
            || !self
                .database
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            problems.push("clickhouse.database must be letters, digits and underscores".into());
        }
        if self
            .replica_urls()
            .iter()
            .flatten()
            .any(|s| !s.starts_with("http://") && !s.starts_with("https://"))
        {
            problems.push(
                "clickhouse.shards must be http(s) URLs, comma-separated (a shard's replicas \
                 separated by |)"
                    .into(),
            );
        }
        if self.sharded()
            && (self.cluster.is_empty()
                || !self
                    .cluster
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_'))
        {
            problems.push("clickhouse.cluster must be letters, digits and underscores".into());
        }
        if self.timeout.is_zero() {
            problems.push("clickhouse.timeout must be positive".into());
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct S3Config {
    /// Endpoint of an S3-compatible server; addressing is path-style.
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    /// Every object this deployment writes lives under this prefix (may be empty).
    pub prefix: String,
    /// Static credentials; when unset, the AWS default chain is used.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<SecretString>,
    #[serde(with = "millis")]
    pub timeout: Duration,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            endpoint: "http://127.0.0.1:39000".into(),
            region: "us-east-1".into(),
            bucket: "tidemark".into(),
            prefix: String::new(),
            access_key_id: Some("tidemark".into()),
            secret_access_key: Some("tidemark-local-secret".into()),
            timeout: Duration::from_secs(10),
        }
    }
}

impl S3Config {
    /// The full object key for a key relative to the configured prefix.
    pub fn key(&self, relative: &str) -> String {
        if self.prefix.is_empty() {
            relative.to_owned()
        } else {
            format!("{}/{relative}", self.prefix.trim_end_matches('/'))
        }
    }
}

impl Validate for S3Config {
    fn validate(&self, problems: &mut Vec<String>) {
        if self.bucket.is_empty() {
            problems.push("s3.bucket must be set".into());
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            problems.push("s3.access_key_id and s3.secret_access_key must be set together".into());
        }
    }
}

/// Durations in config files and the environment are whole milliseconds.
pub mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, Default)]
    #[serde(default)]
    struct Sample {
        http: HttpConfig,
        postgres: PostgresConfig,
    }

    impl Validate for Sample {
        fn validate(&self, problems: &mut Vec<String>) {
            self.http.validate(problems);
            self.postgres.validate(problems);
        }
    }

    #[test]
    fn layers_file_then_environment_and_redacts_secrets() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "t.toml",
                "[http]\nlisten = \"0.0.0.0:9000\"\n[postgres]\nmax_connections = 3\n",
            )?;
            jail.set_env("TIDEMARK_POSTGRES__MAX_CONNECTIONS", "7");
            jail.set_env("TIDEMARK_POSTGRES__URL", "postgres://u:hunter2@db/x");
            let c: Sample = load(Some(Path::new("t.toml"))).expect("loads");
            assert_eq!(c.http.listen.port(), 9000, "file overrides default");
            assert_eq!(c.postgres.max_connections, 7, "env overrides file");
            assert_eq!(
                c.http.request_timeout,
                Duration::from_secs(30),
                "default kept"
            );
            let printed = format!("{c:?}");
            assert!(!printed.contains("hunter2"), "secret printed: {printed}");
            Ok(())
        });
    }

    #[test]
    fn reports_every_invalid_value() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("TIDEMARK_POSTGRES__URL", "mysql://nope");
            jail.set_env("TIDEMARK_HTTP__MAX_CONCURRENCY", "0");
            let err = load::<Sample>(None).unwrap_err().to_string();
            assert!(err.contains("postgres.url"), "{err}");
            assert!(err.contains("http.max_concurrency"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_named_file_must_exist() {
        let err = load::<Sample>(Some(Path::new("/nonexistent/tidemark.toml"))).unwrap_err();
        assert!(matches!(err, ConfigError::MissingFile(_)));
    }

    #[test]
    fn clickhouse_compresses_unless_every_server_is_on_this_machine() {
        let config = |url: &str, shards: &str, compression| ClickHouseConfig {
            url: url.into(),
            shards: shards.into(),
            compression,
            ..ClickHouseConfig::default()
        };
        let auto = Compression::Auto;
        for url in [
            "http://127.0.0.1:8123",
            "http://127.8.9.1:8123",
            "http://localhost:8123",
            "http://[::1]:8123",
        ] {
            assert!(!config(url, "", auto).compresses(), "{url}");
        }
        for url in [
            "http://10.0.0.7:8123",
            "http://[2001:db8::1]:8123",
            "https://clickhouse.internal",
            "http://localhost.example.com",
            "not a url",
        ] {
            assert!(config(url, "", auto).compresses(), "{url}");
        }
        let local = "http://127.0.0.1:1|http://127.0.0.1:2,http://localhost:3";
        assert!(!config("http://127.0.0.1:1", local, auto).compresses());
        let remote = "http://127.0.0.1:1|http://10.0.0.2:8123";
        assert!(config("http://127.0.0.1:1", remote, auto).compresses());
        assert!(config("http://127.0.0.1:1", "", Compression::Lz4).compresses());
        assert!(!config("http://10.0.0.7:1", "", Compression::None).compresses());
    }
}
