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
//! read with the answer's revenue cells, at one cursor (`SpeedView::track`, kept
//! current by `SpeedView::refresh`), the batch's of the same published state: the
//! answer is the exact count as of the one position it states.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use foldhash::{HashMap, HashSet};

use tidemark_batchview::{BuyerKey, BuyersQuery, PublishedState};
use tidemark_domain::{Attribute, Currency, Granularity};
use tidemark_speedview::Buyer;

use crate::local::LocalBuckets;
use crate::query::{MAX_GROUPS, RevenueRequest};
use crate::views::{BuyerCounts, Held, ViewError, Views};

/// Buyers per answer cell: (local bucket start, grouped values, currency).
pub type Buyers = BTreeMap<(i64, Vec<String>, Currency), i64>;

/// A cell's grouped values, borrowed (`""` past the question's attributes).
type Groups<'a> = [&'a str; MAX_GROUPS];

fn groups_of<'a>(values: impl Iterator<Item = &'a str>) -> Groups<'a> {
    let mut groups = [""; MAX_GROUPS];
    for (slot, v) in groups.iter_mut().zip(values) {
        *slot = v;
    }
    groups
}

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
/// in the same cell. Only a cell the batch has buyers in can hold a recent user
/// already: ClickHouse is asked about the recent users of those cells alone
/// (usually none — a live stream's users are in the last minutes, which the
/// batch view does not reach yet), and the count is done in the same pass over
/// the speed users when there is nothing to ask. The speed users are grouped
/// on a computing thread (see [`crate::compute`]).
pub async fn buyers(
    views: &Views,
    req: &Ask<'_>,
    state: Option<&PublishedState>,
    batch: Arc<BuyerCounts>,
    speed: Arc<BTreeSet<Buyer>>,
) -> Result<Buyers, ViewError> {
    let counting = Arc::new(Counting::of(req));
    let first = {
        let (counting, batch, speed) = (counting.clone(), batch.clone(), speed.clone());
        views
            .computing()
            .run(move || counting.count_or_ask(&batch, &speed))
            .await
    };
    let (users, (from, to)) = match first {
        Pass::Counted(buyers) => return Ok(buyers),
        Pass::Ask(users, span) => (users, span),
    };
    // Of the recent users, those the batch already counts in the same cell:
    // asked only over the buckets that hold them. (Batch buyers come with a
    // published state; without one there are none to hold.)
    let Some(state) = state else {
        return Ok(views
            .computing()
            .run(move || counting.count(&batch, &speed, &Held::default()))
            .await);
    };
    let key = req.key_sql();
    let among_key = match &req.buckets {
        Some(local) => local.key_sql(from, to),
        None => key.clone(),
    };
    let among = BuyersQuery {
        from,
        to,
        key: &among_key,
        ..req.query(&key)
    };
    let users: Vec<&str> = users.iter().map(String::as_str).collect();
    let held = views.buyers_among(state, &among, &users).await?;
    Ok(views
        .computing()
        .run(move || counting.count(&batch, &speed, &held))
        .await)
}

/// The first pass over the speed users: the count, or whom to ask about.
enum Pass {
    Counted(Buyers),
    /// The distinct recent users of the cells the batch has buyers in, and the
    /// span of those cells' buckets.
    Ask(Vec<String>, (i64, i64)),
}

/// What counting an [`Ask`]'s speed buyers needs, owned (it runs on a computing
/// thread).
struct Counting {
    from: i64,
    to: i64,
    buckets: Option<LocalBuckets>,
    group_by: Vec<Attribute>,
    filters: Vec<(Attribute, Vec<String>)>,
    currency: Option<Currency>,
    report_currency: Option<Currency>,
}

/// The speed view's users per cell (bucket start, grouped values, currency or
/// `""` across currencies), borrowed from the buyers (a live stream puts tens of
/// thousands of them in each computation). Hashed, not ordered: ordered maps of
/// them compared strings byte by byte (memcmp led serving's profile at 2,000
/// GraphQL requests/s with ~20,000 speed buyers per computation). foldhash is
/// seeded per process.
type Recent<'b> = HashMap<(i64, Groups<'b>, &'b str), HashSet<&'b str>>;

fn value(b: &Buyer, a: Attribute) -> &str {
    match a {
        Attribute::City => &b.city,
        Attribute::Category => &b.category,
        Attribute::Product => &b.product,
    }
}

impl Counting {
    fn of(req: &Ask<'_>) -> Self {
        Counting {
            from: req.from,
            to: req.to,
            buckets: req.buckets,
            group_by: req.group_by.to_vec(),
            filters: req.filters.to_vec(),
            currency: req.currency,
            report_currency: req.report_currency,
        }
    }

    /// The answer's currency of a cell counted in `code` (`""`: across them).
    fn currency_of(&self, code: &str) -> Currency {
        match self.report_currency {
            Some(c) => c,
            None => code.parse().unwrap_or_else(|_| {
                self.currency
                    .unwrap_or_else(|| "EUR".parse().expect("a currency"))
            }),
        }
    }

    /// The answer's bucket of a batch key (a local day's is its day number).
    fn bucket_of(&self, k: i64) -> i64 {
        match &self.buckets {
            Some(local) if local.granularity == Granularity::Day => local.day_start(k),
            _ => k,
        }
    }

    fn recent<'b>(&self, speed: &'b BTreeSet<Buyer>) -> Recent<'b> {
        let per_currency = self.report_currency.is_none();
        let mut recent = Recent::default();
        let mut starts: HashMap<i64, i64> = HashMap::default();
        for b in speed {
            if b.minute < self.from
                || b.minute >= self.to
                || self.currency.is_some_and(|c| c != b.currency)
                || !self.filters.iter().all(|(a, values)| {
                    values
                        .binary_search_by(|v| v.as_str().cmp(value(b, *a)))
                        .is_ok()
                })
            {
                continue;
            }
            let start = *starts
                .entry(b.minute)
                .or_insert_with(|| self.buckets.as_ref().map_or(0, |l| l.start(b.minute)));
            let groups = groups_of(self.group_by.iter().map(|a| value(b, *a)));
            let currency = if per_currency {
                b.currency.as_str()
            } else {
                ""
            };
            recent
                .entry((start, groups, currency))
                .or_default()
                .insert(&b.user_id);
        }
        recent
    }

    /// The cell of a batch key as [`Counting::recent`] keys its cells.
    fn cell_of<'k>(&self, (k, g, c): &'k BuyerKey) -> (i64, Groups<'k>, &'k str) {
        (
            self.bucket_of(*k),
            groups_of(g.iter().map(String::as_str)),
            c.as_str(),
        )
    }

    /// The count, when no recent user is in a cell the batch has buyers in
    /// (nothing to ask ClickHouse); else those users and their cells' span.
    fn count_or_ask(&self, batch: &BuyerCounts, speed: &BTreeSet<Buyer>) -> Pass {
        let recent = self.recent(speed);
        if recent.is_empty() {
            // A question over days the stream has not reached.
            return Pass::Counted(self.tally(batch, recent, |_, _| false));
        }
        let in_batch: HashSet<(i64, Groups<'_>, &str)> =
            batch.keys().map(|key| self.cell_of(key)).collect();
        let shared: Vec<_> = recent
            .iter()
            .filter(|(cell, _)| in_batch.contains(*cell))
            .collect();
        if shared.is_empty() {
            return Pass::Counted(self.tally(batch, recent, |_, _| false));
        }
        let users: HashSet<&str> = shared.iter().flat_map(|(_, u)| u.iter().copied()).collect();
        let span = match &self.buckets {
            Some(local) => {
                let first = shared.iter().map(|((s, _, _), _)| *s).min();
                let last = shared.iter().map(|((s, _, _), _)| local.next(*s)).max();
                (
                    first.unwrap_or(self.from).max(self.from),
                    last.unwrap_or(self.to).min(self.to),
                )
            }
            None => (self.from, self.to),
        };
        Pass::Ask(users.into_iter().map(str::to_owned).collect(), span)
    }

    /// The batch's counts plus, per cell, the recent users it does not `held`.
    fn count(&self, batch: &BuyerCounts, speed: &BTreeSet<Buyer>, held: &Held) -> Buyers {
        let recent = self.recent(speed);
        let held: HashSet<(i64, Groups<'_>, &str, &str)> = held
            .iter()
            .map(|(key, u)| {
                let (start, groups, currency) = self.cell_of(key);
                (start, groups, currency, u.as_str())
            })
            .collect();
        self.tally(batch, recent, |(start, groups, currency), user| {
            held.contains(&(*start, *groups, *currency, user))
        })
    }

    /// The batch's counts plus, per cell, the `recent` users not `held` there.
    fn tally<'b>(
        &self,
        batch: &BuyerCounts,
        recent: Recent<'b>,
        held: impl Fn(&(i64, Groups<'b>, &'b str), &str) -> bool,
    ) -> Buyers {
        let mut out = Buyers::new();
        for ((k, groups, currency), n) in batch {
            out.insert(
                (
                    self.bucket_of(*k),
                    groups.clone(),
                    self.currency_of(currency),
                ),
                *n as i64,
            );
        }
        for (cell, users) in recent {
            let new = users.iter().filter(|u| !held(&cell, u)).count() as i64;
            let (start, groups, currency) = cell;
            let groups = groups[..self.group_by.len()]
                .iter()
                .map(|g| (*g).to_owned())
                .collect();
            *out.entry((start, groups, self.currency_of(currency)))
                .or_default() += new;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eur() -> Currency {
        "EUR".parse().unwrap()
    }

    fn buyer(minute: i64, city: &str, user: &str) -> Buyer {
        Buyer {
            minute,
            city: city.into(),
            category: "books".into(),
            product: "p1".into(),
            currency: eur(),
            user_id: user.into(),
        }
    }

    /// Hourly by city in UTC over two hours, counted across currencies.
    fn counting() -> Counting {
        Counting {
            from: 0,
            to: 7_200,
            buckets: Some(LocalBuckets::new(chrono_tz::UTC, Granularity::Hour)),
            group_by: vec![Attribute::City],
            filters: Vec::new(),
            currency: None,
            report_currency: Some(eur()),
        }
    }

    fn key(k: i64, city: &str) -> BuyerKey {
        (k, vec![city.to_owned()], String::new())
    }

    /// An answer's cell, counted across currencies (in euros).
    fn cell(k: i64, city: &str) -> (i64, Vec<String>, Currency) {
        (k, vec![city.to_owned()], eur())
    }

    #[test]
    fn recent_users_of_cells_the_batch_has_no_buyers_in_are_counted_without_asking() {
        // The batch has buyers in Berlin's first hour; the recent users are in
        // its second hour and in Paris's first.
        let batch = BuyerCounts::from([(key(0, "Berlin"), 2)]);
        let speed = BTreeSet::from([
            buyer(3_600, "Berlin", "u1"),
            buyer(3_660, "Berlin", "u1"),
            buyer(3_600, "Berlin", "u2"),
            buyer(60, "Paris", "u1"),
        ]);
        let Pass::Counted(counted) = counting().count_or_ask(&batch, &speed) else {
            panic!("asked ClickHouse about users no batch cell can hold");
        };
        assert_eq!(
            counted,
            Buyers::from([
                (cell(0, "Berlin"), 2),
                (cell(3_600, "Berlin"), 2),
                (cell(0, "Paris"), 1)
            ])
        );
        // Every recent user after the range (a question over past days): the
        // batch's counts alone.
        let later = BTreeSet::from([buyer(7_200, "Berlin", "u9")]);
        let Pass::Counted(counted) = counting().count_or_ask(&batch, &later) else {
            panic!("asked ClickHouse with no recent user in the range");
        };
        assert_eq!(counted, Buyers::from([(cell(0, "Berlin"), 2)]));
    }

    #[test]
    fn recent_users_of_a_cell_the_batch_has_buyers_in_are_asked_about_and_only_they() {
        let batch = BuyerCounts::from([(key(0, "Berlin"), 2)]);
        let speed = BTreeSet::from([
            buyer(120, "Berlin", "u1"),
            buyer(3_600, "Berlin", "u2"),
            buyer(60, "Paris", "u3"),
        ]);
        let c = counting();
        let Pass::Ask(users, span) = c.count_or_ask(&batch, &speed) else {
            panic!("counted a recent user the batch may hold already");
        };
        assert_eq!(users, vec!["u1".to_owned()]);
        assert_eq!(span, (0, 3_600), "only Berlin's first hour is asked over");
        // The batch holds u1 there already: counted once.
        let held = Held::from([(key(0, "Berlin"), "u1".to_owned())]);
        let counted = c.count(&batch, &speed, &held);
        assert_eq!(counted[&cell(0, "Berlin")], 2);
        assert_eq!(counted[&cell(3_600, "Berlin")], 1);
        assert_eq!(counted[&cell(0, "Paris")], 1);
    }
}
