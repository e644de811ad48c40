//! The load test's smoke mode against real ingest and serving: every scenario runs
//! a few seconds at a low rate and every request of every kind succeeds.

use std::time::Duration;

use tidemark_loadtest::scenario::{self, Name, Settings};
use tidemark_platform::auth::{self, Scope};

/// Ingest on `db`, its relay off.
async fn ingest(db: &tidemark_testkit::TestDb) -> tidemark_testkit::Running {
    let mut config = tidemark_ingest::Config {
        postgres: db.config.clone(),
        s3: tidemark_testkit::s3(),
        ..Default::default()
    };
    config.relay.enabled = false;
    tidemark_testkit::start(|l, s| tidemark_ingest::serve(config, l, s)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn every_scenario_passes_in_smoke_mode() {
    let db = tidemark_testkit::postgres().await;
    let ingest = ingest(&db).await;
    let serving_config = tidemark_serving::Config {
        postgres: db.config.clone(),
        redis: tidemark_testkit::redis(),
        clickhouse: tidemark_testkit::clickhouse(),
        ..Default::default()
    };
    let serving =
        tidemark_testkit::start(|l, s| tidemark_serving::serve(serving_config, l, s)).await;
    let (_, ingest_key) = auth::create(&db.pool, "loadtest", &[Scope::Ingest], None)
        .await
        .unwrap();
    let (_, read_key) = auth::create(&db.pool, "loadtest", &[Scope::Read], None)
        .await
        .unwrap();
    let settings = Settings {
        ingest_url: ingest.url(""),
        serving_url: serving.url(""),
        ingest_key,
        read_key,
        rate: 0.0,
        duration: Duration::ZERO,
        batch: 0,
        seed: 5,
        max_in_flight: 64,
    }
    .smoke();

    let names = [
        Name::IngestHeavy,
        Name::RestReads,
        Name::GraphqlReads,
        Name::Mixed,
    ];
    let runs = futures::future::join_all(names.map(|n| scenario::run(n, &settings))).await;
    let mut stored = 0;
    for (name, reports) in names.iter().zip(runs) {
        let reports = reports.unwrap();
        let table = scenario::table(&reports);
        println!("{table}");
        let total = reports.last().unwrap();
        assert_eq!(total.scenario, format!("{}/total", name.as_str()));
        assert_eq!(total.errors, 0, "{table}");
        // 3 s at 40 requests/s.
        assert_eq!(total.requests, 120, "{table}");
        assert!(
            total.p99_ms > 0.0 && total.p99_ms <= total.max_ms,
            "{table}"
        );
        if *name == Name::Mixed {
            let kinds: Vec<&str> = reports.iter().map(|r| r.scenario.as_str()).collect();
            assert_eq!(
                kinds,
                ["mixed/ingest", "mixed/rest", "mixed/graphql", "mixed/total"],
                "the mixed scenario sends every kind"
            );
        }
        stored += reports
            .iter()
            .filter(|r| r.scenario.ends_with("/ingest"))
            .map(|r| r.items)
            .sum::<u64>();
    }
    // Every order a scenario counted as stored is in Postgres, once.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(stored > 0);
    assert_eq!(rows as u64, stored);

    // `watch`: the subscription pushes the current series at once.
    let watch = tidemark_loadtest::watch::Settings {
        serving_url: settings.serving_url.clone(),
        key: settings.read_key.clone(),
        query: "subscription { revenue(granularity: MINUTE) { points { orders } } }".into(),
        updates: Some(1),
        duration: Some(Duration::from_secs(10)),
    };
    assert_eq!(tidemark_loadtest::watch::run(&watch).await.unwrap(), 1);
    serving.stop().await.unwrap();
    ingest.stop().await.unwrap();
}

/// The bench's sender (`ingest-single`, `ingest-batch`): every body is sent once,
/// what ingest refuses is counted by its status, and a server that is not there
/// is a `connection` error for every body, not a hang.
#[tokio::test(flavor = "multi_thread")]
async fn every_body_is_sent_once_and_failures_are_counted_by_cause() {
    let db = tidemark_testkit::postgres().await;
    let ingest = ingest(&db).await;
    let (_, key) = auth::create(&db.pool, "loadtest", &[Scope::Ingest], None)
        .await
        .unwrap();
    let mut bodies: Vec<(Vec<u8>, u64)> = tidemark_loadtest::orders(7, 300)
        .iter()
        .map(|o| {
            (
                serde_json::to_vec(&tidemark_loadtest::order_json(o)).unwrap(),
                1,
            )
        })
        .collect();
    bodies.insert(150, (b"{\"order_id\":".to_vec(), 1));
    let url = ingest.url("/v1/orders");

    let (recorder, elapsed) =
        tidemark_loadtest::send_all(&url, &key, "application/json", bodies, 8)
            .await
            .unwrap();
    let report = recorder.report("sent", elapsed);
    assert_eq!(
        (report.requests, report.items, report.errors),
        (301, 300, 1),
        "{report:?}"
    );
    assert_eq!(report.errors_by_kind, [("400".to_owned(), 1)].into());
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 300);
    ingest.stop().await.unwrap();

    let nobody = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = format!("http://{}/v1/orders", nobody.local_addr().unwrap());
    drop(nobody);
    let bodies = vec![(b"{}".to_vec(), 1); 5];
    let (recorder, elapsed) =
        tidemark_loadtest::send_all(&closed, &key, "application/json", bodies, 2)
            .await
            .unwrap();
    let report = recorder.report("refused", elapsed);
    assert_eq!((report.requests, report.items, report.errors), (5, 0, 5));
    assert_eq!(report.errors_by_kind, [("connection".to_owned(), 5)].into());
}
