//! Faults with ingest as a process of its own (RELIABILITY.md R2 and R12): killed
//! with SIGKILL under load at random points, and stopped with SIGTERM under load.
//! Every order that got a 2xx must be in Postgres.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tidemark_platform::auth::{self, Scope};
use tidemark_testkit::TestDb;
use uuid::Uuid;

use crate::{order_json, random_order};

fn spawn_ingest(db: &TestDb, port: u16) -> Child {
    let url = secrecy::ExposeSecret::expose_secret(&db.config.url).to_owned();
    Command::new(env!("CARGO_BIN_EXE_tidemark-ingest"))
        .env("TIDEMARK_POSTGRES__URL", url)
        .env("TIDEMARK_HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .env("TIDEMARK_RELAY__ENABLED", "false")
        .env("TIDEMARK_TELEMETRY__LOG_FILTER", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the ingest binary starts")
}

async fn ready(port: u16) {
    let url = format!("http://127.0.0.1:{port}/readyz");
    tidemark_testkit::eventually(Duration::from_secs(30), "ingest is ready", || {
        let request = reqwest::get(url.clone());
        async move { request.await.is_ok_and(|r| r.status().is_success()) }
    })
    .await;
}

/// Sixteen clients posting one order per request until `stop`; the ids of the
/// orders that got a 2xx go to `acked`.
struct Load {
    acked: Arc<Mutex<Vec<Uuid>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, key: &str, seed: u64) -> Load {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..16)
            .map(|i| {
                let (acked, stop, key) = (acked.clone(), stop.clone(), key.to_owned());
                tokio::spawn(async move {
                    let http = reqwest::Client::new();
                    let mut rng = StdRng::seed_from_u64(seed * 100 + i);
                    while !stop.load(Ordering::Relaxed) {
                        let order = random_order(&mut rng);
                        let response = http
                            .post(format!("http://127.0.0.1:{port}/v1/orders"))
                            .bearer_auth(&key)
                            .json(&order_json(&order))
                            .send()
                            .await;
                        match response {
                            Ok(r) if r.status().is_success() => {
                                acked.lock().unwrap().push(order.order_id);
                            }
                            Ok(_) => {}
                            // The process is gone: wait for the next one.
                            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                        }
                    }
                })
            })
            .collect();
        Load { acked, stop, tasks }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    async fn until_acked(&self, n: usize) {
        tidemark_testkit::eventually(Duration::from_secs(60), "orders are acked", || {
            let done = self.acked() >= n;
            async move { done }
        })
        .await;
    }

    async fn stop(self) -> Vec<Uuid> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        Arc::try_unwrap(self.acked).unwrap().into_inner().unwrap()
    }
}

async fn missing(db: &TestDb, acked: &[Uuid]) -> usize {
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE order_id = ANY($1)")
        .bind(acked)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    acked.len() - stored as usize
}

#[tokio::test(flavor = "multi_thread")]
async fn r2_sigkill_under_load_loses_no_acked_order() {
    let db = tidemark_testkit::postgres().await;
    let (_, key) = auth::create(&db.pool, "r2", &[Scope::Ingest], None)
        .await
        .unwrap();
    let mut rng = StdRng::seed_from_u64(2);
    let port = tidemark_testkit::free_port();
    let load = Load::start(port, &key, 2);
    for kill in 0..10 {
        let mut child = spawn_ingest(&db, port);
        ready(port).await;
        // A random point: after a random number of further acknowledgements.
        let target = load.acked() + rng.random_range(20..300);
        load.until_acked(target).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        eprintln!("R2: kill {kill} after {} acked orders", load.acked());
    }
    let acked = load.stop().await;
    let lost = missing(&db, &acked).await;
    println!(
        "R2 figure: {} orders acked across 10 SIGKILLs under 16-client load; acked-but-missing {lost}",
        acked.len()
    );
    assert_eq!(lost, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn r12_sigterm_under_load_finishes_in_flight_and_exits_promptly() {
    let db = tidemark_testkit::postgres().await;
    let (_, key) = auth::create(&db.pool, "r12", &[Scope::Ingest], None)
        .await
        .unwrap();
    let port = tidemark_testkit::free_port();
    let mut child = spawn_ingest(&db, port);
    ready(port).await;
    let load = Load::start(port, &key, 12);
    load.until_acked(500).await;
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let signalled = Instant::now();
    let exited = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let exit_seconds = signalled.elapsed().as_secs_f64();
    let acked = load.stop().await;
    let lost = missing(&db, &acked).await;
    println!(
        "R12 figure: exit {exit_seconds:.2} s after SIGTERM under 16-client load \
         (status {exited}); {} acked, acked-but-missing {lost}",
        acked.len()
    );
    assert!(exited.success(), "a graceful exit: {exited}");
    assert!(exit_seconds <= 30.0);
    assert_eq!(lost, 0);
}
