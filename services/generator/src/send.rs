//! Sending orders and their corrections to the ingest API, and the tally of what
//! it accepted.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tidemark_domain::avro::{SchemaVersion, write_container};
use tidemark_domain::{Currency, Order};

use crate::model::{Correction, Profile};
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
    adjustments_url: String,
    customers_url: String,
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
    /// Refunds and cancellations stored by the generator's requests.
    pub refunds: u64,
    pub cancellations: u64,
    /// Corrections ingest already had, and corrections refused or undelivered.
    pub correction_duplicates: u64,
    pub corrections_rejected: u64,
    /// What the stored refunds and cancellations gave back, minor units per currency.
    pub refunded_minor: BTreeMap<String, i64>,
    /// Customer versions recorded, sent again unchanged, and refused or undelivered.
    pub customers_recorded: u64,
    pub customers_unchanged: u64,
    pub customers_rejected: u64,
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
        self.refunds += other.refunds;
        self.cancellations += other.cancellations;
        self.correction_duplicates += other.correction_duplicates;
        self.corrections_rejected += other.corrections_rejected;
        for (currency, minor) in &other.refunded_minor {
            *self.refunded_minor.entry(currency.clone()).or_default() += minor;
        }
        self.customers_recorded += other.customers_recorded;
        self.customers_unchanged += other.customers_unchanged;
        self.customers_rejected += other.customers_rejected;
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
        writeln!(f, "  refunds          {:>14}", self.refunds)?;
        writeln!(f, "  cancellations    {:>14}", self.cancellations)?;
        writeln!(
            f,
            "  customer versions {:>13} (unchanged {}, rejected {})",
            self.customers_recorded, self.customers_unchanged, self.customers_rejected
        )?;
        if self.correction_duplicates + self.corrections_rejected > 0 {
            writeln!(
                f,
                "  corrections resent {:>12}, rejected {}",
                self.correction_duplicates, self.corrections_rejected
            )?;
        }
        writeln!(
            f,
            "  by currency (created orders and corrections): gross, refunded, net"
        )?;
        let codes: std::collections::BTreeSet<&String> = self
            .revenue_minor
            .keys()
            .chain(self.refunded_minor.keys())
            .collect();
        for code in codes {
            let currency: Currency = code.parse().expect("came from an order");
            let gross = self.revenue_minor.get(code).copied().unwrap_or(0);
            let refunded = self.refunded_minor.get(code).copied().unwrap_or(0);
            writeln!(
                f,
                "    {code}  {:>18}  {:>16}  {:>18}   ({} net minor units)",
                format_minor(gross, currency),
                format_minor(refunded, currency),
                format_minor(gross - refunded, currency),
                gross - refunded
            )?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct IngestAnswer {
    duplicate_order_ids: Vec<uuid::Uuid>,
}

#[derive(Deserialize)]
struct AdjustmentsAnswer {
    duplicate_adjustment_ids: Vec<uuid::Uuid>,
    adjustments: Vec<AdjustmentAnswer>,
}

#[derive(Deserialize)]
struct CustomersAnswer {
    recorded: u64,
    unchanged: u64,
}

#[derive(Deserialize)]
struct AdjustmentAnswer {
    adjustment_id: uuid::Uuid,
    order_id: uuid::Uuid,
    kind: String,
    amount_minor: i64,
}

impl Sender {
    pub fn new(ingest_url: &str, api_key: &str, format: Format) -> anyhow::Result<Sender> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Sender {
            client,
            url: format!("{}/v1/orders", ingest_url.trim_end_matches('/')),
            adjustments_url: format!("{}/v1/adjustments", ingest_url.trim_end_matches('/')),
            customers_url: format!("{}/v1/customers", ingest_url.trim_end_matches('/')),
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

    /// Sends one batch of orders; a refused batch counts as rejected.
    pub async fn send(&self, orders: &[Order]) -> anyhow::Result<Tally> {
        let mut tally = Tally::default();
        if orders.is_empty() {
            return Ok(tally);
        }
        let (body, content_type) = self.body(orders)?;
        match self
            .post(&self.url, body, content_type, orders.len())
            .await?
        {
            Some(answer) => {
                let answer: IngestAnswer =
                    serde_json::from_value(answer).context("reading ingest's answer")?;
                tally.duplicates += answer.duplicate_order_ids.len() as u64;
                tally.created(orders, &answer.duplicate_order_ids);
            }
            None => tally.rejected += orders.len() as u64,
        }
        Ok(tally)
    }

    /// Sends refunds and cancellations in one all-or-nothing request to
    /// `POST /v1/adjustments`; a refused request counts them all as rejected.
    pub async fn send_corrections(&self, corrections: &[Correction]) -> anyhow::Result<Tally> {
        let mut tally = Tally::default();
        if corrections.is_empty() {
            return Ok(tally);
        }
        let items: Vec<serde_json::Value> = corrections.iter().map(correction_json).collect();
        let body = serde_json::to_vec(&items)?;
        let Some(answer) = self
            .post(
                &self.adjustments_url,
                body,
                "application/json",
                corrections.len(),
            )
            .await?
        else {
            tally.corrections_rejected += corrections.len() as u64;
            return Ok(tally);
        };
        let answer: AdjustmentsAnswer =
            serde_json::from_value(answer).context("reading ingest's answer")?;
        let currency_of: BTreeMap<uuid::Uuid, Currency> = corrections
            .iter()
            .map(|c| (c.order_id, c.currency))
            .collect();
        for adjustment in answer.adjustments {
            if answer
                .duplicate_adjustment_ids
                .contains(&adjustment.adjustment_id)
            {
                tally.correction_duplicates += 1;
                continue;
            }
            match adjustment.kind.as_str() {
                "refund" => tally.refunds += 1,
                _ => tally.cancellations += 1,
            }
            if let Some(currency) = currency_of.get(&adjustment.order_id) {
                *tally
                    .refunded_minor
                    .entry(currency.as_str().to_owned())
                    .or_default() += adjustment.amount_minor;
            }
        }
        Ok(tally)
    }

    /// Sends customer versions to `POST /v1/customers` (one all-or-nothing request
    /// per 5,000); a refused request counts them as rejected.
    pub async fn send_customers(&self, profiles: &[Profile]) -> anyhow::Result<Tally> {
        let mut tally = Tally::default();
        for chunk in profiles.chunks(5_000) {
            let items: Vec<serde_json::Value> = chunk.iter().map(profile_json).collect();
            let body = serde_json::to_vec(&items)?;
            match self
                .post(&self.customers_url, body, "application/json", chunk.len())
                .await?
            {
                Some(answer) => {
                    let answer: CustomersAnswer =
                        serde_json::from_value(answer).context("reading ingest's answer")?;
                    tally.customers_recorded += answer.recorded;
                    tally.customers_unchanged += answer.unchanged;
                }
                None => tally.customers_rejected += chunk.len() as u64,
            }
        }
        Ok(tally)
    }

    /// Posts one request of `count` items, retrying on 429, 503 and connection
    /// failures with the server's `Retry-After` (or exponential backoff). The
    /// answer when accepted; `None` when refused (logged with ingest's problem
    /// detail) or undeliverable.
    async fn post(
        &self,
        url: &str,
        body: Vec<u8>,
        content_type: &str,
        count: usize,
    ) -> anyhow::Result<Option<serde_json::Value>> {
        let mut backoff = Duration::from_millis(100);
        for attempt in 1..=self.attempts {
            let response = self
                .client
                .post(url)
                .bearer_auth(&self.api_key)
                .header("content-type", content_type)
                .body(body.clone())
                .send()
                .await;
            let wait = match response {
                Ok(r) if r.status().is_success() => {
                    return Ok(Some(r.json().await.context("reading ingest's answer")?));
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
                    tracing::warn!(%status, %detail, url, count, "ingest refused a batch");
                    return Ok(None);
                }
                Err(error) => {
                    tracing::warn!(%error, attempt, "ingest unreachable");
                    backoff
                }
            };
            tokio::time::sleep(wait.min(Duration::from_secs(10))).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        tracing::warn!(url, count, "giving up on a batch");
        Ok(None)
    }
}

/// The item `POST /v1/customers` accepts for a customer version.
pub fn profile_json(p: &Profile) -> serde_json::Value {
    serde_json::json!({
        "user_id": p.user_id,
        "city": p.city,
        "segment": p.segment,
        "signed_up_at": p.signed_up_at.to_rfc3339(),
        "effective_at": p.effective_at.to_rfc3339(),
    })
}

/// The item `POST /v1/adjustments` accepts for a correction.
pub fn correction_json(c: &Correction) -> serde_json::Value {
    match &c.refund {
        Some(refund) => serde_json::json!({
            "kind": "refund", "order_id": c.order_id, "refund_id": refund.refund_id,
            "created_at": refund.created_at.to_rfc3339(), "items": refund.items,
        }),
        None => serde_json::json!({
            "kind": "cancellation", "order_id": c.order_id, "created_at": c.at.to_rfc3339(),
        }),
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
