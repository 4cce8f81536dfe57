//! The transactional outbox.
//!
//! - [`append`] writes events in the caller's transaction and wakes the relay
//!   with `pg_notify`, which PostgreSQL delivers only if the transaction
//!   commits.
//! - [`relay`] is the relay core run by `outbox-relay`: it claims due rows of
//!   the lanes it leases, publishes them with publisher confirms and marks
//!   them published.

pub mod admin;
pub mod backoff;
mod failpoint;
pub mod relay;
mod row;
mod writer;

pub use failpoint::failpoint;
pub use row::{OutboxHeaders, PendingRow};
pub use writer::{NOTIFY_CHANNEL, append, emit};
