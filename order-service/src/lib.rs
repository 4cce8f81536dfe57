//! orderflow order-service: the HTTP API and the order aggregate.
//!
//! `POST /orders` stores the order and its `order.created` event in one
//! transaction (the transactional outbox); the relay publishes it. The
//! consumer ([`outcomes`]) moves orders to `confirmed` or `failed` as the
//! pipeline reports back, with an optimistic version check.

pub mod api;
pub mod app;
pub mod config;
pub mod domain;
pub mod outcomes;
pub mod schema;
pub mod store;

pub use app::{MIGRATIONS, build};
pub use config::Config;

/// Entry point of the `order-service` binary: parses the configuration (a bad value
/// fails here with one line saying what and how), serves until SIGTERM or
/// Ctrl-C, then drains.
pub fn main() -> std::process::ExitCode {
    use clap::Parser;
    use std::process::ExitCode;

    let cfg = Config::parse();
    let _telemetry = match orderflow_telemetry::init(&cfg.log, orderflow_telemetry::LogTo::Stdout, "order-service") {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("order-service: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("order-service: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = orderflow_web::shutdown_signal();
        let service = match build(cfg, shutdown).await {
            Ok(service) => service,
            Err(e) => {
                tracing::error!("cannot start: {e}");
                eprintln!("order-service: cannot start: {e}");
                return ExitCode::FAILURE;
            }
        };
        match service.run_until_stopped().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("server failed: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
