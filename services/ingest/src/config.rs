//! The ingest service's settings.

use serde::Deserialize;
use tidemark_platform::config::{HttpConfig, PostgresConfig, S3Config, TelemetryConfig, Validate};

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    pub http: HttpConfig,
    pub telemetry: TelemetryConfig,
    pub postgres: PostgresConfig,
    pub s3: S3Config,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http: HttpConfig::on_port(8081),
            telemetry: TelemetryConfig::default(),
            postgres: PostgresConfig::default(),
            s3: S3Config::default(),
        }
    }
}

impl Validate for Config {
    fn validate(&self, problems: &mut Vec<String>) {
        self.http.validate(problems);
        self.telemetry.validate(problems);
        self.postgres.validate(problems);
        self.s3.validate(problems);
    }
}
