//! Serving: REST and GraphQL over the exact merge of the batch view (ClickHouse)
//! and the speed view (Redis), plus order history from Postgres (see [`views`]).

pub mod answers;
mod bounded;
pub mod buyers;
pub mod compute;
pub mod config;
pub mod fields;
pub mod fx;
pub mod graphql;
pub mod history;
pub mod local;
pub mod page;
pub mod query;
pub mod residence;
pub mod rest;
pub mod unfolding;
pub mod views;

use std::sync::Arc;

use axum::middleware;
use sqlx::PgPool;
use tidemark_platform::auth::{self, AuthConfig, Authenticator, Scope};
use tidemark_platform::health::Readiness;
use tidemark_platform::redis::Redis;
use tidemark_platform::{clickhouse, http, postgres};
use tidemark_speedview::SpeedView;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;
use config::ServingSettings;

/// What every handler shares.
pub struct AppState {
    pub pool: PgPool,
    pub views: views::Views,
    pub settings: ServingSettings,
    /// Finished REST answers (see [`answers`]).
    pub answers: Arc<answers::Answers<tidemark_platform::problem::Problem>>,
    /// REST revenue questions validated, by query string (see [`rest::Asked`]).
    questions: bounded::Bounded<String, rest::Asked>,
}

/// Runs the APIs until `shutdown` is cancelled.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let pool = postgres::pool(&config.postgres, "tidemark-serving")?;
    if config.postgres.migrate {
        postgres::migrate(&pool).await?;
    }
    if config.clickhouse.migrate {
        clickhouse::migrate(&config.clickhouse).await?;
    }
    let redis = Arc::new(Redis::new(&config.redis)?);
    let ch = clickhouse::client(&config.clickhouse);
    let settings = config.serving.clone();
    let computing = Arc::new(compute::Computing::new(
        settings.compute_threads,
        settings.compute_niceness,
    )?);
    let batch_reads = ch.clone().with_setting(
        "max_memory_usage",
        settings.clickhouse_max_memory_bytes.to_string(),
    );
    let state = Arc::new(AppState {
        pool: pool.clone(),
        views: views::Views::new(
            pool.clone(),
            batch_reads,
            [
                SpeedView::new(redis.clone()),
                SpeedView::new(Arc::new(Redis::new(&config.redis)?)),
            ],
            &settings,
            computing.clone(),
            // One server: see `unfolding`.
            (!config.clickhouse.sharded())
                .then(|| unfolding::Unfolding::new(ch.clone(), pool.clone())),
        ),
        settings: settings.clone(),
        answers: Arc::new(
            answers::Answers::new(
                settings.cache_entries,
                settings.cache_bytes,
                settings.max_stale,
                settings.revalidate_within,
                settings.recent_within,
            )
            .compressing(computing.clone()),
        ),
        questions: bounded::Bounded::new(settings.cache_entries, settings.cache_bytes),
    });
    let auth = Authenticator::new(
        pool.clone(),
        AuthConfig {
            cache_ttl: settings.auth_cache_ttl,
            default_rate_per_second: settings.default_rate_per_second,
        },
    );
    let schema = graphql::schema(state.clone(), &settings);
    let api = rest::router()
        .merge(graphql::router(
            schema.clone(),
            &settings,
            state.views.computing().clone(),
        ))
        .route_layer(middleware::from_fn_with_state(
            (auth.clone(), Scope::Read),
            auth::require,
        ))
        .merge(graphql::subscriptions(schema, auth))
        .merge(graphql::graphiql())
        .merge(page::router())
        .with_state(state)
        .merge(rest::swagger());
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
        .with("clickhouse", move || clickhouse::check(ch.clone()));
    let router = http::finish(api, readiness, &config.http);
    http::serve(listener, router, shutdown, config.http.shutdown_grace).await?;
    Ok(())
}
