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

/// Early answers and hyper's limits, as a keep-alive client meets them: an error
/// to a request with a body says `Connection: close` (the body may be unread), so
/// the client's next request goes on a fresh connection and succeeds; an
/// over-long request line or headers get problem+json; the `Bearer` scheme is
/// case-insensitive.
#[tokio::test(flavor = "multi_thread")]
async fn early_answers_close_the_connection_and_limits_answer_problem_json() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let h = crate::Harness::start().await;
    let body = serde_json::to_vec(&crate::order_json(&tidemark_testkit::random_order(
        &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(5),
    )))
    .unwrap();
    // A refused key, a refused content type, each with an unread body of 200 KB.
    let padding = vec![b' '; 200 * 1024];
    for (auth, content_type, status) in [
        ("Bearer tdm_wrong", "application/json", 401),
        (&*format!("Bearer {}", h.key), "text/csv", 415),
    ] {
        let mut tcp = tokio::net::TcpStream::connect(h.svc.addr).await.unwrap();
        let head = format!(
            "POST /v1/orders HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\
             Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            padding.len()
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        drop(tcp.write_all(&padding).await);
        let mut answer = vec![0; 4096];
        let n = tcp.read(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]).to_lowercase();
        assert!(
            answer.starts_with(&format!("http/1.1 {status}")),
            "{answer}"
        );
        assert!(answer.contains("connection: close"), "{answer}");
        assert!(answer.contains("application/problem+json"), "{answer}");
    }
    // A keep-alive client: refused with a body, then accepted on its next request.
    let client = reqwest::Client::new();
    let post = |key: String, body: Vec<u8>| {
        client
            .post(h.svc.url("/v1/orders"))
            .header("authorization", key)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let (mut follow_ups, mut failed) = (0, 0);
    for _ in 0..20 {
        let refused = post("Bearer tdm_wrong".into(), padding.clone())
            .await
            .unwrap();
        assert_eq!(refused.status(), 401);
        // The scheme in lower case.
        follow_ups += 1;
        match post(format!("bearer {}", h.key), body.clone()).await {
            Ok(r) if r.status().is_success() => {}
            _ => failed += 1,
        }
    }
    tidemark_testkit::figure(
        "R16",
        format!(
            "a keep-alive client refused with 401 before its 200 KB body was read, 20 times: \
             `Connection: close` on each refusal; failed follow-up requests {failed} of \
             {follow_ups}"
        ),
    );
    assert_eq!(failed, 0);
    // Over the request-line and header limits: problem+json, not a bodiless answer.
    let long_path = format!("/v1/schemas/{}", "x".repeat(9 * 1024));
    let r = client
        .get(h.svc.url(&long_path))
        .bearer_auth(&h.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 414);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let mut big = client.get(h.svc.url("/v1/schemas")).bearer_auth(&h.key);
    for i in 0..20 {
        big = big.header(format!("x-filler-{i}"), "y".repeat(4 * 1024));
    }
    let r = big.send().await.unwrap();
    assert_eq!(r.status(), 431);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    tidemark_testkit::figure(
        "R17",
        "a 9 KiB request target → 414, 80 KiB of headers → 431, both problem+json: bodiless \
         errors 0 (hyper's own bodiless answer remains past its ~400 KB head buffer)",
    );
}
