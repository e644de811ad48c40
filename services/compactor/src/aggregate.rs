//! Aggregates with polars: revenue, orders and items per time bucket, dimension
//! value and currency, for every granularity and dimension.

use std::collections::BTreeMap;

use polars::prelude::*;
use tidemark_batchview::{AggRow, dimension_code, granularity_code};
use tidemark_domain::{Dimension, Granularity};

/// Per currency: `[revenue, orders, items]`.
pub type CurrencyTotals = BTreeMap<String, [i64; 3]>;

fn value_of(dimension: Dimension) -> Expr {
    match dimension {
        Dimension::Total => lit(""),
        Dimension::City => col("city"),
        Dimension::Category => col("category"),
        Dimension::Product => col("product_id"),
    }
}

/// One granularity × dimension of a run's aggregates: a frame with `bucket_us`,
/// `value`, `currency`, `revenue_minor`, `orders` and `items`, one row per cell.
pub struct Grid {
    pub granularity: Granularity,
    pub dimension: Dimension,
    pub cells: DataFrame,
}

/// Every granularity × dimension grid of the orders (which carry `created_us` and
/// `revenue`).
///
/// The orders are grouped twice: by minute × city × category × currency (a grid
/// far smaller than the orders, from which the total, city and category minute
/// grids are summed) and by minute × product × currency. Hours are rolled up from
/// minutes and days from hours (sums compose).
pub fn grids(orders: &DataFrame) -> PolarsResult<Vec<Grid>> {
    let mut grids = Vec::new();
    if orders.height() == 0 {
        return Ok(grids);
    }
    let by_minute = |keys: &[Expr]| {
        let keys: Vec<Expr> = [col("bucket_us")]
            .into_iter()
            .chain(keys.iter().cloned())
            .chain([col("currency")])
            .collect();
        orders
            .clone()
            .lazy()
            .with_column(
                (col("created_us") - col("created_us") % lit(60_000_000_i64)).alias("bucket_us"),
            )
            .group_by(keys)
            .agg([
                col("revenue").sum().alias("revenue_minor"),
                len().cast(DataType::Int64).alias("orders"),
                col("quantity").sum().alias("items"),
            ])
    };
    let places = by_minute(&[col("city"), col("category")]).collect()?;
    for dimension in Dimension::ALL {
        let minutes = match dimension {
            Dimension::Product => by_minute(&[value_of(dimension).alias("value")]).collect()?,
            _ => sum_cells(
                places
                    .clone()
                    .lazy()
                    .with_column(value_of(dimension).alias("value")),
            )
            .collect()?,
        };
        let hours = roll_up(&minutes, Granularity::Hour)?;
        let days = roll_up(&hours, Granularity::Day)?;
        for (granularity, cells) in [
            (Granularity::Minute, minutes),
            (Granularity::Hour, hours),
            (Granularity::Day, days),
        ] {
            grids.push(Grid {
                granularity,
                dimension,
                cells,
            });
        }
    }
    Ok(grids)
}

/// A grid's cells summed into the coarser buckets of `granularity`.
fn roll_up(cells: &DataFrame, granularity: Granularity) -> PolarsResult<DataFrame> {
    let width_us = granularity.seconds() * 1_000_000;
    sum_cells(
        cells
            .clone()
            .lazy()
            .with_column((col("bucket_us") - col("bucket_us") % lit(width_us)).alias("bucket_us")),
    )
    .collect()
}

/// Cells with the same bucket, value and currency summed into one.
fn sum_cells(cells: LazyFrame) -> LazyFrame {
    cells
        .group_by([col("bucket_us"), col("value"), col("currency")])
        .agg([
            col("revenue_minor").sum(),
            col("orders").sum(),
            col("items").sum(),
        ])
}

/// A row of a run's staging table, borrowing its strings from a grid.
#[derive(clickhouse::Row, serde::Serialize)]
pub struct StagedRow<'a> {
    pub granularity: i8,
    pub dimension: i8,
    /// Bucket start, unix seconds.
    pub bucket: u32,
    pub value: &'a str,
    pub currency: &'a str,
    pub run_id: u64,
    pub revenue_minor: i64,
    pub orders: u64,
    pub items: u64,
}

/// The rows of (a slice of) a grid, in `revenue_agg`'s column order.
pub fn staged_rows<'a>(
    cells: &'a DataFrame,
    granularity: Granularity,
    dimension: Dimension,
    run_id: u64,
) -> PolarsResult<Vec<StagedRow<'a>>> {
    let bucket = cells.column("bucket_us")?.i64()?;
    let value = cells.column("value")?.str()?;
    let currency = cells.column("currency")?.str()?;
    let revenue = cells.column("revenue_minor")?.i64()?;
    let count = cells.column("orders")?.i64()?;
    let items = cells.column("items")?.i64()?;
    let (granularity, dimension) = (granularity_code(granularity), dimension_code(dimension));
    Ok(bucket
        .iter()
        .zip(value.iter())
        .zip(currency.iter())
        .zip(revenue.iter())
        .zip(count.iter().zip(items.iter()))
        .map(
            |((((bucket, value), currency), revenue), (count, items))| StagedRow {
                granularity,
                dimension,
                bucket: (bucket.unwrap_or(0) / 1_000_000) as u32,
                value: value.unwrap_or(""),
                currency: currency.unwrap_or(""),
                run_id,
                revenue_minor: revenue.unwrap_or(0),
                orders: count.unwrap_or(0) as u64,
                items: items.unwrap_or(0) as u64,
            },
        )
        .collect())
}

/// One run's rows for `revenue_agg`, owned (for comparisons; staging streams
/// [`StagedRow`]s instead).
pub fn aggregate(orders: &DataFrame, run_id: u64) -> PolarsResult<Vec<AggRow>> {
    let mut rows = Vec::new();
    for grid in grids(orders)? {
        rows.extend(
            staged_rows(&grid.cells, grid.granularity, grid.dimension, run_id)?
                .into_iter()
                .map(|r| AggRow {
                    granularity: r.granularity,
                    dimension: r.dimension,
                    bucket: r.bucket,
                    value: r.value.to_owned(),
                    currency: r.currency.to_owned(),
                    run_id: r.run_id,
                    revenue_minor: r.revenue_minor,
                    orders: r.orders,
                    items: r.items,
                }),
        );
    }
    Ok(rows)
}

/// Revenue, orders and items per currency, from frames with `quantity`,
/// `unit_price_minor` and `currency`.
pub fn currency_totals(frame: &DataFrame) -> PolarsResult<CurrencyTotals> {
    let mut out = CurrencyTotals::new();
    if frame.height() == 0 {
        return Ok(out);
    }
    let totals = frame
        .clone()
        .lazy()
        .group_by([col("currency")])
        .agg([
            (col("quantity") * col("unit_price_minor"))
                .sum()
                .alias("revenue"),
            len().cast(DataType::Int64).alias("orders"),
            col("quantity").sum().alias("items"),
        ])
        .collect()?;
    let currency = totals.column("currency")?.str()?;
    let revenue = totals.column("revenue")?.i64()?;
    let orders = totals.column("orders")?.i64()?;
    let items = totals.column("items")?.i64()?;
    for i in 0..totals.height() {
        out.insert(
            currency.get(i).unwrap_or("").to_owned(),
            [
                revenue.get(i).unwrap_or(0),
                orders.get(i).unwrap_or(0),
                items.get(i).unwrap_or(0),
            ],
        );
    }
    Ok(out)
}
