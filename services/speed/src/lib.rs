//! Speed layer: tails the orders log and keeps real-time revenue per time bucket in
//! Redis, exactly once.

pub mod config;

use std::sync::Arc;

use axum::Router;
use tidemark_platform::health::Readiness;
use tidemark_platform::redis::Redis;
use tidemark_platform::{http, postgres};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Runs the service on `listener` until `shutdown` is cancelled.
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
        });
    let router = http::finish(Router::new(), readiness, &config.http);
    http::serve(listener, router, shutdown, config.http.shutdown_grace).await?;
    Ok(())
}
