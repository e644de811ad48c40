//! The generator's settings.

use secrecy::SecretString;
use serde::Deserialize;
use tidemark_platform::config::{HttpConfig, TelemetryConfig, Validate};

use crate::send::Format;

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Where the generator serves its own /healthz, /readyz and /metrics.
    pub http: HttpConfig,
    pub telemetry: TelemetryConfig,
    pub target: TargetSettings,
    /// The demo stream `serve` sends while it runs.
    pub stream: StreamSettings,
}

/// The ingest API the generator sends to.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct TargetSettings {
    pub ingest_url: String,
    /// An API key with the `ingest` scope.
    pub api_key: Option<SecretString>,
}

/// The demo stream of `serve`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct StreamSettings {
    /// Orders per second; 0 serves the endpoints without streaming.
    pub rate: f64,
    /// Orders per request (fewer at low rates, so requests stay several a second).
    pub batch: usize,
    pub format: Format,
    /// Seed of the order stream; from the clock when unset (and logged).
    pub seed: Option<u64>,
}

impl Default for TargetSettings {
    fn default() -> Self {
        Self {
            ingest_url: "http://127.0.0.1:8081".into(),
            api_key: None,
        }
    }
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            rate: 0.0,
            batch: 50,
            format: Format::Json,
            seed: None,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http: HttpConfig::on_port(8085),
            telemetry: TelemetryConfig::default(),
            target: TargetSettings::default(),
            stream: StreamSettings::default(),
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
        if !(0.0..=100_000.0).contains(&self.stream.rate) {
            problems.push("stream.rate must be between 0 and 100000 orders/s".into());
        }
        if !(1..=10_000).contains(&self.stream.batch) {
            problems.push("stream.batch must be between 1 and 10000".into());
        }
        if self.stream.rate > 0.0 && self.target.api_key.is_none() {
            problems.push("stream.rate needs target.api_key (an `ingest` key)".into());
        }
    }
}
