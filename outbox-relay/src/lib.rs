//! `outbox-relay`: the relay daemon that publishes one service database's
//! outbox to RabbitMQ (run it as a sidecar next to the service), and the
//! operator commands that inspect and repair it.

pub mod cli;
pub mod console;
mod dlq;
mod ops;
mod run;

pub use cli::main;
