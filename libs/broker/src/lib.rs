//! RabbitMQ for orderflow: connecting, declaring the prefixed topology, and
//! the AMQP properties that mirror an envelope.
//!
//! Every name lives under a prefix ([`Topology`]): one topic exchange for
//! events, and per consumer a quorum queue with a delivery limit, a delay
//! queue per retry tier (named by its delay) and a dead-letter queue. A
//! service rarely calls this crate itself: the consumer runtime
//! (`orderflow-consumer`) declares its consumer's topology at start, and
//! the relay publishes to the exchange. Errors follow the platform's error
//! policy (`orderflow_db::error`).
//!
//! ```
//! use orderflow_broker::Topology;
//!
//! let topology = Topology::new("orderflow");
//! assert_eq!(topology.events_exchange(), "orderflow.events");
//! assert_eq!(topology.queue("loyalty"), "orderflow.loyalty");
//! ```

mod properties;
mod topology;

pub use lapin;
pub use properties::{header_i64, header_str, properties_for};
pub use topology::{DEAD_LETTER_DELIVERY_LIMIT, QueueSpec, Topology};

use lapin::{Connection, ConnectionProperties};

/// Errors of the broker crate.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker could not be reached or refused the login.
    #[error("cannot connect to RabbitMQ at {url}: {reason}")]
    Unreachable {
        /// The URL tried, password redacted.
        url: String,
        /// What the client said.
        reason: String,
    },
    /// A queue exists with other arguments than those declared; a queue's
    /// arguments cannot change in place.
    #[error(
        "queue {queue} exists with {argument} = {existing}, but it was declared with {wanted}: a queue's arguments cannot change in place"
    )]
    Inequivalent {
        /// The queue.
        queue: String,
        /// The argument that differs, e.g. `x-delivery-limit`.
        argument: String,
        /// Its value on the broker (`none` if unset).
        existing: String,
        /// The value declared now (`none` if unset).
        wanted: String,
        /// The broker's refusal.
        #[source]
        source: lapin::Error,
    },
    /// A broker operation failed.
    #[error("broker operation {op} failed: {source}")]
    Operation {
        /// What was attempted, e.g. `declare queue orders.inventory`.
        op: String,
        /// The client's error.
        #[source]
        source: lapin::Error,
    },
}

impl BrokerError {
    /// Wraps a lapin error with what was being done.
    pub fn op(op: impl Into<String>) -> impl FnOnce(lapin::Error) -> Self {
        let op = op.into();
        move |source| Self::Operation { op, source }
    }
}

/// Opens a connection named `name` (shown in the management UI).
pub async fn connect(url: &str, name: &str) -> Result<Connection, BrokerError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url, props)
        .await
        .map_err(|e| BrokerError::Unreachable { url: orderflow_telemetry::redact_url(url), reason: e.to_string() })
}
