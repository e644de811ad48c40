//! The exact merge: published batch view + speed epochs after it.
//!
//! A read takes, in this order: the published state (which runs count, and the
//! first speed epoch they do not cover), the batch cells of that state, and the
//! speed epochs from that epoch on. The batch view covers exactly the orders with
//! `txid` below the state's threshold; the speed epochs from the state's epoch hold
//! only orders at or above it. Their sum therefore counts every consumed order once
//! and never exceeds the truth, even while a publish happens between the reads: a
//! state read before the publish still finds its epochs, which are kept for a grace
//! period after the next publish.
//!
//! The batch cells of a published state never change, so they are cached by state.
//! The speed cells are cached by the speed cursor they were read at: each request
//! reads the cursor (one small Redis call, shared by the requests that overlap it)
//! and, only when it moved, brings the
//! cached read up to date with the changes since (what Redis spends is what
//! changed), one computation per question at a time. An answer is thus always the exact merge as
//! of the cursor it states, and live.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;
use sqlx::PgPool;
use tidemark_batchview::{BuyersQuery, CellsQuery, PieceKey, PublishedState};
use tidemark_domain::{Attribute, Currency, Dimension, Granularity, Grid, Totals};
use tidemark_speedview::{Buyer, Meta, SpeedView};

use crate::bounded::Bounded;
use crate::compute::Computing;
use crate::local::Buckets;

/// Which part of an answer a store could not provide.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    Batch,
    Speed,
}

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("the {0:?} view is unavailable")]
    Unavailable(Part),
    /// The question needs more stored cells than a reader may hold
    /// (`serving.max_read_cells`): a client's question too wide, not an outage.
    #[error("more than {0} stored cells")]
    TooLarge(usize),
    /// A stored cell this build cannot read: no answer rather than a wrong one.
    #[error("unreadable view data: {0}")]
    Corrupt(String),
}

/// How fresh an answer is.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema, async_graphql::SimpleObject)]
pub struct Freshness {
    /// The published batch state, if any.
    pub batch: Option<BatchFreshness>,
    /// The speed layer's position, if its view is available.
    pub speed: Option<SpeedFreshness>,
    /// When the answer was computed.
    pub as_of: DateTime<Utc>,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema, async_graphql::SimpleObject)]
pub struct BatchFreshness {
    pub run_id: u64,
    /// Every order whose transaction id is below this is in the batch view.
    pub watermark_txid: u64,
    /// When the watermark was cut.
    pub watermark_time: DateTime<Utc>,
    pub published_at: DateTime<Utc>,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema, async_graphql::SimpleObject)]
pub struct SpeedFreshness {
    /// The last log position applied, `txid_seq`.
    pub cursor: String,
    /// When the cursor last moved.
    pub updated_at: DateTime<Utc>,
    /// How far the speed layer was behind the log when last measured.
    pub lag_seconds: Option<f64>,
}

/// What an answer reads from both views: the stored cells of `shape` at
/// `granularity` starting in `[from, to)`, those its filters and currency admit,
/// summed per bucket key (and UTC date when `dated`), grouped value and currency.
pub struct Read<'a> {
    pub granularity: Granularity,
    pub shape: Dimension,
    pub from: i64,
    pub to: i64,
    pub buckets: Buckets,
    pub dated: bool,
    pub group_by: &'a [Attribute],
    pub filters: &'a [(Attribute, Vec<String>)],
    pub currency: Option<Currency>,
}

impl Read<'_> {
    /// The cache key of the batch part.
    pub fn describe(&self) -> String {
        format!(
            "{}|{}|{}|{}|{:?}|{}|{:?}|{:?}|{:?}",
            self.granularity,
            self.shape,
            self.from,
            self.to,
            self.buckets,
            self.dated,
            self.group_by,
            self.filters,
            self.currency
        )
    }

    /// The speed view's cells (`grid`, of the shape at the granularity) summed
    /// as ClickHouse sums the batch's.
    fn pieces(&self, grid: &Grid) -> Result<Pieces, ViewError> {
        let attributes = self.shape.attributes();
        let index = |a: &Attribute| attributes.iter().position(|x| x == a).expect("covered");
        let filters: Vec<(usize, &Vec<String>)> =
            self.filters.iter().map(|(a, v)| (index(a), v)).collect();
        let groups: Vec<usize> = self.group_by.iter().map(index).collect();
        let mut out = Pieces::new();
        let mut last: Option<(i64, i64)> = None;
        for ((bucket, value, currency), totals) in grid {
            if *bucket < self.from
                || *bucket >= self.to
                || self.currency.is_some_and(|c| c != *currency)
            {
                continue;
            }
            let parts = self.shape.split(value).ok_or_else(|| {
                ViewError::Corrupt(format!("a speed cell of {} is {value:?}", self.shape))
            })?;
            if !filters.iter().all(|(i, values)| {
                values
                    .binary_search_by(|v| v.as_str().cmp(parts[*i]))
                    .is_ok()
            }) {
                continue;
            }
            let key = match last {
                Some((stored, key)) if stored == *bucket => key,
                _ => {
                    let key = self.buckets.key(*bucket);
                    last = Some((*bucket, key));
                    key
                }
            };
            let date = if self.dated {
                bucket.div_euclid(86_400)
            } else {
                0
            };
            let values: Arc<[String]> = groups.iter().map(|i| parts[*i].to_owned()).collect();
            out.entry((key, date, values, *currency))
                .or_default()
                .add(*totals);
        }
        Ok(out)
    }
}

/// A buyers question as a cache key.
fn describe(query: &BuyersQuery<'_>) -> String {
    format!(
        "{}|{}|{}|{:?}|{:?}|{:?}|{}",
        query.from,
        query.to,
        query.key,
        query.group_by,
        query.filters,
        query.currency,
        query.per_currency
    )
}

/// Sums per (bucket key, UTC date or 0, grouped values, currency).
pub type Pieces = BTreeMap<PieceKey, Totals>;

/// The batch view's sums, as [`Pieces`] but each key once in no order
/// ([`tidemark_batchview::cells`]): nothing that sums them needs an order.
pub type BatchPieces = Vec<(PieceKey, Totals)>;

/// About how much memory pieces with these keys hold: each entry's key and
/// totals, its grouped values' heap, and a B-tree node's share per entry (a
/// group's values shared by its pieces are counted with each: at most that).
pub fn pieces_bytes<'a>(keys: impl Iterator<Item = &'a PieceKey>) -> usize {
    const PER_ENTRY: usize = size_of::<PieceKey>() + size_of::<Totals>() + 16;
    keys.map(|(_, _, values, _)| {
        PER_ENTRY
            + values.len() * size_of::<String>()
            + values.iter().map(String::capacity).sum::<usize>()
    })
    .sum()
}

/// Both views' pieces and how they were read: the answer is their sum.
pub struct Merged {
    pub batch: Arc<BatchPieces>,
    pub speed: Pieces,
    /// The published state the batch pieces are of (`None`: none yet, or unknown
    /// with the batch part missing).
    pub state: Option<PublishedState>,
    /// Who bought in the speed view's part of the range, read with its pieces at the
    /// one cursor the answer states (empty when the speed part is missing).
    pub speed_buyers: Arc<BTreeSet<Buyer>>,
    pub freshness: Freshness,
    /// Parts left out because their store was down (only with `allow_partial`).
    pub missing: Vec<Part>,
}

impl Merged {
    /// Every piece of both views (a key may come twice: once from each).
    pub fn pieces(&self) -> impl Iterator<Item = (&PieceKey, &Totals)> + Clone {
        let batch = self.batch.iter().map(|(key, totals)| (key, totals));
        batch.chain(self.speed.iter())
    }
}

type BatchKey = (u64, u64, String);

/// How many stored cells a question may read per cell its answer may hold: the
/// stored cells of a finer shape or bucket are summed into fewer.
const READ_FACTOR: usize = 10;
type BuyersKey = (u64, u64, String);
/// The users asked about so far and the (cell, user) pairs the batch holds of them.
type HeldSlot = Arc<tokio::sync::Mutex<(foldhash::HashSet<String>, Arc<Held>)>>;
/// The (cell, user) pairs the batch view holds, of the users asked about.
pub type Held = BTreeSet<(tidemark_batchview::BuyerKey, String)>;
pub type BuyerCounts = BTreeMap<tidemark_batchview::BuyerKey, u64>;
type SpeedKey = (u64, Granularity, Dimension, i64, i64);
/// A speed read: its cells and its buyers, both exact at one cursor.
type SpeedRead = (Arc<Grid>, Arc<BTreeSet<Buyer>>);
type SpeedSlot = Arc<tokio::sync::Mutex<Option<tidemark_speedview::Tracked>>>;

/// How long a request waits for Postgres when it reads a kept value again.
const KEPT_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// A value read again at most once per time to live, by one request at a time:
/// while one reads it, the others take the value kept — no herd of requests on
/// the store each time it expires, and none waiting for it but the one reading.
struct Kept<T> {
    value: Mutex<Option<(T, Instant)>>,
    reading: tokio::sync::Mutex<()>,
}

impl<T> Default for Kept<T> {
    fn default() -> Self {
        Self {
            value: Mutex::new(None),
            reading: tokio::sync::Mutex::new(()),
        }
    }
}

impl<T: Clone> Kept<T> {
    /// The value kept, if younger than `ttl` or being read again by another
    /// request; else the turn to read it (then [`Kept::set`] it). Without a value
    /// kept yet, waits for the request reading it.
    async fn get(&self, ttl: Duration) -> Result<T, tokio::sync::MutexGuard<'_, ()>> {
        let fresh = |value: &Mutex<Option<(T, Instant)>>| {
            value
                .lock()
                .expect("not poisoned")
                .as_ref()
                .filter(|(_, at)| at.elapsed() < ttl)
                .map(|(v, _)| v.clone())
        };
        if let Some(value) = fresh(&self.value) {
            return Ok(value);
        }
        let turn = match self.reading.try_lock() {
            Ok(turn) => turn,
            Err(_) => match self.last() {
                Some(value) => return Ok(value),
                None => self.reading.lock().await,
            },
        };
        // Read meanwhile by the request whose turn it was?
        fresh(&self.value).ok_or(turn)
    }

    /// Keeps `value` from now on; the value it replaces.
    fn set(&self, value: T) -> Option<T> {
        let mut kept = self.value.lock().expect("not poisoned");
        kept.replace((value, Instant::now())).map(|(old, _)| old)
    }

    /// The value kept last, however old.
    fn last(&self) -> Option<T> {
        self.value
            .lock()
            .expect("not poisoned")
            .as_ref()
            .map(|(v, _)| v.clone())
    }
}

/// How long ago a cursor read may have begun for a request to take what it
/// found instead of reading again (see [`SharedRead`]): well inside the
/// `recent_within` an answer already trails by (10 ms by default).
const CURSOR_SHARED_WITHIN: Duration = Duration::from_millis(5);

/// A value every request reads (the speed cursor), shared while a read is in
/// flight: a request arriving then takes what the last finished read found, if
/// that read began less than `within` ago, rather than waiting behind the one in
/// flight; otherwise it reads for itself. Only requests that overlap a read
/// share it: a lone request (a test's next question, a dashboard's poll)
/// always reads. A failed read forgets the value, so an outage reaches the very
/// next request rather than hiding behind a value read before it.
///
/// At 2,000 requests/s every request read the cursor and ~1 % waited 1–2 ms
/// for it (Redis busy with the speed consumer's script, or the reply waiting
/// for a core): REST's p99 was that wait above `/healthz`'s.
struct SharedRead<T> {
    /// The last finished read's value, and when that read began.
    last: Mutex<Option<(T, Instant)>>,
    in_flight: std::sync::atomic::AtomicUsize,
    within: Duration,
}

/// Counts a read in flight while it lives (also when its request is dropped).
struct Reading<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl<T: Clone> SharedRead<T> {
    fn new(within: Duration) -> Self {
        SharedRead {
            last: Mutex::new(None),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            within,
        }
    }

    /// The value as `read` finds it now, or as a read that began less than
    /// `within` ago found it while another read is in flight.
    async fn get<E>(&self, read: impl Future<Output = Result<T, E>>) -> Result<T, E> {
        use std::sync::atomic::Ordering;
        if self.in_flight.load(Ordering::Acquire) > 0
            && let Some((value, _)) = self
                .last
                .lock()
                .expect("not poisoned")
                .as_ref()
                .filter(|(_, began)| began.elapsed() < self.within)
        {
            return Ok(value.clone());
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let _reading = Reading(&self.in_flight);
        let began = Instant::now();
        let found = read.await;
        let mut last = self.last.lock().expect("not poisoned");
        let newer = last.as_ref().is_none_or(|(_, at)| *at <= began);
        match &found {
            Ok(value) if newer => *last = Some((value.clone(), began)),
            Ok(_) => {}
            // Forgotten: the next request reads, and meets the outage.
            Err(_) => *last = None,
        }
        found
    }
}

/// Awaits one step of an answer (a read of a store, a conversion, the buyers
/// count), recording how long it took as `serving_read_seconds{part}`: where an
/// answer's time goes.
pub(crate) async fn timed<T>(part: &'static str, read: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let out = read.await;
    metrics::histogram!("serving_read_seconds", "part" => part)
        .record(started.elapsed().as_secs_f64());
    out
}

pub struct Views {
    pool: PgPool,
    ch: clickhouse::Client,
    speed: SpeedView,
    /// The same view over a connection of its own, for the cursor every request
    /// reads (the data version): on the connection that carries a computation's
    /// reads of cells and buyers, it waited behind their replies.
    cursor: SpeedView,
    /// The cursor as the requests read it, shared while a read is in flight.
    cursor_read: SharedRead<Option<Meta>>,
    state_ttl: Duration,
    cache_entries: usize,
    max_cells: usize,
    state: Kept<Option<PublishedState>>,
    /// Batch pieces by question.
    batch: Bounded<BatchKey, BatchPieces>,
    speed_cells: Mutex<HashMap<SpeedKey, SpeedSlot>>,
    buyers: Mutex<HashMap<BuyersKey, Arc<BuyerCounts>>>,
    held: Mutex<HashMap<BuyersKey, HeldSlot>>,
    rates: Kept<Option<String>>,
    /// Conversions to a reporting currency by question (see
    /// [`crate::fx::convert`]).
    conversions: Bounded<String, crate::fx::Converted>,
    /// Answers' points by question (see [`crate::query::revenue`]).
    points: Bounded<String, crate::query::MadePoints>,
    /// The rows of the last batch read: the next one makes room for a quarter
    /// more at first (a dashboard's questions read alike).
    last_read_rows: std::sync::atomic::AtomicUsize,
    /// Batch-view statements in flight (`clickhouse_concurrency`).
    ch_permits: tokio::sync::Semaphore,
    ch_concurrency: usize,
    /// The batch-view client with one thread per statement (see
    /// [`Views::batch_client`]), made once.
    ch_one_thread: clickhouse::Client,
    /// Where the heavy steps of a computation run.
    computing: Arc<Computing>,
    /// When batch reads may go without `FINAL` (`None`: never, a sharded view).
    unfolding: Option<Arc<crate::unfolding::Unfolding>>,
}

impl Views {
    /// Views over the stores, with `settings`' limits and cache sizes.
    pub fn new(
        pool: PgPool,
        ch: clickhouse::Client,
        [speed, cursor]: [SpeedView; 2],
        settings: &crate::config::ServingSettings,
        computing: Arc<Computing>,
        unfolding: Option<Arc<crate::unfolding::Unfolding>>,
    ) -> Self {
        Self {
            unfolding,
            cursor,
            cursor_read: SharedRead::new(CURSOR_SHARED_WITHIN),
            computing,
            last_read_rows: std::sync::atomic::AtomicUsize::new(0),
            ch_permits: tokio::sync::Semaphore::new(settings.clickhouse_concurrency.max(1)),
            ch_concurrency: settings.clickhouse_concurrency.max(1),
            ch_one_thread: ch.clone().with_setting("max_threads", "1"),
            pool,
            ch,
            speed,
            state_ttl: settings.state_ttl,
            cache_entries: settings.cache_entries,
            max_cells: settings.max_cells,
            state: Kept::default(),
            batch: Bounded::new(settings.cache_entries, settings.cache_bytes),
            speed_cells: Mutex::new(HashMap::new()),
            buyers: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            rates: Kept::default(),
            conversions: Bounded::new(settings.cache_entries, settings.cache_bytes),
            points: Bounded::new(settings.cache_entries, settings.cache_bytes),
        }
    }

    /// The conversion kept of `question` (see [`crate::fx::convert`]).
    pub fn conversion(&self, question: &str) -> Option<Arc<crate::fx::Converted>> {
        self.conversions.get(question)
    }

    /// Keeps the conversion of `question` in place of the one before, within
    /// `cache_entries` questions and `cache_bytes`.
    pub fn keep_conversion(&self, question: String, converted: Arc<crate::fx::Converted>) {
        let weight = converted.bytes();
        self.conversions.keep(question, converted, weight);
    }

    /// The points kept of `question` (see [`crate::query::revenue`]).
    pub fn points(&self, question: &str) -> Option<Arc<crate::query::MadePoints>> {
        self.points.get(question)
    }

    /// Keeps the points of `question` in place of those before, within
    /// `cache_entries` questions and `cache_bytes`.
    pub fn keep_points(&self, question: String, made: Arc<crate::query::MadePoints>) {
        let weight = made.bytes();
        self.points.keep(question, made, weight);
    }

    /// The threads computing answers' heavy steps (see [`crate::compute`]).
    pub fn computing(&self) -> &Arc<Computing> {
        &self.computing
    }

    /// The Postgres pool (exchange rates).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The client for a batch statement, called holding its permit: while
    /// other questions' statements are in flight too (more than the two of one
    /// question), one thread (`max_threads = 1`). A statement's threads merge
    /// their partial groups at its end, work one thread does not do, and with
    /// the cores busy the threads buy no time. A question's own two statements
    /// (cells and buyers, at once) keep the server's default: at 50M orders its
    /// buyers statement alone scans for a second, on every core once the cells
    /// statement is done, and one thread would leave a core idle under it.
    /// Measured on `bench serving`'s view (100,000 orders, the dashboard
    /// question's two statements from three clients at once): 28.2–29.0 ms of
    /// ClickHouse's CPU per question on one thread each, 30.8–31.3 on the default.
    fn batch_client(&self) -> &clickhouse::Client {
        let in_flight = self.ch_concurrency - self.ch_permits.available_permits();
        if in_flight > 2 {
            &self.ch_one_thread
        } else {
            &self.ch
        }
    }

    /// The rows a batch read makes room for at first: a quarter more than the
    /// last one read.
    fn room(&self) -> usize {
        let last = self
            .last_read_rows
            .load(std::sync::atomic::Ordering::Relaxed);
        last + last / 4
    }

    /// Most cells one answer may hold (`serving.max_cells`).
    pub fn max_cells(&self) -> usize {
        self.max_cells
    }

    /// The published state, cached briefly. A stale state stays exact (see the
    /// module docs); when Postgres is down the last known state is used, and while
    /// one request reads it again the others use the one they had.
    pub async fn state(&self) -> Result<Option<PublishedState>, ViewError> {
        let _reading = match self.state.get(self.state_ttl).await {
            Ok(state) => return Ok(state),
            Err(turn) => turn,
        };
        let loaded = tokio::time::timeout(KEPT_READ_TIMEOUT, PublishedState::load(&self.pool))
            .await
            .map_err(|_| "timed out".to_owned())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match loaded {
            Ok(state) => {
                let old = self.state.set(state.clone());
                let changed = old.is_none_or(|old| {
                    old.as_ref().map(|s| s.run_id) != state.as_ref().map(|s| s.run_id)
                });
                if changed {
                    // Cells of an older state are never asked for again.
                    self.batch.clear();
                    self.buyers.lock().expect("not poisoned").clear();
                    self.held.lock().expect("not poisoned").clear();
                    self.conversions.clear();
                    self.points.clear();
                }
                Ok(state)
            }
            Err(e) => {
                tracing::warn!(error = %e, "Published state unavailable");
                self.state.last().ok_or(ViewError::Unavailable(Part::Batch))
            }
        }
    }

    /// The batch view's pieces of `read`, cached per published state.
    async fn batch(
        &self,
        state: &PublishedState,
        read: &Read<'_>,
    ) -> Result<Arc<BatchPieces>, tidemark_batchview::Error> {
        let key = (state.run_id, state.base_run_id, read.describe());
        if let Some(pieces) = self.batch.get(&key) {
            metrics::counter!("serving_batch_cache_total", "result" => "hit").increment(1);
            return Ok(pieces);
        }
        metrics::counter!("serving_batch_cache_total", "result" => "miss").increment(1);
        let bucket_key = read.buckets.key_sql(read.from, read.to);
        let query = CellsQuery {
            granularity: read.granularity,
            from: read.from,
            to: read.to,
            shape: read.shape,
            key: &bucket_key,
            dated: read.dated,
            group_by: read.group_by,
            filters: read.filters,
            currency: read.currency,
            fold: true,
        };
        let limit = self.max_cells.saturating_mul(READ_FACTOR);
        let _permit = self.ch_permits.acquire().await.expect("never closed");
        // Without `FINAL` only at a generation counted clean, and only if it is
        // still the view's after the read (see `crate::unfolding`).
        let clean = match &self.unfolding {
            Some(unfolding) => unfolding
                .clean_generation(state)
                .await
                .map(|generation| (unfolding, generation)),
            None => None,
        };
        let mut pieces = None;
        if let Some((unfolding, generation)) = &clean {
            let query = CellsQuery {
                fold: false,
                ..query
            };
            let read =
                tidemark_batchview::cells(self.batch_client(), state, &query, limit, self.room());
            let read = timed("batch_cells", read).await?;
            if unfolding.unchanged(generation).await {
                pieces = Some(read);
            }
        }
        let fold = if pieces.is_some() { "none" } else { "final" };
        metrics::counter!("serving_batch_reads_total", "fold" => fold).increment(1);
        let pieces = Arc::new(match pieces {
            Some(pieces) => pieces,
            None => {
                let read = tidemark_batchview::cells(
                    self.batch_client(),
                    state,
                    &query,
                    limit,
                    self.room(),
                );
                timed("batch_cells", read).await?
            }
        });
        self.last_read_rows
            .store(pieces.len(), std::sync::atomic::Ordering::Relaxed);
        let weight = pieces_bytes(pieces.iter().map(|(key, _)| key));
        self.batch.keep(key, pieces.clone(), weight);
        Ok(pieces)
    }

    /// The speed cells of epochs `>= min_epoch` and who bought there, with the
    /// position both are exact at: from the cache when the cursor has not moved
    /// past the cached read, else the cached read brought up to date with the
    /// changes since (see [`tidemark_speedview::Tracked`]).
    async fn speed(
        &self,
        min_epoch: u64,
        granularity: Granularity,
        dimension: Dimension,
        from: i64,
        to: i64,
    ) -> Result<(SpeedRead, Option<Meta>), tidemark_speedview::Error> {
        let full = || {
            let read = self
                .speed
                .track(min_epoch, granularity, dimension, from, to);
            timed("speed_full", read)
        };
        let Some(observed) = self.speed.meta().await? else {
            // Empty view (lost, being rebuilt): nothing to key a cache on.
            let tracked = full().await?;
            let read = (tracked.cells().clone(), tracked.buyers().clone());
            return Ok((read, tracked.meta()));
        };
        let key = (min_epoch, granularity, dimension, from, to);
        let slot = {
            let mut slots = self.speed_cells.lock().expect("not poisoned");
            if slots.len() >= self.cache_entries && !slots.contains_key(&key) {
                slots.clear();
            }
            slots.entry(key).or_default().clone()
        };
        let mut entry = slot.lock().await;
        let result = match entry.as_mut() {
            Some(tracked) if tracked.meta().is_some_and(|m| m.cursor >= observed.cursor) => "hit",
            Some(tracked) => match timed("speed_refresh", self.speed.refresh(tracked)).await? {
                tidemark_speedview::Refreshed::Changes(_) => "changes",
                tidemark_speedview::Refreshed::Full => "full",
            },
            None => {
                *entry = Some(full().await?);
                "full"
            }
        };
        metrics::counter!("serving_speed_cache_total", "result" => result).increment(1);
        let tracked = entry.as_ref().expect("tracked above");
        let meta = match tracked.meta() {
            // The same position: the newer lag measurement describes it as well.
            Some(meta) if meta.cursor == observed.cursor => Some(observed),
            meta => meta,
        };
        Ok(((tracked.cells().clone(), tracked.buyers().clone()), meta))
    }

    /// The merged pieces of `read`, of the published `state` (as [`Views::state`]
    /// gave it: an answer reads its batch buyers of the same state).
    pub async fn revenue(
        &self,
        state: Result<Option<PublishedState>, ViewError>,
        read: &Read<'_>,
        allow_partial: bool,
    ) -> Result<Merged, ViewError> {
        let mut missing = Vec::new();
        let state = match state {
            Ok(state) => state,
            Err(e) if !allow_partial => return Err(e),
            Err(_) => {
                missing.push(Part::Batch);
                None
            }
        };
        let mut batch = Arc::default();
        if let Some(state) = &state {
            match self.batch(state, read).await {
                Ok(pieces) => batch = pieces,
                Err(tidemark_batchview::Error::TooLarge(limit)) => {
                    return Err(ViewError::TooLarge(limit));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Batch view unavailable");
                    if !allow_partial {
                        return Err(ViewError::Unavailable(Part::Batch));
                    }
                    missing.push(Part::Batch);
                }
            }
        }
        let min_epoch = state.as_ref().map_or(0, |s| s.epoch);
        let mut speed_pieces = Pieces::new();
        let mut speed_buyers = Arc::default();
        let speed = match self
            .speed(min_epoch, read.granularity, read.shape, read.from, read.to)
            .await
        {
            Ok(((cells, buyers), meta)) => {
                speed_pieces = read.pieces(&cells)?;
                speed_buyers = buyers;
                meta.map(|meta| SpeedFreshness {
                    cursor: meta.cursor.to_string(),
                    updated_at: Utc
                        .timestamp_millis_opt(meta.updated_ms)
                        .single()
                        .unwrap_or_default(),
                    lag_seconds: meta.lag_ms.map(|ms| ms as f64 / 1000.0),
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, "Speed view unavailable");
                if !allow_partial {
                    return Err(ViewError::Unavailable(Part::Speed));
                }
                missing.push(Part::Speed);
                None
            }
        };
        Ok(Merged {
            batch,
            speed: speed_pieces,
            state: state.clone(),
            speed_buyers,
            freshness: Freshness {
                batch: state.map(|s| BatchFreshness {
                    run_id: s.run_id,
                    watermark_txid: s.threshold,
                    watermark_time: s.watermark_time,
                    published_at: s.published_at,
                }),
                speed,
                as_of: Utc::now(),
            },
            missing,
        })
    }

    /// The batch view's buyers per cell of `query` in the published `state` (none
    /// before the first publish), cached per state and question.
    pub async fn buyers_batch(
        &self,
        state: Option<&PublishedState>,
        query: &BuyersQuery<'_>,
    ) -> Result<Arc<BuyerCounts>, ViewError> {
        let Some(state) = state else {
            return Ok(Arc::default());
        };
        let key = (state.run_id, state.base_run_id, describe(query));
        if let Some(counts) = self.buyers.lock().expect("not poisoned").get(&key) {
            return Ok(counts.clone());
        }
        let _permit = self.ch_permits.acquire().await.expect("never closed");
        let counts = Arc::new(
            timed(
                "batch_buyers",
                tidemark_batchview::buyers(self.batch_client(), state, query),
            )
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "Batch buyers unavailable");
                ViewError::Unavailable(Part::Batch)
            })?,
        );
        let mut cache = self.buyers.lock().expect("not poisoned");
        if cache.len() >= self.cache_entries {
            cache.clear();
        }
        cache.insert(key, counts.clone());
        Ok(counts)
    }

    /// Which of `users` the batch view holds in each cell of `query` (and maybe
    /// of users asked about before). Asked once per user, state and question: a
    /// live stream adds a few users per request, not thousands.
    pub async fn buyers_among(
        &self,
        state: &PublishedState,
        query: &BuyersQuery<'_>,
        users: &[&str],
    ) -> Result<Arc<Held>, ViewError> {
        let key = (state.run_id, state.base_run_id, describe(query));
        let slot = {
            let mut slots = self.held.lock().expect("not poisoned");
            if slots.len() >= self.cache_entries && !slots.contains_key(&key) {
                slots.clear();
            }
            slots.entry(key).or_default().clone()
        };
        let mut slot = slot.lock().await;
        let new: Vec<&str> = users
            .iter()
            .copied()
            .filter(|u| !slot.0.contains(*u))
            .collect();
        // In chunks: the users travel in the query's text, which ClickHouse
        // limits (max_query_size, 256 KiB by default).
        for chunk in new.chunks(2_000) {
            let _permit = self.ch_permits.acquire().await.expect("never closed");
            let held = timed(
                "batch_buyers_among",
                tidemark_batchview::buyers_among(self.batch_client(), state, query, chunk),
            )
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "Batch buyers unavailable");
                ViewError::Unavailable(Part::Batch)
            })?;
            Arc::make_mut(&mut slot.1).extend(held);
            slot.0.extend(chunk.iter().map(|u| (*u).to_owned()));
        }
        Ok(slot.1.clone())
    }

    /// When the exchange rates last changed (and how many there are), read at
    /// most once per `state_ttl` (while one request reads it, the others use the
    /// one they had): part of a cached answer's data version.
    pub async fn rates_version(&self) -> Option<String> {
        let _reading = match self.rates.get(self.state_ttl).await {
            Ok(version) => return version,
            Err(turn) => turn,
        };
        let version: Option<String> = tokio::time::timeout(
            KEPT_READ_TIMEOUT,
            sqlx::query_scalar(
                "SELECT count(*)::text || '@' || coalesce(max(loaded_at)::text, '') FROM fx_rates",
            )
            .fetch_one(&self.pool),
        )
        .await
        .ok()
        .and_then(Result::ok);
        self.rates.set(version.clone());
        version
    }

    /// What a revenue or summary answer depends on: the published run, the speed
    /// cursor and the exchange rates (a later rates file corrects converted
    /// answers); `None` when a part cannot be read (a store is down), so no kept
    /// answer stands in for the outage. See [`crate::answers`].
    pub async fn data_version(&self) -> Option<crate::answers::DataVersion> {
        let run = self.state().await.ok()?.map(|s| s.run_id);
        let cursor = self
            .cursor_read
            .get(self.cursor.meta())
            .await
            .ok()?
            .map(|m| m.cursor.to_string());
        let rates = self.rates_version().await?;
        Some((run, cursor, Some(rates)))
    }

    /// The speed view's cursor, for subscriptions to notice new data.
    pub async fn speed_cursor(&self) -> Option<String> {
        self.cursor
            .meta()
            .await
            .ok()
            .flatten()
            .map(|m| m.cursor.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn while_one_request_reads_a_kept_value_again_the_others_take_the_one_kept() {
        let kept: Kept<u32> = Kept::default();
        let turn = kept.get(Duration::from_secs(60)).await;
        assert!(turn.is_err(), "nothing kept: the first request reads");
        // A second request without a value kept waits for the first.
        let waiting = tokio::time::timeout(Duration::from_millis(50), kept.get(Duration::ZERO));
        assert!(
            waiting.await.is_err(),
            "it waits while there is nothing to give"
        );
        kept.set(1);
        drop(turn);
        assert_eq!(kept.get(Duration::from_secs(60)).await.ok(), Some(1));
        // Expired: one request's turn, and meanwhile the others take 1.
        let turn = kept.get(Duration::ZERO).await;
        assert!(turn.is_err());
        assert_eq!(kept.get(Duration::ZERO).await.ok(), Some(1));
        assert_eq!(kept.set(2), Some(1));
        drop(turn);
        assert_eq!(kept.get(Duration::from_secs(60)).await.ok(), Some(2));
    }

    #[tokio::test]
    async fn a_read_of_the_cursor_is_shared_only_by_the_requests_that_overlap_it() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let shared: SharedRead<u32> = SharedRead::new(Duration::from_secs(60));
        let reads = AtomicUsize::new(0);
        let read = |value: u32| {
            let reads = &reads;
            async move {
                reads.fetch_add(1, Ordering::SeqCst);
                Ok::<_, ()>(value)
            }
        };
        // One request after another: each reads.
        assert_eq!(shared.get(read(1)).await, Ok(1));
        assert_eq!(shared.get(read(2)).await, Ok(2));
        assert_eq!(reads.load(Ordering::SeqCst), 2);

        // While a read is held in flight, another request takes the last value.
        let (release, held) = tokio::sync::oneshot::channel::<()>();
        let slow = async {
            held.await.unwrap();
            Ok::<_, ()>(3)
        };
        let mut slow = std::pin::pin!(shared.get(slow));
        assert!(futures::poll!(slow.as_mut()).is_pending());
        assert_eq!(shared.get(read(99)).await, Ok(2), "taken, not read");
        assert_eq!(reads.load(Ordering::SeqCst), 2);
        release.send(()).unwrap();
        assert_eq!(slow.await, Ok(3));
        // Nothing in flight: read again.
        assert_eq!(shared.get(read(4)).await, Ok(4));
        assert_eq!(reads.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_old_or_failed_cursor_read_is_not_shared() {
        let pending = || std::future::pending::<Result<u32, &str>>();
        // Too old to share: the overlapping request reads for itself.
        let shared: SharedRead<u32> = SharedRead::new(Duration::ZERO);
        assert_eq!(shared.get(async { Ok::<_, &str>(1) }).await, Ok(1));
        let mut stuck = std::pin::pin!(shared.get(pending()));
        assert!(futures::poll!(stuck.as_mut()).is_pending());
        assert_eq!(shared.get(async { Ok::<_, &str>(2) }).await, Ok(2));

        // A failed read forgets the value: the outage reaches the next request.
        let shared: SharedRead<u32> = SharedRead::new(Duration::from_secs(60));
        assert_eq!(shared.get(async { Ok::<_, &str>(1) }).await, Ok(1));
        assert_eq!(shared.get(async { Err("down") }).await, Err("down"));
        let mut stuck = std::pin::pin!(shared.get(pending()));
        assert!(futures::poll!(stuck.as_mut()).is_pending());
        assert_eq!(shared.get(async { Err("down") }).await, Err("down"));

        // A request given up counts its read out of flight: the next one reads.
        let shared: SharedRead<u32> = SharedRead::new(Duration::from_secs(60));
        assert_eq!(shared.get(async { Ok::<_, &str>(1) }).await, Ok(1));
        {
            let mut given_up = std::pin::pin!(shared.get(pending()));
            assert!(futures::poll!(given_up.as_mut()).is_pending());
        }
        assert_eq!(shared.get(async { Ok::<_, &str>(5) }).await, Ok(5));
    }

    #[test]
    fn the_weight_of_pieces_grows_with_their_cells_and_values() {
        let eur: Currency = "EUR".parse().unwrap();
        let mut pieces = Pieces::new();
        assert_eq!(pieces_bytes(pieces.keys()), 0);
        pieces.insert((0, 0, Arc::from(["Berlin".into()]), eur), Totals::default());
        let one = pieces_bytes(pieces.keys());
        assert!(one >= size_of::<PieceKey>() + size_of::<Totals>() + "Berlin".len());
        pieces.insert(
            (
                3_600,
                0,
                Arc::from(["Berlin".into(), "a much longer category name".into()]),
                eur,
            ),
            Totals::default(),
        );
        let two = pieces_bytes(pieces.keys());
        assert!(
            two >= 2 * one + "a much longer category name".len(),
            "{one} {two}"
        );
    }
}
