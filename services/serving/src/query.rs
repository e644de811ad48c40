//! What REST and GraphQL share: request validation with field-level errors, the
//! revenue and summary answers, and their response shapes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde::Serialize;
use tidemark_domain::money::decimal;
use tidemark_domain::order::MAX_TEXT_CHARS;
use tidemark_domain::{Attribute, Basis, Currency, Dimension, Granularity, Totals};
use tidemark_platform::problem::{FieldError, Problem, ProblemKind};

use crate::config::ServingSettings;
use crate::fields::PointFields;
use crate::local::{self, Buckets, LocalBuckets};
use crate::views::{Freshness, Merged, Part, Read, ViewError, Views};

/// A validated revenue question: REST's query parameters and GraphQL's arguments
/// both become one of these, through [`revenue_request`].
#[derive(Clone, Debug, PartialEq)]
pub struct RevenueRequest {
    /// Inclusive start (UTC), the start of a local bucket.
    pub from: i64,
    /// Exclusive end (UTC), the start of a local bucket.
    pub to: i64,
    pub granularity: Granularity,
    /// The zone whose local time the buckets follow.
    pub zone: Tz,
    /// Up to two attributes, in the order asked.
    pub group_by: Vec<Attribute>,
    /// Only these values of each attribute (values sorted, each attribute once).
    pub filters: Vec<(Attribute, Vec<String>)>,
    pub currency: Option<Currency>,
    /// Convert every amount to this currency (see [`crate::fx`]).
    pub report_currency: Option<Currency>,
    /// Which time refunds and cancellations count at.
    pub basis: Basis,
    pub allow_partial: bool,
    /// The fields of each point asked (REST's `fields`; GraphQL's selection
    /// decides whether buyers are counted): see [`crate::fields`].
    pub fields: PointFields,
}

impl RevenueRequest {
    /// The stored shape the answer is summed from.
    pub fn shape(&self) -> Dimension {
        let named: Vec<Attribute> = self
            .group_by
            .iter()
            .copied()
            .chain(self.filters.iter().map(|(a, _)| *a))
            .collect();
        Dimension::covering(&named)
    }

    fn local(&self) -> LocalBuckets {
        LocalBuckets::new(self.zone, self.granularity)
    }
}

/// The values of the attributes an answer is grouped by.
#[derive(
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Serialize,
    utoipa::ToSchema,
    async_graphql::SimpleObject,
)]
pub struct Dimensions {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub city: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub category: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub product: Option<Arc<str>>,
}

impl Dimensions {
    fn of(group_by: &[Attribute], values: &[String]) -> Self {
        let mut out = Dimensions::default();
        for (a, v) in group_by.iter().zip(values) {
            *out.slot(*a) = Some(Arc::from(v.as_str()));
        }
        out
    }

    fn slot(&mut self, a: Attribute) -> &mut Option<Arc<str>> {
        match a {
            Attribute::City => &mut self.city,
            Attribute::Category => &mut self.category,
            Attribute::Product => &mut self.product,
        }
    }
}

/// Gross, refunded and net revenue of a cell or total, on the question's basis
/// (part of every point, total and top entry). `revenue_minor` beside it stays
/// the gross revenue, as before refunds existed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema, async_graphql::SimpleObject)]
pub struct Net {
    /// Revenue of the orders, before refunds (equals `revenue_minor`).
    pub gross_revenue_minor: i64,
    /// Refunds counted here on the basis: at their own time (`booking_time`) or
    /// at their order's time, place and products (`order_time`).
    pub refunded_minor: i64,
    /// Gross less refunded: negative where refunds outweigh that bucket's sales.
    pub net_revenue_minor: i64,
    /// Net revenue in major units, exact (see `revenue`).
    pub net_revenue: String,
    /// Units given back.
    pub refunded_items: i64,
    /// Orders cancelled, counted like `orders` (once per value the order holds).
    pub cancelled_orders: i64,
    /// Net revenue per order in minor units, rounded half away from zero (0 without
    /// orders).
    pub net_average_order_value_minor: i64,
}

impl Net {
    pub fn of(t: &Totals, basis: Basis, currency: Currency) -> Self {
        let corrections = t.corrections(basis);
        let net = t.net_revenue_minor(basis);
        Net {
            gross_revenue_minor: t.revenue_minor,
            refunded_minor: corrections.refunded_minor,
            net_revenue_minor: net,
            net_revenue: decimal(net, currency),
            refunded_items: corrections.refunded_items,
            cancelled_orders: corrections.cancelled_orders,
            net_average_order_value_minor: per_order(net, t.orders),
        }
    }
}

/// One cell of a revenue series (REST with `fields`: only the fields named).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema, async_graphql::SimpleObject)]
pub struct Point {
    /// Bucket start (UTC).
    pub bucket: DateTime<Utc>,
    /// The same instant in the question's zone, with its offset
    /// (`2026-11-21T00:00:00+05:30`): a repeated hour shows its two offsets.
    #[schema(value_type = String)]
    pub local_bucket: Arc<str>,
    /// The value when grouped by one dimension.
    #[schema(value_type = Option<String>)]
    pub group: Option<Arc<str>>,
    /// The value of each dimension grouped by (absent without `group_by`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<Dimensions>,
    #[schema(value_type = String)]
    pub currency: Arc<str>,
    pub revenue_minor: i64,
    /// The same revenue in major units, exact, by the currency's exponent
    /// (`1299` → `"12.99"` EUR, `"1299"` JPY, `"1.299"` KWD).
    pub revenue: String,
    pub orders: i64,
    pub items: i64,
    /// Gross revenue per order in minor units, rounded half up.
    pub average_order_value_minor: i64,
    /// Distinct users who placed orders here (exact; with `report_currency`
    /// across currencies). Null when a store was down and the answer is partial.
    pub buyers: Option<i64>,
    #[serde(flatten)]
    #[graphql(flatten)]
    pub net: Net,
}

/// A currency of an answer and its ISO 4217 minor-unit exponent: an amount in
/// minor units divided by 10^exponent is the amount in major units.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema, async_graphql::SimpleObject)]
pub struct CurrencyInfo {
    pub code: String,
    pub exponent: u8,
}

/// The currencies of `codes`, each once, in order.
fn currency_infos<'a>(codes: impl IntoIterator<Item = &'a Currency>) -> Vec<CurrencyInfo> {
    let codes: std::collections::BTreeSet<&Currency> = codes.into_iter().collect();
    codes
        .into_iter()
        .map(|c| CurrencyInfo {
            code: c.to_string(),
            exponent: c.exponent(),
        })
        .collect()
}

/// A revenue time series (sparse: buckets without orders are omitted).
#[derive(Clone, Debug, Serialize, utoipa::ToSchema, async_graphql::SimpleObject)]
#[graphql(complex)]
pub struct RevenueSeries {
    pub granularity: String,
    /// The dimensions grouped by, comma-separated (`city,category`).
    pub group_by: Option<String>,
    /// The IANA zone the buckets follow.
    pub tz: String,
    /// The currency every amount was converted to, if asked.
    pub report_currency: Option<String>,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// The points, in bucket and group order (GraphQL: [`RevenueSeries::points`]).
    #[schema(value_type = Vec<Point>)]
    #[graphql(skip)]
    pub points: Arc<Points>,
    /// The currencies of the points, with their exponents.
    pub currencies: Vec<CurrencyInfo>,
    /// True when a store was down and `allow_partial` asked for what was available.
    pub partial: bool,
    pub missing: Vec<String>,
    pub freshness: Freshness,
}

#[async_graphql::ComplexObject]
impl RevenueSeries {
    /// The points, in bucket and group order.
    async fn points(&self) -> &[Point] {
        &self.points.list
    }
}

/// An answer's points, and their JSON once REST has sent them: made once per
/// question while its cells and buyers stay the same (see [`MadePoints`]).
#[derive(Debug)]
pub struct Points {
    list: Vec<Point>,
    /// The points' JSON with the fields it was made with (see
    /// [`crate::fields`]); `None` inside if it could not be made.
    json: OnceLock<(PointFields, Option<Vec<u8>>)>,
}

impl Points {
    pub fn new(list: Vec<Point>) -> Points {
        Points {
            list,
            json: OnceLock::new(),
        }
    }

    pub fn list(&self) -> &[Point] {
        &self.list
    }

    /// The points' JSON array with `fields` of each, made the first time it is
    /// asked and kept; `None` when first made with other fields (the points of
    /// one question are sent with the fields it asks).
    ///
    /// Kept as the bytes serde_json wrote, spliced into each answer's envelope
    /// by [`crate::fields::RestSeries::write_json`]: as a `RawValue` they were
    /// checked as UTF-8 and parsed again as JSON, ~4 % of serving's CPU on
    /// distinct questions (profiled).
    pub fn json(&self, fields: PointFields) -> Option<&[u8]> {
        let (made_with, json) = self.json.get_or_init(|| {
            let selected = crate::fields::SelectedPoints(&self.list, fields);
            // Written into a buffer sized once: grown by doubling from empty, a
            // 30-day answer's 0.9 MB was copied a dozen times into fresh pages.
            let mut out = Vec::with_capacity(fields.json_bytes(self.list.len()));
            let json = serde_json::to_writer(&mut out, &selected)
                .ok()
                .map(|()| out);
            (fields, json)
        });
        (*made_with == fields).then_some(json.as_deref()).flatten()
    }

    /// About how much memory the points hold, counting their JSON as large as
    /// them (the JSON of every field is about that; of fewer, less).
    fn bytes(&self) -> usize {
        // A bucket's local time, a group's values and a currency are shared by
        // their points: counted with each (at most the points' own strings again).
        let strings = |p: &Point| {
            let dimensions = p.dimensions.as_ref().map_or(0, |d| {
                [&d.city, &d.category, &d.product]
                    .into_iter()
                    .flatten()
                    .map(|v| v.len())
                    .sum()
            });
            p.local_bucket.len()
                + p.group.as_ref().map_or(0, |g| g.len())
                + dimensions
                + p.currency.len()
                + p.revenue.capacity()
                + p.net.net_revenue.capacity()
        };
        2 * self
            .list
            .iter()
            .map(|p| size_of::<Point>() + strings(p))
            .sum::<usize>()
    }
}

/// The whole points (every field).
impl Serialize for Points {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.list.serialize(serializer)
    }
}

/// An answer's points kept with what they were made of: the same question
/// (zone, granularity, grouping, basis) over the same cells with the same
/// buyers has the same points.
pub struct MadePoints {
    cells: Arc<Answer>,
    buyers: Option<crate::buyers::Buyers>,
    points: Arc<Points>,
}

impl MadePoints {
    /// About how much memory it holds (cells and buyers as
    /// [`answer_bytes`] counts, the points as [`Points`] does).
    pub fn bytes(&self) -> usize {
        let buyers = self.buyers.as_ref().map_or(0, |b| {
            b.keys()
                .map(|(_, values, _)| cell_bytes(values) + size_of::<i64>())
                .sum()
        });
        answer_bytes(&self.cells) + buyers + self.points.bytes()
    }

    fn made_of(&self, cells: &Arc<Answer>, buyers: &Option<crate::buyers::Buyers>) -> bool {
        (Arc::ptr_eq(&self.cells, cells) || self.cells == *cells) && self.buyers == *buyers
    }
}

/// About how much memory an answer's cells hold.
pub fn answer_bytes(answer: &Answer) -> usize {
    answer
        .iter()
        .map(|((_, values, _), _)| cell_bytes(values) + size_of::<Totals>())
        .sum()
}

/// About how much memory a cell's key holds in a map.
fn cell_bytes(values: &[String]) -> usize {
    size_of::<(i64, Vec<String>, Currency)>()
        + 16
        + values
            .iter()
            .map(|v| size_of::<String>() + v.capacity())
            .sum::<usize>()
}

/// Totals of one currency.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema, async_graphql::SimpleObject)]
pub struct CurrencyTotals {
    pub currency: String,
    /// Distinct users who placed orders (null when a store was down).
    pub buyers: Option<i64>,
    pub revenue_minor: i64,
    /// The same revenue in major units, exact (see `Point.revenue`).
    pub revenue: String,
    pub orders: i64,
    pub items: i64,
    pub average_order_value_minor: i64,
    #[serde(flatten)]
    #[graphql(flatten)]
    pub net: Net,
}

/// One of the top groups, by gross revenue within its currency.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema, async_graphql::SimpleObject)]
pub struct TopEntry {
    /// The group's value; with two dimensions their values as a list parameter
    /// (`Berlin,books`, commas in a value escaped as `\,`).
    pub group: String,
    /// The value of each dimension of `top_by`.
    pub dimensions: Dimensions,
    /// Distinct users who placed orders in the group (null when a store was down).
    /// `other` has none: distinct users do not add up over groups.
    pub buyers: Option<i64>,
    pub currency: String,
    pub revenue_minor: i64,
    /// The same revenue in major units, exact (see `Point.revenue`).
    pub revenue: String,
    pub orders: i64,
    pub items: i64,
    pub average_order_value_minor: i64,
    #[serde(flatten)]
    #[graphql(flatten)]
    pub net: Net,
}

/// The groups after the top ones, summed (per currency): with the top entries
/// they add up to the sum over every group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema, async_graphql::SimpleObject)]
pub struct OtherEntry {
    pub currency: String,
    /// How many groups are summed here.
    pub groups: i64,
    pub revenue_minor: i64,
    pub revenue: String,
    pub orders: i64,
    pub items: i64,
    pub average_order_value_minor: i64,
    #[serde(flatten)]
    #[graphql(flatten)]
    pub net: Net,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema, async_graphql::SimpleObject)]
pub struct Summary {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub totals: Vec<CurrencyTotals>,
    /// The currencies of the totals, with their exponents.
    pub currencies: Vec<CurrencyInfo>,
    /// The currency every amount was converted to, if asked.
    pub report_currency: Option<String>,
    /// The dimensions of the top groups, comma-separated.
    pub top_by: String,
    pub top: Vec<TopEntry>,
    /// Per currency with more groups than `top`, the rest summed.
    pub other: Vec<OtherEntry>,
    pub partial: bool,
    pub missing: Vec<String>,
    pub freshness: Freshness,
}

/// Whether a cell has anything to show on `basis` (a cell may hold only the other
/// basis's corrections).
fn shown(t: &Totals, basis: Basis) -> bool {
    t.revenue_minor != 0
        || t.orders != 0
        || t.items != 0
        || t.corrections(basis) != tidemark_domain::Corrections::default()
}

fn aov(t: &Totals) -> i64 {
    per_order(t.revenue_minor, t.orders)
}

/// `amount / orders` rounded half away from zero; 0 without orders.
pub(crate) fn per_order(amount: i64, orders: i64) -> i64 {
    if orders == 0 {
        0
    } else {
        let half = if amount < 0 { -orders } else { orders };
        (2 * amount + half) / (2 * orders)
    }
}

fn at(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(secs, 0).single().unwrap_or_default()
}

/// Collects field errors, then fails with all of them at once.
#[derive(Default)]
pub struct Errors(Vec<FieldError>);

impl Errors {
    pub fn add(&mut self, field: &str, code: &str, detail: impl Into<String>) {
        self.0.push(FieldError {
            pointer: field.to_owned(),
            code: code.to_owned(),
            detail: detail.into(),
        });
    }

    pub fn finish(self) -> Result<(), Problem> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Problem::new(ProblemKind::Validation)
                .detail("Some parameters are invalid.")
                .errors(self.0))
        }
    }
}

/// A required time parameter (see [`local::parse_time`]).
fn parse_time(raw: Option<&str>, zone: Tz, field: &str, errors: &mut Errors) -> Option<i64> {
    let Some(raw) = raw else {
        errors.add(
            field,
            "required",
            "is required (RFC 3339, e.g. 2026-11-21T00:00:00Z or 2026-11-21T00:00:00+05:30, \
             or a local date and time in `tz`)",
        );
        return None;
    };
    let parsed = local::parse_time(raw, zone);
    if parsed.is_none() {
        errors.add(
            field,
            "invalid",
            "must be an RFC 3339 time (2026-11-21T00:00:00Z, 2026-11-21T00:00:00+05:30) or a \
             local date and time in `tz` (2026-11-21T00:00:00, 2026-11-21)",
        );
    }
    parsed
}

/// `basis`: `booking_time` (the default) or `order_time`.
pub fn parse_basis(raw: Option<&str>, errors: &mut Errors) -> Basis {
    match raw.map(str::parse::<Basis>) {
        None => Basis::default(),
        Some(Ok(basis)) => basis,
        Some(Err(e)) => {
            errors.add("basis", "invalid", e);
            Basis::default()
        }
    }
}

/// `tz`: an IANA zone name (default `UTC`).
pub fn parse_zone(raw: Option<&str>, errors: &mut Errors) -> Tz {
    match raw {
        None => Tz::UTC,
        Some(name) => name.parse::<Tz>().unwrap_or_else(|_| {
            let shown: String = name.chars().take(64).collect();
            errors.add(
                "tz",
                "unknown_zone",
                format!(
                    "`{shown}` is not an IANA time zone (e.g. Europe/Berlin, Asia/Kolkata, UTC)"
                ),
            );
            Tz::UTC
        }),
    }
}

/// Splits a list parameter on commas; `\,` is a comma inside a value and `\\` a
/// backslash.
pub fn split_list(raw: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    out.last_mut().expect("one").push(next);
                }
            }
            ',' => out.push(String::new()),
            c => out.last_mut().expect("one").push(c),
        }
    }
    out
}

/// Joins values into a list parameter ([`split_list`]'s inverse).
pub fn join_list<S: AsRef<str>>(values: &[S]) -> String {
    values
        .iter()
        .map(|v| v.as_ref().replace('\\', r"\\").replace(',', r"\,"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Most attributes a question groups by.
pub const MAX_GROUPS: usize = 2;

/// `group_by` (or `top_by`): one or two distinct dimensions, comma-separated.
fn parse_group_by(field: &str, raw: &str, errors: &mut Errors) -> Vec<Attribute> {
    let mut out = Vec::new();
    let names = split_list(raw);
    if names.len() > MAX_GROUPS {
        errors.add(
            field,
            "too_many_dimensions",
            "group by at most two of city, category, product",
        );
        return out;
    }
    for name in names {
        match name.parse::<Attribute>() {
            Ok(a) if out.contains(&a) => {
                errors.add(field, "duplicate", format!("names {a} twice"));
            }
            Ok(a) => out.push(a),
            Err(_) => {
                let shown: String = name.chars().take(32).collect();
                errors.add(
                    field,
                    "invalid",
                    format!("`{shown}` is not a dimension: use city, category, product (one or two, comma-separated)"),
                );
            }
        }
    }
    out
}

/// The filters `city`, `category`, `product`: comma-separated values each.
fn parse_filters(
    get: &dyn Fn(&str) -> Option<String>,
    settings: &ServingSettings,
    errors: &mut Errors,
) -> Vec<(Attribute, Vec<String>)> {
    let mut out = Vec::new();
    for attribute in Attribute::ALL {
        let Some(raw) = get(attribute.as_str()) else {
            continue;
        };
        let field = attribute.as_str();
        let mut values = split_list(&raw);
        if values.len() > settings.max_filter_values {
            errors.add(
                field,
                "too_many_values",
                format!("at most {} values per filter", settings.max_filter_values),
            );
            continue;
        }
        let mut ok = true;
        for v in &values {
            if v.trim().is_empty() {
                errors.add(field, "invalid", "values must not be empty");
                ok = false;
            } else if v.chars().count() > MAX_TEXT_CHARS {
                errors.add(
                    field,
                    "too_long",
                    format!(
                        "values are at most {MAX_TEXT_CHARS} characters (no stored value is longer)"
                    ),
                );
                ok = false;
            }
        }
        if ok {
            values.sort_unstable();
            values.dedup();
            out.push((attribute, values));
        }
    }
    out
}

/// The parameters of `GET /v1/revenue`.
const REVENUE_PARAMS: [&str; 13] = [
    "from",
    "to",
    "granularity",
    "group_by",
    "city",
    "category",
    "product",
    "currency",
    "tz",
    "basis",
    "allow_partial",
    "report_currency",
    "fields",
];

fn unknown_params(params: &HashMap<String, String>, known: &[&str], errors: &mut Errors) {
    for name in params.keys() {
        if !known.contains(&name.as_str()) {
            let shown: String = name.chars().take(40).collect();
            errors.add(
                &shown,
                "unknown_parameter",
                "is not a parameter of this endpoint",
            );
        }
    }
}

fn parse_currency(raw: Option<&str>, field: &str, errors: &mut Errors) -> Option<Currency> {
    raw.and_then(|c| match c.parse::<Currency>() {
        Ok(c) => Some(c),
        Err(e) => {
            errors.add(field, "invalid", e.to_string());
            None
        }
    })
}

fn parse_allow_partial(raw: Option<&str>, errors: &mut Errors) -> bool {
    match raw {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => {
            errors.add("allow_partial", "invalid", "must be true or false");
            false
        }
    }
}

/// Validates a revenue question. `params` are the raw query parameters; unknown
/// ones are errors, so a misspelt filter does not silently widen the answer.
pub fn revenue_request(
    params: &HashMap<String, String>,
    settings: &ServingSettings,
) -> Result<RevenueRequest, Problem> {
    let mut errors = Errors::default();
    unknown_params(params, &REVENUE_PARAMS, &mut errors);
    let get = |k: &str| params.get(k).map(String::as_str);
    let report_currency = parse_currency(get("report_currency"), "report_currency", &mut errors);
    let granularity = match get("granularity").unwrap_or("hour").parse::<Granularity>() {
        Ok(g) => Some(g),
        Err(e) => {
            errors.add("granularity", "invalid", e.to_string());
            None
        }
    };
    let group_by =
        get("group_by").map_or_else(Vec::new, |g| parse_group_by("group_by", g, &mut errors));
    let filters = parse_filters(&|k| params.get(k).cloned(), settings, &mut errors);
    let currency = parse_currency(get("currency"), "currency", &mut errors);
    let basis = parse_basis(get("basis"), &mut errors);
    let allow_partial = parse_allow_partial(get("allow_partial"), &mut errors);
    let zone = parse_zone(get("tz"), &mut errors);
    let from = parse_time(get("from"), zone, "from", &mut errors);
    let to = parse_time(get("to"), zone, "to", &mut errors);
    let fields = PointFields::parse(get("fields"), &mut errors);
    let mut request = None;
    if let (Some(from), Some(to), Some(granularity)) = (from, to, granularity) {
        let local = LocalBuckets::new(zone, granularity);
        let from = local.start(from);
        let to = {
            let start = local.start(to);
            if start == to { to } else { local.next(start) }
        };
        if check_range(from, to, settings, &mut errors) {
            let mut points = 0;
            let mut at = from;
            while at < to && points <= settings.max_points {
                points += 1;
                at = local.next(at);
            }
            if points > settings.max_points {
                errors.add(
                    "granularity",
                    "too_many_points",
                    format!(
                        "the range has more than {} {granularity} buckets; at most {} per query",
                        settings.max_points, settings.max_points
                    ),
                );
            }
        }
        request = Some(RevenueRequest {
            from,
            to,
            granularity,
            zone,
            group_by,
            filters,
            currency,
            report_currency,
            basis,
            allow_partial,
            fields,
        });
    }
    errors.finish()?;
    request.ok_or_else(|| Problem::malformed("Invalid parameters."))
}

/// Whether `[from, to)` is a range a question may ask (`to` after `from`, at most
/// `max_range_days`); adds the error if not.
fn check_range(from: i64, to: i64, settings: &ServingSettings, errors: &mut Errors) -> bool {
    if to <= from {
        errors.add("to", "invalid", "must be after `from`");
        false
    } else if to - from > settings.max_range_days * 86_400 {
        errors.add(
            "to",
            "too_wide",
            format!(
                "the range may span at most {} days",
                settings.max_range_days
            ),
        );
        false
    } else {
        true
    }
}

/// The parameters of `/v1/revenue/by-residence`.
const RESIDENCE_PARAMS: [&str; 4] = ["from", "to", "tz", "currency"];

/// Validates a question of revenue by city of residence: `from`/`to` (the forms
/// of `/v1/revenue`, read in `tz`), at most `max_range_days` apart; `currency`.
pub fn residence_request(
    params: &HashMap<String, String>,
    settings: &ServingSettings,
) -> Result<crate::residence::ResidenceRequest, Problem> {
    let mut errors = Errors::default();
    unknown_params(params, &RESIDENCE_PARAMS, &mut errors);
    let get = |k: &str| params.get(k).map(String::as_str);
    let zone = parse_zone(get("tz"), &mut errors);
    let from = parse_time(get("from"), zone, "from", &mut errors);
    let to = parse_time(get("to"), zone, "to", &mut errors);
    let currency = parse_currency(get("currency"), "currency", &mut errors);
    if let (Some(from), Some(to)) = (from, to) {
        check_range(from, to, settings, &mut errors);
    }
    errors.finish()?;
    match (from, to) {
        (Some(from), Some(to)) => Ok(crate::residence::ResidenceRequest { from, to, currency }),
        _ => Err(Problem::malformed("Invalid parameters.")),
    }
}

/// The cells of an answer: (local bucket start, grouped values, currency), in
/// key order, each key once. A vector rather than a map: nothing looks a cell
/// up, and building a B-tree of a 30-day answer's thousands of cells was a
/// twentieth of serving's CPU on distinct questions (profiled). A group's
/// values are shared by its cells: a copy per cell was three allocations each.
pub type Answer = Vec<((i64, Arc<[String]>, Currency), Totals)>;

/// An answer being summed. A piece's grouped values are borrowed and numbered
/// when first seen (one hash lookup per piece), and the sums are kept by that
/// number: summing compares no strings, where a map ordered by the values
/// compared them a dozen times per piece (a fifth of serving's CPU on distinct
/// converted questions, profiled in `cargo xtask bench serving`). [`Sums::answer`]
/// orders the values once and copies them once per group, shared by its cells.
///
/// The batch view's pieces share a group's values ([`tidemark_batchview::cells`]):
/// values seen before at the same address have their number without being hashed
/// and compared again (borrowed for `'a`, memory at one address holds one value
/// throughout).
#[derive(Default)]
pub struct Sums<'a> {
    groups: foldhash::HashMap<&'a [String], u32>,
    by_address: foldhash::HashMap<(usize, usize), u32>,
    cells: foldhash::HashMap<(i64, u32, Currency), Totals>,
}

impl<'a> Sums<'a> {
    /// Room for `cells` cells at first: an answer has at most as many as the
    /// pieces it sums, and a map grown by doubling rehashed a 30-day answer's
    /// thousands of cells a dozen times.
    pub fn with_capacity(cells: usize) -> Self {
        Sums {
            groups: foldhash::HashMap::default(),
            by_address: foldhash::HashMap::default(),
            cells: foldhash::HashMap::with_capacity_and_hasher(cells, Default::default()),
        }
    }

    pub fn add(&mut self, bucket: i64, groups: &'a [String], currency: Currency, t: Totals) {
        let id = self.number(groups);
        self.add_numbered(bucket, id, currency, t);
    }

    /// The number of `groups`, given when first seen.
    pub fn number(&mut self, groups: &'a [String]) -> u32 {
        let address = (groups.as_ptr().addr(), groups.len());
        if let Some(id) = self.by_address.get(&address) {
            return *id;
        }
        let next = u32::try_from(self.groups.len()).expect("fewer groups than cells");
        let id = *self.groups.entry(groups).or_insert(next);
        self.by_address.insert(address, id);
        id
    }

    /// Adds to the cell of the groups numbered `id` ([`Sums::number`]).
    pub fn add_numbered(&mut self, bucket: i64, id: u32, currency: Currency, t: Totals) {
        self.cells.entry((bucket, id, currency)).or_default().add(t);
    }

    pub fn answer(self) -> Answer {
        // The groups in the values' order, and each number's place in it: cells
        // sorted by (bucket, place, currency) are in the answer's key order.
        let mut ordered: Vec<(&[String], u32)> = self.groups.into_iter().collect();
        ordered.sort_unstable();
        let mut place = vec![0; ordered.len()];
        for (at, (_, id)) in ordered.iter().enumerate() {
            place[*id as usize] = at;
        }
        // The keys sorted with each one's totals by index: sorting the totals
        // along (72 bytes each) moved four times the bytes.
        let mut totals: Vec<Totals> = Vec::with_capacity(self.cells.len());
        let mut keys: Vec<(i64, usize, Currency, u32)> = Vec::with_capacity(self.cells.len());
        for ((bucket, id, currency), t) in self.cells {
            let at = u32::try_from(totals.len()).expect("fewer cells than 2^32");
            keys.push((bucket, place[id as usize], currency, at));
            totals.push(t);
        }
        keys.sort_unstable();
        let shared: Vec<Arc<[String]>> = ordered.iter().map(|(g, _)| Arc::from(*g)).collect();
        keys.into_iter()
            .map(|(bucket, group, currency, at)| {
                let key = (bucket, shared[group].clone(), currency);
                (key, totals[at as usize])
            })
            .collect()
    }
}

pub fn unavailable(e: &ViewError) -> Problem {
    let part = match e {
        ViewError::Unavailable(part) => part,
        ViewError::Corrupt(what) => {
            tracing::error!(what, "Unreadable view data");
            return Problem::new(ProblemKind::Internal).detail(
                "A view holds data this build cannot read; no answer rather than a wrong one.",
            );
        }
        ViewError::TooLarge(limit) => {
            return Problem::new(ProblemKind::Validation)
                .detail("The question is too wide to answer.")
                .errors(vec![FieldError {
                    pointer: "group_by".into(),
                    code: "too_many_cells".into(),
                    detail: format!(
                        "it reads more than {limit} stored cells; narrow the range, coarsen \
                         the granularity, group by fewer dimensions, or filter"
                    ),
                }]);
        }
    };
    let store = match part {
        Part::Batch => "The batch view (ClickHouse or the publish state in Postgres)",
        Part::Speed => "The speed view (Redis)",
    };
    Problem::unavailable(format!(
        "{store} is unavailable; retry shortly, or pass allow_partial=true for the available \
         part, flagged as partial."
    ))
}

fn missing(parts: &[Part]) -> Vec<String> {
    parts
        .iter()
        .map(|p| match p {
            Part::Batch => "batch".to_owned(),
            Part::Speed => "speed".to_owned(),
        })
        .collect()
}

/// Answers a revenue question from the merged views: the cells of the shape that
/// covers its dimensions and filters, at the coarsest stored buckets that tile
/// its local buckets, summed into them.
pub async fn revenue(views: &Views, req: &RevenueRequest) -> Result<RevenueSeries, Problem> {
    let local = req.local();
    // A conversion reads from the UTC midnight before the range (see `crate::fx`).
    let from = if req.report_currency.is_some() {
        req.from - req.from.rem_euclid(86_400)
    } else {
        req.from
    };
    let read = Read {
        granularity: local.pieces(from, req.to),
        shape: req.shape(),
        from,
        to: req.to,
        buckets: Buckets::Local {
            local,
            from: req.from,
        },
        dated: req.report_currency.is_some(),
        group_by: &req.group_by,
        filters: &req.filters,
        currency: req.currency,
    };
    let ask = req.fields.buyers().then(|| crate::buyers::Ask::of(req));
    let (cells, merged, buyers) = answer(
        views,
        &read,
        ask.as_ref(),
        req.report_currency,
        req.allow_partial,
    )
    .await?;
    // The cells shown on the basis, counted and their currencies found in one pass.
    let mut shown_cells = 0;
    let currencies = currency_infos(cells.iter().filter(|(_, t)| shown(t, req.basis)).map(
        |((_, _, currency), _)| {
            shown_cells += 1;
            currency
        },
    ));
    if shown_cells > views.max_cells() {
        return Err(Problem::new(ProblemKind::Validation)
            .detail("The answer would be too large.")
            .errors(vec![FieldError {
                pointer: "group_by".into(),
                code: "too_many_cells".into(),
                detail: format!(
                    "the answer holds {shown_cells} cells (bucket × group × currency); at most {}: \
                     narrow the range, coarsen the granularity, or filter",
                    views.max_cells()
                ),
            }]));
    }
    let points = points_of(views, format!("{req:?}"), cells, buyers, req).await;
    Ok(RevenueSeries {
        granularity: req.granularity.as_str().to_owned(),
        group_by: (!req.group_by.is_empty()).then(|| names(&req.group_by)),
        tz: req.zone.name().to_owned(),
        report_currency: req.report_currency.map(|c| c.to_string()),
        from: at(req.from),
        to: at(req.to),
        points,
        currencies,
        partial: !merged.missing.is_empty(),
        missing: missing(&merged.missing),
        freshness: merged.freshness,
    })
}

/// The points of `cells` with their `buyers`, kept per question while both stay
/// the same: with a live stream every answer's position moves, though a question
/// over past days has the same cells each time, and making its points —
/// thousands of local times and decimal strings — and their JSON were the
/// dearest part of its computation. Compared and made on a computing thread,
/// not a request's worker.
async fn points_of(
    views: &Views,
    question: String,
    cells: Arc<Answer>,
    buyers: Option<crate::buyers::Buyers>,
    req: &RevenueRequest,
) -> Arc<Points> {
    let kept = views.points(&question);
    let (local, group_by, basis) = (req.local(), req.group_by.clone(), req.basis);
    let making = views.computing().run(move || {
        if let Some(kept) = kept.filter(|k| k.made_of(&cells, &buyers)) {
            return (kept.points.clone(), None);
        }
        let list = points(&cells, buyers.as_ref(), local, &group_by, basis);
        let points = Arc::new(Points::new(list));
        let made = MadePoints {
            cells,
            buyers,
            points: points.clone(),
        };
        (points, Some(made))
    });
    let (points, made) = crate::views::timed("points", making).await;
    let result = if made.is_some() { "made" } else { "kept" };
    metrics::counter!("serving_points_total", "result" => result).increment(1);
    if let Some(made) = made {
        views.keep_points(question, Arc::new(made));
    }
    points
}

/// The points of the `cells` shown on `basis` (in key order), with the `buyers`
/// of each when counted.
fn points(
    cells: &Answer,
    buyers: Option<&crate::buyers::Buyers>,
    local: LocalBuckets,
    group_by: &[Attribute],
    basis: Basis,
) -> Vec<Point> {
    // The cells and the buyers are both in key order: read side by side.
    let mut buyers = buyers.map(|b| b.iter().peekable());
    // A bucket's points come one after another: its local time is shown once,
    // and shared by them.
    let mut shown_at: Option<(i64, Arc<str>)> = None;
    let mut show = |bucket: i64| match &shown_at {
        Some((at, shown)) if *at == bucket => shown.clone(),
        _ => shown_at
            .insert((bucket, Arc::from(local.show(bucket))))
            .1
            .clone(),
    };
    // A group's values are one allocation shared by its cells (`Sums::answer`),
    // so its point values are made once per group, known by that allocation's
    // address (copied per point, they were two of a point's six allocations).
    let mut groups: foldhash::HashMap<*const String, (Option<Arc<str>>, Dimensions)> =
        foldhash::HashMap::default();
    let mut group_of = |values: &Arc<[String]>| {
        if group_by.is_empty() {
            return (None, None);
        }
        let (group, dimensions) = groups
            .entry(Arc::as_ptr(values).cast::<String>())
            .or_insert_with(|| {
                let mut dimensions = Dimensions::of(group_by, values);
                let group = (group_by.len() == 1).then(|| dimensions.slot(group_by[0]).clone());
                (group.flatten(), dimensions)
            });
        (group.clone(), Some(dimensions.clone()))
    };
    // An answer holds a handful of currencies: each code's text is made once.
    let mut codes: Vec<(Currency, Arc<str>)> = Vec::new();
    let mut code_of = |currency: Currency| {
        if let Some((_, code)) = codes.iter().find(|(c, _)| *c == currency) {
            return code.clone();
        }
        let code: Arc<str> = Arc::from(currency.as_str());
        codes.push((currency, code.clone()));
        code
    };
    // Sized once: grown by doubling, the points (a few hundred bytes each)
    // were copied and their pages faulted in again at every step.
    let mut points = Vec::with_capacity(cells.len());
    let made =
        cells
            .iter()
            .filter(|(_, t)| shown(t, basis))
            .map(|((bucket, values, currency), t)| {
                let (group, dimensions) = group_of(values);
                Point {
                    buyers: buyers.as_mut().map(|b| {
                        let here = (*bucket, &values[..], *currency);
                        while b
                            .next_if(|((k, g, c), _)| (*k, g.as_slice(), *c) < here)
                            .is_some()
                        {}
                        b.next_if(|((k, g, c), _)| (*k, g.as_slice(), *c) == here)
                            .map_or(0, |(_, n)| *n)
                    }),
                    bucket: at(*bucket),
                    local_bucket: show(*bucket),
                    group,
                    dimensions,
                    currency: code_of(*currency),
                    revenue_minor: t.revenue_minor,
                    revenue: decimal(t.revenue_minor, *currency),
                    orders: t.orders,
                    items: t.items,
                    average_order_value_minor: aov(t),
                    net: Net::of(t, basis, *currency),
                }
            });
    points.extend(made);
    points
}

/// An answer's cells and, when `ask`ed, its buyers (not asked: no distinct count,
/// the dearest part of a computation). Buyers that cannot be counted fail the
/// answer, or with `allow_partial` are left out (`None`) as the part missing.
async fn answer(
    views: &Views,
    read: &Read<'_>,
    ask: Option<&crate::buyers::Ask<'_>>,
    report_currency: Option<Currency>,
    allow_partial: bool,
) -> Result<(Arc<Answer>, Merged, Option<crate::buyers::Buyers>), Problem> {
    let Some(ask) = ask else {
        let state = views.state().await;
        let (cells, merged) =
            merged_answer(views, state, read, report_currency, allow_partial).await?;
        return Ok((cells, merged, None));
    };
    let (cells, merged, buyers) =
        answer_with_buyers(views, read, ask, report_currency, allow_partial).await?;
    let buyers = match buyers {
        Ok(buyers) => Some(buyers),
        Err(_) if allow_partial => None,
        Err(e) => return Err(unavailable(&e)),
    };
    Ok((cells, merged, buyers))
}

/// An answer's cells and its buyers, of one published state and one speed
/// cursor — the position the answer states. The batch view's revenue and buyers
/// statements run at once; the speed view's cells and users come from one read.
async fn answer_with_buyers(
    views: &Views,
    read: &Read<'_>,
    ask: &crate::buyers::Ask<'_>,
    report_currency: Option<Currency>,
    allow_partial: bool,
) -> Result<
    (
        Arc<Answer>,
        Merged,
        Result<crate::buyers::Buyers, ViewError>,
    ),
    Problem,
> {
    let state = views.state().await;
    let known = state.as_ref().ok().cloned();
    let key = ask.key_sql();
    let query = ask.query(&key);
    let (answered, batch) = tokio::join!(
        merged_answer(views, state, read, report_currency, allow_partial),
        views.buyers_batch(known.as_ref().and_then(Option::as_ref), &query)
    );
    let (answer, merged) = answered?;
    let buyers = async {
        if known.is_none() {
            return Err(ViewError::Unavailable(Part::Batch));
        }
        if merged.missing.contains(&Part::Speed) {
            return Err(ViewError::Unavailable(Part::Speed));
        }
        let batch: std::sync::Arc<crate::views::BuyerCounts> = batch?;
        let (state, speed) = (merged.state.as_ref(), merged.speed_buyers.clone());
        crate::views::timed(
            "buyers_count",
            crate::buyers::buyers(views, ask, state, batch, speed),
        )
        .await
    }
    .await;
    Ok((answer, merged, buyers))
}

/// The answer to `read` from both views: their pieces summed into its buckets;
/// with a reporting currency, converted (see [`crate::fx`]).
async fn merged_answer(
    views: &Views,
    state: Result<Option<tidemark_batchview::PublishedState>, ViewError>,
    read: &Read<'_>,
    report_currency: Option<Currency>,
    allow_partial: bool,
) -> Result<(Arc<Answer>, Merged), Problem> {
    let merged = views
        .revenue(state, read, allow_partial)
        .await
        .map_err(|e| unavailable(&e))?;
    let answer = match report_currency {
        Some(to) => {
            let question = format!("{}|{to}", read.describe());
            return crate::fx::convert(views, question, merged, read.buckets, to).await;
        }
        None => {
            let mut sums = Sums::with_capacity(merged.pieces().size_hint().0);
            for ((key, _, groups, currency), t) in merged.pieces() {
                if let Some(bucket) = read.buckets.bucket(*key) {
                    sums.add(bucket, groups, *currency, *t);
                }
            }
            Arc::new(sums.answer())
        }
    };
    Ok((answer, merged))
}

fn names(attributes: &[Attribute]) -> String {
    attributes
        .iter()
        .map(|a| a.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// A validated summary question.
#[derive(Debug)]
pub struct SummaryRequest {
    pub from: i64,
    pub to: i64,
    /// The stored buckets that tile the range.
    pub granularity: Granularity,
    /// One or two dimensions.
    pub top_by: Vec<Attribute>,
    pub filters: Vec<(Attribute, Vec<String>)>,
    pub top: usize,
    pub currency: Option<Currency>,
    /// Convert every amount to this currency (see [`crate::fx`]).
    pub report_currency: Option<Currency>,
    pub basis: Basis,
    pub allow_partial: bool,
    /// Whether unique buyers are counted (REST: always; GraphQL: when its
    /// selection has them).
    pub buyers: bool,
}

const SUMMARY_PARAMS: [&str; 12] = [
    "from",
    "to",
    "tz",
    "top_by",
    "top",
    "city",
    "category",
    "product",
    "currency",
    "report_currency",
    "basis",
    "allow_partial",
];

pub fn summary_request(
    params: &HashMap<String, String>,
    settings: &ServingSettings,
) -> Result<SummaryRequest, Problem> {
    let mut errors = Errors::default();
    unknown_params(params, &SUMMARY_PARAMS, &mut errors);
    let get = |k: &str| params.get(k).map(String::as_str);
    let zone = parse_zone(get("tz"), &mut errors);
    let from = parse_time(get("from"), zone, "from", &mut errors);
    let to = parse_time(get("to"), zone, "to", &mut errors);
    let top_by = parse_group_by("top_by", get("top_by").unwrap_or("city"), &mut errors);
    let filters = parse_filters(&|k| params.get(k).cloned(), settings, &mut errors);
    let top = match get("top").unwrap_or("5").parse::<usize>() {
        Ok(n) if (1..=settings.max_top).contains(&n) => n,
        _ => {
            errors.add(
                "top",
                "out_of_range",
                format!("must be between 1 and {}", settings.max_top),
            );
            5
        }
    };
    let currency = parse_currency(get("currency"), "currency", &mut errors);
    let report_currency = parse_currency(get("report_currency"), "report_currency", &mut errors);
    let basis = parse_basis(get("basis"), &mut errors);
    let allow_partial = parse_allow_partial(get("allow_partial"), &mut errors);
    let mut bounds = None;
    if let (Some(from), Some(to)) = (from, to) {
        // Minutes are the finest bucket: the range is truncated to whole minutes.
        let (from, to) = (
            Granularity::Minute.bucket_of_secs(from),
            Granularity::Minute.bucket_of_secs(to),
        );
        if to <= from {
            errors.add("to", "invalid", "must be at least a minute after `from`");
        } else if to - from > settings.max_range_days * 86_400 {
            errors.add(
                "to",
                "too_wide",
                format!(
                    "the range may span at most {} days",
                    settings.max_range_days
                ),
            );
        }
        bounds = Some((from, to));
    }
    errors.finish()?;
    let (from, to) = bounds.ok_or_else(|| Problem::malformed("Invalid parameters."))?;
    // The coarsest granularity whose buckets tile the range exactly.
    let granularity = [Granularity::Day, Granularity::Hour, Granularity::Minute]
        .into_iter()
        .find(|g| from % g.seconds() == 0 && to % g.seconds() == 0)
        .unwrap_or(Granularity::Minute);
    if (to - from) / granularity.seconds() > settings.max_points * 10 {
        return Err(Problem::new(ProblemKind::Validation)
            .detail("Align `from` and `to` to hours or days for a range this long.")
            .errors(vec![FieldError {
                pointer: "from".into(),
                code: "too_many_points".into(),
                detail: "align to whole hours or days".into(),
            }]));
    }
    Ok(SummaryRequest {
        from,
        to,
        granularity,
        top_by,
        filters,
        top,
        currency,
        report_currency,
        basis,
        allow_partial,
        buyers: true,
    })
}

/// Totals per currency, the top groups by gross revenue within each currency, and
/// the rest of the groups summed (`other`), for a range.
pub async fn summary(views: &Views, req: &SummaryRequest) -> Result<Summary, Problem> {
    let read = |attributes: Vec<Attribute>| {
        let named: Vec<Attribute> = attributes
            .iter()
            .copied()
            .chain(req.filters.iter().map(|(a, _)| *a))
            .collect();
        let shape = Dimension::covering(&named);
        async move {
            let from = if req.report_currency.is_some() {
                req.from - req.from.rem_euclid(86_400)
            } else {
                req.from
            };
            let read = Read {
                granularity: req.granularity,
                shape,
                from,
                to: req.to,
                buckets: Buckets::Whole { from: req.from },
                dated: req.report_currency.is_some(),
                group_by: &attributes,
                filters: &req.filters,
                currency: req.currency,
            };
            // Distinct users over the whole range, per group.
            let ask = crate::buyers::Ask {
                from: req.from,
                to: req.to,
                buckets: None,
                group_by: &attributes,
                filters: &req.filters,
                currency: req.currency,
                report_currency: req.report_currency,
            };
            let ask = req.buyers.then_some(&ask);
            answer(views, &read, ask, req.report_currency, req.allow_partial).await
        }
    };
    let (total, total_merged, total_buyers) = read(Vec::new()).await?;
    let (by, by_merged, by_buyers) = read(req.top_by.clone()).await?;
    let buyers_of =
        |buyers: &Option<crate::buyers::Buyers>, values: &[String], currency: Currency| {
            buyers
                .as_ref()
                .map(|b| b.get(&(0, values.to_vec(), currency)).copied().unwrap_or(0))
        };
    let mut currencies: Vec<Currency> = Vec::new();
    let totals = total
        .iter()
        .filter(|(_, t)| shown(t, req.basis))
        .inspect(|((_, _, currency), _)| currencies.push(*currency))
        .map(|((_, _, currency), t)| (*currency, t))
        .map(|(currency, t)| CurrencyTotals {
            buyers: buyers_of(&total_buyers, &[], currency),
            currency: currency.to_string(),
            revenue_minor: t.revenue_minor,
            revenue: decimal(t.revenue_minor, currency),
            orders: t.orders,
            items: t.items,
            average_order_value_minor: aov(t),
            net: Net::of(t, req.basis, currency),
        })
        .collect();
    let mut per_currency: BTreeMap<Currency, Vec<(Vec<String>, Totals)>> = BTreeMap::new();
    for ((_, values, currency), t) in by.iter() {
        if shown(t, req.basis) {
            per_currency
                .entry(*currency)
                .or_default()
                .push((values.to_vec(), *t));
        }
    }
    let mut top = Vec::new();
    let mut other = Vec::new();
    currencies.extend(per_currency.keys());
    let one = req.top_by.len() == 1;
    for (currency, mut entries) in per_currency {
        entries.sort_by(|(a, ta), (b, tb)| tb.revenue_minor.cmp(&ta.revenue_minor).then(a.cmp(b)));
        let rest = entries.split_off(entries.len().min(req.top));
        top.extend(entries.into_iter().map(|(values, t)| TopEntry {
            buyers: buyers_of(&by_buyers, &values, currency),
            group: if one {
                values[0].clone()
            } else {
                join_list(&values)
            },
            dimensions: Dimensions::of(&req.top_by, &values),
            currency: currency.to_string(),
            revenue_minor: t.revenue_minor,
            revenue: decimal(t.revenue_minor, currency),
            orders: t.orders,
            items: t.items,
            average_order_value_minor: aov(&t),
            net: Net::of(&t, req.basis, currency),
        }));
        if !rest.is_empty() {
            let groups = rest.len() as i64;
            let mut t = Totals::default();
            for (_, cell) in rest {
                t.add(cell);
            }
            other.push(OtherEntry {
                currency: currency.to_string(),
                groups,
                revenue_minor: t.revenue_minor,
                revenue: decimal(t.revenue_minor, currency),
                orders: t.orders,
                items: t.items,
                average_order_value_minor: aov(&t),
                net: Net::of(&t, req.basis, currency),
            });
        }
    }
    let mut missing_parts = total_merged.missing.clone();
    for part in by_merged.missing {
        if !missing_parts.contains(&part) {
            missing_parts.push(part);
        }
    }
    let currencies = currency_infos(&currencies);
    Ok(Summary {
        from: at(req.from),
        to: at(req.to),
        totals,
        currencies,
        report_currency: req.report_currency.map(|c| c.to_string()),
        top_by: names(&req.top_by),
        top,
        other,
        partial: !missing_parts.is_empty(),
        missing: missing(&missing_parts),
        freshness: by_merged.freshness,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;
    use tidemark_domain::{Currency, Totals};

    use super::{Answer, Sums};

    proptest! {
        /// Summed by number, in any order, the answer is the one a map ordered by
        /// the values gives: the same cells, the same sums, in key order.
        #[test]
        fn sums_are_the_cells_summed_in_the_values_order(
            pieces in proptest::collection::vec(
                (0i64..6, proptest::collection::vec("[a-c]{0,2}", 0..3), 0usize..3, -50i64..50),
                0..200,
            )
        ) {
            let currencies: [Currency; 3] =
                ["EUR", "JPY", "USD"].map(|c| c.parse().unwrap());
            // Half the pieces share the values of an earlier equal piece (as the
            // batch view's pieces of a group do), the others hold copies.
            let mut made: Vec<Arc<[String]>> = Vec::new();
            let held: Vec<Arc<[String]>> = pieces
                .iter()
                .enumerate()
                .map(|(i, (_, groups, _, _))| match made.iter().find(|m| m[..] == groups[..]) {
                    Some(m) if i % 2 == 0 => m.clone(),
                    _ => {
                        let m: Arc<[String]> = groups.clone().into();
                        made.push(m.clone());
                        m
                    }
                })
                .collect();
            let mut sums = Sums::default();
            let mut expected: std::collections::BTreeMap<(i64, Vec<String>, Currency), Totals> =
                std::collections::BTreeMap::new();
            for ((bucket, groups, currency, amount), values) in pieces.iter().zip(&held) {
                let t = Totals { revenue_minor: *amount, orders: 1, ..Totals::default() };
                sums.add(*bucket, values, currencies[*currency], t);
                expected
                    .entry((*bucket, groups.clone(), currencies[*currency]))
                    .or_default()
                    .add(t);
            }
            let expected: Answer = expected
                .into_iter()
                .map(|((bucket, groups, currency), t)| ((bucket, groups.into(), currency), t))
                .collect();
            prop_assert_eq!(sums.answer(), expected);
        }
    }
}
