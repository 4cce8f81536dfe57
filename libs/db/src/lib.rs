//! PostgreSQL for orderflow services: the connection pool, the platform
//! tables (outbox, inbox) defined once, migrations, waiting for `NOTIFY`
//! ([`Listener`]) and error classification ([`classify`]). The platform's
//! error policy is written once, in [`error`].
//!
//! A service owns one database. At start it opens it: created if asked,
//! the platform's migrations (`outbox`, `inbox`, `outbox_replays`) run
//! first, then the service's own, under an advisory lock so that replicas
//! starting together do not race.
//!
//! ```no_run
//! use diesel_migrations::EmbeddedMigrations;
//!
//! # async fn start(my_migrations: EmbeddedMigrations) -> Result<(), orderflow_db::DbError> {
//! // `my_migrations` = `embed_migrations!("migrations")`: your tables only.
//! let url = "postgres://postgres@127.0.0.1:5432/loyalty";
//! let pool = orderflow_db::open(url, 8, true, my_migrations).await?;
//! # let _ = pool;
//! // Waiting for a NOTIFY needs a connection of its own.
//! let mut listener = orderflow_db::Listener::open(url, "my_channel").await?;
//! listener.notified().await?;
//! # Ok(()) }
//! ```

mod cached;
pub mod error;
pub mod held;
mod migrate;
pub mod schema;

use std::time::Duration;

use diesel_async::AsyncPgConnection;
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod};

pub use cached::{Cached, CachedDsl};
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

/// Runs `work` in a transaction opened by `begin`, SQL that starts with
/// `BEGIN` and may set the transaction up in the same breath (e.g.
/// `BEGIN; SET LOCAL statement_timeout = 5000`): one round trip where
/// `BEGIN` and then the settings would take two. Committed if `work`
/// succeeds, rolled back if it fails, as `AsyncConnection::transaction`.
pub async fn transaction_with<R, E>(
    conn: &mut Conn,
    begin: &str,
    work: impl AsyncFnOnce(&mut Conn) -> Result<R, E>,
) -> Result<R, E>
where
    E: From<diesel::result::Error>,
{
    use diesel_async::{AnsiTransactionManager, TransactionManager};
    AnsiTransactionManager::begin_transaction_sql(conn, begin).await?;
    match work(&mut *conn).await {
        Ok(value) => {
            AnsiTransactionManager::commit_transaction(conn).await?;
            Ok(value)
        }
        Err(error) => match AnsiTransactionManager::rollback_transaction(conn).await {
            // The work's error says more than a rollback on a broken connection.
            Ok(()) | Err(diesel::result::Error::BrokenTransactionManager) => Err(error),
            Err(rollback) => Err(rollback.into()),
        },
    }
}

/// `url` with the connection settings every orderflow connection needs,
/// unless the URL sets them itself: a connect timeout, TCP keepalives, and a
/// TCP user timeout. Without them a connection to a server that stops
/// answering (a network stall, not a refusal) would wait forever; with them
/// it fails within seconds and is replaced.
pub fn tuned(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else { return url.to_owned() };
    let present: Vec<String> = parsed.query_pairs().map(|(k, _)| k.into_owned()).collect();
    let mut query = parsed.query_pairs_mut();
    for (key, value) in [
        ("connect_timeout", "5"),
        ("keepalives", "1"),
        ("keepalives_idle", "10"),
        ("keepalives_interval", "5"),
        ("keepalives_retries", "3"),
        ("tcp_user_timeout", "15000"),
    ] {
        if !present.iter().any(|p| p == key) {
            query.append_pair(key, value);
        }
    }
    drop(query);
    parsed.to_string()
}

/// Opens one dedicated connection (see [`tuned`]).
pub async fn establish(url: &str) -> Result<Conn, DbError> {
    use diesel_async::AsyncConnection;
    Conn::establish(&tuned(url)).await.map_err(|e| DbError::unreachable(url, e))
}

/// Builds a pool for `url` and checks that one connection can be made, so a
/// wrong URL or a stopped server fails at start with a clear error.
pub async fn connect(url: &str, max_size: usize) -> Result<Pool, DbError> {
    // Fast recycling: no `SELECT 1` round trip on every checkout. A
    // connection that died while idle fails its first query instead; the
    // error is classified as a connection error (callers retry or answer
    // 503) and diesel-async marks it broken, so the pool drops it. Keepalives
    // and the TCP user timeout (see `tuned`) find dead peers meanwhile.
    let mut config = ManagerConfig::default();
    config.recycling_method = RecyclingMethod::Fast;
    let manager = AsyncDieselConnectionManager::<Conn>::new_with_config(tuned(url), config);
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

/// The URL with its password shown as `***`, for errors and logs.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparseable URL>".to_owned(),
    }
}

/// A connection that LISTENs on a channel: the one way the platform waits
/// for `NOTIFY` (the relay's session, the notification dispatcher).
/// Notifications need a connection of their own, never a pooled one (it is
/// shared and recycled).
pub struct Listener {
    conn: Conn,
}

impl Listener {
    /// Connects to `url` and listens on `channel`.
    pub async fn open(url: &str, channel: &str) -> Result<Self, DbError> {
        Self::on(establish(url).await?, channel).await
    }

    /// Listens on `channel` on a connection of the caller's (which may go on
    /// using it between waits, e.g. for advisory locks: see [`Self::conn`]).
    pub async fn on(mut conn: Conn, channel: &str) -> Result<Self, DbError> {
        use diesel_async::RunQueryDsl;
        // LISTEN takes an identifier, not a parameter: only plain names.
        if channel.is_empty() || !channel.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(DbError::Config(format!("invalid channel name {channel:?}")));
        }
        diesel::sql_query(format!("LISTEN {channel}")).execute(&mut conn).await?;
        Ok(Self { conn })
    }

    /// The connection, for other statements between waits.
    pub fn conn(&mut self) -> &mut Conn {
        &mut self.conn
    }

    /// Waits for a notification, then takes those that piled up meanwhile, so
    /// one wake-up answers all of them. Fails when the connection does.
    pub async fn notified(&mut self) -> Result<(), DbError> {
        use futures::{FutureExt, StreamExt};
        let mut stream = std::pin::pin!(self.conn.notifications_stream());
        match stream.next().await {
            Some(Ok(_)) => {
                while let Some(Some(n)) = stream.next().now_or_never() {
                    n?;
                }
                Ok(())
            }
            Some(Err(e)) => Err(e.into()),
            // The connection's task ended: the connection is gone.
            None => Err(DbError::Closed),
        }
    }
}

/// A service's start-up: creates its database if asked and it is missing,
/// builds the pool, and runs the platform's and the service's migrations.
pub async fn open(
    url: &str,
    pool_size: usize,
    create: bool,
    migrations: diesel_migrations::EmbeddedMigrations,
) -> Result<Pool, DbError> {
    if create {
        ensure_database(url).await?;
    }
    let pool = connect(url, pool_size).await?;
    migrate(&pool, Some(migrations)).await?;
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use super::tuned;

    #[test]
    fn passwords_are_never_shown() {
        assert_eq!(super::redact_url("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(super::redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(super::redact_url("not a url secret"), "<unparseable URL>");
    }

    #[test]
    fn tuning_adds_timeouts_but_keeps_what_the_url_says() {
        let t = tuned("postgres://u@h:5432/db?connect_timeout=2");
        assert!(t.contains("connect_timeout=2") && !t.contains("connect_timeout=5"), "{t}");
        assert!(t.contains("tcp_user_timeout=15000") && t.contains("keepalives_idle=10"), "{t}");
        assert_eq!(tuned("not a url"), "not a url");
    }
}
