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
            drift += tidemark_testkit::differing(&truth, &seen);
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

/// Who holds the `speed` lease, and its token.
async fn speed_leader(pool: &sqlx::PgPool) -> Option<(String, i64)> {
    sqlx::query_as("SELECT holder, token FROM leases WHERE role = 'speed'")
        .fetch_optional(pool)
        .await
        .unwrap()
}

/// A speed instance named `name` listening on `port`, with the default lease.
fn spawn_instance(env: &ServiceEnv, name: &str, port: u16) -> Process {
    let env = env
        .clone()
        .set("TIDEMARK_LEASE__INSTANCE", &name)
        .set("TIDEMARK_HTTP__LISTEN", &format!("127.0.0.1:{port}"));
    Process::spawn(env!("CARGO_BIN_EXE_tidemark-speed"), &[], &env)
}

/// R20 (issue 22, standby workers) for the speed layer: three instances in turn
/// under a stream of orders, default lease (5 s). The leader is SIGKILLed: a
/// standby takes over within 10 s. The new leader is SIGSTOPped past its lease: the
/// third takes over; woken with SIGCONT, the paused one finds the fence raised and
/// steps down. Through all of it the view stays exact.
#[tokio::test(flavor = "multi_thread")]
async fn r20_a_standby_takes_over_from_a_killed_or_paused_leader() {
    let db = tidemark_testkit::postgres().await;
    let redis = tidemark_testkit::redis();
    let env = ServiceEnv::default()
        .postgres(&db.config)
        .redis(&redis)
        .set("TIDEMARK_SPEED__POLL_INTERVAL", &5)
        .set("TIDEMARK_SPEED__MAX_BACKOFF", &200)
        .set("TIDEMARK_SPEED__BATCH_SIZE", &50);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (pool, stop) = (db.pool.clone(), stop.clone());
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(21);
            let mut written = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut tx = pool.begin().await.unwrap();
                for _ in 0..rng.random_range(1..4) {
                    insert(&mut *tx, &random_order(&mut rng)).await;
                    written += 1;
                }
                tx.commit().await.unwrap();
                tokio::time::sleep(Duration::from_millis(rng.random_range(1..10))).await;
            }
            written
        })
    };
    let leader_is = |name: &'static str| {
        let pool = db.pool.clone();
        move || {
            let pool = pool.clone();
            async move { speed_leader(&pool).await.is_some_and(|(h, _)| h == name) }
        }
    };

    let (port_a, port_b, port_c) = (
        tidemark_testkit::free_port(),
        tidemark_testkit::free_port(),
        tidemark_testkit::free_port(),
    );
    let a = spawn_instance(&env, "a", port_a);
    tidemark_testkit::eventually(Duration::from_secs(30), "a leads", leader_is("a")).await;
    let b = spawn_instance(&env, "b", port_b);
    tidemark_testkit::http_ready(port_b, "/readyz", Duration::from_secs(30)).await;
    let b_standing = tidemark_testkit::leases_at(port_b).await["speed"].clone();
    assert_eq!(b_standing["state"], "standby", "{b_standing}");
    assert_eq!(b_standing["leader"], "a", "{b_standing}");

    // SIGKILL the leader: b takes over within 10 s, with a new token.
    let (_, view) = consumer(&db.pool, &redis, 1);
    tidemark_testkit::eventually(Duration::from_secs(30), "a applies", || {
        let view = view.clone();
        async move {
            view.meta()
                .await
                .ok()
                .flatten()
                .is_some_and(|m| m.cursor.txid > 0)
        }
    })
    .await;
    a.kill();
    let killed = Instant::now();
    tidemark_testkit::eventually(Duration::from_secs(15), "b takes over", leader_is("b")).await;
    let kill_takeover = killed.elapsed().as_secs_f64();
    assert!(kill_takeover < 10.0, "replaced in {kill_takeover:.1} s");
    assert_eq!(speed_leader(&db.pool).await.unwrap().1, 2);

    // SIGSTOP the new leader past its lease: c takes over.
    let c = spawn_instance(&env, "c", port_c);
    tidemark_testkit::http_ready(port_c, "/readyz", Duration::from_secs(30)).await;
    b.signal("STOP");
    let paused = Instant::now();
    tidemark_testkit::eventually(Duration::from_secs(15), "c takes over", leader_is("c")).await;
    let pause_takeover = paused.elapsed().as_secs_f64();
    assert_eq!(speed_leader(&db.pool).await.unwrap().1, 3);
    // c raises the view's fence to its token before it applies anything.
    let store = tidemark_platform::redis::Redis::new(&redis).unwrap();
    let mut conn = store.conn().await.unwrap();
    let fence_key = store.key("fence");
    tidemark_testkit::eventually(Duration::from_secs(10), "the fence is raised", || {
        let (mut conn, key) = (conn.clone(), fence_key.clone());
        async move {
            redis::AsyncCommands::get::<_, Option<u64>>(&mut conn, key)
                .await
                .unwrap()
                == Some(3)
        }
    })
    .await;
    b.signal("CONT");
    // Woken, b still believes it leads only until its own clock says otherwise;
    // whatever it had in hand is refused by the fence, and it stands by.
    tidemark_testkit::eventually(Duration::from_secs(15), "b stands by", || async {
        let s = tidemark_testkit::leases_at(port_b).await["speed"].clone();
        s["state"] == "standby" && s["leader"] == "c"
    })
    .await;
    let exposition = reqwest::get(format!("http://127.0.0.1:{port_b}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let refused =
        tidemark_testkit::metric(&exposition, r#"lease_fenced_writes_total{role="speed"}"#)
            .unwrap_or(0.0);
    let fence: Option<u64> = redis::AsyncCommands::get(&mut conn, &fence_key)
        .await
        .unwrap();
    assert_eq!(fence, Some(3), "no write of b's token landed after c's");

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.await.unwrap();
    let head = tidemark_testkit::log_head(&db.pool).await;
    tidemark_testkit::eventually(Duration::from_secs(30), "c catches up", || {
        let view = view.clone();
        async move {
            let cursor = view.meta().await.ok().flatten();
            cursor.map(|m| (m.cursor.txid, m.cursor.seq)) >= head
        }
    })
    .await;
    let mut drift = 0;
    let mut cells = 0;
    for dimension in [Dimension::City, Dimension::Product] {
        let truth = tidemark_testkit::ground_truth(
            &db.pool,
            Granularity::Minute.seconds(),
            dimension.as_str(),
            0,
            u64::MAX,
        )
        .await;
        let seen = speed_grid(&view, 0, Granularity::Minute, dimension, None).await;
        cells += truth.len();
        drift += tidemark_testkit::differing(&truth, &seen);
    }
    tidemark_testkit::figure(
        "R20",
        format!(
            "speed, three instances, default 5 s lease, {written} orders streamed: SIGKILLed \
             leader replaced in {kill_takeover:.1} s; SIGSTOPped leader replaced in \
             {pause_takeover:.1} s, and after SIGCONT it stood by ({refused} late writes \
             refused by the fence); drift {drift} of {cells} cells"
        ),
    );
    assert_eq!(drift, 0);
    drop((b, c));
}
