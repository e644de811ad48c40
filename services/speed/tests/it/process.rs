//! R4 with the speed layer as a process of its own: SIGKILLed at random points
//! while orders stream in, Redis flushed and restarted under it; once it has
//! caught up, the view equals SQL over Postgres with no operator action.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tidemark_domain::{Dimension, Granularity};
use tidemark_testkit::{Process, ServiceEnv};

use crate::{consumer, insert, random_order, speed_grid};

fn spawn_speed(env: &ServiceEnv) -> Process {
    Process::spawn(env!("CARGO_BIN_EXE_tidemark-speed"), &[], env)
}

#[tokio::test(flavor = "multi_thread")]
async fn r4_speed_killed_flushed_and_restarted_rebuilds_itself_exactly() {
    let db = tidemark_testkit::postgres().await;
    let redis_server = tidemark_testkit::PrivateRedis::start().await;
    let redis = redis_server.config();
    let env = ServiceEnv::default()
        .postgres(&db.config)
        .redis(&redis)
        .set("TIDEMARK_HTTP__LISTEN", &"127.0.0.1:0")
        .set("TIDEMARK_SPEED__POLL_INTERVAL", &5)
        .set("TIDEMARK_SPEED__MAX_BACKOFF", &100)
        .set("TIDEMARK_SPEED__BATCH_SIZE", &50);
    let kills = if tidemark_testkit::heavy() { 40 } else { 12 };
    let writer = {
        let pool = db.pool.clone();
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(41);
            let mut written = 0;
            loop {
                let mut tx = pool.begin().await.unwrap();
                for _ in 0..rng.random_range(1..6) {
                    insert(&mut *tx, &random_order(&mut rng)).await;
                    written += 1;
                }
                tx.commit().await.unwrap();
                if written >= 400 * kills {
                    return written;
                }
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..4))).await;
            }
        })
    };
    let seed: u64 = rand::rng().random();
    eprintln!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    for kill in 0..kills {
        let speed = spawn_speed(&env);
        // Up for a random while: during startup, mid-replay, or mid-stream.
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..600))).await;
        if kill == kills / 3 {
            redis_server.flushall();
            tokio::time::sleep(Duration::from_millis(rng.random_range(20..300))).await;
        }
        if kill == 2 * kills / 3 {
            redis_server.stop();
            tokio::time::sleep(Duration::from_millis(300)).await;
            redis_server.resume().await;
            tokio::time::sleep(Duration::from_millis(rng.random_range(20..300))).await;
        }
        speed.kill();
    }
    let written = writer.await.unwrap();

    // Started once more, it must catch up by itself.
    let _speed = spawn_speed(&env);
    let started = Instant::now();
    let head = tidemark_testkit::log_head(&db.pool).await;
    // The checks read whole grids: a loaded machine may take longer than the
    // service's short Redis timeout (which is there to notice an outage fast).
    let reader = tidemark_platform::config::RedisConfig {
        timeout: Duration::from_secs(10),
        ..redis.clone()
    };
    let (_, view) = consumer(&db.pool, &reader, 1);
    tidemark_testkit::eventually(
        Duration::from_secs(60),
        "the speed layer catches up",
        || {
            let view = view.clone();
            async move {
                let cursor = view.meta().await.ok().flatten();
                cursor.map(|m| (m.cursor.txid, m.cursor.seq)) >= head
            }
        },
    )
    .await;
    let catch_up = started.elapsed().as_secs_f64();
    let mut drift = 0;
    let mut cells = 0;
    for granularity in Granularity::ALL {
        for dimension in Dimension::ALL {
            let truth = tidemark_testkit::ground_truth(
                &db.pool,
                granularity.seconds(),
                dimension.as_str(),
                0,
                u64::MAX,
            )
            .await;
            let seen = speed_grid(&view, 0, granularity, dimension, None).await;
            cells += truth.len();
            drift += truth
                .keys()
                .chain(seen.keys())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .filter(|k| truth.get(*k) != seen.get(*k))
                .count();
        }
    }
    tidemark_testkit::figure(
        "R4",
        format!(
            "speed as a process, {kills} SIGKILLs at random points, one FLUSHALL and one Redis \
             restart, {written} orders streamed: drift after catch-up {drift} of {cells} cells \
             (caught up {catch_up:.1} s after the last start)"
        ),
    );
    assert_eq!(drift, 0);
}
