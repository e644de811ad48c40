//! Each server of the stack is reachable with the project's own clients, and the
//! migrations apply once and re-apply as a no-op.

use aws_sdk_s3::primitives::ByteStream;
use tidemark_platform::{clickhouse, postgres, redis::Redis, s3};

#[tokio::test]
async fn postgres_migrations_apply_once_and_reapply_as_no_op() {
    let db = tidemark_testkit::postgres().await;
    let applied = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM _sqlx_migrations WHERE success")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    let expected = postgres::MIGRATOR.iter().count() as i64;
    assert!(expected > 0);
    assert_eq!(applied().await, expected);
    postgres::migrate(&db.pool)
        .await
        .expect("re-applying succeeds");
    assert_eq!(applied().await, expected, "re-applying added nothing");

    // The log-tailing rule's columns exist with the right types.
    let types: Vec<(String, String)> = sqlx::query_as(
        "SELECT column_name::text, data_type::text FROM information_schema.columns \
         WHERE table_name = 'orders' AND column_name IN ('txid', 'seq') ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        types,
        [
            ("seq".into(), "bigint".into()),
            ("txid".into(), "xid8".into())
        ]
    );
}

#[tokio::test]
async fn the_tail_query_uses_the_log_index() {
    let db = tidemark_testkit::postgres().await;
    sqlx::query("SET enable_seqscan = off")
        .execute(&db.pool)
        .await
        .unwrap();
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN SELECT order_id FROM orders \
         WHERE (txid, seq) > ('5'::xid8, 7) AND txid < pg_snapshot_xmin(pg_current_snapshot()) \
         ORDER BY txid, seq LIMIT 100",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let plan = plan.join("\n");
    assert!(plan.contains("orders_log_position"), "{plan}");
}

#[tokio::test]
async fn clickhouse_migrations_apply_once_and_reapply_as_no_op() {
    let config = tidemark_testkit::clickhouse();
    let first = clickhouse::migrate(&config)
        .await
        .expect("migrations apply");
    let all: Vec<u32> = clickhouse::MIGRATIONS.iter().map(|m| m.0).collect();
    assert_eq!(first, all);
    let second = clickhouse::migrate(&config)
        .await
        .expect("re-applying succeeds");
    assert!(second.is_empty(), "re-applied {second:?}");
    let client = clickhouse::client(&config);
    let recorded: u64 = client
        .query("SELECT count() FROM schema_migrations")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(recorded, all.len() as u64);
    let exists: u8 = client
        .query("EXISTS TABLE revenue_agg")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(exists, 1);
}

#[test]
fn every_clickhouse_migration_file_is_embedded() {
    let dir = tidemark_testkit::workspace_root().join("migrations/clickhouse");
    let files = std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "sql")
        })
        .count();
    assert_eq!(files, clickhouse::MIGRATIONS.len());
    let mut versions: Vec<u32> = clickhouse::MIGRATIONS.iter().map(|m| m.0).collect();
    versions.dedup();
    assert_eq!(
        versions.len(),
        files,
        "migration versions are unique and sorted"
    );
}

#[tokio::test]
async fn clickhouse_answers_through_the_crate_without_validation() {
    let config = tidemark_testkit::clickhouse();
    clickhouse::migrate(&config)
        .await
        .expect("database created");
    let client = clickhouse::client(&config);
    let version: String = client.query("SELECT version()").fetch_one().await.unwrap();
    assert!(!version.is_empty());
    let sum: u64 = client
        .query("SELECT sum(number) FROM (SELECT number FROM system.numbers LIMIT ?)")
        .bind(10_u64)
        .fetch_one()
        .await
        .expect("a bound query runs");
    assert_eq!(sum, 45);
}

/// A row (in a module of its own: the derive names the crate `clickhouse`,
/// which this file's `clickhouse` shadows).
mod probe {
    #[derive(clickhouse::Row, serde::Serialize, serde::Deserialize)]
    pub struct Probe {
        pub id: u64,
        pub name: String,
    }
}
use probe::Probe;

/// The client compresses or not as configured (`auto` on loopback: not), and
/// either way an INSERT arrives whole and an answer reads back.
#[tokio::test]
async fn clickhouse_inserts_and_answers_compressed_or_not() {
    use tidemark_platform::config::Compression;
    let config = tidemark_testkit::clickhouse();
    clickhouse::migrate(&config)
        .await
        .expect("database created");
    for (compression, compresses) in [
        (Compression::Lz4, true),
        (Compression::None, false),
        (Compression::Auto, false),
    ] {
        let config = tidemark_platform::config::ClickHouseConfig {
            compression,
            ..config.clone()
        };
        assert_eq!(config.compresses(), compresses, "{compression:?}");
        let client = clickhouse::client(&config);
        client
            .query("DROP TABLE IF EXISTS probe")
            .execute()
            .await
            .unwrap();
        client
            .query("CREATE TABLE probe (id UInt64, name String) ENGINE = MergeTree ORDER BY id")
            .execute()
            .await
            .unwrap();
        let mut insert = client.insert::<Probe>("probe").await.unwrap();
        for id in 0..100_000_u64 {
            let name = format!("probe {}", id % 100);
            insert.write(&Probe { id, name }).await.unwrap();
        }
        insert.end().await.expect("the INSERT is taken");
        let (count, sum, names): (u64, u64, u64) = client
            .query("SELECT count(), sum(id), uniqExact(name) FROM probe")
            .fetch_one()
            .await
            .unwrap();
        assert_eq!(
            (count, sum, names),
            (100_000, 4_999_950_000, 100),
            "{compression:?}"
        );
        let rows = client
            .query("SELECT id, name FROM probe WHERE id >= ? ORDER BY id")
            .bind(99_990_u64)
            .fetch_all::<Probe>()
            .await
            .unwrap();
        assert_eq!(rows.len(), 10);
        assert_eq!(rows[9].name, "probe 99");
    }
}

#[tokio::test]
async fn redis_answers_under_the_key_prefix() {
    let redis = Redis::new(&tidemark_testkit::redis()).unwrap();
    redis.check().await.expect("PING");
    let mut conn = redis.conn().await.unwrap();
    let key = redis.key("probe");
    assert!(key.starts_with(redis.prefix()));
    let _: () = ::redis::cmd("SET")
        .arg(&key)
        .arg("42")
        .query_async(&mut conn)
        .await
        .unwrap();
    let got: i64 = ::redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(got, 42);
}

#[tokio::test]
async fn s3_put_get_list_with_path_style_addressing() {
    let config = tidemark_testkit::s3();
    let client = s3::client(&config).await;
    s3::check(client.clone(), config.bucket.clone())
        .await
        .expect("bucket reachable");
    let key = config.key("raw/probe.jsonl");
    client
        .put_object()
        .bucket(&config.bucket)
        .key(&key)
        .body(ByteStream::from_static(b"{\"a\":1}\n"))
        .send()
        .await
        .unwrap();
    let body = client
        .get_object()
        .bucket(&config.bucket)
        .key(&key)
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    assert_eq!(&body[..], b"{\"a\":1}\n");
    let listed = client
        .list_objects_v2()
        .bucket(&config.bucket)
        .prefix(config.key("raw/"))
        .send()
        .await
        .unwrap();
    let keys: Vec<_> = listed.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(keys, [key.as_str()]);
}
