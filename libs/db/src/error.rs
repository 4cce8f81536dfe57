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
    Migration(String),
    /// The connection closed (its notifications ended).
    #[error("the database connection closed")]
    Closed,
    /// A query failed.
    #[error(transparent)]
    Query(#[from] DieselError),
}

impl DbError {
    pub(crate) fn unreachable(url: &str, reason: impl std::fmt::Display) -> Self {
        Self::Unreachable { url: orderflow_telemetry::redact_url(url), reason: reason.to_string() }
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
