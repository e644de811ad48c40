//! Ingest integration tests against the real servers `cargo xtask test` starts.

mod adjust;
mod api;
mod customers;
mod fuzz;
mod fx;
mod group;
mod ops;
mod process;
mod relay;
mod store;
mod vault;

use std::collections::HashMap;

use aws_sdk_s3::Client;
use tidemark_platform::auth::{self, Scope};
use tidemark_platform::config::S3Config;
use tidemark_testkit::{Running, TestDb};
use uuid::Uuid;

/// An ingest service on port 0 with its own database and S3 bucket.
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
        Self::on(tidemark_testkit::postgres().await, adjust).await
    }

    /// On `db` (a private server's, for a test whose transactions would hold back
    /// the cluster-wide log horizon of every other test).
    pub async fn on(db: TestDb, adjust: impl FnOnce(&mut tidemark_ingest::Config)) -> Harness {
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

pub use tidemark_testkit::random_order;

pub use tidemark_generator::send::order_json;

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
