//! Group commit (issue 21): single orders of concurrent requests share one commit,
//! and each keeps its own outcome.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use rand::SeedableRng;
use rand::rngs::StdRng;
use uuid::Uuid;

use crate::{Harness, order_json, random_order};

/// A group closes when it holds `SIZE` orders; the long window makes sure the
/// requests sent together all land in one group.
const SIZE: usize = 21;

async fn grouped() -> Harness {
    Harness::with(|c| {
        c.relay.enabled = false;
        c.vault.enabled = false;
        let group = &mut c.ingest.group_commit;
        group.max_orders = SIZE;
        group.in_flight = 1;
        group.window = Duration::from_secs(30);
    })
    .await
}

/// Sends every body at once; the status of each, in order.
async fn send_together(h: &Harness, bodies: &[serde_json::Value]) -> Vec<u16> {
    futures::stream::iter(bodies)
        .map(|body| async move { h.post_json(body).await.status().as_u16() })
        .buffered(bodies.len())
        .collect()
        .await
}

async fn transactions(h: &Harness, ids: &[Uuid]) -> i64 {
    sqlx::query_scalar("SELECT count(DISTINCT txid::text) FROM orders WHERE order_id = ANY($1)")
        .bind(ids)
        .fetch_one(&h.db.pool)
        .await
        .unwrap()
}

fn tally(statuses: &[u16]) -> BTreeMap<u16, usize> {
    let mut tally = BTreeMap::new();
    for s in statuses {
        *tally.entry(*s).or_default() += 1;
    }
    tally
}

#[tokio::test(flavor = "multi_thread")]
async fn a_group_with_a_conflicting_order_in_it_answers_every_other_order_201() {
    let h = grouped().await;
    let mut rng = StdRng::seed_from_u64(21);

    // Stored before, each alone (a group of one needs 20 more to close: send them
    // as one batch request, which does not group).
    let stored = random_order(&mut rng);
    let taken = random_order(&mut rng);
    let before = serde_json::json!([order_json(&stored), order_json(&taken)]);
    assert_eq!(h.post_json(&before).await.status().as_u16(), 201);

    let fresh: Vec<_> = (0..18).map(|_| random_order(&mut rng)).collect();
    let mut conflicting = random_order(&mut rng);
    conflicting.order_id = taken.order_id;
    let mut bodies: Vec<_> = fresh.iter().map(order_json).collect();
    bodies.push(order_json(&conflicting)); // 409: the id exists with other content
    bodies.push(order_json(&stored)); // 200: the same order again
    bodies.push(order_json(&fresh[3])); // the same new order twice in one group
    assert_eq!(bodies.len(), SIZE);

    let statuses = send_together(&h, &bodies).await;
    assert!(
        statuses[..18]
            .iter()
            .enumerate()
            .all(|(i, s)| *s == 201 || (i == 3 && *s == 200)),
        "every new order is created whatever its neighbours: {statuses:?}"
    );
    assert_eq!(statuses[18], 409, "{statuses:?}");
    assert_eq!(statuses[19], 200, "{statuses:?}");
    assert_eq!(
        tally(&statuses),
        BTreeMap::from([(200, 2), (201, 18), (409, 1)]),
        "of the repeated order one request created it, the other found it"
    );
    let ids: Vec<Uuid> = fresh.iter().map(|o| o.order_id).collect();
    assert_eq!(
        transactions(&h, &ids).await,
        1,
        "the new orders shared one commit"
    );
    assert_eq!(h.count().await, 2 + 18);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_the_database_refuses_fails_only_itself() {
    let h = grouped().await;
    let mut rng = StdRng::seed_from_u64(22);
    // A rule validation does not know of, so the group's statement fails on it.
    sqlx::query("ALTER TABLE orders ADD CONSTRAINT no_atlantis CHECK (city <> 'Atlantis')")
        .execute(&h.db.pool)
        .await
        .unwrap();
    let orders: Vec<_> = (0..SIZE).map(|_| random_order(&mut rng)).collect();
    let mut bodies: Vec<_> = orders.iter().map(order_json).collect();
    bodies[7]["city"] = "Atlantis".into();

    let statuses = send_together(&h, &bodies).await;
    assert_eq!(statuses[7], 500, "{statuses:?}");
    assert_eq!(
        tally(&statuses),
        BTreeMap::from([(201, SIZE - 1), (500, 1)]),
        "{statuses:?}"
    );
    assert_eq!(h.count().await, SIZE as i64 - 1);
}
