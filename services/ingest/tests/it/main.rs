//! Ingest integration tests against the real servers `cargo xtask test` starts.

mod api;
mod fuzz;
mod ops;
mod process;
mod relay;

use std::collections::HashMap;

use aws_sdk_s3::Client;
use chrono::{DateTime, TimeDelta, Utc};
use rand::Rng;
use rand::rngs::StdRng;
use tidemark_domain::Order;
use tidemark_platform::auth::{self, Scope};
use tidemark_platform::config::S3Config;
use tidemark_testkit::{Running, TestDb};
use uuid::Uuid;

/// An ingest service on port 0 with its own database and S3 prefix.
pub struct Harness {
    pub svc: Running,
    pub db: TestDb,
    pub s3: S3Config,
    pub key: String,
    pub http: reqwest::Client,
}

impl Harness {
    pub async fn start() -> Harness {
        Self::with(|_| {}).await
    }

    pub async fn with(adjust: impl FnOnce(&mut tidemark_ingest::Config)) -> Harness {
        let db = tidemark_testkit::postgres().await;
        let s3 = tidemark_testkit::s3();
        let mut config = tidemark_ingest::Config {
            postgres: db.config.clone(),
            s3: s3.clone(),
            ..Default::default()
        };
        adjust(&mut config);
        let (_, key) = auth::create(&db.pool, "test", &[Scope::Ingest], None)
            .await
            .unwrap();
        let svc = tidemark_testkit::start(|l, s| tidemark_ingest::serve(config, l, s)).await;
        Harness {
            svc,
            db,
            s3,
            key,
            http: reqwest::Client::new(),
        }
    }

    pub fn post(
        &self,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::RequestBuilder {
        self.http
            .post(self.svc.url("/v1/orders"))
            .bearer_auth(&self.key)
            .header("content-type", content_type)
            .body(body)
    }

    pub async fn post_json(&self, value: &serde_json::Value) -> reqwest::Response {
        self.post("application/json", serde_json::to_vec(value).unwrap())
            .send()
            .await
            .unwrap()
    }

    pub async fn count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM orders")
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }
}

/// A random valid order with event time within the last two days (some late).
pub fn random_order(rng: &mut StdRng) -> Order {
    let now = Utc::now();
    let created_at: DateTime<Utc> = now - TimeDelta::seconds(rng.random_range(0..172_800));
    Order {
        order_id: Uuid::from_u128(rng.random()),
        user_id: format!("u-{}", rng.random_range(0..200)),
        city: ["Berlin", "Paris", "Lisbon", "Oslo"][rng.random_range(0..4)].into(),
        product_id: format!("p-{}", rng.random_range(0..50)),
        category: ["books", "games", "garden"][rng.random_range(0..3)].into(),
        quantity: rng.random_range(1..5),
        unit_price_minor: rng.random_range(100..100_000),
        currency: ["EUR", "USD", "JPY"][rng.random_range(0..3)]
            .parse()
            .unwrap(),
        created_at: created_at.trunc_micros(),
    }
}

trait TruncMicros {
    fn trunc_micros(self) -> Self;
}

impl TruncMicros for DateTime<Utc> {
    fn trunc_micros(self) -> Self {
        chrono::SubsecRound::trunc_subsecs(self, 6)
    }
}

pub fn order_json(order: &Order) -> serde_json::Value {
    serde_json::json!({
        "order_id": order.order_id,
        "user_id": order.user_id,
        "city": order.city,
        "product_id": order.product_id,
        "category": order.category,
        "quantity": order.quantity,
        "unit_price_minor": order.unit_price_minor,
        "currency": order.currency.as_str(),
        "created_at": order.created_at.to_rfc3339(),
    })
}

/// Every raw record under the S3 prefix: order id → how many times it appears.
pub async fn raw_order_ids(s3: &S3Config) -> HashMap<Uuid, usize> {
    let client: Client = tidemark_platform::s3::client(s3).await;
    let mut counts = HashMap::new();
    for key in list_keys(&client, s3, "raw/").await {
        let body = client
            .get_object()
            .bucket(&s3.bucket)
            .key(&key)
            .send()
            .await
            .unwrap()
            .body
            .collect()
            .await
            .unwrap()
            .into_bytes();
        for line in body.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let record: tidemark_orderlog::RawRecord = serde_json::from_slice(line).unwrap();
            *counts.entry(record.order_id).or_insert(0) += 1;
        }
    }
    counts
}

/// Every object key under `prefix` (relative to the S3 config's prefix).
pub async fn list_keys(client: &Client, s3: &S3Config, prefix: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut token = None;
    loop {
        let page = client
            .list_objects_v2()
            .bucket(&s3.bucket)
            .prefix(s3.key(prefix))
            .set_continuation_token(token)
            .send()
            .await
            .unwrap();
        keys.extend(
            page.contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_owned)),
        );
        token = page.next_continuation_token().map(str::to_owned);
        if token.is_none() {
            return keys;
        }
    }
}

pub async fn pg_order_ids(pool: &sqlx::PgPool) -> Vec<Uuid> {
    sqlx::query_scalar("SELECT order_id FROM orders")
        .fetch_all(pool)
        .await
        .unwrap()
}
