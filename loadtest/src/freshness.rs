//! Freshness: from an order's ingest 2xx to the moment it is visible in the speed
//! view, at a fixed ingest rate.
//!
//! The driver records when each order was acknowledged and samples the speed
//! view's cursor (which moves atomically with the data) every millisecond. After
//! the run, each order's log position comes from Postgres; it became visible at
//! the first sample whose cursor had reached it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::{order_json, orders};

/// When the cursor moved, and to where: `(since start, (txid, seq))`.
type Timeline = Vec<(Duration, (i64, i64))>;

pub struct Settings {
    pub ingest_url: String,
    pub key: String,
    pub redis_url: String,
    pub prefix: String,
    pub postgres_url: String,
    pub rate: u64,
    pub batch: usize,
    pub seconds: u64,
    pub seed: u64,
    /// Share of the orders refunded right after their ingest (a bulk
    /// `POST /v1/adjustments` per batch); their freshness is measured too.
    pub adjust_share: f64,
}

/// What the freshness run measured: ingest 2xx → visible in the speed view.
#[derive(Debug, Serialize, Deserialize)]
pub struct FreshnessReport {
    pub orders: usize,
    pub target_rate: u64,
    pub achieved_rate: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub errors: u64,
    /// Refunds sent and acknowledged, and their freshness p99 (2xx → visible).
    #[serde(default)]
    pub adjustments: usize,
    #[serde(default)]
    pub adjustment_p99_ms: f64,
}

pub async fn run(s: Settings) -> anyhow::Result<FreshnessReport> {
    let all = orders(s.seed, (s.rate * s.seconds) as usize);
    let client = reqwest::Client::new();
    let url = format!("{}/v1/orders", s.ingest_url.trim_end_matches('/'));
    let adjust_url = format!("{}/v1/adjustments", s.ingest_url.trim_end_matches('/'));
    let redis = redis::Client::open(s.redis_url.as_str())?;
    let mut conn = redis.get_multiplexed_async_connection().await?;
    let meta = format!("{}:meta", s.prefix);

    let start = Instant::now();
    let acks: Arc<Mutex<Vec<(Uuid, Duration)>>> = Arc::new(Mutex::new(Vec::new()));
    let adjustment_acks: Arc<Mutex<Vec<(Uuid, Duration)>>> = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let timeline: Arc<Mutex<Timeline>> = Arc::new(Mutex::new(Vec::new()));
    let sending_done = tokio_util_like::Flag::default();

    // Sample the cursor until every order is visible.
    let sampler = {
        let timeline = timeline.clone();
        let meta = meta.clone();
        let mut conn = conn.clone();
        let done = sending_done.clone();
        tokio::spawn(async move {
            let mut last = (-1, -1);
            loop {
                let cur: (Option<i64>, Option<i64>) = redis::cmd("HMGET")
                    .arg(&meta)
                    .arg(&["txid", "seq"])
                    .query_async(&mut conn)
                    .await
                    .unwrap_or((None, None));
                if let (Some(t), Some(q)) = cur
                    && (t, q) != last
                {
                    last = (t, q);
                    timeline.lock().unwrap().push((start.elapsed(), last));
                }
                if done.get() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };

    let interval = Duration::from_secs_f64(s.batch as f64 / s.rate as f64);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let in_flight = Arc::new(Semaphore::new(64));
    let mut tasks = Vec::new();
    for chunk in all.chunks(s.batch) {
        tick.tick().await;
        let permit = in_flight.clone().acquire_owned().await?;
        let body = serde_json::to_vec(&chunk.iter().map(order_json).collect::<Vec<_>>())?;
        let ids: Vec<Uuid> = chunk.iter().map(|o| o.order_id).collect();
        let request = client
            .post(&url)
            .bearer_auth(&s.key)
            .header("content-type", "application/json")
            .body(body)
            .send();
        // Refunds of the batch's first orders: one unit of their first line.
        let refunds: Vec<(Uuid, serde_json::Value)> = chunk
            .iter()
            .take((chunk.len() as f64 * s.adjust_share).round() as usize)
            .map(|o| {
                let id = Uuid::new_v4();
                let refund = serde_json::json!({
                    "kind": "refund", "order_id": o.order_id, "refund_id": id,
                    "created_at": o.created_at.to_rfc3339(),
                    "items": [{"product_id": o.lines[0].product_id, "quantity": 1}],
                });
                (id, refund)
            })
            .collect();
        let (acks, adjustment_acks, errors) =
            (acks.clone(), adjustment_acks.clone(), errors.clone());
        let (client, adjust_url, key) = (client.clone(), adjust_url.clone(), s.key.clone());
        tasks.push(tokio::spawn(async move {
            let ok = matches!(request.await, Ok(r) if r.status().is_success());
            let at = start.elapsed();
            if ok {
                acks.lock()
                    .unwrap()
                    .extend(ids.into_iter().map(|id| (id, at)));
            } else {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            if ok && !refunds.is_empty() {
                let body: Vec<&serde_json::Value> = refunds.iter().map(|(_, r)| r).collect();
                let answer = client
                    .post(&adjust_url)
                    .bearer_auth(&key)
                    .json(&body)
                    .send()
                    .await;
                let at = start.elapsed();
                if matches!(answer, Ok(r) if r.status().is_success()) {
                    adjustment_acks
                        .lock()
                        .unwrap()
                        .extend(refunds.into_iter().map(|(id, _)| (id, at)));
                } else {
                    errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            drop(permit);
        }));
    }
    for t in tasks {
        t.await?;
    }
    let send_seconds = start.elapsed().as_secs_f64();

    // Positions of the acknowledged orders.
    let acks = std::mem::take(&mut *acks.lock().unwrap());
    let pool = sqlx::PgPool::connect(&s.postgres_url).await?;
    let ids: Vec<Uuid> = acks.iter().map(|(id, _)| *id).collect();
    let positions: Vec<(Uuid, i64, i64)> = sqlx::query_as(
        "SELECT order_id, txid::text::int8, seq FROM orders WHERE order_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&pool)
    .await?;
    let adjustment_acks = std::mem::take(&mut *adjustment_acks.lock().unwrap());
    let adjustment_ids: Vec<Uuid> = adjustment_acks.iter().map(|(id, _)| *id).collect();
    let adjustment_positions: Vec<(Uuid, i64, i64)> = sqlx::query_as(
        "SELECT adjustment_id, txid::text::int8, seq FROM adjustments \
         WHERE adjustment_id = ANY($1)",
    )
    .bind(&adjustment_ids)
    .fetch_all(&pool)
    .await?;
    let newest = positions
        .iter()
        .chain(&adjustment_positions)
        .map(|p| (p.1, p.2))
        .max()
        .unwrap_or((0, 0));
    // Long enough for a speed layer far behind (at 20,000 orders/s on two cores it
    // ends a minute's stream about a million rows behind) to be measured, not given up.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let cur: (Option<i64>, Option<i64>) = redis::cmd("HMGET")
            .arg(&meta)
            .arg(&["txid", "seq"])
            .query_async(&mut conn)
            .await?;
        if let (Some(t), Some(q)) = cur
            && (t, q) >= newest
        {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the speed view did not catch up within 300 s of the stream's end"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sending_done.set();
    sampler.await?;
    let timeline = std::mem::take(&mut *timeline.lock().unwrap());

    // Each event's freshness: its ack to the first sample whose cursor reached it.
    let latencies = |positions: &[(Uuid, i64, i64)],
                     acks: Vec<(Uuid, Duration)>|
     -> anyhow::Result<Histogram<u64>> {
        let acked: std::collections::HashMap<Uuid, Duration> = acks.into_iter().collect();
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
        for (id, txid, seq) in positions {
            let index = timeline.partition_point(|(_, cursor)| *cursor < (*txid, *seq));
            let visible = timeline
                .get(index)
                .map_or_else(|| start.elapsed(), |(at, _)| *at);
            let micros = visible.saturating_sub(acked[id]).as_micros() as u64;
            histogram.saturating_record(micros.max(1));
        }
        Ok(histogram)
    };
    let histogram = latencies(&positions, acks)?;
    let adjusted = latencies(&adjustment_positions, adjustment_acks)?;
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    Ok(FreshnessReport {
        orders: positions.len(),
        target_rate: s.rate,
        achieved_rate: positions.len() as f64 / send_seconds,
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        max_ms: histogram.max() as f64 / 1000.0,
        errors: errors.load(std::sync::atomic::Ordering::Relaxed),
        adjustments: adjustment_positions.len(),
        adjustment_p99_ms: adjusted.value_at_quantile(0.99) as f64 / 1000.0,
    })
}

/// A tiny shared stop flag.
mod tokio_util_like {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[derive(Clone, Default)]
    pub struct Flag(Arc<AtomicBool>);

    impl Flag {
        pub fn set(&self) {
            self.0.store(true, Ordering::SeqCst);
        }

        pub fn get(&self) -> bool {
            self.0.load(Ordering::SeqCst)
        }
    }
}
