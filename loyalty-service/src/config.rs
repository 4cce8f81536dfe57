//! loyalty-service configuration: command-line flags, each with an
//! environment variable and a default that works with `make run`.

use std::net::SocketAddr;

use orderflow_consumer::ConsumerArgs;
use orderflow_telemetry::LogArgs;

/// Configuration of loyalty-service.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "loyalty-service", version, about = "orderflow example service: loyalty points per confirmed order")]
pub struct Config {
    /// Address the HTTP API listens on (port 0 picks a free port).
    #[arg(long, env = "LOYALTY_HTTP_ADDR", default_value = "127.0.0.1:8002")]
    pub http_addr: SocketAddr,
    /// The service's own PostgreSQL database.
    #[arg(long, env = "LOYALTY_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/orderflow_loyalty", value_parser = orderflow_telemetry::args::pg_url)]
    pub database_url: String,
    /// Connections in the database pool.
    #[arg(long, env = "LOYALTY_DB_POOL_SIZE", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub db_pool_size: u16,
    /// Create the database at start if it does not exist.
    #[arg(long, env = "LOYALTY_CREATE_DATABASE", default_value_t = true, action = clap::ArgAction::Set)]
    pub create_database: bool,
    /// Broker and consumer options (AMQP_URL, CONSUMER_*), the same for every service.
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
    fn defaults_parse_and_bad_values_say_what() {
        Config::command().debug_assert();
        let cfg = Config::try_parse_from(["loyalty-service"]).unwrap();
        assert_eq!(cfg.http_addr.port(), 8002);
        let err = Config::try_parse_from(["loyalty-service", "--database-url", "mysql://x"]).unwrap_err();
        assert!(err.to_string().contains("postgres://"), "{err}");
    }
}
