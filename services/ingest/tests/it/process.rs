//! Faults with ingest as a process of its own (RELIABILITY.md R2, R8 and R12):
//! killed with SIGKILL under load at random points, stopped with SIGTERM under
//! load, and flooded with bad and oversized bodies while its memory is watched.
//! Every order that got a 2xx must be in Postgres.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tidemark_platform::auth::{self, Scope};
use tidemark_testkit::{OrderLoad, Process, ServiceEnv, TestDb};
use uuid::Uuid;

use crate::{order_json, random_order};

fn spawn_ingest(db: &TestDb, port: u16) -> Process {
    let env = ServiceEnv::default()
        .postgres(&db.config)
        .set("TIDEMARK_HTTP__LISTEN", &format!("127.0.0.1:{port}"))
        .set("TIDEMARK_RELAY__ENABLED", &false);
    Process::spawn(env!("CARGO_BIN_EXE_tidemark-ingest"), &[], &env)
}

async fn ready(port: u16) {
    tidemark_testkit::http_ready(port, "/readyz", Duration::from_secs(30)).await;
}

async fn missing(db: &TestDb, acked: &[Uuid]) -> usize {
    tidemark_testkit::load::missing(&db.pool, acked).await
}

/// Sixteen clients posting one order per request through `port`.
fn start_load(port: u16, key: &str, seed: u64) -> OrderLoad {
    OrderLoad::start(port, key, seed, order_json)
}

#[tokio::test(flavor = "multi_thread")]
async fn r2_sigkill_under_load_loses_no_acked_order() {
    let db = tidemark_testkit::postgres().await;
    let (_, key) = auth::create(&db.pool, "r2", &[Scope::Ingest], None)
        .await
        .unwrap();
    let mut rng = StdRng::seed_from_u64(2);
    let port = tidemark_testkit::free_port();
    let load = start_load(port, &key, 2);
    let started = std::time::Instant::now();
    for kill in 0..10 {
        let ingest = spawn_ingest(&db, port);
        ready(port).await;
        let up = started.elapsed().as_secs_f64();
        // A random point: after a random number of further acknowledgements.
        let target = load.acked() + rng.random_range(20..300);
        load.until_acked(target).await;
        ingest.kill(); // SIGKILL
        eprintln!(
            "R2: kill {kill} after {} acked orders (ready at {up:.1} s, killed at {:.1} s)",
            load.acked(),
            started.elapsed().as_secs_f64()
        );
    }
    let acked = load.stop().await;
    eprintln!(
        "R2: load stopped at {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let lost = missing(&db, &acked).await;
    tidemark_testkit::figure(
        "R2",
        format!(
            "ingest as a process, 10 SIGKILLs at random points under 16-client load: {} \
             orders acked, acked-but-missing {lost}",
            acked.len()
        ),
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
    let ingest = spawn_ingest(&db, port);
    ready(port).await;
    let load = start_load(port, &key, 12);
    load.until_acked(500).await;
    ingest.signal("TERM");
    let signalled = Instant::now();
    let exited = ingest.exit(Duration::from_secs(60)).await;
    let exit_seconds = signalled.elapsed().as_secs_f64();
    let acked = load.stop().await;
    let lost = missing(&db, &acked).await;
    tidemark_testkit::figure(
        "R12",
        format!(
            "ingest as a process, SIGTERM under 16-client load: exit {exit_seconds:.2} s \
             (status {exited}); {} acked, acked-but-missing {lost}",
            acked.len()
        ),
    );
    assert!(exited.success(), "a graceful exit: {exited}");
    assert!(exit_seconds <= 30.0);
    assert_eq!(lost, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn r8_bad_inputs_get_4xx_and_memory_stays_bounded() {
    let db = tidemark_testkit::postgres().await;
    let (_, key) = auth::create(&db.pool, "r8", &[Scope::Ingest], None)
        .await
        .unwrap();
    let port = tidemark_testkit::free_port();
    let ingest = spawn_ingest(&db, port);
    ready(port).await;
    let baseline_kib = ingest.peak_rss_kib();

    let mut rng = StdRng::seed_from_u64(8);
    let good = serde_json::to_vec(&order_json(&random_order(&mut rng))).unwrap();
    let mut invalid_utf8 = good.clone();
    invalid_utf8[12] = 0xff;
    let mut wrong_type = order_json(&random_order(&mut rng));
    wrong_type["quantity"] = "three".into();
    let mut malformed: Vec<(&str, Vec<u8>)> = vec![
        ("application/json", b"{not json".to_vec()),
        ("application/json", serde_json::to_vec(&wrong_type).unwrap()),
        ("application/json", invalid_utf8),
        (
            "application/json",
            ("[".repeat(10_000) + &"]".repeat(10_000)).into_bytes(),
        ),
        (
            "application/json",
            ("{\"a\":".repeat(10_000) + "1" + &"}".repeat(10_000)).into_bytes(),
        ),
        (
            "application/x-ndjson",
            b"{}\n[1,2]\n{\"order_id\":".to_vec(),
        ),
        (
            "application/avro",
            b"Obj\x01\xff\xff\xff\xffgarbage".to_vec(),
        ),
        ("text/plain", good.clone()),
    ];
    // A 9 MB NDJSON body (under the 10 MiB limit) of one very long bad line.
    malformed.push((
        "application/x-ndjson",
        format!("{{\"city\":\"{}\"}}\n", "x".repeat(9_000_000)).into_bytes(),
    ));
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/v1/orders");
    let send = |content_type: &'static str, body: reqwest::Body| {
        http.post(&url)
            .bearer_auth(&key)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    // A bad body is answered 4xx; on this shared machine the server may first be
    // out of capacity (its concurrency limit, the deadline, the key lookup's pool):
    // a 503 with Retry-After is honest, and the client sends again after it. The
    // 503s' problem types are counted; a 503 without Retry-After, or any other 5xx,
    // is final.
    let send = &send;
    let ask = |content_type: &'static str, body: Vec<u8>| async move {
        let mut overloaded = Vec::new();
        loop {
            let answer = send(content_type, body.clone().into()).await;
            let wait = answer
                .as_ref()
                .ok()
                .filter(|r| r.status() == 503)
                .and_then(|r| {
                    r.headers()
                        .get("retry-after")?
                        .to_str()
                        .ok()?
                        .parse::<u64>()
                        .ok()
                });
            match (answer, wait) {
                (Ok(r), Some(wait)) if overloaded.len() < 10 => {
                    let problem: serde_json::Value = r.json().await.unwrap_or_default();
                    overloaded.push(problem["type"].as_str().unwrap_or("?").to_owned());
                    tokio::time::sleep(Duration::from_secs(wait)).await;
                }
                (answer, _) => return (answer, overloaded),
            }
        }
    };
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let mut retried = std::collections::BTreeMap::<String, usize>::new();
    let (mut not_problem, mut cut_off) = (0, 0);
    // Each malformed body 50 times, 16 requests at a time.
    let requests: Vec<_> = (0..50).flat_map(|_| malformed.clone()).collect();
    let answers: Vec<_> = futures::stream::iter(requests)
        .map(|(content_type, body)| ask(content_type, body))
        .buffer_unordered(16)
        .collect()
        .await;
    let answers: Vec<_> = answers
        .into_iter()
        .map(|(answer, overloaded)| {
            for kind in overloaded {
                *retried.entry(kind).or_default() += 1;
            }
            answer
        })
        .collect();
    // 16 streamed bodies of 64 MiB each at once, no Content-Length: cut at the limit.
    let oversized: Vec<_> = futures::future::join_all((0..16).map(|_| {
        let chunks = futures::stream::iter(
            (0..1024).map(|_| Ok::<_, std::io::Error>(vec![b' '; 64 * 1024])),
        );
        send("application/json", reqwest::Body::wrap_stream(chunks))
    }))
    .await;
    for answer in answers.into_iter().chain(oversized) {
        match answer {
            Ok(r) => {
                *statuses.entry(r.status().as_u16()).or_default() += 1;
                not_problem += usize::from(
                    r.headers()
                        .get("content-type")
                        .is_none_or(|v| v != "application/problem+json"),
                );
            }
            // The server may close a connection once it has answered 413, before
            // the client has finished sending.
            Err(_) => cut_off += 1,
        }
    }
    let peak_kib = ingest.peak_rss_kib();
    let five_xx: usize = statuses
        .iter()
        .filter(|(s, _)| **s >= 500)
        .map(|(_, n)| n)
        .sum();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    tidemark_testkit::figure(
        "R8",
        format!(
            "ingest as a process, {} malformed bodies (9 kinds incl. 10k-deep nesting, invalid \
             UTF-8, a 9 MB bad line) 16 at a time, then 16 concurrent 64 MiB streamed bodies: \
             statuses {statuses:?} (+{cut_off} connections closed after an early 413); \
             5xx {five_xx}; sent again after a 503 with Retry-After: {retried:?}; \
             peak RSS {} MiB (after startup {} MiB)",
            malformed.len() * 50,
            peak_kib / 1024,
            baseline_kib / 1024
        ),
    );
    assert_eq!(five_xx, 0);
    assert_eq!(not_problem, 0, "every error is problem+json");
    assert_eq!(stored, 0, "nothing stored");
    assert!(
        statuses.keys().all(|s| [400, 413, 415].contains(s)),
        "{statuses:?}"
    );
    // At most the body limit per request in flight, plus the process itself.
    assert!(
        peak_kib < baseline_kib + 16 * 3 * 10 * 1024 + 64 * 1024,
        "peak RSS {peak_kib} KiB"
    );
}

/// The holders of the `lake-relay` and `vault` leases.
async fn writer_leaders(db: &TestDb) -> Vec<(String, String, i64)> {
    sqlx::query_as(
        "SELECT role, holder, token FROM leases WHERE role IN ('lake-relay', 'vault') ORDER BY role",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// Whether instance `name` holds both writer leases.
async fn leads_both(db: &TestDb, name: &str) -> bool {
    let leaders = writer_leaders(db).await;
    leaders.len() == 2 && leaders.iter().all(|(_, holder, _)| holder == name)
}

/// R20 (issue 22, standby workers) for ingest's background writers: three ingest
/// instances in turn, each with a lake relay and a vault loader, default lease (5 s),
/// while orders stream into the log. The instance leading both is SIGKILLed, then
/// its successor is SIGSTOPped past its lease and woken: each time a standby takes
/// both roles over within 10 s, and in the end every row of the log is in the lake
/// exactly once and in the warehouse.
#[tokio::test(flavor = "multi_thread")]
async fn r20_standby_ingest_instances_take_over_the_relay_and_the_vault_loader() {
    let db = tidemark_testkit::postgres().await;
    let s3 = tidemark_testkit::s3();
    let env = ServiceEnv::default()
        .postgres(&db.config)
        .s3(&s3)
        .set("TIDEMARK_RELAY__POLL_INTERVAL", &20)
        .set("TIDEMARK_RELAY__BATCH_SIZE", &50)
        .set("TIDEMARK_VAULT__POLL_INTERVAL", &20)
        .set("TIDEMARK_VAULT__BATCH_SIZE", &50);
    let spawn = |name: &str, port: u16| {
        let env = env
            .clone()
            .set("TIDEMARK_LEASE__INSTANCE", &name)
            .set("TIDEMARK_HTTP__LISTEN", &format!("127.0.0.1:{port}"));
        Process::spawn(env!("CARGO_BIN_EXE_tidemark-ingest"), &[], &env)
    };
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (pool, stop) = (db.pool.clone(), stop.clone());
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(20);
            while !stop.load(Ordering::Relaxed) {
                let mut tx = pool.begin().await.unwrap();
                for _ in 0..rng.random_range(1..4) {
                    tidemark_testkit::insert(&mut *tx, &random_order(&mut rng)).await;
                }
                tx.commit().await.unwrap();
                tokio::time::sleep(Duration::from_millis(rng.random_range(1..10))).await;
            }
        })
    };
    let (port_a, port_b, port_c) = (
        tidemark_testkit::free_port(),
        tidemark_testkit::free_port(),
        tidemark_testkit::free_port(),
    );
    let a = spawn("a", port_a);
    tidemark_testkit::eventually(Duration::from_secs(30), "a leads both", || {
        leads_both(&db, "a")
    })
    .await;
    let b = spawn("b", port_b);
    ready(port_b).await;
    let b_standing = tidemark_testkit::leases_at(port_b).await;
    for role in ["lake-relay", "vault"] {
        assert_eq!(b_standing[role]["state"], "standby", "{b_standing}");
        assert_eq!(b_standing[role]["leader"], "a", "{b_standing}");
    }

    a.kill();
    let killed = Instant::now();
    tidemark_testkit::eventually(Duration::from_secs(15), "b takes both over", || {
        leads_both(&db, "b")
    })
    .await;
    let kill_takeover = killed.elapsed().as_secs_f64();
    assert!(kill_takeover < 10.0, "replaced in {kill_takeover:.1} s");

    let c = spawn("c", port_c);
    ready(port_c).await;
    b.signal("STOP");
    let paused = Instant::now();
    tidemark_testkit::eventually(Duration::from_secs(15), "c takes both over", || {
        leads_both(&db, "c")
    })
    .await;
    let pause_takeover = paused.elapsed().as_secs_f64();
    assert!(pause_takeover < 10.0, "replaced in {pause_takeover:.1} s");
    b.signal("CONT");
    tidemark_testkit::eventually(Duration::from_secs(15), "b stands by", || async {
        let s = tidemark_testkit::leases_at(port_b).await;
        ["lake-relay", "vault"]
            .iter()
            .all(|role| s[role]["state"] == "standby" && s[role]["leader"] == "c")
    })
    .await;
    let tokens: Vec<i64> = writer_leaders(&db).await.into_iter().map(|l| l.2).collect();
    assert_eq!(tokens, [3, 3], "three holders each");

    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    // Every row of the log lands in the lake once: the manifest's rows add up to
    // the orders (a second writer would land overlapping batches under other keys).
    let (landed, vaulted) = (
        "SELECT coalesce(sum(rows), 0)::int8 FROM lake_raw_files",
        "SELECT count(*) FROM vault.hub_order",
    );
    let count = |sql: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    tidemark_testkit::eventually(
        Duration::from_secs(60),
        "the lake and the vault catch up",
        || async { count(landed).await >= orders && count(vaulted).await >= orders },
    )
    .await;
    let (landed, vaulted) = (count(landed).await, count(vaulted).await);
    let refused = tidemark_testkit::metric(
        &reqwest::get(format!("http://127.0.0.1:{port_b}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        r#"lease_fenced_writes_total{role="lake-relay"}"#,
    )
    .unwrap_or(0.0);
    tidemark_testkit::figure(
        "R20",
        format!(
            "ingest's relay and vault loader, three instances, default 5 s lease, {orders} \
             orders streamed into the log: SIGKILLed leader replaced in {kill_takeover:.1} s, \
             SIGSTOPped one in {pause_takeover:.1} s (after SIGCONT it stood by; {refused} \
             late relay writes refused); rows in the lake {landed} (each once), orders in the \
             vault {vaulted}"
        ),
    );
    assert_eq!(landed, orders, "every row landed once");
    assert_eq!(vaulted, orders);
    drop((b, c));
}

/// R20 (issue 22, service replicas) for ingest: two instances behind HAProxy
/// (health-checked on `/readyz`), 16 clients posting single orders through it; one
/// instance is SIGKILLed under the load. No acknowledged order is lost, and the
/// clients see at most the killed instance's in-flight requests fail (HAProxy
/// retries a request the dead server never answered on the other one: ingest is
/// idempotent, so a retried order that had committed answers 200).
#[tokio::test(flavor = "multi_thread")]
async fn r20_two_ingest_instances_behind_haproxy_one_sigkilled_under_load_loses_nothing() {
    let db = tidemark_testkit::postgres().await;
    let (_, key) = auth::create(&db.pool, "r20", &[Scope::Ingest], None)
        .await
        .unwrap();
    let (port_a, port_b) = (tidemark_testkit::free_port(), tidemark_testkit::free_port());
    let a = spawn_ingest(&db, port_a);
    let _b = spawn_ingest(&db, port_b);
    ready(port_a).await;
    ready(port_b).await;
    let proxy = tidemark_testkit::PrivateHaProxy::start(&[port_a, port_b]).await;
    ready(proxy.port).await;
    let load = start_load(proxy.port, &key, 20);
    load.until_acked(300).await;
    let failed_before = load.failed.load(Ordering::Relaxed);
    a.kill(); // SIGKILL
    let acked_at_kill = load.acked();
    load.until_acked(acked_at_kill + 1_000).await;
    let failed = load.failed.load(Ordering::Relaxed) - failed_before;
    let acked = load.stop().await;
    let lost = missing(&db, &acked).await;
    tidemark_testkit::figure(
        "R20",
        format!(
            "ingest, two instances behind HAProxy, one SIGKILLed under 16-client single-order \
             load: {} orders acked, acked-but-missing {lost}; requests failed at the kill \
             {failed} (at most the 16 in flight)",
            acked.len()
        ),
    );
    assert_eq!(lost, 0);
    assert!(failed <= 16, "{failed} requests failed");
}
