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
    /// Sent as `Accept-Encoding`; a compressed body is read as it came.
    pub accept_encoding: Option<String>,
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
            recorder.unsent("overloaded");
            continue;
        };
        let recorder = recorder.clone();
        let url = if s.urls.len() > 1 {
            1 + i as usize % (s.urls.len() - 1)
        } else {
            0
        };
        let send = request(&client, &s, url).send();
        let graphql = s.body.is_some();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            match outcome(send.await, graphql).await {
                Ok(()) => recorder.record(t.elapsed(), true, 1),
                Err(why) => recorder.record_error(t.elapsed(), &why),
            }
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
    if let Some(accept) = &s.accept_encoding {
        r = r.header("accept-encoding", accept);
    }
    r
}

/// Why a request failed, if it did: an HTTP status, `timeout`, `connection`,
/// `unreadable-body`, or (for a GraphQL POST, answered 200 either way)
/// `graphql-errors`.
async fn outcome(
    sent: Result<reqwest::Response, reqwest::Error>,
    graphql: bool,
) -> Result<(), String> {
    let response = match sent {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => return Err(r.status().as_u16().to_string()),
        Err(e) if e.is_timeout() => return Err("timeout".to_owned()),
        Err(_) => return Err("connection".to_owned()),
    };
    let gzipped = response
        .headers()
        .get("content-encoding")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
    let body = response
        .bytes()
        .await
        .map_err(|_| "unreadable-body".to_owned())?;
    if graphql {
        let inflated;
        let json = if gzipped {
            use std::io::Read;
            let mut json = Vec::new();
            flate2::read::GzDecoder::new(&body[..])
                .read_to_end(&mut json)
                .map_err(|_| "unreadable-body".to_owned())?;
            inflated = json;
            &inflated[..]
        } else {
            &body[..]
        };
        match crate::graphql_errors(json) {
            Ok(false) => {}
            Ok(true) => return Err("graphql-errors".to_owned()),
            Err(_) => return Err("unreadable-body".to_owned()),
        }
    }
    Ok(())
}
