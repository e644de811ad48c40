//! R20 (issue 22, service replicas): ingest and serving as two instances each,
//! each pair behind its own HAProxy, one instance of each SIGKILLed under load.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tidemark_orderlog::question::Question;
use tidemark_platform::auth::{self, Scope};
use tidemark_testkit::{OrderLoad, PrivateHaProxy, Process, ServiceEnv, Slice};
use tokio_tungstenite::tungstenite::Message;

use crate::Env;

/// Readers asking random questions through the serving proxy at once.
const READERS: usize = 4;

/// Questions asked once the load has stopped and the speed layer caught up.
const QUIET_QUESTIONS: usize = 12;

/// The ingest binary, built beside serving's by the workspace's test build.
fn ingest_binary() -> String {
    let path = Path::new(env!("CARGO_BIN_EXE_tidemark-serving")).with_file_name("tidemark-ingest");
    assert!(
        path.exists(),
        "{} is missing: run the suite through `cargo xtask test` (it builds every binary)",
        path.display()
    );
    path.display().to_string()
}

fn spawn_ingest(env: &Env, port: u16) -> Process {
    let vars = ServiceEnv::default()
        .postgres(&env.db.config)
        .set("TIDEMARK_HTTP__LISTEN", &format!("127.0.0.1:{port}"))
        // The environment runs the relay and the vault loader.
        .set("TIDEMARK_RELAY__ENABLED", &false)
        .set("TIDEMARK_VAULT__ENABLED", &false);
    Process::spawn(&ingest_binary(), &[], &vars)
}

fn spawn_serving(env: &Env, port: u16) -> Process {
    let vars = ServiceEnv::default()
        .postgres(&env.db.config)
        .redis(&env.redis)
        // This test's Redis never goes away; beside 16 writers on two cores a
        // serving process starved of CPU for the service's 2 s answered honest
        // 503s (speed view unavailable) that the test would count as failures of
        // the kill (5 of at most 4, once in a local suite run).
        .set("TIDEMARK_REDIS__TIMEOUT", &5_000)
        .clickhouse(&env.clickhouse)
        .set("TIDEMARK_HTTP__LISTEN", &format!("127.0.0.1:{port}"));
    Process::spawn(env!("CARGO_BIN_EXE_tidemark-serving"), &[], &vars)
}

/// A live subscription to the minute revenue of one city, through `port`.
struct Subscription {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl Subscription {
    const CITY: &str = "Reconnectville";

    async fn open(port: u16, key: &str) -> Subscription {
        let request = crate::subscription_request(format!("127.0.0.1:{port}"), Some(key));
        let (mut ws, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("the subscription connects through the proxy");
        ws.send(Message::text(r#"{"type":"connection_init","payload":{}}"#))
            .await
            .unwrap();
        let subscribe = serde_json::json!({
            "id": "1",
            "type": "subscribe",
            "payload": { "query": format!(
                "subscription {{ revenue(granularity: MINUTE, city: [\"{}\"]) {{ points {{ orders }} }} }}",
                Self::CITY
            ) }
        });
        ws.send(Message::text(subscribe.to_string())).await.unwrap();
        Subscription { ws }
    }

    /// The orders of the city in the next update; `None` when the connection ended.
    async fn next(&mut self) -> Option<i64> {
        while let Some(message) = self.ws.next().await {
            let Ok(Message::Text(text)) = message else {
                if message.is_err() {
                    return None;
                }
                continue;
            };
            let value: serde_json::Value = serde_json::from_str(&text).unwrap();
            match value["type"].as_str() {
                Some("next") => {
                    return Some(
                        value["payload"]["data"]["revenue"]["points"]
                            .as_array()
                            .map_or(0, |p| {
                                p.iter().map(|x| x["orders"].as_i64().unwrap_or(0)).sum()
                            }),
                    );
                }
                Some("error") => panic!("subscription error: {value}"),
                _ => {}
            }
        }
        None
    }

    /// Waits (at most 10 s) for an update with `orders` orders of the city.
    async fn until(&mut self, orders: i64) -> Option<()> {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if self.next().await? == orders {
                    return Some(());
                }
            }
        })
        .await
        .expect("the subscription updates within 10 s")
    }
}

/// Posts one order of the subscription's city, created now, through `port`.
async fn post_city_order(port: u16, key: &str, seed: u64) {
    let mut order = tidemark_testkit::random_order(&mut StdRng::seed_from_u64(seed));
    order.city = Subscription::CITY.into();
    order.created_at = chrono::Utc::now();
    let status = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/v1/orders"))
        .bearer_auth(key)
        .json(&tidemark_generator::send::order_json(&order))
        .send()
        .await
        .unwrap()
        .status();
    assert!(status.is_success(), "{status}");
}

/// A random question of hours or days over yesterday and today, asked through
/// `port`: the question and its answer, or what it got instead of a 200.
async fn ask_random(
    http: &reqwest::Client,
    port: u16,
    key: &str,
    rng: &mut StdRng,
) -> Result<(Question, serde_json::Value), String> {
    let mut slice = Slice::random(rng);
    // Hours and days of two days: minute answers over longer ranges hold thousands
    // of cells, too slow to read and reconcile under this load.
    slice.granularity = if rng.random_bool(0.5) { "hour" } else { "day" };
    let question = slice.question();
    let today = chrono::Utc::now().date_naive();
    let day = |d: chrono::NaiveDate| d.format("%Y-%m-%dT00:00:00Z").to_string();
    let (from, to) = (
        day(today - chrono::Days::new(1)),
        day(today + chrono::Days::new(1)),
    );
    let url = format!(
        "http://127.0.0.1:{port}/v1/revenue?from={from}&to={to}&{}",
        question.query()
    );
    match http.get(&url).bearer_auth(key).send().await {
        Ok(r) if r.status() == 200 => Ok((question, r.json().await.map_err(|e| e.to_string())?)),
        Ok(r) => Err(format!(
            "{} {}",
            r.status(),
            r.text().await.unwrap_or_default()
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// What readers found.
#[derive(Default)]
struct Found {
    checked: AtomicU64,
    /// Answers with a cell that differs from SQL as of the answer's position.
    not_exact: AtomicU64,
    failed: AtomicUsize,
}

/// Readers asking random questions through `port` until stopped, each answer
/// reconciled with SQL over the log as of the position it states.
struct Readers {
    found: Arc<Found>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Readers {
    fn start(env: &Env, port: u16) -> Readers {
        let found = Arc::new(Found::default());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = (0..READERS)
            .map(|i| {
                let (found, stop) = (found.clone(), stop.clone());
                let (pool, key) = (env.db.pool.clone(), env.key.clone());
                tokio::spawn(async move {
                    let http = reqwest::Client::builder()
                        .timeout(Duration::from_secs(10))
                        .build()
                        .unwrap();
                    let mut rng = StdRng::seed_from_u64(2_000 + i as u64);
                    while !stop.load(Ordering::Relaxed) {
                        let (question, body) = match ask_random(&http, port, &key, &mut rng).await {
                            Ok(answered) => answered,
                            Err(e) => {
                                eprintln!("a question failed: {e}");
                                found.failed.fetch_add(1, Ordering::Relaxed);
                                // As a client would: not at once again.
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                continue;
                            }
                        };
                        let r = tidemark_verify::reconcile(&pool, &question, &body)
                            .await
                            .unwrap();
                        found.checked.fetch_add(1, Ordering::Relaxed);
                        if r.differing > 0 {
                            eprintln!(
                                "not exact as of its position ({} of {} cells): {}",
                                r.differing,
                                r.cells,
                                question.query()
                            );
                            found.not_exact.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        Readers { found, stop, tasks }
    }

    async fn until_checked(&self, n: u64) {
        tidemark_testkit::eventually(Duration::from_secs(120), "answers are checked", || {
            let done = self.found.checked.load(Ordering::Relaxed) >= n;
            async move { done }
        })
        .await;
    }

    async fn stop(self) -> Arc<Found> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        self.found
    }
}

/// Two ingest and two serving instances, each pair behind HAProxy (health-checked
/// on `/readyz`), under 16 writers, 4 readers and a live subscription. One
/// instance of each — the serving one holding the subscription — is SIGKILLed.
/// No acknowledged order is lost; every answer equals SQL over Postgres as of the
/// position it states; the clients see at most the killed instances' in-flight
/// requests fail; the subscription reconnects through the proxy and goes on.
#[tokio::test(flavor = "multi_thread")]
async fn r20_two_of_each_behind_haproxy_one_of_each_sigkilled_stays_exact() {
    // A Redis of its own: four readers' speed reads and a 16-writer stream must not
    // slow the tests sharing the stack's.
    let redis = tidemark_testkit::PrivateRedis::start().await;
    let env = Env::with(redis.config(), |_| {}).await;
    let (_, ingest_key) = auth::create(&env.db.pool, "writer", &[Scope::Ingest], None)
        .await
        .unwrap();
    let ports: [u16; 4] = std::array::from_fn(|_| tidemark_testkit::free_port());
    let ingest = [spawn_ingest(&env, ports[0]), spawn_ingest(&env, ports[1])];
    let serving = [spawn_serving(&env, ports[2]), spawn_serving(&env, ports[3])];
    for port in ports {
        tidemark_testkit::http_ready(port, "/readyz", Duration::from_secs(60)).await;
    }
    let ingest_proxy = PrivateHaProxy::start(&ports[..2]).await;
    let serving_proxy = PrivateHaProxy::start(&ports[2..]).await;
    for proxy in [&ingest_proxy, &serving_proxy] {
        tidemark_testkit::http_ready(proxy.port, "/readyz", Duration::from_secs(30)).await;
    }

    // The subscription, and which serving instance holds it.
    let mut subscription = Subscription::open(serving_proxy.port, &env.key).await;
    assert_eq!(subscription.next().await, Some(0));
    post_city_order(ingest_proxy.port, &ingest_key, 1).await;
    subscription.until(1).await.expect("live before the kill");
    let mut open = [0.0; 2];
    for (i, port) in ports[2..].iter().enumerate() {
        let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        open[i] = tidemark_testkit::metric(&text, "serving_websockets_open").unwrap_or(0.0);
    }
    let holder = match open {
        [1.0, 0.0] => 0,
        [0.0, 1.0] => 1,
        other => panic!("one instance holds the one subscription: {other:?}"),
    };

    let load = OrderLoad::start(
        ingest_proxy.port,
        &ingest_key,
        22,
        tidemark_generator::send::order_json,
    );
    let readers = Readers::start(&env, serving_proxy.port);
    load.until_acked(300).await;
    readers.until_checked(12).await;
    let failed_before = (
        load.failed.load(Ordering::Relaxed),
        readers.found.failed.load(Ordering::Relaxed),
    );
    let [ingest_a, _ingest_b] = ingest;
    let [serving_0, serving_1] = serving;
    let (killed, _survivor) = if holder == 0 {
        (serving_0, serving_1)
    } else {
        (serving_1, serving_0)
    };
    ingest_a.kill(); // SIGKILL
    killed.kill();
    let at_kill = Instant::now();

    // The subscription ends with its instance; the client reconnects through the
    // proxy, which sends it to the live one, and it goes on.
    // (Updates sent before the instance died may still be read first.)
    tokio::time::timeout(Duration::from_secs(10), async {
        while subscription.next().await.is_some() {}
    })
    .await
    .expect("the connection to the killed instance ended");
    let mut subscription = Subscription::open(serving_proxy.port, &env.key).await;
    assert_eq!(subscription.next().await, Some(1));
    let reconnected = at_kill.elapsed().as_secs_f64();
    post_city_order(ingest_proxy.port, &ingest_key, 2).await;
    subscription.until(2).await.expect("live after the kill");

    let (acked_at_kill, checked_at_kill) =
        (load.acked(), readers.found.checked.load(Ordering::Relaxed));
    load.until_acked(acked_at_kill + 1_000).await;
    readers.until_checked(checked_at_kill + 12).await;
    let failed = (
        load.failed.load(Ordering::Relaxed) - failed_before.0,
        readers.found.failed.load(Ordering::Relaxed) - failed_before.1,
    );
    let acked = load.stop().await;
    let found = readers.stop().await;
    let lost = tidemark_testkit::load::missing(&env.db.pool, &acked).await;
    // Quiet: every answer is exact in every metric, buyers included.
    env.speed_caught_up().await;
    let (http, mut rng) = (reqwest::Client::new(), StdRng::seed_from_u64(3_000));
    let mut quiet_differing = 0;
    for _ in 0..QUIET_QUESTIONS {
        let (question, body) = ask_random(&http, serving_proxy.port, &env.key, &mut rng)
            .await
            .expect("answered when quiet");
        let r = tidemark_verify::reconcile(&env.db.pool, &question, &body)
            .await
            .unwrap();
        quiet_differing += r.differing;
    }
    let load_figure = |n: &AtomicU64| n.load(Ordering::Relaxed);
    let (checked, not_exact) = (load_figure(&found.checked), load_figure(&found.not_exact));
    tidemark_testkit::figure(
        "R20",
        format!(
            "two ingest and two serving instances behind HAProxy, one of each SIGKILLed under \
             {} writers, {READERS} readers and a subscription: {} orders acked, \
             acked-but-missing {lost}; {checked} answers under load reconciled with SQL as of \
             their position (every metric, buyers included): not exact {not_exact}; \
             {QUIET_QUESTIONS} answers when quiet: differing cells {quiet_differing}; requests \
             failed at the kill: ingest \
             {} (at most the {} in flight), serving {} (at most {READERS}); the subscription \
             reconnected through the proxy {reconnected:.2} s after the kill and delivered the \
             next order",
            OrderLoad::CLIENTS,
            acked.len(),
            failed.0,
            OrderLoad::CLIENTS,
            failed.1,
        ),
    );
    assert_eq!(lost, 0);
    assert_eq!(not_exact, 0);
    assert_eq!(quiet_differing, 0);
    assert!(
        failed.0 <= OrderLoad::CLIENTS as usize,
        "{} ingest requests failed; the proxy's log:\n{}",
        failed.0,
        ingest_proxy.log()
    );
    assert!(
        failed.1 <= READERS,
        "{} serving requests failed; the proxy's log:\n{}",
        failed.1,
        serving_proxy.log()
    );
}

/// An instance that answers `/whoami` with its number and is never ready, on a
/// runtime of its own: shutting that down closes its listener and every
/// connection the proxy keeps to it, as a killed process would.
struct NeverReady {
    port: u16,
    runtime: Option<tokio::runtime::Runtime>,
}

impl NeverReady {
    fn start(n: usize) -> NeverReady {
        use axum::routing::get;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.spawn(async move {
            let router = axum::Router::new()
                .route(
                    "/readyz",
                    get(|| async { axum::http::StatusCode::SERVICE_UNAVAILABLE }),
                )
                .route(
                    "/whoami",
                    get(move || async move { format!("instance {n}") }),
                );
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, router).await.unwrap();
        });
        NeverReady {
            port,
            runtime: Some(runtime),
        }
    }

    fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// When every instance fails its check at once the proxy still sends requests
/// to them (fail open: each answers for itself, honestly), a dead one's are
/// retried on the other, and with none reachable the proxy's own 503 is
/// problem+json with Retry-After; a request it cannot read is a 400.
#[tokio::test]
async fn the_proxy_fails_open_and_speaks_problem_json() {
    let mut instances = [NeverReady::start(0), NeverReady::start(1)];
    let proxy = PrivateHaProxy::start(&[instances[0].port, instances[1].port]).await;
    tidemark_testkit::eventually(
        Duration::from_secs(30),
        "both instances fail their checks",
        || {
            let log = proxy.log();
            async move { log.contains("Running on backup") }
        },
    )
    .await;
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{}/whoami", proxy.port);
    let mut answered = std::collections::BTreeSet::new();
    for _ in 0..8 {
        let response = http.get(&url).send().await.unwrap();
        assert_eq!(response.status(), 200, "fail open");
        answered.insert(response.text().await.unwrap());
    }
    assert_eq!(answered.len(), 2, "both backups serve: {answered:?}");

    // One gone: its requests are retried on the other; none fails.
    instances[0].kill();
    for _ in 0..8 {
        let response = http.get(&url).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "instance 1");
    }

    // Both gone: the proxy's own 503, as problem+json with Retry-After.
    instances[1].kill();
    let response = http.get(&url).send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let problem: serde_json::Value = response.json().await.unwrap();
    assert_eq!(problem["status"], 503);
    assert!(problem["detail"].as_str().unwrap().contains("retry"));

    // A request it cannot read: a 400, never a 5xx. (Its body stays HAProxy's
    // HTML: before 3.2 a parse error in the H1 layer ignores the configured error
    // responses, haproxy/haproxy#3032; Debian 12 packages 2.6.)
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .unwrap();
    raw.write_all(b"NOT HTTP AT ALL\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    raw.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
}
