use clap::{Parser, Subcommand};
use tidemark_platform::service::{self, CommonArgs, ENV_HELP};
use tidemark_platform::shutdown;

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
