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
pub use writer::{NOTIFY_CHANNEL, append, append_with, emit};
