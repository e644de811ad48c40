use clap::{Parser, Subcommand};
use tidemark_platform::service::{self, CommonArgs, ENV_HELP};
use tidemark_platform::shutdown;

/// Each batch builds its delta from thousands of small strings (a field per cell
/// and metric) and frees them after the apply. With glibc's malloc that was about
/// a third of the consumer's CPU at 20,000 orders/s (`malloc`, `_int_free`,
/// `malloc_consolidate`, …; `bench speed`, a profile of the process), as it had
/// been for ingest.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Tidemark speed layer: tails the Postgres orders log and keeps exact real-time
/// revenue per time bucket in Redis.
#[derive(Parser)]
#[command(name = "tidemark-speed", version, after_help = ENV_HELP)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (the default).
    Serve,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config: tidemark_speed::Config =
        service::load(&cli.common, |c: &tidemark_speed::Config| &c.telemetry)?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let listener = service::bind(config.http.listen).await?;
            tidemark_speed::serve(config, listener, shutdown::on_signal()).await
        }
    }
}
