//! The command line.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use orderflow_telemetry::LogArgs;
use orderflow_web::AdminToken;

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
    /// Show the outbox: backlog, oldest unpublished age, dead rows by event type, relays and their lanes.
    Status(StatusArgs),
    /// Make dead or stuck outbox rows due again (they are published at once), and record who did it.
    ///
    /// Select rows by id, aggregate, event type and time; every given filter must match. Without
    /// any filter, --all is required. Use --dry-run first to see what would be replayed.
    Replay(ReplayArgs),
    /// List recorded replays and dead-letter requeues (who, when, what, why).
    Replays(ReplaysArgs),
    /// Inspect and requeue the broker's dead-letter queues.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Show the topology on the broker: the exchange, and per consumer its queue, bindings,
    /// delivery limit, retry tiers (delay queues) and dead-letter queue, with message counts.
    ///
    /// Each value says where it comes from: the broker (passive declares), the consumer
    /// catalog file (--consumers-file), the consumer settings shared with the services
    /// (CONSUMER_*), or the platform's naming rules.
    Describe(DescribeArgs),
    /// Print a shell completion script, e.g. `outbox-relay completions bash > /etc/bash_completion.d/outbox-relay`.
    Completions(CompletionsArgs),
    /// Print the man page (roff), or write one per command into a directory.
    Man(ManArgs),
}

/// Where the outbox is.
#[derive(Debug, Clone, Args)]
pub struct DbTarget {
    /// The service database.
    #[arg(long, env = "DATABASE_URL", value_parser = orderflow_telemetry::args::pg_url)]
    pub database_url: String,
}

/// Options of `status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// The service database.
    #[command(flatten)]
    pub db: DbTarget,
    /// Print JSON instead of text (field names are stable; see docs/operations.md, "Operator commands").
    #[arg(long)]
    pub json: bool,
    /// Redraw every INTERVAL (default 2s) until Ctrl-C; with --json, one JSON document per line.
    #[arg(long, value_name = "INTERVAL", num_args = 0..=1, default_missing_value = "2s", value_parser = orderflow_telemetry::args::positive_duration)]
    pub watch: Option<Duration>,
}

/// Which rows `replay` considers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ScopeArg {
    /// Rows marked dead after too many failed publishes.
    Dead,
    /// Unpublished rows backing off after failed publishes.
    Stuck,
    /// Dead and stuck rows.
    DeadOrStuck,
    /// Rows already published, to send again (consumers drop duplicates they still remember).
    Published,
}

/// Options of `replay`.
#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// The service database.
    #[command(flatten)]
    pub db: DbTarget,
    /// Which rows.
    #[arg(long, value_enum, default_value = "dead-or-stuck")]
    pub scope: ScopeArg,
    /// Only these row ids (repeat or comma-separate).
    #[arg(long = "id", value_delimiter = ',')]
    pub ids: Vec<i64>,
    /// Only this aggregate (order id).
    #[arg(long)]
    pub aggregate: Option<String>,
    /// Only this event type, e.g. order.confirmed.
    #[arg(long)]
    pub event_type: Option<String>,
    /// Only rows written at or after this time (RFC 3339, e.g. 2026-11-21T10:00:00Z).
    #[arg(long)]
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// Only rows written before this time (RFC 3339).
    #[arg(long)]
    pub until: Option<chrono::DateTime<chrono::Utc>>,
    /// Replay every row of the scope (required when no filter is given).
    #[arg(long)]
    pub all: bool,
    /// Show what would be replayed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Who and why, recorded.
    #[command(flatten)]
    pub record: Record,
    /// Print JSON instead of text (field names are stable; see docs/operations.md, "Operator commands").
    #[arg(long)]
    pub json: bool,
}

/// Who repairs and why: recorded with every replay and requeue.
#[derive(Debug, Clone, Args)]
pub struct Record {
    /// Who does it.
    #[arg(long, env = "USER", default_value = "unknown")]
    pub operator: String,
    /// Why.
    #[arg(long)]
    pub reason: Option<String>,
}

/// Options of `replays`.
#[derive(Debug, Clone, Args)]
pub struct ReplaysArgs {
    /// The service database.
    #[command(flatten)]
    pub db: DbTarget,
    /// How many, newest first.
    #[arg(long, default_value_t = 20)]
    pub limit: i64,
    /// Print JSON instead of text (field names are stable; see docs/operations.md, "Operator commands").
    #[arg(long)]
    pub json: bool,
}

/// The broker side of `dlq`.
#[derive(Debug, Clone, Args)]
pub struct BrokerTarget {
    /// RabbitMQ URL; for a cluster, one URL per node separated by commas.
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f", value_parser = orderflow_broker::AmqpUrlsParser)]
    pub amqp_url: String,
    /// Prefix of every exchange and queue name.
    #[arg(long, env = "ORDERFLOW_PREFIX", default_value = "orderflow")]
    pub topology_prefix: String,
}

/// `dlq` subcommands.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Count the messages in each consumer's dead-letter queue.
    List(DlqListArgs),
    /// Show dead letters of one consumer with why they failed (they stay in the queue).
    Show(DlqShowArgs),
    /// Send dead letters back to their consumer's queue (with fresh retries), and record it.
    Requeue(DlqRequeueArgs),
}

/// Options of `dlq list`.
#[derive(Debug, Clone, Args)]
pub struct DlqListArgs {
    /// Broker and prefix.
    #[command(flatten)]
    pub broker: BrokerTarget,
    /// Which consumers.
    #[command(flatten)]
    pub consumers: crate::catalog::ConsumerArgs,
    /// Print JSON instead of text (field names are stable; see docs/operations.md, "Operator commands").
    #[arg(long)]
    pub json: bool,
}

/// Options of `dlq show`.
#[derive(Debug, Clone, Args)]
pub struct DlqShowArgs {
    /// Broker and prefix.
    #[command(flatten)]
    pub broker: BrokerTarget,
    /// The consumer whose dead letters to show, e.g. inventory.
    #[arg(long)]
    pub consumer: String,
    /// At most this many, oldest first.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Print JSON instead of text (field names are stable; see docs/operations.md, "Operator commands").
    #[arg(long)]
    pub json: bool,
}

/// Options of `dlq requeue`.
#[derive(Debug, Clone, Args)]
pub struct DlqRequeueArgs {
    /// Broker and prefix.
    #[command(flatten)]
    pub broker: BrokerTarget,
    /// The database where the requeue is recorded (the consumer's service database).
    #[command(flatten)]
    pub db: DbTarget,
    /// The consumer whose dead letters to requeue.
    #[arg(long)]
    pub consumer: String,
    /// Only these message ids (repeat or comma-separate).
    #[arg(long = "message-id", value_delimiter = ',')]
    pub message_ids: Vec<String>,
    /// Requeue every dead letter of the consumer (required without --message-id).
    #[arg(long)]
    pub all: bool,
    /// At most this many messages are looked at.
    #[arg(long, default_value_t = 10_000)]
    pub limit: usize,
    /// Show what would be requeued; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Who and why, recorded.
    #[command(flatten)]
    pub record: Record,
    /// Print JSON instead of text (field names are stable; see docs/operations.md, "Operator commands").
    #[arg(long)]
    pub json: bool,
}

/// Options of `describe`.
#[derive(Debug, Clone, Args)]
pub struct DescribeArgs {
    /// Broker and prefix.
    #[command(flatten)]
    pub broker: BrokerTarget,
    /// Which consumers.
    #[command(flatten)]
    pub consumers: crate::catalog::ConsumerArgs,
    /// The retry delays the services run with (their delay queues are named by them); the
    /// services' setting and default.
    #[arg(long, env = "CONSUMER_RETRY_DELAYS", default_value = orderflow_broker::DEFAULT_RETRY_DELAYS, value_delimiter = ',', value_parser = orderflow_telemetry::args::positive_duration)]
    pub retry_delays: Vec<Duration>,
    /// The delivery limit the services declare their queues with; the services' setting and default.
    #[arg(long, env = "CONSUMER_DELIVERY_LIMIT", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub delivery_limit: u32,
    /// Print JSON instead of text (field names are stable; see docs/operations.md, "Operator commands").
    #[arg(long)]
    pub json: bool,
}

/// Options of `completions`.
#[derive(Debug, Clone, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Options of `man`.
#[derive(Debug, Clone, Args)]
pub struct ManArgs {
    /// Write outbox-relay.1 and a page per command (outbox-relay-status.1, ...) into this
    /// directory instead of printing the main page.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<std::path::PathBuf>,
}

/// Where the outbox and the broker are.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// The service database whose outbox is relayed.
    #[arg(long, env = "DATABASE_URL", value_parser = orderflow_telemetry::args::pg_url)]
    pub database_url: String,
    /// RabbitMQ URL; for a cluster, one URL per node separated by commas.
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f", value_parser = orderflow_broker::AmqpUrlsParser)]
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
    /// Name shown as lane owner and in logs (default: `relay-<pid>`).
    #[arg(long, env = "RELAY_ID")]
    pub relay_id: Option<String>,
    /// Rows claimed and published per transaction.
    #[arg(long, env = "RELAY_BATCH_SIZE", default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..=10_000))]
    pub batch_size: i64,
    /// Claim transactions in flight at once, each on its own database connection.
    #[arg(long, env = "RELAY_PIPELINE", default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub pipeline: u16,
    /// Claim this often even without a NOTIFY (e.g. 1s, 250ms).
    #[arg(long, env = "RELAY_POLL_INTERVAL", default_value = "1s", value_parser = orderflow_telemetry::args::duration)]
    pub poll_interval: Duration,
    /// How often lane leases are rebalanced (how fast a dead relay's lanes move).
    #[arg(long, env = "RELAY_LEASE_INTERVAL", default_value = "1s", value_parser = orderflow_telemetry::args::positive_duration)]
    pub lease_interval: Duration,
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
    /// A database operation unanswered this long means a stalled connection: the relay drops it,
    /// and the server ends a relay session that sent nothing this long, freeing its lanes for the
    /// other relays. At least twice the lease interval.
    #[arg(long, env = "RELAY_SESSION_TIMEOUT", default_value = "30s", value_parser = orderflow_telemetry::args::positive_duration)]
    pub session_timeout: Duration,
    /// Rows whose message body is larger are parked dead at once (keep it at or below the broker's
    /// max_message_size; writers refuse such events with the same default).
    #[arg(long, env = "RELAY_MAX_MESSAGE_BYTES", default_value_t = orderflow_outbox::DEFAULT_MAX_MESSAGE_BYTES, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1024..=536_870_912))]
    pub max_message_bytes: usize,
    /// Keep published rows this long (e.g. 1h, for audits or `replay --scope published`);
    /// 0 deletes them as soon as they are published, which is the fastest.
    #[arg(long, env = "RELAY_PUBLISHED_RETENTION", default_value = "0s", value_parser = orderflow_telemetry::args::duration)]
    pub published_retention: Duration,
    /// Keep inbox rows this long: the window within which a duplicate delivery is still recognized.
    #[arg(long, env = "RELAY_INBOX_RETENTION", default_value = "7days", value_parser = orderflow_telemetry::args::positive_duration)]
    pub inbox_retention: Duration,
    /// How often retention runs.
    #[arg(long, env = "RELAY_RETENTION_INTERVAL", default_value = "30s", value_parser = orderflow_telemetry::args::positive_duration)]
    pub retention_interval: Duration,
    /// Address of the relay's /metrics, /health and operator console /console (port 0: any free port; "off" to disable).
    #[arg(long, env = "RELAY_METRICS_ADDR", default_value = "127.0.0.1:9100", value_parser = parse_metrics_addr)]
    pub metrics_addr: MetricsAddr,
    /// The operator console (/console on the metrics address) and what it needs.
    #[command(flatten)]
    pub console: ConsoleArgs,
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

/// Options of the console (part of `outbox-relay run`).
#[derive(Debug, Clone, Args)]
pub struct ConsoleArgs {
    /// Token the console's actions (replay, requeue) require, as the `token` form field or
    /// `Authorization: Bearer`; unset, the console at /console is read-only.
    #[arg(long = "admin-token", env = "RELAY_ADMIN_TOKEN", hide_env_values = true, value_parser = parse_token)]
    pub admin_token: Option<AdminToken>,
    /// Consumers whose dead-letter queues the console shows.
    #[command(flatten)]
    pub consumers: crate::catalog::ConsumerArgs,
}

impl ConsoleArgs {
    /// Whether the console allows actions (a non-blank token is configured).
    pub fn is_writable(&self) -> bool {
        self.admin_token.as_ref().is_some_and(AdminToken::is_set)
    }
}

fn parse_token(s: &str) -> Result<AdminToken, String> {
    Ok(AdminToken::new(Some(s.to_owned())))
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
        let Command::Run(args) = cli.command else { panic!("run") };
        assert_eq!(args.batch_size, 500);
        assert_eq!(args.inbox_retention, Duration::from_secs(7 * 24 * 3600));
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
        let Command::Run(args) = off.command else { panic!("run") };
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
