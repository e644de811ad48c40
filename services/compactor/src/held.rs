//! A run's order lines and corrections, held from the lake step to the audit.
//!
//! The stage aggregates a run a range of whole hours at a time, so the run's rows
//! are held by hour: each row in the hour of its order's time (`created_us`), and a
//! correction booked in another hour also in that one (a *booked copy*), so that a
//! range reads only its own hours and gets exactly [`aggregate::rows_within`] it.
//! What the audit needs of the whole run (its totals per currency, its buyers, its
//! first and last event times, its values) is counted as rows are added, so that
//! nothing reads the run whole again.
//!
//! Held rows have the columns both steps read ([`lake::MEASURED`]), held small: the
//! text columns that few distinct values fill as codes into the run's values (4
//! bytes a row), flags and quantities in narrower integers, revenue computed when a
//! range is read. Past `Spill::memory_bytes` of them in memory, every hour's rows
//! are written to a Parquet file of their own on local disk (a directory removed
//! with the last [`Held`]) and read back with their range: a run's memory no longer
//! grows with its size (at 10M orders the held rows were ~0.9 GB of the stage's
//! 2.2 GB peak). Ranges are read back as polars frames of the same columns and
//! types as the lake step made them ([`Held::within`]), so aggregation is unchanged.
//!
//! [`lake::MEASURED`]: crate::lake::MEASURED

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use polars::prelude::*;

use crate::aggregate::{self, CurrencyTotals, HOUR_US, RunKeys};
use crate::lake::MEASURED;

/// How a run's spill directory is named: the prefix, then the process's id and a
/// random part, so that one left by a killed process can be told from a live
/// one's.
const SPILL_PREFIX: &str = "tidemark-compactor-held-";

/// Removes the spill directories in `dir` of processes no longer running (a run
/// removes its own with its last [`Held`], but not when it is killed) and
/// returns how many. Where processes cannot be looked up (no `/proc`), none.
/// Another process of this machine's, running, keeps its directory; the spill
/// directory is local disk, never shared between machines.
fn sweep_stale(dir: &std::path::Path) -> usize {
    let processes = std::path::Path::new("/proc");
    if !processes.join("self").exists() {
        return 0;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut swept = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|name| name.strip_prefix(SPILL_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        let Some(pid) = pid else {
            continue;
        };
        if pid != std::process::id()
            && !processes.join(pid.to_string()).exists()
            && std::fs::remove_dir_all(entry.path()).is_ok()
        {
            swept += 1;
        }
    }
    swept
}

/// The text columns held as codes (`UInt32`, null for null). `user_id` keeps its
/// text: it has nearly a value per row.
const CODED: [&str; 5] = [
    "adjustment_kind",
    "city",
    "category",
    "product_id",
    "currency",
];

/// Marks a booked copy: a correction held again in the hour it was booked in.
const BOOKED_COPY: &str = "booked_copy";

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

/// Where held rows go once they pass a size in memory.
#[derive(Clone, Debug)]
pub struct Spill {
    /// Bytes of held rows (polars' estimate) kept in memory; past them every
    /// hour's rows in memory are written to local disk.
    pub memory_bytes: usize,
    /// The directory in which a run makes its own (the system's temporary
    /// directory when `None`).
    pub dir: Option<PathBuf>,
}

impl Spill {
    /// Rows stay in memory.
    pub fn never() -> Spill {
        Spill {
            memory_bytes: usize::MAX,
            dir: None,
        }
    }
}

impl Default for Spill {
    fn default() -> Self {
        Spill::never()
    }
}

/// An hour's held rows: in memory, and written to disk.
#[derive(Default)]
struct Hour {
    frames: Vec<DataFrame>,
    files: Vec<PathBuf>,
}

/// Builds a [`Held`] from a run's frames of [`MEASURED`] columns, one at a time.
#[derive(Default)]
pub struct Holder {
    spill: Spill,
    codes: [PlHashMap<String, u32>; CODED.len()],
    values: [Vec<String>; CODED.len()],
    /// Whether a coded column held a null.
    nulls: [bool; CODED.len()],
    hours: BTreeMap<i64, Hour>,
    /// Event times per hour ([`aggregate::count_hours`]).
    per_hour: BTreeMap<i64, usize>,
    span: Option<(i64, i64)>,
    totals: CurrencyTotals,
    users: PlHashSet<String>,
    rows: usize,
    /// An empty frame of the held columns.
    template: Option<DataFrame>,
    in_memory: usize,
    disk: Option<tempfile::TempDir>,
    files: usize,
    spilled: u64,
}

impl Holder {
    pub fn new(spill: Spill) -> Holder {
        Holder {
            spill,
            ..Holder::default()
        }
    }

    /// Adds rows with the [`MEASURED`] columns.
    pub fn add(&mut self, measured: &DataFrame) -> PolarsResult<()> {
        if measured.height() == 0 {
            return Ok(());
        }
        self.rows += measured.height();
        aggregate::add_totals(&mut self.totals, aggregate::currency_totals(measured)?);
        aggregate::count_hours(&mut self.per_hour, measured)?;
        if let Some((first, last)) = aggregate::event_times(measured)? {
            let (f, l) = self.span.unwrap_or((first, last));
            self.span = Some((f.min(first), l.max(last)));
        }
        let adjusted = measured.column("adjusted_us")?.i64()?;
        let users = measured.column("user_id")?.str()?;
        for (user, adjusted) in users.iter().zip(adjusted.iter()) {
            if let (Some(user), None) = (user, adjusted)
                && !self.users.contains(user)
            {
                self.users.insert(user.to_owned());
            }
        }
        let mut held = measured.drop("revenue")?;
        for (i, name) in CODED.into_iter().enumerate() {
            let (codes, values) = (&mut self.codes[i], &mut self.values[i]);
            let column = held.column(name)?;
            self.nulls[i] |= column.null_count() > 0;
            let coded: UInt32Chunked = column
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
        let created = hours_of(&held, "created_us")?;
        // Corrections booked in another hour than their order's, held again there.
        let elsewhere: BooleanChunked = adjusted
            .iter()
            .zip(&created)
            .map(|(us, &hour)| us.is_some_and(|us| us.div_euclid(HOUR_US) != hour))
            .collect();
        let copies = held.filter(&elsewhere)?;
        held.with_column(Column::new(BOOKED_COPY.into(), vec![false; held.height()]))?;
        if self.template.is_none() {
            self.template = Some(held.clear());
        }
        let mut parts = by_hour(&held, &created)?;
        if copies.height() > 0 {
            let booked = hours_of(&copies, "adjusted_us")?;
            let mut copies = copies;
            copies.with_column(Column::new(BOOKED_COPY.into(), vec![true; copies.height()]))?;
            parts.extend(by_hour(&copies, &booked)?);
        }
        for (hour, part) in parts {
            self.in_memory += part.estimated_size();
            self.hours.entry(hour).or_default().frames.push(part);
        }
        if self.in_memory > self.spill.memory_bytes {
            self.write_out()?;
        }
        Ok(())
    }

    /// Writes every hour's rows in memory to a file of its own.
    fn write_out(&mut self) -> PolarsResult<()> {
        let disk = match &mut self.disk {
            Some(disk) => disk,
            empty => {
                let dir = self.spill.dir.clone().unwrap_or_else(std::env::temp_dir);
                std::fs::create_dir_all(&dir)?;
                let swept = sweep_stale(&dir);
                if swept > 0 {
                    tracing::info!(
                        swept,
                        dir = %dir.display(),
                        "Removed spill directories of stopped processes"
                    );
                }
                empty.insert(
                    tempfile::Builder::new()
                        .prefix(&format!("{SPILL_PREFIX}{}-", std::process::id()))
                        .tempdir_in(dir)?,
                )
            }
        };
        for (hour, held) in &mut self.hours {
            let Some((first, rest)) = held.frames.split_first() else {
                continue;
            };
            let mut rows = first.clone();
            for frame in rest {
                rows.vstack_mut(frame)?;
            }
            let path = disk.path().join(format!("{hour}-{}.parquet", self.files));
            let file = std::fs::File::create(&path)?;
            ParquetWriter::new(file)
                .with_compression(ParquetCompression::Uncompressed)
                .finish(&mut rows)?;
            self.spilled += std::fs::metadata(&path)?.len();
            self.files += 1;
            held.files.push(path);
            held.frames.clear();
        }
        self.in_memory = 0;
        Ok(())
    }

    pub fn finish(self) -> PolarsResult<Held> {
        Ok(Held(Arc::new(Inner {
            hours: self.hours,
            values: self.values,
            nulls: self.nulls,
            per_hour: self.per_hour,
            span: self.span,
            totals: self.totals,
            buyers: self.users.len() as u64,
            rows: self.rows,
            template: self.template,
            in_memory: self.in_memory,
            spilled: self.spilled,
            files: self.files,
            _disk: self.disk,
        })))
    }
}

/// Each row's hour (since the epoch) of the time in µs `name`.
fn hours_of(rows: &DataFrame, name: &str) -> PolarsResult<Vec<i64>> {
    Ok(rows
        .column(name)?
        .i64()?
        .iter()
        .map(|us| us.map_or(i64::MIN, |us| us.div_euclid(HOUR_US)))
        .collect())
}

/// `rows` split by hour, `hours` being each row's (each row taken once).
fn by_hour(rows: &DataFrame, hours: &[i64]) -> PolarsResult<Vec<(i64, DataFrame)>> {
    let mut rows_of: BTreeMap<i64, Vec<IdxSize>> = BTreeMap::new();
    for (i, &hour) in hours.iter().enumerate() {
        rows_of.entry(hour).or_default().push(i as IdxSize);
    }
    if rows_of.len() == 1 {
        return Ok(rows_of.into_keys().map(|h| (h, rows.clone())).collect());
    }
    rows_of
        .into_iter()
        .map(|(hour, rows_in)| Ok((hour, rows.take(&IdxCa::from_vec("".into(), rows_in))?)))
        .collect()
}

/// A run's rows with the [`MEASURED`] columns, held by hour (see the module).
/// Clones share them.
#[derive(Clone)]
pub struct Held(Arc<Inner>);

struct Inner {
    hours: BTreeMap<i64, Hour>,
    /// Each coded column's values, by code.
    values: [Vec<String>; CODED.len()],
    nulls: [bool; CODED.len()],
    per_hour: BTreeMap<i64, usize>,
    span: Option<(i64, i64)>,
    totals: CurrencyTotals,
    buyers: u64,
    rows: usize,
    template: Option<DataFrame>,
    in_memory: usize,
    spilled: u64,
    files: usize,
    /// Removed (with its files) when the last clone is dropped.
    _disk: Option<tempfile::TempDir>,
}

impl Held {
    /// Holds `measured` (rows with the [`MEASURED`] columns) in memory.
    pub fn of(measured: &DataFrame) -> PolarsResult<Held> {
        let mut holder = Holder::default();
        holder.add(measured)?;
        holder.finish()
    }

    pub fn height(&self) -> usize {
        self.0.rows
    }

    /// Bytes of rows held in memory (polars' estimate; the values not counted).
    pub fn estimated_size(&self) -> usize {
        self.0.in_memory
    }

    /// Bytes of rows written to local disk, and the files.
    pub fn spilled(&self) -> (u64, usize) {
        (self.0.spilled, self.0.files)
    }

    /// The rows that add to cells within `[from_us, to_us)`, whole hours
    /// ([`aggregate::rows_within`]), with the [`MEASURED`] columns as the lake
    /// step made them, read from the range's hours only: its orders' rows and the
    /// corrections booked in it whose order lies outside it.
    ///
    /// A range within one hour is that hour's rows [`aggregate::rows_within`] it
    /// (every row that adds to a cell of the range is among the hour's, once),
    /// read without holding the hour.
    pub fn within(&self, from_us: i64, to_us: i64) -> PolarsResult<DataFrame> {
        self.decoded(self.coded_within(from_us, to_us)?)
    }

    /// [`Held::within`], its text still coded (`None` without rows held).
    fn coded_within(&self, from_us: i64, to_us: i64) -> PolarsResult<Option<DataFrame>> {
        let hour = from_us - from_us.rem_euclid(HOUR_US);
        if from_us < to_us && to_us <= hour + HOUR_US && (from_us, to_us) != (hour, hour + HOUR_US)
        {
            // The hour's rows within the part, each file filtered as it is read:
            // no more than a file and the part in memory, not the hour.
            let (hours, wanted) = self.hours_within(hour, hour + HOUR_US);
            let wanted = wanted.and(aggregate::within(from_us, to_us));
            return self.coded_rows_of(hours, &wanted);
        }
        polars_ensure!(
            from_us % HOUR_US == 0 && to_us % HOUR_US == 0,
            InvalidOperation: "held rows are read by whole hours or within one, not [{from_us}, {to_us})"
        );
        let (hours, wanted) = self.hours_within(from_us, to_us);
        self.coded_rows_of(hours, &wanted)
    }

    /// The hours of `[from_us, to_us)` (whole hours) and which of their rows are
    /// within it.
    fn hours_within(&self, from_us: i64, to_us: i64) -> (Vec<&Hour>, Expr) {
        // An hour's row and its correction booked in the same hour are both in the
        // range or both out of it: the correction has no copy.
        let hours =
            from_us.div_euclid(HOUR_US)..to_us.div_euclid(HOUR_US).max(from_us.div_euclid(HOUR_US));
        let within = |name: &str| col(name).gt_eq(lit(from_us)).and(col(name).lt(lit(to_us)));
        let copy = col(BOOKED_COPY);
        let wanted = (copy.clone().not().and(within("created_us"))).or(copy
            .and(within("adjusted_us"))
            .and(within("created_us").not()));
        (self.0.hours.range(hours).map(|(_, h)| h).collect(), wanted)
    }

    /// Every row with the [`MEASURED`] columns (a copy of the whole run as the lake
    /// step made it, by hour: for small runs and tests).
    pub fn rows(&self) -> PolarsResult<DataFrame> {
        self.decoded(self.coded_rows_of(self.0.hours.values().collect(), &col(BOOKED_COPY).not())?)
    }

    /// The run's keys (first midnight, minutes, dictionaries) for
    /// [`aggregate::grids_within`]; `None` without rows.
    pub fn keys(&self) -> PolarsResult<Option<RunKeys>> {
        let Some((first_us, last_us)) = self.0.span else {
            return Ok(None);
        };
        RunKeys::between(first_us, last_us, |name| {
            let i = CODED
                .iter()
                .position(|c| *c == name)
                .ok_or_else(|| polars_err!(ColumnNotFound: "{name} is not a coded column"))?;
            let mut values = self.0.values[i].clone();
            // A null reads as "" in the dictionaries (as `Dictionary::values_of`).
            if self.0.nulls[i] {
                values.push(String::new());
            }
            values.sort_unstable();
            values.dedup();
            Ok(Arc::new(values))
        })
        .map(Some)
    }

    /// The run's ranges of whole hours ([`aggregate::hour_ranges`]).
    pub fn hour_ranges(&self, size: usize) -> Vec<(i64, i64)> {
        aggregate::ranges_of_hours(&self.0.per_hour, size)
    }

    /// [`aggregate::currency_totals`] of every row.
    pub fn currency_totals(&self) -> CurrencyTotals {
        self.0.totals.clone()
    }

    /// The distinct users of the run's order lines (corrections left out).
    pub fn buyers(&self) -> u64 {
        self.0.buyers
    }

    /// The rows of `hours` that `wanted` keeps, text coded, without the booked
    /// copies' flag (`None` without rows held).
    fn coded_rows_of(&self, hours: Vec<&Hour>, wanted: &Expr) -> PolarsResult<Option<DataFrame>> {
        // Each frame filtered as it is read: memory holds a file and the rows
        // kept, not every file of the hours.
        let kept = |frame: DataFrame| frame.lazy().filter(wanted.clone()).collect();
        let mut rows: Option<DataFrame> = None;
        for hour in hours {
            let read = hour
                .files
                .iter()
                .map(|path| ParquetReader::new(std::fs::File::open(path)?).finish());
            for frame in hour.frames.iter().cloned().map(Ok).chain(read) {
                let frame = kept(frame?)?;
                match &mut rows {
                    Some(rows) => {
                        rows.vstack_mut(&frame)?;
                    }
                    None => rows = Some(frame),
                }
            }
        }
        let rows = match rows {
            Some(mut rows) => {
                rows.rechunk_mut();
                rows
            }
            None => match &self.0.template {
                Some(template) => template.clone(),
                None => return Ok(None),
            },
        };
        rows.drop(BOOKED_COPY).map(Some)
    }

    /// Held rows with their text decoded and revenue computed, in
    /// [`MEASURED`]'s order (no rows held: an empty frame).
    fn decoded(&self, rows: Option<DataFrame>) -> PolarsResult<DataFrame> {
        let Some(mut rows) = rows else {
            return Ok(DataFrame::empty());
        };
        for (i, name) in CODED.into_iter().enumerate() {
            let values = &self.0.values[i];
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
    use proptest::prelude::*;

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
        assert_eq!(held.buyers(), 2);
        assert_eq!(
            held.currency_totals(),
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

    /// Rows of [`MEASURED`] columns: order lines over 30 hours, a quarter of them
    /// corrections booked up to five hours after their order (`spec`: created
    /// minute, user, city or null, correction's delay in minutes).
    fn frame_of(spec: &[(i64, u8, Option<u8>, Option<i64>)]) -> DataFrame {
        let minute = 60_000_000i64;
        let int = |f: &dyn Fn(usize) -> i64| -> Vec<i64> { (0..spec.len()).map(f).collect() };
        let adjusted = |i: usize| spec[i].3;
        df! {
            "created_us" => int(&|i| spec[i].0 * minute),
            "user_id" => spec.iter().map(|s| format!("u{}", s.1)).collect::<Vec<_>>(),
            "adjusted_us" => (0..spec.len()).map(|i| adjusted(i).map(|d| (spec[i].0 + d) * minute)).collect::<Vec<_>>(),
            "adjustment_kind" => (0..spec.len()).map(|i| adjusted(i).map(|d| if d % 2 == 0 { "refund" } else { "cancellation" })).collect::<Vec<_>>(),
            "refunded_quantity" => int(&|i| i64::from(adjusted(i).is_some())),
            "refunded_minor" => int(&|i| if adjusted(i).is_some() { 100 + i as i64 } else { 0 }),
            "cancel_first" => int(&|i| adjusted(i).map_or(0, |d| d % 2)),
            "cancel_category_first" => int(&|i| adjusted(i).map_or(0, |d| d % 2)),
            "revenue" => int(&|i| if adjusted(i).is_some() { 0 } else { (1 + i as i64 % 3) * (100 + i as i64) }),
            "quantity" => int(&|i| if adjusted(i).is_some() { 0 } else { 1 + i as i64 % 3 }),
            "unit_price_minor" => int(&|i| 100 + i as i64),
            "city" => spec.iter().map(|s| s.2.map(|c| ["Berlin", "Paris", "Oslo"][usize::from(c) % 3])).collect::<Vec<_>>(),
            "category" => int(&|i| i as i64 % 4).iter().map(|c| format!("c{c}")).collect::<Vec<_>>(),
            "product_id" => int(&|i| i as i64 % 7).iter().map(|p| format!("p{p}")).collect::<Vec<_>>(),
            "currency" => int(&|i| i as i64 % 2).iter().map(|c| ["EUR", "JPY"][*c as usize]).collect::<Vec<_>>(),
            "order_first" => int(&|i| i64::from(adjusted(i).is_none() && i % 2 == 0)),
            "category_first" => int(&|i| i64::from(adjusted(i).is_none())),
        }
        .unwrap()
    }

    /// `rows` in one order, to compare sets of rows.
    fn sorted(rows: &DataFrame) -> DataFrame {
        rows.sort(MEASURED, SortMultipleOptions::default()).unwrap()
    }

    /// A run that writes its rows to disk first removes the spill directories of
    /// processes no longer running (a SIGKILLed run's), keeps a running
    /// process's and anything else, and names its own by its process.
    #[test]
    fn spilling_removes_the_directories_of_stopped_processes_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        let own = std::process::id();
        // Process ids stop at 2^22: 999,999,999 never runs; 1 always does.
        let kept = [
            format!("{SPILL_PREFIX}{own}-a"),
            format!("{SPILL_PREFIX}1-b"),
            format!("{SPILL_PREFIX}notapid"),
            "elsewhere-999999999-c".to_owned(),
        ];
        let stale = format!("{SPILL_PREFIX}999999999-d");
        for name in kept.iter().chain([&stale]) {
            std::fs::create_dir(path(name)).unwrap();
            std::fs::write(path(name).join("0-0.parquet"), b"rows").unwrap();
        }
        let spill = Spill {
            memory_bytes: 0,
            dir: Some(dir.path().to_owned()),
        };
        let mut holder = Holder::new(spill);
        holder
            .add(&frame_of(&[
                (0, 1, Some(1), None),
                (1_200, 2, None, Some(5)),
            ]))
            .unwrap();
        let held = holder.finish().unwrap();
        assert!(
            !path(&stale).exists(),
            "a stopped process's directory is removed"
        );
        for name in &kept {
            assert!(path(name).join("0-0.parquet").exists(), "{name} is kept");
        }
        let ours = held
            .0
            ._disk
            .as_ref()
            .expect("written to disk")
            .path()
            .to_owned();
        let name = ours.file_name().unwrap().to_str().unwrap().to_owned();
        assert!(name.starts_with(&format!("{SPILL_PREFIX}{own}-")), "{name}");
        drop(held);
        assert!(!ours.exists(), "a run's directory goes with its last Held");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        /// Held in memory or written to disk after any group, a range's rows are
        /// exactly those [`aggregate::rows_within`] it, and what is counted as
        /// rows are added equals what the whole run gives.
        #[test]
        fn held_rows_written_to_disk_or_not_read_back_as_rows_within_each_range(
            spec in proptest::collection::vec(
                (0..1_800i64, 0..20u8, proptest::option::weighted(0.9, 0..3u8),
                 proptest::option::weighted(0.25, 0..300i64)),
                1..400,
            ),
            groups in 1..6usize,
            spill in any::<bool>(),
            ranges in proptest::collection::vec(
                (0..34i64, 1..8i64, proptest::option::of((0..4i64, 1..4i64))),
                1..6,
            ),
            range_size in 1..60usize,
        ) {
            let rows = frame_of(&spec);
            let memory_bytes = if spill { 0 } else { usize::MAX };
            let mut holder = Holder::new(Spill { memory_bytes, dir: None });
            let size = rows.height().div_ceil(groups);
            for offset in (0..rows.height()).step_by(size) {
                holder.add(&rows.slice(offset as i64, size)).unwrap();
            }
            let held = holder.finish().unwrap();
            let dir = held.0._disk.as_ref().map(|d| d.path().to_owned());
            prop_assert_eq!(dir.is_some(), spill, "written to disk only past the budget");
            prop_assert_eq!(held.height(), rows.height());
            prop_assert_eq!(sorted(&held.rows().unwrap()), sorted(&rows));
            // Whole hours, or quarters within one hour.
            let quarter = HOUR_US / 4;
            for (first, hours, part) in ranges {
                let (from, to) = match part {
                    None => (first * HOUR_US, (first + hours) * HOUR_US),
                    Some((q, n)) => {
                        let from = first * HOUR_US + q * quarter;
                        (from, (from + n * quarter).min((first + 1) * HOUR_US))
                    }
                };
                prop_assert_eq!(
                    sorted(&held.within(from, to).unwrap()),
                    sorted(&aggregate::rows_within(&rows, from, to).unwrap()),
                    "the rows within [{}, {})", from, to
                );
            }
            // The stage's ranges (an hour holding more than one split in parts).
            let planned = held.hour_ranges(range_size);
            prop_assert_eq!(&planned, &aggregate::hour_ranges(&rows, range_size).unwrap());
            for (from, to) in planned {
                prop_assert_eq!(
                    sorted(&held.within(from, to).unwrap()),
                    sorted(&aggregate::rows_within(&rows, from, to).unwrap()),
                    "the rows within the stage's range [{}, {})", from, to
                );
            }
            prop_assert_eq!(held.currency_totals(), aggregate::currency_totals(&rows).unwrap());
            let users = rows
                .clone()
                .lazy()
                .filter(col("adjusted_us").is_null())
                .select([col("user_id").n_unique()])
                .collect()
                .unwrap();
            let users = users.column("user_id").unwrap().cast(&DataType::UInt64).unwrap();
            prop_assert_eq!(Some(held.buyers()), users.u64().unwrap().get(0));
            prop_assert_eq!(held.keys().unwrap(), RunKeys::of(&rows).unwrap());
            prop_assert!(
                held.within(HOUR_US / 2, 3 * HOUR_US / 2).is_err(),
                "neither whole hours nor within one"
            );
            drop(held);
            if let Some(dir) = dir {
                prop_assert!(!dir.exists(), "the files go with the last held rows");
            }
        }
    }
}
