//! Serving integration tests: the whole pipeline on real servers (ingest's relay,
//! the speed consumer, the compactor) behind the REST and GraphQL APIs.

mod api;
mod corrections;
mod dashboards;
mod demo;
mod fuzz;
mod merge;
mod model;
mod ops;
mod page;
mod process;
mod replicas;
mod residence;
mod slices;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use rand::Rng;
use rand::rngs::StdRng;
use tidemark_compactor::Compactor;
use tidemark_domain::{Order, RefundItem, RefundRequest};
use tidemark_ingest::adjust::Ask;
use tidemark_platform::auth::{self, Scope};
use tidemark_platform::config::RedisConfig;
use tidemark_platform::redis::Redis;
use tidemark_speedview::SpeedView;
use tidemark_testkit::{Running, TestDb};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub struct Env {
    /// A Postgres cluster of the test's own, when it needs one.
    _private: Option<tidemark_testkit::PrivatePostgres>,
    pub db: TestDb,
    pub redis: RedisConfig,
    pub clickhouse: tidemark_platform::config::ClickHouseConfig,
    pub s3: tidemark_platform::config::S3Config,
    pub compactor: Compactor,
    pub serving: Running,
    pub key: String,
    pub http: reqwest::Client,
    background: CancellationToken,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.background.cancel();
    }
}

impl Env {
    pub async fn new() -> Env {
        Self::with(tidemark_testkit::redis(), |_| {}).await
    }

    pub async fn with(
        redis: RedisConfig,
        adjust: impl FnOnce(&mut tidemark_serving::Config),
    ) -> Env {
        Self::build(redis, false, adjust).await
    }

    /// With a Postgres cluster of its own: no other test's transaction can hold the
    /// log horizon back (it is cluster-wide), so latencies are this test's alone.
    pub async fn isolated() -> Env {
        Self::build(tidemark_testkit::redis(), true, |_| {}).await
    }

    async fn build(
        redis: RedisConfig,
        private_postgres: bool,
        adjust: impl FnOnce(&mut tidemark_serving::Config),
    ) -> Env {
        let (private, db) = if private_postgres {
            let pg = tidemark_testkit::PrivatePostgres::start().await;
            let db = TestDb::of("postgres", pg.config());
            (Some(pg), db)
        } else {
            (None, tidemark_testkit::postgres().await)
        };
        let s3 = tidemark_testkit::s3();
        let ch = tidemark_testkit::clickhouse();
        let background = CancellationToken::new();

        let mut compactor_config = tidemark_compactor::Config {
            postgres: db.config.clone(),
            s3: s3.clone(),
            clickhouse: ch.clone(),
            ..Default::default()
        };
        compactor_config.compactor.relay_wait = Duration::from_secs(30);
        // A read-back hung for minutes in 2 of 5 suite runs (see CompactorSettings):
        // a test's runs are small, so a try that outlasts 20 s is abandoned sooner.
        compactor_config.compactor.read_back_timeout = Duration::from_secs(20);
        let compactor = tidemark_compactor::connect(&compactor_config)
            .await
            .unwrap();

        let relay = tidemark_ingest::relay::Relay::new(
            db.pool.clone(),
            tidemark_platform::s3::client(&s3).await,
            s3.clone(),
            tidemark_ingest::config::RelaySettings {
                poll_interval: Duration::from_millis(10),
                ..Default::default()
            },
            tidemark_platform::lease::Lease::unfenced("lake-relay"),
        );
        tokio::spawn(relay.run(background.clone()));
        let speed = tidemark_speed::Consumer::new(
            db.pool.clone(),
            SpeedView::new(Arc::new(Redis::new(&redis).unwrap())),
            tidemark_speed::config::SpeedSettings {
                poll_interval: Duration::from_millis(10),
                max_backoff: Duration::from_millis(200),
                ..Default::default()
            },
            tidemark_platform::lease::Lease::unfenced("speed"),
        );
        tokio::spawn(speed.run(background.clone()));
        let vault = tidemark_ingest::vault::Loader::new(
            db.pool.clone(),
            tidemark_ingest::config::VaultSettings {
                poll_interval: Duration::from_millis(10),
                ..Default::default()
            },
            tidemark_platform::lease::Lease::unfenced("vault"),
        );
        tokio::spawn(vault.run(background.clone()));

        let mut config = tidemark_serving::Config {
            postgres: db.config.clone(),
            redis: redis.clone(),
            clickhouse: ch.clone(),
            ..Default::default()
        };
        config.serving.state_ttl = Duration::ZERO;
        adjust(&mut config);
        let serving = tidemark_testkit::start(|l, s| tidemark_serving::serve(config, l, s)).await;
        let (_, key) = auth::create(&db.pool, "reader", &[Scope::Read], None)
            .await
            .unwrap();
        Env {
            _private: private,
            db,
            redis,
            clickhouse: ch,
            s3,
            compactor,
            serving,
            key,
            http: reqwest::Client::new(),
            background,
        }
    }

    pub async fn ingest(&self, orders: &[Order]) {
        for chunk in orders.chunks(200) {
            tidemark_ingest::store::store(&self.db.pool, chunk)
                .await
                .unwrap();
        }
    }

    /// The ingest HTTP API on this environment's database (its relay off: the
    /// environment runs one), and an `ingest` key for it.
    pub async fn ingest_api(&self) -> (Running, String) {
        let mut config = tidemark_ingest::Config {
            postgres: self.db.config.clone(),
            s3: tidemark_testkit::s3(),
            ..Default::default()
        };
        config.relay.enabled = false;
        let ingest = tidemark_testkit::start(|l, s| tidemark_ingest::serve(config, l, s)).await;
        let (_, key) = auth::create(&self.db.pool, "ingest", &[Scope::Ingest], None)
            .await
            .unwrap();
        (ingest, key)
    }

    /// Waits until the warehouse has loaded every committed row of the log (order
    /// history and revenue by residence are served from it).
    pub async fn vault_caught_up(&self) {
        tidemark_testkit::eventually(
            Duration::from_secs(60),
            "the vault loader catches up",
            || async {
                tidemark_ingest::vault::lag(&self.db.pool)
                    .await
                    .is_ok_and(|lag| lag.rows == 0)
            },
        )
        .await;
    }

    /// Waits until the speed layer has applied the newest committed order.
    pub async fn speed_caught_up(&self) {
        let head = tidemark_testkit::log_head(&self.db.pool).await;
        let view = SpeedView::new(Arc::new(Redis::new(&self.redis).unwrap()));
        tidemark_testkit::eventually(
            Duration::from_secs(30),
            "the speed layer catches up",
            || {
                let view = view.clone();
                async move {
                    let cursor = view
                        .meta()
                        .await
                        .ok()
                        .flatten()
                        .map(|m| (m.cursor.txid, m.cursor.seq));
                    head.is_none() || cursor >= head
                }
            },
        )
        .await;
    }

    pub async fn get(&self, path_and_query: &str) -> reqwest::Response {
        self.http
            .get(self.serving.url(path_and_query))
            .bearer_auth(&self.key)
            .send()
            .await
            .unwrap()
    }

    pub async fn graphql(&self, query: &str) -> serde_json::Value {
        self.http
            .post(self.serving.url("/graphql"))
            .bearer_auth(&self.key)
            .json(&serde_json::json!({ "query": query }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

/// A grid in ground-truth shape from a REST/GraphQL series' points.
pub fn grid_of(points: &serde_json::Value) -> BTreeMap<(i64, String, String), [i64; 3]> {
    points
        .as_array()
        .expect("points")
        .iter()
        .map(|p| {
            let bucket = chrono::DateTime::parse_from_rfc3339(p["bucket"].as_str().unwrap())
                .unwrap()
                .timestamp();
            let group = p["group"].as_str().unwrap_or("").to_owned();
            let currency = p["currency"].as_str().unwrap().to_owned();
            let n = |k: &str| p[k].as_i64().unwrap();
            (
                (bucket, group, currency),
                [n("revenue_minor"), n("orders"), n("items")],
            )
        })
        .collect()
}

/// Cells on one basis: gross revenue, orders, items, refunded minor units,
/// refunded items, cancelled orders.
pub type Cells = BTreeMap<(i64, String, String), [i64; 6]>;

/// A refund of part of each of the order's first lines (units of the first, an
/// amount of the second, if any).
pub fn partial_refund(order: &Order, rng: &mut StdRng) -> Ask {
    let mut items = vec![RefundItem::Units {
        product_id: order.lines[0].product_id.clone(),
        quantity: 1,
    }];
    if let Some(line) = order.lines.get(1) {
        items.push(RefundItem::Amount {
            product_id: line.product_id.clone(),
            amount_minor: rng.random_range(1..=line.revenue_minor().max(1)),
        });
    }
    Ask::Refund {
        order_id: order.order_id,
        request: RefundRequest {
            refund_id: Uuid::new_v4(),
            // Minutes to days after the order, never in the future.
            created_at: (order.created_at + TimeDelta::minutes(rng.random_range(1..3_000)))
                .min(Utc::now()),
            items,
        },
    }
}

pub fn cancellation(order: &Order) -> Ask {
    Ask::Cancellation {
        order_id: order.order_id,
        created_at: Utc::now(),
    }
}

/// Applies adjustments as ingest does (one transaction, all or nothing).
pub async fn apply_adjustments(
    pool: &sqlx::PgPool,
    asks: &[Ask],
) -> Result<Vec<tidemark_ingest::adjust::Done>, tidemark_ingest::adjust::AdjustError> {
    tidemark_ingest::adjust::apply(pool, asks, Utc::now(), TimeDelta::minutes(5)).await
}

/// Served cells on `basis`: gross, orders, items, refunded, refunded items,
/// cancelled (cells with nothing on that basis left out).
pub async fn served_cells(
    http: &reqwest::Client,
    serving: &Running,
    key: &str,
    granularity: &str,
    group_by: Option<&str>,
    basis: &str,
) -> Result<Cells, String> {
    let (from, to) = full_range();
    let mut path =
        format!("/v1/revenue?from={from}&to={to}&granularity={granularity}&basis={basis}");
    if let Some(g) = group_by {
        path += &format!("&group_by={g}");
    }
    let response = http
        .get(serving.url(&path))
        .bearer_auth(key)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("{status}: {body}"));
    }
    Ok(body["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let bucket = chrono::DateTime::parse_from_rfc3339(p["bucket"].as_str().unwrap())
                .unwrap()
                .timestamp();
            let n = |k: &str| p[k].as_i64().unwrap();
            assert_eq!(
                n("net_revenue_minor"),
                n("revenue_minor") - n("refunded_minor")
            );
            assert_eq!(n("gross_revenue_minor"), n("revenue_minor"));
            (
                (
                    bucket,
                    p["group"].as_str().unwrap_or("").to_owned(),
                    p["currency"].as_str().unwrap().to_owned(),
                ),
                [
                    n("revenue_minor"),
                    n("orders"),
                    n("items"),
                    n("refunded_minor"),
                    n("refunded_items"),
                    n("cancelled_orders"),
                ],
            )
        })
        .collect())
}

/// The same cells by SQL over Postgres (values dropped when not `grouped`).
pub async fn truth_cells(
    pool: &sqlx::PgPool,
    secs: i64,
    dimension: &str,
    grouped: bool,
    order_time: bool,
) -> Cells {
    let key = |(b, v, c): (i64, String, String)| (b, if grouped { v } else { String::new() }, c);
    let mut cells = Cells::new();
    for (k, [r, o, i]) in tidemark_testkit::ground_truth(pool, secs, dimension, 0, u64::MAX).await {
        cells.entry(key(k)).or_default()[..3].copy_from_slice(&[r, o, i]);
    }
    let corrections =
        tidemark_testkit::ground_truth_corrections(pool, secs, dimension, order_time, 0, u64::MAX)
            .await;
    for (k, [f, fi, c]) in corrections {
        cells.entry(key(k)).or_default()[3..].copy_from_slice(&[f, fi, c]);
    }
    cells
}

pub use tidemark_testkit::random_order;

/// From five midnights back to the next midnight (six days, 8,640 minutes: under
/// `serving.max_points`), RFC 3339, URL-safe. It must hold every order the tests
/// make at any time of day: the oldest are 102 hours old (`random_order`'s three
/// days plus the model test's 30 late hours). With four days back from midnight,
/// between 00:00 and 06:00 UTC the oldest minutes fell outside the range.
pub fn full_range() -> (String, String) {
    let today = Utc::now().date_naive();
    let day = |d: chrono::NaiveDate| d.format("%Y-%m-%dT00:00:00Z").to_string();
    (
        day(today - chrono::Days::new(5)),
        day(today + chrono::Days::new(1)),
    )
}

/// The served answer to `slice` over `[from, to)` (RFC 3339 or local times), as
/// [`tidemark_testkit::SliceCells`]: cells with nothing on the basis left out.
pub async fn served_slice(
    env: &Env,
    slice: &tidemark_testkit::Slice,
    from: &str,
    to: &str,
) -> Result<tidemark_testkit::SliceCells, String> {
    served_slice_at(&env.http, &env.serving, &env.key, slice, from, to).await
}

/// [`served_slice`] from a serving instance.
pub async fn served_slice_at(
    http: &reqwest::Client,
    serving: &Running,
    key: &str,
    slice: &tidemark_testkit::Slice,
    from: &str,
    to: &str,
) -> Result<tidemark_testkit::SliceCells, String> {
    let path = format!("/v1/revenue?from={from}&to={to}&{}", slice.query());
    let response = http
        .get(serving.url(&path))
        .bearer_auth(key)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("{path}: {status}: {body}"));
    }
    Ok(slice_cells(&body["points"], &slice.group_by))
}

/// Cells from a series' points (REST or GraphQL field names), the grouped values
/// read from `dimensions` in `group_by`'s order.
pub fn slice_cells(points: &serde_json::Value, group_by: &[&str]) -> tidemark_testkit::SliceCells {
    points
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let bucket = chrono::DateTime::parse_from_rfc3339(p["bucket"].as_str().unwrap())
                .unwrap()
                .timestamp();
            let local = p
                .get("local_bucket")
                .or_else(|| p.get("localBucket"))
                .and_then(|v| v.as_str())
                .map(|l| chrono::DateTime::parse_from_rfc3339(l).unwrap().timestamp());
            assert_eq!(
                local,
                Some(bucket),
                "the local bucket is the same instant: {p}"
            );
            let values = group_by
                .iter()
                .map(|a| p["dimensions"][a].as_str().unwrap().to_owned())
                .collect();
            let n = |rest: &str, graphql: &str| {
                p.get(rest)
                    .or_else(|| p.get(graphql))
                    .and_then(serde_json::Value::as_i64)
                    .unwrap()
            };
            (
                (bucket, values, p["currency"].as_str().unwrap().to_owned()),
                [
                    n("revenue_minor", "revenueMinor"),
                    n("orders", "orders"),
                    n("items", "items"),
                    n("refunded_minor", "refundedMinor"),
                    n("refunded_items", "refundedItems"),
                    n("cancelled_orders", "cancelledOrders"),
                    n("buyers", "buyers"),
                ],
            )
        })
        .collect()
}

/// A graphql-transport-ws upgrade request to `/graphql/ws` at `addr` (host:port),
/// with the read key as a bearer header when given (a browser cannot send one).
pub fn subscription_request(
    addr: impl std::fmt::Display,
    key: Option<&str>,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{addr}/graphql/ws")
        .into_client_request()
        .unwrap();
    let headers = request.headers_mut();
    headers.insert(
        "sec-websocket-protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    if let Some(key) = key {
        headers.insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    request
}
