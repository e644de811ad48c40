//! ETL alerts end to end: a batch run fails its audit, the real Prometheus (with
//! the repository's rules) scrapes the failure, the real Alertmanager routes the
//! alert, and it arrives at a local webhook receiver.

use std::time::Duration;

use axum::Json;
use axum::routing::{get, post};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::Value;
use tidemark_compactor::{Kind, Outcome};
use tidemark_testkit::PrivateAlerting;

use crate::Env;

/// The value of `query` in Prometheus, if it has one sample.
async fn instant(prometheus: &str, query: &str) -> Option<f64> {
    let body: Value = reqwest::Client::new()
        .get(
            reqwest::Url::parse_with_params(
                &format!("{prometheus}/api/v1/query"),
                &[("query", query)],
            )
            .ok()?,
        )
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    body["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_audit_raises_an_alert_that_reaches_the_receiver() {
    // This process's metrics, and a receiver of Alertmanager's webhook.
    let (delivered, mut deliveries) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(|| async { tidemark_platform::metrics::handle().render() }),
        )
        .route(
            "/alerts",
            post(move |Json(body): Json<Value>| async move {
                drop(delivered.send(body));
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let here = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let alerting = PrivateAlerting::start(&format!("{here}/alerts")).await;
    // The compactor registers its audit-failure counter at zero; Prometheus must
    // have seen the zero for `increase()` to see the failure.
    let env = Env::new(8).await;
    alerting.scrape("compactor", &here);
    let prometheus = alerting.prometheus_url();
    tidemark_testkit::eventually(
        Duration::from_secs(60),
        "Prometheus scrapes the audit-failure counter at zero",
        || async {
            instant(
                &prometheus,
                "compactor_audit_failures_total{service=\"compactor\"}",
            )
            .await
                == Some(0.0)
        },
    )
    .await;

    // A run whose staging is corrupted fails its audit (see
    // batch::a_failed_audit_publishes_nothing).
    let mut rng = StdRng::seed_from_u64(43);
    let orders: Vec<_> = (0..50)
        .map(|_| tidemark_testkit::random_order(&mut rng))
        .collect();
    env.ingest(&orders).await;
    let c = &env.compactor;
    let run = c.plan(Kind::Incremental).await.unwrap();
    assert!(c.wait_for_relay(&run).await.unwrap());
    let written = c.write_lake(&run).await.unwrap();
    c.stage(&run, &written.orders).await.unwrap();
    tidemark_platform::clickhouse::client(&env.ch)
        .query(&format!(
            "INSERT INTO {} (granularity, dimension, bucket, value, currency, run_id, \
               revenue_minor, orders, items) VALUES ('hour', 'city', toDateTime(0), 'Berlin', 'EUR', {}, 100, 1, 1)",
            run.staging(),
            run.run_id
        ))
        .execute()
        .await
        .unwrap();
    let report = c.audit(&run, &written, &written.orders).await.unwrap();
    assert!(matches!(
        c.fail(&run, report).await.unwrap(),
        Outcome::AuditFailed { .. }
    ));

    // The alert arrives at the receiver, firing, with the rule's labels.
    let alert = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let body = deliveries.recv().await.expect("the receiver runs");
            let found = body["alerts"].as_array().and_then(|alerts| {
                alerts
                    .iter()
                    .find(|a| {
                        a["labels"]["alertname"] == "TidemarkAuditFailed" && a["status"] == "firing"
                    })
                    .cloned()
            });
            if let Some(alert) = found {
                break alert;
            }
        }
    })
    .await
    .expect("the alert reaches the receiver within two minutes");
    assert_eq!(alert["labels"]["severity"], "critical", "{alert}");
    assert_eq!(alert["labels"]["service"], "compactor", "{alert}");
    assert_eq!(
        alert["annotations"]["summary"], "A batch run failed its audit",
        "{alert}"
    );
}
