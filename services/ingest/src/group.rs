//! Group commit: concurrent single-order requests share one statement and one
//! commit.
//!
//! A request of one order hands it to the dispatcher and waits for its own outcome,
//! which comes only after the commit that made the order durable. The dispatcher
//! forms groups: it takes a commit slot (at most `in_flight` groups commit at
//! once), then every order already waiting, up to `max_orders`, waiting up to
//! `window` for more. Under light load a request finds a free slot and commits alone
//! at once; under heavy load orders queue while the slots are busy and the next
//! group takes them all, so the commits per order fall as the load rises.
//!
//! Each order keeps its own outcome. The group is written in id order by a batch
//! request's statements (so in the same lock order): first a plain `INSERT` of
//! every order, which on a unique violation inserts nothing; only then one with `ON
//! CONFLICT DO NOTHING`, after which an order it did not insert is looked up: the
//! same content is a duplicate, other content a conflict, and neither touches its
//! neighbours. An order whose id repeats inside the group is stored alone after
//! the group, so it meets the first one as a committed row, as a request arriving
//! just after it would. If the statements fail for a reason one order could cause,
//! each order of the group is stored alone, so a bad order fails only itself; if
//! Postgres is unavailable, every order of the group gets that error (and its
//! request a 503).
//!
//! Groups commit through a pool of their own, one connection per commit slot,
//! whose sessions plan the group statements once (`plan_cache_mode =
//! force_generic_plan`): their texts are the same for every group, only the arrays
//! differ, and under `auto` Postgres went on planning them per execution (measured
//! with the release build at 32 connections, alternating runs of 60,000 orders:
//! 11,857 / 12,009 orders/s generic, 10,205 / 10,931 auto). The setting is the
//! session's, so the service's other statements (the vault loader's ranges) keep
//! their own pool and custom plans.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use sqlx::PgPool;
use tidemark_domain::Order;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use tidemark_platform::config::PostgresConfig;

use crate::config::GroupCommitSettings;
use crate::store::{self, Outcome, StoreError};

type Reply = oneshot::Sender<Result<Outcome, StoreError>>;

struct Pending {
    order: Order,
    reply: Reply,
}

/// The handle requests store their single orders through.
#[derive(Clone)]
pub struct GroupCommit {
    queue: mpsc::Sender<Pending>,
}

impl GroupCommit {
    /// Starts the dispatcher. When `shutdown` is cancelled it stops taking orders,
    /// commits those already handed over and then ends the returned task.
    pub fn start(
        pool: PgPool,
        settings: GroupCommitSettings,
        shutdown: CancellationToken,
    ) -> (GroupCommit, tokio::task::JoinHandle<()>) {
        let (queue, waiting) = mpsc::channel(settings.max_orders.max(1) * 4);
        let task = tokio::spawn(dispatch(pool, waiting, settings, shutdown));
        (GroupCommit { queue }, task)
    }

    /// Stores one order in the next group; returns after that group's commit.
    pub async fn store(&self, order: Order) -> Result<Outcome, StoreError> {
        let (reply, outcome) = oneshot::channel();
        let closed = || StoreError::Database(Arc::new(sqlx::Error::PoolClosed));
        self.queue
            .send(Pending { order, reply })
            .await
            .map_err(|_| closed())?;
        // The dispatcher answers every order it took, even when its group fails.
        outcome.await.map_err(|_| closed())?
    }
}

/// The groups' own pool: a connection per commit slot, generic plans.
pub fn pool(
    postgres: &PostgresConfig,
    settings: &GroupCommitSettings,
) -> Result<PgPool, sqlx::Error> {
    tidemark_platform::postgres::pool_with(
        postgres,
        "tidemark-ingest-groups",
        settings.in_flight.max(1) as u32,
        &[("plan_cache_mode", "force_generic_plan")],
    )
}

async fn dispatch(
    pool: PgPool,
    mut waiting: mpsc::Receiver<Pending>,
    settings: GroupCommitSettings,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(settings.in_flight.max(1)));
    let mut commits = JoinSet::new();
    loop {
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the slots are never closed");
        let first = tokio::select! {
            pending = waiting.recv() => pending,
            () = shutdown.cancelled() => {
                // Refuse new orders; those already queued still commit below.
                waiting.close();
                waiting.recv().await
            }
        };
        let Some(first) = first else { break };
        let mut group = vec![first];
        let deadline = Instant::now() + settings.window;
        while group.len() < settings.max_orders {
            match waiting.try_recv() {
                Ok(pending) => group.push(pending),
                Err(mpsc::error::TryRecvError::Empty) if !settings.window.is_zero() => {
                    match timeout_at(deadline, waiting.recv()).await {
                        Ok(Some(pending)) => group.push(pending),
                        _ => break,
                    }
                }
                Err(_) => break,
            }
        }
        let pool = pool.clone();
        commits.spawn(async move {
            commit(&pool, group).await;
            drop(slot);
        });
        while commits.try_join_next().is_some() {}
    }
    while commits.join_next().await.is_some() {}
}

/// Commits one group and answers each of its orders.
async fn commit(pool: &PgPool, group: Vec<Pending>) {
    metrics::histogram!("ingest_group_commit_orders").record(group.len() as f64);
    let started = std::time::Instant::now();

    // The first order of each id goes into the statement; repeats wait for after.
    let mut seen: HashSet<Uuid> = HashSet::with_capacity(group.len());
    let (written, repeats): (Vec<Pending>, Vec<Pending>) = group
        .into_iter()
        .partition(|p| seen.insert(p.order.order_id));
    let mut orders: Vec<&Order> = written.iter().map(|p| &p.order).collect();
    orders.sort_unstable_by_key(|o| o.order_id);

    // New orders, the usual case, in the cheaper statement; if one of them is
    // stored already (nothing of the group is then), the sorting-out statement.
    let result = match async { store::insert_all(&orders)?.execute(pool).await }.await {
        Ok(_) => Ok(orders.iter().map(|o| o.order_id).collect()),
        Err(e) if store::is_unique_violation(&e) => {
            async { store::insert(&orders)?.fetch_all(pool).await }.await
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(inserted) => {
            let inserted: HashSet<Uuid> = inserted.into_iter().collect();
            let others: Vec<Uuid> = written
                .iter()
                .map(|p| p.order.order_id)
                .filter(|id| !inserted.contains(id))
                .collect();
            let mut stored: HashMap<Uuid, _> = HashMap::new();
            let mut lookup = Ok(());
            if !others.is_empty() {
                match store::existing(&others).fetch_all(pool).await {
                    Ok(rows) => stored.extend(rows.into_iter().map(|r| (r.order_id, r))),
                    Err(e) => lookup = Err(Arc::new(e)),
                }
            }
            for pending in written {
                let id = pending.order.order_id;
                if inserted.contains(&id) {
                    answer(pending.reply, Ok(created()));
                    continue;
                }
                let outcome = match (&lookup, stored.get(&id)) {
                    (Err(e), _) => Err(StoreError::Database(e.clone())),
                    (Ok(()), Some(row)) if row.holds(&pending.order) => Ok(duplicate(id)),
                    (Ok(()), Some(_)) => Err(StoreError::Conflict(vec![id])),
                    // Inserted by a transaction that then rolled back: store it alone.
                    (Ok(()), None) => alone(pool, &pending.order).await,
                };
                answer(pending.reply, outcome);
            }
        }
        Err(e) if tidemark_platform::postgres::is_unavailable(&e) => {
            let e = Arc::new(e);
            for pending in written.into_iter().chain(repeats) {
                answer(pending.reply, Err(StoreError::Database(e.clone())));
            }
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, orders = written.len(),
                "A group's statement failed; storing its orders one by one");
            for pending in written {
                let outcome = alone(pool, &pending.order).await;
                answer(pending.reply, outcome);
            }
        }
    }
    for pending in repeats {
        let outcome = alone(pool, &pending.order).await;
        answer(pending.reply, outcome);
    }
    metrics::histogram!("ingest_group_commit_seconds").record(started.elapsed().as_secs_f64());
}

/// Stores one order in a transaction of its own, outside any group.
async fn alone(pool: &PgPool, order: &Order) -> Result<Outcome, StoreError> {
    store::store(pool, std::slice::from_ref(order)).await
}

fn created() -> Outcome {
    Outcome {
        created: 1,
        duplicates: Vec::new(),
    }
}

fn duplicate(id: Uuid) -> Outcome {
    Outcome {
        created: 0,
        duplicates: vec![id],
    }
}

/// A request that went away no longer wants its answer; the order stays stored.
fn answer(reply: Reply, outcome: Result<Outcome, StoreError>) {
    drop(reply.send(outcome));
}
