//! R10 with serving as a process of its own: abusive GraphQL queries are refused
//! before they cost anything, measured as the CPU time the process spends on each.

use std::time::Duration;

use futures::StreamExt;
use tidemark_platform::auth::{self, Scope};
use tidemark_testkit::{Process, ServiceEnv};

/// CPU milliseconds per request the process spends answering `query` `n` times
/// (8 at a time), and the answers.
async fn cpu_per_query(
    process: &Process,
    url: &str,
    key: &str,
    query: &str,
    n: usize,
) -> (f64, Vec<serde_json::Value>) {
    let http = reqwest::Client::new();
    let before = process.cpu_millis();
    let answers: Vec<serde_json::Value> = futures::stream::iter(0..n)
        .map(|_| {
            let request = http
                .post(url)
                .bearer_auth(key)
                .json(&serde_json::json!({ "query": query }))
                .send();
            async move { request.await.unwrap().json().await.unwrap() }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    ((process.cpu_millis() - before) / n as f64, answers)
}

#[tokio::test(flavor = "multi_thread")]
async fn r10_abusive_graphql_is_rejected_for_little_cpu() {
    let db = tidemark_testkit::postgres().await;
    let (_, key) = auth::create(&db.pool, "r10", &[Scope::Read], None)
        .await
        .unwrap();
    let port = tidemark_testkit::free_port();
    let env = ServiceEnv::default()
        .postgres(&db.config)
        .redis(&tidemark_testkit::redis())
        .clickhouse(&tidemark_testkit::clickhouse())
        .set("TIDEMARK_HTTP__LISTEN", &format!("127.0.0.1:{port}"))
        .set("TIDEMARK_SERVING__GRAPHQL_INTROSPECTION", &false);
    let serving = Process::spawn(env!("CARGO_BIN_EXE_tidemark-serving"), &[], &env);
    tidemark_testkit::http_ready(port, "/healthz", Duration::from_secs(30)).await;
    let url = format!("http://127.0.0.1:{port}/graphql");

    let range = "from: \"2026-01-01T00:00:00Z\", to: \"2026-01-02T00:00:00Z\"";
    let depth_50 = format!(
        "{{ revenue({range}) {{ points {}{} }} }}",
        "{ bucket ".repeat(48),
        "}".repeat(48)
    );
    let aliases_100: String = (0..100)
        .map(|i| format!("a{i}: revenue({range}) {{ points {{ bucket revenueMinor }} }} "))
        .collect();
    // One field asked 2,000 times over, under a few paid-for roots.
    let huge_complexity = format!(
        "{{ {} }}",
        (0..4)
            .map(|i| format!(
                "s{i}: summary({range}) {{ totals {{ {} }} }} ",
                "currency revenueMinor orders ".repeat(170)
            ))
            .collect::<String>()
    );
    let cases = [
        ("depth 50", depth_50),
        ("100 aliases", format!("{{ {aliases_100} }}")),
        ("huge complexity", huge_complexity),
        (
            "introspection when disabled",
            "{ __schema { types { name fields { name } } } }".to_owned(),
        ),
    ];
    // Warm-up: connections, allocator, lazily built state.
    cpu_per_query(&serving, &url, &key, "{ __typename }", 200).await;
    let (trivial, _) = cpu_per_query(&serving, &url, &key, "{ __typename }", 500).await;
    let (mut figures, mut costs) = (Vec::new(), Vec::new());
    for (what, query) in &cases {
        let (cpu, answers) = cpu_per_query(&serving, &url, &key, query, 500).await;
        for answer in &answers {
            // Refused with errors; introspection when disabled answers `null`.
            let refused = answer["data"].is_null()
                && answer["errors"].as_array().is_some_and(|e| !e.is_empty())
                || answer["data"]["__schema"].is_null() && *what == "introspection when disabled";
            assert!(refused, "{what} is refused: {answer}");
            assert!(
                !answer.to_string().contains("RevenueSeries"),
                "nothing of the schema leaks: {answer}"
            );
        }
        figures.push(format!("{what} {cpu:.2} ms"));
        costs.push((*what, cpu));
    }
    tidemark_testkit::figure(
        "R10",
        format!(
            "serving as a process (debug build, GraphQL parser optimised), CPU ms per rejected query over 500 each: {} \
             (a trivial accepted `{{ __typename }}`: {trivial:.2} ms)",
            figures.join(", ")
        ),
    );
    for (what, cpu) in costs {
        assert!(cpu < 10.0, "{what}: {cpu:.2} CPU ms per rejected query");
    }
}
