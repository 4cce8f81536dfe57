//! The command line.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use orderflow_telemetry::LogArgs;

/// orderflow outbox relay and operator CLI.
#[derive(Debug, Parser)]
#[command(name = "outbox-relay", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Logging options.
    #[command(flatten)]
    pub log: LogArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay: publish the outbox of one service database until stopped (SIGTERM/Ctrl-C).
    Run(RunArgs),
}

/// Where the outbox and the broker are.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// The service database whose outbox is relayed.
    #[arg(long, env = "DATABASE_URL", value_parser = orderflow_telemetry::args::pg_url)]
    pub database_url: String,
    /// RabbitMQ URL.
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,
    /// Prefix of every exchange and queue name.
    #[arg(long, env = "ORDERFLOW_PREFIX", default_value = "orderflow")]
    pub topology_prefix: String,
}

/// Options of `run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Database, broker and prefix.
    #[command(flatten)]
    pub target: Target,
    /// Name shown as lane owner and in logs (default: relay-<pid>).
    #[arg(long, env = "RELAY_ID")]
    pub relay_id: Option<String>,
    /// Rows claimed and published per transaction.
    #[arg(long, env = "RELAY_BATCH_SIZE", default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..=10_000))]
    pub batch_size: i64,
    /// Claim this often even without a NOTIFY (e.g. 1s, 250ms).
    #[arg(long, env = "RELAY_POLL_INTERVAL", default_value = "1s", value_parser = orderflow_telemetry::args::duration)]
    pub poll_interval: Duration,
    /// Failed publishes of a row before it is marked dead.
    #[arg(long, env = "RELAY_MAX_ATTEMPTS", default_value_t = 10, value_parser = clap::value_parser!(i32).range(1..=1000))]
    pub max_attempts: i32,
    /// First backoff of a failed row; doubles per attempt, with jitter.
    #[arg(long, env = "RELAY_RETRY_BASE", default_value = "500ms", value_parser = orderflow_telemetry::args::duration)]
    pub retry_base: Duration,
    /// Longest backoff of a failed row.
    #[arg(long, env = "RELAY_RETRY_MAX", default_value = "5m", value_parser = orderflow_telemetry::args::duration)]
    pub retry_max: Duration,
    /// A publish not confirmed within this counts as a broker failure.
    #[arg(long, env = "RELAY_CONFIRM_TIMEOUT", default_value = "30s", value_parser = orderflow_telemetry::args::duration)]
    pub confirm_timeout: Duration,
    /// Longest wait between reconnect attempts while the broker or the database is down.
    #[arg(long, env = "RELAY_RECONNECT_MAX", default_value = "30s", value_parser = orderflow_telemetry::args::duration)]
    pub reconnect_max: Duration,
    /// Address of the relay's /metrics and /health (port 0: any free port; "off" to disable).
    #[arg(long, env = "RELAY_METRICS_ADDR", default_value = "127.0.0.1:9100", value_parser = parse_metrics_addr)]
    pub metrics_addr: MetricsAddr,
}

/// Where the relay serves /metrics, if anywhere.
#[derive(Debug, Clone, Copy)]
pub struct MetricsAddr(pub Option<SocketAddr>);

fn parse_metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    if s == "off" {
        return Ok(MetricsAddr(None));
    }
    s.parse().map(|a| MetricsAddr(Some(a))).map_err(|e| format!("{e} (example: 127.0.0.1:9100, or off)"))
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = orderflow_telemetry::init(&cli.log) {
        eprintln!("outbox-relay: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outbox-relay: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => crate::run::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outbox-relay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn run_parses_with_defaults() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["outbox-relay", "run", "--database-url", "postgres://x@h/db"]).unwrap();
        let Command::Run(args) = cli.command;
        assert_eq!(args.batch_size, 500);
        assert_eq!(args.poll_interval, Duration::from_secs(1));
        assert!(args.metrics_addr.0.is_some());
        let off = Cli::try_parse_from([
            "outbox-relay",
            "run",
            "--database-url",
            "postgres://x@h/db",
            "--metrics-addr",
            "off",
        ])
        .unwrap();
        let Command::Run(args) = off.command;
        assert!(args.metrics_addr.0.is_none());
    }

    #[test]
    fn bad_values_say_what_and_how() {
        let err = Cli::try_parse_from(["outbox-relay", "run", "--database-url", "x"]).unwrap_err();
        assert!(err.to_string().contains("postgres://"), "{err}");
        let err =
            Cli::try_parse_from(["outbox-relay", "run", "--database-url", "postgres://h/d", "--poll-interval", "soon"])
                .unwrap_err();
        assert!(err.to_string().contains("examples"), "{err}");
    }
}
