//! Batch-layer integration tests against real Postgres, S3 and ClickHouse.

mod alerts;
mod batch;
mod lake;
mod ops;
mod process;
mod s3_outage;
mod shards;

use std::time::Duration;

use rand::Rng;
use rand::rngs::StdRng;
use tidemark_batchview::PublishedState;
use tidemark_compactor::Compactor;
use tidemark_domain::{Dimension, Granularity, Order};
use tidemark_ingest::config::RelaySettings;
use tidemark_platform::config::{ClickHouseConfig, S3Config};
use tidemark_testkit::TestDb;
use tokio_util::sync::CancellationToken;

/// Postgres, S3 and ClickHouse of one test's own, a lake relay running, a compactor.
pub struct Env {
    pub db: TestDb,
    pub s3: S3Config,
    pub ch: ClickHouseConfig,
    pub compactor: Compactor,
    /// Where the compactor's runs write their held rows (every group's).
    pub spill: tempfile::TempDir,
    relay: CancellationToken,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.relay.cancel();
    }
}

impl Env {
    pub async fn new(max_files_per_partition: usize) -> Env {
        Self::on(
            tidemark_testkit::clickhouse(),
            tidemark_testkit::s3(),
            max_files_per_partition,
        )
        .await
    }

    /// On the given ClickHouse and S3 (private servers for tests that stop them).
    pub async fn on(ch: ClickHouseConfig, s3: S3Config, max_files_per_partition: usize) -> Env {
        let db = tidemark_testkit::postgres().await;
        let mut config = tidemark_compactor::Config {
            postgres: db.config.clone(),
            s3: s3.clone(),
            clickhouse: ch.clone(),
            ..Default::default()
        };
        config.compactor.relay_wait = Duration::from_secs(30);
        // A read-back hung for minutes in 2 of 5 suite runs (see CompactorSettings):
        // a test's runs are small, so a try that outlasts 20 s is abandoned sooner.
        config.compactor.read_back_timeout = Duration::from_secs(20);
        config.compactor.max_files_per_partition = max_files_per_partition;
        // Every group of a run's rows goes to disk and is read back by hour: the
        // tests' exactness is that of the path a large run takes.
        let spill = tempfile::tempdir().unwrap();
        config.compactor.hold_memory_bytes = 0;
        config.compactor.spill_dir = Some(spill.path().to_owned());
        // The least budget for aggregated ranges: each is written alone, the
        // path of a range larger than the budget.
        config.compactor.stage_memory_bytes = 0;
        // Ranges of a few hundred lines: the tests' busy hours are split in
        // halves or quarters, summed from their parts, as a large run's are.
        config.compactor.stage_range_rows = 300;
        // Runs cut short (a crash) leave their lease to lapse; a short lease keeps
        // the reruns quick.
        config.lease.ttl = Duration::from_millis(500);
        let compactor = tidemark_compactor::connect(&config).await.unwrap();
        let relay = tidemark_ingest::relay::Relay::new(
            db.pool.clone(),
            tidemark_platform::s3::client(&s3).await,
            s3.clone(),
            RelaySettings {
                poll_interval: Duration::from_millis(10),
                max_backoff: Duration::from_millis(500),
                batch_size: 500,
                ..RelaySettings::default()
            },
            tidemark_platform::lease::Lease::unfenced("lake-relay"),
        );
        let token = CancellationToken::new();
        tokio::spawn(relay.run(token.clone()));
        Env {
            db,
            s3,
            ch,
            compactor,
            spill,
            relay: token,
        }
    }

    /// Ingests through ingest's store (idempotent, so resent orders are duplicates).
    pub async fn ingest(&self, orders: &[Order]) {
        for chunk in orders.chunks(200) {
            tidemark_ingest::store::store(&self.db.pool, chunk)
                .await
                .unwrap();
        }
    }

    pub async fn published(&self) -> PublishedState {
        PublishedState::load(&self.db.pool)
            .await
            .unwrap()
            .expect("a published state")
    }

    /// The published batch view of `granularity` by `dimension`, in ground-truth shape.
    pub async fn batch_grid(
        &self,
        granularity: Granularity,
        dimension: Dimension,
    ) -> std::collections::BTreeMap<(i64, String, String), [i64; 3]> {
        let state = self.published().await;
        let client = tidemark_platform::clickhouse::client(&self.ch);
        tidemark_batchview::read(&client, &state, granularity, dimension, 0, 4_000_000_000)
            .await
            .unwrap()
            .into_iter()
            .map(|((bucket, value, currency), t)| {
                (
                    (bucket, value, currency.to_string()),
                    [t.revenue_minor, t.orders, t.items],
                )
            })
            .collect()
    }

    /// The published view equals SQL over every order below the watermark, for
    /// every granularity and dimension.
    pub async fn assert_exact(&self) {
        let state = self.published().await;
        for granularity in Granularity::ALL {
            for dimension in Dimension::ALL {
                let truth = tidemark_testkit::ground_truth(
                    &self.db.pool,
                    granularity.seconds(),
                    dimension.as_str(),
                    0,
                    state.threshold,
                )
                .await;
                let batch = self.batch_grid(granularity, dimension).await;
                assert_eq!(
                    batch, truth,
                    "{granularity} by {dimension} at run {}",
                    state.run_id
                );
            }
        }
    }

    /// Cells of the published view that differ from SQL below the watermark, over
    /// every granularity and dimension, and how many cells the truth has.
    pub async fn drift(&self) -> (usize, usize) {
        let state = self.published().await;
        let (mut differing, mut cells) = (0, 0);
        for granularity in Granularity::ALL {
            for dimension in Dimension::ALL {
                let truth = tidemark_testkit::ground_truth(
                    &self.db.pool,
                    granularity.seconds(),
                    dimension.as_str(),
                    0,
                    state.threshold,
                )
                .await;
                let batch = self.batch_grid(granularity, dimension).await;
                cells += truth.len();
                differing += tidemark_testkit::differing(&truth, &batch);
            }
        }
        (differing, cells)
    }

    /// Rows in ClickHouse's `revenue_agg` beyond one per key (a run copied twice).
    pub async fn duplicate_rows(&self) -> u64 {
        tidemark_platform::clickhouse::client(&self.ch)
            .query(
                "SELECT count() - uniqExact(granularity, dimension, bucket, value, currency, run_id) \
                 FROM revenue_agg",
            )
            .fetch_one()
            .await
            .unwrap()
    }

    /// What `tidemark-compactor` needs to run on this environment's stores.
    pub fn service_env(&self) -> tidemark_testkit::ServiceEnv {
        tidemark_testkit::ServiceEnv::default()
            .postgres(&self.db.config)
            .s3(&self.s3)
            .clickhouse(&self.ch)
            .set("TIDEMARK_COMPACTOR__RELAY_WAIT", &30_000)
            // A SIGKILLed run's lease lapses in a second (R5 reruns at once).
            .set("TIDEMARK_LEASE__TTL", &1_000)
    }

    /// Lake objects in S3 are exactly those in the manifest.
    pub async fn assert_lake_consistent(&self) {
        let mut objects = self.compactor.store.list("lake/").await.unwrap();
        objects.sort();
        let manifest: Vec<String> = sqlx::query_scalar("SELECT key FROM lake_files ORDER BY key")
            .fetch_all(&self.db.pool)
            .await
            .unwrap();
        assert_eq!(objects, manifest, "lake objects and manifest differ");
    }
}

pub use tidemark_testkit::random_order;

/// New orders plus some already-sent ones resent (duplicates).
pub fn batch(rng: &mut StdRng, sent: &mut Vec<Order>, n: usize) -> Vec<Order> {
    let mut orders: Vec<Order> = (0..n).map(|_| random_order(rng)).collect();
    let resent: Vec<Order> = if sent.is_empty() {
        Vec::new()
    } else {
        (0..n / 10)
            .map(|_| sent[rng.random_range(0..sent.len())].clone())
            .collect()
    };
    sent.extend(orders.iter().cloned());
    orders.extend(resent);
    orders
}
