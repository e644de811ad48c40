//! The raw lake's format: one JSON object per line, one line per log row. The lake
//! relay writes [`RawRecord`]s; the compactor reads them back as [`RawRecordRef`]s,
//! which borrow their text from the file. Both are defined here, side by side, so
//! that the format has one owner; the tests below hold them to each other.
//!
//! | version | an order's products | adjustments |
//! |---|---|---|
//! | 1 | one, at the top level: `product_id`, `category`, `quantity`, `unit_price_minor` | none |
//! | 2 | `lines: [{product_id, category, quantity, unit_price_minor}]` | none |
//! | 3 (written now) | as 2 | a record with `adjustment: {adjustment_id, kind, created_at, lines: [{line_no, quantity, amount_minor}]}` |
//!
//! A version 3 adjustment record carries the order it corrects in the order's
//! fields (its `created_at` is the order's; `ingested_at`, `txid` and `seq` are the
//! adjustment's), so the compactor places it on both bases without a lookup. Files
//! of every version stay in the lake, so the reader takes any. A compactor older
//! than version 3 would read an adjustment record as its order: upgrade the
//! compactor before ingest.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use tidemark_domain::{AdjustedLine, AdjustmentKind, Event};

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
    pub currency: String,
    /// In [`RAW_TIME_FORMAT`], e.g. `2026-11-21T10:15:00.000000Z`.
    pub created_at: String,
    pub ingested_at: String,
    pub txid: u64,
    pub seq: i64,
    pub lines: Vec<RawLine>,
    /// Set when the record is an adjustment of the order (version 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adjustment: Option<RawAdjustment>,
}

/// The adjustment of a version 3 adjustment record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawAdjustment {
    pub adjustment_id: Uuid,
    pub kind: AdjustmentKind,
    /// In [`RAW_TIME_FORMAT`].
    pub created_at: String,
    pub lines: Vec<AdjustedLine>,
}

/// One product line of a raw record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawLine {
    pub product_id: String,
    pub category: String,
    pub quantity: i32,
    pub unit_price_minor: i64,
}

/// One line of a raw-lake file as the compactor reads it: the same fields as
/// [`RawRecord`], borrowing its strings from the text (unless they hold escapes),
/// timestamps and the order id left as text for the columnar parser. Takes both
/// versions of the format (see [`RawRecordRef::lines`]).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct RawRecordRef<'a> {
    #[serde(borrow)]
    pub order_id: Cow<'a, str>,
    #[serde(borrow)]
    pub user_id: Cow<'a, str>,
    #[serde(borrow)]
    pub city: Cow<'a, str>,
    #[serde(borrow)]
    pub currency: Cow<'a, str>,
    #[serde(borrow)]
    pub created_at: Cow<'a, str>,
    #[serde(borrow)]
    pub ingested_at: Cow<'a, str>,
    pub txid: u64,
    pub seq: i64,
    /// Version 2.
    #[serde(borrow, default)]
    lines: Option<Vec<RawLineRef<'a>>>,
    /// Version 1: the one product at the top level.
    #[serde(borrow, default)]
    product_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    category: Option<Cow<'a, str>>,
    #[serde(default)]
    quantity: Option<i32>,
    #[serde(default)]
    unit_price_minor: Option<i64>,
    /// Version 3: set on an adjustment record.
    #[serde(borrow, default)]
    pub adjustment: Option<RawAdjustmentRef<'a>>,
}

/// The adjustment of an adjustment record as the compactor reads it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct RawAdjustmentRef<'a> {
    #[serde(borrow)]
    pub adjustment_id: Cow<'a, str>,
    pub kind: AdjustmentKind,
    #[serde(borrow)]
    pub created_at: Cow<'a, str>,
    pub lines: Vec<AdjustedLine>,
}

/// One product line as the compactor reads it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct RawLineRef<'a> {
    #[serde(borrow)]
    pub product_id: Cow<'a, str>,
    #[serde(borrow)]
    pub category: Cow<'a, str>,
    pub quantity: i32,
    pub unit_price_minor: i64,
}

/// A raw record that holds no product line (neither version's fields).
#[derive(Debug, thiserror::Error)]
#[error("raw record of order {0} has no product lines")]
pub struct NoLines(pub String);

impl<'a> RawRecordRef<'a> {
    /// The order's lines, from either version of the format.
    pub fn lines(&self) -> Result<Vec<RawLineRef<'a>>, NoLines> {
        if let Some(lines) = &self.lines
            && !lines.is_empty()
        {
            return Ok(lines.clone());
        }
        match (&self.product_id, &self.category, self.unit_price_minor) {
            (Some(product_id), Some(category), Some(unit_price_minor)) => Ok(vec![RawLineRef {
                product_id: product_id.clone(),
                category: category.clone(),
                quantity: self.quantity.unwrap_or(1),
                unit_price_minor,
            }]),
            _ => Err(NoLines(self.order_id.to_string())),
        }
    }
}

impl From<&LogRow> for RawRecord {
    fn from(row: &LogRow) -> Self {
        let o = row.event.order();
        let adjustment = match &row.event {
            Event::Order(_) => None,
            Event::Adjustment(event) => Some(RawAdjustment {
                adjustment_id: event.adjustment.adjustment_id,
                kind: event.adjustment.kind,
                created_at: event
                    .adjustment
                    .created_at
                    .format(RAW_TIME_FORMAT)
                    .to_string(),
                lines: event.adjustment.lines.clone(),
            }),
        };
        RawRecord {
            order_id: o.order_id,
            user_id: o.user_id.clone(),
            city: o.city.clone(),
            currency: o.currency.to_string(),
            created_at: o.created_at.format(RAW_TIME_FORMAT).to_string(),
            ingested_at: row.ingested_at.format(RAW_TIME_FORMAT).to_string(),
            txid: row.position.txid,
            seq: row.position.seq,
            lines: o
                .lines
                .iter()
                .map(|l| RawLine {
                    product_id: l.product_id.clone(),
                    category: l.category.clone(),
                    quantity: l.quantity,
                    unit_price_minor: l.unit_price_minor,
                })
                .collect(),
            adjustment,
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
    /// The record read back, owning its text (in the current version).
    pub fn to_owned_record(&self) -> Result<RawRecord, Box<dyn std::error::Error>> {
        Ok(RawRecord {
            order_id: Uuid::try_parse(&self.order_id)?,
            user_id: self.user_id.clone().into_owned(),
            city: self.city.clone().into_owned(),
            currency: self.currency.clone().into_owned(),
            created_at: self.created_at.clone().into_owned(),
            ingested_at: self.ingested_at.clone().into_owned(),
            txid: self.txid,
            seq: self.seq,
            lines: self
                .lines()?
                .into_iter()
                .map(|l| RawLine {
                    product_id: l.product_id.into_owned(),
                    category: l.category.into_owned(),
                    quantity: l.quantity,
                    unit_price_minor: l.unit_price_minor,
                })
                .collect(),
            adjustment: match &self.adjustment {
                None => None,
                Some(a) => Some(RawAdjustment {
                    adjustment_id: Uuid::try_parse(&a.adjustment_id)?,
                    kind: a.kind,
                    created_at: a.created_at.clone().into_owned(),
                    lines: a.lines.clone(),
                }),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};
    use tidemark_domain::{Adjustment, AdjustmentEvent, LogPosition, Order, OrderLine};

    use super::*;

    fn log_row(city: &str, product_id: &str) -> LogRow {
        let at = Utc.with_ymd_and_hms(2026, 2, 28, 23, 59, 59).unwrap()
            + chrono::TimeDelta::microseconds(7);
        LogRow {
            position: LogPosition::new(u64::from(u32::MAX) + 5, 42),
            event: Event::Order(Order {
                order_id: Uuid::from_u128(0x1234_5678_9abc_def0),
                user_id: "user-000042".into(),
                city: city.into(),
                currency: "KWD".parse().unwrap(),
                created_at: at,
                lines: vec![
                    OrderLine {
                        product_id: product_id.into(),
                        category: "books".into(),
                        quantity: 3,
                        unit_price_minor: 1_299,
                    },
                    OrderLine {
                        product_id: "second".into(),
                        category: "games".into(),
                        quantity: 1,
                        unit_price_minor: 5,
                    },
                ],
            }),
            ingested_at: at + chrono::TimeDelta::seconds(1),
        }
    }

    fn cancellation() -> LogRow {
        let mut row = log_row("Oslo", "sku-7");
        let Event::Order(order) = row.event else {
            unreachable!()
        };
        row.event = Event::Adjustment(AdjustmentEvent {
            adjustment: Adjustment {
                adjustment_id: Uuid::from_u128(77),
                order_id: order.order_id,
                kind: AdjustmentKind::Cancellation,
                created_at: order.created_at + chrono::TimeDelta::days(40),
                lines: vec![AdjustedLine {
                    line_no: 2,
                    quantity: 1,
                    amount_minor: 5,
                }],
            },
            order,
        });
        row.position.seq += 1;
        row
    }

    #[test]
    fn an_adjustment_record_carries_its_order_and_reads_back() {
        let written = RawRecord::from(&cancellation());
        assert_eq!(
            written.created_at, "2026-02-28T23:59:59.000007Z",
            "the order's time"
        );
        let mut line = Vec::new();
        written.write_line(&mut line);
        let read: RawRecordRef<'_> = serde_json::from_slice(&line).unwrap();
        let adjustment = read.adjustment.as_ref().unwrap();
        assert_eq!(adjustment.kind, AdjustmentKind::Cancellation);
        assert_eq!(adjustment.created_at, "2026-04-09T23:59:59.000007Z");
        assert_eq!(read.lines().unwrap().len(), 2);
        assert_eq!(read.to_owned_record().unwrap(), written);
        // An order's record has no `adjustment` field at all (version 2 shape).
        let order = RawRecord::from(&log_row("Oslo", "sku-7"));
        let mut line = Vec::new();
        order.write_line(&mut line);
        assert!(!String::from_utf8(line).unwrap().contains("adjustment"));
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
            assert!(matches!(
                read.lines().unwrap()[1].category,
                Cow::Borrowed(_)
            ));
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

    #[test]
    fn version_1_records_read_as_one_line() {
        let v1 = r#"{"order_id":"00000000-0000-0000-0000-000000000001","user_id":"u","city":"Oslo","product_id":"p:1","category":"c","quantity":2,"unit_price_minor":150,"currency":"EUR","created_at":"2026-11-20T23:00:00.000000Z","ingested_at":"2026-11-20T23:00:00.000000Z","txid":5,"seq":1}"#;
        let read: RawRecordRef<'_> = serde_json::from_str(v1).unwrap();
        let record = read.to_owned_record().unwrap();
        assert_eq!(
            record.lines,
            [RawLine {
                product_id: "p:1".into(),
                category: "c".into(),
                quantity: 2,
                unit_price_minor: 150
            }]
        );
        let bare = r#"{"order_id":"00000000-0000-0000-0000-000000000001","user_id":"u","city":"Oslo","currency":"EUR","created_at":"x","ingested_at":"x","txid":5,"seq":1}"#;
        let read: RawRecordRef<'_> = serde_json::from_str(bare).unwrap();
        assert!(
            read.lines().is_err(),
            "a record without products is an error"
        );
    }
}
