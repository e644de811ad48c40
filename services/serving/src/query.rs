//! What REST and GraphQL share: request validation with field-level errors, the
//! revenue and summary answers, and their response shapes.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;
use tidemark_domain::money::decimal;
use tidemark_domain::{Basis, Currency, Dimension, Granularity, Grid, Totals};
use tidemark_platform::problem::{FieldError, Problem, ProblemKind};

use crate::config::ServingSettings;
use crate::views::{Freshness, Part, ViewError, Views};

/// A validated revenue question.
#[derive(Clone, Debug, PartialEq)]
pub struct RevenueRequest {
    /// Inclusive start, truncated to the granularity.
    pub from: i64,
    /// Exclusive end, rounded up to the granularity.
    pub to: i64,
    pub granularity: Granularity,
    /// `Total` when not grouped.
    pub dimension: Dimension,
    pub grouped: bool,
    /// Only this value of `dimension`.
    pub value: Option<String>,
    pub currency: Option<Currency>,
    /// Which time refunds and cancellations count at.
    pub basis: Basis,
    pub allow_partial: bool,
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

/// One cell of a revenue series.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema, async_graphql::SimpleObject)]
pub struct Point {
    /// Bucket start (UTC).
    pub bucket: DateTime<Utc>,
    /// The dimension value when grouped.
    pub group: Option<String>,
    pub currency: String,
    pub revenue_minor: i64,
    /// The same revenue in major units, exact, by the currency's exponent
    /// (`1299` → `"12.99"` EUR, `"1299"` JPY, `"1.299"` KWD).
    pub revenue: String,
    pub orders: i64,
    pub items: i64,
    /// Gross revenue per order in minor units, rounded half up.
    pub average_order_value_minor: i64,
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
pub struct RevenueSeries {
    pub granularity: String,
    pub group_by: Option<String>,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub points: Vec<Point>,
    /// The currencies of the points, with their exponents.
    pub currencies: Vec<CurrencyInfo>,
    /// True when a store was down and `allow_partial` asked for what was available.
    pub partial: bool,
    pub missing: Vec<String>,
    pub freshness: Freshness,
}

/// Totals of one currency.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema, async_graphql::SimpleObject)]
pub struct CurrencyTotals {
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

/// One of the top dimension values, by revenue within its currency.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema, async_graphql::SimpleObject)]
pub struct TopEntry {
    pub group: String,
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

#[derive(Clone, Debug, Serialize, utoipa::ToSchema, async_graphql::SimpleObject)]
pub struct Summary {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub totals: Vec<CurrencyTotals>,
    /// The currencies of the totals, with their exponents.
    pub currencies: Vec<CurrencyInfo>,
    pub top_by: String,
    pub top: Vec<TopEntry>,
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
fn per_order(amount: i64, orders: i64) -> i64 {
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

fn parse_time(raw: Option<&str>, field: &str, errors: &mut Errors) -> Option<DateTime<Utc>> {
    match raw {
        None => {
            errors.add(
                field,
                "required",
                "is required (RFC 3339, e.g. 2026-11-21T00:00:00Z)",
            );
            None
        }
        Some(s) => match DateTime::parse_from_rfc3339(s) {
            Ok(t) => Some(t.with_timezone(&Utc)),
            Err(_) => {
                errors.add(
                    field,
                    "invalid",
                    "must be an RFC 3339 time, e.g. 2026-11-21T00:00:00Z",
                );
                None
            }
        },
    }
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

const FILTERS: [(&str, Dimension); 3] = [
    ("city", Dimension::City),
    ("category", Dimension::Category),
    ("product", Dimension::Product),
];

/// Validates a revenue question. `params` are the raw query parameters; unknown
/// ones are errors, so a misspelt filter does not silently widen the answer.
pub fn revenue_request(
    params: &HashMap<String, String>,
    settings: &ServingSettings,
) -> Result<RevenueRequest, Problem> {
    let mut errors = Errors::default();
    for name in params.keys() {
        let known = [
            "from",
            "to",
            "granularity",
            "group_by",
            "city",
            "category",
            "product",
            "currency",
            "basis",
            "allow_partial",
        ];
        if !known.contains(&name.as_str()) {
            let shown: String = name.chars().take(40).collect();
            errors.add(
                &shown,
                "unknown_parameter",
                "is not a parameter of this endpoint",
            );
        }
    }
    let get = |k: &str| params.get(k).map(String::as_str);
    let granularity = match get("granularity").unwrap_or("hour").parse::<Granularity>() {
        Ok(g) => Some(g),
        Err(e) => {
            errors.add("granularity", "invalid", e.to_string());
            None
        }
    };
    let group_by = match get("group_by") {
        None => None,
        Some(g) => match g.parse::<Dimension>() {
            Ok(Dimension::Total) | Err(_) => {
                errors.add(
                    "group_by",
                    "invalid",
                    "must be one of city, category, product",
                );
                None
            }
            Ok(d) => Some(d),
        },
    };
    let filters: Vec<(Dimension, &str)> = FILTERS
        .iter()
        .filter_map(|(name, dim)| get(name).map(|v| (*dim, v)))
        .collect();
    if filters.len() > 1 {
        errors.add(
            "city",
            "unsupported",
            "filter by at most one of city, category, product",
        );
    }
    if let (Some(group), Some((dim, _))) = (group_by, filters.first())
        && group != *dim
    {
        errors.add(
            dim.as_str(),
            "unsupported",
            format!("filtering by {dim} while grouping by {group} is not supported"),
        );
    }
    let currency = get("currency").and_then(|c| match c.parse::<Currency>() {
        Ok(c) => Some(c),
        Err(e) => {
            errors.add("currency", "invalid", e.to_string());
            None
        }
    });
    let basis = parse_basis(get("basis"), &mut errors);
    let allow_partial = match get("allow_partial") {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => {
            errors.add("allow_partial", "invalid", "must be true or false");
            false
        }
    };
    let from = parse_time(get("from"), "from", &mut errors);
    let to = parse_time(get("to"), "to", &mut errors);
    let mut request = None;
    if let (Some(from), Some(to), Some(granularity)) = (from, to, granularity) {
        let width = granularity.seconds();
        let from = granularity.bucket_of_secs(from.timestamp());
        let to = {
            let t = to.timestamp();
            let b = granularity.bucket_of_secs(t);
            if b == t { t } else { b + width }
        };
        if to <= from {
            errors.add("to", "invalid", "must be after `from`");
        } else if to - from > settings.max_range_days * 86_400 {
            errors.add(
                "to",
                "too_wide",
                format!(
                    "the range may span at most {} days",
                    settings.max_range_days
                ),
            );
        } else if (to - from) / width > settings.max_points {
            errors.add(
                "granularity",
                "too_many_points",
                format!(
                    "the range has {} {granularity} buckets; at most {} per query",
                    (to - from) / width,
                    settings.max_points
                ),
            );
        }
        let (dimension, value) = match (group_by, filters.first()) {
            (Some(d), filter) => (d, filter.map(|(_, v)| (*v).to_owned())),
            (None, Some((d, v))) => (*d, Some((*v).to_owned())),
            (None, None) => (Dimension::Total, None),
        };
        request = Some(RevenueRequest {
            from,
            to,
            granularity,
            dimension,
            grouped: group_by.is_some(),
            value,
            currency,
            basis,
            allow_partial,
        });
    }
    errors.finish()?;
    request.ok_or_else(|| Problem::malformed("Invalid parameters."))
}

pub fn unavailable(e: &ViewError) -> Problem {
    let ViewError::Unavailable(part) = e;
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

/// Answers a revenue question from the merged views.
pub async fn revenue(views: &Views, req: &RevenueRequest) -> Result<RevenueSeries, Problem> {
    let merged = views
        .revenue(
            req.granularity,
            req.dimension,
            req.from,
            req.to,
            req.allow_partial,
        )
        .await
        .map_err(|e| unavailable(&e))?;
    let cells: Vec<_> = merged
        .grid
        .iter()
        .filter(|((bucket, value, currency), totals)| {
            *bucket >= req.from
                && *bucket < req.to
                && shown(totals, req.basis)
                && req.value.as_ref().is_none_or(|v| v == value)
                && req.currency.is_none_or(|c| c == *currency)
        })
        .collect();
    let currencies = currency_infos(cells.iter().map(|((_, _, currency), _)| currency));
    let points = cells
        .into_iter()
        .map(|((bucket, value, currency), t)| Point {
            bucket: at(*bucket),
            group: req.grouped.then(|| value.clone()),
            currency: currency.to_string(),
            revenue_minor: t.revenue_minor,
            revenue: decimal(t.revenue_minor, *currency),
            orders: t.orders,
            items: t.items,
            average_order_value_minor: aov(t),
            net: Net::of(t, req.basis, *currency),
        })
        .collect();
    Ok(RevenueSeries {
        granularity: req.granularity.as_str().to_owned(),
        group_by: req.grouped.then(|| req.dimension.as_str().to_owned()),
        from: at(req.from),
        to: at(req.to),
        points,
        currencies,
        partial: !merged.missing.is_empty(),
        missing: missing(&merged.missing),
        freshness: merged.freshness,
    })
}

/// A validated summary question.
pub struct SummaryRequest {
    pub from: i64,
    pub to: i64,
    pub granularity: Granularity,
    pub top_by: Dimension,
    pub top: usize,
    pub currency: Option<Currency>,
    pub basis: Basis,
    pub allow_partial: bool,
}

pub fn summary_request(
    params: &HashMap<String, String>,
    settings: &ServingSettings,
) -> Result<SummaryRequest, Problem> {
    let mut errors = Errors::default();
    for name in params.keys() {
        let known = [
            "from",
            "to",
            "top_by",
            "top",
            "currency",
            "basis",
            "allow_partial",
        ];
        if !known.contains(&name.as_str()) {
            let shown: String = name.chars().take(40).collect();
            errors.add(
                &shown,
                "unknown_parameter",
                "is not a parameter of this endpoint",
            );
        }
    }
    let get = |k: &str| params.get(k).map(String::as_str);
    let from = parse_time(get("from"), "from", &mut errors);
    let to = parse_time(get("to"), "to", &mut errors);
    let top_by = match get("top_by").unwrap_or("city").parse::<Dimension>() {
        Ok(Dimension::Total) | Err(_) => {
            errors.add(
                "top_by",
                "invalid",
                "must be one of city, category, product",
            );
            Dimension::City
        }
        Ok(d) => d,
    };
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
    let currency = get("currency").and_then(|c| match c.parse::<Currency>() {
        Ok(c) => Some(c),
        Err(e) => {
            errors.add("currency", "invalid", e.to_string());
            None
        }
    });
    let basis = parse_basis(get("basis"), &mut errors);
    let allow_partial = get("allow_partial") == Some("true");
    let mut bounds = None;
    if let (Some(from), Some(to)) = (from, to) {
        // Minutes are the finest bucket: the range is truncated to whole minutes.
        let (from, to) = (
            Granularity::Minute.bucket_of_secs(from.timestamp()),
            Granularity::Minute.bucket_of_secs(to.timestamp()),
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
        top,
        currency,
        basis,
        allow_partial,
    })
}

/// Totals per currency and the top values of a dimension, for a range.
pub async fn summary(views: &Views, req: &SummaryRequest) -> Result<Summary, Problem> {
    let sum_by = |grid: &Grid, with_value: bool| -> BTreeMap<(Currency, String), Totals> {
        let mut out: BTreeMap<(Currency, String), Totals> = BTreeMap::new();
        for ((bucket, value, currency), t) in grid {
            if *bucket < req.from
                || *bucket >= req.to
                || req.currency.is_some_and(|c| c != *currency)
            {
                continue;
            }
            let value = if with_value {
                value.clone()
            } else {
                String::new()
            };
            out.entry((*currency, value)).or_default().add(*t);
        }
        out
    };
    let total = views
        .revenue(
            req.granularity,
            Dimension::Total,
            req.from,
            req.to,
            req.allow_partial,
        )
        .await
        .map_err(|e| unavailable(&e))?;
    let by = views
        .revenue(
            req.granularity,
            req.top_by,
            req.from,
            req.to,
            req.allow_partial,
        )
        .await
        .map_err(|e| unavailable(&e))?;
    let totals_by = sum_by(&total.grid, false);
    let mut currencies: Vec<Currency> = Vec::new();
    let totals = totals_by
        .into_iter()
        .filter(|(_, t)| shown(t, req.basis))
        .inspect(|((currency, _), _)| currencies.push(*currency))
        .map(|((currency, _), t)| CurrencyTotals {
            currency: currency.to_string(),
            revenue_minor: t.revenue_minor,
            revenue: decimal(t.revenue_minor, currency),
            orders: t.orders,
            items: t.items,
            average_order_value_minor: aov(&t),
            net: Net::of(&t, req.basis, currency),
        })
        .collect();
    let mut per_currency: BTreeMap<Currency, Vec<TopEntry>> = BTreeMap::new();
    for ((currency, group), t) in sum_by(&by.grid, true) {
        if !shown(&t, req.basis) {
            continue;
        }
        per_currency.entry(currency).or_default().push(TopEntry {
            group,
            currency: currency.to_string(),
            revenue_minor: t.revenue_minor,
            revenue: decimal(t.revenue_minor, currency),
            orders: t.orders,
            items: t.items,
            average_order_value_minor: aov(&t),
            net: Net::of(&t, req.basis, currency),
        });
    }
    let mut top = Vec::new();
    currencies.extend(per_currency.keys());
    for (_, mut entries) in per_currency {
        entries.sort_by(|a, b| {
            b.revenue_minor
                .cmp(&a.revenue_minor)
                .then(a.group.cmp(&b.group))
        });
        top.extend(entries.into_iter().take(req.top));
    }
    let mut missing_parts = total.missing.clone();
    for part in by.missing {
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
        top_by: req.top_by.as_str().to_owned(),
        top,
        partial: !missing_parts.is_empty(),
        missing: missing(&missing_parts),
        freshness: by.freshness,
    })
}
