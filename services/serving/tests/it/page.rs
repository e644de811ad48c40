//! The page at `/`, in a real browser: Debian's Chromium driven through
//! chromedriver (WebDriver) with fantoccini. It shows what the APIs answer, its
//! live chart follows the subscription (the key in `connection_init`), it fits a
//! phone's width, and a wrong key is said so.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use fantoccini::{Client, ClientBuilder, Locator};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::{Value, json};
use tidemark_domain::CustomerChange;
use tidemark_domain::customer::Attributes;

use crate::{Env, random_order};

/// chromedriver on a port of its own, killed when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    async fn start() -> Driver {
        let port = tidemark_testkit::free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver is installed by `cargo xtask test`");
        let driver = Driver { child, port };
        tidemark_testkit::eventually(Duration::from_secs(30), "chromedriver answers", || async {
            reqwest::get(format!("http://127.0.0.1:{port}/status"))
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        driver
    }

    async fn browser(&self) -> Client {
        // Two rustls providers are compiled in (ring and aws-lc-rs): name one.
        drop(rustls::crypto::aws_lc_rs::default_provider().install_default());
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,900"],
            }),
        );
        ClientBuilder::rustls()
            .expect("TLS roots")
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("a Chromium session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        drop(self.child.kill());
        drop(self.child.wait());
    }
}

/// Evaluates `script` (a function body returning a value) in the page.
async fn eval(browser: &Client, script: &str) -> Value {
    browser
        .execute(script, vec![])
        .await
        .expect("the script runs")
}

/// Waits until `script` returns true in the page.
async fn until(browser: &Client, what: &str, script: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if eval(browser, script).await == Value::Bool(true) {
            return;
        }
        let status = eval(
            browser,
            "return document.querySelector('#status').textContent",
        )
        .await;
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what} (status: {status})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn rows(table: &str) -> String {
    format!("return document.querySelectorAll('{table} tbody tr').length")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_page_shows_the_apis_answers_and_follows_the_live_stream() {
    let env = Env::new().await;
    // Orders of the last hour, customers with a profile, the warehouse loaded.
    let mut rng = StdRng::seed_from_u64(90);
    let now = Utc::now();
    let orders: Vec<_> = (0..40)
        .map(|i| {
            let mut order = random_order(&mut rng);
            order.user_id = format!("u-{}", i % 5);
            order.created_at = chrono::SubsecRound::trunc_subsecs(
                now - TimeDelta::minutes(i64::from(i % 50) + 1),
                6,
            );
            order
        })
        .collect();
    env.ingest(&orders).await;
    let mut tx = env.db.pool.begin().await.unwrap();
    for i in 0..5 {
        let change = CustomerChange {
            user_id: format!("u-{i}"),
            attributes: Attributes {
                city: ["Berlin", "Paris"][i % 2].into(),
                segment: "retail".into(),
                signed_up_at: now - TimeDelta::days(30),
            },
            effective_at: now - TimeDelta::days(30),
        };
        tidemark_orderlog::customers::record(&mut tx, &change)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    env.vault_caught_up().await;
    env.speed_caught_up().await;

    let driver = Driver::start().await;
    let browser = driver.browser().await;
    browser.goto(&env.serving.url("/")).await.unwrap();
    assert_eq!(browser.title().await.unwrap(), "Tidemark — live revenue");
    browser
        .find(Locator::Css("#key"))
        .await
        .unwrap()
        .send_keys(&env.key)
        .await
        .unwrap();
    browser
        .find(Locator::Css("#key-form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();

    // The tables show what the APIs answer.
    until(&browser, "the totals", &format!("{} > 0", rows("#totals"))).await;
    let today = now.date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc();
    let summary: Value = env
        .get(&format!(
            "/v1/revenue/summary?from={}&to={}&top_by=product&top=5",
            today.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            (now + TimeDelta::minutes(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ))
        .await
        .json()
        .await
        .unwrap();
    until(
        &browser,
        "every currency's totals",
        &format!(
            "return document.querySelectorAll('#totals tbody tr').length == {}",
            summary["totals"].as_array().unwrap().len()
        ),
    )
    .await;
    let first = &summary["totals"][0];
    let shown = eval(
        &browser,
        "return [...document.querySelectorAll('#totals tbody tr')[0].cells].map(c => c.textContent)",
    )
    .await;
    assert_eq!(shown[0], first["currency"], "{shown}");
    // Amounts are shown in the browser's locale (grouped, e.g. "1,234.50"): the
    // same digits as the API's decimal string.
    let digits = |v: &Value| -> String {
        v.as_str()
            .unwrap()
            .chars()
            .filter(char::is_ascii_digit)
            .collect()
    };
    assert_eq!(digits(&shown[1]), digits(&first["net_revenue"]), "{shown}");
    assert_eq!(shown[2], first["orders"].to_string(), "{shown}");
    let residence: Value = env
        .get(&format!(
            "/v1/revenue/by-residence?from={}&to={}",
            (now - TimeDelta::days(30)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            (now + TimeDelta::minutes(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ))
        .await
        .json()
        .await
        .unwrap();
    let expected = residence["rows"].as_array().unwrap().len();
    assert!(expected >= 2, "{residence}");
    until(
        &browser,
        "the residence table",
        &format!("{} == {expected}", rows("#residence")),
    )
    .await;
    let cities = eval(
        &browser,
        "return [...new Set([...document.querySelectorAll('#residence tbody tr')]\
           .map(r => r.cells[0].textContent))].sort()",
    )
    .await;
    assert_eq!(cities, json!(["Berlin", "Paris"]));
    until(
        &browser,
        "the top products",
        &format!("{} > 0", rows("#products")),
    )
    .await;
    until(
        &browser,
        "the freshness of both layers and the warehouse",
        "return ['#fresh-batch', '#fresh-speed', '#fresh-vault']\
           .every(s => document.querySelector(s).textContent.length > 1)",
    )
    .await;

    // The live chart follows the subscription: a new order of the chart's currency
    // shows within seconds.
    until(
        &browser,
        "the live chart",
        "return document.querySelectorAll('#chart rect').length == 60 \
           && document.querySelector('#live-summary').dataset.orders !== undefined",
    )
    .await;
    let currency = eval(
        &browser,
        "return document.querySelector('#live-currency').value",
    )
    .await;
    let before = eval(
        &browser,
        "return Number(document.querySelector('#live-summary').dataset.orders)",
    )
    .await
    .as_i64()
    .unwrap();
    let mut order = random_order(&mut rng);
    order.currency = currency.as_str().unwrap().parse().unwrap();
    order.created_at = chrono::SubsecRound::trunc_subsecs(Utc::now(), 6);
    env.ingest(std::slice::from_ref(&order)).await;
    until(
        &browser,
        "the new order in the live chart",
        &format!(
            "return Number(document.querySelector('#live-summary').dataset.orders) == {}",
            before + 1
        ),
    )
    .await;

    // No script or console error so far.
    let errors = eval(&browser, "return window.pageErrors").await;
    assert_eq!(errors, json!([]), "console errors: {errors}");
    let shot = tidemark_testkit::workspace_root().join("target/page-test.png");
    std::fs::write(&shot, browser.screenshot().await.unwrap()).unwrap();
    eprintln!("page: screenshot at {}", shot.display());

    // A phone's width: nothing wider than the screen.
    browser.set_window_size(390, 844).await.unwrap();
    until(
        &browser,
        "the page to fit a phone",
        "return document.documentElement.scrollWidth <= window.innerWidth",
    )
    .await;
    std::fs::write(
        shot.with_file_name("page-test-phone.png"),
        browser.screenshot().await.unwrap(),
    )
    .unwrap();

    // A wrong key is said so.
    browser.goto(&env.serving.url("/")).await.unwrap();
    eval(&browser, "localStorage.clear(); return true").await;
    let input = browser.find(Locator::Css("#key")).await.unwrap();
    input.clear().await.unwrap();
    input.send_keys("tdm_wrong").await.unwrap();
    browser
        .find(Locator::Css("#key-form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(
        &browser,
        "the refusal",
        "return document.querySelector('#status').className == 'bad'",
    )
    .await;
    browser.close().await.unwrap();
}
