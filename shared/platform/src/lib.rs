//! What every Tidemark service needs and none of them owns: layered configuration,
//! telemetry, RFC 9457 problem details, the HTTP scaffolding (health, readiness,
//! metrics, graceful shutdown), the background workers' loop and their leases, API keys, and clients for the four stores with their
//! migrations.

pub mod auth;
pub mod clickhouse;
pub mod config;
pub mod health;
pub mod http;
pub mod lease;
pub mod metrics;
pub mod postgres;
pub mod problem;
pub mod redis;
pub mod s3;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod worker;

pub use problem::Problem;
