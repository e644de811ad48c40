//! A row of the log (an order, or an adjustment with its order), as Postgres
//! returns it and as this build understands it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tidemark_domain::{
    AdjustedLine, Adjustment, AdjustmentEvent, AdjustmentKind, Currency, Event, LogPosition, Order,
    OrderLine,
};
use uuid::Uuid;

/// The select list that reads an [`OrderRow`], as a literal for `concat!`, from
/// [`order_from!`]: `concat!("SELECT ", order_columns!(), " FROM ", order_from!(),
/// " WHERE o.order_id = $1")`. The transaction id gets a name of its own
/// (`log_txid`): an output column named `txid` would take over `ORDER BY txid` and
/// keep Postgres from using the log index.
#[macro_export]
macro_rules! order_columns {
    () => {
        "o.txid::text::int8 AS log_txid, o.seq, o.order_id, o.user_id, o.city, o.currency, \
         o.created_at, o.ingested_at, l.line_products, l.line_categories, l.line_quantities, \
         l.line_prices"
    };
}

/// The `FROM` clause for [`order_columns!`]: `orders` as `o`, each with its lines
/// gathered in line order (one index scan of `order_lines` per order).
#[macro_export]
macro_rules! order_from {
    () => {
        concat!("orders o ", $crate::order_lines!())
    };
}

/// The lines of the order `o`, gathered in line order as `l` (for [`order_from!`]
/// and the log's adjustment rows).
///
/// The aggregates read a subquery sorted by `line_no`, which the primary key's
/// index scan delivers in that order: Postgres 15 does not pull up a subquery
/// with `ORDER BY`, and its aggregates take their input in the order given. Four
/// `array_agg(… ORDER BY line_no)`, as before, sorted each order's lines four
/// times: 5,000 orders of the log took 38 ms to read that way and take 28 ms now
/// (the log read's cost is mostly this gathering; 4 ms without it).
#[macro_export]
macro_rules! order_lines {
    () => {
        "CROSS JOIN LATERAL ( \
             SELECT array_agg(product_id) AS line_products, \
                    array_agg(category) AS line_categories, \
                    array_agg(quantity) AS line_quantities, \
                    array_agg(unit_price_minor) AS line_prices \
             FROM (SELECT product_id, category, quantity, unit_price_minor FROM order_lines \
                   WHERE order_lines.order_id = o.order_id ORDER BY line_no) in_line_order \
         ) l"
    };
}

/// A row of `orders` with its lines, as stored: every column, nothing interpreted
/// yet. The one decoding of the table: the log consumers, ingest's idempotency
/// check and the order history all read it through [`order_columns!`] and
/// [`order_from!`].
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct OrderRow {
    /// The writing transaction's id (`xid8`, read as `int8`).
    #[sqlx(rename = "log_txid")]
    pub txid: i64,
    pub seq: i64,
    pub order_id: Uuid,
    pub user_id: String,
    pub city: String,
    /// As stored (`char(3)`); [`OrderRow::decode`] checks it is a currency this
    /// build knows.
    pub currency: String,
    pub created_at: DateTime<Utc>,
    pub ingested_at: DateTime<Utc>,
    /// The lines' columns, in line order (`None` for an order without lines).
    pub line_products: Option<Vec<String>>,
    pub line_categories: Option<Vec<String>>,
    pub line_quantities: Option<Vec<i32>>,
    pub line_prices: Option<Vec<i64>>,
}

/// A row of the log that this build cannot decode (a currency it does not know,
/// written by SQL, by a newer version, or before the currency list changed).
/// Consumers stop at it rather than skip it: skipping would make every sum wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("log row {position} (order {order_id}) cannot be decoded by this build: {reason}")]
pub struct Undecodable {
    pub position: LogPosition,
    pub order_id: Uuid,
    pub reason: String,
}

/// An event of the log, with its position and ingest time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRow {
    pub position: LogPosition,
    pub event: Event,
    pub ingested_at: DateTime<Utc>,
}

/// A row of the log as the tail reads it: an order, or an adjustment (the
/// `adjustment_*` columns set) with the order it corrects. For an adjustment the
/// position and ingest time are the adjustment's.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct EventRow {
    #[sqlx(flatten)]
    pub order: OrderRow,
    pub adjustment_id: Option<Uuid>,
    pub adjustment_kind: Option<String>,
    pub adjusted_at: Option<DateTime<Utc>>,
    /// The adjusted lines' columns, in line order (`None` when it gave back
    /// nothing: a cancellation of an order refunded in full).
    pub adjusted_line_nos: Option<Vec<i16>>,
    pub adjusted_quantities: Option<Vec<i32>>,
    pub adjusted_amounts: Option<Vec<i64>>,
}

impl EventRow {
    /// The row as an event of this build's domain.
    pub fn decode(self) -> Result<LogRow, Undecodable> {
        let (position, ingested_at) = (self.order.position(), self.order.ingested_at);
        let order_id = self.order.order_id;
        let undecodable = |reason: String| Undecodable {
            position,
            order_id,
            reason,
        };
        let Some(adjustment_id) = self.adjustment_id else {
            return Ok(LogRow {
                position,
                event: Event::Order(self.order.decode()?),
                ingested_at,
            });
        };
        let kind = match self.adjustment_kind.as_deref() {
            Some("refund") => AdjustmentKind::Refund,
            Some("cancellation") => AdjustmentKind::Cancellation,
            other => return Err(undecodable(format!("unknown adjustment kind {other:?}"))),
        };
        let lines = adjusted_lines(
            self.adjusted_line_nos.as_deref(),
            self.adjusted_quantities.as_deref(),
            self.adjusted_amounts.as_deref(),
        )
        .ok_or_else(|| undecodable("the adjusted lines' columns disagree".into()))?;
        let created_at = self
            .adjusted_at
            .ok_or_else(|| undecodable("an adjustment without a time".into()))?;
        Ok(LogRow {
            position,
            event: Event::Adjustment(AdjustmentEvent {
                adjustment: Adjustment {
                    adjustment_id,
                    order_id,
                    kind,
                    created_at,
                    lines,
                },
                order: self.order.decode()?,
            }),
            ingested_at,
        })
    }
}

fn adjusted_lines(
    line_nos: Option<&[i16]>,
    quantities: Option<&[i32]>,
    amounts: Option<&[i64]>,
) -> Option<Vec<AdjustedLine>> {
    let (line_nos, quantities, amounts) = (
        line_nos.unwrap_or_default(),
        quantities.unwrap_or_default(),
        amounts.unwrap_or_default(),
    );
    if [quantities.len(), amounts.len()] != [line_nos.len(); 2] {
        return None;
    }
    Some(
        line_nos
            .iter()
            .zip(quantities.iter().zip(amounts))
            .map(|(&line_no, (&quantity, &amount_minor))| AdjustedLine {
                line_no,
                quantity,
                amount_minor,
            })
            .collect(),
    )
}

impl OrderRow {
    pub fn position(&self) -> LogPosition {
        LogPosition::new(self.txid as u64, self.seq)
    }

    /// The currency code as stored, without `char(3)` padding.
    pub fn currency_code(&self) -> &str {
        self.currency.trim_end()
    }

    /// The stored lines, in line order (empty if the columns disagree in length,
    /// which the schema prevents).
    pub fn lines(&self) -> Vec<OrderLine> {
        let (Some(products), Some(categories), Some(quantities), Some(prices)) = (
            &self.line_products,
            &self.line_categories,
            &self.line_quantities,
            &self.line_prices,
        ) else {
            return Vec::new();
        };
        if [categories.len(), quantities.len(), prices.len()] != [products.len(); 3] {
            return Vec::new();
        }
        products
            .iter()
            .zip(categories)
            .zip(quantities.iter().zip(prices))
            .map(|((product_id, category), (quantity, price))| OrderLine {
                product_id: product_id.clone(),
                category: category.clone(),
                quantity: *quantity,
                unit_price_minor: *price,
            })
            .collect()
    }

    /// The row as an order of this build's domain.
    pub fn decode(self) -> Result<Order, Undecodable> {
        let undecodable = |reason: String| Undecodable {
            position: self.position(),
            order_id: self.order_id,
            reason,
        };
        let currency: Currency = self
            .currency_code()
            .parse()
            .map_err(|e: tidemark_domain::CurrencyError| undecodable(e.to_string()))?;
        let lines = self.lines();
        if lines.is_empty() {
            return Err(undecodable("the order has no lines".into()));
        }
        Ok(Order {
            order_id: self.order_id,
            user_id: self.user_id,
            city: self.city,
            currency,
            created_at: self.created_at,
            lines,
        })
    }

    /// Whether the stored row holds exactly `order` (a resend, not a conflict).
    pub fn holds(&self, order: &Order) -> bool {
        self.order_id == order.order_id
            && self.user_id == order.user_id
            && self.city == order.city
            && self.currency_code() == order.currency.as_str()
            && self.created_at == order.created_at
            && self.lines() == order.lines
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn row(currency: &str) -> OrderRow {
        let at = Utc.with_ymd_and_hms(2026, 11, 29, 12, 0, 0).unwrap();
        OrderRow {
            txid: 7,
            seq: 3,
            order_id: Uuid::from_u128(1),
            user_id: "u".into(),
            city: "Oslo".into(),
            currency: currency.into(),
            created_at: at,
            ingested_at: at,
            line_products: Some(vec!["p".into(), "q".into()]),
            line_categories: Some(vec!["c".into(), "c".into()]),
            line_quantities: Some(vec![2, 1]),
            line_prices: Some(vec![150, 99]),
        }
    }

    #[test]
    fn a_known_currency_decodes_and_the_row_holds_its_order() {
        let stored = row("NOK");
        let decoded = stored.clone().decode().unwrap();
        assert_eq!(stored.position(), LogPosition::new(7, 3));
        assert_eq!(decoded.currency.as_str(), "NOK");
        assert!(stored.holds(&decoded));
        assert_eq!(decoded.lines.len(), 2);
        assert_eq!(decoded.revenue_minor(), 399);
        let mut other = decoded.clone();
        other.lines[1].quantity = 3;
        assert!(!stored.holds(&other));
        other.lines.pop();
        assert!(!stored.holds(&other));
    }

    #[test]
    fn an_unknown_currency_names_the_row_instead_of_vanishing() {
        let error = row("XYZ").decode().unwrap_err();
        assert_eq!(error.position, LogPosition::new(7, 3));
        assert_eq!(error.order_id, Uuid::from_u128(1));
        let text = error.to_string();
        assert!(text.contains("7_3") && text.contains("XYZ"), "{text}");
    }

    #[test]
    fn an_order_without_lines_is_undecodable_too() {
        let mut bare = row("EUR");
        bare.line_products = None;
        let error = bare.decode().unwrap_err();
        assert!(error.reason.contains("no lines"), "{error}");
    }

    fn adjustment(kind: &str) -> EventRow {
        EventRow {
            order: row("EUR"),
            adjustment_id: Some(Uuid::from_u128(2)),
            adjustment_kind: Some(kind.into()),
            adjusted_at: Some(Utc.with_ymd_and_hms(2026, 12, 1, 8, 0, 0).unwrap()),
            adjusted_line_nos: Some(vec![2]),
            adjusted_quantities: Some(vec![1]),
            adjusted_amounts: Some(vec![99]),
        }
    }

    #[test]
    fn an_adjustment_row_carries_its_order() {
        let decoded = adjustment("refund").decode().unwrap();
        assert_eq!(decoded.position, LogPosition::new(7, 3));
        let Event::Adjustment(event) = decoded.event else {
            panic!("an adjustment");
        };
        assert_eq!(event.adjustment.kind, AdjustmentKind::Refund);
        assert_eq!(event.adjustment.lines[0].amount_minor, 99);
        assert_eq!(event.order.lines.len(), 2);
        // A cancellation of an order refunded in full gives back no lines.
        let mut nothing_left = adjustment("cancellation");
        nothing_left.adjusted_line_nos = None;
        nothing_left.adjusted_quantities = None;
        nothing_left.adjusted_amounts = None;
        assert!(nothing_left.decode().is_ok());
        for broken in [adjustment("chargeback"), {
            let mut short = adjustment("refund");
            short.adjusted_amounts = Some(vec![]);
            short
        }] {
            assert!(broken.decode().is_err());
        }
    }
}
