//! The raw lake's format: one JSON object per line, one line per log row. The lake
//! relay writes [`RawRecord`]s; the compactor reads them back as [`RawRecordRef`]s,
//! which borrow their text from the file. Both are defined here, side by side, so
//! that the format has one owner; the tests below hold them to each other.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::row::LogRow;

/// The fixed timestamp format of raw records: RFC 3339 in UTC with exactly six
/// fractional digits (`2026-11-21T14:46:34.184267Z`). Spelled `.%6f` rather than
/// chrono's equivalent `%.6f` because polars parses only the former with its fast
/// fixed-width parser (the other falls back to chrono, several times slower).
pub const RAW_TIME_FORMAT: &str = "%Y-%m-%dT%H:%M:%S.%6fZ";

/// One line of a raw-lake file: the order, when it was ingested, and its log
/// position. Written by the lake relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawRecord {
    pub order_id: Uuid,
    pub user_id: String,
    pub city: String,
    pub product_id: String,
    pub category: String,
    pub quantity: i32,
    pub unit_price_minor: i64,
    pub currency: String,
    /// In [`RAW_TIME_FORMAT`], e.g. `2026-11-21T10:15:00.000000Z`.
    pub created_at: String,
    pub ingested_at: String,
    pub txid: u64,
    pub seq: i64,
}

/// One line of a raw-lake file as the compactor reads it: the same fields as
/// [`RawRecord`], borrowing its strings from the text (unless they hold escapes),
/// timestamps and the order id left as text for the columnar parser.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct RawRecordRef<'a> {
    #[serde(borrow)]
    pub order_id: Cow<'a, str>,
    #[serde(borrow)]
    pub user_id: Cow<'a, str>,
    #[serde(borrow)]
    pub city: Cow<'a, str>,
    #[serde(borrow)]
    pub product_id: Cow<'a, str>,
    #[serde(borrow)]
    pub category: Cow<'a, str>,
    pub quantity: i32,
    pub unit_price_minor: i64,
    #[serde(borrow)]
    pub currency: Cow<'a, str>,
    #[serde(borrow)]
    pub created_at: Cow<'a, str>,
    #[serde(borrow)]
    pub ingested_at: Cow<'a, str>,
    pub txid: u64,
    pub seq: i64,
}

impl From<&LogRow> for RawRecord {
    fn from(row: &LogRow) -> Self {
        let o = &row.order;
        RawRecord {
            order_id: o.order_id,
            user_id: o.user_id.clone(),
            city: o.city.clone(),
            product_id: o.product_id.clone(),
            category: o.category.clone(),
            quantity: o.quantity,
            unit_price_minor: o.unit_price_minor,
            currency: o.currency.to_string(),
            created_at: o.created_at.format(RAW_TIME_FORMAT).to_string(),
            ingested_at: row.ingested_at.format(RAW_TIME_FORMAT).to_string(),
            txid: row.position.txid,
            seq: row.position.seq,
        }
    }
}

impl RawRecord {
    /// The record as one line of a raw file, newline included.
    pub fn write_line(&self, out: &mut Vec<u8>) {
        serde_json::to_writer(&mut *out, self).expect("a raw record serializes");
        out.push(b'\n');
    }
}

impl RawRecordRef<'_> {
    /// The record read back, owning its text.
    pub fn to_owned_record(&self) -> Result<RawRecord, uuid::Error> {
        Ok(RawRecord {
            order_id: Uuid::try_parse(&self.order_id)?,
            user_id: self.user_id.clone().into_owned(),
            city: self.city.clone().into_owned(),
            product_id: self.product_id.clone().into_owned(),
            category: self.category.clone().into_owned(),
            quantity: self.quantity,
            unit_price_minor: self.unit_price_minor,
            currency: self.currency.clone().into_owned(),
            created_at: self.created_at.clone().into_owned(),
            ingested_at: self.ingested_at.clone().into_owned(),
            txid: self.txid,
            seq: self.seq,
        })
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};
    use tidemark_domain::{LogPosition, Order};

    use super::*;

    fn log_row(city: &str, product_id: &str) -> LogRow {
        let at = Utc.with_ymd_and_hms(2026, 2, 28, 23, 59, 59).unwrap()
            + chrono::TimeDelta::microseconds(7);
        LogRow {
            position: LogPosition::new(u64::from(u32::MAX) + 5, 42),
            order: Order {
                order_id: Uuid::from_u128(0x1234_5678_9abc_def0),
                user_id: "user-000042".into(),
                city: city.into(),
                product_id: product_id.into(),
                category: "books".into(),
                quantity: 3,
                unit_price_minor: 1_299,
                currency: "KWD".parse().unwrap(),
                created_at: at,
            },
            ingested_at: at + chrono::TimeDelta::seconds(1),
        }
    }

    #[test]
    fn what_the_relay_writes_the_compactor_reads_back_field_for_field() {
        for (city, product) in [
            ("Oslo", "sku-7"),
            ("São Paulo", "p:1:2"),
            ("Quote \"and\" back\\slash", "tab\there"),
        ] {
            let written = RawRecord::from(&log_row(city, product));
            let mut line = Vec::new();
            written.write_line(&mut line);
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1, "one line");
            let read: RawRecordRef<'_> = serde_json::from_slice(&line).unwrap();
            assert_eq!(read.to_owned_record().unwrap(), written);
            assert_eq!(read.created_at, "2026-02-28T23:59:59.000007Z");
            // Plain text is borrowed from the file, not copied.
            assert!(matches!(read.category, Cow::Borrowed(_)));
        }
    }

    #[test]
    fn the_owned_record_reads_its_own_lines() {
        let written = RawRecord::from(&log_row("Berlin", "sku-1"));
        let mut lines = Vec::new();
        written.write_line(&mut lines);
        written.write_line(&mut lines);
        let read: Vec<RawRecord> = serde_json::Deserializer::from_slice(&lines)
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(read, [written.clone(), written]);
    }
}
