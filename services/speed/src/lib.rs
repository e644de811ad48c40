//! Speed layer: tails the orders log and keeps real-time revenue per epoch, time
//! bucket and dimension in Redis, exactly once (see [`consumer`]).

pub mod config;
pub mod consumer;

use std::sync::Arc;

use axum::Router;
use tidemark_platform::health::Readiness;
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
    let consumer = Consumer::new(
        pool.clone(),
        SpeedView::new(redis.clone()),
        config.speed.clone(),
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
    let task = tokio::spawn(consumer.run(token.clone()));
    let router = http::finish(Router::new(), readiness, &config.http);
    let served = http::serve(listener, router, shutdown, config.http.shutdown_grace).await;
    token.cancel();
    task.await?;
    served?;
    Ok(())
}
