//! The generator's settings.

use secrecy::SecretString;
use serde::Deserialize;
use tidemark_platform::config::{HttpConfig, TelemetryConfig, Validate};

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Where the generator serves its own /healthz, /readyz and /metrics.
    pub http: HttpConfig,
    pub telemetry: TelemetryConfig,
    pub target: TargetConfig,
}

/// The ingest API the generator sends to.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct TargetConfig {
    pub ingest_url: String,
    /// An API key with the `ingest` scope.
    pub api_key: Option<SecretString>,
}

impl Default for TargetConfig {
    fn default() -> Self {
        Self {
            ingest_url: "http://127.0.0.1:8081".into(),
            api_key: None,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http: HttpConfig::on_port(8085),
            telemetry: TelemetryConfig::default(),
            target: TargetConfig::default(),
        }
    }
}

impl Validate for Config {
    fn validate(&self, problems: &mut Vec<String>) {
        self.http.validate(problems);
        self.telemetry.validate(problems);
        if !self.target.ingest_url.starts_with("http") {
            problems.push("target.ingest_url must be an http(s) URL".into());
        }
    }
}
