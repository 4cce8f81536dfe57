//! The event envelope that travels through the outbox, the broker and the
//! inbox, and the typed events of the order pipeline.
//!
//! The envelope is the one wire contract between services: it carries the
//! dedupe key (`message_id`), the routing key (`event_type`), the schema
//! version, the aggregate the event belongs to (for ordering and lanes), the
//! correlation/causation ids and the W3C `traceparent`, plus the JSON payload.
//! On the wire the whole envelope is the AMQP message body (JSON); its headers
//! are mirrored into AMQP properties for operators and tools.

mod envelope;
pub mod events;
pub mod money;

pub use envelope::{DecodeError, DomainEvent, Envelope, LANE_COUNT, Metadata, SchemaVersion, lane_for};
pub use money::{Money, MoneyError};
