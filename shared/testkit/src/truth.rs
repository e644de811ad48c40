//! Ground truth by SQL over Postgres `orders` and `adjustments`, and where the
//! log stands.

use sqlx::PgPool;

/// Ground truth: revenue, orders and items per (bucket start, dimension value,
/// currency), computed by SQL over Postgres `orders` and `order_lines`, for orders
/// whose transaction id lies in `[from_txid, to_txid)`. Revenue and items sum the
/// lines; an order counts once per value it contains.
///
/// `granularity_secs` is 60, 3600 or 86400; `dimension` is a stored shape
/// (`total`, `city`, …, `city_category_product`: values joined by U+001F).
pub async fn ground_truth(
    pool: &PgPool,
    granularity_secs: i64,
    dimension: &str,
    from_txid: u64,
    to_txid: u64,
) -> std::collections::BTreeMap<(i64, String, String), [i64; 3]> {
    let value = match dimension {
        "total" => "''",
        "city" => "o.city",
        "category" => "l.category",
        "product" => "l.product_id",
        "city_category" => "o.city || chr(31) || l.category",
        "city_category_product" => "o.city || chr(31) || l.category || chr(31) || l.product_id",
        other => panic!("unknown dimension {other}"),
    };
    let sql = format!(
        "SELECT (floor(extract(epoch FROM o.created_at) / $1) * $1)::int8, {value}, \
                o.currency::text, sum(l.quantity::int8 * l.unit_price_minor)::int8, \
                count(DISTINCT o.order_id)::int8, sum(l.quantity)::int8 \
         FROM orders o JOIN order_lines l USING (order_id) \
         WHERE o.txid >= $2::int8::text::xid8 AND o.txid < $3::int8::text::xid8 \
         GROUP BY 1, 2, 3"
    );
    let rows: Vec<(i64, String, String, i64, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(granularity_secs)
        .bind(from_txid as i64)
        .bind(to_txid.min(i64::MAX as u64) as i64)
        .fetch_all(pool)
        .await
        .expect("ground truth query");
    rows.into_iter()
        .map(|(bucket, value, currency, revenue, orders, items)| {
            ((bucket, value, currency), [revenue, orders, items])
        })
        .collect()
}

/// Ground truth of the corrections: refunded minor units, refunded items and
/// cancelled orders per (bucket start, dimension value, currency), by SQL over
/// `adjustments`, `adjustment_lines` and the orders they correct, for adjustments
/// whose transaction id lies in `[from_txid, to_txid)`. `order_time` buckets by the
/// order's time, otherwise by the adjustment's; values are the order's city and
/// the adjusted lines' category or product, and a cancellation counts once per
/// value its order holds.
pub async fn ground_truth_corrections(
    pool: &PgPool,
    granularity_secs: i64,
    dimension: &str,
    order_time: bool,
    from_txid: u64,
    to_txid: u64,
) -> std::collections::BTreeMap<(i64, String, String), [i64; 3]> {
    let value = match dimension {
        "total" => "''",
        "city" => "o.city",
        "category" => "ol.category",
        "product" => "ol.product_id",
        "city_category" => "o.city || chr(31) || ol.category",
        "city_category_product" => "o.city || chr(31) || ol.category || chr(31) || ol.product_id",
        other => panic!("unknown dimension {other}"),
    };
    let at = if order_time {
        "o.created_at"
    } else {
        "a.created_at"
    };
    let sql = format!(
        "SELECT (floor(extract(epoch FROM {at}) / $1) * $1)::int8, {value}, o.currency::text, \
                coalesce(sum(al.amount_minor), 0)::int8, coalesce(sum(al.quantity), 0)::int8, \
                count(DISTINCT a.adjustment_id) FILTER (WHERE a.kind = 'cancellation')::int8 \
         FROM adjustments a JOIN orders o ON o.order_id = a.order_id \
         JOIN order_lines ol ON ol.order_id = a.order_id \
         LEFT JOIN adjustment_lines al \
              ON al.adjustment_id = a.adjustment_id AND al.line_no = ol.line_no \
         WHERE a.txid >= $2::int8::text::xid8 AND a.txid < $3::int8::text::xid8 \
           AND (al.line_no IS NOT NULL OR a.kind = 'cancellation') \
         GROUP BY 1, 2, 3"
    );
    let rows: Vec<(i64, String, String, i64, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(granularity_secs)
        .bind(from_txid as i64)
        .bind(to_txid.min(i64::MAX as u64) as i64)
        .fetch_all(pool)
        .await
        .expect("ground truth of corrections");
    rows.into_iter()
        .map(|(bucket, value, currency, refunded, items, cancelled)| {
            ((bucket, value, currency), [refunded, items, cancelled])
        })
        .collect()
}

/// Cells of either grid whose values differ (a cell missing on one side counts).
pub fn differing<K: Ord, V: PartialEq>(
    truth: &std::collections::BTreeMap<K, V>,
    seen: &std::collections::BTreeMap<K, V>,
) -> usize {
    truth
        .keys()
        .chain(seen.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter(|k| truth.get(*k) != seen.get(*k))
        .count()
}

/// The position of the newest committed row of the log (orders and
/// adjustments, log order), if any.
///
/// Consumers pause while *any* transaction in the Postgres cluster (other tests'
/// databases included) holds the horizon, so "caught up" means reaching this
/// position, not seeing one idle poll.
pub async fn log_head(pool: &PgPool) -> Option<(u64, i64)> {
    let head: Option<(i64, i64)> = sqlx::query_as(
        "SELECT txid::text::int8, seq FROM ( \
             (SELECT txid, seq FROM orders ORDER BY txid DESC, seq DESC LIMIT 1) \
             UNION ALL \
             (SELECT txid, seq FROM adjustments ORDER BY txid DESC, seq DESC LIMIT 1) \
         ) heads ORDER BY txid DESC, seq DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await
    .expect("log head");
    head.map(|(t, s)| (t as u64, s))
}

/// Who holds the cluster's horizon back: the oldest transactions with an id.
pub async fn horizon_holders(pool: &PgPool) -> String {
    let rows: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT coalesce(datname, ''), coalesce(application_name, ''), coalesce(state, ''), \
                coalesce(left(query, 80), '') \
         FROM pg_stat_activity WHERE backend_xid IS NOT NULL \
         ORDER BY age(backend_xid) DESC LIMIT 5",
    )
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    format!("{rows:?}")
}
