//! The consumer runtime that runs every orderflow consumer.
//!
//! Per delivery: decode the envelope and the typed event (undecodable,
//! unknown type or unknown major version: dead-letter at once with the
//! reason); begin a transaction; insert `(consumer, message_id)` into
//! `inbox` — a conflict means a duplicate: commit, ack, skip; else run the
//! handler, which changes domain rows and appends outbox rows in the same
//! transaction; commit; then ack.
//!
//! Failures:
//! - database unreachable: the delivery is kept (unacked) and retried in
//!   place with backoff until the database is back, without spending retry
//!   tiers: an outage is nobody's message's fault;
//! - conflict (serialization failure, deadlock, lost optimistic race):
//!   retried at once a few times, then treated as transient;
//! - transient: republished to the next retry tier's delay queue (TTL, then
//!   back to the work queue); after the last tier, dead-lettered;
//! - permanent: dead-lettered at once.
//!
//! Dead-lettered messages go to the queue's DLQ with headers saying why
//! (`x-orderflow-error`, `-attempts`, `-consumer`, `-original-routing-key`,
//! `-failed-at`). A retry or dead-letter publish is confirmed by the broker
//! before the original is acked, so nothing is lost in between.

mod args;
mod error;
mod handler;
mod runtime;

pub use args::ConsumerArgs;
pub use error::ConsumerError;
pub use handler::{Handler, HandlerError, Incoming};
pub use runtime::{ConsumerConfig, declare, headers, prepare, run};
