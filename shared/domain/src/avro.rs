//! The Avro schema of an order, in every version producers may still write.
//!
//! Ingest reads Avro Object Container Files with the *current* schema as the reader
//! schema; Avro's schema resolution adapts files written with an older version.
//!
//! | version | change |
//! |---|---|
//! | 1 | one item per order: no `quantity` |
//! | 2 (current) | adds `quantity` (default 1) |
//!
//! Ingest lists them (`GET /v1/schemas`) with their fingerprints, so producers
//! fetch them rather than copy them.

use std::sync::OnceLock;

use apache_avro::types::Value;
use apache_avro::{Codec, Reader, Schema, Writer};
use chrono::DateTime;
use uuid::Uuid;

use crate::order::{Order, Violation};

/// Version 1: orders of a single unit.
pub const SCHEMA_V1: &str = r#"{
  "type": "record",
  "name": "Order",
  "namespace": "dev.tidemark",
  "fields": [
    {"name": "order_id", "type": "string", "doc": "UUID, the idempotency key"},
    {"name": "user_id", "type": "string"},
    {"name": "city", "type": "string"},
    {"name": "product_id", "type": "string"},
    {"name": "category", "type": "string"},
    {"name": "unit_price_minor", "type": "long", "doc": "minor units of currency"},
    {"name": "currency", "type": "string", "doc": "ISO 4217"},
    {"name": "created_at", "type": {"type": "long", "logicalType": "timestamp-micros"}, "doc": "event time, UTC"}
  ]
}"#;

/// Version 2 (current): adds `quantity`.
pub const SCHEMA_V2: &str = r#"{
  "type": "record",
  "name": "Order",
  "namespace": "dev.tidemark",
  "fields": [
    {"name": "order_id", "type": "string", "doc": "UUID, the idempotency key"},
    {"name": "user_id", "type": "string"},
    {"name": "city", "type": "string"},
    {"name": "product_id", "type": "string"},
    {"name": "category", "type": "string"},
    {"name": "quantity", "type": "int", "default": 1},
    {"name": "unit_price_minor", "type": "long", "doc": "minor units of currency"},
    {"name": "currency", "type": "string", "doc": "ISO 4217"},
    {"name": "created_at", "type": {"type": "long", "logicalType": "timestamp-micros"}, "doc": "event time, UTC"}
  ]
}"#;

/// A schema version producers may write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchemaVersion {
    V1,
    V2,
}

impl SchemaVersion {
    pub const CURRENT: SchemaVersion = SchemaVersion::V2;

    /// Every version producers may write, oldest first.
    pub const ALL: [SchemaVersion; 2] = [SchemaVersion::V1, SchemaVersion::V2];

    /// The version's number (1, 2, …).
    pub fn number(self) -> u32 {
        match self {
            SchemaVersion::V1 => 1,
            SchemaVersion::V2 => 2,
        }
    }

    /// The version numbered `number`, if there is one.
    pub fn of(number: u32) -> Option<SchemaVersion> {
        Self::ALL.into_iter().find(|v| v.number() == number)
    }

    /// The schema as producers write it (JSON).
    pub fn text(self) -> &'static str {
        match self {
            SchemaVersion::V1 => SCHEMA_V1,
            SchemaVersion::V2 => SCHEMA_V2,
        }
    }

    /// The schema's CRC-64-AVRO (Rabin) fingerprint of its Parsing Canonical Form,
    /// as 16 hex digits: the fingerprint Avro's single-object encoding uses.
    pub fn fingerprint(self) -> String {
        self.schema()
            .fingerprint::<apache_avro::rabin::Rabin>()
            .to_string()
    }

    pub fn schema(self) -> &'static Schema {
        static V1: OnceLock<Schema> = OnceLock::new();
        static V2: OnceLock<Schema> = OnceLock::new();
        match self {
            SchemaVersion::V1 => V1.get_or_init(|| Schema::parse_str(SCHEMA_V1).expect("valid")),
            SchemaVersion::V2 => V2.get_or_init(|| Schema::parse_str(SCHEMA_V2).expect("valid")),
        }
    }
}

/// Encodes orders as an Avro Object Container File (zstd blocks).
///
/// Version 1 cannot express a quantity; orders of more than one unit are refused.
pub fn write_container(
    orders: &[Order],
    version: SchemaVersion,
) -> Result<Vec<u8>, apache_avro::Error> {
    let schema = version.schema();
    let codec = Codec::Zstandard(apache_avro::ZstandardSettings::default());
    let mut writer = Writer::with_codec(schema, Vec::new(), codec)?;
    for order in orders {
        let mut fields = vec![
            (
                "order_id".to_owned(),
                Value::String(order.order_id.to_string()),
            ),
            ("user_id".to_owned(), Value::String(order.user_id.clone())),
            ("city".to_owned(), Value::String(order.city.clone())),
            (
                "product_id".to_owned(),
                Value::String(order.product_id.clone()),
            ),
            ("category".to_owned(), Value::String(order.category.clone())),
        ];
        match version {
            SchemaVersion::V1 => assert_eq!(order.quantity, 1, "schema v1 has no quantity"),
            SchemaVersion::V2 => fields.push(("quantity".to_owned(), Value::Int(order.quantity))),
        }
        fields.extend([
            (
                "unit_price_minor".to_owned(),
                Value::Long(order.unit_price_minor),
            ),
            (
                "currency".to_owned(),
                Value::String(order.currency.to_string()),
            ),
            (
                "created_at".to_owned(),
                Value::TimestampMicros(order.created_at.timestamp_micros()),
            ),
        ]);
        writer.append_value(Value::Record(fields))?;
    }
    writer.into_inner()
}

/// Why an Avro body could not be read at all.
#[derive(Debug, thiserror::Error)]
#[error("not a readable Avro object container file: {0}")]
pub struct ContainerError(String);

/// Reads every record of a container file, resolved to the current schema.
///
/// Each record becomes an order or the list of what is wrong with it; structural
/// damage (bad header, corrupt block, incompatible writer schema) is an error for
/// the whole file. `max_records` bounds the work done on a hostile file.
pub fn read_container(
    bytes: &[u8],
    max_records: usize,
) -> Result<Vec<Result<Order, Vec<Violation>>>, ContainerError> {
    let reader = Reader::builder(bytes)
        .reader_schema(SchemaVersion::CURRENT.schema())
        .build()
        .map_err(|e| ContainerError(e.to_string()))?;
    let mut out = Vec::new();
    for value in reader {
        if out.len() == max_records {
            return Err(ContainerError(format!("more than {max_records} records")));
        }
        let value = value.map_err(|e| ContainerError(e.to_string()))?;
        out.push(order_from_value(value));
    }
    Ok(out)
}

/// Converts one record, resolved to the current schema, into an order.
fn order_from_value(value: Value) -> Result<Order, Vec<Violation>> {
    let Value::Record(fields) = value else {
        return Err(vec![Violation::new("", "invalid", "record expected")]);
    };
    let mut violations = Vec::new();
    let mut text = |name: &str| -> String {
        match fields.iter().find(|(n, _)| n == name) {
            Some((_, Value::String(s))) => s.clone(),
            _ => {
                violations.push(Violation::new(name, "required", "string expected"));
                String::new()
            }
        }
    };
    let order_id = text("order_id");
    let user_id = text("user_id");
    let city = text("city");
    let product_id = text("product_id");
    let category = text("category");
    let currency = text("currency");
    let quantity = match fields.iter().find(|(n, _)| n == "quantity") {
        Some((_, Value::Int(q))) => *q,
        _ => 1,
    };
    let unit_price_minor = match fields.iter().find(|(n, _)| n == "unit_price_minor") {
        Some((_, Value::Long(p))) => *p,
        _ => {
            violations.push(Violation::new(
                "unit_price_minor",
                "required",
                "long expected",
            ));
            0
        }
    };
    let created_at = match fields.iter().find(|(n, _)| n == "created_at") {
        Some((_, Value::TimestampMicros(us) | Value::Long(us))) => {
            DateTime::from_timestamp_micros(*us)
        }
        _ => None,
    };
    let order_id = Uuid::parse_str(&order_id).ok().or_else(|| {
        violations.push(Violation::new("order_id", "invalid", "must be a UUID"));
        None
    });
    let currency = currency.parse().ok().or_else(|| {
        violations.push(Violation::new(
            "currency",
            "invalid",
            "must be an accepted ISO 4217 code",
        ));
        None
    });
    let created_at = created_at.or_else(|| {
        violations.push(Violation::new(
            "created_at",
            "invalid",
            "must be a timestamp in microseconds",
        ));
        None
    });
    match (order_id, currency, created_at) {
        (Some(order_id), Some(currency), Some(created_at)) if violations.is_empty() => Ok(Order {
            order_id,
            user_id,
            city,
            product_id,
            category,
            quantity,
            unit_price_minor,
            currency,
            created_at,
        }),
        _ => Err(violations),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::order::tests::sample;
    use apache_avro::schema_compatibility::SchemaCompatibility;

    #[test]
    fn versions_are_numbered_and_fingerprinted_distinctly() {
        let prints: Vec<String> = SchemaVersion::ALL.iter().map(|v| v.fingerprint()).collect();
        assert!(
            prints
                .iter()
                .all(|p| p.len() == 16 && p.bytes().all(|b| b.is_ascii_hexdigit()))
        );
        assert_ne!(prints[0], prints[1]);
        for version in SchemaVersion::ALL {
            assert_eq!(SchemaVersion::of(version.number()), Some(version));
            // The text is the schema: parsing it gives the same canonical form.
            let parsed = Schema::parse_str(version.text()).unwrap();
            assert_eq!(parsed.canonical_form(), version.schema().canonical_form());
        }
        assert_eq!(SchemaVersion::of(0), None);
        assert!(SchemaVersion::ALL.contains(&SchemaVersion::CURRENT));
    }

    #[test]
    fn current_schema_reads_every_older_version() {
        let current = SchemaVersion::CURRENT.schema();
        for old in [SchemaVersion::V1, SchemaVersion::V2] {
            SchemaCompatibility::can_read(old.schema(), current)
                .unwrap_or_else(|e| panic!("{old:?} is not readable by the current schema: {e}"));
        }
    }

    #[test]
    fn round_trips_current_version() {
        let orders = vec![sample(), sample()];
        let bytes = write_container(&orders, SchemaVersion::CURRENT).unwrap();
        let read: Vec<_> = read_container(&bytes, 10)
            .unwrap()
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(read, orders);
    }

    #[test]
    fn v1_files_get_quantity_one() {
        let mut order = sample();
        order.quantity = 1;
        let bytes = write_container(std::slice::from_ref(&order), SchemaVersion::V1).unwrap();
        let read = read_container(&bytes, 10).unwrap();
        assert_eq!(read, vec![Ok(order)]);
    }

    #[test]
    fn corrupt_and_oversized_files_are_errors() {
        let bytes = write_container(&[sample(), sample()], SchemaVersion::CURRENT).unwrap();
        assert!(read_container(&bytes[..bytes.len() / 2], 10).is_err());
        assert!(read_container(b"not avro at all", 10).is_err());
        assert!(read_container(&bytes, 1).is_err());
    }

    #[test]
    fn bad_fields_are_reported_by_name() {
        let schema = SchemaVersion::CURRENT.schema();
        let mut w = Writer::new(schema, Vec::new()).unwrap();
        let mut record = apache_avro::types::Record::new(schema).unwrap();
        for f in ["user_id", "city", "product_id", "category"] {
            record.put(f, "x");
        }
        record.put("order_id", "not-a-uuid");
        record.put("quantity", 2);
        record.put("unit_price_minor", 10_i64);
        record.put("currency", "XXX");
        record.put("created_at", Value::TimestampMicros(0));
        w.append_value(record).unwrap();
        let bytes = w.into_inner().unwrap();
        let read = read_container(&bytes, 10).unwrap();
        let errs = read[0].clone().unwrap_err();
        let fields: Vec<_> = errs.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["order_id", "currency"]);
    }
}
