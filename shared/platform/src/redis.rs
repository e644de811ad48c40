//! Redis: a connection manager that connects on first use and reconnects by itself.

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::ExposeSecret;
use tokio::sync::OnceCell;

use crate::config::RedisConfig;

/// A Redis client scoped to this deployment's key prefix.
pub struct Redis {
    client: redis::Client,
    manager: OnceCell<ConnectionManager>,
    config: RedisConfig,
}

impl Redis {
    pub fn new(config: &RedisConfig) -> Result<Self, redis::RedisError> {
        Ok(Self {
            client: redis::Client::open(config.url.expose_secret())?,
            manager: OnceCell::new(),
            config: config.clone(),
        })
    }

    /// A multiplexed connection; the first call connects.
    pub async fn conn(&self) -> Result<ConnectionManager, redis::RedisError> {
        self.manager
            .get_or_try_init(|| {
                let settings = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.config.timeout))
                    .set_response_timeout(Some(self.config.timeout))
                    .set_number_of_retries(2);
                ConnectionManager::new_with_config(self.client.clone(), settings)
            })
            .await
            .cloned()
    }

    /// The key prefix, without the trailing colon.
    pub fn prefix(&self) -> &str {
        &self.config.key_prefix
    }

    /// `prefix:suffix`
    pub fn key(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.config.key_prefix)
    }

    /// Readiness: PING.
    pub async fn check(&self) -> Result<(), String> {
        let mut conn = self.conn().await.map_err(|e| {
            tracing::debug!(error = %e, "Redis readiness check failed");
            "unreachable".to_owned()
        })?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(drop)
            .map_err(|e| {
                tracing::debug!(error = %e, "Redis readiness check failed");
                "unavailable".to_owned()
            })
    }
}
