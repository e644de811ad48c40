//! Aggregates: revenue, orders and items per time bucket, dimension
//! value and currency, for every granularity and dimension; and the corrections
//! (refunds and cancellations) on both bases, booked at their own time and
//! restated at their order's.
//!
//! Orders and adjustments are grouped apart (adjustments are few, and each counts
//! in two buckets) with the same dictionaries and key layout, and their cells
//! summed into one grid per granularity × dimension.
//!
//! Cells are grouped by one integer key, not by strings. Each string column a
//! cell is keyed by (city, category, product, currency) is dictionary-coded, a
//! value's code being its rank in byte order, and a cell's key packs its bucket,
//! value code and currency code (see [`Layout`]). Cells are summed by sorting
//! the rows by that `u64` ([`sum_by_key`]) instead of hashing two or three
//! strings per order, and a grid sorted by key is sorted as `revenue_agg` sorts
//! its rows (bucket, value, currency): staging receives its rows in order, which
//! ClickHouse then need not sort.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use clickhouse::native::Block;
use clickhouse::native::builder::BlockBuilder;
use clickhouse::native::encode::Encode;
use polars::prelude::*;
use tidemark_batchview::{AggRow, dimension_code, granularity_code};
use tidemark_domain::{AdjustmentKind, Attribute, Dimension, Granularity};

/// What a set of lake rows (order lines and adjusted lines) adds up to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Sums {
    pub revenue: i64,
    /// Orders (each counted once).
    pub orders: i64,
    pub items: i64,
    /// Orders counted once per category they contain (the `orders` of the
    /// category dimension).
    pub category_orders: i64,
    /// Lines: orders counted once per product (the `orders` of the product
    /// dimension: an order holds a product at most once).
    pub lines: i64,
    /// Refunded minor units and units (both bases add up to these).
    pub refunded: i64,
    pub refunded_items: i64,
    /// Cancellations, counted as orders are: once, once per category, once per
    /// product.
    pub cancelled: i64,
    pub category_cancelled: i64,
    pub line_cancelled: i64,
}

impl Sums {
    pub fn add(&mut self, other: Sums) {
        self.revenue += other.revenue;
        self.orders += other.orders;
        self.items += other.items;
        self.category_orders += other.category_orders;
        self.lines += other.lines;
        self.refunded += other.refunded;
        self.refunded_items += other.refunded_items;
        self.cancelled += other.cancelled;
        self.category_cancelled += other.category_cancelled;
        self.line_cancelled += other.line_cancelled;
    }

    /// `[refunded_minor, refunded_items, cancelled_orders]` as the cells of
    /// `dimension` add up to, on either basis.
    pub fn corrections_of(&self, dimension: Dimension) -> [i64; 3] {
        let cancelled = match dimension {
            Dimension::Total | Dimension::City => self.cancelled,
            Dimension::Category | Dimension::CityCategory => self.category_cancelled,
            Dimension::Product | Dimension::CityCategoryProduct => self.line_cancelled,
        };
        [self.refunded, self.refunded_items, cancelled]
    }

    /// `[revenue, orders, items]` as the cells of `dimension` add up to.
    pub fn of(&self, dimension: Dimension) -> [i64; 3] {
        let orders = match dimension {
            Dimension::Total | Dimension::City => self.orders,
            Dimension::Category | Dimension::CityCategory => self.category_orders,
            Dimension::Product | Dimension::CityCategoryProduct => self.lines,
        };
        [self.revenue, orders, self.items]
    }
}

/// Per currency.
pub type CurrencyTotals = BTreeMap<String, Sums>;

const MINUTE_US: i64 = 60_000_000;
pub(crate) const HOUR_US: i64 = 3_600_000_000;
const DAY_US: i64 = 86_400_000_000;

/// The distinct values of string columns in byte order, and each row's code: the
/// rank of its value, so that codes sort as the strings do.
struct Dictionary {
    values: Arc<Vec<String>>,
    /// Per column, per row.
    codes: Vec<Vec<u64>>,
}

impl Dictionary {
    /// The codes of `columns`' rows in a dictionary of `values` (distinct, in
    /// byte order) that holds all of them.
    fn coded(values: &Arc<Vec<String>>, columns: &[&Column]) -> PolarsResult<Self> {
        let rank: PlHashMap<&str, u64> = values
            .iter()
            .enumerate()
            .map(|(r, v)| (v.as_str(), r as u64))
            .collect();
        let mut codes = Vec::with_capacity(columns.len());
        for column in columns {
            codes.push(
                column
                    .str()?
                    .iter()
                    .map(|value| {
                        rank.get(value.unwrap_or("")).copied().ok_or_else(
                            || polars_err!(ComputeError: "{value:?} is not in the run's dictionary"),
                        )
                    })
                    .collect::<PolarsResult<Vec<u64>>>()?,
            );
        }
        Ok(Self {
            values: values.clone(),
            codes,
        })
    }

    /// The distinct values of `columns`, in byte order.
    fn values_of(columns: &[&Column]) -> PolarsResult<Arc<Vec<String>>> {
        let mut seen: PlHashSet<&str> = PlHashSet::default();
        for column in columns {
            for value in column.str()?.iter() {
                seen.insert(value.unwrap_or(""));
            }
        }
        let mut values: Vec<String> = seen.into_iter().map(str::to_owned).collect();
        values.sort_unstable();
        Ok(Arc::new(values))
    }
}

/// How a cell's key packs its bucket, value and currency, in mixed radix:
/// `key = (bucket · values + value) · currencies + currency`, where `bucket`
/// counts buckets of the grid's width from the run's first midnight (UTC) and
/// `value`, `currency` are dictionary codes. Keys order cells by bucket, then
/// value, then currency.
#[derive(Clone, Copy, Debug)]
struct Layout {
    values: u64,
    currencies: u64,
}

impl Layout {
    fn key(self, bucket: u64, value: u64, currency: u64) -> u64 {
        (bucket * self.values + value) * self.currencies + currency
    }

    /// `(bucket, value, currency)`
    fn split(self, key: u64) -> (u64, u64, u64) {
        let currency = key % self.currencies;
        let rest = key / self.currencies;
        (rest / self.values, rest % self.values, currency)
    }

    /// Fails when keys of buckets below `buckets` might not fit 64 bits.
    fn check(self, buckets: u64) -> PolarsResult<Self> {
        buckets
            .checked_mul(self.values)
            .and_then(|k| k.checked_mul(self.currencies))
            .map(|_| self)
            .ok_or_else(|| {
                polars_err!(ComputeError:
                    "a run's buckets × values × currencies ({buckets} × {} × {}) do not fit a 64-bit key",
                    self.values, self.currencies)
            })
    }
}

/// One granularity × dimension of a run's aggregates: `key`, `revenue_minor`,
/// `orders` and `items`, one row per cell, sorted by key.
pub struct Grid {
    pub granularity: Granularity,
    pub dimension: Dimension,
    layout: Layout,
    pub cells: DataFrame,
}

/// A run's aggregates: every granularity × dimension grid, in `revenue_agg`'s
/// order (granularity, then dimension), with the dictionaries to read them.
pub struct Aggregates {
    /// The first midnight (UTC) of the run's orders, in µs: bucket 0.
    base_us: i64,
    currencies: Arc<Vec<String>>,
    /// The dictionaries of city, category and product.
    cities: Arc<Vec<String>>,
    categories: Arc<Vec<String>>,
    products: Arc<Vec<String>>,
    pub grids: Vec<Grid>,
}

impl Aggregates {
    /// The value of a cell of `dimension` whose value code is `code`: a
    /// dictionary's value, or several joined (codes in mixed radix, city first).
    fn value(&self, dimension: Dimension, code: u64) -> Cow<'_, str> {
        let (categories, products) = (self.categories.len() as u64, self.products.len() as u64);
        let place = |code: u64| (code / categories, code % categories);
        let [city, category, product] = match dimension {
            Dimension::Total => return Cow::Borrowed(""),
            Dimension::City => return Cow::Borrowed(&self.cities[code as usize]),
            Dimension::Category => return Cow::Borrowed(&self.categories[code as usize]),
            Dimension::Product => return Cow::Borrowed(&self.products[code as usize]),
            Dimension::CityCategory => {
                let (city, category) = place(code);
                [city, category, 0]
            }
            Dimension::CityCategoryProduct => {
                let (city, category) = place(code / products);
                [city, category, code % products]
            }
        };
        dimension.join(|a| match a {
            Attribute::City => &self.cities[city as usize],
            Attribute::Category => &self.categories[category as usize],
            Attribute::Product => &self.products[product as usize],
        })
    }
}

/// The measures of a grid's cells, in `revenue_agg`'s column order.
const MEASURES: [&str; 9] = [
    "revenue_minor",
    "orders",
    "items",
    "booked_refunded_minor",
    "booked_refunded_items",
    "booked_cancelled_orders",
    "restated_refunded_minor",
    "restated_refunded_items",
    "restated_cancelled_orders",
];

/// What a grid's cells sum, from lake rows or from another grid's cells.
#[derive(Clone, Copy)]
enum Source {
    /// Order lines, counting orders by `order_first` and per category by
    /// `category_first` (a grid by place keeps both).
    Places,
    /// Order lines, each an order of its product.
    Products,
    /// Cells, summing these measures.
    Cells(&'static [&'static str]),
    /// Cells, summing every measure they have.
    AllCells,
    /// Place cells summed by category: orders from `category_orders`.
    PlacesByCategory,
    /// Adjusted lines, as the corrections named `{prefix}_…`, counting
    /// cancellations by the column `cancel`.
    Corrections {
        prefix: &'static str,
        cancel: &'static str,
    },
}

/// Sums of rows with the same key, sorted by key: `revenue_minor`, `orders`,
/// `items` (and `category_orders` from [`Source::Places`]), or corrections.
fn group(keys: Vec<u64>, rows: &DataFrame, source: Source) -> PolarsResult<DataFrame> {
    // Each output column: its name and the column of `rows` it sums (`None`:
    // counts the rows).
    let sums: Vec<(String, Option<&str>)> = match source {
        Source::Places => vec![
            ("revenue_minor".into(), Some("revenue")),
            ("orders".into(), Some("order_first")),
            ("items".into(), Some("quantity")),
            ("category_orders".into(), Some("category_first")),
        ],
        Source::Products => vec![
            ("revenue_minor".into(), Some("revenue")),
            ("orders".into(), None),
            ("items".into(), Some("quantity")),
        ],
        Source::Cells(measures) => measures.iter().map(|m| (m.to_string(), Some(*m))).collect(),
        Source::AllCells => rows
            .get_column_names()
            .into_iter()
            .map(PlSmallStr::as_str)
            .filter(|name| *name != "key")
            .map(|name| (name.to_owned(), Some(name)))
            .collect(),
        Source::PlacesByCategory => vec![
            ("revenue_minor".into(), Some("revenue_minor")),
            ("orders".into(), Some("category_orders")),
            ("items".into(), Some("items")),
        ],
        Source::Corrections { prefix, cancel } => vec![
            (format!("{prefix}_refunded_minor"), Some("refunded_minor")),
            (
                format!("{prefix}_refunded_items"),
                Some("refunded_quantity"),
            ),
            (format!("{prefix}_cancelled_orders"), Some(cancel)),
        ],
    };
    let mut measures = Vec::with_capacity(sums.len());
    for (name, summed) in sums {
        let values = match summed {
            Some(column) => Some(int64s(rows.column(column)?)?),
            None => None,
        };
        measures.push((name, values));
    }
    sum_by_key(keys, measures)
}

/// The values of an integer column as `i64`s, nulls as 0 (borrowed when they
/// already are).
fn int64s(column: &Column) -> PolarsResult<Cow<'_, [i64]>> {
    if let Ok(ints) = column.i64()
        && let Ok(values) = ints.cont_slice()
    {
        return Ok(Cow::Borrowed(values));
    }
    let ints = column.cast(&DataType::Int64)?;
    Ok(Cow::Owned(
        ints.i64()?.iter().map(|v| v.unwrap_or(0)).collect(),
    ))
}

/// Cells, sorted by key, of `key` and each measure: its name and its sum over
/// the rows of each key (`None`: the number of rows).
///
/// The rows are sorted by key and each run of one key summed: polars' hashed
/// group-by gathered every group's sums through a list of its rows' indices,
/// and most cells here (minutes × places × products) hold one or two rows.
fn sum_by_key(
    keys: Vec<u64>,
    measures: Vec<(String, Option<Cow<'_, [i64]>>)>,
) -> PolarsResult<DataFrame> {
    let rows = keys.len();
    polars_ensure!(
        u32::try_from(rows).is_ok(),
        ComputeError: "{rows} rows summed at once (at most 2^32)"
    );
    let mut order: Vec<(u64, u32)> = keys.into_iter().zip(0_u32..).collect();
    // Stable (driftsort): a roll-up's or regrouping's rows come in sorted runs,
    // one per source bucket, which it merges instead of sorting them anew.
    order.sort_by_key(|&(key, _)| key);
    // Each cell's key and its first row in `order` (sized exactly: a grid's
    // columns are held until written).
    let distinct = 1 + order
        .windows(2)
        .filter(|pair| pair[0].0 != pair[1].0)
        .count();
    let mut cells: Vec<u64> = Vec::with_capacity(distinct);
    let mut starts: Vec<usize> = Vec::with_capacity(distinct + 1);
    for (at, &(key, _)) in order.iter().enumerate() {
        if cells.last() != Some(&key) {
            cells.push(key);
            starts.push(at);
        }
    }
    starts.push(rows);
    // A measure at a time: one column's values read at once.
    let sums: Vec<Vec<i64>> = measures
        .iter()
        .map(|(_, values)| {
            starts
                .windows(2)
                .map(|cell| match values {
                    Some(values) => order[cell[0]..cell[1]]
                        .iter()
                        .map(|&(_, row)| values[row as usize])
                        .sum(),
                    None => (cell[1] - cell[0]) as i64,
                })
                .collect()
        })
        .collect();
    let height = cells.len();
    let mut columns = Vec::with_capacity(1 + measures.len());
    columns.push(Column::new("key".into(), cells));
    for ((name, _), sum) in measures.into_iter().zip(sums) {
        columns.push(Column::new(name.into(), sum));
    }
    DataFrame::new(height, columns)
}

/// Grids of the same layout (each sorted by key) summed into one with every
/// measure (0 where a grid lacks one), sorted by key.
///
/// The grids are merged, not grouped anew: the orders' cells of a range are
/// many and its corrections' few, so each cell is visited once.
fn combine(frames: &[DataFrame]) -> PolarsResult<DataFrame> {
    let keys = frames
        .iter()
        .map(keys_of)
        .collect::<PolarsResult<Vec<_>>>()?;
    // The merged keys, and the merged cell each grid's cell adds to.
    let cells: usize = keys.iter().map(|k| k.len()).sum();
    polars_ensure!(
        u32::try_from(cells).is_ok(),
        ComputeError: "{cells} cells combined at once (at most 2^32)"
    );
    let mut merged: Vec<u64> = Vec::with_capacity(cells);
    let mut slots: Vec<Vec<u32>> = keys.iter().map(|k| Vec::with_capacity(k.len())).collect();
    let mut at = vec![0_usize; frames.len()];
    while let Some(key) = keys
        .iter()
        .zip(&at)
        .filter_map(|(keys, &at)| keys.get(at).copied())
        .min()
    {
        let slot = merged.len() as u32;
        merged.push(key);
        for ((keys, at), slots) in keys.iter().zip(&mut at).zip(&mut slots) {
            while keys.get(*at) == Some(&key) {
                slots.push(slot);
                *at += 1;
            }
        }
    }
    merged.shrink_to_fit();
    let height = merged.len();
    let mut columns = Vec::with_capacity(1 + MEASURES.len());
    columns.push(Column::new("key".into(), merged));
    for measure in MEASURES {
        let mut sum = vec![0_i64; height];
        for (frame, slots) in frames.iter().zip(&slots) {
            if let Ok(column) = frame.column(measure) {
                for (&slot, value) in slots.iter().zip(int64s(column)?.iter()) {
                    sum[slot as usize] += value;
                }
            }
        }
        columns.push(Column::new(measure.into(), sum));
    }
    DataFrame::new(height, columns)
}

fn keys_of(cells: &DataFrame) -> PolarsResult<&[u64]> {
    cells.column("key")?.u64()?.cont_slice()
}

/// Microseconds of an `Int64` column, in row order (nulls as 0).
fn micros(frame: &DataFrame, name: &str) -> PolarsResult<Vec<i64>> {
    Ok(frame
        .column(name)?
        .i64()?
        .iter()
        .map(|us| us.unwrap_or(0))
        .collect())
}

/// Every granularity × dimension grid of the lake rows `rows` (which carry
/// `created_us`, `adjusted_us` and `revenue`).
///
/// The orders are grouped twice: by minute × (city, category) × currency (a grid
/// far smaller than the orders, from which the total, city and category minute
/// grids are summed) and by minute × product × currency. Adjustments, if any, are
/// grouped per dimension at their own minute (booked) and at their order's
/// (restated), and added to the orders' minute grids. Hours are rolled up from
/// minutes and days from hours (sums compose).
pub fn grids(rows: &DataFrame) -> PolarsResult<Aggregates> {
    match RunKeys::of(rows)? {
        Some(keys) => grids_within(rows, &keys, None),
        None => Ok(Aggregates::empty(None)),
    }
}

/// What the grids of every range of a run share, so that their keys mean the
/// same: the run's first midnight (UTC), its minutes and its dictionaries.
#[derive(Clone, Debug, PartialEq)]
pub struct RunKeys {
    base_us: i64,
    /// Minutes from `base_us` to the last event time, inclusive.
    buckets: u64,
    currency: Arc<Vec<String>>,
    city: Arc<Vec<String>>,
    category: Arc<Vec<String>>,
    product: Arc<Vec<String>>,
}

impl RunKeys {
    /// The keys of a run's lake rows (`None` without rows).
    pub fn of(rows: &DataFrame) -> PolarsResult<Option<Self>> {
        if rows.height() == 0 {
            return Ok(None);
        }
        Self::spanning(rows, |name| Dictionary::values_of(&[rows.column(name)?])).map(Some)
    }

    /// The keys of a run whose event times are those of `rows` (`created_us`,
    /// `adjusted_us`) and whose distinct values (in byte order) of each of
    /// `currency`, `city`, `category` and `product_id` are `values(name)`.
    pub fn spanning(
        rows: &DataFrame,
        values: impl Fn(&str) -> PolarsResult<Arc<Vec<String>>>,
    ) -> PolarsResult<Self> {
        let (first_us, last_us) = event_times(rows)?.unwrap_or((i64::MAX, i64::MIN));
        Self::between(first_us, last_us, values)
    }

    /// The keys of a run whose first and last event times are `first_us` and
    /// `last_us`, and whose values are `values(name)` (as [`RunKeys::spanning`]).
    pub fn between(
        first_us: i64,
        last_us: i64,
        values: impl Fn(&str) -> PolarsResult<Arc<Vec<String>>>,
    ) -> PolarsResult<Self> {
        if first_us > last_us {
            polars_bail!(ComputeError: "rows without an event time");
        }
        let base_us = first_us.div_euclid(DAY_US) * DAY_US;
        Ok(Self {
            base_us,
            buckets: ((last_us - base_us) / MINUTE_US) as u64 + 1,
            currency: values("currency")?,
            city: values("city")?,
            category: values("category")?,
            product: values("product_id")?,
        })
    }
}

/// The first and last event times (`created_us`, `adjusted_us`) of `rows`;
/// `None` without any.
pub fn event_times(rows: &DataFrame) -> PolarsResult<Option<(i64, i64)>> {
    let (mut first_us, mut last_us) = (i64::MAX, i64::MIN);
    for name in ["created_us", "adjusted_us"] {
        let times = rows.column(name)?.i64()?;
        first_us = first_us.min(times.min().unwrap_or(i64::MAX));
        last_us = last_us.max(times.max().unwrap_or(i64::MIN));
    }
    Ok((first_us <= last_us).then_some((first_us, last_us)))
}

/// The grids of `rows` (a run's, or [`rows_within`] a window of it) keyed by
/// `keys`. With a `window` (`[from_us, to_us)`, whole hours or quarter hours of
/// one hour), only the cells of minutes within it: the minute and quarter-hour
/// cells exactly, the hour cells of a part of an hour and the day cells as the
/// window's part of them (summed by [`PartialCells`]).
pub fn grids_within(
    rows: &DataFrame,
    run: &RunKeys,
    window: Option<(i64, i64)>,
) -> PolarsResult<Aggregates> {
    let mut out = Aggregates::empty(Some(run));
    if rows.height() == 0 {
        return Ok(out);
    }
    let adjusting = rows.column("adjusted_us")?.is_not_null();
    let (orders, adjustments) = if adjusting.any() {
        let adjustments = rows.filter(&adjusting)?.lazy().with_column(
            col("adjustment_kind")
                .eq(lit(AdjustmentKind::Cancellation.as_str()))
                .cast(DataType::Int64)
                .alias("cancel_line"),
        );
        (rows.filter(&!&adjusting)?, adjustments.collect()?)
    } else {
        (rows.clone(), rows.clear())
    };
    // The orders' times stay in their column (millions); the adjustments' are few.
    let created = orders.column("created_us")?.i64()?;
    let booked = micros(&adjustments, "adjusted_us")?;
    let restated = micros(&adjustments, "created_us")?;
    let minute = |us: &i64| ((us - run.base_us) / MINUTE_US) as u64;
    let minutes: Vec<u64> = created.into_no_null_iter().map(|us| minute(&us)).collect();
    let buckets = run.buckets;
    let dictionary = |values: &Arc<Vec<String>>, name: &str| {
        Dictionary::coded(values, &[orders.column(name)?, adjustments.column(name)?])
    };
    let currency = dictionary(&run.currency, "currency")?;
    let city = dictionary(&run.city, "city")?;
    let category = dictionary(&run.category, "category")?;
    let product = dictionary(&run.product, "product_id")?;
    let currencies = currency.values.len() as u64;
    let (cities, categories) = (city.values.len() as u64, category.values.len() as u64);
    let layout = |values: usize| Layout {
        values: values as u64,
        currencies,
    };

    // Minute × (city, category) × currency: the place's code is city · categories
    // + category.
    let places_layout = Layout {
        values: cities * categories,
        currencies,
    }
    .check(buckets)?;
    let keys = (0..orders.height())
        .map(|i| {
            places_layout.key(
                minutes[i],
                city.codes[0][i] * categories + category.codes[0][i],
                currency.codes[0][i],
            )
        })
        .collect();
    let places = group(keys, &orders, Source::Places)?;
    // Minute × (city, category, product) × currency: the cube's code is place ·
    // products + product. Products are summed from it (an order holds a product
    // once, in one line of one category: its lines count its orders in both).
    let products = product.values.len() as u64;
    let cube_layout = Layout {
        values: cities * categories * products,
        currencies,
    }
    .check(buckets)?;
    let keys = (0..orders.height())
        .map(|i| {
            let place = city.codes[0][i] * categories + category.codes[0][i];
            cube_layout.key(
                minutes[i],
                place * products + product.codes[0][i],
                currency.codes[0][i],
            )
        })
        .collect();
    let cube = group(keys, &orders, Source::Products)?;
    drop((minutes, orders));
    let product_layout = layout(product.values.len());

    let mut minute_grids = Vec::new();
    for dimension in Dimension::ALL {
        // The grid summed from (its layout, the value code of a source cell's, the
        // source cells, what they sum).
        let regroup =
            |target: Layout, from: (Layout, &DataFrame), value: &dyn Fn(u64) -> u64, source| {
                let (layout, cells) = from;
                let keys = keys_of(cells)?
                    .iter()
                    .map(|&key| {
                        let (minute, code, currency) = layout.split(key);
                        target.key(minute, value(code), currency)
                    })
                    .collect();
                group(keys, cells, source)
            };
        let from_places = (places_layout, &places);
        let sums = Source::Cells(&MEASURES[..3]);
        let (target, cells) = match dimension {
            Dimension::Total => (layout(1), regroup(layout(1), from_places, &|_| 0, sums)?),
            Dimension::City => {
                let target = layout(city.values.len());
                (
                    target,
                    regroup(target, from_places, &|place| place / categories, sums)?,
                )
            }
            Dimension::Category => {
                let target = layout(category.values.len());
                let value = |place| place % categories;
                (
                    target,
                    regroup(target, from_places, &value, Source::PlacesByCategory)?,
                )
            }
            Dimension::CityCategory => (
                places_layout,
                regroup(
                    places_layout,
                    from_places,
                    &|place| place,
                    Source::PlacesByCategory,
                )?,
            ),
            Dimension::Product => {
                let value = |code| code % products;
                let sums = Source::Cells(&MEASURES[..3]);
                (
                    product_layout,
                    regroup(product_layout, (cube_layout, &cube), &value, sums)?,
                )
            }
            Dimension::CityCategoryProduct => (cube_layout, cube.clone()),
        };
        let cells = if adjustments.height() == 0 {
            cells
        } else {
            let place = |i: usize| city.codes[1][i] * categories + category.codes[1][i];
            let (value, cancel): (&dyn Fn(usize) -> u64, &'static str) = match dimension {
                Dimension::Total => (&|_| 0, "cancel_first"),
                Dimension::City => (&|i| city.codes[1][i], "cancel_first"),
                Dimension::Category => (&|i| category.codes[1][i], "cancel_category_first"),
                Dimension::CityCategory => (&place, "cancel_category_first"),
                Dimension::Product => (&|i| product.codes[1][i], "cancel_line"),
                Dimension::CityCategoryProduct => (
                    &|i| place(i) * products + product.codes[1][i],
                    "cancel_line",
                ),
            };
            let keys = |times: &[i64]| -> Vec<u64> {
                times
                    .iter()
                    .enumerate()
                    .map(|(i, us)| target.key(minute(us), value(i), currency.codes[1][i]))
                    .collect()
            };
            let booked = group(
                keys(&booked),
                &adjustments,
                Source::Corrections {
                    prefix: "booked",
                    cancel,
                },
            )?;
            let restated = group(
                keys(&restated),
                &adjustments,
                Source::Corrections {
                    prefix: "restated",
                    cancel,
                },
            )?;
            combine(&[cells, booked, restated])?
        };
        minute_grids.push(Grid {
            granularity: Granularity::Minute,
            dimension,
            layout: target,
            cells,
        });
    }
    drop((places, cube));
    if let Some((from_us, to_us)) = window {
        for grid in &mut minute_grids {
            grid.trim(run.base_us, from_us, to_us)?;
        }
    }
    let quarter_grids = minute_grids
        .iter()
        .map(|g| g.roll_up(Granularity::QuarterHour, 15))
        .collect::<PolarsResult<Vec<_>>>()?;
    let hour_grids = quarter_grids
        .iter()
        .map(|g| g.roll_up(Granularity::Hour, 4))
        .collect::<PolarsResult<Vec<_>>>()?;
    let day_grids = hour_grids
        .iter()
        .map(|g| g.roll_up(Granularity::Day, 24))
        .collect::<PolarsResult<Vec<_>>>()?;
    // In `revenue_agg`'s order: the granularity enum's codes (quarter hours are 4).
    out.grids = [minute_grids, hour_grids, day_grids, quarter_grids]
        .into_iter()
        .flatten()
        .collect();
    Ok(out)
}

impl Aggregates {
    fn empty(keys: Option<&RunKeys>) -> Self {
        let values =
            |f: fn(&RunKeys) -> &Arc<Vec<String>>| keys.map(f).cloned().unwrap_or_default();
        Aggregates {
            base_us: keys.map_or(0, |k| k.base_us),
            currencies: values(|k| &k.currency),
            cities: values(|k| &k.city),
            categories: values(|k| &k.category),
            products: values(|k| &k.product),
            grids: Vec::new(),
        }
    }

    /// Takes the grids of `granularity` out: a window's day grids are its part
    /// of each day's cells (and the hour grids of a window within an hour its
    /// part of the hour's), summed over the windows by [`Parts`].
    fn take(&mut self, granularity: Granularity) -> Vec<Grid> {
        let (taken, rest) = std::mem::take(&mut self.grids)
            .into_iter()
            .partition(|g| g.granularity == granularity);
        self.grids = rest;
        taken
    }

    /// Cells held, over every grid.
    pub fn cells(&self) -> usize {
        self.grids.iter().map(|g| g.cells.height()).sum()
    }

    /// Bytes the grids' cells take (polars' estimate).
    pub fn estimated_size(&self) -> usize {
        self.grids.iter().map(|g| g.cells.estimated_size()).sum()
    }
}

/// The cells of one granularity summed from ranges' parts ([`Aggregates::take`]
/// of [`grids_within`] each range, all with the run's keys) as they come: a
/// run's day cells from every range, or an hour's cells from the ranges an hour
/// too large for one range is split into. A range of one hour holds about as
/// many day cells as hour cells, so a run's parts, kept until its last range,
/// held most of its hours' cells again (gigabytes at 10M orders). A dimension's
/// parts are summed into its grid once they hold as many cells as the sum (and
/// at least `fold_cells`), so no more than about twice the sum's cells are held
/// and every part is summed about twice.
struct Parts {
    out: Aggregates,
    granularity: Granularity,
    fold_cells: usize,
    /// Per dimension: its layout, the sum so far, the parts not yet in it.
    dimensions: Vec<(Dimension, Layout, DataFrame, Vec<DataFrame>)>,
}

impl Parts {
    fn new(keys: &RunKeys, granularity: Granularity, fold_cells: usize) -> Self {
        Parts {
            out: Aggregates::empty(Some(keys)),
            granularity,
            fold_cells,
            dimensions: Vec::new(),
        }
    }

    /// Adds a range's part of the cells.
    fn add(&mut self, part: Vec<Grid>) -> PolarsResult<()> {
        for grid in part {
            let at = match self
                .dimensions
                .iter()
                .position(|(d, ..)| *d == grid.dimension)
            {
                Some(at) => at,
                None => {
                    let empty = grid.cells.clear();
                    self.dimensions
                        .push((grid.dimension, grid.layout, empty, Vec::new()));
                    self.dimensions.len() - 1
                }
            };
            let (_, _, sum, parts) = &mut self.dimensions[at];
            parts.push(grid.cells);
            let pending: usize = parts.iter().map(DataFrame::height).sum();
            if pending >= sum.height().max(self.fold_cells) {
                fold(sum, parts)?;
            }
        }
        Ok(())
    }

    /// The grids summed.
    fn finish(self) -> PolarsResult<Aggregates> {
        let mut out = self.out;
        for (dimension, layout, mut sum, mut parts) in self.dimensions {
            fold(&mut sum, &mut parts)?;
            out.grids.push(Grid {
                granularity: self.granularity,
                dimension,
                layout,
                cells: sum,
            });
        }
        Ok(out)
    }
}

/// The cells a run's ranges ([`hour_ranges`]) leave partial, summed as the ranges
/// come in order: the days' from every range, and the hour's of an hour split in
/// parts, complete once a range starts past it.
pub struct PartialCells {
    keys: RunKeys,
    fold_cells: usize,
    days: Parts,
    /// The split hour being summed: its start and its parts.
    hour: Option<(i64, Parts)>,
}

impl PartialCells {
    pub fn new(keys: &RunKeys, fold_cells: usize) -> Self {
        PartialCells {
            keys: keys.clone(),
            fold_cells,
            days: Parts::new(keys, Granularity::Day, fold_cells),
            hour: None,
        }
    }

    /// The cells of the split hour a range from `from_us` leaves, complete.
    pub fn left_before(&mut self, from_us: i64) -> PolarsResult<Option<Aggregates>> {
        match &self.hour {
            Some((start, _)) if from_us >= start + HOUR_US => {
                let (_, sums) = self.hour.take().expect("an hour is being summed");
                sums.finish().map(Some)
            }
            _ => Ok(None),
        }
    }

    /// Takes the partial grids out of the `[from_us, to_us)` range's
    /// `aggregates`: its part of the days, and of its hour if it is a part of one.
    pub fn take(
        &mut self,
        from_us: i64,
        to_us: i64,
        aggregates: &mut Aggregates,
    ) -> PolarsResult<()> {
        self.days.add(aggregates.take(Granularity::Day))?;
        if part_of_hour(from_us, to_us) {
            let start = from_us - from_us.rem_euclid(HOUR_US);
            let (keys, fold_cells) = (&self.keys, self.fold_cells);
            let (_, sums) = self
                .hour
                .get_or_insert_with(|| (start, Parts::new(keys, Granularity::Hour, fold_cells)));
            sums.add(aggregates.take(Granularity::Hour))?;
        }
        Ok(())
    }

    /// The last split hour's cells (if any), then the days'.
    pub fn finish(self) -> PolarsResult<Vec<Aggregates>> {
        let hour = self.hour.map(|(_, sums)| sums.finish()).transpose()?;
        Ok(hour.into_iter().chain([self.days.finish()?]).collect())
    }
}

/// Sums `parts` into `sum` (already summed: left as it is without parts).
fn fold(sum: &mut DataFrame, parts: &mut Vec<DataFrame>) -> PolarsResult<()> {
    if !parts.is_empty() {
        let frames = std::iter::once(std::mem::take(sum)).chain(parts.drain(..));
        *sum = combine(&frames.collect::<Vec<_>>())?;
    }
    Ok(())
}

impl Grid {
    /// Keeps only the cells of buckets that start within `[from_us, to_us)`: a
    /// zero-copy slice, the cells being sorted by key and so by bucket.
    fn trim(&mut self, base_us: i64, from_us: i64, to_us: i64) -> PolarsResult<()> {
        let width_us = self.granularity.seconds() * 1_000_000;
        let first_key = |us: i64| {
            let bucket = ((us - base_us).max(0) / width_us) as u64;
            bucket
                .saturating_mul(self.layout.values)
                .saturating_mul(self.layout.currencies)
        };
        let keys = keys_of(&self.cells)?;
        let start = keys.partition_point(|&k| k < first_key(from_us));
        let end = keys.partition_point(|&k| k < first_key(to_us));
        self.cells = self.cells.slice(start as i64, end - start);
        Ok(())
    }

    /// The grid's cells summed into buckets `factor` times as wide.
    fn roll_up(&self, granularity: Granularity, factor: u64) -> PolarsResult<Grid> {
        let layout = self.layout;
        let keys = keys_of(&self.cells)?
            .iter()
            .map(|&key| {
                let (bucket, value, currency) = layout.split(key);
                layout.key(bucket / factor, value, currency)
            })
            .collect();
        Ok(Grid {
            granularity,
            dimension: self.dimension,
            layout,
            cells: group(keys, &self.cells, Source::AllCells)?,
        })
    }
}

/// Ranges, as `[from_us, to_us)`, in order, that together cover every hour
/// holding an order's or a correction's time among `rows`, each about `size` of
/// those times: whole hours, and an hour holding more than `size` split in
/// halves or quarters (a quarter may hold more). Every minute and quarter-hour
/// cell lies within one quarter hour and every hour cell within one hour, so the
/// ranges split a run's cells into disjoint sets, each summed from
/// [`rows_within`] its range; the hours split in parts and the days are summed
/// from the ranges' parts ([`PartialCells`]).
pub fn hour_ranges(rows: &DataFrame, size: usize) -> PolarsResult<Vec<(i64, i64)>> {
    let mut per_hour = BTreeMap::new();
    count_hours(&mut per_hour, rows)?;
    Ok(ranges_of_hours(&per_hour, size))
}

/// Adds to `per_hour` (by hour since the epoch) the orders' and corrections'
/// times among `rows` (`created_us`, `adjusted_us`) that fall in each hour.
pub fn count_hours(per_hour: &mut BTreeMap<i64, usize>, rows: &DataFrame) -> PolarsResult<()> {
    if rows.height() == 0 {
        return Ok(());
    }
    for name in ["created_us", "adjusted_us"] {
        for us in rows.column(name)?.i64()?.iter().flatten() {
            *per_hour.entry(us.div_euclid(HOUR_US)).or_default() += 1;
        }
    }
    Ok(())
}

/// [`hour_ranges`] of the times counted by [`count_hours`].
pub fn ranges_of_hours(per_hour: &BTreeMap<i64, usize>, size: usize) -> Vec<(i64, i64)> {
    // Each range with the times it holds, and whether it may take the next hour.
    let mut ranges: Vec<(i64, i64, usize, bool)> = Vec::new();
    for (&hour, &count) in per_hour {
        let start = hour * HOUR_US;
        if count > size {
            let parts = if count > 2 * size { 4 } else { 2 };
            let width = HOUR_US / parts;
            ranges
                .extend((0..parts).map(|p| (start + p * width, start + (p + 1) * width, 0, false)));
            continue;
        }
        match ranges.last_mut() {
            Some((_, last, held, true)) if *held + count <= size => {
                (*last, *held) = (start + HOUR_US, *held + count);
            }
            _ => ranges.push((start, start + HOUR_US, count, true)),
        }
    }
    ranges
        .into_iter()
        .map(|(from, to, ..)| (from, to))
        .collect()
}

/// Whether a range of [`hour_ranges`] is a part of an hour (its hour cells are
/// partial, summed with the hour's other parts).
fn part_of_hour(from_us: i64, to_us: i64) -> bool {
    to_us - from_us < HOUR_US
}

/// The rows that add to cells within `[from_us, to_us)`: order lines created
/// then, and corrections booked then (at `adjusted_us`) or restating an order
/// created then: [`grids_within`] the range of them are those cells (the
/// corrections' cells outside the range are partial and left out).
pub fn rows_within(rows: &DataFrame, from_us: i64, to_us: i64) -> PolarsResult<DataFrame> {
    rows.clone().lazy().filter(within(from_us, to_us)).collect()
}

/// Whether a row is among [`rows_within`] `[from_us, to_us)`.
pub fn within(from_us: i64, to_us: i64) -> Expr {
    let within = |name: &str| col(name).gt_eq(lit(from_us)).and(col(name).lt(lit(to_us)));
    within("created_us").or(within("adjusted_us").fill_null(lit(false)))
}

/// A slice of a grid's cells taken apart: each cell's bucket start (unix
/// seconds), value code and currency code, and its measures in [`MEASURES`]'
/// order (0 where the grid lacks one).
struct CellColumns<'c> {
    buckets: Vec<u32>,
    values: Vec<u64>,
    currencies: Vec<u64>,
    measures: Vec<Cow<'c, [i64]>>,
}

/// The measures of `revenue_agg` that are unsigned (counts), by [`MEASURES`]'
/// index; the others (amounts) are signed.
const COUNTS: [usize; 6] = [1, 2, 4, 5, 7, 8];

impl Aggregates {
    /// `cells` (a grid or a slice of one) taken apart into [`CellColumns`].
    fn cell_columns<'c>(&self, grid: &Grid, cells: &'c DataFrame) -> PolarsResult<CellColumns<'c>> {
        let width_us = grid.granularity.seconds() * 1_000_000;
        let mut measures = Vec::with_capacity(MEASURES.len());
        for name in MEASURES {
            measures.push(match cells.column(name) {
                Ok(column) => int64s(column)?,
                Err(_) => Cow::Owned(vec![0; cells.height()]),
            });
        }
        let keys = keys_of(cells)?;
        let mut out = CellColumns {
            buckets: Vec::with_capacity(keys.len()),
            values: Vec::with_capacity(keys.len()),
            currencies: Vec::with_capacity(keys.len()),
            measures,
        };
        for &key in keys {
            let (bucket, value, currency) = grid.layout.split(key);
            out.buckets
                .push(((self.base_us + bucket as i64 * width_us) / 1_000_000) as u32);
            out.values.push(value);
            out.currencies.push(currency);
        }
        Ok(out)
    }

    /// The cells of `cells` (a grid or a slice of one) as blocks of
    /// `revenue_agg`'s columns in ClickHouse's Native format, one for each shard
    /// (of `shards`) holding any of them ([`tidemark_batchview::shard_of`]), in
    /// the grid's order. Columnar on both sides: a row-by-row INSERT (RowBinary)
    /// had the compactor serialize, and ClickHouse parse, each field of each row.
    pub fn staged_blocks(
        &self,
        grid: &Grid,
        cells: &DataFrame,
        run_id: u64,
        shards: usize,
    ) -> PolarsResult<Vec<(usize, Block)>> {
        let columns = self.cell_columns(grid, cells)?;
        let (granularity, dimension) = (
            granularity_code(grid.granularity),
            dimension_code(grid.dimension),
        );
        let mut blocks = Vec::new();
        for (shard, rows) in by_shard(&columns.buckets, shards) {
            let mut block = BlockBuilder::new();
            let n = rows.len();
            // Enum8 and DateTime travel as their integers; ClickHouse converts.
            column::<i8>(
                &mut block,
                "granularity",
                std::iter::repeat_n(granularity, n),
            )?;
            column::<i8>(&mut block, "dimension", std::iter::repeat_n(dimension, n))?;
            column::<u32>(
                &mut block,
                "bucket",
                rows.iter().map(|&i| columns.buckets[i]),
            )?;
            let values: Vec<Cow<'_, str>> = rows
                .iter()
                .map(|&i| self.value(grid.dimension, columns.values[i]))
                .collect();
            column::<&str>(&mut block, "value", values.iter().map(|v| &**v))?;
            column::<&str>(
                &mut block,
                "currency",
                rows.iter()
                    .map(|&i| self.currencies[columns.currencies[i] as usize].as_str()),
            )?;
            column::<u64>(&mut block, "run_id", std::iter::repeat_n(run_id, n))?;
            for (m, name) in MEASURES.into_iter().enumerate() {
                let measure = &columns.measures[m];
                let values = rows.iter().map(|&i| measure[i]);
                if COUNTS.contains(&m) {
                    column::<u64>(&mut block, name, values.map(|v| v as u64))?;
                } else {
                    column::<i64>(&mut block, name, values)?;
                }
            }
            blocks.push((shard, block.build().map_err(native)?));
        }
        Ok(blocks)
    }
}

/// The row indices of each shard holding any of `buckets` (start times, unix
/// seconds), in order.
fn by_shard(buckets: &[u32], shards: usize) -> Vec<(usize, Vec<usize>)> {
    if shards <= 1 {
        return vec![(0, (0..buckets.len()).collect())];
    }
    let mut rows = vec![Vec::new(); shards];
    for (i, &bucket) in buckets.iter().enumerate() {
        rows[tidemark_batchview::shard_of(bucket, shards)].push(i);
    }
    rows.into_iter()
        .enumerate()
        .filter(|(_, rows)| !rows.is_empty())
        .collect()
}

/// Adds a column of `values` to `block`.
fn column<T: Encode>(
    block: &mut BlockBuilder,
    name: &str,
    values: impl IntoIterator<Item = T>,
) -> PolarsResult<()> {
    block
        .upsert_column::<T>(name)
        .map_err(native)?
        .add_all(values)
        .map_err(native)?;
    Ok(())
}

/// A Native block that could not be built (a bug: the columns are made here).
fn native(e: impl std::fmt::Display) -> PolarsError {
    polars_err!(ComputeError: "a Native block: {e}")
}

/// The distinct (minute, city, category, product, currency, user) of the order
/// lines among `rows` (adjusted lines left out: a refund makes no buyer).
pub fn buyers(rows: &DataFrame) -> PolarsResult<DataFrame> {
    if rows.height() == 0 {
        return Ok(rows.clear());
    }
    rows.clone()
        .lazy()
        .filter(col("adjusted_us").is_null())
        .select([
            // The minute's start in µs (event times are after 1970: no negatives).
            (col("created_us") - col("created_us") % lit(MINUTE_US)).alias("bucket_us"),
            col("city"),
            col("category"),
            col("product_id"),
            col("currency"),
            col("user_id"),
        ])
        .unique(None, UniqueKeepStrategy::Any)
        .collect()
}

/// The rows of a [`buyers`] frame as blocks of `buyers`' columns in
/// ClickHouse's Native format, one for each shard (of `shards`) holding any of
/// them, as [`Aggregates::staged_blocks`].
pub fn buyer_blocks(
    frame: &DataFrame,
    run_id: u64,
    shards: usize,
) -> PolarsResult<Vec<(usize, Block)>> {
    if frame.height() == 0 {
        return Ok(Vec::new());
    }
    let buckets: Vec<u32> = frame
        .column("bucket_us")?
        .i64()?
        .iter()
        .map(|bucket| (bucket.unwrap_or(0) / 1_000_000).clamp(0, i64::from(u32::MAX)) as u32)
        .collect();
    // `buyers`' text columns and the frame's columns they come from.
    let mut texts = Vec::with_capacity(5);
    for (name, source) in [
        ("city", "city"),
        ("category", "category"),
        ("product", "product_id"),
        ("currency", "currency"),
        ("user_id", "user_id"),
    ] {
        let text: Vec<&str> = frame
            .column(source)?
            .str()?
            .iter()
            .map(|v| v.unwrap_or(""))
            .collect();
        texts.push((name, text));
    }
    let mut blocks = Vec::new();
    for (shard, rows) in by_shard(&buckets, shards) {
        let mut block = BlockBuilder::new();
        column::<u32>(&mut block, "bucket", rows.iter().map(|&i| buckets[i]))?;
        for (name, text) in &texts {
            column::<&str>(&mut block, name, rows.iter().map(|&i| text[i]))?;
        }
        column::<u64>(
            &mut block,
            "run_id",
            std::iter::repeat_n(run_id, rows.len()),
        )?;
        blocks.push((shard, block.build().map_err(native)?));
    }
    Ok(blocks)
}

/// One run's rows for `revenue_agg`, owned (for comparisons; staging sends
/// [`Aggregates::staged_blocks`] instead).
pub fn aggregate(rows: &DataFrame, run_id: u64) -> PolarsResult<Vec<AggRow>> {
    grids(rows)?.rows(run_id)
}

impl Aggregates {
    /// Every grid's rows, owned.
    pub fn rows(&self, run_id: u64) -> PolarsResult<Vec<AggRow>> {
        let mut out = Vec::with_capacity(self.cells());
        for grid in &self.grids {
            let c = self.cell_columns(grid, &grid.cells)?;
            let m = |k: usize, i: usize| c.measures[k][i];
            out.extend((0..c.buckets.len()).map(|i| AggRow {
                granularity: granularity_code(grid.granularity),
                dimension: dimension_code(grid.dimension),
                bucket: c.buckets[i],
                value: self.value(grid.dimension, c.values[i]).into_owned(),
                currency: self.currencies[c.currencies[i] as usize].clone(),
                run_id,
                revenue_minor: m(0, i),
                orders: m(1, i) as u64,
                items: m(2, i) as u64,
                booked_refunded_minor: m(3, i),
                booked_refunded_items: m(4, i) as u64,
                booked_cancelled_orders: m(5, i) as u64,
                restated_refunded_minor: m(6, i),
                restated_refunded_items: m(7, i) as u64,
                restated_cancelled_orders: m(8, i) as u64,
            }));
        }
        Ok(out)
    }
}

/// Adds `more` to `totals`, currency by currency.
pub fn add_totals(totals: &mut CurrencyTotals, more: CurrencyTotals) {
    for (currency, sums) in more {
        totals.entry(currency).or_default().add(sums);
    }
}

/// What the rows add up to per currency, from frames of lake rows with
/// `quantity`, `unit_price_minor`, `currency`, `order_first`, `category_first`,
/// `adjustment_kind`, `refunded_minor`, `refunded_quantity`, `cancel_first` and
/// `cancel_category_first`.
pub fn currency_totals(frame: &DataFrame) -> PolarsResult<CurrencyTotals> {
    let mut out = CurrencyTotals::new();
    if frame.height() == 0 {
        return Ok(out);
    }
    let kind = col("adjustment_kind");
    let totals = frame
        .clone()
        .lazy()
        .group_by([col("currency")])
        .agg([
            (col("quantity") * col("unit_price_minor"))
                .sum()
                .alias("revenue"),
            col("order_first").sum().alias("orders"),
            col("quantity").sum().alias("items"),
            col("category_first").sum().alias("category_orders"),
            kind.clone()
                .is_null()
                .cast(DataType::Int64)
                .sum()
                .alias("lines"),
            col("refunded_minor").sum().alias("refunded"),
            col("refunded_quantity").sum().alias("refunded_items"),
            col("cancel_first").sum().alias("cancelled"),
            col("cancel_category_first")
                .sum()
                .alias("category_cancelled"),
            kind.eq(lit(AdjustmentKind::Cancellation.as_str()))
                .cast(DataType::Int64)
                .sum()
                .alias("line_cancelled"),
        ])
        .collect()?;
    let currency = totals.column("currency")?.str()?;
    let value = |name: &str, i: usize| -> PolarsResult<i64> {
        Ok(totals.column(name)?.i64()?.get(i).unwrap_or(0))
    };
    for i in 0..totals.height() {
        out.insert(
            currency.get(i).unwrap_or("").to_owned(),
            Sums {
                revenue: value("revenue", i)?,
                orders: value("orders", i)?,
                items: value("items", i)?,
                category_orders: value("category_orders", i)?,
                lines: value("lines", i)?,
                refunded: value("refunded", i)?,
                refunded_items: value("refunded_items", i)?,
                cancelled: value("cancelled", i)?,
                category_cancelled: value("category_cancelled", i)?,
                line_cancelled: value("line_cancelled", i)?,
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn strings(values: &[String]) -> Column {
        Column::new("s".into(), values)
    }

    /// Short strings over an alphabet where byte order and char order differ
    /// (`Z` < `a` < `é`), including the empty string.
    fn text() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop::sample::select(vec!["", "a", "Z", "é", "ä", ":", "0"]),
            0..4,
        )
        .prop_map(|parts| parts.concat())
    }

    proptest! {
        #[test]
        fn dictionary_codes_sort_as_their_strings_do_in_byte_order(
            column in proptest::collection::vec(text(), 1..60),
            split in 0_usize..60,
        ) {
            // One dictionary over two columns (orders' and adjustments').
            let (a, b) = column.split_at(split.min(column.len()));
            let columns = [&strings(a), &strings(b)];
            let dict = Dictionary::coded(&Dictionary::values_of(&columns).unwrap(), &columns).unwrap();
            let codes: Vec<u64> = dict.codes.concat();
            // The values are the distinct strings, in byte order.
            let mut expected = column.clone();
            expected.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            expected.dedup();
            prop_assert_eq!(&*dict.values, &expected);
            for (i, value) in column.iter().enumerate() {
                prop_assert_eq!(&dict.values[codes[i] as usize], value);
                for (j, other) in column.iter().enumerate() {
                    prop_assert_eq!(
                        codes[i].cmp(&codes[j]),
                        value.as_bytes().cmp(other.as_bytes())
                    );
                }
            }
        }

        #[test]
        fn keys_round_trip_and_order_cells_by_bucket_value_currency(
            values in 1_u64..500,
            currencies in 1_u64..200,
            a in (0_u64..10_000, 0_u64..500, 0_u64..200),
            b in (0_u64..10_000, 0_u64..500, 0_u64..200),
        ) {
            let layout = Layout { values, currencies };
            let fit = |(bucket, value, currency): (u64, u64, u64)| {
                (bucket, value % values, currency % currencies)
            };
            let (a, b) = (fit(a), fit(b));
            let (ka, kb) = (layout.key(a.0, a.1, a.2), layout.key(b.0, b.1, b.2));
            prop_assert_eq!(layout.split(ka), a);
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
        }
    }

    #[test]
    fn a_layout_that_cannot_fit_64_bits_is_refused() {
        let layout = Layout {
            values: 1 << 30,
            currencies: 1 << 20,
        };
        assert!(layout.check(1 << 10).is_ok());
        let error = layout.check(1 << 20).unwrap_err().to_string();
        assert!(error.contains("64-bit"), "{error}");
    }

    /// An order: event time in µs, city, category, product, currency, quantity,
    /// unit price.
    type OrderRow<'a> = (i64, &'a str, &'a str, &'a str, &'a str, i64, i64);

    /// Cells of `revenue_agg`: key → `(revenue, orders, items)`.
    type Cells = BTreeMap<(i8, i8, u32, String, String), (i64, u64, u64)>;

    /// Orders with the columns aggregation reads.
    fn orders(rows: &[OrderRow<'_>]) -> DataFrame {
        let column = |name: &str, f: &dyn Fn(&OrderRow<'_>) -> String| {
            Column::new(name.into(), rows.iter().map(f).collect::<Vec<_>>())
        };
        let int = |name: &str, f: &dyn Fn(&OrderRow<'_>) -> i64| {
            Column::new(name.into(), rows.iter().map(f).collect::<Vec<_>>())
        };
        DataFrame::new(
            rows.len(),
            vec![
                int("created_us", &|r| r.0),
                column("city", &|r| r.1.to_owned()),
                column("category", &|r| r.2.to_owned()),
                column("product_id", &|r| r.3.to_owned()),
                column("currency", &|r| r.4.to_owned()),
                int("quantity", &|r| r.5),
                int("unit_price_minor", &|r| r.6),
                int("revenue", &|r| r.5 * r.6),
                // Every row its own one-line order.
                int("order_first", &|_| 1),
                int("category_first", &|_| 1),
                Column::new("adjusted_us".into(), vec![None::<i64>; rows.len()]),
                Column::new("adjustment_kind".into(), vec![None::<&str>; rows.len()]),
                int("refunded_minor", &|_| 0),
                int("refunded_quantity", &|_| 0),
                int("cancel_first", &|_| 0),
                int("cancel_category_first", &|_| 0),
            ],
        )
        .unwrap()
    }

    proptest! {
        /// Grids summed by sorting (`sum_by_key`), then merged with others that
        /// lack some measures (`combine`), equal each key's sums counted one row
        /// at a time, in key order, each key once.
        #[test]
        fn cells_summed_by_sorting_and_merged_equal_each_keys_sums(
            frames in proptest::collection::vec(
                proptest::collection::vec((0_u64..40, -1_000_i64..1_000), 0..60),
                1..5,
            ),
        ) {
            let mut model: BTreeMap<u64, [i64; 2]> = BTreeMap::new();
            let grids: Vec<DataFrame> = frames
                .iter()
                .enumerate()
                .map(|(i, rows)| {
                    // Every other frame sums the second measure, the others count rows
                    // into the first.
                    let measure = MEASURES[i % 2];
                    for &(key, value) in rows {
                        let sum = model.entry(key).or_default();
                        sum[i % 2] += if i % 2 == 0 { 1 } else { value };
                    }
                    let values: Vec<i64> = rows.iter().map(|&(_, v)| v).collect();
                    let summed = (i % 2 == 1).then_some(Cow::Owned(values));
                    sum_by_key(
                        rows.iter().map(|&(key, _)| key).collect(),
                        vec![(measure.to_owned(), summed)],
                    )
                    .unwrap()
                })
                .collect();
            for grid in &grids {
                let keys = keys_of(grid).unwrap();
                prop_assert!(keys.windows(2).all(|pair| pair[0] < pair[1]));
            }
            let combined = combine(&grids).unwrap();
            let keys = keys_of(&combined).unwrap().to_vec();
            let sums = |m: &str| int64s(combined.column(m).unwrap()).unwrap().into_owned();
            let (first, second) = (sums(MEASURES[0]), sums(MEASURES[1]));
            let got: BTreeMap<u64, [i64; 2]> = keys
                .iter()
                .enumerate()
                .map(|(i, &key)| (key, [first[i], second[i]]))
                .collect();
            prop_assert_eq!(keys.len(), got.len());
            prop_assert!(keys.windows(2).all(|pair| pair[0] < pair[1]));
            prop_assert_eq!(got, model);
            for measure in &MEASURES[2..] {
                prop_assert!(sums(measure).iter().all(|&v| v == 0));
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The packed-key aggregation equals a plain group-by over strings, and
        /// its rows come in `revenue_agg`'s order.
        #[test]
        fn aggregates_equal_a_plain_group_by_in_revenue_agg_order(
            rows in proptest::collection::vec(
                (
                    0_i64..3 * DAY_US,
                    prop::sample::select(vec!["Berlin", "Zürich", "São Paulo"]),
                    prop::sample::select(vec!["books", "games"]),
                    prop::sample::select(vec!["p:1", "p-2", "p-10"]),
                    prop::sample::select(vec!["EUR", "JPY", "KWD"]),
                    1_i64..10,
                    0_i64..100_000,
                ),
                1..80,
            )
        ) {
            // Event times from a day-aligned start, so the run's first midnight is known.
            let start = 1_764_000_000_000_000 / DAY_US * DAY_US;
            let rows: Vec<_> = rows.into_iter().map(|r| (start + r.0, r.1, r.2, r.3, r.4, r.5, r.6)).collect();
            let got = aggregate(&orders(&rows), 7).unwrap();
            let mut expected = Cells::new();
            for g in Granularity::ALL {
                let width = g.seconds() * 1_000_000;
                for d in Dimension::ALL {
                    for r in &rows {
                        let value = d.join(|a| match a {
                            Attribute::City => r.1,
                            Attribute::Category => r.2,
                            Attribute::Product => r.3,
                        });
                        let bucket = (r.0.div_euclid(width) * width / 1_000_000) as u32;
                        let cell = expected
                            .entry((granularity_code(g), dimension_code(d), bucket, value.into_owned(), r.4.to_owned()))
                            .or_default();
                        cell.0 += r.5 * r.6;
                        cell.1 += 1;
                        cell.2 += r.5 as u64;
                    }
                }
            }
            let keys: Vec<_> = got
                .iter()
                .map(|r| (r.granularity, r.dimension, r.bucket, r.value.clone(), r.currency.clone()))
                .collect();
            let mut sorted = keys.clone();
            sorted.sort_by(|a, b| (a.0, a.1, a.2, a.3.as_bytes(), a.4.as_bytes()).cmp(&(b.0, b.1, b.2, b.3.as_bytes(), b.4.as_bytes())));
            prop_assert_eq!(&keys, &sorted, "rows in revenue_agg's order");
            let got: BTreeMap<_, _> = got
                .into_iter()
                .map(|r| {
                    prop_assert_eq!(r.run_id, 7);
                    Ok(((r.granularity, r.dimension, r.bucket, r.value, r.currency), (r.revenue_minor, r.orders, r.items)))
                })
                .collect::<Result<_, TestCaseError>>()?;
            prop_assert_eq!(got, expected);
        }
    }

    /// A row's cell key (granularity, dimension, bucket, value, currency).
    fn cell(r: &AggRow) -> (i8, i8, u32, String, String) {
        (
            r.granularity,
            r.dimension,
            r.bucket,
            r.value.clone(),
            r.currency.clone(),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        // Few cases, few ranges each: every range is a full aggregation, slow in
        // a debug build (64 cases with ranges of one line took 240 s in CI).

        /// Staging aggregates a run a range of hours (or of quarter hours of an
        /// hour holding more than a range) at a time: the ranges' cells are
        /// disjoint and, with the days and the split hours summed from their
        /// parts, equal the whole run's, corrections booked in another quarter,
        /// hour or day than their order's included; so are the buyers.
        #[test]
        fn cells_aggregated_a_range_of_hours_at_a_time_equal_the_whole_runs(
            rows in proptest::collection::vec(
                (
                    0_i64..5 * DAY_US,
                    prop::sample::select(vec!["Berlin", "Oslo"]),
                    prop::sample::select(vec!["books", "games"]),
                    prop::sample::select(vec!["p-1", "p-2"]),
                    prop::sample::select(vec!["EUR", "JPY"]),
                    1_i64..5,
                    0_i64..1_000,
                    (0_u8..4, proptest::option::of((0_i64..3 * DAY_US, any::<bool>()))),
                ),
                1..48,
            ),
            size in 1_usize..40,
            fold_cells in 0_usize..6,
            dense in any::<bool>(),
        ) {
            let start = 1_764_000_000_000_000 / DAY_US * DAY_US;
            // Dense: every time within two hours, so that hours hold more than a
            // range and are split in parts.
            let time = |us: i64| if dense { us % (2 * HOUR_US) } else { us };
            let lines: Vec<_> = rows
                .iter()
                .map(|r| (start + time(r.0), r.1, r.2, r.3, r.4, r.5, r.6))
                .collect();
            let mut frame = orders(&lines);
            let users: Vec<String> = rows.iter().map(|r| format!("u{}", r.7.0)).collect();
            frame.with_column(Column::new("user_id".into(), users)).unwrap();
            // Each correction a row of its own: its order's time and line, the
            // time it was booked, what it takes back.
            let corrected: Vec<(usize, i64, bool)> = rows
                .iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    r.7.1.map(|(after, cancel)| (i, lines[i].0 + time(after), cancel))
                })
                .collect();
            if !corrected.is_empty() {
                let picks: Vec<IdxSize> = corrected.iter().map(|c| c.0 as IdxSize).collect();
                let mut adjustments = frame.take(&IdxCa::new("i".into(), picks)).unwrap();
                let int = |name: &str, f: &dyn Fn(&(usize, i64, bool)) -> i64| {
                    Column::new(name.into(), corrected.iter().map(f).collect::<Vec<_>>())
                };
                let columns = [
                    Column::new(
                        "adjusted_us".into(),
                        corrected.iter().map(|c| Some(c.1)).collect::<Vec<_>>(),
                    ),
                    Column::new(
                        "adjustment_kind".into(),
                        corrected
                            .iter()
                            .map(|c| Some(if c.2 { "cancellation" } else { "refund" }))
                            .collect::<Vec<_>>(),
                    ),
                    int("refunded_minor", &|c| lines[c.0].5 * lines[c.0].6),
                    int("refunded_quantity", &|c| lines[c.0].5),
                    int("cancel_first", &|c| i64::from(c.2)),
                    int("cancel_category_first", &|c| i64::from(c.2)),
                ];
                for column in columns {
                    let name = column.name().clone();
                    adjustments.replace(&name, column).unwrap();
                }
                frame.vstack_mut(&adjustments).unwrap();
            }
            let whole = aggregate(&frame, 1).unwrap();
            let (mut parts, mut buyer_rows) = (Vec::new(), 0);
            let keys = RunKeys::of(&frame).unwrap().unwrap();
            let mut partial = PartialCells::new(&keys, fold_cells);
            let ranges = hour_ranges(&frame, size).unwrap();
            for window in ranges.windows(2) {
                prop_assert!(window[0].1 <= window[1].0, "ranges in order, apart");
            }
            for &(from, to) in &ranges {
                if part_of_hour(from, to) {
                    let quarter = HOUR_US / 4;
                    prop_assert_eq!((from % quarter, to % quarter), (0, 0));
                    prop_assert_eq!(from.div_euclid(HOUR_US), (to - 1).div_euclid(HOUR_US));
                } else {
                    prop_assert_eq!((from % HOUR_US, to % HOUR_US), (0, 0));
                }
                if let Some(hour) = partial.left_before(from).unwrap() {
                    parts.extend(hour.rows(1).unwrap());
                }
                let rows = rows_within(&frame, from, to).unwrap();
                let mut aggregates = grids_within(&rows, &keys, Some((from, to))).unwrap();
                partial.take(from, to, &mut aggregates).unwrap();
                parts.extend(aggregates.rows(1).unwrap());
                buyer_rows += buyers(&rows).unwrap().height();
            }
            for summed in partial.finish().unwrap() {
                parts.extend(summed.rows(1).unwrap());
            }
            let cells = |rows: &[AggRow]| -> BTreeMap<_, _> {
                rows.iter().map(|r| (cell(r), r.clone())).collect()
            };
            let (whole_cells, part_cells) = (cells(&whole), cells(&parts));
            prop_assert_eq!(part_cells.len(), parts.len(), "no cell in two ranges");
            prop_assert_eq!(whole_cells, part_cells);
            prop_assert_eq!(buyer_rows, buyers(&frame).unwrap().height());
        }
    }

    #[test]
    fn an_hour_holding_more_than_a_range_is_split_in_halves_or_quarters() {
        let per_hour = BTreeMap::from([(0, 3), (1, 10), (2, 25), (3, 2), (4, 2), (6, 5)]);
        let (h, q) = (HOUR_US, HOUR_US / 4);
        assert_eq!(
            ranges_of_hours(&per_hour, 8),
            [
                (0, h),
                (h, h + 2 * q),
                (h + 2 * q, 2 * h),
                (2 * h, 2 * h + q),
                (2 * h + q, 2 * h + 2 * q),
                (2 * h + 2 * q, 2 * h + 3 * q),
                (2 * h + 3 * q, 3 * h),
                (3 * h, 5 * h),
                (6 * h, 7 * h),
            ]
        );
        assert!(part_of_hour(h, h + 2 * q) && !part_of_hour(3 * h, 5 * h));
    }

    #[test]
    fn a_basket_counts_once_in_total_and_by_city_once_per_category_and_per_product() {
        let mut frame = orders(&[
            (0, "Oslo", "books", "p-1", "EUR", 2, 100),
            (0, "Oslo", "books", "p-2", "EUR", 1, 1_000),
            (0, "Oslo", "games", "p-3", "EUR", 3, 10),
        ]);
        // One order of three lines: the first counts the order, the first of each
        // category counts it there.
        frame
            .replace(
                "order_first",
                Column::new("order_first".into(), [1_i64, 0, 0]),
            )
            .unwrap();
        frame
            .replace(
                "category_first",
                Column::new("category_first".into(), [1_i64, 0, 1]),
            )
            .unwrap();
        let rows = aggregate(&frame, 1).unwrap();
        let day = |d: Dimension| -> Vec<(String, i64, u64, u64)> {
            rows.iter()
                .filter(|r| r.granularity == granularity_code(Granularity::Day))
                .filter(|r| r.dimension == dimension_code(d))
                .map(|r| (r.value.clone(), r.revenue_minor, r.orders, r.items))
                .collect()
        };
        assert_eq!(day(Dimension::Total), [(String::new(), 1_230, 1, 6)]);
        assert_eq!(day(Dimension::City), [("Oslo".into(), 1_230, 1, 6)]);
        assert_eq!(
            day(Dimension::Category),
            [("books".into(), 1_200, 1, 3), ("games".into(), 30, 1, 3)]
        );
        assert_eq!(day(Dimension::Product).len(), 3);
        assert_eq!(
            day(Dimension::CityCategory),
            [
                ("Oslo\u{1f}books".into(), 1_200, 1, 3),
                ("Oslo\u{1f}games".into(), 30, 1, 3)
            ]
        );
        assert_eq!(
            day(Dimension::CityCategoryProduct),
            [
                ("Oslo\u{1f}books\u{1f}p-1".into(), 200, 1, 2),
                ("Oslo\u{1f}books\u{1f}p-2".into(), 1_000, 1, 1),
                ("Oslo\u{1f}games\u{1f}p-3".into(), 30, 1, 3)
            ]
        );
        let totals = currency_totals(&frame).unwrap()["EUR"];
        assert_eq!(totals.of(Dimension::Total), [1_230, 1, 6]);
        assert_eq!(totals.of(Dimension::Category)[1], 2);
        assert_eq!(totals.of(Dimension::Product)[1], 3);
    }

    #[test]
    fn currency_totals_add_up_per_currency() {
        let frame = orders(&[
            (0, "Berlin", "books", "p", "EUR", 2, 150),
            (1, "Oslo", "books", "p", "EUR", 1, 100),
            (2, "Oslo", "games", "q", "KWD", 3, 1_299),
        ]);
        let mut totals = currency_totals(&frame).unwrap();
        assert_eq!(totals["EUR"].of(Dimension::Total), [400, 2, 3]);
        assert_eq!(totals["KWD"].of(Dimension::Total), [3_897, 1, 3]);
        add_totals(&mut totals, currency_totals(&frame).unwrap());
        assert_eq!(totals["EUR"].of(Dimension::Total), [800, 4, 6]);
    }
}
