//! Partial answers: REST's `fields` names the fields of each point an app wants,
//! as a GraphQL query selects them.
//!
//! A dashboard that draws revenue per hour needs three of a point's eighteen
//! fields; the whole point is about four times the bytes, and `buyers` is the
//! dearest part of a computation (a distinct count over the batch view's users).
//! An answer asked without `buyers` (REST without it in `fields`, GraphQL without
//! it in the selection) is computed without counting them; the other fields are
//! the same values the whole answer holds (one computation of them, shared by
//! both doors through [`crate::query::revenue`]).

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde::ser::{SerializeMap, SerializeSeq, Serializer};

use crate::query::{Errors, Point, RevenueSeries};

/// Every field of a [`Point`] by its JSON name, in the order an answer gives them.
pub const POINT_FIELDS: [&str; 18] = [
    "bucket",
    "local_bucket",
    "group",
    "dimensions",
    "currency",
    "revenue_minor",
    "revenue",
    "orders",
    "items",
    "average_order_value_minor",
    "buyers",
    "gross_revenue_minor",
    "refunded_minor",
    "net_revenue_minor",
    "net_revenue",
    "refunded_items",
    "cancelled_orders",
    "net_average_order_value_minor",
];

const BUYERS: usize = 10;

/// Which fields of each point an answer holds (a set of [`POINT_FIELDS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PointFields(u32);

impl Default for PointFields {
    fn default() -> Self {
        Self::ALL
    }
}

impl PointFields {
    pub const ALL: PointFields = PointFields((1 << POINT_FIELDS.len()) - 1);

    fn has(self, index: usize) -> bool {
        self.0 & (1 << index) != 0
    }

    /// Whether the answer counts unique buyers.
    pub fn buyers(self) -> bool {
        self.has(BUYERS)
    }

    /// The same fields but `buyers` (a GraphQL selection without it).
    #[must_use]
    pub fn without_buyers(self) -> PointFields {
        PointFields(self.0 & !(1 << BUYERS))
    }

    /// About the bytes of the JSON of `points` points with these fields: a
    /// buffer's first size (a date and time, a decimal or a pair of dimensions
    /// with its name is 20–60 bytes).
    pub fn json_bytes(self, points: usize) -> usize {
        let per_point = 2 + 40 * self.0.count_ones() as usize;
        points.saturating_mul(per_point)
    }

    /// `fields`: field names of [`POINT_FIELDS`], comma-separated, each at most
    /// once; absent, every field.
    pub fn parse(raw: Option<&str>, errors: &mut Errors) -> PointFields {
        let Some(raw) = raw else {
            return PointFields::ALL;
        };
        let mut fields = 0u32;
        for name in raw.split(',').map(str::trim) {
            match POINT_FIELDS.iter().position(|f| *f == name) {
                Some(i) if fields & (1 << i) != 0 => {
                    errors.add("fields", "duplicate", format!("names {name} twice"));
                }
                Some(i) => fields |= 1 << i,
                None => {
                    let shown: String = name.chars().take(40).collect();
                    errors.add(
                        "fields",
                        "invalid",
                        format!(
                            "`{shown}` is not a field of a point; the fields are {}",
                            POINT_FIELDS.join(", ")
                        ),
                    );
                }
            }
        }
        PointFields(fields)
    }
}

/// A point with only some of its fields, serialised as the whole point would
/// be with the others left out; its bucket's time already written as text.
struct SelectedPoint<'a>(&'a Point, PointFields, &'a str);

impl Serialize for SelectedPoint<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let (p, fields, bucket) = (self.0, self.1, self.2);
        let mut map = serializer.serialize_map(None)?;
        // Each field by its index in `POINT_FIELDS`, if asked.
        macro_rules! entries {
            ($($index:expr => $value:expr),* $(,)?) => {
                $(if fields.has($index) {
                    map.serialize_entry(POINT_FIELDS[$index], $value)?;
                })*
            };
        }
        entries!(0 => bucket, 1 => &p.local_bucket, 2 => &p.group);
        if let Some(dimensions) = &p.dimensions {
            entries!(3 => dimensions);
        }
        let net = &p.net;
        entries!(
            4 => &p.currency,
            5 => &p.revenue_minor,
            6 => &p.revenue,
            7 => &p.orders,
            8 => &p.items,
            9 => &p.average_order_value_minor,
            BUYERS => &p.buyers,
            11 => &net.gross_revenue_minor,
            12 => &net.refunded_minor,
            13 => &net.net_revenue_minor,
            14 => &net.net_revenue,
            15 => &net.refunded_items,
            16 => &net.cancelled_orders,
            17 => &net.net_average_order_value_minor,
        );
        map.end()
    }
}

/// Points with only some of their fields, as a JSON array.
pub struct SelectedPoints<'a>(pub &'a [Point], pub PointFields);

impl Serialize for SelectedPoints<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        // A bucket's points come one after another: its time is written as text
        // once for them (as chrono's `Serialize` writes it), not once per point.
        let mut shown: Option<(DateTime<Utc>, String)> = None;
        for p in self.0 {
            if shown.as_ref().is_none_or(|(at, _)| *at != p.bucket) {
                let text = p.bucket.to_rfc3339_opts(SecondsFormat::AutoSi, true);
                shown = Some((p.bucket, text));
            }
            let bucket = shown.as_ref().map_or("", |(_, text)| text.as_str());
            seq.serialize_element(&SelectedPoint(p, self.1, bucket))?;
        }
        seq.end()
    }
}

/// A revenue series as REST sends it: every field of its envelope, and of each
/// point the fields asked.
pub struct RestSeries {
    pub series: RevenueSeries,
    pub fields: PointFields,
}

impl RestSeries {
    /// About the bytes of its JSON: the points' (made already, or as their
    /// estimate) and the envelope's.
    pub fn json_bytes(&self) -> usize {
        let points = self.series.points.json(self.fields).map_or_else(
            || self.fields.json_bytes(self.series.points.list().len()),
            <[u8]>::len,
        );
        points + 2048
    }

    /// Its JSON, written as [`RevenueSeries`]' with only `fields` of each point:
    /// the envelope's fields before and after the points, and between them the
    /// points' JSON made once per points (see [`crate::query::Points::json`]),
    /// copied into every answer stating them — whose freshness moves with the
    /// data while they stay the same.
    pub fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        let s = &self.series;
        let head = Head {
            granularity: &s.granularity,
            group_by: &s.group_by,
            tz: &s.tz,
            report_currency: &s.report_currency,
            from: &s.from,
            to: &s.to,
        };
        serde_json::to_writer(&mut *out, &head)?;
        // `{…}` open again for the points; then the rest's `{…}` as `,…}`.
        let closed = out.pop();
        debug_assert_eq!(closed, Some(b'}'));
        out.extend_from_slice(br#","points":"#);
        match s.points.json(self.fields) {
            Some(json) => out.extend_from_slice(json),
            None => {
                let points = SelectedPoints(s.points.list(), self.fields);
                serde_json::to_writer(&mut *out, &points)?;
            }
        }
        let tail = out.len();
        let rest = Tail {
            currencies: &s.currencies,
            partial: s.partial,
            missing: &s.missing,
            freshness: &s.freshness,
        };
        serde_json::to_writer(&mut *out, &rest)?;
        debug_assert_eq!(out[tail], b'{');
        out[tail] = b',';
        Ok(())
    }
}

/// [`RevenueSeries`]' fields before its points, in its order (a test holds
/// them together).
#[derive(Serialize)]
struct Head<'a> {
    granularity: &'a str,
    group_by: &'a Option<String>,
    tz: &'a str,
    report_currency: &'a Option<String>,
    from: &'a DateTime<Utc>,
    to: &'a DateTime<Utc>,
}

/// [`RevenueSeries`]' fields after its points, in its order.
#[derive(Serialize)]
struct Tail<'a> {
    currencies: &'a [crate::query::CurrencyInfo],
    partial: bool,
    missing: &'a [String],
    freshness: &'a crate::views::Freshness,
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;
    use std::sync::Arc;

    use crate::query::{CurrencyInfo, Dimensions, Net, Points};
    use crate::views::Freshness;

    fn point(dimensions: Option<Dimensions>, buyers: Option<i64>) -> Point {
        Point {
            bucket: Utc.timestamp_opt(1_764_547_200, 0).unwrap(),
            local_bucket: "2025-12-01T05:30:00+05:30".into(),
            group: dimensions.as_ref().and_then(|d| d.city.clone()),
            dimensions,
            currency: "EUR".into(),
            revenue_minor: 1299,
            revenue: "12.99".into(),
            orders: 2,
            items: 3,
            average_order_value_minor: 650,
            buyers,
            net: Net {
                gross_revenue_minor: 1299,
                refunded_minor: 299,
                net_revenue_minor: 1000,
                net_revenue: "10.00".into(),
                refunded_items: 1,
                cancelled_orders: 0,
                net_average_order_value_minor: 500,
            },
        }
    }

    fn series() -> RevenueSeries {
        let berlin = Dimensions {
            city: Some("Berlin".into()),
            ..Dimensions::default()
        };
        RevenueSeries {
            granularity: "hour".into(),
            group_by: Some("city".into()),
            tz: "Asia/Kolkata".into(),
            report_currency: None,
            from: Utc.timestamp_opt(1_764_547_200, 0).unwrap(),
            to: Utc.timestamp_opt(1_764_633_600, 0).unwrap(),
            points: Arc::new(Points::new(vec![
                point(Some(berlin), Some(2)),
                point(None, None),
            ])),
            currencies: vec![CurrencyInfo {
                code: "EUR".into(),
                exponent: 2,
            }],
            partial: false,
            missing: Vec::new(),
            freshness: Freshness {
                batch: None,
                speed: None,
                as_of: Utc.timestamp_opt(1_764_633_000, 0).unwrap(),
            },
        }
    }

    fn parse(raw: Option<&str>) -> (PointFields, usize) {
        let mut errors = Errors::default();
        let fields = PointFields::parse(raw, &mut errors);
        (fields, errors.finish().err().map_or(0, |p| p.errors.len()))
    }

    fn json(series: RevenueSeries, fields: PointFields) -> String {
        let mut out = Vec::new();
        RestSeries { series, fields }.write_json(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn every_field_named_is_the_whole_answer_byte_for_byte() {
        // Points of two buckets, one of them off the second (each bucket's time
        // is written once for its points).
        let mut s = series();
        let mut points = s.points.list().to_vec();
        let mut later = points[1].clone();
        later.bucket = Utc.timestamp_opt(1_764_550_800, 123_000_000).unwrap();
        points.push(later);
        s.points = Arc::new(Points::new(points));
        let whole = serde_json::to_string(&s).unwrap();
        assert!(whole.contains(r#""bucket":"2025-12-01T01:00:00.123Z""#));
        let (all, errors) = parse(Some(&POINT_FIELDS.join(",")));
        assert_eq!((all, errors), (PointFields::ALL, 0));
        assert_eq!(parse(None), (PointFields::ALL, 0));
        // Through the selecting serialiser, every field given: the same bytes,
        // so POINT_FIELDS and the envelope follow Point and RevenueSeries —
        // made afresh, and from the points' kept JSON.
        assert_eq!(json(s.clone(), PointFields::ALL), whole);
        assert!(s.points.json(PointFields::ALL).is_some());
        assert_eq!(json(s.clone(), PointFields::ALL), whole);
        // With nothing missing and with something missing (the envelope's
        // optional fields both ways).
        let mut partial = s.clone();
        partial.partial = true;
        partial.missing = vec!["speed".into()];
        partial.report_currency = Some("EUR".into());
        partial.group_by = None;
        let whole = serde_json::to_string(&partial).unwrap();
        assert_eq!(json(partial, PointFields::ALL), whole);
    }

    #[test]
    fn a_point_holds_the_fields_named_in_its_own_order() {
        let (fields, errors) = parse(Some("net_revenue_minor, bucket,dimensions"));
        assert_eq!(errors, 0);
        assert!(!fields.buyers());
        let text = json(series(), fields);
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let points = value["points"].as_array().unwrap();
        assert_eq!(
            points[0],
            serde_json::json!({
                "bucket": "2025-12-01T00:00:00Z",
                "dimensions": { "city": "Berlin" },
                "net_revenue_minor": 1000,
            })
        );
        // A point without dimensions (no grouping) has none to show.
        assert_eq!(
            points[1],
            serde_json::json!({ "bucket": "2025-12-01T00:00:00Z", "net_revenue_minor": 1000 })
        );
        assert!(
            text.contains(r#"{"bucket":"2025-12-01T00:00:00Z","dimensions":"#),
            "{text}"
        );
        assert_eq!(value["tz"], "Asia/Kolkata", "the envelope stays whole");
        assert!(value["freshness"]["as_of"].is_string());
        let (fields, _) = parse(Some("buyers"));
        assert!(fields.buyers());
        assert!(!PointFields::ALL.without_buyers().buyers());
    }

    #[test]
    fn points_json_is_made_once_and_sent_with_each_answers_own_envelope() {
        let (fields, _) = parse(Some("bucket,buyers"));
        let first = series();
        let points = first.points.clone();
        assert!(json(first, fields).contains(r#""buyers":2"#));
        assert!(points.json(fields).is_some(), "kept with the points");
        // A later answer stating the same points at a newer position: the kept
        // JSON inside its own envelope, byte for byte what is made afresh.
        let later = |points: Arc<Points>| {
            let mut s = series();
            s.points = points;
            s.freshness.as_of = Utc.timestamp_opt(1_764_640_000, 0).unwrap();
            s
        };
        let fresh = Arc::new(Points::new(series().points.list().to_vec()));
        let sent = json(later(points.clone()), fields);
        assert_eq!(sent, json(later(fresh), fields));
        assert!(sent.contains("2025-12-02T01:46:40Z"), "{sent}");
        // Other fields of the same points are not taken from it.
        assert!(points.json(PointFields::ALL).is_none());
        let whole = json(later(points.clone()), PointFields::ALL);
        assert_eq!(whole, serde_json::to_string(&later(points)).unwrap());
        assert!(whole.contains(r#""revenue":"12.99""#));
    }

    #[test]
    fn an_answer_s_json_fits_the_buffer_sized_for_it() {
        let two_dimensions = || Dimensions {
            city: Some("Berlin".into()),
            category: Some("electronics".into()),
            ..Dimensions::default()
        };
        for raw in [
            None,
            Some("bucket,dimensions,net_revenue,buyers"),
            Some("bucket"),
        ] {
            let (fields, _) = parse(raw);
            let points: Vec<Point> = (0..100)
                .map(|_| point(Some(two_dimensions()), Some(12_345)))
                .collect();
            let list = SelectedPoints(&points, fields);
            let made = serde_json::to_vec(&list).unwrap().len();
            let sized = fields.json_bytes(points.len());
            // Written without growing, and not many times too large.
            assert!(made <= sized, "{raw:?}: {made} > {sized}");
            assert!(sized <= 3 * made, "{raw:?}: {sized} for {made}");
            let mut series = series();
            series.points = Arc::new(Points::new(points));
            let rest = RestSeries { series, fields };
            let mut whole = Vec::new();
            rest.write_json(&mut whole).unwrap();
            assert!(whole.len() <= rest.json_bytes(), "{raw:?}: {}", whole.len());
        }
    }

    #[test]
    fn unknown_and_repeated_fields_are_errors() {
        assert_eq!(parse(Some("bucket,nope")).1, 1);
        assert_eq!(parse(Some("bucket,bucket")).1, 1);
        assert_eq!(parse(Some("")).1, 1, "no field at all");
        assert_eq!(parse(Some("bucket,,orders")).1, 1, "an empty name");
        assert_eq!(parse(Some("Bucket")).1, 1, "names are exact");
    }
}
