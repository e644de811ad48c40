//! A small, seeded model of a shop: cities of skewed sizes with their own currency
//! and time zone, users living in them, a catalogue of products whose popularity
//! follows Zipf's law, a daily rhythm and varied basket sizes.
//!
//! Everything is drawn from one seeded generator, so the same seed (and, for
//! backfills, the same end time) gives the same orders, byte for byte. Refunds and
//! cancellations ([`Shop::correction_for`]) come from a second generator of the same
//! seed, so they do not change which orders a seed gives.

use chrono::{DateTime, SubsecRound, TimeDelta, Timelike, Utc};
use rand::distr::Distribution;
use rand::distr::weighted::WeightedIndex;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tidemark_domain::{Currency, Order, OrderLine, RefundItem, RefundRequest};
use uuid::Uuid;

/// A city: name, currency, UTC offset in minutes and population (thousands), which
/// sets its share of users.
struct CitySpec {
    name: &'static str,
    currency: &'static str,
    utc_offset_minutes: i64,
    population_k: u32,
    /// Minor units of the local currency per euro cent.
    per_euro_cent: f64,
}

const CITIES: &[CitySpec] = &[
    city("Tokyo", "JPY", 540, 14_000, 1.6),
    city("Mumbai", "INR", 330, 12_400, 90.0),
    city("São Paulo", "BRL", -180, 12_300, 5.9),
    city("Seoul", "KRW", 540, 9_700, 14.5),
    city("Mexico City", "MXN", -360, 9_200, 19.0),
    city("London", "GBP", 0, 9_000, 0.85),
    city("New York", "USD", -300, 8_300, 1.08),
    city("Singapore", "SGD", 480, 5_900, 1.45),
    city("Sydney", "AUD", 600, 5_300, 1.65),
    city("Berlin", "EUR", 60, 3_700, 1.0),
    city("Madrid", "EUR", 60, 3_300, 1.0),
    city("Toronto", "CAD", -300, 2_800, 1.48),
    city("Chicago", "USD", -360, 2_700, 1.08),
    city("Paris", "EUR", 60, 2_100, 1.0),
    city("Warsaw", "PLN", 60, 1_800, 4.3),
    city("Stockholm", "SEK", 60, 980, 11.5),
    city("Oslo", "NOK", 60, 700, 11.7),
    city("Zürich", "CHF", 60, 420, 0.95),
    city("Moscow", "RUB", 180, 12_600, 100.0),
    city("Kuwait City", "KWD", 180, 3_100, 3.3),
];

const fn city(
    name: &'static str,
    currency: &'static str,
    utc_offset_minutes: i64,
    population_k: u32,
    per_euro_cent: f64,
) -> CitySpec {
    CitySpec {
        name,
        currency,
        utc_offset_minutes,
        population_k,
        per_euro_cent,
    }
}

/// A category: name, share of the catalogue, and the price range in euro cents.
const CATEGORIES: &[(&str, u32, i64, i64)] = &[
    ("books", 22, 500, 4_000),
    ("fashion", 18, 1_500, 25_000),
    ("electronics", 12, 2_000, 150_000),
    ("kitchen", 12, 800, 20_000),
    ("toys", 10, 700, 9_000),
    ("beauty", 10, 300, 6_000),
    ("garden", 8, 500, 30_000),
    ("games", 8, 1_500, 7_000),
];

/// Relative order intensity by local hour: quiet nights, a lunch bump, an evening peak.
const DAILY_RHYTHM: [f64; 24] = [
    0.25, 0.15, 0.08, 0.05, 0.05, 0.08, 0.15, 0.30, 0.45, 0.55, 0.60, 0.65, //
    0.80, 0.75, 0.60, 0.55, 0.60, 0.70, 0.85, 0.95, 1.00, 0.90, 0.65, 0.40,
];

/// Lines per basket and their weights: most orders are of one product.
const BASKET_LINES: &[(usize, u32)] = &[(1, 700), (2, 200), (3, 70), (4, 30)];

/// Units of one line and their weights: most lines are of one item.
const QUANTITIES: &[(i32, u32)] = &[
    (1, 700),
    (2, 170),
    (3, 70),
    (4, 30),
    (5, 15),
    (6, 6),
    (8, 5),
    (10, 4),
];

/// Zipf exponent of product popularity.
const ZIPF_S: f64 = 1.07;

/// Share of orders refunded later (part of a line or a whole line).
pub const REFUND_SHARE: f64 = 0.03;
/// Share of orders cancelled later (never one that is also refunded: a refund
/// after the cancellation would find nothing left).
pub const CANCEL_SHARE: f64 = 0.02;
/// Corrections come 5 minutes to 30 days after their order (log-uniform: most
/// within days).
const CORRECTION_DELAY_MINUTES: (f64, f64) = (5.0, 30.0 * 24.0 * 60.0);

/// Share of orders placed away from home (travel, a gift sent from elsewhere):
/// their city, and its currency, are another city's.
pub const AWAY_SHARE: f64 = 0.06;
/// Share of customers who move to another city per simulated month.
pub const MOVES_PER_MONTH: f64 = 0.01;
/// Customer segments and their weights.
const SEGMENTS: &[(&str, u32)] = &[("retail", 80), ("business", 15), ("vip", 5)];
/// Sign-ups fall in the two years before this moment (unix seconds,
/// 2025-01-01T00:00:00Z), so a customer's first version precedes the demo's orders.
const SIGNUPS_END: i64 = 1_735_689_600;

/// A customer's attributes from a moment on, as `PUT /v1/customers` takes them.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub user_id: String,
    pub city: String,
    pub segment: String,
    pub signed_up_at: DateTime<Utc>,
    pub effective_at: DateTime<Utc>,
}

/// A refund or cancellation the shop will ask for, at `at`.
#[derive(Debug, Clone, PartialEq)]
pub struct Correction {
    pub order_id: Uuid,
    /// The order's currency (the tally of refunds is per currency).
    pub currency: Currency,
    pub at: DateTime<Utc>,
    /// `None` for a cancellation.
    pub refund: Option<RefundRequest>,
}

/// Shape of the generated world.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub users: usize,
    pub products: usize,
    /// Share of streamed orders whose event time lies in the past (apps that were
    /// offline, retries): between one minute and two hours late.
    pub late_share: f64,
}

impl Default for Shape {
    fn default() -> Self {
        Self {
            users: 20_000,
            products: 400,
            late_share: 0.02,
        }
    }
}

struct Product {
    id: String,
    category: &'static str,
    /// Price in euro cents; each city sees it converted to its own currency.
    price_euro_cents: i64,
}

/// The seeded world and the random stream of orders drawn from it.
pub struct Shop {
    rng: StdRng,
    shape: Shape,
    products: Vec<Product>,
    popularity: WeightedIndex<f64>,
    /// First home city (index into `CITIES`) of each user.
    homes: Vec<usize>,
    /// Each user's moves: (from when, the new home), in time order.
    moves: Vec<Vec<(DateTime<Utc>, usize)>>,
    /// Each user's segment (index into `SEGMENTS`) and sign-up.
    segments: Vec<usize>,
    signed_up: Vec<DateTime<Utc>>,
    city_pick: WeightedIndex<u32>,
    /// Draws customers' moves, apart from the orders' generator.
    people: StdRng,
    quantities: WeightedIndex<u32>,
    basket_lines: WeightedIndex<u32>,
    currencies: Vec<Currency>,
    /// Draws the corrections, apart from the orders' generator.
    corrections: StdRng,
}

impl Shop {
    pub fn new(seed: u64, shape: Shape) -> Shop {
        let mut rng = StdRng::seed_from_u64(seed);
        let corrections = StdRng::seed_from_u64(seed ^ 0x7265_6675_6e64); // "refund"
        let category_pick =
            WeightedIndex::new(CATEGORIES.iter().map(|c| c.1)).expect("positive weights");
        let products: Vec<Product> = (0..shape.products.max(1))
            .map(|i| {
                let (category, _, low, high) = CATEGORIES[category_pick.sample(&mut rng)];
                // Log-uniform within the category's range: many cheap, few dear.
                let ln = rng.random_range((low as f64).ln()..(high as f64).ln());
                Product {
                    id: format!("sku-{i:05}"),
                    category,
                    price_euro_cents: ln.exp().round() as i64,
                }
            })
            .collect();
        // Popularity ranks are a shuffle, so best sellers are spread over categories.
        let mut ranks: Vec<usize> = (1..=products.len()).collect();
        ranks.shuffle(&mut rng);
        let popularity = WeightedIndex::new(ranks.iter().map(|&r| 1.0 / (r as f64).powf(ZIPF_S)))
            .expect("positive weights");
        let city_pick =
            WeightedIndex::new(CITIES.iter().map(|c| c.population_k)).expect("positive weights");
        let homes: Vec<usize> = (0..shape.users.max(1))
            .map(|_| city_pick.sample(&mut rng))
            .collect();
        let mut people = StdRng::seed_from_u64(seed ^ 0x7065_6f70_6c65); // "people"
        let segment_pick =
            WeightedIndex::new(SEGMENTS.iter().map(|s| s.1)).expect("positive weights");
        let segments = homes
            .iter()
            .map(|_| segment_pick.sample(&mut people))
            .collect();
        let signed_up = homes
            .iter()
            .map(|_| {
                DateTime::from_timestamp(SIGNUPS_END - people.random_range(0..2 * 365 * 86_400), 0)
                    .expect("in range")
            })
            .collect();
        let quantities =
            WeightedIndex::new(QUANTITIES.iter().map(|q| q.1)).expect("positive weights");
        let basket_lines =
            WeightedIndex::new(BASKET_LINES.iter().map(|b| b.1)).expect("positive weights");
        let currencies = CITIES
            .iter()
            .map(|c| c.currency.parse().expect("listed currency"))
            .collect();
        Shop {
            rng,
            shape,
            products,
            popularity,
            moves: vec![Vec::new(); homes.len()],
            homes,
            segments,
            signed_up,
            city_pick,
            people,
            quantities,
            basket_lines,
            currencies,
            corrections,
        }
    }

    /// Whether `order` will be refunded or cancelled, and how: about
    /// [`REFUND_SHARE`] of orders get a refund (a whole line, some units of one, or
    /// part of its amount), about [`CANCEL_SHARE`] a cancellation, 5 minutes to 30
    /// days after the order.
    pub fn correction_for(&mut self, order: &Order) -> Option<Correction> {
        let rng = &mut self.corrections;
        let roll: f64 = rng.random();
        if roll >= REFUND_SHARE + CANCEL_SHARE {
            return None;
        }
        let (low, high) = CORRECTION_DELAY_MINUTES;
        let minutes = rng.random_range(low.ln()..high.ln()).exp();
        let at = (order.created_at + TimeDelta::seconds((minutes * 60.0) as i64)).trunc_subsecs(6);
        let refund = (roll < REFUND_SHARE).then(|| {
            let line = &order.lines[rng.random_range(0..order.lines.len())];
            let item = match rng.random_range(0..3) {
                0 => RefundItem::Units {
                    product_id: line.product_id.clone(),
                    quantity: line.quantity,
                },
                1 => RefundItem::Units {
                    product_id: line.product_id.clone(),
                    quantity: rng.random_range(1..=line.quantity),
                },
                _ => RefundItem::Amount {
                    product_id: line.product_id.clone(),
                    amount_minor: rng.random_range(1..=line.revenue_minor().max(1)),
                },
            };
            RefundRequest {
                refund_id: Uuid::from_u128(rng.random::<u128>() | 1),
                created_at: at,
                items: vec![item],
            }
        });
        Some(Correction {
            order_id: order.order_id,
            currency: order.currency,
            at,
            refund,
        })
    }

    /// Every customer's first version: home city, segment, effective from sign-up.
    pub fn profiles(&self) -> Vec<Profile> {
        (0..self.homes.len())
            .map(|user| self.profile(user, self.homes[user], self.signed_up[user]))
            .collect()
    }

    fn profile(&self, user: usize, home: usize, at: DateTime<Utc>) -> Profile {
        Profile {
            user_id: user_id(user),
            city: CITIES[home].name.to_owned(),
            segment: SEGMENTS[self.segments[user]].0.to_owned(),
            signed_up_at: self.signed_up[user],
            effective_at: at,
        }
    }

    /// Customers who move to another city in `[from, to)`: about
    /// [`MOVES_PER_MONTH`] of them per 30 days, each at a random moment. Their
    /// orders from then on are placed from the new home; the returned versions say
    /// so to ingest.
    pub fn moves_between(&mut self, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<Profile> {
        let span = (to - from).num_seconds();
        if span <= 0 {
            return Vec::new();
        }
        let expected = self.homes.len() as f64 * MOVES_PER_MONTH * span as f64 / (30.0 * 86_400.0);
        let mut count = expected.floor() as usize;
        if self.people.random::<f64>() < expected.fract() {
            count += 1;
        }
        let mut moved = Vec::with_capacity(count);
        for _ in 0..count {
            let user = self.people.random_range(0..self.homes.len());
            let at = from + TimeDelta::seconds(self.people.random_range(0..span));
            let before = self.home_at(user, at);
            let home = loop {
                let city = self.city_pick.sample(&mut self.people);
                if city != before {
                    break city;
                }
            };
            let moves = &mut self.moves[user];
            let place = moves.partition_point(|(t, _)| *t <= at);
            moves.insert(place, (at, home));
            moved.push(self.profile(user, home, at));
        }
        moved.sort_by_key(|p| p.effective_at);
        moved
    }

    /// The home of `user` at `at`.
    fn home_at(&self, user: usize, at: DateTime<Utc>) -> usize {
        let moves = &self.moves[user];
        match moves.partition_point(|(t, _)| *t <= at) {
            0 => self.homes[user],
            n => moves[n - 1].1,
        }
    }

    /// An order placed at about `now`: usually at `now`, sometimes late.
    pub fn live_order(&mut self, now: DateTime<Utc>) -> Order {
        let at = if self.rng.random_bool(self.shape.late_share.clamp(0.0, 1.0)) {
            now - TimeDelta::seconds(self.rng.random_range(60..7_200))
        } else {
            now
        };
        self.order_at(at)
    }

    /// An order at a time drawn from `[from, to)` following the daily rhythm of the
    /// buyer's city.
    pub fn historic_order(&mut self, from: DateTime<Utc>, to: DateTime<Utc>) -> Order {
        let span = (to - from).num_seconds().max(1);
        loop {
            let at = from + TimeDelta::seconds(self.rng.random_range(0..span));
            if let Some(user) = self.awake_user(at) {
                return self.order_for(user, at);
            }
        }
    }

    /// An order at `at` by a user who is likely awake then.
    fn order_at(&mut self, at: DateTime<Utc>) -> Order {
        loop {
            if let Some(user) = self.awake_user(at) {
                return self.order_for(user, at);
            }
        }
    }

    /// A random user, kept with the probability of the daily rhythm of their city
    /// at `at` (rejection sampling).
    fn awake_user(&mut self, at: DateTime<Utc>) -> Option<usize> {
        let user = self.rng.random_range(0..self.homes.len());
        (self.rng.random::<f64>() < rhythm(self.home_at(user, at), at)).then_some(user)
    }

    fn order_for(&mut self, user: usize, at: DateTime<Utc>) -> Order {
        let mut home = self.home_at(user, at);
        if self.rng.random_bool(AWAY_SHARE) {
            home = self.city_pick.sample(&mut self.rng);
        }
        let spec = &CITIES[home];
        let currency = self.currencies[home];
        let order_id = Uuid::from_u128(self.rng.random::<u128>() | 1);
        let wanted = BASKET_LINES[self.basket_lines.sample(&mut self.rng)].0;
        let mut picked: Vec<usize> = Vec::with_capacity(wanted);
        // Distinct products (a few tries; a tiny catalogue may give fewer lines).
        for _ in 0..wanted * 4 {
            let product = self.popularity.sample(&mut self.rng);
            if !picked.contains(&product) {
                picked.push(product);
            }
            if picked.len() == wanted {
                break;
            }
        }
        let lines = picked
            .into_iter()
            .map(|p| {
                let product = &self.products[p];
                OrderLine {
                    product_id: product.id.clone(),
                    category: product.category.to_owned(),
                    quantity: QUANTITIES[self.quantities.sample(&mut self.rng)].0,
                    unit_price_minor: local_price(
                        product.price_euro_cents,
                        spec.per_euro_cent,
                        currency,
                    ),
                }
            })
            .collect();
        Order {
            order_id,
            user_id: user_id(user),
            city: spec.name.to_owned(),
            currency,
            created_at: at.trunc_subsecs(6),
            lines,
        }
    }
}

fn user_id(user: usize) -> String {
    format!("user-{user:06}")
}

/// The daily rhythm at `at` in the local time of city `home`, in (0, 1].
fn rhythm(home: usize, at: DateTime<Utc>) -> f64 {
    let local = at + TimeDelta::minutes(CITIES[home].utc_offset_minutes);
    DAILY_RHYTHM[local.hour() as usize]
}

/// A euro price converted and rounded the way shops price: to whole units ending
/// in .99 for currencies with minor units (.990 with three decimals), to tens for
/// those without.
fn local_price(euro_cents: i64, per_euro_cent: f64, currency: Currency) -> i64 {
    let minor = (euro_cents as f64 * per_euro_cent).round() as i64;
    let exponent = u32::from(currency.exponent());
    if exponent == 0 {
        return (minor / 10).max(1) * 10;
    }
    let unit = 10_i64.pow(exponent);
    ((minor + unit / 2) / unit).max(1) * unit - unit / 100
}

/// Demo exchange rates in the ECB reference-rate CSV format (`Date,JPY,INR,…`,
/// units per euro, newest day first as the ECB writes them) for weekdays from
/// `first` to `last`: each currency of the shop's cities near the rate its prices
/// are converted at, drifting by a seeded random walk (±0.3 % a day). Weekends
/// have no row, as in the ECB's files: conversion takes Friday's rate.
pub fn fx_rates_csv(first: chrono::NaiveDate, last: chrono::NaiveDate, seed: u64) -> String {
    use chrono::Datelike;
    let mut currencies: Vec<(&str, f64, u8)> = Vec::new();
    for city in CITIES {
        let currency: Currency = city.currency.parse().expect("listed currency");
        if city.currency != "EUR" && !currencies.iter().any(|(c, _, _)| *c == city.currency) {
            // Minor units per euro cent → units per euro.
            let per_euro = city.per_euro_cent * 100.0 / 10_f64.powi(i32::from(currency.exponent()));
            currencies.push((city.currency, per_euro, currency.exponent()));
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut rows = Vec::new();
    let mut level: Vec<f64> = currencies.iter().map(|(_, r, _)| *r).collect();
    let mut day = first;
    while day <= last {
        for l in &mut level {
            *l *= 1.0 + rng.random_range(-0.003..0.003);
        }
        if day.weekday().num_days_from_monday() < 5 {
            let rates: Vec<String> = level
                .iter()
                .map(|r| {
                    // Five significant digits, as the ECB publishes.
                    let decimals = (4 - r.log10().floor() as i32).clamp(0, 6) as usize;
                    format!("{r:.decimals$}")
                })
                .collect();
            rows.push(format!("{day},{},", rates.join(",")));
        }
        let Some(next) = day.succ_opt() else { break };
        day = next;
    }
    rows.reverse();
    let header: Vec<&str> = currencies.iter().map(|(c, _, _)| *c).collect();
    format!("Date,{},\n{}\n", header.join(","), rows.join("\n"))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use chrono::Timelike;
    use tidemark_domain::order::OrderLimits;

    fn t0() -> DateTime<Utc> {
        "2026-11-20T00:00:00Z".parse().unwrap()
    }

    #[test]
    fn the_same_seed_gives_the_same_orders() {
        let a: Vec<Order> = {
            let mut shop = Shop::new(7, Shape::default());
            (0..200)
                .map(|_| shop.historic_order(t0(), t0() + TimeDelta::days(1)))
                .collect()
        };
        let mut shop = Shop::new(7, Shape::default());
        let b: Vec<Order> = (0..200)
            .map(|_| shop.historic_order(t0(), t0() + TimeDelta::days(1)))
            .collect();
        assert_eq!(a, b);
        let mut other = Shop::new(8, Shape::default());
        assert_ne!(a[0], other.historic_order(t0(), t0() + TimeDelta::days(1)));
    }

    #[test]
    fn orders_are_valid_and_priced_in_the_city_currency() {
        let mut shop = Shop::new(1, Shape::default());
        let limits = OrderLimits::default();
        let mut lines = [0_u32; 5];
        for _ in 0..5_000 {
            let o = shop.live_order(Utc::now());
            o.validate(Utc::now(), &limits).expect("valid order");
            let spec = CITIES.iter().find(|c| c.name == o.city).unwrap();
            assert_eq!(o.currency.as_str(), spec.currency);
            assert!(o.lines.iter().all(|l| l.unit_price_minor > 0));
            lines[o.lines.len()] += 1;
        }
        // Mostly one product; baskets of two to four now and then.
        assert!(
            lines[1] > 3_000 && lines[2] > 500 && lines[4] > 30,
            "{lines:?}"
        );
    }

    #[test]
    fn popularity_and_city_sizes_are_skewed() {
        let mut shop = Shop::new(3, Shape::default());
        let mut products: HashMap<String, u32> = HashMap::new();
        let mut cities: HashMap<String, u32> = HashMap::new();
        for _ in 0..20_000 {
            let o = shop.historic_order(t0(), t0() + TimeDelta::days(7));
            for line in o.lines {
                *products.entry(line.product_id).or_default() += 1;
            }
            *cities.entry(o.city).or_default() += 1;
        }
        let mut counts: Vec<u32> = products.into_values().collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        // Zipf: the best seller sells far more than the 50th.
        assert!(counts[0] > 10 * counts[49], "{:?}", &counts[..50]);
        assert!(cities["Tokyo"] > 10 * cities["Zürich"], "{cities:?}");
    }

    #[test]
    fn history_follows_the_daily_rhythm() {
        let mut shop = Shop::new(4, Shape::default());
        let mut berlin_by_hour = [0u32; 24];
        for _ in 0..40_000 {
            let o = shop.historic_order(t0(), t0() + TimeDelta::days(7));
            if o.city == "Berlin" {
                berlin_by_hour[((o.created_at.hour() + 1) % 24) as usize] += 1;
            }
        }
        // Local 20:00 is the peak; 03:00–04:00 the trough.
        assert!(
            berlin_by_hour[20] > 5 * berlin_by_hour[3],
            "{berlin_by_hour:?}"
        );
    }

    #[test]
    fn about_five_percent_of_orders_are_corrected_later_and_never_beyond_them() {
        let mut shop = Shop::new(7, Shape::default());
        let orders: Vec<Order> = (0..20_000).map(|_| shop.live_order(t0())).collect();
        let corrections: Vec<Correction> = orders
            .iter()
            .filter_map(|o| shop.correction_for(o))
            .collect();
        let refunds = corrections.iter().filter(|c| c.refund.is_some()).count();
        let cancels = corrections.len() - refunds;
        assert!((450..750).contains(&refunds), "{refunds} refunds of 20,000");
        assert!(
            (280..520).contains(&cancels),
            "{cancels} cancellations of 20,000"
        );
        for (c, order) in corrections
            .iter()
            .filter_map(|c| Some((c, orders.iter().find(|o| o.order_id == c.order_id)?)))
        {
            let delay = c.at - order.created_at;
            assert!(delay >= TimeDelta::minutes(5) && delay <= TimeDelta::days(30));
            if let Some(refund) = &c.refund {
                // What the domain would accept: nothing given back yet.
                assert!(tidemark_domain::adjustment::plan_refund(order, &[], refund).is_ok());
            }
        }
        // The orders themselves are the same with or without corrections drawn.
        let mut plain = Shop::new(7, Shape::default());
        assert_eq!(plain.live_order(t0()), orders[0]);
    }

    #[test]
    fn about_one_percent_of_customers_move_a_month_and_order_from_their_home() {
        let mut shop = Shop::new(11, Shape::default());
        let profiles = shop.profiles();
        assert_eq!(profiles.len(), 20_000);
        let signups_end = DateTime::from_timestamp(SIGNUPS_END, 0).unwrap();
        assert!(
            profiles
                .iter()
                .all(|p| p.effective_at == p.signed_up_at && p.signed_up_at <= signups_end)
        );
        let to = Utc::now();
        let from = to - TimeDelta::days(90);
        let moves = shop.moves_between(from, to);
        // 20,000 × 1 % × 3 months = 600 expected.
        assert!((500..=700).contains(&moves.len()), "{}", moves.len());
        assert!(moves.iter().all(|m| (from..to).contains(&m.effective_at)));
        let moved: std::collections::HashMap<&str, &Profile> =
            moves.iter().map(|m| (m.user_id.as_str(), m)).collect();
        // Orders after a move come from the new home, but for those placed away.
        let (mut after, mut at_new_home) = (0_usize, 0_usize);
        for _ in 0..400_000 {
            let order = shop.historic_order(from, to);
            if let Some(m) = moved.get(order.user_id.as_str())
                && order.created_at > m.effective_at
                && moves
                    .iter()
                    .filter(|o| o.user_id == m.user_id)
                    .all(|o| o.effective_at <= m.effective_at)
            {
                after += 1;
                at_new_home += usize::from(order.city == m.city);
            }
        }
        assert!(after > 300, "{after}");
        let share = at_new_home as f64 / after as f64;
        assert!(share > 0.88 && share < 0.99, "{share}");
    }

    #[test]
    fn prices_end_like_shop_prices() {
        let eur: Currency = "EUR".parse().unwrap();
        let jpy: Currency = "JPY".parse().unwrap();
        assert_eq!(local_price(1_249, 1.0, eur), 1_199);
        assert_eq!(local_price(1_250, 1.0, eur), 1_299);
        assert_eq!(local_price(10, 1.0, eur), 99);
        assert_eq!(local_price(1_249, 1.6, jpy), 1_990);
        let kwd: Currency = "KWD".parse().unwrap();
        assert_eq!(local_price(1_249, 3.3, kwd), 3_990, "3.990 KWD");
        let rub: Currency = "RUB".parse().unwrap();
        assert_eq!(local_price(1_249, 100.0, rub), 124_899, "1248.99 RUB");
    }

    #[test]
    fn demo_rates_are_a_loadable_ecb_file_of_weekdays() {
        let first = chrono::NaiveDate::from_ymd_opt(2026, 11, 2).unwrap();
        let last = chrono::NaiveDate::from_ymd_opt(2026, 11, 15).unwrap();
        let csv = fx_rates_csv(first, last, 1);
        let file = tidemark_domain::fx::parse_ecb_csv(&csv).unwrap();
        assert!(file.ignored_columns.is_empty());
        let days: std::collections::BTreeSet<_> = file.rates.iter().map(|(d, _, _)| *d).collect();
        assert_eq!(days.len(), 10, "two weeks of weekdays");
        assert_eq!(csv, fx_rates_csv(first, last, 1), "seeded");
    }
}
