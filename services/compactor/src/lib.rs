//! Batch layer: turns the raw JSON Lines in S3 into a Parquet lake and publishes
//! exact aggregates to ClickHouse with Write-Audit-Publish.

pub mod config;

use axum::Router;
use tidemark_platform::health::Readiness;
use tidemark_platform::{clickhouse, http, postgres, s3};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Runs the service on `listener` until `shutdown` is cancelled.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let pool = postgres::pool(&config.postgres, "tidemark-compactor")?;
    if config.postgres.migrate {
        postgres::migrate(&pool).await?;
    }
    if config.clickhouse.migrate {
        clickhouse::migrate(&config.clickhouse).await?;
    }
    let ch = clickhouse::client(&config.clickhouse);
    let s3 = s3::client(&config.s3).await;
    let readiness = Readiness::new()
        .with("postgres", {
            let pool = pool.clone();
            move || postgres::check(pool.clone())
        })
        .with("clickhouse", move || clickhouse::check(ch.clone()))
        .with("s3", {
            let bucket = config.s3.bucket.clone();
            move || s3::check(s3.clone(), bucket.clone())
        });
    let router = http::finish(Router::new(), readiness, &config.http);
    http::serve(listener, router, shutdown, config.http.shutdown_grace).await?;
    Ok(())
}
