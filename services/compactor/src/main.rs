use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tidemark_compactor::{Kind, Outcome};
use tidemark_platform::service::{self, CommonArgs, ENV_HELP};
use tidemark_platform::shutdown;

/// Polars allocates and frees buffers of hundreds of MB per operation on large
/// runs; with glibc's malloc each is a fresh mapping, and the run spent whole
/// seconds with both cores in the kernel (page faults, unmapping). jemalloc's
/// options (keep freed pages a second, return them from a background thread) are
/// set at build time in `.cargo/config.toml`.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Tidemark compactor, the batch layer: raw JSON Lines in S3 to a Parquet lake to
/// exact aggregates in ClickHouse, published with Write-Audit-Publish.
#[derive(Parser)]
#[command(name = "tidemark-compactor", version, after_help = ENV_HELP)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run batch runs on an interval and when enough orders have landed (the default).
    Serve,
    /// One incremental run, then exit (0 published, 2 audit failed, 3 relay behind).
    RunOnce,
    /// Recompute every aggregate from the Parquet lake (after a logic change).
    Rebuild,
    /// Re-derive the lake's date partitions in [from, to] from the raw JSON, then rebuild.
    Backfill {
        /// First event date, YYYY-MM-DD (UTC).
        #[arg(long)]
        from: chrono::NaiveDate,
        /// Last event date, YYYY-MM-DD (UTC).
        #[arg(long)]
        to: chrono::NaiveDate,
    },
    /// Compare the Parquet lake below the published watermark with the published
    /// aggregates in ClickHouse, every cell; print the drift as JSON (exit 1 on drift).
    Verify,
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let config: tidemark_compactor::Config =
        service::load(&cli.common, |c: &tidemark_compactor::Config| &c.telemetry)?;
    let outcome = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let listener = service::bind(config.http.listen).await?;
            tidemark_compactor::serve(config, listener, shutdown::on_signal()).await?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::RunOnce => {
            let compactor = tidemark_compactor::connect(&config).await?;
            compactor.run_once(Kind::Incremental).await?
        }
        Command::Rebuild => {
            let compactor = tidemark_compactor::connect(&config).await?;
            compactor.run_once(Kind::Rebuild).await?
        }
        Command::Verify => {
            let mut config = config;
            config.postgres.migrate = false;
            config.clickhouse.migrate = false;
            let compactor = tidemark_compactor::connect(&config).await?;
            let drift = compactor.verify_lake().await?;
            println!("{}", serde_json::to_string(&drift)?);
            return Ok(if drift.cells_differing == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        Command::Backfill { from, to } => {
            anyhow::ensure!(from <= to, "--from must not be after --to");
            let compactor = tidemark_compactor::connect(&config).await?;
            compactor.backfill(from, to).await?
        }
    };
    println!("{outcome:?}");
    Ok(match outcome {
        Outcome::Published { .. } => ExitCode::SUCCESS,
        Outcome::AuditFailed { .. } => ExitCode::from(2),
        Outcome::RelayBehind { .. } => ExitCode::from(3),
    })
}
