//! Sending orders to the ingest API, and the tally of what it accepted.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tidemark_domain::Order;
use tidemark_domain::avro::{SchemaVersion, write_container};
use tidemark_domain::money::format_minor;

/// The wire format of a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A JSON array of orders.
    #[default]
    Json,
    /// An Avro Object Container File written with the current order schema.
    Avro,
}

/// Sends batches of orders to `POST /v1/orders`, retrying what may be retried.
#[derive(Clone)]
pub struct Sender {
    client: reqwest::Client,
    url: String,
    api_key: String,
    format: Format,
    /// Attempts per batch when ingest answers 429/503 or cannot be reached.
    pub attempts: u32,
}

/// What ingest did with one batch.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct Tally {
    /// Orders stored by the generator's requests.
    pub created: u64,
    /// Orders ingest already had, with identical content.
    pub duplicates: u64,
    /// Orders in batches ingest refused (4xx) or that could not be delivered.
    pub rejected: u64,
    /// Revenue of the created orders, minor units per currency.
    pub revenue_minor: BTreeMap<String, i64>,
    /// Items of the created orders.
    pub items: u64,
    /// Earliest and latest event time of the created orders.
    pub first_event: Option<DateTime<Utc>>,
    pub last_event: Option<DateTime<Utc>>,
}

impl Tally {
    pub fn add(&mut self, other: &Tally) {
        self.created += other.created;
        self.duplicates += other.duplicates;
        self.rejected += other.rejected;
        self.items += other.items;
        self.first_event = match (self.first_event, other.first_event) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last_event = self.last_event.max(other.last_event);
        for (currency, minor) in &other.revenue_minor {
            *self.revenue_minor.entry(currency.clone()).or_default() += minor;
        }
    }

    /// The orders that were stored, counted into the tally.
    fn created(&mut self, orders: &[Order], duplicate_ids: &[uuid::Uuid]) {
        for o in orders {
            if duplicate_ids.contains(&o.order_id) {
                continue;
            }
            self.created += 1;
            self.items += o.items() as u64;
            self.first_event = Some(
                self.first_event
                    .map_or(o.created_at, |t| t.min(o.created_at)),
            );
            self.last_event = Some(
                self.last_event
                    .map_or(o.created_at, |t| t.max(o.created_at)),
            );
            *self
                .revenue_minor
                .entry(o.currency.as_str().to_owned())
                .or_default() += o.revenue_minor();
        }
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  orders created   {:>14}", self.created)?;
        writeln!(f, "  items            {:>14}", self.items)?;
        writeln!(f, "  duplicates       {:>14}", self.duplicates)?;
        writeln!(f, "  rejected         {:>14}", self.rejected)?;
        writeln!(f, "  revenue by currency (created orders):")?;
        for (code, minor) in &self.revenue_minor {
            let currency = code.parse().expect("came from an order");
            writeln!(
                f,
                "    {code}  {:>20}   ({minor} minor units)",
                format_minor(*minor, currency)
            )?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct IngestAnswer {
    duplicate_order_ids: Vec<uuid::Uuid>,
}

impl Sender {
    pub fn new(ingest_url: &str, api_key: &str, format: Format) -> anyhow::Result<Sender> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Sender {
            client,
            url: format!("{}/v1/orders", ingest_url.trim_end_matches('/')),
            api_key: api_key.to_owned(),
            format,
            attempts: 8,
        })
    }

    fn body(&self, orders: &[Order]) -> anyhow::Result<(Vec<u8>, &'static str)> {
        Ok(match self.format {
            Format::Json => {
                let items: Vec<_> = orders.iter().map(order_json).collect();
                (serde_json::to_vec(&items)?, "application/json")
            }
            Format::Avro => (
                write_container(orders, SchemaVersion::CURRENT).context("encoding Avro")?,
                "application/avro",
            ),
        })
    }

    /// Sends one batch, retrying on 429, 503 and connection failures with the
    /// server's `Retry-After` (or exponential backoff); a refused batch counts as
    /// rejected and is logged with ingest's problem detail.
    pub async fn send(&self, orders: &[Order]) -> anyhow::Result<Tally> {
        let mut tally = Tally::default();
        if orders.is_empty() {
            return Ok(tally);
        }
        let (body, content_type) = self.body(orders)?;
        let mut backoff = Duration::from_millis(100);
        for attempt in 1..=self.attempts {
            let response = self
                .client
                .post(&self.url)
                .bearer_auth(&self.api_key)
                .header("content-type", content_type)
                .body(body.clone())
                .send()
                .await;
            let wait = match response {
                Ok(r) if r.status().is_success() => {
                    let answer: IngestAnswer = r.json().await.context("reading ingest's answer")?;
                    tally.duplicates += answer.duplicate_order_ids.len() as u64;
                    tally.created(orders, &answer.duplicate_order_ids);
                    return Ok(tally);
                }
                Ok(r) if r.status() == 429 || r.status() == 503 => r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                    .map_or(backoff, Duration::from_secs),
                Ok(r) => {
                    let status = r.status();
                    // The problem's sentence; not its lists of ids, which can be long.
                    let detail = r
                        .json::<serde_json::Value>()
                        .await
                        .ok()
                        .and_then(|p| p["detail"].as_str().map(str::to_owned))
                        .unwrap_or_default();
                    tracing::warn!(%status, %detail, orders = orders.len(), "ingest refused a batch");
                    tally.rejected += orders.len() as u64;
                    return Ok(tally);
                }
                Err(error) => {
                    tracing::warn!(%error, attempt, "ingest unreachable");
                    backoff
                }
            };
            tokio::time::sleep(wait.min(Duration::from_secs(10))).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        tracing::warn!(orders = orders.len(), "giving up on a batch");
        tally.rejected += orders.len() as u64;
        Ok(tally)
    }
}

/// The JSON object ingest accepts for an order: a one-line order with the line's
/// fields at the top level, a basket with `items`.
pub fn order_json(o: &Order) -> serde_json::Value {
    let line = |l: &tidemark_domain::OrderLine| {
        serde_json::json!({
            "product_id": l.product_id, "category": l.category, "quantity": l.quantity,
            "unit_price_minor": l.unit_price_minor,
        })
    };
    let mut json = serde_json::json!({
        "order_id": o.order_id, "user_id": o.user_id, "city": o.city,
        "currency": o.currency.as_str(), "created_at": o.created_at.to_rfc3339(),
    });
    let fields = json.as_object_mut().expect("an object");
    match o.lines.as_slice() {
        [one] => fields.extend(line(one).as_object().expect("an object").clone()),
        lines => {
            fields.insert("items".into(), lines.iter().map(line).collect());
        }
    }
    json
}
