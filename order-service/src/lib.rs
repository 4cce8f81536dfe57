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
pub mod intake;
pub mod outcomes;
mod registration;
pub mod schema;
pub mod store;
pub mod waiters;

pub use app::{MIGRATIONS, build};
pub use config::Config;
pub use registration::describe_and_register;

/// Entry point of the `order-service` binary: parses the configuration (a bad value
/// fails here with one line saying what and how), serves until SIGTERM or
/// Ctrl-C, then drains.
pub fn main() -> std::process::ExitCode {
    let cfg = <Config as clap::Parser>::parse();
    let log = cfg.log.clone();
    orderflow_web::run("order-service", &log, move |shutdown| build(cfg, shutdown))
}
