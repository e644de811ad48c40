//! Every panel of every Grafana dashboard in `dashboards/` returns data from the
//! real stack after a generator burst and a batch run: ClickHouse SQL with the
//! Grafana macros substituted, PromQL against the test Prometheus scraping this
//! test's services, and the JSON API panels against serving.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::Value;
use tidemark_compactor::Kind;
use tidemark_generator::{Format, Sender, Shape, StreamPlan};
use tokio_util::sync::CancellationToken;

use crate::Env;

/// A scrape-target file for the test Prometheus, removed on drop.
struct Targets(PathBuf);

impl Targets {
    fn register(urls: &[&str]) -> Targets {
        let dir = tidemark_testkit::stack().prometheus_targets();
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("dashboards-{}.json", uuid::Uuid::new_v4()));
        let targets: Vec<&str> = urls
            .iter()
            .map(|u| u.trim_start_matches("http://").trim_end_matches('/'))
            .collect();
        let body = serde_json::json!([{ "targets": targets, "labels": { "service": "test" } }]);
        std::fs::write(&path, body.to_string()).unwrap();
        Targets(path)
    }
}

impl Drop for Targets {
    fn drop(&mut self) {
        drop(std::fs::remove_file(&self.0));
    }
}

/// The dashboard's time range and variables, as Grafana would substitute them.
struct Macros {
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    variables: Vec<(String, String)>,
}

impl Macros {
    fn apply(&self, text: &str) -> String {
        let (f, t) = (self.from.timestamp(), self.to.timestamp());
        let iso = |d: DateTime<Utc>| d.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
        let mut out = text
            .replace("${__from:date:iso}", &iso(self.from))
            .replace("${__to:date:iso}", &iso(self.to))
            .replace("$__fromTime", &format!("toDateTime({f})"))
            .replace("$__toTime", &format!("toDateTime({t})"))
            .replace("$__rate_interval", "1m")
            .replace("$__interval", "1m");
        // $__timeFilter(column) → column BETWEEN the range's ends.
        while let Some(at) = out.find("$__timeFilter(") {
            let rest = &out[at + "$__timeFilter(".len()..];
            let close = rest.find(')').expect("closed macro");
            let column = &rest[..close];
            let filter = format!("{column} >= toDateTime({f}) AND {column} <= toDateTime({t})");
            out = format!("{}{filter}{}", &out[..at], &rest[close + 1..]);
        }
        for (name, value) in &self.variables {
            // A multi-value variable as the API's list (`${city:csv}`: one value
            // here, as its default is).
            out = out
                .replace(&format!("${{{name}:csv}}"), value)
                .replace(&format!("${{{name}}}"), value)
                .replace(&format!("${name}"), value);
        }
        assert!(
            !out.replace("$.", "").contains('$'),
            "an unsubstituted macro or variable in: {out}"
        );
        out
    }
}

/// Values at a JSONPath of the simple form the panels use: `$.a[*].b`.
fn json_path<'a>(value: &'a Value, path: &str) -> Vec<&'a Value> {
    let mut current = vec![value];
    for step in path.trim_start_matches("$.").split('.') {
        let (key, all) = match step.strip_suffix("[*]") {
            Some(key) => (key, true),
            None => (step, false),
        };
        current = current
            .into_iter()
            .filter_map(|v| v.get(key))
            .flat_map(|v| {
                if all {
                    v.as_array().map(|a| a.iter().collect()).unwrap_or_default()
                } else {
                    vec![v]
                }
            })
            .collect();
    }
    current
}

async fn clickhouse_rows(env: &Env, sql: &str) -> Vec<Value> {
    let response = env
        .http
        .post(
            reqwest::Url::parse_with_params(
                &env.clickhouse.url,
                &[("database", env.clickhouse.database.as_str())],
            )
            .unwrap(),
        )
        .body(format!("{sql}\nFORMAT JSON"))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    assert!(status.is_success(), "ClickHouse refused:\n{sql}\n{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    body["data"].as_array().unwrap().clone()
}

async fn prometheus_series(promql: &str) -> usize {
    let url = format!(
        "{}/api/v1/query",
        tidemark_testkit::stack().prometheus_url()
    );
    let body: Value = reqwest::Client::new()
        .get(reqwest::Url::parse_with_params(&url, &[("query", promql)]).unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["status"], "success", "{promql}: {body}");
    body["data"]["result"].as_array().map_or(0, Vec::len)
}

/// The SQL that gives a currency's ISO 4217 exponent (2 unless listed), for panels
/// that show amounts in major units.
fn exponent_sql(column: &str) -> String {
    let odd: Vec<_> = tidemark_domain::Currency::all()
        .filter(|c| c.exponent() != 2)
        .collect();
    let codes: Vec<String> = odd.iter().map(|c| format!("'{c}'")).collect();
    let exponents: Vec<String> = odd.iter().map(|c| c.exponent().to_string()).collect();
    format!(
        "transform({column}, [{}], [{}], 2)",
        codes.join(", "),
        exponents.join(", ")
    )
}

/// Every exponent lookup in a panel's SQL lists exactly the currencies whose
/// exponent is not 2 (so KWD shows three decimals, JPY none), as the API does.
#[test]
fn panels_convert_amounts_with_every_currencys_exponent() {
    let dir = tidemark_testkit::workspace_root().join("dashboards");
    let business = std::fs::read_to_string(dir.join("business.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&business).unwrap();
    let mut lookups = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let Some(sql) = target["rawSql"].as_str() else {
                continue;
            };
            assert!(
                !sql.contains("AS revenue_minor") && !sql.contains("intDiv("),
                "{}: amounts in minor units: {sql}",
                panel["title"]
            );
            let mut rest = sql;
            while let Some(at) = rest.find("transform(") {
                let column = rest[at + "transform(".len()..].split(',').next().unwrap();
                let expected = exponent_sql(column);
                assert!(
                    rest[at..].starts_with(&expected),
                    "{}: {} is not {expected}",
                    panel["title"],
                    &rest[at..(at + expected.len()).min(rest.len())]
                );
                lookups += 1;
                rest = &rest[at + expected.len()..];
            }
        }
    }
    assert!(
        lookups >= 3,
        "the ClickHouse revenue panels convert amounts: {lookups}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_dashboard_panel_returns_data_after_a_generator_burst() {
    let started = std::time::Instant::now();
    // Where the test is, for a run that is cut off.
    let phase = |what: &str| eprintln!("{:>6.1} s  {what}", started.elapsed().as_secs_f64());
    let env = Env::new().await;
    let (ingest, key) = env.ingest_api().await;
    phase("stack up");
    let _targets = Targets::register(&[&ingest.url(""), &env.serving.url("")]);

    // A burst of live orders, one refused request (for the error panel), a batch run.
    let sender = Sender::new(&ingest.url(""), &key, Format::Json).unwrap();
    let burst = StreamPlan {
        seed: 21,
        rate: 1_000.0,
        batch: 100,
        count: Some(800),
        duration: None,
        // 2,000 customers (their profiles are sent too), as in the demo test.
        shape: Shape {
            users: 2_000,
            ..Shape::default()
        },
    };
    let sent = tidemark_generator::stream(&sender, &burst, CancellationToken::new(), false)
        .await
        .unwrap();
    assert_eq!(sent.created, 800);
    phase("burst sent");
    // The demo's exchange rates, for the panels in a reporting currency.
    let today = Utc::now().date_naive();
    let rates = tidemark_generator::fx_rates_csv(today - chrono::Days::new(10), today, 1);
    tidemark_ingest::fx::store(&env.db.pool, &tidemark_ingest::fx::parse(&rates).unwrap())
        .await
        .unwrap();
    let refused = env
        .http
        .post(ingest.url("/v1/orders"))
        .bearer_auth(&key)
        .json(&serde_json::json!({ "order_id": "not-a-uuid" }))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    let outcome = env.compactor.run_once(Kind::Incremental).await.unwrap();
    assert!(matches!(
        outcome,
        tidemark_compactor::Outcome::Published { .. }
    ));
    phase("batch run published");
    env.speed_caught_up().await;
    phase("speed caught up");
    // The warehouse (ingest's loader), for the panel by city of residence.
    env.vault_caught_up().await;
    phase("vault caught up");

    let dir = tidemark_testkit::workspace_root().join("dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "business and operations dashboards");
    let provisioned =
        std::fs::read_to_string(dir.join("provisioning/datasources/tidemark.yml")).unwrap();
    let mut checked = Vec::new();
    for file in files {
        let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let variables = dashboard["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                let name = v["name"].as_str().unwrap().to_owned();
                (name, v["current"]["value"].as_str().unwrap().to_owned())
            })
            .collect();
        let macros = Macros {
            from: Utc::now() - TimeDelta::hours(6),
            // The summary aligns its range to whole minutes (`to` rounds down): a
            // range ending exactly now would leave out the burst, made this minute.
            to: Utc::now() + TimeDelta::minutes(2),
            variables,
        };
        // Variable queries must work too.
        for variable in dashboard["templating"]["list"].as_array().unwrap() {
            if variable["datasource"]["uid"] == "clickhouse" {
                let rows = clickhouse_rows(&env, variable["query"].as_str().unwrap()).await;
                assert!(!rows.is_empty(), "variable {}", variable["name"]);
            }
        }
        for panel in dashboard["panels"].as_array().unwrap() {
            let title = format!("{} / {}", file.display(), panel["title"]);
            for target in panel["targets"].as_array().unwrap() {
                let source = target["datasource"]["uid"]
                    .as_str()
                    .or(panel["datasource"]["uid"].as_str())
                    .unwrap();
                assert!(
                    provisioned.contains(&format!("uid: {source}")),
                    "{title}: datasource {source} is not provisioned"
                );
                match source {
                    "clickhouse" => {
                        let sql = macros.apply(target["rawSql"].as_str().unwrap());
                        let rows = clickhouse_rows(&env, &sql).await;
                        assert!(!rows.is_empty(), "{title}: no rows from\n{sql}");
                    }
                    "prometheus" => {
                        let promql = macros.apply(target["expr"].as_str().unwrap());
                        let what = format!("{title}: {promql} returns data");
                        tidemark_testkit::eventually(Duration::from_secs(60), &what, || {
                            let promql = promql.clone();
                            async move { prometheus_series(&promql).await > 0 }
                        })
                        .await;
                    }
                    "tidemark-api" => {
                        let url = format!(
                            "{}?{}",
                            env.serving.url(target["urlPath"].as_str().unwrap()),
                            macros.apply(target["queryParams"].as_str().unwrap())
                        );
                        let response = env
                            .http
                            .get(&url)
                            .bearer_auth(&env.key)
                            .send()
                            .await
                            .unwrap();
                        let status = response.status();
                        let body: Value = response.json().await.unwrap();
                        assert_eq!(status, 200, "{title}: {url}: {body}");
                        for field in target["fields"].as_array().unwrap() {
                            let path = field["jsonPath"].as_str().unwrap();
                            let values = json_path(&body, path);
                            assert!(!values.is_empty(), "{title}: nothing at {path} in {body}");
                        }
                        // A panel that names the fields it draws gets those and
                        // no more (the dashboard question's answer is a quarter
                        // of the whole).
                        if let Some(fields) = url.split("&fields=").nth(1) {
                            let asked: BTreeSet<&str> = fields.split(',').collect();
                            for point in body["points"].as_array().unwrap() {
                                let held: BTreeSet<&str> = point
                                    .as_object()
                                    .unwrap()
                                    .keys()
                                    .map(String::as_str)
                                    .collect();
                                assert_eq!(held, asked, "{title}: a point of {url}");
                            }
                        }
                    }
                    other => panic!("{title}: unknown datasource {other}"),
                }
                phase(&format!("{title} ({source})"));
                checked.push(title.clone());
            }
        }
    }
    eprintln!("{} panel queries returned data", checked.len());
    assert!(checked.len() >= 16, "{checked:?}");
    ingest.stop().await.unwrap();
}
