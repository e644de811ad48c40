//! Ingest: `POST /v1/orders` commits orders to Postgres, the log; the lake relay
//! lands them as raw JSON Lines in S3.

pub mod config;

use axum::Router;
use tidemark_platform::health::Readiness;
use tidemark_platform::{http, postgres, s3};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Runs the service on `listener` until `shutdown` is cancelled.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let pool = postgres::pool(&config.postgres, "tidemark-ingest")?;
    if config.postgres.migrate {
        postgres::migrate(&pool).await?;
    }
    let s3 = s3::client(&config.s3).await;
    let readiness = Readiness::new()
        .with("postgres", {
            let pool = pool.clone();
            move || postgres::check(pool.clone())
        })
        .with("s3", {
            let bucket = config.s3.bucket.clone();
            move || s3::check(s3.clone(), bucket.clone())
        });
    let router = http::finish(Router::new(), readiness, &config.http);
    http::serve(listener, router, shutdown, config.http.shutdown_grace).await?;
    Ok(())
}
