//! Database errors, and the platform's error policy (every crate of
//! orderflow links here).
//!
//! # Error policy
//!
//! 1. **Libraries return typed errors.** Each platform crate has its own
//!    `thiserror` enums ([`DbError`], `BrokerError`, `RelayError`,
//!    `ConsumerError`, `HandlerError`, `DecodeError`, `ApiError`,
//!    `StartupError`). A variant that wraps another error keeps it as its
//!    `source` (`#[from]`/`#[source]`), never as a `String` of its text, so
//!    a caller can match on it and a log shows the whole chain.
//! 2. **Binaries add context at the edge.** `main` functions and operator
//!    commands use `anyhow` with context saying what was being done; a
//!    failure is one line on stderr and a non-zero exit.
//! 3. **Errors are classified where a decision is made, once.** [`classify`]
//!    sorts a database error into connection / conflict / timeout /
//!    permanent; the consumer runtime turns that into wait, retry now,
//!    retry later or dead-letter; the HTTP layer into 503 or 500 (a client's
//!    mistake is a 4xx `Problem` with the field at fault).
//! 4. **Bad configuration stops the start** with one line naming the
//!    setting and how to fix it, never a retry loop.
//! 5. **Stored values map to enums.** A status column read back with a
//!    value the code does not know is an error, never a silent default.
//! 6. **Nothing is lost to an error.** A message that cannot be decoded or
//!    handled is dead-lettered with its reason in a header; a row that
//!    cannot be published is parked dead with its last error; both can be
//!    replayed.
//! 7. **No `unwrap()`/`expect()`** outside tests and start-up (clippy
//!    warns; CI denies warnings).

use diesel::result::{DatabaseErrorKind, Error as DieselError};

/// Errors of the db crate.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The server could not be reached or refused the connection.
    #[error("cannot connect to PostgreSQL at {url}: {reason}")]
    Unreachable {
        /// The URL tried, password redacted.
        url: String,
        /// What the driver said.
        reason: String,
    },
    /// The URL or pool settings are invalid.
    #[error("invalid database configuration: {0}")]
    Config(String),
    /// Running migrations failed.
    #[error("migration failed: {0}")]
    Migration(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The connection closed (its notifications ended).
    #[error("the database connection closed")]
    Closed,
    /// A query failed.
    #[error(transparent)]
    Query(#[from] DieselError),
}

impl DbError {
    pub(crate) fn unreachable(url: &str, reason: impl std::fmt::Display) -> Self {
        Self::Unreachable { url: crate::redact_url(url), reason: reason.to_string() }
    }
}

/// How a caller should react to a database error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The connection is gone or the server is unavailable: wait for it and
    /// try again; the work itself is fine.
    Connection,
    /// A conflict with a concurrent transaction (serialization failure,
    /// deadlock): retry the transaction.
    Conflict,
    /// The server cancelled a statement at its `statement_timeout` or
    /// `lock_timeout`: the work took too long or waited too long for a lock
    /// held by someone else. Worth retrying later, a bounded number of times.
    Timeout,
    /// Anything else: retrying the same work gives the same result.
    Permanent,
}

/// Classifies a diesel error.
pub fn classify(err: &DieselError) -> ErrorClass {
    match err {
        DieselError::DatabaseError(kind, info) => match kind {
            DatabaseErrorKind::SerializationFailure => ErrorClass::Conflict,
            DatabaseErrorKind::ClosedConnection => ErrorClass::Connection,
            DatabaseErrorKind::UnableToSendCommand => ErrorClass::Connection,
            _ => match info.message() {
                // diesel maps only some SQLSTATEs to kinds; deadlocks and
                // admin shutdowns come through as unknown with their text.
                m if m.contains("deadlock detected") => ErrorClass::Conflict,
                m if m.contains("canceling statement due to statement timeout")
                    || m.contains("canceling statement due to lock timeout") =>
                {
                    ErrorClass::Timeout
                }
                m if m.contains("terminating connection")
                    || m.contains("connection closed")
                    || m.contains("the database system is") =>
                {
                    ErrorClass::Connection
                }
                _ => ErrorClass::Permanent,
            },
        },
        DieselError::BrokenTransactionManager => ErrorClass::Connection,
        _ => ErrorClass::Permanent,
    }
}
