//! Published aggregates are exact; failed audits publish nothing; killed runs
//! converge; rebuild and backfill reproduce the same view.

use rand::SeedableRng;
use rand::rngs::StdRng;
use tidemark_compactor::{Kind, Outcome};
use tidemark_domain::{Dimension, Granularity};

use crate::{Env, batch};

fn published(outcome: &Outcome) -> u64 {
    match outcome {
        Outcome::Published { run_id, .. } => *run_id,
        other => panic!("expected a publish, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn published_aggregates_equal_sql_below_the_watermark() {
    let env = Env::new(8).await;
    let mut rng = StdRng::seed_from_u64(41);
    let mut sent = Vec::new();
    for round in 0..3 {
        env.ingest(&batch(&mut rng, &mut sent, 300)).await;
        let outcome = env.compactor.run_once(Kind::Incremental).await.unwrap();
        assert_eq!(published(&outcome), round + 1);
        env.assert_exact().await;
        // The run's held rows went to disk (see `Env`), and went with the run.
        assert!(
            matches!(outcome, Outcome::Published { held_on_disk, .. } if held_on_disk > 0),
            "{outcome:?}"
        );
        let left: Vec<_> = std::fs::read_dir(env.spill.path()).unwrap().collect();
        assert!(left.is_empty(), "held rows left on disk: {left:?}");
    }
    // Orders after the cut are not in the batch view (the speed layer has them).
    let state = env.published().await;
    let after: i64 =
        sqlx::query_scalar("SELECT count(*) FROM orders WHERE txid >= $1::int8::text::xid8")
            .bind(state.threshold as i64)
            .fetch_one(&env.db.pool)
            .await
            .unwrap();
    assert_eq!(after, 0);
    assert_eq!(state.base_run_id, 1);
    env.assert_lake_consistent().await;
    // The publication is mirrored for SQL clients.
    let client = tidemark_platform::clickhouse::client(&env.ch);
    let mirrored: u64 = client
        .query("SELECT max(run_id) FROM batch_publications")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(mirrored, state.run_id);

    // `verify`: the lake and ClickHouse agree cell by cell...
    let drift = env.compactor.verify_lake().await.unwrap();
    assert_eq!(drift.run_id, state.run_id);
    assert_eq!(drift.lake_orders, sent.len() as u64);
    assert!(drift.cells_compared > 1_000, "{drift:?}");
    assert_eq!(drift.cells_differing, 0, "{drift:?}");
    // ...and a published cell altered behind its back is found.
    client
        .query(
            "INSERT INTO revenue_agg (granularity, dimension, bucket, value, currency, run_id, \
             revenue_minor, orders, items) VALUES ('day', 'city', toDateTime(86400), 'Nowhere', \
             'EUR', ?, 100, 1, 1)",
        )
        .bind(state.run_id)
        .execute()
        .await
        .unwrap();
    let drift = env.compactor.verify_lake().await.unwrap();
    assert_eq!(drift.cells_differing, 1, "{drift:?}");
    assert!(drift.examples[0].contains("Nowhere"), "{drift:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_audit_publishes_nothing() {
    let env = Env::new(8).await;
    let mut rng = StdRng::seed_from_u64(42);
    let mut sent = Vec::new();
    env.ingest(&batch(&mut rng, &mut sent, 200)).await;
    published(&env.compactor.run_once(Kind::Incremental).await.unwrap());
    let before = env.published().await;
    let grid_before = env.batch_grid(Granularity::Hour, Dimension::City).await;

    env.ingest(&batch(&mut rng, &mut sent, 200)).await;
    let c = &env.compactor;
    let run = c.plan(Kind::Incremental).await.unwrap();
    assert!(c.wait_for_relay(&run).await.unwrap());
    let written = c.write_lake(&run).await.unwrap();
    c.stage(&run, &written.orders).await.unwrap();
    // Corrupt staging: one more Berlin order than there were.
    let client = tidemark_platform::clickhouse::client(&env.ch);
    client
        .query(&format!(
            "INSERT INTO {} (granularity, dimension, bucket, value, currency, run_id, \
               revenue_minor, orders, items) VALUES ('hour', 'city', toDateTime(0), 'Berlin', 'EUR', {}, 100, 1, 1)",
            run.staging(),
            run.run_id
        ))
        .execute()
        .await
        .unwrap();
    let report = c.audit(&run, &written, &written.orders).await.unwrap();
    assert!(!report.problems.is_empty(), "the audit noticed");
    let outcome = c.fail(&run, report).await.unwrap();
    assert!(matches!(outcome, Outcome::AuditFailed { .. }));

    assert_eq!(env.published().await, before, "nothing published");
    let copied: u64 = client
        .query("SELECT count() FROM revenue_agg WHERE run_id = ?")
        .bind(run.run_id)
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(copied, 0);
    assert_eq!(
        env.batch_grid(Granularity::Hour, Dimension::City).await,
        grid_before
    );
    let kept: u8 = client
        .query(&format!("EXISTS TABLE {}", run.staging()))
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(kept, 1, "staging kept for inspection");
    let status: String = sqlx::query_scalar("SELECT status FROM batch_runs WHERE run_id = $1")
        .bind(run.run_id as i64)
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(status, "failed");

    // The next run covers the failed run's orders too, exactly.
    published(&c.run_once(Kind::Incremental).await.unwrap());
    env.assert_exact().await;
    env.assert_lake_consistent().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_staging_table_laid_out_unlike_the_batch_view_is_not_attached() {
    let env = Env::new(8).await;
    let mut rng = StdRng::seed_from_u64(44);
    let mut sent = Vec::new();
    env.ingest(&batch(&mut rng, &mut sent, 200)).await;
    let c = &env.compactor;
    let run = c.plan(Kind::Incremental).await.unwrap();
    assert!(c.wait_for_relay(&run).await.unwrap());
    let written = c.write_lake(&run).await.unwrap();
    c.stage(&run, &written.orders).await.unwrap();
    let report = c.audit(&run, &written, &written.orders).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    // The same rows, staged in a table of finer granules (as a staging table
    // made from another definition than the live table's would be).
    let client = tidemark_platform::clickhouse::client(&env.ch);
    let staging = run.staging();
    for sql in [
        format!("RENAME TABLE {staging} TO {staging}_was"),
        format!(
            "CREATE TABLE {staging} AS {staging}_was ENGINE = ReplacingMergeTree \
             PARTITION BY toYYYYMM(bucket) \
             ORDER BY (granularity, dimension, bucket, value, currency, run_id) \
             SETTINGS index_granularity = 1024"
        ),
        format!("INSERT INTO {staging} SELECT * FROM {staging}_was"),
    ] {
        client.query(&sql).execute().await.unwrap();
    }
    let refused = c.copy(&run).await.unwrap_err().to_string();
    assert!(
        refused.contains("is not laid out as revenue_agg"),
        "{refused}"
    );
    let copied: u64 = client
        .query("SELECT count() FROM revenue_agg WHERE run_id = ?")
        .bind(run.run_id)
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(copied, 0, "no partition of it attached");

    // The run, resumed, stages afresh and publishes exactly.
    assert_eq!(
        published(&c.run_once(Kind::Incremental).await.unwrap()),
        run.run_id
    );
    env.assert_exact().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_killed_at_any_step_converges_without_duplicates() {
    let env = Env::new(8).await;
    let mut rng = StdRng::seed_from_u64(43);
    let mut sent = Vec::new();
    let client = tidemark_platform::clickhouse::client(&env.ch);
    // Each round dies after a later step, then the next invocation resumes it.
    for crash_after in 0..6 {
        env.ingest(&batch(&mut rng, &mut sent, 150)).await;
        let c = &env.compactor;
        let run = c.plan(Kind::Incremental).await.unwrap();
        'steps: {
            if crash_after == 0 {
                break 'steps;
            }
            assert!(c.wait_for_relay(&run).await.unwrap());
            let written = c.write_lake(&run).await.unwrap();
            if crash_after == 1 {
                break 'steps;
            }
            c.stage(&run, &written.orders).await.unwrap();
            if crash_after == 2 {
                break 'steps;
            }
            let report = c.audit(&run, &written, &written.orders).await.unwrap();
            if crash_after == 3 {
                break 'steps;
            }
            let staged = c.copy(&run).await.unwrap();
            if crash_after == 4 {
                break 'steps;
            }
            c.flip(&run, &report, staged).await.unwrap();
            // crash_after == 5: died before the ClickHouse follow-ups (mirror, cleanup).
        }
        let outcome = c.run_once(Kind::Incremental).await.unwrap();
        let resumed = published(&outcome);
        env.assert_exact().await;
        for run_id in [run.run_id, resumed] {
            let rows: u64 = client
                .query("SELECT count() FROM revenue_agg WHERE run_id = ?")
                .bind(run_id)
                .fetch_one()
                .await
                .unwrap();
            let recorded: Option<i64> =
                sqlx::query_scalar("SELECT rows_out FROM batch_runs WHERE run_id = $1")
                    .bind(run_id as i64)
                    .fetch_one(&env.db.pool)
                    .await
                    .unwrap();
            assert_eq!(
                Some(rows as i64),
                recorded,
                "run {run_id}: ClickHouse rows copied once"
            );
        }
        let staging: u64 = client
            .query("SELECT count() FROM system.tables WHERE database = currentDatabase() AND name LIKE 'staging_run_%'")
            .fetch_one()
            .await
            .unwrap();
        assert_eq!(
            staging, 0,
            "staging of published runs is dropped (crash after {crash_after})"
        );
        env.assert_lake_consistent().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rebuild_and_backfill_reproduce_the_same_aggregates() {
    // Few files per partition, so compaction happens along the way.
    let env = Env::new(2).await;
    let mut rng = StdRng::seed_from_u64(44);
    let mut sent = Vec::new();
    for _ in 0..4 {
        env.ingest(&batch(&mut rng, &mut sent, 200)).await;
        published(&env.compactor.run_once(Kind::Incremental).await.unwrap());
    }
    let most: i64 = sqlx::query_scalar(
        "SELECT max(n) FROM (SELECT count(*) AS n FROM lake_files GROUP BY dt) f",
    )
    .fetch_one(&env.db.pool)
    .await
    .unwrap();
    assert!(
        most <= 2,
        "partitions compacted to at most 2 files, found {most}"
    );
    env.assert_lake_consistent().await;
    let mut before = Vec::new();
    for granularity in Granularity::ALL {
        for dimension in Dimension::ALL {
            before.push(env.batch_grid(granularity, dimension).await);
        }
    }

    let rebuilt = published(&env.compactor.run_once(Kind::Rebuild).await.unwrap());
    let state = env.published().await;
    assert_eq!(state.base_run_id, rebuilt, "older runs no longer count");
    let mut after = Vec::new();
    for granularity in Granularity::ALL {
        for dimension in Dimension::ALL {
            after.push(env.batch_grid(granularity, dimension).await);
        }
    }
    assert_eq!(after, before, "rebuild reproduces the same aggregates");
    env.assert_exact().await;

    // Lose a day of the lake, backfill it from the raw JSON.
    let (dt,): (chrono::NaiveDate,) = sqlx::query_as("SELECT min(dt) FROM lake_files")
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    let keys: Vec<String> =
        sqlx::query_scalar("DELETE FROM lake_files WHERE dt = $1 RETURNING key")
            .bind(dt)
            .fetch_all(&env.db.pool)
            .await
            .unwrap();
    for key in keys {
        env.compactor.store.delete(&key).await.unwrap();
    }
    published(&env.compactor.backfill(dt, dt).await.unwrap());
    env.assert_exact().await;
    env.assert_lake_consistent().await;
}

/// A raw object landed twice (the same relay batch and hour under another key),
/// then one recorded with a batch its records lie outside of: the run keeps one
/// copy of each order either way (the order-id set holds the whole batch, then
/// the step starts again holding every record), and the view stays exact.
#[tokio::test(flavor = "multi_thread")]
async fn raw_objects_landed_twice_or_with_a_wrong_batch_count_each_order_once() {
    let env = Env::new(8).await;
    let mut rng = StdRng::seed_from_u64(43);
    let mut sent = Vec::new();
    for (round, copy) in ["same batch", "wrong batch"].into_iter().enumerate() {
        let before = sent.len();
        env.ingest(&batch(&mut rng, &mut sent, 200)).await;
        let lines: usize = sent[before..].iter().map(|o| o.lines.len()).sum();
        tidemark_testkit::eventually(
            std::time::Duration::from_secs(30),
            "the relay has landed every order",
            || async {
                sqlx::query_scalar::<_, bool>(
                    "SELECT (SELECT horizon::text::int8 FROM consumer_cursors \
                       WHERE consumer = 'lake-relay') > (SELECT max(txid::text::int8) FROM orders)",
                )
                .fetch_one(&env.db.pool)
                .await
                .unwrap_or(false)
            },
        )
        .await;
        // The newest object, copied under another key and recorded again.
        let (key, rows): (String, i32) = sqlx::query_as(
            "SELECT key, rows FROM lake_raw_files ORDER BY until_txid DESC, until_seq DESC, key \
             LIMIT 1",
        )
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
        let body = env.compactor.store.get(&key).await.unwrap();
        let twin = format!("{key}.{round}.copy");
        env.compactor.store.put(&twin, body.to_vec()).await.unwrap();
        // Recorded with the same batch, or with one its records lie outside of.
        let record = match copy {
            "same batch" => sqlx::query(
                "INSERT INTO lake_raw_files (key, dt, hour, after_txid, after_seq, until_txid, \
                   until_seq, min_txid, max_txid, rows, bytes) \
                 SELECT $2, dt, hour, after_txid, after_seq, until_txid, until_seq, min_txid, \
                   max_txid, rows, bytes FROM lake_raw_files WHERE key = $1",
            ),
            _ => sqlx::query(
                "INSERT INTO lake_raw_files (key, dt, hour, after_txid, after_seq, until_txid, \
                   until_seq, min_txid, max_txid, rows, bytes) \
                 SELECT $2, dt, hour, '1', 0, '1', 1, min_txid, max_txid, rows, bytes \
                 FROM lake_raw_files WHERE key = $1",
            ),
        };
        record
            .bind(&key)
            .bind(&twin)
            .execute(&env.db.pool)
            .await
            .unwrap();
        let outcome = env.compactor.run_once(Kind::Incremental).await.unwrap();
        let Outcome::Published { rows_in, .. } = outcome else {
            panic!("{copy}: expected a publish, got {outcome:?}");
        };
        assert!(rows > 0, "{copy}: the copied object holds orders");
        assert_eq!(
            rows_in, lines as u64,
            "{copy}: each order line of the run once"
        );
        env.assert_exact().await;
    }
}
