//! The transactional outbox.
//!
//! - [`append`] writes events in the caller's transaction; after the commit
//!   the caller wakes the relays with [`Waker::wake`] (one coalesced
//!   `NOTIFY` outside the writer's commit; the relays' poll is the safety
//!   net for a lost wake-up).
//! - [`relay`] is the relay core run by `outbox-relay`: it claims due rows of
//!   the lanes it leases, publishes them with publisher confirms and marks
//!   them published.

pub mod admin;
pub mod backoff;
mod failpoint;
pub mod relay;
mod row;
mod waker;
mod writer;

pub use failpoint::failpoint;
pub use row::{OutboxHeaders, PendingRow};
pub use waker::{Waker, notify};
pub use writer::{NOTIFY_CHANNEL, append, emit};
