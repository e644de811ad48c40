//! A run's order lines and corrections, held from the lake step to the audit.
//!
//! The stage aggregates a run a range of hours at a time and the audit counts it
//! whole, so the run's rows stay in memory between the steps: the columns both
//! read ([`lake::MEASURED`]): as the lake step makes them, eleven 64-bit integers
//! and six text columns, each text value a 16-byte view and its bytes (polars'
//! `estimated_size` counts only the bytes). The text columns that few distinct
//! values fill are held as codes into the run's values instead (4 bytes a row),
//! flags and quantities in narrower integers, and revenue is computed when a range
//! is read rather than held. Ranges are read back as polars frames of the same
//! columns and types as before ([`Held::within`]), so aggregation is unchanged.

use std::sync::Arc;

use polars::prelude::*;

use crate::aggregate::{self, CurrencyTotals, RunKeys};
use crate::lake::MEASURED;

/// The text columns held as codes (`UInt32`, null for null). `user_id` keeps its
/// text: it has nearly a value per row.
const CODED: [&str; 5] = [
    "adjustment_kind",
    "city",
    "category",
    "product_id",
    "currency",
];

/// The integer columns held narrower than the lake step makes them (`Int64`): 0/1
/// flags as booleans (a bit), quantities in four bytes. Narrowed strictly (a
/// value that does not fit fails the run, never changes or turns null) and
/// widened back when read.
fn narrowed() -> [(&'static str, DataType); 6] {
    [
        ("cancel_first", DataType::Boolean),
        ("cancel_category_first", DataType::Boolean),
        ("order_first", DataType::Boolean),
        ("category_first", DataType::Boolean),
        ("quantity", DataType::Int32),
        ("refunded_quantity", DataType::Int32),
    ]
}

/// Rows decoded at once where the audit reads the whole run.
const ROWS_AT_ONCE: usize = 1 << 20;

/// Builds a [`Held`] from a run's frames of [`MEASURED`] columns, one at a time.
#[derive(Default)]
pub struct Holder {
    frames: Vec<DataFrame>,
    codes: [PlHashMap<String, u32>; CODED.len()],
    values: [Vec<String>; CODED.len()],
}

impl Holder {
    /// Adds rows with the [`MEASURED`] columns.
    pub fn add(&mut self, measured: &DataFrame) -> PolarsResult<()> {
        let mut held = measured.drop("revenue")?;
        for (i, name) in CODED.into_iter().enumerate() {
            let (codes, values) = (&mut self.codes[i], &mut self.values[i]);
            let coded: UInt32Chunked = held
                .column(name)?
                .str()?
                .iter()
                .map(|value| {
                    value.map(|value| {
                        *codes.entry_ref(value).or_insert_with(|| {
                            values.push(value.to_owned());
                            (values.len() - 1) as u32
                        })
                    })
                })
                .collect();
            held.with_column(coded.with_name(name.into()).into_column())?;
        }
        for (name, dtype) in narrowed() {
            let wide = held.column(name)?;
            if dtype == DataType::Boolean {
                let flags = wide.i64()?;
                if flags.min().unwrap_or(0) < 0 || flags.max().unwrap_or(0) > 1 {
                    polars_bail!(ComputeError: "{name} holds a value other than 0 and 1");
                }
            }
            let narrow = wide.strict_cast(&dtype)?;
            held.with_column(narrow)?;
        }
        self.frames.push(held);
        Ok(())
    }

    pub fn finish(self) -> PolarsResult<Held> {
        let frame = match self.frames.len() {
            0 => DataFrame::empty(),
            _ => concat(
                self.frames
                    .into_iter()
                    .map(IntoLazy::lazy)
                    .collect::<Vec<_>>(),
                UnionArgs::default(),
            )?
            .collect()?,
        };
        Ok(Held {
            frame,
            values: Arc::new(self.values),
        })
    }
}

/// A run's rows with the [`MEASURED`] columns, text columns coded (see the module).
#[derive(Clone)]
pub struct Held {
    frame: DataFrame,
    /// Each coded column's values, by code.
    values: Arc<[Vec<String>; CODED.len()]>,
}

impl Held {
    /// Holds `measured` (rows with the [`MEASURED`] columns).
    pub fn of(measured: &DataFrame) -> PolarsResult<Held> {
        let mut holder = Holder::default();
        if measured.height() > 0 {
            holder.add(measured)?;
        }
        holder.finish()
    }

    pub fn height(&self) -> usize {
        self.frame.height()
    }

    /// Bytes held by the rows (polars' estimate; the values not counted).
    pub fn estimated_size(&self) -> usize {
        self.frame.estimated_size()
    }

    /// The rows that add to cells within `[from_us, to_us)`
    /// ([`aggregate::rows_within`]), with the [`MEASURED`] columns as the lake
    /// step made them.
    pub fn within(&self, from_us: i64, to_us: i64) -> PolarsResult<DataFrame> {
        self.decoded(aggregate::rows_within(&self.frame, from_us, to_us)?)
    }

    /// Every row with the [`MEASURED`] columns (a copy of the whole run as the lake
    /// step made it: for small runs and tests).
    pub fn rows(&self) -> PolarsResult<DataFrame> {
        self.decoded(self.frame.clone())
    }

    /// The run's keys (first midnight, minutes, dictionaries) for
    /// [`aggregate::grids_within`]; `None` without rows.
    pub fn keys(&self) -> PolarsResult<Option<RunKeys>> {
        if self.height() == 0 {
            return Ok(None);
        }
        RunKeys::spanning(&self.frame, |name| {
            let i = CODED
                .iter()
                .position(|c| *c == name)
                .ok_or_else(|| polars_err!(ColumnNotFound: "{name} is not a coded column"))?;
            let mut values = self.values[i].clone();
            // A null reads as "" in the dictionaries (as `Dictionary::values_of`).
            if self.frame.column(name)?.null_count() > 0 {
                values.push(String::new());
            }
            values.sort_unstable();
            values.dedup();
            Ok(Arc::new(values))
        })
        .map(Some)
    }

    /// The run's ranges of whole hours ([`aggregate::hour_ranges`]).
    pub fn hour_ranges(&self, size: usize) -> PolarsResult<Vec<(i64, i64)>> {
        aggregate::hour_ranges(&self.frame, size)
    }

    /// [`aggregate::currency_totals`] of every row, read [`ROWS_AT_ONCE`] at a time.
    pub fn currency_totals(&self) -> PolarsResult<CurrencyTotals> {
        let mut totals = CurrencyTotals::new();
        for offset in (0..self.height()).step_by(ROWS_AT_ONCE) {
            let rows = self.decoded(self.frame.slice(offset as i64, ROWS_AT_ONCE))?;
            aggregate::add_totals(&mut totals, aggregate::currency_totals(&rows)?);
        }
        Ok(totals)
    }

    /// The distinct users of the run's order lines (corrections left out).
    pub fn buyers(&self) -> PolarsResult<u64> {
        if self.height() == 0 {
            return Ok(0);
        }
        let users = self
            .frame
            .clone()
            .lazy()
            .filter(col("adjusted_us").is_null())
            .select([col("user_id").n_unique()])
            .collect()?;
        Ok(users
            .column("user_id")?
            .cast(&DataType::UInt64)?
            .u64()?
            .get(0)
            .unwrap_or(0))
    }

    /// Held rows with their text decoded and revenue computed, in
    /// [`MEASURED`]'s order.
    fn decoded(&self, mut rows: DataFrame) -> PolarsResult<DataFrame> {
        for (i, name) in CODED.into_iter().enumerate() {
            let values = &self.values[i];
            let text: StringChunked = rows
                .column(name)?
                .u32()?
                .iter()
                .map(|code| code.map(|code| values[code as usize].as_str()))
                .collect();
            rows.with_column(text.with_name(name.into()).into_column())?;
        }
        for (name, _) in narrowed() {
            let wide = rows.column(name)?.cast(&DataType::Int64)?;
            rows.with_column(wide)?;
        }
        rows.lazy()
            .with_column((col("quantity") * col("unit_price_minor")).alias("revenue"))
            .select(MEASURED.map(col))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured() -> DataFrame {
        df! {
            "created_us" => [3_600_000_000i64, 7_200_000_000, 7_300_000_000],
            "user_id" => ["u1", "u2", "u1"],
            "adjusted_us" => [None, None, Some(10_800_000_000i64)],
            "adjustment_kind" => [None, None, Some("refund")],
            "refunded_quantity" => [0i64, 0, 1],
            "refunded_minor" => [0i64, 0, 250],
            "cancel_first" => [0i64, 0, 0],
            "cancel_category_first" => [0i64, 0, 0],
            "revenue" => [500i64, 300, 0],
            "quantity" => [2i64, 1, 0],
            "unit_price_minor" => [250i64, 300, 250],
            "city" => ["Berlin", "Paris", "Berlin"],
            "category" => ["books", "books", "toys"],
            "product_id" => ["p1", "p2", "p1"],
            "currency" => ["EUR", "EUR", "JPY"],
            "order_first" => [1i64, 1, 0],
            "category_first" => [1i64, 1, 0],
        }
        .unwrap()
    }

    #[test]
    fn held_rows_read_back_as_they_were_given_and_hold_less() {
        let rows = measured();
        let mut holder = Holder::default();
        holder.add(&rows.slice(0, 2)).unwrap();
        holder.add(&rows.slice(2, 1)).unwrap();
        let held = holder.finish().unwrap();
        assert_eq!(held.rows().unwrap(), rows);
        assert!(held.estimated_size() < rows.estimated_size());
        // The refund restates an order of the third hour and is booked in the fourth.
        let hour = 3_600_000_000;
        assert_eq!(held.within(hour, 2 * hour).unwrap(), rows.slice(0, 1));
        assert_eq!(
            held.within(2 * hour, 4 * hour).unwrap(),
            rows.slice(1, 2),
            "the third hour's line and the refund booked in the fourth"
        );
        assert_eq!(held.buyers().unwrap(), 2);
        assert_eq!(
            held.currency_totals().unwrap(),
            aggregate::currency_totals(&rows).unwrap()
        );
    }

    #[test]
    fn a_value_that_does_not_fit_its_held_type_fails_the_run() {
        let mut rows = measured();
        rows.with_column(Column::new("order_first".into(), [1i64, 2, 0]))
            .unwrap();
        assert!(Holder::default().add(&rows).is_err(), "a flag of 2");
        let mut rows = measured();
        rows.with_column(Column::new("quantity".into(), [1i64 << 40, 1, 0]))
            .unwrap();
        assert!(Holder::default().add(&rows).is_err(), "a quantity past i32");
    }
}
