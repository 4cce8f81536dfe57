//! PostgreSQL for orderflow services: the connection pool, the platform
//! tables (outbox, inbox) defined once, migrations and error classification.

mod error;
mod migrate;
pub mod schema;

use std::time::Duration;

use diesel_async::AsyncPgConnection;
use diesel_async::pooled_connection::AsyncDieselConnectionManager;

pub use error::{DbError, ErrorClass, classify};
pub use migrate::{PLATFORM_MIGRATIONS, ensure_database, migrate};

/// The diesel-async connection type used everywhere.
pub type Conn = AsyncPgConnection;
/// A deadpool pool of [`Conn`].
pub type Pool = diesel_async::pooled_connection::deadpool::Pool<Conn>;
/// Why no connection could be checked out of a [`Pool`].
pub type PoolError = diesel_async::pooled_connection::deadpool::PoolError;
/// A connection checked out of a [`Pool`].
pub type PooledConn = diesel_async::pooled_connection::deadpool::Object<Conn>;

/// Builds a pool for `url` and checks that one connection can be made, so a
/// wrong URL or a stopped server fails at start with a clear error.
pub async fn connect(url: &str, max_size: usize) -> Result<Pool, DbError> {
    let manager = AsyncDieselConnectionManager::<Conn>::new(url);
    let pool = Pool::builder(manager)
        .max_size(max_size)
        .runtime(deadpool::Runtime::Tokio1)
        // Bounded waits: a request fails fast instead of hanging when the
        // database is gone; callers treat it as transient.
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|e| DbError::Config(e.to_string()))?;
    drop(pool.get().await.map_err(|e| DbError::unreachable(url, e))?);
    Ok(pool)
}

/// A dedicated connection that LISTENs on `channel`. Notifications need a
/// connection of their own: a pooled one is shared and recycled.
pub async fn listen(url: &str, channel: &str) -> Result<Conn, DbError> {
    use diesel_async::{AsyncConnection, RunQueryDsl};
    if channel.is_empty() || !channel.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(DbError::Config(format!("invalid channel name {channel:?}")));
    }
    let mut conn = Conn::establish(url).await.map_err(|e| DbError::unreachable(url, e))?;
    diesel::sql_query(format!("LISTEN {channel}")).execute(&mut conn).await?;
    Ok(conn)
}

/// `url` with the password removed, for logs and error messages.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparseable database url>".to_owned(),
    }
}
