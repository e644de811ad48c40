//! The speed view against a real Redis: what is applied is read back, hours and
//! days are sums of minutes, the cursor guards every write, and a reset or an
//! epoch drop touches only what it names.

use std::sync::Arc;

use chrono::{TimeZone, Utc};
use tidemark_domain::{
    AdjustedLine, Adjustment, AdjustmentEvent, AdjustmentKind, Basis, Currency, Dimension, Event,
    Granularity, LogPosition, Order, OrderLine, Totals,
};
use tidemark_platform::redis::Redis;
use tidemark_speedview::{Applied, Delta, SpeedView};
use uuid::Uuid;

fn view(config: &tidemark_platform::config::RedisConfig) -> SpeedView {
    SpeedView::new(Arc::new(Redis::new(config).unwrap()))
}

fn order(
    n: u128,
    minute: u32,
    city: &str,
    product: &str,
    currency: &str,
    quantity: i32,
    price: i64,
) -> Order {
    Order {
        order_id: Uuid::from_u128(n),
        user_id: "u".into(),
        city: city.into(),
        currency: currency.parse().unwrap(),
        created_at: Utc.with_ymd_and_hms(2026, 11, 29, 10, minute, 30).unwrap(),
        lines: vec![OrderLine {
            product_id: product.into(),
            category: "books".into(),
            quantity,
            unit_price_minor: price,
        }],
    }
}

fn cell(read: &tidemark_speedview::Snapshot, bucket: i64, value: &str, currency: &str) -> Totals {
    let currency: Currency = currency.parse().unwrap();
    read.total()
        .get(&(bucket, value.to_owned(), currency))
        .copied()
        .unwrap_or_default()
}

#[tokio::test]
async fn applied_orders_read_back_by_minute_hour_and_day_and_epoch() {
    let config = tidemark_testkit::redis();
    let view = view(&config);
    assert_eq!(view.meta().await.unwrap(), None, "a new view has no cursor");
    assert_eq!(
        view.reset(LogPosition::ZERO, 0, 1, 0).await.unwrap(),
        Applied::Done
    );
    let mut delta = Delta::default();
    delta.add(
        0,
        &Event::Order(order(1, 1, "Zürich", "p:1:2", "KWD", 2, 1_299)),
    );
    delta.add(
        0,
        &Event::Order(order(2, 1, "Zürich", "p:1:2", "KWD", 1, 1_000)),
    );
    delta.add(1, &Event::Order(order(3, 59, "Oslo", "p-2", "JPY", 3, 500)));
    assert_eq!(delta.rows(), 3);
    let to = LogPosition::new(10, 3);
    assert_eq!(
        view.apply(LogPosition::ZERO, to, 2, 0, &delta)
            .await
            .unwrap(),
        Applied::Done
    );
    assert_eq!(view.meta().await.unwrap().unwrap().cursor, to);
    assert_eq!(view.epochs().await.unwrap(), [0, 1]);

    let ten = Utc
        .with_ymd_and_hms(2026, 11, 29, 10, 0, 0)
        .unwrap()
        .timestamp();
    let day = Utc
        .with_ymd_and_hms(2026, 11, 29, 0, 0, 0)
        .unwrap()
        .timestamp();
    let minutes = view
        .read(0, Granularity::Minute, Dimension::Product, ten, ten + 3_600)
        .await
        .unwrap();
    assert_eq!(minutes.epochs.len(), 2);
    // A product id with colons survives the field encoding.
    let kwd = cell(&minutes, ten + 60, "p:1:2", "KWD");
    assert_eq!((kwd.revenue_minor, kwd.orders, kwd.items), (3_598, 2, 3));
    let hours = view
        .read(0, Granularity::Hour, Dimension::City, ten, ten + 3_600)
        .await
        .unwrap();
    let zurich = cell(&hours, ten, "Zürich", "KWD");
    assert_eq!((zurich.revenue_minor, zurich.orders), (3_598, 2));
    let days = view
        .read(0, Granularity::Day, Dimension::Total, day, day + 86_400)
        .await
        .unwrap();
    assert_eq!(cell(&days, day, "", "JPY").revenue_minor, 1_500);
    // Epochs below `min_epoch` are left out; the range bounds minute buckets.
    let later = view
        .read(1, Granularity::Day, Dimension::Total, day, day + 86_400)
        .await
        .unwrap();
    assert_eq!(later.epochs.keys().copied().collect::<Vec<_>>(), [1]);
    assert_eq!(cell(&later, day, "", "KWD").orders, 0);
    let outside = view
        .read(
            0,
            Granularity::Minute,
            Dimension::Total,
            ten + 120,
            ten + 3_540,
        )
        .await
        .unwrap();
    assert!(outside.total().is_empty(), "{outside:?}");
}

/// An answer's revenue and its buyers come from one read, exact at one cursor: the
/// cells are those `read` gives, the users those of each minute and value.
#[tokio::test]
async fn cells_and_buyers_are_read_at_one_cursor() {
    let config = tidemark_testkit::redis();
    let view = view(&config);
    view.reset(LogPosition::ZERO, 0, 1, 0).await.unwrap();
    let by = |mut o: Order, user: &str| {
        o.user_id = user.into();
        Event::Order(o)
    };
    let mut delta = Delta::default();
    delta.add(
        0,
        &by(order(1, 1, "Zürich", "p:1:2", "KWD", 2, 1_299), "u1"),
    );
    delta.add(
        0,
        &by(order(2, 1, "Zürich", "p:1:2", "KWD", 1, 1_000), "u2"),
    );
    delta.add(0, &by(order(3, 59, "Oslo", "p-2", "JPY", 3, 500), "u1"));
    let to = LogPosition::new(10, 3);
    view.apply(LogPosition::ZERO, to, 2, 0, &delta)
        .await
        .unwrap();
    let ten = Utc
        .with_ymd_and_hms(2026, 11, 29, 10, 0, 0)
        .unwrap()
        .timestamp();
    for dimension in [Dimension::Total, Dimension::City, Dimension::Product] {
        let (together, mut buyers) = view
            .read_with_buyers(0, Granularity::Hour, dimension, ten, ten + 3_600)
            .await
            .unwrap();
        let apart = view
            .read(0, Granularity::Hour, dimension, ten, ten + 3_600)
            .await
            .unwrap();
        assert_eq!(together.meta.unwrap().cursor, to);
        assert_eq!(together.total(), apart.total(), "{dimension:?}");
        buyers.sort();
        let buyer = |minute: i64, city: &str, product: &str, currency: &str, user: &str| {
            tidemark_speedview::Buyer {
                minute: ten + minute * 60,
                city: city.into(),
                category: "books".into(),
                product: product.into(),
                currency: currency.parse().unwrap(),
                user_id: user.into(),
            }
        };
        let mut expected = vec![
            buyer(1, "Zürich", "p:1:2", "KWD", "u1"),
            buyer(1, "Zürich", "p:1:2", "KWD", "u2"),
            buyer(59, "Oslo", "p-2", "JPY", "u1"),
        ];
        expected.sort();
        assert_eq!(buyers, expected, "{dimension:?}");
    }
    // Outside the range: neither cells nor users.
    let (cells, buyers) = view
        .read_with_buyers(
            0,
            Granularity::Minute,
            Dimension::City,
            ten + 120,
            ten + 3_540,
        )
        .await
        .unwrap();
    assert!(cells.total().is_empty() && buyers.is_empty());
}

#[tokio::test]
async fn a_basket_counts_once_per_value_and_sums_its_lines() {
    let config = tidemark_testkit::redis();
    let view = view(&config);
    assert_eq!(
        view.reset(LogPosition::ZERO, 0, 1, 0).await.unwrap(),
        Applied::Done
    );
    let mut basket = order(1, 5, "Oslo", "p-1", "EUR", 2, 100);
    basket.lines.push(OrderLine {
        product_id: "p-2".into(),
        category: "books".into(),
        quantity: 1,
        unit_price_minor: 1_000,
    });
    basket.lines.push(OrderLine {
        product_id: "p-3".into(),
        category: "games".into(),
        quantity: 3,
        unit_price_minor: 10,
    });
    let mut delta = Delta::default();
    delta.add(0, &Event::Order(basket.clone()));
    assert_eq!(
        view.apply(LogPosition::ZERO, LogPosition::new(3, 1), 1, 0, &delta)
            .await
            .unwrap(),
        Applied::Done
    );
    let day = Utc
        .with_ymd_and_hms(2026, 11, 29, 0, 0, 0)
        .unwrap()
        .timestamp();
    let read = async |d| {
        view.read(0, Granularity::Day, d, day, day + 86_400)
            .await
            .unwrap()
    };
    let total = cell(&read(Dimension::Total).await, day, "", "EUR");
    assert_eq!(
        (total.revenue_minor, total.orders, total.items),
        (1_230, 1, 6)
    );
    let by_category = read(Dimension::Category).await;
    let books = cell(&by_category, day, "books", "EUR");
    assert_eq!(
        (books.revenue_minor, books.orders, books.items),
        (1_200, 1, 3)
    );
    assert_eq!(cell(&by_category, day, "games", "EUR").orders, 1);
    let by_product = read(Dimension::Product).await;
    assert_eq!(cell(&by_product, day, "p-2", "EUR").revenue_minor, 1_000);
}

#[tokio::test]
async fn the_cursor_guards_every_apply() {
    let config = tidemark_testkit::redis();
    let view = view(&config);
    let mut delta = Delta::default();
    delta.add(0, &Event::Order(order(1, 1, "Oslo", "p", "EUR", 1, 100)));
    let at = LogPosition::new(5, 1);
    assert_eq!(
        view.apply(LogPosition::ZERO, at, 1, 0, &delta)
            .await
            .unwrap(),
        Applied::Lost,
        "no cursor: the view was lost, nothing is written"
    );
    assert!(view.epochs().await.unwrap().is_empty());
    assert_eq!(
        view.reset(LogPosition::ZERO, 0, 1, 0).await.unwrap(),
        Applied::Done
    );
    assert_eq!(
        view.reset(LogPosition::ZERO, 0, 1, 0).await.unwrap(),
        Applied::Moved,
        "started once"
    );
    assert_eq!(
        view.apply(LogPosition::ZERO, at, 1, 0, &delta)
            .await
            .unwrap(),
        Applied::Done
    );
    assert_eq!(
        view.apply(LogPosition::ZERO, LogPosition::new(6, 1), 1, 0, &delta)
            .await
            .unwrap(),
        Applied::Moved,
        "a second consumer applying the same step finds the cursor moved"
    );
    let day = Utc
        .with_ymd_and_hms(2026, 11, 29, 0, 0, 0)
        .unwrap()
        .timestamp();
    let read = view
        .read(0, Granularity::Day, Dimension::Total, day, day + 86_400)
        .await
        .unwrap();
    assert_eq!(
        cell(&read, day, "", "EUR").orders,
        1,
        "applied exactly once"
    );
}

#[tokio::test]
async fn a_former_leaders_late_apply_is_refused_by_the_fence() {
    let redis = tidemark_testkit::redis();
    let view = view(&redis);
    let mut delta = Delta::default();
    delta.add(0, &Event::Order(order(1, 1, "Oslo", "p", "EUR", 1, 100)));
    // Leader 1 starts the view and applies a batch.
    assert_eq!(
        view.reset(LogPosition::ZERO, 0, 1, 1).await.unwrap(),
        Applied::Done
    );
    let first = LogPosition::new(5, 1);
    assert_eq!(
        view.apply(LogPosition::ZERO, first, 1, 1, &delta)
            .await
            .unwrap(),
        Applied::Done
    );
    // Leader 1 reads its next batch, then is paused; leader 2 takes over and
    // raises the fence before writing anything.
    assert_eq!(view.raise_fence(2).await.unwrap(), Applied::Done);
    // Leader 1 wakes up: its apply would find the cursor where it left it, but the
    // fence refuses it, and so it does a rebuild or a raise.
    let second = LogPosition::new(6, 1);
    assert_eq!(
        view.apply(first, second, 2, 1, &delta).await.unwrap(),
        Applied::Fenced(2)
    );
    assert_eq!(
        view.reset(LogPosition::ZERO, 0, 3, 1).await.unwrap(),
        Applied::Fenced(2)
    );
    assert_eq!(view.raise_fence(1).await.unwrap(), Applied::Fenced(2));
    assert_eq!(
        view.meta().await.unwrap().unwrap().cursor,
        first,
        "nothing moved"
    );
    // An unfenced writer (token 0) is refused too once a leader has written.
    assert_eq!(
        view.apply(first, second, 2, 0, &delta).await.unwrap(),
        Applied::Fenced(2)
    );
    // Leader 2 applies from the same cursor: exactly once.
    assert_eq!(
        view.apply(first, second, 2, 2, &delta).await.unwrap(),
        Applied::Done
    );
    let day = Utc
        .with_ymd_and_hms(2026, 11, 29, 0, 0, 0)
        .unwrap()
        .timestamp();
    let read = view
        .read(0, Granularity::Day, Dimension::Total, day, day + 86_400)
        .await
        .unwrap();
    assert_eq!(
        cell(&read, day, "", "EUR").orders,
        2,
        "one order per applied batch"
    );
}

#[tokio::test]
async fn reset_and_drop_epoch_touch_only_what_they_name() {
    let (a, b) = (tidemark_testkit::redis(), tidemark_testkit::redis());
    let (va, vb) = (view(&a), view(&b));
    for v in [&va, &vb] {
        assert_eq!(
            v.reset(LogPosition::ZERO, 0, 1, 0).await.unwrap(),
            Applied::Done
        );
        let mut delta = Delta::default();
        delta.add(0, &Event::Order(order(1, 1, "Oslo", "p", "EUR", 1, 100)));
        delta.add(1, &Event::Order(order(2, 1, "Oslo", "p", "EUR", 1, 100)));
        delta.add(2, &Event::Order(order(3, 1, "Oslo", "p", "EUR", 1, 100)));
        assert_eq!(
            v.apply(LogPosition::ZERO, LogPosition::new(9, 3), 1, 0, &delta)
                .await
                .unwrap(),
            Applied::Done
        );
    }
    va.drop_epoch(1).await.unwrap();
    assert_eq!(va.epochs().await.unwrap(), [0, 2]);
    assert_eq!(
        vb.epochs().await.unwrap(),
        [0, 1, 2],
        "another prefix is untouched"
    );
    let day = Utc
        .with_ymd_and_hms(2026, 11, 29, 0, 0, 0)
        .unwrap()
        .timestamp();
    let orders = async |v: &SpeedView| {
        let read = v
            .read(0, Granularity::Day, Dimension::Total, day, day + 86_400)
            .await
            .unwrap();
        cell(&read, day, "", "EUR").orders
    };
    assert_eq!(orders(&va).await, 2);

    // A reset after a loss clears the leftovers of its own prefix, starting over.
    redis::cmd("DEL")
        .arg(format!("{}:meta", a.key_prefix))
        .exec_async(&mut Redis::new(&a).unwrap().conn().await.unwrap())
        .await
        .unwrap();
    assert_eq!(va.meta().await.unwrap(), None);
    let from = LogPosition::before_txid(42);
    assert_eq!(va.reset(from, 3, 5, 0).await.unwrap(), Applied::Done);
    assert!(va.epochs().await.unwrap().is_empty());
    assert_eq!(orders(&va).await, 0);
    assert_eq!(va.meta().await.unwrap().unwrap().cursor, from);
    assert_eq!(orders(&vb).await, 3);
}

#[tokio::test]
async fn a_refund_reads_back_booked_at_its_time_and_restated_at_its_order() {
    let config = tidemark_testkit::redis();
    let view = view(&config);
    assert_eq!(
        view.reset(LogPosition::ZERO, 0, 1, 0).await.unwrap(),
        Applied::Done
    );
    let old = order(1, 1, "Oslo", "p:1", "EUR", 3, 1_000);
    let refund = Event::Adjustment(AdjustmentEvent {
        adjustment: Adjustment {
            adjustment_id: Uuid::from_u128(9),
            order_id: old.order_id,
            kind: AdjustmentKind::Cancellation,
            created_at: old.created_at + chrono::TimeDelta::days(2),
            lines: vec![AdjustedLine {
                line_no: 1,
                quantity: 3,
                amount_minor: 3_000,
            }],
        },
        order: old.clone(),
    });
    let mut delta = Delta::default();
    delta.add(0, &Event::Order(old.clone()));
    // The refund lands in a later epoch, as a correction committed after a cut does.
    delta.add(1, &refund);
    let applied = view.apply(LogPosition::ZERO, LogPosition::new(3, 2), 1, 0, &delta);
    assert_eq!(applied.await.unwrap(), Applied::Done);
    let day = |at: chrono::DateTime<Utc>| Granularity::Day.bucket_of_secs(at.timestamp());
    let (order_day, refund_day) = (day(old.created_at), day(refund.created_at()));
    let read = view
        .read(
            0,
            Granularity::Day,
            Dimension::Product,
            order_day,
            refund_day + 86_400,
        )
        .await
        .unwrap();
    let at_order = cell(&read, order_day, "p:1", "EUR");
    let at_refund = cell(&read, refund_day, "p:1", "EUR");
    assert_eq!((at_order.revenue_minor, at_order.orders), (3_000, 1));
    assert_eq!(at_order.net_revenue_minor(Basis::OrderTime), 0);
    assert_eq!(at_order.net_revenue_minor(Basis::BookingTime), 3_000);
    assert_eq!(at_order.restated.cancelled_orders, 1);
    assert_eq!(at_refund.booked.refunded_items, 3);
    assert_eq!(at_refund.booked.cancelled_orders, 1);
    assert_eq!(at_refund.net_revenue_minor(Basis::BookingTime), -3_000);
    assert_eq!(at_refund.orders, 0);
    // Only the later epoch holds the correction.
    let later = view
        .read(
            1,
            Granularity::Day,
            Dimension::Total,
            order_day,
            refund_day + 86_400,
        )
        .await
        .unwrap();
    let at_order = cell(&later, order_day, "", "EUR");
    assert_eq!(
        (at_order.revenue_minor, at_order.restated.refunded_minor),
        (0, 3_000)
    );
}

#[tokio::test]
async fn a_view_in_another_layout_reads_as_empty_until_rebuilt_and_drops_leave_no_keys() {
    let config = tidemark_testkit::redis();
    let view = view(&config);
    let p = &config.key_prefix;
    let mut conn = Redis::new(&config).unwrap().conn().await.unwrap();
    // What the first layout left: a cursor without `layout`, a field of every shape
    // in one hash per minute.
    redis::pipe()
        .hset_multiple(format!("{p}:meta"), &[("txid", "5"), ("seq", "1")])
        .hset(format!("{p}:e:0:minute:60"), "r:city:EUR:Oslo", 5)
        .zadd(format!("{p}:e:0:idx:minute"), 60, 60)
        .zadd(format!("{p}:epochs"), 0, 0)
        .exec_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(view.meta().await.unwrap(), None);
    let read = view
        .read(0, Granularity::Minute, Dimension::City, 0, 3_600)
        .await
        .unwrap();
    assert!(read.meta.is_none() && read.total().is_empty(), "{read:?}");
    let mut delta = Delta::default();
    delta.add(0, &Event::Order(order(1, 1, "Oslo", "p", "EUR", 1, 100)));
    assert_eq!(
        view.apply(LogPosition::new(5, 1), LogPosition::new(6, 1), 1, 0, &delta)
            .await
            .unwrap(),
        Applied::Lost,
        "the consumer must rebuild, not add to the old layout"
    );

    let keys = async |conn: &mut redis::aio::ConnectionManager, pattern: String| {
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(pattern)
            .query_async(conn)
            .await
            .unwrap();
        keys.sort();
        keys
    };
    assert_eq!(
        view.reset(LogPosition::ZERO, 0, 1, 0).await.unwrap(),
        Applied::Done
    );
    assert!(keys(&mut conn, format!("{p}:e:*")).await.is_empty());
    assert_eq!(
        view.reset(LogPosition::ZERO, 0, 1, 0).await.unwrap(),
        Applied::Moved,
        "started once"
    );

    delta.add(1, &Event::Order(order(2, 1, "Oslo", "p", "EUR", 1, 100)));
    let to = LogPosition::new(6, 2);
    assert_eq!(
        view.apply(LogPosition::ZERO, to, 2, 0, &delta)
            .await
            .unwrap(),
        Applied::Done
    );
    assert_eq!(view.meta().await.unwrap().unwrap().cursor, to);
    let minute = order(1, 1, "Oslo", "p", "EUR", 1, 100)
        .created_at
        .timestamp()
        / 60
        * 60;
    let shapes = |epoch: u64| {
        let mut keys: Vec<String> = ["buyers", "city", "city_category", "city_category_product"]
            .map(|s| format!("{p}:e:{epoch}:minute:{minute}:{s}"))
            .to_vec();
        keys.push(format!("{p}:e:{epoch}:idx:minute"));
        keys.sort();
        keys
    };
    assert_eq!(keys(&mut conn, format!("{p}:e:1:*")).await, shapes(1));
    view.drop_epoch(1).await.unwrap();
    assert!(keys(&mut conn, format!("{p}:e:1:*")).await.is_empty());
    assert_eq!(keys(&mut conn, format!("{p}:e:0:*")).await, shapes(0));
}

/// A tracked read brought up to date from the changes since equals a full read at
/// the same cursor, for every question shape, round after round of applies across
/// epochs, minutes in and out of its range, corrections and repeat buyers; and it
/// is read in full again when the view is rebuilt or has trimmed its changes.
#[tokio::test]
async fn a_tracked_read_brought_up_to_date_equals_a_full_read() {
    let config = tidemark_testkit::redis();
    let view = view(&config);
    view.reset(LogPosition::ZERO, 0, 1, 0).await.unwrap();
    let ten = Utc
        .with_ymd_and_hms(2026, 11, 29, 10, 0, 0)
        .unwrap()
        .timestamp();
    // Epochs from 1, the minutes of 10:00–10:59: what falls outside is left out.
    let questions = [
        (Granularity::Hour, Dimension::Category),
        (Granularity::Minute, Dimension::City),
        (Granularity::Day, Dimension::Total),
        (Granularity::Hour, Dimension::CityCategoryProduct),
    ];
    let mut tracked = Vec::new();
    for (granularity, dimension) in questions {
        let t = view
            .track(1, granularity, dimension, ten, ten + 3_600)
            .await
            .unwrap();
        assert!(t.cells().is_empty() && t.buyers().is_empty());
        tracked.push(t);
    }
    let full = async |t: &tidemark_speedview::Tracked, (granularity, dimension)| {
        let (snapshot, buyers) = view
            .read_with_buyers(1, granularity, dimension, ten, ten + 3_600)
            .await
            .unwrap();
        let buyers: std::collections::BTreeSet<_> = buyers.into_iter().collect();
        assert_eq!(t.meta(), snapshot.meta, "{dimension:?}");
        assert_eq!(
            **t.cells(),
            snapshot.total(),
            "{granularity:?} {dimension:?}"
        );
        assert_eq!(**t.buyers(), buyers, "{dimension:?}");
    };
    let cities = ["Oslo", "Zürich", "Rome"];
    let mut at = LogPosition::ZERO;
    let mut n = 0u128;
    for round in 0..6u32 {
        let mut delta = Delta::default();
        for k in 0..7u32 {
            n += 1;
            // Minute 61 is 11:01, outside the range; epoch 0 is below it.
            let minute = [1, 7, 30, 59, 61][(k + round) as usize % 5];
            let mut o = order(
                n,
                minute % 60,
                cities[(k as usize + round as usize) % 3],
                &format!("p:{}", k % 3),
                ["EUR", "JPY"][k as usize % 2],
                1 + k as i32 % 3,
                100 + i64::from(k),
            );
            if minute >= 60 {
                o.created_at += chrono::TimeDelta::hours(1);
            }
            o.user_id = format!("u{}", k % 4);
            let epoch = u64::from(k % 3);
            if round > 0 && k == 3 {
                // A correction of the first order, in the current epoch.
                let first = order(1, 1, "Oslo", "p:0", "EUR", 1, 100);
                delta.add(
                    epoch,
                    &Event::Adjustment(AdjustmentEvent {
                        adjustment: Adjustment {
                            adjustment_id: Uuid::from_u128(1_000 + u128::from(round)),
                            order_id: first.order_id,
                            kind: AdjustmentKind::Refund,
                            created_at: first.created_at + chrono::TimeDelta::minutes(20),
                            lines: vec![AdjustedLine {
                                line_no: 1,
                                quantity: 0,
                                amount_minor: 10,
                            }],
                        },
                        order: first,
                    }),
                );
            }
            delta.add(epoch, &Event::Order(o));
        }
        let to = LogPosition::new(u64::from(round) + 10, 1);
        assert_eq!(
            view.apply(at, to, 2, 0, &delta).await.unwrap(),
            Applied::Done
        );
        at = to;
        for (t, question) in tracked.iter_mut().zip(questions) {
            let how = view.refresh(t).await.unwrap();
            assert!(
                matches!(how, tidemark_speedview::Refreshed::Changes(n) if n > 0),
                "{how:?}"
            );
            full(t, question).await;
        }
    }
    // Nothing new: nothing to add.
    assert_eq!(
        view.refresh(&mut tracked[0]).await.unwrap(),
        tidemark_speedview::Refreshed::Changes(0)
    );

    // Changes trimmed past a tracked read's last: it is read in full.
    let mut conn = Redis::new(&config).unwrap().conn().await.unwrap();
    let meta = format!("{}:meta", config.key_prefix);
    redis::cmd("HSET")
        .arg(&meta)
        .arg("trimmed")
        .arg("99999999999999-0")
        .exec_async(&mut conn)
        .await
        .unwrap();
    let how = view.refresh(&mut tracked[0]).await.unwrap();
    assert_eq!(how, tidemark_speedview::Refreshed::Full);
    full(&tracked[0], questions[0]).await;

    // A view rebuilt after a loss is another generation: read in full.
    redis::cmd("DEL")
        .arg(&meta)
        .exec_async(&mut conn)
        .await
        .unwrap();
    let from = LogPosition::before_txid(42);
    assert_eq!(view.reset(from, 1, 5, 0).await.unwrap(), Applied::Done);
    let mut delta = Delta::default();
    delta.add(1, &Event::Order(order(500, 5, "Oslo", "p:9", "EUR", 1, 7)));
    let to = LogPosition::new(43, 1);
    assert_eq!(
        view.apply(from, to, 6, 0, &delta).await.unwrap(),
        Applied::Done
    );
    for (t, question) in tracked.iter_mut().zip(questions) {
        assert_eq!(
            view.refresh(t).await.unwrap(),
            tidemark_speedview::Refreshed::Full
        );
        full(t, question).await;
        assert_eq!(t.buyers().len(), 1, "only the rebuilt view's buyer");
    }
}

/// Each apply's changes stay readable for the time they are kept, then are trimmed.
#[tokio::test]
async fn changes_are_kept_for_their_time_and_then_trimmed() {
    let config = tidemark_testkit::redis();
    let view = view(&config).with_changes_kept_ms(0);
    view.reset(LogPosition::ZERO, 0, 1, 0).await.unwrap();
    let mut conn = Redis::new(&config).unwrap().conn().await.unwrap();
    let stream = format!("{}:changes", config.key_prefix);
    let mut at = LogPosition::ZERO;
    // Applies until the changes span more than one millisecond of Redis's clock;
    // an approximate trim frees whole nodes of the stream, 100 entries each.
    let mut ids = Vec::new();
    for n in 0..1_000u128 {
        let mut delta = Delta::default();
        delta.add(0, &Event::Order(order(n, 1, "Oslo", "p", "EUR", 1, 1)));
        let to = LogPosition::new(at.txid + 1, 1);
        assert_eq!(
            view.apply(at, to, 1, 0, &delta).await.unwrap(),
            Applied::Done
        );
        at = to;
        let (changed, trimmed): (String, Option<String>) = redis::cmd("HMGET")
            .arg(format!("{}:meta", config.key_prefix))
            .arg("changed")
            .arg("trimmed")
            .query_async(&mut conn)
            .await
            .unwrap();
        let ms = |id: &str| id.split('-').next().unwrap().parse::<u64>().unwrap();
        if let Some(trimmed) = trimmed {
            assert!(
                ms(&trimmed) < ms(&changed),
                "kept 0 ms: {trimmed} {changed}"
            );
            assert!(ids.contains(&trimmed), "the last change that may be gone");
        }
        ids.push(changed);
    }
    let len: usize = redis::cmd("XLEN")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .unwrap();
    let first_ms = ids[0].split('-').next().unwrap();
    let last_ms = ids[ids.len() - 1].split('-').next().unwrap();
    assert!(
        first_ms == last_ms || len < ids.len(),
        "{len} of {} changes kept from {first_ms} to {last_ms}",
        ids.len()
    );
}

/// After a failover to a replica that had not received the last apply, the speed
/// layer replays it on the new primary: a read tracked on the old primary already
/// holds it, so its refresh must not add the replayed changes again — the changes no
/// longer chain from its cursor, and it is read in full.
#[tokio::test]
async fn a_tracked_read_is_read_in_full_when_a_replayed_history_does_not_chain_from_it() {
    let config = tidemark_testkit::redis();
    let view = view(&config);
    view.reset(LogPosition::ZERO, 0, 1, 0).await.unwrap();
    let mut conn = Redis::new(&config).unwrap().conn().await.unwrap();
    let pattern = format!("{}:*", config.key_prefix);
    let delta = |n: u128| {
        let mut delta = Delta::default();
        delta.add(0, &Event::Order(order(n, 1, "Oslo", "p", "EUR", 1, 100)));
        delta
    };
    let (one, two, three) = (
        LogPosition::new(1, 1),
        LogPosition::new(2, 1),
        LogPosition::new(3, 1),
    );
    let applied = view.apply(LogPosition::ZERO, one, 1, 0, &delta(1)).await;
    assert_eq!(applied.unwrap(), Applied::Done);
    // What a replica one apply behind holds.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(&pattern)
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut replica = Vec::new();
    for key in keys {
        let dump: Vec<u8> = redis::cmd("DUMP")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        replica.push((key, dump));
    }
    assert_eq!(
        view.apply(one, two, 2, 0, &delta(2)).await.unwrap(),
        Applied::Done
    );
    let ten = Utc
        .with_ymd_and_hms(2026, 11, 29, 10, 0, 0)
        .unwrap()
        .timestamp();
    let question = (Granularity::Hour, Dimension::City);
    let mut tracked = view
        .track(0, question.0, question.1, ten, ten + 3_600)
        .await
        .unwrap();
    let orders =
        |t: &tidemark_speedview::Tracked| -> i64 { t.cells().values().map(|c| c.orders).sum() };
    assert_eq!(orders(&tracked), 2);

    // The failover: the view is the replica's, and the speed layer replays from there.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(&pattern)
        .query_async(&mut conn)
        .await
        .unwrap();
    redis::cmd("DEL")
        .arg(&keys)
        .exec_async(&mut conn)
        .await
        .unwrap();
    for (key, dump) in &replica {
        redis::cmd("RESTORE")
            .arg(key)
            .arg(0)
            .arg(dump)
            .exec_async(&mut conn)
            .await
            .unwrap();
    }
    assert_eq!(view.meta().await.unwrap().unwrap().cursor, one);
    assert_eq!(
        view.apply(one, two, 3, 0, &delta(2)).await.unwrap(),
        Applied::Done
    );
    assert_eq!(
        view.apply(two, three, 4, 0, &delta(3)).await.unwrap(),
        Applied::Done
    );
    assert_eq!(
        view.refresh(&mut tracked).await.unwrap(),
        tidemark_speedview::Refreshed::Full
    );
    assert_eq!(orders(&tracked), 3, "each order once");
    let (full, _) = view
        .read_with_buyers(0, question.0, question.1, ten, ten + 3_600)
        .await
        .unwrap();
    assert_eq!(**tracked.cells(), full.total());
    // From there on, changes chain again.
    assert_eq!(
        view.apply(three, LogPosition::new(4, 1), 5, 0, &delta(4))
            .await
            .unwrap(),
        Applied::Done
    );
    assert!(matches!(
        view.refresh(&mut tracked).await.unwrap(),
        tidemark_speedview::Refreshed::Changes(_)
    ));
    assert_eq!(orders(&tracked), 4);
}

/// A hash of thousands of fields applied at once reads back whole, and totals past
/// 2^53 stay exact: the apply script must not sum in Lua's numbers, doubles that
/// round there. (Summing in Lua where exact, with one HMGET and one HSET per hash
/// instead of a HINCRBY per field, was tried: no faster at 20,000 orders/s, and
/// this test fails when the sums past 2^53 go through the doubles.)
#[tokio::test]
async fn large_hashes_and_totals_past_two_to_the_53_apply_exactly() {
    let config = tidemark_testkit::redis();
    let view = view(&config);
    assert_eq!(
        view.reset(LogPosition::ZERO, 0, 1, 0).await.unwrap(),
        Applied::Done
    );
    // Odd, so the totals past 2^53 are not doubles.
    const PRICE: i64 = 99_999_999_999;
    const PRODUCTS: u128 = 1_500;
    let big = |n: u128| {
        order(
            n,
            5,
            "Oslo",
            &format!("p-{}", n % PRODUCTS),
            "EUR",
            1,
            PRICE,
        )
    };
    // 100,000 orders in one minute: 1,500 products (4,500 fields in one hash),
    // and Oslo's revenue ~10^16, past 2^53 within the first apply.
    let mut delta = Delta::default();
    for n in 0..100_000 {
        delta.add(0, &Event::Order(big(n)));
    }
    let first = LogPosition::new(3, 100_000);
    assert_eq!(
        view.apply(LogPosition::ZERO, first, 1, 0, &delta)
            .await
            .unwrap(),
        Applied::Done
    );
    // Then one more, onto a stored value past 2^53; and one small, onto a field
    // of its own.
    let mut delta = Delta::default();
    delta.add(0, &Event::Order(big(100_000)));
    delta.add(
        0,
        &Event::Order(order(100_001, 5, "Lima", "p-x", "EUR", 3, 7)),
    );
    assert_eq!(
        view.apply(first, LogPosition::new(4, 100_002), 1, 0, &delta)
            .await
            .unwrap(),
        Applied::Done
    );
    let minute = Utc
        .with_ymd_and_hms(2026, 11, 29, 10, 5, 0)
        .unwrap()
        .timestamp();
    let read = async |d| {
        view.read(0, Granularity::Minute, d, minute, minute + 60)
            .await
            .unwrap()
    };
    let by_city = read(Dimension::City).await;
    let oslo = cell(&by_city, minute, "Oslo", "EUR");
    assert!(oslo.revenue_minor > 1 << 53);
    assert_eq!(
        (oslo.revenue_minor, oslo.orders),
        (100_001 * PRICE, 100_001)
    );
    let lima = cell(&by_city, minute, "Lima", "EUR");
    assert_eq!((lima.revenue_minor, lima.orders, lima.items), (21, 1, 3));
    let by_product = read(Dimension::Product).await;
    for p in 0..PRODUCTS {
        // 100,001 orders over 1,500 products: p-0 to p-1000 have one more.
        let orders = 100_001 / PRODUCTS as i64 + i64::from(p < 100_001 % PRODUCTS);
        let cell = cell(&by_product, minute, &format!("p-{p}"), "EUR");
        assert_eq!(
            (cell.orders, cell.revenue_minor),
            (orders, orders * PRICE),
            "p-{p}"
        );
    }
}

/// One apply over more minutes than one `ZADD` of the script carries, in two
/// epochs: every minute is indexed and read back, and a read tracked from before
/// the apply adds its change (one packed value of 20,000 hashes) to equal a full read.
#[tokio::test]
async fn an_apply_over_thousands_of_minutes_indexes_and_tracks_every_one() {
    let config = tidemark_testkit::redis();
    let view = view(&config);
    assert_eq!(
        view.reset(LogPosition::ZERO, 0, 1, 0).await.unwrap(),
        Applied::Done
    );
    let start = Utc
        .with_ymd_and_hms(2026, 11, 1, 0, 0, 0)
        .unwrap()
        .timestamp();
    let minutes: i64 = 5_000;
    let mut tracked = view
        .track(
            0,
            Granularity::Minute,
            Dimension::City,
            start,
            start + minutes * 60,
        )
        .await
        .unwrap();
    let mut delta = Delta::default();
    for k in 0..minutes {
        let mut o = order(k as u128, 0, "Oslo", "p", "EUR", 1, 100 + k);
        o.created_at = Utc.timestamp_opt(start + k * 60 + 7, 0).unwrap();
        // 4,500 minutes in epoch 0 (more than Lua's `unpack` takes at once as
        // members of one `ZADD`), the rest in epoch 1.
        delta.add(u64::from(k >= 4_500), &Event::Order(o));
    }
    assert_eq!(
        view.apply(LogPosition::ZERO, LogPosition::new(9, 1), 1, 0, &delta)
            .await
            .unwrap(),
        Applied::Done
    );
    let full = view
        .read(
            0,
            Granularity::Minute,
            Dimension::City,
            start,
            start + minutes * 60,
        )
        .await
        .unwrap();
    assert_eq!(full.epochs.keys().copied().collect::<Vec<_>>(), [0, 1]);
    for k in 0..minutes {
        let cell = cell(&full, start + k * 60, "Oslo", "EUR");
        assert_eq!(
            (cell.orders, cell.revenue_minor),
            (1, 100 + k),
            "minute {k}"
        );
    }
    assert_eq!(
        view.refresh(&mut tracked).await.unwrap(),
        tidemark_speedview::Refreshed::Changes(6 * 5_000)
    );
    assert_eq!(**tracked.cells(), full.total());
}
