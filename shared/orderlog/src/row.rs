//! A row of `orders`, as Postgres returns it and as this build understands it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tidemark_domain::{Currency, LogPosition, Order};
use uuid::Uuid;

/// The select list that reads an [`OrderRow`] from `orders`, as a literal for
/// `concat!` (`concat!("SELECT ", order_columns!(), " FROM orders …")`). The
/// transaction id gets a name of its own (`log_txid`): an output column named
/// `txid` would take over `ORDER BY txid` and keep Postgres from using the log
/// index.
#[macro_export]
macro_rules! order_columns {
    () => {
        "txid::text::int8 AS log_txid, seq, order_id, user_id, city, product_id, category, \
         quantity, unit_price_minor, currency, created_at, ingested_at"
    };
}

/// A row of `orders` as stored: every column, nothing interpreted yet. The one
/// decoding of the table: the log consumers, ingest's idempotency check and the
/// order history all read it through [`order_columns!`].
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct OrderRow {
    /// The writing transaction's id (`xid8`, read as `int8`).
    #[sqlx(rename = "log_txid")]
    pub txid: i64,
    pub seq: i64,
    pub order_id: Uuid,
    pub user_id: String,
    pub city: String,
    pub product_id: String,
    pub category: String,
    pub quantity: i32,
    pub unit_price_minor: i64,
    /// As stored (`char(3)`); [`OrderRow::decode`] checks it is a currency this
    /// build knows.
    pub currency: String,
    pub created_at: DateTime<Utc>,
    pub ingested_at: DateTime<Utc>,
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

/// An order as stored in the log, with its position and ingest time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRow {
    pub position: LogPosition,
    pub order: Order,
    pub ingested_at: DateTime<Utc>,
}

impl OrderRow {
    pub fn position(&self) -> LogPosition {
        LogPosition::new(self.txid as u64, self.seq)
    }

    /// The currency code as stored, without `char(3)` padding.
    pub fn currency_code(&self) -> &str {
        self.currency.trim_end()
    }

    /// The row as an order of this build's domain.
    pub fn decode(self) -> Result<LogRow, Undecodable> {
        let currency: Currency = match self.currency_code().parse() {
            Ok(currency) => currency,
            Err(e) => {
                return Err(Undecodable {
                    position: self.position(),
                    order_id: self.order_id,
                    reason: e.to_string(),
                });
            }
        };
        Ok(LogRow {
            position: self.position(),
            order: Order {
                order_id: self.order_id,
                user_id: self.user_id,
                city: self.city,
                product_id: self.product_id,
                category: self.category,
                quantity: self.quantity,
                unit_price_minor: self.unit_price_minor,
                currency,
                created_at: self.created_at,
            },
            ingested_at: self.ingested_at,
        })
    }

    /// Whether the stored row holds exactly `order` (a resend, not a conflict).
    pub fn holds(&self, order: &Order) -> bool {
        self.order_id == order.order_id
            && self.user_id == order.user_id
            && self.city == order.city
            && self.product_id == order.product_id
            && self.category == order.category
            && self.quantity == order.quantity
            && self.unit_price_minor == order.unit_price_minor
            && self.currency_code() == order.currency.as_str()
            && self.created_at == order.created_at
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
            product_id: "p".into(),
            category: "c".into(),
            quantity: 2,
            unit_price_minor: 150,
            currency: currency.into(),
            created_at: at,
            ingested_at: at,
        }
    }

    #[test]
    fn a_known_currency_decodes_and_the_row_holds_its_order() {
        let stored = row("NOK");
        let decoded = stored.clone().decode().unwrap();
        assert_eq!(decoded.position, LogPosition::new(7, 3));
        assert_eq!(decoded.order.currency.as_str(), "NOK");
        assert!(stored.holds(&decoded.order));
        let mut other = decoded.order.clone();
        other.quantity = 3;
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
}
