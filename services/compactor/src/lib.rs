//! Batch layer: turns the raw JSON Lines in S3 into a Parquet lake and publishes
//! exact aggregates to ClickHouse with Write-Audit-Publish (see [`run`]).

pub mod aggregate;
pub mod config;
pub mod held;
pub mod lake;
pub mod run;
mod schedule;
pub mod verify;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use tidemark_platform::health::Readiness;
use tidemark_platform::lease::Lease;
use tidemark_platform::{clickhouse, http, postgres, s3};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use run::{Compactor, Kind, Outcome};

/// Connects to the stores (applying migrations when configured).
pub async fn connect(config: &Config) -> anyhow::Result<Compactor> {
    let started = Instant::now();
    let pool = postgres::pool(&config.postgres, "tidemark-compactor")?;
    if config.postgres.migrate {
        postgres::migrate(&pool).await?;
    }
    if config.clickhouse.migrate {
        clickhouse::migrate(&config.clickhouse).await?;
    }
    tracing::info!(
        connect_ms = started.elapsed().as_millis() as u64,
        "Connected and migrated"
    );
    let ch = clickhouse::client(&config.clickhouse);
    let cluster = if config.clickhouse.sharded() {
        let writers = clickhouse::writers(&ch, &config.clickhouse.cluster).await?;
        if writers.len() != config.clickhouse.shard_urls().len() {
            anyhow::bail!(
                "ClickHouse at {} knows {} shards in the cluster `{}`, clickhouse.shards names {}",
                config.clickhouse.url,
                writers.len(),
                config.clickhouse.cluster,
                config.clickhouse.shard_urls().len()
            );
        }
        Some((writers.join(","), config.clickhouse.local_database()))
    } else {
        None
    };
    tidemark_platform::metrics::register_counter("compactor_audit_failures_total", &[]);
    tidemark_platform::metrics::register_counter("compactor_errors_total", &[]);
    Ok(Compactor {
        lease: Lease::new(pool.clone(), "compactor", &config.lease),
        pool,
        ch,
        shards: clickhouse::shard_clients(&config.clickhouse),
        replicas: clickhouse::replica_clients(&config.clickhouse),
        cluster,
        store: lake::Store::new(s3::client(&config.s3).await, config.s3.clone()),
        settings: config.compactor.clone(),
        fence: std::sync::Mutex::default(),
    })
}

/// Runs batch runs on an interval (and when enough orders have landed) until
/// `shutdown`, serving the operational endpoints meanwhile.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let compactor = Arc::new(connect(&config).await?);
    let s3 = s3::client(&config.s3).await;
    let ch = clickhouse::client(&config.clickhouse);
    let readiness = Readiness::new()
        .with("postgres", {
            let pool = compactor.pool.clone();
            move || postgres::check(pool.clone())
        })
        .with("clickhouse", move || clickhouse::check(ch.clone()))
        .with("s3", {
            let bucket = config.s3.bucket.clone();
            move || s3::check(s3.clone(), bucket.clone())
        })
        .lease(&compactor.lease);
    let token = shutdown.child_token();
    let task = tokio::spawn(schedule::schedule(compactor, token.clone()));
    let router = http::finish(Router::new(), readiness, &config.http);
    let served = http::serve(listener, router, shutdown, config.http.shutdown_grace).await;
    token.cancel();
    task.await?;
    served?;
    Ok(())
}
