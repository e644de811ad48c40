//! Tidemark's domain: what an order is, how money and time are represented, how
//! orders fall into time buckets and dimensions, where a row sits in the log, and
//! the Avro schemas producers write.
//!
//! Nothing here does I/O. Wire formats (HTTP request bodies, raw-lake JSON lines,
//! database rows) live at the edges of the services and convert into these types.

pub mod adjustment;
pub mod aggregate;
pub mod avro;
pub mod bucket;
pub mod customer;
pub mod event;
pub mod fx;
pub mod money;
pub mod order;
pub mod position;

pub use adjustment::{AdjustedLine, Adjustment, AdjustmentKind, RefundItem, RefundRequest};
pub use aggregate::{Basis, CellKey, Corrections, Grid, Totals};
pub use bucket::{Attribute, Dimension, Granularity, VALUE_SEPARATOR};
pub use customer::CustomerChange;
pub use event::{AdjustmentEvent, Contribution, Event};
pub use money::{Currency, CurrencyError};
pub use order::{Order, OrderCell, OrderLimits, OrderLine, Violation};
pub use position::LogPosition;
