//! `outbox-relay`: the relay daemon that publishes one service database's
//! outbox to RabbitMQ (run it as a sidecar next to the service), and the
//! operator commands that inspect and repair it.

pub mod catalog;
pub mod cli;
pub mod console;
mod describe;
mod dlq;
mod ops;
mod output;
mod run;

pub use cli::main;
