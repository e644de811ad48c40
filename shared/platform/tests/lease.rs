//! Leases against a real Postgres: one leader per role, takeover only after
//! expiry with a new fencing token, a former leader's writes refused, and a
//! release handing over at once.

use std::time::Duration;

use tidemark_platform::lease::{Fence, FenceError, Lease, LeaseConfig};

fn config(instance: &str, ttl_ms: u64) -> LeaseConfig {
    LeaseConfig {
        ttl: Duration::from_millis(ttl_ms),
        instance: Some(instance.into()),
    }
}

#[tokio::test]
async fn one_leader_per_role_and_a_late_write_of_a_former_leader_is_refused() {
    let db = tidemark_testkit::postgres().await;
    let a = Lease::new(db.pool.clone(), "relay", &config("a", 800));
    let b = Lease::new(db.pool.clone(), "relay", &config("b", 800));
    let other_role = Lease::new(db.pool.clone(), "speed", &config("b", 800));

    assert!(
        a.round().await.unwrap(),
        "the first instance takes the lease"
    );
    assert!(!b.round().await.unwrap(), "the second stands by");
    assert!(other_role.round().await.unwrap(), "roles are independent");
    assert!(a.round().await.unwrap(), "the holder renews");
    let first = a.fence().expect("a leads");
    assert_eq!(first.token, 1);
    assert!(b.fence().is_none());
    let standing = b.standing();
    assert_eq!(
        (standing.state, standing.leader.as_deref(), standing.token),
        ("standby", Some("a"), Some(1))
    );

    // A write under the current token passes.
    let mut tx = db.pool.begin().await.unwrap();
    first.check(&mut tx).await.expect("the leader writes");
    tx.commit().await.unwrap();

    // `a` stops renewing (paused); `b` cannot take over before the lease expires…
    assert!(!b.round().await.unwrap());
    tidemark_testkit::eventually(Duration::from_secs(5), "b takes over", || {
        let b = b.clone();
        async move { b.round().await.unwrap() }
    })
    .await;
    let second = b.fence().expect("b leads");
    assert_eq!(second.token, 2, "a new holder gets a new token");

    // …and `a`, waking up with a write planned under token 1, is refused.
    let mut tx = db.pool.begin().await.unwrap();
    match first.check(&mut tx).await {
        Err(FenceError::Fenced(fenced)) => {
            assert_eq!((fenced.token, fenced.current), (1, 2));
        }
        other => panic!("the late write was not refused: {other:?}"),
    }
    drop(tx);
    assert!(a.fence().is_none(), "a's own clock ran out too");
    assert!(!a.round().await.unwrap(), "a stands by");
    assert_eq!(a.standing().leader.as_deref(), Some("b"));
    assert_eq!(second.token, 2);
}

#[tokio::test]
async fn a_takeover_waits_for_the_write_in_flight_and_a_release_hands_over_at_once() {
    let db = tidemark_testkit::postgres().await;
    let a = Lease::new(db.pool.clone(), "compactor", &config("a", 300));
    let b = Lease::new(db.pool.clone(), "compactor", &config("b", 300));
    assert!(a.round().await.unwrap());
    // (A transaction may idle for the lease's duration; this one is held longer
    // on purpose, below.)
    let fence = Fence {
        ttl: Duration::from_secs(60),
        ..a.fence().unwrap()
    };

    // `a` is inside a write (its fence checked, not committed) when its lease expires.
    let mut tx = db.pool.begin().await.unwrap();
    fence.check(&mut tx).await.unwrap();
    let pool = db.pool.clone();
    let query = move |sql: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, bool>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    tidemark_testkit::eventually(Duration::from_secs(5), "a's lease expires", || {
        query("SELECT expires_at <= clock_timestamp() FROM leases WHERE role = 'compactor'")
    })
    .await;
    let takeover = tokio::spawn({
        let b = b.clone();
        async move { b.round().await.unwrap() }
    });
    // The takeover cannot complete while the write holds the row: it waits on it.
    tidemark_testkit::eventually(Duration::from_secs(5), "b waits on a's row lock", || {
        query(
            "SELECT count(*) > 0 FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
    })
    .await;
    assert!(!takeover.is_finished(), "the takeover waits for the write");
    tx.commit().await.unwrap();
    assert!(takeover.await.unwrap(), "then b leads");
    assert_eq!(b.fence().unwrap().token, 2);

    // `b` stalls inside a write (a pause, a lost connection): Postgres ends the
    // transaction once it has idled for the lease's duration, and `c` takes over.
    let c = Lease::new(db.pool.clone(), "compactor", &config("c", 300));
    let mut stalled = db.pool.begin().await.unwrap();
    b.fence().unwrap().check(&mut stalled).await.unwrap();
    tidemark_testkit::eventually(Duration::from_secs(10), "c takes over", || {
        let c = c.clone();
        async move { c.round().await.unwrap() }
    })
    .await;
    // (That round waited for Postgres to end the write, most of c's short lease:
    // c counts its lease from before the round, so it renews before writing.)
    assert!(c.round().await.unwrap());
    assert_eq!(c.fence().unwrap().token, 3);
    assert!(stalled.commit().await.is_err(), "the stalled write is gone");

    // A released lease is taken at the next try, before it would have expired.
    let long = |name| Lease::new(db.pool.clone(), "vault", &config(name, 60_000));
    let (c, d) = (long("c"), long("d"));
    assert!(c.round().await.unwrap());
    assert!(!d.round().await.unwrap());
    c.release().await.unwrap();
    assert!(c.fence().is_none());
    assert!(
        d.round().await.unwrap(),
        "d takes the released lease at once"
    );
}

#[tokio::test]
async fn an_unfenced_lease_always_leads_with_token_zero() {
    let lease = Lease::unfenced("speed");
    assert!(lease.round().await.unwrap());
    let fence = lease.fence().unwrap();
    assert_eq!(fence.token, 0);
    assert_eq!(lease.standing().state, "unfenced");
}
