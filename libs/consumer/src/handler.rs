use std::future::Future;

use orderflow_db::{Conn, ErrorClass, classify};
use orderflow_envelope::{DecodeError, Envelope, EventSet, Metadata};

/// A message as handed to a [`Handler`]: the envelope and its typed event
/// (one of the handler's [`Handler::Event`]s).
#[derive(Debug)]
pub struct Incoming<'a, E> {
    /// The envelope (ids, causality, trace context).
    pub envelope: &'a Envelope,
    /// The decoded event.
    pub event: &'a E,
}

impl<E> Incoming<'_, E> {
    /// Metadata for the events this message causes: its correlation id, it
    /// as the cause, and the trace context of the span handling it (a child
    /// of the message's own span), so the trace goes on.
    pub fn meta(&self) -> Metadata {
        Metadata {
            traceparent: orderflow_telemetry::current_traceparent().or_else(|| self.envelope.traceparent.clone()),
            ..Metadata::caused_by(self.envelope)
        }
    }
}

/// How a handler failed; decides between retrying and dead-lettering.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth retrying later (a downstream hiccup).
    #[error("transient: {0}")]
    Transient(String),
    /// Lost a race with a concurrent change (optimistic version check):
    /// retry at once.
    #[error("conflict: {0}")]
    Conflict(String),
    /// Retrying gives the same result: dead-letter now.
    #[error("permanent: {0}")]
    Permanent(String),
    /// A dependency (the database pool, a downstream service) is unavailable:
    /// wait for it and handle the same delivery again.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A database error, classified by [`orderflow_db::classify`].
    #[error("database: {0}")]
    Db(#[from] diesel::result::Error),
}

impl From<DecodeError> for HandlerError {
    fn from(e: DecodeError) -> Self {
        Self::Permanent(e.to_string())
    }
}

impl From<serde_json::Error> for HandlerError {
    fn from(e: serde_json::Error) -> Self {
        Self::Permanent(format!("serialization: {e}"))
    }
}

/// What the runtime does with a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disposition {
    /// The database connection is gone: the whole batch waits for it.
    WaitForDatabase,
    /// Something this message needs is unavailable: it waits and goes again.
    WaitForDependency,
    RetryNow,
    RetryLater,
    DeadLetter,
}

impl HandlerError {
    pub(crate) fn disposition(&self) -> Disposition {
        match self {
            Self::Transient(_) => Disposition::RetryLater,
            Self::Unavailable(_) => Disposition::WaitForDependency,
            Self::Conflict(_) => Disposition::RetryNow,
            Self::Permanent(_) => Disposition::DeadLetter,
            Self::Db(e) => match classify(e) {
                ErrorClass::Connection => Disposition::WaitForDatabase,
                ErrorClass::Conflict => Disposition::RetryNow,
                // Bounded by the server (statement and lock timeouts): a
                // transient failure that goes through the retry tiers.
                ErrorClass::Timeout => Disposition::RetryLater,
                ErrorClass::Permanent => Disposition::DeadLetter,
            },
        }
    }
}

/// How often [`Handler::prepare`] may leave a message for later before it is
/// handled alone, waiting for its rows.
pub const DEFER_LIMIT: u32 = 20;

/// A consumer's business logic. It runs inside the transaction that also
/// records the message in the inbox: every write it makes (domain rows,
/// outbox rows) commits or rolls back with that record. It must be correct
/// when messages arrive late or out of order; duplicates never reach it.
///
/// The runtime handles several messages in one transaction, first without
/// savepoints: if a handler fails, the whole transaction is rolled back,
/// that message is settled with its failure, and the others run again in a
/// new transaction (when the failure is no one message's, each then runs in
/// a savepoint of its own, and `conn` is that savepoint). So a handler may
/// run more than once for one delivery, and only a committed run counts: it
/// must do nothing outside `conn` that a rollback would not undo, and must
/// not commit, roll back or change session settings itself; it may open
/// nested transactions (savepoints). Each statement runs under the
/// server-side statement and lock timeouts derived from
/// [`crate::ConsumerConfig::handler_timeout`].
pub trait Handler: Send + Sync + 'static {
    /// The events this handler decodes: one [`orderflow_envelope::DomainEvent`]
    /// type, or a catalog's sum type. A message of any other type is
    /// dead-lettered as an unknown event type before the handler sees it.
    type Event: EventSet;

    /// Handles one message inside the open transaction `conn`.
    fn handle(
        &self,
        conn: &mut Conn,
        msg: Incoming<'_, Self::Event>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Runs once per batch transaction, before any of its messages is
    /// handled, with all of them, and says which of them to handle in this
    /// transaction (`true`) and which to leave for a later one (`false`).
    ///
    /// A handler whose messages lock rows that other messages share (stock
    /// rows) takes them here without waiting (`FOR UPDATE SKIP LOCKED`) and
    /// leaves out the messages that did not get all of theirs: they go again
    /// in a later transaction after a short pause, and one passed over
    /// [`DEFER_LIMIT`] times is then handled alone, without `prepare`,
    /// waiting for its rows like any transaction. So no batch waits for a row
    /// while it holds others (no deadlock, which costs PostgreSQL's
    /// `deadlock_timeout` and a retry), and batches that share no rows run
    /// side by side instead of queueing behind each other's whole batch.
    ///
    /// It runs in a savepoint of its own; if it fails, every message is
    /// handled as if it had answered `true`. The default takes nothing and
    /// handles everything.
    fn prepare(
        &self,
        conn: &mut Conn,
        batch: &[&Self::Event],
    ) -> impl Future<Output = diesel::QueryResult<Vec<bool>>> + Send {
        let _ = conn;
        let all = vec![true; batch.len()];
        async move { Ok(all) }
    }

    /// Runs after a batch transaction has committed, with the events it
    /// handled for the first time (not duplicates, not the ones that failed
    /// or were left for later), before their deliveries are acked.
    ///
    /// Their effects are durable and visible to other sessions by then, so
    /// this is where a process tells its own waiters (a long poll, a cache)
    /// that something changed. It must not block or fail: a crash between
    /// the commit and this call skips it, so whatever it wakes must also
    /// find the change on its own (e.g. by reading again after a while).
    /// The default does nothing.
    fn committed(&self, events: &[&Self::Event]) {
        let _ = events;
    }
}
