//! The lake: raw JSON Lines in, Parquet out, both in S3.

use std::collections::BTreeMap;
use std::io::{Cursor, Write};
use std::sync::{Arc, Mutex};

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use futures::{StreamExt, TryStreamExt};
use polars::prelude::*;
use tidemark_domain::{AdjustmentKind, LogPosition};
use tidemark_orderlog::RawRecordRef;
use tidemark_platform::config::S3Config;

use crate::aggregate::{self, CurrencyTotals};
use crate::held::{Held, Holder};

#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    #[error("s3: {0}")]
    S3(String),
    #[error("polars: {0}")]
    Polars(#[from] PolarsError),
    #[error("invalid raw record: {0}")]
    Invalid(String),
    /// A raw object holds a log row outside the relay batch it was recorded
    /// with: the manifest cannot say where records may repeat ([`Repeats`]).
    #[error("a record of a raw object lies outside its relay batch: {0}")]
    OutsideBatch(String),
}

pub type Result<T, E = LakeError> = std::result::Result<T, E>;

/// An object being written in parts ([`Store::start_upload`]).
pub struct Upload {
    key: String,
    id: String,
    parts: Vec<CompletedPart>,
    /// Bytes sent so far.
    pub bytes: u64,
}

/// Object storage under the deployment's prefix.
#[derive(Clone)]
pub struct Store {
    client: aws_sdk_s3::Client,
    config: S3Config,
}

fn s3_error<E: std::error::Error + 'static>(e: &E) -> LakeError {
    LakeError::S3(aws_sdk_s3::error::DisplayErrorContext(e).to_string())
}

impl Store {
    pub fn new(client: aws_sdk_s3::Client, config: S3Config) -> Self {
        Self { client, config }
    }

    pub async fn get(&self, key: &str) -> Result<bytes::Bytes> {
        self.get_object(key, None).await
    }

    /// An object's size in bytes.
    pub async fn size(&self, key: &str) -> Result<u64> {
        let head = self
            .client
            .head_object()
            .bucket(&self.config.bucket)
            .key(self.config.key(key))
            .send()
            .await
            .map_err(|e| s3_error(&e))?;
        head.content_length()
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| LakeError::S3(format!("no size in the answer to HEAD {key}")))
    }

    /// Bytes `range` of an object (not empty, inside the object).
    pub async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> Result<bytes::Bytes> {
        let range = format!("bytes={}-{}", range.start, range.end - 1);
        self.get_object(key, Some(range)).await
    }

    /// An object's body, whole or of an HTTP `range`.
    async fn get_object(&self, key: &str, range: Option<String>) -> Result<bytes::Bytes> {
        let object = self
            .client
            .get_object()
            .bucket(&self.config.bucket)
            .key(self.config.key(key))
            .set_range(range)
            .send()
            .await
            .map_err(|e| s3_error(&e))?;
        // The SDK's operation timeout ends when the response's head arrives; the
        // body is read here with the same bound on each wait for data, so a stalled
        // download fails the step (the run is retried) instead of holding the
        // compactor's lease forever, whatever the object's size.
        let mut body = object.body;
        let mut bytes = Vec::with_capacity(
            object
                .content_length
                .and_then(|n| usize::try_from(n).ok())
                .unwrap_or(0),
        );
        loop {
            match tokio::time::timeout(self.config.timeout, body.next()).await {
                Ok(Some(chunk)) => bytes.extend_from_slice(&chunk.map_err(|e| s3_error(&e))?),
                Ok(None) => return Ok(bytes.into()),
                Err(_) => {
                    return Err(LakeError::S3(format!(
                        "no data from {key} for {} ms",
                        self.config.timeout.as_millis()
                    )));
                }
            }
        }
    }

    pub async fn put(&self, key: &str, body: Vec<u8>) -> Result<()> {
        self.client
            .put_object()
            .bucket(&self.config.bucket)
            .key(self.config.key(key))
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| s3_error(&e))?;
        Ok(())
    }

    pub async fn delete(&self, key: &str) -> Result<()> {
        self.client
            .delete_object()
            .bucket(&self.config.bucket)
            .key(self.config.key(key))
            .send()
            .await
            .map_err(|e| s3_error(&e))?;
        Ok(())
    }

    /// Starts writing `key` in parts (an S3 multipart upload): none of it is
    /// visible until [`Store::complete`].
    pub async fn start_upload(&self, key: &str) -> Result<Upload> {
        let started = self
            .client
            .create_multipart_upload()
            .bucket(&self.config.bucket)
            .key(self.config.key(key))
            .send()
            .await
            .map_err(|e| s3_error(&e))?;
        let id = started
            .upload_id()
            .ok_or_else(|| LakeError::S3(format!("no upload id in the answer for {key}")))?;
        Ok(Upload {
            key: key.to_owned(),
            id: id.to_owned(),
            parts: Vec::new(),
            bytes: 0,
        })
    }

    /// Sends the next part of `upload` (S3 takes parts of at least 5 MiB, but the
    /// last).
    pub async fn upload_part(&self, upload: &mut Upload, body: Vec<u8>) -> Result<()> {
        let number = i32::try_from(upload.parts.len() + 1)
            .map_err(|_| LakeError::S3(format!("too many parts for {}", upload.key)))?;
        let bytes = body.len() as u64;
        let sent = self
            .client
            .upload_part()
            .bucket(&self.config.bucket)
            .key(self.config.key(&upload.key))
            .upload_id(&upload.id)
            .part_number(number)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| s3_error(&e))?;
        upload.parts.push(
            CompletedPart::builder()
                .part_number(number)
                .set_e_tag(sent.e_tag().map(str::to_owned))
                .build(),
        );
        upload.bytes += bytes;
        Ok(())
    }

    /// Makes the object of `upload` out of its parts.
    pub async fn complete(&self, upload: Upload) -> Result<()> {
        self.client
            .complete_multipart_upload()
            .bucket(&self.config.bucket)
            .key(self.config.key(&upload.key))
            .upload_id(&upload.id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(upload.parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| s3_error(&e))?;
        Ok(())
    }

    /// Gives up `upload`: the store drops its parts.
    pub async fn abort(&self, upload: Upload) -> Result<()> {
        self.client
            .abort_multipart_upload()
            .bucket(&self.config.bucket)
            .key(self.config.key(&upload.key))
            .upload_id(&upload.id)
            .send()
            .await
            .map_err(|e| s3_error(&e))?;
        Ok(())
    }

    /// Keys under `prefix`, relative to the deployment's prefix.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let base = self.config.key("");
        let mut keys = Vec::new();
        let mut token = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.config.bucket)
                .prefix(self.config.key(prefix))
                .set_continuation_token(token)
                .send()
                .await
                .map_err(|e| s3_error(&e))?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key())
                    .map(|k| k.strip_prefix(base.as_str()).unwrap_or(k).to_owned()),
            );
            token = page.next_continuation_token().map(str::to_owned);
            if token.is_none() {
                return Ok(keys);
            }
        }
    }
}

/// Parses raw JSON Lines into a frame of the lake's rows (timestamps still as
/// text): one row per order line of an order record; for an adjustment record one
/// row per line it gave something back of (a cancellation: per line of its order),
/// with the order's fields, `quantity` and `unit_price_minor` 0 (the order's rows
/// hold them) and what it gave back in `refunded_quantity` and `refunded_minor`.
/// Each line is deserialized straight into the columns, with no document tree in
/// between; a malformed line fails the whole file, naming the line.
pub fn parse_raw(bytes: &[u8]) -> Result<DataFrame> {
    /// A little below the relay's typical record size, so that columns rarely grow.
    const RECORD_BYTES: usize = 256;
    let rows = bytes.len() / RECORD_BYTES + 1;
    let text = |name: &str| StringChunkedBuilder::new(name.into(), rows);
    let mut strings = [
        "order_id",
        "user_id",
        "city",
        "product_id",
        "category",
        "currency",
        "created_at",
        "ingested_at",
    ]
    .map(text);
    // Set on adjustment rows only.
    let mut adjusting = ["adjustment_id", "adjustment_kind", "adjusted_at"].map(text);
    let mut numbers: [Vec<i64>; 11] = std::array::from_fn(|_| Vec::with_capacity(rows));
    for record in serde_json::Deserializer::from_slice(bytes).into_iter::<RawRecordRef<'_>>() {
        let r = record.map_err(|e| LakeError::Invalid(e.to_string()))?;
        let lines = r.lines().map_err(|e| LakeError::Invalid(e.to_string()))?;
        let txid = i64::try_from(r.txid)
            .map_err(|_| LakeError::Invalid(format!("txid {} out of range", r.txid)))?;
        let cancels = r
            .adjustment
            .as_ref()
            .is_some_and(|a| a.kind == AdjustmentKind::Cancellation);
        for (i, line) in lines.iter().enumerate() {
            let given = match &r.adjustment {
                None => None,
                Some(a) => match a.lines.iter().find(|l| l.line_no as usize == i + 1) {
                    Some(given) => Some((i64::from(given.quantity), given.amount_minor)),
                    None if cancels => Some((0, 0)),
                    None => continue,
                },
            };
            for (column, value) in strings.iter_mut().zip([
                &r.order_id,
                &r.user_id,
                &r.city,
                &line.product_id,
                &line.category,
                &r.currency,
                &r.created_at,
                &r.ingested_at,
            ]) {
                column.append_value(&**value);
            }
            match &r.adjustment {
                None => adjusting
                    .iter_mut()
                    .for_each(StringChunkedBuilder::append_null),
                Some(a) => {
                    for (column, value) in adjusting.iter_mut().zip([
                        &*a.adjustment_id,
                        a.kind.as_str(),
                        &*a.created_at,
                    ]) {
                        column.append_value(value);
                    }
                }
            }
            // An order counts once in total and by city (its first line), once
            // per category (the first line of each); so does a cancellation.
            let category_first = !lines[..i].iter().any(|l| l.category == line.category);
            let (order_first, category_first) = (i == 0, category_first);
            let (quantity, price, refunded_quantity, refunded_minor, counts, cancel_counts) =
                match given {
                    None => (
                        i64::from(line.quantity),
                        line.unit_price_minor,
                        0,
                        0,
                        true,
                        false,
                    ),
                    Some((q, a)) => (0, 0, q, a, false, cancels),
                };
            for (column, value) in numbers.iter_mut().zip([
                i as i64 + 1,
                i64::from(counts && order_first),
                i64::from(counts && category_first),
                quantity,
                price,
                txid,
                r.seq,
                refunded_quantity,
                refunded_minor,
                i64::from(cancel_counts && order_first),
                i64::from(cancel_counts && category_first),
            ]) {
                column.push(value);
            }
        }
    }
    let [
        order_id,
        user_id,
        city,
        product_id,
        category,
        currency,
        created_at,
        ingested_at,
    ] = strings.map(|b| b.finish().into_column());
    let [adjustment_id, adjustment_kind, adjusted_at] = adjusting.map(|b| b.finish().into_column());
    let [
        line_no,
        order_first,
        category_first,
        quantity,
        unit_price_minor,
        txid,
        seq,
        refunded_quantity,
        refunded_minor,
        cancel_first,
        cancel_category_first,
    ] = numbers;
    let height = order_id.len();
    let int =
        |name: &str, values: Vec<i64>| Int64Chunked::from_vec(name.into(), values).into_column();
    Ok(DataFrame::new(
        height,
        vec![
            order_id,
            int("line_no", line_no),
            user_id,
            city,
            product_id,
            category,
            int("quantity", quantity),
            int("unit_price_minor", unit_price_minor),
            currency,
            created_at,
            ingested_at,
            int("txid", txid),
            int("seq", seq),
            int("order_first", order_first),
            int("category_first", category_first),
            adjustment_id,
            adjustment_kind,
            adjusted_at,
            int("refunded_quantity", refunded_quantity),
            int("refunded_minor", refunded_minor),
            int("cancel_first", cancel_first),
            int("cancel_category_first", cancel_category_first),
        ],
    )?)
}

/// The columns of a lake file, in order. Order rows leave the adjustment columns
/// null (strings, `adjusted_at`) or 0 (amounts, flags).
const LAKE_COLUMNS: [&str; 22] = [
    "order_id",
    "line_no",
    "user_id",
    "city",
    "product_id",
    "category",
    "quantity",
    "unit_price_minor",
    "currency",
    "created_at",
    "ingested_at",
    "txid",
    "seq",
    "order_first",
    "category_first",
    "adjustment_id",
    "adjustment_kind",
    "adjusted_at",
    "refunded_quantity",
    "refunded_minor",
    "cancel_first",
    "cancel_category_first",
];

/// A lake file's rows in [`LAKE_COLUMNS`]' order. Files written before orders had
/// lines hold one row per order, without `line_no` and the order-count flags: they
/// are one-line orders, and get those columns. Files written before adjustments
/// hold only orders, and get the adjustment columns as order rows have them.
pub fn with_line_columns(frame: DataFrame) -> Result<DataFrame> {
    let absent = |name: &&str| frame.column(name).is_err();
    let missing: Vec<Expr> = ["line_no", "order_first", "category_first"]
        .into_iter()
        .filter(absent)
        .map(|name| lit(1_i64).cast(DataType::Int64).alias(name))
        .chain(
            [
                "refunded_quantity",
                "refunded_minor",
                "cancel_first",
                "cancel_category_first",
            ]
            .into_iter()
            .filter(absent)
            .map(|name| lit(0_i64).cast(DataType::Int64).alias(name)),
        )
        .chain(
            ["adjustment_id", "adjustment_kind"]
                .into_iter()
                .filter(absent)
                .map(|name| lit(NULL).cast(DataType::String).alias(name)),
        )
        .chain(
            ["adjusted_at"]
                .into_iter()
                .filter(absent)
                .map(|name| lit(NULL).cast(lake_time()).alias(name)),
        )
        .collect();
    if missing.is_empty() {
        return Ok(frame);
    }
    Ok(frame
        .lazy()
        .with_columns(missing)
        .select(LAKE_COLUMNS.map(col))
        .collect()?)
}

fn timestamp(column: &str) -> Expr {
    col(column).str().to_datetime(
        Some(TimeUnit::Microseconds),
        None,
        StrptimeOptions {
            format: Some(tidemark_orderlog::RAW_TIME_FORMAT.into()),
            strict: true,
            exact: true,
            cache: false,
        },
        lit("raise"),
    )
}

/// The type of the lake's timestamps.
fn lake_time() -> DataType {
    DataType::Datetime(TimeUnit::Microseconds, None)
}

/// Raw records with typed timestamps.
fn typed(raw: DataFrame) -> Result<DataFrame> {
    Ok(raw
        .lazy()
        .with_columns([
            timestamp("created_at").alias("created_at"),
            timestamp("ingested_at").alias("ingested_at"),
            timestamp("adjusted_at").alias("adjusted_at"),
        ])
        .collect()?)
}

/// Only the records with `txid` in `[from_txid, to_txid)`.
pub fn in_range(raw: DataFrame, from_txid: u64, to_txid: u64) -> Result<DataFrame> {
    let (from, to) = (
        from_txid.min(i64::MAX as u64) as i64,
        to_txid.min(i64::MAX as u64) as i64,
    );
    Ok(raw
        .lazy()
        .filter(col("txid").gt_eq(lit(from)).and(col("txid").lt(lit(to))))
        .collect()?)
}

/// Raw records → the lake's rows, one per order line: typed timestamps, only
/// `txid` in `[from_txid, to_txid)`, one copy of each order (the first).
pub fn orders_from_raw(raw: DataFrame, from_txid: u64, to_txid: u64) -> Result<DataFrame> {
    let mut ids = OrderIds::default();
    let orders = typed(in_range(raw, from_txid, to_txid)?)?;
    ids.first_copies(orders)
}

/// Whether a raw record may repeat one of another raw file of the run (see
/// [`Repeats`]); records without the column may.
pub const MAY_REPEAT: &str = "may_repeat";

/// Where the records of a run's raw files may repeat each other.
///
/// The relay lands a batch of log rows with positions in `(after, until]` as one
/// object per event hour (each row in one of them) and records the batch and the
/// hour with each object. The log holds each row once, so two files can hold the
/// same row only if they come from two batches whose ranges overlap (a range
/// landed twice with other bounds), or from one batch and one hour under two keys
/// (then the whole batch may repeat): only rows there, or outside their own file's
/// batch (which the relay never writes), need the order-id set. Held whole, it
/// grew with a run (24 bytes a line in a hash table of a power of two of them:
/// about 400 MB at 10M orders, 600 MB while it doubled) although a relay that
/// never repeats a range fills it for nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Repeats {
    zones: Vec<(LogPosition, LogPosition)>,
    /// Every record may repeat (the manifest's batches not trusted).
    everywhere: bool,
}

impl Repeats {
    /// Where the records of `objects` may repeat: each object given by its
    /// batch (`(after, until]`) and its hour within it. The overlaps of two
    /// batches, and every batch with two objects of one hour, as disjoint ranges
    /// in log order.
    pub fn of(objects: impl IntoIterator<Item = (LogPosition, LogPosition, i64)>) -> Repeats {
        let mut objects: Vec<_> = objects.into_iter().collect();
        objects.sort_unstable();
        let mut batches: Vec<(LogPosition, LogPosition)> = Vec::with_capacity(objects.len());
        let mut zones: Vec<(LogPosition, LogPosition)> = Vec::new();
        for (i, &(after, until, hour)) in objects.iter().enumerate() {
            if i > 0 && objects[i - 1] == (after, until, hour) {
                zones.push((after, until));
            }
            if batches.last() != Some(&(after, until)) {
                batches.push((after, until));
            }
        }
        // The furthest end of the batches so far: a batch starting before it
        // overlaps one of them up to it (every earlier end is at most it).
        let mut reach: Option<LogPosition> = None;
        for (after, until) in batches {
            if let Some(reach) = reach
                && after < reach
            {
                zones.push((after, until.min(reach)));
            }
            reach = Some(reach.map_or(until, |r| r.max(until)));
        }
        zones.sort_unstable();
        let mut merged: Vec<(LogPosition, LogPosition)> = Vec::with_capacity(zones.len());
        for zone in zones {
            match merged.last_mut() {
                Some(last) if zone.0 <= last.1 => last.1 = last.1.max(zone.1),
                _ => merged.push(zone),
            }
        }
        Repeats {
            zones: merged,
            everywhere: false,
        }
    }

    /// Every record may repeat.
    pub fn everywhere() -> Repeats {
        Repeats {
            zones: Vec::new(),
            everywhere: true,
        }
    }

    fn holds(&self, position: LogPosition) -> bool {
        let i = self.zones.partition_point(|(after, _)| *after < position);
        i > 0 && position <= self.zones[i - 1].1
    }

    /// `raw` (the records of the raw object `key`, with `txid` and `seq`) with
    /// [`MAY_REPEAT`] set where a record lies in an overlap. A record outside
    /// `batch`, its object's, is [`LakeError::OutsideBatch`]: its copy may lie in
    /// another object outside every overlap, unchecked (unless every record may
    /// repeat).
    pub fn mark(
        &self,
        mut raw: DataFrame,
        key: &str,
        batch: (LogPosition, LogPosition),
    ) -> Result<DataFrame> {
        let may: BooleanChunked = if self.everywhere {
            BooleanChunked::full("".into(), true, raw.height())
        } else {
            let (after, until) = batch;
            let txids = raw.column("txid")?.i64()?;
            let seqs = raw.column("seq")?.i64()?;
            let mut may = Vec::with_capacity(raw.height());
            for (txid, seq) in txids.iter().zip(seqs.iter()) {
                let position = match (txid.and_then(|t| u64::try_from(t).ok()), seq) {
                    (Some(txid), Some(seq)) => LogPosition::new(txid, seq),
                    _ => {
                        return Err(LakeError::Invalid(format!(
                            "a record of {key} has no position"
                        )));
                    }
                };
                if !(after < position && position <= until) {
                    return Err(LakeError::OutsideBatch(format!(
                        "{key} holds {position:?}, recorded with ({after:?}, {until:?}]"
                    )));
                }
                may.push(self.holds(position));
            }
            BooleanChunked::from_slice("".into(), &may)
        };
        raw.with_column(may.with_name(MAY_REPEAT.into()).into_column())?;
        Ok(raw)
    }
}

/// The order lines seen so far in a run, to keep one copy of each.
///
/// Copies of an order are the same immutable rows of the log (the relay landed a
/// range twice), so any copy may be kept: the first one is, which keeps the rows
/// in the order they were read. Lines are keyed by their event's id (the order's,
/// or the adjustment's: a UUID, kept as two 64-bit halves) and line number: 24
/// bytes an entry, where a `u128` key's alignment made 32. Only the lines that
/// [may repeat](Repeats) are held.
#[derive(Default)]
struct OrderIds(PlHashSet<(u64, u64, u32)>);

impl OrderIds {
    /// The rows whose order line was not seen before (in this frame or earlier
    /// ones), without [`MAY_REPEAT`]: a row it says may not repeat is a first
    /// copy. Every row's event id must be a UUID.
    fn first_copies(&mut self, orders: DataFrame) -> Result<DataFrame> {
        let ids = orders.column("order_id")?.str()?;
        let adjustments = orders.column("adjustment_id")?.str()?;
        let lines = orders.column("line_no")?.i64()?;
        let may_repeat: Vec<bool> = match orders.column(MAY_REPEAT) {
            Ok(column) => column.bool()?.iter().map(|m| m != Some(false)).collect(),
            Err(_) => vec![true; orders.height()],
        };
        let mut first = Vec::with_capacity(ids.len());
        for (((order, adjustment), line), may_repeat) in ids
            .iter()
            .zip(adjustments.iter())
            .zip(lines.iter())
            .zip(may_repeat)
        {
            let id = adjustment.or(order).unwrap_or("");
            let id = uuid::Uuid::try_parse(id)
                .map_err(|e| LakeError::Invalid(format!("event id `{id}` is not a UUID: {e}")))?;
            let line = u32::try_from(line.unwrap_or(1))
                .map_err(|_| LakeError::Invalid(format!("event `{id}` has line {line:?}")))?;
            let (high, low) = id.as_u64_pair();
            first.push(!may_repeat || self.0.insert((high, low, line)));
        }
        let orders = match orders.get_column_index(MAY_REPEAT) {
            Some(_) => orders.drop(MAY_REPEAT)?,
            None => orders,
        };
        if first.iter().all(|f| *f) {
            return Ok(orders);
        }
        Ok(orders.filter(&BooleanChunked::from_slice("first".into(), &first))?)
    }
}

/// A Write that appends to a buffer it shares (so that the bytes can be taken
/// once polars' batched Parquet writer, which keeps its writer, has finished).
#[derive(Clone, Default)]
struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .expect("no writer panics holding the buffer")
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct DayFile {
    writer: polars::io::parquet::write::BatchedWriter<SharedBuffer>,
    buffer: SharedBuffer,
    rows: u64,
}

/// One event date's Parquet file of a run: its bytes not yet taken by
/// [`LakeWriter::take_parts`] (all of them if none were).
pub struct LakeFile {
    /// Days since the epoch.
    pub day: i64,
    pub rows: u64,
    pub body: Vec<u8>,
}

/// The raw records of a run, group by group, into the lake: one Parquet file per
/// event date (each group adds a row group to its dates' files), the orders'
/// columns that aggregation and the audit need, and the raw totals. Memory holds
/// one group of raw records at a time, not the whole run.
#[derive(Default)]
pub struct LakeWriter {
    ids: OrderIds,
    days: BTreeMap<i64, DayFile>,
    orders: Holder,
    pub raw_records: u64,
    pub raw_totals: CurrencyTotals,
}

/// The columns of the lake's rows that aggregation and the audit read.
pub const MEASURED: [&str; 17] = [
    "created_us",
    "user_id",
    "adjusted_us",
    "adjustment_kind",
    "refunded_quantity",
    "refunded_minor",
    "cancel_first",
    "cancel_category_first",
    "revenue",
    "quantity",
    "unit_price_minor",
    "city",
    "category",
    "product_id",
    "currency",
    "order_first",
    "category_first",
];

impl LakeWriter {
    /// A writer whose held rows go to disk as `spill` says.
    pub fn holding(spill: crate::held::Spill) -> LakeWriter {
        LakeWriter {
            orders: Holder::new(spill),
            ..LakeWriter::default()
        }
    }

    /// Adds a group of raw records (already restricted to the run's range).
    pub fn add(&mut self, raw: Vec<DataFrame>) -> Result<()> {
        let raw = concat(
            raw.into_iter().map(IntoLazy::lazy).collect::<Vec<_>>(),
            UnionArgs::default(),
        )?
        .collect()?;
        if raw.height() == 0 {
            return Ok(());
        }
        self.raw_records += raw.height() as u64;
        aggregate::add_totals(&mut self.raw_totals, aggregate::currency_totals(&raw)?);
        let orders = self.ids.first_copies(typed(raw)?)?;
        for (day, mut part) in by_date(&orders)? {
            part.rechunk_mut_par();
            let file = match self.days.entry(day) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    let buffer = SharedBuffer::default();
                    let writer = parquet_writer(buffer.clone()).batched(part.schema())?;
                    e.insert(DayFile {
                        writer,
                        buffer,
                        rows: 0,
                    })
                }
            };
            file.writer.write_batch(&part)?;
            file.rows += part.height() as u64;
        }
        self.orders.add(
            &with_measures(orders.lazy())
                .select(MEASURED.map(col))
                .collect()?,
        )?;
        Ok(())
    }

    /// Order lines held to find repeated records ([`Repeats`]).
    pub fn ids_held(&self) -> usize {
        self.ids.0.len()
    }

    /// The bytes written so far of each date's file that holds at least `min` of
    /// them, taken out of memory (the writer never reads back what it wrote): parts
    /// of the files to upload while the run is written. [`LakeWriter::finish`]
    /// then gives each file's remaining bytes.
    pub fn take_parts(&mut self, min: usize) -> Vec<(i64, Vec<u8>)> {
        self.days
            .iter()
            .filter_map(|(day, file)| {
                let mut buffer = file
                    .buffer
                    .0
                    .lock()
                    .expect("no writer panics holding the buffer");
                (buffer.len() >= min.max(1)).then(|| (*day, std::mem::take(&mut *buffer)))
            })
            .collect()
    }

    /// The Parquet files, in date order, and the orders with the [`MEASURED`]
    /// columns.
    pub fn finish(self) -> Result<(Vec<LakeFile>, Held)> {
        let mut files = Vec::with_capacity(self.days.len());
        for (day, file) in self.days {
            file.writer.finish()?;
            drop(file.writer);
            let body = std::mem::take(
                &mut *file
                    .buffer
                    .0
                    .lock()
                    .expect("no writer panics holding the buffer"),
            );
            files.push(LakeFile {
                day,
                rows: file.rows,
                body,
            });
        }
        let orders = self.orders.finish()?;
        Ok((files, orders))
    }
}

/// Adds the derived columns aggregation needs: event times in µs (the order's, and
/// an adjustment's own), revenue.
pub fn with_measures(orders: LazyFrame) -> LazyFrame {
    orders.with_columns([
        col("created_at").cast(DataType::Int64).alias("created_us"),
        col("adjusted_at")
            .cast(DataType::Int64)
            .alias("adjusted_us"),
        (col("quantity") * col("unit_price_minor")).alias("revenue"),
    ])
}

/// The lake's Parquet settings: zstd at level 1, its fastest. The default
/// level (3) was a tenth of the lake step's CPU in a profiled 3M-order run.
fn parquet_writer<W: Write>(out: W) -> ParquetWriter<W> {
    let level =
        polars::polars_utils::compression::ZstdLevel::try_new(1).expect("1 is a zstd level");
    ParquetWriter::new(out).with_compression(ParquetCompression::Zstd(Some(level)))
}

/// A frame as Parquet.
pub fn to_parquet(df: &mut DataFrame) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    parquet_writer(&mut out).finish(df)?;
    Ok(out)
}

/// A lake file's rows, with the line columns of files written before lines (see
/// [`with_line_columns`]).
pub fn from_parquet(bytes: &[u8]) -> Result<DataFrame> {
    with_line_columns(ParquetReader::new(Cursor::new(bytes)).finish()?)
}

/// Reads `columns` of the Parquet object `key`, downloading only its footer and
/// those columns' chunks (ranged GETs, four at a time) rather than the whole file.
pub async fn read_columns(store: &Store, key: &str, columns: &[&str]) -> Result<DataFrame> {
    let mut groups = read_column_groups(store, key, columns, Ok)
        .await?
        .into_iter();
    let mut all = groups.next().unwrap_or_default();
    for group in groups {
        all.vstack_mut(&group)?;
    }
    Ok(all)
}

/// [`read_columns`] a row group at a time, each group's frame given to `each`
/// and what it makes of it kept: memory holds one group's chunks, not the file's
/// columns (the audit of a run of 10M orders read its two files' ten columns
/// whole, 1.2 GB at its peak). `each` runs on the blocking thread that decodes
/// the group, never on the async task: the audit's per-group totals (polars'
/// lazy engine), run on the task's thread while the task also drove the
/// stage's INSERTs, left the run hung (ARCHITECTURE.md, "No wait of a run is
/// unbounded").
pub async fn read_column_groups<T: Send + 'static>(
    store: &Store,
    key: &str,
    columns: &[&str],
    each: fn(DataFrame) -> Result<T>,
) -> Result<Vec<T>> {
    /// Bytes fetched from the end first: the footer of a lake file is a few KB.
    const TAIL: u64 = 64 * 1024;
    /// Chunks closer than this are fetched in one GET.
    const GAP: u64 = 256 * 1024;
    // The size first: a suffix range (`bytes=-n`) longer than the object is
    // valid HTTP, but s3s-fs answers it with a 500.
    let size = store.size(key).await?;
    let not_parquet = || LakeError::Invalid(format!("{key} is not a Parquet file"));
    // Magic bytes at both ends and the metadata's length.
    if size < 12 {
        return Err(not_parquet());
    }
    let mut tail = store
        .get_range(key, size.saturating_sub(TAIL)..size)
        .await?;
    let footer = footer_len(&tail).ok_or_else(not_parquet)?;
    if footer > tail.len() {
        tail = store
            .get_range(key, size.saturating_sub(footer as u64)..size)
            .await?;
    }
    let tail_start = size - tail.len() as u64;
    let metadata = ParquetReader::new(Cursor::new(&tail[..]))
        .get_metadata()?
        .clone();
    let names: Vec<String> = columns.iter().map(|c| (*c).to_owned()).collect();
    let mut made = Vec::with_capacity(metadata.row_groups.len());
    for group in &metadata.row_groups {
        let mut ranges: Vec<std::ops::Range<u64>> = Vec::new();
        for column in columns {
            let chunks = group
                .columns_under_root_iter(column)
                .ok_or_else(|| LakeError::Invalid(format!("{key} has no column `{column}`")))?;
            for chunk in chunks {
                ranges.push(chunk.byte_range());
            }
        }
        ranges.sort_by_key(|r| r.start);
        let mut merged: Vec<std::ops::Range<u64>> = Vec::with_capacity(ranges.len());
        for range in ranges {
            match merged.last_mut() {
                Some(last) if range.start <= last.end + GAP => last.end = last.end.max(range.end),
                _ => merged.push(range),
            }
        }
        // Chunks inside the tail are already here.
        merged.retain(|r| r.start < tail_start);
        let pieces: Vec<(u64, bytes::Bytes)> = futures::stream::iter(merged)
            .map(|r| {
                let (store, key) = (store.clone(), key.to_owned());
                async move { Ok::<_, LakeError>((r.start, store.get_range(&key, r).await?)) }
            })
            .buffered(4)
            .try_collect()
            .await?;
        // The file's metadata with this row group alone, over a buffer that
        // holds only its chunks (and the tail).
        let mut one = (*metadata).clone();
        one.num_rows = group.num_rows();
        one.row_groups = vec![group.clone()];
        let (tail, names) = (tail.clone(), names.clone());
        let frame = tokio::task::spawn_blocking(move || {
            let mut sparse = vec![0u8; size as usize];
            for (start, body) in pieces.iter().chain([(tail_start, tail)].iter()) {
                let start = *start as usize;
                sparse[start..start + body.len()].copy_from_slice(body);
            }
            let mut reader = ParquetReader::new(Cursor::new(sparse));
            reader.set_metadata(Arc::new(one));
            each(reader.with_columns(Some(names)).finish()?)
        })
        .await
        .expect("the Parquet decoding task does not panic")?;
        made.push(frame);
    }
    Ok(made)
}

/// The length of a Parquet file's footer (metadata, its length and the magic
/// bytes) from the file's last bytes, if they end like a Parquet file.
fn footer_len(tail: &[u8]) -> Option<usize> {
    let (rest, magic) = tail.split_last_chunk::<4>()?;
    let (_, len) = rest.split_last_chunk::<4>()?;
    (magic == b"PAR1").then(|| u32::from_le_bytes(*len) as usize + 8)
}

/// Splits rows by their own event date (an adjustment's, not its order's): `(days
/// since the epoch, rows)`, in date order. A
/// run's orders usually fall on one date: then the frame is returned as it is.
pub fn by_date(orders: &DataFrame) -> Result<Vec<(i64, DataFrame)>> {
    const DAY_US: i64 = 86_400_000_000;
    let created = orders.column("created_at")?.cast(&DataType::Int64)?;
    let booked = orders.column("adjusted_at")?;
    // Rows without adjustments (almost always all of them) need no second column.
    let day: Int64Chunked = if booked.null_count() == booked.len() {
        created.i64()?.apply_values(|us| us.div_euclid(DAY_US))
    } else {
        booked
            .cast(&DataType::Int64)?
            .i64()?
            .iter()
            .zip(created.i64()?.iter())
            .map(|(booked, created)| booked.or(created).map(|us| us.div_euclid(DAY_US)))
            .collect()
    };
    let mut days: Vec<i64> = day.unique()?.into_no_null_iter().collect();
    days.sort_unstable();
    if let [only] = days[..] {
        return Ok(vec![(only, orders.clone())]);
    }
    let mut out = Vec::with_capacity(days.len());
    for d in days {
        out.push((d, orders.filter(&day.equal(d))?));
    }
    Ok(out)
}

/// `lake/orders/dt=YYYY-MM-DD/<name>.parquet`
pub fn lake_key(day: i64, name: &str) -> String {
    let date = chrono::DateTime::from_timestamp(day * 86_400, 0).map_or_else(
        || "1970-01-01".to_owned(),
        |d| d.format("%Y-%m-%d").to_string(),
    );
    format!("lake/orders/dt={date}/{name}.parquet")
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, TimeZone, Utc};
    use tidemark_domain::Dimension;

    use super::*;

    fn raw_line(order: u32, created_at: DateTime<Utc>, txid: i64, seq: i64) -> String {
        let at = created_at.format(tidemark_orderlog::RAW_TIME_FORMAT);
        format!(
            r#"{{"order_id":"00000000-0000-0000-0000-{order:012}","user_id":"u","city":"Oslo","product_id":"p","category":"c","quantity":2,"unit_price_minor":150,"currency":"EUR","created_at":"{at}","ingested_at":"{at}","txid":{txid},"seq":{seq}}}"#
        )
    }

    /// A version-2 raw record: a basket of three lines (two books, one game).
    fn basket_line(order: u32, created_at: DateTime<Utc>, txid: i64, seq: i64) -> String {
        let at = created_at.format(tidemark_orderlog::RAW_TIME_FORMAT);
        format!(
            r#"{{"order_id":"00000000-0000-0000-0000-{order:012}","user_id":"u","city":"Oslo","currency":"EUR","created_at":"{at}","ingested_at":"{at}","txid":{txid},"seq":{seq},"lines":[{{"product_id":"p-1","category":"books","quantity":2,"unit_price_minor":100}},{{"product_id":"p-2","category":"books","quantity":1,"unit_price_minor":1000}},{{"product_id":"p-3","category":"games","quantity":3,"unit_price_minor":10}}]}}"#
        )
    }

    #[test]
    fn records_may_repeat_only_where_two_relay_batches_overlap() {
        let p = |txid: u64, seq: i64| LogPosition::new(txid, seq);
        // Consecutive batches, one of them in objects of two hours: nowhere.
        let consecutive = Repeats::of([
            (p(7, 0), p(7, 10), 100),
            (p(7, 10), p(9, 3), 100),
            (p(7, 0), p(7, 10), 101),
        ]);
        assert_eq!(consecutive, Repeats::of([]));
        let overlapping = Repeats::of([
            (p(7, 0), p(7, 10), 100),
            (p(7, 5), p(7, 15), 100),
            (p(7, 20), p(8, 30), 100),
            (p(8, 25), p(9, 40), 100),
            (p(8, 26), p(8, 28), 100),
            // One batch, one hour, two keys: the whole batch.
            (p(9, 50), p(9, 60), 100),
            (p(9, 50), p(9, 60), 100),
        ]);
        for (at, may) in [
            (p(7, 5), false),
            (p(7, 6), true),
            (p(7, 10), true),
            (p(7, 11), false),
            (p(8, 25), false),
            (p(8, 26), true),
            (p(8, 30), true),
            (p(8, 31), false),
            (p(9, 0), false),
            (p(9, 50), false),
            (p(9, 51), true),
            (p(9, 60), true),
            (p(9, 61), false),
        ] {
            assert_eq!(overlapping.holds(at), may, "{at:?}");
        }
    }

    #[test]
    fn only_records_that_may_repeat_are_held_to_find_their_copies() {
        let at = Utc.with_ymd_and_hms(2026, 11, 20, 23, 0, 0).unwrap();
        let p = |seq: i64| LogPosition::new(5, seq);
        // Batch (0, 4] landed, then (2, 6] over it: orders 3 and 4 twice.
        let first = (p(0), p(4));
        let second = (p(2), p(6));
        let repeats = Repeats::of([(first.0, first.1, 0), (second.0, second.1, 0)]);
        let file = |lines: &[String], batch| {
            let raw = in_range(parse_raw(lines.join("\n").as_bytes()).unwrap(), 0, 9).unwrap();
            repeats.mark(raw, "raw/a.jsonl", batch)
        };
        let mut writer = LakeWriter::default();
        let one = (1..=4)
            .map(|n| raw_line(n, at, 5, i64::from(n)))
            .collect::<Vec<_>>();
        let two = (3..=6)
            .map(|n| raw_line(n, at, 5, i64::from(n)))
            .collect::<Vec<_>>();
        writer.add(vec![file(&one, first).unwrap()]).unwrap();
        writer.add(vec![file(&two, second).unwrap()]).unwrap();
        assert_eq!(writer.ids_held(), 2, "orders 3 and 4, not 1, 2, 5, 6");
        let (_, orders) = writer.finish().unwrap();
        assert_eq!(orders.height(), 6, "each order once");
        // A record outside its object's batch: the manifest cannot be trusted.
        let outside = file(&[raw_line(9, at, 5, 9)], second);
        assert!(
            matches!(outside, Err(LakeError::OutsideBatch(_))),
            "{outside:?}"
        );
        // Then every record is held, and the copies are still found.
        let everywhere = Repeats::everywhere();
        let mut writer = LakeWriter::default();
        for (lines, batch) in [(&one, first), (&two, second)] {
            let raw = in_range(parse_raw(lines.join("\n").as_bytes()).unwrap(), 0, 9).unwrap();
            writer
                .add(vec![everywhere.mark(raw, "raw/a.jsonl", batch).unwrap()])
                .unwrap();
        }
        assert_eq!(writer.ids_held(), 6);
        assert_eq!(writer.finish().unwrap().1.height(), 6);
    }

    #[test]
    fn a_basket_is_one_row_per_line_counted_once_per_order_and_category() {
        let at = Utc.with_ymd_and_hms(2026, 11, 20, 23, 0, 0).unwrap();
        // The basket twice (a range landed twice) and a version-1 record.
        let text = [
            basket_line(1, at, 5, 1),
            basket_line(1, at, 5, 1),
            raw_line(2, at, 5, 2),
        ]
        .join("\n");
        let orders = orders_from_raw(parse_raw(text.as_bytes()).unwrap(), 0, 9).unwrap();
        let column = |name: &str| -> Vec<i64> {
            orders
                .column(name)
                .unwrap()
                .i64()
                .unwrap()
                .into_no_null_iter()
                .collect()
        };
        assert_eq!(column("line_no"), [1, 2, 3, 1]);
        assert_eq!(column("order_first"), [1, 0, 0, 1]);
        assert_eq!(column("category_first"), [1, 0, 1, 1]);
        let totals = aggregate::currency_totals(&orders).unwrap()["EUR"];
        assert_eq!(totals.of(Dimension::Total), [1_230 + 300, 2, 6 + 2]);
        assert_eq!(totals.of(Dimension::Category)[1], 3);
        assert_eq!(totals.of(Dimension::Product)[1], 4);
    }

    #[test]
    fn lake_files_from_before_lines_read_as_one_line_orders_beside_new_ones() {
        let at = Utc.with_ymd_and_hms(2026, 11, 20, 23, 0, 0).unwrap();
        let new = orders_from_raw(
            parse_raw(basket_line(1, at, 5, 1).as_bytes()).unwrap(),
            0,
            9,
        )
        .unwrap();
        // A file as the lake wrote it before baskets (and adjustments): no line
        // columns, no adjustment columns.
        let mut old = orders_from_raw(parse_raw(raw_line(2, at, 5, 2).as_bytes()).unwrap(), 0, 9)
            .unwrap()
            .drop_many([
                "line_no",
                "order_first",
                "category_first",
                "adjustment_id",
                "adjustment_kind",
                "adjusted_at",
                "refunded_quantity",
                "refunded_minor",
                "cancel_first",
                "cancel_category_first",
            ]);
        let old = from_parquet(&to_parquet(&mut old).unwrap()).unwrap();
        let mut newer = new.clone();
        let new = from_parquet(&to_parquet(&mut newer).unwrap()).unwrap();
        let both = concat([old.lazy(), new.lazy()], UnionArgs::default())
            .unwrap()
            .collect()
            .unwrap();
        assert_eq!(both.height(), 4);
        let totals = aggregate::currency_totals(&both).unwrap()["EUR"];
        assert_eq!(totals.of(Dimension::Total), [300 + 1_230, 2, 2 + 6]);
        // Old rows aggregate as orders beside new ones.
        let measured = with_measures(both.lazy()).collect().unwrap();
        let rows = aggregate::aggregate(&measured, 1).unwrap();
        let total: i64 = rows
            .iter()
            .filter(|r| r.dimension == tidemark_batchview::dimension_code(Dimension::Total))
            .filter(|r| {
                r.granularity
                    == tidemark_batchview::granularity_code(tidemark_domain::Granularity::Day)
            })
            .map(|r| r.revenue_minor)
            .sum();
        assert_eq!(total, 300 + 1_230);
    }

    #[test]
    fn raw_timestamps_parse_to_the_exact_microsecond() {
        let times = [
            Utc.with_ymd_and_hms(2024, 2, 29, 23, 59, 59).unwrap()
                + chrono::TimeDelta::microseconds(999_999),
            Utc.with_ymd_and_hms(2026, 11, 21, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(2000, 1, 1, 12, 30, 5).unwrap()
                + chrono::TimeDelta::microseconds(7),
        ];
        let text: String = times
            .iter()
            .enumerate()
            .map(|(i, t)| raw_line(i as u32, *t, 5, i as i64) + "\n")
            .collect();
        let orders = orders_from_raw(parse_raw(text.as_bytes()).unwrap(), 0, 10).unwrap();
        let created: Vec<i64> = orders
            .column("created_at")
            .unwrap()
            .cast(&DataType::Int64)
            .unwrap()
            .i64()
            .unwrap()
            .into_no_null_iter()
            .collect();
        let expected: Vec<i64> = times.iter().map(DateTime::timestamp_micros).collect();
        assert_eq!(created, expected);
    }

    #[test]
    fn copies_of_an_order_id_collapse_to_the_first_and_the_range_is_applied() {
        let at = Utc.with_ymd_and_hms(2026, 11, 20, 23, 0, 0).unwrap();
        let next_day = at + chrono::TimeDelta::hours(2);
        let text = [
            raw_line(1, at, 5, 1),
            raw_line(2, next_day, 5, 2),
            raw_line(1, at, 5, 1),
            raw_line(3, at, 9, 1),
        ]
        .join("\n");
        let orders = orders_from_raw(parse_raw(text.as_bytes()).unwrap(), 0, 9).unwrap();
        let ids: Vec<&str> = orders
            .column("order_id")
            .unwrap()
            .str()
            .unwrap()
            .iter()
            .flatten()
            .collect();
        assert_eq!(
            ids,
            [
                "00000000-0000-0000-0000-000000000001",
                "00000000-0000-0000-0000-000000000002"
            ]
        );
        let days: Vec<(i64, usize)> = by_date(&orders)
            .unwrap()
            .into_iter()
            .map(|(day, part)| (day, part.height()))
            .collect();
        let day = at.timestamp() / 86_400;
        assert_eq!(days, [(day, 1), (day + 1, 1)]);
    }

    #[test]
    fn the_writer_keeps_the_first_copy_across_groups_and_writes_a_file_per_date() {
        let at = Utc.with_ymd_and_hms(2026, 11, 20, 23, 0, 0).unwrap();
        let next_day = at + chrono::TimeDelta::hours(2);
        let group = |lines: &[String]| {
            vec![in_range(parse_raw(lines.join("\n").as_bytes()).unwrap(), 0, 9).unwrap()]
        };
        let mut writer = LakeWriter::default();
        writer
            .add(group(&[raw_line(1, at, 5, 1), raw_line(2, next_day, 5, 2)]))
            .unwrap();
        writer
            .add(group(&[
                raw_line(1, at, 5, 1),
                raw_line(3, at, 6, 1),
                raw_line(4, at, 9, 1),
            ]))
            .unwrap();
        assert_eq!(writer.raw_records, 4, "txid 9 is outside the range");
        assert_eq!(writer.raw_totals["EUR"].of(Dimension::Total), [1200, 4, 8]);
        let (files, orders) = writer.finish().unwrap();
        let day = at.timestamp() / 86_400;
        let written: Vec<(i64, u64, usize)> = files
            .iter()
            .map(|f| (f.day, f.rows, from_parquet(&f.body).unwrap().height()))
            .collect();
        assert_eq!(written, [(day, 2, 2), (day + 1, 1, 1)]);
        assert_eq!(orders.height(), 3);
        assert_eq!(
            orders.currency_totals()["EUR"].of(Dimension::Total),
            [900, 3, 6]
        );
    }

    #[test]
    fn a_file_taken_in_parts_while_written_is_the_parts_and_the_rest() {
        let at = Utc.with_ymd_and_hms(2026, 11, 20, 12, 0, 0).unwrap();
        let group = |first: u32| {
            let lines: Vec<String> = (first..first + 50)
                .map(|order| raw_line(order, at, 5, i64::from(order)))
                .collect();
            vec![in_range(parse_raw(lines.join("\n").as_bytes()).unwrap(), 0, 9).unwrap()]
        };
        let mut writer = LakeWriter::default();
        let mut parts = Vec::new();
        for first in [1, 51, 101] {
            writer.add(group(first)).unwrap();
            assert!(writer.take_parts(usize::MAX).is_empty(), "below the size");
            for (day, part) in writer.take_parts(1) {
                assert_eq!(day, at.timestamp() / 86_400);
                parts.push(part);
            }
        }
        assert_eq!(parts.len(), 3, "a part after each group");
        let (files, _) = writer.finish().unwrap();
        let [file] = &files[..] else {
            panic!("one date")
        };
        let mut whole = parts.concat();
        whole.extend_from_slice(&file.body);
        let rows = from_parquet(&whole).unwrap();
        assert_eq!(rows.height(), 150);
        assert_eq!(file.rows, 150);
    }

    #[test]
    fn a_malformed_record_fails_the_file_naming_its_line() {
        let at = Utc.with_ymd_and_hms(2026, 11, 20, 23, 0, 0).unwrap();
        let text = [
            raw_line(1, at, 5, 1),
            r#"{"order_id":"x","city":7}"#.to_owned(),
        ]
        .join("\n");
        let error = parse_raw(text.as_bytes()).unwrap_err().to_string();
        assert!(error.contains("line 2"), "{error}");
        let parsed = parse_raw(format!("{}\n\n", raw_line(1, at, 5, 1)).as_bytes()).unwrap();
        assert_eq!(parsed.height(), 1, "blank lines are not records");
    }

    /// Orders, refunds and cancellations as the relay writes them, through the raw
    /// parser and aggregation: every cell equals the domain's contributions summed
    /// (the definition the speed layer and the ground truth use), on both bases.
    #[test]
    fn adjustments_aggregate_as_the_domain_defines_on_both_bases() {
        use tidemark_domain::{
            AdjustedLine, Adjustment, AdjustmentEvent, AdjustmentKind, Event, Granularity,
            LogPosition, Order, OrderLine, Totals,
        };
        use tidemark_orderlog::{LogRow, RawRecord};
        let at = Utc.with_ymd_and_hms(2026, 11, 20, 23, 30, 0).unwrap();
        let line = |p: &str, c: &str, q: i32, price: i64| OrderLine {
            product_id: p.into(),
            category: c.into(),
            quantity: q,
            unit_price_minor: price,
        };
        let order = |n: u128, city: &str, lines: Vec<OrderLine>| Order {
            order_id: uuid::Uuid::from_u128(n),
            user_id: "u".into(),
            city: city.into(),
            currency: "EUR".parse().unwrap(),
            created_at: at + chrono::TimeDelta::minutes(n as i64),
            lines,
        };
        let basket = order(
            1,
            "Oslo",
            vec![
                line("p-1", "books", 3, 1_000),
                line("p-2", "games", 1, 500),
                line("p-3", "books", 2, 100),
            ],
        );
        let single = order(2, "Berlin", vec![line("p-2", "games", 2, 500)]);
        let adjust = |n: u128, of: &Order, kind, days: i64, lines: &[(i16, i32, i64)]| {
            Event::Adjustment(AdjustmentEvent {
                adjustment: Adjustment {
                    adjustment_id: uuid::Uuid::from_u128(100 + n),
                    order_id: of.order_id,
                    kind,
                    created_at: of.created_at + chrono::TimeDelta::days(days),
                    lines: lines
                        .iter()
                        .map(|&(line_no, quantity, amount_minor)| AdjustedLine {
                            line_no,
                            quantity,
                            amount_minor,
                        })
                        .collect(),
                },
                order: of.clone(),
            })
        };
        let events = [
            Event::Order(basket.clone()),
            Event::Order(single.clone()),
            adjust(
                1,
                &basket,
                AdjustmentKind::Refund,
                2,
                &[(2, 1, 500), (3, 0, 50)],
            ),
            // The rest of the basket, in a later month; line 2 had nothing left.
            adjust(
                2,
                &basket,
                AdjustmentKind::Cancellation,
                40,
                &[(1, 3, 3_000), (3, 2, 150)],
            ),
            adjust(3, &single, AdjustmentKind::Refund, 0, &[(1, 1, 500)]),
        ];
        let mut text = Vec::new();
        for (seq, event) in events.iter().enumerate() {
            let row = LogRow {
                position: LogPosition::new(5, seq as i64 + 1),
                event: event.clone(),
                ingested_at: at,
            };
            RawRecord::from(&row).write_line(&mut text);
        }
        // Landed twice: the copies are dropped.
        text.extend_from_slice(&text.clone());
        let rows = orders_from_raw(parse_raw(&text).unwrap(), 0, 9).unwrap();
        assert_eq!(rows.height(), 4 + 2 + 3 + 1);
        let measured = with_measures(rows.clone().lazy()).collect().unwrap();
        let got = aggregate::aggregate(&measured, 1).unwrap();
        for granularity in Granularity::ALL {
            for dimension in Dimension::ALL {
                let mut expected: BTreeMap<(u32, String), Totals> = BTreeMap::new();
                for event in &events {
                    for c in event.contributions(dimension) {
                        let bucket = granularity.bucket_of_secs(c.at.timestamp()) as u32;
                        expected
                            .entry((bucket, c.value.into_owned()))
                            .or_default()
                            .add(c.totals);
                    }
                }
                let served: BTreeMap<(u32, String), Totals> = got
                    .iter()
                    .filter(|r| r.granularity == tidemark_batchview::granularity_code(granularity))
                    .filter(|r| r.dimension == tidemark_batchview::dimension_code(dimension))
                    .map(|r| {
                        let totals = Totals {
                            revenue_minor: r.revenue_minor,
                            orders: r.orders as i64,
                            items: r.items as i64,
                            booked: tidemark_domain::Corrections {
                                refunded_minor: r.booked_refunded_minor,
                                refunded_items: r.booked_refunded_items as i64,
                                cancelled_orders: r.booked_cancelled_orders as i64,
                            },
                            restated: tidemark_domain::Corrections {
                                refunded_minor: r.restated_refunded_minor,
                                refunded_items: r.restated_refunded_items as i64,
                                cancelled_orders: r.restated_cancelled_orders as i64,
                            },
                        };
                        ((r.bucket, r.value.clone()), totals)
                    })
                    .collect();
                assert_eq!(served, expected, "{granularity} by {dimension}");
            }
        }
        // The audit's totals see the same corrections.
        let totals = aggregate::currency_totals(&rows).unwrap()["EUR"];
        assert_eq!(
            totals.corrections_of(Dimension::Total),
            [500 + 50 + 3_150 + 500, 1 + 3 + 2 + 1, 1]
        );
        assert_eq!(totals.corrections_of(Dimension::Category)[2], 2);
        assert_eq!(totals.corrections_of(Dimension::Product)[2], 3);
        assert_eq!(
            totals.of(Dimension::Product)[1],
            4,
            "adjusted lines are no orders"
        );
        // Adjustment rows go to the file of their own date.
        let days: Vec<i64> = by_date(&rows)
            .unwrap()
            .into_iter()
            .map(|(d, _)| d)
            .collect();
        let day = at.timestamp() / 86_400;
        assert_eq!(days, [day, day + 2, day + 40]);
    }
}
