//! What each service's `main` shares: the common command-line options, start-up
//! of telemetry, and binding the listener.

use std::path::PathBuf;

use serde::de::DeserializeOwned;
use tokio::net::TcpListener;

use crate::config::{self, TelemetryConfig, Validate};

/// Options every service binary takes.
#[derive(Debug, clap::Args)]
pub struct CommonArgs {
    /// A TOML file of settings, layered over the defaults and under the environment.
    #[arg(long, short, env = "TIDEMARK_CONFIG", global = true)]
    pub config: Option<PathBuf>,
}

/// Help text listing the settings shared by every service.
pub const ENV_HELP: &str = "\
Configuration: compiled defaults, then --config FILE (TOML), then environment
variables TIDEMARK_<SECTION>__<KEY>, e.g.:
  TIDEMARK_HTTP__LISTEN=127.0.0.1:8081     address to serve on
  TIDEMARK_TELEMETRY__LOG_FORMAT=json       pretty | json
  TIDEMARK_TELEMETRY__LOG_FILTER=info       tracing filter directive
  TIDEMARK_POSTGRES__URL=postgres://...     (secret; never printed)
  TIDEMARK_REDIS__URL=redis://...           TIDEMARK_REDIS__KEY_PREFIX=tidemark
  TIDEMARK_CLICKHOUSE__URL=http://...       TIDEMARK_CLICKHOUSE__DATABASE=tidemark
  TIDEMARK_S3__ENDPOINT=http://...          TIDEMARK_S3__BUCKET=tidemark
See README.md for every setting.";

/// Loads and validates the configuration, then starts logging.
pub fn load<T>(args: &CommonArgs, telemetry: impl Fn(&T) -> &TelemetryConfig) -> anyhow::Result<T>
where
    T: DeserializeOwned + Validate,
{
    let config: T = config::load(args.config.as_deref())?;
    crate::telemetry::init(telemetry(&config));
    Ok(config)
}

/// Binds the configured address.
pub async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
}
