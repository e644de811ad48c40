//! The Avro schema of an order, in every version producers may still write.
//!
//! Ingest reads an Avro Object Container File with one of two reader schemas, by the
//! shape of its writer schema: one with an `items` array is resolved to the current
//! schema (v3); one with a product at the top level (v1, v2 and compatible writers)
//! is resolved to v2 and becomes an order of one line.
//!
//! | version | change |
//! |---|---|
//! | 1 | one item per order: no `quantity` |
//! | 2 | adds `quantity` (default 1) |
//! | 3 (current) | the product fields move into `items`, 1 to 100 lines |
//!
//! Ingest lists them (`GET /v1/schemas`) with their fingerprints, so producers
//! fetch them rather than copy them.

use std::sync::OnceLock;

use apache_avro::types::Value;
use apache_avro::{Codec, Reader, Schema, Writer};
use chrono::DateTime;
use uuid::Uuid;

use crate::order::{Order, OrderLine, Violation};

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

/// Version 3 (current): an order of 1 to 100 lines.
pub const SCHEMA_V3: &str = r#"{
  "type": "record",
  "name": "Order",
  "namespace": "dev.tidemark",
  "fields": [
    {"name": "order_id", "type": "string", "doc": "UUID, the idempotency key"},
    {"name": "user_id", "type": "string"},
    {"name": "city", "type": "string"},
    {"name": "currency", "type": "string", "doc": "ISO 4217"},
    {"name": "created_at", "type": {"type": "long", "logicalType": "timestamp-micros"}, "doc": "event time, UTC"},
    {"name": "items", "doc": "1 to 100 lines, each of a different product", "type": {"type": "array", "items": {
      "type": "record",
      "name": "OrderLine",
      "fields": [
        {"name": "product_id", "type": "string"},
        {"name": "category", "type": "string"},
        {"name": "quantity", "type": "int", "default": 1},
        {"name": "unit_price_minor", "type": "long", "doc": "minor units of currency"}
      ]
    }}}
  ]
}"#;

/// A schema version producers may write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchemaVersion {
    V1,
    V2,
    V3,
}

impl SchemaVersion {
    pub const CURRENT: SchemaVersion = SchemaVersion::V3;

    /// Every version producers may write, oldest first.
    pub const ALL: [SchemaVersion; 3] = [SchemaVersion::V1, SchemaVersion::V2, SchemaVersion::V3];

    /// The version's number (1, 2, …).
    pub fn number(self) -> u32 {
        match self {
            SchemaVersion::V1 => 1,
            SchemaVersion::V2 => 2,
            SchemaVersion::V3 => 3,
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
            SchemaVersion::V3 => SCHEMA_V3,
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
        static V3: OnceLock<Schema> = OnceLock::new();
        match self {
            SchemaVersion::V1 => V1.get_or_init(|| Schema::parse_str(SCHEMA_V1).expect("valid")),
            SchemaVersion::V2 => V2.get_or_init(|| Schema::parse_str(SCHEMA_V2).expect("valid")),
            SchemaVersion::V3 => V3.get_or_init(|| Schema::parse_str(SCHEMA_V3).expect("valid")),
        }
    }
}

/// Encodes orders as an Avro Object Container File (zstd blocks).
///
/// Versions 1 and 2 hold one line per order (version 1 of one unit); other orders
/// are refused with a panic, as a misuse.
pub fn write_container(
    orders: &[Order],
    version: SchemaVersion,
) -> Result<Vec<u8>, apache_avro::Error> {
    let schema = version.schema();
    let codec = Codec::Zstandard(apache_avro::ZstandardSettings::default());
    let mut writer = Writer::with_codec(schema, Vec::new(), codec)?;
    let text = |name: &str, value: &str| (name.to_owned(), Value::String(value.to_owned()));
    for order in orders {
        let mut fields = vec![
            text("order_id", &order.order_id.to_string()),
            text("user_id", &order.user_id),
            text("city", &order.city),
        ];
        let line_fields = |line: &OrderLine| {
            vec![
                text("product_id", &line.product_id),
                text("category", &line.category),
                ("quantity".to_owned(), Value::Int(line.quantity)),
                (
                    "unit_price_minor".to_owned(),
                    Value::Long(line.unit_price_minor),
                ),
            ]
        };
        if version == SchemaVersion::V3 {
            fields.extend([
                text("currency", order.currency.as_str()),
                (
                    "created_at".to_owned(),
                    Value::TimestampMicros(order.created_at.timestamp_micros()),
                ),
                (
                    "items".to_owned(),
                    Value::Array(
                        order
                            .lines
                            .iter()
                            .map(|l| Value::Record(line_fields(l)))
                            .collect(),
                    ),
                ),
            ]);
        } else {
            let [line] = order.lines.as_slice() else {
                panic!("schema v{} holds one line per order", version.number());
            };
            let mut flat = line_fields(line);
            if version == SchemaVersion::V1 {
                assert_eq!(line.quantity, 1, "schema v1 has no quantity");
                flat.retain(|(name, _)| name != "quantity");
            }
            fields.extend(flat);
            fields.extend([
                text("currency", order.currency.as_str()),
                (
                    "created_at".to_owned(),
                    Value::TimestampMicros(order.created_at.timestamp_micros()),
                ),
            ]);
        }
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
    let error = |e: apache_avro::Error| ContainerError(e.to_string());
    // The header first, for the writer's shape; then the records, resolved.
    let lines = match Reader::new(bytes).map_err(error)?.writer_schema() {
        Schema::Record(record) => record.fields.iter().any(|f| f.name == "items"),
        _ => false,
    };
    let reader_schema = if lines {
        SchemaVersion::V3
    } else {
        SchemaVersion::V2
    };
    let reader = Reader::builder(bytes)
        .reader_schema(reader_schema.schema())
        .build()
        .map_err(error)?;
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

fn field<'a>(fields: &'a [(String, Value)], name: &str) -> Option<&'a Value> {
    fields.iter().find(|(n, _)| n == name).map(|(_, v)| v)
}

/// One line from a record's product fields (a v3 line, or a v1/v2 order); a missing
/// quantity is 1. Violations are named `prefix` + field.
fn line_from_fields(
    fields: &[(String, Value)],
    prefix: &str,
    violations: &mut Vec<Violation>,
) -> OrderLine {
    let mut text = |name: &str| match field(fields, name) {
        Some(Value::String(s)) => s.clone(),
        _ => {
            violations.push(Violation::new(
                format!("{prefix}{name}"),
                "required",
                "string expected",
            ));
            String::new()
        }
    };
    let (product_id, category) = (text("product_id"), text("category"));
    let quantity = match field(fields, "quantity") {
        Some(Value::Int(q)) => *q,
        _ => 1,
    };
    let unit_price_minor = match field(fields, "unit_price_minor") {
        Some(Value::Long(p)) => *p,
        _ => {
            violations.push(Violation::new(
                format!("{prefix}unit_price_minor"),
                "required",
                "long expected",
            ));
            0
        }
    };
    OrderLine {
        product_id,
        category,
        quantity,
        unit_price_minor,
    }
}

/// Converts one record, resolved to v3 (with `items`) or v2 (one line), into an
/// order.
fn order_from_value(value: Value) -> Result<Order, Vec<Violation>> {
    let Value::Record(fields) = value else {
        return Err(vec![Violation::new("", "invalid", "record expected")]);
    };
    let mut violations = Vec::new();
    let mut text = |name: &str| -> String {
        match field(&fields, name) {
            Some(Value::String(s)) => s.clone(),
            _ => {
                violations.push(Violation::new(name, "required", "string expected"));
                String::new()
            }
        }
    };
    let order_id = text("order_id");
    let user_id = text("user_id");
    let city = text("city");
    let currency = text("currency");
    let lines = match field(&fields, "items") {
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::Record(line) => {
                    line_from_fields(line, &format!("items/{i}/"), &mut violations)
                }
                _ => {
                    violations.push(Violation::new(
                        format!("items/{i}"),
                        "invalid",
                        "record expected",
                    ));
                    line_from_fields(&[], "", &mut Vec::new())
                }
            })
            .collect(),
        _ => vec![line_from_fields(&fields, "", &mut violations)],
    };
    let created_at = match field(&fields, "created_at") {
        Some(Value::TimestampMicros(us) | Value::Long(us)) => DateTime::from_timestamp_micros(*us),
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
            currency,
            created_at,
            lines,
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
        assert_ne!(prints[1], prints[2]);
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
    fn v2_reads_v1_files_by_schema_resolution() {
        SchemaCompatibility::can_read(SchemaVersion::V1.schema(), SchemaVersion::V2.schema())
            .expect("a v1 writer resolves to the v2 reader");
    }

    #[test]
    fn files_of_every_version_are_read() {
        let mut one = sample();
        one.lines[0].quantity = 1;
        for version in SchemaVersion::ALL {
            let bytes = write_container(std::slice::from_ref(&one), version).unwrap();
            let read = read_container(&bytes, 10).unwrap();
            assert_eq!(read, vec![Ok(one.clone())], "{version:?}");
        }
    }

    #[test]
    fn round_trips_current_version() {
        let mut basket = sample();
        basket
            .lines
            .push(crate::order::tests::line("p-8", "games", 2, 4_500));
        let orders = vec![sample(), basket];
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
        order.lines[0].quantity = 1;
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
        for version in [SchemaVersion::V2, SchemaVersion::V3] {
            let schema = version.schema();
            let mut w = Writer::new(schema, Vec::new()).unwrap();
            let mut record = apache_avro::types::Record::new(schema).unwrap();
            let line = vec![
                ("product_id".to_owned(), Value::String("x".into())),
                ("category".to_owned(), Value::String("x".into())),
                ("quantity".to_owned(), Value::Int(2)),
                ("unit_price_minor".to_owned(), Value::Long(10)),
            ];
            if version == SchemaVersion::V3 {
                record.put("items", Value::Array(vec![Value::Record(line)]));
            } else {
                for (name, value) in line {
                    record.put(&name, value);
                }
            }
            for f in ["user_id", "city"] {
                record.put(f, "x");
            }
            record.put("order_id", "not-a-uuid");
            record.put("currency", "XXX");
            record.put("created_at", Value::TimestampMicros(0));
            w.append_value(record).unwrap();
            let bytes = w.into_inner().unwrap();
            let read = read_container(&bytes, 10).unwrap();
            let errs = read[0].clone().unwrap_err();
            let fields: Vec<_> = errs.iter().map(|v| v.field.as_str()).collect();
            assert_eq!(fields, ["order_id", "currency"], "{version:?}");
        }
    }
}
