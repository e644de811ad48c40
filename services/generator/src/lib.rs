//! Demo data: realistic orders, deterministic from a seed, sent to the ingest API.
//!
//! Three ways to run it: `stream` sends live orders at a steady rate, `backfill`
//! sends days of history, and `serve` (what `cargo xtask up` starts) serves the
//! operational endpoints and streams at the configured demo rate. About 3 % of the
//! orders are refunded and 2 % cancelled, minutes to 30 days later: `stream` sends
//! each correction when its time comes, `backfill` sends those due by its end after
//! the orders. Customers have profiles (home city, segment, sign-up) sent to
//! `POST /v1/customers`, and about 1 % of them move to another city per simulated
//! month; an order is placed from its customer's home at the time (6 % away from
//! it), so revenue by city of residence differs from revenue by order city. Each
//! ends with a [`Tally`] of what ingest stored (gross, refunded and net per
//! currency), to compare with the served totals.

pub mod config;
pub mod model;
pub mod send;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use chrono::{DateTime, TimeDelta, Utc};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use tidemark_platform::health::Readiness;
use tidemark_platform::http;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use model::{Correction, Profile, Shape, Shop, fx_rates_csv};
pub use send::{Format, Sender, Tally};

/// A live stream: `rate` orders per second in batches, until `count` orders,
/// `duration` or shutdown, whichever comes first.
#[derive(Debug, Clone)]
pub struct StreamPlan {
    pub seed: u64,
    pub rate: f64,
    pub batch: usize,
    pub count: Option<u64>,
    pub duration: Option<Duration>,
    pub shape: Shape,
}

/// Sends live orders at the planned rate; requests overlap (up to 8 in flight) so a
/// slow answer does not lower the rate.
pub async fn stream(
    sender: &Sender,
    plan: &StreamPlan,
    shutdown: CancellationToken,
    progress: bool,
) -> anyhow::Result<Tally> {
    anyhow::ensure!(plan.rate > 0.0, "the rate must be positive");
    let mut shop = Shop::new(plan.seed, plan.shape);
    // At least four requests a second, so a low demo rate still looks live.
    let batch = plan
        .batch
        .clamp(1, (plan.rate / 4.0).ceil().max(1.0) as usize);
    let period = Duration::from_secs_f64(batch as f64 / plan.rate);
    let bar = bar(progress, plan.count);
    let in_flight = Arc::new(Semaphore::new(8));
    let mut sends = JoinSet::new();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut planned = 0u64;
    let mut tally = Tally::default();
    // Corrections not yet due, soonest first.
    let mut pending: std::collections::BinaryHeap<std::cmp::Reverse<Pending>> =
        std::collections::BinaryHeap::new();
    // Every customer's first version, beside the first orders (ingest records
    // none twice, so a restarted stream resends them harmlessly).
    let profiles = {
        let (sender, profiles) = (sender.clone(), shop.profiles());
        tokio::spawn(async move { sender.send_customers(&profiles).await })
    };
    let mut moves_from = Utc::now();
    loop {
        if plan.count.is_some_and(|c| planned >= c)
            || plan.duration.is_some_and(|d| started.elapsed() >= d)
        {
            break;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let n = plan
            .count
            .map_or(batch as u64, |c| (c - planned).min(batch as u64));
        let now = Utc::now();
        let orders: Vec<_> = (0..n).map(|_| shop.live_order(now)).collect();
        planned += n;
        pending.extend(
            orders
                .iter()
                .filter_map(|o| shop.correction_for(o))
                .map(|c| std::cmp::Reverse(Pending(c))),
        );
        let mut due = Vec::new();
        while pending.peek().is_some_and(|p| p.0.0.at <= now) {
            due.extend(pending.pop().map(|p| p.0.0));
        }
        let moved = shop.moves_between(moves_from, now);
        moves_from = now;
        let permit = in_flight.clone().acquire_owned().await?;
        let sender = sender.clone();
        sends.spawn(async move {
            let mut result = sender.send(&orders).await;
            if let Ok(tally) = &mut result {
                match sender.send_corrections(&due).await {
                    Ok(corrected) => tally.add(&corrected),
                    Err(e) => result = Err(e),
                }
            }
            if let Ok(tally) = &mut result {
                match sender.send_customers(&moved).await {
                    Ok(moved) => tally.add(&moved),
                    Err(e) => result = Err(e),
                }
            }
            drop(permit);
            result
        });
        while let Some(done) = sends.try_join_next() {
            account(&mut tally, &done??, &bar);
        }
    }
    while let Some(done) = sends.join_next().await {
        account(&mut tally, &done??, &bar);
    }
    tally.add(&profiles.await??);
    bar.finish_and_clear();
    Ok(tally)
}

/// History: `per_day` orders a day over the `days` before `until`, following each
/// city's daily rhythm. With the same seed and `until` a backfill sends the same
/// orders again, which ingest reports as duplicates.
#[derive(Debug, Clone)]
pub struct BackfillPlan {
    pub seed: u64,
    pub days: u32,
    pub per_day: u64,
    pub until: DateTime<Utc>,
    pub batch: usize,
    pub concurrency: usize,
    pub shape: Shape,
}

pub async fn backfill(
    sender: &Sender,
    plan: &BackfillPlan,
    shutdown: CancellationToken,
    progress: bool,
) -> anyhow::Result<Tally> {
    let total = plan.per_day * u64::from(plan.days);
    let from = plan.until - TimeDelta::days(i64::from(plan.days));
    let batch = plan.batch.max(1);
    let bar = bar(progress, Some(total));
    let mut shop = Shop::new(plan.seed, plan.shape);
    // Customers first (their first versions precede the history), and where they
    // move during it, so that each order is placed from its customer's home then;
    // the moves are sent after the orders, recorded late and placed in history.
    let mut tally = sender.send_customers(&shop.profiles()).await?;
    let moves = shop.moves_between(from, plan.until);
    let corrections = std::sync::Mutex::new(Vec::new());
    let batches = (0..total.div_ceil(batch as u64)).map(|i| {
        let n = (total - i * batch as u64).min(batch as u64);
        let orders = (0..n)
            .map(|_| shop.historic_order(from, plan.until))
            .collect::<Vec<_>>();
        corrections
            .lock()
            .expect("never poisoned")
            .extend(orders.iter().filter_map(|o| shop.correction_for(o)));
        orders
    });
    let results = futures::stream::iter(batches)
        .take_until(shutdown.cancelled())
        .map(|orders| async move { sender.send(&orders).await })
        .buffer_unordered(plan.concurrency.max(1));
    let mut results = std::pin::pin!(results);
    while let Some(done) = results.next().await {
        account(&mut tally, &done?, &bar);
    }
    if !shutdown.is_cancelled() {
        tally.add(&sender.send_customers(&moves).await?);
    }
    // Then the corrections due by the end of the history, in time order.
    let mut due: Vec<Correction> =
        std::mem::take(&mut *corrections.lock().expect("never poisoned"));
    due.retain(|c| c.at <= plan.until);
    due.sort_by_key(|c| c.at);
    for chunk in due.chunks(batch) {
        if shutdown.is_cancelled() {
            break;
        }
        account(&mut tally, &sender.send_corrections(chunk).await?, &bar);
    }
    bar.finish_and_clear();
    Ok(tally)
}

/// A correction waiting for its time, ordered by it.
#[derive(Debug)]
struct Pending(Correction);

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}

impl Eq for Pending {}

impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.0.at, self.0.order_id).cmp(&(other.0.at, other.0.order_id))
    }
}

fn account(tally: &mut Tally, batch: &Tally, bar: &ProgressBar) {
    tally.add(batch);
    bar.inc(batch.created + batch.duplicates + batch.rejected);
    metrics::counter!("generator_orders_total", "outcome" => "created").increment(batch.created);
    metrics::counter!("generator_orders_total", "outcome" => "duplicate")
        .increment(batch.duplicates);
    metrics::counter!("generator_orders_total", "outcome" => "rejected").increment(batch.rejected);
    metrics::counter!("generator_adjustments_total", "kind" => "refund").increment(batch.refunds);
    metrics::counter!("generator_adjustments_total", "kind" => "cancellation")
        .increment(batch.cancellations);
    metrics::counter!("generator_customers_total", "outcome" => "recorded")
        .increment(batch.customers_recorded);
    metrics::counter!("generator_customers_total", "outcome" => "unchanged")
        .increment(batch.customers_unchanged);
    metrics::counter!("generator_customers_total", "outcome" => "rejected")
        .increment(batch.customers_rejected);
    for (currency, minor) in &batch.revenue_minor {
        metrics::counter!("generator_revenue_minor_total", "currency" => currency.clone())
            .increment(u64::try_from(*minor).unwrap_or(0));
    }
}

/// A progress bar on stderr (drawn only on a terminal): with a length when the
/// total is known, a counter otherwise.
fn bar(enabled: bool, total: Option<u64>) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    match total {
        Some(total) => ProgressBar::new(total).with_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:32}] {pos}/{len} orders ({per_sec}, eta {eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {elapsed_precise} {pos} orders ({per_sec})")
                .expect("valid template"),
        ),
    }
}

/// A seed from the clock, for runs that did not ask for one (logged, so the run
/// can be repeated).
pub fn clock_seed() -> u64 {
    Utc::now().timestamp_micros().unsigned_abs()
}

/// Serves the generator's operational endpoints until `shutdown` is cancelled and,
/// when `stream.rate` is above zero, streams demo orders meanwhile.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let healthz = format!("{}/healthz", config.target.ingest_url.trim_end_matches('/'));
    let readiness = Readiness::new().with("ingest", move || {
        let request = client.get(healthz.clone()).send();
        async move {
            match request.await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("ingest answered {}", r.status().as_u16())),
                Err(_) => Err("unreachable".to_owned()),
            }
        }
    });
    for outcome in ["created", "duplicate", "rejected"] {
        tidemark_platform::metrics::register_counter(
            "generator_orders_total",
            &[("outcome", outcome)],
        );
    }
    let streaming = demo_stream(&config, shutdown.clone())?;
    let router = http::finish(Router::new(), readiness, &config.http);
    http::serve(listener, router, shutdown, config.http.shutdown_grace).await?;
    if let Some(task) = streaming {
        let tally = task.await??;
        tracing::info!(
            created = tally.created,
            duplicates = tally.duplicates,
            rejected = tally.rejected,
            "demo stream stopped"
        );
    }
    Ok(())
}

type StreamTask = tokio::task::JoinHandle<anyhow::Result<Tally>>;

fn demo_stream(config: &Config, shutdown: CancellationToken) -> anyhow::Result<Option<StreamTask>> {
    if config.stream.rate <= 0.0 {
        return Ok(None);
    }
    let Some(key) = &config.target.api_key else {
        anyhow::bail!("stream.rate is set but target.api_key is missing");
    };
    let sender = Sender::new(
        &config.target.ingest_url,
        secrecy::ExposeSecret::expose_secret(key),
        config.stream.format,
    )?;
    let plan = StreamPlan {
        seed: config.stream.seed.unwrap_or_else(clock_seed),
        rate: config.stream.rate,
        batch: config.stream.batch,
        count: None,
        duration: None,
        shape: Shape::default(),
    };
    tracing::info!(seed = plan.seed, rate = plan.rate, "streaming demo orders");
    Ok(Some(tokio::spawn(async move {
        stream(&sender, &plan, shutdown, false).await
    })))
}
