//! The compactor's settings.

use std::time::Duration;

use serde::Deserialize;
use tidemark_platform::config::{
    ClickHouseConfig, HttpConfig, PostgresConfig, S3Config, TelemetryConfig, Validate, millis,
};
use tidemark_platform::lease::LeaseConfig;

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    pub http: HttpConfig,
    pub telemetry: TelemetryConfig,
    pub postgres: PostgresConfig,
    pub clickhouse: ClickHouseConfig,
    pub s3: S3Config,
    pub compactor: CompactorSettings,
    /// Which instance runs: the lease is held for the length of a run.
    pub lease: LeaseConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct CompactorSettings {
    /// `serve` starts a run at least this often.
    #[serde(with = "millis")]
    pub interval: Duration,
    /// ... and sooner once this many orders have landed past the watermark.
    pub min_new_rows: i64,
    /// How often `serve` checks the row count.
    #[serde(with = "millis")]
    pub check_interval: Duration,
    /// How long a run waits for the lake relay to land every row before its cut;
    /// after that it stays pending and is resumed by the next run.
    #[serde(with = "millis")]
    pub relay_wait: Duration,
    /// Parquet files a date partition may hold before they are compacted into one.
    pub max_files_per_partition: usize,
    /// How long the audit's read-back (the run's Parquet columns from S3 and
    /// staging's sums from ClickHouse) may take before it is abandoned and started
    /// again (three tries, then the run fails and the next one redoes it). A
    /// read-back that never finished held a test's run for minutes with every
    /// thread idle and no connection open; the cause is not yet known.
    #[serde(with = "millis")]
    pub read_back_timeout: Duration,
    /// A run's Parquet file is uploaded in parts of this many bytes while it is
    /// written (S3 multipart), so memory holds a part per date, not whole files;
    /// a file smaller than a part is uploaded whole. At least 5 MiB: S3 (and the
    /// tests' server) refuse smaller parts but the last.
    pub upload_part_bytes: usize,
    /// Bytes of a run's order lines held in memory between its lake step and its
    /// audit; past them every hour's lines go to a file of their own on local
    /// disk and are read back with their range of the stage (see `held`). A
    /// run's memory then holds this much of them, not the run.
    pub hold_memory_bytes: usize,
    /// Where a run makes the directory of those files (removed when the run
    /// ends); the system's temporary directory (`TMPDIR`) when unset.
    pub spill_dir: Option<std::path::PathBuf>,
    /// Bytes the stage's aggregated ranges may hold while they wait to be
    /// written and are written (a range larger than this is written alone).
    /// More lets ClickHouse take several INSERTs at once; less bounds a large
    /// run's peak.
    pub stage_memory_bytes: usize,
    /// Order lines and corrections the stage aggregates at once: whole hours,
    /// or halves or quarters of an hour holding more (a quarter may hold more).
    /// A run's cells were aggregated all at once (5.7 cells per order line held
    /// next to the run's orders), then by whole hours, and an hour of a run of
    /// 10M orders (420,000 lines) set its peak.
    pub stage_range_rows: usize,
}

impl Default for CompactorSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(60),
            min_new_rows: 50_000,
            check_interval: Duration::from_secs(5),
            relay_wait: Duration::from_secs(60),
            max_files_per_partition: 8,
            read_back_timeout: Duration::from_secs(120),
            upload_part_bytes: 8 << 20,
            hold_memory_bytes: 16 << 20,
            spill_dir: None,
            stage_memory_bytes: 64 << 20,
            stage_range_rows: 100_000,
        }
    }
}

impl CompactorSettings {
    /// Where a run's held rows go past `hold_memory_bytes`.
    pub fn spill(&self) -> crate::held::Spill {
        crate::held::Spill {
            memory_bytes: self.hold_memory_bytes,
            dir: self.spill_dir.clone(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http: HttpConfig::on_port(8084),
            telemetry: TelemetryConfig::default(),
            postgres: PostgresConfig::default(),
            clickhouse: ClickHouseConfig::default(),
            s3: S3Config::default(),
            compactor: CompactorSettings::default(),
            lease: LeaseConfig::default(),
        }
    }
}

impl Validate for Config {
    fn validate(&self, problems: &mut Vec<String>) {
        self.http.validate(problems);
        self.telemetry.validate(problems);
        self.postgres.validate(problems);
        self.clickhouse.validate(problems);
        self.s3.validate(problems);
        self.lease.validate(problems);
        if self.compactor.max_files_per_partition < 2 {
            problems.push("compactor.max_files_per_partition must be at least 2".into());
        }
        if self.compactor.upload_part_bytes < 5 << 20 {
            problems.push("compactor.upload_part_bytes must be at least 5 MiB (5242880)".into());
        }
        if self.compactor.read_back_timeout.is_zero() {
            problems.push("compactor.read_back_timeout must be positive".into());
        }
    }
}
