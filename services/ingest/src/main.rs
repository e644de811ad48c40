use clap::{Parser, Subcommand};
use tidemark_platform::auth::KeysCommand;
use tidemark_platform::service::{self, CommonArgs, ENV_HELP};
use tidemark_platform::{postgres, shutdown};

/// Every request allocates and frees a few dozen small buffers (headers, the body,
/// the decoded order, the answer). With glibc's malloc they took ~16 % of ingest's
/// CPU at 11,000 single-order requests/s (`_int_free`, `malloc_consolidate`, …);
/// with jemalloc ingest took 30 % of the two cores instead of 34 % at the same rate
/// (`bench ingest`, system-wide profile).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Exchange rates for reporting currencies.
    #[command(subcommand, name = "fx-rates")]
    FxRates(FxCommand),
    /// The Data Vault 2.0 warehouse.
    #[command(subcommand)]
    Vault(VaultCommand),
}

#[derive(Subcommand)]
enum VaultCommand {
    /// Empty the warehouse and reset its loader: the running loaders load the
    /// whole log again, to the same rows.
    Rebuild,
    /// How far the loader is behind the log.
    Lag,
}

#[derive(Subcommand)]
enum FxCommand {
    /// Load a file in the ECB reference-rate CSV format (`Date,USD,JPY,…`, units
    /// per euro): idempotent, a later file corrects earlier rates. `-` reads
    /// standard input.
    Load { file: std::path::PathBuf },
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
        Command::Vault(command) => {
            let pool = postgres::pool(&config.postgres, "tidemark-ingest")?;
            match command {
                VaultCommand::Rebuild => {
                    tidemark_ingest::vault::rebuild(&pool).await?;
                    println!("The vault is empty; its loader reloads the log from the start.");
                }
                VaultCommand::Lag => {
                    let lag = tidemark_ingest::vault::lag(&pool).await?;
                    println!("{} rows behind, oldest {:.1} s", lag.rows, lag.seconds);
                }
            }
            Ok(())
        }
        Command::FxRates(FxCommand::Load { file }) => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&file)?
            };
            let parsed = tidemark_ingest::fx::parse(&text).map_err(|problem| {
                let lines: Vec<String> = problem
                    .errors
                    .iter()
                    .map(|e| format!("{}: {}", e.pointer, e.detail))
                    .collect();
                anyhow::anyhow!("{}:\n{}", file.display(), lines.join("\n"))
            })?;
            let pool = postgres::pool(&config.postgres, "tidemark-ingest")?;
            let loaded = tidemark_ingest::fx::store(&pool, &parsed).await?;
            println!("{}", serde_json::to_string_pretty(&loaded)?);
            Ok(())
        }
    }
}
