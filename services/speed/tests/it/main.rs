//! Speed-layer integration tests against real Postgres and Redis.

mod exactness;
mod faults;
mod horizon;
mod ops;
mod process;

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, SubsecRound, TimeDelta, Utc};
use rand::Rng;
use rand::rngs::StdRng;
use sqlx::PgPool;
use tidemark_domain::{Dimension, Granularity, Order};
use tidemark_platform::config::RedisConfig;
use tidemark_platform::redis::Redis;
use tidemark_speed::Consumer;
use tidemark_speed::config::SpeedSettings;
use tidemark_speed::consumer::Step;
use tidemark_speedview::SpeedView;
use uuid::Uuid;

pub fn random_order(rng: &mut StdRng) -> Order {
    // Mostly recent, some late (up to three days old).
    let age = if rng.random_bool(0.8) {
        rng.random_range(0..3_600)
    } else {
        rng.random_range(3_600..259_200)
    };
    let created_at: DateTime<Utc> = (Utc::now() - TimeDelta::seconds(age)).trunc_subsecs(6);
    Order {
        order_id: Uuid::from_u128(rng.random()),
        user_id: format!("u-{}", rng.random_range(0..100)),
        city: ["Berlin", "Paris", "São Paulo", "Oslo"][rng.random_range(0..4)].into(),
        product_id: format!("p:{}", rng.random_range(0..30)),
        category: ["books", "games", "garden"][rng.random_range(0..3)].into(),
        quantity: rng.random_range(1..6),
        unit_price_minor: rng.random_range(1..100_000),
        currency: ["EUR", "USD", "JPY"][rng.random_range(0..3)]
            .parse()
            .unwrap(),
        created_at,
    }
}

pub fn consumer(pool: &PgPool, redis: &RedisConfig, batch_size: i64) -> (Consumer, SpeedView) {
    let view = SpeedView::new(Arc::new(Redis::new(redis).unwrap()));
    let settings = SpeedSettings {
        batch_size,
        ..SpeedSettings::default()
    };
    (Consumer::new(pool.clone(), view.clone(), settings), view)
}

/// Steps until the consumer has applied the newest committed row.
pub async fn drain(consumer: &Consumer, pool: &PgPool, view: &SpeedView) {
    let head = tidemark_testkit::log_head(pool).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let step = consumer.step().await.expect("speed step");
        if step == Step::Idle {
            let cursor = view
                .meta()
                .await
                .unwrap()
                .map(|m| (m.cursor.txid, m.cursor.seq));
            if head.is_none() || cursor >= head {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "consumer never caught up: cursor {cursor:?}, head {head:?}, holders {}",
                    tidemark_testkit::horizon_holders(pool).await
                );
            }
            // Another transaction in the cluster holds the horizon; wait for it.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

type Grid = BTreeMap<(i64, String, String), [i64; 3]>;

/// The speed view of epochs `>= min_epoch`, in the ground-truth shape.
pub async fn speed_grid(
    view: &SpeedView,
    min_epoch: u64,
    granularity: Granularity,
    dimension: Dimension,
    only_epoch: Option<u64>,
) -> Grid {
    let snapshot = view
        .read(min_epoch, granularity, dimension, 0, 4_000_000_000)
        .await
        .unwrap();
    let mut grid = Grid::new();
    for (epoch, cells) in &snapshot.epochs {
        if only_epoch.is_some_and(|e| e != *epoch) {
            continue;
        }
        for ((bucket, value, currency), t) in cells {
            let entry = grid
                .entry((*bucket, value.clone(), currency.to_string()))
                .or_insert([0; 3]);
            entry[0] += t.revenue_minor;
            entry[1] += t.orders;
            entry[2] += t.items;
        }
    }
    grid
}

/// Asserts the view of epochs `>= min_epoch` equals SQL over rows with txid
/// `>= from_txid`, for every granularity and dimension.
pub async fn assert_exact(pool: &PgPool, view: &SpeedView, min_epoch: u64, from_txid: u64) {
    for granularity in Granularity::ALL {
        for dimension in Dimension::ALL {
            let truth = tidemark_testkit::ground_truth(
                pool,
                granularity.seconds(),
                dimension.as_str(),
                from_txid,
                u64::MAX,
            )
            .await;
            assert!(!truth.is_empty());
            let speed = speed_grid(view, min_epoch, granularity, dimension, None).await;
            assert_eq!(speed, truth, "{granularity} by {dimension}");
        }
    }
}

pub async fn insert(db: impl sqlx::PgExecutor<'_>, order: &Order) {
    sqlx::query(
        "INSERT INTO orders (order_id, user_id, city, product_id, category, quantity, \
           unit_price_minor, currency, created_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)",
    )
    .bind(order.order_id)
    .bind(&order.user_id)
    .bind(&order.city)
    .bind(&order.product_id)
    .bind(&order.category)
    .bind(order.quantity)
    .bind(order.unit_price_minor)
    .bind(order.currency.as_str())
    .bind(order.created_at)
    .execute(db)
    .await
    .unwrap();
}
