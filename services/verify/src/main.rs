use std::process::ExitCode;

use clap::Parser;
use tidemark_platform::service::{self, CommonArgs, ENV_HELP};

/// The compactor's allocator, for the lake read-back (see the compactor's main).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Reconcile a running Tidemark deployment: served totals against Postgres, the raw
/// lake against the log, the Parquet lake against ClickHouse. Prints the drift of
/// each check; exits 1 when any is not zero.
///
/// Needs the stores' settings (as the services take them) and
/// TIDEMARK_VERIFY__SERVING_URL, TIDEMARK_VERIFY__READ_KEY (a `read` key).
#[derive(Parser)]
#[command(name = "tidemark-verify", version, after_help = ENV_HELP)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// How many recent days of served totals to compare (overrides verify.days).
    #[arg(long)]
    days: Option<i64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let mut config: tidemark_verify::Config =
        service::load(&cli.common, |c: &tidemark_verify::Config| &c.telemetry)?;
    if let Some(days) = cli.days {
        config.verify.days = days;
    }
    let checks = tidemark_verify::run(&config).await?;
    let drifting = checks.iter().filter(|c| c.drift > 0).count();
    if drifting > 0 {
        eprintln!("{drifting} checks found drift");
        return Ok(ExitCode::FAILURE);
    }
    println!("No drift.");
    Ok(ExitCode::SUCCESS)
}
