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
    let compression = if config.compresses() {
        clickhouse::Compression::Lz4
    } else {
        clickhouse::Compression::None
    };
    clickhouse::Client::with_http_client(client)
        .with_url(&config.url)
        .with_user(&config.user)
        .with_password(config.password.expose_secret())
        .with_validation(false)
        .with_compression(compression)
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

/// For each shard, a client per replica besides its writer, on the local
/// database (none unreplicated): where a run's attached partitions must have
/// arrived before it is published.
pub fn replica_clients(config: &ClickHouseConfig) -> Vec<Vec<clickhouse::Client>> {
    config
        .replica_configs()
        .iter()
        .map(|replicas| replicas[1..].iter().map(client).collect())
        .collect()
}

/// The engine clause (`ENGINE = …` to the end) with which the migrations create
/// `table`, unreplicated: the shape of a staging table whose partitions can be
/// attached to it.
pub fn engine_of(table: &str) -> Option<&'static str> {
    let create = format!("CREATE TABLE IF NOT EXISTS {table}\n");
    MIGRATIONS
        .iter()
        .find(|(_, _, sql)| sql.contains(&create))
        .and_then(|(_, _, sql)| sql.find("ENGINE = ").map(|at| sql[at..].trim()))
        .map(|engine| engine.trim_end_matches(';'))
}

/// The writer (first replica) of each shard of `cluster` as `host:port`, in shard
/// order, as the server behind `client` knows them: the addresses of a
/// `remote(…)` reading a table that only the writers hold (a run's staging).
pub async fn writers(
    client: &clickhouse::Client,
    cluster: &str,
) -> Result<Vec<String>, clickhouse::error::Error> {
    client
        .query(
            "SELECT concat(host_address, ':', toString(port)) FROM system.clusters \
             WHERE cluster = ? AND replica_num = 1 ORDER BY shard_num",
        )
        .bind(cluster)
        .fetch_all()
        .await
}

/// The tables readers query; sharded, each is a `Distributed` table over the
/// shards' local tables.
pub const DISTRIBUTED_TABLES: [&str; 2] = ["revenue_agg", "buyers"];

/// The tables of the batch view, in each shard's local database.
pub const LOCAL_TABLES: [&str; 3] = ["revenue_agg", "buyers", "batch_publications"];

/// Applies the migrations (see [`migrate_server`]) — on every shard's writer when
/// the batch view is sharded, creating each further replica's tables like its
/// writer's — and then creates the `Distributed` tables readers query, on every
/// server of the cluster (readers may ask any). Returns the versions applied by
/// this call (on any shard).
pub async fn migrate(config: &ClickHouseConfig) -> Result<Vec<u32>, clickhouse::error::Error> {
    if !config.sharded() {
        return migrate_server(config).await;
    }
    let replicated = config.replicated();
    let mut applied = Vec::new();
    for replicas in config.replica_configs() {
        let (writer, others) = replicas.split_first().expect("a shard has a server");
        for version in migrate_with(writer, replicated).await? {
            if !applied.contains(&version) {
                applied.push(version);
            }
        }
        for replica in others {
            create_replica(writer, replica).await?;
        }
    }
    let mut servers = vec![config.url.as_str()];
    for url in config.replica_urls().into_iter().flatten() {
        if !servers.contains(&url) {
            servers.push(url);
        }
    }
    distribute(config, &servers).await?;
    Ok(applied)
}

/// Creates on `replica` each of [`LOCAL_TABLES`] it lacks, as `writer` has it
/// (`SHOW CREATE TABLE`, its engine naming its ZooKeeper path by the `{shard}`
/// macro and itself by `{replica}`): a new replica of a table created and altered
/// before it joined starts with the table's present columns, and fetches its
/// parts from the others.
async fn create_replica(
    writer: &ClickHouseConfig,
    replica: &ClickHouseConfig,
) -> Result<(), clickhouse::error::Error> {
    server_client(replica)
        .query(&format!(
            "CREATE DATABASE IF NOT EXISTS {}",
            replica.database
        ))
        .execute()
        .await?;
    let (from, to) = (client(writer), client(replica));
    for table in LOCAL_TABLES {
        let exists: u8 = to
            .query("SELECT count() FROM system.tables WHERE database = ? AND name = ?")
            .bind(&replica.database)
            .bind(table)
            .fetch_one()
            .await?;
        if exists > 0 {
            continue;
        }
        let create: String = from
            .query(&format!("SHOW CREATE TABLE {table}"))
            .fetch_one()
            .await?;
        tracing::info!(table, replica = %replica.url, "Creating a replica's table");
        to.query(&create).execute().await?;
    }
    Ok(())
}

/// `sql` (a migration) with each `…MergeTree` engine it creates made a
/// `Replicated…MergeTree` whose path in ZooKeeper is
/// `/clickhouse/tables/{shard}/<database>/<table>` and whose replica is named by
/// the server's `{replica}` macro. Other statements (`ALTER`s, replicated by
/// ClickHouse itself) are unchanged.
pub fn replicated(sql: &str, database: &str) -> String {
    // Past the leading comment lines.
    let mut code = 0;
    for line in sql.split_inclusive('\n') {
        if !(line.trim().is_empty() || line.trim_start().starts_with("--")) {
            break;
        }
        code += line.len();
    }
    let Some(rest) = sql[code..]
        .trim_start()
        .strip_prefix("CREATE TABLE IF NOT EXISTS ")
    else {
        return sql.to_owned();
    };
    let table: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    let Some(at) = sql[code..].find("ENGINE = ").map(|at| at + code) else {
        return sql.to_owned();
    };
    let engine_at = at + "ENGINE = ".len();
    let engine: String = sql[engine_at..]
        .chars()
        .take_while(char::is_ascii_alphanumeric)
        .collect();
    if !engine.ends_with("MergeTree") || engine.starts_with("Replicated") {
        return sql.to_owned();
    }
    let after = &sql[engine_at + engine.len()..];
    let path = format!("'/clickhouse/tables/{{shard}}/{database}/{table}', '{{replica}}'");
    let engine = match (after.strip_prefix("()"), after.strip_prefix('(')) {
        (Some(tail), _) => format!("Replicated{engine}({path}){tail}"),
        (None, Some(args)) => format!("Replicated{engine}({path}, {args}"),
        (None, None) => format!("Replicated{engine}({path}){after}"),
    };
    format!("{}ENGINE = {engine}", &sql[..at])
}

/// Creates `database` on each of `servers` (URLs) with a `Distributed` table over
/// the shards' local tables for each of [`DISTRIBUTED_TABLES`], and re-creates
/// one whose columns no longer match the local table's (a migration changed
/// them; a `Distributed` table is only metadata).
async fn distribute(
    config: &ClickHouseConfig,
    servers: &[&str],
) -> Result<(), clickhouse::error::Error> {
    // Names are validated by the config: letters, digits and underscores.
    let (database, local) = (&config.database, config.local_database());
    // The first shard's local tables (a server needs not be a shard itself).
    let shard = server_client(&config.shard_configs()[0]);
    let mut wanted = Vec::new();
    for table in DISTRIBUTED_TABLES {
        wanted.push((table, columns(&shard, &local, table).await?));
    }
    for url in servers {
        let server = server_client(&ClickHouseConfig {
            url: (*url).to_owned(),
            ..config.clone()
        });
        server
            .query(&format!("CREATE DATABASE IF NOT EXISTS {database}"))
            .execute()
            .await?;
        for (table, wanted) in &wanted {
            let have = columns(&server, database, table).await?;
            if &have == wanted {
                continue;
            }
            if !have.is_empty() {
                tracing::info!(
                    table,
                    url,
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
    migrate_with(config, false).await
}

/// [`migrate_server`], the tables created [`replicated`] if asked.
async fn migrate_with(
    config: &ClickHouseConfig,
    replicate: bool,
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
        let sql = sql.trim().trim_end_matches(';');
        let sql = if replicate {
            replicated(sql, &config.database)
        } else {
            sql.to_owned()
        };
        match db.query(&sql).execute().await {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tables_staged_have_their_engine_from_the_migrations() {
        for table in ["revenue_agg", "buyers"] {
            let engine = engine_of(table).unwrap();
            assert!(
                engine.starts_with("ENGINE = ReplacingMergeTree"),
                "{engine}"
            );
            assert!(engine.contains("PARTITION BY toYYYYMM(bucket)"), "{engine}");
        }
        assert_eq!(engine_of("nothing"), None);
    }

    #[test]
    fn a_created_merge_tree_is_made_replicated_and_nothing_else_changes() {
        let sql = "CREATE TABLE IF NOT EXISTS buyers\n(\n    run_id UInt64\n)\n\
                   ENGINE = ReplacingMergeTree\nPARTITION BY toYYYYMM(bucket)\nORDER BY run_id";
        assert_eq!(
            replicated(sql, "t_local"),
            "CREATE TABLE IF NOT EXISTS buyers\n(\n    run_id UInt64\n)\n\
             ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/t_local/buyers', \
             '{replica}')\nPARTITION BY toYYYYMM(bucket)\nORDER BY run_id"
        );
        assert_eq!(
            replicated(
                "CREATE TABLE IF NOT EXISTS v (x UInt8) ENGINE = ReplacingMergeTree(x) ORDER BY x",
                "d"
            ),
            "CREATE TABLE IF NOT EXISTS v (x UInt8) ENGINE = ReplicatedReplacingMergeTree(\
             '/clickhouse/tables/{shard}/d/v', '{replica}', x) ORDER BY x"
        );
        assert_eq!(
            replicated(
                "CREATE TABLE IF NOT EXISTS v (x UInt8) ENGINE = MergeTree() ORDER BY x",
                "d"
            ),
            "CREATE TABLE IF NOT EXISTS v (x UInt8) ENGINE = ReplicatedMergeTree(\
             '/clickhouse/tables/{shard}/d/v', '{replica}') ORDER BY x"
        );
        for unchanged in [
            "ALTER TABLE revenue_agg ADD COLUMN x Int64 DEFAULT 0",
            "CREATE TABLE IF NOT EXISTS d (x UInt8) ENGINE = Distributed(c, db, t)",
        ] {
            assert_eq!(replicated(unchanged, "d"), unchanged);
        }
        // Every migration that creates a table creates a MergeTree the rewrite
        // recognises.
        for (_, name, sql) in MIGRATIONS {
            if sql.contains("CREATE TABLE") {
                assert!(
                    replicated(sql.trim(), "d").contains("ENGINE = Replicated"),
                    "{name}"
                );
            }
        }
    }
}
