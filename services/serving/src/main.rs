use clap::{Parser, Subcommand};
use tidemark_platform::service::{self, CommonArgs, ENV_HELP};
use tidemark_platform::shutdown;

/// A computation of a dashboard's 30-day answer makes and drops hundreds of
/// thousands of small values (its cells, points, strings); with glibc's malloc,
/// `_int_malloc`, `malloc_consolidate`, `unlink_chunk` and `free` were a quarter
/// of serving's CPU while that question was asked 2,000 times a second (`bench
/// serving`, a profile of the serving process), much of it on the runtime's
/// workers, where requests wait.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Tidemark serving: REST and GraphQL over the exact merge of the batch and speed
/// views, plus order history.
#[derive(Parser)]
#[command(name = "tidemark-serving", version, after_help = ENV_HELP)]
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
    let config: tidemark_serving::Config =
        service::load(&cli.common, |c: &tidemark_serving::Config| &c.telemetry)?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let listener = service::bind(config.http.listen).await?;
            tidemark_serving::serve(config, listener, shutdown::on_signal()).await
        }
    }
}
