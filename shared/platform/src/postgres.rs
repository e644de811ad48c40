//! Postgres: the source of truth and the log. A lazily connecting pool, the
//! embedded migrations, and the rule for which errors mean "unavailable".

use secrecy::ExposeSecret;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::config::PostgresConfig;

/// The migrations in `migrations/postgres`, embedded at build time.
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations/postgres");

/// A pool that connects on first use, so a service starts (and reports not-ready)
/// while Postgres is down.
pub fn pool(config: &PostgresConfig, application_name: &str) -> Result<PgPool, sqlx::Error> {
    pool_with(config, application_name, config.max_connections, &[])
}

/// [`pool`] with at most `max_connections` and further session settings.
pub fn pool_with(
    config: &PostgresConfig,
    application_name: &str,
    max_connections: u32,
    settings: &[(&str, &str)],
) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = config.url.expose_secret().parse()?;
    // A transaction of ours left idle (a stuck client, a bug) would hold back the
    // log horizon of every consumer in the cluster; Postgres ends it instead.
    // No JIT: every statement of ours is short, and with stale statistics the
    // planner's estimates cross `jit_above_cost` and each execution spends hundreds
    // of milliseconds compiling (measured: the log tail of 5,000 rows took 454 ms,
    // 304 ms of it JIT, under a 10,000 orders/s stream).
    let options = options
        .application_name(application_name)
        .options([
            ("idle_in_transaction_session_timeout", "60s"),
            ("jit", "off"),
        ])
        .options(settings.iter().copied());
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(config.acquire_timeout)
        // No ping before each use: it doubles the round trips of a single insert.
        // A connection broken by a Postgres restart fails one query (503, retried by
        // the client) and is then discarded.
        .test_before_acquire(false)
        .connect_lazy_with(options))
}

/// Applies pending migrations; a no-op when all are applied.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Readiness: one round trip.
pub async fn check(pool: PgPool) -> Result<(), String> {
    sqlx::query("SELECT 1")
        .execute(&pool)
        .await
        .map(drop)
        .map_err(|e| {
            tracing::debug!(error = %e, "Postgres readiness check failed");
            classify(&e).to_owned()
        })
}

/// True when the error means Postgres is unreachable or refusing work right now
/// (answer 503 + Retry-After), rather than a bug or a constraint (answer 4xx/500).
pub fn is_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 53: insufficient resources;
            // 57P0x: shutting down / cannot connect now; 40001/40P01: retryable.
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P")
                || code == "40001"
                || code == "40P01"
        }),
        _ => false,
    }
}

/// A short, safe description of an error for readiness reports.
pub fn classify(err: &sqlx::Error) -> &'static str {
    match err {
        sqlx::Error::PoolTimedOut => "timed out waiting for a connection",
        sqlx::Error::Io(_) => "unreachable",
        e if is_unavailable(e) => "unavailable",
        _ => "error",
    }
}
