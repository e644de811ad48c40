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
///
/// Its connections time out (`clickhouse.timeout`): the `clickhouse` crate's own
/// HTTP client waits for ever for a server that stops answering, so this one is
/// the crate's default (keepalive 60 s, idle connections closed after 2 s, below
/// ClickHouse's 3 s) behind a connector whose every connect, read and write is
/// bounded.
fn server_client(config: &ClickHouseConfig) -> clickhouse::Client {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_keepalive(Some(std::time::Duration::from_secs(60)));
    let mut connector = hyper_timeout::TimeoutConnector::new(http);
    connector.set_connect_timeout(Some(config.timeout));
    connector.set_read_timeout(Some(config.timeout));
    connector.set_write_timeout(Some(config.timeout));
    // An INSERT writes for long before it reads: only a stalled read counts.
    connector.set_reset_reader_on_write(true);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(std::time::Duration::from_secs(2))
        .build(connector);
    clickhouse::Client::with_http_client(client)
        .with_url(&config.url)
        .with_user(&config.user)
        .with_password(config.password.expose_secret())
        .with_validation(false)
}

#[derive(clickhouse::Row, Deserialize)]
struct Applied {
    version: u32,
}

/// A client per shard, each on its local database (one client, on `url`, for a
/// single server): where the compactor writes.
pub fn shard_clients(config: &ClickHouseConfig) -> Vec<clickhouse::Client> {
    config.shard_configs().iter().map(client).collect()
}

/// The tables readers query; sharded, each is a `Distributed` table over the
/// shards' local tables.
pub const DISTRIBUTED_TABLES: [&str; 2] = ["revenue_agg", "buyers"];

/// Applies the migrations (see [`migrate_server`]) — on every shard when the batch
/// view is sharded, and then creates the `Distributed` tables readers query on
/// `url`. Returns the versions applied by this call (on any shard).
pub async fn migrate(config: &ClickHouseConfig) -> Result<Vec<u32>, clickhouse::error::Error> {
    if !config.sharded() {
        return migrate_server(config).await;
    }
    let mut applied = Vec::new();
    for shard in config.shard_configs() {
        for version in migrate_server(&shard).await? {
            if !applied.contains(&version) {
                applied.push(version);
            }
        }
    }
    distribute(config).await?;
    Ok(applied)
}

/// Creates `database` on `url` with a `Distributed` table over the shards' local
/// tables for each of [`DISTRIBUTED_TABLES`], and re-creates one whose columns
/// no longer match the local table's (a migration changed them; a `Distributed`
/// table is only metadata).
async fn distribute(config: &ClickHouseConfig) -> Result<(), clickhouse::error::Error> {
    // Names are validated by the config: letters, digits and underscores.
    let (database, local) = (&config.database, config.local_database());
    let server = server_client(config);
    server
        .query(&format!("CREATE DATABASE IF NOT EXISTS {database}"))
        .execute()
        .await?;
    // The first shard's local tables (this server needs not be a shard itself).
    let shard = server_client(&config.shard_configs()[0]);
    for table in DISTRIBUTED_TABLES {
        let wanted = columns(&shard, &local, table).await?;
        let have = columns(&server, database, table).await?;
        if have == wanted {
            continue;
        }
        if !have.is_empty() {
            tracing::info!(
                table,
                "Re-creating a Distributed table: its columns changed"
            );
            server
                .query(&format!("DROP TABLE IF EXISTS {database}.{table}"))
                .execute()
                .await?;
        }
        server
            .query(&format!(
                "CREATE TABLE IF NOT EXISTS {database}.{table} ({}) \
                 ENGINE = Distributed({}, {local}, {table})",
                wanted.join(", "),
                config.cluster
            ))
            .execute()
            .await?;
    }
    Ok(())
}

/// `name type` of each column of `database.table`, in the table's order (18.16
/// lists them so; it has no `position`), none when there is no table.
async fn columns(
    server: &clickhouse::Client,
    database: &str,
    table: &str,
) -> Result<Vec<String>, clickhouse::error::Error> {
    server
        .query(
            "SELECT concat(name, ' ', type) FROM system.columns \
             WHERE database = ? AND table = ?",
        )
        .bind(database)
        .bind(table)
        .fetch_all()
        .await
}

/// Creates the database if needed and applies every migration not yet recorded,
/// on one server. Each migration is one statement written to be idempotent (or an
/// `ADD COLUMN` that fails whole when its columns exist); returns the versions
/// applied by this call.
pub async fn migrate_server(
    config: &ClickHouseConfig,
) -> Result<Vec<u32>, clickhouse::error::Error> {
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
