use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use clap::{Args, Parser, Subcommand};
use secrecy::ExposeSecret;
use tidemark_generator::{BackfillPlan, Format, Sender, Shape, StreamPlan, Tally};
use tidemark_platform::service::{self, CommonArgs, ENV_HELP};
use tidemark_platform::shutdown;

/// Tidemark generator: realistic demo orders, deterministic from a seed, sent to the
/// ingest API.
///
/// Cities of skewed sizes, each with its currency and time zone; users living in
/// them; products in categories with price ranges and Zipf popularity; a daily
/// rhythm; varied basket sizes. `stream` and `backfill` end with a summary of what
/// ingest stored (orders, items, revenue per currency) to compare with the served
/// totals.
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
    /// Serve /healthz, /readyz and /metrics, streaming at `stream.rate` (the default;
    /// what `cargo xtask up` runs).
    Serve,
    /// Send live orders at a steady rate until --count, --duration or Ctrl-C.
    Stream {
        #[command(flatten)]
        target: Target,
        /// Orders per second.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Stop after this many orders.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long)]
        duration: Option<u64>,
    },
    /// Print demo exchange rates (ECB CSV format, units per euro) for the shop's
    /// currencies, weekdays of the last `--days` days; load them with
    /// `tidemark-ingest fx-rates load -` or `PUT /v1/fx-rates`.
    FxRates {
        #[arg(long, default_value_t = 400)]
        days: u64,
        #[arg(long, default_value_t = 4217)]
        seed: u64,
    },
    /// Send `--days` of history before `--until`, following each city's daily rhythm.
    Backfill {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 7)]
        days: u32,
        #[arg(long, default_value_t = 5_000)]
        orders_per_day: u64,
        /// End of the history (RFC 3339); the start of the current hour by default,
        /// so a rerun within the hour resends the same orders (as duplicates).
        #[arg(long)]
        until: Option<DateTime<Utc>>,
        /// Requests in flight.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
    },
}

#[derive(Args)]
struct Target {
    /// The ingest API (default: target.ingest_url of the configuration).
    #[arg(long, env = "TIDEMARK_INGEST_URL")]
    url: Option<String>,
    /// An API key with the `ingest` scope (default: target.api_key).
    #[arg(long, env = "TIDEMARK_INGEST_KEY", hide_env_values = true)]
    key: Option<String>,
    /// Seed of the orders; from the clock when absent (and printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Orders per request.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    #[arg(long, value_enum, default_value_t = Format::Json)]
    format: Format,
    /// Number of users in the generated world.
    #[arg(long, default_value_t = 20_000)]
    users: usize,
    /// Number of products in the catalogue.
    #[arg(long, default_value_t = 400)]
    products: usize,
    /// Print the summary as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

impl Target {
    fn sender(&self, config: &tidemark_generator::Config) -> anyhow::Result<Sender> {
        let url = self
            .url
            .clone()
            .unwrap_or_else(|| config.target.ingest_url.clone());
        let key = match (&self.key, &config.target.api_key) {
            (Some(key), _) => key.clone(),
            (None, Some(key)) => key.expose_secret().to_owned(),
            (None, None) => anyhow::bail!(
                "no API key: pass --key, or set TIDEMARK_INGEST_KEY (source .tidemark/stack.env)"
            ),
        };
        Sender::new(&url, &key, self.format)
    }

    fn shape(&self) -> Shape {
        Shape {
            users: self.users,
            products: self.products,
            ..Shape::default()
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config: tidemark_generator::Config =
        service::load(&cli.common, |c: &tidemark_generator::Config| &c.telemetry)?;
    let progress = std::io::stderr().is_terminal();
    let (target, seed, tally) = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let listener = service::bind(config.http.listen).await?;
            return tidemark_generator::serve(config, listener, shutdown::on_signal()).await;
        }
        Command::FxRates { days, seed } => {
            let last = Utc::now().date_naive();
            let first = last - chrono::Days::new(days);
            print!("{}", tidemark_generator::fx_rates_csv(first, last, seed));
            return Ok(());
        }
        Command::Stream {
            target,
            rate,
            count,
            duration,
        } => {
            let plan = StreamPlan {
                seed: target.seed.unwrap_or_else(tidemark_generator::clock_seed),
                rate,
                batch: target.batch,
                count,
                duration: duration.map(Duration::from_secs),
                shape: target.shape(),
            };
            let sender = target.sender(&config)?;
            let tally =
                tidemark_generator::stream(&sender, &plan, shutdown::on_signal(), progress).await?;
            (target, plan.seed, tally)
        }
        Command::Backfill {
            target,
            days,
            orders_per_day,
            until,
            concurrency,
        } => {
            let until = match until {
                Some(t) => t,
                None => Utc::now()
                    .duration_trunc(TimeDelta::hours(1))
                    .context("truncating the clock")?,
            };
            let plan = BackfillPlan {
                seed: target.seed.unwrap_or_else(tidemark_generator::clock_seed),
                days,
                per_day: orders_per_day,
                until,
                batch: target.batch,
                concurrency,
                shape: target.shape(),
            };
            let sender = target.sender(&config)?;
            let tally =
                tidemark_generator::backfill(&sender, &plan, shutdown::on_signal(), progress)
                    .await?;
            (target, plan.seed, tally)
        }
    };
    print_summary(seed, &tally, target.json)?;
    if tally.rejected > 0 {
        anyhow::bail!("{} orders were not stored (see the log)", tally.rejected);
    }
    Ok(())
}

fn print_summary(seed: u64, tally: &Tally, json: bool) -> anyhow::Result<()> {
    if json {
        let mut value = serde_json::to_value(tally)?;
        value["seed"] = seed.into();
        println!("{value}");
        return Ok(());
    }
    println!("Sent with seed {seed}:");
    print!("{tally}");
    if let (Some(from), Some(to)) = (tally.first_event, tally.last_event) {
        println!(
            "  event times      {} .. {}",
            from.to_rfc3339(),
            to.to_rfc3339()
        );
        println!(
            "Compare: curl -H \"Authorization: Bearer $TIDEMARK_READ_KEY\" \
             \"$TIDEMARK_SERVING_URL/v1/revenue/summary?from={}&to={}\"",
            from.format("%Y-%m-%dT%H:00:00Z"),
            (to + TimeDelta::hours(1)).format("%Y-%m-%dT%H:00:00Z"),
        );
    }
    Ok(())
}
