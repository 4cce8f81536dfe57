//! The orderflow test kit.
//!
//! - [`infra`]: where the real PostgreSQL and RabbitMQ are. In order: the
//!   `TEST_DATABASE_URL` / `TEST_AMQP_URL` environment variables; the local
//!   defaults (127.0.0.1:5432 as postgres, 127.0.0.1:5672 as guest) when
//!   something listens there; containers started with testcontainers when a
//!   Docker engine answers; otherwise a panic saying what was tried. Tests
//!   never skip silently.
//! - [`TestDb`]: a fresh, migrated database per test, dropped afterwards.
//! - [`TestBroker`]: a fresh topology prefix per test; the queues it declared
//!   are deleted afterwards.
//! - [`FaultProxy`]: a TCP proxy that cuts, stalls and restores connections.
//! - [`events`]: the platform tests' own events (no service's catalog).
//! - [`Cluster`]: a local 3-node RabbitMQ cluster whose nodes a test may
//!   stop, kill and start again.
//! - [`eventually`]: wait for a condition with a deadline, never a fixed sleep.
#![allow(clippy::expect_used, clippy::unwrap_used)]

pub mod broker;
pub mod cluster;
mod db;
mod detect;
pub mod events;
mod proxy;
mod wait;

pub use broker::TestBroker;
pub use cluster::Cluster;
pub use db::{TestDb, count};
pub use detect::{Infra, infra};
pub use proxy::{FaultProxy, ProxyMode};
pub use wait::{eventually, eventually_some};

/// Installs a tracing subscriber for tests once per process; `TEST_LOG`
/// (an env-filter, e.g. `info` or `orderflow_outbox=debug`) turns it on.
pub fn init_tracing() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = std::env::var("TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
    });
}
