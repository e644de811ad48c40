//! Customers in the log: `customer_changes`, the one reading and writing of it, and
//! a customer's versions as both services show them (see `domain::customer`).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgExecutor};
use tidemark_domain::CustomerChange;
use tidemark_domain::customer::{self, Attributes, Recorded, Version};

/// A customer with every version, oldest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[schema(as = Customer)]
pub struct CustomerView {
    pub user_id: String,
    /// The version in effect now (the last one: a version may be effective in
    /// the next minutes, within the accepted clock skew).
    pub current: VersionView,
    pub versions: Vec<VersionView>,
}

/// One version of a customer: its attributes over `[valid_from, valid_to)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[schema(as = CustomerVersion)]
pub struct VersionView {
    /// City of residence.
    pub city: String,
    pub segment: String,
    pub signed_up_at: DateTime<Utc>,
    pub valid_from: DateTime<Utc>,
    /// Absent for the current version.
    pub valid_to: Option<DateTime<Utc>>,
    /// When the change that made this version was recorded.
    pub recorded_at: DateTime<Utc>,
}

impl From<Version> for VersionView {
    fn from(v: Version) -> Self {
        VersionView {
            city: v.attributes.city,
            segment: v.attributes.segment,
            signed_up_at: v.attributes.signed_up_at,
            valid_from: v.valid_from,
            valid_to: v.valid_to,
            recorded_at: v.recorded_at,
        }
    }
}

/// A row of `customer_changes`.
#[derive(sqlx::FromRow)]
struct ChangeRow {
    city: String,
    segment: String,
    signed_up_at: DateTime<Utc>,
    effective_at: DateTime<Utc>,
    seq: i64,
    recorded_at: DateTime<Utc>,
}

impl ChangeRow {
    fn recorded(self) -> Recorded {
        Recorded {
            attributes: Attributes {
                city: self.city,
                segment: self.segment,
                signed_up_at: self.signed_up_at,
            },
            effective_at: self.effective_at,
            seq: self.seq,
            recorded_at: self.recorded_at,
        }
    }
}

/// A row of `customer_changes` with its customer.
#[derive(sqlx::FromRow)]
struct UserChangeRow {
    user_id: String,
    #[sqlx(flatten)]
    change: ChangeRow,
}

impl UserChangeRow {
    fn recorded(self) -> Recorded {
        self.change.recorded()
    }
}

/// The recorded changes of `user_id`, in log order.
pub async fn changes(db: impl PgExecutor<'_>, user_id: &str) -> Result<Vec<Recorded>, sqlx::Error> {
    let rows: Vec<ChangeRow> = sqlx::query_as(
        "SELECT city, segment, signed_up_at, effective_at, seq, recorded_at \
         FROM customer_changes WHERE user_id = $1 ORDER BY seq",
    )
    .bind(user_id)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(ChangeRow::recorded).collect())
}

/// Records `changes` (in order) in the transaction `tx`, each only if it alters
/// its customer's history as left by the ones before it; returns which did. For
/// imports: three statements whatever the number of changes (lock every customer
/// in sorted order, read their histories, insert what alters them).
pub async fn record_many(
    tx: &mut PgConnection,
    changes: &[CustomerChange],
) -> Result<Vec<bool>, sqlx::Error> {
    let mut users: Vec<&str> = changes.iter().map(|c| c.user_id.as_str()).collect();
    users.sort_unstable();
    users.dedup();
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtextextended('customer:' || u, 0)) \
         FROM (SELECT u FROM unnest($1::text[]) u ORDER BY u) sorted",
    )
    .bind(&users)
    .execute(&mut *tx)
    .await?;
    let existing: Vec<UserChangeRow> = sqlx::query_as(
        "SELECT user_id, city, segment, signed_up_at, effective_at, seq, recorded_at \
         FROM customer_changes WHERE user_id = ANY($1) ORDER BY seq",
    )
    .bind(&users)
    .fetch_all(&mut *tx)
    .await?;
    let mut histories: std::collections::HashMap<String, Vec<Recorded>> =
        std::collections::HashMap::new();
    for row in existing {
        histories
            .entry(row.user_id.clone())
            .or_default()
            .push(row.recorded());
    }
    let mut altered = Vec::with_capacity(changes.len());
    let mut inserts: Vec<&CustomerChange> = Vec::new();
    for change in changes {
        let history = histories.entry(change.user_id.clone()).or_default();
        let alters = customer::alters(history, change);
        if alters {
            // Its place among this batch's changes; the log's `seq` follows the
            // insert order below.
            let seq = history.iter().map(|c| c.seq).max().unwrap_or(0) + 1;
            history.push(Recorded {
                attributes: change.attributes.clone(),
                effective_at: change.effective_at,
                seq,
                recorded_at: DateTime::<Utc>::MIN_UTC,
            });
            inserts.push(change);
        }
        altered.push(alters);
    }
    if !inserts.is_empty() {
        sqlx::query(
            "INSERT INTO customer_changes (user_id, effective_at, city, segment, signed_up_at) \
             SELECT u, e, ci, s, su FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[], \
                                  $5::timestamptz[]) WITH ORDINALITY AS c(u, e, ci, s, su, n) \
             ORDER BY n",
        )
        .bind(
            inserts
                .iter()
                .map(|c| c.user_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(inserts.iter().map(|c| c.effective_at).collect::<Vec<_>>())
        .bind(
            inserts
                .iter()
                .map(|c| c.attributes.city.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            inserts
                .iter()
                .map(|c| c.attributes.segment.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            inserts
                .iter()
                .map(|c| c.attributes.signed_up_at)
                .collect::<Vec<_>>(),
        )
        .execute(&mut *tx)
        .await?;
    }
    Ok(altered)
}

/// The customer as the recorded changes make it; `None` if there are none.
pub fn view(user_id: &str, changes: &[Recorded]) -> Option<CustomerView> {
    let versions: Vec<VersionView> = customer::history(changes)
        .into_iter()
        .map(VersionView::from)
        .collect();
    Some(CustomerView {
        user_id: user_id.to_owned(),
        current: versions.last()?.clone(),
        versions,
    })
}

/// The customer `user_id` as of the last commit.
pub async fn read(
    db: impl PgExecutor<'_>,
    user_id: &str,
) -> Result<Option<CustomerView>, sqlx::Error> {
    Ok(view(user_id, &changes(db, user_id).await?))
}

/// Takes the lock on `user_id`'s changes until the end of the transaction `tx`.
pub async fn lock(tx: &mut PgConnection, user_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('customer:' || $1, 0))")
        .bind(user_id)
        .execute(tx)
        .await?;
    Ok(())
}

/// Records `change` in the transaction `tx` if it alters the customer's history
/// (see [`customer::alters`]); returns whether it did, and the customer after it.
/// Changes of one customer are serialized by a transaction-scoped advisory lock,
/// so two concurrent changes each see the other's effect or follow it.
pub async fn record(
    tx: &mut PgConnection,
    change: &CustomerChange,
) -> Result<(bool, CustomerView), sqlx::Error> {
    lock(tx, &change.user_id).await?;
    let mut recorded = changes(&mut *tx, &change.user_id).await?;
    let alters = customer::alters(&recorded, change);
    if alters {
        let (seq, recorded_at): (i64, DateTime<Utc>) = sqlx::query_as(
            "INSERT INTO customer_changes (user_id, effective_at, city, segment, signed_up_at) \
             VALUES ($1, $2, $3, $4, $5) RETURNING seq, recorded_at",
        )
        .bind(&change.user_id)
        .bind(change.effective_at)
        .bind(&change.attributes.city)
        .bind(&change.attributes.segment)
        .bind(change.attributes.signed_up_at)
        .fetch_one(&mut *tx)
        .await?;
        recorded.push(Recorded {
            attributes: change.attributes.clone(),
            effective_at: change.effective_at,
            seq,
            recorded_at,
        });
    }
    let view = view(&change.user_id, &recorded).expect("at least the change itself");
    Ok((alters, view))
}
