//! The Data Vault 2.0 warehouse: loaded from the log exactly once (a batch's rows
//! and its cursor move commit together; loaders take turns), insert-only, and
//! rebuilt from scratch to the same rows.

use std::sync::Arc;

use chrono::{TimeDelta, Utc};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::json;
use tidemark_ingest::config::VaultSettings;
use tidemark_ingest::vault::{self, Loader, Step, TABLES};

use crate::{Harness, order_json, random_order};

/// A small batch size, so that a load takes several steps.
fn settings() -> VaultSettings {
    VaultSettings {
        batch_size: 7,
        ..VaultSettings::default()
    }
}

/// Every row of every vault table, as text, sorted: the warehouse's content.
async fn content(h: &Harness) -> Vec<String> {
    let mut rows = Vec::new();
    for table in TABLES {
        let mut of_table: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT '{table}:' || t::text FROM vault.{table} t"
        )))
        .fetch_all(&h.db.pool)
        .await
        .unwrap();
        rows.append(&mut of_table);
    }
    rows.sort();
    rows
}

async fn scalar(h: &Harness, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&h.db.pool)
        .await
        .unwrap()
}

/// Loads until no row of the log is left unloaded; returns the rows this loader
/// loaded. An idle step only means nothing lies below the horizon *now*: another
/// test's open transaction holds the cluster-wide horizon back, so the loop waits
/// for the lag to reach zero rather than stopping at the first idle step.
async fn load_all(loader: &Loader, pool: &sqlx::PgPool) -> i64 {
    let mut loaded = 0;
    loop {
        match loader.step().await.unwrap() {
            Step::Loaded { rows } => loaded += rows,
            Step::Idle => {
                if vault::lag(pool).await.unwrap().rows == 0 {
                    return loaded;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Step::Standby => panic!("an unfenced loader always leads"),
        }
    }
}

/// Orders (some of two lines, some users repeating), refunds of some, and
/// customers with a move each.
async fn fill(h: &Harness) -> (usize, usize, usize) {
    let mut rng = StdRng::seed_from_u64(20);
    let mut orders = Vec::new();
    for i in 0..30 {
        let mut order = random_order(&mut rng);
        order.user_id = format!("u-{}", i % 9);
        order.created_at = Utc::now() - TimeDelta::hours(3);
        orders.push(order);
    }
    let body = json!(orders.iter().map(order_json).collect::<Vec<_>>());
    assert_eq!(h.post_json(&body).await.status(), 201);
    let (mut adjustments, mut refunds) = (0, 0);
    for order in orders.iter().step_by(4) {
        let r = h
            .http
            .post(
                h.svc
                    .url(&format!("/v1/orders/{}/cancellation", order.order_id)),
            )
            .bearer_auth(&h.key)
            .json(&json!({"created_at": Utc::now().to_rfc3339()}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        adjustments += 1;
        refunds += order.lines.len();
    }
    for (i, city) in ["Berlin", "Paris", "Rome"].iter().enumerate() {
        for (moved, at) in [
            (*city, "2026-01-01T00:00:00Z"),
            ("Lyon", "2026-06-01T00:00:00Z"),
        ] {
            let r = h
                .http
                .put(h.svc.url(&format!("/v1/customers/u-{i}")))
                .bearer_auth(&h.key)
                .json(&json!({"city": moved, "segment": "retail",
                              "signed_up_at": "2025-12-01T00:00:00Z", "effective_at": at}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
        }
    }
    (orders.len(), refunds, adjustments)
}

/// The relations a plan reads by a sequential scan (`EXPLAIN (FORMAT JSON)`).
fn scanned_whole(plan: &serde_json::Value, out: &mut Vec<String>) {
    if plan["Node Type"] == "Seq Scan" {
        out.push(plan["Relation Name"].as_str().unwrap_or("?").to_owned());
    }
    for child in plan["Plans"].as_array().into_iter().flatten() {
        scanned_whole(child, out);
    }
}

/// A load of a small batch at the end of a long log reads the batch's orders
/// and their lines by the log's indexes, not the whole log: Postgres estimates a
/// row comparison as a seventh of the table, and a batch of 20 orders was joined
/// to all the lines by a sequential scan (`bench serving`'s statements: 3.3 ms
/// per statement with 27,000 lines, growing with the log).
#[tokio::test(flavor = "multi_thread")]
async fn a_load_reads_its_batch_by_the_logs_indexes_however_long_the_log() {
    let h = Harness::with(|c| c.vault.enabled = false).await;
    // 60,000 one-line orders in 3,000 transactions, as a live stream writes them.
    sqlx::query(
        "DO $$ BEGIN FOR i IN 1..3000 LOOP \
           INSERT INTO orders (order_id, user_id, city, currency, created_at) \
           SELECT gen_random_uuid(), 'u-' || i || '-' || j, 'Berlin', 'EUR', now() \
           FROM generate_series(1, 20) j; \
           INSERT INTO order_lines SELECT order_id, 1, 'p-1', 'books', 1, 100 \
           FROM orders WHERE txid = pg_current_xact_id(); \
           COMMIT; \
         END LOOP; END $$",
    )
    .execute(&h.db.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE").execute(&h.db.pool).await.unwrap();
    // The batch: the 20 orders after the 50,000th.
    let bound = async |offset: i64| -> (i64, i64) {
        sqlx::query_as(
            "SELECT txid::text::int8, seq FROM orders ORDER BY txid, seq OFFSET $1 LIMIT 1",
        )
        .bind(offset)
        .fetch_one(&h.db.pool)
        .await
        .unwrap()
    };
    let ((after_txid, after_seq), (until_txid, until_seq)) =
        (bound(50_000).await, bound(50_020).await);
    for statement in vault::LOAD {
        let mut tx = h.db.pool.begin_with(vault::LOAD_TRANSACTION).await.unwrap();
        let (plan,): (serde_json::Value,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "EXPLAIN (FORMAT JSON) {statement}"
        )))
        .bind(after_txid)
        .bind(after_seq)
        .bind(until_txid)
        .bind(until_seq)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        let mut whole = Vec::new();
        scanned_whole(&plan[0]["Plan"], &mut whole);
        whole.retain(|t| t == "orders" || t == "order_lines");
        assert!(
            whole.is_empty(),
            "{statement}\nscans {whole:?} whole: {plan}"
        );
        tx.rollback().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_log_is_loaded_once_into_hubs_links_and_satellites_and_rebuilt_to_the_same_rows() {
    let h = Harness::with(|c| c.vault.enabled = false).await;
    let (orders, adjusted_lines, adjustments) = fill(&h).await;
    let lines = scalar(&h, "SELECT count(*) FROM order_lines").await;
    let log_rows = scalar(
        &h,
        "SELECT (SELECT count(*) FROM orders) + (SELECT count(*) FROM adjustments) \
              + (SELECT count(*) FROM customer_changes)",
    )
    .await;
    assert_eq!(vault::lag(&h.db.pool).await.unwrap().rows, log_rows);

    // Two loaders at once, each in small batches: every row once.
    let loaders = [
        Loader::new(
            h.db.pool.clone(),
            settings(),
            tidemark_platform::lease::Lease::unfenced("vault"),
        ),
        Loader::new(
            h.db.pool.clone(),
            settings(),
            tidemark_platform::lease::Lease::unfenced("vault"),
        ),
    ];
    let loaded: i64 = futures::future::join_all(loaders.iter().map(|l| load_all(l, &h.db.pool)))
        .await
        .into_iter()
        .sum();
    assert_eq!(loaded, log_rows);
    assert_eq!(vault::lag(&h.db.pool).await.unwrap().rows, 0);
    assert_eq!(loaders[0].step().await.unwrap(), Step::Idle);

    for (sql, expected) in [
        ("SELECT count(*) FROM vault.hub_order", orders as i64),
        ("SELECT count(*) FROM vault.hub_customer", 9),
        (
            "SELECT count(*) FROM vault.hub_product",
            scalar(&h, "SELECT count(DISTINCT product_id) FROM order_lines").await,
        ),
        (
            "SELECT count(*) FROM vault.link_order_customer",
            orders as i64,
        ),
        ("SELECT count(*) FROM vault.link_order_line", lines),
        ("SELECT count(*) FROM vault.sat_order", orders as i64),
        ("SELECT count(*) FROM vault.sat_order_line", lines),
        (
            "SELECT count(*) FROM vault.sat_line_adjustment",
            adjusted_lines as i64,
        ),
        (
            "SELECT count(*) FROM vault.sat_order_adjustment",
            adjustments as i64,
        ),
        ("SELECT count(*) FROM vault.sat_customer", 6),
        // Hash keys are MD5 of the business key; links join their hubs.
        (
            "SELECT count(*) FROM vault.hub_customer WHERE customer_hk = decode(md5(user_id), 'hex')",
            9,
        ),
        // Composite keys and diffs: MD5 of the trimmed parts joined by '||'.
        (
            "SELECT count(*) FROM vault.link_order_customer l JOIN orders o \
             ON l.order_customer_hk = decode(md5(o.order_id::text || '||' || o.user_id), 'hex')",
            orders as i64,
        ),
        (
            "SELECT count(*) FROM vault.link_order_line k JOIN order_lines l \
             ON k.order_line_hk = decode(md5(l.order_id::text || '||' || l.product_id || '||' \
                                             || l.line_no::text), 'hex')",
            lines,
        ),
        (
            "SELECT count(*) FROM vault.sat_customer s JOIN customer_changes c \
             ON s.hash_diff = decode(md5(c.city || '||' || c.segment || '||' \
                  || (extract(epoch FROM c.signed_up_at) * 1000000)::int8::text || '||' \
                  || (extract(epoch FROM c.effective_at) * 1000000)::int8::text), 'hex') \
             AND s.log_seq = c.seq",
            6,
        ),
        (
            "SELECT count(*) FROM vault.link_order_customer l \
             JOIN vault.hub_order o USING (order_hk) JOIN vault.hub_customer c USING (customer_hk) \
             JOIN orders src ON src.order_id = o.order_id AND src.user_id = c.user_id",
            orders as i64,
        ),
        // The satellites hold what the log says.
        (
            "SELECT count(*) FROM vault.sat_order_line s \
             JOIN vault.link_order_line l USING (order_line_hk) \
             JOIN vault.hub_order o USING (order_hk) \
             JOIN order_lines src ON src.order_id = o.order_id AND src.line_no = l.line_no \
             WHERE src.quantity = s.quantity AND src.unit_price_minor = s.unit_price_minor",
            lines,
        ),
    ] {
        assert_eq!(scalar(&h, sql).await, expected, "{sql}");
    }
    // No orphans: every link's and satellite's parent is loaded (the keys are not
    // enforced by the database; the load order keeps them).
    for (child, key, parent) in [
        ("link_order_customer", "order_hk", "hub_order"),
        ("link_order_customer", "customer_hk", "hub_customer"),
        ("link_order_line", "order_hk", "hub_order"),
        ("link_order_line", "product_hk", "hub_product"),
        ("sat_customer", "customer_hk", "hub_customer"),
        ("sat_order", "order_hk", "hub_order"),
        ("sat_order_line", "order_line_hk", "link_order_line"),
        ("sat_order_adjustment", "order_hk", "hub_order"),
        ("sat_line_adjustment", "order_line_hk", "link_order_line"),
    ] {
        let sql = format!(
            "SELECT count(*) FROM vault.{child} c WHERE NOT EXISTS \
             (SELECT FROM vault.{parent} p WHERE p.{key} = c.{key})"
        );
        assert_eq!(scalar(&h, &sql).await, 0, "{sql}");
        let rows = scalar(&h, &format!("SELECT count(*) FROM vault.{child}")).await;
        assert!(rows > 0, "{child} is loaded, so the check looks at rows");
    }

    // Insert-only.
    let refused = sqlx::query("UPDATE vault.sat_customer SET city = 'Oslo'")
        .execute(&h.db.pool)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("insert-only"), "{refused}");

    // Rebuilt from scratch, by one loader in other batches: the same rows.
    let before = content(&h).await;
    vault::rebuild(&h.db.pool).await.unwrap();
    assert_eq!(scalar(&h, "SELECT count(*) FROM vault.hub_order").await, 0);
    let one = Loader::new(
        h.db.pool.clone(),
        VaultSettings {
            batch_size: 1_000,
            ..VaultSettings::default()
        },
        tidemark_platform::lease::Lease::unfenced("vault"),
    );
    assert_eq!(load_all(&one, &h.db.pool).await, log_rows);
    assert_eq!(content(&h).await, before);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_running_loader_reports_its_lag_and_catches_up() {
    let h = Arc::new(Harness::start().await);
    fill(&h).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let behind = vault::lag(&h.db.pool).await.unwrap().rows;
        if behind == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{behind} rows still behind"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        scalar(&h, "SELECT count(*) FROM vault.hub_order").await,
        scalar(&h, "SELECT count(*) FROM orders").await
    );
    let metrics = h
        .http
        .get(h.svc.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("vault_rows_total"), "{metrics}");
    let ready: serde_json::Value = h
        .http
        .get(h.svc.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["advisories"]["vault"], "ok", "{ready}");
}

/// A loader that keeps up polls the log, and measures its lag, by the log's
/// indexes whatever the planner's estimates (`orderlog::TAIL_TRANSACTION`): their
/// generic plans cannot know the cursor is at the end of the log. Here the
/// estimates are skewed to favour reading the tables whole, on every connection of
/// the loader's pool.
#[tokio::test]
async fn a_loader_that_keeps_up_polls_by_the_logs_indexes_whatever_the_estimates() {
    let db = tidemark_testkit::postgres().await;
    tidemark_testkit::insert_refunded(&db.pool, 3_000).await;
    let unfenced = || tidemark_platform::lease::Lease::unfenced("vault");
    let loaded = load_all(
        &Loader::new(db.pool.clone(), VaultSettings::default(), unfenced()),
        &db.pool,
    )
    .await;
    assert_eq!(loaded, 6_000);
    tidemark_testkit::analyze_log(&db.pool).await;
    // Two pools: a plan a connection keeps is not planned again for another
    // transaction's settings.
    let (plain, ours) = (
        tidemark_testkit::skewed_pool(&db),
        tidemark_testkit::skewed_pool(&db),
    );
    // The statistics are the database's: the setup's connections end first.
    db.close_and_settle(&plain).await;
    let scanned = async |pool| {
        tidemark_testkit::seq_scans(pool, &["orders", "adjustments", "customer_changes"]).await
    };
    let start = scanned(&plain).await;
    let mut tx = plain.begin().await.unwrap();
    tidemark_orderlog::tail(&mut *tx, tidemark_domain::LogPosition::ZERO, 100)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert!(
        scanned(&plain).await > start,
        "with these estimates Postgres reads the log whole; the test proves nothing"
    );
    let start = scanned(&ours).await;
    let loader = Loader::new(ours.clone(), VaultSettings::default(), unfenced());
    assert_eq!(loader.step().await.unwrap(), Step::Idle);
    assert_eq!(scanned(&ours).await, start, "the poll");
    assert_eq!(vault::lag(&ours).await.unwrap().rows, 0);
    assert_eq!(scanned(&ours).await, start, "the lag");
}
