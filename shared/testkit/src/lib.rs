//! Test helpers for Tidemark's integration tests.
//!
//! Tests run against real servers that `cargo xtask test` starts on loopback and
//! describes in `.tidemark/test/stack.env` (and in the environment of the test
//! processes). Every test isolates itself: its own Postgres database, Redis key
//! prefix, ClickHouse database and S3 bucket. The test stack is wiped each time
//! `cargo xtask test` starts it, so nothing a test creates outlives the run.
//!
//! | module | what it holds |
//! |---|---|
//! | [`stack`] | where the shared test servers listen |
//! | [`isolate`] | a database, key prefix, ClickHouse database or S3 bucket of the test's own |
//! | [`servers`] | private servers for tests that stop, flush or restart one |
//! | [`service`] | a service's `serve` in this process on port 0; its operational endpoints |
//! | [`process`] | a service binary as a process of its own (kill, signal, RSS, CPU) |
//! | [`orders`] | random valid orders and the raw SQL insert that bypasses ingest |
//! | [`truth`] | ground truth by SQL over Postgres, the log's head, who holds the horizon |
//! | [`wait`] | waiting for a condition |
//! | [`proxy`] | a TCP proxy that can be made slow |
//! | [`fuzz`] | schemathesis against an OpenAPI spec |
//! | [`figure`] | the figures of RELIABILITY.md's rows; the heavier variants switch |

pub mod figure;
pub mod fuzz;
pub mod isolate;
pub mod load;
pub mod log;
pub mod orders;
pub mod plans;
pub mod process;
pub mod proxy;
pub mod servers;
pub mod service;
pub mod slice;
pub mod stack;
pub mod truth;
pub mod wait;

pub use figure::{figure, heavy};
pub use fuzz::{Fuzzed, schemathesis};
pub use isolate::{TestDb, clickhouse, postgres, redis, s3};
pub use load::OrderLoad;
pub use orders::{Straddle, insert, insert_refunded, random_order};
pub use plans::{analyze_log, seq_scans, skewed_pool};
pub use process::{Process, ServiceEnv};
pub use proxy::SlowProxy;
pub use servers::{
    PrivateAlerting, PrivateClickHouse, PrivateClickHouseCluster, PrivateHaProxy, PrivatePostgres,
    PrivateRedis, PrivateRedisFailover, PrivateS3,
};
pub use service::{Running, assert_operational, http_ready, leases_at, metric, start};
pub use slice::{Slice, SliceCells};
pub use stack::{TestStack, stack};
pub use tidemark_launch::{free_port, workspace_root};
pub use truth::{differing, ground_truth, ground_truth_corrections, horizon_holders, log_head};
pub use wait::eventually;
