//! orderflow processor-service: the pipeline stages.
//!
//! Each stage is its own consumer with its own queue and inbox, chained by
//! events: [`inventory`] reserves stock for `order.created`, [`payment`]
//! charges `inventory.reserved` by deterministic rules, [`shipping`] ships
//! `payment.authorized`, [`notification`] tells the customer the outcome. Compensations (a declined payment, a cancelled
//! order) give stock and money back. Stock bookkeeping (on hand + reserved
//! + shipped = received) is a CHECK constraint, so it holds at every commit.

pub mod api;
pub mod app;
pub mod catalog;
pub mod config;
pub mod inventory;
pub mod notification;
pub mod payment;
pub mod schema;
pub mod shipping;
pub mod store;

pub use app::{MIGRATIONS, build};
pub use config::Config;

/// Entry point of the `processor-service` binary: parses the configuration (a bad value
/// fails here with one line saying what and how), serves until SIGTERM or
/// Ctrl-C, then drains.
pub fn main() -> std::process::ExitCode {
    use clap::Parser;
    use std::process::ExitCode;

    let cfg = Config::parse();
    let _telemetry = match orderflow_telemetry::init(&cfg.log, orderflow_telemetry::LogTo::Stdout, "processor-service")
    {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("processor-service: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("processor-service: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = orderflow_web::shutdown_signal();
        let service = match build(cfg, shutdown).await {
            Ok(service) => service,
            Err(e) => {
                tracing::error!("cannot start: {e}");
                eprintln!("processor-service: cannot start: {e}");
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
