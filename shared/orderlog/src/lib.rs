//! The orders log: Postgres `orders` and `adjustments`, read in log order by consumers, and the raw
//! lake's record format.
//!
//! - [`row`]: [`OrderRow`], the one decoding of a row of `orders` (every read of the
//!   table goes through it), [`EventRow`], a row of the log (an order or an
//!   adjustment with its order), and [`LogRow`], an event this build understands.
//! - [`tail`]: the safe tail query (the only way consumers read the log), re-reads
//!   of a range, and consumer lag.
//! - [`raw`]: the JSON Lines record the lake relay writes and the compactor reads.
//! - [`epochs`]: speed-layer epochs, cut by transaction id.
//! - [`customers`]: customer changes (slowly changing dimension, type 2) and
//!   their versions.
//! - [`question`]: the ground truth of a revenue question, by SQL over the log.

pub mod customers;
pub mod epochs;
pub mod question;
pub mod raw;
pub mod row;
pub mod tail;

pub use raw::{RAW_TIME_FORMAT, RawLine, RawLineRef, RawRecord, RawRecordRef};
pub use row::{EventRow, LogRow, OrderRow, Undecodable};
pub use tail::{LAG_COUNTED, Lag, LogError, TAIL_TRANSACTION, Tail, lag, range, tail};
