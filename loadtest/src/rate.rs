//! Open-loop load at a fixed request rate: requests start on schedule whether or
//! not earlier ones have answered, so slow answers show up as latency instead of
//! silently lowering the rate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::{Recorder, Report};

pub struct Settings {
    /// Asked in turn (distinct questions); the first also warms up connections,
    /// so with several only it has been asked before.
    pub urls: Vec<String>,
    pub key: Option<String>,
    /// A JSON body to POST; GET when absent.
    pub body: Option<String>,
    pub rate: u64,
    pub seconds: u64,
    /// Requests in flight at most (beyond it, requests are counted as errors).
    pub max_in_flight: usize,
}

pub async fn run(name: &str, s: Settings) -> anyhow::Result<Report> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(s.max_in_flight)
        .build()?;
    // Warm up connections and caches.
    for _ in 0..50 {
        drop(request(&client, &s, 0).send().await);
    }
    let recorder = Arc::new(Recorder::default());
    let permits = Arc::new(Semaphore::new(s.max_in_flight));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / s.rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let total = s.rate * s.seconds;
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        tick.tick().await;
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            recorder.record(Duration::ZERO, false, 0);
            continue;
        };
        let recorder = recorder.clone();
        let url = if s.urls.len() > 1 {
            1 + i as usize % (s.urls.len() - 1)
        } else {
            0
        };
        let send = request(&client, &s, url).send();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let ok = match send.await {
                Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                _ => false,
            };
            recorder.record(t.elapsed(), ok, 1);
            drop(permit);
        }));
    }
    for task in tasks {
        task.await?;
    }
    Ok(recorder.report(name, started.elapsed()))
}

fn request(client: &reqwest::Client, s: &Settings, url: usize) -> reqwest::RequestBuilder {
    let url = &s.urls[url];
    let mut r = match &s.body {
        Some(body) => client
            .post(url)
            .header("content-type", "application/json")
            .body(body.clone()),
        None => client.get(url),
    };
    if let Some(key) = &s.key {
        r = r.bearer_auth(key);
    }
    r
}
