//! RabbitMQ for orderflow: connecting (to one node or to any node of a
//! cluster), declaring the prefixed topology, and the AMQP properties that
//! mirror an envelope.
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

mod addresses;
mod properties;
mod topology;

pub use addresses::{AddressError, Addresses, AmqpUrlsParser, CONNECT_TIMEOUT, FRAME_MAX, connect_any};
pub use lapin;
pub use properties::{header_i64, header_str, properties_for};
pub use topology::{DEAD_LETTER_DELIVERY_LIMIT, DEFAULT_RETRY_DELAYS, QUORUM_GROUP_SIZE, QueueSpec, Topology};

use lapin::Connection;

/// Errors of the broker crate.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The configured broker addresses are not a list of AMQP URLs.
    #[error(transparent)]
    Address(#[from] AddressError),
    /// The broker could not be reached or refused the login (at every
    /// address, when several are given).
    #[error("cannot connect to RabbitMQ at {url}: {reason}")]
    Unreachable {
        /// The URLs tried, passwords redacted.
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
    /// The queue argument an [`BrokerError::Inequivalent`] refusal is about.
    pub fn argument(&self) -> Option<&str> {
        match self {
            Self::Inequivalent { argument, .. } => Some(argument),
            _ => None,
        }
    }

    /// Wraps a lapin error with what was being done.
    pub fn op(op: impl Into<String>) -> impl FnOnce(lapin::Error) -> Self {
        let op = op.into();
        move |source| Self::Operation { op, source }
    }
}

/// Opens a connection named `name` (shown in the management UI) to the
/// broker at `urls`: one AMQP URL, or several nodes of a cluster separated
/// by commas, tried in turn as [`connect_any`] says.
pub async fn connect(urls: &str, name: &str) -> Result<Connection, BrokerError> {
    connect_any(&Addresses::parse(urls)?, name).await
}
