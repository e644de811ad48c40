use clap::{Parser, Subcommand};
use tidemark_platform::service::{self, CommonArgs, ENV_HELP};
use tidemark_platform::shutdown;

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
    /// Run the service (the default).
    Serve,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config: tidemark_compactor::Config =
        service::load(&cli.common, |c: &tidemark_compactor::Config| &c.telemetry)?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let listener = service::bind(config.http.listen).await?;
            tidemark_compactor::serve(config, listener, shutdown::on_signal()).await
        }
    }
}
