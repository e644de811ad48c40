//! `PUT /v1/fx-rates`: an admin loads exchange rates in the ECB's CSV format;
//! idempotent, a later file corrects, a bad file stores nothing.

use tidemark_platform::auth::{self, Scope};

use crate::Harness;

async fn put(h: &Harness, key: &str, content_type: &str, body: &str) -> reqwest::Response {
    h.http
        .put(h.svc.url("/v1/fx-rates"))
        .bearer_auth(key)
        .header("content-type", content_type)
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

async fn stored(h: &Harness) -> Vec<(String, String, String)> {
    sqlx::query_as("SELECT currency, day::text, per_eur::text FROM fx_rates ORDER BY 1, 2")
        .fetch_all(&h.db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn rates_load_idempotently_a_later_file_corrects_and_a_bad_one_stores_nothing() {
    let h = Harness::start().await;
    let (_, admin) = auth::create(&h.db.pool, "admin", &[Scope::Admin], None)
        .await
        .unwrap();
    let file = "Date,USD,JPY,CYP,\n2026-11-27,1.0542,158.10,N/A,\n2026-11-26,1.0533,N/A,N/A,\n";

    // The ingest scope is not enough; the body must be CSV.
    let r = put(&h, &h.key, "text/csv", file).await;
    assert_eq!(r.status(), 403);
    let r = put(&h, &admin, "application/json", file).await;
    assert_eq!(r.status(), 415);
    assert_eq!(r.headers()["content-type"], "application/problem+json");

    let r = put(&h, &admin, "text/csv; charset=utf-8", file).await;
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["rates"], 3);
    assert_eq!(body["changed"], 3);
    assert_eq!(body["ignored_columns"], serde_json::json!(["CYP"]));
    assert_eq!(body["first_day"], "2026-11-26");
    let first = stored(&h).await;
    assert_eq!(first.len(), 3);

    // Resent: nothing changes. A correction of one rate changes one.
    let body: serde_json::Value = put(&h, &admin, "text/csv", file)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["changed"], 0);
    let corrected = file.replace("1.0533", "1.0539");
    let body: serde_json::Value = put(&h, &admin, "text/csv", &corrected)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["changed"], 1);
    assert!(
        stored(&h)
            .await
            .contains(&("USD".into(), "2026-11-26".into(), "1.0539".into()))
    );

    // Errors name their line and column; nothing of the file is stored.
    let bad = "Date,USD,GBP\n2026-11-30,1.06,0.83\n2026-11-31,1.06,0.83\n2026-12-01,-1,x\n";
    let r = put(&h, &admin, "text/csv", bad).await;
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    let pointers: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pointer"].as_str().unwrap())
        .collect();
    assert_eq!(
        pointers,
        ["line 3/Date", "line 4/USD", "line 4/GBP"],
        "{body}"
    );
    assert_eq!(stored(&h).await.len(), 3, "nothing stored");
}
