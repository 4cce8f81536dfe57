//! processor-service configuration: command-line flags, each with an
//! environment variable and a default that works with `make run`.

use std::net::SocketAddr;
use std::time::Duration;

use orderflow_consumer::ConsumerArgs;
use orderflow_contracts::Money;
use orderflow_telemetry::LogArgs;

use crate::catalog::{DEMO_CATALOG, NewProduct, parse_catalog};

/// Configuration of processor-service.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "processor-service",
    version,
    about = "orderflow processor-service: inventory, payment and shipping stages"
)]
pub struct Config {
    /// Address the HTTP API listens on (port 0 picks a free port).
    #[arg(long, env = "PROCESSOR_HTTP_ADDR", default_value = "127.0.0.1:8001")]
    pub http_addr: SocketAddr,
    /// The service's own PostgreSQL database.
    #[arg(long, env = "PROCESSOR_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/orderflow_processor", value_parser = orderflow_telemetry::args::pg_url)]
    pub database_url: String,
    /// Connections in the database pool.
    #[arg(long, env = "PROCESSOR_DB_POOL_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub db_pool_size: u16,
    /// Create the database at start if it does not exist.
    #[arg(long, env = "PROCESSOR_CREATE_DATABASE", default_value_t = true, action = clap::ArgAction::Set)]
    pub create_database: bool,
    /// Products seeded at start (existing SKUs are left alone): a JSON
    /// array of {sku, name, price, on_hand}, inline or `@file.json`.
    #[arg(long, env = "PRODUCT_CATALOG", default_value = DEMO_CATALOG, value_parser = parse_catalog_arg, hide_default_value = true)]
    pub catalog: Catalog,
    /// Orders with any of these SKUs are declined by payment (comma-separated).
    #[arg(long, env = "PAYMENT_BLOCKED_SKUS", value_delimiter = ',', default_value = "")]
    pub payment_blocked_skus: Vec<String>,
    /// Orders above this amount are declined by payment: a decimal amount
    /// in major units, e.g. `10000` or `2500.50`.
    #[arg(long, env = "PAYMENT_AMOUNT_LIMIT", default_value = "10000.00", value_parser = parse_amount)]
    pub payment_amount_limit: Money,
    /// Share of other orders declined at random (0.0 to 1.0).
    #[arg(long, env = "PAYMENT_DECLINE_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub payment_decline_rate: f64,
    /// Seed of the random declines (same seed and order: same decision).
    #[arg(long, env = "PAYMENT_DECLINE_SEED", default_value_t = 42)]
    pub payment_decline_seed: u64,
    /// Maximum request body size in bytes.
    #[arg(long, env = "PROCESSOR_MAX_BODY_BYTES", default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(256..=16_777_216))]
    pub max_body_bytes: u32,
    /// Stages this process runs (comma-separated). Every stage's queue is
    /// declared either way, so a stage that is not running keeps its messages.
    #[arg(
        long,
        env = "PROCESSOR_STAGES",
        value_enum,
        value_delimiter = ',',
        default_value = "inventory,payment,shipping,notification"
    )]
    pub stages: Vec<Stage>,
    /// Bearer token that creating products and setting stock require
    /// (`Authorization: Bearer <token>`). Unset: those endpoints are open
    /// (local use), and the service says so at start.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Webhook that notifications are POSTed to (unset: they are recorded, not delivered).
    #[arg(long, env = "NOTIFY_WEBHOOK_URL", value_parser = orderflow_telemetry::args::http_url)]
    pub notify_webhook_url: Option<String>,
    /// Timeout of one webhook call.
    #[arg(long, env = "NOTIFY_WEBHOOK_TIMEOUT", default_value = "5s", value_parser = orderflow_telemetry::args::positive_duration)]
    pub notify_webhook_timeout: Duration,
    /// Quick retries of a failed call within one delivery attempt.
    #[arg(long, env = "NOTIFY_QUICK_RETRIES", default_value_t = 2, value_parser = clap::value_parser!(u8).range(0..=10))]
    pub notify_quick_retries: u8,
    /// First wait between delivery attempts; doubles per attempt, with jitter.
    #[arg(long, env = "NOTIFY_RETRY_BASE", default_value = "1s", value_parser = orderflow_telemetry::args::positive_duration)]
    pub notify_retry_base: Duration,
    /// Longest wait between delivery attempts.
    #[arg(long, env = "NOTIFY_RETRY_MAX", default_value = "5m", value_parser = orderflow_telemetry::args::positive_duration)]
    pub notify_retry_max: Duration,
    /// Attempts after which a notification is marked failed (it is still retried).
    #[arg(long, env = "NOTIFY_MAX_ATTEMPTS", default_value_t = 10, value_parser = clap::value_parser!(i32).range(1..))]
    pub notify_max_attempts: i32,
    /// Consecutive failed calls that open the webhook's circuit breaker.
    #[arg(long, env = "NOTIFY_BREAKER_THRESHOLD", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub notify_breaker_threshold: u32,
    /// How long the breaker stays open before one probe call.
    #[arg(long, env = "NOTIFY_BREAKER_COOLDOWN", default_value = "10s", value_parser = orderflow_telemetry::args::positive_duration)]
    pub notify_breaker_cooldown: Duration,
    /// Look for due notifications this often even without a NOTIFY.
    #[arg(long, env = "NOTIFY_POLL_INTERVAL", default_value = "1s", value_parser = orderflow_telemetry::args::positive_duration)]
    pub notify_poll_interval: Duration,
    /// Broker and consumer options.
    #[command(flatten)]
    pub consumer: ConsumerArgs,
    /// Logging options.
    #[command(flatten)]
    pub log: LogArgs,
}

/// A pipeline stage of processor-service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    /// Reserves and releases stock.
    Inventory,
    /// Charges and refunds.
    Payment,
    /// Ships paid orders.
    Shipping,
    /// Records and delivers notifications.
    Notification,
}

/// The parsed catalog (a newtype so clap treats it as one value).
#[derive(Debug, Clone)]
pub struct Catalog(pub Vec<NewProduct>);

fn parse_catalog_arg(s: &str) -> Result<Catalog, String> {
    parse_catalog(s).map(Catalog)
}

fn parse_amount(s: &str) -> Result<Money, String> {
    match Money::parse(s) {
        Ok(m) if m >= Money::ZERO => Ok(m),
        Ok(_) => Err("expected an amount of 0 or more, e.g. 10000 or 2500.50".into()),
        Err(e) => Err(format!("expected a decimal amount in major units, e.g. 10000 or 2500.50: {e}")),
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err("expected a number from 0.0 to 1.0".into()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clap::{CommandFactory, Parser};

    use super::*;

    #[test]
    fn defaults_parse_and_seed_the_demo_catalog() {
        Config::command().debug_assert();
        let cfg = Config::try_parse_from(["processor-service"]).unwrap();
        assert_eq!(cfg.catalog.0.len(), 6);
        assert_eq!(cfg.payment_amount_limit, Money::from_minor(1_000_000));
        assert_eq!(cfg.payment_decline_rate, 0.0);
        assert_eq!(cfg.stages, [Stage::Inventory, Stage::Payment, Stage::Shipping, Stage::Notification]);
        assert!(cfg.notify_webhook_url.is_none());
    }

    #[test]
    fn bad_values_fail_with_what_and_how() {
        let err = Config::try_parse_from(["processor-service", "--payment-amount-limit", "10.001"]).unwrap_err();
        assert!(err.to_string().contains("at most 2 decimal places"), "{err}");
        let cfg = Config::try_parse_from(["processor-service", "--payment-amount-limit", "2500.50"]).unwrap();
        assert_eq!(cfg.payment_amount_limit, Money::from_minor(250_050));
        let err = Config::try_parse_from(["processor-service", "--payment-decline-rate", "2"]).unwrap_err();
        assert!(err.to_string().contains("0.0 to 1.0"), "{err}");
        let err = Config::try_parse_from(["processor-service", "--catalog", r#"[{"sku":""}]"#]).unwrap_err();
        assert!(err.to_string().contains("catalog"), "{err}");
        let err = Config::try_parse_from(["processor-service", "--stages", "inventory,billing"]).unwrap_err();
        assert!(err.to_string().contains("billing"), "{err}");
        let err = Config::try_parse_from(["processor-service", "--notify-webhook-url", "ftp://x"]).unwrap_err();
        assert!(err.to_string().contains("http://"), "{err}");
        let err = Config::try_parse_from(["processor-service", "--database-url", "mysql://x"]).unwrap_err();
        assert!(err.to_string().contains("postgres://"), "{err}");
    }

    #[test]
    fn lists_are_comma_separated() {
        let cfg =
            Config::try_parse_from(["processor-service", "--payment-blocked-skus", "A,B", "--retry-delays", "1s,2m"])
                .unwrap();
        assert_eq!(cfg.payment_blocked_skus, ["A", "B"]);
        assert_eq!(cfg.consumer.retry_delays, [std::time::Duration::from_secs(1), std::time::Duration::from_secs(120)]);
    }
}
