//! `make chaos`: places orders while killing processes and cutting
//! connections, then prints what was injected and which invariants held.
//! Exits non-zero if any did not.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use orderflow_e2e::chaos::{self, ChaosConfig};

/// A chaos run against real PostgreSQL and RabbitMQ (see `make chaos`).
#[derive(Debug, Parser)]
#[command(name = "chaos", about)]
struct Args {
    /// Orders to place.
    #[arg(long, default_value_t = 300)]
    orders: usize,
    /// Clients placing them at once.
    #[arg(long, default_value_t = 6)]
    clients: usize,
    /// How long faults are injected, e.g. 2m.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Shortest pause between faults.
    #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration)]
    pause_min: Duration,
    /// Longest pause between faults.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pause_max: Duration,
    /// Share of accepted orders then cancelled (0.0 to 1.0).
    #[arg(long, default_value_t = 0.25)]
    cancel_share: f64,
    /// Relays per service database.
    #[arg(long, default_value_t = 2)]
    relays_per_db: usize,
    /// Seed of every random choice (default: the time), printed for reruns.
    #[arg(long)]
    seed: Option<u64>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(1)
    });
    let cfg = ChaosConfig {
        orders: args.orders,
        clients: args.clients.max(1),
        duration: args.duration,
        pause: (args.pause_min, args.pause_max.max(args.pause_min)),
        cancel_share: args.cancel_share.clamp(0.0, 1.0),
        seed,
        relays_per_db: args.relays_per_db.max(1),
    };
    let Ok(runtime) = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() else {
        eprintln!("chaos: cannot start the runtime");
        return ExitCode::FAILURE;
    };
    let report = runtime.block_on(chaos::run(cfg));
    // The report is this program's output.
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), report.render().as_bytes());
    if report.passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
