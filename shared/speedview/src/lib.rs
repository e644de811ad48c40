//! The speed view: real-time revenue per epoch, time bucket and dimension value, in
//! Redis.
//!
//! ## Layout (every key starts with the deployment's prefix `p`)
//!
//! | key | type | holds |
//! |---|---|---|
//! | `p:meta` | hash | the consumer cursor `txid`, `seq`; `updated_ms`; `lag_ms`; `base_epoch`; `layout` |
//! | `p:epochs` | sorted set | every epoch with data (score = epoch) |
//! | `p:e:{epoch}:minute:{bucket}:{shape}` | hash | one field per metric, currency and value of that shape (or buyer) |
//! | `p:e:{epoch}:idx:minute` | sorted set | the minute buckets of that epoch (score = unix seconds) |
//! | `p:changes` | stream | every apply's changes, kept for [`CHANGES_KEPT_MS`]: one entry per apply, `@from` and `@to` the cursors it moved from and to, and `@delta` its increments: for each hash `{epoch}:{minute}:{shape}`, U+001D, its fields and increments (`field␞amount␞…`, U+001E between), U+001C between hashes |
//!
//! Only minute buckets are stored; hours and days are summed from them when read.
//! A speed epoch spans only the time since the last batch cut (plus the odd late
//! event), so a read touches few buckets, and each order costs a third of the
//! writes it would with all three granularities maintained.
//!
//! Only three shapes are stored — `city`, `city_category`, `city_category_product`
//! — plus `buyers`; the others are summed from them when read ([`source_of`]):
//! the total from the cities (an order has one city), categories from city and
//! category, products from city, category and product (an order holds a product in
//! one line, of one category). So every cell, order counts included, is the exact
//! sum of the stored cells it covers, and an order costs about a third fewer
//! writes than with every shape kept. Each shape has a hash of its own per minute.
//!
//! Only the order counts (`o`, `bc`, `sc`) are kept in every stored shape; the
//! amounts (revenue, items, refunded minor units and items) only in
//! `city_category_product` ([`AMOUNTS`]): they add up across an order's lines, so
//! any cell's amount is the sum of the products' cells it covers, where an order
//! of two categories is still one order of its city. A read fetches its source's
//! hash for the counts and the products' hash for the amounts; a single-line order
//! costs six fields instead of ten.
//!
//! Fields are `{metric}:{currency}:{value}`; the value comes last so it may
//! contain colons. Example: `o:EUR:Berlin` in the `city` hash. Metrics:
//!
//! | metric | holds |
//! |---|---|
//! | `r`, `o`, `i` | gross revenue (minor units), orders, items |
//! | `br`, `bi`, `bc` | booked corrections: refunded minor units, refunded items, cancelled orders, in the bucket in which they happened |
//! | `sr`, `si`, `sc` | restated corrections: the same, in the bucket of the order they correct |
//! | `b` | lines of a buyer (the `buyers` hash): value `city␟category␟product␟user` (U+001F between) |
//!
//! `p:meta` also holds `generation` (set when the view is started: a view rebuilt
//! after a loss is another generation), `changed` (the id of the last change in
//! `p:changes`) and `trimmed` (the last change that may be gone: every later one is
//! kept).
//!
//! `layout` in `p:meta` names this layout ([`LAYOUT`]). A view written in another
//! layout reads as empty, and the consumer rebuilds it from the batch watermark.
//!
//! ## Exactly once
//!
//! [`SpeedView::apply`] adds a batch of log rows and moves the cursor in one Lua
//! script, and only if the cursor is where the consumer last left it. A crash
//! before the script changes nothing; after it, everything. A missing cursor means
//! Redis lost its data: the consumer rebuilds ([`SpeedView::reset`]).
//!
//! ## Reads that cost what changed
//!
//! A [`Tracked`] read keeps the cells and buyers of one question, and the id of the
//! last change they include. [`SpeedView::refresh`] brings it to the view's current
//! cursor by adding only the changes after that id, read atomically with the cursor
//! — or reads it in full when the view is another generation, those changes were
//! trimmed, or they do not chain from the read's cursor to the view's (see
//! [`continues`]: after a failover to a replica that had not received the last
//! applies, the replayed ones must not be added twice). Either way the result equals a full read at that cursor (every stored
//! value is a sum of the increments that built it), and Redis spends on a refresh
//! the time of the changes, not of everything since the last publish.
//!
//! ## One writer
//!
//! Every writing script also takes the writer's lease token
//! ([`tidemark_platform::lease`]) and checks it against `p:fence`, the highest
//! token that has written: a lower one is refused ([`Applied::Fenced`]), a higher
//! one raises the fence. A consumer that was paused past its lease and wakes up
//! with a batch in hand cannot apply it once its successor has written (or raised
//! the fence on taking over, [`SpeedView::raise_fence`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use redis::Script;
use tidemark_domain::{Currency, Dimension, Event, Granularity, LogPosition};
use tidemark_platform::redis::Redis;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected speed view data: {0}")]
    Corrupt(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub use tidemark_domain::{CellKey, Grid, Totals};

/// The layout this build writes and reads (`layout` in `p:meta`).
pub const LAYOUT: &str = "5";

/// How long the changes of an apply stay readable in `p:changes` (ms, by Redis's
/// clock). A tracked read more than this behind is read in full.
pub const CHANGES_KEPT_MS: i64 = 10_000;

/// Most minutes one `ZADD` of the apply carries (Lua's `unpack` is bounded).
const MINUTES_PER_ZADD: usize = 2_000;

/// Between the fields and amounts of a hash in a change (no text field holds a
/// control character: [`tidemark_domain::Order`] refuses them).
const CHANGE_SEPARATOR: char = '\u{1e}';

/// Between a hash's key and its fields in a change.
const KEY_SEPARATOR: char = '\u{1d}';

/// Between the hashes of a change.
const HASH_SEPARATOR: char = '\u{1c}';

/// The shapes the view stores (each in a hash of its own per minute).
pub const STORED: [Dimension; 3] = [
    Dimension::City,
    Dimension::CityCategory,
    Dimension::CityCategoryProduct,
];

/// The shape that holds the amounts (revenue, items, refunded minor units and
/// items): they add up across an order's lines, so every coarser shape's amount is
/// the sum of this shape's cells it covers.
pub const AMOUNTS: Dimension = Dimension::CityCategoryProduct;

/// The metrics every stored shape holds: counts of orders, which do not add up
/// across an order's lines (an order of two categories is one order of its city).
const COUNTS: [&str; 3] = ["o", "bc", "sc"];

/// The name of the buyers' hash of a minute.
const BUYERS: &str = "buyers";

/// The stored shape `dimension` is summed from: the total from the cities,
/// categories from city and category, products from city, category and product.
/// Each adds only attributes that split an order's cell without counting the order
/// twice (see [`Dimension::covering`]).
pub fn source_of(dimension: Dimension) -> Dimension {
    match dimension {
        Dimension::Total => Dimension::City,
        Dimension::Category => Dimension::CityCategory,
        Dimension::Product => Dimension::CityCategoryProduct,
        stored => stored,
    }
}

/// Changes to apply, grouped by Redis hash: (epoch, minute, shape). The maps hash
/// with foldhash: SipHash was ~6 % of the speed consumer's CPU at 20,000 orders/s
/// (each row touches ten fields or so).
#[derive(Debug, Default)]
pub struct Delta {
    hashes: foldhash::HashMap<(u64, i64, &'static str), foldhash::HashMap<String, i64>>,
    rows: usize,
}

impl Delta {
    /// Adds one event, in `epoch`, for every stored shape: what it contributes to
    /// each cell ([`Event::contributions`]), in the cell's minute bucket. Zero
    /// amounts are not written.
    pub fn add(&mut self, epoch: u64, event: &Event) {
        let currency = event.order().currency.as_str();
        for dim in STORED {
            for cell in event.contributions(dim) {
                let bucket = Granularity::Minute.bucket_of_secs(cell.at.timestamp());
                let t = &cell.totals;
                for (metric, amount) in [
                    ("r", t.revenue_minor),
                    ("o", t.orders),
                    ("i", t.items),
                    ("br", t.booked.refunded_minor),
                    ("bi", t.booked.refunded_items),
                    ("bc", t.booked.cancelled_orders),
                    ("sr", t.restated.refunded_minor),
                    ("si", t.restated.refunded_items),
                    ("sc", t.restated.cancelled_orders),
                ] {
                    if amount != 0 && (dim == AMOUNTS || COUNTS.contains(&metric)) {
                        let field = format!("{metric}:{currency}:{}", cell.value);
                        *self
                            .hashes
                            .entry((epoch, bucket, dim.as_str()))
                            .or_default()
                            .entry(field)
                            .or_insert(0) += amount;
                    }
                }
            }
        }
        // Who bought: one field per line's city, category, product and user.
        if let Event::Order(order) = event {
            let bucket = Granularity::Minute.bucket_of_secs(order.created_at.timestamp());
            let fields = self.hashes.entry((epoch, bucket, BUYERS)).or_default();
            for line in &order.lines {
                let field = format!(
                    "b:{currency}:{}{sep}{}{sep}{}{sep}{}",
                    order.city,
                    line.category,
                    line.product_id,
                    order.user_id,
                    sep = tidemark_domain::VALUE_SEPARATOR
                );
                *fields.entry(field).or_insert(0) += 1;
            }
        }
        self.rows += 1;
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The delta as one change of `p:changes`: `{epoch}:{minute}:{shape}`, U+001D,
    /// then `field␞amount␞…` (U+001E between), for each hash, U+001C between hashes.
    /// Built here rather than in the script: packing in Lua took about a seventh of
    /// Redis's time per apply.
    fn change(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        for ((epoch, bucket, shape), fields) in &self.hashes {
            if !out.is_empty() {
                out.push(HASH_SEPARATOR);
            }
            let _ = write!(out, "{epoch}:{bucket}:{shape}{KEY_SEPARATOR}");
            for (n, (field, amount)) in fields.iter().enumerate() {
                if n > 0 {
                    out.push(CHANGE_SEPARATOR);
                }
                let _ = write!(out, "{field}{CHANGE_SEPARATOR}{amount}");
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }
}

/// What an apply did.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    Done,
    /// The cursor is gone: Redis lost its data.
    Lost,
    /// The cursor moved: another consumer applied first.
    Moved,
    /// A newer leader has written: its token, higher than the one applying.
    Fenced(u64),
}

/// What a writing script answered: `{code, fence}`.
fn outcome(code: i64, fence: u64) -> Applied {
    match code {
        1 => Applied::Done,
        -1 => Applied::Lost,
        -3 => Applied::Fenced(fence),
        _ => Applied::Moved,
    }
}

/// A writing script: the fence check (with the token at `ARGV[token_arg]`), then `body`.
fn fenced(body: &str, token_arg: usize) -> Script {
    Script::new(&format!(
        "{}{body}",
        FENCE.replace("TOKEN", &token_arg.to_string())
    ))
}

/// The cursor and its freshness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    pub cursor: LogPosition,
    /// When the cursor last moved (unix ms).
    pub updated_ms: i64,
    /// How far the consumer was behind the log when last measured.
    pub lag_ms: Option<i64>,
}

/// The speed view of a range and grouping, epoch by epoch.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// `None` when the view is empty (never built, or lost and not yet rebuilt).
    pub meta: Option<Meta>,
    pub epochs: BTreeMap<u64, Grid>,
}

impl Snapshot {
    /// The cells summed over every epoch in the snapshot.
    pub fn total(&self) -> Grid {
        let mut out = Grid::new();
        for cells in self.epochs.values() {
            tidemark_domain::aggregate::merge(&mut out, cells);
        }
        out
    }
}

/// The fencing check every writing script starts with: `KEYS[2]` holds the highest
/// lease token that has written; a lower token is refused (returns the fence), a
/// higher one raises it.
const FENCE: &str = r"
local fence = tonumber(redis.call('GET', KEYS[2]) or '0')
local token = tonumber(ARGV[TOKEN])
if token < fence then return {-3, fence} end
if token > fence then redis.call('SET', KEYS[2], token) end
";

const APPLY: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'txid', 'seq', 'layout')
if not cur[1] or cur[3] ~= ARGV[7] then return {-1, 0} end
if cur[1] ~= ARGV[2] or cur[2] ~= ARGV[3] then return {-2, 0} end
local p = ARGV[1]
local changes = p .. ':changes'
local chunk = 2 * tonumber(ARGV[10])
local i = 13
for _ = 1, tonumber(ARGV[12]) do
  local e, n = ARGV[i], tonumber(ARGV[i + 1])
  redis.call('ZADD', p .. ':epochs', e, e)
  i = i + 2
  local last = i + 2 * n - 1
  while i <= last do
    local upto = math.min(i + chunk - 1, last)
    redis.call('ZADD', p .. ':e:' .. e .. ':idx:minute', unpack(ARGV, i, upto))
    i = upto + 1
  end
end
while i <= #ARGV do
  local key, n = p .. ':e:' .. ARGV[i] .. ':minute:' .. ARGV[i + 1] .. ':' .. ARGV[i + 2], tonumber(ARGV[i + 3])
  i = i + 4
  for _ = 1, n do
    redis.call('HINCRBY', key, ARGV[i], ARGV[i + 1])
    i = i + 2
  end
end
local id = redis.call('XADD', changes, '*', '@from', ARGV[2] .. '_' .. ARGV[3], '@delta', ARGV[11], '@to', ARGV[4] .. '_' .. ARGV[5])
redis.call('HSET', KEYS[1], 'changed', id)
local kept = (tonumber(string.match(id, '^(%d+)')) - tonumber(ARGV[9])) .. '-0'
local gone = redis.call('XREVRANGE', changes, '(' .. kept, '-', 'COUNT', 1)[1]
if gone then
  redis.call('XTRIM', changes, 'MINID', '~', kept)
  redis.call('HSET', KEYS[1], 'trimmed', gone[1])
end
redis.call('HSET', KEYS[1], 'txid', ARGV[4], 'seq', ARGV[5], 'updated_ms', ARGV[6])
return {1, 0}
";

const READ: &str = r"
local p = ARGV[1]
local meta = redis.call('HMGET', p .. ':meta', 'txid', 'seq', 'updated_ms', 'lag_ms', 'layout', 'generation', 'changed')
if meta[5] ~= ARGV[6] then return {'', '', '', '', '', ''} end
local out = {meta[1] or '', meta[2] or '', meta[3] or '', meta[4] or '', meta[6] or '', meta[7] or ''}
local shapes = {ARGV[5]}
for k = 7, #ARGV do shapes[#shapes + 1] = ARGV[k] end
local epochs = redis.call('ZRANGEBYSCORE', p .. ':epochs', ARGV[2], '+inf')
for _, e in ipairs(epochs) do
  local buckets = redis.call('ZRANGEBYSCORE', p .. ':e:' .. e .. ':idx:minute', ARGV[3], '(' .. ARGV[4])
  for _, b in ipairs(buckets) do
    for _, shape in ipairs(shapes) do
      local h = redis.call('HGETALL', p .. ':e:' .. e .. ':minute:' .. b .. ':' .. shape)
      for j = 1, #h, 2 do
        out[#out + 1] = e
        out[#out + 1] = b
        out[#out + 1] = h[j]
        out[#out + 1] = h[j + 1]
      end
    end
  end
end
return out
";

const INIT: &str = r"
if redis.call('HGET', KEYS[1], 'layout') == ARGV[5] then return {0, 0} end
redis.call('DEL', KEYS[1], ARGV[7] .. ':changes')
local now = redis.call('TIME')
redis.call('HSET', KEYS[1], 'txid', ARGV[1], 'seq', ARGV[2], 'updated_ms', ARGV[3], 'base_epoch', ARGV[4], 'layout', ARGV[5], 'generation', now[1] .. '.' .. now[2])
return {1, 0}
";

/// The changes after a tracked read's last (`ARGV[4]`), if the view is still its
/// generation (`ARGV[3]`) and has kept them; the head says which.
const CHANGES: &str = r"
local p = ARGV[1]
local meta = redis.call('HMGET', p .. ':meta', 'txid', 'seq', 'updated_ms', 'lag_ms', 'layout', 'generation', 'changed', 'trimmed')
if meta[5] ~= ARGV[2] then return {'', '', '', '', '', '', ''} end
local out = {meta[1] or '', meta[2] or '', meta[3] or '', meta[4] or '', meta[6] or '', meta[7] or '', ''}
if meta[6] ~= ARGV[3] then return out end
local function id(s)
  local ms, seq = string.match(s, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
if meta[8] then
  local since_ms, since_seq = id(ARGV[4])
  local gone_ms, gone_seq = id(meta[8])
  if since_ms < gone_ms or (since_ms == gone_ms and since_seq < gone_seq) then return out end
end
out[7] = '1'
for _, entry in ipairs(redis.call('XRANGE', p .. ':changes', '(' .. ARGV[4], '+')) do
  local fields = entry[2]
  for j = 1, #fields do out[#out + 1] = fields[j] end
end
return out
";

const RAISE: &str = r"
return {1, 0}
";

const SET_LAG: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'lag_ms', ARGV[1])
return 1
";

const DROP_EPOCH: &str = r"
local p, e = ARGV[1], ARGV[2]
local idx = p .. ':e:' .. e .. ':idx:minute'
for _, b in ipairs(redis.call('ZRANGE', idx, 0, -1)) do
  for k = 3, #ARGV do
    redis.call('DEL', p .. ':e:' .. e .. ':minute:' .. b .. ':' .. ARGV[k])
  end
end
redis.call('DEL', idx)
redis.call('ZREM', p .. ':epochs', e)
return 1
";

/// The speed view of one deployment (one key prefix).
#[derive(Clone)]
pub struct SpeedView {
    redis: Arc<Redis>,
    apply: Arc<Script>,
    read: Arc<Script>,
    init: Arc<Script>,
    raise: Arc<Script>,
    set_lag: Arc<Script>,
    drop_epoch: Arc<Script>,
    changes: Arc<Script>,
    changes_kept_ms: i64,
}

impl SpeedView {
    pub fn new(redis: Arc<Redis>) -> Self {
        Self {
            redis,
            apply: Arc::new(fenced(APPLY, 8)),
            read: Arc::new(Script::new(READ)),
            init: Arc::new(fenced(INIT, 6)),
            raise: Arc::new(fenced(RAISE, 1)),
            set_lag: Arc::new(Script::new(SET_LAG)),
            drop_epoch: Arc::new(Script::new(DROP_EPOCH)),
            changes: Arc::new(Script::new(CHANGES)),
            changes_kept_ms: CHANGES_KEPT_MS,
        }
    }

    /// The same view, keeping each apply's changes readable for `ms` instead of
    /// [`CHANGES_KEPT_MS`] (tests make tracked reads fall behind with it).
    pub fn with_changes_kept_ms(mut self, ms: i64) -> Self {
        self.changes_kept_ms = ms;
        self
    }

    fn meta_key(&self) -> String {
        self.redis.key("meta")
    }

    fn fence_key(&self) -> String {
        self.redis.key("fence")
    }

    /// Raises the fence to `token` (a consumer that has just taken the lease), so
    /// no write of a former leader lands from now on. `Applied::Fenced` if a higher
    /// token has written already.
    pub async fn raise_fence(&self, token: u64) -> Result<Applied> {
        let mut conn = self.redis.conn().await?;
        let (code, fence): (i64, u64) = self
            .raise
            .key(self.meta_key())
            .key(self.fence_key())
            .arg(token)
            .invoke_async(&mut conn)
            .await?;
        Ok(outcome(code, fence))
    }

    /// The cursor, or `None` if the view has no state (lost or never built).
    pub async fn meta(&self) -> Result<Option<Meta>> {
        let mut conn = self.redis.conn().await?;
        type Fields = (
            Option<u64>,
            Option<i64>,
            Option<i64>,
            Option<i64>,
            Option<String>,
        );
        let (txid, seq, updated, lag, layout): Fields = redis::cmd("HMGET")
            .arg(self.meta_key())
            .arg(&["txid", "seq", "updated_ms", "lag_ms", "layout"])
            .query_async(&mut conn)
            .await?;
        if layout.as_deref() != Some(LAYOUT) {
            // Written in another layout (or not at all): nothing this build reads.
            return Ok(None);
        }
        Ok(txid.zip(seq).map(|(txid, seq)| Meta {
            cursor: LogPosition::new(txid, seq),
            updated_ms: updated.unwrap_or(0),
            lag_ms: lag,
        }))
    }

    /// Records the consumer's measured lag (only while the view has a cursor).
    pub async fn set_lag(&self, lag_ms: i64) -> Result<()> {
        let mut conn = self.redis.conn().await?;
        self.set_lag
            .key(self.meta_key())
            .arg(lag_ms)
            .invoke_async::<i64>(&mut conn)
            .await?;
        Ok(())
    }

    /// Adds `delta` and moves the cursor from `expected` to `to`, atomically, if
    /// no writer with a higher lease token than `token` has written.
    pub async fn apply(
        &self,
        expected: LogPosition,
        to: LogPosition,
        now_ms: i64,
        token: u64,
        delta: &Delta,
    ) -> Result<Applied> {
        let mut conn = self.redis.conn().await?;
        let mut invocation = self.apply.key(self.meta_key());
        invocation
            .key(self.fence_key())
            .arg(self.redis.prefix())
            .arg(expected.txid)
            .arg(expected.seq)
            .arg(to.txid)
            .arg(to.seq)
            .arg(now_ms)
            .arg(LAYOUT)
            .arg(token)
            .arg(self.changes_kept_ms)
            .arg(MINUTES_PER_ZADD)
            .arg(delta.change());
        // Each epoch and each of its minutes once, not once per hash.
        let mut minutes: BTreeMap<u64, BTreeSet<i64>> = BTreeMap::new();
        for (epoch, bucket, _) in delta.hashes.keys() {
            minutes.entry(*epoch).or_default().insert(*bucket);
        }
        invocation.arg(minutes.len());
        for (epoch, buckets) in &minutes {
            invocation.arg(*epoch).arg(buckets.len());
            for bucket in buckets {
                invocation.arg(*bucket).arg(*bucket);
            }
        }
        for ((epoch, bucket, shape), fields) in &delta.hashes {
            invocation
                .arg(*epoch)
                .arg(*bucket)
                .arg(*shape)
                .arg(fields.len());
            for (field, amount) in fields {
                invocation.arg(field).arg(*amount);
            }
        }
        let (code, fence): (i64, u64) = invocation.invoke_async(&mut conn).await?;
        Ok(outcome(code, fence))
    }

    /// Clears whatever is left of the view and starts it at `cursor`, whose rows
    /// belong to epoch `base_epoch` or later: `Done`, or `Moved` if another
    /// consumer started it first, or `Fenced` if a writer with a higher lease token
    /// than `token` has written (then nothing is cleared).
    pub async fn reset(
        &self,
        cursor: LogPosition,
        base_epoch: u64,
        now_ms: i64,
        token: u64,
    ) -> Result<Applied> {
        if let fenced @ Applied::Fenced(_) = self.raise_fence(token).await? {
            return Ok(fenced);
        }
        let mut conn = self.redis.conn().await?;
        // Leftovers of a partial loss would be counted twice by the replay. SCAN in
        // large steps: the default step of 10 keys makes this crawl on a big Redis.
        let pattern = format!("{}:e:*", self.redis.prefix());
        let mut scan: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(scan)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(10_000)
                .query_async(&mut conn)
                .await?;
            if !keys.is_empty() {
                redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async::<()>(&mut conn)
                    .await?;
            }
            if next == 0 {
                break;
            }
            scan = next;
        }
        redis::cmd("DEL")
            .arg(self.redis.key("epochs"))
            .query_async::<()>(&mut conn)
            .await?;
        let (code, fence): (i64, u64) = self
            .init
            .key(self.meta_key())
            .key(self.fence_key())
            .arg(cursor.txid)
            .arg(cursor.seq)
            .arg(now_ms)
            .arg(base_epoch)
            .arg(LAYOUT)
            .arg(token)
            .arg(self.redis.prefix())
            .invoke_async(&mut conn)
            .await?;
        Ok(outcome(code, fence))
    }

    /// Epochs with data, ascending.
    pub async fn epochs(&self) -> Result<Vec<u64>> {
        let mut conn = self.redis.conn().await?;
        Ok(redis::cmd("ZRANGE")
            .arg(self.redis.key("epochs"))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await?)
    }

    /// Deletes every key of `epoch`.
    pub async fn drop_epoch(&self, epoch: u64) -> Result<()> {
        let mut conn = self.redis.conn().await?;
        let mut invocation = self.drop_epoch.prepare_invoke();
        invocation.arg(self.redis.prefix()).arg(epoch);
        for shape in STORED {
            invocation.arg(shape.as_str());
        }
        invocation
            .arg(BUYERS)
            .invoke_async::<i64>(&mut conn)
            .await?;
        Ok(())
    }

    /// The cells of `dimension` at `granularity` for events in `[from_secs,
    /// to_secs)`, from every epoch `>= min_epoch`, read atomically. Hours and days
    /// are sums of their minutes; pass bounds aligned to `granularity` to get whole
    /// buckets.
    pub async fn read(
        &self,
        min_epoch: u64,
        granularity: Granularity,
        dimension: Dimension,
        from_secs: i64,
        to_secs: i64,
    ) -> Result<Snapshot> {
        let question = Question::new(min_epoch, granularity, dimension, from_secs, to_secs);
        let (snapshot, _) = decode_read(&self.read_reply(&question, false).await?, &question)?;
        Ok(snapshot)
    }

    /// The atomic read of `question`'s source shape (and buyers if `buyers`): the
    /// head ([`READ_HEAD`] fields), then `epoch, minute, field, amount` per field.
    async fn read_reply(&self, question: &Question, buyers: bool) -> Result<Vec<String>> {
        let mut conn = self.redis.conn().await?;
        let mut invocation = self.read.prepare_invoke();
        invocation
            .arg(self.redis.prefix())
            .arg(question.min_epoch)
            .arg(question.from)
            .arg(question.to)
            .arg(source_of(question.dimension).as_str())
            .arg(LAYOUT);
        if source_of(question.dimension) != AMOUNTS {
            invocation.arg(AMOUNTS.as_str());
        }
        if buyers {
            invocation.arg(BUYERS);
        }
        Ok(invocation.invoke_async(&mut conn).await?)
    }
}

/// A user with an order line in a minute, city, category, product and currency.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Buyer {
    /// Minute start, unix seconds.
    pub minute: i64,
    pub city: String,
    pub category: String,
    pub product: String,
    pub currency: Currency,
    pub user_id: String,
}

/// What a read asks for: the cells of `dimension` at `granularity` for events in
/// `[from, to)` of every epoch `>= min_epoch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Question {
    min_epoch: u64,
    granularity: Granularity,
    dimension: Dimension,
    from: i64,
    to: i64,
}

impl Question {
    fn new(
        min_epoch: u64,
        granularity: Granularity,
        dimension: Dimension,
        from: i64,
        to: i64,
    ) -> Self {
        Self {
            min_epoch,
            granularity,
            dimension,
            from,
            to,
        }
    }

    fn holds(&self, epoch: u64, minute: i64) -> bool {
        epoch >= self.min_epoch && (self.from..self.to).contains(&minute)
    }
}

/// Where a read stands in the view's changes: the view's generation and the id of
/// the last change the read includes.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Mark {
    generation: String,
    changed: String,
}

/// The cells of one question and who bought, exact at the cursor it states, kept
/// current by [`SpeedView::refresh`] from the changes since.
#[derive(Clone, Debug)]
pub struct Tracked {
    question: Question,
    meta: Option<Meta>,
    mark: Mark,
    cells: Arc<Grid>,
    buyers: Arc<BTreeSet<Buyer>>,
}

impl Tracked {
    /// The cursor the cells and buyers are exact at (`None`: the view was empty).
    pub fn meta(&self) -> Option<Meta> {
        self.meta
    }

    /// The cells summed over the epochs read.
    pub fn cells(&self) -> &Arc<Grid> {
        &self.cells
    }

    /// Who bought in the range, per minute and value.
    pub fn buyers(&self) -> &Arc<BTreeSet<Buyer>> {
        &self.buyers
    }
}

/// How [`SpeedView::refresh`] brought a tracked read up to date.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refreshed {
    /// By adding this many changed fields (of every shape; those of the question
    /// counted or not).
    Changes(usize),
    /// By reading it in full: the view is another generation (rebuilt, or it was
    /// empty) or the changes since were trimmed.
    Full,
}

impl SpeedView {
    /// The cells of `dimension` at `granularity` and who bought, for events in
    /// `[from_secs, to_secs)` of every epoch `>= min_epoch`, in one atomic read: both
    /// exact at the one cursor the snapshot states (an answer's revenue and its
    /// buyers must be as of the same position).
    pub async fn read_with_buyers(
        &self,
        min_epoch: u64,
        granularity: Granularity,
        dimension: Dimension,
        from_secs: i64,
        to_secs: i64,
    ) -> Result<(Snapshot, Vec<Buyer>)> {
        let question = Question::new(min_epoch, granularity, dimension, from_secs, to_secs);
        decode_read(&self.read_reply(&question, true).await?, &question)
    }

    /// A tracked read of the cells of `dimension` at `granularity` and who bought,
    /// for events in `[from_secs, to_secs)` of every epoch `>= min_epoch`: read in
    /// full now, brought up to date by [`SpeedView::refresh`].
    pub async fn track(
        &self,
        min_epoch: u64,
        granularity: Granularity,
        dimension: Dimension,
        from_secs: i64,
        to_secs: i64,
    ) -> Result<Tracked> {
        self.track_question(Question::new(
            min_epoch,
            granularity,
            dimension,
            from_secs,
            to_secs,
        ))
        .await
    }

    async fn track_question(&self, question: Question) -> Result<Tracked> {
        let out = self.read_reply(&question, true).await?;
        let (_, mark, _) = decode_head(&out, READ_HEAD)?;
        let (snapshot, buyers) = decode_read(&out, &question)?;
        Ok(Tracked {
            question,
            meta: snapshot.meta,
            mark,
            cells: Arc::new(snapshot.total()),
            buyers: Arc::new(buyers.into_iter().collect()),
        })
    }

    /// Brings `tracked` to the view's current cursor: adds the changes since its
    /// last, read atomically with the cursor, or reads it in full when the view is
    /// another generation or has trimmed those changes. On an error `tracked` is
    /// left as it was.
    pub async fn refresh(&self, tracked: &mut Tracked) -> Result<Refreshed> {
        if tracked.meta.is_none() {
            *tracked = self.track_question(tracked.question).await?;
            return Ok(Refreshed::Full);
        }
        let mut conn = self.redis.conn().await?;
        let out: Vec<String> = self
            .changes
            .arg(self.redis.prefix())
            .arg(LAYOUT)
            .arg(&tracked.mark.generation)
            .arg(&tracked.mark.changed)
            .invoke_async(&mut conn)
            .await?;
        let (meta, mark, rest) = decode_head(&out, READ_HEAD + 1)?;
        if out[READ_HEAD] != "1" || !continues(tracked.meta, rest, meta) {
            *tracked = self.track_question(tracked.question).await?;
            return Ok(Refreshed::Full);
        }
        // Decoded in full before anything is added: a field this build cannot read
        // leaves the tracked read as it was.
        let source = source_of(tracked.question.dimension).as_str();
        let (mut cells, mut buyers) = (Grid::new(), Vec::new());
        let mut fields = 0;
        for pair in rest.chunks(2) {
            let [name, change] = pair else {
                return Err(corrupt("odd reply"));
            };
            if name != "@delta" {
                continue;
            }
            for hash in change.split(HASH_SEPARATOR).filter(|h| !h.is_empty()) {
                let (epoch, minute, shape, packed) = decode_change_hash(hash)?;
                let mut values = packed.split(CHANGE_SEPARATOR);
                while let Some(field) = values.next() {
                    let amount = values.next().ok_or_else(|| corrupt(packed))?;
                    fields += 1;
                    if !tracked.question.holds(epoch, minute) {
                        continue;
                    }
                    if shape == BUYERS {
                        buyers.push(parse_buyer(minute, field)?);
                    } else if shape == source || shape == AMOUNTS.as_str() {
                        add_cell(&mut cells, &tracked.question, minute, field, parse(amount)?)?;
                    }
                }
            }
        }
        tidemark_domain::aggregate::merge(Arc::make_mut(&mut tracked.cells), &cells);
        if !buyers.is_empty() {
            Arc::make_mut(&mut tracked.buyers).extend(buyers);
        }
        tracked.meta = meta;
        tracked.mark = mark;
        Ok(Refreshed::Changes(fields))
    }
}

/// One hash of a change (see [`Delta::change`]): its epoch, minute, shape and
/// packed fields.
fn decode_change_hash(hash: &str) -> Result<(u64, i64, &str, &str)> {
    let (key, packed) = hash
        .split_once(KEY_SEPARATOR)
        .ok_or_else(|| corrupt(hash))?;
    let mut parts = key.splitn(3, ':');
    let (Some(epoch), Some(minute), Some(shape)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(corrupt(key));
    };
    let epoch = epoch.parse().map_err(|_| corrupt(key))?;
    Ok((epoch, parse(minute)?, shape, packed))
}

/// Whether `changes` (field, value pairs of the entries after a tracked read's last)
/// continue that read exactly: each apply's entries name the cursor it moved from
/// (`@from`) and to (`@to`), and these must chain from the read's cursor `from` to
/// the view's cursor `to`. A gap (an apply without its entries) or an overlap (a
/// history replayed on another Redis after a failover, whose stream ids need not
/// follow the old one's) breaks the chain: the read is then made in full.
fn continues(from: Option<Meta>, changes: &[String], to: Option<Meta>) -> bool {
    let (Some(from), Some(to)) = (from, to) else {
        return false;
    };
    let text = |p: LogPosition| format!("{}_{}", p.txid, p.seq);
    let mut at = text(from.cursor);
    for pair in changes.chunks(2) {
        match pair {
            [key, value] if key == "@from" && *value != at => return false,
            [key, value] if key == "@to" => at.clone_from(value),
            _ => {}
        }
    }
    at == text(to.cursor)
}

/// How many fields head a read's reply: the cursor's four, the generation and the
/// last change.
const READ_HEAD: usize = 6;

fn corrupt(what: &str) -> Error {
    Error::Corrupt(what.to_owned())
}

fn parse<T: std::str::FromStr>(text: &str) -> Result<T> {
    text.parse().map_err(|_| corrupt(text))
}

/// A buyer's field, `b:<currency>:<city>␟<category>␟<product>␟<user>`, in `minute`.
fn parse_buyer(minute: i64, field: &str) -> Result<Buyer> {
    let mut parts = field.splitn(3, ':');
    let (Some("b"), Some(currency), Some(value)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(corrupt(field));
    };
    let currency: Currency = currency.parse().map_err(|_| corrupt(field))?;
    let mut values = value.split(tidemark_domain::VALUE_SEPARATOR);
    let (Some(city), Some(category), Some(product), Some(user_id), None) = (
        values.next(),
        values.next(),
        values.next(),
        values.next(),
        values.next(),
    ) else {
        return Err(corrupt(field));
    };
    Ok(Buyer {
        minute,
        city: city.to_owned(),
        category: category.to_owned(),
        product: product.to_owned(),
        currency,
        user_id: user_id.to_owned(),
    })
}

/// The head of a reply (`len` fields, [`READ_HEAD`] first): the cursor (`None` when
/// the view has none), where the read stands in the changes, and the rest.
fn decode_head(out: &[String], len: usize) -> Result<(Option<Meta>, Mark, &[String])> {
    if out.len() < len || len < READ_HEAD {
        return Err(corrupt("short reply"));
    }
    let (head, rest) = out.split_at(len);
    let [txid, seq, updated, lag, generation, changed, ..] = head else {
        unreachable!("the head holds READ_HEAD fields");
    };
    let meta = match (txid.parse::<u64>(), seq.parse::<i64>()) {
        (Ok(txid), Ok(seq)) => Some(Meta {
            cursor: LogPosition::new(txid, seq),
            updated_ms: updated.parse().unwrap_or(0),
            lag_ms: lag.parse().ok(),
        }),
        _ => None,
    };
    let mark = Mark {
        generation: generation.clone(),
        changed: if changed.is_empty() {
            "0-0".to_owned()
        } else {
            changed.clone()
        },
    };
    Ok((meta, mark, rest))
}

/// Decodes a read of `question`'s source shape, epoch by epoch, and its buyers.
fn decode_read(out: &[String], question: &Question) -> Result<(Snapshot, Vec<Buyer>)> {
    let (meta, _, rest) = decode_head(out, READ_HEAD)?;
    let mut epochs: BTreeMap<u64, Grid> = BTreeMap::new();
    let mut buyers = Vec::new();
    for chunk in rest.chunks(4) {
        let [epoch, minute, field, amount] = chunk else {
            return Err(corrupt("odd reply"));
        };
        let epoch: u64 = epoch.parse().map_err(|_| corrupt(epoch))?;
        let minute = parse(minute)?;
        // A buyer's field is `b:<currency>:<values>`; no cell metric is `b`.
        if field.starts_with("b:") {
            buyers.push(parse_buyer(minute, field)?);
        } else {
            let grid = epochs.entry(epoch).or_default();
            add_cell(grid, question, minute, field, parse(amount)?)?;
        }
    }
    Ok((Snapshot { meta, epochs }, buyers))
}

/// Adds a stored field in `minute` to `grid` if it answers `question` — an order
/// count of the question's source shape ([`source_of`]), or an amount (of
/// [`AMOUNTS`]) —: its value cut to the question's dimension, its minute to its
/// granularity's bucket. The field's shape is that of its value, told by how many
/// attributes it joins (no attribute holds the separator). An amount of another
/// shape, or a count of a shape the read did not ask for, is corrupt.
fn add_cell(
    grid: &mut Grid,
    question: &Question,
    minute: i64,
    field: &str,
    amount: i64,
) -> Result<()> {
    let dimension = question.dimension;
    let mut parts = field.splitn(3, ':');
    let (Some(metric), Some(currency), Some(value)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(corrupt(field));
    };
    let source = match value.matches(tidemark_domain::VALUE_SEPARATOR).count() {
        0 => Dimension::City,
        1 => Dimension::CityCategory,
        _ => Dimension::CityCategoryProduct,
    };
    if COUNTS.contains(&metric) {
        if source != source_of(dimension) {
            return if source == AMOUNTS {
                Ok(())
            } else {
                Err(corrupt(field))
            };
        }
    } else if source != AMOUNTS {
        return Err(corrupt(field));
    }
    let currency: Currency = currency.parse().map_err(|_| corrupt(field))?;
    let value = if source == dimension {
        value.to_owned()
    } else {
        // Keep the dimension's attributes of the source value.
        let parts = source.split(value).ok_or_else(|| corrupt(field))?;
        let at = |a| source.attributes().iter().position(|s| *s == a);
        dimension
            .join(|a| parts[at(a).expect("a source holds its dimension's attributes")])
            .into_owned()
    };
    let bucket = question.granularity.bucket_of_secs(minute);
    let totals = grid.entry((bucket, value, currency)).or_default();
    match metric {
        "r" => totals.revenue_minor += amount,
        "o" => totals.orders += amount,
        "i" => totals.items += amount,
        "br" => totals.booked.refunded_minor += amount,
        "bi" => totals.booked.refunded_items += amount,
        "bc" => totals.booked.cancelled_orders += amount,
        "sr" => totals.restated.refunded_minor += amount,
        "si" => totals.restated.refunded_items += amount,
        "sc" => totals.restated.cancelled_orders += amount,
        _ => return Err(corrupt(field)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_snapshot_as(
        out: &[String],
        granularity: Granularity,
        dimension: Dimension,
    ) -> Result<Snapshot> {
        let question = Question::new(0, granularity, dimension, i64::MIN, i64::MAX);
        Ok(decode_read(out, &question)?.0)
    }

    fn reply(fields: &[&str]) -> Vec<String> {
        let mut out: Vec<String> = ["7", "3", "1000", "", "1.2", "5-0"]
            .map(str::to_owned)
            .to_vec();
        out.extend(fields.iter().map(|f| (*f).to_owned()));
        out
    }

    #[test]
    fn changes_continue_a_read_only_when_they_chain_from_its_cursor_to_the_views() {
        let meta = |txid, seq| {
            Some(Meta {
                cursor: LogPosition::new(txid, seq),
                updated_ms: 0,
                lag_ms: None,
            })
        };
        let changes = |pairs: &[(&str, &str)]| -> Vec<String> {
            pairs
                .iter()
                .flat_map(|(k, v)| [(*k).to_owned(), (*v).to_owned()])
                .collect()
        };
        let two_applies = changes(&[
            ("@from", "5_1"),
            ("@delta", "0:60:city\u{1d}o:EUR:Oslo\u{1e}1"),
            ("@to", "6_2"),
            ("@from", "6_2"),
            ("@to", "7_1"),
        ]);
        assert!(continues(meta(5, 1), &two_applies, meta(7, 1)));
        assert!(continues(meta(7, 1), &[], meta(7, 1)), "nothing new");
        // A replayed apply from before the read's cursor, a gap, a short tail.
        assert!(!continues(meta(6, 2), &two_applies, meta(7, 1)));
        assert!(!continues(meta(5, 1), &two_applies[6..], meta(7, 1)));
        assert!(!continues(meta(5, 1), &two_applies[..6], meta(7, 1)));
        assert!(!continues(None, &two_applies, meta(7, 1)));
    }

    #[test]
    fn a_reply_decodes_into_epochs_and_cells() {
        let sep = tidemark_domain::VALUE_SEPARATOR;
        let (books, games) = (
            format!("Zürich{sep}books{sep}p1"),
            format!("Zürich{sep}games{sep}p2"),
        );
        let (r1, r2, o2, sr2) = (
            format!("r:KWD:{books}"),
            format!("r:KWD:{games}"),
            format!("o:KWD:{games}"),
            format!("sr:KWD:{games}"),
        );
        // The city's order count from its own hash; its amounts from the products'
        // (whose order counts a city read leaves out).
        let snapshot = decode_snapshot_as(
            &reply(&[
                "0",
                "120",
                "o:KWD:Zürich",
                "1",
                "0",
                "120",
                &r1,
                "1000",
                "0",
                "120",
                &r2,
                "299",
                "0",
                "120",
                &o2,
                "1",
                "0",
                "120",
                &sr2,
                "300",
            ]),
            Granularity::Minute,
            Dimension::City,
        )
        .unwrap();
        assert_eq!(snapshot.meta.unwrap().cursor, LogPosition::new(7, 3));
        let kwd: Currency = "KWD".parse().unwrap();
        let cell = snapshot.epochs[&0][&(120, "Zürich".to_owned(), kwd)];
        assert_eq!((cell.revenue_minor, cell.orders, cell.items), (1_299, 1, 0));
        assert_eq!(cell.restated.refunded_minor, 300);
        assert_eq!(
            cell.net_revenue_minor(tidemark_domain::Basis::OrderTime),
            999
        );
    }

    #[test]
    fn data_this_build_cannot_read_is_an_error_not_a_gap() {
        let sep = tidemark_domain::VALUE_SEPARATOR;
        let product =
            |metric: &str, currency: &str| format!("{metric}:{currency}:Oslo{sep}c{sep}p");
        let (xyz, q, bare, odd) = (
            product("r", "XYZ"),
            product("q", "EUR"),
            product("r", "EUR"),
            format!("r:EUR:Oslo{sep}c{sep}p{sep}x"),
        );
        for fields in [
            vec!["0", "120", &xyz, "5"],
            vec!["0", "120", &q, "5"],
            vec!["0", "120", "q:EUR:Oslo", "5"],
            vec!["0", "120", "r:EUR", "5"],
            vec!["0", "minute", &bare, "5"],
            vec!["0", "120", &bare],
            // Amounts are stored only by product; a count of a shape not asked for.
            vec!["0", "120", "r:EUR:Oslo", "5"],
            vec!["0", "120", "o:EUR:Oslo\u{1f}c", "5"],
            vec!["0", "120", &odd, "5"],
        ] {
            let decoded = decode_snapshot_as(&reply(&fields), Granularity::Minute, Dimension::City);
            assert!(
                matches!(decoded, Err(Error::Corrupt(_))),
                "{fields:?}: {decoded:?}"
            );
        }
        assert!(
            decode_snapshot_as(&["1".to_owned()], Granularity::Minute, Dimension::City).is_err()
        );
        // A category read sums `city_category` counts: a city's is corrupt.
        let decoded = decode_snapshot_as(
            &reply(&["0", "120", "o:EUR:Oslo", "5"]),
            Granularity::Minute,
            Dimension::Category,
        );
        assert!(matches!(decoded, Err(Error::Corrupt(_))), "{decoded:?}");
    }

    #[test]
    fn a_shape_not_stored_is_the_sum_of_the_cells_of_its_source() {
        let sep = tidemark_domain::VALUE_SEPARATOR;
        let cell = |city: &str, category: &str, product: &str| {
            format!("o:EUR:{city}{sep}{category}{sep}{product}")
        };
        let fields = [
            ("0", "60", cell("Oslo", "books", "p:1"), "1"),
            ("0", "120", cell("Rome", "books", "p:1"), "2"),
            ("0", "120", cell("Rome", "games", "p:2"), "4"),
            ("1", "180", cell("Oslo", "games", "p:1"), "8"),
        ];
        let out: Vec<&str> = fields
            .iter()
            .flat_map(|(e, b, f, a)| [*e, *b, f.as_str(), *a])
            .collect();
        let products =
            decode_snapshot_as(&reply(&out), Granularity::Hour, Dimension::Product).unwrap();
        let eur: Currency = "EUR".parse().unwrap();
        let orders = |epoch: u64, product: &str| {
            products.epochs[&epoch][&(0, product.to_owned(), eur)].orders
        };
        assert_eq!(
            (orders(0, "p:1"), orders(0, "p:2"), orders(1, "p:1")),
            (3, 4, 8)
        );
        assert_eq!(products.epochs[&0].len(), 2);
    }
}
