//! `loadgen`: open-loop load on order-service. Schedules `POST /orders` at a
//! fixed rate, polls each order until it is final, and reports rates,
//! latencies from the scheduled time, final statuses and its own CPU.
//!
//! ```text
//! loadgen --rate 200 --duration 30s                       # against `make run`
//! loadgen --rate 2000 --no-poll --connections 64 ...      # intake only
//! ```

use std::process::ExitCode;
use std::rc::Rc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use orderflow_e2e::load::{self, HttpApi, LoadConfig, Mix, PollPolicy};

/// Open-loop load on order-service (see `make bench` and docs/benchmarks.md).
#[derive(Debug, Parser)]
#[command(name = "loadgen", about)]
struct Args {
    /// order-service's base URL.
    #[arg(long, env = "ORDER_URL", default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Orders scheduled per second.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// How long orders are scheduled, e.g. 30s.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// The start left out of rates and latencies.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Most POSTs in flight (keep-alive connections for POSTs).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Most polls in flight (connections of their own); default 8, or 1024
    /// with --wait (each pending order holds one).
    #[arg(long)]
    poll_connections: Option<usize>,
    /// Long polls: each `GET /orders/{id}?wait=N` waits on the server up to
    /// N seconds for the order to be final (0: polls at --poll-min..--poll-max).
    #[arg(long, default_value_t = 10)]
    wait: u64,
    /// Only POST (intake); do not poll the orders.
    #[arg(long)]
    no_poll: bool,
    /// Shortest wait between polls of an order.
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    poll_min: Duration,
    /// Wait between polls as a share of the order's age (older orders are polled less often).
    #[arg(long, default_value_t = 0.1)]
    poll_factor: f64,
    /// Longest wait between polls of an order.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    poll_max: Duration,
    /// How long to keep polling after the load for orders to become final.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    drain: Duration,
    /// Spread orders over the first N products of the catalog (3: hot products; 0: all).
    #[arg(long, default_value_t = 0)]
    products: usize,
    /// Lines per order.
    #[arg(long, default_value_t = 1)]
    lines: usize,
    /// The catalog, as processor-service takes it: JSON inline or @file (default: GET --products-url).
    #[arg(long)]
    catalog: Option<String>,
    /// Where to read the catalog when --catalog is not given.
    #[arg(long, default_value = "http://127.0.0.1:8001/products")]
    products_url: String,
    /// Prefix of the order ids (default: `lg` and the time), unique per run.
    #[arg(long)]
    tag: Option<String>,
    /// Seed of the product choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

async fn catalog(args: &Args) -> anyhow::Result<Vec<load::CatalogItem>> {
    let bytes = match &args.catalog {
        Some(spec) => match spec.strip_prefix('@') {
            Some(path) => std::fs::read(path).with_context(|| format!("cannot read the catalog file {path}"))?,
            None => spec.clone().into_bytes(),
        },
        None => reqwest::get(&args.products_url)
            .await
            .and_then(reqwest::Response::error_for_status)
            .with_context(|| {
                format!(
                    "cannot read the catalog from {}; is processor-service running? (or pass --catalog)",
                    args.products_url
                )
            })?
            .bytes()
            .await?
            .to_vec(),
    };
    Ok(load::parse_catalog(&bytes)?)
}

async fn run(args: Args) -> anyhow::Result<String> {
    let catalog = catalog(&args).await?;
    let tag = args.tag.clone().unwrap_or_else(|| {
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        format!("lg{now}")
    });
    let products = if args.products == 0 { catalog.len() } else { args.products };
    let cfg = LoadConfig {
        rate: args.rate,
        duration: args.duration,
        warmup: args.warmup,
        connections: args.connections.max(1),
        poll_connections: args.poll_connections.unwrap_or(if args.wait > 0 { 1024 } else { 8 }).max(1),
        poll: !args.no_poll,
        poll_policy: PollPolicy {
            min: args.poll_min,
            factor: args.poll_factor,
            max: args.poll_max,
            long_poll: (args.wait > 0).then(|| Duration::from_secs(args.wait)),
        },
        drain: args.drain,
        catalog,
        mix: Mix { products, lines: args.lines },
        tag,
        seed: args.seed,
    };
    let api = HttpApi::new(&args.url, cfg.connections + cfg.poll_connections)?;
    let report = load::run_with(Rc::new(api), cfg).await?;
    Ok(if args.json { serde_json::to_string(&report)? + "\n" } else { report.render() })
}

fn main() -> ExitCode {
    let args = Args::parse();
    // One thread: the driver must cost far less than what it measures.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(text) => {
            // The report is this program's output.
            let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}
