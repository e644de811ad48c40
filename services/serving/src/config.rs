//! The serving service's settings.

use serde::Deserialize;
use tidemark_platform::config::{
    ClickHouseConfig, HttpConfig, PostgresConfig, RedisConfig, TelemetryConfig, Validate,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    pub http: HttpConfig,
    pub telemetry: TelemetryConfig,
    pub postgres: PostgresConfig,
    pub redis: RedisConfig,
    pub clickhouse: ClickHouseConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http: HttpConfig::on_port(8082),
            telemetry: TelemetryConfig::default(),
            postgres: PostgresConfig::default(),
            redis: RedisConfig::default(),
            clickhouse: ClickHouseConfig::default(),
        }
    }
}

impl Validate for Config {
    fn validate(&self, problems: &mut Vec<String>) {
        self.http.validate(problems);
        self.telemetry.validate(problems);
        self.postgres.validate(problems);
        self.redis.validate(problems);
        self.clickhouse.validate(problems);
    }
}
