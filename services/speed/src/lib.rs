//! Speed layer: tails the orders log and keeps real-time revenue per epoch, time
//! bucket and dimension in Redis, exactly once (see [`consumer`]).

pub mod config;
pub mod consumer;

use std::sync::Arc;

use axum::Router;
use tidemark_platform::health::Readiness;
use tidemark_platform::lease::Lease;
use tidemark_platform::redis::Redis;
use tidemark_platform::{http, postgres};
use tidemark_speedview::SpeedView;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use consumer::Consumer;

/// Runs the consumer and the operational endpoints until `shutdown` is cancelled.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let pool = postgres::pool(&config.postgres, "tidemark-speed")?;
    if config.postgres.migrate {
        postgres::migrate(&pool).await?;
    }
    let redis = Arc::new(Redis::new(&config.redis)?);
    let lease = Lease::new(pool.clone(), "speed", &config.lease);
    let consumer = Consumer::new(
        pool.clone(),
        SpeedView::new(redis.clone()),
        config.speed.clone(),
        lease.clone(),
    );
    let max_lag = config.speed.max_lag_secs;
    let readiness = Readiness::new()
        .with("postgres", {
            let pool = pool.clone();
            move || postgres::check(pool.clone())
        })
        .with("redis", {
            let redis = redis.clone();
            move || {
                let redis = redis.clone();
                async move { redis.check().await }
            }
        })
        .with("log", consumer.status().probe())
        .lease(&lease)
        .with("lag", {
            let consumer = consumer.clone();
            move || {
                let lag = consumer.lag_seconds();
                async move {
                    if lag <= max_lag {
                        Ok(())
                    } else {
                        Err(format!("consumer is {lag:.1} s behind the log"))
                    }
                }
            }
        });
    let token = shutdown.child_token();
    let leasing = tokio::spawn(lease.run(token.clone()));
    let task = tokio::spawn(consumer.run(token.clone()));
    let router = http::finish(Router::new(), readiness, &config.http);
    let served = http::serve(listener, router, shutdown, config.http.shutdown_grace).await;
    token.cancel();
    task.await?;
    // The lease is released after the last step: a standby takes over from there.
    leasing.await?;
    served?;
    Ok(())
}
