//! Unique buyers: distinct users per bucket and group, exact across the
//! batch/speed handoff.
//!
//! A count of distinct users cannot be summed: not over the minutes of an hour,
//! not over cities, not over runs, not over the two views. So both views keep who
//! bought, not how many: the batch view one row per minute, city, category,
//! product, currency and user (`buyers` in ClickHouse, written by each run), the
//! speed view one field per the same (in the epoch's minute hashes). An answer
//! counts the batch's users per cell in ClickHouse (`uniqExact`, bucketed in the
//! question's zone there), reads the speed view's users of the range, and adds
//! those of each cell the batch does not already hold there — asking ClickHouse
//! which of exactly those users it holds. The speed epochs read are those the
//! published state does not cover, as for revenue, and the speed view's users are
//! read in the same atomic read as the answer's revenue cells
//! (`SpeedView::read_with_buyers`), the batch's of the same published state: the
//! answer is the exact count as of the one position it states.

use std::collections::{BTreeMap, BTreeSet};

use tidemark_batchview::{BuyersQuery, PublishedState};
use tidemark_domain::{Attribute, Currency, Granularity};
use tidemark_speedview::Buyer;

use crate::local::LocalBuckets;
use crate::query::RevenueRequest;
use crate::views::{BuyerCounts, ViewError, Views};

/// Buyers per answer cell: (local bucket start, grouped values, currency).
pub type Buyers = BTreeMap<(i64, Vec<String>, Currency), i64>;

/// A cell of the views' buyers: (bucket, grouped values, currency or `""`).
type Cell = (i64, Vec<String>, String);

/// What a buyers count is asked over.
pub struct Ask<'a> {
    /// Minutes in `[from, to)`.
    pub from: i64,
    pub to: i64,
    /// The question's buckets; `None`: the whole range is one bucket (key 0).
    pub buckets: Option<LocalBuckets>,
    pub group_by: &'a [Attribute],
    pub filters: &'a [(Attribute, Vec<String>)],
    pub currency: Option<Currency>,
    pub report_currency: Option<Currency>,
}

impl<'a> Ask<'a> {
    /// The ClickHouse expression of a minute's bucket key (see [`BuyersQuery::key`]).
    pub fn key_sql(&self) -> String {
        match &self.buckets {
            Some(local) => local.key_sql(self.from, self.to),
            None => "0".to_owned(),
        }
    }

    /// The batch view's question, `key` from [`Ask::key_sql`].
    pub fn query<'k>(&'k self, key: &'k str) -> BuyersQuery<'k> {
        BuyersQuery {
            from: self.from,
            to: self.to,
            key,
            group_by: self.group_by,
            filters: self.filters,
            currency: self.currency,
            per_currency: self.report_currency.is_none(),
        }
    }

    /// The buckets of a revenue question.
    pub fn of(req: &'a RevenueRequest) -> Self {
        Ask {
            from: req.from,
            to: req.to,
            buckets: Some(LocalBuckets::new(req.zone, req.granularity)),
            group_by: &req.group_by,
            filters: &req.filters,
            currency: req.currency,
            report_currency: req.report_currency,
        }
    }
}

/// The buyers of every cell of an answer: the batch view's (`batch`, counted in
/// the published `state`) plus the speed view's users (`speed`, read with the
/// answer's revenue at the cursor it states) that the batch does not already hold
/// in the same cell.
pub async fn buyers(
    views: &Views,
    req: &Ask<'_>,
    state: Option<&PublishedState>,
    batch: &BuyerCounts,
    speed: &BTreeSet<Buyer>,
) -> Result<Buyers, ViewError> {
    let per_currency = req.report_currency.is_none();
    let currency_of = |code: &str| -> Currency {
        match req.report_currency {
            Some(c) => c,
            None => code.parse().unwrap_or_else(|_| {
                req.currency
                    .unwrap_or_else(|| "EUR".parse().expect("a currency"))
            }),
        }
    };
    let key = req.key_sql();
    let query = req.query(&key);
    let bucket_of = |k: i64| match &req.buckets {
        Some(local) if local.granularity == Granularity::Day => local.day_start(k),
        _ => k,
    };
    let mut out = Buyers::new();
    for ((k, groups, currency), n) in batch {
        out.insert(
            (bucket_of(*k), groups.clone(), currency_of(currency)),
            *n as i64,
        );
    }
    // The speed view's users per cell.
    let value = |b: &tidemark_speedview::Buyer, a: Attribute| -> String {
        match a {
            Attribute::City => b.city.clone(),
            Attribute::Category => b.category.clone(),
            Attribute::Product => b.product.clone(),
        }
    };
    let mut recent: BTreeMap<Cell, BTreeSet<&str>> = BTreeMap::new();
    let mut starts: BTreeMap<i64, i64> = BTreeMap::new();
    for b in speed {
        if b.minute < req.from
            || b.minute >= req.to
            || req.currency.is_some_and(|c| c != b.currency)
            || !req
                .filters
                .iter()
                .all(|(a, values)| values.binary_search(&value(b, *a)).is_ok())
        {
            continue;
        }
        let start = *starts
            .entry(b.minute)
            .or_insert_with(|| req.buckets.as_ref().map_or(0, |l| l.start(b.minute)));
        let groups = req.group_by.iter().map(|a| value(b, *a)).collect();
        let currency = if per_currency {
            b.currency.to_string()
        } else {
            String::new()
        };
        recent
            .entry((start, groups, currency))
            .or_default()
            .insert(&b.user_id);
    }
    if recent.is_empty() {
        return Ok(out);
    }
    // Of the recent users, those the batch already counts in the same cell: asked
    // only over the buckets that hold recent users (usually the last few).
    let users: BTreeSet<&str> = recent.values().flatten().copied().collect();
    let users: Vec<&str> = users.into_iter().collect();
    let (from, to) = match &req.buckets {
        Some(local) => {
            let first = recent.keys().map(|(s, _, _)| *s).min().unwrap_or(req.from);
            let last = recent.keys().map(|(s, _, _)| local.next(*s)).max();
            (first.max(req.from), last.unwrap_or(req.to).min(req.to))
        }
        None => (req.from, req.to),
    };
    let among_key = match &req.buckets {
        Some(local) => local.key_sql(from, to),
        None => key.clone(),
    };
    let among = BuyersQuery {
        from,
        to,
        key: &among_key,
        ..query
    };
    let held = match state {
        Some(state) => views.buyers_among(state, &among, &users).await?,
        None => BTreeSet::new(),
    };
    let held: BTreeSet<(Cell, &str)> = held
        .iter()
        .map(|((k, g, c), u)| ((bucket_of(*k), g.clone(), c.clone()), u.as_str()))
        .collect();
    for ((start, groups, currency), users) in recent {
        let key = (start, groups, currency);
        let new = users
            .iter()
            .filter(|u| !held.contains(&(key.clone(), **u)))
            .count() as i64;
        let (start, groups, currency) = key;
        *out.entry((start, groups, currency_of(&currency)))
            .or_default() += new;
    }
    Ok(out)
}
