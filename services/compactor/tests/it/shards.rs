//! Issue 22: the batch view on two ClickHouse shards — local tables on each, a
//! `Distributed` table for reads, every shard attached before the Postgres flip.

use rand::SeedableRng;
use rand::rngs::StdRng;
use std::collections::BTreeMap;
use tidemark_compactor::{Kind, Outcome};
use tidemark_testkit::PrivateClickHouseCluster;

use crate::{Env, batch};

fn published(outcome: &Outcome) -> u64 {
    match outcome {
        Outcome::Published { run_id, .. } => *run_id,
        other => panic!("expected a publish, got {other:?}"),
    }
}

/// Rows of `table` on each shard's local database: `(all rows, rows FINAL)`.
async fn rows_per_shard(env: &Env, table: &str, run_id: u64) -> Vec<(u64, u64)> {
    let mut rows = Vec::new();
    for shard in tidemark_platform::clickhouse::shard_clients(&env.ch) {
        let count = |fin: &str| {
            shard
                .query(&format!(
                    "SELECT count() FROM {table} {fin} WHERE run_id = ?"
                ))
                .bind(run_id)
                .fetch_one::<u64>()
        };
        rows.push((count("").await.unwrap(), count("FINAL").await.unwrap()));
    }
    rows
}

/// Distinct buyers per UTC day and over everything, in the published view (read
/// through the `Distributed` table) and by SQL over the orders below the cut.
async fn buyers(env: &Env) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
    let state = env.published().await;
    let client = tidemark_platform::clickhouse::client(&env.ch);
    let served: Vec<(String, u64)> = client
        .query(
            "SELECT toString(toDate(bucket)) AS d, uniqExact(user_id) FROM buyers \
             WHERE run_id >= ? AND run_id <= ? GROUP BY d \
             UNION ALL SELECT 'all', uniqExact(user_id) FROM buyers \
             WHERE run_id >= ? AND run_id <= ?",
        )
        .bind(state.base_run_id)
        .bind(state.run_id)
        .bind(state.base_run_id)
        .bind(state.run_id)
        .fetch_all()
        .await
        .unwrap();
    let truth: Vec<(String, i64)> = sqlx::query_as(
        "SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD'), count(DISTINCT user_id) \
         FROM orders WHERE txid < $1::int8::text::xid8 GROUP BY 1 \
         UNION ALL SELECT 'all', count(DISTINCT user_id) FROM orders \
         WHERE txid < $1::int8::text::xid8",
    )
    .bind(state.threshold as i64)
    .fetch_all(&env.db.pool)
    .await
    .unwrap();
    (
        served.into_iter().collect(),
        truth.into_iter().map(|(d, n)| (d, n as u64)).collect(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn r20_a_sharded_batch_view_is_exact_and_a_run_killed_between_shards_converges() {
    let cluster = PrivateClickHouseCluster::start(2).await;
    let env = Env::on(cluster.config(), tidemark_testkit::s3(), 8).await;
    let mut rng = StdRng::seed_from_u64(47);
    let mut sent = Vec::new();

    env.ingest(&batch(&mut rng, &mut sent, 300)).await;
    let first = published(&env.compactor.run_once(Kind::Incremental).await.unwrap());
    env.assert_exact().await;
    let per_shard = rows_per_shard(&env, "revenue_agg", first).await;
    assert!(
        per_shard.iter().all(|&(rows, _)| rows > 0),
        "every shard holds part of the run: {per_shard:?}"
    );

    // The next run dies after attaching on the first shard, before the second.
    env.ingest(&batch(&mut rng, &mut sent, 300)).await;
    let c = &env.compactor;
    let run = c.plan(Kind::Incremental).await.unwrap();
    assert!(c.wait_for_relay(&run).await.unwrap());
    let written = c.write_lake(&run).await.unwrap();
    c.stage(&run, &written.orders).await.unwrap();
    c.audit(&run, &written, &written.orders).await.unwrap();
    let on_first = c.copy_to_shard(&run, 0).await.unwrap();
    assert!(on_first > 0);
    // Readers still see the published state only: the half-attached run is not
    // counted (rows of unpublished runs are invisible).
    env.assert_exact().await;
    assert_eq!(env.published().await.run_id, first);

    // The next invocation completes it: every shard, each row once.
    let resumed = published(&c.run_once(Kind::Incremental).await.unwrap());
    env.assert_exact().await;
    let (served, truth) = buyers(&env).await;
    assert_eq!(served, truth, "distinct buyers per day and in all");
    for run_id in [first, run.run_id, resumed] {
        for table in ["revenue_agg", "buyers"] {
            let per_shard = rows_per_shard(&env, table, run_id).await;
            for (shard, (rows, distinct)) in per_shard.iter().enumerate() {
                assert_eq!(
                    rows, distinct,
                    "run {run_id}, {table} on shard {shard}: no row twice"
                );
            }
            if table == "revenue_agg" {
                let recorded: Option<i64> =
                    sqlx::query_scalar("SELECT rows_out FROM batch_runs WHERE run_id = $1")
                        .bind(run_id as i64)
                        .fetch_one(&env.db.pool)
                        .await
                        .unwrap();
                let total: u64 = per_shard.iter().map(|(rows, _)| rows).sum();
                assert_eq!(
                    Some(total as i64),
                    recorded,
                    "run {run_id}: rows on the shards"
                );
            }
        }
    }
    assert_eq!(env.duplicate_rows().await, 0);
    tidemark_testkit::figure(
        "R20",
        format!(
            "ClickHouse, two shards (unreplicated) behind a Distributed table: a run killed \
             after attaching on shard 1 of 2 ({on_first} rows) converged on the rerun; \
             exact on every granularity and dimension, buyers per day equal SQL, \
             rows per shard {:?}, duplicate rows 0",
            rows_per_shard(&env, "revenue_agg", resumed).await
        ),
    );
}

/// Rows of `table` of the run on every server of the cluster, per shard and
/// replica.
async fn rows_per_replica(env: &Env, table: &str, run_id: u64) -> Vec<Vec<u64>> {
    let mut rows = Vec::new();
    for replicas in env.ch.replica_configs() {
        let mut shard = Vec::new();
        for replica in &replicas {
            shard.push(
                tidemark_platform::clickhouse::client(replica)
                    .query(&format!("SELECT count() FROM {table} WHERE run_id = ?"))
                    .bind(run_id)
                    .fetch_one::<u64>()
                    .await
                    .unwrap(),
            );
        }
        rows.push(shard);
    }
    rows
}

/// Two shards of two replicas each, coordinated by ZooKeeper: a run is attached
/// on each shard's writer and published only once every replica has it, so a
/// reader asking any server sees the same, exact, view. With one replica down a
/// run does not publish (answers stay those of the last publish, exact, read
/// through the live replicas); once it is back the rerun publishes and the
/// replicas agree, each row once.
#[tokio::test(flavor = "multi_thread")]
async fn r20_replicated_shards_publish_a_run_only_when_every_replica_has_it() {
    let cluster = PrivateClickHouseCluster::start_replicated(2, 2).await;
    let env = Env::on(cluster.config(), tidemark_testkit::s3(), 8).await;
    let mut rng = StdRng::seed_from_u64(53);
    let mut sent = Vec::new();

    env.ingest(&batch(&mut rng, &mut sent, 300)).await;
    let first = published(&env.compactor.run_once(Kind::Incremental).await.unwrap());
    env.assert_exact().await;
    for replica in env.ch.replica_configs().iter().flatten() {
        let engines: Vec<String> = tidemark_platform::clickhouse::client(replica)
            .query(
                "SELECT engine FROM system.tables WHERE database = currentDatabase() \
                 AND name IN ('revenue_agg', 'buyers', 'batch_publications') ORDER BY name",
            )
            .fetch_all()
            .await
            .unwrap();
        assert_eq!(
            engines, ["ReplicatedReplacingMergeTree"; 3],
            "the tables on {}",
            replica.url
        );
    }
    for table in ["revenue_agg", "buyers"] {
        let rows = rows_per_replica(&env, table, first).await;
        for shard in &rows {
            assert!(
                shard[0] > 0,
                "{table}: every shard holds part of the run: {rows:?}"
            );
            assert!(
                shard.iter().all(|&n| n == shard[0]),
                "{table}: replicas agree: {rows:?}"
            );
        }
    }
    // Every server answers the same through its own Distributed table.
    let totals = |state: tidemark_batchview::PublishedState| {
        let servers: Vec<_> = cluster.replicas.iter().flatten().map(|s| s.port).collect();
        let database = env.ch.database.clone();
        async move {
            let mut totals = Vec::new();
            for port in servers {
                let config = tidemark_platform::config::ClickHouseConfig {
                    url: format!("http://127.0.0.1:{port}"),
                    database: database.clone(),
                    ..Default::default()
                };
                totals.push(
                    tidemark_platform::clickhouse::client(&config)
                        .query(
                            "SELECT sum(revenue_minor), sum(orders) FROM revenue_agg \
                             WHERE granularity = 'day' AND dimension = 'total' \
                             AND run_id >= ? AND run_id <= ?",
                        )
                        .bind(state.base_run_id)
                        .bind(state.run_id)
                        .fetch_one::<(i64, u64)>()
                        .await
                        .unwrap(),
                );
            }
            totals
        }
    };
    let seen = totals(env.published().await).await;
    assert!(seen.iter().all(|t| *t == seen[0]), "every server: {seen:?}");
    assert!(seen[0].1 > 0);

    // The second shard's replica goes down: the next run attaches on the writers
    // but cannot publish; readers keep the last publish, exact, through the live
    // servers.
    let down = &cluster.replicas[1][1];
    down.stop();
    env.ingest(&batch(&mut rng, &mut sent, 300)).await;
    let refused = env.compactor.run_once(Kind::Incremental).await;
    assert!(
        refused.is_err(),
        "published with a replica down: {refused:?}"
    );
    assert_eq!(env.published().await.run_id, first);
    env.assert_exact().await;

    // Back: the rerun publishes; the replica has fetched every part.
    down.resume().await;
    let second = published(&env.compactor.run_once(Kind::Incremental).await.unwrap());
    env.assert_exact().await;
    let (served, truth) = buyers(&env).await;
    assert_eq!(served, truth, "distinct buyers per day and in all");
    let mut figures = Vec::new();
    for run_id in [first, second] {
        for table in ["revenue_agg", "buyers"] {
            let rows = rows_per_replica(&env, table, run_id).await;
            for shard in &rows {
                assert!(
                    shard.iter().all(|&n| n == shard[0]),
                    "run {run_id} {table}: {rows:?}"
                );
            }
            if table == "revenue_agg" {
                figures.push(rows);
            }
        }
    }
    let seen = totals(env.published().await).await;
    assert!(seen.iter().all(|t| *t == seen[0]), "every server: {seen:?}");
    assert_eq!(env.duplicate_rows().await, 0);
    tidemark_testkit::figure(
        "R20",
        format!(
            "ClickHouse, two shards of two replicas (ZooKeeper): each run published only \
             once every replica held it; with a replica SIGKILLed the run was refused and \
             answers stayed exact through the live servers; after its restart the rerun \
             published; revenue_agg rows per shard and replica {figures:?} (replicas \
             equal), all 4 servers answered the same totals, duplicate rows 0"
        ),
    );
}
