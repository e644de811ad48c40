//! Where a row sits in the orders log.
//!
//! Postgres `orders` is the log. Each row carries the id of the transaction that
//! wrote it (`txid`, an `xid8`) and a sequence value (`seq`). Log order is
//! `(txid, seq)`; a consumer only reads rows whose `txid` is below the horizon
//! `log_horizon()` (`pg_snapshot_xmin(pg_current_snapshot())`, passing over
//! transactions registered as never writing the log), because every transaction
//! below it that writes the log has committed or aborted for good. See
//! ARCHITECTURE.md, "The log".

use std::fmt;

use serde::{Deserialize, Serialize};

/// A position in the orders log; positions compare in log order.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct LogPosition {
    pub txid: u64,
    pub seq: i64,
}

impl LogPosition {
    /// Before every row: reading `> ZERO` reads the whole log.
    pub const ZERO: LogPosition = LogPosition { txid: 0, seq: 0 };

    pub fn new(txid: u64, seq: i64) -> Self {
        Self { txid, seq }
    }

    /// The position just before every row written by transaction `txid` or later.
    ///
    /// Sequence values start at 1, so `(txid, 0)` sorts before all of that
    /// transaction's rows.
    pub fn before_txid(txid: u64) -> Self {
        Self { txid, seq: 0 }
    }
}

impl fmt::Display for LogPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}_{}", self.txid, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_by_txid_then_seq() {
        let a = LogPosition::new(10, 99);
        let b = LogPosition::new(11, 1);
        assert!(a < b, "a later transaction sorts later whatever its seq");
        assert!(LogPosition::before_txid(11) < b);
        assert!(LogPosition::before_txid(11) > a);
        assert_eq!(b.to_string(), "11_1");
    }
}
