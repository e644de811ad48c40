use clap::{Parser, Subcommand};
use tidemark_platform::auth::KeysCommand;
use tidemark_platform::service::{self, CommonArgs, ENV_HELP};
use tidemark_platform::{postgres, shutdown};

/// Tidemark ingest: accepts orders over HTTP (JSON, NDJSON, Avro), commits them to
/// Postgres before answering, and relays them to the raw lake in S3.
#[derive(Parser)]
#[command(name = "tidemark-ingest", version, after_help = ENV_HELP)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (the default).
    Serve,
    /// Apply the Postgres migrations and exit.
    Migrate,
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config: tidemark_ingest::Config =
        service::load(&cli.common, |c: &tidemark_ingest::Config| &c.telemetry)?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let listener = service::bind(config.http.listen).await?;
            tidemark_ingest::serve(config, listener, shutdown::on_signal()).await
        }
        Command::Migrate => {
            let pool = postgres::pool(&config.postgres, "tidemark-ingest")?;
            postgres::migrate(&pool).await?;
            Ok(())
        }
        Command::Keys(command) => {
            let pool = postgres::pool(&config.postgres, "tidemark-ingest")?;
            command.run(&pool).await
        }
    }
}
