//! The model-based property test of the exact merge (issue 8, item 1).
//!
//! proptest draws a sequence of steps — ingest (new orders, resent duplicates,
//! late event times), refunds and cancellations of earlier orders (resent, or
//! refused when nothing remains), lake relay and speed-layer progress (some cut short: a crash
//! at whatever await they reached), compactor runs (some cut short at a random
//! point, i.e. killed mid-step), restarts of each service, and a Redis that loses
//! everything — and runs it against the real stores. After every step no served
//! aggregate (gross, orders, items, refunds, refunded items, cancellations, on
//! both bases) may be above ground truth (SQL over Postgres); after quiescence
//! every aggregate must equal it. Besides the fixed groupings, each check asks
//! random questions of the query model (issue 19: one or two dimensions, filters
//! on any, a local time zone, a basis, a granularity), drawn by
//! [`tidemark_testkit::Slice::random`]. A failing sequence shrinks to a short, readable
//! list.

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tidemark_domain::Order;
use tidemark_platform::auth::{self, Scope};
use tidemark_platform::redis::Redis;
use tidemark_speedview::SpeedView;

use crate::{Cells, apply_adjustments, cancellation, partial_refund, random_order};

/// The bases every answer is checked on: (query value, order time?).
const BASES: [(&str, bool); 2] = [("booking_time", false), ("order_time", true)];

#[derive(Debug, Clone)]
enum Op {
    /// Orders through ingest's commit path: `new` fresh ones, `resent` duplicates
    /// of earlier ones, event times up to three days late when `late`.
    Ingest {
        new: usize,
        resent: usize,
        late: bool,
    },
    /// Refunds and cancellations of earlier orders (each on its own: one that
    /// asks for more than remains is refused); `resent` earlier refunds again.
    Adjust {
        refunds: usize,
        cancels: usize,
        resent: usize,
    },
    /// Relay steps; the last one cut short after `crash_us` when given.
    Relay { steps: usize, crash_us: Option<u64> },
    /// Speed-layer steps; the last one cut short after `crash_us` when given.
    Speed { steps: usize, crash_us: Option<u64> },
    /// A batch run (cut, lake, stage, audit, publish), killed after `crash_ms`
    /// when given; the next run resumes it. With `relay_caught_up`, the relay has
    /// landed everything first (otherwise the run may find it behind and wait).
    Compact {
        relay_caught_up: bool,
        crash_ms: Option<u64>,
    },
    /// The speed consumer restarts (a fresh process state over the same Redis).
    RestartSpeed,
    /// The relay restarts.
    RestartRelay,
    /// Serving restarts (its caches are gone).
    RestartServing,
    /// Redis loses everything (FLUSHALL); the speed layer must rebuild.
    LoseRedis,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..40, 0usize..8, any::<bool>())
            .prop_map(|(new, resent, late)| Op::Ingest { new, resent, late }),
        2 => (0usize..6, 0usize..3, 0usize..3)
            .prop_map(|(refunds, cancels, resent)| Op::Adjust { refunds, cancels, resent }),
        3 => (1usize..4, proptest::option::weighted(0.3, 0u64..5_000))
            .prop_map(|(steps, crash_us)| Op::Relay { steps, crash_us }),
        3 => (1usize..4, proptest::option::weighted(0.3, 0u64..5_000))
            .prop_map(|(steps, crash_us)| Op::Speed { steps, crash_us }),
        3 => (proptest::bool::weighted(0.8), proptest::option::weighted(0.4, 0u64..300))
            .prop_map(|(relay_caught_up, crash_ms)| Op::Compact { relay_caught_up, crash_ms }),
        1 => Just(Op::RestartSpeed),
        1 => Just(Op::RestartRelay),
        1 => Just(Op::RestartServing),
        1 => Just(Op::LoseRedis),
    ]
}

/// One case's stores and services, all of its own.
struct World {
    db: tidemark_testkit::TestDb,
    redis_server: tidemark_testkit::PrivateRedis,
    redis: tidemark_platform::config::RedisConfig,
    s3: tidemark_platform::config::S3Config,
    ch: tidemark_platform::config::ClickHouseConfig,
    relay: tidemark_ingest::relay::Relay,
    speed: tidemark_speed::Consumer,
    compactor: tidemark_compactor::Compactor,
    compactor_config: tidemark_compactor::Config,
    /// The relay's and the speed layer's connections: each a process of its own in
    /// production, so a crash closes them (see [`World::crash`]).
    relay_pool: sqlx::PgPool,
    speed_pool: sqlx::PgPool,
    serving: tidemark_testkit::Running,
    key: String,
    http: reqwest::Client,
    sent: Vec<Order>,
    refunds: Vec<tidemark_ingest::adjust::Ask>,
    rng: StdRng,
    /// Draws the random questions asked after each step and when quiet.
    questions: StdRng,
}

impl World {
    async fn new(seed: u64) -> World {
        let db = tidemark_testkit::postgres().await;
        let redis_server = tidemark_testkit::PrivateRedis::start().await;
        let redis = redis_server.config();
        let s3 = tidemark_testkit::s3();
        let ch = tidemark_testkit::clickhouse();
        let mut compactor_config = tidemark_compactor::Config {
            postgres: db.config.clone(),
            s3: s3.clone(),
            clickhouse: ch.clone(),
            ..Default::default()
        };
        // The relay is stepped by the sequence: a run finds it behind or not.
        compactor_config.compactor.relay_wait = Duration::from_millis(100);
        // A run cut short is a crash: its lease lapses (it is not released), and
        // the next run waits for that — a short lease keeps the sequence quick.
        compactor_config.lease.ttl = Duration::from_millis(300);
        let compactor = tidemark_compactor::connect(&compactor_config)
            .await
            .unwrap();
        let (_, key) = auth::create(&db.pool, "model", &[Scope::Read], None)
            .await
            .unwrap();
        let relay_pool = Self::pool(&db);
        let speed_pool = Self::pool(&db);
        let relay = Self::relay(&relay_pool, &s3).await;
        let speed = Self::speed(&speed_pool, &redis);
        let serving = Self::serving(&db, &redis, &ch).await;
        World {
            db,
            redis_server,
            redis,
            s3,
            ch,
            relay,
            speed,
            compactor,
            compactor_config,
            relay_pool,
            speed_pool,
            serving,
            key,
            http: reqwest::Client::new(),
            sent: Vec::new(),
            refunds: Vec::new(),
            rng: StdRng::seed_from_u64(seed),
            questions: StdRng::seed_from_u64(seed ^ 0x19),
        }
    }

    fn pool(db: &tidemark_testkit::TestDb) -> sqlx::PgPool {
        tidemark_platform::postgres::pool(&db.config, "model").unwrap()
    }

    /// A step cut short is a process that died: its connections close with it.
    /// (Dropping the step's future alone could leave a pooled connection inside a
    /// transaction whose BEGIN was sent but not answered, which no process that
    /// crashed would keep.) Returns a fresh pool for the restarted component.
    async fn crash(&self, pool: &sqlx::PgPool) -> sqlx::PgPool {
        pool.close().await;
        Self::pool(&self.db)
    }

    async fn relay(
        pool: &sqlx::PgPool,
        s3: &tidemark_platform::config::S3Config,
    ) -> tidemark_ingest::relay::Relay {
        tidemark_ingest::relay::Relay::new(
            pool.clone(),
            tidemark_platform::s3::client(s3).await,
            s3.clone(),
            tidemark_ingest::config::RelaySettings {
                batch_size: 25,
                ..Default::default()
            },
            tidemark_platform::lease::Lease::unfenced("lake-relay"),
        )
    }

    fn speed(
        pool: &sqlx::PgPool,
        redis: &tidemark_platform::config::RedisConfig,
    ) -> tidemark_speed::Consumer {
        tidemark_speed::Consumer::new(
            pool.clone(),
            SpeedView::new(Arc::new(Redis::new(redis).unwrap())),
            tidemark_speed::config::SpeedSettings {
                batch_size: 25,
                ..Default::default()
            },
            tidemark_platform::lease::Lease::unfenced("speed"),
        )
    }

    async fn serving(
        db: &tidemark_testkit::TestDb,
        redis: &tidemark_platform::config::RedisConfig,
        ch: &tidemark_platform::config::ClickHouseConfig,
    ) -> tidemark_testkit::Running {
        let mut config = tidemark_serving::Config {
            postgres: db.config.clone(),
            redis: redis.clone(),
            clickhouse: ch.clone(),
            ..Default::default()
        };
        config.serving.state_ttl = Duration::ZERO;
        tidemark_testkit::start(|l, s| tidemark_serving::serve(config, l, s)).await
    }

    async fn apply(&mut self, op: &Op) {
        match *op {
            Op::Ingest { new, resent, late } => {
                let mut orders: Vec<Order> = (0..new)
                    .map(|_| {
                        let mut order = random_order(&mut self.rng);
                        if late {
                            order.created_at -= chrono::TimeDelta::hours(30);
                        }
                        order
                    })
                    .collect();
                for i in 0..resent.min(self.sent.len()) {
                    orders.push(self.sent[(i * 7919) % self.sent.len()].clone());
                }
                tidemark_ingest::store::store(&self.db.pool, &orders)
                    .await
                    .unwrap();
                self.sent.extend(orders.into_iter().take(new));
            }
            Op::Adjust {
                refunds,
                cancels,
                resent,
            } => {
                if self.sent.is_empty() {
                    return;
                }
                let mut asks = Vec::new();
                for _ in 0..refunds {
                    let order = &self.sent[self.rng.random_range(0..self.sent.len())];
                    let ask = partial_refund(order, &mut self.rng);
                    self.refunds.push(ask.clone());
                    asks.push(ask);
                }
                for _ in 0..cancels {
                    asks.push(cancellation(
                        &self.sent[self.rng.random_range(0..self.sent.len())],
                    ));
                }
                for i in 0..resent.min(self.refunds.len()) {
                    asks.push(self.refunds[(i * 31) % self.refunds.len()].clone());
                }
                for ask in asks {
                    use tidemark_ingest::adjust::AdjustError;
                    match apply_adjustments(&self.db.pool, std::slice::from_ref(&ask)).await {
                        Ok(_) | Err(AdjustError::Conflict { .. }) => {}
                        Err(e) => panic!("{ask:?}: {e:?}"),
                    }
                }
            }
            Op::Relay { steps, crash_us } => {
                for i in 0..steps {
                    match crash_us.filter(|_| i + 1 == steps) {
                        Some(us) => {
                            let step = self.relay.step();
                            if tokio::time::timeout(Duration::from_micros(us), step)
                                .await
                                .is_err()
                            {
                                self.relay_pool = self.crash(&self.relay_pool).await;
                                self.relay = Self::relay(&self.relay_pool, &self.s3).await;
                            }
                        }
                        None => drop(self.relay.step().await),
                    }
                }
            }
            Op::Speed { steps, crash_us } => {
                for i in 0..steps {
                    match crash_us.filter(|_| i + 1 == steps) {
                        Some(us) => {
                            let step = self.speed.step();
                            if tokio::time::timeout(Duration::from_micros(us), step)
                                .await
                                .is_err()
                            {
                                self.speed_pool = self.crash(&self.speed_pool).await;
                                self.speed = Self::speed(&self.speed_pool, &self.redis);
                            }
                        }
                        None => drop(self.speed.step().await),
                    }
                }
            }
            Op::Compact {
                relay_caught_up,
                crash_ms,
            } => {
                if relay_caught_up {
                    self.relay_idle().await.unwrap();
                }
                let run = self
                    .compactor
                    .run_once(tidemark_compactor::Kind::Incremental);
                match crash_ms {
                    Some(ms) => {
                        if tokio::time::timeout(Duration::from_millis(ms), run)
                            .await
                            .is_err()
                        {
                            self.compactor.pool.close().await;
                            self.compactor = tidemark_compactor::connect(&self.compactor_config)
                                .await
                                .unwrap();
                        }
                    }
                    None => {
                        run.await.unwrap();
                    }
                }
            }
            Op::RestartSpeed => self.speed = Self::speed(&self.speed_pool, &self.redis),
            Op::RestartRelay => self.relay = Self::relay(&self.relay_pool, &self.s3).await,
            Op::RestartServing => {
                let fresh = Self::serving(&self.db, &self.redis, &self.ch).await;
                let old = std::mem::replace(&mut self.serving, fresh);
                old.stop().await.unwrap();
            }
            Op::LoseRedis => self.redis_server.flushall(),
        }
    }

    /// The served cells for a granularity, grouping and basis over the whole range.
    async fn served(
        &self,
        granularity: &str,
        group_by: Option<&str>,
        basis: &str,
    ) -> Result<Cells, String> {
        crate::served_cells(
            &self.http,
            &self.serving,
            &self.key,
            granularity,
            group_by,
            basis,
        )
        .await
    }

    async fn truth(&self, granularity: i64, dimension: &str, order_time: bool) -> Cells {
        crate::truth_cells(
            &self.db.pool,
            granularity,
            dimension,
            dimension != "total",
            order_time,
        )
        .await
    }

    /// No served cell above the truth (read after the answer: truth only grows).
    /// Every metric is a sum of non-negative contributions of committed events, so
    /// an answer that never counts an event twice or one not committed is below
    /// the truth in each of them, on either basis.
    async fn never_above(&mut self) -> Result<(), String> {
        // A random question of the query model (dimensions, filters, zone).
        let slice = tidemark_testkit::Slice::random(&mut self.questions);
        let served = self.served_slice(&slice).await?;
        let truth = slice.truth(&self.db.pool).await;
        for (cell, s) in &served {
            let t = truth.get(cell).copied().unwrap_or([0; 7]);
            if s.iter().zip(t).any(|(s, t)| *s > t) {
                return Err(format!(
                    "over-count at {cell:?} of {slice:?}: served {s:?}, truth {t:?}"
                ));
            }
        }
        for (basis, order_time) in BASES {
            let served = self.served("day", Some("city"), basis).await?;
            let truth = self.truth(86_400, "city", order_time).await;
            for (cell, s) in &served {
                let t = truth.get(cell).copied().unwrap_or([0; 6]);
                if s.iter().zip(t).any(|(s, t)| *s > t) {
                    return Err(format!(
                        "over-count at {cell:?} ({basis}): served {s:?}, truth {t:?}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The served answer to a question of the query model over the whole range.
    async fn served_slice(
        &self,
        slice: &tidemark_testkit::Slice,
    ) -> Result<tidemark_testkit::SliceCells, String> {
        let (from, to) = crate::full_range();
        crate::served_slice_at(&self.http, &self.serving, &self.key, slice, &from, &to).await
    }

    /// Relay steps until nothing below the horizon is left.
    async fn relay_idle(&self) -> Result<(), String> {
        for _ in 0..2_000 {
            let step = self.relay.step().await.map_err(|e| e.to_string())?;
            if matches!(step, tidemark_ingest::relay::Step::Idle) {
                break;
            }
        }
        Ok(())
    }

    /// Everything caught up and a batch run published: served equals truth for
    /// every granularity and grouping.
    async fn quiesce_and_compare(&mut self) -> Result<(), String> {
        let head = tidemark_testkit::log_head(&self.db.pool).await;
        self.relay_idle().await?;
        let run = self
            .compactor
            .run_once(tidemark_compactor::Kind::Incremental);
        run.await.map_err(|e| e.to_string())?;
        let view = SpeedView::new(Arc::new(Redis::new(&self.redis).unwrap()));
        for _ in 0..2_000 {
            self.speed.step().await.map_err(|e| e.to_string())?;
            let cursor = view
                .meta()
                .await
                .ok()
                .flatten()
                .map(|m| (m.cursor.txid, m.cursor.seq));
            if head.is_none() || cursor >= head {
                break;
            }
        }
        for (granularity, secs) in [("minute", 60), ("hour", 3_600), ("day", 86_400)] {
            for (group_by, dimension) in [
                (None, "total"),
                (Some("city"), "city"),
                (Some("category"), "category"),
                (Some("product"), "product"),
            ] {
                for (basis, order_time) in BASES {
                    let served = self.served(granularity, group_by, basis).await?;
                    let truth = self.truth(secs, dimension, order_time).await;
                    if served != truth {
                        let differing: std::collections::BTreeSet<_> = truth
                            .keys()
                            .chain(served.keys())
                            .filter(|k| truth.get(*k) != served.get(*k))
                            .collect();
                        let shown: Vec<String> = differing
                            .iter()
                            .take(3)
                            .map(|k| {
                                format!(
                                    "{k:?}: served {:?}, truth {:?}",
                                    served.get(*k),
                                    truth.get(*k)
                                )
                            })
                            .collect();
                        return Err(format!(
                            "after quiescence, {granularity} by {dimension} ({basis}): {} cells differ, e.g. {}",
                            differing.len(),
                            shown.join("; ")
                        ));
                    }
                }
            }
        }
        // Random questions of the query model: equal to SQL.
        for _ in 0..8 {
            let slice = tidemark_testkit::Slice::random(&mut self.questions);
            let served = self.served_slice(&slice).await?;
            let truth = slice.truth(&self.db.pool).await;
            if served != truth {
                let differing: Vec<String> = truth
                    .keys()
                    .chain(served.keys())
                    .filter(|k| truth.get(*k) != served.get(*k))
                    .take(3)
                    .map(|k| {
                        format!(
                            "{k:?}: served {:?}, truth {:?}",
                            served.get(k),
                            truth.get(k)
                        )
                    })
                    .collect();
                return Err(format!(
                    "after quiescence, {slice:?}: {}",
                    differing.join("; ")
                ));
            }
        }
        Ok(())
    }
}

async fn case(ops: Vec<Op>, seed: u64) -> Result<(), TestCaseError> {
    let mut world = World::new(seed).await;
    for (i, op) in ops.iter().enumerate() {
        world.apply(op).await;
        world
            .never_above()
            .await
            .map_err(|e| TestCaseError::fail(format!("after step {i} ({op:?}): {e}")))?;
    }
    world
        .quiesce_and_compare()
        .await
        .map_err(TestCaseError::fail)
}

#[tokio::test(flavor = "multi_thread")]
async fn served_aggregates_are_never_above_truth_and_equal_it_when_quiet() {
    let cases = if tidemark_testkit::heavy() { 128 } else { 24 };
    let seed: u64 = std::env::var("TIDEMARK_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::Rng::random(&mut rand::rng()));
    eprintln!("seed {seed} (set TIDEMARK_MODEL_SEED to replay)");
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases,
            max_shrink_iters: 300,
            // A failure must be reported before nextest kills the test (ten minutes,
            // .config/nextest.toml): shrinking stops after a minute with the smallest
            // input found so far.
            max_shrink_time: 60_000,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let handle = tokio::runtime::Handle::current();
    let steps = std::sync::atomic::AtomicUsize::new(0);
    let result = runner.run(&proptest::collection::vec(op(), 1..24), |ops| {
        steps.fetch_add(ops.len(), std::sync::atomic::Ordering::Relaxed);
        tokio::task::block_in_place(|| handle.block_on(case(ops, seed)))
    });
    if let Err(e) = result {
        panic!("seed {seed}: {e}");
    }
    eprintln!(
        "{cases} cases, {} steps, each followed by a never-above check; all equal when quiet",
        steps.load(std::sync::atomic::Ordering::Relaxed)
    );
}
