//! Customers with history: each change that alters the history adds a version, a
//! resend changes nothing, a late change is placed in history, bad input names
//! each field and stores nothing, and concurrent changes of one customer are
//! serialized.

use serde_json::{Value, json};

use crate::Harness;

async fn put(h: &Harness, user_id: &str, body: &Value) -> (u16, Value) {
    let r = h
        .http
        .put(h.svc.url(&format!("/v1/customers/{user_id}")))
        .bearer_auth(&h.key)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

async fn bulk(h: &Harness, content_type: &str, body: String) -> (u16, Value) {
    let r = h
        .http
        .post(h.svc.url("/v1/customers"))
        .bearer_auth(&h.key)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

fn change(city: &str, effective_at: &str) -> Value {
    json!({
        "city": city,
        "segment": "retail",
        "signed_up_at": "2026-01-15T10:00:00Z",
        "effective_at": effective_at,
    })
}

/// (city, valid_from, valid_to) of each version.
fn versions(customer: &Value) -> Vec<(String, String, Option<String>)> {
    customer["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["city"].as_str().unwrap().to_owned(),
                v["valid_from"].as_str().unwrap().to_owned(),
                v["valid_to"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

fn v(city: &str, from: &str, to: Option<&str>) -> (String, String, Option<String>) {
    (city.into(), from.into(), to.map(str::to_owned))
}

async fn rows(h: &Harness) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM customer_changes")
        .fetch_one(&h.db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_make_versions_resends_change_nothing_and_late_changes_take_their_place() {
    let h = Harness::start().await;
    let (status, body) = put(&h, "u-1", &change("Berlin", "2026-02-01T00:00:00Z")).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["current"]["city"], "Berlin");
    assert_eq!(versions(&body), [v("Berlin", "2026-02-01T00:00:00Z", None)]);

    // A resend, and the same attributes restated later: nothing recorded.
    let (status, _) = put(&h, "u-1", &change("Berlin", "2026-02-01T00:00:00Z")).await;
    assert_eq!(status, 200);
    let (status, _) = put(&h, "u-1", &change("Berlin", "2026-03-01T00:00:00+01:00")).await;
    assert_eq!(status, 200);
    assert_eq!(rows(&h).await, 1);

    // A move closes the version before it.
    let (status, body) = put(&h, "u-1", &change("Paris", "2026-06-01T00:00:00Z")).await;
    assert_eq!(status, 201);
    assert_eq!(
        versions(&body),
        [
            v(
                "Berlin",
                "2026-02-01T00:00:00Z",
                Some("2026-06-01T00:00:00Z")
            ),
            v("Paris", "2026-06-01T00:00:00Z", None),
        ]
    );

    // A late change, effective between them, is placed in history.
    let (status, body) = put(&h, "u-1", &change("Rome", "2026-04-01T00:00:00Z")).await;
    assert_eq!(status, 201);
    assert_eq!(
        versions(&body),
        [
            v(
                "Berlin",
                "2026-02-01T00:00:00Z",
                Some("2026-04-01T00:00:00Z")
            ),
            v("Rome", "2026-04-01T00:00:00Z", Some("2026-06-01T00:00:00Z")),
            v("Paris", "2026-06-01T00:00:00Z", None),
        ]
    );
    assert_eq!(body["current"]["city"], "Paris");

    // A segment change alone is a version.
    let mut vip = change("Paris", "2026-07-01T00:00:00Z");
    vip["segment"] = json!("vip");
    let (status, body) = put(&h, "u-1", &vip).await;
    assert_eq!(status, 201);
    assert_eq!(body["current"]["segment"], "vip");
    assert_eq!(body["versions"].as_array().unwrap().len(), 4);
    assert_eq!(rows(&h).await, 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_changes_name_each_field_and_store_nothing() {
    let h = Harness::start().await;
    let long = "x".repeat(65);
    let mut bad = change(&long, "1999-01-01T00:00:00Z");
    bad["segment"] = json!("");
    let (status, body) = put(&h, "u-1", &bad).await;
    assert_eq!(status, 400, "{body}");
    let pointers: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pointer"].as_str().unwrap())
        .collect();
    assert_eq!(pointers, ["/city", "/segment", "/effective_at"], "{body}");

    let mut unknown = change("Berlin", "2026-02-01T00:00:00Z");
    unknown["country"] = json!("DE");
    let (status, body) = put(&h, "u-1", &unknown).await;
    assert_eq!(status, 400);
    assert!(
        body["detail"].as_str().unwrap().contains("country"),
        "{body}"
    );

    let (status, body) = put(&h, &long, &change("Berlin", "2026-02-01T00:00:00Z")).await;
    assert_eq!(status, 400);
    assert_eq!(body["errors"][0]["pointer"], "/user_id");

    // One bad item of a bulk import: the whole import is refused, by pointer.
    let mut items = vec![
        json!({"user_id": "u-2", "city": "Berlin", "segment": "retail",
               "signed_up_at": "2026-01-15T10:00:00Z", "effective_at": "2026-02-01T00:00:00Z"}),
        json!({"user_id": "u-3", "city": "", "segment": "retail",
               "signed_up_at": "2026-01-15T10:00:00Z", "effective_at": "2026-02-01T00:00:00Z"}),
    ];
    let (status, body) = bulk(
        &h,
        "application/json",
        Value::from(items.clone()).to_string(),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["errors"][0]["pointer"], "/1/city", "{body}");
    let (status, _) = bulk(&h, "text/csv", "user_id,city\n".into()).await;
    assert_eq!(status, 415);
    assert_eq!(rows(&h).await, 0);

    // Fixed, as NDJSON: both recorded, then the same import again changes nothing.
    items[1]["city"] = json!("Paris");
    let ndjson: String = items.iter().map(|i| format!("{i}\n")).collect();
    let (status, body) = bulk(&h, "application/x-ndjson", ndjson.clone()).await;
    assert_eq!((status, &body["recorded"]), (201, &json!(2)), "{body}");
    let (status, body) = bulk(&h, "application/x-ndjson", ndjson).await;
    assert_eq!((status, &body["unchanged"]), (200, &json!(2)), "{body}");
    assert_eq!(rows(&h).await, 2);

    // One import holding a customer's move, a resend of it, and a late change
    // before it: judged in order, each against the ones before it.
    let item = |city: &str, at: &str| {
        json!({"user_id": "u-2", "city": city, "segment": "retail",
               "signed_up_at": "2026-01-15T10:00:00Z", "effective_at": at})
    };
    let import = json!([
        item("Rome", "2026-05-01T00:00:00Z"),
        item("Rome", "2026-05-01T00:00:00Z"),
        item("Berlin", "2026-03-01T00:00:00Z"),
        item("Oslo", "2026-03-01T00:00:00Z"),
    ]);
    let (status, body) = bulk(&h, "application/json", import.to_string()).await;
    assert_eq!(status, 201);
    assert_eq!(
        (&body["recorded"], &body["unchanged"]),
        (&json!(2), &json!(2)),
        "{body}"
    );
    let (_, customer) = put(&h, "u-2", &change("Oslo", "2026-03-01T00:00:00Z")).await;
    assert_eq!(
        versions(&customer),
        [
            v(
                "Berlin",
                "2026-02-01T00:00:00Z",
                Some("2026-03-01T00:00:00Z")
            ),
            v("Oslo", "2026-03-01T00:00:00Z", Some("2026-05-01T00:00:00Z")),
            v("Rome", "2026-05-01T00:00:00Z", None),
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_changes_of_one_customer_are_serialized() {
    let h = std::sync::Arc::new(Harness::start().await);
    // The same change sent 16 times at once is recorded once; 16 distinct moves at
    // once are each recorded.
    let same = (0..16).map(|_| {
        let h = h.clone();
        tokio::spawn(async move {
            put(&h, "u-1", &change("Berlin", "2026-02-01T00:00:00Z"))
                .await
                .0
        })
    });
    let statuses: Vec<u16> = futures::future::join_all(same)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 15);
    let moves = (0..16).map(|i| {
        let h = h.clone();
        tokio::spawn(async move {
            let at = format!("2026-03-{:02}T00:00:00Z", i + 1);
            put(&h, "u-1", &change(&format!("City {i}"), &at)).await.0
        })
    });
    for status in futures::future::join_all(moves).await {
        assert_eq!(status.unwrap(), 201);
    }
    assert_eq!(rows(&h).await, 17);
}
