//! Request bodies → orders. Three formats, one result: for each item, an order or
//! every rule it breaks, with a JSON pointer to the field.

use chrono::{DateTime, FixedOffset, SubsecRound, Utc};
use serde::Deserialize;
use serde_json::Value;
use tidemark_domain::avro;
use tidemark_domain::order;
use tidemark_domain::{Order, OrderLimits, Violation};
use uuid::Uuid;

/// The accepted body formats, chosen by `Content-Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// One order (object) or a batch (array).
    Json,
    /// One order per line.
    Ndjson,
    /// An Avro Object Container File written with any schema version.
    Avro,
}

impl Format {
    /// The format for a `Content-Type` header value, ignoring parameters.
    pub fn from_content_type(value: &str) -> Option<Format> {
        let essence = value
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "application/json" => Some(Format::Json),
            "application/x-ndjson" | "application/jsonl" | "application/jsonlines" => {
                Some(Format::Ndjson)
            }
            "application/avro" | "avro/binary" | "application/vnd.apache.avro+binary" => {
                Some(Format::Avro)
            }
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Ndjson => "ndjson",
            Format::Avro => "avro",
        }
    }
}

/// Why a body could not be read as a whole.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyError {
    /// Not parseable at all (syntax, encoding, nesting, corrupt Avro).
    Malformed(String),
    /// More items than allowed.
    TooMany(usize),
    Empty,
}

/// One decoded request: per item, an order or its violations (pointers are
/// relative to the item; `batch` says whether to prefix them with `/index`).
#[derive(Debug)]
pub struct Decoded {
    pub items: Vec<Result<Order, Vec<Violation>>>,
    pub batch: bool,
}

/// The JSON shape of an order. Unknown fields are rejected so a misspelt field is
/// an error rather than a silently missing value.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderWire {
    order_id: Uuid,
    user_id: String,
    city: String,
    product_id: String,
    category: String,
    quantity: i32,
    unit_price_minor: i64,
    currency: String,
    created_at: DateTime<FixedOffset>,
}

const FIELDS: [(&str, Kind); 9] = [
    ("order_id", Kind::Uuid),
    ("user_id", Kind::Text),
    ("city", Kind::Text),
    ("product_id", Kind::Text),
    ("category", Kind::Text),
    ("quantity", Kind::Int32),
    ("unit_price_minor", Kind::Int64),
    ("currency", Kind::Text),
    ("created_at", Kind::Time),
];

#[derive(Clone, Copy)]
enum Kind {
    Uuid,
    Text,
    Int32,
    Int64,
    Time,
}

pub fn decode(
    format: Format,
    body: &[u8],
    max_items: usize,
    now: DateTime<Utc>,
    limits: &OrderLimits,
) -> Result<Decoded, BodyError> {
    let decoded = match format {
        Format::Json => decode_json(body, max_items)?,
        Format::Ndjson => decode_ndjson(body, max_items)?,
        Format::Avro => Decoded {
            items: avro::read_container(body, max_items)
                .map_err(|e| {
                    if e.to_string().contains("more than") {
                        BodyError::TooMany(max_items)
                    } else {
                        BodyError::Malformed(e.to_string())
                    }
                })?
                .into_iter()
                .map(|item| item.map(truncate_to_micros))
                .collect(),
            batch: true,
        },
    };
    if decoded.items.is_empty() {
        return Err(BodyError::Empty);
    }
    let items = decoded
        .items
        .into_iter()
        .map(|item| item.and_then(|order| order.validate(now, limits).map(|()| order)))
        .collect();
    Ok(Decoded {
        items,
        batch: decoded.batch,
    })
}

fn decode_json(body: &[u8], max_items: usize) -> Result<Decoded, BodyError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace()).copied();
    match first {
        Some(b'[') => {
            // Fast path: every item well-typed.
            if let Ok(wires) = serde_json::from_slice::<Vec<OrderWire>>(body) {
                if wires.len() > max_items {
                    return Err(BodyError::TooMany(max_items));
                }
                let items = wires.into_iter().map(from_wire).collect();
                return Ok(Decoded { items, batch: true });
            }
            let values: Vec<Value> = serde_json::from_slice(body).map_err(|e| malformed(&e))?;
            if values.len() > max_items {
                return Err(BodyError::TooMany(max_items));
            }
            Ok(Decoded {
                items: values.iter().map(diagnose).collect(),
                batch: true,
            })
        }
        Some(b'{') => {
            let item = match serde_json::from_slice::<OrderWire>(body) {
                Ok(wire) => from_wire(wire),
                Err(_) => {
                    diagnose(&serde_json::from_slice::<Value>(body).map_err(|e| malformed(&e))?)
                }
            };
            Ok(Decoded {
                items: vec![item],
                batch: false,
            })
        }
        Some(_) => {
            // Valid JSON of the wrong shape, or not JSON at all.
            match serde_json::from_slice::<Value>(body) {
                Ok(_) => Err(BodyError::Malformed(
                    "expected an order object or an array of orders".into(),
                )),
                Err(e) => Err(malformed(&e)),
            }
        }
        None => Err(BodyError::Empty),
    }
}

fn decode_ndjson(body: &[u8], max_items: usize) -> Result<Decoded, BodyError> {
    let mut items = Vec::new();
    for line in body.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if items.len() == max_items {
            return Err(BodyError::TooMany(max_items));
        }
        let item = match serde_json::from_slice::<OrderWire>(line) {
            Ok(wire) => from_wire(wire),
            Err(_) => match serde_json::from_slice::<Value>(line) {
                Ok(value) => diagnose(&value),
                Err(e) => Err(vec![Violation::new(
                    "",
                    "malformed",
                    format!("not valid JSON: {e}"),
                )]),
            },
        };
        items.push(item);
    }
    Ok(Decoded { items, batch: true })
}

/// serde_json's message names the position and never our internals.
fn malformed(e: &serde_json::Error) -> BodyError {
    BodyError::Malformed(format!("not valid JSON: {e}"))
}

/// Postgres keeps microseconds; comparing a resent order with the stored one must
/// not trip over nanoseconds the database dropped.
fn truncate_to_micros(mut order: Order) -> Order {
    order.created_at = order.created_at.trunc_subsecs(6);
    order
}

fn from_wire(w: OrderWire) -> Result<Order, Vec<Violation>> {
    let currency = w.currency.parse().map_err(|_| {
        vec![Violation::new(
            "currency",
            "invalid",
            "must be an accepted ISO 4217 code (e.g. EUR, USD, JPY)",
        )]
    })?;
    Ok(truncate_to_micros(Order {
        order_id: w.order_id,
        user_id: w.user_id,
        city: w.city,
        product_id: w.product_id,
        category: w.category,
        quantity: w.quantity,
        unit_price_minor: w.unit_price_minor,
        currency,
        created_at: w.created_at.with_timezone(&Utc),
    }))
}

/// The slow path: an item that did not deserialize. Reports every field's problem.
fn diagnose(value: &Value) -> Result<Order, Vec<Violation>> {
    let Some(object) = value.as_object() else {
        return Err(vec![Violation::new("", "type", "expected an order object")]);
    };
    let mut v = Vec::new();
    for (name, kind) in FIELDS {
        match object.get(name) {
            None | Some(Value::Null) => v.push(Violation::new(name, "required", "is required")),
            Some(field) => {
                if let Some(problem) = check_kind(field, kind) {
                    v.push(Violation::new(name, problem.0, problem.1));
                }
            }
        }
    }
    for name in object.keys() {
        if !FIELDS.iter().any(|(f, _)| f == name) {
            let shown: String = name.chars().take(64).collect();
            v.push(Violation::new(
                shown,
                "unknown_field",
                "is not a field of an order",
            ));
        }
    }
    if !v.is_empty() {
        check_values(object, &mut v);
        return Err(v);
    }
    // Every field has the right type, so the typed parse succeeds; a currency
    // outside the list is the only thing left to catch.
    let wire: OrderWire = serde_json::from_value(value.clone())
        .map_err(|e| vec![Violation::new("", "invalid", e.to_string())])?;
    from_wire(wire)
}

/// The domain's rules for the fields that are present and well typed, so one answer
/// lists them beside the missing and ill-typed ones (the typed path checks them
/// through `Order::validate` when every field parses).
fn check_values(object: &serde_json::Map<String, Value>, v: &mut Vec<Violation>) {
    let reported: Vec<String> = v.iter().map(|x| x.field.clone()).collect();
    let present = |name: &str| {
        object
            .get(name)
            .filter(|_| !reported.iter().any(|r| r == name))
    };
    let mut found = Vec::new();
    for name in ["user_id", "city", "product_id", "category"] {
        if let Some(text) = present(name).and_then(Value::as_str) {
            found.extend(order::check_text(name, text).err());
        }
    }
    if let Some(q) = present("quantity").and_then(Value::as_i64) {
        found.extend(order::check_quantity(i32::try_from(q).unwrap_or(0)).err());
    }
    if let Some(p) = present("unit_price_minor").and_then(Value::as_i64) {
        found.extend(order::check_unit_price(p).err());
    }
    if let Some(code) = present("currency").and_then(Value::as_str)
        && code.parse::<tidemark_domain::Currency>().is_err()
    {
        found.push(Violation::new(
            "currency",
            "invalid",
            "must be an accepted ISO 4217 code (e.g. EUR, USD, JPY)",
        ));
    }
    // In the order of the fields, before unknown ones.
    let at = v
        .iter()
        .position(|x| x.code == "unknown_field")
        .unwrap_or(v.len());
    v.splice(at..at, found);
}

fn check_kind(field: &Value, kind: Kind) -> Option<(&'static str, &'static str)> {
    match kind {
        Kind::Uuid => match field.as_str() {
            Some(s) if Uuid::parse_str(s).is_ok() => None,
            Some(_) => Some(("invalid", "must be a UUID")),
            None => Some(("type", "expected a string holding a UUID")),
        },
        Kind::Text => field
            .as_str()
            .is_none()
            .then_some(("type", "expected a string")),
        Kind::Int32 | Kind::Int64 => match (field.as_i64(), kind) {
            (Some(i), Kind::Int32) if i32::try_from(i).is_err() => {
                Some(("out_of_range", "is far outside the accepted range"))
            }
            (Some(_), _) => None,
            (None, _) if field.is_number() => Some(("type", "expected a whole number")),
            (None, _) => Some(("type", "expected a number")),
        },
        Kind::Time => match field.as_str() {
            Some(s) if DateTime::parse_from_rfc3339(s).is_ok() => None,
            Some(_) => Some((
                "invalid",
                "must be an RFC 3339 timestamp, e.g. 2026-11-21T10:00:00Z",
            )),
            None => Some(("type", "expected an RFC 3339 timestamp string")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        "2026-11-21T12:00:00Z".parse().unwrap()
    }

    fn order_json(id: u128) -> Value {
        serde_json::json!({
            "order_id": Uuid::from_u128(id),
            "user_id": "u-1", "city": "Berlin", "product_id": "p-1", "category": "books",
            "quantity": 2, "unit_price_minor": 1250, "currency": "EUR",
            "created_at": "2026-11-21T10:00:00.123456789+01:00"
        })
    }

    fn run(format: Format, body: &[u8]) -> Result<Decoded, BodyError> {
        decode(format, body, 3, now(), &OrderLimits::default())
    }

    #[test]
    fn one_object_is_one_order_in_utc_microseconds() {
        let body = serde_json::to_vec(&order_json(1)).unwrap();
        let d = run(Format::Json, &body).unwrap();
        assert!(!d.batch);
        let order = d.items[0].as_ref().unwrap();
        assert_eq!(
            order.created_at.to_rfc3339(),
            "2026-11-21T09:00:00.123456+00:00"
        );
        assert_eq!(order.revenue_minor(), 2500);
    }

    #[test]
    fn reports_every_field_of_every_item() {
        let mut bad = order_json(2);
        bad["quantity"] = "two".into();
        bad["currency"] = "EUE".into();
        bad["colour"] = "red".into();
        bad.as_object_mut().unwrap().remove("city");
        let body = serde_json::to_vec(&serde_json::json!([order_json(1), bad])).unwrap();
        let d = run(Format::Json, &body).unwrap();
        assert!(d.items[0].is_ok());
        let errs = d.items[1].as_ref().unwrap_err();
        let fields: Vec<_> = errs
            .iter()
            .map(|v| (v.field.as_str(), v.code.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("city", "required"),
                ("quantity", "type"),
                ("currency", "invalid"),
                ("colour", "unknown_field")
            ]
        );
    }

    #[test]
    fn range_errors_are_listed_beside_missing_fields() {
        let mut bad = order_json(3);
        bad["quantity"] = 0.into();
        bad["unit_price_minor"] = (-5).into();
        bad["user_id"] = "  ".into();
        bad.as_object_mut().unwrap().remove("city");
        let body = serde_json::to_vec(&bad).unwrap();
        let d = run(Format::Json, &body).unwrap();
        let errs = d.items[0].as_ref().unwrap_err();
        let fields: Vec<_> = errs
            .iter()
            .map(|v| (v.field.as_str(), v.code.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("city", "required"),
                ("user_id", "required"),
                ("quantity", "out_of_range"),
                ("unit_price_minor", "out_of_range")
            ]
        );
    }

    #[test]
    fn ndjson_reports_bad_lines_by_index() {
        let mut body = serde_json::to_vec(&order_json(1)).unwrap();
        body.extend_from_slice(b"\n{not json\n\n");
        body.extend_from_slice(&serde_json::to_vec(&order_json(2)).unwrap());
        let d = run(Format::Ndjson, &body).unwrap();
        assert_eq!(d.items.len(), 3);
        assert!(d.items[0].is_ok() && d.items[2].is_ok());
        assert_eq!(d.items[1].as_ref().unwrap_err()[0].code, "malformed");
    }

    #[test]
    fn hostile_bodies_are_malformed_not_panics() {
        let deep = "[".repeat(10_000) + &"]".repeat(10_000);
        assert!(matches!(
            run(Format::Json, deep.as_bytes()),
            Err(BodyError::Malformed(_))
        ));
        let mut utf8 = serde_json::to_vec(&order_json(1)).unwrap();
        let at = utf8.windows(6).position(|w| w == b"Berlin").unwrap();
        utf8[at] = 0xff;
        assert!(matches!(
            run(Format::Json, &utf8),
            Err(BodyError::Malformed(_))
        ));
        assert!(matches!(
            run(Format::Json, b"42"),
            Err(BodyError::Malformed(_))
        ));
        assert_eq!(run(Format::Json, b"  ").unwrap_err(), BodyError::Empty);
        assert_eq!(run(Format::Json, b"[]").unwrap_err(), BodyError::Empty);
        let four = serde_json::to_vec(&vec![order_json(1); 4]).unwrap();
        assert_eq!(run(Format::Json, &four).unwrap_err(), BodyError::TooMany(3));
    }

    #[test]
    fn content_types_map_to_formats() {
        assert_eq!(
            Format::from_content_type("application/json; charset=utf-8"),
            Some(Format::Json)
        );
        assert_eq!(
            Format::from_content_type("application/x-ndjson"),
            Some(Format::Ndjson)
        );
        assert_eq!(
            Format::from_content_type("application/avro"),
            Some(Format::Avro)
        );
        assert_eq!(Format::from_content_type("text/plain"), None);
    }
}
