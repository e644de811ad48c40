//! The compactor service's settings.

use serde::Deserialize;
use tidemark_platform::config::{
    ClickHouseConfig, HttpConfig, PostgresConfig, S3Config, TelemetryConfig, Validate,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    pub http: HttpConfig,
    pub telemetry: TelemetryConfig,
    pub postgres: PostgresConfig,
    pub clickhouse: ClickHouseConfig,
    pub s3: S3Config,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http: HttpConfig::on_port(8084),
            telemetry: TelemetryConfig::default(),
            postgres: PostgresConfig::default(),
            clickhouse: ClickHouseConfig::default(),
            s3: S3Config::default(),
        }
    }
}

impl Validate for Config {
    fn validate(&self, problems: &mut Vec<String>) {
        self.http.validate(problems);
        self.telemetry.validate(problems);
        self.postgres.validate(problems);
        self.clickhouse.validate(problems);
        self.s3.validate(problems);
    }
}
