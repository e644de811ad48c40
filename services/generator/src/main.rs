use clap::{Parser, Subcommand};
use tidemark_platform::service::{self, CommonArgs, ENV_HELP};
use tidemark_platform::shutdown;

/// Tidemark generator: realistic demo orders, deterministic from a seed, sent to the
/// ingest API.
#[derive(Parser)]
#[command(name = "tidemark-generator", version, after_help = ENV_HELP)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the operational endpoints (the default).
    Serve,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config: tidemark_generator::Config =
        service::load(&cli.common, |c: &tidemark_generator::Config| &c.telemetry)?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let listener = service::bind(config.http.listen).await?;
            tidemark_generator::serve(config, listener, shutdown::on_signal()).await
        }
    }
}
