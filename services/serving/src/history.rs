//! Order history from the warehouse (the Data Vault in Postgres' `vault` schema;
//! see ARCHITECTURE.md, "The warehouse"): one order by id, a user's orders newest
//! first with opaque cursors. An order appears once the vault loader has loaded it
//! (tens of milliseconds after its commit: `vault_lag_seconds`).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use tidemark_platform::problem::Problem;
use uuid::Uuid;

/// An order as served.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema, async_graphql::SimpleObject)]
pub struct OrderView {
    pub order_id: Uuid,
    pub user_id: String,
    pub city: String,
    pub currency: String,
    /// The sum of the lines, in minor units.
    pub revenue_minor: i64,
    /// The same in major units, exact, by the currency's exponent.
    pub revenue: String,
    pub created_at: DateTime<Utc>,
    pub ingested_at: DateTime<Utc>,
    /// The order's lines, in the order they were sent.
    pub lines: Vec<LineView>,
    /// Refunds and the cancellation, in log order.
    pub adjustments: Vec<AdjustmentView>,
    /// Minor units given back by the adjustments.
    pub refunded_minor: i64,
    /// `revenue_minor` − `refunded_minor`.
    pub net_minor: i64,
    /// The same in major units, exact.
    pub net: String,
    pub cancelled: bool,
}

/// A refund or cancellation of an order, as served.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema, async_graphql::SimpleObject)]
pub struct AdjustmentView {
    /// The refund's id, or the cancellation's.
    pub adjustment_id: Uuid,
    /// `refund` or `cancellation`.
    pub kind: String,
    pub created_at: DateTime<Utc>,
    pub amount_minor: i64,
    pub lines: Vec<AdjustedLineView>,
}

/// What an adjustment gave back of one line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema, async_graphql::SimpleObject)]
pub struct AdjustedLineView {
    pub product_id: String,
    pub quantity: i32,
    pub amount_minor: i64,
}

/// One line of an order as served.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema, async_graphql::SimpleObject)]
pub struct LineView {
    pub product_id: String,
    pub category: String,
    pub quantity: i32,
    pub unit_price_minor: i64,
    /// quantity × unit price, in minor units.
    pub revenue_minor: i64,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema, async_graphql::SimpleObject)]
pub struct OrderPage {
    pub orders: Vec<OrderView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// An order of the vault with its lines in line order (see [`ORDERS`]).
#[derive(sqlx::FromRow)]
struct OrderRow {
    order_id: Uuid,
    user_id: String,
    city: String,
    currency: String,
    created_at: DateTime<Utc>,
    ingested_at: DateTime<Utc>,
    line_products: Vec<String>,
    line_categories: Vec<String>,
    line_quantities: Vec<i32>,
    line_prices: Vec<i64>,
}

/// Orders from the vault: hub, satellite and customer link, each with its lines
/// gathered in line order from the line links and their satellites.
const ORDERS: &str = "\
    SELECT h.order_id, c.user_id, s.city, s.currency::text AS currency, s.created_at, \
           s.load_date AS ingested_at, l.line_products, l.line_categories, \
           l.line_quantities, l.line_prices \
    FROM vault.hub_order h \
    JOIN vault.sat_order s USING (order_hk) \
    JOIN vault.link_order_customer lc USING (order_hk) \
    JOIN vault.hub_customer c USING (customer_hk) \
    CROSS JOIN LATERAL ( \
        SELECT array_agg(p.product_id ORDER BY ll.line_no) AS line_products, \
               array_agg(sl.category ORDER BY ll.line_no) AS line_categories, \
               array_agg(sl.quantity ORDER BY ll.line_no) AS line_quantities, \
               array_agg(sl.unit_price_minor ORDER BY ll.line_no) AS line_prices \
        FROM vault.link_order_line ll \
        JOIN vault.hub_product p USING (product_hk) \
        JOIN vault.sat_order_line sl USING (order_line_hk) \
        WHERE ll.order_hk = h.order_hk \
    ) l ";

impl From<OrderRow> for OrderView {
    fn from(row: OrderRow) -> Self {
        let lines: Vec<LineView> = row
            .line_products
            .into_iter()
            .zip(row.line_categories)
            .zip(row.line_quantities.into_iter().zip(row.line_prices))
            .map(
                |((product_id, category), (quantity, unit_price_minor))| LineView {
                    revenue_minor: i64::from(quantity) * unit_price_minor,
                    product_id,
                    category,
                    quantity,
                    unit_price_minor,
                },
            )
            .collect();
        let revenue_minor = lines.iter().map(|l| l.revenue_minor).sum();
        // History shows what is stored, even in a currency this build does not know
        // (then without a decimal amount).
        let revenue = row.currency.parse().map_or_else(
            |_| String::new(),
            |c| tidemark_domain::money::decimal(revenue_minor, c),
        );
        OrderView {
            currency: row.currency,
            revenue_minor,
            revenue: revenue.clone(),
            order_id: row.order_id,
            user_id: row.user_id,
            city: row.city,
            created_at: row.created_at,
            ingested_at: row.ingested_at,
            lines,
            adjustments: Vec::new(),
            refunded_minor: 0,
            net_minor: revenue_minor,
            net: revenue,
            cancelled: false,
        }
    }
}

type AdjustmentRow = (
    Uuid,
    Uuid,
    String,
    DateTime<Utc>,
    Option<Vec<i16>>,
    Option<Vec<i32>>,
    Option<Vec<i64>>,
);

/// Adds each order's adjustments (one query for all of them), and the net amounts.
async fn with_adjustments(pool: &PgPool, orders: &mut [OrderView]) -> Result<(), Problem> {
    let ids: Vec<Uuid> = orders.iter().map(|o| o.order_id).collect();
    let rows: Vec<AdjustmentRow> = sqlx::query_as(
        "SELECT h.order_id, a.adjustment_id, a.kind, a.created_at, \
                array_agg(ll.line_no ORDER BY ll.line_no) FILTER (WHERE ll.line_no IS NOT NULL), \
                array_agg(la.quantity ORDER BY ll.line_no) FILTER (WHERE ll.line_no IS NOT NULL), \
                array_agg(la.amount_minor ORDER BY ll.line_no) FILTER (WHERE ll.line_no IS NOT NULL) \
         FROM vault.hub_order h \
         JOIN vault.sat_order_adjustment a USING (order_hk) \
         LEFT JOIN (vault.sat_line_adjustment la \
                    JOIN vault.link_order_line ll USING (order_line_hk)) \
           ON la.adjustment_id = a.adjustment_id AND ll.order_hk = h.order_hk \
         WHERE h.order_id = ANY($1) \
         GROUP BY h.order_id, a.adjustment_id, a.kind, a.created_at, a.load_date \
         ORDER BY a.load_date, a.adjustment_id",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await
    .map_err(|e| db_problem(&e))?;
    for (order_id, adjustment_id, kind, created_at, nos, quantities, amounts) in rows {
        let Some(order) = orders.iter_mut().find(|o| o.order_id == order_id) else {
            continue;
        };
        let lines: Vec<AdjustedLineView> = nos
            .unwrap_or_default()
            .into_iter()
            .zip(quantities.unwrap_or_default())
            .zip(amounts.unwrap_or_default())
            .map(|((line_no, quantity), amount_minor)| AdjustedLineView {
                product_id: order
                    .lines
                    .get(line_no as usize - 1)
                    .map(|l| l.product_id.clone())
                    .unwrap_or_default(),
                quantity,
                amount_minor,
            })
            .collect();
        let amount_minor = lines.iter().map(|l| l.amount_minor).sum();
        order.refunded_minor += amount_minor;
        order.cancelled |= kind == "cancellation";
        order.adjustments.push(AdjustmentView {
            adjustment_id,
            kind,
            created_at,
            amount_minor,
            lines,
        });
    }
    for order in orders.iter_mut() {
        order.net_minor = order.revenue_minor - order.refunded_minor;
        order.net = order.currency.parse().map_or_else(
            |_| String::new(),
            |c| tidemark_domain::money::decimal(order.net_minor, c),
        );
    }
    Ok(())
}

pub(crate) fn db_problem(e: &sqlx::Error) -> Problem {
    if tidemark_platform::postgres::is_unavailable(e) {
        Problem::unavailable(
            "Order history (the warehouse in Postgres) is unavailable; retry shortly.",
        )
    } else {
        tracing::error!(error = %e, "Order history query failed");
        Problem::internal()
    }
}

pub async fn order(pool: &PgPool, id: Uuid) -> Result<Option<OrderView>, Problem> {
    let row: Option<OrderRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{ORDERS} WHERE h.order_id = $1"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await
    .map_err(|e| db_problem(&e))?;
    let mut orders: Vec<OrderView> = row.into_iter().map(OrderView::from).collect();
    with_adjustments(pool, &mut orders).await?;
    Ok(orders.pop())
}

/// `{created_at µs}_{order_id}`, URL-safe.
fn encode_cursor(o: &OrderView) -> String {
    format!(
        "{}_{}",
        o.created_at.timestamp_micros(),
        o.order_id.simple()
    )
}

fn decode_cursor(cursor: &str) -> Option<(DateTime<Utc>, Uuid)> {
    let (micros, id) = cursor.split_once('_')?;
    Some((
        DateTime::from_timestamp_micros(micros.parse().ok()?)?,
        Uuid::parse_str(id).ok()?,
    ))
}

pub async fn user_orders(
    pool: &PgPool,
    user_id: &str,
    limit: usize,
    cursor: Option<&str>,
) -> Result<OrderPage, Problem> {
    let after = match cursor {
        None => None,
        Some(c) => Some(decode_cursor(c).ok_or_else(|| {
            Problem::new(tidemark_platform::problem::ProblemKind::Validation)
                .detail("`cursor` is not a cursor this API returned.")
        })?),
    };
    let rows: Vec<OrderRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{ORDERS} WHERE c.user_id = $1 \
           AND ($2::timestamptz IS NULL OR (s.created_at, h.order_id) < ($2, $3)) \
         ORDER BY s.created_at DESC, h.order_id DESC LIMIT $4"
    )))
    .bind(user_id)
    .bind(after.map(|a| a.0))
    .bind(after.map(|a| a.1))
    .bind(limit as i64 + 1)
    .fetch_all(pool)
    .await
    .map_err(|e| db_problem(&e))?;
    let mut orders: Vec<OrderView> = rows.into_iter().map(OrderView::from).collect();
    let next_cursor = if orders.len() > limit {
        orders.truncate(limit);
        orders.last().map(encode_cursor)
    } else {
        None
    };
    with_adjustments(pool, &mut orders).await?;
    Ok(OrderPage {
        orders,
        next_cursor,
    })
}
