//! The ingest service's settings.

use std::time::Duration;

use serde::Deserialize;
use tidemark_platform::config::{
    HttpConfig, PostgresConfig, S3Config, TelemetryConfig, Validate, millis,
};
use tidemark_platform::lease::LeaseConfig;

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    pub http: HttpConfig,
    pub telemetry: TelemetryConfig,
    pub postgres: PostgresConfig,
    pub s3: S3Config,
    pub ingest: IngestSettings,
    pub relay: RelaySettings,
    pub vault: VaultSettings,
    /// Which instance's relay and vault loader write (the others stand by).
    pub lease: LeaseConfig,
}

/// Limits of `POST /v1/orders` (documented in the OpenAPI spec).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct IngestSettings {
    /// Largest accepted request body; larger ones get 413 before being read.
    pub max_body_bytes: usize,
    /// Most orders in one request.
    pub max_batch: usize,
    /// How far `created_at` may lie in the future.
    pub max_future_skew_secs: i64,
    /// Requests per second per API key without its own rate; unset is unlimited.
    pub default_rate_per_second: Option<u32>,
    /// How long an API-key lookup is trusted (a revoked key works this long).
    #[serde(with = "millis")]
    pub auth_cache_ttl: Duration,
    /// Requests of one order share commits (see `group`).
    pub group_commit: GroupCommitSettings,
}

/// Group commit of single-order requests.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct GroupCommitSettings {
    /// Off: each single-order request commits alone.
    pub enabled: bool,
    /// Most orders in one group.
    pub max_orders: usize,
    /// Most groups committing at once (each holds a connection of the groups'
    /// own pool, which has this many besides `postgres.max_connections`). One
    /// makes the largest groups, the fewest commits: at 32 connections with
    /// durable commits `bench ingest` measured 16.9–18.9k orders/s with one
    /// against 16.3–16.5k with two and 15.0k with three, the same morning.
    pub in_flight: usize,
    /// How long a group waits for more orders once it has one; 0 takes only
    /// those already waiting.
    #[serde(with = "millis")]
    pub window: Duration,
}

impl Default for GroupCommitSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            max_orders: 500,
            in_flight: 1,
            window: Duration::ZERO,
        }
    }
}

impl Default for IngestSettings {
    fn default() -> Self {
        Self {
            max_body_bytes: 10 * 1024 * 1024,
            max_batch: 10_000,
            max_future_skew_secs: 300,
            default_rate_per_second: None,
            auth_cache_ttl: Duration::from_secs(5),
            group_commit: GroupCommitSettings::default(),
        }
    }
}

/// The lake relay: orders log → raw JSON Lines in S3.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RelaySettings {
    /// Run the relay inside this process (one relay runs at a time per database;
    /// others wait on an advisory lock).
    pub enabled: bool,
    /// Most rows per raw file batch.
    pub batch_size: i64,
    /// Pause between polls when the log is idle.
    #[serde(with = "millis")]
    pub poll_interval: Duration,
    /// Longest pause between retries when S3 or Postgres fail.
    #[serde(with = "millis")]
    pub max_backoff: Duration,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            enabled: true,
            batch_size: 5_000,
            poll_interval: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
        }
    }
}

/// The vault loader: the log → the Data Vault 2.0 warehouse in Postgres.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct VaultSettings {
    /// Run the loader inside this process (loaders take turns on the cursor's
    /// row lock, so a second one only waits).
    pub enabled: bool,
    /// Most log rows per load (one transaction).
    pub batch_size: i64,
    /// Pause between polls when the log is idle.
    #[serde(with = "millis")]
    pub poll_interval: Duration,
    /// Longest pause between retries when Postgres fails.
    #[serde(with = "millis")]
    pub max_backoff: Duration,
    /// `/readyz` advises (`vault`) when the oldest row not loaded is older.
    #[serde(with = "millis")]
    pub max_lag: Duration,
}

impl Default for VaultSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            batch_size: 5_000,
            poll_interval: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            max_lag: Duration::from_secs(60),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http: HttpConfig::on_port(8081),
            telemetry: TelemetryConfig::default(),
            postgres: PostgresConfig::default(),
            s3: S3Config::default(),
            ingest: IngestSettings::default(),
            relay: RelaySettings::default(),
            vault: VaultSettings::default(),
            lease: LeaseConfig::default(),
        }
    }
}

impl Validate for Config {
    fn validate(&self, problems: &mut Vec<String>) {
        self.http.validate(problems);
        self.telemetry.validate(problems);
        self.postgres.validate(problems);
        self.s3.validate(problems);
        self.lease.validate(problems);
        if self.ingest.max_batch == 0 || self.ingest.max_body_bytes == 0 {
            problems.push("ingest.max_batch and ingest.max_body_bytes must be positive".into());
        }
        let group = &self.ingest.group_commit;
        if group.enabled && (group.max_orders == 0 || group.in_flight == 0) {
            problems.push(
                "ingest.group_commit.max_orders and ingest.group_commit.in_flight must be positive"
                    .into(),
            );
        }
        if self.relay.batch_size <= 0 {
            problems.push("relay.batch_size must be positive".into());
        }
        if self.vault.batch_size <= 0 {
            problems.push("vault.batch_size must be positive".into());
        }
    }
}
