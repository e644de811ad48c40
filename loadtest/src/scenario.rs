//! Named scenarios against a running stack: an open-loop mix of ingest batches,
//! REST reads and GraphQL reads at a target request rate, with a report per kind
//! of request and one for the whole run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DurationRound, TimeDelta, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tidemark_generator::{Shape, Shop};
use tokio::sync::Semaphore;

use crate::{Recorder, Report};

/// The scenarios, by the share of each kind of request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Name {
    /// 90% ingest batches, 10% REST reads.
    IngestHeavy,
    /// REST revenue and summary queries only.
    RestReads,
    /// GraphQL revenue and summary queries only.
    GraphqlReads,
    /// 30% ingest, 40% REST, 30% GraphQL.
    Mixed,
}

impl Name {
    pub fn as_str(self) -> &'static str {
        match self {
            Name::IngestHeavy => "ingest-heavy",
            Name::RestReads => "rest-reads",
            Name::GraphqlReads => "graphql-reads",
            Name::Mixed => "mixed",
        }
    }

    /// Shares of (ingest, REST, GraphQL), in percent.
    fn mix(self) -> [u32; 3] {
        match self {
            Name::IngestHeavy => [90, 10, 0],
            Name::RestReads => [0, 100, 0],
            Name::GraphqlReads => [0, 0, 100],
            Name::Mixed => [30, 40, 30],
        }
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub ingest_url: String,
    pub serving_url: String,
    pub ingest_key: String,
    pub read_key: String,
    /// Requests per second, all kinds together.
    pub rate: f64,
    pub duration: Duration,
    /// Orders per ingest request.
    pub batch: usize,
    /// Seed of the orders and of the request mix. Rerunning a scenario with the
    /// same seed resends the same order ids with new event times: use a new seed.
    pub seed: u64,
    /// Requests in flight at most; a request due beyond it counts as an error
    /// (`overloaded`), so a stalled server shows instead of lowering the rate.
    pub max_in_flight: usize,
}

impl Settings {
    /// A few seconds at a low rate: proves every request kind works end to end.
    pub fn smoke(mut self) -> Settings {
        self.rate = 40.0;
        self.duration = Duration::from_secs(3);
        self.batch = 10;
        self
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Ingest,
    Rest,
    Graphql,
}

const KINDS: [(Kind, &str); 3] = [
    (Kind::Ingest, "ingest"),
    (Kind::Rest, "rest"),
    (Kind::Graphql, "graphql"),
];

/// Runs the scenario; returns one report per kind of request it sent, then the total.
pub async fn run(name: Name, s: &Settings) -> anyhow::Result<Vec<Report>> {
    anyhow::ensure!(s.rate > 0.0, "the rate must be positive");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(s.max_in_flight)
        .timeout(Duration::from_secs(30))
        .build()?;
    let reads = Reads::new(&s.serving_url);
    // Each scenario draws its own orders: the same ids with other event times
    // would be conflicts (409), not load.
    let mut shop = Shop::new(
        s.seed.wrapping_mul(8).wrapping_add(name as u64),
        Shape::default(),
    );
    let mut rng = StdRng::seed_from_u64(s.seed);
    let mix = name.mix();
    let recorders: Vec<Arc<Recorder>> = KINDS.iter().map(|_| Arc::default()).collect();
    let total = Arc::new(Recorder::default());
    let permits = Arc::new(Semaphore::new(s.max_in_flight));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / s.rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let due = (s.rate * s.duration.as_secs_f64()).round().max(1.0) as u64;
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for i in 0..due {
        tick.tick().await;
        let pick = rng.random_range(0..100);
        let k = if pick < mix[0] {
            0
        } else if pick < mix[0] + mix[1] {
            1
        } else {
            2
        };
        let (request, items) = match KINDS[k].0 {
            Kind::Ingest => {
                let now = Utc::now();
                let orders: Vec<_> = (0..s.batch).map(|_| shop.live_order(now)).collect();
                let body: Vec<_> = orders.iter().map(crate::order_json).collect();
                let r = client
                    .post(format!("{}/v1/orders", s.ingest_url.trim_end_matches('/')))
                    .bearer_auth(&s.ingest_key)
                    .json(&body);
                (r, s.batch as u64)
            }
            Kind::Rest => (client.get(reads.rest(i)).bearer_auth(&s.read_key), 1),
            Kind::Graphql => (
                client
                    .post(format!("{}/graphql", s.serving_url.trim_end_matches('/')))
                    .bearer_auth(&s.read_key)
                    .json(&serde_json::json!({ "query": reads.graphql(i) })),
                1,
            ),
        };
        let (recorder, total) = (recorders[k].clone(), total.clone());
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            recorder.unsent("overloaded");
            total.unsent("overloaded");
            continue;
        };
        tasks.spawn(async move {
            let t = Instant::now();
            let outcome = match request.send().await {
                Ok(r) if r.status().is_success() => {
                    // A GraphQL error arrives with 200: count it as the error it is.
                    match r.bytes().await.map(|body| crate::graphql_errors(&body)) {
                        Ok(Ok(false)) => Ok(()),
                        Ok(Ok(true)) => Err("graphql-errors".to_owned()),
                        _ => Err("unreadable-body".to_owned()),
                    }
                }
                Ok(r) => Err(r.status().as_u16().to_string()),
                Err(e) if e.is_timeout() => Err("timeout".to_owned()),
                Err(_) => Err("connection".to_owned()),
            };
            let latency = t.elapsed();
            match outcome {
                Ok(()) => {
                    recorder.record(latency, true, items);
                    total.record(latency, true, items);
                }
                Err(why) => {
                    recorder.record_error(latency, &why);
                    total.record_error(latency, &why);
                }
            }
            drop(permit);
        });
    }
    while let Some(done) = tasks.join_next().await {
        done?;
    }
    let elapsed = started.elapsed();
    let mut reports: Vec<Report> = KINDS
        .iter()
        .zip(&recorders)
        .filter(|(_, r)| r.requests() > 0)
        .map(|((_, label), r)| r.report(&format!("{}/{label}", name.as_str()), elapsed))
        .collect();
    reports.push(total.report(&format!("{}/total", name.as_str()), elapsed));
    Ok(reports)
}

/// The read queries, rotated so caches see a realistic few distinct questions.
struct Reads {
    rest: Vec<String>,
    graphql: Vec<String>,
}

impl Reads {
    fn new(serving_url: &str) -> Reads {
        let base = serving_url.trim_end_matches('/');
        let now = Utc::now();
        let day = now.duration_trunc(TimeDelta::days(1)).expect("in range");
        let fmt = |t: chrono::DateTime<Utc>| t.format("%Y-%m-%dT%H:%M:%SZ").to_string();
        let (today, tomorrow) = (fmt(day), fmt(day + TimeDelta::days(1)));
        let hour_ago =
            fmt(now.duration_trunc(TimeDelta::minutes(1)).expect("in range") - TimeDelta::hours(1));
        let week_ago = fmt(day - TimeDelta::days(7));
        let rest = vec![
            format!("{base}/v1/revenue?from={today}&to={tomorrow}&granularity=hour&group_by=city"),
            format!("{base}/v1/revenue?from={hour_ago}&to={tomorrow}&granularity=minute"),
            format!(
                "{base}/v1/revenue?from={week_ago}&to={tomorrow}&granularity=day&group_by=category"
            ),
            format!("{base}/v1/revenue/summary?from={today}&to={tomorrow}&top_by=product&top=10"),
        ];
        let graphql = vec![
            format!(
                "{{ revenue(from: \"{today}\", to: \"{tomorrow}\", granularity: HOUR, groupBy: CITY) \
                 {{ points {{ bucket group currency revenueMinor orders }} freshness {{ asOf }} }} }}"
            ),
            format!(
                "{{ summary(from: \"{week_ago}\", to: \"{tomorrow}\", topBy: CITY, top: 5) \
                 {{ totals {{ currency revenueMinor orders averageOrderValueMinor }} \
                    top {{ group currency revenueMinor }} }} }}"
            ),
        ];
        Reads { rest, graphql }
    }

    fn rest(&self, i: u64) -> &str {
        &self.rest[i as usize % self.rest.len()]
    }

    fn graphql(&self, i: u64) -> &str {
        &self.graphql[i as usize % self.graphql.len()]
    }
}

/// The reports as an aligned table.
pub fn table(reports: &[Report]) -> String {
    let mut out = format!(
        "{:<22} {:>9} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
        "scenario/kind",
        "requests",
        "items",
        "errors",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms"
    );
    for r in reports {
        out.push_str(&format!(
            "{:<22} {:>9} {:>9} {:>7} {:>9.1} {:>9.2} {:>9.2} {:>9.2} {:>9.2}\n",
            r.scenario,
            r.requests,
            r.items,
            r.errors,
            r.requests_per_sec,
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.max_ms
        ));
        for (why, n) in &r.errors_by_kind {
            out.push_str(&format!("{:<22}   {n} × {why}\n", ""));
        }
    }
    out
}
