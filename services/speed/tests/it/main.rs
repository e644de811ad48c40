//! Speed-layer integration tests against real Postgres and Redis.

mod exactness;
mod faults;
mod horizon;
mod log;
mod ops;
mod process;
mod undecodable;

use std::collections::BTreeMap;
use std::sync::Arc;

use sqlx::PgPool;
use tidemark_domain::{Dimension, Granularity};
use tidemark_platform::config::RedisConfig;
use tidemark_platform::redis::Redis;
use tidemark_speed::Consumer;
use tidemark_speed::config::SpeedSettings;
use tidemark_speed::consumer::Step;
use tidemark_speedview::SpeedView;

pub use tidemark_testkit::{insert, random_order};

pub fn consumer(pool: &PgPool, redis: &RedisConfig, batch_size: i64) -> (Consumer, SpeedView) {
    // The view is also the tests' oracle: on a machine busy with the rest of the
    // suite a whole-grid read can outlast the service's 2 s (a CI run failed so).
    let redis = RedisConfig {
        timeout: redis.timeout.max(std::time::Duration::from_secs(10)),
        ..redis.clone()
    };
    let view = SpeedView::new(Arc::new(Redis::new(&redis).unwrap()));
    let settings = SpeedSettings {
        batch_size,
        ..SpeedSettings::default()
    };
    (
        Consumer::new(
            pool.clone(),
            view.clone(),
            settings,
            tidemark_platform::lease::Lease::unfenced("speed"),
        ),
        view,
    )
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

/// Orders in the view, over every epoch.
pub async fn orders_in_view(view: &SpeedView) -> i64 {
    speed_grid(view, 0, Granularity::Day, Dimension::Total, None)
        .await
        .values()
        .map(|v| v[1])
        .sum()
}

/// Asserts the view of epochs `>= min_epoch` equals SQL over rows with txid
/// `>= from_txid`, for every granularity and dimension.
pub async fn assert_exact(pool: &PgPool, view: &SpeedView, min_epoch: u64, from_txid: u64) {
    assert_exact_in(pool, view, min_epoch, from_txid..u64::MAX).await;
}

/// Asserts the view of epochs `>= min_epoch` equals SQL over rows with txid in
/// `txids`, for every granularity and dimension.
pub async fn assert_exact_in(
    pool: &PgPool,
    view: &SpeedView,
    min_epoch: u64,
    txids: std::ops::Range<u64>,
) {
    for granularity in Granularity::ALL {
        for dimension in Dimension::ALL {
            let truth = tidemark_testkit::ground_truth(
                pool,
                granularity.seconds(),
                dimension.as_str(),
                txids.start,
                txids.end,
            )
            .await;
            assert!(!truth.is_empty());
            let speed = speed_grid(view, min_epoch, granularity, dimension, None).await;
            assert_eq!(speed, truth, "{granularity} by {dimension}");
        }
    }
}
