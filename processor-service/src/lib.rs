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
mod registration;
pub mod schema;
pub mod shipping;
pub mod store;

pub use app::{MIGRATIONS, build};
pub use config::Config;
pub use registration::describe_and_register;

/// Entry point of the `processor-service` binary: parses the configuration (a bad value
/// fails here with one line saying what and how), serves until SIGTERM or
/// Ctrl-C, then drains.
pub fn main() -> std::process::ExitCode {
    let cfg = <Config as clap::Parser>::parse();
    let log = cfg.log.clone();
    orderflow_web::run("processor-service", &log, move |shutdown| build(cfg, shutdown))
}
