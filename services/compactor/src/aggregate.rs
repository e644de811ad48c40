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

/// One run's rows for `revenue_agg` from orders carrying `created_us` and `revenue`.
///
/// Each dimension is grouped once by minute over the orders; hours and days are
/// rolled up from those (much smaller) minute grids, since sums compose.
pub fn aggregate(orders: &DataFrame, run_id: u64) -> PolarsResult<Vec<AggRow>> {
    let mut rows = Vec::new();
    if orders.height() == 0 {
        return Ok(rows);
    }
    for dimension in Dimension::ALL {
        let minutes = orders
            .clone()
            .lazy()
            .with_columns([
                (col("created_us") - col("created_us") % lit(60_000_000_i64)).alias("bucket_us"),
                value_of(dimension).alias("value"),
            ])
            .group_by([col("bucket_us"), col("value"), col("currency")])
            .agg([
                col("revenue").sum().alias("revenue_minor"),
                len().cast(DataType::Int64).alias("orders"),
                col("quantity").sum().alias("items"),
            ])
            .collect()?;
        for granularity in Granularity::ALL {
            let grid = if granularity == Granularity::Minute {
                minutes.clone()
            } else {
                let width_us = granularity.seconds() * 1_000_000;
                minutes
                    .clone()
                    .lazy()
                    .with_column(
                        (col("bucket_us") - col("bucket_us") % lit(width_us)).alias("bucket_us"),
                    )
                    .group_by([col("bucket_us"), col("value"), col("currency")])
                    .agg([
                        col("revenue_minor").sum(),
                        col("orders").sum(),
                        col("items").sum(),
                    ])
                    .collect()?
            };
            push_rows(&grid, granularity, dimension, run_id, &mut rows)?;
        }
    }
    Ok(rows)
}

fn push_rows(
    grid: &DataFrame,
    granularity: Granularity,
    dimension: Dimension,
    run_id: u64,
    rows: &mut Vec<AggRow>,
) -> PolarsResult<()> {
    let bucket = grid.column("bucket_us")?.i64()?;
    let value = grid.column("value")?.str()?;
    let currency = grid.column("currency")?.str()?;
    let revenue = grid.column("revenue_minor")?.i64()?;
    let count = grid.column("orders")?.i64()?;
    let items = grid.column("items")?.i64()?;
    for i in 0..grid.height() {
        rows.push(AggRow {
            granularity: granularity_code(granularity),
            dimension: dimension_code(dimension),
            bucket: (bucket.get(i).unwrap_or(0) / 1_000_000) as u32,
            value: value.get(i).unwrap_or("").to_owned(),
            currency: currency.get(i).unwrap_or("").to_owned(),
            run_id,
            revenue_minor: revenue.get(i).unwrap_or(0),
            orders: count.get(i).unwrap_or(0) as u64,
            items: items.get(i).unwrap_or(0) as u64,
        });
    }
    Ok(())
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
