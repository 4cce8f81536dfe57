//! order-service configuration: command-line flags, each with an
//! environment variable and a default that works with `make run`.

use std::net::SocketAddr;

use orderflow_consumer::ConsumerArgs;
use orderflow_telemetry::LogArgs;

/// Configuration of order-service.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "order-service", version, about = "orderflow order-service: the HTTP API and the order aggregate")]
pub struct Config {
    /// Address the HTTP API listens on (port 0 picks a free port).
    #[arg(long, env = "ORDER_HTTP_ADDR", default_value = "127.0.0.1:8000")]
    pub http_addr: SocketAddr,
    /// The service's own PostgreSQL database.
    #[arg(long, env = "ORDER_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/orderflow_orders", value_parser = orderflow_telemetry::args::pg_url)]
    pub database_url: String,
    /// Connections in the database pool.
    #[arg(long, env = "ORDER_DB_POOL_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub db_pool_size: u16,
    /// Create the database at start if it does not exist.
    #[arg(long, env = "ORDER_CREATE_DATABASE", default_value_t = true, action = clap::ArgAction::Set)]
    pub create_database: bool,
    /// Maximum lines per order.
    #[arg(long, env = "ORDER_MAX_ITEMS", default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=10_000))]
    pub max_items: u16,
    /// Maximum request body size in bytes.
    #[arg(long, env = "ORDER_MAX_BODY_BYTES", default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(256..=16_777_216))]
    pub max_body_bytes: u32,
    /// Tasks writing new orders (each takes a pool connection while it writes).
    #[arg(long, env = "ORDER_INTAKE_WRITERS", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub intake_writers: u16,
    /// Most orders written in one transaction: requests that arrive while a write is in
    /// progress share the next commit (1 writes every order alone).
    #[arg(long, env = "ORDER_INTAKE_BATCH_MAX", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub intake_batch_max: u16,
    /// Broker and consumer options.
    #[command(flatten)]
    pub consumer: ConsumerArgs,
    /// Logging options.
    #[command(flatten)]
    pub log: LogArgs,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clap::{CommandFactory, Parser};

    use super::*;

    #[test]
    fn defaults_parse() {
        Config::command().debug_assert();
        let cfg = Config::try_parse_from(["order-service"]).unwrap();
        assert_eq!(cfg.http_addr.port(), 8000);
        assert_eq!(cfg.consumer.topology_prefix, "orderflow");
        assert_eq!(cfg.consumer.retry_delays.len(), 3);
    }

    #[test]
    fn bad_values_fail_with_what_and_how() {
        let err = Config::try_parse_from(["order-service", "--http-addr", "nope"]).unwrap_err();
        assert!(err.to_string().contains("--http-addr"), "{err}");
        let err = Config::try_parse_from(["order-service", "--retry-delays", "1s,later"]).unwrap_err();
        assert!(err.to_string().contains("examples"), "{err}");
        let err = Config::try_parse_from(["order-service", "--topology-prefix", "a b"]).unwrap_err();
        assert!(err.to_string().contains("letters"), "{err}");
    }
}
