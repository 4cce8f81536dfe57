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
