//! The transactional outbox.
//!
//! - [`append`] writes events in the caller's transaction (refusing, with
//!   [`Unpublishable`], what can never be published); after the commit
//!   the caller wakes the relays with [`Waker::wake`] (one coalesced
//!   `NOTIFY` outside the writer's commit; the relays' poll is the safety
//!   net for a lost wake-up).
//! - [`relay`] is the relay core run by `outbox-relay`: it claims due rows of
//!   the lanes it leases, publishes them with publisher confirms and marks
//!   them published.
//!
//! Errors follow the platform's error policy (`orderflow_db::error`).
//!
//! Writing an event in the transaction that makes the change, then waking
//! the relay after the commit (`loyalty-service/src/points.rs` does this
//! inside a consumer, where the runtime commits and wakes):
//!
//! ```no_run
//! use diesel_async::AsyncConnection;
//! use orderflow_envelope::{DomainEvent, Metadata, SchemaVersion};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct PointsGranted {
//!     customer_id: String,
//!     points: i64,
//! }
//!
//! impl DomainEvent for PointsGranted {
//!     const EVENT_TYPE: &'static str = "points.granted";
//!     const AGGREGATE_TYPE: &'static str = "customer";
//!     const SCHEMA_VERSION: SchemaVersion = SchemaVersion::new(1, 0);
//!     fn aggregate_id(&self) -> String {
//!         self.customer_id.clone()
//!     }
//! }
//!
//! # async fn grant(pool: orderflow_db::Pool, waker: orderflow_outbox::Waker) -> Result<(), Box<dyn std::error::Error>> {
//! let mut conn = pool.get().await?;
//! conn.transaction::<_, diesel::result::Error, _>(async |tx| {
//!     // ... the domain change, with `tx` ...
//!     let granted = PointsGranted { customer_id: "c-1".into(), points: 5 };
//!     orderflow_outbox::emit(tx, &granted, 1, &Metadata::default()).await?;
//!     Ok(())
//! })
//! .await?;
//! waker.wake(); // the relay publishes now rather than at its next poll
//! # Ok(()) }
//! ```

pub mod admin;
pub mod backoff;
#[cfg(feature = "failpoints")]
mod failpoint;
mod lanes;
mod limits;
mod registration;
pub mod relay;
mod row;
mod waker;
mod writer;

#[cfg(feature = "failpoints")]
pub use failpoint::failpoint;
pub use limits::{DEFAULT_MAX_MESSAGE_BYTES, Limits, MAX_EVENT_TYPE_BYTES, MAX_HEADER_BYTES, Unpublishable};
pub use registration::describe_and_register;
pub use row::{OutboxHeaders, PendingRow};
pub use waker::{Waker, notify};
pub use writer::{NOTIFY_CHANNEL, append, append_with, emit, watch_appends};
