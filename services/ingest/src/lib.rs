//! Ingest: `POST /v1/orders` commits orders to Postgres, the log, and answers only
//! after the commit; the lake relay lands them as raw JSON Lines in S3.
//!
//! Readiness depends on Postgres only: while S3 is down the relay waits and retries,
//! and ingest keeps accepting orders. A relay stopped at a row it cannot decode is
//! reported on `/readyz` as an advisory (`relay`), without taking intake down.
//!
//! Several ingest instances may serve behind a load balancer: each runs a relay
//! and a vault loader, and the `lake-relay` and `vault` leases decide whose write
//! (`/readyz` shows where this instance stands).

pub mod adjust;
mod adjust_api;
pub mod api;
pub mod config;
mod customers;
pub mod decode;
pub mod fx;
pub mod group;
pub mod relay;
pub mod store;
pub mod vault;

use tidemark_platform::auth::{AuthConfig, Authenticator};
use tidemark_platform::health::Readiness;
use tidemark_platform::lease::Lease;
use tidemark_platform::{http, postgres, s3};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Runs the API (and, when enabled, the lake relay) until `shutdown` is cancelled.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let pool = postgres::pool(&config.postgres, "tidemark-ingest")?;
    if config.postgres.migrate {
        postgres::migrate(&pool).await?;
    }
    let mut readiness = Readiness::new().with("postgres", {
        let pool = pool.clone();
        move || postgres::check(pool.clone())
    });
    // Each background writer with its lease; both stop (the lease released last)
    // after the server has drained.
    let mut writers = Vec::new();
    if config.relay.enabled {
        let client = s3::client(&config.s3).await;
        let lease = Lease::new(pool.clone(), relay::CONSUMER, &config.lease);
        let relay = relay::Relay::new(
            pool.clone(),
            client,
            config.s3.clone(),
            config.relay.clone(),
            lease.clone(),
        );
        readiness = readiness
            .advise("relay", relay.status().probe())
            .lease(&lease);
        let token = shutdown.child_token();
        writers.push((
            tokio::spawn(relay.run(token.clone())),
            tokio::spawn(lease.run(token.clone())),
            token,
        ));
    }
    if config.vault.enabled {
        let lease = Lease::new(pool.clone(), vault::CONSUMER, &config.lease);
        let loader = vault::Loader::new(pool.clone(), config.vault.clone(), lease.clone());
        let (pool, max_lag) = (pool.clone(), config.vault.max_lag);
        readiness = readiness
            .advise("vault", move || {
                let pool = pool.clone();
                async move { vault::lag_check(&pool, max_lag).await }
            })
            .lease(&lease);
        let token = shutdown.child_token();
        writers.push((
            tokio::spawn(loader.run(token.clone())),
            tokio::spawn(lease.run(token.clone())),
            token,
        ));
    }

    let auth = Authenticator::new(
        pool.clone(),
        AuthConfig {
            cache_ttl: config.ingest.auth_cache_ttl,
            default_rate_per_second: config.ingest.default_rate_per_second,
        },
    );
    let groups = if config.ingest.group_commit.enabled {
        let token = shutdown.child_token();
        let (groups, task) = group::GroupCommit::start(
            group::pool(&config.postgres, &config.ingest.group_commit)?,
            config.ingest.group_commit.clone(),
            token.clone(),
        );
        Some((groups, task, token))
    } else {
        None
    };
    let state = api::AppState {
        pool,
        settings: config.ingest.clone(),
        groups: groups.as_ref().map(|(groups, _, _)| groups.clone()),
    };
    let router = http::finish(api::router(state, auth), readiness, &config.http);
    let served = http::serve(listener, router, shutdown, config.http.shutdown_grace).await;
    // Orders handed to a group before the server stopped still commit.
    if let Some((_, task, token)) = groups {
        token.cancel();
        task.await?;
    }
    for (task, leasing, token) in writers {
        token.cancel();
        task.await?;
        leasing.await?;
    }
    served?;
    Ok(())
}
