//! The batch view: revenue aggregates in ClickHouse `revenue_agg`, published with
//! Write-Audit-Publish by the compactor.
//!
//! Each batch run adds rows tagged with its `run_id` holding the sums of the orders
//! it processed. The published state (Postgres `batch_state`, one row, changed
//! atomically) says which runs count: `base_run_id ..= run_id`. The view of a cell
//! is the sum of its rows from those runs; rows of unpublished runs are invisible.
//! Reads use `FINAL` so a run copied twice (a compactor paused inside its publish
//! resuming after its successor published the run) counts once; serving reads
//! without it where it has counted that no run is there twice ([`clean`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgExecutor;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use tidemark_domain::{Attribute, Corrections, Currency, Dimension, Granularity, Grid, Totals};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// A published row this build cannot read: an answer without it would be
    /// silently wrong, so there is no answer.
    #[error("unexpected batch view data: {0}")]
    Corrupt(String),
    /// The cells asked for are more than the reader may hold.
    #[error("more than {0} cells")]
    TooLarge(usize),
}

/// Every row of `query`. A statement whose caller stops waiting for it (a request
/// past its deadline, a client gone) is killed on the server: ClickHouse runs an
/// HTTP query to its end after the client has gone (18.16 has no setting to cancel
/// it), so questions given up under overload went on taking the CPU from those
/// still wanted (measured in `cargo xtask bench serving`).
pub async fn fetch_all<T>(
    client: &clickhouse::Client,
    query: clickhouse::query::Query,
) -> Result<Vec<T>, clickhouse::error::Error>
where
    T: clickhouse::RowOwned + clickhouse::RowRead,
{
    let mut rows = Vec::new();
    fetch_each::<T, clickhouse::error::Error>(client, query, |row| {
        rows.push(row);
        Ok(())
    })
    .await?;
    Ok(rows)
}

/// Every row of `query` given to `each` as it is read — a row type with
/// borrowed text borrows it from the response, and no vector of rows is made —
/// killed on the server when its caller stops waiting or `each` fails (as
/// [`fetch_all`]).
async fn fetch_each<T, E>(
    client: &clickhouse::Client,
    query: clickhouse::query::Query,
    mut each: impl for<'r> FnMut(T::Value<'r>) -> Result<(), E>,
) -> Result<(), E>
where
    T: clickhouse::Row + clickhouse::RowRead,
    E: From<clickhouse::error::Error>,
{
    let mut running = KillOnDrop {
        client: client.clone(),
        query_id: Some(uuid::Uuid::new_v4().to_string()),
    };
    let id = running.query_id.clone().unwrap_or_default();
    let mut rows = query.with_setting("query_id", id).fetch::<T>()?;
    while let Some(row) = rows.next().await? {
        each(row)?;
    }
    running.query_id = None;
    Ok(())
}

/// Kills its statement when dropped, unless it ended.
struct KillOnDrop {
    client: clickhouse::Client,
    query_id: Option<String>,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let Some(query_id) = self.query_id.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let client = self.client.clone();
        runtime.spawn(async move {
            let killed = client
                .query("KILL QUERY WHERE query_id = ? ASYNC")
                .bind(&query_id)
                .execute()
                .await;
            if let Err(e) = killed {
                tracing::debug!(error = %e, query_id, "Killing an abandoned statement failed");
            }
        });
    }
}

/// What is published: which runs count, and what they cover.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PublishedState {
    pub run_id: u64,
    pub base_run_id: u64,
    /// Speed epochs from this one on hold what the batch view does not.
    pub epoch: u64,
    /// Every order with a smaller transaction id is in the batch view.
    pub threshold: u64,
    /// When the cut at `threshold` was made.
    pub watermark_time: DateTime<Utc>,
    pub published_at: DateTime<Utc>,
}

impl PublishedState {
    /// The published state, or `None` before the first publish.
    pub async fn load(db: impl PgExecutor<'_>) -> Result<Option<Self>, sqlx::Error> {
        type Row = (i64, i64, i64, i64, DateTime<Utc>, DateTime<Utc>);
        let row: Option<Row> = sqlx::query_as(
            "SELECT run_id, base_run_id, epoch, threshold::text::int8, watermark_time, published_at \
             FROM batch_state",
        )
        .fetch_optional(db)
        .await?;
        Ok(row.map(
            |(run_id, base, epoch, threshold, watermark_time, published_at)| PublishedState {
                run_id: run_id as u64,
                base_run_id: base as u64,
                epoch: epoch as u64,
                threshold: threshold as u64,
                watermark_time,
                published_at,
            },
        ))
    }
}

/// The shard (of `shards`) holding the rows of the bucket starting at
/// `bucket_secs`: its UTC day, round robin. Deterministic per row, so a row
/// copied twice lands twice on the same shard, where `FINAL` counts it once; and
/// a range of days spreads over every shard.
pub fn shard_of(bucket_secs: u32, shards: usize) -> usize {
    (bucket_secs / 86_400) as usize % shards.max(1)
}

/// The ClickHouse `Enum8` code of a granularity.
pub fn granularity_code(g: Granularity) -> i8 {
    match g {
        Granularity::Minute => 1,
        Granularity::Hour => 2,
        Granularity::Day => 3,
        Granularity::QuarterHour => 4,
    }
}

/// The ClickHouse `Enum8` code of a dimension.
pub fn dimension_code(d: Dimension) -> i8 {
    match d {
        Dimension::Total => 1,
        Dimension::City => 2,
        Dimension::Category => 3,
        Dimension::Product => 4,
        Dimension::CityCategory => 5,
        Dimension::CityCategoryProduct => 6,
    }
}

/// One row of `revenue_agg` (and of a run's staging table).
#[derive(Clone, Debug, Default, PartialEq, Eq, clickhouse::Row, Serialize, Deserialize)]
pub struct AggRow {
    pub granularity: i8,
    pub dimension: i8,
    /// Bucket start, unix seconds.
    pub bucket: u32,
    pub value: String,
    pub currency: String,
    pub run_id: u64,
    pub revenue_minor: i64,
    pub orders: u64,
    pub items: u64,
    pub booked_refunded_minor: i64,
    pub booked_refunded_items: u64,
    pub booked_cancelled_orders: u64,
    pub restated_refunded_minor: i64,
    pub restated_refunded_items: u64,
    pub restated_cancelled_orders: u64,
}

/// The columns of `revenue_agg`, in order.
pub const COLUMNS: &str = "granularity, dimension, bucket, value, currency, run_id, \
     revenue_minor, orders, items, booked_refunded_minor, booked_refunded_items, \
     booked_cancelled_orders, restated_refunded_minor, restated_refunded_items, \
     restated_cancelled_orders";

/// The [`Totals`] of a row holding `revenue_agg`'s sums under their column names.
macro_rules! totals {
    ($row:expr) => {
        Totals {
            revenue_minor: $row.revenue_minor,
            orders: $row.orders as i64,
            items: $row.items as i64,
            booked: Corrections {
                refunded_minor: $row.booked_refunded_minor,
                refunded_items: $row.booked_refunded_items as i64,
                cancelled_orders: $row.booked_cancelled_orders as i64,
            },
            restated: Corrections {
                refunded_minor: $row.restated_refunded_minor,
                refunded_items: $row.restated_refunded_items as i64,
                cancelled_orders: $row.restated_cancelled_orders as i64,
            },
        }
    };
}

#[derive(clickhouse::Row, Deserialize)]
struct CellRow {
    bucket: u32,
    value: String,
    currency: String,
    revenue_minor: i64,
    orders: u64,
    items: u64,
    booked_refunded_minor: i64,
    booked_refunded_items: u64,
    booked_cancelled_orders: u64,
    restated_refunded_minor: i64,
    restated_refunded_items: u64,
    restated_cancelled_orders: u64,
}

/// The published cells of `dimension` at `granularity` with bucket start in
/// `[from_secs, to_secs)`.
pub async fn read(
    client: &clickhouse::Client,
    state: &PublishedState,
    granularity: Granularity,
    dimension: Dimension,
    from_secs: i64,
    to_secs: i64,
) -> Result<Grid, Error> {
    let rows = client
        .query(
            "SELECT bucket, value, currency, sum(revenue_minor) AS s_revenue, \
                    sum(orders) AS s_orders, sum(items) AS s_items, \
                    sum(booked_refunded_minor) AS s_br, sum(booked_refunded_items) AS s_bi, \
                    sum(booked_cancelled_orders) AS s_bc, \
                    sum(restated_refunded_minor) AS s_sr, sum(restated_refunded_items) AS s_si, \
                    sum(restated_cancelled_orders) AS s_sc \
             FROM revenue_agg FINAL \
             WHERE granularity = ? AND dimension = ? \
               AND bucket >= toDateTime(?) AND bucket < toDateTime(?) \
               AND run_id >= ? AND run_id <= ? \
             GROUP BY bucket, value, currency",
        )
        .bind(granularity.as_str())
        .bind(dimension.as_str())
        .bind(from_secs.clamp(0, i64::from(u32::MAX)) as u32)
        .bind(to_secs.clamp(0, i64::from(u32::MAX)) as u32)
        .bind(state.base_run_id)
        .bind(state.run_id);
    let rows: Vec<CellRow> = fetch_all(client, rows).await?;
    let mut grid = Grid::new();
    for row in rows {
        let currency = row.currency.parse::<Currency>().map_err(|e| {
            Error::Corrupt(format!(
                "a published row of {granularity} by {dimension} has {e}"
            ))
        })?;
        grid.insert((i64::from(row.bucket), row.value, currency), totals!(row));
    }
    Ok(grid)
}

/// A revenue question over `revenue_agg`, filtered, grouped and bucketed in
/// ClickHouse: only the answer's cells travel.
pub struct CellsQuery<'a> {
    /// The stored buckets read, of this granularity, starting in `[from, to)`.
    pub granularity: Granularity,
    pub from: i64,
    pub to: i64,
    /// The stored shape read; it holds every attribute grouped or filtered by.
    pub shape: Dimension,
    /// A ClickHouse expression of `{t}` (a stored bucket's start, unix seconds as
    /// `Int64`) giving the answer bucket's key; built by the caller from numbers only.
    pub key: &'a str,
    /// Keep the UTC date (days since 1970-01-01) of each stored bucket apart (a
    /// conversion rounds per date); else the date is 0.
    pub dated: bool,
    pub group_by: &'a [Attribute],
    pub filters: &'a [(Attribute, Vec<String>)],
    /// Only this currency.
    pub currency: Option<Currency>,
    /// Fold rows attached twice (`FINAL`). Without, the read is exact only at a
    /// [`Generation`] found [`clean`] and unchanged across the read.
    pub fold: bool,
}

/// A cell of a [`CellsQuery`]'s answer: bucket key, UTC date (or 0), grouped
/// values (one allocation shared by the cells of a group, see [`cells`]),
/// currency.
pub type PieceKey = (i64, i64, Arc<[String]>, Currency);

/// A row as read, its text borrowed from the response.
#[derive(clickhouse::Row, Deserialize)]
struct PieceRow<'a> {
    k: i64,
    d: i64,
    /// The grouped values, or empty when they come as the stored value `v`.
    #[serde(borrow)]
    g: Vec<&'a str>,
    v: &'a str,
    currency: &'a str,
    revenue_minor: i64,
    orders: u64,
    items: u64,
    booked_refunded_minor: i64,
    booked_refunded_items: u64,
    booked_cancelled_orders: u64,
    restated_refunded_minor: i64,
    restated_refunded_items: u64,
    restated_cancelled_orders: u64,
}

impl CellsQuery<'_> {
    /// The ClickHouse expression of an attribute of the shape: the value itself,
    /// or its part of a joined value (`parts`, split once per row).
    fn attribute(&self, a: Attribute) -> String {
        let attributes = self.shape.attributes();
        let i = attributes
            .iter()
            .position(|x| *x == a)
            .expect("the shape covers the question");
        if attributes.len() == 1 {
            "value".to_owned()
        } else {
            format!("parts[{}]", i + 1)
        }
    }

    /// When the answer groups by every attribute of the shape (in any order), the
    /// place of each grouped attribute in the shape: then cells are grouped by
    /// their stored value (one string, nothing built per row) and the grouped
    /// values split from it here ([`CellsQuery::grouped`]).
    fn value_places(&self) -> Option<Vec<usize>> {
        let attributes = self.shape.attributes();
        if attributes.is_empty() || self.group_by.len() != attributes.len() {
            return None;
        }
        self.group_by
            .iter()
            .map(|a| attributes.iter().position(|x| x == a))
            .collect::<Option<Vec<usize>>>()
            .filter(|_| attributes.iter().all(|a| self.group_by.contains(a)))
    }

    fn by_value(&self) -> bool {
        self.value_places().is_some()
    }

    /// Whether the statement splits the stored value (`parts`, bound first).
    fn splits(&self) -> bool {
        self.shape.attributes().len() > 1 && !(self.by_value() && self.filters.is_empty())
    }

    /// A row's grouped values, in `group_by`'s order: `places` is
    /// [`CellsQuery::value_places`], found once per statement.
    fn grouped(&self, places: Option<&[usize]>, row: &PieceRow<'_>) -> Result<Vec<String>, Error> {
        let Some(places) = places else {
            return Ok(row.g.iter().map(|g| (*g).to_owned()).collect());
        };
        let mut parts = [""; 3];
        let mut n = 0;
        for part in row.v.split(tidemark_domain::VALUE_SEPARATOR) {
            if let Some(slot) = parts.get_mut(n) {
                *slot = part;
            }
            n += 1;
        }
        if n != self.shape.attributes().len() {
            return Err(Error::Corrupt(format!(
                "a published value of {} is {:?}",
                self.shape, row.v
            )));
        }
        Ok(places.iter().map(|i| parts[*i].to_owned()).collect())
    }

    /// Without `ORDER BY` (nothing that sums the pieces needs an order), and
    /// grouped by the stored value where it can be: ordering the rows and
    /// building an array of the value's parts per row were a third of the
    /// statement's CPU (measured on `bench serving`'s batch view: the dashboard
    /// question's statement 20–22 ms of ClickHouse's user CPU before, 15 after).
    fn sql(&self, limit: usize) -> String {
        let t = "toInt64(toUInt32(bucket))";
        let with = if self.splits() {
            "WITH splitByChar(?, value) AS parts "
        } else {
            ""
        };
        let g = if self.by_value() || self.group_by.is_empty() {
            "emptyArrayString()".to_owned()
        } else {
            let groups: Vec<String> = self.group_by.iter().map(|a| self.attribute(*a)).collect();
            format!("[{}]", groups.join(", "))
        };
        let v = if self.by_value() { "value" } else { "''" };
        let d = if self.dated {
            format!("intDiv({t}, 86400)")
        } else {
            "toInt64(0)".to_owned()
        };
        let mut filter: String = self
            .filters
            .iter()
            .map(|(a, _)| format!(" AND has(?, {})", self.attribute(*a)))
            .collect();
        if self.currency.is_some() {
            filter += " AND currency = ?";
        }
        format!(
            "{with}SELECT toInt64({key}) AS k, {d} AS d, {g} AS g, {v} AS v, currency, \
                    sum(revenue_minor) AS s_revenue, sum(orders) AS s_orders, \
                    sum(items) AS s_items, sum(booked_refunded_minor) AS s_br, \
                    sum(booked_refunded_items) AS s_bi, sum(booked_cancelled_orders) AS s_bc, \
                    sum(restated_refunded_minor) AS s_sr, sum(restated_refunded_items) AS s_si, \
                    sum(restated_cancelled_orders) AS s_sc \
             FROM revenue_agg{fold} \
             WHERE granularity = ? AND dimension = ? \
               AND bucket >= toDateTime(?) AND bucket < toDateTime(?) \
               AND run_id >= ? AND run_id <= ?{filter} \
             GROUP BY k, d, g, v, currency LIMIT {}",
            limit.saturating_add(1).min(u64::MAX as usize / 2),
            key = self.key.replace("{t}", t),
            fold = if self.fold { " FINAL" } else { "" },
        )
    }
}

/// The published cells of `q`, summed per answer cell (and UTC date): each key
/// once, in no order (ordering them, in ClickHouse or here, cost as much as
/// reading them, and serving sums them by hash); refused with
/// [`Error::TooLarge`] beyond `limit` of them. Room is made for `expected`
/// rows at first (the caller's guess, e.g. the rows of the last such read): a
/// vector grown by doubling copied a 30-day answer's 1.5 MB of pieces a dozen
/// times, a twentieth of serving's CPU on distinct questions (profiled).
pub async fn cells(
    client: &clickhouse::Client,
    state: &PublishedState,
    q: &CellsQuery<'_>,
    limit: usize,
    expected: usize,
) -> Result<Vec<(PieceKey, Totals)>, Error> {
    let mut query = client.query(&q.sql(limit));
    if q.splits() {
        query = query.bind(tidemark_domain::VALUE_SEPARATOR.to_string());
    }
    query = query
        .bind(q.granularity.as_str())
        .bind(q.shape.as_str())
        .bind(q.from.clamp(0, i64::from(u32::MAX)) as u32)
        .bind(q.to.clamp(0, i64::from(u32::MAX)) as u32)
        .bind(state.base_run_id)
        .bind(state.run_id);
    for (_, values) in q.filters {
        query = query.bind(values);
    }
    if let Some(c) = q.currency {
        query = query.bind(c.as_str());
    }
    // An answer holds a handful of currencies: each code is parsed once.
    let mut parsed: Vec<(String, Currency)> = Vec::new();
    let mut currency_of = |code: &str| -> Result<Currency, Error> {
        if let Some((_, c)) = parsed.iter().find(|(known, _)| known == code) {
            return Ok(*c);
        }
        let c = code.parse::<Currency>().map_err(|e| {
            Error::Corrupt(format!(
                "a published row of {} by {} has {e}",
                q.granularity, q.shape
            ))
        })?;
        parsed.push((code.to_owned(), c));
        Ok(c)
    };
    // Each row made a piece as it is read (a vector of the rows first, then of
    // the pieces, was a tenth of serving's CPU on distinct questions). A group's
    // values are made once and shared by its rows, known by the stored value
    // (or the grouped values joined as one is): three allocations per row
    // before, for the few dozen groups of tens of thousands of rows.
    let places = q.value_places();
    let mut pieces = Vec::with_capacity(expected.min(limit));
    let mut groups: HashMap<String, Arc<[String]>> = HashMap::new();
    let mut joined = String::new();
    fetch_each::<PieceRow<'_>, Error>(client, query, |row| {
        if pieces.len() == limit {
            return Err(Error::TooLarge(limit));
        }
        let currency = currency_of(row.currency)?;
        let stored = if places.is_some() {
            row.v
        } else {
            // Values hold no control characters: joined, they are one string.
            joined.clear();
            for (i, g) in row.g.iter().enumerate() {
                if i > 0 {
                    joined.push(tidemark_domain::VALUE_SEPARATOR);
                }
                joined.push_str(g);
            }
            &joined
        };
        let g = match groups.get(stored) {
            Some(g) => g.clone(),
            None => {
                let g: Arc<[String]> = q.grouped(places.as_deref(), &row)?.into();
                groups.insert(stored.to_owned(), g.clone());
                g
            }
        };
        pieces.push(((row.k, row.d, g, currency), totals!(row)));
        Ok(())
    })
    .await?;
    // Kept (cached) as long as the published state: not with a guess's room.
    if pieces.capacity() > pieces.len() + pieces.len() / 4 {
        pieces.shrink_to_fit();
    }
    Ok(pieces)
}

/// What `revenue_agg` holds, as far as a row attached twice is concerned: the
/// highest block number of each partition's active parts. Every attach (and
/// insert) takes block numbers above all taken before, and a merge keeps its
/// parts' highest, so two equal generations have had no rows added between them.
pub type Generation = Vec<(String, u64)>;

/// The [`Generation`] of `revenue_agg` on the server of `client` (one server: a
/// sharded view's reads go through `Distributed` tables, whose replicas this
/// cannot see; they always fold).
pub async fn generation(client: &clickhouse::Client) -> Result<Generation, Error> {
    Ok(client
        .query(
            "SELECT partition_id, max(max_block_number) FROM system.parts \
             WHERE database = currentDatabase() AND table = 'revenue_agg' AND active \
             GROUP BY partition_id ORDER BY partition_id",
        )
        .fetch_all::<(String, u64)>()
        .await?)
}

/// Whether `revenue_agg` holds no published run's rows twice at `generation`:
/// its rows of the published runs are exactly as many as their publishes
/// staged (`batch_runs.rows_out`), and the generation was the same before and
/// after they were counted. A run attached twice (a compactor paused between
/// its check and its attach, resuming after its successor published the same
/// run — the one fault `FINAL` is kept for) counts more. `None`: the generation
/// moved while counting (ask again).
pub async fn clean(
    client: &clickhouse::Client,
    pool: &sqlx::PgPool,
    state: &PublishedState,
    generation: &Generation,
) -> Result<Option<bool>, Error> {
    let held: u64 = client
        .query("SELECT count() FROM revenue_agg WHERE run_id >= ? AND run_id <= ?")
        .bind(state.base_run_id)
        .bind(state.run_id)
        .fetch_one()
        .await?;
    if self::generation(client).await? != *generation {
        return Ok(None);
    }
    let staged: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(rows_out), 0)::int8 FROM batch_runs \
         WHERE run_id BETWEEN $1 AND $2 AND status = 'published'",
    )
    .bind(state.base_run_id as i64)
    .bind(state.run_id as i64)
    .fetch_one(pool)
    .await?;
    Ok(Some(i64::try_from(held).is_ok_and(|held| held == staged)))
}

/// A question of who bought, over `buyers` (the published runs' rows).
pub struct BuyersQuery<'a> {
    /// Minutes in `[from, to)`, unix seconds.
    pub from: i64,
    pub to: i64,
    /// A ClickHouse expression of `t` (the minute, unix seconds as `Int64`) giving
    /// the key of the answer's bucket; built by the caller from numbers only.
    pub key: &'a str,
    pub group_by: &'a [Attribute],
    pub filters: &'a [(Attribute, Vec<String>)],
    /// Only this currency.
    pub currency: Option<Currency>,
    /// Count per currency (else across currencies, as one).
    pub per_currency: bool,
}

/// A cell of a buyers answer: bucket key, grouped values, currency (`""` across
/// currencies).
pub type BuyerKey = (i64, Vec<String>, String);

#[derive(clickhouse::Row, Deserialize)]
struct BuyerCount {
    k: i64,
    g: Vec<String>,
    c: String,
    n: u64,
}

#[derive(clickhouse::Row, Deserialize)]
struct BuyerPresence {
    k: i64,
    g: Vec<String>,
    c: String,
    u: String,
}

fn column(a: Attribute) -> &'static str {
    match a {
        Attribute::City => "city",
        Attribute::Category => "category",
        Attribute::Product => "product",
    }
}

impl BuyersQuery<'_> {
    /// `SELECT <key> AS k, <groups> AS g, <currency> AS c, {select} … WHERE …`,
    /// with its `?` bound in order by [`BuyersQuery::bind`].
    fn sql(&self, select: &str, users: bool, group: &str) -> String {
        let t = "toInt64(toUInt32(bucket))";
        let groups: Vec<&str> = self.group_by.iter().map(|a| column(*a)).collect();
        let g = if groups.is_empty() {
            "emptyArrayString()".to_owned()
        } else {
            format!("[{}]", groups.join(", "))
        };
        let c = if self.per_currency { "currency" } else { "''" };
        let mut filter: String = self
            .filters
            .iter()
            // `IN (…)`, which the primary key (city first) can prune by.
            .map(|(a, values)| {
                let marks = vec!["?"; values.len()].join(", ");
                format!(" AND {} IN ({marks})", column(*a))
            })
            .collect();
        if self.currency.is_some() {
            filter += " AND currency = ?";
        }
        if users {
            filter += " AND has(?, user_id)";
        }
        format!(
            "SELECT toInt64({key}) AS k, {g} AS g, {c} AS c, {select} FROM buyers \
             WHERE bucket >= toDateTime(?) AND bucket < toDateTime(?) \
               AND run_id >= ? AND run_id <= ?{filter} {group}",
            key = self.key.replace("{t}", t),
        )
    }

    fn bind(
        &self,
        mut query: clickhouse::query::Query,
        state: &PublishedState,
    ) -> clickhouse::query::Query {
        query = query
            .bind(self.from.clamp(0, i64::from(u32::MAX)) as u32)
            .bind(self.to.clamp(0, i64::from(u32::MAX)) as u32)
            .bind(state.base_run_id)
            .bind(state.run_id);
        for (_, values) in self.filters {
            for value in values {
                query = query.bind(value);
            }
        }
        if let Some(c) = self.currency {
            query = query.bind(c.as_str());
        }
        query
    }
}

/// Distinct users per cell of `q` in the published runs.
pub async fn buyers(
    client: &clickhouse::Client,
    state: &PublishedState,
    q: &BuyersQuery<'_>,
) -> Result<BTreeMap<BuyerKey, u64>, Error> {
    // In the map's key order (ClickHouse orders arrays and strings as Rust does,
    // element by element and byte by byte): the map is built without sorting.
    let sql = q.sql(
        "uniqExact(user_id) AS n",
        false,
        "GROUP BY k, g, c ORDER BY k, g, c",
    );
    let rows: Vec<BuyerCount> = fetch_all(client, q.bind(client.query(&sql), state)).await?;
    Ok(rows.into_iter().map(|r| ((r.k, r.g, r.c), r.n)).collect())
}

/// Which of `users` the published runs hold in each cell of `q`.
pub async fn buyers_among(
    client: &clickhouse::Client,
    state: &PublishedState,
    q: &BuyersQuery<'_>,
    users: &[&str],
) -> Result<BTreeSet<(BuyerKey, String)>, Error> {
    let sql = q.sql(
        "user_id AS u",
        true,
        "GROUP BY k, g, c, u ORDER BY k, g, c, u",
    );
    let query = q.bind(client.query(&sql), state).bind(users);
    let rows: Vec<BuyerPresence> = fetch_all(client, query).await?;
    Ok(rows.into_iter().map(|r| ((r.k, r.g, r.c), r.u)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query<'a>(
        shape: Dimension,
        group_by: &'a [Attribute],
        filters: &'a [(Attribute, Vec<String>)],
    ) -> CellsQuery<'a> {
        CellsQuery {
            granularity: Granularity::QuarterHour,
            from: 0,
            to: 3600,
            shape,
            key: "{t}",
            dated: false,
            group_by,
            filters,
            currency: None,
            fold: false,
        }
    }

    fn row(v: &str) -> PieceRow<'_> {
        PieceRow {
            k: 0,
            d: 0,
            g: Vec::new(),
            v,
            currency: "EUR",
            revenue_minor: 0,
            orders: 0,
            items: 0,
            booked_refunded_minor: 0,
            booked_refunded_items: 0,
            booked_cancelled_orders: 0,
            restated_refunded_minor: 0,
            restated_refunded_items: 0,
            restated_cancelled_orders: 0,
        }
    }

    #[test]
    fn cells_grouped_by_every_attribute_of_their_shape_are_grouped_by_the_stored_value() {
        use Attribute::{Category, City, Product};
        let pair = Dimension::CityCategory;
        let filters = vec![(City, vec!["Berlin".to_owned()])];
        // Every attribute, in either order: grouped by the value, split in Rust.
        let q = query(pair, &[Category, City], &[]);
        assert!(q.by_value() && !q.splits());
        assert!(q.sql(10).contains("value AS v") && !q.sql(10).contains("parts"));
        let value = format!("Berlin{}books", tidemark_domain::VALUE_SEPARATOR);
        let g = q
            .grouped(q.value_places().as_deref(), &row(&value))
            .expect("two parts");
        assert_eq!(g, ["books", "Berlin"]);
        // A value of another shape is corrupt, never a wrong group.
        let sep = tidemark_domain::VALUE_SEPARATOR;
        for other in [
            "Berlin".to_owned(),
            format!("Berlin{sep}books{sep}sku-1{sep}x"),
        ] {
            assert!(
                matches!(
                    q.grouped(q.value_places().as_deref(), &row(&other)),
                    Err(Error::Corrupt(_))
                ),
                "{other:?}"
            );
        }
        // Filtered, it still splits, for the filter only.
        let q = query(pair, &[City, Category], &filters);
        assert!(q.by_value() && q.splits());
        assert!(q.sql(10).contains("has(?, parts[1])"));
        // Fewer attributes, or one twice: grouped by the parts, as before.
        for group_by in [&[Category][..], &[City, City][..]] {
            let q = query(pair, group_by, &[]);
            assert!(!q.by_value() && q.splits(), "{group_by:?}");
            assert!(q.sql(10).contains("'' AS v"));
            let mut r = row("");
            r.g = vec!["books"];
            assert_eq!(
                q.grouped(q.value_places().as_deref(), &r).expect("as read"),
                ["books"]
            );
        }
        // One attribute: its value, never split.
        let q = query(Dimension::Product, &[Product], &[]);
        assert!(q.by_value() && !q.splits());
        assert_eq!(
            q.grouped(q.value_places().as_deref(), &row("sku-1"))
                .expect("one part"),
            ["sku-1"]
        );
        // Nothing grouped: no value either.
        let q = query(Dimension::Total, &[], &[]);
        assert!(!q.by_value() && q.sql(10).contains("emptyArrayString() AS g, '' AS v"));
    }
}
