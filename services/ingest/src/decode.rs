//! Request bodies → orders. Three formats, one result: for each item, an order or
//! every rule it breaks, with a JSON pointer to the field.
//!
//! An order in JSON comes in two shapes: a basket, `items: [{product_id, category,
//! quantity, unit_price_minor}]` (1 to 100 lines, pointers `items/2/quantity`), or
//! one line with those fields at the top level (pointers `quantity`), as before
//! baskets existed.

use chrono::{DateTime, FixedOffset, SubsecRound, Utc};
use serde::Deserialize;
use serde_json::Value;
use tidemark_domain::avro;
use tidemark_domain::order;
use tidemark_domain::{Order, OrderLimits, OrderLine, Violation};
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

/// The JSON shape of an order: a basket (`items`) or one line at the top level.
/// Unknown fields are rejected so a misspelt field is an error rather than a
/// silently missing value.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderWire {
    order_id: Uuid,
    user_id: String,
    city: String,
    currency: String,
    created_at: DateTime<FixedOffset>,
    #[serde(default)]
    items: Option<Vec<LineWire>>,
    // One line at the top level.
    #[serde(default)]
    product_id: Option<String>,
    #[serde(default)]
    category: Option<String>,
    #[serde(default)]
    quantity: Option<i32>,
    #[serde(default)]
    unit_price_minor: Option<i64>,
}

/// One line in JSON.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineWire {
    product_id: String,
    category: String,
    quantity: i32,
    unit_price_minor: i64,
}

/// The fields every order has.
const ORDER_FIELDS: [(&str, Kind); 5] = [
    ("order_id", Kind::Uuid),
    ("user_id", Kind::Text),
    ("city", Kind::Text),
    ("currency", Kind::Text),
    ("created_at", Kind::Time),
];

/// The fields of a line (in `items`, or at the top level of a one-line order).
const LINE_FIELDS: [(&str, Kind); 4] = [
    ("product_id", Kind::Text),
    ("category", Kind::Text),
    ("quantity", Kind::Int32),
    ("unit_price_minor", Kind::Int64),
];

#[derive(Clone, Copy)]
enum Kind {
    Uuid,
    Text,
    Int32,
    Int64,
    Time,
}

/// One decoded item: an order or its violations, and whether it was sent as one
/// line at the top level (then its line's pointers drop the `items/0/` prefix).
type Item = (bool, Result<Order, Vec<Violation>>);

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
        Format::Avro => Undecided {
            items: avro::read_container(body, max_items)
                .map_err(|e| {
                    if e.to_string().contains("more than") {
                        BodyError::TooMany(max_items)
                    } else {
                        BodyError::Malformed(e.to_string())
                    }
                })?
                .into_iter()
                .map(|item| (false, item.map(truncate_to_micros)))
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
        .map(|(flat, item)| {
            let item = item.and_then(|order| order.validate(now, limits).map(|()| order));
            if flat {
                item.map_err(|violations| violations.into_iter().map(flatten).collect())
            } else {
                item
            }
        })
        .collect();
    Ok(Decoded {
        items,
        batch: decoded.batch,
    })
}

/// Items before validation.
struct Undecided {
    items: Vec<Item>,
    batch: bool,
}

/// A violation of a one-line order's line, named as its top-level field.
fn flatten(violation: Violation) -> Violation {
    match violation.field.strip_prefix("items/0/") {
        Some(field) => Violation {
            field: field.to_owned(),
            ..violation
        },
        None => violation,
    }
}

fn decode_json(body: &[u8], max_items: usize) -> Result<Undecided, BodyError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace()).copied();
    match first {
        Some(b'[') => {
            // Fast path: every item well-typed.
            if let Ok(wires) = serde_json::from_slice::<Vec<OrderWire>>(body) {
                if wires.len() > max_items {
                    return Err(BodyError::TooMany(max_items));
                }
                let items = wires.into_iter().map(from_wire).collect();
                return Ok(Undecided { items, batch: true });
            }
            let values: Vec<Value> = serde_json::from_slice(body).map_err(|e| malformed(&e))?;
            if values.len() > max_items {
                return Err(BodyError::TooMany(max_items));
            }
            Ok(Undecided {
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
            Ok(Undecided {
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

fn decode_ndjson(body: &[u8], max_items: usize) -> Result<Undecided, BodyError> {
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
                Err(e) => (
                    false,
                    Err(vec![Violation::new(
                        "",
                        "malformed",
                        format!("not valid JSON: {e}"),
                    )]),
                ),
            },
        };
        items.push(item);
    }
    Ok(Undecided { items, batch: true })
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

fn currency_violation() -> Violation {
    Violation::new(
        "currency",
        "invalid",
        "must be an accepted ISO 4217 code (e.g. EUR, USD, JPY)",
    )
}

fn from_wire(w: OrderWire) -> Item {
    let top_level = w.product_id.is_some()
        || w.category.is_some()
        || w.quantity.is_some()
        || w.unit_price_minor.is_some();
    let (flat, lines) = match (w.items, top_level) {
        (Some(items), false) => (false, items),
        (Some(_), true) => return (false, Err(vec![both_shapes()])),
        (None, _) => match (w.product_id, w.category, w.quantity, w.unit_price_minor) {
            (Some(product_id), Some(category), Some(quantity), Some(unit_price_minor)) => (
                true,
                vec![LineWire {
                    product_id,
                    category,
                    quantity,
                    unit_price_minor,
                }],
            ),
            (product_id, category, quantity, price) => {
                let present = [
                    product_id.is_some(),
                    category.is_some(),
                    quantity.is_some(),
                    price.is_some(),
                ];
                return (
                    true,
                    Err(LINE_FIELDS
                        .iter()
                        .zip(present)
                        .filter(|(_, present)| !present)
                        .map(|((name, _), _)| Violation::new(*name, "required", "is required"))
                        .collect()),
                );
            }
        },
    };
    let Ok(currency) = w.currency.parse() else {
        return (flat, Err(vec![currency_violation()]));
    };
    let order = Order {
        order_id: w.order_id,
        user_id: w.user_id,
        city: w.city,
        currency,
        created_at: w.created_at.with_timezone(&Utc),
        lines: lines
            .into_iter()
            .map(|l| OrderLine {
                product_id: l.product_id,
                category: l.category,
                quantity: l.quantity,
                unit_price_minor: l.unit_price_minor,
            })
            .collect(),
    };
    (flat, Ok(truncate_to_micros(order)))
}

fn both_shapes() -> Violation {
    Violation::new(
        "items",
        "conflict",
        "send either `items` or one line's fields at the top level, not both",
    )
}

/// Checks that `object` has `fields` of the right kinds (pointers prefixed with
/// `prefix`), and no others.
fn check_fields(
    object: &serde_json::Map<String, Value>,
    fields: &[(&str, Kind)],
    allowed: &[&str],
    prefix: &str,
    v: &mut Vec<Violation>,
) {
    for (name, kind) in fields {
        let at = format!("{prefix}{name}");
        match object.get(*name) {
            None | Some(Value::Null) => v.push(Violation::new(at, "required", "is required")),
            Some(field) => {
                if let Some(problem) = check_kind(field, *kind) {
                    v.push(Violation::new(at, problem.0, problem.1));
                }
            }
        }
    }
    for name in object.keys() {
        if !fields.iter().any(|(f, _)| f == name) && !allowed.contains(&name.as_str()) {
            let shown: String = name.chars().take(64).collect();
            v.push(Violation::new(
                format!("{prefix}{shown}"),
                "unknown_field",
                "is not a field of an order",
            ));
        }
    }
}

/// The slow path: an item that did not deserialize. Reports every field's problem.
fn diagnose(value: &Value) -> Item {
    let Some(object) = value.as_object() else {
        return (
            false,
            Err(vec![Violation::new("", "type", "expected an order object")]),
        );
    };
    let flat = !object.contains_key("items");
    let mut v = Vec::new();
    if flat {
        let mut fields = ORDER_FIELDS.to_vec();
        fields.splice(3..3, LINE_FIELDS);
        check_fields(object, &fields, &[], "", &mut v);
    } else {
        // A line's fields beside `items` are a conflict, reported once below.
        let allowed = [
            "items",
            "product_id",
            "category",
            "quantity",
            "unit_price_minor",
        ];
        check_fields(object, &ORDER_FIELDS, &allowed, "", &mut v);
        if LINE_FIELDS.iter().any(|(f, _)| object.contains_key(*f)) {
            v.push(both_shapes());
        }
        match object.get("items") {
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    match item.as_object() {
                        Some(line) => {
                            check_fields(line, &LINE_FIELDS, &[], &format!("items/{i}/"), &mut v);
                        }
                        None => v.push(Violation::new(
                            format!("items/{i}"),
                            "type",
                            "expected a line object",
                        )),
                    }
                }
            }
            _ => v.push(Violation::new(
                "items",
                "type",
                "expected an array of lines",
            )),
        }
    }
    if !v.is_empty() {
        check_values(object, &mut v);
        return (flat, Err(v));
    }
    // Every field has the right type, so the typed parse succeeds; a currency
    // outside the list is the only thing left to catch.
    match serde_json::from_value::<OrderWire>(value.clone()) {
        Ok(wire) => from_wire(wire),
        Err(e) => (
            flat,
            Err(vec![Violation::new("", "invalid", e.to_string())]),
        ),
    }
}

/// The domain's rules for the fields that are present and well typed, so one answer
/// lists them beside the missing and ill-typed ones (the typed path checks them
/// through `Order::validate` when every field parses).
fn check_values(object: &serde_json::Map<String, Value>, v: &mut Vec<Violation>) {
    let reported: Vec<String> = v.iter().map(|x| x.field.clone()).collect();
    let mut found = Vec::new();
    let mut check = |line: &serde_json::Map<String, Value>, prefix: &str, names: &[&str]| {
        let present = |name: &str| {
            let at = format!("{prefix}{name}");
            line.get(name).filter(|_| !reported.contains(&at))
        };
        for name in names {
            let at = format!("{prefix}{name}");
            let checked = match *name {
                "quantity" => present(name)
                    .and_then(Value::as_i64)
                    .and_then(|q| order::check_quantity(i32::try_from(q).unwrap_or(0)).err()),
                "unit_price_minor" => present(name)
                    .and_then(Value::as_i64)
                    .and_then(|p| order::check_unit_price(p).err()),
                "currency" => present(name)
                    .and_then(Value::as_str)
                    .filter(|c| c.parse::<tidemark_domain::Currency>().is_err())
                    .map(|_| currency_violation()),
                text => present(name)
                    .and_then(Value::as_str)
                    .and_then(|t| order::check_text(text, t).err()),
            };
            found.extend(checked.map(|violation| Violation {
                field: at,
                ..violation
            }));
        }
    };
    check(object, "", &["user_id", "city"]);
    let line_names = ["product_id", "category", "quantity", "unit_price_minor"];
    match object.get("items").and_then(Value::as_array) {
        Some(items) => {
            for (i, item) in items.iter().enumerate() {
                if let Some(line) = item.as_object() {
                    check(line, &format!("items/{i}/"), &line_names);
                }
            }
        }
        None => check(object, "", &line_names),
    }
    check(object, "", &["currency"]);
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

    fn basket_json(id: u128) -> Value {
        serde_json::json!({
            "order_id": Uuid::from_u128(id),
            "user_id": "u-1", "city": "Berlin", "currency": "KWD",
            "created_at": "2026-11-21T10:00:00Z",
            "items": [
                {"product_id": "p-1", "category": "books", "quantity": 2, "unit_price_minor": 1250},
                {"product_id": "p-2", "category": "books", "quantity": 1, "unit_price_minor": 3990},
                {"product_id": "p-3", "category": "games", "quantity": 4, "unit_price_minor": 10}
            ]
        })
    }

    #[test]
    fn a_basket_is_one_order_of_its_lines() {
        let body = serde_json::to_vec(&serde_json::json!([basket_json(1), order_json(2)])).unwrap();
        let d = run(Format::Json, &body).unwrap();
        let basket = d.items[0].as_ref().unwrap();
        assert_eq!(basket.lines.len(), 3);
        assert_eq!((basket.revenue_minor(), basket.items()), (6_530, 7));
        assert_eq!(d.items[1].as_ref().unwrap().lines.len(), 1);
    }

    #[test]
    fn a_bad_line_is_named_by_its_index() {
        let mut bad = basket_json(1);
        bad["items"][1]["quantity"] = 0.into();
        bad["items"][2]["product_id"] = "p-1".into();
        let d = run(Format::Json, &serde_json::to_vec(&bad).unwrap()).unwrap();
        let errs = d.items[0].as_ref().unwrap_err();
        let fields: Vec<_> = errs
            .iter()
            .map(|v| (v.field.as_str(), v.code.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("items/1/quantity", "out_of_range"),
                ("items/2/product_id", "duplicate")
            ]
        );

        let mut mistyped = basket_json(2);
        mistyped["items"][0]["unit_price_minor"] = "12.50".into();
        mistyped["items"][2]["colour"] = "red".into();
        mistyped["quantity"] = 1.into();
        let d = run(Format::Json, &serde_json::to_vec(&mistyped).unwrap()).unwrap();
        let errs = d.items[0].as_ref().unwrap_err();
        let fields: Vec<_> = errs
            .iter()
            .map(|v| (v.field.as_str(), v.code.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("items", "conflict"),
                ("items/0/unit_price_minor", "type"),
                ("items/2/colour", "unknown_field")
            ]
        );

        let mut empty = basket_json(3);
        empty["items"] = serde_json::json!([]);
        let d = run(Format::Json, &serde_json::to_vec(&empty).unwrap()).unwrap();
        assert_eq!(d.items[0].as_ref().unwrap_err()[0].field, "items");
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
