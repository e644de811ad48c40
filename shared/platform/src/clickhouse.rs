//! ClickHouse: the batch view's store. A client configured for ClickHouse 18.16 as
//! well as current releases, and a runner for `migrations/clickhouse`.
//!
//! Compatibility rules (18.16 is the tested server): no `DateTime64`, no
//! `LowCardinality`, no server-side `{x:Type}` parameters (bind with `?`), and the
//! client's schema validation off (it sends a setting 18.16 rejects).

use secrecy::ExposeSecret;
use serde::Deserialize;

use crate::config::ClickHouseConfig;

/// `(version, file name, SQL)` of every migration, embedded by `build.rs`.
pub const MIGRATIONS: &[(u32, &str, &str)] =
    include!(concat!(env!("OUT_DIR"), "/clickhouse_migrations.rs"));

/// A client for the configured database.
pub fn client(config: &ClickHouseConfig) -> clickhouse::Client {
    server_client(config).with_database(&config.database)
}

/// A client with no default database (to create it).
fn server_client(config: &ClickHouseConfig) -> clickhouse::Client {
    clickhouse::Client::default()
        .with_url(&config.url)
        .with_user(&config.user)
        .with_password(config.password.expose_secret())
        .with_validation(false)
}

#[derive(clickhouse::Row, Deserialize)]
struct Applied {
    version: u32,
}

/// Creates the database if needed and applies every migration not yet recorded.
/// Each migration is one statement written to be idempotent (or an `ADD COLUMN`
/// that fails whole when its columns exist); returns the versions applied by this
/// call.
pub async fn migrate(config: &ClickHouseConfig) -> Result<Vec<u32>, clickhouse::error::Error> {
    // The name is validated by the config: letters, digits and underscores.
    server_client(config)
        .query(&format!(
            "CREATE DATABASE IF NOT EXISTS {}",
            config.database
        ))
        .execute()
        .await?;
    let db = client(config);
    db.query(
        "CREATE TABLE IF NOT EXISTS schema_migrations \
         (version UInt32, name String, applied_at DateTime) \
         ENGINE = MergeTree ORDER BY version",
    )
    .execute()
    .await?;
    let applied: Vec<u32> = db
        .query("SELECT version FROM schema_migrations")
        .fetch_all::<Applied>()
        .await?
        .into_iter()
        .map(|a| a.version)
        .collect();
    let mut now_applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tracing::info!(version, name, "Applying ClickHouse migration");
        match db.query(sql.trim().trim_end_matches(';')).execute().await {
            // An `ALTER … ADD COLUMN` whose columns exist was applied before its
            // record was written (18.16 has no `IF NOT EXISTS` for columns; one
            // statement adds all its columns or none).
            Err(clickhouse::error::Error::BadResponse(reason))
                if reason.contains("column with this name already exists") =>
            {
                tracing::info!(version, name, "Migration found applied");
            }
            result => result?,
        }
        db.query("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, now())")
            .bind(version)
            .bind(name)
            .execute()
            .await?;
        now_applied.push(*version);
    }
    Ok(now_applied)
}

/// Readiness: `SELECT 1`.
pub async fn check(client: clickhouse::Client) -> Result<(), String> {
    client
        .query("SELECT 1")
        .fetch_one::<u8>()
        .await
        .map(drop)
        .map_err(|e| {
            tracing::debug!(error = %e, "ClickHouse readiness check failed");
            "unavailable".to_owned()
        })
}
