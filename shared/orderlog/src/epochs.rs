//! Speed-layer epochs, cut by transaction id.
//!
//! Epoch `k` holds the rows with `threshold(k) <= txid < threshold(k + 1)`; epoch 0
//! starts at the beginning of the log. A cut's threshold is the id of the
//! transaction inserting it. A reader whose snapshot cannot see a cut has a horizon
//! at or below that id (the cut's transaction was running, or had no id yet), and
//! reads only rows below its horizon, so no row it reads belongs after the cut. A
//! row's epoch therefore never changes once a consumer has read it, and a replay
//! from any position assigns the same epochs.

use sqlx::PgExecutor;

/// `(epoch, threshold)`, ascending.
pub type Cuts = Vec<(u64, u64)>;

/// The epoch of a row written by transaction `txid`.
pub fn epoch_of(txid: u64, cuts: &Cuts) -> u64 {
    cuts.iter()
        .take_while(|(_, threshold)| *threshold <= txid)
        .last()
        .map_or(0, |(epoch, _)| *epoch)
}

/// Every cut. Read it in the same snapshot as the rows it classifies.
pub async fn load(db: impl PgExecutor<'_>) -> Result<Cuts, sqlx::Error> {
    let rows: Vec<(i64, i64)> =
        sqlx::query_as("SELECT epoch, threshold::text::int8 FROM speed_cuts ORDER BY epoch")
            .fetch_all(db)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(e, t)| (e as u64, t as u64))
        .collect())
}

/// Starts a new epoch at this transaction's id; returns `(epoch, threshold)`.
pub async fn cut(db: impl PgExecutor<'_>) -> Result<(u64, u64), sqlx::Error> {
    let (epoch, threshold): (i64, i64) = sqlx::query_as(
        "INSERT INTO speed_cuts (epoch, threshold) \
         SELECT COALESCE(max(epoch), 0) + 1, pg_current_xact_id() FROM speed_cuts \
         RETURNING epoch, threshold::text::int8",
    )
    .fetch_one(db)
    .await?;
    Ok((epoch as u64, threshold as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_fall_in_the_epoch_of_the_last_cut_at_or_below_their_txid() {
        let cuts = vec![(1, 100), (2, 250)];
        assert_eq!(epoch_of(5, &cuts), 0);
        assert_eq!(epoch_of(99, &cuts), 0);
        assert_eq!(epoch_of(100, &cuts), 1);
        assert_eq!(epoch_of(249, &cuts), 1);
        assert_eq!(epoch_of(250, &cuts), 2);
        assert_eq!(epoch_of(10_000, &cuts), 2);
        assert_eq!(epoch_of(7, &Vec::new()), 0);
    }
}
