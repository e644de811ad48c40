//! Revenue by the customer's city of residence *at the time of each order*: the
//! headline metric of the platform Tidemark grew from, served from the Data Vault
//! warehouse (see ARCHITECTURE.md, "The warehouse").
//!
//! Each order in the range is joined as of its `created_at` to the customer
//! satellite: the version in effect then is the one with the latest
//! `effective_at` not after it (the latest recorded among equals) — the slowly
//! changing dimension of `domain::customer`. An order placed before its customer's
//! first version has no city of residence (`city: null`). Net revenue is on the
//! order-time basis: every refund and cancellation of the range's orders, whenever
//! it happened. The answer is read in one snapshot together with the vault
//! loader's cursor, so it is exact as of the log position it states.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use tidemark_domain::Currency;
use tidemark_platform::problem::Problem;

use tidemark_domain::LogPosition;
use tidemark_domain::money::decimal;

use crate::query::per_order;

/// A validated question.
#[derive(Clone, Debug, PartialEq)]
pub struct ResidenceRequest {
    pub from: i64,
    pub to: i64,
    pub currency: Option<Currency>,
}

/// One city of residence in one currency.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema, async_graphql::SimpleObject)]
pub struct ResidenceRow {
    /// The customer's city of residence when the order was placed; `null` when no
    /// version of the customer was in effect then.
    pub city: Option<String>,
    pub currency: String,
    pub orders: i64,
    /// The orders' lines, before refunds.
    pub gross_revenue_minor: i64,
    /// Refunds and cancellations of these orders, whenever they happened.
    pub refunded_minor: i64,
    pub net_revenue_minor: i64,
    /// Net revenue in major units, exact.
    pub net_revenue: String,
    /// Net revenue per order, minor units, rounded half away from zero.
    pub average_check_minor: i64,
    /// Average check in major units (rounded to the currency's minor unit).
    pub average_check: String,
    pub cancelled_orders: i64,
}

/// How fresh an answer from the warehouse is.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema, async_graphql::SimpleObject)]
pub struct VaultFreshness {
    /// The last log position loaded into the warehouse, `txid_seq`: the answer is
    /// exact as of it.
    pub cursor: String,
    /// When the loader last moved or confirmed its cursor.
    pub updated_at: DateTime<Utc>,
    /// When the answer was computed.
    pub as_of: DateTime<Utc>,
}

/// Revenue by city of residence.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema, async_graphql::SimpleObject)]
pub struct ResidenceAnswer {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// By city (the unknown last), then currency.
    pub rows: Vec<ResidenceRow>,
    pub freshness: VaultFreshness,
}

#[derive(sqlx::FromRow)]
struct Row {
    city: Option<String>,
    currency: String,
    orders: i64,
    gross: i64,
    refunded: i64,
    cancelled: i64,
}

/// The as-of join over the vault: orders of `[$1, $2)` (in `$3` if given), their
/// lines and adjustments, and the customer version in effect at each order.
const BY_RESIDENCE: &str = "\
    WITH o AS ( \
        SELECT lc.order_hk, lc.customer_hk, so.created_at, so.currency::text AS currency \
        FROM vault.sat_order so JOIN vault.link_order_customer lc USING (order_hk) \
        WHERE so.created_at >= $1 AND so.created_at < $2 \
          AND ($3::text IS NULL OR so.currency = $3) \
    ), lines AS ( \
        SELECT l.order_hk, sum(s.quantity::int8 * s.unit_price_minor) AS gross \
        FROM o JOIN vault.link_order_line l USING (order_hk) \
        JOIN vault.sat_order_line s USING (order_line_hk) \
        GROUP BY l.order_hk \
    ), refunded AS ( \
        SELECT l.order_hk, sum(a.amount_minor) AS refunded \
        FROM o JOIN vault.link_order_line l USING (order_hk) \
        JOIN vault.sat_line_adjustment a USING (order_line_hk) \
        GROUP BY l.order_hk \
    ), cancelled AS ( \
        SELECT DISTINCT a.order_hk FROM o JOIN vault.sat_order_adjustment a USING (order_hk) \
        WHERE a.kind = 'cancellation' \
    ) \
    SELECT r.city, o.currency, count(*)::int8 AS orders, \
           sum(lines.gross)::int8 AS gross, \
           coalesce(sum(refunded.refunded), 0)::int8 AS refunded, \
           count(cancelled.order_hk)::int8 AS cancelled \
    FROM o JOIN lines USING (order_hk) LEFT JOIN refunded USING (order_hk) \
    LEFT JOIN cancelled USING (order_hk) \
    LEFT JOIN LATERAL ( \
        SELECT s.city FROM vault.sat_customer s \
        WHERE s.customer_hk = o.customer_hk AND s.effective_at <= o.created_at \
        ORDER BY s.effective_at DESC, s.log_seq DESC LIMIT 1 \
    ) r ON true \
    GROUP BY r.city, o.currency \
    ORDER BY r.city NULLS LAST, o.currency";

/// Answers `req` from the warehouse, in one snapshot with the loader's cursor.
pub async fn by_residence(
    pool: &PgPool,
    req: &ResidenceRequest,
) -> Result<ResidenceAnswer, Problem> {
    let unavailable = |e: sqlx::Error| {
        if tidemark_platform::postgres::is_unavailable(&e) {
            Problem::unavailable("The warehouse (Postgres) is unavailable; retry shortly.")
        } else {
            tracing::error!(error = %e, "Reading the warehouse failed");
            Problem::internal()
        }
    };
    let mut tx = pool.begin().await.map_err(unavailable)?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
    let cursor: Option<(i64, i64, DateTime<Utc>)> = sqlx::query_as(
        "SELECT txid::text::int8, seq, updated_at FROM consumer_cursors WHERE consumer = 'vault'",
    )
    .fetch_optional(&mut *tx)
    .await
    .map_err(unavailable)?;
    let at = |secs: i64| DateTime::from_timestamp(secs, 0).unwrap_or_default();
    let rows: Vec<Row> = sqlx::query_as(BY_RESIDENCE)
        .bind(at(req.from))
        .bind(at(req.to))
        .bind(req.currency.map(|c| c.to_string()))
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable)?;
    tx.commit().await.map_err(unavailable)?;
    let (txid, seq, updated_at) = cursor.unwrap_or((0, 0, DateTime::UNIX_EPOCH));
    let rows = rows
        .into_iter()
        .map(|r| {
            let currency: Currency = r.currency.parse().map_err(|_| {
                tracing::error!(currency = %r.currency, "An unknown currency in the warehouse");
                Problem::internal()
            })?;
            let net = r.gross - r.refunded;
            let average = per_order(net, r.orders);
            Ok(ResidenceRow {
                city: r.city,
                currency: r.currency,
                orders: r.orders,
                gross_revenue_minor: r.gross,
                refunded_minor: r.refunded,
                net_revenue_minor: net,
                net_revenue: decimal(net, currency),
                average_check_minor: average,
                average_check: decimal(average, currency),
                cancelled_orders: r.cancelled,
            })
        })
        .collect::<Result<_, Problem>>()?;
    Ok(ResidenceAnswer {
        from: at(req.from),
        to: at(req.to),
        rows,
        freshness: VaultFreshness {
            cursor: LogPosition::new(txid as u64, seq).to_string(),
            updated_at,
            as_of: Utc::now(),
        },
    })
}
