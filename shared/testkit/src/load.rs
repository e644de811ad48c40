//! A steady load of single orders, for tests that kill or stop what serves it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use tidemark_domain::Order;
use uuid::Uuid;

/// Sixteen clients posting one random order per request to `POST /v1/orders` on a
/// port until stopped; the ids of the orders that got a 2xx are kept.
pub struct OrderLoad {
    acked: Arc<Mutex<Vec<Uuid>>>,
    /// Requests that got no 2xx (an error status or no answer).
    pub failed: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl OrderLoad {
    /// The clients in flight at once.
    pub const CLIENTS: u64 = 16;

    /// Starts the clients; `body` is the order as the API takes it.
    pub fn start(port: u16, key: &str, seed: u64, body: fn(&Order) -> serde_json::Value) -> Self {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..Self::CLIENTS)
            .map(|i| {
                let (acked, failed, stop, key) =
                    (acked.clone(), failed.clone(), stop.clone(), key.to_owned());
                tokio::spawn(async move {
                    // A request the killed process never answers must not hold the
                    // client (and `stop`) forever: it simply is not acked.
                    let http = reqwest::Client::builder()
                        .timeout(Duration::from_secs(10))
                        .build()
                        .expect("an HTTP client");
                    let mut rng = StdRng::seed_from_u64(seed * 100 + i);
                    while !stop.load(Ordering::Relaxed) {
                        let order = crate::random_order(&mut rng);
                        let response = http
                            .post(format!("http://127.0.0.1:{port}/v1/orders"))
                            .bearer_auth(&key)
                            .json(&body(&order))
                            .send()
                            .await;
                        match response {
                            Ok(r) if r.status().is_success() => {
                                acked.lock().unwrap().push(order.order_id);
                            }
                            Ok(_) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                            // The process is gone: wait for the next one.
                            Err(_) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        OrderLoad {
            acked,
            failed,
            stop,
            tasks,
        }
    }

    /// How many orders got a 2xx so far.
    pub fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits (at most a minute) until `n` orders got a 2xx.
    pub async fn until_acked(&self, n: usize) {
        crate::eventually(Duration::from_secs(60), "orders are acked", || {
            let done = self.acked() >= n;
            async move { done }
        })
        .await;
    }

    /// Stops the clients; the ids of every acked order.
    pub async fn stop(self) -> Vec<Uuid> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("a load client");
        }
        Arc::try_unwrap(self.acked)
            .expect("the clients ended")
            .into_inner()
            .unwrap()
    }
}

/// How many of `acked` are not in `orders`.
pub async fn missing(pool: &sqlx::PgPool, acked: &[Uuid]) -> usize {
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE order_id = ANY($1)")
        .bind(acked)
        .fetch_one(pool)
        .await
        .expect("count acked orders");
    acked.len() - stored as usize
}
