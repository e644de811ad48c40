//! Redis: a connection manager that connects on first use and reconnects by itself,
//! to `redis.url` or — with `redis.sentinels` — to the primary the sentinels name,
//! following a failover.

use std::time::{Duration, Instant};

use redis::IntoConnectionInfo;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use secrecy::ExposeSecret;
use tokio::sync::{Mutex, OnceCell};

use crate::config::RedisConfig;

/// How often the sentinels are asked again which server is the primary.
const RECHECK: Duration = Duration::from_secs(1);

/// A Redis client scoped to this deployment's key prefix.
pub struct Redis {
    target: Target,
    config: RedisConfig,
}

enum Target {
    Direct {
        client: redis::Client,
        manager: OnceCell<ConnectionManager>,
    },
    Sentinel(Mutex<Followed>),
}

/// The sentinels, and the primary they last named.
struct Followed {
    sentinels: SentinelClient,
    primary: Option<Primary>,
}

struct Primary {
    addr: String,
    manager: ConnectionManager,
    checked: Instant,
}

impl Redis {
    pub fn new(config: &RedisConfig) -> Result<Self, redis::RedisError> {
        let sentinels = config.sentinel_urls();
        let target = if sentinels.is_empty() {
            Target::Direct {
                client: redis::Client::open(config.url.expose_secret())?,
                manager: OnceCell::new(),
            }
        } else {
            // The primary the Sentinels name is reached with `url`'s credentials
            // (user, password, database); each Sentinel with its own URL's.
            let primary = config.url.expose_secret().into_connection_info()?;
            let node = SentinelNodeConnectionInfo::default()
                .set_redis_connection_info(primary.redis_settings().clone());
            Target::Sentinel(Mutex::new(Followed {
                sentinels: SentinelClient::build(
                    sentinels,
                    config.sentinel_master.clone(),
                    Some(node),
                    SentinelServerType::Master,
                )?,
                primary: None,
            }))
        };
        Ok(Self {
            target,
            config: config.clone(),
        })
    }

    fn settings(&self) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.config.timeout))
            .set_response_timeout(Some(self.config.timeout))
            .set_number_of_retries(2)
    }

    /// A multiplexed connection; the first call connects. With sentinels, the
    /// primary is looked up again once `RECHECK` has passed since the last look: a
    /// promoted replica is followed within about a second of the sentinels naming
    /// it (while they have not, the old primary's errors reach the caller, who backs
    /// off or answers 503 / partial).
    pub async fn conn(&self) -> Result<ConnectionManager, redis::RedisError> {
        match &self.target {
            Target::Direct { client, manager } => manager
                .get_or_try_init(|| {
                    ConnectionManager::new_with_config(client.clone(), self.settings())
                })
                .await
                .cloned(),
            Target::Sentinel(followed) => {
                let mut followed = followed.lock().await;
                if let Some(primary) = &followed.primary
                    && primary.checked.elapsed() < RECHECK
                {
                    return Ok(primary.manager.clone());
                }
                let client = match followed.sentinels.async_get_client().await {
                    Ok(client) => client,
                    Err(e) => {
                        // The sentinels are unreachable (or name no reachable
                        // primary): keep the last one, look again later.
                        let Some(primary) = followed.primary.as_mut() else {
                            return Err(e);
                        };
                        primary.checked = Instant::now();
                        return Ok(primary.manager.clone());
                    }
                };
                let addr = client.get_connection_info().addr().to_string();
                if let Some(primary) = followed.primary.as_mut()
                    && primary.addr == addr
                {
                    primary.checked = Instant::now();
                    return Ok(primary.manager.clone());
                }
                let manager = ConnectionManager::new_with_config(client, self.settings()).await?;
                match &followed.primary {
                    Some(old) => {
                        tracing::warn!(from = %old.addr, to = %addr, "Following the new Redis primary");
                    }
                    None => {
                        tracing::info!(primary = %addr, "Redis primary named by the sentinels");
                    }
                }
                metrics::counter!("redis_primary_changes_total").increment(1);
                followed.primary = Some(Primary {
                    addr,
                    manager: manager.clone(),
                    checked: Instant::now(),
                });
                Ok(manager)
            }
        }
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
