//! The verifier's settings: the stores it reads, and the serving API it asks.

use secrecy::SecretString;
use serde::Deserialize;
use tidemark_platform::config::{
    ClickHouseConfig, PostgresConfig, S3Config, TelemetryConfig, Validate,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    pub telemetry: TelemetryConfig,
    pub postgres: PostgresConfig,
    pub clickhouse: ClickHouseConfig,
    pub s3: S3Config,
    pub verify: VerifySettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct VerifySettings {
    /// The serving API's base URL, e.g. `http://127.0.0.1:8082`.
    pub serving_url: String,
    /// An API key with the `read` scope (secret; never printed).
    pub read_key: Option<SecretString>,
    /// How many recent days of served totals to compare.
    pub days: i64,
    /// How many random questions of the query model to reconcile.
    pub questions: usize,
    /// The seed of those questions (default: the time), to repeat a run.
    pub seed: Option<u64>,
}

impl Default for VerifySettings {
    fn default() -> Self {
        Self {
            serving_url: "http://127.0.0.1:8082".into(),
            read_key: None,
            days: 3,
            questions: 24,
            seed: None,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            telemetry: TelemetryConfig::default(),
            postgres: PostgresConfig {
                migrate: false,
                ..PostgresConfig::default()
            },
            clickhouse: ClickHouseConfig {
                migrate: false,
                ..ClickHouseConfig::default()
            },
            s3: S3Config::default(),
            verify: VerifySettings::default(),
        }
    }
}

impl Validate for Config {
    fn validate(&self, problems: &mut Vec<String>) {
        self.telemetry.validate(problems);
        self.postgres.validate(problems);
        self.clickhouse.validate(problems);
        self.s3.validate(problems);
        if self.verify.read_key.is_none() {
            problems.push("verify.read_key (TIDEMARK_VERIFY__READ_KEY) is required".into());
        }
        if !(1..=31).contains(&self.verify.days) {
            problems.push("verify.days must be between 1 and 31".into());
        }
    }
}
