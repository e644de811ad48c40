//! The speed service's settings.

use std::time::Duration;

use serde::Deserialize;
use tidemark_platform::config::{
    HttpConfig, PostgresConfig, RedisConfig, TelemetryConfig, Validate, millis,
};
use tidemark_platform::lease::LeaseConfig;

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    pub http: HttpConfig,
    pub telemetry: TelemetryConfig,
    pub postgres: PostgresConfig,
    pub redis: RedisConfig,
    pub speed: SpeedSettings,
    /// Which of several speed instances applies (the others stand by).
    pub lease: LeaseConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SpeedSettings {
    /// Most log rows applied in one atomic Redis step.
    pub batch_size: i64,
    /// Pause between polls when the log is idle.
    #[serde(with = "millis")]
    pub poll_interval: Duration,
    /// `/readyz` reports not ready while the consumer lags more than this.
    pub max_lag_secs: f64,
    /// How long a sealed epoch stays after the batch view covering it is published
    /// (readers that saw the previous publish still find it).
    #[serde(with = "millis")]
    pub epoch_grace: Duration,
    /// Longest pause between retries when Redis or Postgres fail.
    #[serde(with = "millis")]
    pub max_backoff: Duration,
}

impl Default for SpeedSettings {
    fn default() -> Self {
        Self {
            batch_size: 5_000,
            poll_interval: Duration::from_millis(20),
            max_lag_secs: 30.0,
            epoch_grace: Duration::from_secs(300),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http: HttpConfig::on_port(8083),
            telemetry: TelemetryConfig::default(),
            postgres: PostgresConfig::default(),
            redis: RedisConfig::default(),
            speed: SpeedSettings::default(),
            lease: LeaseConfig::default(),
        }
    }
}

impl Validate for Config {
    fn validate(&self, problems: &mut Vec<String>) {
        self.http.validate(problems);
        self.telemetry.validate(problems);
        self.postgres.validate(problems);
        self.redis.validate(problems);
        self.lease.validate(problems);
        if self.speed.batch_size <= 0 {
            problems.push("speed.batch_size must be positive".into());
        }
    }
}
