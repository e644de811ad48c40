//! The service's operational endpoints, started on port 0 against real servers.

use std::time::Duration;

use tidemark_testkit::{PrivatePostgres, eventually};

fn config(pg: &PrivatePostgres) -> tidemark_ingest::Config {
    tidemark_ingest::Config {
        postgres: pg.config(),
        s3: tidemark_testkit::s3(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn healthz_readyz_and_metrics_answer() {
    let pg = PrivatePostgres::start().await;
    let svc = tidemark_testkit::start(|l, s| tidemark_ingest::serve(config(&pg), l, s)).await;
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(svc.url(path)).send();

    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    let ready = get("/readyz").await.unwrap();
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["checks"]["postgres"], "ok");

    let metrics = get("/metrics").await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains("http_requests_total") && metrics.contains("route=\"/readyz\""),
        "metrics lack the request counter by route:\n{metrics}"
    );

    let missing = get("/no/such/path").await.unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(
        missing.headers()["content-type"],
        "application/problem+json"
    );
    svc.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_follows_postgres_down_and_back() {
    let pg = PrivatePostgres::start().await;
    let svc = tidemark_testkit::start(|l, s| tidemark_ingest::serve(config(&pg), l, s)).await;
    let http = reqwest::Client::new();
    let status = || {
        let request = http.get(svc.url("/readyz")).send();
        async move { request.await.map(|r| r.status().as_u16()).unwrap_or(0) }
    };
    assert_eq!(status().await, 200);

    pg.stop();
    eventually(Duration::from_secs(10), "readyz answers 503", || async {
        status().await == 503
    })
    .await;
    let body: serde_json::Value = http
        .get(svc.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(body["checks"]["postgres"], "ok");

    pg.resume().await;
    eventually(
        Duration::from_secs(10),
        "readyz answers 200 again",
        || async { status().await == 200 },
    )
    .await;
    svc.stop().await.expect("clean shutdown");
}
