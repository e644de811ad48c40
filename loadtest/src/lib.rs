//! Load-test scenarios against a running Tidemark stack, with latency percentiles
//! from an HDR histogram and a JSON report.

pub mod freshness;
pub mod rate;
pub mod scenario;
pub mod watch;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::Utc;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tidemark_domain::Order;
use uuid::Uuid;

/// Deterministic orders for benchmarks: the same seed gives the same orders, so a
/// benchmark and its anchor load identical rows. One line each.
pub fn orders(seed: u64, count: usize) -> Vec<Order> {
    baskets(seed, count, 1)
}

/// Deterministic orders of `lines` lines each (distinct products), made in the
/// last day.
pub fn baskets(seed: u64, count: usize, lines: usize) -> Vec<Order> {
    let now = Utc::now().timestamp();
    orders_between(seed, count, lines, (now - 86_400, now))
}

/// Deterministic orders of `lines` lines each, made at random times in
/// `[from, to)` (unix seconds).
pub fn orders_between(seed: u64, count: usize, lines: usize, (from, to): (i64, i64)) -> Vec<Order> {
    let mut rng = StdRng::seed_from_u64(seed);
    let categories = ["books", "games", "garden", "kitchen"];
    (0..count)
        .map(|_| {
            let order_id = Uuid::from_u128(rng.random());
            let user_id = format!("user-{}", rng.random_range(0..100_000));
            let city = ["Berlin", "Paris", "Lisbon", "Oslo", "Madrid", "Vienna"]
                [rng.random_range(0..6)]
            .into();
            let lines = (0..lines.max(1))
                .map(|i| tidemark_domain::OrderLine {
                    // Line i draws from its own slice of the catalogue: distinct.
                    product_id: format!("sku-{}", i * 5_000 + rng.random_range(0..5_000)),
                    category: categories[rng.random_range(0..4)].into(),
                    quantity: rng.random_range(1..5),
                    unit_price_minor: rng.random_range(100..50_000),
                })
                .collect();
            Order {
                order_id,
                user_id,
                city,
                lines,
                currency: ["EUR", "USD", "GBP"][rng.random_range(0..3)]
                    .parse()
                    .expect("listed"),
                created_at: chrono::DateTime::from_timestamp_micros(
                    rng.random_range(from * 1_000_000..to.max(from + 1) * 1_000_000),
                )
                .expect("in range"),
            }
        })
        .collect()
}

pub use tidemark_generator::send::order_json;

/// Whether a GraphQL response (answered 200 either way) holds errors. Its data is
/// skipped, not built: a load generator that built every 43 KB answer as a tree
/// spent the cores it shares with the server under test.
pub fn graphql_errors(body: &[u8]) -> serde_json::Result<bool> {
    #[derive(Deserialize)]
    struct Outcome {
        #[serde(default)]
        errors: Option<serde::de::IgnoredAny>,
    }
    Ok(serde_json::from_slice::<Outcome>(body)?.errors.is_some())
}

/// What a scenario measured (printed as JSON by the load test, read back by
/// `cargo xtask bench`).
#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub requests: u64,
    pub items: u64,
    pub errors: u64,
    pub seconds: f64,
    pub requests_per_sec: f64,
    pub items_per_sec: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Failed requests by cause: an HTTP status, `timeout`, `connection`,
    /// `overloaded` (too many in flight), `graphql-errors`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub errors_by_kind: BTreeMap<String, u64>,
}

/// Collects latencies and counts from concurrent workers.
pub struct Recorder {
    histogram: std::sync::Mutex<Histogram<u64>>,
    errors: AtomicU64,
    /// Requests never sent (not in the histogram).
    unsent: AtomicU64,
    items: AtomicU64,
    causes: std::sync::Mutex<BTreeMap<String, u64>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            histogram: std::sync::Mutex::new(
                Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds"),
            ),
            errors: AtomicU64::new(0),
            unsent: AtomicU64::new(0),
            items: AtomicU64::new(0),
            causes: std::sync::Mutex::default(),
        }
    }
}

impl Recorder {
    pub fn record(&self, latency: Duration, ok: bool, items: u64) {
        let micros = (latency.as_micros() as u64).clamp(1, 120_000_000);
        self.histogram
            .lock()
            .expect("not poisoned")
            .saturating_record(micros);
        if ok {
            self.items.fetch_add(items, Ordering::Relaxed);
        } else {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A failed request and why it failed.
    pub fn record_error(&self, latency: Duration, why: &str) {
        self.record(latency, false, 0);
        self.count_cause(why);
    }

    /// A request never sent (too many in flight): an error with its cause, but
    /// no latency — it has none, and a zero would flatter the percentiles.
    pub fn unsent(&self, why: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.unsent.fetch_add(1, Ordering::Relaxed);
        self.count_cause(why);
    }

    fn count_cause(&self, why: &str) {
        *self
            .causes
            .lock()
            .expect("not poisoned")
            .entry(why.to_owned())
            .or_default() += 1;
    }

    /// Requests recorded so far, failed ones included.
    pub fn requests(&self) -> u64 {
        self.histogram.lock().expect("not poisoned").len() + self.unsent.load(Ordering::Relaxed)
    }

    pub fn report(&self, scenario: &str, elapsed: Duration) -> Report {
        let h = self.histogram.lock().expect("not poisoned");
        let seconds = elapsed.as_secs_f64();
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        let items = self.items.load(Ordering::Relaxed);
        let requests = h.len() + self.unsent.load(Ordering::Relaxed);
        Report {
            scenario: scenario.to_owned(),
            requests,
            items,
            errors: self.errors.load(Ordering::Relaxed),
            seconds,
            requests_per_sec: requests as f64 / seconds,
            items_per_sec: items as f64 / seconds,
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            max_ms: h.max() as f64 / 1000.0,
            errors_by_kind: self.causes.lock().expect("not poisoned").clone(),
        }
    }
}

/// Sends pre-built bodies to `url` with `concurrency` requests in flight; each body
/// counts `items` on success.
///
/// Each request in flight is a client of its own, as pgbench's are: a task with
/// one HTTP/1.1 connection (opened again after a failure), taking the next body
/// once its answer is read, so answers are handled on every worker thread rather
/// than in one task polling them all. A failed request's cause is its status, or
/// `connection`.
pub async fn send_all(
    url: &str,
    key: &str,
    content_type: &str,
    bodies: Vec<(Vec<u8>, u64)>,
    concurrency: usize,
) -> anyhow::Result<(Arc<Recorder>, Duration)> {
    let url = reqwest::Url::parse(url)?;
    let authority = format!(
        "{}:{}",
        url.host_str().context("a URL with a host")?,
        url.port_or_known_default().context("a URL with a port")?
    );
    let target = http::Uri::try_from(url.path())?;
    let auth = http::HeaderValue::try_from(format!("Bearer {key}"))?;
    let content_type = http::HeaderValue::try_from(content_type)?;
    let recorder = Arc::new(Recorder::default());
    let bodies = Arc::new(std::sync::Mutex::new(bodies.into_iter()));
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (recorder, bodies, authority) = (recorder.clone(), bodies.clone(), authority.clone());
        let (target, auth, content_type) = (target.clone(), auth.clone(), content_type.clone());
        clients.spawn(async move {
            let mut connection = None;
            loop {
                let Some((body, items)) = bodies.lock().expect("not poisoned").next() else {
                    return;
                };
                let request = http::Request::post(target.clone())
                    .header(http::header::HOST, &authority)
                    .header(http::header::AUTHORIZATION, &auth)
                    .header(http::header::CONTENT_TYPE, &content_type)
                    .body(Full::new(bytes::Bytes::from(body)))
                    .expect("a request of valid parts");
                let t = Instant::now();
                match send(&mut connection, &authority, request).await {
                    Ok(status) if status.is_success() => recorder.record(t.elapsed(), true, items),
                    Ok(status) => recorder.record_error(t.elapsed(), status.as_str()),
                    Err(_) => {
                        connection = None;
                        recorder.record_error(t.elapsed(), "connection");
                    }
                }
            }
        });
    }
    while let Some(done) = clients.join_next().await {
        done.context("a load-test client panicked")?;
    }
    Ok((recorder, started.elapsed()))
}

/// Sends `request` on `connection` and reads the whole answer; returns its status.
/// A connection the server has closed since (an idle timeout) is replaced before
/// sending, and one whose answer says `Connection: close` (ingest's refusals of a
/// request with a body) is dropped after it.
async fn send(
    connection: &mut Option<SendRequest<Full<bytes::Bytes>>>,
    authority: &str,
    request: http::Request<Full<bytes::Bytes>>,
) -> anyhow::Result<http::StatusCode> {
    if let Some(open) = connection.as_mut()
        && open.ready().await.is_err()
    {
        *connection = None;
    }
    let sender = match connection {
        Some(sender) => sender,
        None => {
            let stream = tokio::net::TcpStream::connect(authority).await?;
            stream.set_nodelay(true)?;
            let (mut sender, driver) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            // Its error, if any, is the next request's.
            tokio::spawn(async move { driver.await.ok() });
            sender.ready().await?;
            connection.insert(sender)
        }
    };
    let answer = sender.send_request(request).await?;
    let status = answer.status();
    let close = answer
        .headers()
        .get(http::header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    answer.into_body().collect().await?;
    if close {
        *connection = None;
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graphql_errors_are_found_whatever_the_data() {
        let data =
            br#"{"data":{"revenue":{"points":[{"bucket":"2026-12-01T00:00:00Z","errors":1}]}}}"#;
        assert!(
            !graphql_errors(data).unwrap(),
            "a field named errors in the data"
        );
        assert!(!graphql_errors(br#"{"data":null,"errors":null}"#).unwrap());
        assert!(graphql_errors(br#"{"data":null,"errors":[{"message":"no"}]}"#).unwrap());
        assert!(graphql_errors(br#"{"errors":[],"data":{}}"#).unwrap());
        assert!(graphql_errors(b"<html>").is_err());
    }

    #[test]
    fn requests_never_sent_are_errors_with_their_cause_but_no_latency() {
        let recorder = Recorder::default();
        recorder.record(Duration::from_millis(40), true, 1);
        recorder.record(Duration::from_millis(40), true, 1);
        recorder.record_error(Duration::from_millis(900), "503");
        for _ in 0..7 {
            recorder.unsent("overloaded");
        }
        let report = recorder.report("r", Duration::from_secs(1));
        assert_eq!(report.requests, 10);
        assert_eq!(report.errors, 8);
        assert_eq!(report.items, 2);
        assert_eq!(
            report.errors_by_kind,
            BTreeMap::from([("503".to_owned(), 1), ("overloaded".to_owned(), 7)])
        );
        // Percentiles are over the answered requests only: a zero for each unsent
        // one would have made the median 0 ms.
        assert!((39.0..41.0).contains(&report.p50_ms), "{report:?}");
        assert!(report.max_ms >= 899.0, "{report:?}");
    }
}
