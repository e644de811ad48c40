//! What one test owns on the shared servers: a Postgres database (migrated), a
//! Redis key prefix, a ClickHouse database, an S3 bucket. Names are random, so
//! tests running at once never meet.

use sqlx::PgPool;
use tidemark_platform::config::{ClickHouseConfig, PostgresConfig, RedisConfig, S3Config};
use uuid::Uuid;

use crate::stack::stack;

pub(crate) fn unique(prefix: &str) -> String {
    format!("{prefix}{}", Uuid::new_v4().simple())
}

/// A Postgres database with the migrations applied.
///
/// A database on the shared server is dropped when its test ends, unless the
/// test is failing (its data is kept to look at): a suite's 125 databases took
/// 1.2 GB, and a CI machine once ran out of disk near the suite's end.
pub struct TestDb {
    pub name: String,
    pub pool: PgPool,
    pub config: PostgresConfig,
    /// The shared server's admin URL, for a database to drop at the end.
    drop_with: Option<String>,
}

impl TestDb {
    /// The migrated database at `url` (a private server's), with a pool of 20.
    pub(crate) fn at(name: &str, url: String) -> TestDb {
        TestDb::of(
            name,
            PostgresConfig {
                url: url.into(),
                max_connections: 20,
                ..PostgresConfig::default()
            },
        )
    }

    /// The migrated database `name` that `config` reaches, on a server of the
    /// test's own (it goes away with the server).
    pub fn of(name: &str, config: PostgresConfig) -> TestDb {
        let pool = tidemark_platform::postgres::pool(&config, APPLICATION_NAME).expect("pool");
        TestDb {
            name: name.to_owned(),
            pool,
            config,
            drop_with: None,
        }
    }

    /// Closes the pool and waits until its connections have ended (seen from
    /// `observer`, a pool on the same database): a backend flushes its table
    /// statistics before it leaves `pg_stat_activity`, so from then on the
    /// database's statistics (`pg_stat_user_tables`) count only what the
    /// connections opened since do.
    pub async fn close_and_settle(&self, observer: &PgPool) {
        self.pool.close().await;
        crate::wait::eventually(
            std::time::Duration::from_secs(30),
            "the pool's connections ended",
            async || {
                sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND application_name = $1",
                )
                .bind(APPLICATION_NAME)
                .fetch_one(observer)
                .await
                .expect("pg_stat_activity read")
                    == 0
            },
        )
        .await;
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(admin) = self.drop_with.take() else {
            return;
        };
        if std::thread::panicking() {
            eprintln!("the failing test's database {} is kept", self.name);
            return;
        }
        // Drop runs inside the test's runtime, which cannot block on a future of
        // its own: a thread of its own does the statement. FORCE ends the
        // connections still open (the test's services, ending with the runtime).
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let admin = PgPool::connect(&admin).await?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&admin)
                .await?;
                admin.close().await;
                anyhow::Ok(())
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("the test database {} was not dropped: {e:#}", self.name);
        }
    }
}

/// The pool's `application_name`.
const APPLICATION_NAME: &str = "tidemark-test";

/// Creates a database of its own for one test, migrated.
pub async fn postgres() -> TestDb {
    crate::log::init();
    let admin = stack().postgres_admin_url();
    let name = unique("t_");
    let admin_pool = PgPool::connect(admin).await.expect("admin connection");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin_pool)
        .await
        .expect("create test database");
    admin_pool.close().await;
    let base = admin.rsplit_once('/').expect("url has a database").0;
    let mut db = TestDb::at(&name, format!("{base}/{name}"));
    db.drop_with = Some(admin.to_owned());
    tidemark_platform::postgres::migrate(&db.pool)
        .await
        .expect("migrations apply");
    db
}

/// A Redis config with a key prefix of its own.
///
/// Its timeout is 10 s, not the service's 2 s: the shared server never goes away
/// (tests of a Redis outage start one of their own), but beside the rest of the
/// suite on two cores an answer's read once took past 2 s and a test of buyers
/// failed on the 503 instead of on what it checks.
pub fn redis() -> RedisConfig {
    RedisConfig {
        url: stack().redis_url().into(),
        key_prefix: unique("t"),
        timeout: std::time::Duration::from_secs(10),
        ..RedisConfig::default()
    }
}

/// A ClickHouse config naming a database of its own (created by the migrations).
pub fn clickhouse() -> ClickHouseConfig {
    ClickHouseConfig {
        url: stack().clickhouse_url().to_owned(),
        database: unique("t_"),
        ..ClickHouseConfig::default()
    }
}

/// An S3 config with a bucket of its own on the shared server (and a prefix in it,
/// as a deployment may have).
///
/// A bucket each, not only a prefix: s3s-fs answers every listing by walking the
/// whole bucket's folder tree, whatever the prefix, so in one shared bucket a
/// listing took longer the more the suite had written (past the 10 s operation
/// timeout on a loaded machine). A bucket is a folder under the server's root.
pub fn s3() -> S3Config {
    let stack = stack();
    let bucket = unique("t-");
    std::fs::create_dir(stack.s3_root().join(&bucket)).expect("a test bucket's folder");
    S3Config {
        endpoint: stack.var("TIDEMARK_TEST_S3_ENDPOINT").to_owned(),
        bucket,
        access_key_id: Some(stack.var("TIDEMARK_TEST_S3_ACCESS_KEY_ID").to_owned()),
        secret_access_key: Some(stack.var("TIDEMARK_TEST_S3_SECRET_ACCESS_KEY").into()),
        prefix: unique("t-"),
        ..S3Config::default()
    }
}
